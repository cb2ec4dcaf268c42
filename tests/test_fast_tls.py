"""The public listener's TLS files (corral.proxy.tls): the installation's CA, the certificate it signs for
`<domain>` and `*.<domain>`, and what a client that trusts the CA accepts. Real TLS handshakes over
loopback with Python's ssl module; no root needed."""

from __future__ import annotations

import socket
import ssl
import threading
from pathlib import Path

import pytest
from cryptography import x509

from corral.proxy.tls import SYSTEM_BUNDLE, TLSError, installation_tls, operator_tls


def handshake(files, server_name: str, cafile: Path) -> str:
    """A TLS handshake with a loopback server presenting `files`, verified against `cafile` for
    `server_name`. Returns what the server received."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(files.cert, files.key)
    listener = socket.create_server(("127.0.0.1", 0))
    received: list[bytes] = []

    def serve() -> None:
        conn, _ = listener.accept()
        try:
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                received.append(tls.recv(100))
        except (ssl.SSLError, OSError):
            pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    client_ctx = ssl.create_default_context(cafile=str(cafile))
    try:
        with socket.create_connection(listener.getsockname(), timeout=5) as raw, \
                client_ctx.wrap_socket(raw, server_hostname=server_name) as tls:
            tls.sendall(b"hello")
    finally:
        thread.join(timeout=5)
        listener.close()
    return b"".join(received).decode()


def test_a_client_trusting_the_ca_accepts_sandbox_and_api_names(tmp_path):
    files = installation_tls(tmp_path / "tls", "corral.localhost")
    assert handshake(files, "49983-i0abc.corral.localhost", files.ca) == "hello"
    assert handshake(files, "api.corral.localhost", files.ca) == "hello"
    assert handshake(files, "corral.localhost", files.ca) == "hello"


def test_names_outside_the_domain_are_refused(tmp_path):
    files = installation_tls(tmp_path / "tls", "corral.localhost")
    with pytest.raises(ssl.SSLCertVerificationError, match=r"match|mismatch"):
        handshake(files, "8000-i0abc.other.localhost", files.ca)
    # The wildcard covers one label only, as TLS clients read it.
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(files, "a.b.corral.localhost", files.ca)


def test_a_client_without_the_ca_refuses_the_certificate(tmp_path):
    files = installation_tls(tmp_path / "tls", "corral.localhost")
    other = installation_tls(tmp_path / "other-install", "corral.localhost")
    with pytest.raises(ssl.SSLCertVerificationError, match=r"unable to get local issuer|self.signed|verify failed"):
        handshake(files, "api.corral.localhost", other.ca)


def test_the_ca_is_made_once_and_kept_across_starts(tmp_path):
    first = installation_tls(tmp_path / "tls", "corral.localhost")
    ca, cert = first.ca.read_bytes(), first.cert.read_bytes()
    again = installation_tls(tmp_path / "tls", "corral.localhost")
    assert again.ca.read_bytes() == ca
    assert again.cert.read_bytes() == cert  # still current: not reissued
    assert (tmp_path / "tls" / "ca.key").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "tls" / "server.key").stat().st_mode & 0o777 == 0o600


def test_a_new_domain_gets_a_new_certificate_from_the_same_ca(tmp_path):
    first = installation_tls(tmp_path / "tls", "corral.localhost")
    ca = first.ca.read_bytes()
    second = installation_tls(tmp_path / "tls", "sandboxes.example.com")
    assert second.ca.read_bytes() == ca
    names = x509.load_pem_x509_certificate(second.cert.read_bytes()).extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    assert sorted(names) == ["*.sandboxes.example.com", "sandboxes.example.com"]
    assert handshake(second, "3000-i0abc.sandboxes.example.com", second.ca) == "hello"


def test_the_bundle_is_the_system_store_plus_the_ca(tmp_path):
    files = installation_tls(tmp_path / "tls", "corral.localhost")
    bundle = files.bundle.read_bytes()
    assert bundle.endswith(files.ca.read_bytes())
    if SYSTEM_BUNDLE.exists():
        assert bundle.startswith(SYSTEM_BUNDLE.read_bytes())
    assert handshake(files, "api.corral.localhost", files.bundle) == "hello"


def test_an_operators_certificate_is_used_as_given(tmp_path):
    made = installation_tls(tmp_path / "made", "corral.example.com")
    files = operator_tls(made.cert, made.key)
    assert files.ca is None and files.bundle is None
    assert handshake(files, "api.corral.example.com", made.ca) == "hello"


def test_missing_or_unreadable_operator_files_are_a_clear_error(tmp_path):
    with pytest.raises(TLSError, match="does not exist"):
        operator_tls(tmp_path / "nope.pem", tmp_path / "nope.key")
    (tmp_path / "bad.pem").write_text("not a certificate")
    (tmp_path / "bad.key").write_text("not a key")
    with pytest.raises(TLSError, match="cannot read the TLS certificate"):
        operator_tls(tmp_path / "bad.pem", tmp_path / "bad.key")
