"""The simulated kubelet API: authentication, authorisation, endpoints, errors, faults."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import ssl
import stat
import tarfile
import threading
import time
from pathlib import Path
from zoneinfo import ZoneInfo

import httpx
import pytest

from backupd.errors import InvalidInput
from backupd.simulator import Fault, NodeSimulator
from backupd.simulator.topology import ContainerSpec, PodSpec

from .conftest import pod_named

NAME = re.compile(
    r"^checkpoint-(?P<pod>[a-z0-9-]+)_(?P<ns>[a-z0-9-]+)-(?P<ctr>[a-z0-9-]+)-"
    r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(Z|[+-]\d\d:\d\d)\.tar$"
)


def nginx_url(sim: NodeSimulator) -> str:
    pod = pod_named(sim, "web-")
    return f"/checkpoint/default/{pod.name}/nginx"


def ssl_client(sim: NodeSimulator, ctx: ssl.SSLContext, **kwargs) -> httpx.Client:
    return httpx.Client(base_url=sim.url, verify=ctx, timeout=kwargs.pop("timeout", 10), **kwargs)


def ca_only(sim: NodeSimulator) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(sim.ca_file))


# -- authentication and authorisation ---------------------------------------------------------


def test_mtls_with_the_trusted_client_cert(sim, client):
    r = client.get("/pods")
    assert r.status_code == 200
    assert sim.requests[-1].user == "backupd"


def test_untrusted_or_missing_client_cert_fails_the_tls_handshake(sim, pki):
    rogue = pki.issue_untrusted_client_cert("rogue")
    for ctx in (sim.client_ssl_context((rogue.cert_file, rogue.key_file)), ca_only(sim)):
        with ssl_client(sim, ctx) as c, pytest.raises((httpx.ConnectError, httpx.ReadError)) as err:
            c.get("/pods")
        assert "SSL" in str(err.value) or "alert" in str(err.value)
    # the server notes the failure on its own thread, possibly after the client gave up
    deadline = time.monotonic() + 5
    while len(sim.tls_failures) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(sim.tls_failures) == 2
    assert sim.requests == []


def test_bearer_tokens(make_sim):
    sim = make_sim(tokens={"s3cret": "system:serviceaccount:backupd:backupd"})
    with ssl_client(sim, ca_only(sim)) as c:
        missing = c.get("/pods")
        wrong = c.get("/pods", headers={"Authorization": "Bearer nope"})
        right = c.get("/pods", headers={"Authorization": "Bearer s3cret"})
    assert (missing.status_code, missing.text) == (401, "Unauthorized")
    assert (wrong.status_code, wrong.text) == (401, "Unauthorized")
    assert right.status_code == 200
    assert sim.requests[-1].user == "system:serviceaccount:backupd:backupd"
    with ssl_client(sim, sim.client_ssl_context()) as c:  # certs still work beside tokens
        assert c.get("/pods").status_code == 200


def test_forbidden_bodies_are_the_kubelets(make_sim):
    sim = make_sim(allowed_users=["someone-else"])
    with ssl_client(sim, sim.client_ssl_context()) as c:
        checkpoint = c.post(nginx_url(sim))
        pods = c.get("/pods")
        wrong_verb = c.get(nginx_url(sim))
    assert checkpoint.status_code == 403
    assert checkpoint.text == "Forbidden (user=backupd, verb=create, resource=nodes, subresource(s)=[checkpoint])\n"
    assert pods.status_code == 403
    assert pods.text == "Forbidden (user=backupd, verb=get, resource=nodes, subresource(s)=[pods proxy])\n"
    assert wrong_verb.text == "Forbidden (user=backupd, verb=get, resource=nodes, subresource(s)=[checkpoint])\n"


def test_per_subresource_permissions(make_sim, pki):
    sim = make_sim(allowed_users={"backupd": ["pods"], "ops": ["*"]})
    ops = pki.issue_client_cert("ops", cn="ops")
    with ssl_client(sim, sim.client_ssl_context()) as c:
        assert c.get("/pods").status_code == 200
        assert c.post(nginx_url(sim)).status_code == 403
    with ssl_client(sim, sim.client_ssl_context((ops.cert_file, ops.key_file))) as c:
        assert c.post(nginx_url(sim)).status_code == 200
    sim.set_allowed_users(None)
    with ssl_client(sim, sim.client_ssl_context()) as c:
        assert c.post(nginx_url(sim)).status_code == 200


# -- /pods -------------------------------------------------------------------------------------


def test_pods_is_a_v1_podlist(sim, client):
    r = client.get("/pods")
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    head = {k: body[k] for k in ("kind", "apiVersion", "metadata")}
    assert head == {"kind": "PodList", "apiVersion": "v1", "metadata": {}}
    pods = {(p["metadata"]["namespace"], p["metadata"]["name"]): p for p in body["items"]}
    assert len(pods) == len(sim.pods)

    web = next(p for (ns, name), p in pods.items() if name.startswith("web-"))
    owner = web["metadata"]["ownerReferences"][0]
    tpl = web["metadata"]["labels"]["pod-template-hash"]
    assert owner["kind"] == "ReplicaSet" and owner["name"] == f"web-{tpl}" and owner["controller"] is True
    assert web["spec"]["nodeName"] == sim.node_name
    containers = web["spec"]["containers"]
    assert containers == [containers[0]] and containers[0]["name"] == "nginx"
    status = web["status"]["containerStatuses"][0]
    assert re.fullmatch(r"cri-o://[0-9a-f]{64}", status["containerID"])
    assert status["ready"] is True and "startedAt" in status["state"]["running"]
    assert status["imageID"].startswith("docker.io/library/nginx@sha256:")
    assert web["status"]["phase"] == "Running" and web["status"]["podIP"]

    db = pods[("shop", "db-0")]
    assert db["metadata"]["ownerReferences"][0]["kind"] == "StatefulSet"
    assert db["metadata"]["ownerReferences"][0]["name"] == "db"
    assert [c["name"] for c in db["status"]["containerStatuses"]] == ["postgres", "exporter"]
    assert "ownerReferences" not in pods[("default", "debug")]["metadata"]
    agent = next(p for (ns, name), p in pods.items() if name.startswith("log-agent-"))
    assert agent["metadata"]["ownerReferences"][0]["kind"] == "DaemonSet"
    cart = next(p for (ns, name), p in pods.items() if name.startswith("cart-"))
    waiting = cart["status"]["containerStatuses"][0]
    assert waiting["state"]["waiting"]["reason"] == "CrashLoopBackOff" and waiting["ready"] is False
    assert "terminated" in waiting["lastState"]


def test_pods_only_allows_get(client):
    r = client.post("/pods")
    assert (r.status_code, r.text, r.headers["allow"]) == (405, "405: Method Not Allowed", "GET")


# -- checkpoint ------------------------------------------------------------------------------


def test_checkpoint_writes_the_kubelets_file(sim, client):
    pod = pod_named(sim, "web-")
    r = client.post(f"/checkpoint/default/{pod.name}/nginx?timeout=30")
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    path = Path(r.json()["items"][0])
    assert r.text == f'{{"items":["{path}"]}}'
    assert path.is_absolute() and path.parent == sim.checkpoint_dir
    m = NAME.match(path.name)
    assert m and (m["pod"], m["ns"], m["ctr"]) == (pod.name, "default", "nginx")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(sim.checkpoint_dir.stat().st_mode) == 0o700
    with tarfile.open(path) as tar:
        names = tar.getnames()
    assert {"config.dump", "spec.dump", "stats-dump", "dump.log", "rootfs-diff.tar", "checkpoint",
            "checkpoint/inventory.img", "checkpoint/pstree.img", "checkpoint/pages-1.img"} <= set(names)  # fmt: skip
    record = sim.requests[-1]
    assert (record.method, record.path, record.query, record.status) == (
        "POST", f"/checkpoint/default/{pod.name}/nginx", "timeout=30", 200)


def test_file_name_uses_the_kubelets_local_time(make_sim):
    fixed = dt.datetime(2026, 3, 13, 16, 13, 6, 900000, tzinfo=dt.UTC)
    sim = make_sim(tz=ZoneInfo("Asia/Kolkata"), clock=lambda: fixed.astimezone(ZoneInfo("Asia/Kolkata")))
    with ssl_client(sim, sim.client_ssl_context()) as c:
        path = Path(c.post(nginx_url(sim)).json()["items"][0])
    pod = pod_named(sim, "web-")
    assert path.name == f"checkpoint-{pod.name}_default-nginx-2026-03-13T21:43:06+05:30.tar"
    with tarfile.open(path) as tar:
        config = json.load(tar.extractfile("config.dump"))
    assert config["checkpointedTime"] == "2026-03-13T21:43:06.9+05:30"


def test_same_second_checkpoints_overwrite_in_place(make_sim):
    fixed = dt.datetime(2026, 3, 13, 21, 43, 6, tzinfo=dt.UTC)
    sim = make_sim(clock=lambda: fixed, memory_bytes=2 << 20)
    with ssl_client(sim, sim.client_ssl_context()) as c:
        first = c.post(nginx_url(sim)).json()["items"][0]
        size_first = os.path.getsize(first)
        sim.memory_bytes = 512 << 10
        second = c.post(nginx_url(sim)).json()["items"][0]
    assert first == second and first.endswith("-2026-03-13T21:43:06Z.tar")
    # no O_TRUNC: the smaller second archive leaves the first one's tail behind
    assert os.path.getsize(second) == size_first
    with tarfile.open(second) as tar:
        pages = tar.getmember("checkpoint/pages-1.img").size
    assert pages < (2 << 20) * 0.6


def test_checkpoints_of_one_container_are_serialised(make_sim):
    sim = make_sim(checkpoint_latency=0.5)
    db = [f"/checkpoint/shop/db-0/{c}" for c in ("postgres", "exporter")]

    def run(urls: list[str]) -> float:
        start = time.monotonic()
        with ssl_client(sim, sim.client_ssl_context()) as c:
            threads = [threading.Thread(target=c.post, args=(u,)) for u in urls]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        return time.monotonic() - start

    assert run([db[0], db[0]]) >= 1.0  # same container: one after the other
    assert run(db) < 0.95  # different containers: in parallel


@pytest.mark.parametrize(
    ("url", "status", "body"),
    [
        ("/checkpoint/default/nope/nginx", 404, "pod does not exist"),
        ("/checkpoint/default/{web}/nope", 404, "container nope does not exist"),
        ("/checkpoint/default/{web}/nginx?timeout=abc", 404, "cannot parse value of timeout parameter"),
        ("/checkpoint/default/{web}/nginx?timeout=5&timeout=1.5", 404, "cannot parse value of timeout parameter"),
        ("/checkpoint/default/{web}/nginx?timeout=-1", 500,
         "checkpointing of default/{web}/nginx failed (CheckpointContainer requires the timeout value to be > 0)"),
        ("/checkpoint/shop/{cart}/cart", 500, "checkpointing of shop/{cart}/cart failed (container cart not found)"),
        ("/checkpoint/default/{web}", 404, "404: Page Not Found"),
        ("/nothing/here", 404, "404 page not found\n"),
    ],
)  # fmt: skip
def test_error_texts_are_exact(sim, client, url, status, body):
    names = {"web": pod_named(sim, "web-").name, "cart": pod_named(sim, "cart-").name}
    r = client.post(url.format(**names))
    assert (r.status_code, r.text) == (status, body.format(**names))
    assert r.headers["content-type"] == "text/plain; charset=utf-8"


def test_wrong_method_on_checkpoint(sim, client):
    r = client.get(nginx_url(sim))
    assert (r.status_code, r.text) == (405, "405: Method Not Allowed")


def test_disabled_checkpoint_api_is_a_plain_404(make_sim):
    sim = make_sim(checkpoint_api_enabled=False)
    with ssl_client(sim, sim.client_ssl_context()) as c:
        r = c.post(nginx_url(sim))
        assert (r.status_code, r.text) == (404, "404 page not found\n")
        assert c.get("/pods").status_code == 200
    assert not any(sim.checkpoint_dir.iterdir())


def test_runtime_deadline(make_sim):
    sim = make_sim(checkpoint_latency=0.4, cri_timeout=0.2)
    with ssl_client(sim, sim.client_ssl_context()) as c:
        late = c.post(nginx_url(sim))
        raised = c.post(nginx_url(sim) + "?timeout=2")  # only a timeout above the default counts
    assert late.status_code == 500
    assert late.text.endswith("failed (rpc error: code = DeadlineExceeded desc = context deadline exceeded)")
    assert raised.status_code == 200


def test_pods_can_change_at_run_time(sim, client):
    web = pod_named(sim, "web-")
    sim.set_container_state("default", web.name, "nginx", "waiting")
    r = client.post(f"/checkpoint/default/{web.name}/nginx")
    assert r.text.endswith("failed (container nginx not found)")
    assert client.get("/pods").json()["items"][0]["status"]["containerStatuses"][0]["state"]["waiting"]
    sim.remove_pod("default", web.name)
    assert client.post(f"/checkpoint/default/{web.name}/nginx").text == "pod does not exist"
    [added] = sim.add_pod(PodSpec(namespace="extra", name="solo", containers=[ContainerSpec("app", "busybox")]))
    assert client.post("/checkpoint/extra/solo/app").status_code == 200
    assert added.name == "solo"


# -- faults ------------------------------------------------------------------------------------


def test_fault_respond_a_limited_number_of_times(sim, client):
    sim.add_fault("respond", method="POST", path="/checkpoint/*", status=503, body="busy", times=2)
    statuses = [client.post(nginx_url(sim)).status_code for _ in range(3)]
    assert statuses == [503, 503, 200]
    assert [r.fault for r in sim.requests] == ["respond", "respond", None]
    assert sim.faults == []


def test_fault_delay_does_not_block_other_requests(sim):
    sim.add_fault("delay", path="/pods", seconds=5)
    with ssl_client(sim, sim.client_ssl_context(), timeout=0.5) as c:
        start = time.monotonic()
        with pytest.raises(httpx.ReadTimeout):
            c.get("/pods")
        assert time.monotonic() - start < 1.5
    with ssl_client(sim, sim.client_ssl_context()) as c:
        start = time.monotonic()
        assert c.post(nginx_url(sim)).status_code == 200
        assert time.monotonic() - start < 2


def test_fault_delay_then_normal_answer(sim, client):
    sim.add_fault(Fault("delay", method="GET", path="/pods", seconds=0.3, times=1))
    start = time.monotonic()
    assert client.get("/pods").status_code == 200
    assert time.monotonic() - start >= 0.3


def test_stop_is_prompt_with_stalled_and_idle_connections(make_sim):
    sim = make_sim()
    sim.add_fault("delay", path="/pods", seconds=60)
    idle = ssl_client(sim, sim.client_ssl_context())
    idle.post(nginx_url(sim))  # leaves a kept-alive connection open
    errors: list[BaseException] = []

    def stalled() -> None:
        try:
            with ssl_client(sim, sim.client_ssl_context(), timeout=30) as c:
                c.get("/pods")
        except httpx.HTTPError as exc:
            errors.append(exc)

    t = threading.Thread(target=stalled)
    t.start()
    time.sleep(0.3)
    start = time.monotonic()
    sim.stop()
    assert time.monotonic() - start < 2
    t.join(5)
    assert not t.is_alive() and errors  # the stalled client saw its connection close
    idle.close()


@pytest.mark.parametrize("variant", ["partial", "headers", "immediate"])
def test_fault_reset(sim, client, variant):
    sim.add_fault("reset", path="/checkpoint/*", variant=variant, times=1)
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        client.post(nginx_url(sim))
    assert client.post(nginx_url(sim)).status_code == 200  # the client reconnects


def test_fault_hostile_paths(sim, client):
    sim.add_fault("hostile_path", path="/checkpoint/*", variant="outside", times=1)
    sim.add_fault("hostile_path", path="/checkpoint/*", variant="symlink", times=1)
    sim.add_fault("hostile_path", path="/checkpoint/*", variant="traversal", times=1)
    outside, link, traversal = (Path(client.post(nginx_url(sim)).json()["items"][0]) for _ in range(3))
    root = sim.checkpoint_dir
    assert outside.is_file() and root not in outside.parents
    assert link.parent == root and link.is_symlink() and root not in link.resolve().parents
    assert str(traversal).startswith(f"{root}/../") and root not in traversal.resolve().parents
    assert traversal.resolve().is_file()


def test_fault_unsupported_runtimes(sim, client):
    web = pod_named(sim, "web-").name
    sim.add_fault("unsupported", path="/checkpoint/*", times=1)
    sim.add_fault("unsupported", path="/checkpoint/*", variant="containerd", times=1)
    sim.add_fault("checkpoint_error", path="/checkpoint/*", message="cannot pause a paused container", times=1)
    bodies = [client.post(nginx_url(sim)) for _ in range(3)]
    prefix = f"checkpointing of default/{web}/nginx failed"
    assert [(r.status_code, r.text) for r in bodies] == [
        (500, f"{prefix} (rpc error: code = Unknown desc = checkpoint/restore support not available)"),
        (500, f"{prefix} (rpc error: code = Unimplemented desc = unknown method CheckpointContainer)"),
        (500, f"{prefix} (cannot pause a paused container)"),
    ]


def test_faults_from_a_file(sim, client, tmp_path):
    faults = tmp_path / "faults.yaml"
    faults.write_text("- {action: respond, method: GET, path: /pods, status: 500, body: boom}\n")
    assert sim.load_faults(faults)[0].status == 500
    assert client.get("/pods").text == "boom"
    sim.clear_faults()
    assert client.get("/pods").status_code == 200
    (tmp_path / "bad.json").write_text(json.dumps([{"action": "respond", "colour": "red"}]))
    with pytest.raises(InvalidInput, match="unknown key.*colour"):
        sim.load_faults(tmp_path / "bad.json")
    with pytest.raises(InvalidInput, match="action must be one of"):
        Fault("explode")
