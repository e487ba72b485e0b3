"""Fixtures for the node simulator tests: one PKI per session, a fresh simulator per test."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from backupd.simulator import NodeSimulator, generate_pki
from backupd.simulator.pki import Pki


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return generate_pki(tmp_path_factory.mktemp("pki") / "pki")


@pytest.fixture
def make_sim(tmp_path: Path, pki: Pki):
    """Factory: ``make_sim(**kwargs)`` starts a NodeSimulator (stopped at teardown)."""
    sims: list[NodeSimulator] = []

    def make(**kwargs) -> NodeSimulator:
        kwargs.setdefault("pki", pki)
        kwargs.setdefault("memory_bytes", 256 << 10)
        sim = NodeSimulator(tmp_path / f"sim{len(sims)}", **kwargs)
        sims.append(sim)
        sim.start()
        return sim

    yield make
    for sim in sims:
        sim.stop()


@pytest.fixture
def sim(make_sim) -> NodeSimulator:
    return make_sim()


@pytest.fixture
def client(sim: NodeSimulator):
    with httpx.Client(base_url=sim.url, verify=sim.client_ssl_context(), timeout=30) as c:
        yield c


def pod_named(sim: NodeSimulator, prefix: str, namespace: str | None = None):
    for pod in sim.pods:
        if pod.name.startswith(prefix) and (namespace is None or pod.namespace == namespace):
            return pod
    raise LookupError(prefix)
