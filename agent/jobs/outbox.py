"""Everything the agent publishes about jobs: events, results, replies, errors, latest image."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from typing import TYPE_CHECKING, Any

from agent.jobs.errors import ErrorCode, RequestError, error_body
from agent.jobs.events import JobEvents
from agent.machine.disk import StorageWatch, is_full
from agent.mqtt.link import MqttError

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from agent.images import ImageStore
    from agent.jobs.requests import JobSpec
    from agent.metrics import AgentMetrics
    from agent.model.protocol import Finished
    from agent.mqtt.link import MqttLink
    from agent.mqtt.topics import Topics

log = logging.getLogger(__name__)

TOO_LARGE_NOTE = "the image is too large for an MQTT message; fetch it from url"


def _json(body: dict[str, Any]) -> str:
    return json.dumps(body, separators=(",", ":"))


class Outbox:
    """Publishes job events and results on the contract's topics."""

    def __init__(  # noqa: PLR0913 - what the outbox publishes with
        self,
        link: MqttLink,
        topics: Topics,
        store: ImageStore,
        metrics: AgentMetrics,
        base_url: str,
        *,
        sign: Callable[[str], str | None] = lambda _name: None,
        storage: StorageWatch | None = None,
    ) -> None:
        """Create the outbox.

        Args:
            link: The MQTT link.
            topics: The agent's topics.
            store: The image folder.
            metrics: Where stage timings go.
            base_url: Public URL of the HTTP server, for image URLs.
            sign: Returns the signature an image's URL carries (None: URLs need none).
            storage: Where a failed write of an image is recorded.
        """
        self._link = link
        self._topics = topics
        self._store = store
        self._metrics = metrics
        self._sign = sign
        self._storage = storage or StorageWatch({"images": store.folder})
        self.base_url = base_url
        self.model = ""
        self.events = JobEvents()

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

    def store_path(self, spec: JobSpec) -> Path:
        """Return the path of a job's image file."""
        return self._store.folder / spec.image_file

    def url(self, spec: JobSpec, *, source: bool = False) -> str:
        """Return the URL a job's image is served at (``source``: its init image's thumbnail)."""
        name = spec.source_file if source else spec.image_file
        signature = self._sign(name)
        url = f"{self.base_url}/images/{name}"
        return url if signature is None else f"{url}?sig={signature}"

    def job_event(self, job_id: str, event: str, **fields: Any) -> None:  # noqa: ANN401 - JSON values
        """Publish one event of a job on ``jobs/<id>`` (and to the web page's streams)."""
        body = {"id": job_id, "event": event, **fields}
        self._publish(self._topics.job(job_id), _json(body))
        self.events.publish(job_id, body)

    def error(
        self,
        job_id: str | None,
        code: ErrorCode,
        message: str,
        reply_to: str | None = None,
        correlation_data: bytes | None = None,
    ) -> None:
        """Publish an error reply to a request that never became a job."""
        payload = _json(error_body(job_id, code, message))
        topic = self._topics.result(job_id) if job_id is not None else self._topics.errors
        self._publish(topic, payload)
        if reply_to is not None:
            self._publish(reply_to, payload, correlation_data=correlation_data)

    def cancel_error(self, job_id: str | None, code: ErrorCode, message: str) -> None:
        """Publish the error of a cancel on ``<base>/errors``, with the job's id when known.

        Never on ``result/<id>``: that is the job's own answer, and a bad cancel does not end it.
        """
        self._publish(self._topics.errors, _json(error_body(job_id, code, message)))

    def reply(self, spec: JobSpec, body: dict[str, Any]) -> asyncio.Future[None] | None:
        """Publish a job's reply on ``result/<id>`` and the client's reply topic.

        Returns:
            A future the broker's acknowledgement of the ``result/<id>`` message resolves, or
            None when paho refused the message.
        """
        payload = _json(body)
        if spec.reply_to is not None:
            self._publish(spec.reply_to, payload, correlation_data=spec.correlation_data)
        if spec.fleet_result_topic is not None:
            self._publish(spec.fleet_result_topic, payload)
        try:
            return self._link.publish_confirmed(self._topics.result(spec.id), payload)
        except MqttError:
            log.exception("cannot publish the result of %s", spec.id)
            return None

    async def result(
        self,
        spec: JobSpec,
        finished: Finished,
        received: float,
        queue_wait: float,
        source: bytes | None = None,
    ) -> tuple[dict[str, Any], str]:
        """Store the image and build the job's result.

        Args:
            spec: The job.
            finished: The worker's image and timings.
            received: ``time.monotonic()`` when the request arrived.
            queue_wait: Seconds the job waited in the queue.
            source: A thumbnail of the picture an image-to-image job started from, kept beside
                its image for the gallery.

        Returns:
            The result body, and the image in base64.

        Raises:
            RequestError: The image cannot be written (``storage_full``, ``storage_error``) and
                the result cannot carry it either (a URL was asked for, or it is too large).
        """
        encoded = await asyncio.to_thread(lambda: base64.b64encode(finished.data).decode("ascii"))
        unsaved: str | None = None
        try:
            await asyncio.to_thread(self._store.save, spec.image_file, finished.data)
        except OSError as exc:
            sentence = self._storage.failed("the image", self._store.folder, exc)
            if not self._deliverable(spec, encoded):
                code = ErrorCode.STORAGE_FULL if is_full(exc) else ErrorCode.STORAGE_ERROR
                raise RequestError(code, sentence, job_id=spec.id) from exc
            unsaved = f"{sentence}; the image has no URL"
        else:
            self._storage.succeeded("the image")
        stages = finished.timings
        generation = stages["text_encoding"] + stages["denoising"] + stages["decoding"]
        latency = time.monotonic() - received
        body: dict[str, Any] = {
            "id": spec.id,
            "status": "ok",
            "prompt": spec.prompt,
            "negative_prompt": spec.negative_prompt,
            "seed": spec.seed,
            "width": spec.width,
            "height": spec.height,
            "steps": spec.steps_run,
            "guidance_scale": spec.guidance_scale,
            "mode": spec.mode,
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
            "image": self._image_field(spec, encoded, saved=unsaved is None),
        }
        if unsaved is not None:
            body["image"]["note"] = unsaved
        if spec.strength is not None:
            body["strength"] = spec.strength
            if source is not None and unsaved is None and await self._keep_source(spec, source):
                body["init_image"] = {"url": self.url(spec, source=True)}
        self._metrics.generation_seconds.labels(mode=spec.mode).observe(generation)
        if stages.get("prompt_cache_hit"):
            self._metrics.prompt_cache_hits.inc()
        for stage in ("text_encoding", "denoising", "decoding", "image_encoding"):
            self._metrics.stage_seconds.labels(stage=stage).observe(stages[stage])
        self._metrics.job_seconds.labels(mode=spec.mode).observe(latency)
        return body, encoded

    async def _keep_source(self, spec: JobSpec, source: bytes) -> bool:
        """Store the thumbnail of an image-to-image job's picture; a failure costs only that."""
        try:
            await asyncio.to_thread(self._store.save, spec.source_file, source)
        except OSError as exc:
            log.warning("the source thumbnail of %s was not stored: %s", spec.id, exc)
            return False
        return True

    def _deliverable(self, spec: JobSpec, encoded: str) -> bool:
        """Return whether the result itself can carry the image (no file needed)."""
        # JSON around the base64 adds well under 2 KiB; keep that much headroom.
        fits = len(encoded) + 2048 <= self._link.packet_limit
        return spec.output in ("b64", "both") and fits

    def _image_field(
        self, spec: JobSpec, encoded: str | None, *, saved: bool = True
    ) -> dict[str, Any]:
        image: dict[str, Any] = {"format": spec.format}
        wants_b64 = spec.output in ("b64", "both")
        if wants_b64 and encoded is not None:
            if self._deliverable(spec, encoded):
                image["b64"] = encoded
            else:
                image["note"] = TOO_LARGE_NOTE
        wants_url = spec.output in ("url", "both") or "note" in image
        if saved and (wants_url or (wants_b64 and encoded is None)):
            image["url"] = self.url(spec)
        return image

    def latest(self, spec: JobSpec, body: dict[str, Any], encoded: str) -> None:
        """Publish the retained latest-image topics (the URL only if the file was written)."""
        if len(encoded) <= self._link.packet_limit:
            self._publish(self._topics.image, encoded, retain=True)
        saved = "url" in body["image"] or "note" not in body["image"]
        if saved:
            self._publish(self._topics.image_url, self.url(spec), retain=True)
        attributes = {
            "id": spec.id,
            "prompt": spec.prompt,
            "seed": spec.seed,
            "width": spec.width,
            "height": spec.height,
            "steps": spec.steps_run,
            "format": spec.format,
            "latency_s": body["latency_s"],
            "url": self.url(spec) if saved else None,
        }
        self._publish(self._topics.image_attributes, _json(attributes), retain=True)

    @staticmethod
    def stored(body: dict[str, Any]) -> dict[str, Any]:
        """Return a reply as the journal keeps it: without the base64 (the file keeps that)."""
        if "image" not in body:
            return body
        image = {key: value for key, value in body["image"].items() if key != "b64"}
        return {**body, "image": image}

    async def restored(self, spec: JobSpec, stored: dict[str, Any]) -> dict[str, Any]:
        """Rebuild a stored reply, reading the base64 back from the image file if still there."""
        if stored.get("status") != "ok" or spec.output == "url":
            return stored
        path = self.store_path(spec)
        try:
            data = await asyncio.to_thread(path.read_bytes)
        except OSError:
            encoded = None  # pruned by retention: the URL is all that is left
        else:
            encoded = base64.b64encode(data).decode("ascii")
        return {**stored, "image": self._image_field(spec, encoded)}

    def observe_publishing(self, seconds: float) -> None:
        """Record the time spent storing and publishing a result."""
        self._metrics.stage_seconds.labels(stage="publishing").observe(seconds)
