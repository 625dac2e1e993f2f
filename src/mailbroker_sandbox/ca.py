"""A throwaway certificate authority for the sandbox's TLS servers.

The sandbox's HTTPS token endpoints and its SMTP server (STARTTLS and implicit TLS) present
certificates for ``localhost`` and ``127.0.0.1`` signed by this CA. Clients trust it the standard
way — ``SSL_CERT_FILE`` for the ``ssl`` module, ``REQUESTS_CA_BUNDLE`` for requests (MSAL,
google-auth) — never by turning verification off. ``trust_env()`` gives those variables.

``shell_trust_env()`` is what an operator exports in a shell (``mailbroker local`` prints it): a
bundle of the system's CAs plus the sandbox CA, so that the same shell still reaches real HTTPS
sites (pip, the AWS CLI, git) while it talks to the sandbox.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class SandboxCA:
    directory: Path
    ca_cert: Path  # PEM of the CA only: what clients trust
    server_cert: Path  # PEM chain for localhost / 127.0.0.1
    server_key: Path
    untrusted_cert: Path  # a self-signed server cert no client trusts (for TLS failure tests)
    untrusted_key: Path
    bundle: Path  # the system's CAs followed by the sandbox CA: for a shell that also talks to the world

    def server_context(self, *, trusted: bool = True) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        if trusted:
            ctx.load_cert_chain(self.server_cert, self.server_key)
        else:
            ctx.load_cert_chain(self.untrusted_cert, self.untrusted_key)
        return ctx

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_cert))

    def trust_env(self) -> dict[str, str]:
        """Environment variables that make ssl and requests trust this CA."""
        return {"SSL_CERT_FILE": str(self.ca_cert), "REQUESTS_CA_BUNDLE": str(self.ca_cert)}

    def shell_trust_env(self) -> dict[str, str]:
        """The same variables pointing at the bundle of system CAs plus this CA."""
        return {"SSL_CERT_FILE": str(self.bundle), "REQUESTS_CA_BUNDLE": str(self.bundle)}


def system_ca_file() -> Path | None:
    """The trust store OpenSSL uses by default (the distribution's bundle), else certifi's, which
    requests uses by default; None when neither exists."""
    paths = ssl.get_default_verify_paths()
    for candidate in (paths.cafile, paths.openssl_cafile):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    try:
        import certifi
    except ImportError:  # pragma: no cover - requests depends on certifi
        return None
    return Path(certifi.where())


def create_ca(directory: str | Path | None = None) -> SandboxCA:
    """Create a CA and a server certificate for localhost/127.0.0.1/::1 in ``directory``
    (a new temporary directory when omitted). Keys never leave that directory."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    path = Path(directory) if directory else Path(tempfile.mkdtemp(prefix="mailbroker-ca-"))
    path.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)

    def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(name("mailbroker sandbox CA"))
        .issuer_name(name("mailbroker sandbox CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=7))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(issuer_key: ec.EllipticCurvePrivateKey, issuer_name: x509.Name, key: ec.EllipticCurvePrivateKey):
        san = x509.SubjectAlternativeName(
            [
                x509.DNSName("localhost"),
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                x509.IPAddress(ipaddress.ip_address("::1")),
            ]
        )
        return (
            x509.CertificateBuilder()
            .subject_name(name("localhost"))
            .issuer_name(issuer_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=7))
            .add_extension(san, critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False
            )
            .sign(issuer_key, hashes.SHA256())
        )

    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = leaf(ca_key, ca_cert.subject, server_key)
    rogue_key = ec.generate_private_key(ec.SECP256R1())
    rogue_cert = leaf(rogue_key, name("localhost"), rogue_key)

    pem = serialization.Encoding.PEM
    files = {
        "ca.pem": ca_cert.public_bytes(pem),
        "server.pem": server_cert.public_bytes(pem) + ca_cert.public_bytes(pem),
        "server.key": key_pem(server_key),
        "untrusted.pem": rogue_cert.public_bytes(pem),
        "untrusted.key": key_pem(rogue_key),
    }
    system = system_ca_file()
    system_pem = system.read_bytes().rstrip(b"\n") + b"\n" if system else b""
    files["bundle.pem"] = system_pem + files["ca.pem"]
    for filename, data in files.items():
        target = path / filename
        target.write_bytes(data)
        if filename.endswith(".key"):
            target.chmod(0o600)
    return SandboxCA(
        directory=path,
        ca_cert=path / "ca.pem",
        server_cert=path / "server.pem",
        server_key=path / "server.key",
        untrusted_cert=path / "untrusted.pem",
        untrusted_key=path / "untrusted.key",
        bundle=path / "bundle.pem",
    )
