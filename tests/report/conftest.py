"""A real webhook receiver for the alert tests: an HTTP(S) server on 127.0.0.1 recording requests."""

from __future__ import annotations

import json
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest


@dataclass
class Delivery:
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Receiver:
    """Records every POST; answers ``status`` (settable, e.g. 500 to fail deliveries)."""

    server: ThreadingHTTPServer
    scheme: str = "http"
    status: int = 200
    deliveries: list[Delivery] = field(default_factory=list)

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    def url(self, path: str = "/hook") -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}{path}"


def _start(tls: ssl.SSLContext | None = None) -> tuple[Receiver, threading.Thread]:
    receiver: Receiver

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - stdlib name
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length)
            receiver.deliveries.append(Delivery(self.path, dict(self.headers.items()), body))
            self.send_response(receiver.status)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    receiver = Receiver(server, scheme="https" if tls else "http")
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    return receiver, thread


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    rec, thread = _start()
    yield rec
    rec.server.shutdown()
    rec.server.server_close()
    thread.join(5)


@pytest.fixture
def tls_receiver(tmp_path: Path) -> Iterator[tuple[Receiver, Path]]:
    """An HTTPS receiver whose certificate a throw-away CA signed; yields it and the CA file."""
    from backupd.simulator.pki import generate_pki

    pki = generate_pki(tmp_path / "webhook-pki")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki.server_cert, pki.server_key)
    rec, thread = _start(ctx)
    yield rec, pki.ca_file
    rec.server.shutdown()
    rec.server.server_close()
    thread.join(5)
