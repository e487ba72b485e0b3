"""How every benchmark reports: a plain-text table on stdout and a JSON file of the same rows."""

from __future__ import annotations

import json
import os
import platform
import sys
from datetime import UTC, datetime
from pathlib import Path

RESULTS = Path(__file__).with_name("results")
Row = dict[str, object]


def report(rows: list[Row], name: str, **meta: object) -> None:
    """Print ``rows`` as a table (columns in first-seen order) and write bench/results/<name>.json."""
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    widths = {k: max(len(k), *(len(str(r.get(k, ""))) for r in rows)) for k in keys}
    print("  ".join(k.ljust(widths[k]) for k in keys))
    for r in rows:
        print("  ".join(str(r.get(k, "")).ljust(widths[k]) for k in keys))
    RESULTS.mkdir(exist_ok=True)
    meta = {"when": datetime.now(UTC).isoformat(), "machine": platform.platform(), "cpus": os.cpu_count(),
            "python": platform.python_version(), **meta}
    (RESULTS / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"\nwritten {RESULTS / f'{name}.json'}", file=sys.stderr)
