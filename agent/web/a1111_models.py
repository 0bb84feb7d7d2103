"""AUTOMATIC1111's checkpoints and LoRAs: its names for the installed models and LoRA styles.

AUTOMATIC1111 names a checkpoint by its title, ``name [hash]``, and chooses one for every request
that follows with ``POST /sdapi/v1/options`` (``sd_model_checkpoint``) or for one request with
``override_settings``; a LoRA is asked for inside the prompt, ``<lora:name:weight>``. These are
turned into the request's own ``model`` and ``loras`` fields, so every bound and error is the
MQTT contract's.
"""

from __future__ import annotations

import hashlib
import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agent.jobs.model_choice import ModelChoice
    from agent.model.catalog import InstalledModel

LORA_TAG = re.compile(r"<lora:([^:>]{1,64})(?::([^:>]{1,16}))?(?::[^>]{0,16})?>")
"""``<lora:name>``, ``<lora:name:0.8>`` (AUTOMATIC1111 also allows a text-encoder weight after,
which the agent does not separate: the one weight applies to the whole LoRA)."""
TITLE_HASH = re.compile(r"\s*\[[0-9a-f]{8,64}\]$")
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")


def model_hash(model: InstalledModel) -> str:
    """Return the short hash AUTOMATIC1111 shows beside a checkpoint (of its source here)."""
    return hashlib.sha256(model.source.encode()).hexdigest()[:10]


def title(model: InstalledModel) -> str:
    """Return the checkpoint's title, as AUTOMATIC1111 names one: ``name [hash]``."""
    return f"{model.name} [{model_hash(model)}]"


def checkpoint_name(value: str) -> str:
    """Return the model a checkpoint title, file name or name means.

    ``sd-turbo [ab12cd34ef]``, ``sd-turbo.safetensors`` and ``sd-turbo`` all mean ``sd-turbo``.
    """
    name = TITLE_HASH.sub("", value.strip())
    for suffix in CHECKPOINT_SUFFIXES:
        name = name.removesuffix(suffix)
    return name


def prompt_loras(prompt: str) -> tuple[str, list[dict[str, Any]]]:
    """Take the ``<lora:name:weight>`` tags out of a prompt.

    Returns:
        The prompt without them, and the request's ``loras`` (a weight that is not a number is
        sent as it came, for the request's own check to refuse).
    """
    loras: list[dict[str, Any]] = []
    for match in LORA_TAG.finditer(prompt):
        weight: Any = 1.0
        if match.group(2) is not None:
            try:
                weight = float(match.group(2))
            except ValueError:
                weight = match.group(2)
        loras.append({"name": match.group(1).strip(), "weight": weight})
    return " ".join(LORA_TAG.sub(" ", prompt).split()), loras


def sd_models(choice: ModelChoice) -> list[dict[str, Any]]:
    """Return ``GET /sdapi/v1/sd-models``: every installed model."""
    return [
        {
            "title": title(model),
            "model_name": model.name,
            "hash": model_hash(model),
            "sha256": None,
            "filename": model.source,
            "config": None,
        }
        for model in choice.catalog
    ]


def sd_loras(choice: ModelChoice) -> list[dict[str, Any]]:
    """Return ``GET /sdapi/v1/loras``: every LoRA in the folder, as AUTOMATIC1111 lists them."""
    return [
        {"name": lora.name, "alias": lora.name, "path": str(lora.path), "metadata": {}}
        for lora in choice.loras.files()
    ]
