"""CRIU's image messages: protoc's Python for CRIU's ``images/*.proto`` (vendored beside it).

Generated, not edited: see README.md here for the source commit, the licence and the command.
Use them through :mod:`backupd.archive.criu`, which adds CRIU's image framing and the limits.
"""
