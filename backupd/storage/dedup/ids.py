"""Chunk ids: what names a chunk in packs, indexes and recipes.

* ``sha256`` -- SHA-256 of the chunk's bytes; for backends without encryption. Anyone holding
  the data can compute it, which is fine when the data itself is stored in the clear.
* ``hmac-sha256`` -- HMAC-SHA256 keyed with the repository's 32-byte id key; for backends
  with age recipients, so that an id reveals nothing about a chunk's content (a known page --
  a zero page, a library's data page -- cannot be recognised in the index or a recipe
  without the key). Measured on 4 KiB pages here: SHA-256 1.24 GB/s, HMAC-SHA256 1.0 GB/s,
  keyed BLAKE2b 0.97 GB/s (SHA-NI makes SHA-256 the faster primitive), and Python's standard
  library computes it, which the standalone restore script needs.

The key is a secret of the repository like the age identity, but the daemon needs it to
write, so phase 2 gives it to the daemon as a secret file and stores a copy in the backend
encrypted to the recipients (for restores with the identity); a recipe records
:attr:`ChunkIds.key_check` so that a wrong key is reported as such, not as corruption.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field

from backupd.errors import IntegrityError, InvalidInput

SCHEMES = ("sha256", "hmac-sha256")
KEY_SIZE = 32


@dataclass(frozen=True)
class ChunkIds:
    scheme: str = "sha256"
    key: bytes | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise InvalidInput(f"chunk id scheme {self.scheme!r} is not one of {', '.join(SCHEMES)}")
        if (self.scheme == "hmac-sha256") != (self.key is not None):
            raise InvalidInput("the hmac-sha256 chunk id scheme needs a key, and only it takes one")
        if self.key is not None and len(self.key) != KEY_SIZE:
            raise InvalidInput(f"the chunk id key must be {KEY_SIZE} bytes, not {len(self.key)}")

    @classmethod
    def keyed(cls, key: bytes) -> ChunkIds:
        return cls("hmac-sha256", key)

    def __call__(self, data: bytes | memoryview) -> bytes:
        if self.key is None:
            return hashlib.sha256(data).digest()
        return hmac.digest(self.key, data, "sha256")

    def split(self, block: bytes | memoryview, size: int) -> list[bytes]:
        """The ids of ``block`` cut into ``size``-byte chunks (the last may be shorter): one
        call per MiB of pages instead of one per page."""
        if self.key is None:
            sha256 = hashlib.sha256
            return [sha256(block[i : i + size]).digest() for i in range(0, len(block), size)]
        key, digest = self.key, hmac.digest
        return [digest(key, block[i : i + size], "sha256") for i in range(0, len(block), size)]

    @property
    def key_check(self) -> str | None:
        """16 hex digits that identify the key without revealing it (None without a key)."""
        if self.key is None:
            return None
        return hmac.digest(self.key, b"backupd dedup id key check", "sha256")[:8].hex()

    def check_matches(self, scheme: str, key_check: str | None, what: str) -> None:
        """Refuse to verify chunks written with another scheme or key (clear error, exit 2)."""
        if scheme != self.scheme:
            raise InvalidInput(f"{what} uses {scheme!r} chunk ids; the ids given are {self.scheme!r}"
                               + (" (give the repository's id key)" if scheme == "hmac-sha256" else ""))
        if key_check != self.key_check:
            raise InvalidInput(f"{what} was written with another chunk id key (key check {key_check})")


def check_id(data: bytes | memoryview, expected: bytes, ids: ChunkIds, what: str) -> None:
    if ids(data) != expected:
        raise IntegrityError(f"{what}: chunk {expected.hex()} is corrupt (its id does not match its content)")
