"""A fleet: agents share jobs through an MQTT 5 shared subscription; each job runs once."""

from __future__ import annotations

import json
import time
from collections import Counter

import pytest

from tests.conftest import AgentProcess
from tests.tiny_pipeline import build_tiny_pipeline

JOBS = 20


@pytest.fixture(scope="module")
def slow_model(tmp_path_factory):
    """The tiny pipeline with a UNet many times wider: the same jobs take several times longer."""
    return build_tiny_pipeline(tmp_path_factory.mktemp("slow-sdxl"), unet_channels=(128, 256))


def test_twenty_fleet_jobs_each_run_once_and_the_faster_agent_does_more(
    broker, tiny_model, slow_model, tmp_path
):
    fleet = {"EDGEAI_FLEET_GROUP": "workers"}
    fast = AgentProcess(broker, tiny_model, tmp_path / "fast", fleet)
    slow = AgentProcess(broker, slow_model, tmp_path / "slow", fleet)
    fast.start()
    slow.start()
    client = broker.client()
    try:
        client.subscribe("edgeai/fleet/result/+/+")
        for index in range(JOBS):
            client.publish(
                "edgeai/fleet/generate",
                json.dumps({"prompt": "a red apple", "id": f"fleet-{index}", "steps": 4}),
            )
        deadline = time.monotonic() + 240
        while len({m.topic for m in client.messages_matching("edgeai/fleet/result/")}) < JOBS:
            assert time.monotonic() < deadline, "not every fleet job was answered"
            time.sleep(0.2)
        time.sleep(1)  # a duplicate would arrive now
        results = [m.json() for m in client.messages_matching("edgeai/fleet/result/")]
        per_id = Counter(result["id"] for result in results)
        assert per_id == Counter({f"fleet-{index}": 1 for index in range(JOBS)})
        assert all(result["status"] == "ok" for result in results)
        # The topic names the node that ran each job (only that node may write under it).
        node_of = {str(tiny_model): fast.node_id, str(slow_model): slow.node_id}
        for message in client.messages_matching("edgeai/fleet/result/"):
            _, _, _, node, job_id = message.topic.split("/")
            assert (node, job_id) == (node_of[message.json()["model"]], message.json()["id"])
        by_agent = Counter(result["model"] for result in results)
        fast_jobs, slow_jobs = by_agent[str(tiny_model)], by_agent[str(slow_model)]
        print(f"fleet split: fast agent {fast_jobs} jobs, slow agent {slow_jobs} jobs")
        assert fast_jobs + slow_jobs == JOBS
        assert slow_jobs > 0, "the slow agent did no job"
        assert fast_jobs > slow_jobs
    finally:
        client.close()
        fast.stop()
        slow.stop()
