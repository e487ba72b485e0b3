"""The README's "Restore without backupd" steps, run as written with the AWS CLI and zstd against
an archive backupd shipped to S3 (moto's server)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.s3_rig import FAKE_ACCESS_KEY, FAKE_SECRET, REGION

from .conftest import Rig

RUNBOOK = r"""
set -euo pipefail
aws() { command aws --endpoint-url "$ENDPOINT" "$@"; }
DIR="$PREFIX/default/deployment-web/nginx"
NEWEST=$(aws s3 ls "s3://$BUCKET/$DIR/" | awk '{print $4}' | grep '\.json$' | sort | tail -n 1)
KEY="$DIR/${NEWEST%.json}"
aws s3 cp "s3://$BUCKET/$KEY.json" manifest.json
aws s3 cp "s3://$BUCKET/$KEY.tar.zst" - | zstd -d > checkpoint.tar
sha256sum checkpoint.tar; grep tar_sha256 manifest.json
"""


@pytest.mark.skipif(shutil.which("aws") is None or shutil.which("zstd") is None,
                    reason="needs the AWS CLI (pip install awscli) and zstd (apt-get install zstd)")
def test_restore_without_backupd_with_the_aws_cli_and_zstd(
    rig_factory: Callable[..., Rig], moto_endpoint: str, s3_bucket: str, tmp_path: Path, capsys
) -> None:
    rig = rig_factory(s3={"name": "s3", "type": "s3", "bucket": s3_bucket, "prefix": "prod",
                          "endpoint_url": moto_endpoint, "region": REGION, "addressing_style": "path",
                          "access_key_id": FAKE_ACCESS_KEY, "secret_access_key": FAKE_SECRET})  # fmt: skip
    archives = rig.take("s3")
    newest = max(archives, key=lambda a: a.key.rsplit("/", 1)[1])
    work = tmp_path / "dr"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env |= {"AWS_ACCESS_KEY_ID": "dr", "AWS_SECRET_ACCESS_KEY": "dr", "AWS_DEFAULT_REGION": REGION,
            "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull, "ENDPOINT": moto_endpoint, "BUCKET": s3_bucket,
            "PREFIX": "prod"}  # fmt: skip
    proc = subprocess.run(["bash", "-c", RUNBOOK], cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (work / "checkpoint.tar").read_bytes() == rig.node_tar(newest).read_bytes()
    # the two digests the runbook prints are equal
    assert f"{newest.tar_sha256}  checkpoint.tar" in proc.stdout
    assert f'"tar_sha256": "{newest.tar_sha256}"' in proc.stdout

    # and with backupd, from the same bucket
    rig.run("restore", newest.id, "--to", str(work / "with-backupd.tar"), capsys=capsys)
    assert (work / "with-backupd.tar").read_bytes() == (work / "checkpoint.tar").read_bytes()
