"""LoRA styles in the worker: loaded through diffusers' own LoRA loading (peft), kept unfused.

Each adapter stays a separate low-rank branch beside the layer it adapts, never merged into the
weights: switched off, the layer computes exactly what it did before (the same picture, byte for
byte), and the weights may stay packed, in float16 or in an integer form, since the branch only
adds to the layer's output. Adapters stay loaded for the next request that asks for them (up to
:data:`MAX_LOADED`, the least recently used dropped first).

Only the worker process imports this module (it imports torch through diffusers).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from diffusers.utils import logging as diffusers_logging

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

log = logging.getLogger(__name__)

MAX_LOADED = 8
"""Adapters kept loaded: a few megabytes to a few hundred each."""

LoraUse = tuple[str, str, float]
"""(name, file, weight) of one adapter a job asks for."""


@contextlib.contextmanager
def quiet_diffusers() -> Iterator[None]:
    """Hold diffusers' own warnings while an adapter loads.

    A failure is told in one line by the caller, and "no LoRA keys for the text encoder" is the
    usual case, not news.
    """
    previous = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity(diffusers_logging.CRITICAL)
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(previous)


class LoraError(Exception):
    """An adapter cannot be applied; the message says which and why."""


def lora_file(source: str) -> str:
    """Return the local path of a LoRA named by a path or a hub file (owner/repo/file).

    Raises:
        LoraError: It is neither a file here nor a file the hub (or its cache) has.
    """
    if Path(source).is_file():
        return source
    parts = source.split("/")
    if len(parts) < 3:  # owner, repository, file
        raise LoraError(f"LoRA {source}: no such file, and not owner/repo/file on the hub")
    from huggingface_hub import hf_hub_download  # noqa: PLC0415 - only for hub files

    try:
        return str(hf_hub_download("/".join(parts[:2]), "/".join(parts[2:])))
    except Exception as exc:
        raise LoraError(f"LoRA {source}: cannot download it: {exc}") from exc


def adapter_name(name: str) -> str:
    """Return peft's name for a LoRA: module keys take no dots, so a safe name plus a hash."""
    safe = re.sub(r"[^A-Za-z0-9_]", "_", name)[:40]
    return f"{safe}_{hashlib.sha256(name.encode()).hexdigest()[:8]}"


class LoraSet:
    """The adapters loaded into one pipeline and the set that is on."""

    def __init__(
        self,
        pipeline: Any,  # noqa: ANN401 - diffusers' pipeline
        on_change: Callable[[], None],
        compute: torch.dtype,
    ) -> None:
        """Manage ``pipeline``'s adapters.

        Args:
            pipeline: The diffusers pipeline (image-to-image shares its modules).
            on_change: Runs when the set that is on changes: prompt embeddings computed under
                another set are stale, since a LoRA may adapt the text encoders.
            compute: The precision the layers compute in: the adapters' matrices are held in
                it.
        """
        self._pipeline = pipeline
        self._compute = compute
        self._on_change = on_change
        self._loaded: OrderedDict[str, tuple[str, int, int]] = OrderedDict()
        self._active: tuple[LoraUse, ...] | None = ()
        """The adapters on, as set last; None after a failed load (peft may have changed which
        are on while it failed: set again at the next job)."""
        self.permanent: tuple[LoraUse, ...] = ()
        """Adapters on for every job (a model's distillation LoRA), before the job's own."""

    def apply(self, loras: tuple[LoraUse, ...]) -> None:
        """Turn on exactly ``loras`` at their weights (none: every adapter off).

        Raises:
            LoraError: One cannot be loaded into this model; the others are as before.
        """
        loras = self.permanent + loras
        if loras == self._active:
            return
        for name, path, _weight in loras:
            self._load(name, path)
        if loras:
            self._pipeline.enable_lora()
            self._pipeline.set_adapters(
                [adapter_name(name) for name, _path, _weight in loras],
                adapter_weights=[weight for _name, _path, weight in loras],
            )
        elif self._loaded:
            self._pipeline.disable_lora()
        self._active = loras
        self._on_change()

    def _load(self, name: str, path: str) -> None:
        """Load one adapter unless the same file is loaded already."""
        try:
            status = Path(path).stat()
        except OSError as exc:
            raise LoraError(f"LoRA {name}: cannot read {path}: {exc.strerror}") from exc
        stamp = (path, status.st_mtime_ns, status.st_size)
        key = adapter_name(name)
        if self._loaded.get(key) == stamp:
            self._loaded.move_to_end(key)
            return
        if key in self._loaded:  # the file changed: load it again
            self._drop(key)
        in_use = {adapter_name(active) for active, _path, _weight in self._active or ()}
        for old in [old for old in self._loaded if old not in in_use]:
            if len(self._loaded) < MAX_LOADED:
                break
            self._drop(old)
        try:
            with quiet_diffusers():
                self._pipeline.load_lora_weights(path, adapter_name=key)
        except Exception as exc:
            self._forget_partial(key)
            self._active = None
            reason = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
            raise LoraError(f"LoRA {name} cannot be applied to this model: {reason}") from exc
        self._in_compute_precision(key)
        self._loaded[key] = stamp
        log.info("LoRA %s loaded from %s", name, path)

    def _in_compute_precision(self, key: str) -> None:
        """Hold a new adapter's matrices in the precision the layers compute in.

        peft casts a layer's input to its adapter's precision: an adapter left in its file's
        float16 would send the Pi path's float32 activations through float16 arithmetic (many
        times slower than float32 on a CPU without it).
        """
        marker = f".{key}."
        for component in self._pipeline.components.values():
            if not isinstance(component, torch.nn.Module):
                continue
            for name, parameter in component.named_parameters():
                if marker in name and parameter.dtype != self._compute:
                    parameter.data = parameter.data.to(self._compute)

    def _drop(self, key: str) -> None:
        self._pipeline.delete_adapters(key)
        del self._loaded[key]

    def _forget_partial(self, key: str) -> None:
        """Remove whatever part of a failed load was attached."""
        try:
            self._pipeline.delete_adapters(key)
        except Exception:  # noqa: BLE001 - nothing was attached, or peft says so its own way
            log.debug("no adapter %s to remove after a failed load", key)
