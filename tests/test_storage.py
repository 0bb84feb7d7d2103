"""A full disk speaks: on a 3 MB file system every job is answered, and the condition is told."""

from __future__ import annotations

import asyncio
import json
import time

from tests.conftest import fill_up, generate


def test_a_full_image_folder_is_told_and_base64_still_arrives(broker, make_agent, small_disk):
    images = small_disk / "images"
    agent = make_agent(broker, EDGEAI_IMAGE_DIR=str(images), EDGEAI_IMAGE_KEEP_FREE_BYTES="0")
    client = broker.client()
    client.subscribe(f"{agent.base}/state")
    assert generate(client, agent, id="before", output="url")["status"] == "ok"
    for before in images.glob("before.*.png"):
        before.unlink()  # nothing left that retention could remove
    fill_up(small_disk)
    refused = generate(client, agent, id="refused", output="url", timeout=60)
    print("url on a full disk:", refused)
    assert refused["status"] == "error"
    assert refused["error"]["code"] == "storage_full"
    assert f"cannot write the image in {images}" in refused["error"]["message"]
    # The condition is told: health, the retained state, the log, the free-space gauge.
    status, _, body = agent.http_get("/healthz")
    assert status == 503
    assert str(images) in json.loads(body)["storage"]
    assert f"cannot write the image in {images}" in agent.log()
    state = client.wait_for(f"{agent.base}/state", lambda m: "storage" in m.json()).json()
    print("state:", state)
    assert agent.metric("edgeai_free_bytes", folder="images") < 100_000
    # A result that can carry its image still gets it, without a URL, and says why.
    delivered = generate(client, agent, id="carried", output="b64", timeout=60)
    print("b64 on a full disk:", {k: v for k, v in delivered["image"].items() if k != "b64"})
    assert delivered["status"] == "ok"
    assert delivered["image"]["b64"]
    assert "url" not in delivered["image"]
    assert "has no URL" in delivered["image"]["note"]
    # Room again: the next job is written and the condition is over.
    (small_disk / "other-data").unlink()
    assert generate(client, agent, id="after", output="url", timeout=60)["status"] == "ok"
    deadline = time.monotonic() + 10
    while agent.http_get("/healthz")[0] != 200:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    client.close()


def test_a_full_state_folder_answers_every_job_and_says_where(broker, make_agent, small_disk):
    state = small_disk / "state"
    agent = make_agent(broker, EDGEAI_STATE_DIR=str(state), EDGEAI_IMAGE_KEEP_FREE_BYTES="0")
    client = broker.client()
    assert generate(client, agent, id="before", output="url")["status"] == "ok"
    for image in (state / "images").iterdir():
        image.unlink()
    fill_up(small_disk, leave=0)
    # Every job sent to a full disk is answered, none silently dropped.
    for index in range(4):
        reply = generate(client, agent, id=f"full-{index}", output="url", timeout=60)
        print("journal on a full disk:", reply)
        assert reply["status"] == "error"
        assert reply["error"]["code"] == "storage_full"
        assert str(state) in reply["error"]["message"]
    assert agent.http_get("/healthz")[0] == 503
    assert f"cannot write the journal in {state}" in agent.log()
    client.close()


def test_retention_keeps_free_space_and_jobs_keep_coming(broker, make_agent, small_disk):
    state = small_disk / "state"
    agent = make_agent(broker, EDGEAI_STATE_DIR=str(state), EDGEAI_IMAGE_KEEP_FREE_BYTES="1200000")
    client = broker.client()
    for index in range(8):
        assert generate(client, agent, id=f"keep-{index}", output="url")["status"] == "ok"
    free = agent.metric("edgeai_free_bytes", folder="images")
    kept = sorted(path.name.split(".")[0] for path in (state / "images").iterdir())
    print(f"free {free:.0f} bytes; kept {kept}")
    assert free >= 1_200_000
    assert "keep-7" in kept
    assert "keep-0" not in kept  # the oldest went first
    assert agent.http_get("/healthz")[0] == 200
    client.close()


def test_journal_pruning_on_a_full_disk_logs_and_keeps_the_agent_running(
    small_disk, tmp_path, caplog
):
    """SQLite needs room to delete rows: the hourly pruning fails on a full disk and waits."""
    from agent.jobs.journal import Journal  # noqa: PLC0415
    from agent.jobs.requests import parse_generate  # noqa: PLC0415
    from agent.settings import Settings  # noqa: PLC0415

    settings = Settings(
        node_id="prune", state_dir=small_disk / "state", journal_keep_s=0.001, journal_keep_rows=10
    )
    settings.state_dir.mkdir()

    async def scenario() -> None:
        journal = Journal(settings.journal_path)
        for index in range(40):
            payload = json.dumps({"id": f"old-{index}", "prompt": "x" * 500}).encode()
            spec = parse_generate(payload, settings)
            await journal.add(spec, f"hash-{index}", None)
            await journal.start(spec.id)
            await journal.finish(spec.id, {"status": "ok", "padding": "y" * 2000})
            await journal.delivered(spec.id)
        fill_up(small_disk, leave=0)
        pruning = asyncio.create_task(
            journal.keep_pruned(settings.journal_keep_s, settings.journal_keep_rows)
        )
        async with asyncio.timeout(10):
            while "pruning failed" not in caplog.text:  # noqa: ASYNC110 - it signals nothing
                await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)
        assert not pruning.done()  # still there to try again next hour
        pruning.cancel()
        journal.close()

    asyncio.run(scenario())
    assert "database or disk is full" in caplog.text
