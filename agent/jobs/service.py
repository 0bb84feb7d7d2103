"""What the HTTP entry points ask of the jobs: submit, look up, wait for, cancel, list images.

The HTTP server's handlers await these on the agent's loop, so every HTTP job goes through the
same admission, journal, queue and metrics as MQTT.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from typing import TYPE_CHECKING, Any

from agent.jobs.model_choice import ModelChoice
from agent.jobs.requests import parse_generate

if TYPE_CHECKING:
    from collections.abc import Callable

    from agent.jobs.admission import Admission
    from agent.jobs.journal import Journal
    from agent.jobs.outbox import Outbox
    from agent.jobs.requests import JobSpec
    from agent.jobs.runner import Runner
    from agent.settings import Settings

log = logging.getLogger(__name__)


def fingerprint(payload: bytes) -> str:
    """Return the fingerprint of an HTTP request body: a resend has the same one."""
    return hashlib.sha256(payload).hexdigest()


class JobService:
    """Jobs as the HTTP APIs see them."""

    def __init__(  # noqa: PLR0913 - the parts the HTTP APIs reach jobs through
        self,
        *,
        settings: Settings,
        admission: Admission,
        journal: Journal,
        runner: Runner,
        outbox: Outbox,
        choice: ModelChoice | None = None,
    ) -> None:
        """Create the service over the agent's parts; ``choice``: the models and LoRA styles."""
        self.settings = settings
        self.choice = choice or ModelChoice.of(settings)
        self._admission = admission
        self._journal = journal
        self._runner = runner
        self._outbox = outbox

    async def submit(self, parse: Callable[[], JobSpec], *, fingerprint: str, api: str) -> JobSpec:
        """Admit one job and return it once journaled and queued.

        Raises:
            RequestError: The request is refused; already counted.
        """
        admitted = await self._admission.offer(parse, fingerprint=fingerprint, api=api)
        return admitted.spec

    async def submit_page(self, payload: bytes) -> dict[str, Any]:
        """Take a job from the page's API: the MQTT request's fields, as a JSON body.

        Raises:
            RequestError: The request is refused; already counted.
        """
        spec = await self.submit(
            lambda: parse_generate(payload, self.settings, choice=self.choice),
            fingerprint=fingerprint(payload),
            api="web",
        )
        return {"id": spec.id, "position": self._runner.position(spec.id)}

    async def status(self, job_id: str) -> dict[str, Any] | None:
        """Return a job's status and, once finished, its reply (with the image URL)."""
        entry = await self._journal.get(job_id)
        if entry is None:
            return None
        body: dict[str, Any] = {"id": job_id, "status": entry.status.value}
        position = self._runner.position(job_id)
        if position is not None:
            body["position"] = position
        if entry.reply is not None:
            body["status"] = "done"
            reply = dict(entry.reply)
            if reply.get("status") == "ok":
                reply["image"] = {**reply["image"], "url": self._outbox.url(entry.spec)}
            body["reply"] = reply
        return body

    async def result(self, job_id: str) -> dict[str, Any]:
        """Wait for a job's reply (as the journal keeps it, with its image URL).

        The caller bounds the wait (``asyncio.timeout``); the job goes on regardless and its
        reply is kept.
        """
        while True:
            finished = self._runner.finished(job_id)
            found = await self.status(job_id)
            if found is not None and "reply" in found:
                reply: dict[str, Any] = found["reply"]
                return reply
            await finished

    async def image(self, spec: JobSpec) -> bytes:
        """Return a finished job's image file."""
        return await asyncio.to_thread(self._outbox.store_path(spec).read_bytes)

    async def progress(self) -> dict[str, Any]:
        """Return the running job's progress: fraction done, seconds left (estimated), queue."""
        job = self._runner.current
        waiting = self._admission.queue_depth
        if job is None or job.started is None:
            return {"progress": 0.0, "eta_s": 0.0, "step": 0, "steps": 0, "queued": waiting}
        steps = job.spec.steps_run
        fraction = job.step / steps if steps else 0.0
        elapsed = time.monotonic() - job.started
        eta = elapsed / fraction * (1 - fraction) if fraction > 0 else self._runner.last_latency_s
        return {
            "progress": round(fraction, 4),
            "eta_s": round(eta or 0.0, 2),
            "step": job.step,
            "steps": steps,
            "job": job.spec.id,
            "queued": waiting,
        }

    async def cancel(self, job_id: str) -> bool:
        """Cancel a job offered, queued or running; return whether there was one."""
        return await self._admission.cancel(job_id)

    async def gallery(self, limit: int) -> list[dict[str, Any]]:
        """Return the newest images still on disk, newest first."""
        images = []
        for entry in await self._journal.recent(limit * 2):
            spec = entry.spec
            if not self._outbox.store_path(spec).exists():
                continue  # removed by retention
            image: dict[str, Any] = {
                "id": spec.id,
                "prompt": spec.prompt,
                "seed": spec.seed,
                "width": spec.width,
                "height": spec.height,
                "format": spec.format,
                "url": self._outbox.url(spec),
                "created": entry.received_at,
                "latency_s": (entry.reply or {}).get("latency_s"),
                "mode": spec.mode,
            }
            if spec.strength is not None:
                image["strength"] = spec.strength
                if "init_image" in (entry.reply or {}):  # its thumbnail was stored
                    image["source_url"] = self._outbox.url(spec, source=True)
            images.append(image)
        return images[:limit]
