"""The HTTP client every token request goes through: a ``requests`` session that vets the address
it actually connects to, and never follows a redirect.

MSAL, google-auth and MSAL's generic OAuth2 client all accept a ``requests`` session, so one
session guards all three, including the requests a library makes on its own (MSAL's OIDC
discovery, the token endpoint a discovery document names).

- **Where it connects.** The connection classes of urllib3 (which requests uses) are replaced by
  ones that resolve the host once, refuse when any address is link-local or instance-metadata
  (``integrations.is_forbidden_address``), connect only to the addresses they vetted, and check
  the connected peer again. TLS still verifies the certificate against the host *name*. A name
  that resolves differently at each lookup (DNS rebinding) is vetted at the lookup that is used.
  Plain ``http`` is allowed only to a loopback peer.
- **What URL it requests.** Every request URL passes ``integrations.url_problem``: no backslash,
  no user information, nothing two URL parsers read differently.
- **No redirects.** A token request carries the client secret, refresh token or signed assertion
  in its body; following a 307 would re-post it to wherever the answer points (and a 302 turns it
  into a GET). A redirect answer is refused as ``address_not_allowed``.

An instance of this module's session is not specific to tokens, but token requests are the only
HTTP the functions make with a credential in them; that is why it lives here.
"""

from __future__ import annotations

import socket
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, NewConnectionError

from mailbroker.errors import TokenError
from mailbroker.integrations import is_forbidden_address, is_loopback_host, url_problem

REDIRECT_HINT = (
    "The token endpoint answered with a redirect. Token requests never follow redirects (the "
    "request carries the client secret or refresh token): set the token URL or authority to the "
    "endpoint itself, over https."
)


class AddressRefused(TokenError):
    code = "address_not_allowed"


def vetted_addresses(host: str, port: int, *, cleartext: bool) -> list[str]:
    """The addresses ``host`` resolves to, all of them allowed; ``[]`` when it does not resolve
    (the connection attempt then reports that). Raises :class:`AddressRefused` otherwise."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        return []
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    for address in addresses:
        _vet(host, address, cleartext=cleartext)
    return addresses


def _vet(host: str, address: str, *, cleartext: bool) -> None:
    if is_forbidden_address(address):
        raise AddressRefused(f"token endpoint {host!r} resolves to a link-local or instance-metadata address")
    if cleartext and not is_loopback_host(address):
        raise AddressRefused(f"plain http to {host!r}, which is not a loopback address")


class _VettedConnectionMixin:
    """Connects only to vetted addresses of the host, and checks the peer it got."""

    _cleartext = False
    _dns_host: str
    port: int

    def _new_conn(self) -> socket.socket:
        host = self._dns_host
        addresses = vetted_addresses(host, self.port, cleartext=self._cleartext)
        if not addresses:
            return super()._new_conn()  # type: ignore[misc,no-any-return]  # urllib3 reports the resolution failure
        failure: Exception | None = None
        for address in addresses:
            # urllib3 connects to ``_dns_host``; TLS (after this returns) uses the name again.
            self._dns_host = address
            try:
                sock: socket.socket = super()._new_conn()  # type: ignore[misc]
            except (NewConnectionError, ConnectTimeoutError) as exc:
                failure = exc
                continue
            finally:
                self._dns_host = host
            try:
                _vet(host, str(sock.getpeername()[0]), cleartext=self._cleartext)
            except AddressRefused:
                sock.close()
                raise
            return sock
        raise failure or OSError(f"no address of {host!r} could be connected")


class _VettedHTTPConnection(_VettedConnectionMixin, HTTPConnection):
    _cleartext = True


class _VettedHTTPSConnection(_VettedConnectionMixin, HTTPSConnection):
    pass


class _VettedHTTPConnectionPool(HTTPConnectionPool):
    ConnectionCls = _VettedHTTPConnection


class _VettedHTTPSConnectionPool(HTTPSConnectionPool):
    ConnectionCls = _VettedHTTPSConnection


class VettedAdapter(HTTPAdapter):
    """An ``HTTPAdapter`` whose connections are :class:`_VettedConnectionMixin` ones."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {
            "http": _VettedHTTPConnectionPool,
            "https": _VettedHTTPSConnectionPool,
        }


class VettedSession(requests.Session):
    """A ``requests`` session for token requests: vetted URLs and addresses, no redirects."""

    def __init__(self) -> None:
        super().__init__()
        adapter = VettedAdapter()
        self.mount("https://", adapter)
        self.mount("http://", adapter)

    def request(self, method: Any, url: Any, *args: Any, **kwargs: Any) -> Any:
        text = url.decode() if isinstance(url, bytes) else str(url)
        problem = url_problem(text)
        if problem:
            raise AddressRefused(f"token request URL {problem}")
        kwargs["allow_redirects"] = False
        response = super().request(method, url, *args, **kwargs)
        if response.is_redirect:
            response.close()
            raise AddressRefused(
                f"token endpoint answered HTTP {response.status_code} (a redirect), which is not followed",
                hint=REDIRECT_HINT,
            )
        return response

    def get_adapter(self, url: str) -> Any:
        # A library may mount its own adapter (google-auth does for mutual TLS): refuse to send
        # through anything but the vetting one.
        adapter = super().get_adapter(url)
        if not isinstance(adapter, VettedAdapter):
            raise AddressRefused(f"token request through an unvetted {type(adapter).__name__}")
        return adapter
