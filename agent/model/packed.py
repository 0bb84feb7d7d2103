"""Weights laid out once in oneDNN's blocked format, for the layers that compute on a CPU.

torch's CPU linear and convolution take their weights in the plain layout, and oneDNN reorders
each weight into its own blocked layout at every call: for the UNet's deepest layers (256 tokens
against a 1280 x 10240 weight) that copy takes about a quarter of the call. Reordered once at
load, the weight replaces the plain one (no second copy in memory) and each call goes straight to
oneDNN with it: the path torch's own compiler takes when it freezes a model, without the compile.
Measured on SDXL-Turbo's architecture in bfloat16 (``scripts/bench --cases c,cu``, per layer
``tests/bench/machine.py --shapes``): see docs/performance.md.

Where to pack is for :func:`agent.model.precision.packs_weights` to say: in bfloat16, where the
weights are the process's own copies anyway (converted from the float16 files). float16- and
int8-stored layers are upcast at each call (nothing to pack), and float16 arithmetic computes
from the mapped checkpoint, whose file-backed pages a packed copy would turn into anonymous
memory.

Only the worker process imports this module (it imports torch).
"""

from __future__ import annotations

import torch

from agent.machine.memory import return_free_memory

_LINEAR = torch.ops.mkldnn._linear_pointwise  # noqa: SLF001 - see below
_CONVOLUTION = torch.ops.mkldnn._convolution_pointwise  # noqa: SLF001
_REORDER_LINEAR = torch.ops.mkldnn._reorder_linear_weight  # noqa: SLF001
_REORDER_CONVOLUTION = torch.ops.mkldnn._reorder_convolution_weight  # noqa: SLF001
# oneDNN's operators on packed weights have no public name: they are the ones torch's compiler
# calls for a frozen model on a CPU.


HAND_BACK_BYTES = 128 * 2**20
"""Plain weights freed between two hand-backs of the heap while packing."""


class PackedLinear(torch.nn.Linear):  # type: ignore[misc] # torch is untyped here
    """A linear layer whose weight is oneDNN's packed tensor (:func:`pack_weights`)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - torch's own name
        """Multiply by the packed weight, adding the bias in the same call."""
        return _LINEAR(input, self.weight, self.bias, "none", [], "")


class PackedConv2d(torch.nn.Conv2d):  # type: ignore[misc] # torch is untyped here
    """A 2-d convolution whose weight is oneDNN's packed tensor (:func:`pack_weights`)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - torch's own name
        """Convolve with the packed weight, adding the bias in the same call."""
        return convolve(self, input, "none")


def convolve(
    layer: torch.nn.Conv2d,
    pixels: torch.Tensor,
    activation: str,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run ``layer``'s convolution through oneDNN, finishing its output as it writes it.

    Args:
        layer: The convolution: its weight (plain or packed), bias and geometry.
        pixels: Its input.
        activation: oneDNN's name of an activation (``relu``), or ``none``.
        residual: A tensor of the output's shape to add before the activation, or None.
    """
    geometry = (list(layer.padding), list(layer.stride), list(layer.dilation), layer.groups)
    if residual is None:
        return _CONVOLUTION(pixels, layer.weight, layer.bias, *geometry, activation, [], "")
    return _CONVOLUTION.binary(
        pixels, residual, layer.weight, layer.bias, *geometry, "add", None, activation, [], ""
    )


def plain_convolution(layer: torch.nn.Module) -> bool:
    """Return whether ``layer`` is torch's own 2-d convolution, as oneDNN's operators take it.

    Exactly torch's class (a subclass may compute differently in its own forward), zero padding
    given in pixels (not ``"same"``).
    """
    return (
        type(layer) is torch.nn.Conv2d
        and layer.padding_mode == "zeros"
        and not isinstance(layer.padding, str)
    )


def _packed_weight(layer: torch.nn.Module) -> torch.Tensor | None:
    """Return ``layer``'s weight in oneDNN's layout, or None for a layer that is not packed.

    Only torch's own classes, exactly: a subclass may compute differently in its own forward.
    """
    if type(layer) is torch.nn.Linear:
        return _REORDER_LINEAR(layer.weight.detach())
    if plain_convolution(layer):
        return _REORDER_CONVOLUTION(
            layer.weight.detach(),
            list(layer.padding),
            list(layer.stride),
            list(layer.dilation),
            layer.groups,
        )
    return None


def pack_weights(module: torch.nn.Module) -> int:
    """Reorder linear and 2-d convolution weights once into oneDNN's blocked layout, in place.

    Each packed weight replaces the plain one as a buffer of the same name (an opaque oneDNN
    tensor: no parameter, so models still report their precision from their other parameters),
    and the layer becomes :class:`PackedLinear` or :class:`PackedConv2d`, which call oneDNN with
    it. One layer at a time, handing the freed plain weights back to the kernel as it goes:
    each leaves a hole in glibc's heap that the next packed copy, allocated before its own plain
    weight is freed, does not fill (0.5-0.8 GiB of SDXL's UNet held otherwise, and a load peak
    0.65 GiB above the unpacked one).

    Returns:
        The number of layers packed.
    """
    packed = 0
    freed = 0
    for layer in module.modules():
        weight = _packed_weight(layer)
        if weight is None:
            continue
        freed += layer.weight.nbytes
        del layer._parameters["weight"]  # noqa: SLF001 - replaced by its packed form
        layer.register_buffer("weight", weight)
        layer.__class__ = PackedLinear if isinstance(layer, torch.nn.Linear) else PackedConv2d
        packed += 1
        if freed >= HAND_BACK_BYTES:
            return_free_memory()
            freed = 0
    return_free_memory()
    return packed
