"""torch's flash-attention kernel against its plain (math) one, in the agent's own pipeline.

One process: the benchmark's random-weight SDXL-Turbo (``~/.cache/edgeai-bench``, built by
``scripts/bench``) loaded once through ``Text2Image`` with the default settings (or the precision
and weight storage given), then 512x512 images with each attention backend in turn, the order
flipped every round, so both see the same machine at the same minute. Prints the denoising time
per backend and their ratio round by round.

    .venv/bin/python tests/bench/attention.py [--rounds 8] [--dtype bfloat16] [--half-weights auto]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from pipeline import MODEL, TAESDXL, generate_image  # noqa: E402 - shared with the main benchmark


def main() -> None:
    """Load the pipeline once and time its denoising with each attention backend."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--half-weights", default="auto")
    arguments = parser.parse_args()

    from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: PLC0415

    from agent.model.pipeline import Text2Image  # noqa: PLC0415
    from agent.model.protocol import PipelineOptions  # noqa: PLC0415
    from agent.settings import Settings  # noqa: PLC0415

    defaults = PipelineOptions.from_settings(Settings(node_id="bench"))
    options = dataclasses.replace(
        defaults,
        model=str(MODEL),
        tiny_vae=str(TAESDXL),
        dtype=arguments.dtype,
        half_weights=arguments.half_weights,
    )
    model = Text2Image(options)
    print(f"levers: {model.loaded.levers}")
    backends = {
        "flash (default)": contextlib.nullcontext,
        "math": lambda: sdpa_kernel([SDPBackend.MATH]),
    }
    denoising: dict[str, list[float]] = {name: [] for name in backends}
    for round_number in range(arguments.rounds):
        order = list(backends.items())
        for name, backend in order if round_number % 2 == 0 else reversed(order):
            prompt = f"a lighthouse, round {round_number}, {name}"
            with backend():
                _, timings = generate_image(model, prompt, seed=round_number)
            denoising[name].append(timings.denoising)
    for name, seconds in denoising.items():
        print(f"{name}: denoise median {statistics.median(seconds):.2f} s (min {min(seconds):.2f})")
    ratios = sorted(
        math / flash
        for math, flash in zip(denoising["math"], denoising["flash (default)"], strict=True)
    )
    print(
        f"math / flash per round: median {statistics.median(ratios):.2f}x "
        f"({ratios[0]:.2f}-{ratios[-1]:.2f}; above 1: flash is faster)"
    )


if __name__ == "__main__":
    main()
