"""Everything the agent publishes about jobs: events, results, replies, errors, latest image."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from typing import TYPE_CHECKING, Any

from agent.images import file_name
from agent.messages import ErrorCode, error_body
from agent.mqtt import MqttError

if TYPE_CHECKING:
    from agent.images import ImageStore
    from agent.messages import JobSpec
    from agent.metrics import AgentMetrics
    from agent.mqtt import MqttLink
    from agent.topics import Topics
    from agent.worker import Finished

log = logging.getLogger(__name__)


def _json(body: dict[str, Any]) -> str:
    return json.dumps(body, separators=(",", ":"))


class Outbox:
    """Publishes job events and results on the contract's topics."""

    def __init__(
        self,
        link: MqttLink,
        topics: Topics,
        store: ImageStore,
        metrics: AgentMetrics,
        base_url: str,
    ) -> None:
        """Create the outbox.

        Args:
            link: The MQTT link.
            topics: The agent's topics.
            store: The image folder.
            metrics: Where stage timings go.
            base_url: Public URL of the HTTP server, for image URLs.
        """
        self._link = link
        self._topics = topics
        self._store = store
        self._metrics = metrics
        self._base_url = base_url
        self.model = ""

    def _publish(
        self,
        topic: str,
        payload: str | bytes,
        *,
        retain: bool = False,
        correlation_data: bytes | None = None,
    ) -> None:
        try:
            self._link.publish(topic, payload, retain=retain, correlation_data=correlation_data)
        except MqttError:
            log.exception("publish failed")

    def job_event(self, job_id: str, event: str, **fields: Any) -> None:  # noqa: ANN401
        """Publish one event of a job on ``jobs/<id>``."""
        self._publish(self._topics.job(job_id), _json({"id": job_id, "event": event, **fields}))

    def reply(
        self,
        job_id: str | None,
        body: dict[str, Any],
        reply_to: str | None,
        correlation_data: bytes | None,
    ) -> None:
        """Publish a reply: on ``result/<id>``, on the client's reply topic, or on ``errors``.

        Args:
            job_id: The job's id, or None when none could be read.
            body: The reply.
            reply_to: The client's reply topic (already checked), if any.
            correlation_data: MQTT 5 Correlation Data to echo on the reply topic.
        """
        payload = _json(body)
        if job_id is not None:
            self._publish(self._topics.result(job_id), payload)
        else:
            self._publish(self._topics.errors, payload)
        if reply_to is not None:
            self._publish(reply_to, payload, correlation_data=correlation_data)

    def error(
        self,
        job_id: str | None,
        code: ErrorCode,
        message: str,
        reply_to: str | None = None,
        correlation_data: bytes | None = None,
    ) -> None:
        """Publish an error reply."""
        self.reply(job_id, error_body(job_id, code, message), reply_to, correlation_data)

    def job_error(self, spec: JobSpec, code: ErrorCode, message: str) -> None:
        """Publish a job's failure: its ``failed``/``cancelled`` event, then the error reply."""
        event = "cancelled" if code is ErrorCode.CANCELLED else "failed"
        self.job_event(spec.id, event, error={"code": code.value, "message": message})
        self.error(spec.id, code, message, spec.reply_to, spec.correlation_data)

    async def deliver(
        self, spec: JobSpec, finished: Finished, received: float, queue_wait: float
    ) -> float:
        """Store the image, publish the result and the latest image; return the job's latency.

        Args:
            spec: The job.
            finished: The worker's image and timings.
            received: ``time.monotonic()`` when the request arrived.
            queue_wait: Seconds the job waited in the queue.
        """
        name = file_name(spec.id, spec.format)
        url = f"{self._base_url}/images/{name}"
        begun = time.monotonic()
        await asyncio.to_thread(self._store.save, name, finished.data)
        encoded = await asyncio.to_thread(lambda: base64.b64encode(finished.data).decode("ascii"))
        stages = finished.timings
        generation = stages["text_encoding"] + stages["denoising"] + stages["decoding"]
        latency = time.monotonic() - received
        image: dict[str, Any] = {"format": spec.format}
        if spec.output in ("b64", "both"):
            image["b64"] = encoded
        if spec.output in ("url", "both"):
            image["url"] = url
        body = {
            "id": spec.id,
            "status": "ok",
            "prompt": spec.prompt,
            "negative_prompt": spec.negative_prompt,
            "seed": spec.seed,
            "width": spec.width,
            "height": spec.height,
            "steps": spec.steps,
            "guidance_scale": spec.guidance_scale,
            "model": self.model,
            "latency_s": round(latency, 4),
            "timings": {
                "queue_wait_s": round(queue_wait, 4),
                "generation_s": round(generation, 4),
                "text_encoding_s": round(stages["text_encoding"], 4),
                "denoising_s": round(stages["denoising"], 4),
                "decoding_s": round(stages["decoding"], 4),
                "encoding_s": round(stages["image_encoding"], 4),
                "total_s": round(latency, 4),
            },
            "image": image,
        }
        self.reply(spec.id, body, spec.reply_to, spec.correlation_data)
        self.job_event(spec.id, "done", latency_s=round(latency, 4))
        self._publish(self._topics.image, encoded, retain=True)
        self._publish(self._topics.image_url, url, retain=True)
        attributes = {
            "id": spec.id,
            "prompt": spec.prompt,
            "seed": spec.seed,
            "width": spec.width,
            "height": spec.height,
            "steps": spec.steps,
            "format": spec.format,
            "latency_s": round(latency, 4),
            "url": url,
        }
        self._publish(self._topics.image_attributes, _json(attributes), retain=True)
        self._metrics.generation_seconds.observe(generation)
        for stage in ("text_encoding", "denoising", "decoding", "image_encoding"):
            self._metrics.stage_seconds.labels(stage=stage).observe(stages[stage])
        self._metrics.stage_seconds.labels(stage="publishing").observe(time.monotonic() - begun)
        self._metrics.job_seconds.observe(latency)
        return latency
