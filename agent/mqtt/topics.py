"""Every MQTT topic the agent uses, built from one base, and the check on client reply topics."""

from __future__ import annotations

from dataclasses import dataclass

MAX_REPLY_TOPIC_CHARS = 256
"""Longest reply topic accepted: far above any real topic, far below the 64 KiB MQTT limit."""


@dataclass(frozen=True)
class Topics:
    """The topics under ``<base>`` (``<topic_prefix>/<node_id>``)."""

    base: str

    @property
    def generate(self) -> str:
        """Requests come in here."""
        return f"{self.base}/generate"

    @property
    def cancel(self) -> str:
        """Cancel requests come in here."""
        return f"{self.base}/cancel"

    @property
    def regenerate(self) -> str:
        """A press runs the last prompt again with a new seed (Home Assistant's button)."""
        return f"{self.base}/regenerate"

    @property
    def model_set(self) -> str:
        """A model's name here makes it the default (Home Assistant's select)."""
        return f"{self.base}/model/set"

    @property
    def models(self) -> str:
        """Retained JSON: the installed models and the default."""
        return f"{self.base}/models"

    @property
    def loras(self) -> str:
        """Retained JSON: the LoRA styles in the folder."""
        return f"{self.base}/loras"

    @property
    def availability(self) -> str:
        """Retained ``online`` / ``offline``; the last will."""
        return f"{self.base}/availability"

    @property
    def state(self) -> str:
        """Retained JSON state."""
        return f"{self.base}/state"

    @property
    def image(self) -> str:
        """Retained latest image as bare base64."""
        return f"{self.base}/image"

    @property
    def image_url(self) -> str:
        """Retained latest image URL."""
        return f"{self.base}/image/url"

    @property
    def image_attributes(self) -> str:
        """Retained JSON attributes of the latest image."""
        return f"{self.base}/image/attributes"

    @property
    def errors(self) -> str:
        """Replies to requests too broken to carry an id."""
        return f"{self.base}/errors"

    def job(self, job_id: str) -> str:
        """Events of one job."""
        return f"{self.base}/jobs/{job_id}"

    def result(self, job_id: str) -> str:
        """The result of one job."""
        return f"{self.base}/result/{job_id}"


def reply_topic_problem(topic: str, prefix: str) -> str | None:  # noqa: PLR0911 - one return per rule
    """Say what is wrong with a client's reply topic, or return None when it may be used.

    A reply topic is published to by the agent, so it must be a plain topic name (no wildcard,
    no ``$`` system topic, no control character) inside the allowed prefix.

    Args:
        topic: The topic the client asked the reply to go to.
        prefix: Allowed start of reply topics; empty allows any.

    Returns:
        A sentence for the error reply, or None.
    """
    if not topic:
        return "reply topic is empty"
    if len(topic) > MAX_REPLY_TOPIC_CHARS:
        return f"reply topic is longer than {MAX_REPLY_TOPIC_CHARS} characters"
    if "+" in topic or "#" in topic:
        return "reply topic must not contain the wildcards + or #"
    if topic.startswith("$"):
        return "reply topic must not start with $"
    if any(ord(char) < 0x20 or 0x7F <= ord(char) < 0xA0 for char in topic):
        return "reply topic must not contain NUL or control characters"
    if not is_encodable(topic):
        return "reply topic is not valid Unicode"
    if prefix and not topic.startswith(prefix):
        return f"reply topic must start with {prefix}"
    return None


def is_encodable(text: str) -> bool:
    """Return whether ``text`` encodes to UTF-8 (JSON escapes can smuggle in lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
