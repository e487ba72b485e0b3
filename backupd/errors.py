"""backupd's error hierarchy.

Foreign exceptions (httpx, botocore, OSError, SQLAlchemy) are translated into these classes
once, at the edge of the module that talks to the foreign library. Everything above that edge
only sees `BackupdError`s. Each class says two things:

* ``retryable`` -- whether trying the same operation again can help (a retry wrapper looks only
  at this flag);
* ``exit_code`` -- what the CLI exits with. Codes are public, documented in the README and never
  reused for another meaning.

Messages are written for an operator: what failed, the offending value, and what to do. They
must never contain a secret.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

# Exit codes: public contract (README "Exit codes"). Never renumber, never reuse.
EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_INVALID_INPUT = 2
EXIT_NOT_FOUND = 3
EXIT_CATALOG = 4
EXIT_KUBELET = 5
EXIT_STORAGE = 6
EXIT_INTEGRITY = 7
EXIT_RUNS_FAILED = 8
EXIT_BUSY = 9


# the userinfo of a URL, with or without its scheme: ``https://user:pw@``, ``//user@``
_URL_CREDENTIALS = re.compile(r"(?i)((?:\b[a-z][a-z0-9+.-]*:)?//)[^/\s@]+@")


def scrub(text: str) -> str:
    """Remove ``user:password@`` from URLs inside a message (a foreign error text may echo
    a URL with credentials; backupd's own messages never hold them)."""
    return _URL_CREDENTIALS.sub(r"\1***@", text)


def validation_problems(errors: Sequence[Mapping[str, Any]], where: str, *, limit: int = 200,
                        prefix: str | None = None) -> list[str]:
    """One ``where: field.path: what is wrong (got VALUE)`` line per error of a pydantic
    ``ValidationError.errors()`` list; values are shown truncated to ``limit`` characters.
    ``prefix`` is put in front of every field path (``spec`` for a spec validated alone)."""
    lines = []
    for err in errors:
        loc = [str(p) for p in err["loc"] if not str(p).startswith("function-")]
        path = ".".join([prefix, *loc] if prefix else loc)
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        elif err["type"] == "missing":
            msg = "required field is missing"
        elif "input" in err and not isinstance(err["input"], dict | list):
            shown = repr(err["input"])
            if shown not in msg:
                msg = f"{msg} (got {shown if len(shown) <= limit else shown[:limit] + '...'})"
        lines.append(f"{where}: {path or '(document)'}: {msg}")
    return lines


class BackupdError(Exception):
    exit_code = EXIT_INTERNAL
    retryable = False

    def __init__(self, message: str, *, retryable: bool | None = None) -> None:
        super().__init__(message)
        self.message = message
        if retryable is not None:
            self.retryable = retryable

    @property
    def kind(self) -> str:
        """Stable short name used in run records, logs and metrics."""
        return type(self).__name__

    def __str__(self) -> str:
        return self.message


# -- input -------------------------------------------------------------------------------


class InvalidInput(BackupdError):
    exit_code = EXIT_INVALID_INPUT


class ConfigError(InvalidInput):
    pass


class PolicyError(InvalidInput):
    pass


class NotFound(BackupdError):
    exit_code = EXIT_NOT_FOUND


# -- catalog -----------------------------------------------------------------------------


class CatalogError(BackupdError):
    exit_code = EXIT_CATALOG


class CatalogUnavailable(CatalogError):
    retryable = True


class SchemaOutdated(CatalogError):
    pass


class LeaseHeld(BackupdError):
    exit_code = EXIT_BUSY
    retryable = True


# -- kubelet -----------------------------------------------------------------------------


class KubeletError(BackupdError):
    exit_code = EXIT_KUBELET


class KubeletUnreachable(KubeletError):
    retryable = True


class KubeletTLSError(KubeletError):
    """The TLS handshake failed: wrong CA, expired or refused client certificate."""


class KubeletTimeout(KubeletError):
    retryable = True


class KubeletUnauthorized(KubeletError):
    """401: no or invalid credentials."""


class KubeletForbidden(KubeletError):
    """403: authenticated but RBAC does not allow the verb/subresource."""


class CheckpointApiDisabled(KubeletError):
    """Plain ``404 page not found``: the ContainerCheckpoint gate or debugging handlers are off."""


class TargetGone(KubeletError):
    """``pod does not exist`` / ``container X does not exist``: the target vanished."""


class CheckpointFailed(KubeletError):
    """500 ``checkpointing of ns/pod/ctr failed (...)``: the runtime or CRIU failed."""


class CheckpointUnsupported(CheckpointFailed):
    """The runtime cannot checkpoint at all (RPC unimplemented, C/R support disabled)."""


class UnsafeCheckpointPath(KubeletError):
    """The kubelet returned a path outside the checkpoint directory, or not a regular file."""


class KubeletProtocolError(KubeletError):
    """The kubelet answered something this client does not understand."""


# -- storage -----------------------------------------------------------------------------


class StorageError(BackupdError):
    exit_code = EXIT_STORAGE


class StorageUnavailable(StorageError):
    retryable = True


class StorageAuthError(StorageError):
    pass


class StorageNotFound(StorageError):
    """The bucket, directory or object does not exist."""


class ObjectExists(StorageError):
    """A create-only put found the key already taken."""


class BatchDeleteError(StorageError):
    """``delete_many`` could not delete some keys; ``failures`` maps each key to its error."""

    def __init__(self, message: str, failures: dict[str, BackupdError]) -> None:
        super().__init__(message, retryable=all(e.retryable for e in failures.values()))
        self.failures = failures


class NoSpace(StorageError):
    """ENOSPC, or a free-space floor would be crossed."""


# -- integrity ---------------------------------------------------------------------------


class IntegrityError(BackupdError):
    exit_code = EXIT_INTEGRITY


class UnsafeArchive(IntegrityError):
    """An archive with path traversal, links, device files or absurd sizes."""


class ManifestInvalid(IntegrityError):
    """A manifest that is not JSON, too large, or fails the manifest schema."""


class ManifestKeyMismatch(IntegrityError):
    """A manifest whose fields disagree with the key it was read from (a manifest planted under
    another prefix, or copied from one). ``disagreements`` holds (field, what the key says,
    what the manifest says)."""

    def __init__(self, message: str, disagreements: list[tuple[str, str, str]]) -> None:
        super().__init__(message)
        self.disagreements = disagreements


class RunsFailed(BackupdError):
    exit_code = EXIT_RUNS_FAILED
