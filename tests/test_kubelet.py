"""Translation of every kubelet answer at the client's edge (httpx MockTransport as the peer).

End-to-end behaviour against the node simulator over real mTLS is in test_core_loop.py.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from backupd.config import KubeletConfig
from backupd.errors import (
    CheckpointApiDisabled,
    CheckpointFailed,
    CheckpointUnsupported,
    KubeletError,
    KubeletForbidden,
    KubeletProtocolError,
    KubeletTimeout,
    KubeletUnauthorized,
    KubeletUnreachable,
    TargetGone,
    UnsafeCheckpointPath,
)
from backupd.node.kubelet import KubeletClient, Target

CKPT_DIR = Path("/var/lib/kubelet/checkpoints")
TARGET = Target("default", "web-7d9f8c6b5-abcde", "nginx")


def client(handler, tmp_path: Path | None = None, **cfg) -> KubeletClient:  # type: ignore[no-untyped-def]
    kc = KubeletConfig(url="https://10.0.0.1:10250", checkpoint_dir=CKPT_DIR, timeout_seconds=5, **cfg)
    return KubeletClient(kc, transport=httpx.MockTransport(handler))


def answer(status: int, body: str):  # type: ignore[no-untyped-def]
    return lambda request: httpx.Response(status, text=body)


def test_checkpoint_request_shape_and_success() -> None:
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        node_tar = CKPT_DIR / "checkpoint-web_default-nginx-2026-03-13T21:43:06Z.tar"
        return httpx.Response(200, json={"items": [str(node_tar)]})

    path = client(handler).checkpoint(TARGET)
    assert path == CKPT_DIR / "checkpoint-web_default-nginx-2026-03-13T21:43:06Z.tar"
    assert seen[0].method == "POST"
    assert seen[0].url.path == "/checkpoint/default/web-7d9f8c6b5-abcde/nginx"
    assert seen[0].url.params["timeout"] == "5"


@pytest.mark.parametrize(
    ("status", "body", "error", "hint"),
    [
        (401, "Unauthorized", KubeletUnauthorized, "cert_file"),
        (403, "Forbidden (user=system:serviceaccount:backupd:backupd, verb=create, resource=nodes, "
              "subresource(s)=[checkpoint])\n", KubeletForbidden, "'create' on 'nodes/checkpoint'"),
        (404, "404 page not found\n", CheckpointApiDisabled, "ContainerCheckpoint"),
        (404, "pod does not exist", TargetGone, "pod does not exist"),
        (404, "container nginx does not exist", TargetGone, "container nginx does not exist"),
        (404, "cannot parse value of timeout parameter", KubeletProtocolError, "timeout"),
        (500, "checkpointing of default/web/nginx failed (rpc error: code = Unknown desc = checkpoint/restore "
              "support not available)", CheckpointUnsupported, "enable_criu_support"),
        (500, "checkpointing of default/web/nginx failed (rpc error: code = Unimplemented desc = unknown method "
              "CheckpointContainer)", CheckpointUnsupported, "Unimplemented"),
        (500, "checkpointing of default/web/nginx failed (container nginx not found)", TargetGone, "not running"),
        (500, "checkpointing of default/web/nginx failed (rpc error: code = DeadlineExceeded desc = context "
              "deadline exceeded)", KubeletTimeout, "timeout_seconds"),
        (500, "checkpointing of default/web/nginx failed (running criu failed: exit status 1)", CheckpointFailed,
         "criu failed"),
        (500, "Authorization error (user=x, verb=create, resource=nodes, subresource=checkpoint)", KubeletError,
         "Authorization error"),
        (503, "overloaded", KubeletError, "503"),
    ],
)
def test_each_kubelet_error_is_distinct_and_actionable(status: int, body: str, error: type, hint: str) -> None:
    with pytest.raises(error) as info:
        client(answer(status, body)).checkpoint(TARGET)
    assert type(info.value) is error
    assert hint in str(info.value)
    assert "default/web-7d9f8c6b5-abcde/nginx" in str(info.value)


def test_retryability() -> None:
    transient = "checkpointing of a/b/c failed (cannot pause a paused container)"
    with pytest.raises(CheckpointFailed) as info:
        client(answer(500, transient)).checkpoint(TARGET)
    assert info.value.retryable
    with pytest.raises(CheckpointFailed) as info:
        client(answer(500, "checkpointing of a/b/c failed (criu dump failed)")).checkpoint(TARGET)
    assert not info.value.retryable
    with pytest.raises(KubeletError) as info:
        client(answer(503, "busy")).checkpoint(TARGET)
    assert info.value.retryable
    with pytest.raises(KubeletForbidden) as info:
        client(answer(403, "Forbidden")).checkpoint(TARGET)
    assert not info.value.retryable


def test_transport_failures() -> None:
    def timeout(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    def refused(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    with pytest.raises(KubeletTimeout) as t:
        client(timeout).checkpoint(TARGET)
    assert not t.value.retryable  # the runtime may still be dumping: do not pile on
    with pytest.raises(KubeletTimeout) as t:
        client(timeout).pods()
    assert t.value.retryable
    with pytest.raises(KubeletUnreachable) as r:
        client(refused).checkpoint(TARGET)
    assert r.value.retryable and "10.0.0.1:10250" in str(r.value)


@pytest.mark.parametrize(
    "path",
    [
        "/etc/shadow",
        "/var/lib/kubelet/checkpoints/../../../etc/shadow",
        "/var/lib/kubelet/checkpoints/sub/checkpoint-x.tar",
        "checkpoint-relative.tar",
        "/var/lib/kubelet/checkpoints/not-a-checkpoint.tar",
        "/var/lib/kubelet/checkpoints/checkpoint-x.tar.gz",
    ],
)
def test_paths_outside_the_checkpoint_dir_are_refused(path: str) -> None:
    with pytest.raises(UnsafeCheckpointPath):
        client(lambda r: httpx.Response(200, json={"items": [path]})).checkpoint(TARGET)


@pytest.mark.parametrize("body", ['{"items": []}', '{"items": ["a", "b"]}', "not json", '{"items": [1]}'])
def test_malformed_success_bodies(body: str) -> None:
    with pytest.raises(KubeletProtocolError):
        client(answer(200, body)).checkpoint(TARGET)


def test_token_is_reread_from_file_each_request(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("first\n")
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("authorization"))
        return httpx.Response(200, json={"kind": "PodList", "items": []})

    c = client(handler, token_file=token)
    c.pods()
    token.write_text("rotated")
    c.pods()
    assert seen == ["Bearer first", "Bearer rotated"]


def test_pods_are_parsed_with_workloads() -> None:
    pods = {
        "kind": "PodList",
        "apiVersion": "v1",
        "items": [
            {
                "metadata": {"name": "web-7d9f8c6b5-abcde", "namespace": "default",
                             "labels": {"app": "web", "pod-template-hash": "7d9f8c6b5"},
                             "ownerReferences": [{"kind": "ReplicaSet", "name": "web-7d9f8c6b5", "controller": True}]},
                "spec": {"nodeName": "node-a", "containers": [{"name": "nginx", "image": "nginx:1.27"},
                                                                {"name": "sidecar", "image": "busybox"}]},
                "status": {"containerStatuses": [
                    {"name": "nginx", "state": {"running": {"startedAt": "2026-01-01T00:00:00Z"}},
                     "image": "docker.io/library/nginx:1.27", "containerID": "cri-o://abc"},
                    {"name": "sidecar", "state": {"waiting": {"reason": "CrashLoopBackOff"}}}]},
            },
            {"metadata": {"name": "db-0", "namespace": "shop",
                          "ownerReferences": [{"kind": "StatefulSet", "name": "db", "controller": True}]},
             "spec": {"containers": [{"name": "postgres", "image": "postgres:16"}]}, "status": {}},
            {"metadata": {"name": "debug", "namespace": "default"}, "spec": {"containers": []}},
        ],
    }
    result = client(lambda r: httpx.Response(200, json=pods)).pods()
    assert [str(p.workload) for p in result] == ["deployment/web", "statefulset/db", "pod/debug"]
    assert [(c.name, c.running, c.image) for c in result[0].containers] == [
        ("nginx", True, "docker.io/library/nginx:1.27"), ("sidecar", False, "busybox")]


def test_pods_forbidden_names_the_rbac_rule() -> None:
    with pytest.raises(KubeletForbidden, match="nodes/pods"):
        client(answer(403, "Forbidden (user=x, verb=get, resource=nodes, subresource(s)=[pods])")).pods()
