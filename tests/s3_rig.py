"""The S3 test rig: moto's threaded server on an ephemeral loopback port (real HTTP, real boto3).

``moto_endpoint`` starts one server for the session; ``s3_bucket`` gives each test a fresh
bucket and empties and removes it afterwards (moto keeps objects in memory); ``make_s3``
builds an :class:`S3Backend` on that bucket with recognisable fake credentials.
"""

from __future__ import annotations

import json
import logging
import os
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

FAKE_ACCESS_KEY = "AKIAFAKEBACKUPDTEST1"
FAKE_SECRET = "fAkE-SeCrEt-never-in-messages-0123456789"
FAKE_TOKEN = "FaKeSeSsIoNtOkEn-never-in-messages-9876"
REGION = "us-east-1"


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    moto_server = pytest.importorskip("moto.server")
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    with pytest.MonkeyPatch.context() as env:
        # boto3 in this process must never find real credentials or call IMDS.
        for var in [v for v in os.environ if v.startswith("AWS_")]:
            env.delenv(var)
        env.setenv("AWS_EC2_METADATA_DISABLED", "true")
        env.setenv("AWS_CONFIG_FILE", os.devnull)
        env.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
        server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        try:
            yield f"http://{host}:{port}"
        finally:
            server.stop()


def admin_client(endpoint: str) -> Any:
    """A plain boto3 client for setting up and inspecting the bucket (not the code under test)."""
    import boto3
    from botocore.config import Config

    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id="admin",
        aws_secret_access_key="admin",
        config=Config(s3={"addressing_style": "path"}, retries={"mode": "standard", "total_max_attempts": 1}),
    )


@pytest.fixture(scope="session")
def s3_admin(moto_endpoint: str) -> Any:
    return admin_client(moto_endpoint)


def set_moto_auth(endpoint: str, enabled: bool) -> None:
    """Switch moto's IAM authentication on (every request checked) or off, server-wide."""
    request = urllib.request.Request(
        f"{endpoint}/moto-api/reset-auth", data=(b"0" if enabled else b"inf"), method="POST",
        headers={"Content-Type": "text/plain"},  # a form content type would hide the body from moto
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        json.load(response)


def empty_bucket(client: Any, bucket: str) -> None:
    for page in client.get_paginator("list_multipart_uploads").paginate(Bucket=bucket):
        for upload in page.get("Uploads", ()):
            client.abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", ())]
        if keys:
            client.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})


@pytest.fixture
def s3_bucket(s3_admin: Any) -> Iterator[str]:
    bucket = f"backupd-test-{uuid.uuid4().hex[:12]}"
    s3_admin.create_bucket(Bucket=bucket)
    try:
        yield bucket
    finally:
        try:
            empty_bucket(s3_admin, bucket)
            s3_admin.delete_bucket(Bucket=bucket)
        except Exception:
            pass  # a test that removed or locked its bucket; moto forgets it at the end anyway


@pytest.fixture
def make_s3(moto_endpoint: str, s3_bucket: str) -> Callable[..., Any]:
    from backupd.backends.s3 import S3Backend

    def make(**overrides: Any) -> S3Backend:
        kwargs: dict[str, Any] = {
            "prefix": "prod",
            "endpoint_url": moto_endpoint,
            "region": REGION,
            "access_key_id": FAKE_ACCESS_KEY,
            "secret_access_key": FAKE_SECRET,
            "session_token": FAKE_TOKEN,
            "part_size": 5 * 1024 * 1024,
            "retry_base_delay": 0.01,
        }
        kwargs.update(overrides)
        return S3Backend(kwargs.pop("name", "s3"), kwargs.pop("bucket", s3_bucket), **kwargs)

    return make
