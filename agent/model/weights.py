"""Where the model's weights live in memory, and in which precision.

Loading a safetensors checkpoint in its own precision maps the file and hands out tensors that
point into the mapping: no copy, nothing read until used. A weight kept in the precision it is
stored in stays there, as read-only file-backed pages: the kernel may drop them under memory
pressure and read them again when the layer next runs, which is how a 4 GiB budget holds a
6.9 GB model (float16 SDXL-Turbo) without a single out-of-memory kill. Only weights that change
precision are copied, one tensor at a time by :func:`settle_weights`, which hands the pages it has
just read back to the kernel: the peak is the converted model plus one tensor, never the converted
model plus the whole checkpoint (11-12 GB for a bfloat16 load before).

Only the worker process imports this module (it imports torch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from agent.model.packed import pack_weights
from agent.model.pages import MappedPages
from agent.model.upcast import WEIGHT_SCALE, UpcastArena, UpcastOnUse

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping

    from agent.model.quantized import StoredLayer

HALF_STORED_LAYERS = (
    torch.nn.Linear,
    torch.nn.Conv1d,
    torch.nn.Conv2d,
    torch.nn.Conv3d,
    torch.nn.ConvTranspose1d,
    torch.nn.ConvTranspose2d,
    torch.nn.ConvTranspose3d,
)
"""Layers whose weights may stay in float16: they hold nearly all of SDXL's 3.5 billion weights."""
HALF_LOOKUP_LAYERS = (torch.nn.Embedding,)
"""Layers that read a few rows of a float16 table and hand them on in the compute precision: the
two CLIP token embeddings, 0.4 GB as float32 copies."""
_HALF = "_edgeai_half"
_QUANTIZED = "_edgeai_quantized"


def channels_last_layout(requested: bool, device: str, compute: torch.dtype) -> bool:
    """Return whether convolution weights (and so the activations) take the channels_last layout.

    As requested, except for float16 arithmetic on a CPU (a Pi where the probe chose it): it
    computes straight from the files' own weights, and a channels_last copy of the UNet's
    convolution weights would take 0.62 GiB of anonymous memory there.

    Args:
        requested: The ``channels_last`` setting.
        device: ``cpu`` or ``cuda``.
        compute: The precision the model computes in.
    """
    return requested and not (device == "cpu" and compute == torch.float16)


def _upcast_output(compute: torch.dtype) -> Callable[[torch.nn.Module, object, Any], Any]:
    """Return a forward hook that hands a float16 lookup on in ``compute``."""

    def hook(_layer: torch.nn.Module, _inputs: object, output: Any) -> Any:  # noqa: ANN401 - a tensor
        return output.to(compute)

    return hook


def _hold_as_buffers(layer: torch.nn.Module) -> None:
    """Turn a layer's parameters into buffers of the same name, the same tensors.

    They are storage, not the model's parameters: transformers and diffusers report a model's
    precision as its first parameter's, and the pipeline casts prompt embeddings to it, so a
    float16 token embedding as a parameter would turn the whole generation to float16.
    """
    for name, parameter in list(layer._parameters.items()):  # noqa: SLF001
        del layer._parameters[name]  # noqa: SLF001
        layer.register_buffer(name, None if parameter is None else parameter.detach())


def store_in_half(module: torch.nn.Module, arena: UpcastArena) -> int:
    """Keep linear, convolution and embedding weights in float16; compute in the arena's dtype.

    Linear and convolution layers borrow upcast copies from ``arena`` while each runs; embedding
    layers look up float16 rows and hand them on upcast. Every other tensor (norms, biases of
    other layers) is small and stays in the compute precision: :func:`settle_weights` puts it
    there.

    Returns:
        The number of layers stored in float16.
    """
    count = 0
    for layer in module.modules():
        if hasattr(layer, _HALF) or hasattr(layer, _QUANTIZED):
            continue
        if isinstance(layer, HALF_STORED_LAYERS):
            hooks = UpcastOnUse(arena)
            layer.register_forward_pre_hook(hooks.before)
            layer.register_forward_hook(hooks.after, always_call=True)
            weight = getattr(layer, "weight", None)
            if isinstance(weight, torch.Tensor):
                arena.reserve(weight.numel())
        elif isinstance(layer, HALF_LOOKUP_LAYERS):
            layer.register_forward_hook(_upcast_output(arena.compute))
        else:
            continue
        _hold_as_buffers(layer)
        setattr(layer, _HALF, True)
        count += 1
    return count


def store_quantized(
    module: torch.nn.Module,
    arena: UpcastArena,
    layers: Iterable[StoredLayer],
    tensors: Mapping[str, torch.Tensor],
) -> tuple[int, int]:
    """Give each stored layer its integer weight and scales (mapped from their copy on disk).

    Each borrows its weight widened into ``arena`` while it runs, as float16 layers do. Its
    bias, small, is kept in the compute precision. The float16 weight it replaces is dropped,
    and its pages handed back.

    Returns:
        Bytes of integer weights and scales left in their mapped copy, and bytes of biases
        copied into the worker's own memory.
    """
    by_name = dict(module.named_modules())
    pages = MappedPages()
    mapped = copied = 0
    for stored in layers:
        layer = by_name[stored.name]
        weight = layer.weight
        bias = getattr(layer, "bias", None)
        for name in ("weight", "bias"):
            layer._parameters.pop(name, None)  # noqa: SLF001 - held as buffers, as float16 layers
        layer.register_buffer("weight", tensors[stored.weight.name])
        layer.register_buffer(WEIGHT_SCALE, tensors[stored.scale.name])
        mapped += sum(
            tensors[t.name].nbytes
            for t in (stored.weight, stored.scale)
            if pages.holds(tensors[t.name])
        )
        layer.register_buffer("bias", None if bias is None else bias.detach().to(arena.compute))
        if bias is not None:
            copied += layer.bias.nbytes
            pages.release(bias)
        shape = torch.Size(stored.shape)
        hooks = UpcastOnUse(arena, shape)
        layer.register_forward_pre_hook(hooks.before)
        layer.register_forward_hook(hooks.after, always_call=True)
        arena.reserve(shape.numel())
        pages.release(weight)
        setattr(layer, _QUANTIZED, stored.scheme)
    return mapped, copied


def layer_dtype(layer: torch.nn.Module, compute: torch.dtype) -> torch.dtype:
    """Return the precision a layer's weights are kept in."""
    return torch.float16 if hasattr(layer, _HALF) else compute


@dataclass
class Placement:
    """Where a model's floating-point weights ended up, in bytes."""

    mapped: int = 0
    """Left in the mapped checkpoint: file-backed, the kernel may drop and re-read them."""
    copied: int = 0
    """Converted to another precision: the process's own (anonymous) memory."""
    released: int = 0
    """Mapped checkpoint pages handed back to the kernel after their tensor was converted."""
    packed_layers: int = 0
    """Layers whose weight was reordered into oneDNN's layout (:func:`pack_weights`)."""

    def __add__(self, other: Placement) -> Placement:
        """Return the sum of two placements (the pipeline's components together)."""
        return Placement(
            self.mapped + other.mapped,
            self.copied + other.copied,
            self.released + other.released,
            self.packed_layers + other.packed_layers,
        )


def settle_weights(
    module: torch.nn.Module, compute: torch.dtype, *, channels_last: bool = False
) -> Placement:
    """Give each floating tensor its final precision and layout, copying only what changes.

    Layers stored in half precision keep float16; every other tensor takes ``compute``, and with
    ``channels_last`` every other 4-d tensor (convolution weights) that layout. A tensor already
    as it should be is left where it is: in the mapped checkpoint if it was loaded from one. A
    converted tensor gets its own memory, and the mapped pages it came from are released right
    after.

    Args:
        module: A model whose weights may point into mapped checkpoint files.
        compute: The precision the model computes in.
        channels_last: Give convolution weights the channels_last layout. Half-stored layers
            keep theirs: their upcast copies get it (:class:`UpcastArena`).

    Returns:
        How many bytes stayed mapped, were copied, and were handed back.
    """
    releaser = MappedPages()
    placement = Placement()
    for layer in module.modules():
        if hasattr(layer, _QUANTIZED):
            continue  # final already: mapped integers, biases in the compute precision
        target = layer_dtype(layer, compute)
        relayout = channels_last and not hasattr(layer, _HALF)
        for tensors in (layer._parameters, layer._buffers):  # noqa: SLF001 - swapped in place
            for name, tensor in list(tensors.items()):
                if tensor is None or not tensor.is_floating_point():
                    continue
                layout = (
                    torch.channels_last if relayout and tensor.dim() == 4 else torch.preserve_format
                )
                if tensor.dtype == target and (
                    layout is torch.preserve_format
                    or tensor.is_contiguous(memory_format=torch.channels_last)
                ):
                    if releaser.holds(tensor):
                        placement.mapped += tensor.nbytes
                    continue
                moved = tensor.detach().to(target, memory_format=layout, copy=True)
                if isinstance(tensor, torch.nn.Parameter):
                    tensors[name] = torch.nn.Parameter(moved, requires_grad=tensor.requires_grad)
                else:
                    tensors[name] = moved
                placement.copied += moved.nbytes
                releaser.release(tensor)
    placement.released = releaser.released_bytes
    return placement


def place_weights(  # noqa: PLR0913 - one argument per lever that places weights
    module: torch.nn.Module,
    compute: torch.dtype,
    *,
    arena: UpcastArena | None,
    channels_last: bool,
    quantized: tuple[Iterable[StoredLayer], Mapping[str, torch.Tensor]] | None = None,
    pack: bool = False,
) -> Placement:
    """Put a model's weights in their final precision and layout, copying only what changes.

    Args:
        module: A pipeline component, as loaded.
        compute: The precision it computes in.
        arena: Keep linear and convolution weights in float16 (or an integer form), upcast into
            this buffer while each layer runs (:func:`store_in_half`); None keeps every weight
            in ``compute``.
        channels_last: Lay convolution weights out as channels_last.
        quantized: With an arena, the layers stored in an integer form and their mapped tensors
            (:func:`store_quantized`).
        pack: Then reorder linear and convolution weights into oneDNN's layout
            (:func:`agent.model.packed.pack_weights`).

    Returns:
        Where the weights ended up.
    """
    integers = biases = 0
    if arena is not None:
        if quantized is not None:
            integers, biases = store_quantized(module, arena, *quantized)
        store_in_half(module, arena)
    placement = settle_weights(module, compute, channels_last=channels_last)
    placement.mapped += integers
    placement.copied += biases
    if pack:
        placement.packed_layers = pack_weights(module)
    return placement
