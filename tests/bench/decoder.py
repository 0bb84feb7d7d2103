"""TAESDXL's decode with its ReLUs and residual sums fused into its convolutions, against without.

One process, the benchmark's random-weight TAESDXL (``~/.cache/edgeai-bench/taesdxl-random``,
built by ``scripts/bench``) loaded twice the way the agent places it (compute precision,
channels_last), one copy fused (:func:`agent.model.fused.fuse_relu_convolutions`); the two decode
the same 512x512 latents in alternation, so both see the same machine at the same minute.

    .venv/bin/python tests/bench/decoder.py [--rounds 15] [--dtypes float32,bfloat16]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from pipeline import TAESDXL  # noqa: E402 - shared with the main benchmark

LATENT = 64  # 512x512 pixels


def measure(precision: str, rounds: int) -> None:
    """Print plain and fused decode times in ``precision``, and their ratio round by round."""
    import torch  # noqa: PLC0415
    from diffusers import AutoencoderTiny  # noqa: PLC0415

    from agent.model.fused import fuse_relu_convolutions  # noqa: PLC0415
    from agent.model.weights import settle_weights  # noqa: PLC0415

    dtype = getattr(torch, precision)
    decoders = []
    for fused in (False, True):
        decoder = AutoencoderTiny.from_pretrained(TAESDXL, torch_dtype=dtype).eval()
        settle_weights(decoder, dtype, channels_last=True)
        if fused:
            fuse_relu_convolutions(decoder)
        decoders.append(decoder)
    latents = torch.randn(1, 4, LATENT, LATENT, dtype=dtype)
    times: list[list[float]] = [[], []]
    with torch.inference_mode():
        images = [decoder.decode(latents).sample for decoder in decoders]  # kernel choice
        for _ in range(rounds):
            for index, decoder in enumerate(decoders):
                begun = time.perf_counter()
                decoder.decode(latents)
                times[index].append(time.perf_counter() - begun)
    difference = (images[1].float() - images[0].float()).abs().max().item()
    plain, fused = times
    ratios = sorted(p / f for p, f in zip(plain, fused, strict=True))
    print(
        f"{precision}: plain median {statistics.median(plain):.3f} s (min {min(plain):.3f}), "
        f"fused median {statistics.median(fused):.3f} s (min {min(fused):.3f}); "
        f"plain / fused per round: median {statistics.median(ratios):.2f}x "
        f"({ratios[0]:.2f}-{ratios[-1]:.2f}); largest pixel difference {difference:.4f}"
    )


def main() -> None:
    """Parse the arguments and measure each precision."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    arguments = parser.parse_args()
    for precision in arguments.dtypes.split(","):
        measure(precision, arguments.rounds)


if __name__ == "__main__":
    main()
