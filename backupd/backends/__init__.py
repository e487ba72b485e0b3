"""Storage backends. :func:`open_backend` builds one from its config section, wrapped for
retries, :func:`open_backends` all of them, each when first used; see
:mod:`backupd.backends.base` for the contract every backend meets."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, MutableMapping

from backupd.backends.base import Backend, ObjectInfo
from backupd.config import BackendConfig, FilesystemBackendConfig, S3BackendConfig

__all__ = ["Backend", "BackendWrapper", "Backends", "ObjectInfo", "open_backend", "open_backends"]

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
            ca_bundle=cfg.ca_bundle,
        )
    else:  # pragma: no cover - the config model admits no other type
        raise TypeError(type(cfg))
    if wrap is not None:
        backend = wrap(backend)
    if retries:
        from backupd.backends.wrappers import RetryingBackend

        backend = RetryingBackend(backend)
    return backend


class Backends(MutableMapping[str, Backend]):
    """The configured backends by name, each opened (its credentials read, its client built)
    the first time it is looked up: a command that reads one backend does not need another's
    credentials, and one that reads none opens none. Thread-safe; setting a name replaces
    (or adds) the backend under it."""

    def __init__(self, configs: list[BackendConfig], *, wrap: BackendWrapper | None = None) -> None:
        self._configs = {cfg.name: cfg for cfg in configs}
        self._wrap = wrap
        self._opened: dict[str, Backend] = {}
        self._lock = threading.Lock()

    def __getitem__(self, name: str) -> Backend:
        with self._lock:
            backend = self._opened.get(name)
            if backend is None:
                backend = self._opened[name] = open_backend(self._configs[name], wrap=self._wrap)
            return backend

    def __setitem__(self, name: str, backend: Backend) -> None:
        with self._lock:
            self._opened[name] = backend

    def __delitem__(self, name: str) -> None:
        with self._lock:
            if name not in self._configs and name not in self._opened:
                raise KeyError(name)
            self._configs.pop(name, None)
            self._opened.pop(name, None)

    def __iter__(self) -> Iterator[str]:
        return iter(list(dict.fromkeys([*self._configs, *self._opened])))

    def __len__(self) -> int:
        return len(self._configs.keys() | self._opened.keys())

    def __contains__(self, name: object) -> bool:  # without opening it
        return name in self._configs or name in self._opened

    def __repr__(self) -> str:
        return f"Backends({list(self)!r}, opened={sorted(self._opened)!r})"


def open_backends(configs: list[BackendConfig], *, wrap: BackendWrapper | None = None) -> Backends:
    """Every configured backend, each opened when first used (see :class:`Backends`)."""
    return Backends(configs, wrap=wrap)
