"""How far each form of the weights moves the output from float32, on the same random weights.

Loads SDXL-Turbo's real architecture (random weights, built by ``pipeline.py``) through the
agent's own pipeline, once per form: float32 weights (the reference), float16 (the Pi path
today), int8 and int4 (written to a temporary folder first). Each generates the same 512x512
image (same prompt, same seed, 1 step); the script prints the UNet output's relative L2 error and
cosine similarity against float32, and the images' PSNR. Random weights say how much the
arithmetic moves, not how a picture looks: on the real weights, ``python -m agent.compare_forms``
draws the forms side by side.

    .venv/bin/python tests/bench/form_deviation.py       (about 5 minutes, 14 GB of memory)
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1]))

from pipeline import MODEL, PROMPT, build_model, generate_image  # noqa: E402

from agent.compare_forms import psnr  # noqa: E402
from agent.model.pipeline import Text2Image  # noqa: E402
from agent.model.protocol import PipelineOptions  # noqa: E402


def generate(form: str, weights: Path) -> tuple[torch.Tensor, np.ndarray]:
    """Return the UNet's output and the image, from a freshly loaded pipeline."""
    options = PipelineOptions(
        model=str(MODEL),
        dtype="float32",
        half_weights="off" if form == "float32" else "on",
        weight_form="float16" if form == "float32" else form,
        weights_dir=str(weights),
        warmup=False,
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
    """Generate with each form and print how far each is from float32."""
    if not (MODEL / "model_index.json").exists():
        build_model()
    with tempfile.TemporaryDirectory(prefix="edgeai-forms-") as folder:
        reference, reference_image = generate("float32", Path(folder))
        print("| form | UNet output relative L2 error | cosine similarity | image PSNR dB |")
        print("| --- | --- | --- | --- |")
        for form in ("float16", "int8", "int4"):
            output, image = generate(form, Path(folder))
            relative = ((reference - output).norm() / reference.norm()).item()
            cosine = torch.nn.functional.cosine_similarity(
                reference.flatten(), output.flatten(), dim=0
            ).item()
            decibels = psnr(image, reference_image)
            print(f"| {form} | {relative:.4f} | {cosine:.5f} | {decibels:.1f} |", flush=True)


if __name__ == "__main__":
    main()
