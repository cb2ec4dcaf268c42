"""TLS for the public listener: the installation's own certificate authority and the certificate it
signs for `<domain>` and `*.<domain>`, or a certificate the operator brings.

    <data>/tls/ca.pem, ca.key          the installation's CA (made at the first start; the key 0600)
    <data>/tls/server.pem, server.key  `<domain>`, `*.<domain>`, signed by the CA (remade when the domain
                                       changes or it nears its end)
    <data>/tls/ca-bundle.pem           the system's trusted CAs plus this one: what `SSL_CERT_FILE` names
                                       (it replaces the default store for Python clients)

Only clients told to trust the CA trust these certificates; a real domain takes the operator's own
certificate (or a TLS front such as Caddy, docs/network.md)."""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import os
import ssl
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_DAYS = 3650
SERVER_DAYS = 397  # what browsers accept for a server certificate
RENEW_BEFORE = dt.timedelta(days=30)
SYSTEM_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
LEAF_CACHE = 512


class TLSError(RuntimeError):
    pass


@dataclass(frozen=True)
class TLSFiles:
    cert: Path  # the chain the listener presents
    key: Path
    ca: Path | None  # the installation's CA, when Corral signed the certificate
    bundle: Path | None  # system CAs + ours, for SSL_CERT_FILE


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    tmp.rename(path)


def _write_public(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    tmp.chmod(0o644)
    tmp.rename(path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _ca(directory: Path, prefix: str = "ca", label: str = "Corral local CA"
        ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A CA of the installation's (`prefix`.pem and .key in `directory`), made on first use."""
    cert_path, key_path = directory / f"{prefix}.pem", directory / f"{prefix}.key"
    if cert_path.exists() and key_path.exists():
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise TLSError(f"{key_path} is not an EC private key")
        return x509.load_pem_x509_certificate(cert_path.read_bytes()), key
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Corral"),
                      x509.NameAttribute(NameOID.COMMON_NAME, f"{label} {os.urandom(4).hex()}")])
    now = _now()
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    directory.mkdir(parents=True, exist_ok=True)
    _write_private(key_path, _key_pem(key))
    _write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return cert, key


def _names(cert: x509.Certificate) -> set[str]:
    try:
        return set(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
                   .get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        return set()


def _server_names(domain: str) -> list[str]:
    return [domain, f"*.{domain}"]


def installation_tls(directory: Path, domain: str) -> TLSFiles:
    """The CA (made if missing) and a current certificate for `domain` and `*.domain` signed by it."""
    ca_cert, ca_key = _ca(directory)
    cert_path, key_path = directory / "server.pem", directory / "server.key"
    wanted = set(_server_names(domain))
    current = None
    if cert_path.exists() and key_path.exists():
        current = x509.load_pem_x509_certificate(cert_path.read_bytes())
        if (_names(current) != wanted or current.issuer != ca_cert.subject
                or current.not_valid_after_utc - _now() < RENEW_BEFORE):
            current = None
    if current is None:
        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        san = [x509.DNSName(n) for n in _server_names(domain)]
        if domain == "localhost" or domain.endswith(".localhost"):
            san += [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.IPAddress(ipaddress.ip_address("::1"))]
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, domain)]))
                .issuer_name(ca_cert.subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5))
                .not_valid_after(now + dt.timedelta(days=SERVER_DAYS))
                .add_extension(x509.SubjectAlternativeName(san), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                               critical=False)
                .sign(ca_key, hashes.SHA256()))
        _write_private(key_path, _key_pem(key))
        _write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM)
                      + ca_cert.public_bytes(serialization.Encoding.PEM))
    ca_pem = (directory / "ca.pem").read_bytes()
    system = SYSTEM_BUNDLE.read_bytes() if SYSTEM_BUNDLE.exists() else b""
    bundle = directory / "ca-bundle.pem"
    if not bundle.exists() or bundle.read_bytes() != system + ca_pem:
        _write_public(bundle, system + ca_pem)
    return TLSFiles(cert=cert_path, key=key_path, ca=directory / "ca.pem", bundle=bundle)


def operator_tls(cert: Path, key: Path) -> TLSFiles:
    """A certificate the operator brings (a real domain, its own CA or ACME): checked, never changed."""
    for path in (cert, key):
        if not path.is_file():
            raise TLSError(f"TLS file {path} does not exist")
    try:
        x509.load_pem_x509_certificate(cert.read_bytes())
        serialization.load_pem_private_key(key.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise TLSError(f"cannot read the TLS certificate {cert} or its key {key}: {exc}") from None
    return TLSFiles(cert=cert, key=key, ca=None, bundle=None)


class EgressCA:
    """The CA the egress proxy signs certificates with when it intercepts HTTPS for header rules: its own
    (never the public listener's CA), trusted only inside sandboxes (envd's caBundle), one leaf per name,
    made on first use and kept in memory.

        <dir>/egress-ca.pem, egress-ca.key   made at the first start (the key 0600)
        <dir>/egress-leaves/<sha256 of name>.pem   a name's certificate and key (0600), remade each start

    The name comes from a sandbox (its SNI, checked as a DNS name by the proxy): it never becomes part of
    a path, and at most LEAF_CACHE certificates are kept."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.cert, self.key = _ca(directory, prefix="egress-ca", label="Corral egress CA")
        self._contexts: OrderedDict[str, ssl.SSLContext] = OrderedDict()

    @property
    def pem(self) -> str:
        return self.cert.public_bytes(serialization.Encoding.PEM).decode()

    def context_for(self, name: str) -> ssl.SSLContext:
        """A server context presenting a certificate for `name` signed by this CA (HTTP/1.1 only)."""
        name = name.lower()
        context = self._contexts.get(name)
        if context is not None:
            self._contexts.move_to_end(name)
        else:
            key = ec.generate_private_key(ec.SECP256R1())
            now = _now()
            leaf = (x509.CertificateBuilder()
                    .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name[:64])]))
                    .issuer_name(self.cert.subject).public_key(key.public_key())
                    .serial_number(x509.random_serial_number())
                    .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=30))
                    .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
                    .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                    .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                    .sign(self.key, hashes.SHA256()))
            path = self.directory / "egress-leaves" / f"{hashlib.sha256(name.encode()).hexdigest()}.pem"
            path.parent.mkdir(parents=True, exist_ok=True)
            _write_private(path, leaf.public_bytes(serialization.Encoding.PEM) + _key_pem(key))
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(path)
            context.set_alpn_protocols(["http/1.1"])
            path.unlink(missing_ok=True)  # loaded: no need to keep the key on disk
            self._contexts[name] = context
            while len(self._contexts) > LEAF_CACHE:
                self._contexts.popitem(last=False)
        return context
