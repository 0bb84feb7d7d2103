"""The LoRA folder, as the daemon sees it: which styles there are, and whether one fits a model.

A drop-in folder: a ``name.safetensors`` file added or removed is in the next listing, without a
restart. A file is checked before a job is admitted by reading its safetensors header (JSON at
the file's start, no weights read, no torch): a header that cannot be read is ``bad_lora``, and
so is a LoRA whose cross-attention layers take text features of another width than the model's
(an SD 1.5 LoRA on SDXL, say), since it can only fail in the worker.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from agent.settings.model import MODEL_NAME_PATTERN

if TYPE_CHECKING:
    from pathlib import Path

SUFFIX = ".safetensors"
MAX_LISTED = 500
"""Files listed at most: the lists go into one MQTT message and one HTTP answer."""
MAX_HEADER_BYTES = 4 * 2**20
"""A LoRA's header is kilobytes; a larger one is a broken file, not read into memory."""
CROSS_ATTENTION_KEY = re.compile(r"attn2[._]to_k(?:\.lora_A|\.lora_down|_lora\.down|\.lora\.down)")
"""The keys of a cross-attention key projection's down matrix, in the diffusers/peft and kohya
layouts: its input width is the text features' width."""


class LoraFileError(Exception):
    """A LoRA file cannot be used; the message says why."""


@dataclass(frozen=True)
class LoraFile:
    """One LoRA in the folder."""

    name: str
    path: Path
    size: int


class LoraShelf:
    """The LoRA files in one folder."""

    def __init__(self, folder: Path) -> None:
        """Serve the LoRA files in ``folder`` (which may not exist yet)."""
        self.folder = folder
        # The daemon's loop lists the folder at each state change and checks a header at each
        # request: both are kept while the folder (or the file) is unchanged, so the loop
        # makes one stat of it rather than reading it again.
        self._listed: tuple[int, list[LoraFile]] | None = None
        self._widths: dict[tuple[Path, int, int], int | None] = {}

    def files(self) -> list[LoraFile]:
        """Return the LoRA files there now, by name (at most :data:`MAX_LISTED`)."""
        try:
            changed = self.folder.stat().st_mtime_ns
        except OSError:
            return []
        if self._listed is not None and self._listed[0] == changed:
            return self._listed[1]
        found = self._read_folder()
        self._listed = (changed, found)
        return found

    def text_width(self, lora: LoraFile) -> int | None:
        """Return :func:`text_width` of a LoRA file, read once while the file is unchanged.

        Raises:
            LoraFileError: The file is not a readable safetensors file.
        """
        try:
            status = lora.path.stat()
        except OSError as exc:
            raise LoraFileError(f"cannot read {lora.path.name}: {exc.strerror}") from exc
        key = (lora.path, status.st_mtime_ns, status.st_size)
        if key not in self._widths:
            if len(self._widths) >= MAX_LISTED:
                self._widths.clear()
            self._widths[key] = text_width(lora.path)
        return self._widths[key]

    def _read_folder(self) -> list[LoraFile]:
        try:
            entries = sorted(self.folder.iterdir())
        except OSError:
            return []
        found = []
        for entry in entries:
            name = entry.name.removesuffix(SUFFIX)
            if entry.name == name or not re.match(MODEL_NAME_PATTERN, name):
                continue
            try:
                if not entry.is_file():
                    continue
                found.append(LoraFile(name, entry, entry.stat().st_size))
            except OSError:
                continue
            if len(found) == MAX_LISTED:
                break
        return found

    def find(self, name: str) -> LoraFile | None:
        """Return the LoRA of that name, or None."""
        if not re.match(MODEL_NAME_PATTERN, name):
            return None
        path = self.folder / f"{name}{SUFFIX}"
        try:
            return LoraFile(name, path, path.stat().st_size) if path.is_file() else None
        except OSError:
            return None

    def listing(self) -> list[dict[str, object]]:
        """Return the LoRAs as the lists on every interface show them."""
        return [{"name": lora.name, "bytes": lora.size} for lora in self.files()]


def text_width(path: Path) -> int | None:
    """Return the width of text features a LoRA's cross-attention takes, if its header says.

    Raises:
        LoraFileError: The file is not a readable safetensors file.
    """
    header = read_header(path)
    for key, entry in header.items():
        if CROSS_ATTENTION_KEY.search(key) and isinstance(entry, dict):
            shape = entry.get("shape")
            if isinstance(shape, list) and len(shape) >= 2 and isinstance(shape[1], int):
                return shape[1]
    return None


def read_header(path: Path) -> dict[str, Any]:
    """Return a safetensors file's header (tensor names to dtype, shape and offsets).

    Raises:
        LoraFileError: It cannot be read, or is not safetensors.
    """
    try:
        with path.open("rb") as file:
            prefix = file.read(8)
            if len(prefix) < 8:
                raise LoraFileError(f"{path.name} is not a safetensors file (too short)")
            (length,) = struct.unpack("<Q", prefix)
            if not 2 <= length <= MAX_HEADER_BYTES:
                raise LoraFileError(f"{path.name} is not a safetensors file (bad header length)")
            header = json.loads(file.read(length))
    except OSError as exc:
        raise LoraFileError(f"cannot read {path.name}: {exc.strerror}") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise LoraFileError(f"{path.name} is not a safetensors file (bad header)") from exc
    if not isinstance(header, dict):
        raise LoraFileError(f"{path.name} is not a safetensors file (bad header)")
    return header
