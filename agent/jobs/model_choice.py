"""A request's model and LoRA styles: checked against what is installed before it is admitted."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

from agent.jobs.errors import ErrorCode, RequestError
from agent.model.catalog import Catalog, InstalledModel
from agent.model.lora_shelf import LoraFile, LoraFileError, LoraShelf

if TYPE_CHECKING:
    from agent.settings import Settings

MAX_LORAS = 4
"""LoRA styles one request may combine."""
MAX_LORA_WEIGHT = 4.0


class LoraRequest(BaseModel):
    """One LoRA style a request asks for."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    name: str = Field(max_length=64)
    weight: float = 1.0


@dataclass(frozen=True)
class ModelChoice:
    """What a request may choose from: the installed models and the LoRA folder."""

    catalog: Catalog
    loras: LoraShelf

    @classmethod
    def of(cls, settings: Settings) -> ModelChoice:
        """Return the choice the settings describe (families not read yet)."""
        folder = settings.lora_dir or settings.state_dir / "loras"
        return cls(Catalog(settings), LoraShelf(folder))

    def model(self, wanted: str | None) -> InstalledModel:
        """Return the model a request names (its short name or source), or the default.

        Raises:
            RequestError: No installed model has that name.
        """
        if wanted is None or wanted == "":
            found = self.catalog.get(self.catalog.default)
        else:
            found = self.catalog.find(wanted)
        if found is None:
            names = ", ".join(self.catalog.names)
            raise RequestError(
                ErrorCode.UNKNOWN_MODEL,
                f"no model {str(wanted)[:64]!r} is installed; installed: {names}",
                field="model",
            )
        return found

    def styles(
        self, model: InstalledModel, requested: list[LoraRequest] | None
    ) -> tuple[tuple[str, float], ...]:
        """Return the LoRA styles a request asks for, each found and fitting ``model``.

        Raises:
            RequestError: Too many, a weight out of range, a name not in the folder, a file that
                is not a LoRA, or one made for another family.
        """
        if not requested:
            return ()
        if len(requested) > MAX_LORAS:
            raise RequestError(
                ErrorCode.OUT_OF_RANGE,
                f"{len(requested)} LoRA styles asked for; at most {MAX_LORAS}",
                field="loras",
            )
        chosen: dict[str, float] = {}
        for lora in requested:
            if not math.isfinite(lora.weight) or abs(lora.weight) > MAX_LORA_WEIGHT:
                raise RequestError(
                    ErrorCode.OUT_OF_RANGE,
                    f"LoRA {lora.name[:64]!r}: weight {lora.weight} is outside "
                    f"-{MAX_LORA_WEIGHT}..{MAX_LORA_WEIGHT}",
                    field="loras",
                )
            found = self.loras.find(lora.name)
            if found is None:
                names = ", ".join(f.name for f in self.loras.files()[:20]) or "none"
                raise RequestError(
                    ErrorCode.UNKNOWN_LORA,
                    f"no LoRA {lora.name[:64]!r} in {self.loras.folder}; there: {names}",
                    field="loras",
                )
            _check_fits(self.loras, found, model)
            chosen[found.name] = lora.weight  # named twice: the last weight
        return tuple(chosen.items())


def model_choice(settings: Settings) -> ModelChoice:
    """Return the models and LoRA folder the settings name.

    Raises:
        SettingsError: A model's name is not a short name.
    """
    from agent.settings import SettingsError  # noqa: PLC0415 - the package imports this one's parts

    try:
        return ModelChoice.of(settings)
    except ValueError as exc:
        raise SettingsError(str(exc)) from exc


def _check_fits(shelf: LoraShelf, lora: LoraFile, model: InstalledModel) -> None:
    """Refuse a LoRA whose cross-attention takes text features of another width than the model's.

    Raises:
        RequestError: ``bad_lora``.
    """
    name = lora.name
    try:
        width = shelf.text_width(lora)
    except LoraFileError as exc:
        raise RequestError(ErrorCode.BAD_LORA, f"LoRA {name}: {exc}", field="loras") from exc
    family = model.family
    if width is not None and family is not None and family.cross_attention_dim not in (0, width):
        raise RequestError(
            ErrorCode.BAD_LORA,
            f"LoRA {name} was made for a model whose text features are {width} wide; "
            f"{model.name} ({family.title}) has {family.cross_attention_dim}",
            field="loras",
        )
