"""Secrets never leave: a whole session of the real CLI (subprocesses, a TOML config) with
recognisable secret values -- S3 keys, the database password, the kubelet token, the API token,
the alert webhook URL -- then every byte backupd produced is searched for them: stdout and
stderr of every command (debug logging on), every file it wrote (backend objects, manifests,
report, restored tar), every text column of the catalog, /metrics and every API answer.

The session includes what tends to leak: failing runs (kubelet 401, S3 credentials refused),
an alert delivery that fails, config errors, an unreachable catalog.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.engine import make_url

from backupd import logs
from backupd.catalog.store import Catalog
from backupd.errors import CatalogUnavailable
from backupd.retry import Backoff
from backupd.simulator.server import NodeSimulator
from tests.conftest import PG_URL, postgres_schema
from tests.reliability.inprocess import run_cli as run_in_process
from tests.s3_rig import REGION, admin_client, empty_bucket, set_moto_auth

CANARY = "LEAKCANARY"

POLICIES = """\
apiVersion: backupd.io/v1
kind: CheckpointPolicy
metadata: {name: db}
spec:
  selector: {namespaces: [shop], matchLabels: {app: db}, containers: [postgres]}
  schedule: "@every 2s"
  backend: s3
  retention: {keepLast: 2}
---
apiVersion: backupd.io/v1
kind: CheckpointPolicy
metadata: {name: web}
spec:
  selector: {namespaces: [default], matchLabels: {app: web}}
  schedule: "@every 1h"
  backend: local
  retention: {keepLast: 1}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Session:
    """What a session produced, by where it was found, and the secrets to look for in it."""

    secrets: dict[str, str]
    outputs: list[tuple[str, str]] = field(default_factory=list)  # (command, stdout + stderr)
    http: list[tuple[str, str]] = field(default_factory=list)  # (request, status + headers + body)
    files: dict[str, bytes] = field(default_factory=dict)
    catalog: list[tuple[str, str]] = field(default_factory=list)  # (table.column, value)
    codes: dict[str, int] = field(default_factory=dict)

    def leaks(self, items: list[tuple[str, str]] | dict[str, bytes]) -> list[str]:
        """``"<secret> in <where>"`` for each secret found, verbatim or URL-encoded."""
        found = []
        pairs = items.items() if isinstance(items, dict) else items
        for where, content in pairs:
            data = content if isinstance(content, bytes) else content.encode()
            for name, value in self.secrets.items():
                for form in {value, urllib.parse.quote(value, safe="")}:
                    if form.encode() in data:
                        found.append(f"{name} in {where}")
        return found


def make_secrets(db_url: str) -> tuple[dict[str, str], str]:
    """Recognisable secret values, and the database URL with the password in it (PostgreSQL
    under trust authentication never asks for it, so any value works; SQLite has none)."""
    values = {
        "S3 access key id": f"AKIA{CANARY}{secrets.token_hex(3).upper()}",
        "S3 secret access key": f"s3-{CANARY}-{secrets.token_urlsafe(24)}",
        "kubelet token": f"kubelet-{CANARY}-{secrets.token_hex(16)}",
        "API token": f"api-{CANARY}-{secrets.token_hex(16)}",
        "alert webhook URL": f"http://127.0.0.1:{free_port()}/hooks/{CANARY}-{secrets.token_hex(12)}",
    }
    url = make_url(db_url)
    if url.get_backend_name() == "postgresql":
        values["database password"] = f"db-{CANARY}-{secrets.token_hex(12)}"
        db_url = url.set(password=values["database password"]).render_as_string(hide_password=False)
    return values, db_url


class Rig:
    """The real CLI against the simulator, moto and a catalog, with every secret in a 0600 file
    the config points at; each command's output is recorded in :attr:`session`."""

    def __init__(self, root: Path, sim: NodeSimulator, moto: str, bucket: str, db_url: str,
                 values: dict[str, str]) -> None:
        self.root, self.sim, self.moto, self.api_port = root, sim, moto, free_port()
        self.secret_dir = root / "secrets"
        self.secret_dir.mkdir(mode=0o700)
        self.session = Session(values)
        self.db_url = db_url
        files = {"s3-key-id": values["S3 access key id"], "s3-secret": values["S3 secret access key"],
                 "kubelet-token": values["kubelet token"], "api-token": values["API token"],
                 "webhook-url": values["alert webhook URL"]}
        for name, value in files.items():
            (self.secret_dir / name).write_text(value + "\n")
            os.chmod(self.secret_dir / name, 0o600)
        self.backend = root / "backend"
        self.out = root / "out"
        self.out.mkdir(mode=0o700)
        self.config = self.secret_dir / "config.toml"
        self.config.write_text(self.toml(bucket))

    def toml(self, bucket: str) -> str:
        s = self.secret_dir
        return (
            f'[database]\nurl = "{self.db_url}"\n'
            f'[kubelet]\nurl = "{self.sim.url}"\nca_file = "{self.sim.ca_file}"\ntoken_file = "{s / "kubelet-token"}"\n'
            f'checkpoint_dir = "{self.sim.checkpoint_dir}"\nnode_name = "sim-node"\nrequest_timeout_seconds = 20\n'
            f'[daemon]\nmin_free_space = 0\nhttp_listen = "127.0.0.1:{self.api_port}"\n'
            f'api_token_file = "{s / "api-token"}"\nshutdown_grace_seconds = 10\n'
            f'[alerts]\nwebhook_url_file = "{s / "webhook-url"}"\ntimeout_seconds = 2\nmin_interval_seconds = 0\n'
            f'[[backends]]\nname = "s3"\ntype = "s3"\nbucket = "{bucket}"\nprefix = "prod"\n'
            f'endpoint_url = "{self.moto}"\nregion = "{REGION}"\naddressing_style = "path"\n'
            f'access_key_id_file = "{s / "s3-key-id"}"\nsecret_access_key_file = "{s / "s3-secret"}"\n'
            f'[[backends]]\nname = "local"\ntype = "filesystem"\npath = "{self.backend}"\n'
        )

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("BACKUPD_", "AWS_"))}
        env.update(AWS_EC2_METADATA_DISABLED="true", AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull)
        env.update(extra)
        return env

    def run(self, *args: str, stdin: str | None = None, config: Path | None = None, env: dict[str, str] | None = None,
            expect: int | None = 0) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "backupd", "--log-level", "debug", "--config", str(config or self.config), *args]
        proc = subprocess.run(argv, input=stdin, capture_output=True, text=True, env=env or self.env(), timeout=120,
                              cwd=self.root)
        label = " ".join(args)
        self.session.outputs.append((f"`{label}`", proc.stdout + proc.stderr))
        self.session.codes[label] = proc.returncode
        if expect is not None:
            assert proc.returncode == expect, (label, proc.returncode, proc.stdout[-2000:], proc.stderr[-3000:])
        return proc

    def daemon(self, seconds: float) -> None:
        argv = [sys.executable, "-m", "backupd", "--log-level", "debug", "--config", str(self.config), "run"]
        log = self.root / "daemon.log"
        with open(log, "w") as err:
            proc = subprocess.Popen(argv, stdout=err, stderr=subprocess.STDOUT, env=self.env(), cwd=self.root)
            try:
                base = f"http://127.0.0.1:{self.api_port}"
                token = {"Authorization": f"Bearer {self.session.secrets['API token']}"}
                wrong = {"Authorization": f"Bearer {self.session.secrets['API token']}x"}
                deadline = time.monotonic() + 30
                while True:
                    try:
                        httpx.get(f"{base}/healthz", timeout=2)
                        break
                    except httpx.TransportError:
                        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                        time.sleep(0.2)
                time.sleep(seconds)
                with httpx.Client(base_url=base, timeout=10) as client:
                    for path in ("/healthz", "/readyz", "/metrics", "/openapi.json", "/api/v1/policies",
                                 "/api/v1/archives", "/api/v1/archives?state=failed", "/api/v1/runs",
                                 "/api/v1/runs?outcome=failed", "/api/v1/report", "/api/v1/nothing"):
                        for who, headers in (("with the token", token), ("without a token", {}),
                                             ("with a wrong token", wrong)):
                            r = client.get(path, headers=headers)
                            self.session.http.append((f"GET {path} {who}", f"{r.status_code} {r.headers}\n{r.text}"))
                            self.session.codes[f"GET {path} {who}"] = r.status_code
            finally:
                proc.send_signal(signal.SIGTERM)
                code = proc.wait(60)
        self.session.outputs.append(("`run` (the daemon)", log.read_text()))
        self.session.codes["run"] = code


@pytest.fixture(scope="module")
def database(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """PostgreSQL (with a password in the URL) when the test database is configured, else SQLite."""
    if not PG_URL:
        yield f"sqlite:///{tmp_path_factory.mktemp('catalog') / 'catalog.db'}"
        return
    with postgres_schema("secrets_") as url:
        yield url


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory, moto_endpoint: str, database: str) -> Iterator[Session]:
    root = tmp_path_factory.mktemp("secrets")
    s3 = admin_client(moto_endpoint)
    bucket = f"backupd-secrets-{uuid.uuid4().hex[:10]}"
    s3.create_bucket(Bucket=bucket)
    values, db_url = make_secrets(database)
    # the kubelet accepts the token only (no client certificate is configured)
    with NodeSimulator(root / "node", memory_bytes=2 << 20, tokens={values["kubelet token"]: "backupd"}) as sim:
        rig = Rig(root, sim, moto_endpoint, bucket, db_url, values)
        try:
            run_session(rig, s3, bucket)
        finally:
            set_moto_auth(moto_endpoint, False)
        collect(rig, s3, bucket)
    empty_bucket(s3, bucket)
    s3.delete_bucket(Bucket=bucket)
    yield rig.session


def run_session(rig: Rig, s3: Any, bucket: str) -> None:
    rig.run("db", "upgrade")
    (rig.root / "policies.yaml").write_text(POLICIES)
    rig.run("policy", "apply", "-f", str(rig.root / "policies.yaml"))
    rig.run("policy", "list", "-o", "json")
    rig.run("checkpoint", "-o", "json")
    archives = json.loads(rig.run("list", "-o", "json").stdout)
    rig.run("prune", "-o", "json")
    rig.run("verify", "-o", "json")
    rig.run("catalog", "rebuild")
    rig.run("report", "-o", "json")
    rig.run("report", "-o", "html", "--out", str(rig.out / "report.html"))
    s3_archive = next(a["id"] for a in archives if a["backend"] == "s3")
    rig.run("restore", s3_archive, "--to", str(rig.out / "restored.tar"))
    rig.run("inspect", s3_archive, expect=None)
    rig.run("doctor", expect=None)
    # failing runs: the kubelet refuses the token, then S3 refuses the keys
    rig.sim.add_fault("respond", method="POST", path="/checkpoint/*", status=401, body="Unauthorized", times=3)
    rig.run("checkpoint", expect=8)
    set_moto_auth(rig.moto, True)
    try:
        rig.run("checkpoint", "--policy", "db", expect=8)
        rig.run("verify", expect=None)
    finally:
        set_moto_auth(rig.moto, False)
    # the daemon: scheduled runs, prune, alerts (delivery fails: nobody listens), HTTP API
    rig.daemon(seconds=5)
    # config errors and an unreachable catalog, with secrets in the offending values
    cases = {
        "unknown key holding a token": '[kubelet]\ntoken = "{kubelet token}"\n',
        "secret of the wrong type": ('[[backends]]\nname = "s3"\ntype = "s3"\nbucket = "b"\n'
                                     'secret_access_key = ["{S3 secret access key}"]\n'),
        "webhook URL in a bad place": '[alerts]\nwebhook_url = "ftp://{alert webhook URL}"\n',
        "API token as an unknown daemon key": '[daemon]\napi_token = "{API token}"\n',
    }
    if "database password" in rig.session.secrets:
        cases["database URL of an unsupported kind"] = '[database]\nurl = "mysql://u:{database password}@h/db"\n'
        cases["database URL that is no URL"] = '[database]\nurl = "postgresql://u:{database password}@h:port/db"\n'
    for body in cases.values():
        bad = rig.secret_dir / f"bad-{len(rig.session.outputs)}.toml"
        if "[database]" not in body:  # never the default /var/lib/backupd
            body = f'[database]\nurl = "sqlite:///{rig.root / "unused.db"}"\n' + body
        bad.write_text(body.format(**rig.session.secrets))
        rig.run("list", config=bad, expect=None)  # exit codes: test_config_errors_exit_2


def collect(rig: Rig, s3: Any, bucket: str) -> None:
    """Everything backupd wrote: backend files, out files, S3 objects, catalog text columns."""
    session = rig.session
    for base in (rig.backend, rig.out):
        for path in base.rglob("*"):
            if path.is_file():
                session.files[str(path.relative_to(rig.root))] = path.read_bytes()
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", ()):
            session.files[f"s3://{bucket}/{obj['Key']}"] = s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
    engine = create_engine(rig.db_url.replace("postgresql://", "postgresql+psycopg://", 1))
    try:
        with engine.connect() as conn:
            for table in inspect(conn).get_table_names():
                for row in conn.execute(text(f"SELECT * FROM {table}")).mappings():
                    for column, value in row.items():
                        if value is not None:
                            session.catalog.append((f"{table}.{column}", str(value)))
    finally:
        engine.dispose()


def test_the_session_did_what_it_claims(session: Session) -> None:
    """The scans below prove something only if the session really ran, failed and served --
    and if the scanner finds a secret where there is one."""
    for name, value in session.secrets.items():
        assert session.leaks([("a probe", f"..{value}..")]) == [f"{name} in a probe"]
    codes = session.codes
    assert codes["run"] == 0 and codes["checkpoint --policy db"] == 8
    assert codes["GET /api/v1/runs with the token"] == 200 and codes["GET /api/v1/runs without a token"] == 401
    assert codes["GET /api/v1/runs with a wrong token"] == 401
    errors = {value for where, value in session.catalog if where == "runs.error_kind"}
    assert {"KubeletUnauthorized", "StorageAuthError"} <= errors, errors
    assert any(where.endswith(".json") and where.startswith("s3://") for where in session.files), "no manifest in S3"
    assert "out/restored.tar" in session.files and "out/report.html" in session.files
    daemon_log = dict(session.outputs)["`run` (the daemon)"]
    assert '"event": "run_finished"' in daemon_log and '"event": "alert_delivery_failed"' in daemon_log


def test_no_secret_in_any_command_output(session: Session) -> None:
    assert session.leaks(session.outputs) == []


def test_no_secret_in_any_file_backupd_wrote(session: Session) -> None:
    assert session.leaks(session.files) == []


def test_no_secret_in_the_catalog(session: Session) -> None:
    assert session.leaks(session.catalog) == []


def test_no_secret_in_metrics_or_api_answers(session: Session) -> None:
    assert session.leaks(session.http) == []


SECRET = f"cfg-{CANARY}-{secrets.token_hex(8)}"
CONFIG_ERRORS = {
    "unknown key holding a token": '[kubelet]\ntoken = "SECRET"\n',
    "unknown daemon key holding the API token": '[daemon]\napi_token = "SECRET"\n',
    "S3 secret of the wrong type": ('[[backends]]\nname = "s3"\ntype = "s3"\nbucket = "b"\n'
                                    'secret_access_key = ["SECRET"]\n'),
    "S3 key id of the wrong type": '[[backends]]\nname = "s3"\ntype = "s3"\nbucket = "b"\naccess_key_id = 5\n'
                                   'secret_access_key = "SECRET"\n',
    "webhook URL that is not http(s)": '[alerts]\nwebhook_url = "ftp://x:SECRET@h/"\n',
    "webhook URL in an env override": None,
    "database URL of an unsupported kind": '[database]\nurl = "mysql://u:SECRET@h/db"\n',
    "database URL that is no URL": '[database]\nurl = "postgresql://u:SECRET@h:port/db"\n',
    "kubelet URL over http with credentials in it": '[kubelet]\nurl = "http://u:SECRET@h"\n',
    "S3 endpoint that is not http(s), with credentials": ('[[backends]]\nname = "s3"\ntype = "s3"\nbucket = "b"\n'
                                                          'endpoint_url = "s3://k:SECRET@h"\n'),
}


@pytest.mark.parametrize("case", list(CONFIG_ERRORS))
def test_config_errors_exit_2_and_never_echo_a_secret(tmp_path: Path, case: str) -> None:
    body = CONFIG_ERRORS[case]
    env: dict[str, str] = {}
    if body is None:
        env["BACKUPD_ALERTS__WEBHOOK_URL"] = "gopher://x:SECRET@h/".replace("SECRET", SECRET)
        body = ""
    if "[database]" not in body:
        body = f'[database]\nurl = "sqlite:///{tmp_path / "catalog.db"}"\n' + body
    config = tmp_path / "config.toml"
    config.write_text(body.replace("SECRET", SECRET))
    code, out, err = run_in_process(config, "list", env=env)
    assert (code, SECRET in out + err, "Traceback" in err) == (2, False, False), err[-2000:]


def test_age_identities_never_leak(tmp_path: Path) -> None:
    """Encrypted archives: the age identity restore and verify are given never appears in their
    output, nor in what the daemon's side wrote; a wrong or malformed identity fails cleanly."""
    import pyrage

    identity, stranger = pyrage.x25519.Identity.generate(), pyrage.x25519.Identity.generate()
    key_file, wrong_file, bad_file = tmp_path / "id.txt", tmp_path / "wrong.txt", tmp_path / "bad.txt"
    key_file.write_text(f"# backupd restore key\n{identity}\n")
    wrong_file.write_text(f"{stranger}\n")
    bad_file.write_text(f"AGE-SECRET-KEY-1{CANARY}\n")
    with NodeSimulator(tmp_path / "node", memory_bytes=1 << 20) as sim:
        config = tmp_path / "config.toml"
        config.write_text(
            f'[database]\nurl = "sqlite:///{tmp_path / "catalog.db"}"\n'
            f'[kubelet]\nurl = "{sim.url}"\nca_file = "{sim.ca_file}"\ncert_file = "{sim.client_cert}"\n'
            f'key_file = "{sim.client_key}"\ncheckpoint_dir = "{sim.checkpoint_dir}"\nnode_name = "sim-node"\n'
            f'[daemon]\nmin_free_space = 0\n'
            f'[[backends]]\nname = "local"\ntype = "filesystem"\npath = "{tmp_path / "backend"}"\n'
            f'encryption_recipients = ["{identity.to_public()}"]\n')
        outputs = []

        def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
            proc = subprocess.run([sys.executable, "-m", "backupd", "--log-level", "debug", "--config", str(config),
                                   *args], input=stdin, capture_output=True, text=True, timeout=120,
                                  env={k: v for k, v in os.environ.items() if not k.startswith("BACKUPD_")})
            outputs.append(proc.stdout + proc.stderr)
            return proc

        assert run("db", "upgrade").returncode == 0
        assert run("policy", "apply", "-f", "-", stdin=POLICIES.split("---\n")[1]).returncode == 0
        assert run("checkpoint").returncode == 0
        archive = json.loads(run("list", "-o", "json").stdout)[0]["id"]
        assert run("restore", archive, "--to", str(tmp_path / "ok.tar"), "--identity-file", str(key_file)
                   ).returncode == 0
        assert run("verify", "--identity-file", str(key_file)).returncode == 0
        assert run("restore", archive, "--to", str(tmp_path / "no.tar"), "--identity-file", str(wrong_file)
                   ).returncode in (2, 7)
        assert run("restore", archive, "--to", str(tmp_path / "no.tar"), "--identity-file", str(bad_file)
                   ).returncode == 2
    assert not (tmp_path / "no.tar").exists()
    written = [p.read_bytes() for p in (tmp_path / "backend").rglob("*") if p.is_file()]
    for secret in (str(identity), str(stranger), CANARY):
        assert not [o for o in outputs if secret in o], f"{secret[:20]}... leaked into command output"
        assert not [w for w in written if secret.encode() in w]


def test_an_unreachable_catalog_names_no_password(capsys: pytest.CaptureFixture[str]) -> None:
    """The catalog retries for about half a minute before the CLI exits 4; here two quick
    attempts: the retry warnings and the final error hold the driver's reason, not the URL."""
    password = f"db-{CANARY}-{secrets.token_hex(8)}"
    catalog = Catalog.open(f"postgresql+psycopg://backupd:{password}@127.0.0.1:1/db",
                           retry_backoff=Backoff(attempts=2, base_delay=0.01))
    logs.configure(json_output=True, level="debug")
    try:
        with pytest.raises(CatalogUnavailable) as info:
            catalog.list_policies()
    finally:
        catalog.close()
    err = capsys.readouterr().err
    assert "catalog_retry" in err and "127.0.0.1" in str(info.value)
    assert password not in str(info.value) and password not in err and password not in repr(catalog.safe_url)
