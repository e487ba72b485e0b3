"""Deduplicated incremental storage of checkpoint archives (``format = "dedup"``), phase 1:
the format and its pure core, not yet wired into the daemon.

A checkpoint tar is split (:mod:`.tarstream`) into literal bytes (tar headers, padding) and
member data; the data is cut into chunks (:mod:`.chunker`: whole 4 KiB pages for CRIU page
images, FastCDC for other large members), each named by its id (:mod:`.ids`: SHA-256, or
HMAC-SHA256 when the backend encrypts). Chunks the backend does not hold yet are compressed
with zstd into frames and packed into pack files of a few MiB with their index as a trailer
(:mod:`.pack`); a recipe (:mod:`.recipe`) lists the literals and chunk ids that rebuild the
tar byte for byte, with its size and SHA-256. The byte formats and the design rationale are
in docs/dedup-format.md; ``tools/restore-dedup.py`` restores without backupd.

This package imports only :mod:`backupd.errors`, :mod:`backupd.backends.base` and third-party
libraries, so that phase 2 can wire it into whatever the pipeline, catalog and manifest have
become by then.
"""

from backupd.storage.dedup.ids import ChunkIds
from backupd.storage.dedup.recipe import ArchiveReader, ArchiveWriter, PackInfo, PackStore, WriteResult, restore

__all__ = ["ArchiveReader", "ArchiveWriter", "ChunkIds", "PackInfo", "PackStore", "WriteResult", "restore"]
