"""What this machine can do, measured: matrix-multiply rates, and what an image costs in FLOPs.

A figure means little on a shared machine without the rate the CPU reached the same minute
(the bfloat16 rate of one machine here moved from 964 to 1,558 GFLOP/s within an hour), so the
benchmark measures the rates beside every round of cases and reports each case as a share of
the matching rate.

    .venv/bin/python tests/bench/machine.py --rates     # JSON: GFLOP/s per precision
    .venv/bin/python tests/bench/machine.py --flops     # JSON: GFLOP per stage (cached)
    .venv/bin/python tests/bench/machine.py --shapes    # the UNet's own matmul shapes' rates
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1]))

MATMUL_SIZE = 4096
MATMUL_REPEATS = 5
PRECISIONS = ("float32", "bfloat16")


def best_rate(rows: int, inner: int, columns: int, precision: str, repeats: int) -> float:
    """Return the best GFLOP/s of a (rows x inner) @ (inner x columns) multiply in ``precision``.

    The best of ``repeats``, after one call that pays for allocations and kernel choice: the
    rate the CPU can reach, which is what a share of it should be measured against.
    """
    import torch  # noqa: PLC0415

    dtype = getattr(torch, precision)
    left = torch.randn(rows, inner, dtype=dtype)
    right = torch.randn(inner, columns, dtype=dtype)
    left @ right
    best = float("inf")
    for _ in range(repeats):
        begun = time.perf_counter()
        left @ right
        best = min(best, time.perf_counter() - begun)
    return round(2 * rows * inner * columns / best / 1e9, 1)


def matmul_rates(threads: int = 0, precisions: tuple[str, ...] = PRECISIONS) -> dict[str, float]:
    """Return the best GFLOP/s of a 4096^3 matrix multiply per precision, on ``threads`` threads."""
    import torch  # noqa: PLC0415

    if threads:
        torch.set_num_threads(threads)
    square = (MATMUL_SIZE, MATMUL_SIZE, MATMUL_SIZE)
    return {name: best_rate(*square, name, MATMUL_REPEATS) for name in precisions}


UNET_SHAPES = {
    "640 ch, 1024 tokens, attention projection": (1024, 640, 640),
    "640 ch, 1024 tokens, feed-forward in": (1024, 640, 5120),
    "640 ch, 1024 tokens, feed-forward out": (1024, 2560, 640),
    "1280 ch, 256 tokens, attention projection": (256, 1280, 1280),
    "1280 ch, 256 tokens, feed-forward in": (256, 1280, 10240),
    "1280 ch, 256 tokens, feed-forward out": (256, 5120, 1280),
}
"""(M, K, N) of the linear layers that carry most of the UNet's FLOPs at 512x512 (64x64
latents): the transformer blocks run at 32x32 (640 channels) and 16x16 (1280 channels)."""


def packed_rate(rows: int, inner: int, columns: int, repeats: int) -> float:
    """Return the best GFLOP/s of a bfloat16 linear layer with its weight packed for oneDNN.

    The agent's own packing (``agent/model/packed.py``), as the default path runs the UNet.
    """
    import torch  # noqa: PLC0415

    from agent.model.packed import pack_weights  # noqa: PLC0415

    layer = torch.nn.Linear(inner, columns, bias=False, dtype=torch.bfloat16)
    pack_weights(layer)
    tokens = torch.randn(rows, inner, dtype=torch.bfloat16)
    with torch.inference_mode():
        layer(tokens)
        best = float("inf")
        for _ in range(repeats):
            begun = time.perf_counter()
            layer(tokens)
            best = min(best, time.perf_counter() - begun)
    return round(2 * rows * inner * columns / best / 1e9, 1)


def shape_rates(repeats: int = 20) -> dict[str, dict[str, float]]:
    """Return GFLOP/s per precision of the UNet's own matmul shapes, and of 4096^3 for scale.

    "packed" is bfloat16 with the weight packed once for oneDNN, against the bfloat16 reference.
    """
    reference = matmul_rates()
    rates = {"4096^3 (the benchmark's reference)": {**reference, "packed": reference["bfloat16"]}}
    for label, shape in UNET_SHAPES.items():
        rates[label] = {name: best_rate(*shape, name, repeats) for name in PRECISIONS}
        rates[label]["packed"] = packed_rate(*shape, repeats)
    return rates


def count_flops(size: int = 512) -> dict[str, float]:
    """Return GFLOP per stage of one SDXL-Turbo image (1 step, guidance 0) on the random model.

    Counted by torch's own FlopCounterMode (matrix multiplies, convolutions; it has no formula for
    the CPU flash-attention kernel, about 55 GFLOP more in the UNet at 512x512) around
    each stage of the agent's path, and around the full VAE's decoder for plain diffusers.
    """
    import torch  # noqa: PLC0415
    from pipeline import MODEL, TAESDXL, generate_image  # noqa: PLC0415
    from torch.utils.flop_counter import FlopCounterMode  # noqa: PLC0415

    from agent.model.pipeline import Text2Image  # noqa: PLC0415
    from agent.model.protocol import PipelineOptions  # noqa: PLC0415

    # Unpacked: FlopCounterMode counts torch's own operators, not oneDNN's packed ones.
    model = Text2Image(
        PipelineOptions(
            model=str(MODEL),
            tiny_vae=str(TAESDXL),
            dtype="bfloat16",
            packed_weights=False,
            warmup=False,
        )
    )
    pipeline = model._pipeline
    counted: dict[str, float] = {}

    def counting(stage: str, call: object) -> object:
        def wrapper(*args: object, **kwargs: object) -> object:
            with FlopCounterMode(display=False) as counter:
                result = call(*args, **kwargs)  # type: ignore[operator]
            counted[stage] = counted.get(stage, 0.0) + counter.get_total_flops() / 1e9
            return result

        return wrapper

    pipeline.text_encoder.forward = counting("text_encoders", pipeline.text_encoder.forward)
    pipeline.text_encoder_2.forward = counting("text_encoders", pipeline.text_encoder_2.forward)
    pipeline.unet.forward = counting("unet", pipeline.unet.forward)
    pipeline.vae.decode = counting("tiny_decoder", pipeline.vae.decode)
    generate_image(model, "count", size=size)
    from diffusers import AutoencoderKL  # noqa: PLC0415

    vae = AutoencoderKL.from_pretrained(MODEL / "vae", torch_dtype=torch.bfloat16)
    latents = torch.zeros(1, 4, size // 8, size // 8, dtype=torch.bfloat16)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        vae.decode(latents)
    counted["full_decoder"] = counter.get_total_flops() / 1e9
    return {stage: round(value, 1) for stage, value in counted.items()}


def cached_flops() -> dict[str, float]:
    """Return :func:`count_flops`, counted once in a fresh process and kept beside the model."""
    from pipeline import CACHE  # noqa: PLC0415

    path = CACHE / "flops-512.json"
    if not path.exists():
        import subprocess  # noqa: PLC0415

        completed = subprocess.run(
            [sys.executable, __file__, "--flops"], capture_output=True, text=True, check=True
        )
        path.write_text(completed.stdout.strip().splitlines()[-1])
    return json.loads(path.read_text())  # type: ignore[no-any-return]


def describe() -> str:
    """Return the CPU, its core count, memory and the library versions, for a table's caption."""
    import diffusers  # noqa: PLC0415
    import torch  # noqa: PLC0415

    cpuinfo = Path("/proc/cpuinfo").read_text(encoding="ascii", errors="replace").splitlines()
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo if "model name" in line), "?")
    flags = next(
        (line.split(":", 1)[1].split() for line in cpuinfo if line.startswith("flags")), []
    )
    extensions = [flag for flag in ("avx512_bf16", "amx_bf16", "avx512_fp16") if flag in flags]
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{model} ({', '.join(extensions) or 'no bf16/fp16 extensions'}), {os.cpu_count()} cores,"
        f" {memory:.0f} GiB; torch {torch.__version__}, diffusers {diffusers.__version__}"
    )


def main() -> None:
    """Print the rates or the FLOPs as one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rates", action="store_true")
    parser.add_argument(
        "--precisions", default=",".join(PRECISIONS), help="with --rates: which (comma-separated)"
    )
    parser.add_argument("--flops", action="store_true")
    parser.add_argument("--shapes", action="store_true")
    arguments = parser.parse_args()
    if arguments.shapes:
        rates = shape_rates()
        reference = next(iter(rates.values()))
        for label, rate in rates.items():
            shares = ", ".join(
                f"{name} {rate[name]:.0f} GFLOP/s ({rate[name] / reference[name]:.0%})"
                for name in (*PRECISIONS, "packed")
            )
            print(f"{label}: {shares}")
    if arguments.rates:
        print(json.dumps(matmul_rates(precisions=tuple(arguments.precisions.split(",")))))
    if arguments.flops:
        print(json.dumps(count_flops()))


if __name__ == "__main__":
    main()
