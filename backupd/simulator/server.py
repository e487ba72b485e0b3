"""The node simulator: a kubelet stand-in speaking the kubelet checkpoint API over HTTPS.

Behaviour copied from the kubelet (reference §1.1–1.3, 1.8):

* TLS with a server certificate from :mod:`backupd.simulator.pki`. Without tokens a client
  certificate signed by the CA is required at the handshake; with tokens it is optional and
  ``Authorization: Bearer <token>`` is accepted too. No valid identity → 401 ``Unauthorized``.
* Authorization (``allowed_users``): others get 403
  ``Forbidden (user=<u>, verb=<v>, resource=nodes, subresource(s)=[checkpoint])\\n``
  (``[pods proxy]`` for ``/pods``).
* ``GET /pods`` → ``v1.PodList`` JSON; other methods 405 ``405: Method Not Allowed``.
* ``POST /checkpoint/{ns}/{pod}/{container}[?timeout=N]`` → the archive is written to
  ``checkpoint_dir`` (0700) as ``checkpoint-<pod>_<ns>-<container>-<RFC3339 local>.tar`` (0600,
  opened without O_TRUNC like CRI-O, so a same-second second checkpoint overwrites in place)
  and the answer is 200 ``{"items":["<absolute path>"]}``. Plain-text errors exactly as the
  kubelet's; with the checkpoint API disabled every path answers Go's ``404 page not found``.
  Checkpoints of one container are serialised.

Tests steer it with faults (:class:`Fault`), read the request log (``requests``) and mutate
pods at run time (``add_pod``, ``remove_pod``, ``set_container_state``).

Why one module of ~850 lines: it is one kubelet. The TLS accept path, the request handler,
the fault injector and the checkpoint writer all work on :class:`NodeSimulator`'s lock, pods,
faults and request log, so the kubelet's behaviour reads top to bottom in one place; what
stands alone already lives beside it (certificates in :mod:`~backupd.simulator.pki`, pods in
:mod:`~backupd.simulator.topology`, archives in :mod:`~backupd.simulator.archive`, real CRIU
in :mod:`~backupd.simulator.criu`).
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import json
import os
import re
import shutil
import socket
import ssl
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

from backupd import tls
from backupd.errors import InvalidInput
from backupd.simulator import criu as real_criu
from backupd.simulator.archive import checkpoint_file_name, write_checkpoint_archive
from backupd.simulator.pki import Pki, generate_pki
from backupd.simulator.topology import Pod, PodSpec, Topology, default_topology, materialize, materialize_pod

__all__ = ["DEFAULT_MEMORY_BYTES", "Fault", "NodeSimulator", "RequestRecord", "load_faults"]

DEFAULT_MEMORY_BYTES = 8 << 20
_HANDSHAKE_TIMEOUT = 10.0
_MAX_REQUEST_BODY = 1 << 20
_TEXT = "text/plain; charset=utf-8"
_JSON = "application/json"
_VERBS = {"POST": "create", "GET": "get", "HEAD": "get", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}

RUNTIME_UNSUPPORTED = {
    "crio": "rpc error: code = Unknown desc = checkpoint/restore support not available",
    "containerd": "rpc error: code = Unimplemented desc = unknown method CheckpointContainer",
}
DEADLINE_EXCEEDED = "rpc error: code = DeadlineExceeded desc = context deadline exceeded"

_FAULT_VARIANTS: dict[str, tuple[str, ...]] = {
    "respond": (),
    "delay": (),
    "reset": ("partial", "headers", "immediate"),
    "hostile_path": ("outside", "symlink", "traversal"),
    "unsupported": tuple(RUNTIME_UNSUPPORTED),
    "checkpoint_error": (),
}


@dataclass
class Fault:
    """A programmed misbehaviour, matched before authentication.

    ``method`` (``*`` = any) and ``path`` (an fnmatch glob on the URL path, query excluded)
    select requests; ``times`` limits how many it hits (None = all). ``action``:

    * ``respond``: answer ``status`` with ``body`` (``content_type``);
    * ``delay``: wait ``seconds`` (without blocking other requests; ``stop()`` cuts it short
      by closing the connection), then handle the request normally;
    * ``reset``: ``variant`` ``partial`` (default; a 200's headers and part of its body),
      ``headers`` (headers only) or ``immediate`` (nothing), then a TCP RST;
    * ``hostile_path``: 200 ``{"items":[p]}`` with ``p`` outside the checkpoint dir
      (``outside``, default; a real file), a symlink inside it pointing out (``symlink``), or
      ``<dir>/../<dir name>-outside/…`` (``traversal``);
    * ``unsupported``: 500 ``checkpointing of ns/pod/c failed (<runtime error>)`` with
      ``variant`` ``crio`` (default: ``code = Unknown desc = checkpoint/restore support not
      available``) or ``containerd`` (``code = Unimplemented desc = unknown method
      CheckpointContainer``);
    * ``checkpoint_error``: the same 500 wrapper around ``message``.
    """

    action: str
    method: str = "*"
    path: str = "*"
    times: int | None = None
    status: int = 500
    body: str = ""
    content_type: str = _TEXT
    seconds: float = 0.0
    variant: str | None = None
    message: str = ""
    hits: int = field(default=0, compare=False)

    def __post_init__(self) -> None:
        if self.action not in _FAULT_VARIANTS:
            raise InvalidInput(f"fault action must be one of {', '.join(_FAULT_VARIANTS)}, not {self.action!r}")
        variants = _FAULT_VARIANTS[self.action]
        if self.variant is None and variants:
            self.variant = variants[0]
        if self.variant is not None and self.variant not in variants:
            raise InvalidInput(f"fault {self.action}: variant must be one of {', '.join(variants) or 'none'}")
        if self.times is not None and (not isinstance(self.times, int) or self.times < 1):
            raise InvalidInput("fault times must be a positive integer or omitted")
        if not isinstance(self.seconds, (int, float)) or self.seconds < 0:
            raise InvalidInput("fault seconds must be a non-negative number")
        if not isinstance(self.status, int) or not 100 <= self.status <= 599:
            raise InvalidInput("fault status must be an HTTP status code")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Fault:
        known = {f.name for f in fields(cls)} - {"hits"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidInput(f"fault: unknown key(s) {', '.join(unknown)}")
        if "action" not in data:
            raise InvalidInput("fault: 'action' is required")
        return cls(**dict(data))

    def matches(self, method: str, path: str) -> bool:
        return (self.method == "*" or self.method.upper() == method) and fnmatch.fnmatchcase(path, self.path)


def load_faults(path: str | os.PathLike[str]) -> list[Fault]:
    """Faults from a JSON or YAML file holding a list of fault mappings (see :class:`Fault`)."""
    text = Path(path).read_text(encoding="utf-8")
    try:
        data = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise InvalidInput(f"cannot parse faults file {path}: {exc}") from None
    if isinstance(data, Mapping) and "faults" in data:
        data = data["faults"]
    if not isinstance(data, list) or not all(isinstance(d, Mapping) for d in data):
        raise InvalidInput(f"faults file {path} must hold a list of fault mappings")
    return [Fault.from_dict(d) for d in data]


@dataclass(frozen=True)
class RequestRecord:
    """One handled request. ``status`` is None when no status line was sent (reset before
    answering, aborted by ``stop()``); ``fault`` names the fault action that hit it."""

    method: str
    path: str
    query: str
    status: int | None
    user: str | None
    started: float  # epoch seconds
    duration: float  # seconds
    fault: str | None = None


class _Abort(Exception):
    """Close the connection without (further) answer; with ``reset`` as a TCP RST."""

    def __init__(self, reset: bool = False) -> None:
        super().__init__("connection aborted")
        self.reset = reset


class _CheckpointFailed(Exception):
    pass


class _Exchange:
    """One request being answered: records what was sent."""

    def __init__(self, handler: _Handler, method: str, path: str, query: str,
                 log: Callable[[RequestRecord], None]) -> None:
        self.handler = handler
        self.method = method
        self.path = path
        self.query = query
        self.status: int | None = None
        self.user: str | None = None
        self.fault: str | None = None
        self.started = time.time()
        self._t0 = time.monotonic()
        self._log: Callable[[RequestRecord], None] | None = log

    def record(self) -> None:
        """Log the request once; done before the answer leaves, so a client that has its
        response always finds the request in the log."""
        if self._log is not None:
            log, self._log = self._log, None
            log(RequestRecord(self.method, self.path, self.query, self.status, self.user, self.started,
                              time.monotonic() - self._t0, self.fault))  # fmt: skip

    def send(self, status: int, body: str | bytes, content_type: str = _TEXT,
             headers: Mapping[str, str] | None = None) -> None:
        data = body.encode() if isinstance(body, str) else body
        h = self.handler
        self.status = status
        self.record()
        h.send_response(status)
        h.send_header("Content-Type", content_type)
        for key, value in (headers or {}).items():
            h.send_header(key, value)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if self.method != "HEAD":
            h.wfile.write(data)

    def go_not_found(self) -> None:
        """Go ``http.NotFound``: what a path no handler is registered for gets."""
        self.send(404, "404 page not found\n", headers={"X-Content-Type-Options": "nosniff"})


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 30  # idle keep-alive connections are dropped after this
    server: _HTTPServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass

    def send_response(self, code: int, message: str | None = None) -> None:
        # like Go's net/http: no Server header
        self.send_response_only(code, message)
        self.send_header("Date", self.date_time_string())

    def _dispatch(self) -> None:
        self.server.sim._handle(self)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _dispatch


def _common_name(cert: Mapping[str, Any] | None) -> str | None:
    """The subject's (last) common name in a verified peer certificate as ``getpeercert()`` gives
    it: ``subject`` is a tuple of RDNs, each a tuple of ``(key, value)`` pairs."""
    user = None
    for rdn in (cert or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                user = value
    return user


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], sim: NodeSimulator) -> None:
        self.sim = sim
        super().__init__(address, _Handler)

    def process_request_thread(self, request: socket.socket | tuple[bytes, socket.socket],
                               client_address: Any) -> None:
        # The TLS handshake runs here, in the connection's own thread, never in the accept loop.
        if not isinstance(request, socket.socket):  # the (data, socket) pair of a UDP server
            raise TypeError(f"the kubelet simulator serves TCP, not datagrams: {type(request).__name__}")
        sim = self.sim
        conn: socket.socket = request
        sim._track(conn)
        try:
            # Go's net/http sets TCP_NODELAY; without it a header write then a body write stall
            # on delayed ACKs (~40 ms per request)
            request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            request.settimeout(_HANDSHAKE_TIMEOUT)
            try:
                conn = sim._ssl_context.wrap_socket(request, server_side=True)
            except (ssl.SSLError, OSError) as exc:
                sim._note_tls_failure(client_address, exc)
                return
            sim._untrack(request)
            sim._track(conn)
            try:
                self.finish_request(conn, client_address)
            except _Abort as abort:
                if abort.reset:
                    try:
                        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    except OSError:
                        pass
            except (ConnectionError, TimeoutError, ssl.SSLError, OSError):
                pass
        finally:
            sim._untrack(conn)
            sim._untrack(request)
            try:
                conn.close()
            except OSError:
                pass
            try:
                request.close()
            except OSError:
                pass


def _target(path: str) -> tuple[str, str, str]:
    """(namespace, pod, container) of a checkpoint path, best effort (for faulted answers)."""
    parts = path.split("/")[2:5] if path.startswith("/checkpoint/") else []
    ns, pod, ctr = (parts + ["unknown"] * 3)[:3]
    return ns or "unknown", pod or "unknown", ctr or "unknown"


class NodeSimulator:
    """A kubelet stand-in on 127.0.0.1 (see the module docstring for the wire behaviour).

    ``state_dir`` holds ``pki/`` (unless ``pki`` is given), ``checkpoints/`` (unless
    ``checkpoint_dir`` is given) and, in CRIU mode, ``criu/``. Arguments:

    * ``topology``: pods to serve (default :func:`default_topology`); ``seed`` makes every
      identifier and every synthetic byte reproducible.
    * ``tokens``: ``{token: user}``; enables bearer-token auth and makes client certs optional.
    * ``allowed_users``: None (default) allows every authenticated user; an iterable of user
      names allows them everything; a mapping ``user -> subresources`` (``checkpoint``,
      ``pods``, ``proxy``, ``*``) allows just those.
    * ``checkpoint_api_enabled``: False answers ``404 page not found`` for the checkpoint route.
    * ``memory_bytes``: synthetic memory per container unless the topology sets it; in CRIU
      mode each process touches this much memory (so keep it small there).
    * ``criu``: False (synthetic images), True (real CRIU, error if unavailable) or ``"auto"``.
    * ``checkpoint_latency``: extra seconds each checkpoint takes (inside the per-container
      lock); ``cri_timeout``: the kubelet's runtime request timeout (120 s), after which a
      checkpoint fails with ``rpc error: code = DeadlineExceeded …``.
    * ``tz``: the 'kubelet' local zone for file names and JSON times (default: this host's);
      ``clock``: returns the aware 'now' (tests freeze it to provoke same-second collisions).
    """

    def __init__(
        self,
        state_dir: str | os.PathLike[str],
        *,
        topology: Topology | None = None,
        pki: Pki | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        tokens: Mapping[str, str] | None = None,
        allowed_users: Iterable[str] | Mapping[str, Iterable[str]] | None = None,
        checkpoint_api_enabled: bool = True,
        checkpoint_dir: str | os.PathLike[str] | None = None,
        memory_bytes: int = DEFAULT_MEMORY_BYTES,
        criu: bool | str = False,
        checkpoint_latency: float = 0.0,
        cri_timeout: float = 120.0,
        seed: int = 0,
        tz: dt.tzinfo | None = None,
        clock: Callable[[], dt.datetime] | None = None,
        faults: Iterable[Fault] = (),
        host_ip: str = "192.168.49.2",
    ) -> None:
        if criu not in (True, False, "auto"):
            raise InvalidInput(f"criu must be True, False or 'auto', not {criu!r}")
        self.state_dir = Path(state_dir).absolute()
        self.topology = topology or default_topology()
        self.node_name = self.topology.node_name
        self.host = host
        self.port = port
        self.host_ip = host_ip
        self.checkpoint_api_enabled = checkpoint_api_enabled
        self.checkpoint_dir = Path(checkpoint_dir).absolute() if checkpoint_dir else self.state_dir / "checkpoints"
        self.memory_bytes = memory_bytes
        self.checkpoint_latency = checkpoint_latency
        self.cri_timeout = cri_timeout
        self.seed = seed
        self.tz = tz
        self._clock = clock
        self._criu_request = criu
        self.criu_enabled = False
        self._pki = pki
        self._tokens = dict(tokens) if tokens is not None else None
        self._authz: dict[str, frozenset[str]] | None = None
        self.set_allowed_users(allowed_users)
        self._lock = threading.Lock()
        self._faults: list[Fault] = list(faults)
        self._requests: list[RequestRecord] = []
        self.tls_failures: list[str] = []
        self._pods: dict[tuple[str, str], Pod] = {
            (p.namespace, p.name): p for p in materialize(self.topology, seed=seed)
        }
        self._container_locks: dict[tuple[str, str, str], threading.Lock] = {}
        self._sequence: dict[tuple[str, str, str], int] = {}
        self._processes: dict[tuple[str, str, str], real_criu.CountingProcess] = {}
        self._connections: set[socket.socket] = set()
        self._stopping = threading.Event()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._ssl_context: ssl.SSLContext

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def pki(self) -> Pki:
        if self._pki is None:
            raise RuntimeError("the PKI exists once start() has run (or pass pki=)")
        return self._pki

    @property
    def url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("simulator not started")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"https://{host}:{self.port}"

    @property
    def ca_file(self) -> Path:
        return self.pki.ca_file

    @property
    def client_cert(self) -> Path:
        return self.pki.client_cert

    @property
    def client_key(self) -> Path:
        return self.pki.client_key

    def client_ssl_context(
        self, cert: tuple[str | os.PathLike[str], str | os.PathLike[str]] | None = None,
    ) -> ssl.SSLContext:
        """A client context trusting the simulator's CA, presenting ``cert`` (cert file, key
        file; default: the trusted client cert). Pass it as httpx ``verify=``: httpx 0.28
        silently drops ``cert=`` when ``verify`` is a path."""
        cert_file, key_file = cert or (self.pki.client_cert, self.pki.client_key)
        return tls.client_context(self.pki.ca_file, cert_file=cert_file, key_file=key_file)

    def start(self) -> str:
        """Create the directories and PKI, bind, spawn CRIU processes; return the base URL."""
        if self._httpd is not None:
            return self.url
        self.state_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.state_dir, 0o700)
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.checkpoint_dir, 0o700)
        if self._pki is None:
            self._pki = generate_pki(self.state_dir / "pki")
        if self._criu_request:
            reason = real_criu.criu_unavailable_reason()
            if reason and self._criu_request is True:
                raise RuntimeError(f"real CRIU mode requested but unavailable: {reason}")
            self.criu_enabled = reason is None
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self._pki.server_cert, self._pki.server_key)
        ctx.load_verify_locations(cafile=str(self._pki.ca_file))
        ctx.verify_mode = ssl.CERT_OPTIONAL if self._tokens is not None else ssl.CERT_REQUIRED
        self._ssl_context = ctx
        self._stopping.clear()
        self._httpd = _HTTPServer((self.host, self.port), self)
        self.port = self._httpd.server_address[1]
        if self.criu_enabled:
            for pod in list(self._pods.values()):
                self._spawn_processes(pod)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
            name=f"node-simulator:{self.port}", daemon=True,
        )  # fmt: skip
        self._thread.start()
        return self.url

    def stop(self) -> None:
        """Stop serving promptly: open connections are shut, delayed requests abandoned,
        CRIU processes killed. Idempotent."""
        httpd, self._httpd = self._httpd, None
        self._stopping.set()
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        with self._lock:
            processes, self._processes = list(self._processes.values()), {}
        for proc in processes:
            proc.stop()

    def __enter__(self) -> NodeSimulator:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- test controls -----------------------------------------------------------------------

    def add_fault(self, fault: Fault | str, **kwargs: Any) -> Fault:
        """Add a fault: ``add_fault(Fault(...))`` or ``add_fault("respond", status=503, …)``."""
        if isinstance(fault, str):
            fault = Fault(fault, **kwargs)
        elif kwargs:
            raise TypeError("pass either a Fault or an action with keyword arguments")
        with self._lock:
            self._faults.append(fault)
        return fault

    def load_faults(self, path: str | os.PathLike[str]) -> list[Fault]:
        loaded = load_faults(path)
        with self._lock:
            self._faults.extend(loaded)
        return loaded

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    @property
    def faults(self) -> list[Fault]:
        with self._lock:
            return list(self._faults)

    @property
    def requests(self) -> list[RequestRecord]:
        """A copy of the request log, oldest first."""
        with self._lock:
            return list(self._requests)

    def clear_requests(self) -> None:
        with self._lock:
            self._requests.clear()

    def set_allowed_users(self, allowed: Iterable[str] | Mapping[str, Iterable[str]] | None) -> None:
        if allowed is None:
            self._authz = None
        elif isinstance(allowed, Mapping):
            self._authz = {user: frozenset(subs) for user, subs in allowed.items()}
        else:
            self._authz = {user: frozenset({"*"}) for user in allowed}

    @property
    def pods(self) -> list[Pod]:
        with self._lock:
            return list(self._pods.values())

    def pod(self, namespace: str, name: str) -> Pod | None:
        with self._lock:
            return self._pods.get((namespace, name))

    def add_pod(self, spec: PodSpec) -> list[Pod]:
        """Add a pod spec (all its replicas); in CRIU mode its running containers start."""
        with self._lock:
            new = materialize_pod(spec, seed=self.seed, node_name=self.node_name, index=len(self._pods))
            for pod in new:
                if (pod.namespace, pod.name) in self._pods:
                    raise InvalidInput(f"pod {pod.namespace}/{pod.name} exists already")
            for pod in new:
                self._pods[(pod.namespace, pod.name)] = pod
        if self.criu_enabled and self._httpd is not None:
            for pod in new:
                self._spawn_processes(pod)
        return new

    def remove_pod(self, namespace: str, name: str) -> None:
        with self._lock:
            pod = self._pods.pop((namespace, name), None)
            procs = [self._processes.pop((namespace, name, c.name), None) for c in pod.containers] if pod else []
        for proc in procs:
            if proc is not None:
                proc.stop()
        if pod is None:
            raise KeyError(f"no pod {namespace}/{name}")

    def set_container_state(self, namespace: str, pod: str, container: str, state: str,
                            reason: str | None = None) -> None:
        """Change what /pods reports and whether a checkpoint finds the container running."""
        if state not in ("running", "waiting", "terminated"):
            raise InvalidInput(f"state must be running, waiting or terminated, not {state!r}")
        with self._lock:
            p = self._pods.get((namespace, pod))
            c = p.container(container) if p else None
            if c is None:
                raise KeyError(f"no container {namespace}/{pod}/{container}")
            c.state, c.reason = state, reason

    def process(self, namespace: str, pod: str, container: str) -> real_criu.CountingProcess | None:
        """The real process behind a container in CRIU mode (None otherwise)."""
        with self._lock:
            return self._processes.get((namespace, pod, container))

    def now(self) -> dt.datetime:
        """The simulator's aware 'now' in its zone (what names a checkpoint file)."""
        if self._clock is not None:
            t = self._clock()
            if t.tzinfo is None:
                raise ValueError("the simulator clock must return aware datetimes")
            return t
        return dt.datetime.now(dt.UTC).astimezone(self.tz)

    # -- internals ---------------------------------------------------------------------------

    def _track(self, conn: socket.socket) -> None:
        with self._lock:
            self._connections.add(conn)

    def _untrack(self, conn: socket.socket) -> None:
        with self._lock:
            self._connections.discard(conn)

    def _note_tls_failure(self, client: Any, exc: BaseException) -> None:
        with self._lock:
            self.tls_failures.append(f"{client}: {exc}")

    def _spawn_processes(self, pod: Pod) -> None:
        for c in pod.containers:
            if c.state != "running":
                continue
            key = (pod.namespace, pod.name, c.name)
            directory = self.state_dir / "criu" / "processes" / f"{pod.namespace}_{pod.name}_{c.name}"
            memory = c.memory if c.memory is not None else self.memory_bytes
            proc = real_criu.CountingProcess.start(directory, c.processes[0], ballast_bytes=memory)
            with self._lock:
                self._processes[key] = proc

    def _match_fault(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.matches(method, path):
                    fault.hits += 1
                    if fault.times is not None and fault.hits >= fault.times:
                        self._faults.remove(fault)
                    return fault
        return None

    def _handle(self, handler: _Handler) -> None:
        url = urlsplit(handler.path)
        ex = _Exchange(handler, handler.command, unquote(url.path), url.query, self._log_request)
        try:
            self._read_body(handler)
            fault = self._match_fault(ex.method, ex.path)
            if fault is not None:
                ex.fault = fault.action
                if fault.action == "delay":
                    if self._stopping.wait(fault.seconds):
                        raise _Abort()
                else:
                    self._apply_fault(ex, fault)
                    return
            self._route(ex)
        except _Abort:
            handler.close_connection = True
            raise
        finally:
            ex.record()

    def _log_request(self, record: RequestRecord) -> None:
        with self._lock:
            self._requests.append(record)

    def _read_body(self, handler: _Handler) -> None:
        length = handler.headers.get("Content-Length")
        if length is None:
            return
        try:
            n = int(length)
        except ValueError:
            n = -1
        if not 0 <= n <= _MAX_REQUEST_BODY:
            raise _Abort()
        handler.rfile.read(n)

    def _route(self, ex: _Exchange) -> None:
        if ex.path in ("/pods", "/pods/"):
            if not self._auth(ex, ("pods", "proxy")):
                return
            if ex.method != "GET":
                ex.send(405, "405: Method Not Allowed", headers={"Allow": "GET"})
                return
            with self._lock:
                items = [p.to_v1(self.host_ip) for p in self._pods.values()]
            body = {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items}
            ex.send(200, json.dumps(body, separators=(",", ":")), _JSON)
            return
        if ex.path.startswith("/checkpoint/") and self.checkpoint_api_enabled:
            if not self._auth(ex, ("checkpoint",)):
                return
            parts = ex.path[len("/checkpoint/") :].split("/")
            if len(parts) != 3 or not all(parts):
                ex.send(404, "404: Page Not Found")
                return
            if ex.method != "POST":
                ex.send(405, "405: Method Not Allowed", headers={"Allow": "POST"})
                return
            self._checkpoint(ex, *parts)
            return
        ex.go_not_found()

    def _auth(self, ex: _Exchange, subresources: tuple[str, ...]) -> bool:
        """Authenticate and authorise as the kubelet's filter does; answer 401/403 if not."""
        conn: ssl.SSLSocket = ex.handler.connection  # every connection is TLS (process_request_thread)
        user = _common_name(conn.getpeercert())
        if user is None and self._tokens is not None:
            header = ex.handler.headers.get("Authorization", "")
            if header[:7].lower() == "bearer ":
                user = self._tokens.get(header[7:].strip())
        if user is None:
            ex.send(401, "Unauthorized")
            return False
        ex.user = user
        allowed = True
        if self._authz is not None:
            subs = self._authz.get(user, frozenset())
            allowed = "*" in subs or any(s in subs for s in subresources)
        if not allowed:
            verb = _VERBS.get(ex.method, "")
            ex.send(
                403,
                f"Forbidden (user={user}, verb={verb}, resource=nodes, subresource(s)=[{' '.join(subresources)}])\n",
            )
            return False
        return True

    def _checkpoint(self, ex: _Exchange, namespace: str, pod_name: str, container_name: str) -> None:
        with self._lock:
            pod = self._pods.get((namespace, pod_name))
        if pod is None:
            ex.send(404, "pod does not exist")
            return
        container = pod.container(container_name)
        if container is None:
            ex.send(404, f"container {container_name} does not exist")
            return
        timeout = 0
        values = parse_qs(ex.query, keep_blank_values=True).get("timeout")
        if values:
            raw = values[-1]  # the kubelet uses the last one
            if not re.fullmatch(r"[+-]?[0-9]+", raw) or not -(2**63) <= int(raw) < 2**63:
                ex.send(404, "cannot parse value of timeout parameter")
                return
            timeout = int(raw)
        failed = f"checkpointing of {namespace}/{pod_name}/{container_name} failed"
        if container.state != "running":
            ex.send(500, f"{failed} (container {container_name} not found)")
            return
        if timeout < 0:
            ex.send(500, f"{failed} (CheckpointContainer requires the timeout value to be > 0)")
            return
        # cri-client: only a timeout above the runtime request timeout replaces it
        effective = timeout if timeout > self.cri_timeout else self.cri_timeout
        deadline = time.monotonic() + effective
        now = self.now()
        path = self.checkpoint_dir / checkpoint_file_name(pod_name, namespace, container_name, now)
        key = (namespace, pod_name, container_name)
        with self._lock:
            lock = self._container_locks.setdefault(key, threading.Lock())
        with lock:
            try:
                self._produce_archive(pod, container_name, path, now, deadline)
            except _CheckpointFailed as exc:
                ex.send(500, f"{failed} ({exc})")
                return
            except OSError as exc:  # e.g. ENOSPC in the checkpoint directory
                ex.send(500, f"{failed} (failed to write checkpoint archive {path}: {exc.strerror or exc})")
                return
        ex.send(200, f'{{"items":["{path}"]}}', _JSON)

    def _produce_archive(self, pod: Pod, container_name: str, path: Path, now: dt.datetime, deadline: float) -> None:
        container = pod.container(container_name)
        assert container is not None
        key = (pod.namespace, pod.name, container_name)
        if self.checkpoint_latency:
            remaining = deadline - time.monotonic()
            if self.checkpoint_latency >= remaining:
                if self._stopping.wait(max(remaining, 0)):
                    raise _Abort()
                raise _CheckpointFailed(DEADLINE_EXCEEDED)
            if self._stopping.wait(self.checkpoint_latency):
                raise _Abort()
        with self._lock:
            sequence = self._sequence.get(key, 0)
            self._sequence[key] = sequence + 1
            proc = self._processes.get(key)
        work_dir: Path | None = None
        try:
            if self.criu_enabled:
                if proc is None:
                    raise _CheckpointFailed(f"failed to checkpoint container {container.container_id}: "
                                            f"container {container.container_id} is not running")  # fmt: skip
                staging = self.state_dir / "criu" / "staging"
                staging.mkdir(parents=True, exist_ok=True)
                work_dir = Path(tempfile.mkdtemp(prefix="dump-", dir=staging))
                try:
                    real_criu.criu_dump(proc.pid, work_dir, timeout=max(deadline - time.monotonic(), 0.1))
                except TimeoutError:
                    raise _CheckpointFailed(DEADLINE_EXCEEDED) from None
                except real_criu.CriuError as exc:
                    raise _CheckpointFailed(f"failed to checkpoint container {container.container_id}: {exc}") from None
            # CRI-O: os.OpenFile(path, O_RDWR|O_CREATE, 0600) -- no O_TRUNC, no O_EXCL
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "wb", buffering=1 << 20) as fh:
                write_checkpoint_archive(
                    fh, pod, container, checkpointed_at=now,
                    memory_bytes=container.memory if container.memory is not None else self.memory_bytes,
                    seed=self.seed, sequence=sequence, criu_work_dir=work_dir,
                )  # fmt: skip
        finally:
            if work_dir is not None:
                shutil.rmtree(work_dir, ignore_errors=True)

    def _apply_fault(self, ex: _Exchange, fault: Fault) -> None:
        if fault.action == "respond":
            ex.send(fault.status, fault.body, fault.content_type)
        elif fault.action == "reset":
            self._reset(ex, fault.variant or "partial")
        elif fault.action in ("unsupported", "checkpoint_error"):
            error = RUNTIME_UNSUPPORTED[fault.variant or "crio"] if fault.action == "unsupported" else fault.message
            ex.send(500, f"checkpointing of {'/'.join(_target(ex.path))} failed ({error})")
        elif fault.action == "hostile_path":
            ex.send(200, f'{{"items":["{self._hostile_path(ex, fault.variant or "outside")}"]}}', _JSON)
        else:  # pragma: no cover - validated in Fault
            raise AssertionError(fault.action)

    def _reset(self, ex: _Exchange, variant: str) -> None:
        h = ex.handler
        if variant in ("partial", "headers"):
            body = f'{{"items":["{self.checkpoint_dir}/checkpoint-'.encode()
            ex.status = 200
            ex.record()
            h.send_response(200)
            h.send_header("Content-Type", _JSON)
            h.send_header("Content-Length", str(len(body) + 4096))
            h.end_headers()
            if variant == "partial":
                h.wfile.write(body)
            h.wfile.flush()
        raise _Abort(reset=True)

    def _hostile_path(self, ex: _Exchange, variant: str) -> str:
        ns, pod, ctr = _target(ex.path)
        name = checkpoint_file_name(pod, ns, ctr, self.now())
        # a sibling of the checkpoint dir, so "<dir>/../<sibling>/<name>" really escapes it
        outside = self.checkpoint_dir.parent / f"{self.checkpoint_dir.name}-outside"
        outside.mkdir(mode=0o700, exist_ok=True)
        target = outside / name
        target.write_bytes(b"not a checkpoint: this file lies outside the checkpoint directory\n")
        if variant == "outside":
            return str(target)
        if variant == "traversal":
            return f"{self.checkpoint_dir}/../{outside.name}/{name}"
        link = self.checkpoint_dir / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target)
        return str(link)
