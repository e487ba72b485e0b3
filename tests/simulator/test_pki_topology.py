"""The simulator's PKI and pod topology."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509.oid import NameOID

from backupd.errors import InvalidInput
from backupd.simulator import generate_pki
from backupd.simulator.topology import (
    default_topology,
    load_topology,
    materialize,
    normalise_image,
    parse_quantity,
    parse_topology,
)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_pki_files_and_permissions(tmp_path: Path):
    pki = generate_pki(tmp_path / "pki")
    assert mode(pki.directory) == 0o700
    for key in (pki.ca_key, pki.server_key, pki.client_key):
        assert mode(key) == 0o600
    ca, server, client = load(pki.ca_file), load(pki.server_cert), load(pki.client_cert)
    server.verify_directly_issued_by(ca)
    client.verify_directly_issued_by(ca)
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in sans.get_values_for_type(x509.DNSName)
    assert {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)} >= {"127.0.0.1"}
    assert client.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "backupd"


def test_pki_is_reused_and_issues_more_client_certs(tmp_path: Path):
    pki = generate_pki(tmp_path / "pki")
    before = pki.ca_file.read_bytes()
    again = generate_pki(tmp_path / "pki")
    assert again.ca_file.read_bytes() == before

    other = pki.issue_client_cert("ops", cn="alice", organizations=("system:masters",))
    cert = load(other.cert_file)
    cert.verify_directly_issued_by(load(pki.ca_file))
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "alice"
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "system:masters"
    assert mode(other.key_file) == 0o600

    rogue = pki.issue_untrusted_client_cert("rogue")
    with pytest.raises((ValueError, InvalidSignature)):
        load(rogue.cert_file).verify_directly_issued_by(load(pki.ca_file))


def test_quantities():
    assert parse_quantity("64Mi") == 64 << 20
    assert parse_quantity("1Gi") == 1 << 30
    assert parse_quantity("1.5Ki") == 1536
    assert parse_quantity("2M") == 2_000_000
    assert parse_quantity(4096) == 4096
    with pytest.raises(InvalidInput, match="not a byte quantity"):
        parse_quantity("lots")


def test_image_names_are_normalised_like_crio():
    assert normalise_image("nginx:1.27") == "docker.io/library/nginx:1.27"
    assert normalise_image("nginx") == "docker.io/library/nginx:latest"
    assert normalise_image("fluent/fluent-bit:3.1") == "docker.io/fluent/fluent-bit:3.1"
    assert normalise_image("quay.io/x/y:v1") == "quay.io/x/y:v1"
    assert normalise_image("localhost:5000/x") == "localhost:5000/x:latest"


def test_default_topology_has_every_kind_of_workload():
    pods = materialize(default_topology(), seed=7)
    by_owner = {(p.namespace, p.owner_kind) for p in pods}
    assert ("default", "ReplicaSet") in by_owner
    assert ("shop", "StatefulSet") in by_owner
    assert ("default", "DaemonSet") in by_owner
    assert ("default", None) in by_owner
    web = [p for p in pods if p.owner_name and p.owner_name.startswith("web-")]
    assert len(web) == 2 and web[0].name != web[1].name
    tpl = web[0].labels["pod-template-hash"]
    assert web[0].owner_name == f"web-{tpl}" and web[0].name.startswith(f"web-{tpl}-")
    db = next(p for p in pods if p.name == "db-0")
    assert [c.name for c in db.containers] == ["postgres", "exporter"]
    crash = next(p for p in pods if p.owner_name and p.owner_name.startswith("cart-"))
    assert crash.containers[0].state == "waiting"
    assert {p.namespace for p in pods} == {"default", "shop"}


def test_materialize_is_deterministic_per_seed():
    a = materialize(default_topology(), seed=1)
    b = materialize(default_topology(), seed=1)
    c = materialize(default_topology(), seed=2)
    ids = lambda pods: [(p.name, p.uid, [x.container_id for x in p.containers]) for p in pods]  # noqa: E731
    assert ids(a) == ids(b)
    assert ids(a) != ids(c)
    for pod in a:
        for container in pod.containers:
            assert len(container.container_id) == 64 and int(container.container_id, 16) >= 0


def test_topology_file_yaml_and_json(tmp_path: Path):
    spec = {
        "node": "node-b",
        "pods": [
            {"namespace": "team-a", "owner": {"kind": "StatefulSet", "name": "kafka"}, "replicas": 3,
             "containers": [{"name": "broker", "image": "apache/kafka:3.8", "memory": "32Mi", "running": True}]},
            {"namespace": "team-a", "name": "oneoff", "owner": {"kind": "Job", "name": "migrate"},
             "containers": [{"name": "job", "image": "busybox", "state": "terminated", "exit_code": 0}]},
        ],
    }  # fmt: skip
    (tmp_path / "t.json").write_text(json.dumps(spec))
    (tmp_path / "t.yaml").write_text(
        "node: node-b\npods:\n  - namespace: team-a\n    owner: {kind: StatefulSet, name: kafka}\n    replicas: 3\n"
        "    containers:\n      - {name: broker, image: 'apache/kafka:3.8', memory: 32Mi, running: true}\n"
        "  - namespace: team-a\n    name: oneoff\n    owner: {kind: Job, name: migrate}\n"
        "    containers:\n      - {name: job, image: busybox, state: terminated, exit_code: 0}\n"
    )
    for path in (tmp_path / "t.json", tmp_path / "t.yaml"):
        topo = load_topology(path)
        pods = materialize(topo)
        assert topo.node_name == "node-b"
        assert [p.name for p in pods] == ["kafka-0", "kafka-1", "kafka-2", "oneoff"]
        assert pods[0].containers[0].memory == 32 << 20
        assert pods[0].to_v1()["spec"]["nodeName"] == "node-b"
        assert pods[3].to_v1()["status"]["phase"] == "Succeeded"


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"pods": []}, "non-empty list"),
        ({"pods": [{"namespace": "Bad_NS", "name": "x", "containers": [{"name": "c", "image": "i"}]}]}, "DNS-1123"),
        ({"pods": [{"namespace": "a", "containers": [{"name": "c", "image": "i"}]}]}, "needs a name"),
        ({"pods": [{"name": "x", "containers": [{"name": "c", "image": "i", "colour": 1}]}]}, "unknown key.*colour"),
        ({"pods": [{"name": "x", "containers": [{"name": "c", "image": "i", "state": "asleep"}]}]}, "state must be"),
        ({"pods": [{"name": "x", "owner": {"kind": "CronJob", "name": "c"},
                    "containers": [{"name": "c", "image": "i"}]}]}, "owner.kind"),
        ({"pods": [{"name": "x", "containers": [{"name": "c", "image": "i"}, {"name": "c", "image": "j"}]}]}, "unique"),
        ({"pods": [{"name": "x", "containers": [{"name": "c", "image": "i"}]}] * 2}, "defined twice"),
    ],
)  # fmt: skip
def test_topology_errors_name_the_problem(doc, message):
    with pytest.raises(InvalidInput, match=message):
        materialize(parse_topology(doc))
