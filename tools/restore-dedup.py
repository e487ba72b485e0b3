#!/usr/bin/env python3
"""Restore a checkpoint tar from backupd's deduplicated format without backupd.

Needs only Python 3 (standard library), the ``zstd`` command and, for encrypted backends,
``age`` with the identity file. ROOT is a directory holding the backend's objects (a
filesystem backend's ``path``, or a copy of the bucket: ``aws s3 sync s3://BUCKET/PREFIX ROOT``);
RECIPE is the recipe's key under ROOT. The byte formats are in docs/dedup-format.md.

    python3 restore-dedup.py ROOT RECIPE -o checkpoint.tar [-i age-identity.txt] [--id-key FILE]

It reads every pack index under ROOT/dedup/packs (checking each pack against its name),
rebuilds the tar in order, checks every chunk against its id (SHA-256 ids always; keyed ids
when --id-key gives the repository's 32-byte key) and the tar's size and SHA-256 against the
recipe, and prints the SHA-256 to compare with the manifest's ``tar_sha256``. Nothing is
left at -o unless everything matched. Exit status: 0 restored, 1 failed (the message says why).
"""

import argparse
import hashlib
import hmac
import json
import os
import struct
import subprocess
import sys
import tempfile

AGE_MAGIC = b"age-encryption.org/v1\n"
PACK_MAGIC, FOOTER_MAGIC, RECIPE_MAGIC = b"BKDPACK1", b"BKDPEND1", b"BKDRCPE1"
FOOTER = struct.Struct("<QII32s8s")


class Failed(Exception):
    pass


def run(cmd, data=None, out=None):
    try:
        done = subprocess.run(cmd, input=data, stdout=out if out else subprocess.PIPE, stderr=subprocess.PIPE,
                              check=False)
    except FileNotFoundError:
        raise Failed(f"{cmd[0]} is not installed") from None
    if done.returncode:
        raise Failed(f"{' '.join(cmd[:2])} failed: {done.stderr.decode(errors='replace').strip()}")
    return done.stdout


def plain(path, identity, tmp):
    """The file's bytes, age-decrypted when it is encrypted (into tmp when a path is wanted)."""
    with open(path, "rb") as fh:
        encrypted = fh.read(len(AGE_MAGIC)) == AGE_MAGIC
    if not encrypted:
        return path
    if not identity:
        raise Failed(f"{path} is encrypted with age: give the identity file (-i)")
    out = os.path.join(tmp, hashlib.sha256(path.encode()).hexdigest() + ".plain")
    run(["age", "-d", "-i", identity, "-o", out, path])
    return out


class Reader:
    def __init__(self, data):
        self.data, self.pos = data, 0

    def take(self, n):
        if self.pos + n > len(self.data):
            raise Failed("the recipe or a list is truncated")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def uvarint(self):
        n = shift = 0
        while True:
            b = self.take(1)[0]
            n |= (b & 0x7F) << shift
            if not b & 0x80:
                return n
            shift += 7

    def refs(self):
        k = self.uvarint()
        lengths = [self.uvarint() for _ in range(k)]
        ids = self.take(32 * k)
        return [(ids[32 * i : 32 * i + 32], n) for i, n in enumerate(lengths)]


class Packs:
    """Chunk id -> (pack, frame, place); a pack's frames are decompressed once, on first use."""

    def __init__(self, root, identity, tmp):
        self.tmp, self.where, self.raw = tmp, {}, {}
        packs_dir = os.path.join(root, "dedup", "packs")
        for dirpath, _dirs, files in os.walk(packs_dir):
            for name in sorted(files):
                if name.endswith(".pack"):
                    self.load(os.path.join(dirpath, name), identity)

    def load(self, path, identity):
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        if digest.hexdigest() != os.path.basename(path)[: -len(".pack")]:
            raise Failed(f"{path}: content does not match its name (corrupt pack)")
        path = plain(path, identity, self.tmp)
        with open(path, "rb") as fh:
            size = fh.seek(0, os.SEEK_END)
            fh.seek(0)
            if fh.read(8) != PACK_MAGIC:
                raise Failed(f"{path}: not a pack of a known version")
            fh.seek(size - FOOTER.size)
            index_offset, index_length, _count, index_sha, magic = FOOTER.unpack(fh.read(FOOTER.size))
            fh.seek(index_offset)
            index = fh.read(index_length)
        if magic != FOOTER_MAGIC or hashlib.sha256(index).digest() != index_sha:
            raise Failed(f"{path}: corrupt pack index")
        (nframes,) = struct.unpack_from("<I", index, 0)
        pos = 4 + 16 * nframes
        raw_offset = 0
        for f in range(nframes):
            _offset, _length, count = struct.unpack_from("<QII", index, 4 + 16 * f)
            for _ in range(count):
                chunk_id, length = struct.unpack_from("<32sI", index, pos)
                pos += 36
                self.where.setdefault(chunk_id, (path, index_offset, raw_offset, length))
                raw_offset += length

    def read(self, chunk_id):
        try:
            path, frames_end, offset, length = self.where[chunk_id]
        except KeyError:
            raise Failed(f"chunk {chunk_id.hex()} is in no pack under the root") from None
        raw = self.raw.get(path)
        if raw is None:
            # every frame of the pack at once: zstd -d reads concatenated frames
            with open(path, "rb") as fh:
                fh.seek(8)
                frames = fh.read(frames_end - 8)
            raw = self.raw[path] = os.path.join(self.tmp, hashlib.sha256(path.encode()).hexdigest() + ".raw")
            with open(raw, "wb") as out:
                run(["zstd", "-d", "-q", "-c"], data=frames, out=out)
        with open(raw, "rb") as fh:
            fh.seek(offset)
            return fh.read(length)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("root")
    ap.add_argument("recipe", help="the recipe's key under ROOT")
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("-i", "--identity", help="age identity file (encrypted backends)")
    ap.add_argument("--id-key", help="file holding the 32-byte chunk id key, to check keyed chunk ids too")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="restore-dedup-") as tmp:
        try:
            sha = restore(args, tmp)
        except (Failed, OSError) as exc:
            print(f"restore-dedup: {exc}", file=sys.stderr)
            return 1
    print(f"{sha}  {args.output}")
    return 0


def restore(args, tmp):
    recipe = Reader(run(["zstd", "-d", "-q", "-c", plain(os.path.join(args.root, args.recipe), args.identity, tmp)]))
    if recipe.take(8) != RECIPE_MAGIC:
        raise Failed("not a recipe of a known version")
    header = json.loads(recipe.take(recipe.uvarint()))
    key = open(args.id_key, "rb").read() if args.id_key else None
    if header["id_scheme"] == "sha256":
        check = lambda data: hashlib.sha256(data).digest()  # noqa: E731
    elif key is not None:
        check = lambda data: hmac.digest(key, data, "sha256")  # noqa: E731
    else:
        check = None  # keyed ids without the key: the tar's SHA-256 below still covers every byte
    packs = Packs(args.root, args.identity, tmp)

    def chunk(chunk_id, length=None):
        data = packs.read(chunk_id)
        if (check and check(data) != chunk_id) or (length is not None and len(data) != length):
            raise Failed(f"chunk {chunk_id.hex()} is corrupt")
        return data

    partial = args.output + ".partial"
    digest, size = hashlib.sha256(), 0
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as out:
            while True:
                op = recipe.take(1)[0]
                pieces = []
                if op == 1:
                    pieces = [recipe.take(recipe.uvarint())]
                elif op == 2:
                    pieces = (chunk(i, n) for i, n in recipe.refs())
                elif op == 3:
                    pieces = (chunk(p, m) for i, _n in recipe.refs() for p, m in Reader(chunk(i)).refs())
                elif op == 0:
                    summary = json.loads(recipe.take(recipe.uvarint()))
                    break
                else:
                    raise Failed(f"corrupt recipe (op {op})")
                for piece in pieces:
                    out.write(piece)
                    digest.update(piece)
                    size += len(piece)
        if size != summary["tar_size"] or digest.hexdigest() != summary["tar_sha256"]:
            raise Failed(f"the rebuilt tar does not match the recipe ({size} bytes, SHA-256 {digest.hexdigest()})")
        os.rename(partial, args.output)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return digest.hexdigest()


if __name__ == "__main__":
    sys.exit(main())
