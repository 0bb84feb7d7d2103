"""What the agent does with each message it receives: one table from topic to handler.

Every handler is given the message and its :class:`~agent.mqtt.link.Acknowledgement`, which
acknowledges it to the broker once, whatever path gets there first: a request is acknowledged
when its journal row is committed (or when it is refused), everything else once handled, and a
handler that raises is answered with ``internal_error`` and still acknowledged exactly once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import secrets
import time
import uuid
from typing import TYPE_CHECKING, Any

from paho.mqtt.client import topic_matches_sub

from agent.jobs.errors import ErrorCode, RequestError
from agent.jobs.model_choice import ModelChoice
from agent.jobs.requests import MAX_SEED, parse_cancel, parse_generate, readable_id
from agent.mqtt.link import Acknowledgement

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine

    from agent.jobs.admission import Admission, Admitted
    from agent.jobs.outbox import Outbox
    from agent.jobs.requests import JobSpec
    from agent.mqtt.link import Inbound, MqttLink
    from agent.mqtt.topics import Topics
    from agent.settings import Settings

log = logging.getLogger(__name__)

MAX_MODEL_NAME_BYTES = 1000
"""A model name is at most 64 characters (a source, longer): the rest of a payload is not read."""


def request_fingerprint(message: Inbound) -> str:
    """Return a fingerprint of a request: a redelivery or a resend has the same one."""
    digest = hashlib.sha256(message.payload)
    digest.update(b"\0" + (message.response_topic or "").encode("utf-8", "replace"))
    digest.update(b"\0" + (message.correlation_data or b""))
    return str(digest.hexdigest())


class Background:
    """Coroutines run beside the handlers, referenced until they are done."""

    def __init__(self) -> None:
        """Start with none."""
        self._tasks: set[asyncio.Task[None]] = set()

    def spawn(self, coroutine: Coroutine[Any, Any, None], name: str) -> None:
        """Run ``coroutine`` in the background."""
        task = asyncio.create_task(coroutine, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


class Requests:
    """Admits MQTT requests and answers refusals on the contract's topics."""

    def __init__(
        self,
        *,
        settings: Settings,
        admission: Admission,
        outbox: Outbox,
        choice: ModelChoice | None = None,
    ) -> None:
        """Create the request side of the routes; ``choice``: the models and LoRA styles."""
        self.settings = settings
        self.admission = admission
        self.outbox = outbox
        self.choice = choice or ModelChoice.of(settings)

    def admit(
        self,
        message: Inbound,
        ack: Acknowledgement,
        parse: Callable[[], JobSpec],
        *,
        api: str,
        on_refused: Callable[[RequestError], None] | None = None,
    ) -> None:
        """Offer a request to admission; answer a refusal; acknowledge once it is settled."""
        expires_at = time.time() + message.expiry_s if message.expiry_s else None
        settled = self.admission.offer(
            parse, fingerprint=request_fingerprint(message), api=api, expires_at=expires_at
        )

        def done(future: asyncio.Future[Admitted]) -> None:
            try:
                error = future.exception()
                if isinstance(error, RequestError):
                    self.reply_refusal(error, message)
                    if on_refused is not None:
                        on_refused(error)
            finally:
                ack()

        settled.add_done_callback(done)

    def parse(self, message: Inbound, **fields: Any) -> JobSpec:  # noqa: ANN401 - JobSpec fields
        """Parse a request's payload with its MQTT 5 properties; ``fields`` override the job's."""
        spec = parse_generate(
            message.payload,
            self.settings,
            response_topic=message.response_topic,
            correlation_data=message.correlation_data,
            choice=self.choice,
        )
        return dataclasses.replace(spec, **fields) if fields else spec

    def refuse(self, error: RequestError, message: Inbound, api: str) -> None:
        """Count and answer a request refused before it reached admission."""
        self.admission.refuse(error, api)
        self.reply_refusal(error, message)

    def reply_refusal(self, error: RequestError, message: Inbound) -> None:
        """Publish a refusal's error reply where the request can be traced back to."""
        log.info("refused a request: %s: %s", error.code.value, error.message)
        self.outbox.error(
            error.job_id, error.code, error.message, error.reply_to, message.correlation_data
        )

    def refuse_retained(self, message: Inbound, api: str) -> None:
        """Refuse a request published with the retain flag (it would run at every reconnect)."""
        if not message.payload:
            return  # a client clearing a retained message: nothing to answer
        error = RequestError(
            ErrorCode.RETAINED_REQUEST,
            "requests must not be retained (they would run again at every reconnect)",
            job_id=readable_id(message.payload, self.settings.max_payload_bytes),
        )
        self.refuse(error, message, api)


class MqttRoutes:
    """The agent's own topics and what each one does."""

    def __init__(  # noqa: PLR0913 - the parts the inbound topics reach
        self,
        *,
        settings: Settings,
        topics: Topics,
        link: MqttLink,
        requests: Requests,
        announce: Callable[[], None],
        background: Background,
    ) -> None:
        """Create the routes; :attr:`table` maps each subscribed topic to its handler."""
        self._settings = settings
        self._link = link
        self._requests = requests
        self._announce = announce
        self._background = background
        self.table: dict[str, Callable[[Inbound, Acknowledgement], None]] = {
            topics.generate: self.generate,
            topics.regenerate: self.regenerate,
            topics.cancel: self.cancel,
            topics.model_set: self.set_model,
            f"{settings.discovery_prefix}/status": self.home_assistant_status,
        }
        self.watched: dict[str, Callable[[Inbound], None]] = {}
        """Topic filters whose retained messages are wanted too (other agents' state), and who
        reads them."""

    def watch(self, filters: list[str], reader: Callable[[Inbound], None]) -> None:
        """Hand messages on these filters (retained ones included) to ``reader``."""
        for topic_filter in filters:
            self.watched[topic_filter] = reader

    def on_message(self, message: Inbound) -> None:
        """Route one message; a bug still answers it, and it is acknowledged exactly once."""
        ack = Acknowledgement(self._link, message)
        try:
            handler = self.table.get(message.topic)
            if handler is None:
                for topic_filter, reader in self.watched.items():
                    if topic_matches_sub(topic_filter, message.topic):
                        reader(message)
                ack()
                return
            handler(message, ack)
        except Exception as exc:  # a message must never go unanswered, even on a bug
            log.exception("unexpected error while handling a message on %s", message.topic)
            error = RequestError(ErrorCode.INTERNAL_ERROR, f"internal error: {exc}")
            self._requests.reply_refusal(error, message)
            ack()

    def generate(self, message: Inbound, ack: Acknowledgement) -> None:
        """``<base>/generate``: a request (JSON or a bare prompt)."""
        if message.retain:
            self._requests.refuse_retained(message, "mqtt")
            ack()
            return
        self._requests.admit(message, ack, lambda: self._requests.parse(message), api="mqtt")

    def regenerate(self, message: Inbound, ack: Acknowledgement) -> None:
        """``<base>/regenerate``: the last prompt again, a new seed (Home Assistant's button)."""
        if message.retain:
            self._requests.refuse_retained(message, "mqtt")
            ack()
            return
        last = self._requests.admission.last_spec
        if last is None:
            error = RequestError(ErrorCode.NO_PROMPT, "no prompt has been sent yet")
            self._requests.refuse(error, message, "mqtt")
            ack()
            return
        if last.strength is not None and last.init_source is None:
            error = RequestError(
                ErrorCode.NO_PROMPT,
                "the last request started from a picture the agent no longer keeps; send it again",
                mode="img2img",
            )
            self._requests.refuse(error, message, "mqtt")
            ack()
            return
        again = dataclasses.replace(
            last,
            id=uuid.uuid4().hex,
            seed=secrets.randbelow(MAX_SEED + 1),
            reply_to=None,
            correlation_data=None,
            fleet_result_topic=None,
            init_image="",  # its picture is stored anew for the new job
        )
        self._requests.admit(message, ack, lambda: again, api="mqtt")

    def set_model(self, message: Inbound, ack: Acknowledgement) -> None:
        """``<base>/model/set``: an installed model's name becomes the default (the select)."""
        wanted = message.payload[:MAX_MODEL_NAME_BYTES].decode("utf-8", "replace").strip()
        if self._requests.choice.catalog.choose(wanted) is None:
            names = ", ".join(self._requests.choice.catalog.names)
            error = RequestError(
                ErrorCode.UNKNOWN_MODEL,
                f"no model {wanted[:64]!r} is installed; installed: {names}",
                field="model",
            )
            self._requests.refuse(error, message, "mqtt")
        ack()

    def cancel(self, message: Inbound, ack: Acknowledgement) -> None:
        """``<base>/cancel``: ``{"id": ...}`` of a queued or running job.

        Refused when retained, like a request: a retained cancel would cancel that id again
        at every reconnect, a later job of the same id included.
        """
        try:
            job_id = self._cancelled_id(message)
        except RequestError as exc:
            self._requests.admission.refuse(exc, "mqtt")
            self._requests.outbox.cancel_error(exc.job_id, exc.code, exc.message)
        else:
            if job_id is not None:
                self._background.spawn(self._cancel(job_id), f"cancel-{job_id}")
        finally:
            ack()

    def _cancelled_id(self, message: Inbound) -> str | None:
        """Return the id a cancel names; None for an empty retained message (a clearing).

        Raises:
            RequestError: The cancel is retained or malformed; the id in it, if readable.
        """
        limit = self._settings.max_payload_bytes
        if not message.retain:
            return parse_cancel(message.payload, limit)
        if not message.payload:
            return None
        raise RequestError(
            ErrorCode.RETAINED_REQUEST,
            "cancels must not be retained (they would apply again at every reconnect)",
            job_id=readable_id(message.payload, limit),
        )

    async def _cancel(self, job_id: str) -> None:
        if not await self._requests.admission.cancel(job_id):
            self._requests.outbox.cancel_error(
                job_id, ErrorCode.UNKNOWN_JOB, f"no queued or running job has the id {job_id}"
            )

    def home_assistant_status(self, message: Inbound, ack: Acknowledgement) -> None:
        """``homeassistant/status``: ``online`` after a restart, so discovery is sent again."""
        try:
            if message.payload == b"online":
                self._announce()
        finally:
            ack()
