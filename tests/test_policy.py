"""Policy documents: validation messages name file, document, field path and value."""

from __future__ import annotations

import pytest

from backupd.errors import PolicyError
from backupd.model import Container, Pod
from backupd.policy.document import Policy, parse_policies

GOOD = """\
apiVersion: backupd.io/v1
kind: CheckpointPolicy
metadata: {name: web}
spec:
  selector:
    namespaces: [default]
    matchLabels: {app: nginx}
    containers: [web*]
  schedule: "*/15 * * * *"
  backend: local
  retention: {keepLast: 3, keepDaily: 7, keepWithin: 2d, maxTotalBytes: 50Gi}
  timezone: Europe/Paris
  keepOnNode: 1
---
apiVersion: backupd.io/v1
kind: CheckpointPolicy
metadata: {name: everything}
spec:
  schedule: "@every 30s"
  backend: local
  retention: {keepLast: 5}
"""


def test_good_file_parses_every_document() -> None:
    web, everything = parse_policies(GOOD, "p.yaml", backends=["local"])
    assert web.name == "web" and everything.name == "everything"
    assert web.rules.last == 3 and web.rules.daily == 7 and web.rules.max_total_bytes == 50 * 2**30
    assert str(web.rules.within) == "2d"
    assert web.schedule.cron == "*/15 * * * *"
    assert everything.schedule.interval.total_seconds() == 30
    # canonical form is stable: the same policy serialises identically (idempotent apply)
    again = parse_policies(GOOD, "p.yaml")[0]
    assert again.canonical_json() == web.canonical_json()


def _bad(doc_patch: str, *, backends: list[str] | None = None) -> str:
    with pytest.raises(PolicyError) as info:
        parse_policies(GOOD + "---\n" + doc_patch, "p.yaml", backends=backends)
    return str(info.value)


BASE3 = "apiVersion: backupd.io/v1\nkind: CheckpointPolicy\nmetadata: {name: third}\n"


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("spec: {schedule: '@hourly', backend: local, retention: {keepDaily: seven}}",
         "p.yaml: document 3 ('third'): spec.retention.keepDaily: Input should be a valid integer"),
        ("spec: {schedule: '@hourly', backend: local, retention: {keepDaily: -2}}",
         "spec.retention.keepDaily: must be a count >= 0, or -1 for unlimited; got -2"),
        ("spec: {schedule: '@hourly', backend: local, retention: {}}", "spec.retention: no keep rule"),
        ("spec: {schedule: '@hourly', backend: local, retention: {maxTotalBytes: 5Gi}}", "no keep rule"),
        ("spec: {schedule: '@hourly', backend: local, retention: {keepLast: 1, maxTotalBytes: true}}",
         "spec.retention.maxTotalBytes: must be a size such as 50Gi; got True"),
        ("spec: {schedule: '@every 99999999999999999999h', backend: local, retention: {keepLast: 1}}",
         "@every interval must be between 1s and 8760h"),
        ("spec: {schedule: '@hourly', backend: local, retention: {keepWithin: 2w}}", "spec.retention.keepWithin:"),
        ("spec: {schedule: 'every day', backend: local, retention: {keepLast: 1}}", "'every day'"),
        ("spec: {schedule: '61 * * * *', backend: local, retention: {keepLast: 1}}", "invalid cron expression"),
        ("spec: {schedule: '@hourly', backend: local, retention: {keepLast: 1}, timezone: Mars/Olympus}",
         "spec.timezone: unknown time zone 'Mars/Olympus'"),
        ("spec: {schedule: '@hourly', backend: local, retention: {keepLast: 1}, keepOnNode: -1}", "spec.keepOnNode"),
        ("spec: {schedule: '@hourly', backend: local, retention: {keepLast: 1, keepForever: true}}",
         "spec.retention.keepForever: unknown field"),
        ("spec: {backend: local, retention: {keepLast: 1}}", "spec.schedule: required field is missing"),
        ("spec: {schedule: '@hourly', backend: local, retention: {keepLast: 1}, selector: {matchLabels: [a]}}",
         "spec.selector.matchLabels"),
        ("spec: {schedule: '@hourly', backend: local, retention: {keepLast: 1}, groupBy: node}",
         "spec.groupBy: Input should be 'replica' or 'pod' (got 'node')"),
    ],
)
def test_each_bad_value_is_named(spec: str, expected: str) -> None:
    assert expected in _bad(BASE3 + spec)


def test_group_by_defaults_to_replica_and_leaves_stored_specs_unchanged() -> None:
    web = parse_policies(GOOD, "p.yaml")[0]
    assert web.spec.group_by == "replica"
    # a spec stored before groupBy existed is the canonical JSON of a policy without it: applying
    # the same file again must still say "unchanged" (and not bump the generation)
    assert "groupBy" not in web.canonical_json() and "group_by" not in web.canonical_json()
    explicit = parse_policies(GOOD.replace("  keepOnNode: 1\n", "  keepOnNode: 1\n  groupBy: replica\n"), "p.yaml")[0]
    assert explicit.canonical_json() == web.canonical_json()
    by_pod = parse_policies(GOOD.replace("  keepOnNode: 1\n", "  keepOnNode: 1\n  groupBy: pod\n"), "p.yaml")[0]
    assert by_pod.spec.group_by == "pod" and '"groupBy":"pod"' in by_pod.canonical_json()
    assert by_pod.to_document()["spec"]["groupBy"] == "pod"
    stored = type(by_pod).from_spec_json("web", by_pod.canonical_json())
    assert stored.spec.group_by == "pod" and stored.canonical_json() == by_pod.canonical_json()


def test_unknown_backend_is_a_validation_error() -> None:
    msg = _bad(BASE3 + "spec: {schedule: '@hourly', backend: s3, retention: {keepLast: 1}}", backends=["local"])
    assert "spec.backend: unknown backend 's3' (configured: local)" in msg


def test_wrong_kind_and_version_and_name() -> None:
    msg = _bad("apiVersion: v2\nkind: Pod\nmetadata: {name: Bad_Name}\nspec: {}\n")
    assert "apiVersion" in msg and "kind" in msg and "metadata.name" in msg and "'Bad_Name'" in msg


def test_duplicate_names_refused() -> None:
    assert "already defined by document 1" in _bad(GOOD.split("---")[0])


def test_yaml_syntax_error_has_line_and_column() -> None:
    with pytest.raises(PolicyError, match=r"p.yaml: not valid YAML at line 2, column \d+"):
        parse_policies("a: b\n  c: : d\n", "p.yaml")


@pytest.mark.parametrize("text", ["", "---\n", "- 1\n- 2\n", "just a string\n"])
def test_empty_or_non_mapping_documents(text: str) -> None:
    with pytest.raises(PolicyError):
        parse_policies(text, "p.yaml")


def test_selector_targets_running_matching_containers_only() -> None:
    web = parse_policies(GOOD, "p.yaml")[0]
    pods = [
        Pod("default", "web-1", labels={"app": "nginx"},
            containers=(Container("webserver", "nginx", running=True), Container("web-sidecar", "x", running=False),
                        Container("logger", "fluent", running=True))),
        Pod("default", "other", labels={"app": "redis"}, containers=(Container("webserver", "redis", running=True),)),
        Pod("shop", "web-2", labels={"app": "nginx"}, containers=(Container("webserver", "nginx", running=True),)),
    ]
    assert [(p.name, c.name) for p, c in web.targets(pods)] == [("web-1", "webserver")]
    everything = parse_policies(GOOD, "p.yaml")[1]
    assert len(everything.targets(pods)) == 4


@pytest.mark.parametrize(("field", "spec"), [
    ("spec.schedule", "spec: {schedule: '0 0 30 2 *', backend: local, retention: {keepLast: 1}}"),
    ("spec.schedule", "spec: {schedule: '0 0 31 4 *', backend: local, retention: {keepLast: 1}}"),
    ("spec.verify.schedule",
     "spec: {schedule: '@hourly', backend: local, retention: {keepLast: 1}, verify: {schedule: '0 3 31 9 *'}}"),
])
def test_a_schedule_that_never_fires_is_refused(field: str, spec: str) -> None:
    value = spec.split("schedule: ")[-1].split("'")[1]
    msg = _bad(BASE3 + spec)
    assert f"p.yaml: document 3 ('third'): {field}: cron expression '{value}' never fires" in msg


def test_a_stored_policy_that_no_longer_validates_is_a_policy_error_naming_it() -> None:
    spec = '{"schedule": "0 0 30 2 *", "backend": "local", "retention": {"keepLast": 1}}'
    with pytest.raises(PolicyError, match=r"stored policy 'old': spec.schedule: cron expression '0 0 30 2 \*' never"):
        Policy.from_spec_json("old", spec)
    with pytest.raises(PolicyError, match="stored policy 'old': spec: not valid JSON"):
        Policy.from_spec_json("old", "{")
