"""Disaster recovery end to end with real CRIU: a counting process is checkpointed while it keeps
running, shipped to S3 (moto's server), killed, its node tar deleted; ``backupd restore --output``
brings the archive back from S3 and ``criu restore`` resumes the process from the checkpointed
count. Skipped, with the reason, without criu >= 4 and root."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from backupd.app import App
from backupd.config import load_config
from backupd.policy.document import parse_policies
from backupd.simulator import criu as real_criu
from backupd.simulator.server import NodeSimulator
from backupd.simulator.topology import parse_topology
from tests.s3_rig import FAKE_ACCESS_KEY, FAKE_SECRET, REGION

from .conftest import Rig, write_config

CRIU_REASON = real_criu.criu_unavailable_reason()

POLICY = """\
apiVersion: backupd.io/v1
kind: CheckpointPolicy
metadata: {name: counter}
spec:
  selector: {namespaces: [default], matchLabels: {app: counter}}
  schedule: "@every 1h"
  backend: s3
  retention: {keepLast: 3}
  keepOnNode: 0
"""


@pytest.mark.skipif(CRIU_REASON is not None, reason=f"real CRIU unavailable: {CRIU_REASON}")
def test_restore_from_s3_resumes_the_process_where_it_was_checkpointed(
    tmp_path: Path, moto_endpoint: str, s3_bucket: str, capsys
) -> None:
    topology = parse_topology({"node": "criu-node", "pods": [{
        "namespace": "default", "name": "counter", "labels": {"app": "counter"},
        "containers": [{"name": "count", "image": "busybox:1.36", "processes": ["counter"]}],
    }]})  # fmt: skip
    with NodeSimulator(tmp_path / "node", topology=topology, criu=True, memory_bytes=1 << 20) as sim:
        s3 = {"name": "s3", "type": "s3", "bucket": s3_bucket, "prefix": "dr", "endpoint_url": moto_endpoint,
              "region": REGION, "addressing_style": "path", "access_key_id": FAKE_ACCESS_KEY,
              "secret_access_key": FAKE_SECRET}  # fmt: skip
        config = write_config(tmp_path / "config.toml", tmp_path, sim, s3=s3)
        app = App(load_config(config))
        try:
            app.catalog.upgrade()
            rig = Rig(tmp_path, sim, config, app)
            proc = sim.process("default", "counter", "count")
            assert proc is not None
            proc.wait_for_counter(3)

            policy = parse_policies(POLICY, "counter.yaml", backends=list(app.backends))[0]
            app.catalog.apply_policies([(policy.name, policy.canonical_json())])
            before = proc.read_counter()
            result = app.runner.cycle(policy)
            after = proc.read_counter()
            assert not result.failed, result
            [outcome] = result.outcomes
            archive = outcome.archive
            assert archive is not None and archive.backend == "s3"
            # shipped, and the node-local tar is gone: S3 is the only copy
            assert not (sim.checkpoint_dir / archive.node_path).exists()

            # --leave-running: the original goes on counting... until the node is lost
            time.sleep(1.5)
            reached = proc.read_counter()
            proc.stop()
            assert before is not None and after is not None and reached is not None and reached > after

            restored_tar = tmp_path / "restored" / "counter.tar"
            restored_tar.parent.mkdir()
            rig.run("restore", archive.id, "--to", str(restored_tar), capsys=capsys)

            images = real_criu.extract_checkpoint_images(restored_tar, tmp_path / "restored")
            pid = real_criu.criu_restore(images, tmp_path / "restored" / "work")
            try:
                assert pid == proc.pid
                time.sleep(0.4)
                first = real_criu.read_counter(proc.counter_file)
                time.sleep(0.4)
                second = real_criu.read_counter(proc.counter_file)
            finally:
                real_criu.stop_pid(pid)
        finally:
            app.close()
    assert first is not None and second is not None
    # resumed from the checkpointed value: not from zero, not from where the original was killed...
    assert before <= first < reached, (before, after, first, reached)
    # ...and still counting
    assert second > first
