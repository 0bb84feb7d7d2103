"""A 2 GB Raspberry Pi 5, as far as memory goes: SDXL-Turbo's real size in a 2 GiB cgroup.

SDXL-Turbo's architecture with random weights (built once by the benchmark into
``~/.cache/edgeai-bench``, about 7 GB), the agent as installed (``EDGEAI_WEIGHT_FORM=auto``) on the
Pi path, daemon and worker in a real 2 GiB memory cgroup, the model's files evicted from the page
cache first so that their pages are charged there. Slow (the first start writes the int4 copy):
``scripts/test-small-pi``.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests import cgroups
from tests.conftest import AgentProcess

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

from pipeline import MODEL, TAESDXL, build_model  # noqa: E402
from suite import PI_AUTO, evict_model_files, proc_values  # noqa: E402

GIB = 2**30


@pytest.fixture(scope="module")
def sdxl_turbo_random() -> Path:
    if not (MODEL / "model_index.json").exists() or not (TAESDXL / "config.json").exists():
        build_model()
    return MODEL


def ask(client, agent: AgentProcess, prompt: str) -> tuple[dict, float, float]:
    """Send one request; return its result, seconds, and GB the worker read from storage."""
    pid = int(json.loads(agent.http_get("/healthz")[2])["worker_pid"])
    read_before = proc_values(pid)["read_gb"]
    job_id = uuid.uuid4().hex[:12]
    client.subscribe(f"{agent.base}/result/{job_id}")
    begun = time.monotonic()
    client.publish(
        f"{agent.base}/generate", json.dumps({"id": job_id, "prompt": prompt, "output": "url"})
    )
    result = client.wait_for(f"{agent.base}/result/{job_id}", timeout=600).json()
    return result, time.monotonic() - begun, proc_values(pid)["read_gb"] - read_before


@pytest.mark.timeout(1800)  # two starts of SDXL's size, the first writing its int4 copy
def test_a_2_gib_pi_answers_every_job_with_int4_weights(broker, sdxl_turbo_random, tmp_path):
    try:
        cgroup = cgroups.create(2 * GIB, "edgeai-small-pi")
    except cgroups.CgroupUnavailableError as exc:
        pytest.skip(str(exc))
    env = {**PI_AUTO, "EDGEAI_TORCH_THREADS": "0", "EDGEAI_TINY_VAE": str(TAESDXL)}
    client = broker.client()
    agents: list[AgentProcess] = []
    try:
        for start in ("first", "second"):
            evict_model_files(tmp_path / "state" / "weights")
            agent = AgentProcess(broker, sdxl_turbo_random, tmp_path / "state", env)
            agent.extra_env["EDGEAI_TINY_VAE"] = str(TAESDXL)
            agent.cgroup = cgroup
            agents.append(agent)
            begun = time.monotonic()
            agent.start(wait=False)
            agent.wait_state("idle", timeout=900)
            loaded = time.monotonic() - begun
            for prompt in ("a lighthouse at dusk", "a red fox in snow", "a red fox in snow"):
                result, seconds, read = ask(client, agent, prompt)
                assert result["status"] == "ok", (result, agent.log()[-3000:])
                print(f"{start} start ({loaded:.0f} s): {prompt!r} {seconds:.1f} s, {read:.2f} GB")
            assert agent.metric("edgeai_worker_restarts_total") == 0
            assert agent.stop() == 0
            log = agent.log()
            assert "heavy weights in int4 (auto: none fits" in log
            assert "Traceback" not in log
        assert cgroup.oom_kills() == 0
        assert log.count("int4 weights of the unet written") == 1  # the second start mapped it
        print(f"cgroup peak {(cgroup.peak() or 0) / GIB:.2f} GiB")
    finally:
        client.close()
        for agent in agents:
            agent.stop()
        cgroup.remove()
