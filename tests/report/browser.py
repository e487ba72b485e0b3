"""Headless Chromium driven over the DevTools protocol, for the HTML report tests.

:class:`Browser` opens a page and tells what a person would care about: every console error,
uncaught exception and browser log error, every URL the page requested, screenshots, and the
answer to a JavaScript expression evaluated in the page. Debian's ``chromium`` package;
``websocket-client`` from PyPI speaks the protocol.
"""

from __future__ import annotations

import base64
import json
import shutil
import struct
import subprocess
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest


def chromium_or_skip() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("headless Chromium is not installed (Debian package: apt-get install chromium)")
    return path


class _Session:
    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.next_id = 0
        self.events: list[dict[str, Any]] = []

    def call(self, method: str, params: dict[str, Any] | None = None, session: str | None = None) -> dict[str, Any]:
        self.next_id += 1
        message: dict[str, Any] = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        self.ws.send(json.dumps(message))
        while True:
            reply = json.loads(self.ws.recv())
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise AssertionError(f"DevTools {method} failed: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str, deadline: float) -> None:
        while time.monotonic() < deadline:
            event = json.loads(self.ws.recv())
            self.events.append(event)
            if event.get("method") == method:
                return
        raise AssertionError(f"no {method} before the deadline")

    def drain(self, seconds: float) -> None:
        import websocket

        timeout = self.ws.gettimeout()
        self.ws.settimeout(seconds)
        try:
            while True:
                self.events.append(json.loads(self.ws.recv()))
        except websocket.WebSocketTimeoutException:
            pass
        finally:
            self.ws.settimeout(timeout)


class Browser:
    """One headless Chromium with one page. ``with Browser(workdir) as b: b.open(url)``."""

    def __init__(self, workdir: Path, *, width: int = 1200, height: int = 2000, timeout: float = 45.0) -> None:
        self.websocket = pytest.importorskip("websocket", reason="needs websocket-client (pip install .[test])")
        self.binary = chromium_or_skip()
        self.workdir, self.width, self.height, self.timeout = workdir, width, height, timeout

    def __enter__(self) -> Browser:
        profile = self.workdir / "chromium-profile"
        profile.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / "chromium.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [self.binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-default-apps", "--disable-extensions", f"--user-data-dir={profile}",
             "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0", "about:blank"],
            stdout=self._log, stderr=self._log, stdin=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + self.timeout
            active = profile / "DevToolsActivePort"  # Chromium writes "<port>\n<browser path>" here
            while not (active.exists() and len(active.read_text().split()) >= 2):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"Chromium did not start: {self.log_path.read_text()[-2000:]}")
                time.sleep(0.05)
            port, path = active.read_text().split()[:2]
            self.ws = self.websocket.create_connection(f"ws://127.0.0.1:{port}{path}", timeout=self.timeout,
                                                       suppress_origin=True)
            self.s = _Session(self.ws)
            target = self.s.call("Target.createTarget", {"url": "about:blank"})["targetId"]
            self.sid = self.s.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
            for domain in ("Runtime", "Log", "Page", "Network"):
                self.s.call(f"{domain}.enable", session=self.sid)
            self.s.call("Emulation.setDeviceMetricsOverride", {"width": self.width, "height": self.height,
                                                               "deviceScaleFactor": 1, "mobile": False},
                        session=self.sid)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if getattr(self, "ws", None) is not None:
            self.ws.close()
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()

    def open(self, url: str) -> None:
        """Navigate and wait for the load event (and half a second for late messages)."""
        self.s.call("Page.navigate", {"url": url}, session=self.sid)
        self.s.wait_for("Page.loadEventFired", time.monotonic() + self.timeout)
        self.s.drain(0.5)

    def evaluate(self, expression: str) -> Any:
        result = self.s.call("Runtime.evaluate", {"expression": expression, "returnByValue": True}, session=self.sid)
        if "exceptionDetails" in result:
            raise AssertionError(f"the test's expression failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def screenshot(self, clip: dict[str, float] | None = None) -> bytes:
        params: dict[str, Any] = {"format": "png"}
        if clip is not None:
            params["clip"] = {**clip, "scale": 1}
        return base64.b64decode(self.s.call("Page.captureScreenshot", params, session=self.sid)["data"])

    @property
    def errors(self) -> list[str]:
        """Uncaught exceptions, console errors and the browser's own error log entries (failed
        loads, Content-Security-Policy refusals)."""
        out = []
        for e in self.s.events:
            method, params = e.get("method"), e.get("params", {})
            if method == "Runtime.exceptionThrown":
                details = params["exceptionDetails"]
                out.append(f"exception: {details.get('exception', {}).get('description') or details.get('text')}")
            elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                out.append("console: " + " ".join(str(a.get("value", a.get("description"))) for a in params["args"]))
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                out.append(f"log ({params['entry']['source']}): {params['entry']['text']}")
        return out

    @property
    def requests(self) -> list[str]:
        return [e["params"]["request"]["url"] for e in self.s.events if e.get("method") == "Network.requestWillBeSent"]


# -- PNG decoding (zlib + struct), enough for Chromium's 8-bit RGB(A) screenshots ----------------


@dataclass
class Image:
    width: int
    height: int
    channels: int
    rows: list[bytes]

    def pixel(self, x: int, y: int) -> tuple[int, int, int]:
        i = x * self.channels
        r, g, b = self.rows[y][i : i + 3]
        return r, g, b

    def colours(self, step: int = 4) -> set[tuple[int, int, int]]:
        return {self.pixel(x, y) for y in range(0, len(self.rows), step) for x in range(0, self.width, step)}


def decode_png(data: bytes, max_rows: int | None = None) -> Image:
    """Decode an 8-bit RGB(A) PNG; ``max_rows`` stops after the top rows (pure Python is slow)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        elif kind == b"IEND":
            break
    assert header is not None
    width, height, depth, colour_type, _, _, interlace = header
    assert depth == 8 and colour_type in (2, 6) and interlace == 0, header
    channels = 3 if colour_type == 2 else 4
    raw = zlib.decompress(idat)
    stride = width * channels
    rows: list[bytes] = []
    prev = bytearray(stride)
    for y in range(min(height, max_rows or height)):
        start = y * (stride + 1)
        kind, line = raw[start], bytearray(raw[start + 1 : start + 1 + stride])
        for i in range(stride):
            a = line[i - channels] if i >= channels else 0
            b = prev[i]
            c = prev[i - channels] if i >= channels else 0
            if kind == 1:
                line[i] = (line[i] + a) & 0xFF
            elif kind == 2:
                line[i] = (line[i] + b) & 0xFF
            elif kind == 3:
                line[i] = (line[i] + (a + b) // 2) & 0xFF
            elif kind == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 0xFF
        rows.append(bytes(line))
        prev = line
    return Image(width, height, channels, rows)
