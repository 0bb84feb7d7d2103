"""Where one image's time goes: torch.profiler's top operators on the agent's own pipeline.

Loads SDXL-Turbo's real architecture (random weights, built by ``pipeline.py``) through the
agent's pipeline with the settings of a path (the Pi path by default), generates one warm-up
image, then profiles one 512x512 image and prints the operators by their own time, with the
matching matrix rate of this CPU measured in the same process.

    .venv/bin/python tests/bench/profile_image.py                 # the Pi path
    .venv/bin/python tests/bench/profile_image.py --dtype auto    # the default path
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1]))

import machine  # noqa: E402
from pipeline import MODEL, PROMPT, TAESDXL, build_model, generate_image  # noqa: E402

from agent.model.pipeline import Text2Image  # noqa: E402
from agent.model.protocol import PipelineOptions  # noqa: E402

OPERATOR_OF = {
    "aten.addmm": "aten::addmm",
    "aten.mm": "aten::mm",
    "aten.convolution": "aten::mkldnn_convolution",
    "mkldnn._linear_pointwise": "mkldnn::_linear_pointwise",
    "mkldnn._convolution_pointwise": "mkldnn::_convolution_pointwise",
}
"""The operator FlopCounterMode counts, and the one that does its work in the profile (it has no
formula for the CPU flash-attention kernel: about 55 GFLOP of the UNet at 512x512)."""


@register_flop_formula(torch.ops.mkldnn._linear_pointwise)
def packed_linear_flops(
    x_shape: list[int], *_args: object, out_shape: list[int], **_kw: object
) -> int:
    """A packed linear layer (agent/model/packed.py): a multiply and an add per weight, per row."""
    return 2 * math.prod(out_shape) * x_shape[-1]


@register_flop_formula(torch.ops.mkldnn._convolution_pointwise)
def packed_convolution_flops(
    _x_shape: list[int], w_shape: list[int], *_args: object, out_shape: list[int], **_kw: object
) -> int:
    """A packed convolution: a multiply and an add per weight of a filter, per output value."""
    return 2 * math.prod(out_shape) * math.prod(w_shape[1:])


def main() -> None:
    """Profile one warm image and print the top operators."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dtype", default="float32", help="EDGEAI_DTYPE: auto, float32, ...")
    parser.add_argument("--half-weights", default="on", help="EDGEAI_HALF_WEIGHTS: auto, on, off")
    parser.add_argument("--rows", type=int, default=12)
    arguments = parser.parse_args()
    if not (MODEL / "model_index.json").exists():
        build_model()
    options = PipelineOptions(
        model=str(MODEL),
        tiny_vae=str(TAESDXL),
        dtype=arguments.dtype,
        half_weights=arguments.half_weights,
        warmup=True,
    )
    text2image = Text2Image(options)

    def generate(index: int) -> dict[str, float]:
        _image, timings = generate_image(text2image, f"{PROMPT}, {index}", seed=index)
        return timings.as_dict()

    with FlopCounterMode(display=False) as counter:  # the warm-up image, counted
        generate(0)
    flops = {str(op): count for op, count in counter.get_flop_counts()["Global"].items()}
    with profile(activities=[ProfilerActivity.CPU]) as profiled:
        begun = time.perf_counter()
        stages = generate(1)
        total = time.perf_counter() - begun
    rates = machine.matmul_rates()
    rounded = {key: round(value, 2) for key, value in stages.items()}
    print(f"matrix rates now: {rates} GFLOP/s")
    print(f"image: {total:.2f} s, stages {rounded}")
    averages = profiled.key_averages()
    print(averages.table(sort_by="self_cpu_time_total", row_limit=arguments.rows))
    precision = "bfloat16" if text2image.dtype == torch.bfloat16 else "float32"
    print(f"operators that compute, against this CPU's {precision} 4096^3 rate:")
    for event in averages:
        counted = sum(count for op, count in flops.items() if OPERATOR_OF.get(op) == event.key)
        if counted:
            seconds = event.self_cpu_time_total / 1e6
            rate = counted / 1e9 / seconds
            print(
                f"  {event.key}: {counted / 1e9:.0f} GFLOP in {seconds:.2f} s,"
                f" {rate:.0f} GFLOP/s ({rate / rates[precision]:.0%})"
            )


if __name__ == "__main__":
    main()
