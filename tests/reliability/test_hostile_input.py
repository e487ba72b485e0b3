"""Hostile policy files: whatever YAML arrives, ``parse_policies`` raises only ``PolicyError``
and ``backupd policy apply`` exits 2 naming the problem -- never a traceback, never exit 1.

Hostile kubelet answers (paths outside the checkpoint directory, ``..``, symlinked tars, FIFOs,
bodies that are not the API's) are in test_kubelet_faults.py; hostile archives in
tests/inspect/test_hostile.py and tests/restore/test_tar_scan.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backupd.errors import EXIT_INVALID_INPUT, PolicyError
from backupd.policy.document import parse_policies
from tests.reliability.inprocess import run_cli

# -- crashes the fuzzers found (fixed in policy.py / schedule.py), kept as regression cases --------

REGRESSIONS: dict[str, tuple[tuple[type[BaseException], ...], str, str]] = {
    "metadata that is not a mapping": (
        (AttributeError,), r"has no attribute 'get'",
        "apiVersion: backupd.io/v1\nkind: CheckpointPolicy\nmetadata: [web]\nspec: {}\n"),
    # PyYAML's scalar constructors raise ValueError/AttributeError, not YAMLError:
    "a YAML timestamp that is not a date": ((ValueError,), r"must be in|out of range", "created: 2001-13-01\n"),
    "a !!timestamp tag on something else": ((AttributeError,), r"groupdict", "created: !!timestamp x\n"),
    "a !!int or !!float tag on something else": (
        (ValueError,), r"invalid literal for int|could not convert string to float", "keepLast: !!int x\n"),
    "an integer literal over Python's 4300-digit limit": (
        (ValueError,), r"Exceeds the limit", "keepLast: " + "9" * 5000 + "\n"),
    "nesting deeper than Python's recursion limit": (
        (RecursionError,), r"", "spec: " + "[" * 5000 + "]" * 5000 + "\n"),
    "an @every interval too large for a timedelta": (
        (OverflowError,), r"",
        "apiVersion: backupd.io/v1\nkind: CheckpointPolicy\nmetadata: {name: web}\n"
        "spec: {schedule: '@every 99999999999999999999h', backend: local, retention: {keepLast: 1}}\n"),
}


# -- strategies ----------------------------------------------------------------------------------

REAL_KEYS = [
    "apiVersion", "kind", "metadata", "name", "spec", "selector", "namespaces", "matchLabels", "containers",
    "schedule", "backend", "retention", "keepLast", "keepHourly", "keepDaily", "keepWeekly", "keepMonthly",
    "keepYearly", "keepWithin", "keepWithinHourly", "keepWithinDaily", "keepWithinWeekly", "keepWithinMonthly",
    "keepWithinYearly", "maxTotalBytes", "timezone", "keepOnNode", "verify", "sample",
]  # fmt: skip
TRICKY_STRINGS = [
    "@every 1s", "@every 0s", "@every 1ms", "@hourly", "*/5 * * * *", "*/0 * * * *", "99 99 99 99 99", "a b c d e",
    "UTC", "Europe/Paris", "America", "../../etc/passwd", "/etc/localtime", "", " ", "\x00", "50Gi", "-1", "1Ei",
    "2d", "1y1y", "99999999999999999999y", "0h", "backupd.io/v1", "CheckpointPolicy", "local", "web", "UPPER",
    "a" * 64, "-web", "web-", "*", "[", "{", "!", "&", "%", "@", "`",
]  # fmt: skip
# plain (unquoted) YAML scalars that YAML itself interprets: tags, anchors, timestamps, bases
PLAIN_SCALARS = [
    "web", "'@every 1s'", "local", "3", "UTC", "2001-12-14", "2001-13-01", "2001-02-30", "2001-12-14t25:00:00Z",
    "0x" + "f" * 40, "0o777", "0b1010", "190:20:30", ".nan", "-.inf", "1e400", "~", "null", "yes", "on",
    "!!binary zz", "!!binary aGVsbG8=", "!!set {a, b}", "!!omap [a: 1]", "!!python/name:os.system", "!!str 3",
    "!!int x", "!!float x", "!!timestamp x", "!!null x", "&a [*a]", "*undefined", "{<<: 5}", "{<<: [1]}",
    "[" * 50 + "]" * 50, "{a: {b: {c: {d: 1}}}}", "[1, [2, [3]]]", "'", "\"\\x\"", "\"\\ud800\"", "|\n  text",
    "'@every 99999999999999999999h'", "'99 99 99 99 99'", "'" + "9" * 5000 + "'",
]  # fmt: skip
TEMPLATE = (
    "apiVersion: {api}\nkind: {kind}\nmetadata: {{name: {name}}}\nspec:\n  schedule: {schedule}\n"
    "  backend: {backend}\n  retention: {{keepLast: {keep}, keepWithin: {within}}}\n  timezone: {tz}\n"
)

keys = st.sampled_from(REAL_KEYS) | st.text(max_size=8) | st.integers() | st.none() | st.booleans()
scalars = (
    st.none() | st.booleans() | st.integers() | st.integers(min_value=-(10**40), max_value=10**40)
    | st.floats() | st.text(max_size=16) | st.sampled_from(TRICKY_STRINGS)
)
values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=5), max_leaves=16
)


def either(valid: Any) -> st.SearchStrategy[Any]:
    """The valid value, or anything at all in its place."""
    return st.one_of(st.just(valid), values)


retention = st.fixed_dictionaries(
    {}, optional={k: either(v) for k, v in [("keepLast", 3), ("keepDaily", 7), ("keepWithin", "2d"),
                                            ("keepWithinDaily", "7d"), ("maxTotalBytes", "1Gi"), ("keepHourly", -1)]},
) | values
selector = st.fixed_dictionaries(
    {}, optional={"namespaces": either(["default"]), "matchLabels": either({"app": "web"}),
                  "containers": either(["nginx", "db-*"])},
) | values
spec = st.fixed_dictionaries(
    {"schedule": either("@every 30s"), "backend": either("local"), "retention": retention},
    optional={"selector": selector, "timezone": either("UTC"), "keepOnNode": either(1),
              "verify": either({"schedule": "@daily", "sample": 2}), "extra": values},
) | values
document = st.fixed_dictionaries(
    {"apiVersion": either("backupd.io/v1"), "kind": either("CheckpointPolicy"),
     "metadata": either({"name": "web"}) | st.fixed_dictionaries({"name": values})},
    optional={"spec": spec, "status": values},
) | values


VALID = {
    "apiVersion": "backupd.io/v1", "kind": "CheckpointPolicy", "metadata": {"name": "web"},
    "spec": {"selector": {"namespaces": ["default"], "matchLabels": {"app": "web"}, "containers": ["nginx"]},
             "schedule": "*/15 * * * *", "backend": "local", "timezone": "Europe/Paris", "keepOnNode": 1,
             "retention": {"keepLast": 3, "keepDaily": 7, "keepWithin": "2d", "maxTotalBytes": "1Gi"},
             "verify": {"schedule": "@daily", "sample": 2}},
}  # fmt: skip


def _paths(node: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*prefix, k))
    return out


@st.composite
def one_field_wrong(draw: st.DrawFn) -> dict[str, Any]:
    """A valid document with one field (at any depth) replaced by anything, or removed."""
    import copy

    doc = copy.deepcopy(VALID)
    path = draw(st.sampled_from(_paths(VALID)))
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    if draw(st.booleans()):
        del parent[path[-1]]
    else:
        parent[path[-1]] = draw(values)
    return doc


@st.composite
def policy_texts(draw: st.DrawFn) -> str:
    kind = draw(st.sampled_from(["documents", "mutated", "template", "raw", "one field wrong"]))
    if kind == "one field wrong":
        docs = draw(st.lists(one_field_wrong() | st.just(VALID), min_size=1, max_size=3))
        return yaml.safe_dump_all(docs)
    if kind == "raw":
        return draw(st.text(max_size=200))
    if kind == "template":
        slot = st.sampled_from(PLAIN_SCALARS)
        return TEMPLATE.format(api=draw(slot | st.just("backupd.io/v1")), kind=draw(slot | st.just("CheckpointPolicy")),
                               name=draw(slot), schedule=draw(slot), backend=draw(slot), keep=draw(slot),
                               within=draw(slot), tz=draw(slot))
    docs = draw(st.lists(document, min_size=0, max_size=3))
    text = yaml.safe_dump_all(docs, explicit_start=draw(st.booleans()))
    if kind == "mutated" and text:
        for _ in range(draw(st.integers(1, 4))):
            at = draw(st.integers(0, len(text)))
            junk = draw(st.sampled_from(list("{}[]:,-&*!|>\"'#%@`\t\n ") + ["---\n", "...\n", "? ", "<<: "]))
            text = text[:at] + junk + text[at + draw(st.integers(0, 2)):]
    return text


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                          HealthCheck.data_too_large])


@FUZZ
@given(text=policy_texts())
def test_fuzzed_policy_files_raise_only_policy_errors(text: str) -> None:
    try:
        policies = parse_policies(text, "fuzz.yaml", backends=["local"])
    except PolicyError as exc:
        assert str(exc).startswith("fuzz.yaml"), f"the error does not name the file: {exc}"
        return
    assert policies and {p.spec.backend for p in policies} == {"local"}
    for p in policies:  # a policy that validates can also be scheduled and planned
        assert p.schedule.period.total_seconds() > 0 and p.rules is not None


# -- the CLI, in-process --------------------------------------------------------------------


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hostile-cli")
    path = root / "config.toml"
    path.write_text(f'[database]\nurl = "sqlite:///{root / "catalog.db"}"\n'
                    f'[[backends]]\nname = "local"\ntype = "filesystem"\npath = "{root / "backend"}"\n')
    assert run_cli(path, "db", "upgrade")[0] == 0
    return path


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(text=policy_texts())
def test_fuzzed_policy_apply_exits_2_without_a_traceback(config: Path, text: str) -> None:
    code, out, err = run_cli(config, "policy", "apply", "-f", "-", stdin=text)
    assert code != 1, f"policy apply crashed (exit 1):\n{err[-3000:]}"
    assert code in (0, EXIT_INVALID_INPUT), (code, out, err)
    assert "Traceback" not in err and "Traceback" not in out
    if code == EXIT_INVALID_INPUT:
        assert err.startswith("error: <stdin>"), err


@pytest.mark.parametrize("bug", list(REGRESSIONS))
def test_former_crashes_of_policy_apply_exit_2(config: Path, bug: str) -> None:
    code, _, err = run_cli(config, "policy", "apply", "-f", "-", stdin=REGRESSIONS[bug][2])
    assert (code, "Traceback" in err) == (EXIT_INVALID_INPUT, False), err[-2000:]


def test_a_valid_file_still_applies(config: Path) -> None:
    """The fuzz harness is not blind: a good file applies, a bad one is refused naming the field."""
    good = ("apiVersion: backupd.io/v1\nkind: CheckpointPolicy\nmetadata: {name: harness-check}\n"
            "spec: {schedule: '@every 30s', backend: local, retention: {keepLast: 3}}\n")
    created = run_cli(config, "policy", "apply", "-f", "-", stdin=good)[:2]
    assert created == (0, "checkpointpolicy/harness-check created\n")
    code, _, err = run_cli(config, "policy", "apply", "-f", "-", stdin=good.replace("keepLast: 3", "keepLast: many"))
    assert code == EXIT_INVALID_INPUT and "spec.retention.keepLast" in err and "Traceback" not in err
