"""The generation worker process: loads the model once, then runs one job at a time.

The daemon talks to it over a ``multiprocessing`` pipe with the small messages below, and asks
it to stop a job through a shared event that the worker polls after every denoising step. This
module imports torch only inside :func:`worker_main`, so the daemon can import the messages.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import time
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from multiprocessing.connection import Connection
    from multiprocessing.synchronize import Event

    from agent.settings import Settings

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class PipelineOptions:
    """How to load and run the pipeline (the worker's share of the settings)."""

    model: str
    device: str = "auto"
    dtype: str = "auto"
    threads: int = 0
    variant: str = "auto"
    tiny_vae: str = ""
    half_weights: str = "auto"
    channels_last: bool = True
    warmup: bool = True
    prompt_cache_size: int = 16

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
            channels_last=settings.channels_last,
            warmup=settings.warmup,
            prompt_cache_size=settings.prompt_cache_size,
        )


@dataclass(frozen=True)
class WorkerConfig:
    """What the worker needs to load the model and encode images."""

    pipeline: PipelineOptions
    jpeg_quality: int
    log_level: str = "INFO"


@dataclass(frozen=True)
class Ready:
    """The model is loaded."""

    model: str
    device: str
    dtype: str
    pipeline_class: str
    load_seconds: float
    warmup_seconds: float
    levers: str


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


@dataclass(frozen=True)
class Cancelled:
    """A job was stopped at a step boundary."""

    job_id: str


WorkerEvent = Ready | LoadFailed | Progress | Finished | Failed | Cancelled


def worker_main(connection: Connection, cancel: Event, config: WorkerConfig) -> None:
    """Run the worker: load, report, then serve jobs until the pipe closes or says stop.

    Args:
        connection: The worker's end of the pipe to the daemon.
        cancel: Set by the daemon to stop the running job.
        config: What to load and how to encode.
    """
    _die_with_parent()
    logging.basicConfig(
        level=config.log_level, format="%(asctime)s worker %(levelname)s %(name)s: %(message)s"
    )
    # Imported here so that only this process pays for (and can be killed by) torch.
    from agent.images import encode_image  # noqa: PLC0415
    from agent.pipeline import JobCancelledError, Text2Image  # noqa: PLC0415

    try:
        model = Text2Image(config.pipeline)
    except Exception as exc:
        log.exception("model load failed")
        connection.send(LoadFailed(f"{type(exc).__name__}: {exc}"))
        return
    connection.send(Ready(**vars(model.loaded)))
    log.info(
        "model %s loaded on %s (%s) in %.1f s, warm-up %.1f s",
        config.pipeline.model,
        model.device,
        model.loaded.levers,
        model.loaded.load_seconds,
        model.loaded.warmup_seconds,
    )
    while True:
        try:
            job: dict[str, Any] | None = connection.recv()
        except EOFError:
            return
        if job is None:
            return
        job_id = job["id"]
        try:
            image, timings = model.generate(
                prompt=job["prompt"],
                negative_prompt=job["negative_prompt"],
                width=job["width"],
                height=job["height"],
                steps=job["steps"],
                guidance_scale=job["guidance_scale"],
                seed=job["seed"],
                on_step=partial(_send_progress, connection, job_id),
                cancelled=cancel.is_set,
            )
            begun = time.perf_counter()
            data = encode_image(image, job["format"], config.jpeg_quality)
            stages = timings.as_dict() | {"image_encoding": time.perf_counter() - begun}
            connection.send(Finished(job_id, data, stages))
        except JobCancelledError:
            connection.send(Cancelled(job_id))
        except Exception as exc:
            log.exception("job %s failed", job_id)
            connection.send(Failed(job_id, f"{type(exc).__name__}: {exc}"))


def _die_with_parent() -> None:
    """Ask Linux to kill this process when the daemon dies, even by ``kill -9``.

    Otherwise an orphaned worker would finish its image, holding the model's memory, while the
    restarted daemon loads a second copy.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        log.debug("prctl is not available; the worker outlives a killed daemon")
    if os.getppid() == 1:  # the daemon died before prctl took effect
        os._exit(1)


def _send_progress(connection: Connection, job_id: str, step: int, steps: int) -> None:
    connection.send(Progress(job_id, step, steps))
