"""Which form the heavy weights take (float16, int8, int4), chosen from the memory that applies.

The UNet and the two text encoders are read at every new prompt and every step: where they fit
in memory as page cache beside the worker's own memory, nothing is read from storage again; where
they do not, the kernel drops and re-reads several gigabytes per image (6.6 GB in a 4 GiB cgroup
with float16 weights, measured). ``auto`` takes the largest form that fits.

Only the worker process imports this module (it imports torch).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch

from agent.machine.memory import GIB
from agent.model.quantized import Scheme, StoredLayer, scheme_of

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

Form = Literal["float16", "int8", "int4"]
FORMS: tuple[Form, ...] = ("float16", "int8", "int4")
"""Largest first: the order ``auto`` tries them in."""
QUANTIZED_LAYERS = (torch.nn.Linear, torch.nn.Conv2d)
"""The layers whose weights take an integer form: 99.9% of the UNet's and the text encoders'
weights are theirs (the rest are embeddings, norms and biases)."""
WORKER_ROOM_BYTES = int(0.9 * GIB)
"""Memory kept beside the heavy weights: the worker's own (0.55-0.60 GiB anonymous at 512x512
on the Pi path, measured), the daemon's, the tiny decoder, and some headroom. Small enough that
the service's ``MemoryMax=7500M`` on an 8 GB Pi keeps float16 (6.31 + 0.9 < 7.32 GiB), as it was
before the integer forms."""


def stored_layers(module: torch.nn.Module, form: Scheme) -> list[StoredLayer]:
    """Return how each linear and convolution layer of ``module`` is stored in ``form``."""
    return [
        StoredLayer(name, scheme_of(tuple(layer.weight.shape), form), tuple(layer.weight.shape))
        for name, layer in module.named_modules()
        if isinstance(layer, QUANTIZED_LAYERS) and isinstance(layer.weight, torch.Tensor)
    ]


def form_bytes(modules: Iterable[torch.nn.Module], form: Form) -> int:
    """Return the bytes ``modules`` hold in ``form``: its integer layers, the rest in float16."""
    total = 0
    for module in modules:
        everything = sum(tensor.numel() for tensor in module.parameters()) * 2
        if form == "float16":
            total += everything
            continue
        layers = stored_layers(module, form)
        widened = sum(2 * torch.Size(layer.shape).numel() for layer in layers)
        total += everything - widened + sum(layer.nbytes for layer in layers)
    return total


def choose_form(
    setting: str, device: str, needed: Mapping[Form, int], limit_bytes: int
) -> tuple[Form, str]:
    """Return the form of the heavy weights, and why, for the log.

    Args:
        setting: ``auto``, ``float16``, ``int8`` or ``int4``.
        device: ``cpu`` or ``cuda``.
        needed: Bytes of the UNet and text encoders in each form (:func:`form_bytes`).
        limit_bytes: The memory limit that applies (cgroup, else physical memory).
    """
    sizes = ", ".join(f"{form} {needed[form] / GIB:.2f} GiB" for form in FORMS)
    if device != "cpu":
        return "float16", f"{setting}: the integer forms are for CPUs; on {device}, float16"
    for form in FORMS:
        if setting == form:
            return form, f"set; {sizes}"
    room = f"with {WORKER_ROOM_BYTES / GIB:.2f} GiB for the worker, in {limit_bytes / GIB:.1f} GiB"
    for form in FORMS:
        if needed[form] + WORKER_ROOM_BYTES <= limit_bytes:
            return form, f"auto: the largest that fits {room}; {sizes}"
    return "int4", (
        f"auto: none fits {room}, so the smallest, read again from storage as needed; {sizes}"
    )
