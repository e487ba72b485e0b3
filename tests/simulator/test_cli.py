"""``simulate-node`` as a user runs it: prints what a config needs, serves, stops on SIGTERM."""

from __future__ import annotations

import re
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx

RUN = "from backupd.simulator.cli import simulate_node; simulate_node()"


def test_simulate_node_serves_until_sigterm(tmp_path: Path):
    faults = tmp_path / "faults.yaml"
    faults.write_text("- {action: respond, method: GET, path: /pods, status: 503, body: later, times: 1}\n")
    proc = subprocess.Popen(
        [sys.executable, "-c", RUN, "--state-dir", str(tmp_path / "state"), "--port", "0",
         "--memory-size", "1Mi", "--faults", str(faults), "--token", "tok=robot", "--latency", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        lines: list[str] = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line, proc.stderr.read()
            lines.append(line)
            if line.startswith("Ctrl-C"):
                break
        out = "".join(lines)
        url = re.search(r'^url = "(.+)"$', out, re.M).group(1)
        ca = re.search(r'^ca_file = "(.+)"$', out, re.M).group(1)
        cert = re.search(r'^cert_file = "(.+)"$', out, re.M).group(1)
        key = re.search(r'^key_file = "(.+)"$', out, re.M).group(1)
        assert "default/debug/shell (running)" in out
        ctx = ssl.create_default_context(cafile=ca)
        ctx.load_cert_chain(cert, key)
        with httpx.Client(base_url=url, verify=ctx) as c:
            assert c.get("/pods").status_code == 503  # the fault from the file
            assert c.get("/pods").status_code == 200
            assert c.post("/checkpoint/default/debug/shell").status_code == 200
        with httpx.Client(base_url=url, verify=ssl.create_default_context(cafile=ca)) as c:
            assert c.get("/pods", headers={"Authorization": "Bearer tok"}).status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert proc.stdout.read().strip().endswith("stopped")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_simulate_node_rejects_a_bad_topology(tmp_path: Path):
    bad = tmp_path / "topology.yaml"
    bad.write_text("pods:\n  - {namespace: default, containers: [{name: c, image: i}]}\n")
    out = subprocess.run([sys.executable, "-c", RUN, "--state-dir", str(tmp_path), "--topology", str(bad)],
                         capture_output=True, text=True, timeout=30)  # fmt: skip
    assert out.returncode == 2
    assert "a pod without an owner needs a name" in out.stderr
