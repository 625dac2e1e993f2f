"""Finding 3: redirects from a token endpoint were followed without vetting. A 307 re-posts the
form (client secret, refresh token) to wherever it points; a 302 turns it into a GET.

Two real HTTPS servers on loopback, trusted through the sandbox CA: a "token endpoint" that answers
every request with a redirect, and the "collector" it points at, which records whatever reaches it.
Every provider's library (MSAL, google-auth, MSAL's generic OAuth2 client) goes through the same
session, so each is tried.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from mailbroker.errors import TokenError
from mailbroker.integrations import parse_integration
from mailbroker.tokens.providers import TokenProviders

from tests.security.test_credentials_go_only_where_they_may import integration_data

SECRET = "planted-client-secret-redirect-7f3e"
REFRESH = "planted-refresh-token-redirect-19ac"


class _Server:
    def __init__(self, context, answer) -> None:
        self.seen: list[tuple[str, str, bytes]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                outer.seen.append((self.command, self.path, body))
                status, headers = answer(self.path)
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_POST = _handle

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self.httpd.server_port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05})

    def __enter__(self) -> _Server:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.thread.join(timeout=5)
        self.httpd.server_close()


@pytest.fixture
def collector(sandbox_ca) -> Iterator[_Server]:
    with _Server(
        sandbox_ca.server_context(), lambda path: (200, {"Content-Type": "application/json"})
    ) as server:
        yield server


def redirector(sandbox_ca, status: int, target: str) -> _Server:
    return _Server(
        sandbox_ca.server_context(), lambda path: (status, {"Location": f"{target}/collected{path}"})
    )


def _integration(provider: str, token_url: str):
    data = integration_data(provider)
    if provider == "google":
        data.update(client_secret=SECRET, refresh_token=REFRESH, token_uri=token_url)
    elif provider == "oauth2":
        data.update(client_secret=SECRET, token_url=token_url)
    else:  # google_service_account: a signed assertion is the credential in the form
        data["service_account_info"]["token_uri"] = token_url
    return parse_integration(data)


@pytest.mark.parametrize("status", [307, 308, 302, 301, 303])
@pytest.mark.parametrize("provider", ["google", "oauth2", "google_service_account"])
def test_finding_3_token_request_does_not_follow_a_redirect(
    provider, status, sandbox_ca, ca_trust_env, collector
):
    with redirector(sandbox_ca, status, collector.url) as endpoint, pytest.raises(TokenError) as refused:
        TokenProviders(http_timeout=5).fetch(_integration(provider, f"{endpoint.url}/token"))

    assert len(endpoint.seen) == 1  # the one request, to the configured endpoint
    assert collector.seen == []  # nothing reached the redirect's target: no form, no GET
    assert refused.value.code == "address_not_allowed"
    assert "redirect" in refused.value.hint
    assert SECRET not in str(refused.value.to_dict()) and REFRESH not in str(refused.value.to_dict())


@pytest.mark.parametrize("status", [307, 302])
def test_finding_3_msal_does_not_follow_a_redirect(status, sandbox_ca, ca_trust_env, collector):
    with redirector(sandbox_ca, status, collector.url) as endpoint:
        data = integration_data("microsoft")
        data.update(tenant_id="contoso", client_secret=SECRET, authority=endpoint.url)
        with pytest.raises(TokenError) as refused:
            TokenProviders(http_timeout=5).fetch(parse_integration(data))

    assert len(endpoint.seen) == 1 and collector.seen == []
    assert refused.value.code == "address_not_allowed"
