"""Retention per replica (issue 13): each pod of a StatefulSet and each node of a DaemonSet keeps
its own archives -- through real checkpoints from the node simulator, the real ``backupd prune``,
``list``, ``restore --latest`` and the HTTP API -- and, over random archives, no retention group
ever loses its newest archive and planning them together equals planning each alone."""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backupd.app import App
from backupd.catalog.store import Catalog
from backupd.config import load_config
from backupd.model import COMMITTED, DELETING, PENDING, Archive, replica_identity
from backupd.policy.document import Policy, PolicySpec
from backupd.simulator.server import NodeSimulator
from backupd.simulator.topology import ContainerSpec, PodSpec, parse_topology
from backupd.storage import layout
from backupd.storage.prune import plan_policy
from backupd.storage.rebuild import rebuild
from tests.test_cli import backupd


def _pods(kind: str, name: str, replicas: int, container: str, image: str, *, app: str) -> dict[str, Any]:
    return {"namespace": "shop", "owner": {"kind": kind, "name": name}, "replicas": replicas,
            "labels": {"app": app}, "containers": [{"name": container, "image": image}]}


def _policy(name: str, app: str, retention: str, extra: str = "") -> str:
    return (f"apiVersion: backupd.io/v1\nkind: CheckpointPolicy\nmetadata: {{name: {name}}}\nspec:\n"
            f"  selector: {{namespaces: [shop], matchLabels: {{app: {app}}}}}\n"
            f'  schedule: "@every 1h"\n  backend: local\n  retention: {retention}\n{extra}')


@dataclass
class Node:
    """One node: its kubelet simulator, a config file naming it, and the App of that config."""

    name: str
    sim: NodeSimulator
    config: Path
    app: App

    def cycle(self, policy: str) -> list[Archive]:
        """One checkpoint cycle of the policy on this node; the archives it committed."""
        result = self.app.runner.cycle(self.app.runner.load_policy(policy))
        assert not result.failed, result
        return [o.archive for o in result.outcomes if o.archive]

    def cli(self, *args: str, stdin: str | None = None, check: int = 0) -> Any:
        return backupd(self.config, *args, stdin=stdin, check=check)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Callable[..., Node]]:
    """Nodes sharing one catalog and one filesystem backend, as the DaemonSet deploys backupd."""
    stack = contextlib.ExitStack()
    apps: list[App] = []

    def start(name: str, pods: list[dict[str, Any]], *, db_url: str | None = None, seed: int = 0) -> Node:
        topology = parse_topology({"node": name, "pods": pods})
        sim = stack.enter_context(NodeSimulator(tmp_path / name, topology=topology, seed=seed, memory_bytes=1 << 20))
        config = tmp_path / f"{name}.toml"
        url = db_url or f"sqlite:///{tmp_path / 'catalog.db'}"
        config.write_text(
            f'[database]\nurl = "{url}"\n'
            f'[kubelet]\nurl = "{sim.url}"\nca_file = "{sim.ca_file}"\ncert_file = "{sim.client_cert}"\n'
            f'key_file = "{sim.client_key}"\ncheckpoint_dir = "{sim.checkpoint_dir}"\nnode_name = "{name}"\n'
            f'[daemon]\nmin_free_space = 0\n'
            f'[[backends]]\nname = "local"\ntype = "filesystem"\npath = "{tmp_path / "backend"}"\n'
        )
        app = App(load_config(config))
        app.catalog.upgrade()
        apps.append(app)
        return Node(name, sim, config, app)

    yield start
    for app in apps:
        app.close()
    stack.close()


def _newest_by_replica(archives: list[Archive] | list[dict[str, Any]]) -> dict[str, str]:
    newest: dict[str, tuple[str, str]] = {}
    for a in archives:
        row = a if isinstance(a, dict) else a.to_json()
        key = (row["checkpoint_time"], row["id"])
        if row["replica"] not in newest or key > newest[row["replica"]]:
            newest[row["replica"]] = key
    return {replica: aid for replica, (_, aid) in newest.items()}


@pytest.mark.parametrize("retention", ["{keepLast: 1}", "{keepDaily: 7}"])
def test_each_statefulset_replica_keeps_its_own_newest_archives(cluster, retention: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    node = cluster("node-a", [_pods("StatefulSet", "db", 2, "postgres", "postgres:16.4", app="db"),
                              _pods("Deployment", "cache", 2, "redis", "redis:7.4", app="db")])
    assert "created" in node.cli("policy", "apply", "-f", "-", stdin=_policy("db", "db", retention)).stdout
    taken = node.cycle("db") + node.cycle("db")  # the runner spaces a container's checkpoints by a second
    db = [a for a in taken if a.workload == "statefulset/db"]
    assert sorted(a.replica for a in db) == ["db-0", "db-0", "db-1", "db-1"]
    assert {a.replica for a in taken if a.workload == "deployment/cache"} == {""}  # interchangeable pods: one group
    newest = _newest_by_replica(db)

    plan = json.loads(node.cli("prune", "--dry-run", "--output", "json").stdout)[0]
    groups = {(g["workload"], g["replica"]): g for g in plan["groups"]}
    assert set(groups) == {("statefulset/db", "db-0"), ("statefulset/db", "db-1"), ("deployment/cache", "")}
    assert not set(newest.values()) & set(plan["remove"])
    table = node.cli("prune", "--dry-run").stdout
    assert table.splitlines()[1].split()[:4] == ["NAMESPACE", "WORKLOAD", "REPLICA", "CONTAINER"]

    node.cli("prune")
    kept = json.loads(node.cli("list", "--workload", "statefulset/db", "--output", "json").stdout)
    assert _newest_by_replica(kept) == newest  # each replica's newest survived a real prune
    if retention == "{keepLast: 1}":
        assert sorted(a["id"] for a in kept) == sorted(newest.values())
        assert len(json.loads(node.cli("list", "--workload", "deployment/cache", "-o", "json").stdout)) == 1
    else:  # one day, two archives per replica: the newest (daily) and the oldest (oldest daily) stay
        assert len(kept) == 4

    # restore --latest: several replicas are refused, --pod picks one
    proc = node.cli("restore", "--latest", "--namespace", "shop", "--workload", "statefulset/db", "--container",
                    "postgres", "--to", str(tmp_path / "db.tar"), check=2)
    assert "--latest matches 2 replicas of statefulset/db: db-0, db-1; give --pod" in proc.stderr
    assert not (tmp_path / "db.tar").exists()
    out = node.cli("restore", "--latest", "--namespace", "shop", "--workload", "db", "--pod", "db-0",
                   "--container", "postgres", "--to", str(tmp_path / "db.tar"), "-o", "json").stdout
    restored = json.loads(out)["archive"]
    assert restored["id"] == newest["db-0"] and restored["replica"] == "db-0"
    assert hashlib.sha256((tmp_path / "db.tar").read_bytes()).hexdigest() == restored["tar_sha256"]
    # a Deployment's pods are one replica: --latest needs no --pod there
    out = node.cli("restore", "--latest", "--namespace", "shop", "--workload", "deployment/cache", "--container",
                   "redis", "--to", str(tmp_path / "cache.tar"), "-o", "json").stdout
    assert json.loads(out)["archive"]["replica"] == ""
    # an archive id with a --pod it is not of is refused
    proc = node.cli("restore", newest["db-1"], "--pod", "db-0", "--to", str(tmp_path / "x.tar"), check=2)
    assert "replica 'db-1'" in proc.stderr and "not 'db-0'" in proc.stderr


def test_group_by_pod_splits_a_deployment_per_pod(cluster) -> None:  # type: ignore[no-untyped-def]
    node = cluster("node-a", [_pods("Deployment", "cache", 2, "redis", "redis:7.4", app="cache")])
    bad = _policy("cache", "cache", "{keepLast: 1}", "  groupBy: nodes\n")
    proc = node.cli("policy", "apply", "-f", "-", stdin=bad, check=2)
    assert "spec.groupBy" in proc.stderr and "'nodes'" in proc.stderr
    assert json.loads(node.cli("policy", "list", "-o", "json").stdout) == []
    node.cli("policy", "apply", "-f", "-", stdin=_policy("cache", "cache", "{keepLast: 1}", "  groupBy: pod\n"))
    taken = node.cycle("cache") + node.cycle("cache")
    pods = sorted({a.pod for a in taken})
    assert len(pods) == 2 and all(a.replica == a.pod for a in taken)
    node.cli("prune")
    kept = json.loads(node.cli("list", "-o", "json").stdout)
    assert sorted(a["replica"] for a in kept) == pods
    # the manifest carries the replica, so a rebuilt catalog groups the same way
    manifest = json.loads((node.config.parent / "backend" / layout.manifest_key(kept[0]["key"])).read_text())
    assert manifest["replica"] == kept[0]["replica"] and manifest["format_version"] == 1


def test_a_daemonset_keeps_one_archive_per_node_across_rollouts(cluster, db_url: str) -> None:  # type: ignore[no-untyped-def]
    agent = _pods("DaemonSet", "agent", 1, "fluent-bit", "fluent/fluent-bit:3.1", app="agent")
    a = cluster("node-a", [agent], db_url=db_url, seed=1)
    b = cluster("node-b", [agent], db_url=db_url, seed=2)
    assert a.sim.pods[0].name != b.sim.pods[0].name  # one pod per node, each its own name
    a.cli("policy", "apply", "-f", "-", stdin=_policy("agent", "agent", "{keepLast: 1}"))
    taken = a.cycle("agent") + b.cycle("agent") + a.cycle("agent") + b.cycle("agent")
    assert sorted(x.replica for x in taken) == ["node-a", "node-a", "node-b", "node-b"]
    # a rollout renames node-a's pod; it is still node-a's replica of the DaemonSet
    a.sim.remove_pod("shop", a.sim.pods[0].name)
    a.sim.add_pod(PodSpec(namespace="shop", name="agent-rolled", owner_kind="DaemonSet", owner_name="agent",
                          labels={"app": "agent"}, containers=[ContainerSpec("fluent-bit", "fluent/fluent-bit:3.1")]))
    (rolled,) = a.cycle("agent")
    assert (rolled.pod, rolled.replica) == ("agent-rolled", "node-a")

    b.cli("prune")  # any node may prune the shared catalog
    kept = json.loads(b.cli("list", "--output", "json").stdout)
    assert _newest_by_replica(kept) == {"node-a": rolled.id, "node-b": taken[-1].id} and len(kept) == 2
    on_b = json.loads(a.cli("list", "--pod", "node-b", "-o", "json").stdout)  # the node names the replica
    assert [x["id"] for x in on_b] == [taken[-1].id]
    assert [x["id"] for x in json.loads(a.cli("list", "--pod", "agent-rolled", "-o", "json").stdout)] == [rolled.id]
    header = a.cli("list").stdout.splitlines()[0].split()
    assert header[4:7] == ["WORKLOAD", "REPLICA", "CONTAINER"]

    server = a.app.http_server("127.0.0.1:0")
    host, port = server.start()
    try:
        with httpx.Client(base_url=f"http://{host}:{port}", timeout=10) as client:
            assert [x["id"] for x in client.get("/api/v1/archives", params={"replica": "node-a"}).json()] == [rolled.id]
            assert [x["id"] for x in client.get("/api/v1/archives", params={"pod": "node-b"}).json()] == [taken[-1].id]
            params = client.get("/openapi.json").json()["paths"]["/api/v1/archives"]["get"]["parameters"]
            assert "replica" in {p["name"] for p in params}
    finally:
        server.stop()

    proc = a.cli("restore", "--latest", "--namespace", "shop", "--workload", "daemonset/agent", "--container",
                 "fluent-bit", "--to", "x.tar", check=2)
    assert "--latest matches 2 replicas of daemonset/agent: node-a, node-b; give --pod" in proc.stderr


def test_rebuild_and_old_manifests_derive_the_replica(cluster, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    node = cluster("node-a", [_pods("StatefulSet", "db", 2, "postgres", "postgres:16.4", app="db")])
    node.cli("policy", "apply", "-f", "-", stdin=_policy("db", "db", "{keepLast: 3}"))
    taken = node.cycle("db")
    backend = node.app.backends["local"]
    # a manifest written before replicas existed has no such field: it derives the default one
    old = taken[0]
    text = json.loads(backend.read_bytes(layout.manifest_key(old.key)))
    assert text.pop("replica") == old.replica
    parsed = layout.Manifest.read(json.dumps(text).encode(), layout.manifest_key(old.key), where="old.json")
    assert parsed.replica == old.replica == old.pod
    fresh = Catalog.open(f"sqlite:///{tmp_path / 'rebuilt.db'}")
    fresh.upgrade()
    try:
        report = rebuild(fresh, backend)
        assert sorted(report.added) == sorted(a.id for a in taken)
        assert {a.id: a.replica for a in fresh.list_archives()} == {a.id: a.replica for a in taken}
        assert rebuild(node.app.catalog, backend).clean  # the live catalog agrees, replica included
    finally:
        fresh.close()


# -- the property: per-group guarantees over random archives of random workloads -----------------

T0 = datetime(2026, 3, 1, tzinfo=UTC)
WORKLOADS = [("statefulset", "db"), ("daemonset", "agent"), ("deployment", "web"), ("job", "backup"),
             ("replicaset", "rs"), ("pod", "debug")]
COUNT = st.sampled_from([None, None, 0, 1, 2, 3, -1])
RETENTION = st.fixed_dictionaries({}, optional={
    "keepLast": COUNT, "keepHourly": COUNT, "keepDaily": COUNT, "keepWeekly": COUNT, "keepMonthly": COUNT,
    "keepWithin": st.sampled_from(["12h", "2d", "1m"]), "keepWithinDaily": st.sampled_from(["3d", "1m"]),
    "maxTotalBytes": st.sampled_from([150, 600]),
})


@st.composite
def archives(draw: st.DrawFn) -> tuple[Policy, list[Archive]]:
    retention = {k: v for k, v in draw(RETENTION).items() if v is not None}
    counted = ("keepLast", "keepHourly", "keepDaily", "keepWeekly", "keepMonthly", "keepWithin", "keepWithinDaily")
    if not any(retention.get(k) not in (None, 0) for k in counted):
        retention["keepLast"] = 1
    group_by = draw(st.sampled_from(["replica", "pod"]))
    spec = {"schedule": "@hourly", "backend": "mem", "retention": retention, "groupBy": group_by,
            "timezone": draw(st.sampled_from(["UTC", "Europe/Berlin"]))}
    policy = Policy("web", PolicySpec.model_validate(spec))
    listed = []
    for i in range(draw(st.integers(1, 40))):
        kind, name = draw(st.sampled_from(WORKLOADS))
        pod = name if kind == "pod" else f"{name}-{draw(st.sampled_from(['0', '1', 'x7k2p', 'q2w3e']))}"
        node = draw(st.sampled_from(["node-a", "node-b"]))
        # minutes apart, or a few milliseconds (two replicas checkpointed by the same cycle)
        at = T0 + timedelta(minutes=draw(st.integers(0, 60 * 24 * 45)), milliseconds=draw(st.sampled_from([0, 5])))
        listed.append(Archive(
            id=f"{i:016x}", state=draw(st.sampled_from([COMMITTED] * 6 + [PENDING, DELETING])),
            policy=draw(st.sampled_from(["web"] * 5 + ["other"])), backend="mem", key=f"k/{i}", node=node,
            namespace=draw(st.sampled_from(["default", "shop"])), pod=pod, workload=f"{kind}/{name}",
            replica=replica_identity(kind, pod, node, group_by), container=draw(st.sampled_from(["app", "sidecar"])),
            image="img", checkpoint_time=at, created_at=at, stored_size=draw(st.integers(0, 200)),
            pinned=draw(st.booleans()) and draw(st.booleans()) and draw(st.booleans()),
        ))
    listed.sort(key=lambda a: (a.checkpoint_time, a.id))  # as the catalog lists them
    return policy, listed


def _outcome(plans: list[Any]) -> dict[tuple[str, ...], list[tuple[str, bool, tuple[str, ...]]]]:
    return {(p.namespace, p.workload, p.replica, p.container): [(d.archive.id, d.keep, d.reasons)
                                                                for d in p.decisions] for p in plans}


@settings(max_examples=300, deadline=None)
@given(archives())
def test_no_group_loses_its_newest_and_groups_plan_independently(drawn: tuple[Policy, list[Archive]]) -> None:
    policy, listed = drawn
    mine = [a for a in listed if a.policy == policy.name and a.state == COMMITTED]
    groups: dict[tuple[str, ...], list[Archive]] = {}
    for a in mine:
        groups.setdefault(a.group, []).append(a)
    together = _outcome(plan_policy(policy, listed))
    assert set(together) == {g[1:] for g in groups}  # one plan per (ns, workload, replica, container)
    planned = [aid for decisions in together.values() for aid, _, _ in decisions]
    assert sorted(planned) == sorted(a.id for a in mine)  # other policies and states are never planned
    for group, members in groups.items():
        removed = {aid for aid, keep, _ in together[group[1:]] if not keep}
        newest = max(a.checkpoint_time for a in members)
        assert any(a.id not in removed for a in members if a.checkpoint_time == newest), group
        assert not removed & {a.id for a in members if a.pinned}
        # planning a group alone decides exactly what planning it among all the others does
        assert _outcome(plan_policy(policy, members)) == {group[1:]: together[group[1:]]}
