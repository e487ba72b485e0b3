"""The daemon's HTTP server under hostile clients: hundreds of idle connections, requests
trickled byte by byte, oversized and garbage requests, clients that vanish mid-answer.

Threads stay bounded (one selector thread and ``HTTP_WORKERS`` workers, however many sockets
connect), every idle or unfinished connection is closed after ``daemon.http_timeout_seconds``,
a normal request is answered meanwhile, and the only output is JSON log lines.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from structlog.testing import capture_logs

from backupd.daemon.http import HTTP_WORKERS, KEEPALIVE_REQUESTS, MAX_REQUEST_HEAD, HttpServer
from backupd.simulator.server import NodeSimulator

TIMEOUT = 1.5  # daemon.http_timeout_seconds in these tests


@pytest.fixture
def served(app_factory) -> Iterator[Callable[..., tuple[tuple[str, int], int]]]:  # type: ignore[no-untyped-def]
    """Starts the app's HTTP server with the given limits: its address and the most threads the
    process may have while it serves (those before it, its selector thread, its workers)."""
    servers: list[HttpServer] = []

    def start(**daemon: object) -> tuple[tuple[str, int], int]:
        app = app_factory()
        app.config.daemon.http_timeout_seconds = TIMEOUT
        for key, value in daemon.items():
            setattr(app.config.daemon, key, value)
        server = app.http_server("127.0.0.1:0")
        servers.append(server)
        before = threading.active_count()
        return server.start(), before + 1 + HTTP_WORKERS

    yield start
    for server in servers:
        server.stop()


def connect(address: tuple[str, int], n: int) -> list[socket.socket]:
    socks = []
    for _ in range(n):
        s = socket.create_connection(address, timeout=10)
        socks.append(s)
    return socks


def closed_by_server(sock: socket.socket, within: float) -> bool:
    """True once the server has closed ``sock`` (EOF or reset), waiting up to ``within`` s."""
    sock.settimeout(within)
    try:
        while sock.recv(4096):
            pass  # an error answer (431, 400) before the close is fine
        return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def get(address: tuple[str, int], path: str = "/api/v1/archives") -> httpx.Response:
    with httpx.Client(base_url=f"http://{address[0]}:{address[1]}", timeout=5) as client:
        return client.get(path)


def test_500_idle_connections_cost_no_thread_and_are_closed_by_the_timeout(served) -> None:  # type: ignore[no-untyped-def]
    address, most_threads = served(http_max_connections=1000)
    with capture_logs() as logs:
        idle = connect(address, 500)
        try:
            time.sleep(0.3)
            assert threading.active_count() <= most_threads, "idle connections must not take threads"
            answer = get(address)
            assert answer.status_code == 200 and answer.json() == []
            assert threading.active_count() <= most_threads
            started = time.monotonic()
            still_open = [s for s in idle if not closed_by_server(s, TIMEOUT + 5 - (time.monotonic() - started))]
            assert still_open == [], f"{len(still_open)} idle connection(s) outlived the timeout"
        finally:
            for s in idle:
                s.close()
    timed_out = [e for e in logs if e["event"] == "http_connection_timed_out"]
    assert len(timed_out) == 500 and {e["log_level"] for e in timed_out} == {"debug"}
    assert {e["waiting_for"] for e in timed_out} == {"a request"}
    assert not [e for e in logs if e["log_level"] in ("warning", "error", "critical")], logs


def test_requests_trickled_byte_by_byte_are_dropped_after_the_timeout(served) -> None:  # type: ignore[no-untyped-def]
    """Slowloris: each client keeps sending one more header byte; the deadline is for the whole
    request, so every one of them is dropped after the timeout, none holding a worker."""
    address, most_threads = served()
    slow = connect(address, 50)
    for s in slow:
        s.sendall(b"GET /api/v1/archives HTTP/1.1\r\nHost: x\r\n")
    stop = threading.Event()

    def trickle() -> None:
        while not stop.wait(0.2):
            for s in slow:
                try:
                    s.sendall(b"X")
                except OSError:
                    pass

    trickler = threading.Thread(target=trickle)
    trickler.start()
    try:
        with capture_logs() as logs:
            time.sleep(0.5)
            assert get(address).status_code == 200
            assert threading.active_count() <= most_threads + 1  # + the trickling thread of this test
            assert all(closed_by_server(s, TIMEOUT + 5) for s in slow)
    finally:
        stop.set()
        trickler.join()
        for s in slow:
            s.close()
    assert {e["waiting_for"] for e in logs if e["event"] == "http_connection_timed_out"} == {"the rest of a request"}


def test_past_max_connections_the_longest_idle_connection_makes_room(served) -> None:  # type: ignore[no-untyped-def]
    address, _ = served(http_max_connections=8, http_timeout_seconds=60)
    idle = connect(address, 8)
    try:
        time.sleep(0.2)
        with capture_logs() as logs:
            assert get(address).status_code == 200
        assert [e["event"] for e in logs if e["event"].startswith("http_")] == ["http_connection_evicted"]
        assert closed_by_server(idle[0], 5), "the oldest idle connection is the one closed"
        assert not any(closed_by_server(s, 0.1) for s in idle[1:])
    finally:
        for s in idle:
            s.close()


def test_keep_alive_is_bounded_and_idle_keep_alive_connections_time_out(served) -> None:  # type: ignore[no-untyped-def]
    address, _ = served()
    sock = socket.create_connection(address, timeout=5)
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    sock.sendall(request * KEEPALIVE_REQUESTS)  # pipelined: answered in order on one connection
    answers = b""
    while answers.count(b"HTTP/1.1 200") < KEEPALIVE_REQUESTS:
        chunk = sock.recv(65536)
        assert chunk, f"closed after {answers.count(b'HTTP/1.1 200')} answers"
        answers += chunk
    assert answers.count(b"Connection: close") == 1  # the last answer says it is the last
    assert closed_by_server(sock, 2)
    sock.close()

    kept = socket.create_connection(address, timeout=5)
    kept.sendall(request)
    assert kept.recv(65536).startswith(b"HTTP/1.1 200")
    started = time.monotonic()
    assert closed_by_server(kept, TIMEOUT + 5)
    assert time.monotonic() - started >= TIMEOUT - 0.2, "an idle kept-alive connection gets the whole timeout"
    kept.close()


def test_bad_requests_get_an_error_and_a_closed_connection(served) -> None:  # type: ignore[no-untyped-def]
    address, _ = served()
    cases = {
        "oversized head": b"GET / HTTP/1.1\r\nX-Pad: " + b"a" * (MAX_REQUEST_HEAD + 10),
        "garbage request line": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",  # a TLS hello, roughly
        "unknown method": b"BREW /pot HTTP/1.1\r\nHost: x\r\n\r\n",
        "HTTP/0.9 nonsense": b"GET\r\n\r\n",
    }
    with capture_logs() as logs:
        for name, payload in cases.items():
            s = socket.create_connection(address, timeout=5)
            s.sendall(payload)
            first = s.recv(200)
            assert first.startswith(b"HTTP/1.") and first.split()[1] in (b"400", b"431", b"501"), (name, first)
            assert closed_by_server(s, 5), name
            s.close()
        assert get(address).status_code == 200
    assert not [e for e in logs if e["log_level"] in ("warning", "error", "critical")], logs


def test_clients_vanishing_mid_request_are_debug_lines_not_tracebacks(served) -> None:  # type: ignore[no-untyped-def]
    address, _ = served()
    with capture_logs() as logs:
        for _ in range(30):
            s = socket.create_connection(address, timeout=5)
            s.sendall(b"GET /api/v1/archives HTTP/1.1\r\nHost: x\r\n\r\n")
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()  # a reset instead of reading the answer
        for _ in range(30):
            s = socket.create_connection(address, timeout=5)
            s.sendall(b"GET /api/v1/arch")
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()
        time.sleep(0.5)
        assert get(address).status_code == 200
    assert not [e for e in logs if e["log_level"] in ("warning", "error", "critical") or "exc_info" in e], logs


# -- the real daemon process: its stderr is the proof -------------------------------------------


def _threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError("no Threads line")


def test_the_daemon_under_hostile_clients_writes_only_json_lines(tmp_path: Path, sim: NodeSimulator) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cfg = tmp_path / "config.toml"
    cfg.write_text(
        f'[database]\nurl = "sqlite:///{tmp_path / "catalog.db"}"\n'
        f'[kubelet]\nurl = "{sim.url}"\nca_file = "{sim.ca_file}"\ncert_file = "{sim.client_cert}"\n'
        f'key_file = "{sim.client_key}"\ncheckpoint_dir = "{sim.checkpoint_dir}"\nnode_name = "sim-node"\n'
        f'[daemon]\nmin_free_space = 0\nhttp_listen = "127.0.0.1:{port}"\nhttp_timeout_seconds = {TIMEOUT}\n'
        f'http_max_connections = 1000\n'
        f'[[backends]]\nname = "local"\ntype = "filesystem"\npath = "{tmp_path / "backend"}"\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("BACKUPD_")}
    backupd = [sys.executable, "-m", "backupd", "--config", str(cfg)]
    subprocess.run([*backupd, "db", "upgrade"], env=env, check=True, capture_output=True, timeout=60)
    stderr = tmp_path / "daemon.stderr"
    with open(stderr, "w") as err:
        daemon = subprocess.Popen([*backupd, "--log-level", "debug", "run"], env=env, stdout=subprocess.DEVNULL,
                                  stderr=err)
    address = ("127.0.0.1", port)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if get(address, "/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert daemon.poll() is None and time.monotonic() < deadline, stderr.read_text()
            time.sleep(0.1)
        for _ in range(2):
            assert get(address, "/metrics").status_code == 200
        baseline = _threads(daemon.pid)

        idle = connect(address, 400)
        partial = connect(address, 50)
        for s in partial:
            s.sendall(b"GET /api/v1/runs HTTP/1.1\r\nHost: x\r\n")
        for _ in range(30):
            s = socket.create_connection(address, timeout=5)
            s.sendall(b"GET /api/v1/report HTTP/1.1\r\nHost: x\r\n\r\n")
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()
        for payload in (b"\x16\x03\x01\x00\xff" + os.urandom(200) + b"\r\n\r\n", b"X" * (MAX_REQUEST_HEAD + 100)):
            s = socket.create_connection(address, timeout=5)
            s.sendall(payload)
            s.close()
        time.sleep(0.5)
        during = _threads(daemon.pid)
        assert during <= baseline + HTTP_WORKERS, (baseline, during)
        assert get(address, "/metrics").status_code == 200
        assert get(address, "/api/v1/archives").status_code == 200
        assert all(closed_by_server(s, TIMEOUT + 5) for s in idle + partial)
        for s in idle + partial:
            s.close()
    finally:
        daemon.send_signal(signal.SIGTERM)
        code = daemon.wait(30)
    lines = stderr.read_text().splitlines()
    assert code == 0, lines[-20:]
    events = [json.loads(line) for line in lines]  # every line is one JSON document
    assert sum(e["event"] == "http_connection_timed_out" for e in events) == 450
    assert not [e for e in events if e["level"] in ("error", "critical")], [e for e in events if e["level"] == "error"]
