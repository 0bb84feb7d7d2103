"""The diffusers pipeline: loading, device and precision, and one generation with its timings.

Only the worker process imports this module, so only the worker imports torch.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import diffusers
import torch
import transformers
from diffusers import AutoPipelineForText2Image

if TYPE_CHECKING:
    from collections.abc import Callable

    from PIL.Image import Image

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class JobCancelledError(Exception):
    """The job was cancelled between two denoising steps."""


def choose_device(setting: str) -> str:
    """Return the torch device: ``auto`` means cuda where a GPU is present, else cpu."""
    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return setting


def choose_dtype(setting: str, device: str) -> torch.dtype:
    """Return the precision: ``auto`` means float16 on cuda and float32 on cpu."""
    if setting == "auto":
        return torch.float16 if device == "cuda" else torch.float32
    return _DTYPES[setting]


def dtype_name(dtype: torch.dtype) -> str:
    """Return the setting name of a torch dtype (``float32`` for ``torch.float32``)."""
    return str(dtype).removeprefix("torch.")


@dataclass
class GenerationTimings:
    """Seconds spent in each stage of one generation."""

    text_encoding: float = 0.0
    denoising: float = 0.0
    decoding: float = 0.0
    marks: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, float]:
        """Return the stages as a plain dict."""
        return {
            "text_encoding": self.text_encoding,
            "denoising": self.denoising,
            "decoding": self.decoding,
        }


@dataclass(frozen=True)
class LoadedModel:
    """What was loaded, for metrics and the state topic."""

    model: str
    device: str
    dtype: str
    pipeline_class: str
    load_seconds: float


class Text2Image:
    """A text-to-image pipeline loaded once, generating one image per call."""

    def __init__(self, model: str, device: str, dtype: str, threads: int) -> None:
        """Load the pipeline.

        Args:
            model: Hub id or local folder.
            device: ``auto``, ``cpu`` or ``cuda``.
            dtype: ``auto`` or a dtype name.
            threads: CPU threads for torch; 0 leaves torch's default (every core).
        """
        # Progress bars are for terminals; the agent reports progress on MQTT instead.
        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()
        if threads > 0:
            torch.set_num_threads(threads)
        started = time.perf_counter()
        self.device = choose_device(device)
        self.dtype = choose_dtype(dtype, self.device)
        # safetensors only and no remote code: a model folder can never run code of its own.
        self._pipeline: Any = AutoPipelineForText2Image.from_pretrained(
            model, dtype=self.dtype, use_safetensors=True, trust_remote_code=False
        )
        self._pipeline.to(self.device)
        self._pipeline.set_progress_bar_config(disable=True)
        self._timings = GenerationTimings()
        encode_prompt = self._pipeline.encode_prompt

        def timed_encode_prompt(*args: Any, **kwargs: Any) -> Any:  # noqa: ANN401 - pass-through
            begun = time.perf_counter()
            result = encode_prompt(*args, **kwargs)
            self._timings.text_encoding += time.perf_counter() - begun
            return result

        # The pipeline calls self.encode_prompt, so an instance attribute times it in place.
        self._pipeline.encode_prompt = timed_encode_prompt
        self.loaded = LoadedModel(
            model=model,
            device=self.device,
            dtype=dtype_name(self.dtype),
            pipeline_class=type(self._pipeline).__name__,
            load_seconds=time.perf_counter() - started,
        )

    def generate(  # noqa: PLR0913 - the request's own fields
        self,
        *,
        prompt: str,
        negative_prompt: str | None,
        width: int,
        height: int,
        steps: int,
        guidance_scale: float,
        seed: int,
        on_step: Callable[[int, int], None],
        cancelled: Callable[[], bool],
    ) -> tuple[Image, GenerationTimings]:
        """Generate one image.

        Args:
            prompt: What to draw.
            negative_prompt: What to avoid, or None.
            width: Width in pixels.
            height: Height in pixels.
            steps: Denoising steps.
            guidance_scale: Classifier-free guidance; 0 turns it off (SDXL-Turbo's way).
            seed: Seed of the initial noise; the same seed gives the same image.
            on_step: Called with (step done, steps) after each denoising step.
            cancelled: Polled after each step; True stops the job.

        Returns:
            The image and the time per stage.

        Raises:
            JobCancelledError: ``cancelled()`` turned True.
        """
        self._timings = timings = GenerationTimings()
        started = time.perf_counter()
        generator = torch.Generator(device=self.device).manual_seed(seed)

        def step_end(
            _pipe: object, step: int, _timestep: object, kwargs: dict[str, Any]
        ) -> dict[str, Any]:
            on_step(step + 1, steps)
            if cancelled():
                raise JobCancelledError
            timings.marks["denoised"] = time.perf_counter()
            return kwargs

        with torch.inference_mode():
            output = self._pipeline(
                prompt=prompt,
                negative_prompt=negative_prompt,
                width=width,
                height=height,
                num_inference_steps=steps,
                guidance_scale=guidance_scale,
                generator=generator,
                callback_on_step_end=step_end,
            )
        finished = time.perf_counter()
        denoised = timings.marks.get("denoised", finished)
        timings.denoising = denoised - started - timings.text_encoding
        timings.decoding = finished - denoised
        return output.images[0], timings
