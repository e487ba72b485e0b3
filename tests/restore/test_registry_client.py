"""The distribution client against a token-auth registry (an httpx.MockTransport that speaks the
distribution API and the token protocol): bearer tokens, renewal, credentials never sent to another
origin, chunked uploads, and a source that fails verification never completing a blob."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import tarfile
import uuid
from datetime import UTC, datetime

import httpx
import pytest

from backupd.archive.metadata import checkpoint_info, metadata_scanner
from backupd.archive.tar import ScanningReader
from backupd.errors import IntegrityError, InvalidInput, StorageAuthError
from backupd.model import COMMITTED, Archive
from backupd.restore import oci
from backupd.restore.registry import ImageRef, RegistryClient, parse_challenge, push_checkpoint_image

USER, PASSWORD = "robot", "pa55-word-never-shown"


class TokenRegistry:
    """reg.example with its token service at auth.example and blob storage at storage.example."""

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}
        self.manifests: dict[str, bytes] = {}
        self.uploads: dict[str, bytearray] = {}
        self.valid_tokens: set[str] = set()
        self.issued = 0
        self.log: list[tuple[str, str, str | None]] = []  # method, url without query, Authorization

    def handler(self, request: httpx.Request) -> httpx.Response:
        body = request.read()
        auth = request.headers.get("authorization")
        self.log.append((request.method, f"{request.url.scheme}://{request.url.host}{request.url.path}", auth))
        host = request.url.host
        if host == "auth.example":
            return self._token(request, auth)
        if host == "storage.example":
            return self._storage(request, body)
        assert host == "reg.example"
        if auth is None or auth.removeprefix("Bearer ") not in self.valid_tokens:
            return httpx.Response(401, headers={"WWW-Authenticate": 'Bearer realm="https://auth.example/token",'
                                                'service="reg.example",scope="repository:x:pull"'},
                                  json={"errors": [{"code": "UNAUTHORIZED", "message": "authentication required"}]})
        path = request.url.path
        if m := re.fullmatch(r"/v2/(.+)/blobs/(sha256:[0-9a-f]{64})", path):
            return httpx.Response(200 if m.group(2) in self.blobs else 404)
        if re.fullmatch(r"/v2/(.+)/blobs/uploads/", path) and request.method == "POST":
            upload = uuid.uuid4().hex
            self.uploads[upload] = bytearray()
            return httpx.Response(202, headers={"Location": f"https://storage.example/upload/{upload}?sig=s1"})
        if m := re.fullmatch(r"/v2/(.+)/manifests/(.+)", path):
            self.manifests[m.group(2)] = body
            digest = "sha256:" + hashlib.sha256(body).hexdigest()
            return httpx.Response(201, headers={"Docker-Content-Digest": digest})
        if path == "/v2/":
            return httpx.Response(200)
        return httpx.Response(404)

    def _token(self, request: httpx.Request, auth: str | None) -> httpx.Response:
        expected = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        if auth != expected:
            return httpx.Response(401, json={"details": "incorrect username or password"})
        assert request.url.params["scope"].endswith(":pull,push") and request.url.params["service"] == "reg.example"
        self.issued += 1
        token = f"token-{self.issued}"
        self.valid_tokens.add(token)
        return httpx.Response(200, json={"token": token, "expires_in": 300})

    def _storage(self, request: httpx.Request, body: bytes) -> httpx.Response:
        upload = request.url.path.rsplit("/", 1)[1]
        data = self.uploads[upload]
        if request.method == "DELETE":
            del self.uploads[upload]
            return httpx.Response(204)
        if request.method == "PATCH":
            start, end = map(int, request.headers["content-range"].split("-"))
            assert start == len(data) and end == start + len(body) - 1
            data += body
            return httpx.Response(202, headers={"Location": f"/upload/{upload}?sig=s{len(data)}",
                                                "Range": f"0-{len(data) - 1}"})
        assert request.method == "PUT"
        data += body
        digest = request.url.params["digest"]
        if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
            return httpx.Response(400, json={"errors": [{"code": "DIGEST_INVALID", "message": "digest mismatch"}]})
        self.blobs[digest] = bytes(data)
        del self.uploads[upload]
        return httpx.Response(201, headers={"Docker-Content-Digest": digest})


def _client(reg: TokenRegistry, **kw: object) -> RegistryClient:
    kw.setdefault("username", USER)
    kw.setdefault("password", PASSWORD)
    return RegistryClient("reg.example", transport=httpx.MockTransport(reg.handler), sleep=lambda s: None,
                          **kw)  # type: ignore[arg-type]


def _checkpoint_tar() -> bytes:
    buf = io.BytesIO()
    spec = {"annotations": {"io.container.manager": "cri-o", "io.kubernetes.cri-o.Metadata": '{"name":"app"}',
                            "io.kubernetes.pod.name": "app-0", "io.kubernetes.pod.namespace": "prod"}}  # fmt: skip
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in (("checkpoint/pages-1.img", bytes(range(256)) * 1000),
                           ("spec.dump", json.dumps(spec).encode()),
                           ("config.dump", b'{"rootfsImageName": "docker.io/library/app:1"}')):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _archive(tar: bytes) -> Archive:
    now = datetime(2026, 5, 6, 7, 8, 9, tzinfo=UTC)
    return Archive(id="feedc0de00000001", state=COMMITTED, policy="p", backend="b", key="k", node="node-1",
                   namespace="prod", pod="app-0", workload="statefulset/app", container="app", image="app:1",
                   checkpoint_time=now, created_at=now, tar_size=len(tar), tar_sha256=hashlib.sha256(tar).hexdigest())


@pytest.mark.parametrize("chunk_size", [0, 64 << 10])
def test_push_with_bearer_tokens_never_leaks_credentials_to_another_origin(chunk_size: int) -> None:
    reg = TokenRegistry()
    tar = _checkpoint_tar()
    archive = _archive(tar)
    scanner = metadata_scanner(archive)
    ref = ImageRef.parse("reg.example/dr/app:restore")
    with _client(reg) as client:
        result = push_checkpoint_image(
            client, ref, archive, ScanningReader(io.BytesIO(tar), scanner),
            lambda: oci.build_image(archive, checkpoint_info(scanner.files, archive)), chunk_size=chunk_size,
        )
    assert reg.blobs[f"sha256:{archive.tar_sha256}"] == tar
    manifest = json.loads(reg.manifests["restore"])
    assert manifest["annotations"][oci.CRIO_CHECKPOINT_NAME] == "app"
    assert manifest["annotations"]["org.criu.checkpoint.rootfsImageName"] == "docker.io/library/app:1"
    assert result.pinned == f"reg.example/dr/app@{oci.sha256_digest(reg.manifests['restore'])}"
    patches = [e for e in reg.log if e[0] == "PATCH"]
    assert len(patches) == (0 if chunk_size == 0 else -(-len(tar) // chunk_size))
    # the token service got the password; the storage origin got nothing; the registry got tokens
    for method, url, auth in reg.log:
        if url.startswith("https://storage.example"):
            assert auth is None, (method, url)
        elif url.startswith("https://reg.example") and auth is not None:
            assert auth.startswith("Bearer token-")
    assert reg.issued == 1  # one token, reused


def test_an_expired_token_is_renewed_once() -> None:
    reg = TokenRegistry()
    with _client(reg) as client:
        assert client.blob_exists("dr/app", "sha256:" + "0" * 64) is False
        reg.valid_tokens.clear()  # the registry forgets the token (expiry, key rotation)
        digest = client.put_manifest("dr/app", "v1", b'{"schemaVersion":2}', oci.MEDIA_MANIFEST)
    assert reg.issued == 2 and digest == oci.sha256_digest(b'{"schemaVersion":2}')


def test_wrong_credentials_are_an_auth_error_without_the_secret() -> None:
    reg = TokenRegistry()
    with _client(reg, password="nope-" + PASSWORD) as client, pytest.raises(StorageAuthError) as exc:
        client.blob_exists("dr/app", "sha256:" + "0" * 64)
    assert "refused the credentials of 'robot'" in str(exc.value) and PASSWORD not in str(exc.value)
    assert exc.value.exit_code == 6


def test_a_source_failing_verification_never_completes_the_blob() -> None:
    reg = TokenRegistry()
    data = b"z" * 300_000

    class Verifying(io.BytesIO):
        def read(self, n: int = -1) -> bytes:
            chunk = super().read(n)
            if not chunk:
                raise IntegrityError("archive feedc0de: does not match the catalog: tar SHA-256 differs")
            return chunk

    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    for chunk_size in (0, 100_000):
        with _client(reg) as client, pytest.raises(IntegrityError, match="feedc0de"):
            client.upload_blob("dr/app", digest, len(data), Verifying(data), chunk_size=chunk_size)
    assert reg.blobs == {} and reg.uploads == {}  # nothing stored, the sessions cancelled
    assert not [e for e in reg.log if e[0] == "PUT"]


def test_image_references_and_challenges() -> None:
    ref = ImageRef.parse("registry.example.com:5000/team/app:v1.2")
    assert (ref.registry, ref.repository, ref.tag, ref.api_host) == ("registry.example.com:5000", "team/app", "v1.2",
                                                                     "registry.example.com:5000")
    hub = ImageRef.parse("nginx")
    assert (hub.registry, hub.repository, hub.tag, hub.api_host) == ("docker.io", "library/nginx", None,
                                                                     "registry-1.docker.io")
    assert str(ImageRef.parse("localhost/a/b:c")) == "localhost/a/b:c"
    for bad in ("UPPER/case", "host:5000/repo:", "repo@sha256:abc", "a//b"):
        with pytest.raises(InvalidInput, match=re.escape(repr(bad))):
            ImageRef.parse(bad)
    challenge = parse_challenge(['Bearer realm="https://auth.example/token",service="reg",scope="repository:a:pull"'])
    assert challenge is not None and (challenge.scheme, challenge.realm, challenge.service) == (
        "bearer", "https://auth.example/token", "reg")
    basic = parse_challenge(['Basic realm="x"'])
    assert basic is not None and basic.scheme == "basic"
    assert parse_challenge(["Negotiate"]) is None
