"""Smaller integer forms of a layer's weights, and widening them back while the layer runs.

Two schemes, both symmetric round-to-nearest from the checkpoint's own weights:

- ``int8``: one float32 scale per output channel, 1 byte a weight.
- ``int4``: one float16 scale per group of :data:`GROUP` inputs, two weights a byte (0.53 bytes a
  weight with its scales). A layer whose inputs do not split into whole groups (SDXL's first
  convolution, 4 input channels) keeps ``int8``.

Nothing multiplies integers: torch's CPU kernels for integer weights (``_weight_int8pack_mm``,
``_weight_int4pack_mm_for_cpu``, ``_dyn_quant_matmul_4bit``) are made for one token at a time and
measured 35-45x slower than float32 at the 77-4096 tokens of the text encoders and the UNet.
Each layer's weight is widened into the compute precision in the reusable
:class:`agent.model.upcast.UpcastArena` buffer instead, with elementwise operations that run on
any CPU (measured on a [5120x1280] weight: float16 0.78 ms, int8 1.17 ms, int4 2.5 ms).

Only the worker process imports this module (it imports torch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Scheme = Literal["int8", "int4"]
GROUP = 64
"""Inputs sharing one int4 scale: divides every input width of SDXL's layers but one (320 is
not a multiple of 128)."""
INT4_SCALE_FLOOR = 2.0**-14
"""The smallest normal float16: int4 scales are stored in float16 and must not underflow."""
_SAFETENSORS_DTYPES = {
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.float16: "F16",
    torch.float32: "F32",
}


@dataclass(frozen=True)
class StoredTensor:
    """One tensor of a stored layer: its name, precision and shape."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        """Return its size in bytes."""
        count = 1
        for size in self.shape:
            count *= size
        return count * int(self.dtype.itemsize)

    @property
    def safetensors_dtype(self) -> str:
        """Return its precision as safetensors' header names it."""
        return _SAFETENSORS_DTYPES[self.dtype]


@dataclass(frozen=True)
class StoredLayer:
    """How one linear or convolution layer's weight is stored: its scheme and shapes."""

    name: str
    """The layer's path in its model (``down_blocks.0.resnets.0.conv1``)."""
    scheme: Scheme
    shape: tuple[int, ...]
    """The layer's weight shape: [out, in] or [out, in, height, width]."""

    @property
    def inputs(self) -> int:
        """Return the weights of one output channel."""
        count = 1
        for size in self.shape[1:]:
            count *= size
        return count

    @property
    def weight(self) -> StoredTensor:
        """Return the stored weight: int8 as the layer's shape, int4 packed two a byte."""
        if self.scheme == "int8":
            return StoredTensor(f"{self.name}.weight", torch.int8, self.shape)
        return StoredTensor(f"{self.name}.weight", torch.uint8, (self.shape[0], self.inputs // 2))

    @property
    def scale(self) -> StoredTensor:
        """Return the stored scales: per output channel (int8), per group of inputs (int4)."""
        if self.scheme == "int8":
            ones = (1,) * (len(self.shape) - 1)
            return StoredTensor(f"{self.name}.weight_scale", torch.float32, (self.shape[0], *ones))
        return StoredTensor(
            f"{self.name}.weight_scale", torch.float16, (self.shape[0], self.inputs // GROUP)
        )

    @property
    def nbytes(self) -> int:
        """Return the stored bytes, weight and scales."""
        return self.weight.nbytes + self.scale.nbytes


def scheme_of(shape: tuple[int, ...], form: Scheme) -> Scheme:
    """Return the scheme a weight of ``shape`` is stored in under ``form``.

    int4 groups run along the input channels (a convolution's are grouped within each kernel
    position), so they must split into whole groups; where they do not, int8.
    """
    if form == "int4" and len(shape) >= 2 and shape[1] % GROUP == 0:  # [out, in, ...]
        return "int4"
    return "int8"


def _input_order(weight: torch.Tensor) -> torch.Tensor:
    """Return ``weight`` as rows of inputs, a convolution's input channels innermost.

    That is a channels_last convolution weight's own memory order: widened into such a buffer,
    int4 rows need no reordering.
    """
    if weight.dim() == 4:  # [out, in, height, width]
        return weight.permute(0, 2, 3, 1)
    return weight


def quantize(weight: torch.Tensor, layer: StoredLayer) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``weight`` in ``layer``'s scheme: the integers and their scales.

    Args:
        weight: The layer's weight, in any floating precision.
        layer: How it is stored.

    Returns:
        Tensors of ``layer.weight``'s and ``layer.scale``'s precision and shape.
    """
    full = weight.detach().to(torch.float32)
    if layer.scheme == "int8":
        dims = tuple(range(1, full.dim()))
        scale = full.abs().amax(dim=dims, keepdim=True).clamp(min=1e-12) / 127
        return torch.round(full / scale).clamp(-127, 127).to(torch.int8), scale
    rows = _input_order(full).reshape(full.shape[0], -1, GROUP)
    scale = (rows.abs().amax(dim=-1, keepdim=True) / 7).clamp(min=INT4_SCALE_FLOOR).half()
    levels = torch.round(rows / scale.float()).clamp(-8, 7).to(torch.int8)
    pairs = levels.reshape(full.shape[0], -1, 2)
    # Two's-complement nibbles, the first of each pair low: widening shifts them back with sign.
    packed = (pairs[..., 0] & 0x0F) | (pairs[..., 1] << 4)
    return packed.view(torch.uint8), scale.squeeze(-1)


def widen(stored: torch.Tensor, scale: torch.Tensor, into: torch.Tensor) -> torch.Tensor:
    """Write the weight that ``stored`` and ``scale`` hold into ``into``, in its precision.

    Args:
        stored: An int8 weight (the layer's shape) or an int4 one (uint8, packed).
        scale: Its scales (:func:`quantize`).
        into: A tensor of the layer's weight shape in the compute precision, in any layout (the
            arena's channels_last view, say).

    Returns:
        ``into``, holding the weight.
    """
    # Scales are widened first: a float16 or float32 operand of another precision than ``into``
    # makes the multiply take the slow mixed-precision path (3x, measured).
    scale = scale.to(into.dtype)
    if stored.dtype == torch.int8:
        into.copy_(stored)
        return into.mul_(scale)
    signed = stored.view(torch.int8)
    # Arithmetic shifts of int8 restore each nibble's sign: low = (b << 4) >> 4, high = b >> 4.
    low, high = (signed << 4) >> 4, signed >> 4
    rows_view = _input_order(into)
    if rows_view.is_contiguous():
        rows = rows_view.reshape(into.shape[0], -1)
        pairs = rows.view(into.shape[0], -1, 2)
        pairs[..., 0].copy_(low)
        pairs[..., 1].copy_(high)
        rows.view(into.shape[0], -1, GROUP).mul_(scale.unsqueeze(-1))
        return into
    # A convolution held in the default layout (float16 arithmetic on a CPU): widen in input
    # order, then reorder.
    levels = torch.stack((low, high), dim=-1).to(into.dtype)
    rows = levels.view(into.shape[0], -1, GROUP).mul_(scale.unsqueeze(-1))
    rows_view.copy_(rows.view(rows_view.shape))
    return into
