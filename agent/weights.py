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

import ctypes
import itertools
import mmap
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

MADV_DONTNEED = 4
"""Linux: drop these pages from the process; a clean file page is read again if touched."""
MADV_COLD = 20
"""Linux 5.4+: these pages are the first to reclaim under memory pressure; kept otherwise."""
_PAGE = mmap.PAGESIZE


def file_mappings(maps: Path = Path("/proc/self/maps")) -> list[tuple[int, int]]:
    """Return the address ranges where this process maps regular files (checkpoints among them).

    A file-backed page that is dropped is read again from its file when touched, so these are
    the only ranges where pages may be handed back. Files are told by their inode, not their
    name: the hub's cache keeps a checkpoint as ``blobs/<hash>``, with no extension.
    """
    ranges = []
    try:
        lines = maps.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) < 6 or fields[4] == "0" or fields[5].startswith(("/dev/", "[")):
            continue
        start, _, end = fields[0].partition("-")
        ranges.append((int(start, 16), int(end, 16)))
    return ranges


class MappedPages:
    """The file-backed ranges of this process, and advice to the kernel about their pages."""

    def __init__(self, mappings: Iterable[tuple[int, int]] | None = None) -> None:
        """Work inside ``mappings`` (:func:`file_mappings` when None), never anonymous memory."""
        self._mappings = file_mappings() if mappings is None else list(mappings)
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        self._madvise = libc.madvise
        self.released_bytes = 0

    def mapping_of(self, tensor: torch.Tensor) -> tuple[int, int] | None:
        """Return the mapped file range that holds ``tensor``'s bytes, if one does."""
        if tensor.device.type != "cpu":
            return None
        start = tensor.data_ptr()
        end = start + tensor.nbytes
        return next(
            ((low, high) for low, high in self._mappings if low <= start < end <= high), None
        )

    def holds(self, tensor: torch.Tensor) -> bool:
        """Return whether ``tensor``'s bytes lie in a mapped file."""
        return self.mapping_of(tensor) is not None

    def release(self, tensor: torch.Tensor) -> None:
        """Drop the pages wholly inside ``tensor``'s bytes (its neighbours keep theirs)."""
        if not self.holds(tensor):
            # Never on anonymous memory: there MADV_DONTNEED would zero live data.
            return
        start = -(-tensor.data_ptr() // _PAGE) * _PAGE
        end = (tensor.data_ptr() + tensor.nbytes) // _PAGE * _PAGE
        if end > start and self._madvise(start, end - start, MADV_DONTNEED) == 0:
            self.released_bytes += end - start

    def ranges_of(self, module: torch.nn.Module) -> list[tuple[int, int]]:
        """Return the mapped files that hold any of ``module``'s weights."""
        tensors = itertools.chain(module.parameters(), module.buffers())
        found = {self.mapping_of(tensor) for tensor in tensors}
        return sorted(mapping for mapping in found if mapping is not None)

    def mark_cold(self, ranges: Iterable[tuple[int, int]]) -> None:
        """Tell the kernel to reclaim these pages first when memory is short (MADV_COLD).

        Nothing is dropped while memory is plentiful; under pressure these go before the
        pages of the model part that runs next. A kernel without MADV_COLD ignores it.
        """
        for low, high in ranges:
            self._madvise(low, high - low, MADV_COLD)


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
_INT8 = "_edgeai_int8"
INT8_SCALE = "weight_scale"
"""The buffer beside an int8 convolution weight: one scale per output channel."""


class UpcastArena:
    """One scratch buffer in the compute precision that float16-stored layers borrow in turn.

    Layers run one at a time, so a single buffer the size of the largest weight is enough. A
    fresh upcast copy per call costs a large allocation that glibc takes from the kernel and
    gives back each time (a page fault for every 4 KiB of it, zero-filled first).
    """

    def __init__(self, compute: torch.dtype, channels_last: bool) -> None:
        """Lend weights in ``compute``; convolution weights in channels_last when asked."""
        self.compute = compute
        self.channels_last = channels_last
        self._buffer = torch.empty(0, dtype=compute)
        self._lent = False

    @property
    def nbytes(self) -> int:
        """Return the buffer's size in bytes."""
        return int(self._buffer.nbytes)

    def reserve(self, numel: int) -> None:
        """Make room for a weight of ``numel`` elements (called at load, not per step)."""
        if numel > self._buffer.numel():
            self._buffer = torch.empty(numel, dtype=self.compute)

    def lend(
        self, weight: torch.Tensor, scale: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, bool]:
        """Return ``weight`` upcast, and whether it lies in the buffer (to be given back).

        A layer that runs while another holds the buffer (none does in diffusers' models) gets
        a fresh copy instead.

        Args:
            weight: A float16 weight, or an int8 one.
            scale: For an int8 weight, the scale of each output channel.
        """
        four_d = weight.dim() == 4 and self.channels_last
        if self._lent or weight.numel() > self._buffer.numel():
            memory_format = torch.channels_last if four_d else torch.contiguous_format
            upcast = weight.to(self.compute, memory_format=memory_format)
            return (upcast if scale is None else upcast.mul_(scale)), False
        self._lent = True
        flat = self._buffer[: weight.numel()]
        if four_d:
            out, channels, height, width = weight.shape
            view = flat.view(out, height, width, channels).permute(0, 3, 1, 2)
        else:
            view = flat.view(weight.shape)
        view.copy_(weight)
        return (view if scale is None else view.mul_(scale)), True

    def give_back(self) -> None:
        """The layer that borrowed the buffer has run."""
        self._lent = False


class UpcastOnUse:
    """Forward hooks that lend a float16-stored layer its weights in the compute precision.

    The float16 tensors are never replaced: before the layer runs, upcast copies take their place;
    after it has run (even if it raised), the float16 originals are put back. The weight's copy
    lives in the shared :class:`UpcastArena`. diffusers' layerwise casting instead casts the
    layer itself both ways on every call, which allocates a new float16 copy of every weight per
    step: measured on SDXL in float32, 16-19 s a generation with memory growing 0.3-0.6 GB a
    generation, against 15 s and flat here.
    """

    def __init__(self, arena: UpcastArena) -> None:
        """Lend weights from ``arena``."""
        self.arena = arena
        self._stored: dict[str, torch.Tensor | None] = {}
        self._borrowed = False

    def before(self, layer: torch.nn.Module, _inputs: object) -> None:
        """Swap in upcast copies of the layer's float16 tensors."""
        tensors = layer._buffers  # noqa: SLF001 - swapped for one call
        self._stored = dict(tensors)
        for name, stored in self._stored.items():
            if stored is None or name == INT8_SCALE:
                continue
            if name == "weight":
                scale = self._stored.get(INT8_SCALE)
                tensors[name], self._borrowed = self.arena.lend(stored, scale)
            else:
                tensors[name] = stored.to(self.arena.compute)

    def after(self, layer: torch.nn.Module, _inputs: object, _output: object) -> None:
        """Put the float16 tensors back."""
        layer._buffers.update(self._stored)  # noqa: SLF001 - the originals, as they were
        self._stored = {}
        if self._borrowed:
            self.arena.give_back()
            self._borrowed = False


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
        if hasattr(layer, _HALF) or hasattr(layer, _INT8):
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


def _frozen(tensor: torch.Tensor) -> torch.nn.Parameter:
    return torch.nn.Parameter(tensor.detach(), requires_grad=False)


def store_in_int8(module: torch.nn.Module, arena: UpcastArena, pages: MappedPages) -> int:
    """Quantize linear and convolution weights to int8 (weight-only, one scale per channel).

    Linear layers go through torchao's ``Int8WeightOnlyConfig``, whose matrix multiply reads the
    int8 weights directly (``_weight_int8pack_mm``). torchao has no int8 convolution, so each
    convolution keeps an int8 weight and its scales as buffers and borrows a dequantized copy
    from ``arena`` while it runs, as float16 layers do. One layer at a time, from the mapped
    float16 weights, whose pages are handed back at once: the peak is the int8 model plus one
    layer in the compute precision.

    Returns:
        Bytes of int8 weights and scales, in the worker's own memory.
    """
    from torchao.quantization import Int8WeightOnlyConfig, quantize_  # noqa: PLC0415 - optional

    config = Int8WeightOnlyConfig(set_inductor_config=False)
    stored = 0
    for layer in module.modules():
        if hasattr(layer, _INT8) or not isinstance(layer, HALF_STORED_LAYERS):
            continue
        weight = layer.weight
        bias = getattr(layer, "bias", None)
        if isinstance(layer, torch.nn.Linear):
            layer.weight = torch.nn.Parameter(
                weight.detach().to(arena.compute), requires_grad=False
            )
            quantize_(layer, config)
            stored += layer.weight.qdata.nbytes + layer.weight.scale.nbytes
        else:
            full = weight.detach().to(torch.float32)
            dims = tuple(range(1, full.dim()))
            scale = full.abs().amax(dim=dims, keepdim=True).clamp(min=1e-12) / 127
            quantized = torch.round(full / scale).clamp(-127, 127).to(torch.int8)
            del layer._parameters["weight"]  # noqa: SLF001 - held as buffers, as float16 layers
            layer.register_buffer("weight", quantized)
            layer.register_buffer(INT8_SCALE, scale.to(arena.compute))
            hooks = UpcastOnUse(arena)
            layer.register_forward_pre_hook(hooks.before)
            layer.register_forward_hook(hooks.after, always_call=True)
            arena.reserve(quantized.numel())
            stored += quantized.nbytes + scale.nbytes
        if bias is not None:
            if "bias" in layer._parameters:  # noqa: SLF001
                layer.bias = torch.nn.Parameter(
                    bias.detach().to(arena.compute), requires_grad=False
                )
            else:
                layer.register_buffer("bias", bias.detach().to(arena.compute))
            pages.release(bias)
        pages.release(weight)
        setattr(layer, _INT8, True)
    return stored


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

    def __add__(self, other: Placement) -> Placement:
        """Return the sum of two placements (the pipeline's components together)."""
        return Placement(
            self.mapped + other.mapped, self.copied + other.copied, self.released + other.released
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
        if hasattr(layer, _INT8):
            continue  # final already, in the worker's own memory
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


def place_weights(
    module: torch.nn.Module,
    compute: torch.dtype,
    *,
    arena: UpcastArena | None,
    channels_last: bool,
    int8: bool = False,
) -> Placement:
    """Put a model's weights in their final precision and layout, copying only what changes.

    Args:
        module: A pipeline component, as loaded.
        compute: The precision it computes in.
        arena: Keep linear and convolution weights in float16 (or int8), upcast into this buffer
            while each layer runs (:func:`store_in_half`); None keeps every weight in ``compute``.
        channels_last: Lay convolution weights out as channels_last.
        int8: With an arena, quantize linear and convolution weights to int8
            (:func:`store_in_int8`).

    Returns:
        Where the weights ended up.
    """
    quantized = 0
    if arena is not None:
        if int8:
            quantized = store_in_int8(module, arena, MappedPages())
        store_in_half(module, arena)
    placement = settle_weights(module, compute, channels_last=channels_last)
    placement.copied += quantized
    return placement
