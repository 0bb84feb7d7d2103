"""The installed models: their short names, where each loads from, and what each draws by default.

One model is resident at a time (a 4 GB Pi cannot hold two); the catalog is what requests may
name, what the lists on every interface show, and what the runner switches to. Each model's
family is read from its config files at start (kilobytes, in a thread), so a request's defaults
and bounds are its model's before the model is ever loaded.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from agent.machine.disk import write_atomically
from agent.model.family import Family, ModelConfigError, read_family
from agent.model.protocol import PipelineOptions
from agent.settings.model import MODEL_NAME_PATTERN, ModelEntry

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from agent.settings import Settings

log = logging.getLogger(__name__)

CHOICE_FILE = "default-model.json"
"""The default model chosen at run time (Home Assistant's select, AUTOMATIC1111's options)."""

EXPLICIT_DEFAULTS = ("default_width", "default_height")
"""Settings that, when set, hold for every model; left alone, each model draws its native size."""


@dataclass(frozen=True)
class InstalledModel:
    """One model a request may name."""

    name: str
    entry: ModelEntry
    family: Family | None = None
    """None until its config files have been read (or where they cannot be)."""
    problem: str | None = None
    """Why its config files could not be read, if they could not."""

    @property
    def source(self) -> str:
        """Return its hub id or folder."""
        return self.entry.source


def short_name(source: str) -> str:
    """Return a model's short name from its hub id or folder.

    ``stabilityai/sd-turbo`` is ``sd-turbo``; ``/share/models/tiny sdxl/`` is ``tiny-sdxl``.
    """
    name = re.sub(r"[^A-Za-z0-9._-]", "-", PurePosixPath(source.rstrip("/")).name)
    name = name.lstrip("._-")[:64]
    return name if re.match(MODEL_NAME_PATTERN, name) else "model"


class Catalog:
    """The models requests may name, one of them the default."""

    def __init__(self, settings: Settings) -> None:
        """Take the ``models`` setting and the ``model`` setting (a name in it, or a source).

        Raises:
            ValueError: A model's name is not a short name.
        """
        self._settings = settings
        entries = dict(settings.models)
        for name in entries:
            if not re.match(MODEL_NAME_PATTERN, name):
                raise ValueError(f"models: {name!r} is not a name (letters, digits, . _ -)")
        if settings.model in entries:
            self.default = settings.model
        else:
            named = [name for name, entry in entries.items() if entry.source == settings.model]
            self.default = named[0] if named else short_name(settings.model)
            if not named:
                entries = {self.default: ModelEntry(source=settings.model), **entries}
        self._models = {name: InstalledModel(name, entry) for name, entry in entries.items()}
        self.configured = self.default
        """The default the settings name: its integer weights live in ``<state_dir>/weights``."""
        self._choice_file = settings.state_dir / CHOICE_FILE
        self._restore_choice()
        self.on_choose: list[Callable[[], None]] = []
        """Called after the default changed."""

    def choose(self, wanted: str) -> InstalledModel | None:
        """Make the model a client means by ``wanted`` the default; kept across restarts.

        Returns:
            The model, or None where none is installed under that name (nothing changes).
        """
        model = self.find(wanted)
        if model is None:
            return None
        if model.name != self.default:
            self.default = model.name
            log.info("default model: %s", model.name)
            for listener in self.on_choose:
                listener()
            record = {"configured": self._settings.model, "chosen": model.name}
            try:
                write_atomically(self._choice_file, json.dumps(record).encode())
            except OSError as exc:
                log.warning("cannot keep the chosen model in %s: %s", self._choice_file, exc)
        return model

    def _restore_choice(self) -> None:
        """Take the default chosen before the last stop, unless the settings changed since."""
        try:
            record = json.loads(self._choice_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return
        if not isinstance(record, dict) or record.get("configured") != self._settings.model:
            return  # the model setting was changed since: it wins
        chosen = record.get("chosen")
        if isinstance(chosen, str) and chosen in self._models:
            self.default = chosen

    @property
    def names(self) -> list[str]:
        """Return the models' names, the default first."""
        return [self.default] + [name for name in self._models if name != self.default]

    def __iter__(self) -> Iterator[InstalledModel]:
        """Iterate the models, the default first."""
        return (self._models[name] for name in self.names)

    def get(self, name: str) -> InstalledModel | None:
        """Return the model of that name, or None."""
        return self._models.get(name)

    def find(self, wanted: str) -> InstalledModel | None:
        """Return the model a client means by ``wanted``: its short name, or its source."""
        found = self._models.get(wanted)
        if found is None:
            found = next((m for m in self._models.values() if m.source == wanted), None)
        return found

    def read_families(self, names: list[str] | None = None) -> None:
        """Read the models' families from their config files (blocking: run it in a thread).

        Args:
            names: Those to read; None: every model.
        """
        for name, model in list(self._models.items()):
            if names is not None and name not in names:
                continue
            try:
                family = read_family(model.source)
            except ModelConfigError as exc:
                log.warning("model %s: %s", name, exc)
                self._models[name] = dataclasses.replace(model, problem=str(exc))
                continue
            self._models[name] = dataclasses.replace(model, family=family, problem=None)
            log.info(
                "model %s: %s, %s (%dx%d)",
                name,
                model.source,
                family.title,
                family.native_size,
                family.native_size,
            )

    def default_size(self, model: InstalledModel) -> tuple[int, int]:
        """Return the width and height a request for ``model`` that names none gets."""
        settings = self._settings
        if model.family is None or set(EXPLICIT_DEFAULTS) & settings.model_fields_set:
            return settings.default_width, settings.default_height
        side = min(max(model.family.native_size, settings.min_size), settings.max_size)
        return side, side

    def default_steps(self, model: InstalledModel) -> int:
        """Return the steps a request for ``model`` that names none gets."""
        steps = model.entry.steps or self._settings.default_steps
        return min(steps, self._settings.max_steps)

    def default_guidance(self, model: InstalledModel) -> float:
        """Return the guidance scale a request for ``model`` that names none gets."""
        if model.entry.guidance_scale is not None:
            return model.entry.guidance_scale
        return self._settings.default_guidance_scale

    def pipeline_options(self, name: str) -> PipelineOptions:
        """Return how the worker loads the model of that name.

        The configured model's integer weight forms stay in ``<state_dir>/weights`` (where
        earlier versions wrote them); another model's go to a folder of its own, so switching
        does not make either one quantize again.
        """
        model = self._models[name]
        base = PipelineOptions.from_settings(self._settings)
        weights = Path(base.weights_dir)
        return dataclasses.replace(
            base,
            model=model.source,
            name=name,
            # A model's own tiny_vae, where its entry sets one; the setting's otherwise.
            tiny_vae=(
                model.entry.tiny_vae
                if "tiny_vae" in model.entry.model_fields_set
                else self._settings.tiny_vae
            ),
            weights_dir=str(weights if name == self.configured else weights / "models" / name),
            default_size=self.default_size(model),
            base_lora=model.entry.lora,
            timestep_spacing=model.entry.timestep_spacing,
        )

    def listing(self) -> list[dict[str, object]]:
        """Return the models as the lists on every interface show them."""
        return [
            {
                "name": model.name,
                "source": model.source,
                "family": model.family.name if model.family else None,
                "size": model.family.native_size if model.family else None,
                "steps": self.default_steps(model),
                "default": model.name == self.default,
                "problem": model.problem,
            }
            for model in self
        ]
