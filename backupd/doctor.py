"""``backupd doctor``: is every prerequisite of a checkpoint in place on this node?

Each check returns a :class:`Check` saying, in one line, what it found and, when something is
wrong, what to do about it. The checks run in the order a checkpoint needs them -- config,
catalog, kubelet (reachable with TLS verified, credentials accepted, ``get nodes/pods``, the
checkpoint API on and ``create nodes/checkpoint`` granted), the container runtime, the node
checkpoint directory, each backend -- and a check whose prerequisite failed is reported as not
tested rather than guessed.

The kubelet's answers are never re-parsed here: :mod:`backupd.kubelet` already turns each into
a distinct error class, and the checks dispatch on those classes.

Side effects, all removed again: the checkpoint-API probe asks the kubelet to checkpoint a pod
that cannot exist (its name is not a valid pod name), which the kubelet refuses before the
runtime is involved; a probe file is created in the node checkpoint directory; a probe object
is written under ``.backupd-doctor/`` in each backend. Only ``--checkpoint-test`` checkpoints a
real container (and removes the node tar it produced).

**Exit code** (:attr:`Report.exit_code`): 0 when nothing blocks checkpoints (warnings and
checks that could not be tested do not count); otherwise the exit code of the first blocking
failure, in check order: 2 config, 4 catalog, 5 kubelet or runtime, 6 checkpoint directory or
backend (the README's codes, by the class of the error found).

One module over 500 lines on purpose: the checks are one sequence in which each reads the outcome
of the one before, and that order is the contract; split, it would be spread over files.
"""

from __future__ import annotations

import os
import secrets
import stat
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from backupd import retry
from backupd.backends import open_backend
from backupd.catalog.store import Catalog
from backupd.config import DEFAULT_CONFIG_PATH, BackendConfig, Config, S3BackendConfig, load_config
from backupd.errors import (
    EXIT_OK,
    BackupdError,
    CatalogUnavailable,
    CheckpointApiDisabled,
    CheckpointUnsupported,
    ConfigError,
    IntegrityError,
    KubeletError,
    KubeletForbidden,
    KubeletProtocolError,
    KubeletTimeout,
    KubeletTLSError,
    KubeletUnauthorized,
    KubeletUnreachable,
    NoSpace,
    SchemaOutdated,
    StorageAuthError,
    StorageError,
    StorageNotFound,
    StorageUnavailable,
    TargetGone,
    UnsafeCheckpointPath,
)
from backupd.model import SUCCEEDED
from backupd.node.checkpoints import CheckpointDir
from backupd.node.kubelet import KubeletClient, Target
from backupd.sizes import human_bytes

Severity = Literal["blocking", "warning"]
BLOCKING: Severity = "blocking"
WARNING: Severity = "warning"

#: Neither name is a valid Kubernetes object name (``_`` is not allowed), so no such pod can
#: exist; the kubelet answers ``pod does not exist`` after authorizing the request.
PROBE_TARGET = Target("backupd_doctor", "probe_no_such_pod", "probe")
PROBE_PREFIX = ".backupd-doctor"

# How far back the run history is searched for this node's last checkpoint.
_HISTORY_RUNS = 500

FIX_TLS = (
    "set kubelet.ca_file to the CA that signed the kubelet's serving certificate; kubelets "
    "serve a self-signed certificate unless serverTLSBootstrap is on: enable it (and approve the "
    "kubelet-serving CSRs) or mount the kubelet's CA (docs/deployment.md, 'Kubelet TLS'); never "
    "turn verification off"
)
FIX_REACH = (
    "check kubelet.url (in the DaemonSet https://$(NODE_IP):10250, NODE_IP from status.hostIP) "
    "and that no host firewall or NetworkPolicy blocks the pod from the node's port 10250"
)
FIX_CREDENTIALS = (
    "give backupd credentials the kubelet accepts: the ServiceAccount token (kubelet.token_file; "
    "the kubelet needs authentication.webhook.enabled: true) or a client certificate "
    "(kubelet.cert_file/key_file) signed by the kubelet's authentication.x509.clientCAFile"
)
FIX_RBAC_PODS = (
    'add to backupd\'s ClusterRole the rule {apiGroups: [""], resources: ["nodes/pods"], '
    'verbs: ["get"]}; kubelets older than 1.33 (no KubeletFineGrainedAuthz) check '
    '"get nodes/proxy" instead, which is much broader (docs/deployment.md, RBAC)'
)
FIX_RBAC_CHECKPOINT = (
    'add to backupd\'s ClusterRole the rule {apiGroups: [""], resources: ["nodes/checkpoint"], '
    'verbs: ["create"]} (kubelets before 1.30 check "create nodes/proxy" instead)'
)
FIX_API = (
    "turn the kubelet's checkpoint API on: the ContainerCheckpoint feature gate (on by default "
    "since Kubernetes 1.30; before that featureGates: {ContainerCheckpoint: true} in the "
    "KubeletConfiguration) and enableDebuggingHandlers: true, then restart the kubelet"
)
FIX_RUNTIME = (
    "enable checkpointing in the container runtime: CRI-O: enable_criu_support = true under "
    "[crio.runtime] (the default since CRI-O 1.30) with CRIU >= 3.16 installed; containerd: "
    "2.0 or newer with CRIU installed; then restart the runtime"
)
FIX_RUNTIME_UNTESTED = (
    "run `backupd doctor --checkpoint-test NAMESPACE/POD/CONTAINER` naming a running container "
    "of this node: it is checkpointed once (paused for a moment) and the node tar removed"
)
FIX_DIR_MOUNT = (
    "mount the node's /var/lib/kubelet/checkpoints read-write at kubelet.checkpoint_dir "
    "(hostPath); the kubelet creates that directory only when the checkpoint API is on"
)
FIX_DIR_ACCESS = (
    "run backupd as uid 0 (the directory is root 0700 and the archives root 0600; all "
    "capabilities can stay dropped) with the hostPath mounted read-write: see "
    "deploy/kubernetes/base/daemonset.yaml"
)
FIX_SPACE = "free space on the kubelet's disk, or lower daemon.min_free_space"
FIX_IAM = (
    "grant the IAM policy of docs/deployment.md: s3:PutObject, s3:GetObject, s3:DeleteObject, "
    "s3:AbortMultipartUpload on the bucket's prefix/*, and s3:ListBucket, "
    "s3:ListBucketMultipartUploads on the bucket, ListBucket without a prefix condition "
    "(without it S3 answers 403 instead of 404 for a missing key)"
)


@dataclass(frozen=True)
class Check:
    """One finding. ``ok`` is True (fine), False (wrong) or None (not tested); ``severity``
    says whether a failure blocks checkpoints; ``fix`` is empty when there is nothing to do."""

    name: str
    ok: bool | None
    severity: Severity
    message: str
    fix: str = ""
    error_kind: str | None = None
    exit_code: int = EXIT_OK

    @property
    def blocks(self) -> bool:
        return self.ok is False and self.severity == BLOCKING

    @property
    def status(self) -> str:
        if self.ok is None:
            return "skipped"
        if self.ok:
            return "ok"
        return "failed" if self.severity == BLOCKING else "warning"

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name, "status": self.status, "ok": self.ok, "severity": self.severity,
            "message": self.message, "fix": self.fix or None, "error_kind": self.error_kind,
            "exit_code": self.exit_code,
        }  # fmt: skip


def passed(name: str, message: str, severity: Severity = BLOCKING) -> Check:
    return Check(name, True, severity, message)


def failed(name: str, error: BackupdError, fix: str, severity: Severity = BLOCKING) -> Check:
    """A failure found as a :mod:`backupd.errors` class: its exit code becomes the doctor's
    when it is the first blocking one."""
    return Check(name, False, severity, str(error), fix, error.kind, error.exit_code)


def untested(name: str, why: str, fix: str = "", severity: Severity = BLOCKING) -> Check:
    return Check(name, None, severity, f"not tested: {why}", fix)


@dataclass
class Report:
    checks: list[Check] = field(default_factory=list)
    node: str | None = None

    @property
    def exit_code(self) -> int:
        for check in self.checks:
            if check.blocks:
                return check.exit_code
        return EXIT_OK

    @property
    def ok(self) -> bool:
        return self.exit_code == EXIT_OK

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "exit_code": self.exit_code, "node": self.node,
                "checks": [c.to_json() for c in self.checks]}


# -- config and catalog ------------------------------------------------------------------


def check_config(config_path: str | os.PathLike[str] | None) -> tuple[Check, Config | None]:
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        return failed("config", exc, "correct the key named in the message (config/example.toml documents "
                      "every key)"), None
    source = config_path or os.environ.get("BACKUPD_CONFIG")
    if not source:
        source = DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.exists() else "the BACKUPD_* environment"
    return passed("config", f"{source} is valid (node {config.kubelet.node()})"), config


#: the daemon rides out a database restart (``Catalog.DEFAULT_RETRY``: up to a minute); a
#: diagnosis answers within a couple of seconds instead, and says the server is down
DOCTOR_CATALOG_RETRY = retry.Backoff(attempts=2, base_delay=0.5)


def check_catalog(config: Config) -> tuple[Check, Catalog | None]:
    try:
        catalog = Catalog.open(config.database.resolved_url(), retry_backoff=DOCTOR_CATALOG_RETRY)
    except BackupdError as exc:
        return failed("catalog", exc, "fix database.url / database.password_file"), None
    try:
        catalog.check_schema()
    except SchemaOutdated as exc:
        # Reachable, so its run history can still serve the runtime check.
        return failed("catalog", exc, "run `backupd db upgrade` (in Kubernetes: the migration Job or init "
                      "container, docs/deployment.md 'Upgrade')"), catalog
    except CatalogUnavailable as exc:
        catalog.close()
        return failed("catalog", exc, "check that the database server is up and reachable from here, and "
                      "database.url (host, port, user)"), None
    except BackupdError as exc:
        catalog.close()
        return failed("catalog", exc, "fix database.url"), None
    return passed("catalog", f"{catalog.safe_url} is reachable and its schema is current "
                  f"({catalog.head_revision()})"), catalog


# -- kubelet -----------------------------------------------------------------------------


def check_kubelet(config: Config, kubelet: KubeletClient | None, load_error: BackupdError | None) -> list[Check]:
    """Reachability and TLS, credentials, ``get nodes/pods``, the checkpoint API and
    ``create nodes/checkpoint``: one ``GET /pods`` and one checkpoint request for
    :data:`PROBE_TARGET`."""
    url = config.kubelet.url
    names = ("kubelet-tls", "kubelet-credentials", "kubelet-pods", "checkpoint-api")
    if kubelet is None:
        assert load_error is not None
        first = failed(names[0], load_error, FIX_TLS)
        return [first, *(untested(n, "the kubelet's TLS files cannot be loaded") for n in names[1:])]
    token = config.kubelet.token_file
    try:
        if token is not None:
            token.read_bytes()
    except OSError as exc:
        why = "no credentials to present"
        return [
            untested(names[0], why),
            failed(names[1], KubeletUnauthorized(f"cannot read kubelet.token_file {str(token)!r}: {exc.strerror}"),
                   "mount the ServiceAccount token there (automountServiceAccountToken: true) or fix "
                   "kubelet.token_file"),
            *(untested(n, why) for n in names[2:]),
        ]

    checks: dict[str, Check] = {}
    try:
        pods = kubelet.pods()
    except KubeletTLSError as exc:
        checks[names[0]] = failed(names[0], exc, FIX_TLS)
    except (KubeletUnreachable, KubeletTimeout) as exc:
        checks[names[0]] = failed(names[0], exc, FIX_REACH)
    except KubeletUnauthorized as exc:
        checks[names[1]] = failed(names[1], exc, FIX_CREDENTIALS)
        checks[names[2]] = untested(names[2], "the kubelet did not accept the credentials")
    except KubeletForbidden as exc:
        checks[names[2]] = failed(names[2], exc, FIX_RBAC_PODS)
    except KubeletError as exc:
        checks[names[2]] = failed(names[2], exc, "see the kubelet's answer in the message")
    else:
        running = sum(1 for p in pods for c in p.containers if c.running)
        checks[names[2]] = passed(names[2], f"the kubelet lists {len(pods)} pods ({running} running containers)")
    if names[0] in checks:
        return [checks[names[0]], *(untested(n, "no verified TLS connection to the kubelet") for n in names[1:])]
    # Any HTTP answer at all means the TLS handshake verified the kubelet's certificate.
    checks[names[0]] = passed(names[0], f"{url} answers over TLS with a certificate verified against "
                              f"{config.kubelet.ca_file or 'the system trust store'}")
    checks.setdefault(names[1], passed(names[1], "the kubelet accepts backupd's credentials"))

    # The API answers a disabled gate before authenticating, so this is worth asking even
    # when the credentials were refused.
    try:
        kubelet.checkpoint(PROBE_TARGET)
    except TargetGone:
        checks[names[3]] = passed(names[3], "the checkpoint API is on and backupd may use it (a probe for a pod "
                                  "that cannot exist answered 'pod does not exist')")
    except CheckpointApiDisabled as exc:
        checks[names[3]] = failed(names[3], exc, FIX_API)
    except KubeletForbidden as exc:
        checks[names[3]] = failed(names[3], exc, FIX_RBAC_CHECKPOINT)
    except KubeletUnauthorized:
        checks[names[3]] = untested(names[3], "the kubelet did not accept the credentials (the API is on: a "
                                    "disabled API answers before authentication)")
    except KubeletError as exc:
        checks[names[3]] = failed(names[3], exc, "see the kubelet's answer in the message")
    else:
        checks[names[3]] = failed(names[3], KubeletProtocolError(
            f"the kubelet at {url} claims to have checkpointed {PROBE_TARGET}, a pod that cannot exist: is "
            "this a kubelet?"), "point kubelet.url at the node's kubelet", WARNING)
    return [checks[n] for n in names]


def check_runtime(config: Config, kubelet: KubeletClient | None, catalog: Catalog | None,
                  api_ok: bool, target: Target | None) -> Check:
    """Whether the container runtime can checkpoint. Only a real checkpoint reaches the
    runtime: with ``target`` one is taken (and its node tar removed); without, the catalog's
    run history of this node is the evidence, and with none the check is not tested."""
    name = "runtime"
    if target is not None:
        if kubelet is None or not api_ok:
            return untested(name, f"cannot checkpoint {target}: the checkpoint API check did not pass")
        return _checkpoint_test(name, kubelet, CheckpointDir(config.kubelet.checkpoint_dir), target)
    node = config.kubelet.node()
    if catalog is not None:
        try:
            runs = catalog.list_runs(kind="checkpoint", limit=_HISTORY_RUNS)
        except BackupdError:
            runs = []
        for run in runs:  # newest first
            if run.node != node:
                continue
            where = f"{run.namespace}/{run.pod}/{run.container} at {run.started_at:%Y-%m-%d %H:%M:%SZ}"
            if run.outcome == SUCCEEDED:
                return passed(name, f"the runtime checkpoints: the last checkpoint on node {node} ({where}) "
                              "succeeded")
            if run.error_kind == CheckpointUnsupported.__name__:
                return failed(name, CheckpointUnsupported(
                    f"the last checkpoint attempt on node {node} ({where}) failed: {run.error}"),
                    FIX_RUNTIME + "; then confirm with --checkpoint-test")
    return untested(name, f"only a real checkpoint reaches the container runtime, and node {node} has no "
                    "checkpoint in the catalog's run history", FIX_RUNTIME_UNTESTED)


def _checkpoint_test(name: str, kubelet: KubeletClient, directory: CheckpointDir, target: Target) -> Check:
    try:
        path = kubelet.checkpoint(target)
    except CheckpointUnsupported as exc:
        return failed(name, exc, FIX_RUNTIME)
    except TargetGone as exc:
        return failed(name, exc, "name a running container of this node (kubectl get pods -A -o wide "
                      "--field-selector spec.nodeName=$NODE_NAME)", WARNING)
    except UnsafeCheckpointPath as exc:
        return failed(name, exc, "set kubelet.checkpoint_dir to the kubelet's <root-dir>/checkpoints and mount "
                      "it there; remove the archive the kubelet wrote by hand")
    except KubeletError as exc:
        return failed(name, exc, "the runtime can checkpoint in principle but not this container; read the "
                      "runtime's error in the message, or try another container", WARNING)
    size, head = "?", b""
    try:
        with directory.open(path.name) as stream:
            head = stream.read(512)
            size = human_bytes(os.fstat(stream.fileno()).st_size)
    except BackupdError as exc:
        directory_error: BackupdError | None = exc
    else:
        directory_error = None
    try:
        directory.remove(path.name)
    except BackupdError as exc:
        directory_error = directory_error or exc
    if directory_error is not None:
        return failed(name, type(directory_error)(
            f"the runtime checkpointed {target} to {path}, but backupd cannot read or remove it: "
            f"{directory_error}"), FIX_DIR_ACCESS)
    if head[257:262] != b"ustar":
        return failed(name, KubeletProtocolError(
            f"the runtime checkpointed {target} to {path}, but that is not a tar archive"),
            "check the container runtime's checkpoint support", WARNING)
    return passed(name, f"the runtime checkpointed {target} ({size}); backupd read and removed {path.name}")


# -- node directory and backends ---------------------------------------------------------


def check_checkpoint_dir(config: Config) -> Check:
    """The directory exists, backupd can create and remove files in it (it deletes committed
    tars) and read the archives there, and free space is above ``daemon.min_free_space``."""
    name = "checkpoint-dir"
    path = Path(config.kubelet.checkpoint_dir)
    floor = config.daemon.min_free_space
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return failed(name, StorageNotFound(f"the node checkpoint directory {str(path)!r} does not exist"),
                      FIX_DIR_MOUNT)
    except OSError as exc:
        return failed(name, StorageError(f"cannot look at {str(path)!r}: {exc.strerror}"), FIX_DIR_ACCESS)
    if not stat.S_ISDIR(st.st_mode):
        return failed(name, StorageError(f"{str(path)!r} is not a directory (symlinks are not followed)"),
                      FIX_DIR_MOUNT)
    probe = f"{PROBE_PREFIX}-{secrets.token_hex(6)}"
    try:
        dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                         dir_fd=dfd)
            os.close(fd)
            os.unlink(probe, dir_fd=dfd)
        finally:
            os.close(dfd)
    except OSError as exc:
        fix = FIX_DIR_MOUNT if exc.strerror and "Read-only" in exc.strerror else FIX_DIR_ACCESS
        return failed(name, StorageError(f"backupd cannot create and remove files in {str(path)!r}: {exc.strerror}"),
                      fix)
    directory = CheckpointDir(path)
    try:
        tars = directory.list()
        if tars:
            with directory.open(tars[-1].name) as stream:
                stream.read(1)
        free = directory.free_bytes()
    except BackupdError as exc:
        return failed(name, exc, FIX_DIR_ACCESS)
    if free < floor:
        return failed(name, NoSpace(f"only {human_bytes(free)} free in {path}, below daemon.min_free_space "
                                    f"({human_bytes(floor)}): checkpoints are skipped"), FIX_SPACE)
    held = f"{len(tars)} node tar(s), {human_bytes(sum(t.size for t in tars))}" if tars else "no node tars"
    return passed(name, f"{path} is writable and readable ({held}); {human_bytes(free)} free, above "
                  f"daemon.min_free_space ({human_bytes(floor)})")


def check_backend(cfg: BackendConfig, node: str) -> Check:
    """Write a small probe object, read it back, delete it and see it gone."""
    name = f"backend:{cfg.name}"
    key = f"{PROBE_PREFIX}/{node}-{secrets.token_hex(6)}"
    data = b"backupd doctor probe: safe to delete\n"
    try:
        backend = open_backend(cfg, retries=False)
    except BackupdError as exc:
        return failed(name, exc, _backend_fix(exc, cfg))
    written = False
    try:
        backend.put_bytes(key, data)
        written = True
        if backend.read_bytes(key) != data:
            return failed(name, IntegrityError(f"backend {backend.describe()}: the probe object {key!r} read back "
                                               "differently"), "check the storage for corruption or a rewriting proxy")
        backend.delete(key)
        written = False
        if backend.stat(key) is not None:
            return failed(name, StorageError(f"backend {backend.describe()}: the probe object {key!r} is still "
                                             "there after its deletion"),
                          "check the bucket's object lock / versioning settings")
    except BackupdError as exc:
        return failed(name, exc, _backend_fix(exc, cfg))
    finally:
        if written:
            try:
                backend.delete(key)
            except BackupdError:
                pass  # the failure is reported already; the probe key says it is safe to delete
    return passed(name, f"backend {backend.describe()}: wrote, read and deleted a probe object")


def _backend_fix(exc: BackupdError, cfg: BackendConfig) -> str:
    s3 = isinstance(cfg, S3BackendConfig)
    if isinstance(exc, StorageAuthError):
        return FIX_IAM if s3 else "let backupd's user write to the backend's path"
    if isinstance(exc, StorageNotFound):
        return "create the bucket, or fix [[backends]] bucket" if s3 else "fix [[backends]] path"
    if isinstance(exc, StorageUnavailable):
        return "check endpoint_url, region, DNS and the network path from this pod"
    if isinstance(exc, ConfigError):
        return "fix the backend's settings named above"
    if isinstance(exc, NoSpace):
        return "free space on the backend's filesystem"
    if isinstance(exc, StorageError) and not isinstance(cfg, S3BackendConfig):
        return f"make {cfg.path} (or a parent) a writable directory for backupd's user"
    return "see the message"


# -- all together ------------------------------------------------------------------------


def diagnose(config_path: str | os.PathLike[str] | None = None, *, checkpoint_test: Target | None = None) -> Report:
    """Run every check; see the module docstring for what each touches."""
    report = Report()
    config_check, config = check_config(config_path)
    report.checks.append(config_check)
    if config is None:
        for name in ("catalog", "kubelet-tls", "kubelet-credentials", "kubelet-pods", "checkpoint-api", "runtime",
                     "checkpoint-dir", "backends"):
            report.checks.append(untested(name, "the configuration is invalid"))
        return report
    report.node = config.kubelet.node()
    with ExitStack() as stack:
        catalog_check, catalog = check_catalog(config)
        report.checks.append(catalog_check)
        if catalog is not None:
            stack.callback(catalog.close)
        kubelet, load_error = None, None
        try:
            kubelet = KubeletClient(config.kubelet)
            stack.callback(kubelet.close)
        except BackupdError as exc:
            load_error = exc
        kubelet_checks = check_kubelet(config, kubelet, load_error)
        report.checks.extend(kubelet_checks)
        api_ok = all(c.ok for c in kubelet_checks if c.name in ("kubelet-tls", "checkpoint-api"))
        report.checks.append(check_runtime(config, kubelet, catalog, api_ok, checkpoint_test))
        report.checks.append(check_checkpoint_dir(config))
        report.checks.extend(_backend_checks(config, report.node))
    return report


def _backend_checks(config: Config, node: str) -> Iterator[Check]:
    if not config.backends:
        yield failed("backends", ConfigError("no [[backends]] configured: archives have nowhere to go"),
                     "add a filesystem or s3 backend (config/example.toml)")
    for cfg in config.backends:
        yield check_backend(cfg, node)


def parse_target(value: str) -> Target:
    """``NAMESPACE/POD/CONTAINER`` → :class:`Target`; raises :class:`ValueError` naming the value."""
    parts = value.split("/")
    if len(parts) != 3 or not all(parts):
        raise ValueError(f"expected NAMESPACE/POD/CONTAINER, got {value!r}")
    return Target(*parts)
