"""restic's own golden retention tests (TestApplyPolicy: 103 snapshots x 40 policies).

The fixtures live beside the repository in ``shared/fixtures/restic-policy`` (see its README for
how they were transcribed and how to compare). Each policy is checked three ways: the multiset
of kept snapshots, their order, and the reasons, mapped from restic's wording to backupd's.
Policies with ``keep_tags`` are skipped (backupd archives have no tags), and the empty policy is
one backupd refuses, where restic's ApplyPolicy keeps nothing.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import pytest

from backupd.errors import PolicyError
from backupd.policy.retention import Duration, Item, Rules, parse_rfc3339, plan

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "restic-policy"
POLICY_COUNT = 40

pytestmark = pytest.mark.skipif(
    not (FIXTURES / "policies.json").is_file(),
    reason=f"restic golden fixtures not found at {FIXTURES}",
)


def _load(name: str):
    return json.loads((FIXTURES / name).read_text())


@pytest.fixture(scope="module")
def snapshots() -> list[dict]:
    return _load("snapshots.json")


@pytest.fixture(scope="module")
def policies() -> list[dict]:
    return _load("policies.json")


def _key(snapshot: dict) -> tuple:
    """Identity of a snapshot as far as the fixtures can tell them apart (README)."""
    return (parse_rfc3339(snapshot["time"]), tuple(snapshot.get("tags") or ()), tuple(snapshot.get("paths") or ()))


def _rules(policy: dict) -> Rules:
    durations = {
        name: Duration.parse(policy[name])
        for name in ("within", "within_hourly", "within_daily", "within_weekly", "within_monthly", "within_yearly")
        if policy[name] is not None
    }
    counts = {name: policy[name] for name in ("last", "hourly", "daily", "weekly", "monthly", "yearly")}
    return Rules(**counts, **durations)


_WITHIN_BUCKET = re.compile(r"(oldest )?(hourly|daily|weekly|monthly|yearly) within (\S+)")
_COUNT_BUCKET = re.compile(r"(oldest )?(last|hourly|daily|weekly|monthly|yearly) snapshot")


def _reason(match: str, rules: Rules) -> str:
    """restic's reason wording -> backupd's short reason (durations checked on the way)."""
    if match.startswith("within "):
        assert match == f"within {rules.within}", "Duration.__str__ must print restic's canonical form"
        return "within"
    if m := _COUNT_BUCKET.fullmatch(match):
        return f"{m[1] or ''}{m[2]}"
    if m := _WITHIN_BUCKET.fullmatch(match):
        assert m[3] == str(getattr(rules, f"within_{m[2]}")), "Duration.__str__ must print restic's form"
        return f"{m[1] or ''}within-{m[2]}"
    raise AssertionError(f"unknown restic reason {match!r}")


def _golden(index: int) -> dict:
    return json.loads((FIXTURES / "golden" / f"policy_keep_snapshots_{index}").read_text())


def _uses_tags(policy: dict) -> bool:
    return bool(policy.get("tags"))


def test_fixture_shape(snapshots, policies):
    assert len(snapshots) == 103
    assert len(policies) == POLICY_COUNT
    assert len(list((FIXTURES / "golden").iterdir())) == POLICY_COUNT


@pytest.mark.parametrize("now", [None, datetime(2030, 1, 1, tzinfo=UTC)], ids=["now=None", "now=2030"])
@pytest.mark.parametrize("index", range(POLICY_COUNT))
def test_policy_reproduces_restic(index, now, snapshots, policies):
    policy = policies[index]
    if _uses_tags(policy):
        pytest.skip(f"policy {index} keeps by tags ({policy['tags']}); backupd archives have no tags")
    rules = _rules(policy)
    items = [Item(id=str(i), time=parse_rfc3339(s["time"])) for i, s in enumerate(snapshots)]
    if rules.is_empty():
        # restic's ApplyPolicy keeps nothing for an empty policy; its forget command refuses to
        # run one, and so does backupd.
        assert _golden(index)["keep"] is None
        with pytest.raises(PolicyError):
            plan(items, rules, now=now)
        return

    result = plan(items, rules, now=now)
    golden = _golden(index)
    golden_keep = golden["keep"] or []

    kept = [_key(snapshots[int(d.item.id)]) for d in result.keep]
    expected = [_key(s) for s in golden_keep]
    assert Counter(kept) == Counter(expected)  # primary: the multiset of kept snapshots
    assert kept == expected  # secondary: newest first, stable for equal times
    assert len(result.keep) + len(result.remove) == len(snapshots)

    expected_reasons = [tuple(_reason(m, rules) for m in r["matches"]) for r in golden.get("reasons") or []]
    assert [d.reasons for d in result.keep] == expected_reasons  # strict: reasons, in order
    assert all(d.reasons == () for d in result.remove)


def test_reproduced_policy_count(policies):
    """The brief: every policy without tags (36 of the 40, plus the refused empty one)."""
    tagged = [i for i, p in enumerate(policies) if _uses_tags(p)]
    empty = [i for i, p in enumerate(policies) if not _uses_tags(p) and _rules(p).is_empty()]
    assert tagged == [18, 19, 20]
    assert empty == [0]
    assert POLICY_COUNT - len(tagged) - len(empty) == 36
