"""The retention engine before and after issue 14, on the same million archives, alternating.

    python -m bench.retention_ab [--archives N] [--rounds R] [--commit REV]

``REV`` (default 66b0613, the last commit with it) holds the former fast path: columns built
through slot descriptors and C iterators, with the cyclic garbage collector paused while it
planned. It is loaded from git beside the current plain port, checked to give the same plans,
and both are timed in turn (``prune.plan_policy`` as the daemon runs it, collector on for the
plain port). ``--fast-path-with-gc`` times the former fast path with the collector running too,
which is what it costs without ``gc.disable()``. Also prints the time the collector took.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import subprocess
import sys
import time
import types
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from itertools import compress, groupby, repeat
from operator import attrgetter, eq
from pathlib import Path
from typing import Any

from backupd.model import COMMITTED, ArchiveSummary
from backupd.policy.document import Policy, parse_policies
from backupd.storage.prune import plan_policy

POLICY = ("apiVersion: backupd.io/v1\nkind: CheckpointPolicy\nmetadata: {name: big}\n"
          "spec: {schedule: '@hourly', backend: b, retention: {keepLast: 3, keepHourly: 24, "
          "keepDaily: 7, keepWeekly: 4, keepMonthly: 12, keepYearly: 2, keepWithin: 2d}}\n")  # as bench retention


def former_engine(commit: str) -> types.ModuleType:
    root = Path(__file__).resolve().parent.parent
    source = subprocess.run(["git", "show", f"{commit}:backupd/policy/retention.py"], cwd=root, check=True,
                            capture_output=True, text=True).stdout
    module = types.ModuleType("former_retention")
    sys.modules[module.__name__] = module  # dataclasses look their module up
    exec(compile(source, "former_retention.py", "exec"), module.__dict__)  # noqa: S102 - our own history
    return module


def former_plan_policy(engine: types.ModuleType, pause_gc: bool) -> Callable[[Policy, list[Any]], list[Any]]:
    group, selector = attrgetter("namespace", "workload", "replica", "container"), attrgetter("state", "policy")
    ids, times, sizes, pins = map(attrgetter, ("id", "checkpoint_time", "stored_size", "pinned"))

    def plan(policy: Policy, listed: list[Any]) -> list[Any]:  # storage.prune.plan_policy as it was then
        plans = []
        with engine.gc_paused() if pause_gc else contextlib.nullcontext():
            mine = list(compress(listed, map(eq, map(selector, listed), repeat((COMMITTED, policy.name)))))
            mine.sort(key=group)
            for _key, grouped in groupby(mine, group):
                members = tuple(grouped)
                items = engine.items(map(ids, members), map(times, members), [s or 0 for s in map(sizes, members)],
                                     map(pins, members), len(members))
                plans.append(engine.plan(items, policy.rules, tz=policy.tz))
        return plans

    return plan


@contextlib.contextmanager
def collector_time() -> Iterator[list[float]]:
    spent, started = [0.0], [0.0]

    def callback(phase: str, _info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            spent[0] += time.perf_counter() - started[0]

    gc.callbacks.append(callback)
    try:
        yield spent
    finally:
        gc.callbacks.remove(callback)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--archives", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--commit", default="66b0613")
    parser.add_argument("--fast-path-with-gc", action="store_true")
    args = parser.parse_args()
    (policy,) = parse_policies(POLICY, "bench")
    t0 = datetime(2020, 1, 1, tzinfo=UTC)
    archives = [ArchiveSummary(f"{i:016x}", "committed", "big", "default", "deployment/web", "", "c",
                               t0 + timedelta(minutes=5 * i), 1000, False) for i in range(args.archives)]
    former = former_plan_policy(former_engine(args.commit), pause_gc=not args.fast_path_with_gc)
    contenders: dict[str, Callable[[Policy, list[Any]], list[Any]]] = {
        f"fast path ({args.commit}{', collector on' if args.fast_path_with_gc else ', collector paused'})": former,
        "plain port (collector on)": lambda p, a: [g.plan for g in plan_policy(p, a)],
    }
    plans = [[(d.item.id, d.keep, d.reasons) for plan in fn(policy, archives) for d in plan.decisions]
             for fn in contenders.values()]
    assert plans[0] == plans[1], "the two engines plan differently"
    print(f"same plans for {args.archives:,} archives ({sum(k for _, k, _ in plans[0]):,} kept)", flush=True)
    timings: dict[str, list[tuple[float, float]]] = {name: [] for name in contenders}
    for _ in range(args.rounds):
        for name, fn in contenders.items():
            gc.collect()
            with collector_time() as spent:
                started = time.perf_counter()
                result = fn(policy, archives)
                elapsed = time.perf_counter() - started
            timings[name].append((elapsed, spent[0]))
            del result
    for name, runs in timings.items():
        best = min(runs)
        print(f"{name}: best {best[0]:.2f} s (collector {best[1]:.2f} s); all "
              + ", ".join(f"{t:.2f}" for t, _ in runs), flush=True)


if __name__ == "__main__":
    main()
