"""A small cache in front of the VAE's encoder: the same picture is encoded once.

An edit asked for ``n`` times, an AUTOMATIC1111 batch, the regenerate button: each is a job of
its own starting from the same picture, and the encoder costs about as much as the decoder
(0.4 s of TAESDXL at 512x512 on two x86 cores, more on a Pi). The key is the picture's tensor
itself (a digest of its bytes), so a cached answer is exactly what encoding would give.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from collections.abc import Callable


class EncodeCache:
    """A bounded LRU of encoder outputs, keyed by the encoded picture's bytes."""

    def __init__(self, encode: Callable[..., Any], size: int = 2) -> None:
        """Wrap ``encode`` (a VAE's ``encode``) with a cache of ``size`` pictures."""
        self._encode = encode
        self._size = size
        self._entries: OrderedDict[tuple[Any, ...], Any] = OrderedDict()
        self.hits = 0

    def __call__(self, sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:  # noqa: ANN401 - the VAE's own output
        """Return the cached encoding of a picture seen before, else encode and remember it."""
        if args or kwargs or self._size == 0:
            return self._encode(sample, *args, **kwargs)
        raw = sample.detach().contiguous().view(-1).view(torch.uint8)
        digest = hashlib.blake2b(raw.numpy().tobytes()).digest()
        key = (tuple(sample.shape), str(sample.dtype), digest)
        if key in self._entries:
            self._entries.move_to_end(key)
            self.hits += 1
            return self._entries[key]
        result = self._encode(sample)
        self._entries[key] = result
        if len(self._entries) > self._size:
            self._entries.popitem(last=False)
        return result
