"""The restore rig: real archives taken from the node simulator, the ``backupd`` command run
in-process through its real entry point, and Debian's ``docker-registry`` on loopback (plain
HTTP, and TLS + htpasswd basic auth) with ``skopeo`` to read back what was pushed."""

from __future__ import annotations

import json
import re
import secrets
import shutil
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog

from backupd.policy.document import parse_policies
from backupd.simulator.server import NodeSimulator
from tests.policies import web_policy

REGISTRY_BIN = shutil.which("docker-registry")
SKOPEO_BIN = shutil.which("skopeo")
needs_registry = pytest.mark.skipif(
    REGISTRY_BIN is None or SKOPEO_BIN is None,
    reason="needs Debian's docker-registry and skopeo (apt-get install docker-registry skopeo)",
)



def write_config(path: Path, tmp_path: Path, sim: NodeSimulator, *, s3: dict[str, str] | None = None,
                 db_url: str | None = None, fmt: str = "full") -> Path:
    db_url = db_url or f"sqlite:///{tmp_path / 'catalog.db'}"
    text = (
        f'[database]\nurl = "{db_url}"\n'
        f'[kubelet]\nurl = "{sim.url}"\nca_file = "{sim.ca_file}"\ncert_file = "{sim.client_cert}"\n'
        f'key_file = "{sim.client_key}"\ncheckpoint_dir = "{sim.checkpoint_dir}"\nnode_name = "sim-node"\n'
        f'[daemon]\nmin_free_space = 0\n'
        f'[[backends]]\nname = "local"\ntype = "filesystem"\npath = "{tmp_path / "backend"}"\n'
        f'format = "{fmt}"\n'
    )
    if s3:
        text += "[[backends]]\n" + "".join(f'{k} = "{v}"\n' for k, v in s3.items())
    path.write_text(text)
    return path


@dataclass
class Rig:
    """A config file, the App behind it, and the command line."""

    tmp_path: Path
    sim: NodeSimulator
    config: Path
    app: Any

    def take(self, backend: str = "local") -> list[Any]:
        """One checkpoint cycle of the web policy; the archives it committed, oldest first."""
        policy = parse_policies(web_policy(backend=backend, retention="{keepLast: 10}", keep_on_node=10), "web.yaml",
                                backends=list(self.app.backends))[0]
        self.app.catalog.apply_policies([(policy.name, policy.canonical_json())])
        result = self.app.runner.cycle(policy)
        assert not result.failed, result
        return sorted((o.archive for o in result.outcomes if o.archive), key=lambda a: a.checkpoint_time)

    def node_tar(self, archive: Any) -> Path:
        return self.sim.checkpoint_dir / archive.node_path

    def stored(self, archive: Any) -> Path:
        return self.tmp_path / "backend" / archive.key

    def run(self, *args: str, code: int = 0, env: dict[str, str] | None = None,
            capsys: pytest.CaptureFixture[str]) -> tuple[str, str]:
        """``backupd --config CFG ARGS...`` through the real entry point; asserts the exit code."""
        from backupd.cli import main

        capsys.readouterr()
        with pytest.MonkeyPatch.context() as mp:
            for k, v in (env or {}).items():
                mp.setenv(k, v)
            with pytest.raises(SystemExit) as exit_info:
                main(["--config", str(self.config), *args])
        out, err = capsys.readouterr()
        assert exit_info.value.code == code, (exit_info.value.code, out, err)
        return out, err


@pytest.fixture(autouse=True)
def _keep_logging_config() -> Iterator[None]:
    """The entry point configures structlog onto this test's captured stderr; undo that."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


@pytest.fixture
def rig_factory(tmp_path: Path, sim: NodeSimulator) -> Iterator[Callable[..., Rig]]:
    from backupd.app import App
    from backupd.config import load_config

    apps: list[Any] = []

    def make(s3: dict[str, str] | None = None, fmt: str = "full") -> Rig:
        config = write_config(tmp_path / "config.toml", tmp_path, sim, s3=s3, fmt=fmt)
        app = App(load_config(config))
        app.catalog.upgrade()
        apps.append(app)
        return Rig(tmp_path, sim, config, app)

    yield make
    for app in apps:
        app.close()


@pytest.fixture
def rig(rig_factory: Callable[..., Rig]) -> Rig:
    return rig_factory()


# -- the registry --------------------------------------------------------------------------------


@dataclass
class Registry:
    host: str
    root: Path
    log: Path
    proc: subprocess.Popen[bytes]
    username: str | None = None
    password: str | None = None
    ca_file: Path | None = None

    def skopeo_auth(self) -> list[str]:
        # skopeo's cert dir takes *.crt as CAs and *.key as client keys: give it the CA alone.
        flags = ["--tls-verify=false"] if self.ca_file is None else [f"--cert-dir={self.ca_file.parent / 'trust'}"]
        if self.username:
            flags.append(f"--creds={self.username}:{self.password}")
        return flags


def _log_tail(log: Path) -> str:
    try:
        return log.read_text(errors="replace")[-2000:]
    except OSError:
        return ""


def start_registry(directory: Path, *, users: dict[str, str] | None = None, tls: Any = None) -> Registry:
    """``docker-registry`` on an ephemeral loopback port, storage and config under ``directory``."""
    assert REGISTRY_BIN is not None
    directory.mkdir(parents=True, exist_ok=True)
    root = directory / "storage"
    log = directory / "registry.log"
    config: dict[str, Any] = {
        "version": 0.1,
        "log": {"level": "info", "accesslog": {"disabled": True}},
        "storage": {"filesystem": {"rootdirectory": str(root)}, "delete": {"enabled": True}},
        "http": {"addr": "127.0.0.1:0", "secret": secrets.token_hex(16)},
    }
    if users:
        import bcrypt

        htpasswd = directory / "htpasswd"
        htpasswd.write_text("".join(
            f"{u}:{bcrypt.hashpw(p.encode(), bcrypt.gensalt(rounds=4, prefix=b'2a')).decode()}\n"
            for u, p in users.items()
        ))  # fmt: skip
        config["auth"] = {"htpasswd": {"realm": "backupd-test", "path": str(htpasswd)}}
    if tls is not None:
        config["http"]["tls"] = {"certificate": str(tls.server_cert), "key": str(tls.server_key)}
    # JSON is YAML: no YAML writer needed for the registry's config.
    (directory / "config.yml").write_text(json.dumps(config))
    with open(log, "wb") as log_fh:
        proc = subprocess.Popen([REGISTRY_BIN, "serve", str(directory / "config.yml")], stdout=log_fh,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        host = _wait_until_serving(proc, log, tls)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    user, password = next(iter(users.items())) if users else (None, None)
    return Registry(host, root, log, proc, user, password, tls.ca_file if tls is not None else None)


def _wait_until_serving(proc: subprocess.Popen[bytes], log: Path, tls: Any) -> str:
    """The registry's ``127.0.0.1:<port>`` once it has logged its port and answers ``/v2/``."""
    deadline = time.monotonic() + 20
    host = None
    while time.monotonic() < deadline and host is None:
        if proc.poll() is not None:
            raise RuntimeError(f"docker-registry exited with {proc.returncode}: {_log_tail(log)}")
        found = re.search(r"listening on \S*?:(\d+)", _log_tail(log))
        if found:
            host = f"127.0.0.1:{found.group(1)}"
        time.sleep(0.02)
    if host is None:
        raise RuntimeError(f"docker-registry did not start: {_log_tail(log)}")
    scheme = "https" if tls is not None else "http"
    verify = ssl.create_default_context(cafile=str(tls.ca_file)) if tls is not None else True
    with httpx.Client(verify=verify) as c:
        while time.monotonic() < deadline:
            try:
                if c.get(f"{scheme}://{host}/v2/").status_code in (200, 401):
                    return host
            except httpx.HTTPError:
                time.sleep(0.05)
    raise RuntimeError(f"docker-registry does not answer on {host}: {_log_tail(log)}")


def _stop(reg: Registry) -> None:
    reg.proc.terminate()
    try:
        reg.proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        reg.proc.kill()
        reg.proc.wait()


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """A plain-HTTP registry without auth (reached with the explicit --insecure-registry)."""
    if REGISTRY_BIN is None or SKOPEO_BIN is None:
        pytest.skip("needs Debian's docker-registry and skopeo (apt-get install docker-registry skopeo)")
    reg = start_registry(tmp_path_factory.mktemp("registry"))
    yield reg
    _stop(reg)


@pytest.fixture(scope="session")
def auth_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """A registry over TLS (a throw-away CA) with htpasswd basic auth."""
    if REGISTRY_BIN is None or SKOPEO_BIN is None:
        pytest.skip("needs Debian's docker-registry and skopeo (apt-get install docker-registry skopeo)")
    pytest.importorskip("bcrypt", reason="htpasswd needs bcrypt hashes (pip install bcrypt)")
    from backupd.simulator.pki import generate_pki

    directory = tmp_path_factory.mktemp("auth-registry")
    pki = generate_pki(directory / "pki")
    (directory / "pki" / "trust").mkdir()
    shutil.copy(pki.ca_file, directory / "pki" / "trust" / "ca.crt")
    reg = start_registry(directory, users={"restorer": "s3cr3t-" + secrets.token_hex(8)}, tls=pki)
    yield reg
    _stop(reg)


def skopeo(*args: str) -> str:
    assert SKOPEO_BIN is not None
    proc = subprocess.run([SKOPEO_BIN, *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, (args, proc.stderr)
    return proc.stdout
