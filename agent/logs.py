"""The agent's log: one format for the daemon and the worker, and no notices nobody can act on.

Operators read the log in ``journalctl -u edgeai-agent`` or a container's log: one line per
event that matters (the broker connection, the model ready, each job's end, the worker's
restarts), nothing per step. Third-party libraries print notices at import time that read as if
something were broken and that a user can do nothing about (an optional torchvision missing,
torchao's CUDA kernels on a CPU, deprecations inside torch). Those are filtered here, each by
its logger and the start of its message, so every other warning of the same libraries stays.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

DAEMON_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
WORKER_FORMAT = "%(asctime)s worker %(levelname)s %(name)s: %(message)s"


@dataclass(frozen=True)
class Notice:
    """A third-party log message that says nothing a user can act on."""

    logger: str
    """The exact logger that emits it (a filter on a logger sees only its own records)."""
    starts: str
    """How the message begins."""
    contains: str = ""
    """A further part the message must contain, to keep the match narrow."""
    why: str = ""


NOTICES = (
    Notice(
        "transformers.utils.import_utils",
        "`",
        "requires torchvision (not installed); falling back to",
        why="image processors of models the agent does not load; the PIL fallback is fine",
    ),
    Notice(
        "torchao",
        "Failed to load ",
        "_C_",
        why="torchao's CUDA and MX kernels, which a CPU never uses",
    ),
    Notice(
        "torchao.kernel.intmm",
        "Warning: Detected no triton",
        why="Triton is for GPUs",
    ),
    Notice(
        "torch.utils._pytree",
        "",
        "is an Enum subclass and is now natively supported by torch.compile",
        why="a deprecation inside torchao's own registrations",
    ),
    Notice(
        "diffusers.quantizers.torchao.torchao_quantizer",
        "Unable to import `torchao` Tensor objects",
        why="only for checkpoints saved with torchao, which the agent never loads",
    ),
    Notice(
        "diffusers.configuration_utils",
        "The config attributes {'block_out_channels'",
        "were passed to AutoencoderTiny",
        why="diffusers writes that key into an AutoencoderTiny's config, then warns reading it",
    ),
    Notice(
        "diffusers.pipelines.pipeline_utils",
        "Expected types for vae:",
        "AutoencoderTiny",
        why="the tiny decoder is passed in place of the full VAE on purpose",
    ),
)


class _DropNotices(logging.Filter):
    def __init__(self, notices: list[Notice]) -> None:
        super().__init__()
        self._notices = notices

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(
            message.startswith(notice.starts) and notice.contains in message
            for notice in self._notices
        )


def quiet_third_party_notices() -> None:
    """Drop the :data:`NOTICES` at their loggers; everything else those libraries say stays."""
    by_logger: dict[str, list[Notice]] = {}
    for notice in NOTICES:
        by_logger.setdefault(notice.logger, []).append(notice)
    for name, notices in by_logger.items():
        logging.getLogger(name).addFilter(_DropNotices(notices))


def configure_logging(level: str, *, worker: bool = False) -> None:
    """Set up the process's log: the level, the format, and the third-party notices dropped.

    Args:
        level: DEBUG, INFO, WARNING or ERROR.
        worker: The generation worker's log (its lines say ``worker``).
    """
    logging.basicConfig(level=level, format=WORKER_FORMAT if worker else DAEMON_FORMAT)
    quiet_third_party_notices()
