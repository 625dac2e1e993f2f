"""``mailbroker cert create ID``: a key pair and a self-signed certificate for an Entra app.

The private key goes straight into the integration's secret (``client_certificate``); the public
certificate is written to a file for the operator to upload to the app registration (Certificates
& secrets > Certificates > Upload certificate). Entra accepts self-signed certificates for client
assertions; it only needs the public part. The key is never printed.
"""

from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path
from typing import Any

from mailbroker.errors import InvalidIntegration, UnknownIntegration
from mailbroker.integrations import (
    MicrosoftDelegatedIntegration,
    MicrosoftIntegration,
    parse_integration,
    unredacted,
)
from mailbroker.tokens.credentials import certificate_facts

from mailbroker_cli.context import CliError, Context
from mailbroker_cli.integrations import report_invalid
from mailbroker_cli.output import Output

DEFAULT_DAYS = 365


def self_signed(common_name: str, *, days: int = DEFAULT_DAYS, key_size: int = 2048) -> tuple[str, str]:
    """(private key PEM, certificate PEM): an RSA key and a certificate it signs itself."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=key_size)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64])])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    return key_pem, cert.public_bytes(serialization.Encoding.PEM).decode()


def register(commands: Any, common: argparse.ArgumentParser) -> None:
    group = commands.add_parser("cert", help="certificate credentials for Microsoft app registrations")
    sub = group.add_subparsers(dest="cert_command", required=True, metavar="{create}")
    create = sub.add_parser(
        "create",
        parents=[common],
        help="make a key and self-signed certificate; store the key in the integration",
        description="Generate an RSA key and a self-signed certificate, store both in the integration's "
        "secret as client_certificate (replacing client_secret), and write the public certificate to "
        "a file to upload to the app registration (Certificates & secrets > Certificates).",
    )
    create.add_argument("id")
    create.add_argument("--days", type=int, default=DEFAULT_DAYS, help=f"validity (default {DEFAULT_DAYS})")
    create.add_argument(
        "--out", metavar="FILE", help="where to write the public certificate (default ./<id>.cer)"
    )
    create.add_argument(
        "--send-x5c",
        action="store_true",
        help="send the certificate in assertions (subject-name/issuer auth)",
    )
    create.set_defaults(handler=create_certificate)


def create_certificate(args: argparse.Namespace, ctx: Context, out: Output) -> int:
    if not 1 <= args.days <= 3650:
        raise CliError("--days must be between 1 and 3650")
    store = ctx.integrations
    try:
        existing = store.get(args.id)
    except UnknownIntegration:
        raise CliError(
            f"no integration {args.id!r}",
            hint="Register it first: mailbroker integration add ID --provider microsoft …",
            code="unknown_integration",
        ) from None
    except InvalidIntegration as exc:
        return report_invalid(exc, out, from_flags=False)
    if not isinstance(existing, MicrosoftIntegration | MicrosoftDelegatedIntegration):
        raise CliError(
            f"integration {args.id!r} is a {existing.provider} integration; certificates are for Microsoft"
        )
    path = Path(args.out or f"{args.id}.cer").resolve()
    key_pem, cert_pem = self_signed(f"mailbroker {args.id}", days=args.days)
    client_id = existing.client_id
    document = unredacted(existing)
    document.pop("client_secret", None)
    document.pop("client_secret_expires_at", None)
    document["client_certificate"] = {
        "private_key": key_pem,
        "certificate": cert_pem,
        "send_x5c": args.send_x5c,
    }
    try:
        integration = parse_integration(document)
    except InvalidIntegration as exc:
        return report_invalid(exc, out, from_flags=False)
    path.write_text(cert_pem)  # written first: a key stored without its certificate is useless
    store.put(integration)
    facts = certificate_facts(cert_pem)
    if out.as_json:
        out.json(
            {
                "id": integration.id,
                "certificate_file": str(path),
                "thumbprint": facts.thumbprint_sha1,
                "thumbprint_sha256": facts.thumbprint_sha256,
                "not_after": facts.not_after_iso,
            }
        )
        return 0
    out.line(
        f"{out.mark(True)} key stored in secret {store.secret_name(integration.id)} (client_certificate)"
    )
    out.line(f"{out.mark(True)} public certificate written to {path}")
    out.line(f"  thumbprint {facts.thumbprint_sha1}, valid until {facts.not_after_iso}")
    out.note(
        "Upload it: Entra admin center > App registrations > your app "
        f"({client_id}) > Certificates & secrets > Certificates > Upload certificate > {path}"
    )
    out.note(f"then check it: mailbroker doctor {integration.id}")
    return 0
