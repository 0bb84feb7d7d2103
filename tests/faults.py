"""Fault run: jobs keep arriving while the worker, the agent and the broker are killed at random
moments, and a flood of malformed messages lands during generations.

It prints jobs sent, results received, duplicates, lost jobs, and the generation time under the
flood divided by a quiet run. ``tests/test_faults.py`` runs a short version in CI; the long one is
run by hand:

    .venv/bin/python -m tests.faults --jobs 60 --faults 12 --flood 1000
    .venv/bin/python -m tests.faults --fleet --jobs 12 --faults 0    # the fleet's churn
    .venv/bin/python -m tests.faults --fleet --jobs 12 --faults 2    # and kill -9 of an agent

A duplicate is a job whose result was produced twice (two different result messages for one id).
The broker may also hand the watcher the very same result message twice after it was killed (MQTT
QoS 1 is at-least-once between broker and subscriber); those are counted apart, as
``redelivered_copies``. The project's broker saves its database every 10 changes, so a kill -9
of it may lose the last few messages it had taken: a request that is unanswered once the run
settles, and that a broker kill came after, is sent again under its id (``resent``), as the
reliability page tells clients to; the agent answers an id once, so that is never a duplicate.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import AgentProcess, start_broker
from tests.tiny_pipeline import build_tiny_pipeline

FLOOD_JOB = {"prompt": "a lighthouse", "width": 1024, "height": 1024, "steps": 4, "seed": 1}
MALFORMED = [
    b"\xff\xfe\x00",
    b"{",
    b'{"prompt": NaN}',
    b'{"prompt": "x", "width": 13}',
    b'{"prompt": ""}',
    b'{"prompt": "x", "unknown": 1}',
    b"[" * 3000,
    b'{"prompt": "x", "reply_to": "$SYS/#"}',
    b"x" * 20000,
]


@dataclass
class Report:
    """What a fault run found."""

    jobs_sent: int
    results_received: int
    ok: int
    failed: int
    duplicates: int
    redelivered_copies: int
    lost: int
    faults: dict[str, int]
    malformed_sent: int
    resent: int
    """Requests sent again under their id, as a client does whose request is unanswered after
    a broker crash (the broker saves every 10 changes: a crash may lose the last few)."""
    quiet_generation_s: float
    flood_generation_s: float

    @property
    def flood_ratio(self) -> float:
        """Return generation time under the flood divided by the quiet run."""
        return self.flood_generation_s / self.quiet_generation_s

    def as_dict(self) -> dict[str, object]:
        """Return the report as JSON-ready data."""
        return {**vars(self), "flood_ratio": round(self.flood_ratio, 3)}


class FaultRun:
    """A broker and an agent to hurt, and a watcher that records every result."""

    def __init__(self, root: Path, model: Path, seed: int) -> None:
        self.random = random.Random(seed)
        self.broker = start_broker(root / "broker")
        self.agent = AgentProcess(
            self.broker,
            model,
            root / "agent",
            {
                "EDGEAI_MAX_QUEUE": "1000",
                "EDGEAI_MQTT_RECONNECT_MAX_S": "1",
                "EDGEAI_MAX_ATTEMPTS": "3",
                "EDGEAI_SHUTDOWN_GRACE_S": "0",
            },
        )
        self.agent.start()
        self.watcher = self.broker.client(persistent=True, client_id="fault-watcher")
        self.sender = self.broker.client(persistent=True, client_id="fault-sender")
        self.watcher.subscribe(f"{self.agent.base}/result/+")
        self.faults: dict[str, int] = defaultdict(int)
        self.malformed_sent = 0
        self.sent: dict[str, tuple[float, str]] = {}
        """Each request's time and payload, to send again."""
        self.broker_killed_at: list[float] = []

    def generate_topic(self) -> str:
        return f"{self.agent.base}/generate"

    def send(self, job_id: str, **fields: object) -> None:
        payload = json.dumps({"prompt": "a red apple", "id": job_id, **fields})
        self.sent[job_id] = (time.monotonic(), payload)
        self.sender.publish(self.generate_topic(), payload)

    def resend_unanswered(self, ids: list[str]) -> int:
        """Send again, under its id, each unanswered request that a broker crash came after."""
        answered = self.results()
        again = [
            job_id
            for job_id in ids
            if job_id not in answered
            and any(killed > self.sent[job_id][0] for killed in self.broker_killed_at)
        ]
        for job_id in again:
            self.sender.publish(self.generate_topic(), self.sent[job_id][1])
        return len(again)

    def results(self) -> dict[str, list[bytes]]:
        found: dict[str, list[bytes]] = defaultdict(list)
        prefix = f"{self.agent.base}/result/"
        for message in list(self.watcher.seen):
            if message.topic.startswith(prefix):
                found[message.topic.removeprefix(prefix)].append(message.payload)
        return found

    def wait_results(self, ids: list[str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(job_id in self.results() for job_id in ids):
                return
            time.sleep(0.2)

    # --- faults
    def kill_worker(self) -> None:
        _, _, body = self.agent.http_get("/healthz")
        pid = json.loads(body).get("worker_pid")
        if pid:
            try:
                os.kill(pid, signal.SIGKILL)
                self.faults["worker"] += 1
            except ProcessLookupError:
                pass

    def kill_agent(self) -> None:
        self.agent.signal(signal.SIGKILL)
        self.agent.process.wait()
        self.faults["agent"] += 1
        time.sleep(self.random.uniform(0.1, 1.0))
        self.agent.start(wait=False)

    def kill_broker(self) -> None:
        self.broker_killed_at.append(time.monotonic())
        self.broker.kill()
        self.faults["broker"] += 1
        time.sleep(self.random.uniform(0.1, 1.0))
        self.broker.start()

    def flood(self, count: int) -> None:
        for index in range(count):
            self.sender.client.publish(
                self.generate_topic(), MALFORMED[index % len(MALFORMED)], qos=index % 2
            )
        self.malformed_sent += count

    # --- phases
    def measure_generation(self, label: str, runs: int, flood: int) -> float:
        """Median generation time of identical jobs, with ``flood`` malformed messages each."""
        times = []
        for index in range(runs):
            job_id = f"{label}-{index}"
            self.watcher.subscribe(f"{self.agent.base}/jobs/{job_id}")
            self.send(job_id, **FLOOD_JOB)
            if flood:
                self.watcher.wait_for(
                    f"{self.agent.base}/jobs/{job_id}",
                    lambda m: m.json()["event"] == "running",
                    timeout=120,
                )
                self.flood(flood)
            result = self.watcher.wait_for(f"{self.agent.base}/result/{job_id}", timeout=300).json()
            times.append(result["timings"]["generation_s"])
        return statistics.median(times)

    def chaos(self, jobs: int, faults: int) -> list[str]:
        ids = [f"job-{index}" for index in range(jobs)]
        stop = threading.Event()

        def send_all() -> None:
            for job_id in ids:
                self.send(job_id, steps=self.random.choice([1, 2, 4]))
                time.sleep(self.random.uniform(0.0, 0.3))
            stop.set()

        sender = threading.Thread(target=send_all)
        sender.start()
        kinds = [self.kill_worker, self.kill_agent, self.kill_broker]
        for index in range(faults):
            time.sleep(self.random.uniform(0.3, 2.0))
            kinds[index % len(kinds)]()
        sender.join()
        return ids

    def close(self) -> None:
        self.watcher.close()
        self.sender.close()
        self.agent.stop()
        self.broker.stop()


def run(
    *, jobs: int, faults: int, flood: int, flood_runs: int, seed: int, timeout: float
) -> Report:
    """Run the whole fault scenario and return its report."""
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        model = build_tiny_pipeline(root / "model")
        run = FaultRun(root, model, seed)
        try:
            run.measure_generation("warmup", 1, 0)
            quiet = run.measure_generation("quiet", flood_runs, 0)
            flooded = run.measure_generation("flood", flood_runs, flood)
            ids = run.chaos(jobs, faults)
            run.wait_results(ids, timeout)
            resent = run.resend_unanswered(ids)
            if resent:
                run.wait_results(ids, timeout)
            results = run.results()
        finally:
            run.close()
    received = {job_id: results.get(job_id, []) for job_id in ids}
    statuses = [json.loads(payloads[0])["status"] for payloads in received.values() if payloads]
    return Report(
        jobs_sent=jobs,
        results_received=sum(1 for payloads in received.values() if payloads),
        ok=statuses.count("ok"),
        failed=statuses.count("error"),
        duplicates=sum(1 for payloads in received.values() if len(set(payloads)) > 1),
        redelivered_copies=sum(
            len(payloads) - len(set(payloads)) for payloads in received.values()
        ),
        lost=sum(1 for payloads in received.values() if not payloads),
        faults=dict(run.faults),
        malformed_sent=run.malformed_sent,
        resent=resent,
        quiet_generation_s=round(quiet, 4),
        flood_generation_s=round(flooded, 4),
    )


@dataclass
class FleetReport:
    """What a fleet run found."""

    jobs_sent: int
    results_received: int
    duplicates: int
    lost: int
    fleet_messages: int
    """Messages on the fleet topic: the jobs sent plus every pass-back."""
    split: dict[str, int]
    out_of_order: int
    """Jobs an agent finished after one that reached the fleet topic later (its last publish)."""
    kills: int
    seconds: float

    @property
    def republished(self) -> int:
        """Return how many times jobs were published again by an agent."""
        return self.fleet_messages - self.jobs_sent

    def as_dict(self) -> dict[str, object]:
        """Return the report as JSON-ready data."""
        return {**vars(self), "republished": self.republished}


FLEET_JOB = {"prompt": "a lighthouse", "width": 1024, "height": 1024, "steps": 8}
"""A job of a few seconds on the tiny model."""


def run_fleet(*, jobs: int, kills: int, seed: int, timeout: float) -> FleetReport:
    """Two agents in one fleet group; ``jobs`` fleet jobs; agent one killed ``kills`` times.

    A watcher subscribed to the fleet topic itself (not shared) sees every publish there, the
    jobs sent and each pass-back; another sees every result, on the fleet topic and on the
    agents' own, which tell who ran what.
    """
    chance = random.Random(seed)
    fleet = {"EDGEAI_FLEET_GROUP": "workers", "EDGEAI_MQTT_RECONNECT_MAX_S": "1"}
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        model = build_tiny_pipeline(root / "model")
        broker = start_broker(root / "broker")
        agents = [AgentProcess(broker, model, root / f"agent{n}", dict(fleet)) for n in (1, 2)]
        watcher = broker.client(persistent=True, client_id="fleet-watcher")
        sender = broker.client(persistent=True, client_id="fleet-sender")
        # Only agents may read the fleet topic itself: an agent-like user of its own counts.
        broker.add_node("fleet-counter")
        counter = broker.client("fleet-counter", persistent=True, client_id="fleet-counter")
        try:
            for agent in agents:
                agent.start()
            counter.subscribe("edgeai/fleet/generate")
            watcher.subscribe("edgeai/fleet/result/+/+", "edgeai/+/result/+")
            ids = [f"fleet-{index}" for index in range(jobs)]
            began = time.monotonic()
            for job_id in ids:
                sender.publish("edgeai/fleet/generate", json.dumps({**FLEET_JOB, "id": job_id}))
            for _ in range(kills):
                time.sleep(chance.uniform(2.0, 6.0))
                agents[0].signal(signal.SIGKILL)
                agents[0].process.wait()
                time.sleep(chance.uniform(0.1, 1.0))
                agents[0].start(wait=False)
            deadline = time.monotonic() + timeout
            results: dict[str, set[bytes]] = defaultdict(set)
            while time.monotonic() < deadline:
                results = defaultdict(set)
                for message in watcher.messages_matching("edgeai/fleet/result/"):
                    results[message.topic.rsplit("/", 1)[1]].add(message.payload)
                if all(job_id in results for job_id in ids):
                    break
                time.sleep(0.2)
            seconds = time.monotonic() - began
            time.sleep(2)  # a duplicate would arrive now
            split: dict[str, int] = defaultdict(int)
            finished: dict[str, list[str]] = defaultdict(list)  # per agent, in its order
            for message in watcher.seen:
                parts = message.topic.split("/")
                if parts[1] != "fleet" and parts[2] == "result":
                    split[parts[1]] += 1
                    finished[parts[1]].append(parts[3])
            published = counter.messages("edgeai/fleet/generate")
            # Where each job last reached the fleet topic (a pass-back publishes it again).
            position = {json.loads(message.payload)["id"]: n for n, message in enumerate(published)}
            out_of_order = sum(
                1
                for order in finished.values()
                for earlier, later in itertools.pairwise(order)
                if position[later] < position[earlier]
            )
        finally:
            counter.close()
            watcher.close()
            sender.close()
            for agent in agents:
                agent.stop()
            broker.stop()
    return FleetReport(
        jobs_sent=jobs,
        results_received=sum(1 for job_id in ids if results.get(job_id)),
        duplicates=sum(1 for job_id in ids if len(results.get(job_id, ())) > 1),
        lost=sum(1 for job_id in ids if not results.get(job_id)),
        fleet_messages=len(published),
        split=dict(split),
        out_of_order=out_of_order,
        kills=kills,
        seconds=round(seconds, 1),
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--fleet",
        action="store_true",
        help="the fleet case: two agents share fleet jobs, agent one is killed --faults times",
    )
    parser.add_argument("--jobs", type=int, default=60)
    parser.add_argument(
        "--faults", type=int, default=12, help="kills, taking turns: worker, agent, broker"
    )
    parser.add_argument(
        "--flood", type=int, default=1000, help="malformed messages per flooded generation"
    )
    parser.add_argument("--flood-runs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=300)
    arguments = parser.parse_args()
    if arguments.fleet:
        fleet = run_fleet(
            jobs=arguments.jobs,
            kills=arguments.faults,
            seed=arguments.seed,
            timeout=arguments.timeout,
        )
        print(f"fleet jobs sent:    {fleet.jobs_sent}")
        print(f"results received:   {fleet.results_received}")
        print(f"duplicates:         {fleet.duplicates}")
        print(f"lost:               {fleet.lost}")
        print(
            f"fleet topic:        {fleet.fleet_messages} messages, {fleet.republished} republished"
        )
        print(f"split:              {fleet.split}")
        print(f"out of order:       {fleet.out_of_order} (jobs an agent ran out of arrival order)")
        print(f"kills (kill -9):    {fleet.kills}; {fleet.seconds} s")
        print(json.dumps(fleet.as_dict()))
        sys.exit(0 if fleet.lost == fleet.duplicates == fleet.out_of_order == 0 else 1)
    report = run(
        jobs=arguments.jobs,
        faults=arguments.faults,
        flood=arguments.flood,
        flood_runs=arguments.flood_runs,
        seed=arguments.seed,
        timeout=arguments.timeout,
    )
    print(f"jobs sent:          {report.jobs_sent}")
    print(f"results received:   {report.results_received} ({report.ok} ok, {report.failed} failed)")
    print(f"duplicates:         {report.duplicates}")
    print(f"redelivered copies: {report.redelivered_copies}")
    print(f"lost:               {report.lost}")
    print(f"sent again:         {report.resent} (unanswered after a broker crash)")
    print(f"faults:             {report.faults}")
    print(f"malformed sent:     {report.malformed_sent}")
    print(
        f"flood ratio:        {report.flood_ratio:.3f} (generation {report.flood_generation_s} s"
        f" under flood / {report.quiet_generation_s} s quiet)"
    )
    print(json.dumps(report.as_dict()))
    sys.exit(0 if report.lost == 0 and report.duplicates == 0 else 1)


if __name__ == "__main__":
    main()
