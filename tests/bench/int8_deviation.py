"""How far the int8 weight option moves the output from float32, on the same random weights.

Loads SDXL-Turbo's real architecture (random weights, built by ``pipeline.py``) twice through the
agent's own pipeline: once on the Pi path (float32 compute, float16 weights) and once with
``EDGEAI_INT8_WEIGHTS``. Both generate the same 512x512 image (same prompt, same seed, 1 step);
the script prints the UNet output's relative L2 error and cosine similarity, and the images'
PSNR. Random weights say how much the arithmetic moves, not how an image looks: image quality on
the real weights is the reason the option is off by default.

    .venv/bin/python tests/bench/int8_deviation.py       (about 2 minutes, 12 GB of memory)
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1]))

from pipeline import MODEL, PROMPT, build_model, generate_image  # noqa: E402

from agent.model.pipeline import Text2Image  # noqa: E402
from agent.model.protocol import PipelineOptions  # noqa: E402


def generate(*, int8: bool) -> tuple[torch.Tensor, np.ndarray]:
    """Return the UNet's output and the image, from a freshly loaded pipeline."""
    options = PipelineOptions(
        model=str(MODEL), dtype="float32", half_weights="on", int8_weights=int8, warmup=False
    )
    text2image = Text2Image(options)
    captured: list[torch.Tensor] = []
    unet = text2image._pipeline.unet  # a measurement reaches inside on purpose
    unet.register_forward_hook(
        lambda _module, _inputs, output: captured.append(output[0].float().clone())
    )
    image, _timings = generate_image(text2image, PROMPT, seed=7)
    return captured[0], np.asarray(image, dtype=np.float64)


def main() -> None:
    """Generate both ways and print how far apart they are."""
    if not (MODEL / "model_index.json").exists():
        build_model()
    reference, reference_image = generate(int8=False)
    quantized, quantized_image = generate(int8=True)
    relative = ((reference - quantized).norm() / reference.norm()).item()
    cosine = torch.nn.functional.cosine_similarity(
        reference.flatten(), quantized.flatten(), dim=0
    ).item()
    mse = float(((reference_image - quantized_image) ** 2).mean())
    psnr = 10 * np.log10(255**2 / mse) if mse > 0 else float("inf")
    print(
        f"int8 against float32 (same random weights, seed, prompt): UNet output relative L2 error"
        f" {relative:.4f}, cosine similarity {cosine:.5f}; image PSNR {psnr:.1f} dB"
    )


if __name__ == "__main__":
    main()
