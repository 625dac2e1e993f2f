"""Finding 2: token-URL vetting and the HTTP client disagreed on the host.

``urlsplit`` reads ``localhost`` in ``http://169.254.169.254\\@localhost/`` while urllib3 connects
to 169.254.169.254; and the old check resolved a name once before the request while requests
resolved it again to connect. Now a URL two parsers read differently is refused, and the address
vetted is the address connected to, on every connection. The token endpoints are the sandbox's,
over HTTPS on loopback.
"""

from __future__ import annotations

import socket

import pytest
from mailbroker.errors import InvalidIntegration, TokenError
from mailbroker.integrations import is_forbidden_address, parse_integration
from mailbroker.tokens.http_client import AddressRefused, VettedSession
from mailbroker.tokens.providers import TokenProviders

from tests.security.test_credentials_go_only_where_they_may import integration_data

NEWLY_FORBIDDEN = [
    "::a9fe:a9fe",  # 169.254.169.254, IPv4-compatible form
    "64:ff9b::a9fe:a9fe",  # 169.254.169.254 through NAT64
    "fd00:ec2::23",  # AWS Nitro services range (fd00:ec2::/32)
    "2002:a9fe:a9fe::1",  # 6to4 of 169.254.169.254
]
PARSER_TRICKS = [
    "http://169.254.169.254\\@localhost/token",
    "https://169.254.169.254\\@localhost/token",
    "https://localhost\\@169.254.169.254/token",
    "https://user@localhost/token",
    "https://169.254.169.254@localhost/token",
    "https://localhost:443@169.254.169.254/token",
    "https://local host/token",
    "https://localhost\t.example/token",
]


def _token_field(provider: str) -> str:
    return {"google": "token_uri", "oauth2": "token_url", "microsoft": "authority"}[provider]


@pytest.mark.parametrize("provider", ["google", "oauth2", "microsoft"])
@pytest.mark.parametrize("url", PARSER_TRICKS)
def test_finding_2_backslash_userinfo_host_is_refused(provider, url):
    data = integration_data(provider)
    data[_token_field(provider)] = url.removesuffix("/token") if provider == "microsoft" else url

    with pytest.raises(InvalidIntegration) as refused:
        parse_integration(data)

    assert _token_field(provider) in str(refused.value)


@pytest.mark.parametrize("host", NEWLY_FORBIDDEN)
def test_finding_2_metadata_address_forms_are_forbidden(host):
    assert is_forbidden_address(host)
    with pytest.raises(InvalidIntegration):
        parse_integration(integration_data("basic", smtp={"host": host}))
    with pytest.raises(InvalidIntegration):
        parse_integration(integration_data("oauth2", token_host=host))


@pytest.mark.parametrize("host", ["::1", "127.0.0.1", "2001:db8::1", "64:ff9b::808:808", "fd00::1"])
def test_finding_2_ordinary_addresses_stay_allowed(host):
    assert not is_forbidden_address(host)


def test_finding_2_a_backslash_url_gets_no_request_even_past_the_schema(token_server, ca_trust_env):
    """MSAL requests URLs it read from a discovery document: the session vets those too."""
    port = token_server.base_url.rsplit(":", 1)[1]
    before = token_server.requests

    with pytest.raises(AddressRefused):
        VettedSession().post(f"https://169.254.169.254\\@127.0.0.1:{port}/oauth2/token", data={"a": "b"})

    assert token_server.requests == before


@pytest.fixture
def rebinding_localhost(monkeypatch):
    """A resolver that answers ``localhost`` with 127.0.0.1 once, then with the metadata address
    (DNS rebinding with a zero TTL). Address literals resolve as usual."""
    real = socket.getaddrinfo
    answers = ["127.0.0.1"]
    lookups: list[str] = []

    def getaddrinfo(host, port, *args, **kwargs):
        if host != "localhost":
            return real(host, port, *args, **kwargs)
        address = answers.pop(0) if answers else "169.254.169.254"
        lookups.append(address)
        return real(address, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return lookups


def test_finding_2_the_connection_goes_to_the_address_that_was_vetted(
    token_server, ca_trust_env, rebinding_localhost
):
    token_server.register_oauth2_client("f2-client", "f2-secret", scope="smtp")
    data = integration_data("oauth2")
    token_url = token_server.oauth2_token_url.replace("127.0.0.1", "localhost")
    data.update(client_id="f2-client", client_secret="f2-secret", token_url=token_url)
    integration = parse_integration(data)

    token = TokenProviders(http_timeout=5).fetch(integration)

    # One lookup, vetted and used: the request reached the loopback server over verified TLS.
    assert token.access_token and rebinding_localhost == ["127.0.0.1"]
    assert token_server.issued(client_id="f2-client") == 1

    # A new connection resolves again; now the name points at the metadata service.
    before = token_server.requests
    with pytest.raises(TokenError) as refused:
        TokenProviders(http_timeout=5).fetch(integration)

    assert refused.value.code == "address_not_allowed"
    assert rebinding_localhost == ["127.0.0.1", "169.254.169.254"]  # refused without a connection
    assert token_server.requests == before


def test_finding_2_plain_http_connects_only_to_loopback(monkeypatch):
    """``http`` is allowed to a loopback host name; if the name resolves off loopback, no request."""
    real = socket.getaddrinfo
    monkeypatch.setattr(
        socket,
        "getaddrinfo",
        lambda host, port, *a, **k: real("192.0.2.10" if host == "localhost" else host, port, *a, **k),
    )

    with pytest.raises(AddressRefused) as refused:
        VettedSession().post("http://localhost:9/token", data={"client_secret": "s"}, timeout=2)

    assert "not a loopback address" in str(refused.value)
