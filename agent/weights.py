"""Where the model's weights live in memory, and in which precision.

Loading a safetensors checkpoint in its own precision maps the file and hands out tensors that
point into the mapping: no copy, nothing read until used. Casting those tensors to another
precision the usual way (``module.to(dtype)``) reads every page of the mapping, and those pages
stay resident until the last tensor of the file is gone: SDXL's 5.1 GB UNet file then sits in
memory next to its 5.1 GB converted copy, which is what pushed the peak of a bfloat16 load to
11-12 GB. :func:`settle_weights` converts one tensor at a time and hands the pages it has just
read back to the kernel, so the peak is the converted model plus one tensor, and every weight ends
up in the process's own memory (a model file replaced on disk can no longer pull pages from under
a running worker).

Only the worker process imports this module (it imports torch).
"""

from __future__ import annotations

import ctypes
import mmap
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from collections.abc import Iterable

MADV_DONTNEED = 4
"""Linux: drop these pages from the process; a clean file page is read again if touched."""
_PAGE = mmap.PAGESIZE


def checkpoint_mappings(maps: Path = Path("/proc/self/maps")) -> list[tuple[int, int]]:
    """Return the address ranges where this process maps safetensors files."""
    ranges = []
    try:
        lines = maps.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].endswith(".safetensors"):
            start, _, end = fields[0].partition("-")
            ranges.append((int(start, 16), int(end, 16)))
    return ranges


class PageReleaser:
    """Hands mapped checkpoint pages back to the kernel once their tensor has been copied out."""

    def __init__(self, mappings: Iterable[tuple[int, int]]) -> None:
        """Release only inside ``mappings``: file pages, which the kernel can read again."""
        self._mappings = list(mappings)
        self._madvise = None
        if self._mappings:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            self._madvise = libc.madvise
        self.released_bytes = 0

    def holds(self, tensor: torch.Tensor) -> bool:
        """Return whether ``tensor``'s bytes lie in a mapped checkpoint file."""
        if tensor.device.type != "cpu":
            return False
        start = tensor.data_ptr()
        end = start + tensor.nbytes
        return any(low <= start and end <= high for low, high in self._mappings)

    def release(self, tensor: torch.Tensor) -> None:
        """Drop the pages wholly inside ``tensor``'s bytes (its neighbours keep theirs)."""
        if self._madvise is None or not self.holds(tensor):
            # Never on anonymous memory: there MADV_DONTNEED would zero live data.
            return
        start = -(-tensor.data_ptr() // _PAGE) * _PAGE
        end = (tensor.data_ptr() + tensor.nbytes) // _PAGE * _PAGE
        if end > start and self._madvise(start, end - start, MADV_DONTNEED) == 0:
            self.released_bytes += end - start


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
_UPCAST = "_edgeai_upcast"


class UpcastOnUse:
    """Forward hooks that lend a float16-stored layer weights in the compute precision.

    The float16 weights are never replaced: before the layer runs, upcast copies take their place;
    after it has run (even if it raised), the float16 originals are put back and the copies die.
    diffusers' layerwise casting instead casts the layer itself both ways on every call, which
    allocates a new float16 copy of every weight per step: measured on SDXL in float32, 16-19 s a
    generation with memory growing 0.3-0.6 GB a generation, against 15 s and flat here.
    """

    def __init__(self, compute: torch.dtype) -> None:
        """Lend weights in ``compute``."""
        self.compute = compute
        self._stored: dict[str, torch.nn.Parameter | None] = {}

    def before(self, layer: torch.nn.Module, _inputs: object) -> None:
        """Swap in upcast copies of the layer's weights."""
        self._stored = dict(layer._parameters)  # noqa: SLF001 - swapped for one call
        for name, weight in self._stored.items():
            if weight is not None:
                upcast = weight.to(self.compute)
                layer._parameters[name] = torch.nn.Parameter(upcast, requires_grad=False)  # noqa: SLF001

    def after(self, layer: torch.nn.Module, _inputs: object, _output: object) -> None:
        """Put the float16 weights back."""
        layer._parameters.update(self._stored)  # noqa: SLF001 - the originals, as they were
        self._stored = {}


def store_in_half(module: torch.nn.Module, compute: torch.dtype) -> int:
    """Keep linear and convolution weights in float16, upcast to ``compute`` while each runs.

    Every other tensor (norms, embeddings, biases of other layers) is small and stays in
    ``compute``: :func:`settle_weights` puts it there. The token embedding in particular must,
    since the pipeline casts prompt embeddings to a text encoder's reported precision, the
    precision of its first weight.

    Returns:
        The number of layers stored in float16.
    """
    count = 0
    for layer in module.modules():
        if isinstance(layer, HALF_STORED_LAYERS) and not hasattr(layer, _UPCAST):
            hooks = UpcastOnUse(compute)
            layer.register_forward_pre_hook(hooks.before)
            layer.register_forward_hook(hooks.after, always_call=True)
            setattr(layer, _UPCAST, hooks)
            count += 1
    return count


def layer_dtype(layer: torch.nn.Module, compute: torch.dtype) -> torch.dtype:
    """Return the precision a layer's weights are kept in."""
    return torch.float16 if hasattr(layer, _UPCAST) else compute


def settle_weights(module: torch.nn.Module, compute: torch.dtype) -> int:
    """Give each floating tensor its own memory in its final precision, one tensor at a time.

    Layers stored in half precision keep float16; every other tensor takes ``compute``. A tensor
    still pointing into a mapped checkpoint is copied out even when its precision is already
    right, and the pages it occupied are released right after.

    Args:
        module: A model whose weights may point into mapped checkpoint files.
        compute: The precision the model computes in.

    Returns:
        Bytes of mapped checkpoint pages handed back to the kernel.
    """
    releaser = PageReleaser(checkpoint_mappings())
    for layer in module.modules():
        target = layer_dtype(layer, compute)
        for tensors in (layer._parameters, layer._buffers):  # noqa: SLF001 - swapped in place
            for name, tensor in list(tensors.items()):
                if tensor is None or not tensor.is_floating_point():
                    continue
                mapped = releaser.holds(tensor)
                if tensor.dtype == target and not mapped:
                    continue
                moved = tensor.detach().to(target, copy=True)
                if isinstance(tensor, torch.nn.Parameter):
                    tensors[name] = torch.nn.Parameter(moved, requires_grad=tensor.requires_grad)
                else:
                    tensors[name] = moved
                releaser.release(tensor)
    return releaser.released_bytes


def place_weights(module: torch.nn.Module, compute: torch.dtype, *, half_storage: bool) -> int:
    """Put a model's weights in their final precision and in the process's own memory.

    Args:
        module: A pipeline component, as loaded.
        compute: The precision it computes in.
        half_storage: Keep linear and convolution weights in float16 (:func:`store_in_half`).

    Returns:
        Bytes of mapped checkpoint pages handed back to the kernel.
    """
    if half_storage:
        store_in_half(module, compute)
    return settle_weights(module, compute)
