"""The composition root: builds catalog, backends, kubelet client and workers from a Config.

Everything is created lazily, so a command only touches what it needs (``policy list`` never
opens a TLS connection; ``retention simulate`` never opens the database).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from backupd.backends import Backend, open_backends
from backupd.catalog import Catalog
from backupd.config import Config
from backupd.kubelet import KubeletClient
from backupd.node import CheckpointDir
from backupd.pipeline import Pipeline
from backupd.policy import Policy
from backupd.scheduler import CycleResult, Daemon, Runner


class App:
    def __init__(self, config: Config, *, after_cycle: Callable[[Policy, CycleResult], None] | None = None) -> None:
        self.config = config
        self._after_cycle = after_cycle

    @functools.cached_property
    def catalog(self) -> Catalog:
        return Catalog.open(self.config.database.resolved_url())

    @functools.cached_property
    def backends(self) -> dict[str, Backend]:
        return open_backends(self.config.backends)

    @functools.cached_property
    def kubelet(self) -> KubeletClient:
        return KubeletClient(self.config.kubelet)

    @property
    def node(self) -> str:
        return self.config.kubelet.node()

    @functools.cached_property
    def pipeline(self) -> Pipeline:
        return Pipeline(
            catalog=self.catalog,
            backends=self.backends,
            kubelet=self.kubelet,
            checkpoint_dir=CheckpointDir(self.config.kubelet.checkpoint_dir),
            node=self.node,
            min_free_space=self.config.daemon.min_free_space,
        )

    @functools.cached_property
    def runner(self) -> Runner:
        return Runner(
            catalog=self.catalog,
            kubelet=self.kubelet,
            pipeline=self.pipeline,
            max_concurrent=self.config.daemon.max_concurrent_checkpoints,
            after_cycle=self._after_cycle,
        )

    def daemon(self, *, policy_poll_seconds: float = 5.0) -> Daemon:
        return Daemon(self.runner, policy_poll_seconds=policy_poll_seconds)

    def close(self) -> None:
        for name in ("runner", "kubelet", "catalog"):
            if name in self.__dict__:
                self.__dict__[name].close()
