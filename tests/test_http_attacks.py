"""A hostile client against the HTTP server: raw sockets, bad framing, slow and idle connections.

Each test sends what an attacker would, byte for byte, and checks what a user relies on: one
answer per request, bounded memory, connections that time out, nothing created or changed.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import re
import socket
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import AgentProcess, generate

TOKEN = "attack-test-token"
IDLE_TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def guarded_agent(module_broker, tiny_model, tmp_path_factory):
    env = {
        "EDGEAI_API_TOKEN": TOKEN,
        "EDGEAI_HTTP_AUTH": "true",
        "EDGEAI_HTTP_IDLE_TIMEOUT_S": str(IDLE_TIMEOUT_S),
    }
    agent = AgentProcess(module_broker, tiny_model, tmp_path_factory.mktemp("guarded"), env)
    agent.start()
    yield agent
    agent.stop()


def connect(agent, timeout: float = 10.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", agent.http_port), timeout=timeout)


def exchange(agent, data: bytes, *, wait: float = 1.5) -> bytes:
    """Send raw bytes, then read everything the server sends until it closes or goes quiet."""
    with connect(agent) as sock:
        sock.sendall(data)
        return read_all(sock, wait)


def read_all(sock: socket.socket, wait: float) -> bytes:
    sock.settimeout(wait)
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except TimeoutError:
        pass
    return received


def read_until_closed(sock: socket.socket) -> bytes:
    received = b""
    with contextlib.suppress(ConnectionResetError):  # closed with our bytes unread: a reset
        while chunk := sock.recv(65536):
            received += chunk
    return received


def get_from(agent, path: str, source: str = "127.0.0.2", **headers: str) -> tuple[int, bytes]:
    """GET over a connection from another loopback address (another host on the LAN)."""
    connection = http.client.HTTPConnection(
        "127.0.0.1", agent.http_port, timeout=5, source_address=(source, 0)
    )
    try:
        connection.request("GET", path, headers=headers)
        answer = connection.getresponse()
        return answer.status, answer.read()
    finally:
        connection.close()


def still_serving(agent, client) -> tuple[float, float]:
    """Return the seconds of a /healthz from another host and of an MQTT job, both answered."""
    started = time.monotonic()
    assert get_from(agent, "/healthz")[0] == 200
    health_s = time.monotonic() - started
    started = time.monotonic()
    assert generate(client, agent)["status"] == "ok"
    return health_s, time.monotonic() - started


def statuses(answer: bytes) -> list[int]:
    """The status codes of every response in what a connection received (a body need not end
    in a line break, so a response may start anywhere)."""
    return [int(code) for code in re.findall(rb"HTTP/1\.[01] (\d{3}) ", answer)]


def rss_bytes(agent, field: str = "VmRSS") -> int:
    """The daemon's resident memory now (VmRSS) or at its peak (VmHWM)."""
    status = Path(f"/proc/{agent.process.pid}/status").read_text()
    line = next(line for line in status.splitlines() if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def jobs_created(agent) -> float:
    return agent.metric("edgeai_requests_total", outcome="accepted", mode="txt2img") or 0.0


def post(agent, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
    request = urllib.request.Request(agent.url + path, data=body, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


BEARER = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}


def test_a_negative_content_length_is_refused_and_its_stream_not_read(guarded_agent):
    before = rss_bytes(guarded_agent)
    with connect(guarded_agent) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n")
        sent = 0
        chunk = b"A" * 65536
        try:
            while sent < 200 * 2**20:  # what took the old server from 46 MB to 459 MB
                sock.sendall(chunk)
                sent += len(chunk)
        except OSError:
            pass  # the server closed the connection: what it should do
        answer = read_all(sock, 2.0)
    assert statuses(answer) in ([400], [])  # refused, or closed before reading further
    assert sent < 200 * 2**20, "the server read a 200 MiB body of a negative length"
    assert rss_bytes(guarded_agent) - before < 20 * 2**20
    assert guarded_agent.http_get("/healthz")[0] == 200


@pytest.mark.parametrize(
    "head",
    [
        b"Content-Length: abc",
        b"Content-Length: 6_0",
        b"Content-Length: +60",
        b"Content-Length: 10\r\nContent-Length: 60",
        b"Content-Length: 60\r\nTransfer-Encoding: chunked",
        b"Transfer-Encoding: chunked, identity",
    ],
    ids=["letters", "underscore", "plus", "two-lengths", "length-and-chunked", "bad-coding"],
)
def test_ambiguous_framing_is_answered_400_and_the_connection_closed(guarded_agent, head):
    smuggled = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    body = b'{"prompt": "x"}'.ljust(60) + smuggled
    answer = exchange(
        guarded_agent,
        b"POST /api/jobs HTTP/1.1\r\nHost: x\r\n" + head + b"\r\n\r\n" + body,
    )
    assert statuses(answer) == [400], answer[:300]


@pytest.mark.parametrize("path", [b"/nope", b"/api/jobs"], ids=["not-found", "unauthorized"])
def test_the_body_of_a_request_answered_early_is_never_a_second_request(guarded_agent, path):
    smuggled = b"POST /api/jobs HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
    answer = exchange(
        guarded_agent,
        b"POST " + path + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(smuggled)).encode() + b"\r\n\r\n" + smuggled,
    )
    assert len(statuses(answer)) == 1, answer


def test_a_chunked_body_is_read_as_one_and_bounded(guarded_agent):
    body = json.dumps({"prompt": "chunked apple", "id": "chunked-1"}).encode()
    chunks = b"".join(
        f"{len(part):x}\r\n".encode() + part + b"\r\n" for part in (body[:10], body[10:])
    )
    head = (
        b"POST /api/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode() + b"\r\n"
        b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    assert statuses(exchange(guarded_agent, head + chunks + b"0\r\n\r\n")) == [202]
    # 16 KiB is the bound; 64 KiB in 1 KiB chunks, with no Content-Length to check first.
    many = (b"400\r\n" + b" " * 1024 + b"\r\n") * 64 + b"0\r\n\r\n"
    answer = exchange(guarded_agent, head + many)
    assert statuses(answer) == [413]
    assert b"payload_too_large" in answer


def test_a_connection_that_never_finishes_its_request_is_closed(guarded_agent):
    with connect(guarded_agent) as silent, connect(guarded_agent) as half:
        half.sendall(b"GET /healthz HT")
        started = time.monotonic()
        for sock in (silent, half):
            sock.settimeout(IDLE_TIMEOUT_S + 5)
            assert sock.recv(1024) == b""  # closed by the server, nothing answered
        assert time.monotonic() - started < IDLE_TIMEOUT_S + 4


def test_a_body_that_never_arrives_is_answered_408(guarded_agent):
    with connect(guarded_agent) as sock:
        sock.sendall(
            b"POST /api/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + TOKEN.encode()
            + b'\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"prompt"'
        )
        answer = read_all(sock, IDLE_TIMEOUT_S + 5)
    assert statuses(answer) == [408]
    assert guarded_agent.metric("edgeai_http_refusals_total", reason="body_timeout") >= 1


def test_a_signature_that_is_not_ascii_is_answered(guarded_agent):
    answer = exchange(guarded_agent, b"GET /images/x.png?sig=%C3%A9%00 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert statuses(answer) == [401]
    answer = exchange(guarded_agent, b"GET /images/x.png?sig=\xc3\xa9 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert statuses(answer) in ([400], [401])
    assert "Traceback" not in guarded_agent.log()


def test_writes_from_another_sites_page_are_refused(broker, make_agent):
    # Authentication off: only the origin checks stand between a web page and the queue.
    agent = make_agent(broker, EDGEAI_HTTP_AUTH="false")
    body = json.dumps({"prompt": "from evil.example"}).encode()
    host = f"127.0.0.1:{agent.http_port}"
    before = jobs_created(agent)
    for headers in (
        {"Content-Type": "application/json", "Origin": "http://evil.example"},
        {"Content-Type": "application/json", "Origin": "null"},
        {"Content-Type": "application/json", "Sec-Fetch-Site": "cross-site"},
        {"Content-Type": "application/json", "Sec-Fetch-Site": "same-site"},
    ):
        status, answer = post(agent, "/api/jobs", body, headers)
        assert status == 403, headers
        assert json.loads(answer)["error"]["code"] == "cross_site"
    status, _ = post(agent, "/api/jobs/x/cancel", b"", {"Origin": "http://evil.example"})
    assert status == 403
    # What an HTML form can send (text/plain carrying JSON), without any origin header.
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data"):
        status, answer = post(agent, "/api/jobs", body, {"Content-Type": content_type})
        assert status == 415, content_type
    assert jobs_created(agent) == before
    assert agent.metric("edgeai_http_refusals_total", reason="cross_site") == 5
    assert agent.metric("edgeai_http_refusals_total", reason="unsupported_media_type") == 3
    # The page's own writes, and clients that are not browsers, go through.
    same = {"Content-Type": "application/json", "Origin": f"http://{host}"}
    assert post(agent, "/api/jobs", body, same)[0] == 202
    fetch = {"Content-Type": "application/json", "Sec-Fetch-Site": "same-origin"}
    assert post(agent, "/api/jobs", body, fetch)[0] == 202
    assert post(agent, "/api/jobs", body, {"Content-Type": "application/json"})[0] == 202
    # Behind a proxy that rewrites Host, the original host is in X-Forwarded-Host.
    proxied = {**same, "Origin": "https://pi.example", "X-Forwarded-Host": "pi.example"}
    assert post(agent, "/api/jobs", body, proxied)[0] == 202


def test_the_page_says_who_may_frame_it(broker, make_agent):
    agent = make_agent(broker, EDGEAI_HTTP_FRAME_ANCESTORS='["http://ha.example:8123"]')
    status, headers, _ = agent.http_get("/")
    assert status == 200
    policy = headers["Content-Security-Policy"]
    assert "frame-ancestors 'self' http://ha.example:8123" in policy
    assert "script-src 'self'" in policy
    assert headers["X-Content-Type-Options"] == "nosniff"


def test_500_idle_and_half_sent_connections_stop_nothing(module_broker, make_agent, client):
    agent = make_agent(module_broker, EDGEAI_HTTP_IDLE_TIMEOUT_S="8")
    generate(client, agent)  # warm: the first job's memory is not the connections'
    before = rss_bytes(agent)
    held = []
    try:
        for index in range(500):
            sock = connect(agent)
            held.append(sock)
            if index % 2:
                # Past the per-address cap the server has answered 503 and closed already.
                with contextlib.suppress(OSError):
                    sock.sendall(b"POST /api/jobs HTTP/1.1\r\nHost: x\r\nContent-Le")
        # From another host: this one holds all it may (the rest were answered 503, closed).
        health_s, job_s = still_serving(agent, client)
        during = rss_bytes(agent)
        print(
            f"/healthz {health_s * 1000:.0f} ms, an MQTT job {job_s:.2f} s with 500 connections "
            f"held; daemon RSS {before / 2**20:.1f} -> {during / 2**20:.1f} MiB, peak "
            f"{rss_bytes(agent, 'VmHWM') / 2**20:.1f} MiB"
        )
        assert health_s < 1.0
        assert during - before < 50 * 2**20
        # The idle timeout then closes every one of them.
        for sock in held:
            sock.settimeout(30)
            assert statuses(read_until_closed(sock)) in ([], [503])
    finally:
        for sock in held:
            sock.close()
    assert agent.http_get("/healthz")[0] == 200
