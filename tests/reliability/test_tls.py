"""TLS verification cannot be turned off, silently or otherwise: no config key or environment
variable disables it (unknown keys are errors), the kubelet's certificate must chain to
``kubelet.ca_file`` and name the host, and no code path of backupd builds an unverified client
-- except the registry client's explicit, documented ``--insecure-registry`` flag.
"""

from __future__ import annotations

import ast
import re
import typing
from pathlib import Path

import pytest

from backupd.app import App
from backupd.config import Config
from backupd.simulator.pki import Pki, generate_pki
from backupd.simulator.server import NodeSimulator
from tests.conftest import make_config
from tests.policies import apply as apply_policy
from tests.reliability.consistency import fast_retries
from tests.reliability.inprocess import run_cli

PACKAGE = Path(__file__).resolve().parents[2] / "backupd"
S3 = '[[backends]]\nname = "s3"\ntype = "s3"\nbucket = "b"\nendpoint_url = "https://s3.example.invalid"\n'

ATTEMPTS = {
    "kubelet insecure_skip_tls_verify": ('[kubelet]\ninsecure_skip_tls_verify = true\n', {},
                                         "kubelet.insecure_skip_tls_verify"),
    "kubelet verify = false": ('[kubelet]\nverify = false\n', {}, "kubelet.verify"),
    "kubelet tls_verify = false": ('[kubelet]\ntls_verify = false\n', {}, "kubelet.tls_verify"),
    "kubelet ca_file = false": ('[kubelet]\nca_file = false\n', {}, "kubelet.ca_file"),
    "kubelet over plain http": ('[kubelet]\nurl = "http://127.0.0.1:10255"\n', {}, "kubelet.url"),
    "kubelet insecure by environment": ("", {"BACKUPD_KUBELET__INSECURE_SKIP_TLS_VERIFY": "true"},
                                        "insecure_skip_tls_verify"),
    "s3 verify = false": (S3 + "verify = false\n", {}, "backends.0.s3.verify"),
    "s3 verify_tls = false": (S3 + "verify_tls = false\n", {}, "backends.0.s3.verify_tls"),
    "s3 insecure = true": (S3 + "insecure = true\n", {}, "backends.0.s3.insecure"),
    "s3 ca_bundle = false": (S3 + "ca_bundle = false\n", {}, "backends.0.s3.ca_bundle"),
    "alerts verify = false": ('[alerts]\nverify = false\n', {}, "alerts.verify"),
}


@pytest.mark.parametrize("case", list(ATTEMPTS))
def test_no_setting_turns_verification_off(tmp_path: Path, case: str) -> None:
    body, env, key = ATTEMPTS[case]
    config = tmp_path / "config.toml"
    config.write_text(f'[database]\nurl = "sqlite:///{tmp_path / "catalog.db"}"\n' + body)
    code, _, err = run_cli(config, "policy", "list", env=env)
    assert code == 2 and key in err and "Traceback" not in err, err


def test_the_config_model_has_no_verification_switch() -> None:
    """Whatever keys exist, none of them names verification, insecurity or skipping TLS."""
    def models(annotation: object) -> list[type]:
        if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
            return [annotation]
        return [m for arg in typing.get_args(annotation) for m in models(arg)]

    def fields(model: type, prefix: str = "") -> list[str]:
        names = []
        for name, info in model.model_fields.items():  # type: ignore[attr-defined]
            names.append(prefix + name)
            for inner in models(info.annotation):
                names += fields(inner, f"{prefix}{name}.")
        return names

    names = fields(Config)
    assert "kubelet.ca_file" in names and any(n.endswith("ca_bundle") for n in names), names
    assert [n for n in names if re.search(r"verif|insecure|skip|no_tls|plaintext", n, re.I)] == []


def assert_refused(tmp_path: Path, served: Pki, trusted_ca: Path) -> None:
    """A kubelet serving ``served``'s certificate, backupd trusting ``trusted_ca``: the cycle
    fails with KubeletTLSError before any request is made."""
    with NodeSimulator(tmp_path / "node", pki=served) as sim:
        config = make_config(tmp_path, sim, f"sqlite:///{tmp_path / 'catalog.db'}")
        config.kubelet.ca_file = trusted_ca
        app = App(config)
        try:
            app.catalog.upgrade()
            fast_retries(app)
            policy = apply_policy(app, "apiVersion: backupd.io/v1\nkind: CheckpointPolicy\nmetadata: {name: web}\n"
                                  "spec: {schedule: '@hourly', backend: local, retention: {keepLast: 1}}\n")
            result = app.runner.cycle(policy)
        finally:
            app.close()
        assert result.error is not None and result.error.kind == "KubeletTLSError", result
        assert "kubelet.ca_file" in str(result.error)
        assert sim.requests == [], "a request reached a kubelet whose certificate was not verified"


def test_kubelet_certificate_from_another_ca_is_refused(tmp_path: Path) -> None:
    ours = generate_pki(tmp_path / "ours")
    assert_refused(tmp_path, served=generate_pki(tmp_path / "theirs"), trusted_ca=ours.ca_file)


def test_kubelet_certificate_for_another_host_is_refused(tmp_path: Path) -> None:
    """Signed by the trusted CA, but issued to another name: the host name is checked too."""
    pki = generate_pki(tmp_path / "pki", server_hosts=("kubelet.other.example",))
    assert_refused(tmp_path, served=pki, trusted_ca=pki.ca_file)


UNVERIFIED = re.compile(r"verify\s*=\s*False|CERT_NONE|check_hostname\s*=\s*False|_create_unverified_context|"
                        r"verify_tls\s*=\s*False|ssl_verify\s*=\s*False")


def test_no_code_path_builds_an_unverified_client() -> None:
    """The one unverified client is the registry's, behind ``insecure`` (test registries)."""
    hits = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.parent.name == "simulator":
            continue  # the kubelet stand-in is a server used by tests and demos, not a client of anything
        for line in path.read_text().splitlines():
            if UNVERIFIED.search(line):
                hits.append((path.relative_to(PACKAGE).as_posix(), line.strip()))
    assert hits == [("restore/registry.py", "verify = False")], hits
    registry = (PACKAGE / "restore" / "registry.py").read_text()
    assert re.search(r"if insecure:\n\s+verify = False\n", registry), "the unverified client must hang on `insecure`"


def test_registry_insecure_comes_only_from_the_flag() -> None:
    """Every ``insecure=`` passed anywhere in backupd traces back to ``--insecure-registry``."""
    passed = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                for kw in node.keywords:
                    if kw.arg == "insecure":
                        passed.append((path.relative_to(PACKAGE).as_posix(), ast.unparse(kw.value)))
    assert set(passed) <= {("cli/restore.py", "insecure_registry"), ("cli/restore.py", "insecure")}, passed
    restore = (PACKAGE / "cli" / "restore.py").read_text()
    assert '@click.option("--insecure-registry", is_flag=True' in restore
    # the helper's `insecure` parameter is fed only by the flag
    assert re.findall(r"insecure=(\w+)", restore).count("insecure_registry") == 1
