"""Storage backends. :func:`open_backend` builds one from its config section, wrapped for
retries; see :mod:`backupd.backends.base` for the contract every backend meets."""

from __future__ import annotations

from backupd.backends.base import Backend, ObjectInfo
from backupd.config import BackendConfig, FilesystemBackendConfig, S3BackendConfig

__all__ = ["Backend", "ObjectInfo", "open_backend", "open_backends"]


def open_backend(cfg: BackendConfig, *, retries: bool = True, faults: str | None = None) -> Backend:
    """``faults``: a JSON fault list (see :func:`backupd.backends.wrappers.faults_from_json`),
    injected between the backend and the retry wrapper -- for crash tests only."""
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
    if faults:
        from backupd.backends.wrappers import FaultInjectingBackend, faults_from_json

        backend = FaultInjectingBackend(backend, faults_from_json(faults))
    if retries:
        from backupd.backends.wrappers import RetryingBackend

        backend = RetryingBackend(backend)
    return backend


def open_backends(configs: list[BackendConfig], *, faults: str | None = None) -> dict[str, Backend]:
    return {cfg.name: open_backend(cfg, faults=faults) for cfg in configs}
