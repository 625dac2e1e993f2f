"""The classification tables (diagnosis.py) and the redaction of provider text (errors.scrub):
identifiers decide the code and the hint; only what can authenticate is removed."""

from __future__ import annotations

import base64

import pytest
from mailbroker.diagnosis import SMTP_SIGNATURES, TOKEN_SIGNATURES, codes_used, render_hint
from mailbroker.errors import (
    CATALOGUE,
    SmtpReply,
    classify_smtp_reply,
    classify_token_error,
    remember_secret,
    scrub,
)


def test_every_code_the_tables_produce_is_in_the_catalogue() -> None:
    assert codes_used() <= set(CATALOGUE)
    assert len(TOKEN_SIGNATURES) > 10 and len(SMTP_SIGNATURES) > 30


@pytest.mark.parametrize(
    "identifier",
    [
        "SendAsDeniedException.MapiExceptionSendAsDenied",
        "STOREDRV.Submission.Exception:SubmissionQuotaExceededException",
        "AM6PR0732BE0065.eurprd07.prod.outlook.com",
        "PH0PR11MB4902.namprd11.prod.outlook.com",
        "Trace ID: 1744a1f9-90fb-478b-acf5-d3b981e16900",
        "RESOLVER.ADR.RecipientNotFound",
    ],
)
def test_redaction_keeps_identifiers_an_operator_or_support_needs(identifier: str) -> None:
    assert scrub(f"554 5.2.0 {identifier}; Failed to process message") == (
        f"554 5.2.0 {identifier}; Failed to process message"
    )


@pytest.mark.parametrize(
    "credential",
    [
        "eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiJ9.eyJhdWQiOiJodHRwczovL291dGxvb2sifQ.c2lnbmF0dXJlLXBhcnQ",
        "ya29.a0AfB_byC1234567890abcdefghijklmnopqrstuvwxyz",
        "1//0gLq3Wz8mNp-CgYIARAAGBASNwF-L9Ir",
        base64.b64encode(b"user=support@contoso.com\x01auth=Bearer abc.def\x01\x01").decode(),
        "Q8x~7Rk2pLm9Nq4Tv6Wy1Zb3Cd5Ef8Gh0Jk2Lm",
    ],
)
def test_redaction_removes_what_can_authenticate(credential: str) -> None:
    scrubbed = scrub(f"535 5.7.3 refused {credential} here")
    assert credential not in scrubbed
    assert "[redacted]" in scrubbed and scrubbed.startswith("535 5.7.3 refused")


def test_a_known_secret_value_is_removed_whatever_its_shape() -> None:
    remember_secret("hunter2-is-not-a-good-password")
    assert scrub("bad: hunter2-is-not-a-good-password!") == "bad: [redacted]!"
    assert scrub(f"Authorization: Bearer {'x' * 12}") == "Authorization: [redacted]"


def test_the_same_5_2_0_is_told_apart_by_the_exception_exchange_names() -> None:
    def code(text: str) -> str:
        return classify_smtp_reply(SmtpReply.parse(554, text), "body").code

    assert code("5.2.0 STOREDRV.Submission.Exception:SendAsDeniedException.MapiExceptionSendAsDenied") == (
        "send_as_denied"
    )
    assert code("5.2.0 STOREDRV.Submission.Exception:OutboundSpamException; WASCL") == "account_blocked"
    assert code("5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException") == "quota_exceeded"
    assert code("5.2.0 STOREDRV.Submission.Exception:SomethingElseException") == "smtp_permanent"


def test_the_same_535_5_7_139_is_told_apart_by_its_reason() -> None:
    def code(reason: str) -> str:
        return classify_smtp_reply(
            SmtpReply.parse(535, f"5.7.139 Authentication unsuccessful, {reason}"), "auth"
        ).code

    assert code("SmtpClientAuthentication is disabled for the Tenant.") == "smtp_auth_disabled"
    assert code("user is locked by your organization's security defaults policy.") == "sign_in_blocked"
    assert code("basic authentication is disabled.") == "basic_auth_disabled"
    assert code("the user credentials were incorrect.") == "smtp_auth_failed"


def test_a_quota_reply_is_retryable_with_the_providers_window() -> None:
    failure = classify_smtp_reply(
        SmtpReply.parse(550, "5.4.5 Daily user sending limit exceeded. - gsmtp"), "mail"
    )
    assert (failure.code, failure.retryable, failure.retry_after) == ("quota_exceeded", True, 3600.0)


def test_a_hint_names_the_mailbox_once_it_is_known() -> None:
    failure = classify_smtp_reply(
        SmtpReply.parse(
            535, "5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Mailbox."
        ),
        "auth",
    )
    assert "-Identity <mailbox>" in failure.hint
    failure.bind({"mailbox": "support@contoso.com"})
    assert (
        "Set-CASMailbox -Identity support@contoso.com -SmtpClientAuthenticationDisabled $false"
        in failure.hint
    )


def test_invalid_client_hints_follow_the_provider_and_the_aadsts_number() -> None:
    context = {
        "tenant": "contoso",
        "client_id": "app-1",
        "integration": "m365",
        "authority": "https://login.example",
    }
    not_in_tenant = classify_token_error(
        status=400, error="unauthorized_client", error_codes=[700016], provider="microsoft", context=context
    )
    wrong_secret = classify_token_error(
        status=401,
        error="invalid_client",
        description="AADSTS7000215: Invalid client secret",
        provider="microsoft",
    )
    no_delegation = classify_token_error(
        status=401, error="unauthorized_client", provider="google_service_account", context=context
    )

    assert not_in_tenant.code == "app_not_found"
    # login.example is not a Microsoft sign-in host: the hint names the Entra admin center instead.
    assert "adminconsent" not in not_in_tenant.hint and "Grant admin consent" in not_in_tenant.hint
    on_microsoft = classify_token_error(
        status=400,
        error="unauthorized_client",
        error_codes=[700016],
        provider="microsoft",
        context={**context, "authority": "https://login.microsoftonline.com"},
    )
    assert "https://login.microsoftonline.com/contoso/adminconsent?client_id=app-1" in on_microsoft.hint
    assert wrong_secret.code == "token_invalid_client" and "Secret ID" in wrong_secret.hint
    assert no_delegation.code == "consent_required" and "Domain Wide Delegation" in no_delegation.hint


def test_an_unknown_name_in_a_hint_stays_visible_as_a_placeholder() -> None:
    assert render_hint("run X -Identity {mailbox} for {integration}", {"integration": "m365"}) == (
        "run X -Identity <mailbox> for m365"
    )
