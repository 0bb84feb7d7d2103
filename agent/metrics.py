"""Every Prometheus metric of the agent, defined here and nowhere else (prefix ``edgeai_``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Enum, Gauge, Histogram, Info
from prometheus_client.core import GaugeMetricFamily

from agent.machine import thermal

if TYPE_CHECKING:
    from collections.abc import Iterator

    from prometheus_client.metrics_core import Metric

# A Pi 5 takes tens of seconds to minutes per SDXL-Turbo image; a GPU well under one second.
LATENCY_BUCKETS = (0.25, 0.5, 1, 2, 5, 10, 20, 30, 45, 60, 90, 120, 180, 300, 450, 600)
# Stages range from milliseconds (image encoding) to minutes (denoising on a Pi).
STAGE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)

STATES = ("loading", "idle", "generating", "cooling", "error")
STAGES = (
    "queue_wait",
    "text_encoding",
    "denoising",
    "decoding",
    "image_encoding",
    "publishing",
)


HTTP_REFUSALS = (
    "malformed",
    "unauthorized",
    "cross_site",
    "unsupported_media_type",
    "payload_too_large",
    "body_timeout",
    "unknown_host",
    "too_many_connections",
    "too_many_streams",
)
"""Why the HTTP server refuses a request before its handler (400, 401, 403, 415, 413, 408, 421
for a name not the agent's), or a connection or event stream over its cap (503)."""
MODES = ("txt2img", "img2img")
"""The ``mode`` label: text-to-image, or image-to-image (a request with an init image)."""


class HardwareCollector:
    """Reads temperature and throttling flags at scrape time, so values are never stale."""

    def __init__(self, thermal_glob: str, vcgencmd: str) -> None:
        """Create the collector.

        Args:
            thermal_glob: Files holding temperatures in millidegrees Celsius.
            vcgencmd: The vcgencmd command, for throttling flags.
        """
        self._thermal_glob = thermal_glob
        self._vcgencmd = vcgencmd

    def collect(self) -> Iterator[Metric]:
        """Yield the SoC temperature and, where vcgencmd exists, the throttling flags."""
        temperature = thermal.read_temperature_c(self._thermal_glob)
        if temperature is not None:
            yield GaugeMetricFamily(
                "edgeai_soc_temperature_celsius",
                "Hottest SoC thermal zone, in degrees Celsius.",
                value=temperature,
            )
        bits = thermal.read_throttled(self._vcgencmd)
        if bits is None:
            return
        for metric, help_text, flags in (
            (
                "edgeai_throttled",
                "1 while the firmware reports this throttling condition (vcgencmd get_throttled).",
                thermal.flags_now(bits),
            ),
            (
                "edgeai_throttled_since_boot",
                "1 if the firmware reported this throttling condition since boot.",
                thermal.flags_since_boot(bits),
            ),
        ):
            family = GaugeMetricFamily(metric, help_text, labels=["flag"])
            for name, active in flags.items():
                family.add_metric([name], float(active))
            yield family


class AgentMetrics:
    """The agent's metrics, registered on one registry (a fresh one per agent in tests)."""

    def __init__(
        self,
        registry: CollectorRegistry,
        thermal_glob: str = "/sys/class/thermal/thermal_zone*/temp",
        vcgencmd: str = "vcgencmd",
    ) -> None:
        """Create and register every metric.

        Args:
            registry: Where the metrics are registered.
            thermal_glob: Temperature files, read at scrape time.
            vcgencmd: Command for throttling flags, run at scrape time where it exists.
        """
        self.registry = registry
        self.generation_seconds = Histogram(
            "edgeai_generation_seconds",
            "Time the model took for one image: text encoding, denoising and decoding; by mode "
            "(txt2img, img2img).",
            ["mode"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.job_seconds = Histogram(
            "edgeai_job_seconds",
            "Time from receiving a request to publishing its result; by mode (txt2img, img2img).",
            ["mode"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.stage_seconds = Histogram(
            "edgeai_stage_seconds",
            "Time per stage of a job.",
            ["stage"],
            buckets=STAGE_BUCKETS,
            registry=registry,
        )
        self.queue_wait_seconds = Histogram(
            "edgeai_queue_wait_seconds",
            "Time a job waited in the queue before it started.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.queue_depth = Gauge(
            "edgeai_queue_depth",
            "Jobs waiting to run (the running one excluded): the state topic's queue_depth.",
            registry=registry,
        )
        self.requests = Counter(
            "edgeai_requests",
            "Requests received, by outcome (accepted, or the error code they were refused with) "
            "and mode (txt2img, or img2img for a request with an init image).",
            ["outcome", "mode"],
            registry=registry,
        )
        self.api_requests = Counter(
            "edgeai_api_requests",
            "Requests received per entry point (mqtt, fleet, web, openai, a1111), by outcome.",
            ["api", "outcome"],
            registry=registry,
        )
        self.http_refusals = Counter(
            "edgeai_http_refusals",
            "HTTP requests refused before their handler, by reason: "
            + ", ".join(HTTP_REFUSALS)
            + ".",
            ["reason"],
            registry=registry,
        )
        self.jobs = Counter(
            "edgeai_jobs",
            "Jobs finished, by status: done, failed or cancelled.",
            ["status"],
            registry=registry,
        )
        self.model_load_seconds = Gauge(
            "edgeai_model_load_seconds",
            "Time the worker took to load the model, last load.",
            registry=registry,
        )
        self.warmup_seconds = Gauge(
            "edgeai_model_warmup_seconds",
            "Time the warm-up generation took at the last load.",
            registry=registry,
        )
        self.warmups = Counter(
            "edgeai_model_warmups",
            "Warm-up generations run (one per model load).",
            registry=registry,
        )
        self.prompt_cache_hits = Counter(
            "edgeai_prompt_cache_hits",
            "Jobs whose prompt embeddings came from the cache (text encoders skipped).",
            registry=registry,
        )
        self.model = Info(
            "edgeai_model", "The model, device and precision in use.", registry=registry
        )
        self.mqtt_connected = Gauge(
            "edgeai_mqtt_connected", "1 while connected to the MQTT broker.", registry=registry
        )
        self.worker_restarts = Counter(
            "edgeai_worker_restarts",
            "Times the generation worker process died and was started again.",
            registry=registry,
        )
        self.model_load_failures = Counter(
            "edgeai_model_load_failures",
            "Model loads that failed: raised, or the worker died while loading (out of memory).",
            registry=registry,
        )
        self.model_switches = Counter(
            "edgeai_model_switches",
            "Switches of the resident model a request asked for, by model and outcome (ok, "
            "failed).",
            ["model", "outcome"],
            registry=registry,
        )
        self.model_switch_seconds = Histogram(
            "edgeai_model_switch_seconds",
            "Time from a switch's start (the old model unloading) to the new one being ready.",
            buckets=(1, 2.5, 5, 10, 20, 40, 60, 120, 240, 480),
            registry=registry,
        )
        self.free_bytes = Gauge(
            "edgeai_free_bytes",
            "Free space on the file system of a folder the agent writes to (state, images).",
            ["folder"],
            registry=registry,
        )
        self.memory_limit_bytes = Gauge(
            "edgeai_memory_limit_bytes",
            "Memory this agent may use: its cgroup's limit, else physical memory.",
            registry=registry,
        )
        self.worker_peak_bytes = Gauge(
            "edgeai_worker_peak_memory_bytes",
            "Peak resident memory of the generation worker (the current one, or the last).",
            registry=registry,
        )
        self.weight_bytes = Gauge(
            "edgeai_model_weight_bytes",
            "Bytes of model weights by where they live: mapped (file-backed pages of the "
            "checkpoint, which the kernel may drop and read again) or copied (the worker's own).",
            ["residence"],
            registry=registry,
        )
        self.fleet_passed_back = Counter(
            "edgeai_fleet_passed_back",
            "Fleet jobs this agent passed back to the fleet because it was busy.",
            registry=registry,
        )
        self.state = Enum(
            "edgeai_state", "What the agent is doing.", states=list(STATES), registry=registry
        )
        registry.register(HardwareCollector(thermal_glob, vcgencmd))

    def prime(self, outcomes: list[str]) -> None:
        """Create every labelled series at zero so dashboards and rate() see them from the start."""
        for mode in MODES:
            for outcome in outcomes:
                self.requests.labels(outcome=outcome, mode=mode)
            self.generation_seconds.labels(mode=mode)
            self.job_seconds.labels(mode=mode)
        for status in ("done", "failed", "cancelled"):
            self.jobs.labels(status=status)
        for reason in HTTP_REFUSALS:
            self.http_refusals.labels(reason=reason)
        for stage in STAGES:
            self.stage_seconds.labels(stage=stage)
