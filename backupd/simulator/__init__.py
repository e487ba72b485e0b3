"""The node simulator: a kubelet stand-in for the demo, ``backupd simulate-node`` and the tests.

Modules, one concept each:

* :mod:`~backupd.simulator.pki` — CA, kubelet serving cert, client certs (``generate_pki``);
* :mod:`~backupd.simulator.topology` — the pods a node runs (spec file, default demo node);
* :mod:`~backupd.simulator.archive` — CRI-O-layout checkpoint archives, synthetic CRIU images;
* :mod:`~backupd.simulator.metadata` — their ``config.dump`` and ``spec.dump``, Go time formats;
* :mod:`~backupd.simulator.criu` — real CRIU mode: counting processes, dump, restore;
* :mod:`~backupd.simulator.server` — the HTTPS kubelet API with faults and a request log;
* :mod:`~backupd.simulator.cli` — the ``simulate-node`` click command.
"""

from backupd.simulator.pki import ClientCert, Pki, generate_pki
from backupd.simulator.server import DEFAULT_MEMORY_BYTES, Fault, NodeSimulator, RequestRecord, load_faults
from backupd.simulator.topology import ContainerSpec, PodSpec, Topology, default_topology, load_topology

__all__ = [
    "ClientCert",
    "ContainerSpec",
    "DEFAULT_MEMORY_BYTES",
    "Fault",
    "NodeSimulator",
    "Pki",
    "PodSpec",
    "RequestRecord",
    "Topology",
    "default_topology",
    "generate_pki",
    "load_faults",
    "load_topology",
]
