"""Memory: the limit that applies, a worker killed while loading, the Pi path under a limit."""

from __future__ import annotations

import json
import re
import time

from agent.machine.memory import MemoryLimit, memory_limit
from agent.model.link import Backoff, death_reason
from tests.conftest import generate

GIB = 2**30
MIB = 2**20


def write(path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_the_limit_is_cgroup_v1s_hierarchical_one(tmp_path):
    proc = tmp_path / "proc-cgroup"
    proc.write_text("9:name=systemd:/\n4:memory:/system.slice/edgeai.service\n0::/\n")
    folder = tmp_path / "memory" / "system.slice" / "edgeai.service"
    write(folder / "memory.limit_in_bytes", "9223372036854771712\n")
    # Its own limit is unlimited; a parent's 4 GiB is what applies.
    write(folder / "memory.stat", f"cache 0\nhierarchical_memory_limit {4 * GIB}\n")
    write(folder / "memory.oom_control", "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n")
    limit = memory_limit(proc, tmp_path, physical=8 * GIB)
    assert limit.bytes == 4 * GIB
    assert limit.source == f"cgroup v1 {folder}"
    assert limit.oom_kills() == 3
    assert limit.describe().startswith("4.0 GiB (cgroup v1")


def test_the_limit_is_the_tightest_cgroup_v2_memory_max_up_the_tree(tmp_path):
    proc = tmp_path / "proc-cgroup"
    proc.write_text("0::/system.slice/edgeai-agent.service\n")
    write(tmp_path / "cgroup.controllers", "cpu memory pids\n")
    write(tmp_path / "system.slice" / "memory.max", f"{7 * GIB}\n")
    service = tmp_path / "system.slice" / "edgeai-agent.service"
    write(service / "memory.max", "max\n")  # systemd's MemoryMax unset here, set on the slice
    write(service / "memory.events", "low 0\nhigh 0\nmax 2\noom 1\noom_kill 1\n")
    limit = memory_limit(proc, tmp_path, physical=8 * GIB)
    assert limit.bytes == 7 * GIB
    assert limit.oom_kills() == 1  # read in the service's own cgroup


def test_without_a_cgroup_limit_physical_memory_applies(tmp_path):
    proc = tmp_path / "proc-cgroup"
    proc.write_text("4:memory:/\n0::/\n")
    write(tmp_path / "memory" / "memory.limit_in_bytes", "9223372036854771712\n")
    write(tmp_path / "memory" / "memory.stat", "hierarchical_memory_limit 9223372036854771712\n")
    limit = memory_limit(proc, tmp_path, physical=8 * GIB)
    assert (limit.bytes, limit.source, limit.oom_kills()) == (8 * GIB, "physical memory", None)
    # A cgroup limit above physical memory is no limit.
    write(tmp_path / "memory" / "memory.stat", f"hierarchical_memory_limit {64 * GIB}\n")
    assert memory_limit(proc, tmp_path, physical=8 * GIB).source == "physical memory"


def test_load_retries_double_up_to_the_cap():
    backoff = Backoff(first=2.0, cap=300.0)
    assert [backoff.delay(n) for n in (1, 2, 3, 4, 8, 9, 20)] == [2, 4, 8, 16, 256, 300, 300]


def test_a_death_while_loading_is_told_in_words():
    limit = MemoryLimit(7 * GIB, "cgroup v2 /sys/fs/cgroup/system.slice")
    assert death_reason(-9, int(7.3 * GIB), limit, oom_kill=False) == (
        "the worker was killed while loading the model, probably out of memory: "
        "peak 7.3 GiB, memory limit 7.0 GiB (cgroup v2 /sys/fs/cgroup/system.slice)"
    )
    assert "out of memory (the kernel's OOM killer)" in death_reason(-9, None, limit, oom_kill=True)
    assert "(SIGSEGV)" in death_reason(-11, None, limit, oom_kill=False)
    assert "exit code 1" in death_reason(1, None, limit, oom_kill=False)


def retry_delays(agent) -> list[float]:
    return [float(delay) for delay in re.findall(r"retrying in ([0-9.]+) s", agent.log())]


def test_a_worker_killed_while_loading_is_an_error_with_its_reason_then_recovers(
    broker, memory_cgroup, make_agent
):
    # Room for the daemon, not for torch: the worker is OOM-killed while it loads, every time.
    cgroup = memory_cgroup(300 * MIB)
    agent = make_agent(
        broker,
        start=False,
        EDGEAI_WORKER_RESTART_DELAY_S="0.5",
        EDGEAI_WORKER_RESTART_MAX_DELAY_S="2",
    )
    agent.cgroup = cgroup
    agent.start(wait=False)
    state = agent.wait_state("error")
    reason = state["error"]
    assert "the worker was killed while loading the model" in reason
    assert "out of memory" in reason
    assert "memory limit 0.3 GiB (cgroup" in reason
    assert re.search(r"peak [0-9.]+ GiB", reason)
    status, _, body = agent.http_get("/healthz")
    assert status == 503
    assert json.loads(body)["error"] == reason
    assert agent.metric("edgeai_memory_limit_bytes") == 300 * MIB
    assert agent.metric("edgeai_state", edgeai_state="error") == 1
    assert agent.metric("edgeai_model_load_failures_total") >= 1
    # Meanwhile a request is answered at once, with the reason.
    client = broker.client()
    begun = time.monotonic()
    result = generate(client, agent, timeout=30)
    assert result["error"]["code"] == "model_unavailable"
    assert "killed while loading the model" in result["error"]["message"]
    assert time.monotonic() - begun < 10
    # Each retry waits twice as long as the last, up to the cap: not a crash loop.
    deadline = time.monotonic() + 60
    while len(retry_delays(agent)) < 4:
        assert time.monotonic() < deadline, agent.log()
        time.sleep(0.5)
    assert retry_delays(agent)[:4] == [0.5, 1.0, 2.0, 2.0]
    # Room enough: the next attempt loads, the state says so, jobs run.
    cgroup.set_limit(4 * GIB)
    assert agent.wait_state("idle", timeout=120)["state"] == "idle"
    assert generate(client, agent)["status"] == "ok"
    assert cgroup.oom_kills() >= 1
    assert agent.process.poll() is None  # the OOM killer always chose the worker
    client.close()


def test_the_pi_path_runs_inside_a_memory_limit_it_reads_itself(broker, memory_cgroup, make_agent):
    # float32 as on a Pi 5; half weights on their own: the limit, not this machine's memory.
    cgroup = memory_cgroup(2 * GIB)
    agent = make_agent(broker, start=False, EDGEAI_DTYPE="float32")
    agent.cgroup = cgroup
    agent.start()
    assert agent.metric("edgeai_memory_limit_bytes") == 2 * GIB
    assert re.search(
        r'edgeai_model_info\{[^}]*levers="float32,tiny-vae,half-weights', agent.metrics()
    )
    client = broker.client()
    for prompt in ("a red apple", "a green pear", "a red apple"):
        assert generate(client, agent, prompt=prompt)["status"] == "ok"
    metrics = agent.metrics()
    assert "edgeai_worker_restarts_total 0.0" in metrics
    assert "edgeai_model_load_failures_total 0.0" in metrics
    peak = float(
        re.search(r"^edgeai_worker_peak_memory_bytes (\S+)$", metrics, re.MULTILINE).group(1)
    )
    assert 0 < peak < 2 * GIB
    assert cgroup.oom_kills() == 0
    client.close()
