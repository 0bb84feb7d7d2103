"""Model families: which kind of pipeline a model is, read from the model's own config files.

SDXL (SDXL-Turbo, SDXL-Lightning, Hyper-SD) and Stable Diffusion 1.x/2.x (SD-Turbo, SDXS-512)
differ in what the agent must choose for them: the tiny decoder whose latent space matches theirs
(TAESDXL or TAESD: the other one decodes noise), the size they were trained to draw, and whether
the model's own decoder is tiny already (SDXS-512 ships one). All of it is in files of a few
kilobytes, read before the weights: ``model_index.json`` (the pipeline's class, the decoder's
class) and ``unet/config.json`` (the latent size it was trained at).

This module imports no torch: the daemon reads families to fill in a request's defaults.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PIPELINE_FAMILIES = {
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusionPipeline": "sd",
}
"""The text-to-image pipelines the agent runs, by the class their model_index.json names."""

TINY_DECODERS = {"sdxl": "madebyollin/taesdxl", "sd": "madebyollin/taesd"}
"""Each family's tiny decoder: TAESDXL decodes SDXL's latents, TAESD those of SD 1.x and 2.x."""

FAMILY_TITLES = {"sdxl": "SDXL", "sd": "Stable Diffusion 1.x/2.x"}

LATENT_SCALE = 8
"""Pixels per latent on a side: every VAE of both families downsamples by 8."""


class ModelConfigError(Exception):
    """A model's config files cannot be read, or name a pipeline the agent does not run."""


@dataclass(frozen=True)
class Family:
    """What a model's config files say about it."""

    name: str
    """``sdxl`` or ``sd``."""
    pipeline_class: str
    native_size: int
    """The side, in pixels, of the pictures it was trained on (its UNet's sample size x 8)."""
    own_tiny_decoder: bool
    """Its own VAE is a tiny decoder (AutoencoderTiny), as SDXS-512's is."""
    cross_attention_dim: int = 0
    """The width of the text features its UNet attends to (SDXL 2048, SD 2.x 1024, SD 1.x 768):
    a LoRA made for another width cannot be applied."""

    @property
    def title(self) -> str:
        """Return the family's name for people."""
        return FAMILY_TITLES[self.name]

    @property
    def tiny_decoder(self) -> str:
        """Return the hub id of the tiny decoder that matches this family's latents."""
        return TINY_DECODERS[self.name]

    @property
    def max_side(self) -> int:
        """Return the widest side it draws: beyond twice its native size it repeats itself."""
        return 2 * self.native_size


def read_family(source: str) -> Family:
    """Read a model's family from its config files (a folder, or the hub and its cache).

    Args:
        source: A Hugging Face hub id or a local folder, as ``from_pretrained`` takes.

    Raises:
        ModelConfigError: A file cannot be read, or the pipeline is not one the agent runs.
    """
    index = _read_json(source, "model_index.json")
    class_name = index.get("_class_name")
    family = PIPELINE_FAMILIES.get(str(class_name))
    if family is None:
        runs = ", ".join(PIPELINE_FAMILIES)
        raise ModelConfigError(f"{source} is a {class_name}: the agent runs {runs}")
    unet = _read_json(source, "unet/config.json")
    sample_size = unet.get("sample_size")
    if isinstance(sample_size, list):  # diffusers accepts (height, width)
        sample_size = sample_size[0]
    if not isinstance(sample_size, int) or sample_size <= 0:
        raise ModelConfigError(f"{source}: unet/config.json has no sample_size")
    vae = index.get("vae")
    own_tiny = isinstance(vae, list) and len(vae) == 2 and vae[1] == "AutoencoderTiny"
    cross = unet.get("cross_attention_dim")
    width = cross if isinstance(cross, int) else 0
    return Family(family, str(class_name), sample_size * LATENT_SCALE, own_tiny, width)


def _read_json(source: str, name: str) -> dict[str, Any]:
    """Return one JSON config file of a model, from its folder or through the hub's cache."""
    folder = Path(source)
    try:
        if folder.is_dir():
            text = (folder / name).read_text(encoding="utf-8")
        else:
            # The hub's own client: its cache, HF_HUB_OFFLINE and tokens, as diffusers uses them.
            from huggingface_hub import hf_hub_download  # noqa: PLC0415 - only for hub ids

            text = Path(hf_hub_download(source, name)).read_text(encoding="utf-8")
        data = json.loads(text)
    except Exception as exc:
        raise ModelConfigError(f"cannot read {name} of {source}: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelConfigError(f"{name} of {source} is not a JSON object")
    return data


def choose_tiny_decoder(setting: str, family: Family) -> tuple[str, str | None]:
    """Return the tiny decoder to load for a model of ``family``.

    Args:
        setting: The ``tiny_vae`` setting: ``auto``, empty (the model's own VAE), or a hub id or
            folder.
        family: The model's family.

    Returns:
        (hub id or folder to load, or empty for the model's own decoder; a sentence for the log
        where the setting was not followed as written, else None).
    """
    if setting == "":
        return "", None
    if setting == "auto":
        if family.own_tiny_decoder:
            return "", "tiny decoder: the model's own decoder is tiny already"
        return family.tiny_decoder, None
    other = next((name for name, hub in TINY_DECODERS.items() if hub == setting), family.name)
    if other != family.name:
        # TAESDXL on SD's latents (or TAESD on SDXL's) decodes a picture of noise, silently.
        return family.tiny_decoder, (
            f"tiny decoder {setting} decodes {FAMILY_TITLES[other]} latents, not "
            f"{family.title}: using {family.tiny_decoder}"
        )
    return setting, None
