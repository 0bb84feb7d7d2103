"""The warm-up at load: at which size, so the first job finds its kernels built.

Only the worker process imports this module (it imports torch).
"""

from __future__ import annotations

import torch

WARMUP_SIZE = 256
"""The side of the warm-up image where it is not at the default size (or the default is smaller):
it builds what does not depend on the size (the text encoders' kernels, the weights in memory)
for a quarter of an image's cost."""


def warmup_size(
    setting: str, default_size: tuple[int, int], device: str, dtype: torch.dtype
) -> tuple[int, int]:
    """Return the width and height to warm up at.

    oneDNN builds a kernel (a primitive, JIT-compiled) for each layer shape it has not seen, and
    the UNet's and decoder's shapes follow the image size. Measured with ``ONEDNN_VERBOSE``: after
    a 256x256 warm-up, the first 512x512 image built 47 new primitives in bfloat16 (0.21 s, a
    tenth of an image here) and 29 in float32 (14 ms: float32 linear layers run in MKL, which
    builds nothing per shape). So auto warms up at the default size where images are fast
    (cuda, bfloat16 on a CPU), and at 256x256 where an image at the default size would add many
    seconds to every start for little (float32 or float16 on a CPU: a Raspberry Pi).

    Args:
        setting: ``auto``, ``on`` or ``off`` (the ``warmup_at_default_size`` setting).
        default_size: The width and height of a request that names none.
        device: ``cpu`` or ``cuda``.
        dtype: The compute precision.
    """
    at_default = setting == "on" or (
        setting == "auto" and (device != "cpu" or dtype == torch.bfloat16)
    )
    if at_default:
        return default_size
    width, height = default_size
    return min(width, WARMUP_SIZE), min(height, WARMUP_SIZE)
