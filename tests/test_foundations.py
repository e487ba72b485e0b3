"""The one-of-each helpers: durable writes, TLS client contexts, sizes, scrubbing, run records."""

from __future__ import annotations

import os
import ssl
import stat
from pathlib import Path

import pytest
import structlog
import structlog.testing

from backupd import durable, tls
from backupd.catalog.store import Catalog
from backupd.errors import StorageUnavailable, scrub
from backupd.metrics import Metrics
from backupd.model import RUN_FAILED, SUCCEEDED, rfc3339
from backupd.sizes import human_bytes, parse_quantity, parse_size
from backupd.storage.runs import record_skipped, recorded_run


def test_atomic_write_publishes_the_whole_file_0600_and_leaves_no_temp(tmp_path: Path) -> None:
    dest = tmp_path / "out.bin"
    with durable.atomic_write(dest) as fh:
        fh.write(b"abc")
        assert not dest.exists(), "visible before it is complete"
    assert dest.read_bytes() == b"abc"
    assert stat.S_IMODE(dest.stat().st_mode) == 0o600
    assert os.listdir(tmp_path) == ["out.bin"]


def test_atomic_write_is_create_only_unless_replacing(tmp_path: Path) -> None:
    dest = tmp_path / "out.bin"
    dest.write_bytes(b"old")
    with pytest.raises(FileExistsError), durable.atomic_write(dest) as fh:
        fh.write(b"new")
    assert dest.read_bytes() == b"old" and os.listdir(tmp_path) == ["out.bin"]
    with durable.atomic_write(dest, replace=True) as fh:
        fh.write(b"new")
    assert dest.read_bytes() == b"new" and os.listdir(tmp_path) == ["out.bin"]


def test_an_error_in_the_block_publishes_nothing(tmp_path: Path) -> None:
    dest = tmp_path / "out.bin"
    with pytest.raises(RuntimeError), durable.atomic_write(dest, prefix=".tmp.", suffix="") as fh:
        fh.write(b"half")
        assert [p.name.startswith(".tmp.out.bin.") for p in tmp_path.iterdir()] == [True]
        raise RuntimeError("source failed")
    assert os.listdir(tmp_path) == []


def test_client_context_verifies_and_refuses_a_file_that_is_no_ca(tmp_path: Path) -> None:
    ctx = tls.client_context()
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    junk = tmp_path / "ca.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(OSError):
        tls.client_context(junk)
    with pytest.raises(OSError):
        tls.client_context(tmp_path / "missing.pem")


def test_one_quantity_grammar_config_refuses_fractions() -> None:
    assert parse_quantity("1.5Ki") == 1536 and parse_quantity("1k") == 1000 and parse_quantity("2Pi") == 2 * 2**50
    assert parse_size("50Gi") == 50 * 2**30
    for bad in ("1.5Gi", "1ki", "lots", "-1"):
        with pytest.raises(ValueError, match="expected a size"):
            parse_size(bad)
    assert (human_bytes(None), human_bytes(1023), human_bytes(1536), human_bytes(3 * 2**50)) == (
        "-", "1023 B", "1.5 KiB", "3072.0 TiB")


def test_scrub_removes_userinfo_with_or_without_a_scheme() -> None:
    assert scrub("GET https://u:p@h/x and //key:secret@bucket.s3/") == "GET https://***@h/x and //***@bucket.s3/"
    assert rfc3339(None) is None


def test_a_run_is_recorded_counted_and_logged_once(catalog: Catalog) -> None:
    metrics = Metrics()
    log = structlog.get_logger("test")
    with structlog.testing.capture_logs() as lines:
        with recorded_run(catalog, metrics, "prune", policy="web", node="n", log=log, event="prune_finished") as run:
            run.bytes_in = 10
            run.fields["deleted"] = 1
        with pytest.raises(StorageUnavailable), recorded_run(catalog, metrics, "prune", policy="web", node="n",
                                                             log=log, event="prune_finished"):
            raise StorageUnavailable("bucket down")
        with pytest.raises(KeyError), recorded_run(catalog, metrics, "delete", policy="web", node="n", log=log):
            raise KeyError("bug")
    assert run.run is not None and (run.run.outcome, run.run.bytes_in) == (SUCCEEDED, 10)
    runs = {r.kind + "/" + r.outcome: r for r in catalog.list_runs()}
    assert runs["prune/failed"].error_kind == "StorageUnavailable"
    assert runs["delete/failed"].error is not None and "internal error: KeyError" in runs["delete/failed"].error
    assert [(e["log_level"], e["event"]) for e in lines] == [
        ("info", "prune_finished"), ("error", "prune_finished"), ("error", "unexpected_error"),
        ("error", "run_finished")]
    assert lines[0]["deleted"] == 1 and lines[0]["outcome"] == SUCCEEDED and "duration_seconds" in lines[0]
    assert lines[1]["error_kind"] == "StorageUnavailable" and lines[1]["error"] == "bucket down"
    sample = metrics.registry.get_sample_value
    assert sample("backupd_runs_total", {"kind": "prune", "outcome": SUCCEEDED}) == 1
    assert sample("backupd_runs_total", {"kind": "prune", "outcome": RUN_FAILED}) == 1
    assert sample("backupd_errors_total", {"kind": "StorageUnavailable"}) == 1
    assert sample("backupd_errors_total", {"kind": "BackupdError"}) == 1
    skipped = record_skipped(catalog, "checkpoint", "busy", policy="web", node="n", namespace="d", pod="p",
                             workload="deployment/w", container="c")
    assert (skipped.outcome, skipped.error) == ("skipped", "busy")
    assert sample("backupd_runs_total", {"kind": "checkpoint", "outcome": "skipped"}) is None


def test_totals_are_what_the_metrics_show(catalog: Catalog) -> None:
    assert catalog.totals().retained == {} and catalog.totals().last_success == {}
    run_id = catalog.start_run("checkpoint", policy="web", node="n", namespace="d", workload="deployment/w",
                               container="c")
    finished = catalog.finish_run(run_id, SUCCEEDED)
    assert catalog.totals().last_success == {("d", "deployment/w", "c"): finished.finished_at}


def test_new_file_is_exclusive_0600_and_fsynced_on_success(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    with durable.new_file(path) as fh:
        fh.write(b"x")
    assert path.read_bytes() == b"x" and stat.S_IMODE(path.stat().st_mode) == 0o600
    with pytest.raises(FileExistsError), durable.new_file(path):
        pass
    assert path.read_bytes() == b"x"
