"""Quantized copies of a model's weights: written once next to the agent's state, mapped after.

Each component (the UNet, each text encoder) gets one safetensors file,
``<state_dir>/weights/<component>.<form>.safetensors``, whose header carries a manifest: the
scheme (form, group size, format version) and the source it was made from (the component's
folder, and the name, size and modification time of every file in it). A start whose manifest
differs, or whose file cannot be read as safetensors, rebuilds the copy.

The file is written under a temporary name: its full size is reserved first (``fallocate``, so a
disk too small fails before minutes of quantizing, with the bytes needed and free), then each
layer is quantized and written at its place, the file is flushed to storage and only then renamed.
A kill -9 or a full disk at any point leaves at most the temporary file, never one a later start
would trust; the next start removes it.

Later starts map the file read-only: its pages are file-backed, as the float16 checkpoint's are,
never anonymous copies; the kernel may drop them under pressure and read them again.

Only the worker process imports this module (it imports torch).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import struct
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open

from agent.machine.disk import free_bytes, is_full, sync_folder
from agent.model.pages import MappedPages
from agent.model.quantized import GROUP, StoredLayer, StoredTensor, quantize

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable
    from pathlib import Path

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
"""Raised when the scheme or the file's layout changes: every older copy is then rebuilt."""
MANIFEST_KEY = "edgeai"
PARTIAL_SUFFIX = ".partial"
_HEADER_ALIGN = 8
_WRITE_CHUNK = 1 << 30
"""pwrite writes at most about 2 GiB at once on Linux; larger tensors go in chunks."""


class WeightsNotStoredError(Exception):
    """A quantized copy could not be written (no room, or the folder cannot be written)."""


@dataclass(frozen=True)
class Copy:
    """A component's quantized copy: where it lies and what it must say it was made from."""

    path: Path
    manifest: dict[str, Any]
    layers: list[StoredLayer]


def source_files(folder: Path) -> list[list[Any]]:
    """Return [name, size, mtime_ns] of every file in a component's folder, by name.

    Symbolic links (the hub cache's) are followed: a re-downloaded blob changes the entry.
    """
    files = []
    try:
        entries = sorted(folder.iterdir())
    except OSError:
        return []
    for entry in entries:
        try:
            stat = entry.stat()
        except OSError:
            continue
        if entry.is_file():
            files.append([entry.name, stat.st_size, stat.st_mtime_ns])
    return files


def plan_copy(
    folder: Path, component: str, source: Path, form: str, layers: list[StoredLayer]
) -> Copy:
    """Return the copy of ``component`` in ``form`` under ``folder``, bound to its source."""
    manifest = {
        "version": FORMAT_VERSION,
        "component": component,
        "form": form,
        "group": GROUP,
        "layers": len(layers),
        "source": {"folder": str(source), "files": source_files(source)},
    }
    return Copy(folder / f"{component}.{form}.safetensors", manifest, layers)


def open_copy(copy: Copy) -> tuple[dict[str, torch.Tensor] | None, str]:
    """Map a copy's tensors read-only if it is there, whole and made from the same source.

    Returns:
        The tensors by name (None when the copy must be built), and why not in words.
    """
    if not copy.path.exists():
        return None, "none written yet"
    try:
        with safe_open(str(copy.path), framework="pt") as stored:
            metadata = stored.metadata() or {}
            found = json.loads(metadata.get(MANIFEST_KEY, "null"))
            if found != copy.manifest:
                return None, _difference(found, copy.manifest)
            expected = {
                tensor.name for layer in copy.layers for tensor in (layer.weight, layer.scale)
            }
            if set(stored.keys()) != expected:
                return None, "its layers differ from the model's"
            return {name: stored.get_tensor(name) for name in expected}, "up to date"
    except (OSError, SafetensorError, ValueError) as error:
        return None, f"unreadable ({error})"


def _difference(found: object, expected: dict[str, Any]) -> str:
    """Return why a stored manifest is not the one expected, in words."""
    if not isinstance(found, dict):
        return "it has no manifest"
    for key in ("version", "form", "group", "component", "layers"):
        if found.get(key) != expected[key]:
            return f"made with {key} {found.get(key)!r}, not {expected[key]!r}"
    return "the model's files changed since it was made"


def _layout(layers: Iterable[StoredLayer]) -> list[tuple[StoredTensor, int]]:
    """Return each stored tensor with its offset in the data: wider precisions first.

    safetensors' data has no gaps between tensors, and a mapped tensor must start at a multiple
    of its element size: float32 scales, then float16 ones, then the bytes, keep every start
    aligned whatever the shapes.
    """
    tensors = [tensor for layer in layers for tensor in (layer.scale, layer.weight)]
    tensors.sort(key=lambda tensor: -tensor.dtype.itemsize)
    placed, offset = [], 0
    for tensor in tensors:
        placed.append((tensor, offset))
        offset += tensor.nbytes
    return placed


def _header(copy: Copy, layout: list[tuple[StoredTensor, int]]) -> bytes:
    """Return the safetensors header (its length first) for ``layout``, manifest included."""
    entries: dict[str, Any] = {
        tensor.name: {
            "dtype": tensor.safetensors_dtype,
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + tensor.nbytes],
        }
        for tensor, offset in layout
    }
    entries["__metadata__"] = {MANIFEST_KEY: json.dumps(copy.manifest, sort_keys=True)}
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-(len(text) + 8) % _HEADER_ALIGN)
    return struct.pack("<Q", len(text)) + text


def _write_at(descriptor: int, tensor: torch.Tensor, offset: int) -> None:
    """Write a tensor's bytes at ``offset``, in chunks pwrite can take."""
    data = memoryview(tensor.contiguous().view(-1).view(torch.uint8).numpy())
    written = 0
    while written < len(data):
        written += os.pwrite(descriptor, data[written : written + _WRITE_CHUNK], offset + written)


def write_copy(copy: Copy, weight_of: Callable[[StoredLayer], torch.Tensor]) -> int:
    """Quantize every layer of ``copy`` and write the file whole, or not at all.

    Args:
        copy: What to write, and where.
        weight_of: Returns a layer's weight in floating point; called once a layer, in order.
            Where it lies in a mapped checkpoint, its pages are handed back right after.

    Returns:
        The file's size in bytes.

    Raises:
        WeightsNotStoredError: No room for it, or the folder cannot be written; nothing is left.
    """
    layout = _layout(copy.layers)
    offsets = {tensor.name: offset for tensor, offset in layout}
    header = _header(copy, layout)
    size = len(header) + sum(tensor.nbytes for tensor, _ in layout)
    folder = copy.path.parent
    partial = copy.path.with_name(copy.path.name + PARTIAL_SUFFIX)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            _reserve(descriptor, size)
            os.pwrite(descriptor, header, 0)
            pages = MappedPages()
            for layer in copy.layers:
                weight = weight_of(layer)
                integers, scale = quantize(weight, layer)
                _write_at(descriptor, scale, len(header) + offsets[layer.scale.name])
                _write_at(descriptor, integers, len(header) + offsets[layer.weight.name])
                pages.release(weight)  # read once: the checkpoint's pages go back at once
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        partial.replace(copy.path)
        sync_folder(folder)
    except OSError as error:
        partial.unlink(missing_ok=True)
        free = free_bytes(folder) if folder.exists() else None
        room = f"{free / 1e9:.2f} GB free" if free is not None else "free space unknown"
        what = "no room" if is_full(error) else f"cannot write there ({error})"
        message = (
            f"the {copy.manifest['form']} weights of the {copy.manifest['component']} need "
            f"{size / 1e9:.2f} GB in {folder}: {what}, {room}"
        )
        raise WeightsNotStoredError(message) from error
    return size


def _reserve(descriptor: int, size: int) -> None:
    """Reserve the file's blocks now: no room fails here, before any quantizing."""
    try:
        os.posix_fallocate(descriptor, 0, size)
    except OSError as error:
        if error.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise  # a file system that cannot reserve fails at the write that finds no room


def mapped_copy(
    copy: Copy, weight_of: Callable[[StoredLayer], torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Return the copy's tensors mapped from disk, writing the copy first if it must be.

    Args:
        copy: The component's copy.
        weight_of: A layer's floating-point weight, for a copy that must be (re)built.

    Raises:
        WeightsNotStoredError: It had to be written and could not be.
    """
    tensors, why = open_copy(copy)
    if tensors is not None:
        log.debug("mapped %s: %s", copy.path, why)
        return tensors
    if copy.path.exists():
        copy.path.unlink()  # a stale copy's room is needed for the new one
    begun = time.perf_counter()
    size = write_copy(copy, weight_of)
    log.info(
        "%s weights of the %s written to %s (%s): %.2f GB in %.1f s",
        copy.manifest["form"],
        copy.manifest["component"],
        copy.path,
        why,
        size / 1e9,
        time.perf_counter() - begun,
    )
    tensors, why = open_copy(copy)
    if tensors is None:
        raise WeightsNotStoredError(f"{copy.path} was written but cannot be read: {why}")
    return tensors


def sweep(folder: Path, keep: Iterable[Path]) -> None:
    """Remove copies no start uses now (another form, another component, half-written ones)."""
    kept = {path.name for path in keep}
    try:
        entries = list(folder.iterdir())
    except OSError:
        return
    for entry in entries:
        ours = entry.name.endswith((".safetensors", ".safetensors" + PARTIAL_SUFFIX))
        if entry.name in kept or not ours or not entry.is_file():
            continue
        size = entry.stat().st_size
        entry.unlink(missing_ok=True)
        log.info("removed %s (%.2f GB): not the weights in use", entry, size / 1e9)
