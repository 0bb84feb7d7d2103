"""The generation worker process: loads the model once, then runs one job at a time.

The daemon talks to it over a ``multiprocessing`` pipe with the messages of
:mod:`agent.model.protocol`, and asks it to stop a job through a shared event that the worker polls
after every denoising step. This module imports torch only inside :func:`worker_main`, so the
daemon can name it as the process's target without loading torch.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import os
import signal
import time
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from agent.logs import configure_logging
from agent.model.protocol import (
    Cancelled,
    Failed,
    Finished,
    GenerateJob,
    LoadFailed,
    Progress,
    WorkerCommand,
    WorkerConfig,
)

if TYPE_CHECKING:
    from multiprocessing.connection import Connection
    from multiprocessing.synchronize import Event

    from PIL.Image import Image as PILImage

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
WORKER_OOM_SCORE_ADJ = 500
"""Added to the worker's OOM score (-1000 never, 1000 always): it goes before the daemon."""


def worker_main(connection: Connection, cancel: Event, config: WorkerConfig) -> None:
    """Run the worker: load, report, then serve jobs until the pipe closes or says stop.

    Args:
        connection: The worker's end of the pipe to the daemon.
        cancel: Set by the daemon to stop the running job.
        config: What to load and how to encode.
    """
    # Ctrl-C in a terminal reaches the whole process group: the daemon stops the worker in
    # order (the running job finishes or goes back to the journal), so the worker ignores it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()
    _go_first_when_memory_runs_out()
    configure_logging(config.log_level, worker=True)
    # Imported here so that only this process pays for (and can be killed by) torch.
    from agent.images import encode_image  # noqa: PLC0415
    from agent.model.lora import LoraError  # noqa: PLC0415
    from agent.model.pipeline import JobCancelledError, Text2Image  # noqa: PLC0415
    from agent.model.weight_store import WeightsNotStoredError  # noqa: PLC0415

    try:
        model = Text2Image(config.pipeline)
    except Exception as exc:
        if not isinstance(exc, WeightsNotStoredError):  # told whole in its message: no trace
            log.exception("model load failed")
        connection.send(LoadFailed(f"{type(exc).__name__}: {exc}"))
        return
    connection.send(model.loaded)
    log.debug(  # the daemon logs the model's line, with the worker's memory
        "model %s loaded on %s (%s) in %.1f s, warm-up %.1f s at %s",
        config.pipeline.model,
        model.device,
        model.loaded.levers,
        model.loaded.load_seconds,
        model.loaded.warmup_seconds,
        "x".join(map(str, model.loaded.warmup_size or ())) or "none",
    )
    while True:
        try:
            command: WorkerCommand = connection.recv()
        except EOFError:
            return
        if not isinstance(command, GenerateJob):
            return  # Stop
        job_id = command.id
        try:
            model.loras.apply(command.loras)
        except LoraError as exc:
            log.warning("job %s: %s", job_id, exc)
            connection.send(Failed(job_id, str(exc), code="bad_lora"))
            continue
        try:
            init_image = _init_image(command.init_image)
            image, timings = model.generate(
                prompt=command.prompt,
                negative_prompt=command.negative_prompt,
                width=command.width,
                height=command.height,
                steps=command.steps,
                guidance_scale=command.guidance_scale,
                seed=command.seed,
                on_step=partial(_send_progress, connection, job_id),
                cancelled=cancel.is_set,
                init_image=init_image,
                strength=command.strength,
            )
            begun = time.perf_counter()
            data = encode_image(image, command.format, config.jpeg_quality)
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
    # The daemon died before prctl took effect: this process was handed to another parent. Not
    # "the parent is 1": in a container the daemon itself is PID 1.
    daemon = multiprocessing.parent_process()
    if daemon is not None and os.getppid() != daemon.pid:
        os._exit(1)


def _go_first_when_memory_runs_out() -> None:
    """Make this process the OOM killer's first choice over the daemon.

    When memory runs out it is the worker that holds it; were the daemon killed instead, the
    broker link, the journal and every queued job's answer would go with it. A process may always
    raise its own score.
    """
    with contextlib.suppress(OSError):
        Path("/proc/self/oom_score_adj").write_text(f"{WORKER_OOM_SCORE_ADJ}\n", encoding="ascii")


def _init_image(path: str | None) -> PILImage | None:
    """Return the picture an image-to-image job starts from (the daemon checked and sized it)."""
    if path is None:
        return None
    from PIL import Image  # noqa: PLC0415 - the worker's own import, like the pipeline's

    with Image.open(path) as picture:
        return picture.convert("RGB")


def _send_progress(connection: Connection, job_id: str, step: int, steps: int) -> None:
    connection.send(Progress(job_id, step, steps))
