"""The tiny decoder's activations and residual sums computed inside its convolutions.

TAESDXL decodes with 3x3 convolutions over the whole image, most followed by a ReLU, and each of
its blocks ends with a residual sum and one more ReLU. Run as torch runs them, each ReLU and each
sum is a separate pass over a 64-channel image (at 512x512 in bfloat16: 32 MiB read and written
per pass): 16% and 5% of the decode on the machine docs/performance.md names. oneDNN
applies both inside the convolution before them, as it writes its output (post-operations: the
fusions torch's own compiler makes on a CPU, without the compile). Weights stay as they are
(TAESDXL's are tiny: packing them gains nothing, :mod:`agent.model.packed`).

Where to fuse is for :func:`agent.model.precision.fuses_decoder` to say. Only the worker process
imports this module (it imports torch).
"""

from __future__ import annotations

import torch
from diffusers.models.unets.unet_2d_blocks import AutoencoderTinyBlock

from agent.model.packed import convolve, plain_convolution


class ReluConv2d(torch.nn.Conv2d):  # type: ignore[misc] # torch is untyped here
    """A 2-d convolution with the ReLU after it applied as it writes its output."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - torch's own name
        """Convolve, add the bias and apply ReLU in one pass."""
        return convolve(self, input, "relu")


class ResidualReluTinyBlock(AutoencoderTinyBlock):  # type: ignore[misc] # diffusers is untyped
    """TAESD's residual block, its last convolution adding the skip and applying ReLU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``relu(conv(x) + skip(x))``, the sum and ReLU inside the last convolution."""
        *body, last = self.conv
        hidden = x
        for layer in body:
            hidden = layer(hidden)
        return convolve(last, hidden, "relu", residual=self.skip(x))


def _fuses_its_block(block: torch.nn.Module) -> bool:
    """Return whether ``block`` is diffusers' own TAESD block, ending as this module expects."""
    return (
        type(block) is AutoencoderTinyBlock
        and isinstance(block.conv, torch.nn.Sequential)
        and plain_convolution(block.conv[-1])
        and type(block.fuse) is torch.nn.ReLU
    )


def fuse_relu_convolutions(module: torch.nn.Module) -> int:
    """Fold each ReLU, and each TAESD block's residual sum, into the convolution before it.

    In place: a torch ``Conv2d`` followed by a ``ReLU`` in a ``Sequential`` becomes a
    :class:`ReluConv2d` and the ReLU's slot an ``Identity`` (so the state dict keeps its names);
    each diffusers ``AutoencoderTinyBlock`` becomes a :class:`ResidualReluTinyBlock`. Anything
    else (another activation, a subclass with its own forward) is left as it is.

    Returns:
        The number of convolutions that now apply a ReLU or a residual sum themselves.
    """
    fused = 0
    for sequential in [layer for layer in module.modules() if type(layer) is torch.nn.Sequential]:
        for index in range(len(sequential) - 1):
            if plain_convolution(sequential[index]) and type(sequential[index + 1]) is (
                torch.nn.ReLU
            ):
                sequential[index].__class__ = ReluConv2d
                sequential[index + 1] = torch.nn.Identity()
                fused += 1
    for block in [layer for layer in module.modules() if _fuses_its_block(layer)]:
        block.__class__ = ResidualReluTinyBlock
        fused += 1
    return fused
