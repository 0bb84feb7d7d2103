"""torch.compile of the UNet (inductor, with freezing) against eager, on the agent's own pipeline.

Loads SDXL-Turbo's real architecture (random weights, built by ``pipeline.py``) through the
agent's pipeline with its default settings, times eager images, compiles the UNet's forward,
times the first compiled image (the compile included) and the next ones, then eager again, with
the matrix rates before and after and the process's resident memory at each point.

    .venv/bin/python tests/bench/compile_unet.py     (about 8 minutes on 2 cores)
    .venv/bin/python tests/bench/compile_unet.py --no-freezing    (weights stay parameters)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch._inductor.config as inductor_config

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1]))

import machine  # noqa: E402
from pipeline import MODEL, PROMPT, TAESDXL, build_model, generate_image  # noqa: E402

from agent.model.pipeline import Text2Image  # noqa: E402
from agent.model.protocol import PipelineOptions  # noqa: E402


def resident_gib() -> float:
    """Return this process's resident memory in GiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 2**20
    return 0.0


def main() -> None:
    """Time eager, compile, compiled and eager again; print each with the memory."""
    if not (MODEL / "model_index.json").exists():
        build_model()
    text2image = Text2Image(PipelineOptions(model=str(MODEL), tiny_vae=str(TAESDXL)))
    counter = iter(range(1000))

    def images(label: str, count: int) -> None:
        seconds = []
        for _ in range(count):
            index = next(counter)
            begun = time.perf_counter()
            _image, timings = generate_image(text2image, f"{PROMPT}, {index}", seed=index)
            seconds.append(f"{time.perf_counter() - begun:.2f} (denoise {timings.denoising:.2f})")
        print(f"{label}: {', '.join(seconds)} s; resident {resident_gib():.1f} GiB", flush=True)

    print(f"matrix rates: {machine.matmul_rates()} GFLOP/s", flush=True)
    images("eager", 3)
    unet = text2image._pipeline.unet  # a measurement reaches inside on purpose
    eager_forward = unet.forward
    # Freezing folds the weights into the graph as constants (copies beside the parameters).
    inductor_config.freezing = "--no-freezing" not in sys.argv
    unet.forward = torch.compile(unet.forward, dynamic=False)
    images("compiled, first image (the compile included)", 1)
    images("compiled", 3)
    unet.forward = eager_forward
    images("eager again", 3)
    print(f"matrix rates: {machine.matmul_rates()} GFLOP/s", flush=True)


if __name__ == "__main__":
    main()
