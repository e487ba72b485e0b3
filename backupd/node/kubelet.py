"""Client of the kubelet API: ``GET /pods`` and ``POST /checkpoint/{ns}/{pod}/{container}``.

Every kubelet answer and every httpx exception is translated here, once, into a distinct
:mod:`backupd.errors` class whose message says what an operator can do about it. The kubelet's
error bodies are plain text (reference: kubelet-checkpoint-api.md section 1.3).

TLS is always verified: against ``ca_file`` when given, else the system trust store. There is no
switch to turn verification off.
"""

from __future__ import annotations

import json
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from backupd import tls
from backupd.config import KubeletConfig
from backupd.errors import (
    CheckpointApiDisabled,
    CheckpointFailed,
    CheckpointUnsupported,
    KubeletError,
    KubeletForbidden,
    KubeletProtocolError,
    KubeletTimeout,
    KubeletTLSError,
    KubeletUnauthorized,
    KubeletUnreachable,
    TargetGone,
    UnsafeCheckpointPath,
)
from backupd.model import Container, Pod

# Answer texts of runtimes that cannot checkpoint at all (reference 1.3); retrying never helps.
_UNSUPPORTED = (
    "Unimplemented",
    "checkpoint/restore support not available",
    "only supported in the CRI v1 runtime API",
    "does not support checkpoint/restore",
    "criu support is disabled",
    "CRIU binary not found",
    "criu binary not found",
    "requires at least CRIU",
)
# Transient runtime errors seen in practice (checkpoint-restore-operator retries these).
_TRANSIENT = ("cannot pause a paused container", "ctrd-checkpoint/status: no such file or directory")


@dataclass(frozen=True)
class Target:
    namespace: str
    pod: str
    container: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.pod}/{self.container}"


def _ssl_context(cfg: KubeletConfig) -> ssl.SSLContext:
    try:
        return tls.client_context(cfg.ca_file, cert_file=cfg.cert_file, key_file=cfg.key_file)
    except OSError as exc:  # ssl.SSLError is an OSError
        raise KubeletTLSError(
            f"cannot load the kubelet TLS files (kubelet.ca_file/cert_file/key_file): {exc}") from None


def _tls_cause(exc: BaseException) -> ssl.SSLError | None:
    seen = 0
    cur: BaseException | None = exc
    while cur is not None and seen < 10:
        if isinstance(cur, ssl.SSLError):
            return cur
        cur = cur.__cause__ or cur.__context__
        seen += 1
    return None


class KubeletClient:
    def __init__(self, cfg: KubeletConfig, *, transport: httpx.BaseTransport | None = None) -> None:
        self.cfg = cfg
        self.base_url = cfg.url
        self.checkpoint_dir = Path(cfg.checkpoint_dir)
        # The read limit exceeds the kubelet's own, so the kubelet, not the client, reports a
        # slow runtime (its answer says which container and why).
        timeout = httpx.Timeout(connect=10.0, read=cfg.request_timeout(), write=30.0, pool=30.0)
        self._http = httpx.Client(
            base_url=cfg.url,
            verify=_ssl_context(cfg) if transport is None else True,
            timeout=timeout,
            transport=transport,
            headers={"User-Agent": "backupd"},
            follow_redirects=False,
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> KubeletClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _headers(self) -> dict[str, str]:
        if self.cfg.token_file is None:
            return {}
        # Re-read every time: projected ServiceAccount tokens are rotated on disk.
        try:
            token = self.cfg.token_file.read_text().strip()
        except OSError as exc:
            raise KubeletUnauthorized(
                f"cannot read kubelet.token_file {str(self.cfg.token_file)!r}: {exc.strerror}") from None
        return {"Authorization": f"Bearer {token}"}

    def _request(self, method: str, path: str, *, what: str, **kwargs: Any) -> httpx.Response:
        try:
            return self._http.request(method, path, headers=self._headers(), **kwargs)
        except httpx.TimeoutException as exc:
            # A checkpoint that timed out may still be running in the runtime: asking again at
            # once would only collide with it ("cannot pause a paused container").
            raise KubeletTimeout(
                f"{what}: the kubelet at {self.base_url} did not answer in time ({type(exc).__name__})",
                retryable=method == "GET",
            ) from None
        except httpx.HTTPError as exc:
            tls = _tls_cause(exc)
            if tls is not None:
                raise KubeletTLSError(
                    f"{what}: TLS with the kubelet at {self.base_url} failed ({tls.reason or tls}): check that "
                    "kubelet.ca_file is the CA of the kubelet's serving certificate and that the kubelet trusts "
                    "the client certificate (authentication.x509.clientCAFile)"
                ) from None
            raise KubeletUnreachable(f"{what}: cannot reach the kubelet at {self.base_url}: {exc}") from None

    def _raise_for(self, response: httpx.Response, what: str, permission: str) -> None:
        if response.status_code == 200:
            return
        body = response.text.strip()[:500]
        status = response.status_code
        if status == 401:
            raise KubeletUnauthorized(
                f"{what}: the kubelet answered 401 Unauthorized: it did not accept backupd's credentials "
                "(check kubelet.cert_file/key_file or token_file, and that the kubelet has client-certificate "
                "or webhook token authentication enabled)"
            )
        if status == 403:
            raise KubeletForbidden(
                f"{what}: the kubelet answered 403 {body!r}: grant {permission} to backupd's identity")
        if status == 404:
            if body == "404 page not found":
                raise CheckpointApiDisabled(
                    f"{what}: the kubelet has no checkpoint API (plain '404 page not found'): enable the "
                    "ContainerCheckpoint feature gate (on by default since Kubernetes 1.30) and keep "
                    "enableDebuggingHandlers=true in the KubeletConfiguration"
                )
            if body == "pod does not exist" or (body.startswith("container ") and body.endswith(" does not exist")):
                raise TargetGone(f"{what}: {body} (it was deleted or rescheduled since discovery)")
            raise KubeletProtocolError(f"{what}: the kubelet answered 404 {body!r}")
        if status == 500 and body.startswith("checkpointing of "):
            if any(text in body for text in _UNSUPPORTED):
                raise CheckpointUnsupported(
                    f"{what}: the container runtime cannot checkpoint: {body} -- enable checkpoint/restore in "
                    "the runtime (CRI-O: enable_criu_support = true, with CRIU >= 3.16 installed; containerd >= 2.0)"
                )
            if body.endswith(" not found)"):
                raise TargetGone(f"{what}: the container is not running: {body}")
            if "DeadlineExceeded" in body:
                raise KubeletTimeout(
                    f"{what}: the runtime did not finish within kubelet.timeout_seconds="
                    f"{self.cfg.timeout_seconds}: {body}"
                )
            raise CheckpointFailed(f"{what}: {body}", retryable=any(t in body for t in _TRANSIENT))
        raise KubeletError(f"{what}: the kubelet answered {status} {body!r}", retryable=status >= 500)

    def pods(self) -> list[Pod]:
        """All pods the kubelet runs (``GET /pods``)."""
        what = "listing pods"
        response = self._request("GET", "/pods", what=what)
        self._raise_for(response, what, "'get' on 'nodes/pods' (or the broader 'nodes/proxy')")
        try:
            items = response.json()["items"]
        except (ValueError, KeyError, TypeError):
            raise KubeletProtocolError(f"{what}: the kubelet's answer is not a PodList") from None
        return [parse_pod(item) for item in items or []]

    def checkpoint(self, target: Target) -> Path:
        """Ask the kubelet to checkpoint one container; returns the archive's path on the node.

        The path is refused unless it names a file directly inside the configured checkpoint
        directory (the file itself is opened safely by :mod:`backupd.node`).
        """
        what = f"checkpointing {target}"
        response = self._request(
            "POST",
            f"/checkpoint/{target.namespace}/{target.pod}/{target.container}",
            params={"timeout": str(self.cfg.timeout_seconds)},
            what=what,
        )
        self._raise_for(response, what, "'create' on 'nodes/checkpoint'")
        try:
            items = json.loads(response.content)["items"]
        except (ValueError, KeyError, TypeError):
            raise KubeletProtocolError(f"{what}: the kubelet's answer is not {{\"items\": [path]}}") from None
        if not isinstance(items, list) or len(items) != 1 or not isinstance(items[0], str):
            raise KubeletProtocolError(f"{what}: expected exactly one archive path, got {items!r}")
        return self.validate_path(items[0], what)

    def validate_path(self, raw: str, what: str) -> Path:
        path = Path(raw)
        if (
            not path.is_absolute()
            or ".." in path.parts
            or path.parent != self.checkpoint_dir
            or not path.name.startswith("checkpoint-")
            or not path.name.endswith(".tar")
        ):
            raise UnsafeCheckpointPath(
                f"{what}: the kubelet returned {raw!r}, which is not a checkpoint-*.tar directly inside "
                f"kubelet.checkpoint_dir {str(self.checkpoint_dir)!r}; refusing to read it"
            )
        return path


def parse_pod(item: dict[str, Any]) -> Pod:
    """One ``v1.Pod`` of the kubelet's ``/pods`` PodList."""
    try:
        meta = item["metadata"]
        spec = item.get("spec") or {}
        status = item.get("status") or {}
        owner = next((o for o in meta.get("ownerReferences") or [] if o.get("controller")), None)
        if owner is None and meta.get("ownerReferences"):
            owner = meta["ownerReferences"][0]
        statuses = {s["name"]: s for s in status.get("containerStatuses") or []}
        containers = []
        for c in spec.get("containers") or []:
            st = statuses.get(c["name"], {})
            containers.append(
                Container(
                    name=c["name"],
                    image=st.get("image") or c.get("image", ""),
                    image_id=st.get("imageID", ""),
                    container_id=st.get("containerID", ""),
                    running="running" in (st.get("state") or {}),
                )
            )
        return Pod(
            namespace=meta["namespace"],
            name=meta["name"],
            uid=meta.get("uid", ""),
            node_name=spec.get("nodeName", ""),
            labels=dict(meta.get("labels") or {}),
            owner_kind=owner.get("kind", "") if owner else "",
            owner_name=owner.get("name", "") if owner else "",
            containers=tuple(containers),
        )
    except (KeyError, TypeError, AttributeError) as exc:
        raise KubeletProtocolError(f"the kubelet's /pods answer has a malformed pod ({exc!r})") from None

