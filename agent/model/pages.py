"""Mapped checkpoint pages: which ranges of this process are files, and advice to the kernel.

A file-backed page that is dropped is read again from its file when touched, so only inside
these ranges may pages be handed back (``MADV_DONTNEED``) or marked first to go (``MADV_COLD``).

Only the worker process imports this module (it imports torch).
"""

from __future__ import annotations

import ctypes
import itertools
import mmap
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterable

    import torch

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
        if tensor.device.type != "cpu" or tensor.is_mkldnn:
            return None  # a packed oneDNN tensor has no storage of torch's: never a file
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
