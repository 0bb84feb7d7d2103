"""Build a tiny SDXL pipeline offline: diffusers' own classes, random weights, a small tokenizer.

The folder it writes has the Hugging Face hub layout (``model_index.json``, one sub-folder per
component, safetensors weights), so the agent loads it through the same ``from_pretrained`` path
as ``stabilityai/sdxl-turbo``. The VAE keeps SDXL's scale factor of 8, so a 512x512 request makes
64x64 latents exactly as the real model does, only with far fewer channels.

Run ``python -m tests.tiny_pipeline FOLDER`` to write one for a manual run of the agent.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

# A handful of merges is enough: the tokenizer falls back to single bytes for everything else.
_MERGES = ("a p", "ap p", "l e</w>", "app le</w>", "r e", "d o", "do g</w>", "c a", "ca t</w>")
_VOCAB_SIZE = 1000
TINY_UNET = {
    "layers_per_block": 1,
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "attention_head_dim": (2, 4),
    "use_linear_projection": True,  # as SDXL and SD 2.x have it
    "norm_num_groups": 4,
}
"""What both families' tiny UNets share: two small blocks, 64x64 latents (512 pixels)."""
TURBO_SCHEDULE = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "timestep_spacing": "trailing",
}
"""The Turbo models' schedule: their one step starts from pure noise (trailing timesteps)."""


def _bytes_to_unicode() -> list[str]:
    """Return CLIP's printable stand-in for each of the 256 byte values, in CLIP's order."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return [chr(code) for code in codes]


def write_bpe_files(folder: Path, merges: list[str] | tuple[str, ...]) -> None:
    """Write CLIP's vocab.json and merges.txt for a list of BPE merges, the way CLIP builds them.

    The vocabulary is every byte's stand-in, the same with ``</w>``, each merge joined, then the
    two special tokens.
    """
    folder.mkdir(parents=True, exist_ok=True)
    chars = _bytes_to_unicode()
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(dict.fromkeys(tokens))}
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8"
    )


def write_tokenizer(folder: Path, pad_token: str) -> None:
    """Write a CLIP BPE tokenizer (vocab.json, merges.txt, config) with a small vocabulary."""
    from transformers import CLIPTokenizer  # noqa: PLC0415 - heavy import kept local

    write_bpe_files(folder, _MERGES)
    tokenizer = CLIPTokenizer(
        vocab=str(folder / "vocab.json"),
        merges=str(folder / "merges.txt"),
        pad_token=pad_token,
        model_max_length=77,
    )
    tokenizer.save_pretrained(str(folder))


def build_tiny_pipeline(
    folder: Path, unet_channels: tuple[int, int] = (8, 16), *, text_width: int = 32
) -> Path:
    """Write a tiny random-weight SDXL pipeline to ``folder`` and return the folder.

    Args:
        folder: Where the pipeline goes; created if missing. A tiny TAESD goes to its
            ``taesd`` sub-folder.
        unet_channels: The UNet's two block widths; wider is slower (for a slow agent in tests).
        text_width: The text encoders' width (their feed-forward layers are twice as wide, 37
            at the default 32): 64 makes every text layer's inputs a whole number of int4 groups.

    Returns:
        The folder, ready for ``AutoPipelineForText2Image.from_pretrained``.
    """
    import torch  # noqa: PLC0415 - heavy import kept local
    from diffusers import (  # noqa: PLC0415
        EulerAncestralDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import (  # noqa: PLC0415
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
    )

    torch.manual_seed(0)
    text_config = {
        "bos_token_id": 0,
        "eos_token_id": 2,
        "hidden_size": text_width,
        "intermediate_size": 37 if text_width == 32 else 2 * text_width,
        "layer_norm_eps": 1e-05,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "pad_token_id": 1,
        "vocab_size": _VOCAB_SIZE,
        "hidden_act": "gelu",
        "projection_dim": 32,
    }
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text_config))
    unet = UNet2DConditionModel(
        **TINY_UNET,
        block_out_channels=unet_channels,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=6 * 8 + 32,
        cross_attention_dim=2 * text_width,  # the two encoders side by side
    )
    vae = _tiny_vae()
    scheduler = EulerAncestralDiscreteScheduler(**TURBO_SCHEDULE)
    folder.mkdir(parents=True, exist_ok=True)
    write_tokenizer(folder / "tokenizer", pad_token="<|endoftext|>")
    write_tokenizer(folder / "tokenizer_2", pad_token="!")
    pipeline = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=CLIPTokenizer.from_pretrained(str(folder / "tokenizer")),
        tokenizer_2=CLIPTokenizer.from_pretrained(str(folder / "tokenizer_2")),
        unet=unet,
        scheduler=scheduler,
    )
    pipeline.save_pretrained(str(folder), safe_serialization=True)
    # A tiny TAESD beside it: the agent decodes with TAESDXL by default.
    build_tiny_taesd(folder / "taesd")
    return folder


def build_tiny_sd_pipeline(
    folder: Path, *, tiny_decoder: bool = False, text_width: int = 32
) -> Path:
    """Write a tiny random-weight Stable Diffusion 2.x pipeline (SD-Turbo's family) to ``folder``.

    One text encoder whose hidden states the UNet attends to (no pooled embedding, no time ids),
    linear projections in the transformer blocks as SD 2.1 has them, Euler with trailing
    timesteps as SD-Turbo's scheduler.

    Args:
        folder: Where the pipeline goes; created if missing. A tiny TAESD goes to its ``taesd``
            sub-folder.
        tiny_decoder: Give the pipeline a tiny decoder (AutoencoderTiny) as its own VAE, as
            SDXS-512 ships.
        text_width: The text encoder's width, which is the UNet's cross-attention width.

    Returns:
        The folder, ready for ``AutoPipelineForText2Image.from_pretrained``.
    """
    import torch  # noqa: PLC0415 - heavy import kept local
    from diffusers import (  # noqa: PLC0415
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer  # noqa: PLC0415

    torch.manual_seed(2)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=0,
            eos_token_id=2,
            hidden_size=text_width,
            intermediate_size=2 * text_width,
            layer_norm_eps=1e-05,
            num_attention_heads=4,
            num_hidden_layers=2,
            pad_token_id=1,
            vocab_size=_VOCAB_SIZE,
            hidden_act="gelu",
        )
    )
    unet = UNet2DConditionModel(
        **TINY_UNET, block_out_channels=(8, 16), cross_attention_dim=text_width
    )
    vae = _tiny_decoder(seed=3) if tiny_decoder else _tiny_vae()
    scheduler = EulerDiscreteScheduler(**TURBO_SCHEDULE)
    folder.mkdir(parents=True, exist_ok=True)
    write_tokenizer(folder / "tokenizer", pad_token="!")
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=CLIPTokenizer.from_pretrained(str(folder / "tokenizer")),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(str(folder), safe_serialization=True)
    build_tiny_taesd(folder / "taesd")
    return folder


def write_tiny_lora(model: Path, path: Path, *, seed: int = 5) -> Path:
    """Write a LoRA for a tiny pipeline's UNet (made with peft, as training scripts make them).

    Its up matrices are random rather than zero (a freshly initialised LoRA changes nothing), so
    it visibly changes the picture.

    Args:
        model: A tiny pipeline's folder (its UNet gives the shapes).
        path: The ``.safetensors`` file to write.
        seed: Seed of the LoRA's weights.

    Returns:
        ``path``.
    """
    import shutil  # noqa: PLC0415
    import tempfile  # noqa: PLC0415

    import torch  # noqa: PLC0415 - heavy import kept local
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel  # noqa: PLC0415
    from peft import LoraConfig, get_peft_model_state_dict  # noqa: PLC0415

    unet = UNet2DConditionModel.from_pretrained(str(model), subfolder="unet")
    torch.manual_seed(seed)
    unet.add_adapter(
        LoraConfig(
            r=4,
            lora_alpha=4,
            init_lora_weights="gaussian",
            target_modules=["to_k", "to_q", "to_v", "to_out.0"],
        )
    )
    for name, parameter in unet.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.5)
    with tempfile.TemporaryDirectory() as folder:
        # The same key layout for both families: diffusers' unet.* keys.
        StableDiffusionPipeline.save_lora_weights(
            folder, unet_lora_layers=get_peft_model_state_dict(unet), safe_serialization=True
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(Path(folder) / "pytorch_lora_weights.safetensors", path)
    return path


def build_tiny_taesd(folder: Path) -> Path:
    """Write a tiny random-weight AutoencoderTiny (TAESDXL's class, scale 8) to ``folder``."""

    _tiny_decoder(seed=1).save_pretrained(str(folder), safe_serialization=True)
    return folder


def _tiny_vae() -> Any:
    """Return a tiny random VAE with SDXL's and SD's scale factor of 8."""
    from diffusers import AutoencoderKL  # noqa: PLC0415 - heavy import kept local

    return AutoencoderKL(
        block_out_channels=(4, 4, 4, 4),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=2,
        sample_size=512,
    )


def _tiny_decoder(seed: int) -> Any:
    """Return a tiny random AutoencoderTiny (TAESD's and TAESDXL's class, scale 8)."""
    import torch  # noqa: PLC0415 - heavy import kept local
    from diffusers import AutoencoderTiny  # noqa: PLC0415

    torch.manual_seed(seed)
    return AutoencoderTiny(
        encoder_block_out_channels=(4, 4, 4, 4),
        decoder_block_out_channels=(4, 4, 4, 4),
        num_encoder_blocks=(1, 1, 1, 1),
        num_decoder_blocks=(1, 1, 1, 1),
        latent_channels=4,
    )


if __name__ == "__main__":
    print(build_tiny_pipeline(Path(sys.argv[1])))
