"""A token endpoint that cannot be talked to is named by what went wrong — the host name does not
resolve, nothing listens there, or TLS failed — each with its own hint, never as a bare
"ConnectionError" with the 5xx/429 hint. Real connections on loopback (and one name in the
reserved ``.invalid`` domain, which never resolves)."""

from __future__ import annotations

import socket
from typing import Any

import pytest
from mailbroker.errors import TokenError
from mailbroker.integrations import parse_integration
from mailbroker.tokens.providers import TokenProviders


def oauth2(token_url: str) -> Any:
    return parse_integration(
        {
            "id": "relay-oauth2",
            "provider": "oauth2",
            "smtp": {"host": "smtp.relay.example"},
            "username": "app@relay.example",
            "token_url": token_url,
            "client_id": "relay-app",
            "client_secret": "planted-secret-7c1d",
            "scope": "smtp.send",
        }
    )


def failure(token_url: str) -> TokenError:
    with pytest.raises(TokenError) as caught:
        TokenProviders(http_timeout=5).fetch(oauth2(token_url))
    assert "ConnectionError" not in caught.value.message
    assert "5xx" not in caught.value.hint and "planted-secret" not in str(caught.value.to_dict())
    return caught.value


def test_nothing_listening_is_named_connection_refused():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again before the request: nothing listens there

    error = failure(f"http://127.0.0.1:{port}/oauth2/token")

    assert error.code == "token_unavailable" and error.retryable
    assert "connection refused" in error.message
    assert "port and host" in error.hint


def test_a_host_name_that_does_not_resolve_is_named_a_dns_failure():
    error = failure("https://login.mailbroker-test.invalid/oauth2/token")

    assert error.code == "token_unavailable"
    assert "DNS lookup failed" in error.message
    assert "host name" in error.hint


def test_an_untrusted_certificate_is_a_tls_failure_not_an_outage(token_server, monkeypatch):
    # The sandbox endpoint's CA is not in this process's trust store.
    for name in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        monkeypatch.delenv(name, raising=False)

    error = failure(token_server.oauth2_token_url)

    assert error.code == "tls_failed" and not error.retryable
    assert "certificate not trusted" in error.message
    assert "SSL_CERT_FILE" in error.hint
