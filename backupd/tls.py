"""TLS client contexts: what every HTTPS client of backupd trusts and presents."""

from __future__ import annotations

import os
import ssl

PathLike = str | os.PathLike[str]


def client_context(ca_file: PathLike | None = None, *, cert_file: PathLike | None = None,
                   key_file: PathLike | None = None) -> ssl.SSLContext:
    """A verifying client context trusting ``ca_file`` (the system store when ``None``) and,
    with ``cert_file``, presenting that certificate (its key in ``key_file``, or in
    ``cert_file`` itself). Raises ``OSError`` (``ssl.SSLError`` is one) for a file that is
    missing or not PEM; the caller names the setting it came from."""
    ctx = ssl.create_default_context(cafile=os.fspath(ca_file) if ca_file is not None else None)
    if cert_file is not None:
        ctx.load_cert_chain(os.fspath(cert_file), os.fspath(key_file) if key_file is not None else None)
    return ctx
