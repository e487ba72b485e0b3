"""A throw-away PKI for the node simulator: a CA, a kubelet serving certificate, client certs.

Everything is ECDSA P-256 (fast to generate). Private keys are written 0600 and the PKI
directory is 0700, as a real kubelet's ``/var/lib/kubelet/pki`` is.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from backupd.durable import atomic_write

__all__ = ["ClientCert", "Pki", "generate_pki"]

DEFAULT_CLIENT_CN = "backupd"
DEFAULT_CLIENT_ORG = "backupd"
_VALIDITY = dt.timedelta(days=365)


@dataclass(frozen=True)
class ClientCert:
    """A client certificate and its key, both PEM files."""

    cert_file: Path
    key_file: Path
    common_name: str


def _write_private(path: Path, data: bytes) -> None:
    with atomic_write(path, replace=True) as fh:
        fh.write(data)


def _write_public(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _name(cn: str, orgs: tuple[str, ...] = ()) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in orgs]
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
    return x509.Name(attrs)


def _new_ca(cn: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    name = _name(cn)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    return key, cert


def _issue(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    cn: str,
    *,
    orgs: tuple[str, ...] = (),
    server_hosts: tuple[str, ...] = (),
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server_hosts else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn, orgs))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_encipherment=False, key_cert_sign=False,
                crl_sign=False, content_commitment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )  # fmt: skip
    if server_hosts:
        sans: list[x509.GeneralName] = []
        for host in server_hosts:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                sans.append(x509.DNSName(host))
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


@dataclass(frozen=True)
class Pki:
    """Paths of a generated PKI. ``ca_file`` is what a client trusts (``[kubelet] ca_file``)
    and also the CA the simulator accepts client certificates from."""

    directory: Path
    ca_file: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    def issue_client_cert(self, name: str, *, cn: str, organizations: tuple[str, ...] = ()) -> ClientCert:
        """Issue another client certificate signed by this PKI's CA, written as
        ``<name>.crt``/``<name>.key`` in the PKI directory (overwritten if present)."""
        ca_key = serialization.load_pem_private_key(self.ca_key.read_bytes(), password=None)
        ca_cert = x509.load_pem_x509_certificate(self.ca_file.read_bytes())
        assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
        key, cert = _issue(ca_key, ca_cert, cn, orgs=organizations)
        return self._write_client(name, cn, key, cert)

    def issue_untrusted_client_cert(self, name: str, *, cn: str = DEFAULT_CLIENT_CN) -> ClientCert:
        """Issue a client certificate signed by a *different*, freshly generated CA that the
        simulator does not trust (for tests of refused handshakes)."""
        ca_key, ca_cert = _new_ca(f"untrusted-ca-{name}")
        key, cert = _issue(ca_key, ca_cert, cn, orgs=(DEFAULT_CLIENT_ORG,))
        return self._write_client(name, cn, key, cert)

    def _write_client(
        self, name: str, cn: str, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate
    ) -> ClientCert:
        if "/" in name or name.startswith("."):
            raise ValueError(f"client cert name must be a plain file stem, not {name!r}")
        cert_file = self.directory / f"{name}.crt"
        key_file = self.directory / f"{name}.key"
        _write_private(key_file, _key_pem(key))
        _write_public(cert_file, cert.public_bytes(serialization.Encoding.PEM))
        return ClientCert(cert_file, key_file, cn)


def generate_pki(
    directory: str | os.PathLike[str],
    *,
    client_cn: str = DEFAULT_CLIENT_CN,
    client_organizations: tuple[str, ...] = (DEFAULT_CLIENT_ORG,),
    server_hosts: tuple[str, ...] = ("127.0.0.1", "localhost", "::1"),
    reuse: bool = True,
) -> Pki:
    """Create (or, with ``reuse``, keep an existing complete) PKI in ``directory``.

    Reusing keeps the files a written backupd config points at valid across simulator
    restarts (whatever ``client_cn`` they were made with). The directory is created and
    forced to 0700; keys are 0600.
    """
    root = Path(directory).absolute()
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o700)
    pki = Pki(
        directory=root,
        ca_file=root / "ca.crt",
        ca_key=root / "ca.key",
        server_cert=root / "kubelet.crt",
        server_key=root / "kubelet.key",
        client_cert=root / "client.crt",
        client_key=root / "client.key",
    )
    files = (pki.ca_file, pki.ca_key, pki.server_cert, pki.server_key, pki.client_cert, pki.client_key)
    if reuse and all(p.is_file() for p in files) and _still_valid(pki.server_cert):
        return pki
    ca_key, ca_cert = _new_ca("backupd-simulator-ca")
    server_key, server_cert = _issue(ca_key, ca_cert, "kubelet-simulator", server_hosts=server_hosts)
    client_key, client_cert = _issue(ca_key, ca_cert, client_cn, orgs=client_organizations)
    _write_private(pki.ca_key, _key_pem(ca_key))
    _write_public(pki.ca_file, ca_cert.public_bytes(serialization.Encoding.PEM))
    _write_private(pki.server_key, _key_pem(server_key))
    _write_public(pki.server_cert, server_cert.public_bytes(serialization.Encoding.PEM))
    _write_private(pki.client_key, _key_pem(client_key))
    _write_public(pki.client_cert, client_cert.public_bytes(serialization.Encoding.PEM))
    return pki


def _still_valid(cert_file: Path) -> bool:
    try:
        cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    except ValueError:
        return False
    return cert.not_valid_after_utc > dt.datetime.now(dt.UTC) + dt.timedelta(days=1)
