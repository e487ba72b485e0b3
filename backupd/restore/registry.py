"""A client for the OCI distribution API, just enough to push a checkpoint image.

Push order: the layer (``HEAD`` -- already there? -- else a cross-repository ``mount`` from a
repository named by the caller, else an upload: ``POST`` a session, then one streamed ``PUT``
or, with a chunk size, ``PATCH`` chunks and a closing ``PUT ?digest=``), then the config blob,
then the manifest ``PUT`` under the tag. The layer is streamed from the backend: memory use does
not depend on the archive's size, and the last chunk is held back until the source's end-of-
stream check passed, so a registry never completes a blob from bytes that failed verification
(the registry also checks the digest given up front).

Authentication follows the registry's ``WWW-Authenticate`` challenge on ``GET /v2/``: ``Basic``
(credentials sent with every request to the registry's own origin) or ``Bearer`` (a token from
the challenge's realm for ``repository:<repo>:pull,push``, renewed before it expires and once on
a 401). Credentials and tokens are never sent to another origin (an upload ``Location`` may point
elsewhere), never logged and never put in messages.

TLS is always verified (``ca_file`` adds a private CA). ``insecure=True`` -- only from the
explicit ``--insecure-registry`` flag -- accepts an unverified certificate or plain HTTP, as
``skopeo --tls-verify=false`` does.

httpx exceptions and registry error responses are translated here, once, into backupd errors:
a registry is a storage destination, so its failures are storage errors (exit 6), a digest the
registry rejects is an integrity error (exit 7) and a malformed reference is invalid input.

One module over 500 lines on purpose: the push, its two authentication schemes and the one
place their httpx errors are translated are one client with one edge; no other module uses
any part of it alone.
"""

from __future__ import annotations

import base64
import contextlib
import io
import re
import ssl
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import structlog

from backupd import __version__, retry, tls
from backupd.backends.base import Readable
from backupd.errors import (
    BackupdError,
    ConfigError,
    IntegrityError,
    InvalidInput,
    StorageAuthError,
    StorageError,
    StorageNotFound,
    StorageUnavailable,
)
from backupd.model import Archive
from backupd.restore import oci
from backupd.storage.read import drain

log = structlog.get_logger("backupd.registry")

CHUNK = 1 << 20
DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPOSITORY = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_TAG = re.compile(r"^[\w][\w.-]{0,127}$")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_HOST = re.compile(
    r"^(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*|\[[0-9A-Fa-f:.]+\])"
    r"(?::[0-9]{1,5})?$"
)
_CHALLENGE_PARAM = re.compile(r'([A-Za-z_]+)=(?:"((?:[^"\\]|\\.)*)"|([^,\s]*))')


@dataclass(frozen=True)
class ImageRef:
    """``[registry/]repository[:tag][@digest]`` as docker and skopeo read it."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @classmethod
    def parse(cls, text: str) -> ImageRef:
        bad = f"--image {text!r}"
        name, at, digest = text.partition("@")
        if at and not _DIGEST.match(digest):
            raise InvalidInput(f"{bad}: {digest!r} is not a sha256:<64 hex> digest")
        tag = None
        slash = name.rfind("/")
        colon = name.rfind(":")
        if colon > slash:
            name, tag = name[:colon], name[colon + 1 :]
            if not _TAG.match(tag):
                raise InvalidInput(f"{bad}: {tag!r} is not a valid tag (letters, digits, '_', '.', '-'; at most 128)")
        first, sep, rest = name.partition("/")
        if sep and ("." in first or ":" in first or first == "localhost"):
            registry, repository = first, rest
            if not _HOST.match(registry):
                raise InvalidInput(f"{bad}: {registry!r} is not a registry host[:port]")
        else:
            registry, repository = DOCKER_HUB, name
            if "/" not in repository:
                repository = f"library/{repository}"
        if not _REPOSITORY.match(repository):
            raise InvalidInput(f"{bad}: {repository!r} is not a valid repository name (lower-case letters, digits, "
                               "separators '.', '_', '-', '/')")
        return cls(registry, repository, tag, digest or None)

    @property
    def api_host(self) -> str:
        return DOCKER_HUB_API if self.registry == DOCKER_HUB else self.registry

    def with_tag(self, tag: str) -> ImageRef:
        return ImageRef(self.registry, self.repository, tag, None)

    def pinned(self, digest: str) -> str:
        """``registry/repository@digest``: what a Pod should run (immutable)."""
        return f"{self.registry}/{self.repository}@{digest}"

    def __str__(self) -> str:
        out = f"{self.registry}/{self.repository}"
        if self.tag:
            out += f":{self.tag}"
        if self.digest:
            out += f"@{self.digest}"
        return out


@dataclass(frozen=True)
class _Challenge:
    scheme: str  # "basic" | "bearer"
    realm: str = ""
    service: str = ""


def parse_challenge(headers: Iterable[str]) -> _Challenge | None:
    """The first Bearer or Basic challenge of ``WWW-Authenticate`` header values."""
    for value in headers:
        scheme, _, params = value.strip().partition(" ")
        found = {m.group(1).lower(): (m.group(2) if m.group(2) is not None else m.group(3))
                 for m in _CHALLENGE_PARAM.finditer(params)}  # fmt: skip
        if scheme.lower() == "bearer":
            return _Challenge("bearer", found.get("realm", ""), found.get("service", ""))
        if scheme.lower() == "basic":
            return _Challenge("basic", found.get("realm", ""))
    return None


def _redact(url: httpx.URL | str) -> str:
    """A URL for messages: upload session state in the query is noise (and opaque state)."""
    u = httpx.URL(str(url))
    return str(u.copy_with(query=None, fragment=None))


def _registry_errors(resp: httpx.Response) -> tuple[set[str], str]:
    try:
        body = resp.json()
        errors = body.get("errors") if isinstance(body, dict) else None
    except ValueError:
        errors = None
    codes: set[str] = set()
    parts: list[str] = []
    for e in errors if isinstance(errors, list) else ():
        if isinstance(e, dict):
            code, message = str(e.get("code", "")), str(e.get("message", ""))[:200]
            codes.add(code)
            parts.append(f"{code}: {message}" if message else code)
    return codes, "; ".join(parts) or f"HTTP {resp.status_code} {resp.reason_phrase}".strip()


class RegistryClient:
    """One registry (``host[:port]``); see the module docstring. Use as a context manager."""

    def __init__(
        self,
        host: str,
        *,
        username: str | None = None,
        password: str | None = None,
        insecure: bool = False,
        ca_file: str | Path | None = None,
        timeout: float = 120.0,
        transport: httpx.BaseTransport | None = None,
        backoff: retry.Backoff = retry.Backoff(attempts=3, base_delay=0.5, max_delay=5.0),
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if password and not username:
            raise InvalidInput("a registry password was given without --registry-username")
        self.host = host
        self.insecure = insecure
        self._username = username
        self._password = password
        self._backoff = backoff
        self._sleep = sleep
        verify: ssl.SSLContext | bool = True
        # `insecure` comes only from `restore --insecure-registry`, typed by the operator for a
        # test or in-cluster registry without a certificate; no config key or variable leads here.
        if insecure:
            verify = False
        elif ca_file is not None:
            try:
                verify = tls.client_context(ca_file)
            except OSError as exc:  # ssl.SSLError is an OSError
                raise ConfigError(f"--registry-ca-file {str(ca_file)!r}: not a usable CA bundle ({exc})") from None
        self._http = httpx.Client(
            timeout=httpx.Timeout(timeout, connect=20.0), verify=verify, transport=transport,
            follow_redirects=False, headers={"User-Agent": f"backupd/{__version__}"},
        )
        self._base: httpx.URL | None = None
        self._challenge: _Challenge | None = None
        self._tokens: dict[str, tuple[str, float]] = {}

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def __repr__(self) -> str:
        return f"RegistryClient({self.host!r}, user={self._username!r}, insecure={self.insecure})"

    # -- connection and authentication ---------------------------------------------------------

    @property
    def base(self) -> httpx.URL:
        if self._base is None:
            self._ping()
        assert self._base is not None
        return self._base

    def _ping(self) -> None:
        schemes = ("https", "http") if self.insecure else ("https",)
        for scheme in schemes:
            url = httpx.URL(f"{scheme}://{self.host}/v2/")
            try:
                resp = self._http.get(url)
            except httpx.TransportError as exc:
                if scheme == "https" and len(schemes) > 1 and isinstance(exc, httpx.ConnectError):
                    continue  # --insecure-registry: a plain-HTTP registry refuses the TLS handshake
                raise self._transport_error(exc, f"registry {self.host}") from None
            break
        if resp.status_code == 401:
            self._challenge = parse_challenge(resp.headers.get_list("www-authenticate"))
            if self._challenge is None:
                raise StorageAuthError(f"registry {self.host} wants authentication of a kind backupd does not speak "
                                       "(only Basic and Bearer tokens)")
        elif resp.status_code == 404:
            raise StorageError(f"{self.host} is not an OCI registry (no /v2/ API)")
        elif resp.status_code != 200:
            raise self._status_error(resp, f"registry {self.host}")
        self._base = url.copy_with(path="/")
        if self._challenge and self._challenge.scheme == "basic" and not self._username:
            raise StorageAuthError(self._need_credentials())

    def _need_credentials(self) -> str:
        return (f"registry {self.host} requires credentials: give --registry-username and the password in "
                "--registry-password-file or $BACKUPD_REGISTRY_PASSWORD")

    def _same_origin(self, url: httpx.URL) -> bool:
        base = self.base
        return (url.scheme, url.host, url.port) == (base.scheme, base.host, base.port)

    def _auth_headers(self, url: httpx.URL, repository: str) -> dict[str, str]:
        if self._challenge is None or not self._same_origin(url):
            return {}
        if self._challenge.scheme == "basic":
            raw = f"{self._username}:{self._password or ''}".encode()
            return {"Authorization": "Basic " + base64.b64encode(raw).decode()}
        return {"Authorization": f"Bearer {self._token(repository)}"}

    def _token(self, repository: str, *, renew: bool = False) -> str:
        cached = self._tokens.get(repository)
        if cached and not renew and time.monotonic() < cached[1]:
            return cached[0]
        assert self._challenge is not None
        realm = httpx.URL(self._challenge.realm) if self._challenge.realm else None
        if realm is None or realm.scheme not in ("https", "http"):
            raise StorageAuthError(f"registry {self.host} asks for a bearer token without a usable realm")
        if realm.scheme != "https" and not self.insecure:
            raise StorageAuthError(f"registry {self.host} sends credentials to a plain-HTTP token service "
                                   f"({_redact(realm)}); refusing without --insecure-registry")
        params = {"scope": f"repository:{repository}:pull,push"}
        if self._challenge.service:
            params["service"] = self._challenge.service
        if self._username:
            params["account"] = self._username
        auth = (self._username, self._password or "") if self._username else None
        what = f"token service of registry {self.host}"
        try:
            resp = self._http.get(realm, params=params, auth=auth)
        except httpx.HTTPError as exc:
            raise self._transport_error(exc, what) from None
        if resp.status_code in (401, 403):
            raise StorageAuthError(
                f"{what} refused the credentials of {self._username!r}" if self._username else self._need_credentials()
            )
        if resp.status_code != 200:
            raise self._status_error(resp, what)
        try:
            body = resp.json()
            token = body.get("token") or body.get("access_token")
            expires_in = float(body.get("expires_in") or 60)
        except (ValueError, AttributeError, TypeError):
            token, expires_in = None, 0.0
        if not isinstance(token, str) or not token:
            raise StorageError(f"{what} answered without a token")
        # Renew a little early: a chunk that starts with a token about to expire would fail.
        self._tokens[repository] = (token, time.monotonic() + max(5.0, expires_in - 15.0))
        return token

    # -- requests -----------------------------------------------------------------------------

    def _url(self, path: str) -> httpx.URL:
        return self.base.join(path)

    def _send(
        self, method: str, url: httpx.URL, repository: str, what: str, *, content: Any = None,
        headers: dict[str, str] | None = None, replayable: bool = True,
    ) -> httpx.Response:
        for attempt in (1, 2):
            request_headers = {**(headers or {}), **self._auth_headers(url, repository)}
            try:
                # Query parameters live in ``url``: an upload Location carries session state there.
                resp = self._http.request(method, url, content=content, headers=request_headers)
            except httpx.HTTPError as exc:
                raise self._transport_error(exc, what) from None
            renewable = self._challenge is not None and self._challenge.scheme == "bearer"
            if resp.status_code == 401 and attempt == 1 and replayable and renewable:
                self._token(repository, renew=True)
                continue
            return resp
        return resp

    def _small(self, method: str, url: httpx.URL, repository: str, what: str, ok: tuple[int, ...],
               **kwargs: Any) -> httpx.Response:
        """A request without a streamed body: retried while the failure is transient."""

        def attempt() -> httpx.Response:
            resp = self._send(method, url, repository, what, **kwargs)
            if resp.status_code not in ok:
                raise self._status_error(resp, what)
            return resp

        return retry.call(attempt, self._backoff, sleep=self._sleep)

    def _transport_error(self, exc: httpx.HTTPError, what: str) -> BackupdError:
        text = str(exc) or type(exc).__name__
        if isinstance(exc, httpx.ConnectError) and ("CERTIFICATE" in text.upper() or "SSL" in text.upper()):
            return StorageError(f"{what}: the TLS handshake failed ({text[:200]}); if the registry's certificate is "
                                "from a private CA give it with --registry-ca-file; for a plain-HTTP test registry "
                                "only, --insecure-registry")
        if isinstance(exc, httpx.TimeoutException):
            return StorageUnavailable(f"{what}: timed out ({type(exc).__name__})")
        if isinstance(exc, httpx.TransportError):
            return StorageUnavailable(f"{what}: {text[:200]}")
        return StorageError(f"{what}: {text[:200]}")

    def _status_error(self, resp: httpx.Response, what: str) -> BackupdError:
        codes, detail = _registry_errors(resp)
        status = resp.status_code
        if status == 401:
            if self._username:
                return StorageAuthError(f"{what}: unauthorized ({detail}); check --registry-username and the password")
            return StorageAuthError(f"{what}: unauthorized ({detail}); " + self._need_credentials())
        if status == 403:
            return StorageAuthError(f"{what}: denied ({detail}); the registry user may not push to this repository")
        if codes & {"DIGEST_INVALID", "SIZE_INVALID"}:
            return IntegrityError(f"{what}: the registry rejected the content ({detail})")
        if status == 404:
            return StorageNotFound(f"{what}: not found ({detail})")
        if status == 429 or status >= 500:
            return StorageUnavailable(f"{what}: {detail}")
        return StorageError(f"{what}: {detail}")

    # -- the API ------------------------------------------------------------------------------

    def blob_exists(self, repository: str, digest: str) -> bool:
        what = f"checking blob {digest[:19]} in {self.host}/{repository}"
        resp = self._small("HEAD", self._url(f"/v2/{repository}/blobs/{digest}"), repository, what, (200, 404))
        return resp.status_code == 200

    def mount_blob(self, repository: str, digest: str, from_repository: str) -> bool:
        """Cross-repository mount; False (and the opened session cancelled) when not possible."""
        what = f"mounting blob {digest[:19]} from {from_repository} into {self.host}/{repository}"
        url = self._url(f"/v2/{repository}/blobs/uploads/")
        url = url.copy_merge_params({"mount": digest, "from": from_repository})
        resp = self._small("POST", url, repository, what, (201, 202))
        if resp.status_code == 201:
            return True
        location = resp.headers.get("location")
        if location:
            self._cancel(repository, resp.request.url.join(location))
        return False

    def _start_upload(self, repository: str, what: str) -> httpx.URL:
        resp = self._small("POST", self._url(f"/v2/{repository}/blobs/uploads/"), repository, what, (202,))
        return self._location(resp, what)

    def _location(self, resp: httpx.Response, what: str) -> httpx.URL:
        location = resp.headers.get("location")
        if not location:
            raise StorageError(f"{what}: the registry answered {resp.status_code} without a Location")
        return resp.request.url.join(location)  # relative to the request (RFC 9110), not to /v2/

    def _cancel(self, repository: str, location: httpx.URL) -> None:
        with contextlib.suppress(BackupdError):
            self._send("DELETE", location, repository, "cancelling an upload")

    def upload_blob(self, repository: str, digest: str, size: int, source: Readable, *, chunk_size: int = 0) -> None:
        """Upload ``size`` bytes from ``source`` as blob ``digest``.

        ``chunk_size`` 0 (or at least ``size``) streams one ``PUT``; otherwise ``PATCH`` requests of
        ``chunk_size`` bytes each (for registries or proxies that limit a request's size). The
        source must end exactly after ``size`` bytes; its end is read before the blob is
        completed, so a verifying source fails the upload rather than the registry storing it.
        """
        what = f"uploading blob {digest[:19]} ({size} bytes) to {self.host}/{repository}"
        location = self._start_upload(repository, what)
        try:
            octet = {"Content-Type": "application/octet-stream"}
            if chunk_size <= 0 or size <= chunk_size:
                resp = self._send("PUT", location.copy_merge_params({"digest": digest}), repository, what,
                                  content=_exactly(source, size, what, final=True),
                                  headers={**octet, "Content-Length": str(size)}, replayable=False)
            else:
                offset = 0
                while offset < size:
                    n = min(chunk_size, size - offset)
                    resp = self._send("PATCH", location, repository, what,
                                      content=_exactly(source, n, what, final=False),
                                      headers={**octet, "Content-Length": str(n),
                                               "Content-Range": f"{offset}-{offset + n - 1}"},
                                      replayable=False)  # fmt: skip
                    if resp.status_code != 202:
                        raise self._status_error(resp, what)
                    location = self._location(resp, what)
                    offset += n
                if source.read(CHUNK):  # the end-of-stream read is where a verifying source checks
                    raise IntegrityError(f"{what}: the source is longer than {size} bytes")
                resp = self._send("PUT", location.copy_merge_params({"digest": digest}), repository, what,
                                  content=b"", headers={"Content-Length": "0"})
            if resp.status_code != 201:
                raise self._status_error(resp, what)
        except BaseException:
            self._cancel(repository, location)
            raise
        stored = resp.headers.get("docker-content-digest")
        if stored and stored != digest:
            raise IntegrityError(f"{what}: the registry stored digest {stored}")

    def push_bytes(self, repository: str, data: bytes, digest: str) -> None:
        if not self.blob_exists(repository, digest):
            self.upload_blob(repository, digest, len(data), io.BytesIO(data))

    def put_manifest(self, repository: str, reference: str, data: bytes, media_type: str) -> str:
        """PUT a manifest under a tag; returns its digest."""
        digest = oci.sha256_digest(data)
        what = f"pushing manifest {self.host}/{repository}:{reference}"
        resp = self._small("PUT", self._url(f"/v2/{repository}/manifests/{reference}"), repository, what, (201,),
                           content=data, headers={"Content-Type": media_type})
        stored = resp.headers.get("docker-content-digest")
        if stored and stored != digest:
            raise IntegrityError(f"{what}: the registry computed digest {stored}, expected {digest}")
        return digest


def _exactly(source: Readable, size: int, what: str, *, final: bool) -> Iterator[bytes]:
    """Exactly ``size`` bytes of ``source``. With ``final``, the last chunk is held back until the
    source's end-of-stream read returned (a verifying source raises there)."""
    sent = 0
    held: bytes | None = None
    while sent < size:
        data = source.read(min(CHUNK, size - sent))
        if not data:
            raise IntegrityError(f"{what}: the source ended after {sent} of {size} bytes")
        sent += len(data)
        if held is not None:
            yield held
        held = data
        if not final:
            yield held
            held = None
    if final and source.read(CHUNK):
        raise IntegrityError(f"{what}: the source is longer than {size} bytes")
    if held is not None:
        yield held


@dataclass(frozen=True)
class PushResult:
    ref: ImageRef  # with its tag
    manifest_digest: str
    layer: str  # uploaded | exists | mounted

    @property
    def pinned(self) -> str:
        return self.ref.pinned(self.manifest_digest)


def push_checkpoint_image(
    client: RegistryClient,
    ref: ImageRef,
    archive: Archive,
    layer_source: Readable,
    finish: Callable[[], oci.CheckpointImage],
    *,
    mount_from: Iterable[str] = (),
    chunk_size: int = 0,
) -> PushResult:
    """Push the checkpoint image of ``archive`` to ``ref`` (which has a tag).

    ``layer_source`` is the verified tar stream; it is read to its end even when the layer is
    already in the registry (so the metadata ``finish()`` reads from the same pass is complete,
    and the archive is verified all the same).
    """
    assert ref.tag
    repository = ref.repository
    layer = oci.layer_descriptor(archive)
    if client.blob_exists(repository, layer.digest):
        how = "exists"
        drain(layer_source)
    elif any(client.mount_blob(repository, layer.digest, src) for src in mount_from):
        how = "mounted"
        drain(layer_source)
    else:
        how = "uploaded"
        client.upload_blob(repository, layer.digest, layer.size, layer_source, chunk_size=chunk_size)
    image = finish()
    client.push_bytes(repository, image.config, image.config_descriptor.digest)
    digest = client.put_manifest(repository, ref.tag, image.manifest, oci.MEDIA_MANIFEST)
    log.info("image_pushed", registry=ref.registry, repository=repository, tag=ref.tag, digest=digest, layer=how,
             archive_id=archive.id)
    return PushResult(ref, digest, how)
