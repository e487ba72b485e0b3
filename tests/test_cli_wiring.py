"""Each command builds only the parts it uses: ``prune`` needs the catalog and the backends its
archives are in, not the kubelet client (whose TLS files exist only on a node) nor other
backends (whose credentials a workstation may not have); ``list`` needs only the catalog."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from backupd.backends import Backend, open_backend, open_backends
from backupd.backends.filesystem import FilesystemBackend
from backupd.catalog.store import Catalog
from backupd.config import load_config
from backupd.errors import ConfigError, KubeletTLSError
from backupd.model import Archive
from backupd.node.kubelet import KubeletClient
from backupd.policy.document import parse_policies
from backupd.storage import layout
from tests.policies import web_policy
from tests.reliability.inprocess import run_cli
from tests.test_prune import archive

NOW = datetime.now(UTC)


def write_config(tmp_path: Path, db_url: str, *, s3: bool = False) -> Path:
    """A config whose kubelet TLS files do not exist (nor, with ``s3``, the credential files of
    an S3 backend), with a filesystem backend ``local`` that does."""
    gone = tmp_path / "not-on-this-machine"
    text = (f'[database]\nurl = "{db_url}"\n'
            f'[kubelet]\nca_file = "{gone / "ca.crt"}"\ncert_file = "{gone / "client.crt"}"\n'
            f'key_file = "{gone / "client.key"}"\nnode_name = "node-a"\n'
            f'[[backends]]\nname = "local"\ntype = "filesystem"\npath = "{tmp_path / "backend"}"\n')
    if s3:
        text += (f'[[backends]]\nname = "s3"\ntype = "s3"\nbucket = "archives"\nregion = "eu-west-1"\n'
                 f'access_key_id_file = "{gone / "key-id"}"\nsecret_access_key_file = "{gone / "secret"}"\n')
    config = tmp_path / "config.toml"
    config.write_text(text)
    return config


def catalog_with_archives(config: Path, days: list[float]) -> list[Archive]:
    """The web policy (keepLast 1) and its archives taken ``days`` ago, stored for real in ``local``."""
    cfg = load_config(config)
    catalog = Catalog.open(cfg.database.resolved_url())
    backend = FilesystemBackend("local", cfg.backend("local").path)  # type: ignore[union-attr]
    try:
        catalog.upgrade()
        (policy,) = parse_policies(web_policy(retention="{keepLast: 1}"), "web.yaml", backends=["local"])
        catalog.apply_policies([(policy.name, policy.canonical_json())])
        stored = []
        for i, ago in enumerate(days):
            t, aid = NOW - timedelta(days=ago), f"{i + 1:016x}"
            a = replace(archive(i, backend="local"), id=aid, checkpoint_time=t, created_at=t,
                        key=layout.archive_key("default", "deployment-web", "nginx", t, aid))
            catalog.add_archive(a)
            backend.put_bytes(a.key, b"zstd bytes of " + a.id.encode())
            backend.put_bytes(layout.manifest_key(a.key), b"{}")
            stored.append(a)
        return stored
    finally:
        catalog.close()


def test_the_missing_files_are_really_missing(tmp_path: Path, db_url: str) -> None:
    cfg = load_config(write_config(tmp_path, db_url, s3=True))
    with pytest.raises(KubeletTLSError, match="cannot load the kubelet TLS files"):
        KubeletClient(cfg.kubelet)
    with pytest.raises(ConfigError, match=r"backends\[s3\].access_key_id_file"):
        open_backend(cfg.backend("s3"))


def test_prune_needs_no_kubelet_tls_files_nor_the_credentials_of_a_backend_it_does_not_touch(
        tmp_path: Path, db_url: str) -> None:
    config = write_config(tmp_path, db_url, s3=True)
    old, new = catalog_with_archives(config, [2, 1])
    for args in (["prune"], ["prune", "--policy", "web"]):
        code, out, err = run_cli(config, *args, "--dry-run", "-o", "json")
        assert code == 0, (code, out, err)
        assert [(r["policy"], r["remove"]) for r in json.loads(out)] == [("web", [old.id])]
    code, out, err = run_cli(config, "prune", "-o", "json")
    assert code == 0, (code, out, err)
    assert [(r["policy"], r["deleted"]) for r in json.loads(out)] == [("web", [old.id])]
    assert not (tmp_path / "backend" / old.key).exists() and (tmp_path / "backend" / new.key).exists()
    code, out, err = run_cli(config, "catalog", "rebuild", "--backend", "s3")  # one that does need it
    assert code == 2 and "backends[s3].access_key_id_file" in err, (code, out, err)


def test_backends_open_when_first_looked_up(tmp_path: Path, db_url: str) -> None:
    cfg = load_config(write_config(tmp_path, db_url, s3=True))
    opened: list[str] = []

    def wrap(backend: Backend) -> Backend:
        opened.append(backend.name)
        return backend

    backends = open_backends(cfg.backends, wrap=wrap)
    assert (list(backends), len(backends), "s3" in backends, "gcs" in backends) == (["local", "s3"], 2, True, False)
    assert opened == []
    assert backends["local"] is backends.get("local") and opened == ["local"]
    with pytest.raises(ConfigError, match=r"backends\[s3\].access_key_id_file"):
        backends["s3"]
    assert backends.get("gcs") is None and opened == ["local"]


#: commands that read or change the catalog only, and what their output must name
CATALOG_COMMANDS = {
    "list -o json": "0000000000000001",
    "policy list -o json": '"name": "web"',
    "report -o json": "0000000000000001",
    "pin 0000000000000001": "0000000000000001",
}


@pytest.mark.parametrize("command", list(CATALOG_COMMANDS))
def test_catalog_commands_need_neither_the_kubelet_nor_the_backends(tmp_path: Path, db_url: str, command: str) -> None:
    config = write_config(tmp_path, db_url, s3=True)
    (only,) = catalog_with_archives(config, [1])
    assert only.id == "0000000000000001"
    code, out, err = run_cli(config, *command.split())
    assert code == 0, (code, out, err)
    assert CATALOG_COMMANDS[command] in out, out
