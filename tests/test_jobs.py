"""Admission, runner, journal and outbox in this process: no broker, no worker process, no waits.

The broker link and the worker are stand-ins (tests/fakes.py) so that each test controls when a
job ends; everything else is the real code, and the same paths run end to end elsewhere.
"""

from __future__ import annotations

import asyncio
import base64
import errno
import json
import re
import sqlite3

import pytest

from agent.jobs.errors import ErrorCode, RequestError
from agent.jobs.journal import JobStatus
from agent.jobs.requests import parse_generate
from agent.mqtt.link import Acknowledgement, Inbound
from agent.mqtt.routes import Background, MqttRoutes, Requests
from tests.fakes import ScriptedWorker, build_jobs


def run(scenario):
    asyncio.run(asyncio.wait_for(scenario(), 30))


def request(jobs, job_id: str, **fields):
    payload = json.dumps({"id": job_id, "prompt": "a red apple", **fields}).encode()
    return lambda: parse_generate(payload, jobs.settings)


async def settle(future):
    try:
        return await future
    except RequestError as exc:
        return exc


async def until(condition) -> None:
    """Poll ``condition``: the parts under test signal nothing a test could await instead."""
    async with asyncio.timeout(10):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.005)


def result(jobs, job_id: str) -> dict:
    (published,) = jobs.link.on(jobs.topics.result(job_id))
    return json.loads(published.payload)


def test_an_admitted_request_is_journaled_queued_run_and_answered_once(tmp_path):
    async def scenario():
        jobs = build_jobs(tmp_path)
        settled = jobs.admission.offer(request(jobs, "one"), fingerprint="f1", api="mqtt")
        assert jobs.admission.queue_depth == 1  # counted from the moment it is offered
        admitted = await settled
        assert admitted.spec.id == "one"
        assert not admitted.redelivered
        assert (await jobs.journal.get("one")) is not None  # journaled before it was settled
        await asyncio.wait_for(jobs.runner.finished("one"), 10)
        assert result(jobs, "one")["status"] == "ok"
        await until(lambda: jobs.sample("edgeai_jobs_total", status="done") == 1)
        entry = await jobs.journal.get("one")
        assert entry.status is JobStatus.DELIVERED  # the broker acknowledged the reply
        events = [json.loads(p.payload)["event"] for p in jobs.link.on(jobs.topics.job("one"))]
        assert events == ["queued", "running", "running", "done"]
        assert jobs.sample("edgeai_requests_total", outcome="accepted", mode="txt2img") == 1
        assert jobs.sample("edgeai_api_requests_total", api="mqtt", outcome="accepted") == 1
        assert jobs.sample("edgeai_queue_depth") == 0
        await jobs.close()

    run(scenario)


def test_requests_are_journaled_and_run_in_arrival_order(tmp_path):
    async def scenario():
        jobs = build_jobs(tmp_path)
        jobs.worker.gate = asyncio.Event()
        offered = [
            jobs.admission.offer(request(jobs, name), fingerprint=name, api="web")
            for name in ("a", "b", "c", "d")
        ]
        assert jobs.admission.queue_depth == 4
        await asyncio.gather(*offered)
        await until(lambda: len(jobs.worker.runs) == 1)
        assert jobs.admission.queue_depth == 3  # one running, three waiting: one number
        assert jobs.sample("edgeai_queue_depth") == 3
        jobs.worker.gate.set()
        await asyncio.wait_for(jobs.runner.finished("d"), 10)
        assert [job.id for job in jobs.worker.runs] == ["a", "b", "c", "d"]
        await jobs.close()

    run(scenario)


def test_a_full_queue_refuses_busy_and_counts_it(tmp_path):
    async def scenario():
        jobs = build_jobs(tmp_path, max_queue=2)
        jobs.worker.gate = asyncio.Event()
        first = jobs.admission.offer(request(jobs, "a"), fingerprint="a", api="mqtt")
        second = jobs.admission.offer(request(jobs, "b"), fingerprint="b", api="mqtt")
        refused = await settle(jobs.admission.offer(request(jobs, "c"), fingerprint="c", api="web"))
        assert isinstance(refused, RequestError)
        assert refused.code is ErrorCode.BUSY
        assert refused.job_id == "c"
        assert jobs.sample("edgeai_requests_total", outcome="busy", mode="txt2img") == 1
        assert jobs.sample("edgeai_api_requests_total", api="web", outcome="busy") == 1
        await asyncio.gather(first, second)
        jobs.worker.gate.set()
        await jobs.close()

    run(scenario)


def test_the_same_request_again_is_never_run_twice_another_under_a_busy_id_is_refused(tmp_path):
    async def scenario():
        jobs = build_jobs(tmp_path)
        jobs.worker.gate = asyncio.Event()
        await jobs.admission.offer(request(jobs, "x"), fingerprint="same", api="mqtt")
        again = await jobs.admission.offer(request(jobs, "x"), fingerprint="same", api="mqtt")
        assert again.redelivered
        other = await settle(
            jobs.admission.offer(request(jobs, "x", seed=1), fingerprint="other", api="mqtt")
        )
        assert other.code is ErrorCode.DUPLICATE_ID
        jobs.worker.gate.set()
        await asyncio.wait_for(jobs.runner.finished("x"), 10)
        # Once finished, the same request again gets the stored reply, published once more.
        again = await jobs.admission.offer(request(jobs, "x"), fingerprint="same", api="mqtt")
        assert again.redelivered
        await until(lambda: len(jobs.link.on(jobs.topics.result("x"))) == 2)
        assert len(jobs.worker.runs) == 1
        assert jobs.sample("edgeai_requests_total", outcome="redelivered", mode="txt2img") == 2
        assert jobs.sample("edgeai_requests_total", outcome="duplicate_id", mode="txt2img") == 1
        await jobs.close()

    run(scenario)


def test_after_close_every_request_is_refused_as_shutting_down(tmp_path):
    async def scenario():
        jobs = build_jobs(tmp_path)
        jobs.admission.close()
        refused = await settle(
            jobs.admission.offer(request(jobs, "late"), fingerprint="l", api="mqtt")
        )
        assert refused.code is ErrorCode.SHUTTING_DOWN
        assert await jobs.journal.get("late") is None
        await jobs.close()

    run(scenario)


@pytest.mark.parametrize(
    ("failure", "code"),
    [
        pytest.param(OSError(errno.ENOSPC, "No space left on device"), "storage_full", id="full"),
        pytest.param(sqlite3.OperationalError("disk I/O error"), "storage_error", id="broken"),
        pytest.param(RuntimeError("a bug"), "internal_error", id="bug"),
    ],
)
def test_a_journal_that_fails_answers_and_frees_the_place(tmp_path, failure, code):
    async def scenario():
        jobs = build_jobs(tmp_path)

        async def broken(*_args):
            raise failure

        jobs.journal.add = broken
        refused = await settle(
            jobs.admission.offer(request(jobs, "j"), fingerprint="j", api="mqtt")
        )
        assert refused.code.value == code
        assert str(failure) in refused.message
        assert jobs.admission.queue_depth == 0
        assert jobs.sample("edgeai_requests_total", outcome=code, mode="txt2img") == 1
        await jobs.close()

    run(scenario)


def test_a_worker_death_runs_the_job_again_then_fails_it(tmp_path):
    async def scenario():
        jobs = build_jobs(tmp_path, worker=ScriptedWorker(["die", "ok", "die", "die"]))
        await jobs.admission.offer(request(jobs, "survivor"), fingerprint="s", api="mqtt")
        await asyncio.wait_for(jobs.runner.finished("survivor"), 10)
        assert result(jobs, "survivor")["status"] == "ok"
        await jobs.admission.offer(request(jobs, "doomed"), fingerprint="d", api="mqtt")
        await asyncio.wait_for(jobs.runner.finished("doomed"), 10)
        error = result(jobs, "doomed")["error"]
        assert error["code"] == "worker_crashed"
        assert "2 times" in error["message"]
        assert (await jobs.journal.get("doomed")).attempts == 2
        assert jobs.sample("edgeai_jobs_total", status="failed") == 1
        await jobs.close()

    run(scenario)


def test_failures_cancels_and_an_unloaded_model_each_answer_their_job(tmp_path):
    async def scenario():
        jobs = build_jobs(tmp_path, worker=ScriptedWorker(["fail"]))
        jobs.worker.gate = asyncio.Event()
        for name in ("failing", "waiting"):
            await jobs.admission.offer(request(jobs, name), fingerprint=name, api="mqtt")
        assert await jobs.runner.cancel("waiting")
        assert not await jobs.runner.cancel("nobody")
        jobs.worker.gate.set()
        await asyncio.wait_for(jobs.runner.finished("failing"), 10)
        assert result(jobs, "failing")["error"]["code"] == "generation_failed"
        assert result(jobs, "waiting")["error"]["code"] == "cancelled"
        jobs.worker.unavailable = "the worker was killed while loading the model"
        await jobs.admission.offer(request(jobs, "late"), fingerprint="late", api="mqtt")
        await asyncio.wait_for(jobs.runner.finished("late"), 10)
        error = result(jobs, "late")["error"]
        assert error["code"] == "model_unavailable"
        assert "killed while loading" in error["message"]
        assert jobs.sample("edgeai_jobs_total", status="cancelled") == 1
        await jobs.close()

    run(scenario)


def test_a_cancel_before_the_request_is_journaled_cancels_it_once_it_is(tmp_path):
    async def scenario():
        jobs = build_jobs(tmp_path)
        jobs.worker.gate = asyncio.Event()
        settled = jobs.admission.offer(request(jobs, "soon-gone"), fingerprint="g", api="mqtt")
        assert await jobs.runner.cancel("soon-gone") is False  # not journaled, not queued yet
        assert await jobs.admission.cancel("soon-gone")  # ... but offered: the cancel is kept
        finished = jobs.runner.finished("soon-gone")
        assert (await settled).spec.id == "soon-gone"
        await asyncio.wait_for(finished, 10)
        assert result(jobs, "soon-gone")["error"]["code"] == "cancelled"
        assert jobs.worker.runs == []
        assert (await jobs.journal.get("soon-gone")).status is not JobStatus.QUEUED
        assert not await jobs.admission.cancel("nobody")
        await jobs.close()

    run(scenario)


def test_the_journal_keeps_every_step_across_a_reopen(tmp_path):
    async def scenario():
        jobs = build_jobs(tmp_path)
        spec = request(jobs, "kept", seed=7)()
        await jobs.journal.add(spec, "hash", expires_at=None)
        assert await jobs.journal.start("kept") == 1
        await jobs.journal.requeue("kept", refund=True)
        assert [entry.spec.id for entry in await jobs.journal.unfinished()] == ["kept"]
        await jobs.journal.finish("kept", {"id": "kept", "status": "ok", "image": {}})
        assert [entry.spec for entry in await jobs.journal.undelivered()] == [spec]
        await jobs.close()
        jobs = build_jobs(tmp_path)  # the same file, opened again
        entry = await jobs.journal.get("kept")
        assert (entry.status, entry.attempts, entry.spec.seed) == (JobStatus.DONE, 0, 7)
        await jobs.journal.delivered("kept")
        assert await jobs.journal.undelivered() == []
        assert await jobs.journal.prune(keep_s=0.0, keep_rows=10) == 1
        await jobs.close()

    run(scenario)


def test_the_outbox_sends_the_latest_image_before_the_result_and_a_url_when_too_large(tmp_path):
    async def scenario():
        jobs = build_jobs(tmp_path)
        await jobs.admission.offer(request(jobs, "small"), fingerprint="s", api="mqtt")
        await asyncio.wait_for(jobs.runner.finished("small"), 10)
        topics = jobs.link.topics()
        assert topics.index(jobs.topics.image) < topics.index(jobs.topics.result("small"))
        image = result(jobs, "small")["image"]
        assert base64.b64decode(image["b64"])[:4] == b"\x89PNG"
        [small_file] = (tmp_path / "images").glob("small.*.png")  # the id and the job's key
        jobs.link.packet_limit = 100  # as if the broker's CONNACK said so
        await jobs.admission.offer(request(jobs, "big", output="b64"), fingerprint="b", api="mqtt")
        await asyncio.wait_for(jobs.runner.finished("big"), 10)
        image = result(jobs, "big")["image"]
        assert "b64" not in image
        assert re.fullmatch(r"http://agent\.test/images/big\.[0-9a-f]{16}\.png", image["url"])
        assert "too large" in image["note"]
        entry = await jobs.journal.get("small")
        assert "b64" not in entry.reply["image"]  # the journal keeps no image bytes: the file does
        jobs.link.packet_limit = 8_000_000
        restored = await jobs.outbox.restored(entry.spec, entry.reply)
        assert restored["image"]["b64"] == image_b64(small_file)
        await jobs.close()

    run(scenario)


def image_b64(path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def inbound(topic: str, payload: bytes, mid: int = 7) -> Inbound:
    return Inbound(
        topic, payload, qos=1, retain=False, mid=mid, response_topic=None, correlation_data=None
    )


@pytest.mark.parametrize("topic_name", ["cancel", "home_assistant_status"])
def test_a_handler_that_raises_answers_internal_error_and_acknowledges_once(tmp_path, topic_name):
    async def scenario():
        jobs = build_jobs(tmp_path)
        background = Background()
        routes = MqttRoutes(
            settings=jobs.settings,
            topics=jobs.topics,
            link=jobs.link,
            requests=Requests(settings=jobs.settings, admission=jobs.admission, outbox=jobs.outbox),
            announce=lambda: 1 / 0,
            background=background,
        )

        def broken_spawn(coroutine, _name):
            coroutine.close()
            raise RuntimeError("broken")

        background.spawn = broken_spawn
        topic = {
            "cancel": jobs.topics.cancel,
            "home_assistant_status": "homeassistant/status",
        }[topic_name]
        payload = b'{"id": "x"}' if topic_name == "cancel" else b"online"
        routes.on_message(inbound(topic, payload, mid=42))
        assert jobs.link.acks == [42]  # once: a second PUBACK could acknowledge another message
        (error,) = jobs.link.on(jobs.topics.errors)
        assert json.loads(error.payload)["error"]["code"] == "internal_error"
        await jobs.close()

    run(scenario)


def test_a_request_is_acknowledged_only_once_it_is_journaled(tmp_path):
    async def scenario():
        jobs = build_jobs(tmp_path)
        requests = Requests(settings=jobs.settings, admission=jobs.admission, outbox=jobs.outbox)
        message = inbound(jobs.topics.generate, b'{"id": "acked", "prompt": "x"}', mid=5)
        ack = Acknowledgement(jobs.link, message)
        requests.admit(message, ack, lambda: requests.parse(message), api="mqtt")
        assert jobs.link.acks == []  # not yet: its journal row is not committed
        await until(lambda: jobs.link.acks == [5])
        assert await jobs.journal.get("acked") is not None
        await jobs.close()

    run(scenario)


def test_a_job_whose_path_raises_is_answered_and_logged_with_its_traceback(tmp_path, caplog):
    async def scenario():
        jobs = build_jobs(tmp_path)

        async def broken(*_args):
            raise RuntimeError("a bug in the result")

        jobs.outbox.result = broken
        await jobs.admission.offer(request(jobs, "buggy"), fingerprint="b", api="mqtt")
        await asyncio.wait_for(jobs.runner.finished("buggy"), 10)
        error = result(jobs, "buggy")["error"]
        assert error["code"] == "internal_error"
        assert "a bug in the result" in error["message"]
        # The runner goes on with the next job.
        await jobs.admission.offer(request(jobs, "next"), fingerprint="n", api="mqtt")
        await asyncio.wait_for(jobs.runner.finished("next"), 10)
        await jobs.close()

    run(scenario)
    logged = [record for record in caplog.records if "buggy failed" in record.getMessage()]
    assert logged
    assert logged[0].exc_info is not None  # with its traceback


def test_a_journal_that_cannot_record_a_reply_still_answers_and_says_so(tmp_path):
    async def scenario():
        jobs = build_jobs(tmp_path)

        async def full(*_args):
            raise OSError(errno.ENOSPC, "No space left on device")

        jobs.journal.finish = full
        await jobs.admission.offer(request(jobs, "kept"), fingerprint="k", api="mqtt")
        await until(lambda: jobs.link.on(jobs.topics.result("kept")))
        assert result(jobs, "kept")["status"] == "ok"  # the image still reaches its client
        await jobs.close()

    run(scenario)
