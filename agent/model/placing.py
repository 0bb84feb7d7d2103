"""Where each of the pipeline's components keeps its weights: form, copies on disk, layout.

Only the worker process imports this module (it imports torch).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from agent.machine.memory import GIB
from agent.model.forms import FORMS, choose_form, form_bytes, stored_layers
from agent.model.precision import packs_weights
from agent.model.upcast import UpcastArena
from agent.model.weight_store import mapped_copy, plan_copy, sweep
from agent.model.weights import Placement, place_weights

if TYPE_CHECKING:
    from agent.machine.memory import MemoryLimit
    from agent.model.forms import Form
    from agent.model.quantized import StoredLayer

log = logging.getLogger(__name__)

WEIGHT_HEAVY_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
"""The parts that hold 97% of SDXL's weights: only theirs may stay in float16 or take an integer
form, and only theirs are packed for oneDNN. The decoder holds its weights in the compute
precision (TAESDXL is tiny, and diffusers upcasts a float16 full VAE to float32 anyway),
unpacked: TAESDXL's 64-channel convolutions over a whole image ran slower packed (decode 0.48
against 0.37 s, docs/performance.md); its ReLUs and residual sums run inside its convolutions
instead (:mod:`agent.model.fused`)."""


@dataclass(frozen=True)
class WeightPlan:
    """How the worker asked to keep its weights."""

    form_setting: str
    """``auto``, ``float16``, ``int8`` or ``int4``."""
    weights_dir: str
    """Where integer copies are written; empty: nowhere (an integer form is then an error)."""
    half_weights: bool
    """float16 storage, upcast per layer, as decided before loading."""
    packed_weights: bool
    channels_last: bool


def heavy_components(pipeline: Any) -> dict[str, torch.nn.Module]:  # noqa: ANN401 - diffusers' pipeline
    """Return the UNet and text encoders by name."""
    return {
        name: component
        for name, component in pipeline.components.items()
        if name in WEIGHT_HEAVY_COMPONENTS and isinstance(component, torch.nn.Module)
    }


def source_folder(component: torch.nn.Module) -> Path:
    """Return the folder a component was loaded from (the hub cache's snapshot, for a hub id)."""
    name = getattr(component, "name_or_path", None) or getattr(
        getattr(component, "config", None), "_name_or_path", ""
    )
    return Path(str(name))


def place_pipeline_weights(
    pipeline: Any,  # noqa: ANN401 - diffusers' pipeline
    plan: WeightPlan,
    *,
    device: str,
    compute: torch.dtype,
    limit: MemoryLimit,
) -> tuple[Placement, Form]:
    """Choose the heavy weights' form, map (or first write) their copies, place every weight.

    Returns:
        Where the weights ended up, and the form of the heavy ones.
    """
    heavy = heavy_components(pipeline)
    needed = {form: form_bytes(heavy.values(), form) for form in FORMS}
    form, why = choose_form(plan.form_setting, device, needed, limit.bytes)
    log.info("heavy weights in %s (%s)", form, why)
    quantized = _quantized_parts(heavy, form, plan.weights_dir)
    half = plan.half_weights or form != "float16"
    arena = UpcastArena(compute, plan.channels_last) if half else None
    pack = packs_weights(plan.packed_weights, device, compute, held_in_compute=not half)
    placement = sum(
        (
            place_weights(
                component,
                compute,
                arena=arena if name in heavy else None,
                quantized=quantized.get(name),
                channels_last=plan.channels_last,
                pack=pack and name in heavy,
            )
            for name, component in pipeline.components.items()
            if isinstance(component, torch.nn.Module)
        ),
        Placement(),
    )
    log.info(
        "weights placed: %.2f GiB left in the mapped files, %.2f GiB copied (%s), "
        "%.2f GiB of mapped pages handed back; upcast buffer %.2f GiB; %d layers packed "
        "for oneDNN; memory limit %s",
        placement.mapped / GIB,
        placement.copied / GIB,
        "converted precision or layout",
        placement.released / GIB,
        (arena.nbytes if arena is not None else 0) / GIB,
        placement.packed_layers,
        limit.describe(),
    )
    return placement, form


def _quantized_parts(
    heavy: dict[str, torch.nn.Module], form: Form, weights_dir: str
) -> dict[str, tuple[list[StoredLayer], dict[str, torch.Tensor]]]:
    """Return each heavy component's stored layers and their tensors mapped from disk.

    Copies of other forms, components or models, and half-written ones, are removed first:
    their room may be what the new copy needs.
    """
    if form == "float16":
        if weights_dir:
            sweep(Path(weights_dir), keep=())
        return {}
    if not weights_dir:
        msg = f"the {form} weights need a folder to be written to"
        raise ValueError(msg)
    folder = Path(weights_dir)
    copies = {
        name: plan_copy(folder, name, source_folder(module), form, stored_layers(module, form))
        for name, module in heavy.items()
    }
    sweep(folder, keep=[copy.path for copy in copies.values()])
    parts = {}
    for name, copy in copies.items():
        layers = dict(heavy[name].named_modules())

        def weight_of(stored: StoredLayer, layers: dict[str, Any] = layers) -> torch.Tensor:
            return layers[stored.name].weight

        parts[name] = (copy.layers, mapped_copy(copy, weight_of))
    return parts
