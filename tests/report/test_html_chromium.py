"""The HTML report in a real headless Chromium: it loads nothing but itself, logs no error, and
the screenshot shows a timeline whose dots have the colours of the rules that keep them."""

from __future__ import annotations

import json
import shutil
from datetime import timedelta
from pathlib import Path

from backupd.report.build import build_report
from backupd.report.html import render_html
from tests.report.browser import Browser, decode_png
from tests.report.test_build import T0, archive, policy, run


def test_the_harness_sees_errors_failed_loads_and_requests(tmp_path: Path) -> None:
    # The report test below asserts "no error": this proves the harness would have seen one.
    page = tmp_path / "broken.html"
    page.write_text('<!doctype html><title>broken</title><img src="missing.png" alt="">'
                    '<script>console.error("injected"); undefinedFunction();</script>')
    with Browser(tmp_path) as browser:
        browser.open(page.as_uri())
        errors = browser.errors
        requests = browser.requests
    assert any(e.startswith("console: injected") for e in errors), errors
    assert any(e.startswith("exception:") and "undefinedFunction" in e for e in errors), errors
    assert any(e.startswith("log (network):") for e in errors), errors
    assert (tmp_path / "missing.png").as_uri() in requests


def rich_report():  # type: ignore[no-untyped-def]
    web = policy("web", "@every 6h", "{keepLast: 3, keepDaily: 4, keepWeekly: 2}")
    db = policy("db", "@daily", "{keepLast: 2, keepMonthly: 3}")
    now = T0 + timedelta(days=30, hours=2)
    archives = [archive(i, T0 + timedelta(hours=6 * i)) for i in range(121)]
    archives += [archive(1000 + i, T0 + timedelta(days=i), workload="deployment/api", container="app")
                 for i in range(0, 20, 2)]
    archives.append(archive(2000, T0 + timedelta(days=3), workload="deployment/api", container="app", pinned=True))
    archives += [archive(3000 + i, T0 + timedelta(days=i, minutes=5), policy_name="db", workload="statefulset/pg",
                         container="postgres") for i in range(31)]
    archives.append(archive(4000, T0, policy_name="retired", workload='deployment/<b>"odd"</b>', container="c"))
    runs = [run(1, now - timedelta(hours=1), "failed", workload="deployment/api", container="app",
                error_kind="CheckpointFailed", error="checkpointing of default/api-1/app failed (criu: <dump> failed)"),
            run(2, now - timedelta(hours=2), "failed", workload="deployment/batch", container="worker",
                error_kind="KubeletTimeout", error="the kubelet did not answer in 150 s")]
    return build_report([web, db], archives, runs, now)


TIMELINE_FACTS = """(() => {
  const svgs = [...document.querySelectorAll('svg.timeline')];
  const first = svgs.find(s => s.querySelectorAll('circle').length > 0);
  const box = first.getBoundingClientRect();
  const dot = (c) => { const r = c.getBoundingClientRect();
                       return {x: r.x + r.width / 2, y: r.y + r.height / 2, fill: c.getAttribute('fill')}; };
  return {
    timelines: svgs.length,
    described: svgs.filter(s => s.querySelector('title') && s.querySelector('desc')).length,
    kept: document.querySelectorAll('svg.timeline circle[cy="23"]').length,
    removed: document.querySelectorAll('svg.timeline circle[cy="51"]').length,
    scripts: document.scripts.length,
    title: document.title,
    box: {x: box.x, y: box.y, width: box.width, height: box.height},
    keptDot: dot(first.querySelector('circle[cy="23"]')),
    removedDot: dot(first.querySelector('circle[cy="51"]')),
  };
})()"""


def _close(a: tuple[int, int, int], b: tuple[int, int, int], tolerance: int = 40) -> bool:
    return all(abs(x - y) <= tolerance for x, y in zip(a, b, strict=True))


def _rgb(hex_colour: str) -> tuple[int, int, int]:
    return int(hex_colour[1:3], 16), int(hex_colour[3:5], 16), int(hex_colour[5:7], 16)


def test_html_report_in_chromium_shows_the_timelines_without_errors(tmp_path: Path) -> None:
    report = rich_report()
    page = tmp_path / "report.html"
    page.write_text(render_html(report))
    with Browser(tmp_path, width=1200, height=2000) as browser:
        browser.open(page.as_uri())
        facts = browser.evaluate(TIMELINE_FACTS)
        full = browser.screenshot()
        box = facts["box"]
        clip = {"x": box["x"], "y": box["y"], "width": box["width"], "height": box["height"]}
        timeline_png = browser.screenshot(clip)
        errors, requests = browser.errors, browser.requests
    (tmp_path / "report.png").write_bytes(full)
    (tmp_path / "timeline.png").write_bytes(timeline_png)

    assert errors == [], errors
    assert requests == [page.as_uri()]  # self-contained: the page loads nothing else
    workloads = list(report.workloads())
    assert facts["timelines"] == facts["described"] == len(workloads)
    assert facts["kept"] == sum(len([p for p in w.timeline if p.keep]) for w in workloads)
    assert facts["removed"] == sum(len(w.prune_remove) for w in workloads) > 0
    assert facts["scripts"] == 0 and facts["title"].startswith("backupd retention report")
    assert box["width"] > 600 and box["height"] > 40

    shot = decode_png(full, max_rows=300)
    assert (shot.width, shot.height) == (1200, 2000)
    assert len(shot.colours(step=2)) > 20, "the top of the page is blank"

    # The timeline as a person sees it: the kept dot in its rule's colour, the removal mark red.
    strip = decode_png(timeline_png)
    for dot, expected in ((facts["keptDot"], _rgb(facts["keptDot"]["fill"])), (facts["removedDot"], _rgb("#c0392b"))):
        x, y = round(dot["x"] - box["x"]), round(dot["y"] - box["y"])
        around = [strip.pixel(x + dx, y + dy) for dx in (-1, 0, 1) for dy in (-1, 0, 1)]
        assert any(_close(p, expected) for p in around), (dot, expected, around)
    artifacts = Path(__file__).resolve().parents[2] / ".pytest-artifacts"
    if artifacts.is_dir():  # keep the screenshots for a person to look at, when asked to
        shutil.copy(tmp_path / "report.png", artifacts / "report.png")
        (artifacts / "report-facts.json").write_text(json.dumps(facts, indent=2))
