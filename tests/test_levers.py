"""The pipeline's speed and memory levers on the tiny model, in this process (the real classes)."""

from __future__ import annotations

import pytest
import torch

from agent.images import encode_image
from agent.pipeline import Text2Image, choose_dtype, cpu_has_bf16, use_half_weights
from agent.worker import PipelineOptions


@pytest.fixture(scope="module")
def options(tiny_model):
    return PipelineOptions(
        model=str(tiny_model), tiny_vae=str(tiny_model / "taesd"), threads=1, warmup=False
    )


def generate(model: Text2Image, prompt: str = "a red apple", **overrides):
    fields = {
        "prompt": prompt,
        "negative_prompt": None,
        "width": 512,
        "height": 512,
        "steps": 1,
        "guidance_scale": 0.0,
        "seed": 7,
        "on_step": lambda _step, _steps: None,
        "cancelled": lambda: False,
    } | overrides
    return model.generate(**fields)


def png(image) -> bytes:
    return encode_image(image, "png", 90)


def test_the_tiny_decoder_replaces_the_vae_and_keeps_the_size(options):
    model = Text2Image(options)
    assert type(model._pipeline.vae).__name__ == "AutoencoderTiny"
    assert "tiny-vae" in model.loaded.levers
    for width, height in ((512, 512), (320, 256)):
        image, _ = generate(model, width=width, height=height)
        assert image.size == (width, height)


def test_a_repeated_prompt_skips_the_text_encoders(options):
    model = Text2Image(options)
    calls = []
    original = model.prompt_cache._encode

    def counting(**kwargs):
        calls.append(kwargs["prompt"])
        return original(**kwargs)

    model.prompt_cache._encode = counting
    first, first_timings = generate(model, "a dog")
    second, second_timings = generate(model, "a dog")
    generate(model, "a cat")
    assert calls == ["a dog", "a cat"]  # the second "a dog" never reached the encoders
    assert model.prompt_cache.hits == 1
    assert (first_timings.prompt_cache_hit, second_timings.prompt_cache_hit) == (False, True)
    assert png(first) == png(second)  # cached embeddings give the very same image


def test_the_cache_is_bounded(options):
    model = Text2Image(PipelineOptions(**{**vars(options), "prompt_cache_size": 2}))
    for prompt in ("one", "two", "three", "one"):
        generate(model, prompt)
    assert model.prompt_cache.hits == 0  # "one" was evicted by "three"
    assert len(model.prompt_cache._entries) == 2


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_float32_and_bfloat16_both_run(options, dtype):
    model = Text2Image(PipelineOptions(**{**vars(options), "dtype": dtype}))
    assert model.loaded.dtype == dtype
    assert model._pipeline.unet.dtype == getattr(torch, dtype)
    image, timings = generate(model)
    assert image.size == (512, 512)
    assert timings.denoising > 0


def test_half_weights_store_in_float16_and_compute_in_float32(options):
    model = Text2Image(
        PipelineOptions(**{**vars(options), "dtype": "float32", "half_weights": "on"})
    )
    assert "half-weights" in model.loaded.levers
    sizes: dict[torch.dtype, int] = {}
    for parameter in model._pipeline.unet.parameters():
        sizes[parameter.dtype] = sizes.get(parameter.dtype, 0) + parameter.numel()
    # Convolutions and linear layers are stored in half; norms stay in float32, as diffusers does.
    assert sizes[torch.float16] > 0.9 * sum(sizes.values())
    image, _ = generate(model)
    assert image.size == (512, 512)


def test_warm_up_runs_once_at_load(options):
    model = Text2Image(PipelineOptions(**{**vars(options), "warmup": True}))
    assert model.loaded.warmup_seconds > 0
    assert model.prompt_cache.hits == 0
    generate(model, "warm-up")  # the warm-up's own prompt is cached: proof it ran, once
    assert model.prompt_cache.hits == 1


def test_precision_and_memory_choices(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("flags\t\t: fpu sse avx512f avx512_bf16 amx_tile\n")
    assert cpu_has_bf16(cpuinfo)
    cpuinfo.write_text("Features\t: fp asimd evtstrm crc32 cpuid\n")  # a Raspberry Pi 5
    assert not cpu_has_bf16(cpuinfo)
    assert choose_dtype("auto", "cuda") == torch.float16
    assert choose_dtype("auto", "cpu", bf16_cpu=True) == torch.bfloat16
    assert choose_dtype("auto", "cpu", bf16_cpu=False) == torch.float32
    assert choose_dtype("float32", "cpu", bf16_cpu=True) == torch.float32
    assert use_half_weights("on", "cpu", torch.bfloat16)
    assert not use_half_weights("auto", "cpu", torch.bfloat16)
    assert not use_half_weights("off", "cpu", torch.float32)
