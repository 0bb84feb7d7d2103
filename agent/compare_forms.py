"""Compare the weights' forms side by side: one PNG, a row per form, the same seeds and prompts.

Whether int8 or int4 weights are good enough is a question about pictures, on the real model:

    python -m agent.compare_forms --out forms.png
    python -m agent.compare_forms --out forms.png --prompt "a lighthouse at dusk" --seeds 1,2,3

It loads the model the agent's settings name (environment or ``--config``), once per form in
turn, and generates every prompt at every seed with each. The integer forms are written to a
folder of their own (removed afterwards unless ``--keep``), never the agent's. Stop the agent
first on a small Pi: two models do not fit beside each other.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from agent.logs import configure_logging
from agent.settings import SettingsError, load_settings

if TYPE_CHECKING:
    from numpy.typing import ArrayLike
    from PIL.Image import Image

    from agent.model.protocol import PipelineOptions

FORMS = ("float16", "int8", "int4")
DEFAULT_PROMPTS = (
    "a red fox in fresh snow, morning light, photograph",
    "a cosy kitchen with a window onto a rainy garden, watercolour",
)
LABEL_WIDTH = 120


def say(line: str) -> None:
    """Print a line of the command's own output."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def build_parser() -> argparse.ArgumentParser:
    """Return the command's arguments."""
    parser = argparse.ArgumentParser(
        prog="python -m agent.compare_forms",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", type=Path, required=True, help="the PNG grid to write")
    parser.add_argument("--config", type=Path, help="TOML settings file, as the agent's")
    parser.add_argument(
        "--prompt", action="append", dest="prompts", help="a prompt (repeat for more)"
    )
    parser.add_argument("--seeds", default="1,2", help="comma-separated seeds [1,2]")
    parser.add_argument("--forms", default=",".join(FORMS), help="rows, in order [%(default)s]")
    parser.add_argument("--size", type=int, default=512, help="width and height [512]")
    parser.add_argument("--steps", type=int, default=1, help="denoising steps [1]")
    parser.add_argument(
        "--weights-dir", type=Path, help="where integer forms go [<state_dir>/weights-compare]"
    )
    parser.add_argument("--keep", action="store_true", help="keep the integer forms' files")
    return parser


def generate_row(
    options: PipelineOptions, prompts: list[str], seeds: list[int], size: int, steps: int
) -> list[Image]:
    """Load the model with ``options`` and return one image per prompt and seed, in order."""
    from agent.model.pipeline import Text2Image  # noqa: PLC0415 - torch only when generating

    model = Text2Image(options)
    images = []
    for prompt in prompts:
        for seed in seeds:
            image, _timings = model.generate(
                prompt=prompt,
                negative_prompt=None,
                width=size,
                height=size,
                steps=steps,
                guidance_scale=0.0,
                seed=seed,
                on_step=lambda _step, _steps: None,
                cancelled=lambda: False,
            )
            images.append(image)
    del model
    gc.collect()  # one model at a time: the next form's load must find the memory free
    return images


def psnr(image: Image | ArrayLike, reference: Image | ArrayLike) -> float:
    """Return the peak signal-to-noise ratio of ``image`` against ``reference``, in dB.

    Both are 8-bit pictures, as PIL images or arrays of the same shape.
    """
    error = np.mean((np.asarray(image, "f4") - np.asarray(reference, "f4")) ** 2)
    return float("inf") if error == 0 else float(10 * np.log10(255**2 / error))


def draw_grid(rows: dict[str, list[Image]], size: int, captions: dict[str, str]) -> Image:
    """Return one picture: a row per form, its name and caption at the left."""
    from PIL import Image, ImageDraw  # noqa: PLC0415

    columns = max(len(images) for images in rows.values())
    grid = Image.new("RGB", (LABEL_WIDTH + columns * size, len(rows) * size), "white")
    draw = ImageDraw.Draw(grid)
    for index, (form, images) in enumerate(rows.items()):
        top = index * size
        draw.text((8, top + 8), form, fill="black")
        draw.text((8, top + 28), captions.get(form, ""), fill="dimgray")
        for column, image in enumerate(images):
            grid.paste(image.resize((size, size)), (LABEL_WIDTH + column * size, top))
    return grid


def main(argv: list[str] | None = None) -> int:
    """Generate each form's row, write the grid, print how far each row is from float16."""
    arguments = build_parser().parse_args(argv)
    try:
        settings = load_settings(arguments.config)
    except SettingsError as exc:
        print(f"compare_forms: {exc}", file=sys.stderr)  # noqa: T201 - the command's own error
        return 2
    configure_logging(settings.log_level)
    from agent.model.protocol import PipelineOptions  # noqa: PLC0415

    forms = arguments.forms.split(",")
    if unknown := [form for form in forms if form not in FORMS]:
        print(f"compare_forms: unknown form(s) {unknown}; {FORMS}", file=sys.stderr)  # noqa: T201
        return 2
    prompts = arguments.prompts or list(DEFAULT_PROMPTS)
    seeds = [int(seed) for seed in arguments.seeds.split(",")]
    weights = arguments.weights_dir or settings.state_dir / "weights-compare"
    base = dataclasses.replace(
        PipelineOptions.from_settings(settings), weights_dir=str(weights), warmup=False
    )
    rows: dict[str, list[Image]] = {}
    captions: dict[str, str] = {}
    try:
        for form in forms:
            begun = time.perf_counter()
            options = dataclasses.replace(base, weight_form=form)
            rows[form] = generate_row(options, prompts, seeds, arguments.size, arguments.steps)
            seconds = time.perf_counter() - begun
            reference = rows.get(forms[0])
            if reference is not None and form != forms[0]:
                values = [psnr(a, b) for a, b in zip(rows[form], reference, strict=True)]
                captions[form] = f"PSNR {min(values):.1f} dB"
            say(f"{form}: {len(rows[form])} images in {seconds:.0f} s {captions.get(form, '')}")
    finally:
        if not arguments.keep:
            shutil.rmtree(weights, ignore_errors=True)
    draw_grid(rows, arguments.size, captions).save(arguments.out)
    rows_named = ", ".join(forms)
    say(f"wrote {arguments.out}: rows {rows_named}; {len(prompts)} prompt(s) x seeds {seeds}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
