"""Storage backends. :func:`open_backend` builds one from its config section, wrapped for
retries; see :mod:`backupd.backends.base` for the contract every backend meets."""

from __future__ import annotations

from collections.abc import Callable

from backupd.backends.base import Backend, ObjectInfo
from backupd.config import BackendConfig, FilesystemBackendConfig, S3BackendConfig

__all__ = ["Backend", "BackendWrapper", "ObjectInfo", "open_backend", "open_backends"]

#: wraps a backend built from the config, beneath the retry wrapper (the test suite injects
#: faults there: a retry then sees them as it would see a real backend's)
BackendWrapper = Callable[[Backend], Backend]


def open_backend(cfg: BackendConfig, *, retries: bool = True, wrap: BackendWrapper | None = None) -> Backend:
    """The backend ``cfg`` describes, wrapped by ``wrap`` (if given), then for retries."""
    backend: Backend
    if isinstance(cfg, FilesystemBackendConfig):
        from backupd.backends.filesystem import FilesystemBackend

        backend = FilesystemBackend(cfg.name, cfg.path)
    elif isinstance(cfg, S3BackendConfig):
        from backupd.backends.s3 import S3Backend

        key_id, secret = cfg.credentials()
        backend = S3Backend(
            cfg.name, cfg.bucket, prefix=cfg.prefix, endpoint_url=cfg.endpoint_url, region=cfg.region,
            access_key_id=key_id, secret_access_key=secret, addressing_style=cfg.addressing_style,
            storage_class=cfg.storage_class, sse=cfg.sse, sse_kms_key_id=cfg.sse_kms_key_id,
            part_size=cfg.part_size, max_concurrency=cfg.max_concurrency,
            verify_tls=str(cfg.ca_bundle) if cfg.ca_bundle else True,
        )
    else:  # pragma: no cover - the config model admits no other type
        raise TypeError(type(cfg))
    if wrap is not None:
        backend = wrap(backend)
    if retries:
        from backupd.backends.wrappers import RetryingBackend

        backend = RetryingBackend(backend)
    return backend


def open_backends(configs: list[BackendConfig], *, wrap: BackendWrapper | None = None) -> dict[str, Backend]:
    return {cfg.name: open_backend(cfg, wrap=wrap) for cfg in configs}
