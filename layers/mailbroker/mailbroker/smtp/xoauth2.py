"""SMTP AUTH: XOAUTH2 with a bearer token (Microsoft 365, Gmail) and PLAIN/LOGIN with a password.

Both run through ``smtplib.SMTP.auth`` with a mechanism function, so the SASL exchange, base64 and
challenge loop stay smtplib's. An authenticator raises :class:`AuthRejected` (the server's reply,
plus Google's decoded diagnosis) when the server refuses the credential; the session decides
whether a fresh token is worth one more try and classifies the rest.

XOAUTH2 (https://developers.google.com/gmail/imap/xoauth2-protocol): the initial response is
``user={user}^Aauth=Bearer {token}^A^A``. Gmail answers a refused token with ``334`` and a base64
JSON diagnosis (``{"status":"401","schemes":"Bearer","scope":"https://mail.google.com/"}``); the
client sends an empty line and the server closes the exchange with ``535``.
"""

from __future__ import annotations

import json
import smtplib
from collections.abc import Callable
from typing import Any, Protocol

from pydantic import SecretStr

from mailbroker.errors import SmtpReply


class AuthRejected(Exception):
    """The server refused the credential. Carries the reply and the provider's diagnosis, never
    the credential."""

    def __init__(self, reply: SmtpReply, diagnosis: dict[str, str] | None = None) -> None:
        super().__init__(str(reply))
        self.reply = reply
        self.diagnosis = diagnosis or {}


class CredentialUnusable(Exception):
    """The credential cannot be put on the wire (smtplib sends AUTH responses as ASCII)."""


class Authenticator(Protocol):
    #: the SASL mechanisms this authenticator can use, in order of preference
    mechanisms: tuple[str, ...]
    #: a refused credential may succeed once replaced (a token), or never (a password)
    refreshable: bool

    def authenticate(self, smtp: smtplib.SMTP, username: str, *, fresh: bool) -> None:
        """One AUTH exchange on ``smtp``. ``fresh``: the previous credential was refused."""
        ...


def xoauth2_initial_response(username: str, token: str) -> str:
    return f"user={username}\x01auth=Bearer {token}\x01\x01"


def decode_diagnosis(challenge: bytes) -> dict[str, str]:
    """Google's 334 challenge (already base64-decoded by smtplib) as ``{status, scope, schemes}``;
    anything else is ignored."""
    try:
        data = json.loads(challenge.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {key: str(data[key])[:200] for key in ("status", "scope", "schemes") if key in data}


def _offered(smtp: smtplib.SMTP) -> list[str]:
    return smtp.esmtp_features.get("auth", "").upper().split()


def _run(smtp: smtplib.SMTP, mechanism: str, respond: Callable[..., str]) -> None:
    try:
        smtp.auth(mechanism, respond, initial_response_ok=True)
    except smtplib.SMTPAuthenticationError as exc:
        raise AuthRejected(SmtpReply.parse(exc.smtp_code, exc.smtp_error)) from None


class XOAuth2Auth:
    """SASL XOAUTH2 with tokens from ``token_provider(force_refresh) -> access token``."""

    mechanisms: tuple[str, ...] = ("XOAUTH2",)
    refreshable = True

    def __init__(self, token_provider: Callable[[bool], str]) -> None:
        self._token_provider = token_provider

    def __repr__(self) -> str:
        return "XOAuth2Auth()"

    def authenticate(self, smtp: smtplib.SMTP, username: str, *, fresh: bool) -> None:
        token = self._token_provider(fresh)
        if not (username.isascii() and token.isascii()) or any(c in username + token for c in "\x01\r\n"):
            raise CredentialUnusable("the username or token contains characters XOAUTH2 cannot carry")
        challenges: list[bytes] = []

        def respond(challenge: bytes | None = None) -> str:
            if challenge is None:
                return xoauth2_initial_response(username, token)
            challenges.append(challenge)
            return ""  # acknowledge the error challenge; the server then sends its final 535

        try:
            _run(smtp, "XOAUTH2", respond)
        except AuthRejected as rejected:
            diagnosis: dict[str, str] = {}
            for challenge in challenges:
                diagnosis.update(decode_diagnosis(challenge))
            raise AuthRejected(rejected.reply, diagnosis) from None


class BasicAuth:
    """AUTH PLAIN, or LOGIN when the server does not offer PLAIN."""

    mechanisms: tuple[str, ...] = ("PLAIN", "LOGIN")
    refreshable = False

    def __init__(self, password: SecretStr | str) -> None:
        self._password = password if isinstance(password, SecretStr) else SecretStr(password)

    def __repr__(self) -> str:
        return "BasicAuth(password='**********')"

    def authenticate(self, smtp: smtplib.SMTP, username: str, *, fresh: bool) -> None:
        password = self._password.get_secret_value()
        if not (username.isascii() and password.isascii()):
            raise CredentialUnusable(
                "smtplib sends AUTH PLAIN/LOGIN as ASCII: the username or password is not"
            )
        if "PLAIN" in _offered(smtp):

            def plain(challenge: bytes | None = None) -> str:
                return f"\0{username}\0{password}"

            _run(smtp, "PLAIN", plain)
            return

        def login(challenge: bytes | None = None) -> str:
            if challenge is None or challenge.lower().startswith(b"user"):
                return username
            return password

        _run(smtp, "LOGIN", login)


def describe_offer(smtp: Any) -> str:
    return " ".join(_offered(smtp)) or "none"
