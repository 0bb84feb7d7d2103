"""The benchmark: the agent as a user runs it, against plain diffusers and the CPU's own limit.

Each agent case starts the real agent (``python -m agent``, settings from the environment, a
mosquitto broker from the project's config) on SDXL-Turbo's real architecture with random
weights, sends requests over MQTT one after another (512x512, 1 step, a new prompt each) and
times each result's arrival. Plain diffusers runs in a fresh process of its own. A shared machine
is noisy, so the run is built to see through it:

- the cases are interleaved: every round runs each case once, in a rotated order;
- every round first measures this CPU's float32 and bfloat16 matrix-multiply rates, and each
  sample is reported as a share of the matching rate measured the same minute;
- min and median over every round (at least 5 by default).

Cases with a memory limit run the agent, daemon and worker, inside a memory cgroup of that size
(the model's files are evicted from the page cache first, so their pages are charged there), and
report the cgroup's anonymous and file-backed memory, page-ins, and worker restarts.

    scripts/bench                                  # the default cases, 5 rounds
    scripts/bench --cases c,e,e7,e4 --rounds 5     # a subset
    scripts/bench --cases list                     # every case
    scripts/bench --json run.json                  # also save it; --report run.json reprints
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

import chart  # noqa: E402
import machine  # noqa: E402
from pipeline import (  # noqa: E402
    LORAS,
    MODEL,
    PROMPT,
    SD_TURBO,
    TAESDXL,
    build_missing,
    case_in_fresh_process,
)

from tests import cgroups  # noqa: E402
from tests.conftest import AgentProcess, Broker, start_broker  # noqa: E402

GIB = 2**30
PI_PATH = {"EDGEAI_DTYPE": "float32", "EDGEAI_HALF_WEIGHTS": "on", "EDGEAI_WEIGHT_FORM": "float16"}
"""The Pi path as it was before the integer forms: float16 weights whatever the memory."""
PI_AUTO = {**PI_PATH, "EDGEAI_WEIGHT_FORM": "auto"}
"""The Pi path as it installs: the weights' form chosen by the memory limit."""
AVX2_ONLY = {
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
}
"""An AVX2-only CPU (the Intel N100 class, Ryzen before Zen 4) stood in for by this one: oneDNN,
torch's own kernels and MKL held to AVX2. oneDNN then withholds bfloat16, so the agent's auto
reads a CPU without it, as on such a machine."""
AVX2_RATE = "float32-avx2"
"""The float32 matrix rate measured under :data:`AVX2_ONLY`: what the stand-in's cases are a
share of."""


@dataclasses.dataclass(frozen=True)
class Case:
    """One way of producing the image, measured the same way as every other."""

    title: str
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    precision: str = "auto"
    """The matrix rate it is a share of: float32, bfloat16, or auto (this CPU's default)."""
    limit_gib: float | None = None
    plain: bool = False
    """Plain diffusers in a fresh process (pipeline.py), not the agent."""
    base: str | None = None
    """The case this one changes (a lever, a memory limit), compared with it round by round."""
    restyle: bool = False
    """Image-to-image: each request starts from the same 512x512 JPEG, strength 0.5, 2 steps
    (one UNet evaluation, as text-to-image's 1 step)."""
    model: str = "sdxl-turbo"
    """The model: ``sdxl-turbo`` or ``sd-turbo`` (its architecture, random weights)."""
    lora: bool = False
    """Every request applies a rank-16 LoRA style (loaded at the first, kept after)."""
    alternate: bool = False
    """Both models installed, each request naming the other one: every job a switch."""

    def model_env(self) -> dict[str, str]:
        """Return the settings that install the case's model(s) and LoRA folder."""
        env = {"EDGEAI_MODEL": str(SD_TURBO if self.model == "sd-turbo" else MODEL)}
        if self.alternate:
            models = {"sdxl-turbo": str(MODEL), "sd-turbo": str(SD_TURBO)}
            env["EDGEAI_MODELS"] = json.dumps(models)
        if self.lora:
            env["EDGEAI_LORA_DIR"] = str(LORAS)
        return env

    def request_fields(self, index: int) -> dict[str, object]:
        """Return what request ``index`` adds: its model, its LoRA, its picture."""
        fields: dict[str, object] = {}
        if self.alternate:
            fields["model"] = ("sd-turbo", "sdxl-turbo")[index % 2]
        if self.lora:
            fields["loras"] = [{"name": "style-sdxl", "weight": 0.8}]
        if self.restyle:
            fields.update(init_image=restyled_picture(index), **RESTYLE)
        return fields


RESTYLE = {"strength": 0.5, "steps": 2}


def restyled_picture(index: int) -> str:
    """Return a 512x512 camera-like JPEG (smooth shapes and a little noise), as base64.

    A new picture for each request (``index``), as each doorbell snapshot is: the agent's
    cache of encoded pictures must not flatter the figures.
    """
    import base64  # noqa: PLC0415
    import io  # noqa: PLC0415

    from PIL import Image, ImageDraw, ImageFilter  # noqa: PLC0415

    picture = Image.linear_gradient("L").resize((512, 512)).convert("RGB")
    draw = ImageDraw.Draw(picture)
    draw.rectangle((120 + index * 7, 200, 300, 500), fill=(150, 90, 60))
    draw.ellipse((320, 60, 460, 200), fill=(240, 220, 120))
    noisy = Image.blend(picture, Image.effect_noise((512, 512), 40).convert("RGB"), 0.15)
    buffer = io.BytesIO()
    noisy.filter(ImageFilter.SMOOTH).save(buffer, format="JPEG", quality=90)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


CASES = {
    "b": Case(
        "plain diffusers: float32, 512x512, 1 step, guidance 0", plain=True, precision="float32"
    ),
    "c": Case("the agent, default settings"),
    "d": Case(
        "the agent forced to float32 (float32 weights)",
        {"EDGEAI_DTYPE": "float32", "EDGEAI_HALF_WEIGHTS": "off"},
        "float32",
    ),
    "e": Case("the Pi path: float32 compute, float16 weights", PI_PATH, "float32"),
    "e7": Case("the Pi path in a 7 GiB cgroup (an 8 GB Pi)", PI_PATH, "float32", 7, base="e"),
    "e4": Case("the Pi path in a 4 GiB cgroup (a 4 GB Pi)", PI_PATH, "float32", 4, base="e"),
    "ci": Case("image-to-image, default settings (strength 0.5, 2 steps)", restyle=True, base="c"),
    "ei": Case(
        "image-to-image, the Pi path (strength 0.5, 2 steps)",
        PI_PATH,
        "float32",
        base="e",
        restyle=True,
    ),
    "ei4": Case(
        "image-to-image, the Pi path in a 4 GiB cgroup",
        PI_PATH,
        "float32",
        4,
        base="e4",
        restyle=True,
    ),
    "q8": Case(
        "the Pi path, int8 weights (no limit)",
        {**PI_PATH, "EDGEAI_WEIGHT_FORM": "int8"},
        "float32",
        base="e",
    ),
    "q4": Case(
        "the Pi path, int4 weights (no limit)",
        {**PI_PATH, "EDGEAI_WEIGHT_FORM": "int4"},
        "float32",
        base="e",
    ),
    "a": Case("the Pi path as installed, no limit (auto: float16)", PI_AUTO, "float32", base="e"),
    "a7": Case(
        "the Pi path as installed, 7 GiB cgroup (auto: int8)", PI_AUTO, "float32", 7, base="e7"
    ),
    "a4": Case(
        "the Pi path as installed, 4 GiB cgroup (auto: int4)", PI_AUTO, "float32", 4, base="e"
    ),
    "a2": Case(
        "the Pi path as installed, 2 GiB cgroup (auto: int4)", PI_AUTO, "float32", 2, base="e"
    ),
    "x": Case(
        "an AVX2-only CPU (N100 class) stood in for, default settings (auto: float32)",
        AVX2_ONLY,
        AVX2_RATE,
        base="c",
    ),
}
JEMALLOC = {"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"}
TCMALLOC = {"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"}
GLIBC_TUNED = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "68719476736"}
LEVERS = {
    # The default path without one of its own levers: below 1 against (c), the lever pays.
    "cu": Case(
        "lever off: default settings, weights not packed for oneDNN",
        {"EDGEAI_PACKED_WEIGHTS": "false"},
        base="c",
    ),
    "cw": Case(
        "lever off: default settings, the warm-up at 256x256, not the default size",
        {"EDGEAI_WARMUP_AT_DEFAULT_SIZE": "off"},
        base="c",
    ),
    "cf": Case(
        "lever off: default settings, the decoder's ReLUs and sums not fused",
        {"EDGEAI_FUSED_DECODER": "false"},
        base="c",
    ),
    "ef": Case(
        "lever off: the Pi path, the decoder's ReLUs and sums not fused",
        {**PI_PATH, "EDGEAI_FUSED_DECODER": "false"},
        "float32",
        base="e",
    ),
    "xf": Case(
        "lever off: the AVX2-only stand-in, the decoder's ReLUs and sums not fused",
        {**AVX2_ONLY, "EDGEAI_FUSED_DECODER": "false"},
        AVX2_RATE,
        base="x",
    ),
    "cj": Case("lever: default settings, jemalloc", JEMALLOC, base="c"),
    "ct": Case("lever: default settings, tcmalloc", TCMALLOC, base="c"),
    "cg": Case("lever: default settings, glibc never trims", GLIBC_TUNED, base="c"),
    "ej": Case("lever: the Pi path, jemalloc", {**PI_PATH, **JEMALLOC}, "float32", base="e"),
    "et": Case("lever: the Pi path, tcmalloc", {**PI_PATH, **TCMALLOC}, "float32", base="e"),
    "eg": Case(
        "lever: the Pi path, glibc never trims", {**PI_PATH, **GLIBC_TUNED}, "float32", base="e"
    ),
    # What EDGEAI_DTYPE=auto picks on a CPU without bfloat16 where the probe finds float16
    # faster; measured against the float32 rate, as the Pi path is.
    "eh": Case(
        "lever: the Pi path computing in float16 (float16 weights, no upcast)",
        {"EDGEAI_DTYPE": "float16"},
        "float32",
        base="e",
    ),
}
"""Levers compared against c and e in the same interleaved run (allocators: Debian's
libjemalloc2 and libtcmalloc-minimal4, preloaded into the agent and its worker)."""
CASES.update(LEVERS)
# Which model for which Pi: SD-Turbo against SDXL-Turbo on each path, a LoRA's cost, and a
# switch between the two under a 4 GB Pi's memory.
CASES.update(
    {
        "s": Case("SD-Turbo, default settings", model="sd-turbo", base="c"),
        "se": Case(
            "SD-Turbo, the Pi path: float32, float16 weights",
            PI_PATH,
            "float32",
            model="sd-turbo",
            base="e",
        ),
        "s4": Case(
            "SD-Turbo, the Pi path as installed in a 4 GiB cgroup",
            PI_AUTO,
            "float32",
            4,
            model="sd-turbo",
            base="a4",
        ),
        "s2": Case(
            "SD-Turbo, the Pi path as installed in a 2 GiB cgroup",
            PI_AUTO,
            "float32",
            2,
            model="sd-turbo",
            base="a2",
        ),
        "cl": Case("a LoRA style (rank 16), default settings", lora=True, base="c"),
        "el": Case("a LoRA style, the Pi path", PI_PATH, "float32", lora=True, base="e"),
        "w4": Case(
            "SDXL-Turbo and SD-Turbo in turn, a switch before each job, 4 GiB (a 4 GB Pi)",
            PI_AUTO,
            "float32",
            4,
            alternate=True,
        ),
    }
)
DEFAULT_CASES = "b,c,cu,cf,cw,d,e,e7,e4,a,a7,a4,a2"


@dataclasses.dataclass
class Sample:
    """One round of one case."""

    rates: dict[str, float]
    latencies: list[float]
    """Seconds from publishing each request to receiving its result (the first one first)."""
    stages: dict[str, float] = dataclasses.field(default_factory=dict)
    """Median seconds per stage, as the results report them."""
    memory: dict[str, float] = dataclasses.field(default_factory=dict)
    load_s: float = 0.0
    job_stages: list[dict[str, float]] = dataclasses.field(default_factory=list)
    """Each job's seconds per stage, as its result reports them: where a first job's time goes."""
    read_gb: list[float] = dataclasses.field(default_factory=list)
    """GB the worker read from storage during each job with a new prompt."""
    repeat_read_gb: float | None = None
    """GB it read during one more job repeating the last prompt (the text encoders skipped)."""
    weights_gb: float = 0.0
    """GB of integer weights on disk after the run (written at the case's first start)."""


def evict_model_files(*folders: Path) -> None:
    """Drop the model's files from the page cache, so a cgroup pays for reading them.

    Args:
        folders: More folders to evict: the integer weights written by an earlier round, whose
            pages went to the parent cgroup when that round's cgroup was removed.
    """
    for path in (
        *MODEL.rglob("*"),
        *TAESDXL.rglob("*"),
        *SD_TURBO.rglob("*"),
        *LORAS.rglob("*"),
        *(p for f in folders for p in f.rglob("*")),
    ):
        if path.is_file():
            descriptor = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(descriptor)


def proc_values(pid: int) -> dict[str, float]:
    """Return a process's memory (GiB) and the bytes it has read from storage (GB)."""
    values: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "RssAnon", "RssFile"):
            values[key] = int(value.split()[0]) * 1024 / GIB
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        key, _, value = line.partition(":")
        if key == "read_bytes":
            values["read_gb"] = int(value) / 1e9
    return values


def worker_pid(agent: AgentProcess) -> int:
    """Return the pid of the agent's worker now (a model switch starts another)."""
    return int(json.loads(agent.http_get("/healthz")[2])["worker_pid"])


def run_agent(case: Case, broker: Broker, folder: Path, jobs: int, label: str) -> Sample:
    """Start the agent with the case's settings, send ``jobs`` requests, measure, stop it."""
    # SD-Turbo decodes with the same random tiny decoder: TAESD's architecture is TAESDXL's.
    env = {"EDGEAI_TORCH_THREADS": "0", "EDGEAI_TINY_VAE": str(TAESDXL), **case.model_env()}
    env.update(case.env)
    agent = AgentProcess(broker, MODEL, folder, env)
    cgroup = None
    if case.limit_gib is not None:
        cgroup = cgroups.create(int(case.limit_gib * GIB), "edgeai-bench")
        evict_model_files(folder / "weights")
        agent.cgroup = cgroup
    client = broker.client()
    try:
        begun = time.monotonic()
        agent.start(wait=False)
        agent.wait_state("idle", timeout=900)
        load_s = time.monotonic() - begun
        pid = worker_pid(agent)
        before = proc_values(pid)
        reads: list[float] = []
        repeat_read = None
        client.subscribe(f"{agent.base}/result/+")
        latencies, results = [], []
        prompts = [f"{PROMPT}, {label} {index}" for index in range(jobs)]
        for index, prompt in enumerate([*prompts, prompts[-1]]):
            job_id = uuid.uuid4().hex[:12]
            request = {
                "id": job_id,
                "prompt": prompt,
                "seed": index,
                "output": "url",
                **case.request_fields(index),
            }
            read_before = proc_values(pid)["read_gb"]
            sent = time.monotonic()
            client.publish(f"{agent.base}/generate", json.dumps(request))
            result = client.wait_for(f"{agent.base}/result/{job_id}", timeout=900).json()
            latency = time.monotonic() - sent
            if case.alternate:  # a switch started another worker: its reads are its load's
                pid, before, read = worker_pid(agent), proc_values(worker_pid(agent)), 0.0
            else:
                read = proc_values(pid)["read_gb"] - read_before
            if result["status"] != "ok":
                raise SystemExit(f"{label}: job failed: {result}\n{agent.log()[-3000:]}")
            if index == jobs:  # the repeated prompt: measured apart
                repeat_read = read
                continue
            latencies.append(latency)
            reads.append(read)
            results.append(result["timings"])
        after = proc_values(pid)
        memory = {
            "peak_gib": after["VmHWM"],
            "anon_gib": after["RssAnon"],
            "file_gib": after["RssFile"],
            "page_ins_gb": after["read_gb"] - before["read_gb"],
            "restarts": agent.metric("edgeai_worker_restarts_total") or 0.0,
        }
        switches = [
            float(s) for s in re.findall(r"model switched: \S+ -> \S+ in ([\d.]+) s", agent.log())
        ]
        if switches:
            memory["switch_s"] = statistics.median(switches)
        if cgroup is not None:
            stat = cgroup.stat()
            memory["cgroup_anon_gib"] = stat.get("total_rss", stat.get("anon", 0)) / GIB
            memory["cgroup_file_gib"] = stat.get("total_cache", stat.get("file", 0)) / GIB
            memory["cgroup_peak_gib"] = (cgroup.peak() or 0) / GIB
            memory["oom_kills"] = float(cgroup.oom_kills())
        stages = {
            stage: statistics.median(timings[f"{stage}_s"] for timings in results)
            for stage in ("text_encoding", "denoising", "decoding", "encoding")
        }
        weights = sum(path.stat().st_size for path in (folder / "weights").glob("*.safetensors"))
        return Sample(
            {}, latencies, stages, memory, load_s, results, reads, repeat_read, weights / 1e9
        )
    finally:
        client.close()
        agent.stop()
        if cgroup is not None:
            cgroup.remove()


def run_plain(jobs: int) -> Sample:
    """Plain diffusers, float32, in a fresh process: one warm-up, then timed runs."""
    result = case_in_fresh_process(sys.executable, HERE / "pipeline.py", "b", repeats=jobs)
    stages = {
        "text_encoding": float(result["text_encoders_s"]),  # type: ignore[arg-type]
        "denoising": float(result["denoise_s"]),  # type: ignore[arg-type]
        "decoding": float(result["decode_s"]),  # type: ignore[arg-type]
    }
    memory = {"peak_gib": float(result["peak_rss_gb"]) * 1e9 / GIB}  # type: ignore[arg-type]
    runs = [float(total) for total in result["runs"]]  # type: ignore[union-attr]
    return Sample({}, runs, stages, memory, float(result["load_s"]))  # type: ignore[arg-type]


def fresh_rates(*, avx2: bool) -> dict[str, float]:
    """Measure the matrix rates in a fresh process (the cases' processes are fresh too).

    Args:
        avx2: Also measure float32 held to AVX2 (:data:`AVX2_RATE`), for the stand-in's cases.
    """

    def measured(env: dict[str, str], *precisions: str) -> dict[str, float]:
        completed = subprocess.run(
            [
                sys.executable,
                str(HERE / "machine.py"),
                "--rates",
                "--precisions",
                ",".join(precisions),
            ],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, **env},
        )
        return json.loads(completed.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]

    rates = measured({}, *machine.PRECISIONS)
    if avx2:
        # bfloat16 held to AVX2 has only torch's slow fallback: float32 alone.
        rates[AVX2_RATE] = measured(AVX2_ONLY, "float32")["float32"]
    return rates


def precision_of(case: Case) -> str:
    if case.precision != "auto":
        return case.precision
    sys.path.insert(0, str(ROOT))
    from agent.model.precision import machine_arithmetic  # noqa: PLC0415

    return "bfloat16" if machine_arithmetic().bfloat16 else "float32"


def summarize(case_id: str, case: Case, samples: list[Sample], flops: dict[str, float]) -> dict:
    """Return min/median latency, shares of the matching rate, first job, memory."""
    precision = precision_of(case)
    decoder = flops["full_decoder"] if case.plain else flops["tiny_decoder"]
    image_gflop = flops["text_encoders"] + flops["unet"] + decoder
    steady = [latency for sample in samples for latency in sample.latencies[1:]]
    if case.plain:  # every run of plain diffusers is warm (it had its own warm-up)
        steady = [latency for sample in samples for latency in sample.latencies]
    # The counted GFLOP are SDXL-Turbo's: no share for another model, or for a switch per job.
    counted = case.model == "sdxl-turbo" and not case.alternate
    image_shares = [
        image_gflop / latency / sample.rates[precision]
        for sample in samples
        for latency in (sample.latencies if case.plain else sample.latencies[1:])
        if counted
    ]
    denoise_shares = [
        flops["unet"] / sample.stages["denoising"] / sample.rates[precision]
        for sample in samples
        if counted
    ]
    firsts = [
        sample.latencies[0] / statistics.median(sample.latencies[1:])
        for sample in samples
        if len(sample.latencies) > 1 and not case.plain
    ]

    def median_of(key: str, source: str = "memory") -> float | None:
        values = [getattr(sample, source).get(key) for sample in samples]
        present = [value for value in values if value is not None]
        return statistics.median(present) if present else None

    return {
        "case": case_id,
        "title": case.title,
        "precision": precision,
        "samples": len(steady),
        "latency_min_s": min(steady),
        "latency_median_s": statistics.median(steady),
        "first_job_over_median": statistics.median(firsts) if firsts else None,
        "stages_s": {key: median_of(key, "stages") for key in samples[0].stages},
        "share_image_median": median_or_none(image_shares),
        "share_image_max": max(image_shares, default=None),
        "share_denoise_median": median_or_none(denoise_shares),
        "load_s": statistics.median(sample.load_s for sample in samples[1:] or samples),
        "first_load_s": samples[0].load_s,
        "read_new_gb": median_or_none([read for sample in samples for read in sample.read_gb[1:]]),
        "read_repeat_gb": median_or_none(
            [sample.repeat_read_gb for sample in samples if sample.repeat_read_gb is not None]
        ),
        "weights_gb": max(sample.weights_gb for sample in samples),
        "memory": {key: median_of(key) for key in samples[0].memory},
    }


def median_or_none(values: list[float]) -> float | None:
    """Return the median, or None for no values (plain diffusers reads nothing per job)."""
    return statistics.median(values) if values else None


def share(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def cell(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_table(rows: list[dict], rates: list[dict[str, float]], described: str) -> None:
    """Print the machine, its matrix rates and the markdown table."""
    print(f"\nMachine: {described}")
    for precision in rates[0]:
        values = [rate[precision] for rate in rates]
        print(
            f"{precision} matmul rate (4096^3, every core), {len(values)} rounds: "
            f"min {min(values):.0f}, median {statistics.median(values):.0f}, "
            f"max {max(values):.0f} GFLOP/s"
        )
    print(
        "\n| case | end to end min s | median s | first job / median | text enc. s | denoise s"
        " | decode s | share of rate: image (best) | denoise | load s | peak GiB | anon GiB"
        " | file GiB | page-ins GB | read/image GB: new prompt | repeated | restarts"
        " | first start s | weights on disk GB |"
    )
    print("| --- |" + " --- |" * 19)
    for row in rows:
        stages, memory = row["stages_s"], row["memory"]
        anon = memory.get("cgroup_anon_gib", memory.get("anon_gib"))
        file_backed = memory.get("cgroup_file_gib", memory.get("file_gib"))
        print(
            f"| ({row['case']}) {row['title']} | {row['latency_min_s']:.2f}"
            f" | {row['latency_median_s']:.2f} | {cell(row['first_job_over_median'])}"
            f" | {cell(stages.get('text_encoding'))} | {cell(stages.get('denoising'))}"
            f" | {cell(stages.get('decoding'))}"
            f" | {share(row['share_image_median'])} ({share(row['share_image_max'])})"
            f" of {row['precision']}"
            f" | {share(row['share_denoise_median'])} | {row['load_s']:.0f}"
            f" | {cell(memory.get('peak_gib'))} | {cell(anon)} | {cell(file_backed)}"
            f" | {cell(memory.get('page_ins_gb'))} | {cell(row.get('read_new_gb'))}"
            f" | {cell(row.get('read_repeat_gb'))} | {cell(memory.get('restarts'), 0)}"
            f" | {cell(row.get('first_load_s'), 0)} | {cell(row.get('weights_gb'))} |"
        )


def steady_median(sample: Sample, *, plain: bool) -> float:
    """Return one round's median latency, leaving out the first job after a start."""
    return statistics.median(sample.latencies if plain else sample.latencies[1:])


def print_paired(chosen: list[str], samples: dict[str, list[Sample]]) -> None:
    """Print each lever against its base, and each case against plain diffusers, round by round.

    A ratio above 1 means the case is faster. Pairs are taken within a round, so the machine's
    drift over the run cancels; a lever is worth adopting only when every round agrees.
    """
    pairs = [(CASES[case_id].base, case_id) for case_id in chosen if CASES[case_id].base]
    if "b" in chosen:
        pairs += [("b", case_id) for case_id in chosen if case_id != "b"]
    if not pairs:
        return
    print("\nPaired, round by round (base median / case median; above 1: the case is faster):")
    for base, case_id in pairs:
        if base not in samples:
            print(f"({case_id}) vs ({base}): run ({base}) in the same run to compare")
            continue
        ratios = [
            steady_median(base_sample, plain=CASES[base].plain)
            / steady_median(case_sample, plain=CASES[case_id].plain)
            for base_sample, case_sample in zip(samples[base], samples[case_id], strict=True)
        ]
        print(
            f"({case_id}) vs ({base}): median {statistics.median(ratios):.2f}x,"
            f" rounds {', '.join(f'{ratio:.2f}' for ratio in ratios)}"
        )


def print_saved(path: Path) -> None:
    """Print the table and the paired comparisons of a run saved with ``--json``, again."""
    report = json.loads(path.read_text())
    samples = {
        case_id: [Sample(**sample) for sample in case_samples]
        for case_id, case_samples in report["samples"].items()
    }
    print_table(report["cases"], report["rates"], report["machine"])
    print_paired(list(samples), samples)


def show_saved(report: Path | None, chart_paths: list[Path] | None) -> None:
    """Reprint a saved run's tables (``--report``), or draw its chart (``--chart RUN SVG``)."""
    if report is not None:
        print_saved(report)
    if chart_paths is not None:
        saved, svg = chart_paths
        svg.write_text(chart.draw(json.loads(saved.read_text())))


def main() -> None:
    """Run the cases round after round, then print the table and the JSON."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cases", default=DEFAULT_CASES, help="comma-separated, or 'list'")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--jobs", type=int, default=3, help="requests per agent start")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--report", type=Path, help="print the tables of a run saved by --json")
    parser.add_argument(
        "--chart",
        nargs=2,
        type=Path,
        metavar=("RUN", "SVG"),
        help="draw seconds per image and memory of a run saved by --json into an SVG file",
    )
    arguments = parser.parse_args()
    if arguments.chart or arguments.report:
        show_saved(arguments.report, arguments.chart)
        return
    if arguments.cases == "list":
        for case_id, case in CASES.items():
            print(f"{case_id:4} {case.title}")
        return
    chosen = arguments.cases.split(",")
    unknown = [case_id for case_id in chosen if case_id not in CASES]
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}; --cases list shows them")
    build_missing()
    flops = machine.cached_flops()
    samples: dict[str, list[Sample]] = {case_id: [] for case_id in chosen}
    rates: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="edgeai-bench-") as folder:
        broker = start_broker(Path(folder) / "broker")
        try:
            for round_index in range(arguments.rounds):
                rates.append(fresh_rates(avx2=any(CASES[c].precision == AVX2_RATE for c in chosen)))
                order = chosen[round_index % len(chosen) :] + chosen[: round_index % len(chosen)]
                for case_id in order:
                    case, began = CASES[case_id], time.monotonic()
                    label = f"{case_id}-{round_index}"
                    if case.plain:
                        sample = run_plain(arguments.jobs)
                    else:
                        # One state folder per case across rounds, as one agent restarted: integer
                        # weights are written at its first start and mapped at the others.
                        sample = run_agent(
                            case, broker, Path(folder) / case_id, arguments.jobs, label
                        )
                    sample.rates = rates[-1]
                    samples[case_id].append(sample)
                    print(
                        f"round {round_index + 1}/{arguments.rounds} ({case_id}):"
                        f" {', '.join(f'{latency:.2f}' for latency in sample.latencies)} s"
                        f" [{time.monotonic() - began:.0f} s]",
                        file=sys.stderr,
                        flush=True,
                    )
        finally:
            broker.stop()
    rows = [summarize(case_id, CASES[case_id], samples[case_id], flops) for case_id in chosen]
    described = machine.describe()
    print_table(rows, rates, described)
    print_paired(chosen, samples)
    report = {
        "machine": described,
        "flops_gflop": flops,
        "rates": rates,
        "cases": rows,
        "samples": {key: [dataclasses.asdict(s) for s in value] for key, value in samples.items()},
    }
    if arguments.json:
        arguments.json.write_text(json.dumps(report, indent=2))
    print("\n" + json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
