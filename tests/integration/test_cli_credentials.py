"""``mailbroker cert create`` and ``mailbroker consent microsoft`` against the sandbox, and what
``doctor`` says about certificate and delegated credentials."""

from __future__ import annotations

import html
import re
import threading
import webbrowser

import pytest
import requests
from mailbroker.integrations import parse_integration, unredacted

from mailbroker_cli.certificates import self_signed
from tests.integration.test_cli import cli  # noqa: F401 (the fixture)


def test_cert_create_stores_the_key_and_doctor_passes_once_the_certificate_is_uploaded(
    cli,  # noqa: F811
    tmp_path,
):
    document = cli.microsoft("cert-made")
    target = tmp_path / "upload-me.cer"

    code, out, err = cli("cert", "create", "cert-made", "--out", str(target), "--days", "90")
    stored = cli.store.get("cert-made")
    before_upload, _, _ = cli("doctor", "cert-made")
    cli.tokens.add_microsoft_certificate(document["tenant_id"], document["client_id"], target.read_text())
    after_code, after, _ = cli("doctor", "cert-made")

    key = stored.client_certificate.private_key.get_secret_value()
    assert code == 0
    assert str(target) in out and "Certificates & secrets" in err
    assert stored.client_secret is None
    assert stored.client_certificate.certificate.strip() == target.read_text().strip()
    assert "PRIVATE KEY" not in target.read_text()
    assert key not in out + err + after
    assert before_upload == 1
    assert after_code == 0, after
    assert "key matches" in after and "89 days left" in after


def test_doctor_names_a_key_that_does_not_match_its_certificate(cli):  # noqa: F811
    cli.microsoft("cert-bad")
    _, cert = self_signed("mailbroker cert-bad")
    other_key, _ = self_signed("mailbroker other")
    document = unredacted(cli.store.get("cert-bad"))
    del document["client_secret"]
    document["client_certificate"] = {"private_key": other_key, "certificate": cert}
    cli.store.put(parse_integration(document))

    code, report = cli.json("doctor", "cert-bad")

    steps = {step["name"]: step for step in report["steps"]}
    assert code == 1
    assert steps["cert"]["ok"] is False and steps["cert"]["code"] == "token_certificate_mismatch"
    assert steps["token"]["code"] == "token_certificate_mismatch"


# --- consent microsoft -----------------------------------------------------------------------------


class FormPostBrowser(webbrowser.BaseBrowser):
    """A browser at the sign-in page: it loads the consent page and submits the form it returns to
    the loopback redirect URI (Entra's form_post response mode), as a person's browser would."""

    def __init__(self, ca_file: str) -> None:
        super().__init__("mailbroker-test-form-post-browser")
        self.ca_file = ca_file
        self.failures: list[BaseException] = []

    def open(self, url: str, new: int = 0, autoraise: bool = True) -> bool:
        def visit() -> None:
            with requests.Session() as browser:
                browser.trust_env = False
                try:
                    page = browser.get(url, verify=self.ca_file, timeout=10).text
                    action = html.unescape(re.search(r'action="([^"]+)"', page).group(1))
                    fields = {
                        html.unescape(k): html.unescape(v)
                        for k, v in re.findall(r'name="([^"]+)" value="([^"]*)"', page)
                    }
                    browser.post(action, data=fields, timeout=10)
                except (requests.RequestException, AttributeError) as exc:
                    self.failures.append(exc)

        threading.Thread(target=visit, daemon=True).start()
        return True


@pytest.fixture
def form_post_browser(sandbox_ca):
    stand_in = FormPostBrowser(str(sandbox_ca.ca_cert))
    webbrowser.register(stand_in.name, None, stand_in)
    return stand_in


def _public_app(cli, client_id):  # noqa: F811 (the fixture, passed in)
    cli.tokens.register_microsoft_app("consumers", client_id, public_client=True)
    return [
        "--tenant-id", "consumers", "--client-id", client_id, "--username", "bo@outlook.example",
        "--authority", cli.tokens.microsoft_authority(), *cli.smtp_flags,
    ]  # fmt: skip


def test_consent_microsoft_device_code_stores_the_refresh_token_without_printing_it(cli):  # noqa: F811
    flags = _public_app(cli, "public-device")
    cli.smtp.add_mailbox("bo@outlook.example")
    cli.tokens.consent_user = "bo@outlook.example"  # who signs in on the other device

    code, out, err = cli("consent", "microsoft", "outlook-bo", *flags, "--timeout", "30")
    stored = cli.store.get("outlook-bo")
    doctor_code, doctor, _ = cli("doctor", "outlook-bo")

    refresh = stored.refresh_token.get_secret_value()
    assert code == 0, err
    assert "enter the code" in err and "/devicelogin" in err
    assert stored.provider == "microsoft_delegated"
    assert refresh not in out + err + doctor
    assert doctor_code == 0, doctor
    assert cli.tokens.refresh_token_reuse == 0


class _DeniedKms:
    """KMS as an operator meets it under the key policy: the token cache's context is refused."""

    def __getattr__(self, name):
        from botocore.exceptions import ClientError

        def refuse(**_):
            error = {"Error": {"Code": "AccessDeniedException", "Message": "denied by the key policy"}}
            raise ClientError(error, name)

        return refuse


def test_doctor_says_why_an_operator_cannot_open_a_delegated_credentials_token_cache(
    cli,  # noqa: F811
    monkeypatch,
):
    from mailbroker import runtime

    flags = _public_app(cli, "public-denied")
    cli.smtp.add_mailbox("bo@outlook.example")
    cli.tokens.consent_user = "bo@outlook.example"
    assert cli("consent", "microsoft", "outlook-denied", *flags, "--timeout", "30")[0] == 0
    assert cli("doctor", "outlook-denied")[0] == 0  # the newest refresh token now lives in the table
    issued = cli.tokens.issued(provider="microsoft_delegated", client_id="public-denied")
    real = runtime.aws_client
    with monkeypatch.context() as patch:
        patch.setattr(runtime, "aws_client", lambda s: _DeniedKms() if s == "kms" else real(s))
        code, report = cli.json("doctor", "outlook-denied")

    steps = {step["name"]: step for step in report["steps"]}
    assert code == 1
    assert steps["token"]["code"] == "aws_unavailable"
    assert "functions only" in steps["token"]["detail"]
    assert "POST /v1/integrations/outlook-denied/check" in steps["token"]["hint"]
    assert cli.tokens.issued(provider="microsoft_delegated", client_id="public-denied") == issued
    assert cli.tokens.refresh_token_reuse == 0


def test_consent_microsoft_for_graph_asks_for_mail_send_and_doctor_sends_nothing_through_graph(
    cli,  # noqa: F811
    mail_api_server,
):
    flags = _public_app(cli, "public-graph")
    cli.tokens.consent_user = "bo@outlook.example"
    mail_api_server.add_mailbox("bo@outlook.example")

    code, _, err = cli(
        "consent", "microsoft", "outlook-graph", *flags, "--transport", "graph", "--timeout", "30"
    )
    stored = cli.store.get("outlook-graph")
    document = unredacted(stored) | {"graph_endpoint": mail_api_server.base_url}
    cli.store.put(parse_integration(document))
    doctor_code, report = cli.json("doctor", "outlook-graph")

    steps = {step["name"]: step for step in report["steps"]}
    assert code == 0, err
    assert stored.transport == "graph"
    assert stored.scope == "https://graph.microsoft.com/Mail.Send offline_access"
    assert doctor_code == 0, report
    assert steps["role"]["detail"] == "delegated scope Mail.Send"
    assert steps["api"]["ok"] is True
    assert mail_api_server.received == []
    assert cli.tokens.refresh_token_reuse == 0


def test_consent_microsoft_in_the_browser_uses_pkce_on_a_loopback_redirect(cli, form_post_browser):  # noqa: F811
    flags = _public_app(cli, "public-browser")

    code, out, err = cli(
        "consent",
        "microsoft",
        "outlook-browser",
        *flags,
        "--browser",
        form_post_browser.name,
        "--timeout",
        "30",
    )

    stored = cli.store.get("outlook-browser")
    assert code == 0, err
    assert form_post_browser.failures == []
    assert "code_challenge_method=S256" in err and "http://localhost:" in err
    assert stored.refresh_token.get_secret_value() not in out + err
    assert cli.tokens.live_microsoft_refresh_tokens("public-browser") == 1


def test_consent_microsoft_refused_by_the_user_stores_nothing(cli):  # noqa: F811
    flags = _public_app(cli, "public-refused")
    cli.tokens.deny_consent = True

    code, _, err = cli("consent", "microsoft", "outlook-refused", *flags, "--timeout", "30")

    assert code == 2 and "declined" in err
    assert "outlook-refused" not in cli.store.list_ids()


def test_consent_microsoft_refuses_a_client_secret_on_the_command_line(cli):  # noqa: F811
    flags = _public_app(cli, "public-literal")

    code, out, err = cli("consent", "microsoft", "outlook-literal", *flags, "--client-secret", "literal-9f3e")

    assert code == 2 and "--client-secret takes '-'" in err
    assert "literal-9f3e" not in out + err
    assert "outlook-literal" not in cli.store.list_ids()
