"""Float16 or integer weights lent to a layer in the compute precision, only while it runs.

Only the worker process imports this module (it imports torch).
"""

from __future__ import annotations

import torch

from agent.model.quantized import widen

WEIGHT_SCALE = "weight_scale"
"""The buffer beside an integer weight: its scales (:mod:`agent.model.quantized`)."""


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
        self,
        weight: torch.Tensor,
        scale: torch.Tensor | None = None,
        shape: torch.Size | None = None,
    ) -> tuple[torch.Tensor, bool]:
        """Return ``weight`` upcast, and whether it lies in the buffer (to be given back).

        A layer that runs while another holds the buffer (none does in diffusers' models) gets
        a fresh copy instead.

        Args:
            weight: A float16 weight, or an integer one (:mod:`agent.model.quantized`).
            scale: For an integer weight, its scales.
            shape: The layer's weight shape, where the stored one differs (int4, packed).
        """
        shape = weight.shape if shape is None else shape
        four_d = len(shape) == 4 and self.channels_last  # a convolution's
        numel = shape.numel()
        if self._lent or numel > self._buffer.numel():
            memory_format = torch.channels_last if four_d else torch.contiguous_format
            upcast = torch.empty(shape, dtype=self.compute, memory_format=memory_format)
            return self._fill(upcast, weight, scale), False
        self._lent = True
        flat = self._buffer[:numel]
        if four_d:
            out, channels, height, width = shape
            view = flat.view(out, height, width, channels).permute(0, 3, 1, 2)
        else:
            view = flat.view(shape)
        return self._fill(view, weight, scale), True

    @staticmethod
    def _fill(into: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
        """Write ``weight`` into ``into``: upcast, or widened from integers with its scales."""
        if scale is None:
            return into.copy_(weight)
        return widen(weight, scale, into)

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

    def __init__(self, arena: UpcastArena, shape: torch.Size | None = None) -> None:
        """Lend weights from ``arena``; ``shape`` is the weight's where it is stored packed."""
        self.arena = arena
        self.shape = shape
        self._stored: dict[str, torch.Tensor | None] = {}
        self._borrowed = False

    def before(self, layer: torch.nn.Module, _inputs: object) -> None:
        """Swap in upcast copies of the layer's float16 tensors."""
        tensors = layer._buffers  # noqa: SLF001 - swapped for one call
        self._stored = dict(tensors)
        for name, stored in self._stored.items():
            if stored is None or name == WEIGHT_SCALE:
                continue
            if name == "weight":
                scale = self._stored.get(WEIGHT_SCALE)
                tensors[name], self._borrowed = self.arena.lend(stored, scale, self.shape)
            else:
                tensors[name] = stored.to(self.arena.compute)

    def after(self, layer: torch.nn.Module, _inputs: object, _output: object) -> None:
        """Put the float16 tensors back."""
        layer._buffers.update(self._stored)  # noqa: SLF001 - the originals, as they were
        self._stored = {}
        if self._borrowed:
            self.arena.give_back()
            self._borrowed = False
