"""Choosing the archive to restore: by id (or unique prefix), or the newest committed one of a
workload's container (``--latest``), of one replica (``--pod``) where the workload has several.

The rest of a restore lives beside this: :mod:`backupd.storage.read` streams the archive back
checked against the catalog and its manifest, :mod:`backupd.restore.file`, :mod:`.oci` and
:mod:`.registry` write it somewhere, and :mod:`backupd.archive.metadata` reads what the
checkpoint says about itself from the bytes as they pass by.
"""

from __future__ import annotations

import structlog

from backupd.catalog.store import Catalog
from backupd.errors import InvalidInput, NotFound
from backupd.model import COMMITTED, KINDS, Archive, Workload

log = structlog.get_logger("backupd.restore")



def select_archive(
    catalog: Catalog,
    ref: str | None = None,
    *,
    latest: bool = False,
    namespace: str | None = None,
    workload: str | None = None,
    container: str | None = None,
    pod: str | None = None,
) -> Archive:
    """The committed archive to restore: ``ref`` (an id or unique prefix), or with ``latest`` the
    newest committed archive of ``namespace`` + ``workload`` + ``container`` (+ ``pod``).

    ``workload`` is ``kind/name`` (``deployment/web``), the layout segment (``deployment-web``)
    or a bare name when only one kind of workload has it. ``pod`` is a pod name or a replica
    (a StatefulSet pod, a DaemonSet pod's node). With ``latest``, archives of more than one
    replica (``db-0`` and ``db-1`` of a StatefulSet) are refused without ``pod``: each replica
    holds its own state, so "the newest" of them is not a recovery point of either. With
    ``ref``, any filter given must agree with the archive (a guard against restoring the wrong
    thing at 3 a.m.).
    """
    if ref and latest:
        raise InvalidInput("give an archive ID or --latest, not both")
    if not ref and not latest:
        raise InvalidInput(
            "which archive? give an archive ID (see `backupd list`) or --latest with --namespace, --workload "
            "and --container"
        )
    if ref:
        archive = catalog.get_archive(ref)
        if archive.state != COMMITTED:
            raise InvalidInput(f"archive {archive.id} is {archive.state}, not committed: only committed archives "
                               "can be restored (see `backupd list --all-states`)")
        for flag, wanted, actual in (("--namespace", namespace, archive.namespace),
                                     ("--container", container, archive.container)):
            if wanted is not None and wanted != actual:
                raise InvalidInput(f"archive {archive.id} is of {flag[2:]} {actual!r}, not {wanted!r}")
        if workload is not None and not _workload_matches(workload, archive.workload):
            raise InvalidInput(f"archive {archive.id} is of workload {archive.workload!r}, not {workload!r}")
        if pod is not None and pod not in (archive.pod, archive.replica):
            raise InvalidInput(f"archive {archive.id} is of pod {archive.pod!r}"
                               + (f" (replica {archive.replica!r})" if archive.replica else "") + f", not {pod!r}")
        return archive

    missing = [flag for flag, v in (("--namespace", namespace), ("--workload", workload),
                                    ("--container", container)) if not v]  # fmt: skip
    if missing:
        raise InvalidInput(f"--latest needs {', '.join(missing)} (the archive's namespace, workload and container)")
    assert workload is not None
    exact = _parse_workload(workload)
    archives = catalog.list_archives(namespace=namespace, container=container, pod_or_replica=pod,
                                     workload=str(exact) if exact else None)
    if exact is None:
        archives = [a for a in archives if a.workload.partition("/")[2] == workload]
        kinds = sorted({a.workload for a in archives})
        if len(kinds) > 1:
            raise InvalidInput(f"--workload {workload!r} is ambiguous in namespace {namespace!r}: "
                               f"{', '.join(kinds)}; give one of these")
    if not archives:
        of_pod = f" of pod {pod!r}" if pod is not None else ""
        raise NotFound(f"no committed archive of container {container!r}{of_pod} of workload {workload!r} in "
                       f"namespace {namespace!r} (see `backupd list --namespace {namespace}`)")
    replicas = sorted({a.replica for a in archives})
    if len(replicas) > 1 and pod is None:
        raise InvalidInput(f"--latest matches {len(replicas)} replicas of {archives[0].workload}: "
                           f"{', '.join(r or '(the whole workload)' for r in replicas)}; give --pod")
    return archives[-1]  # list_archives is oldest first


def _parse_workload(text: str) -> Workload | None:
    try:
        return Workload.parse(text)
    except ValueError:
        if "/" in text or text.partition("-")[0] in KINDS and "-" in text:
            raise InvalidInput(f"--workload {text!r}: expected kind/name such as deployment/web") from None
        return None


def _workload_matches(text: str, actual: str) -> bool:
    exact = _parse_workload(text)
    return str(exact) == actual if exact else actual.partition("/")[2] == text
