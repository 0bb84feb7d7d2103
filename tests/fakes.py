"""Stand-ins for the two parts an in-process test must control: the broker link and the worker.

Everything else in these tests is the real thing (journal on SQLite, runner, admission, outbox,
image store, metrics registry). The same paths run end to end against a real mosquitto and the
real worker in the other test modules.
"""

from __future__ import annotations

import asyncio
import io
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from prometheus_client import CollectorRegistry

from agent.images import ImageStore
from agent.jobs.admission import REQUEST_OUTCOMES, Admission
from agent.jobs.init_images import InitImages
from agent.jobs.journal import Journal
from agent.jobs.outbox import Outbox
from agent.jobs.runner import Runner
from agent.machine.thermal import ThermalGuard
from agent.metrics import AgentMetrics
from agent.model.link import WorkerDiedError, WorkerStatus, WorkerUnavailableError
from agent.model.protocol import Failed, Finished, GenerateJob, Ready
from agent.mqtt.topics import Topics
from agent.settings import Settings


@dataclass
class Published:
    topic: str
    payload: str | bytes
    retain: bool
    correlation_data: bytes | None


@dataclass
class RecordingLink:
    """Records what the agent publishes and acknowledges; the broker 'acknowledges' at once."""

    published: list[Published] = field(default_factory=list)
    acks: list[int] = field(default_factory=list)
    packet_limit: int = 8_000_000
    connected: bool = True

    def publish(
        self, topic, payload, *, retain=False, qos=1, response_topic=None, correlation_data=None
    ) -> int:
        self.published.append(Published(topic, payload, retain, correlation_data))
        return len(self.published)

    def publish_confirmed(self, topic, payload, **properties) -> asyncio.Future[None]:
        self.publish(topic, payload, **properties)
        future = asyncio.get_running_loop().create_future()
        future.set_result(None)
        return future

    def ack(self, message) -> None:
        self.acks.append(message.mid)

    def topics(self) -> list[str]:
        return [message.topic for message in self.published]

    def on(self, topic: str) -> list[Published]:
        return [message for message in self.published if message.topic == topic]


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buffer, format="PNG")
    return buffer.getvalue()


READY = Ready("tiny", "cpu", "float32", "StableDiffusionXLPipeline", 0.1, 0.0, "float32", 0, 0)


class ScriptedWorker:
    """A worker whose every job ends as the test says: an image, a failure or a death.

    ``script`` holds one entry per run, consumed in order: "ok", "fail", "die"; when empty, "ok".
    ``gate``, when set, holds each run until the test releases it.
    """

    def __init__(self, script: list[str] | None = None, *, unavailable: str | None = None):
        self.script = list(script or [])
        self.unavailable = unavailable
        self.gate: asyncio.Event | None = None
        self.runs: list[GenerateJob] = []
        self.cancelled = 0
        self.status = WorkerStatus.READY

    async def wait_ready(self) -> Ready:
        if self.unavailable is not None:
            raise WorkerUnavailableError(self.unavailable)
        return READY

    async def run(self, job: GenerateJob, on_progress) -> Finished | Failed:
        self.runs.append(job)
        on_progress(1, job.steps)
        if self.gate is not None:
            await self.gate.wait()
        outcome = self.script.pop(0) if self.script else "ok"
        if outcome == "die":
            raise WorkerDiedError("the worker process died during the job (exit code -9)")
        if outcome == "fail":
            return Failed(job.id, "RuntimeError: boom")
        timings = {
            "text_encoding": 0.1,
            "denoising": 0.2,
            "decoding": 0.05,
            "image_encoding": 0.01,
            "prompt_cache_hit": 0.0,
        }
        return Finished(job.id, png(), timings)

    def cancel(self) -> None:
        self.cancelled += 1


@dataclass
class Jobs:
    """The job side of an agent, in this process: admission, journal, runner, outbox."""

    settings: Settings
    registry: CollectorRegistry
    metrics: AgentMetrics
    link: RecordingLink
    topics: Topics
    journal: Journal
    outbox: Outbox
    worker: ScriptedWorker
    runner: Runner
    admission: Admission
    tasks: list[asyncio.Task[None]]

    def sample(self, name: str, **labels: str) -> float:
        value = self.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.journal.close()


def build_jobs(folder: Path, worker: ScriptedWorker | None = None, **overrides) -> Jobs:
    """Build the job side on the running loop, with a recording link; its tasks run."""
    settings = Settings(node_id="test", state_dir=folder, **overrides)
    registry = CollectorRegistry()
    metrics = AgentMetrics(registry, str(folder / "no-thermal-zone"), "edgeai-no-vcgencmd")
    metrics.prime(list(REQUEST_OUTCOMES))
    link = RecordingLink()
    topics = Topics(settings.base_topic)
    journal = Journal(settings.journal_path)
    store = ImageStore(settings.images_path, 10, 10_000_000)
    outbox = Outbox(link, topics, store, metrics, "http://agent.test")  # type: ignore[arg-type]
    worker = worker or ScriptedWorker()
    guard = ThermalGuard(str(folder / "no-thermal-zone"), 80.0, 70.0, 1.0, lambda: None)
    init_images = InitImages(settings.init_images_path, settings)
    runner = Runner(
        worker=worker,
        outbox=outbox,
        journal=journal,
        guard=guard,  # type: ignore[arg-type]
        metrics=metrics,
        max_attempts=settings.max_attempts,
        on_change=lambda: None,
        init_images=init_images,
    )
    admission = Admission(
        journal=journal,
        runner=runner,
        metrics=metrics,
        max_queue=settings.max_queue,
        on_change=lambda: None,
        init_images=init_images,
    )
    metrics.queue_depth.set_function(lambda: float(admission.queue_depth))
    tasks = [asyncio.create_task(admission.run()), asyncio.create_task(runner.run())]
    return Jobs(
        settings, registry, metrics, link, topics, journal, outbox, worker, runner, admission, tasks
    )
