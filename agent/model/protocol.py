"""The worker protocol: every message between the daemon and the generation worker, typed.

Both processes import this module; it imports neither torch nor the pipeline, so the daemon stays
light and the worker's modules import it without a circle. Messages cross a ``multiprocessing``
pipe (pickled frozen dataclasses); a stop request is :class:`Stop`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from agent.settings import ImageFormat, Settings


@dataclass(frozen=True)
class PipelineOptions:
    """How to load and run the pipeline (the worker's share of the settings)."""

    model: str
    """Hub id or folder."""
    name: str = ""
    """The model's short name (:class:`agent.model.catalog.Catalog`)."""
    device: str = "auto"
    dtype: str = "auto"
    threads: int = 0
    variant: str = "auto"
    tiny_vae: str = ""
    half_weights: str = "auto"
    weight_form: str = "auto"
    weights_dir: str = ""
    """Where integer forms of the weights are written once and mapped after."""
    channels_last: bool = True
    packed_weights: bool = True
    fused_decoder: bool = True
    warmup: bool = True
    warmup_at_default_size: str = "auto"
    default_size: tuple[int, int] = (512, 512)
    """The width and height of a request that names none."""
    prompt_cache_size: int = 16
    base_lora: str = ""
    """A LoRA always on (a distillation LoRA over a base model): a file or owner/repo/file."""
    timestep_spacing: str = ""
    """The scheduler's timestep spacing, where it differs from the model's config."""

    @classmethod
    def from_settings(cls, settings: Settings) -> PipelineOptions:
        """Return the pipeline options the settings ask for."""
        return cls(
            model=settings.model,
            device=settings.device,
            dtype=settings.dtype,
            threads=settings.torch_threads,
            variant=settings.model_variant,
            tiny_vae=settings.tiny_vae,
            half_weights=settings.half_weights,
            weight_form=settings.weight_form,
            weights_dir=str(settings.weights_path),
            channels_last=settings.channels_last,
            packed_weights=settings.packed_weights,
            fused_decoder=settings.fused_decoder,
            warmup=settings.warmup,
            warmup_at_default_size=settings.warmup_at_default_size,
            default_size=(settings.default_width, settings.default_height),
            prompt_cache_size=settings.prompt_cache_size,
        )


@dataclass(frozen=True)
class WorkerConfig:
    """What the worker needs to load the model and encode images."""

    pipeline: PipelineOptions
    jpeg_quality: int
    log_level: str = "INFO"


def denoising_steps(steps: int, strength: float | None) -> tuple[int, int]:
    """Return the schedule's length and the steps that run, for ``steps`` at ``strength``.

    Image-to-image starts part-way down the noise schedule: diffusers runs the last
    ``steps x strength`` of ``steps``, rounded down (2 steps at strength 0.5 run one). Where
    that is none the pipeline would refuse, so the schedule is lengthened until one step runs:
    1 step at 0.5 becomes a schedule of 2 running its last. Text-to-image runs every step.

    Args:
        steps: The steps asked for.
        strength: The image-to-image strength (0.01 <= s <= 1: the schedule is at most 100 long),
            or None for text-to-image.

    Returns:
        (num_inference_steps to give the pipeline, steps it runs), with diffusers' own rounding.
    """
    if strength is None:
        return steps, steps
    # diffusers' SDXL get_timesteps: it runs min(int(n * s), n) of a schedule of n steps.
    schedule = max(steps, int(1 / strength) - 1)
    while int(schedule * strength) < 1:
        schedule += 1
    return schedule, min(int(schedule * strength), schedule)


@dataclass(frozen=True)
class GenerateJob:
    """Daemon to worker: generate one image and encode it."""

    id: str
    prompt: str
    negative_prompt: str | None
    width: int
    height: int
    steps: int
    guidance_scale: float
    seed: int
    format: ImageFormat
    init_image: str | None = None
    """Image-to-image: the path of the picture to start from (a PNG the daemon wrote, exactly
    width x height); None for text-to-image."""
    strength: float | None = None
    """How far the picture may change (0.01 <= s <= 1); None for text-to-image."""
    loras: tuple[tuple[str, str, float], ...] = ()
    """LoRA styles: (name, file, weight) each; none turns every loaded one off."""


@dataclass(frozen=True)
class Stop:
    """Daemon to worker: exit after the current job."""


@dataclass(frozen=True)
class Ready:
    """Worker to daemon: the model is loaded."""

    model: str
    device: str
    dtype: str
    pipeline_class: str
    load_seconds: float
    warmup_seconds: float
    levers: str
    mapped_bytes: int
    """Weights left in the mapped checkpoint files (file-backed, the kernel may drop them)."""
    copied_bytes: int
    """Weights converted into the worker's own memory (float32 norms and embeddings, say)."""
    warmup_size: tuple[int, int] | None = None
    """The width and height of the warm-up image; None where there was no warm-up."""
    name: str = ""
    """The model's short name."""


@dataclass(frozen=True)
class LoadFailed:
    """The model could not be loaded; the worker exits after sending this."""

    message: str


@dataclass(frozen=True)
class Progress:
    """A denoising step finished."""

    job_id: str
    step: int
    steps: int


@dataclass(frozen=True)
class Finished:
    """A job's image, encoded, with the time per stage."""

    job_id: str
    data: bytes
    timings: dict[str, float]


@dataclass(frozen=True)
class Failed:
    """A job raised inside the pipeline; the worker goes on with the next one."""

    job_id: str
    message: str
    code: str = "generation_failed"
    """The reply's error code (``bad_lora`` for a LoRA that cannot be applied)."""


@dataclass(frozen=True)
class Cancelled:
    """A job was stopped at a step boundary."""

    job_id: str


WorkerEvent = Ready | LoadFailed | Progress | Finished | Failed | Cancelled
"""What the worker sends."""
WorkerCommand = GenerateJob | Stop
"""What the daemon sends."""
