"""The pipeline's speed and memory levers on the tiny model, in this process (the real classes)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderTiny, AutoPipelineForText2Image
from diffusers.models.unets.unet_2d_blocks import AutoencoderTinyBlock
from safetensors.torch import load_file, save_file

from agent.images import encode_image
from agent.model.fused import ReluConv2d, ResidualReluTinyBlock, fuse_relu_convolutions
from agent.model.packed import PackedConv2d, PackedLinear, pack_weights
from agent.model.pages import file_mappings
from agent.model.pipeline import Text2Image
from agent.model.precision import (
    choose_variant,
    fuses_decoder,
    machine_architecture,
    packs_weights,
)
from agent.model.protocol import PipelineOptions
from agent.model.warmup import warmup_size
from agent.model.weights import HALF_STORED_LAYERS, settle_weights


@pytest.fixture(scope="module")
def options(tiny_model):
    return PipelineOptions(
        model=str(tiny_model), tiny_vae=str(tiny_model / "taesd"), threads=1, warmup=False
    )


@pytest.fixture(scope="module")
def fp16_model(tiny_model, tmp_path_factory):
    """The tiny model saved as the hub's fp16 files (``*.fp16.safetensors``), as SDXL-Turbo has."""
    folder = tmp_path_factory.mktemp("fp16") / "fp16-model"
    AutoPipelineForText2Image.from_pretrained(tiny_model, dtype=torch.float16).save_pretrained(
        folder, variant="fp16"
    )
    return folder


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
    full, _ = generate(Text2Image(PipelineOptions(**{**vars(options), "dtype": "float32"})))
    model = Text2Image(
        PipelineOptions(**{**vars(options), "dtype": "float32", "half_weights": "on"})
    )
    assert "half-weights" in model.loaded.levers
    pipeline = model._pipeline
    for component in (pipeline.unet, pipeline.text_encoder, pipeline.text_encoder_2):
        for layer in component.modules():
            kept = {weight.dtype for weight in layer.parameters(recurse=False)}
            stored = {tensor.dtype for tensor in layer.buffers(recurse=False)}
            if isinstance(layer, (*HALF_STORED_LAYERS, torch.nn.Embedding)):
                assert stored == {torch.float16}, layer  # held as storage, not parameters
                assert not kept, layer
            elif kept:  # norms compute in float32 without casting
                assert kept == {torch.float32}, layer
        # A model reports its first parameter's precision; the pipeline casts prompt
        # embeddings to the text encoder's and latents to theirs: all float32.
        assert component.dtype == torch.float32
    for layer in pipeline.vae.modules():  # the decoder computes in float32 throughout
        assert {weight.dtype for weight in layer.parameters(recurse=False)} <= {torch.float32}
    image, _ = generate(model)
    assert image.size == (512, 512)
    # Weights rounded to float16, maths in float32: nearly the float32 image.
    difference = np.abs(np.asarray(image, "f4") - np.asarray(full, "f4"))
    assert difference.mean() < 2.0
    # After a generation the float16 weights are back in place (no float32 copy kept).
    assert {
        layer.weight.dtype
        for layer in (*pipeline.unet.modules(), *pipeline.text_encoder_2.modules())
        if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Embedding))
    } == {torch.float16}


def test_the_fp16_files_are_chosen_and_loaded(options, tiny_model, fp16_model):
    folder = fp16_model
    assert list(folder.glob("unet/*.safetensors")) == [
        folder / "unet" / "diffusion_pytorch_model.fp16.safetensors"
    ]
    assert choose_variant("auto", str(folder)) == "fp16"
    assert choose_variant("auto", str(tiny_model)) is None  # a folder without fp16 files
    assert choose_variant("auto", "stabilityai/sdxl-turbo") == "fp16"  # a hub id
    assert choose_variant("", "stabilityai/sdxl-turbo") is None
    with pytest.raises((OSError, ValueError)):  # without the variant, there is nothing to load
        Text2Image(PipelineOptions(**{**vars(options), "model": str(folder), "variant": ""}))
    model = Text2Image(PipelineOptions(**{**vars(options), "model": str(folder)}))
    image, _ = generate(model)
    assert image.size == (512, 512)


def test_only_weights_that_change_precision_leave_the_mapped_checkpoint(options):
    """bfloat16 from float16 files: every weight is converted, so none stays in the mapping."""
    model = Text2Image(PipelineOptions(**{**vars(options), "dtype": "bfloat16"}))
    mappings = file_mappings()
    for component in model._pipeline.components.values():
        if isinstance(component, torch.nn.Module):
            for weight in component.parameters():
                start = weight.data_ptr()
                assert not any(low <= start < high for low, high in mappings)
    assert model.loaded.mapped_bytes == 0
    assert model.loaded.copied_bytes > 0


def test_half_weights_stay_in_the_mapped_files(options, fp16_model):
    """The Pi path from float16 files: float16 weights are never copied, the mapping backs them."""
    model = Text2Image(
        PipelineOptions(
            **{**vars(options), "model": str(fp16_model), "dtype": "float32", "half_weights": "on"}
        )
    )
    mappings = file_mappings()
    assert mappings, "the float16 files are mapped"
    half, full = 0, 0
    pipeline = model._pipeline
    for component in (pipeline.unet, pipeline.text_encoder, pipeline.text_encoder_2):
        for layer in component.modules():
            for weight in (*layer.parameters(recurse=False), *layer.buffers(recurse=False)):
                if not weight.is_floating_point():
                    continue  # position ids
                start = weight.data_ptr()
                mapped = any(low <= start < high for low, high in mappings)
                if isinstance(layer, (*HALF_STORED_LAYERS, torch.nn.Embedding)):
                    assert weight.dtype == torch.float16
                    assert mapped, layer  # a pointer into the file: no copy was made
                    half += weight.nbytes
                else:
                    assert weight.dtype == torch.float32
                    assert not mapped  # converted to float32: its own memory
                    full += weight.nbytes
    assert model.loaded.mapped_bytes >= half
    assert model.loaded.copied_bytes >= full
    image, _ = generate(model)
    assert image.size == (512, 512)


def mapped_kib(path) -> int:
    """Return the resident KiB of ``path``'s mappings in this process (from smaps)."""
    resident, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5:
            inside = fields[-1] == str(path)
        elif inside and fields[0] == "Rss:":
            resident += int(fields[1])
    return resident


def test_settling_copies_weights_out_and_hands_the_file_pages_back(tmp_path):
    torch.manual_seed(0)
    layers = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.LayerNorm(1024))
    path = tmp_path / "layers.safetensors"
    save_file({k: v.half() for k, v in layers.state_dict().items()}, path)
    # Mapped, as from_pretrained maps a checkpoint. Keeping the dict alive stands for the rest
    # of a big file still in use: the mapping outlives the tensors already converted.
    loaded = load_file(path)
    layers.load_state_dict(loaded, assign=True)
    expected = layers[0].weight.detach().float()
    assert float(expected.sum()) != 0  # read every page of the weight
    assert mapped_kib(path) >= 1024  # the 1 MiB float16 weight is resident, file-backed

    placement = settle_weights(layers, torch.float32)

    assert placement.released >= 1024 * 1024 - 2 * 4096
    assert placement.copied >= 1024 * 512 * 4
    assert mapped_kib(path) < 64  # what is left: the header and pages shared by neighbours
    assert layers[0].weight.dtype == torch.float32
    assert torch.equal(layers[0].weight, expected)  # the values survived the move
    assert len(loaded) == 4  # the mapping was still there all along


def test_warm_up_runs_once_at_load(options):
    model = Text2Image(PipelineOptions(**{**vars(options), "warmup": True}))
    assert model.loaded.warmup_seconds > 0
    assert model.prompt_cache.hits == 0
    generate(model, "warm-up")  # the warm-up's own prompt is cached: proof it ran, once
    assert model.prompt_cache.hits == 1


@pytest.mark.parametrize(
    ("setting", "default_size", "device", "dtype", "expected"),
    [
        ("auto", (512, 512), "cpu", torch.bfloat16, (512, 512)),
        ("auto", (768, 512), "cuda", torch.float16, (768, 512)),
        ("auto", (512, 512), "cpu", torch.float32, (256, 256)),  # a Pi: an image is slow
        ("auto", (512, 512), "cpu", torch.float16, (256, 256)),
        ("on", (512, 512), "cpu", torch.float32, (512, 512)),
        ("off", (512, 384), "cpu", torch.bfloat16, (256, 256)),
        ("off", (128, 384), "cpu", torch.bfloat16, (128, 256)),  # never above the default
    ],
)
def test_the_warm_up_is_at_the_default_size_where_images_are_fast(
    setting, default_size, device, dtype, expected
):
    assert warmup_size(setting, default_size, device, dtype) == expected


def onednn_primitives_built(model: Text2Image, capfd, size: int) -> int:
    """Return how many oneDNN primitives one image at ``size`` built (cache misses)."""
    capfd.readouterr()
    with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON_CREATION):
        generate(model, "a new prompt", width=size, height=size)
    return capfd.readouterr().out.count(",create:cache_miss,")


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN in this torch")
def test_after_a_warm_up_at_the_default_size_the_first_job_builds_no_kernels(options, capfd):
    # oneDNN's primitive cache is the process's: each model here gets a size no other test uses.
    loading = {**vars(options), "warmup": True}
    small = Text2Image(
        PipelineOptions(**{**loading, "warmup_at_default_size": "off", "default_size": (336, 336)})
    )
    assert small.loaded.warmup_size == (256, 256)
    assert onednn_primitives_built(small, capfd, 336) > 0  # what a warm-up at 336 would save
    assert onednn_primitives_built(small, capfd, 336) == 0  # and only once

    warmed = Text2Image(
        PipelineOptions(**{**loading, "warmup_at_default_size": "on", "default_size": (352, 352)})
    )
    assert warmed.loaded.warmup_size == (352, 352)
    assert onednn_primitives_built(warmed, capfd, 352) == 0


def test_float16_compute_runs_on_the_mapped_weights_themselves(options, fp16_model):
    """float16 arithmetic (a Pi 5 where the probe finds it faster): no copy, no upcast, and
    nearly the float32 image from the same files."""
    fields = {**vars(options), "model": str(fp16_model)}
    full, _ = generate(
        Text2Image(PipelineOptions(**{**fields, "dtype": "float32", "half_weights": "off"}))
    )
    model = Text2Image(PipelineOptions(**{**fields, "dtype": "float16"}))
    assert model.loaded.dtype == "float16"
    # Nothing to upcast, and no channels_last copy of the convolution weights.
    assert not {"half-weights", "channels-last"} & set(model.loaded.levers.split(","))
    assert model.loaded.mapped_bytes > 0
    mappings = file_mappings()
    pipeline = model._pipeline
    for component in (pipeline.unet, pipeline.text_encoder, pipeline.text_encoder_2):
        for weight in component.parameters():
            assert weight.dtype == torch.float16
            assert any(low <= weight.data_ptr() < high for low, high in mappings)
    image, timings = generate(model)
    assert image.size == (512, 512)
    assert timings.denoising > 0
    difference = np.abs(np.asarray(image, "f4") - np.asarray(full, "f4"))
    assert difference.mean() < 2.0


bfloat16_by_onednn = pytest.mark.skipif(
    not packs_weights(True, "cpu", torch.bfloat16, held_in_compute=True),
    reason="packing is for x86-64 CPUs where oneDNN computes bfloat16",
)


@bfloat16_by_onednn
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_packed_layers_compute_what_torch_computes(layout):
    torch.manual_seed(0)
    linear = torch.nn.Linear(320, 1280).to(torch.bfloat16)
    no_bias = torch.nn.Linear(320, 640, bias=False).to(torch.bfloat16)
    convolution = torch.nn.Conv2d(64, 128, 3, stride=2, padding=1).to(torch.bfloat16)
    tokens = torch.randn(2, 77, 320, dtype=torch.bfloat16)
    pixels = torch.randn(1, 64, 32, 48, dtype=torch.bfloat16).to(memory_format=layout)
    with torch.inference_mode():
        expected = [linear(tokens), linear(tokens[0]), no_bias(tokens), convolution(pixels)]
        model = torch.nn.ModuleList([linear, no_bias, convolution])
        assert settle_weights(model, torch.bfloat16).copied == 0
        assert pack_weights(model) == 3
        assert isinstance(linear, PackedLinear)
        assert isinstance(convolution, PackedConv2d)
        assert linear.weight.is_mkldnn
        assert convolution.weight.is_mkldnn
        assert not linear.bias.is_mkldnn  # biases stay dense parameters
        got = [linear(tokens), linear(tokens[0]), no_bias(tokens), convolution(pixels)]
    for want, have in zip(expected, got, strict=True):
        assert have.shape == want.shape
        assert have.dtype == torch.bfloat16
        # The same oneDNN kernels, summing in another order: bfloat16's last bit at most.
        scale = want.float().abs().max()
        assert (have.float() - want.float()).abs().max() <= scale / 64


def test_weights_are_packed_only_where_measured_faster():
    assert not packs_weights(False, "cpu", torch.bfloat16, held_in_compute=True)
    assert not packs_weights(True, "cuda", torch.bfloat16, held_in_compute=True)
    assert not packs_weights(True, "cpu", torch.float32, held_in_compute=True)
    assert not packs_weights(True, "cpu", torch.float16, held_in_compute=True)
    # float16- or int8-stored weights are upcast at each call: nothing lasting to pack.
    assert not packs_weights(True, "cpu", torch.bfloat16, held_in_compute=False)
    onednn_bfloat16 = (
        machine_architecture() == "x86_64"
        and torch.backends.mkldnn.is_available()
        and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )
    assert packs_weights(True, "cpu", torch.bfloat16, held_in_compute=True) == onednn_bfloat16


@bfloat16_by_onednn
def test_packed_weights_make_the_same_image_with_one_copy_of_the_weights(options):
    bfloat16 = {**vars(options), "dtype": "bfloat16"}
    plain = Text2Image(PipelineOptions(**{**bfloat16, "packed_weights": False}))
    assert "packed-weights" not in plain.loaded.levers
    model = Text2Image(PipelineOptions(**bfloat16))
    assert "packed-weights" in model.loaded.levers
    pipeline = model._pipeline
    for component in (pipeline.unet, pipeline.text_encoder, pipeline.text_encoder_2):
        layers = [
            layer
            for layer in component.modules()
            if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d))
        ]
        assert layers
        for layer in layers:
            assert isinstance(layer, (PackedLinear, PackedConv2d)), layer
            assert layer.weight.is_mkldnn
            assert "weight" not in layer._parameters  # the packed copy is the only one
        # A model reports its precision from its parameters: still bfloat16.
        assert component.dtype == torch.bfloat16
    # The decoder's convolutions run over the whole image: faster unpacked.
    assert not any(isinstance(layer, PackedConv2d) for layer in pipeline.vae.modules())
    first, _ = generate(plain)
    image, timings = generate(model)
    assert image.size == (512, 512)
    assert timings.denoising > 0
    difference = np.abs(np.asarray(image, "f4") - np.asarray(first, "f4"))
    assert difference.mean() < 2.0
    second, _ = generate(model, width=256, height=384)  # another size, the same packed weights
    assert second.size == (256, 384)


FUSING_DTYPES = [
    pytest.param(
        dtype,
        marks=pytest.mark.skipif(
            not fuses_decoder(True, "cpu", dtype, channels_last=True),
            reason="fused only on x86-64 CPUs where oneDNN computes this precision",
        ),
    )
    for dtype in (torch.float32, torch.bfloat16)
]


@pytest.mark.parametrize("dtype", FUSING_DTYPES)
@pytest.mark.parametrize("latents_layout", [torch.contiguous_format, torch.channels_last])
def test_the_fused_decoder_decodes_what_torch_decodes(dtype, latents_layout):
    torch.manual_seed(0)
    plain = AutoencoderTiny(
        decoder_block_out_channels=(16, 16, 16, 16), num_decoder_blocks=(1, 2, 1, 1)
    ).to(dtype, memory_format=torch.channels_last)
    fused = AutoencoderTiny(
        decoder_block_out_channels=(16, 16, 16, 16), num_decoder_blocks=(1, 2, 1, 1)
    ).to(dtype, memory_format=torch.channels_last)
    fused.load_state_dict(plain.state_dict())
    blocks = sum(isinstance(layer, AutoencoderTinyBlock) for layer in plain.modules())
    # Each block's two Conv+ReLU pairs and its last convolution (encoder and decoder alike),
    # and the decoder's first convolution, followed by a ReLU.
    assert fuse_relu_convolutions(fused) == 3 * blocks + 1
    layers = list(fused.decoder.layers)
    assert isinstance(layers[0], ReluConv2d)
    assert isinstance(layers[1], torch.nn.Identity)
    assert sum(isinstance(layer, ResidualReluTinyBlock) for layer in layers) == 5
    assert fused.state_dict().keys() == plain.state_dict().keys()  # same names, same weights
    # A block whose skip is a 1x1 convolution (channels change) fuses as well.
    block = AutoencoderTinyBlock(8, 16, "relu").to(dtype, memory_format=torch.channels_last)
    # The weights' layout decides the convolutions' layout, whatever the latents' is.
    pixels = torch.randn(1, 8, 24, 40, dtype=dtype).to(memory_format=latents_layout)
    latents = torch.randn(1, 4, 16, 24, dtype=dtype).to(memory_format=latents_layout)
    with torch.inference_mode():
        expected = [plain.decode(latents).sample, block(pixels)]
        assert fuse_relu_convolutions(block) == 3
        got = [fused.decode(latents).sample, block(pixels)]
    for want, have in zip(expected, got, strict=True):
        assert have.shape == want.shape
        assert have.dtype == dtype
        # The same oneDNN convolutions; bfloat16 rounds the sum once instead of twice.
        scale = want.float().abs().max()
        tolerance = scale / 64 if dtype == torch.bfloat16 else scale * 1e-5
        assert (have.float() - want.float()).abs().max() <= tolerance


def test_the_decoder_is_fused_only_where_measured_faster():
    assert not fuses_decoder(False, "cpu", torch.float32, channels_last=True)
    assert not fuses_decoder(True, "cuda", torch.float32, channels_last=True)
    assert not fuses_decoder(True, "cpu", torch.float16, channels_last=True)
    # oneDNN adds a residual only in channels_last; torch's fallback has no bfloat16.
    assert not fuses_decoder(True, "cpu", torch.float32, channels_last=False)
    assert not fuses_decoder(True, "cpu", torch.bfloat16, channels_last=False)
    onednn_here = machine_architecture() == "x86_64" and torch.backends.mkldnn.is_available()
    # Where oneDNN computes float32 on x86-64, the default settings fuse.
    assert fuses_decoder(True, "cpu", torch.float32, channels_last=True) == onednn_here


def test_the_pipeline_decodes_with_the_fused_decoder(options):
    plain = Text2Image(PipelineOptions(**{**vars(options), "fused_decoder": False}))
    model = Text2Image(options)
    assert "fused-decoder" not in plain.loaded.levers
    fused = fuses_decoder(True, "cpu", model.dtype, channels_last=True)
    assert ("fused-decoder" in model.loaded.levers) == fused
    decoder = model._pipeline.vae.decoder
    blocks = [layer for layer in decoder.modules() if isinstance(layer, AutoencoderTinyBlock)]
    assert blocks
    assert all(isinstance(block, ResidualReluTinyBlock) == fused for block in blocks)
    first, _ = generate(plain)
    image, _ = generate(model)
    difference = np.abs(np.asarray(image, "f4") - np.asarray(first, "f4"))
    assert difference.mean() < 1.0


def test_a_picture_restyled_again_is_encoded_once_with_the_same_result(options):
    from PIL import Image as PILImage  # noqa: PLC0415

    from tests.pictures import picture  # noqa: PLC0415

    model = Text2Image(options)
    start = PILImage.open(io.BytesIO(picture(320, 256))).convert("RGB")
    first, _ = generate(model, width=320, height=256, init_image=start, strength=0.5, seed=3)
    again, _ = generate(model, width=320, height=256, init_image=start, strength=0.5, seed=3)
    cache = model._pipeline.vae.encode
    assert cache.hits == 1
    other = Text2Image(options)  # no cache yet: encodes it
    fresh, _ = generate(other, width=320, height=256, init_image=start, strength=0.5, seed=3)
    assert png(first) == png(again) == png(fresh)


def test_image_to_image_encodes_with_the_models_own_vae_when_no_tiny_one_is_set(options):
    """EDGEAI_TINY_VAE empty: the full VAE's encoder (a distribution, sampled with the seed)."""
    from dataclasses import replace  # noqa: PLC0415

    from PIL import Image as PILImage  # noqa: PLC0415

    from tests.pictures import picture  # noqa: PLC0415

    model = Text2Image(replace(options, tiny_vae=""))
    assert type(model._pipeline.vae).__name__ == "AutoencoderKL"
    start = PILImage.open(io.BytesIO(picture(320, 256))).convert("RGB")
    image, _ = generate(model, width=320, height=256, init_image=start, strength=0.5)
    again, _ = generate(model, width=320, height=256, init_image=start, strength=0.5)
    assert image.size == (320, 256)
    assert png(image) == png(again)
