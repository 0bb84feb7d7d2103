"""LoRA styles on every form of the weights: a separate low-rank branch, removed without a trace.

The pipeline in this process (as the worker runs it), the tiny SDXL model, a LoRA made with peft:
on packed bfloat16 weights, on int8 and on int4 forms the style changes the picture, the same
style again gives the same bytes, and with it off the picture is the one from before, byte for
byte. A LoRA for another family is refused and leaves the model as it was.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from agent.model.lora import LoraError
from agent.model.pipeline import Text2Image
from agent.model.protocol import PipelineOptions
from tests.test_weight_forms import generate_image
from tests.tiny_pipeline import build_tiny_sd_pipeline, write_tiny_lora


@pytest.fixture(scope="module")
def loras(tiny_model: Path, tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("loras")
    sd = build_tiny_sd_pipeline(folder / "sd")
    return {
        "xl": str(write_tiny_lora(tiny_model, folder / "xl.safetensors")),
        "sd": str(write_tiny_lora(sd, folder / "sd.safetensors")),
    }


FORMS = {
    "float16": "packed-weights",  # packed for oneDNN where bfloat16 computes
    "int8": "int8-weights",
    "int4": "int4-weights",
}


@pytest.mark.parametrize("form", list(FORMS))
def test_a_lora_on_each_weight_form_changes_the_picture_and_leaves_no_trace(
    tiny_model, loras, tmp_path, form
):
    model = Text2Image(
        PipelineOptions(
            model=str(tiny_model),
            tiny_vae=str(tiny_model / "taesd"),
            variant="",
            weight_form=form,
            weights_dir=str(tmp_path),
            packed_weights=form == "float16",
            warmup=False,
            threads=1,
        )
    )
    assert FORMS[form] in model.loaded.levers or model.loaded.dtype != "bfloat16"

    def draw() -> str:
        return hashlib.sha256(generate_image(model).tobytes()).hexdigest()

    style = (("style", loras["xl"], 1.0),)
    plain = draw()
    model.loras.apply(style)
    styled = draw()
    assert styled != plain
    model.loras.apply(())
    assert draw() == plain
    model.loras.apply(style)
    assert draw() == styled
    with pytest.raises(LoraError, match="cannot be applied to this model"):
        model.loras.apply((("other-family", loras["sd"], 1.0),))
    model.loras.apply(style)  # as it was before the refusal
    assert draw() == styled
    model.loras.apply(())
    assert draw() == plain
