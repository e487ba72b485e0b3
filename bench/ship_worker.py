"""Ship one tar through backupd's real commit path, in a process of its own, and report the
time and the process's peak RSS (VmHWM). Used by bench.ship; run as a module:

    python -m bench.ship_worker --tar FILE --workdir DIR [--s3-endpoint URL --bucket B]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path

from backupd.backends import open_backend
from backupd.catalog.store import Catalog
from backupd.config import FilesystemBackendConfig, KubeletConfig, S3BackendConfig
from backupd.model import Container, Pod
from backupd.node.checkpoints import CheckpointDir
from backupd.node.kubelet import KubeletClient
from backupd.policy.document import parse_policies
from backupd.storage.commit import Pipeline

POLICY = ("apiVersion: backupd.io/v1\nkind: CheckpointPolicy\nmetadata: {name: bench}\n"
          "spec: {schedule: '@hourly', backend: target, retention: {keepLast: 1}}\n")


def vmhwm_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return -1


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tar", required=True, type=Path)
    ap.add_argument("--workdir", required=True, type=Path)
    ap.add_argument("--s3-endpoint")
    ap.add_argument("--bucket")
    ap.add_argument("--level", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()

    node_dir = args.workdir / "node"
    node_dir.mkdir(parents=True, exist_ok=True)
    name = "checkpoint-bench_default-app-2026-01-01T00:00:00Z.tar"
    staged = node_dir / name
    if not staged.exists():
        staged.hardlink_to(args.tar)
    if args.s3_endpoint:
        cfg = S3BackendConfig(name="target", type="s3", bucket=args.bucket, endpoint_url=args.s3_endpoint,
                              region="us-east-1", addressing_style="path", access_key_id="bench",
                              secret_access_key="bench-secret")
    else:
        target = args.workdir / "backend"
        shutil.rmtree(target, ignore_errors=True)
        cfg = FilesystemBackendConfig(name="target", type="filesystem", path=target)
    backend = open_backend(cfg)
    catalog = Catalog.open(f"sqlite:///{args.workdir / 'catalog.db'}")
    catalog.upgrade()
    kwargs = {k: v for k, v in (("level", args.level), ("threads", args.threads)) if v is not None}
    pipeline = Pipeline(catalog=catalog, backends={"target": backend},
                        kubelet=KubeletClient(KubeletConfig(checkpoint_dir=node_dir)),
                        checkpoint_dir=CheckpointDir(node_dir), node="bench", **kwargs)
    (policy,) = parse_policies(POLICY, "bench")
    pod = Pod("default", "bench", owner_kind="", containers=(Container("app", "example/app:1", running=True),))
    started = time.perf_counter()
    archive = pipeline.commit(policy, pod, pod.containers[0], staged, datetime.now(UTC))
    elapsed = time.perf_counter() - started
    print(json.dumps({"seconds": elapsed, "tar_size": archive.tar_size, "stored_size": archive.stored_size,
                      "vmhwm_kib": vmhwm_kib()}))


if __name__ == "__main__":
    main()
