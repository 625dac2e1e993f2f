"""The corpus: real failure signatures, as the providers document them, replayed end to end.

Each signature is what Entra ID, Google's OAuth endpoints, Exchange Online or Gmail answer, word
for word, to a mailbox that meets that failure (sources: the Entra ID AADSTS error-code
reference, Exchange Online's NDR reference, SMTP AUTH troubleshooting and continuous error
throttling articles, Gmail's SMTP errors and codes reference, Google's OAuth 2.0 error
responses). The sandbox answers with it at the stage where the provider sends it — the token
endpoint or OIDC discovery, or the SMTP greeting, AUTH, MAIL, RCPT or the reply after the body —
and a queued message goes through the real sender handler. Each asserts where the message ended:
the catalogue code, the fate (``retrying`` and back on the queue, or ``failed`` and in the
dead-letter queue), and that the hint names the fix (the cmdlet, the admin console setting, the
consent command for that provider, or the wait).

The moto stack, the SMTP server and the token endpoints are shared by the module; each signature
gets an integration of its own, so tokens, governor state and faults never carry over.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from mailbroker import runtime
from mailbroker.errors import CATALOGUE

from mailbroker_sandbox.aws import PROFILE_VARIABLES, provision
from mailbroker_sandbox.smtp_server import SandboxSmtpServer
from tests.fixtures.pipeline import SENDER, MailPipeline, TokenGate

RECIPIENTS = 2  # events/message.json: ana@ and bo@example.com


@dataclass(frozen=True)
class Signature:
    """One documented failure: who sends it, where, what it says, and what mailbroker must make
    of it."""

    name: str
    provider: str  # the integration's provider type
    stage: str  # sandbox stage: token, discovery, greeting, auth, mail, rcpt, eod
    reply: int  # SMTP code, or the token endpoint's HTTP status
    text: str  # SMTP reply text, or the OAuth error_description
    code: str  # expected catalogue code
    fix: str  # a phrase the hint must contain
    error: str = ""  # OAuth "error"
    aadsts: int | None = None
    tenant: str | None = None  # discovery: the mistyped tenant_id


def smtp(name: str, provider: str, stage: str, reply: int, text: str, code: str, fix: str) -> Signature:
    return Signature(name, provider, stage, reply, text, code, fix)


def token(
    name: str,
    provider: str,
    status: int,
    error: str,
    text: str,
    code: str,
    fix: str,
    aadsts: int | None = None,
) -> Signature:
    return Signature(name, provider, "token", status, text, code, fix, error=error, aadsts=aadsts)


EXCHANGE = "microsoft"
GMAIL = "google"

CORPUS: list[Signature] = [
    # --- Exchange Online: SMTP AUTH (smtp.office365.com) -----------------------------------
    smtp(
        "exo-auth-disabled-tenant",
        EXCHANGE,
        "auth",
        535,
        "5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant. "
        "Visit https://aka.ms/smtp_auth_disabled for more information. "
        "[MN2PR15CA0045.namprd15.prod.outlook.com]",
        "smtp_auth_disabled",
        "Set-TransportConfig -SmtpClientAuthenticationDisabled $false",
    ),
    smtp(
        "exo-auth-disabled-mailbox",
        EXCHANGE,
        "auth",
        535,
        "5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Mailbox. "
        "Visit https://aka.ms/smtp_auth_disabled for more information. "
        "[BN9PR03CA0717.namprd03.prod.outlook.com]",
        "smtp_auth_disabled",
        f"Set-CASMailbox -Identity {SENDER} -SmtpClientAuthenticationDisabled $false",
    ),
    smtp(
        "exo-security-defaults",
        EXCHANGE,
        "auth",
        535,
        "5.7.139 Authentication unsuccessful, user is locked by your organization's security "
        "defaults policy. Contact your administrator. [AS9PR06CA0519.eurprd06.prod.outlook.com]",
        "sign_in_blocked",
        "Manage security defaults",
    ),
    smtp(
        "exo-conditional-access",
        EXCHANGE,
        "auth",
        535,
        "5.7.139 Authentication unsuccessful, the request did not meet the criteria to be "
        "authenticated successfully. Contact your administrator. [DM6PR02CA0110.namprd02.prod.outlook.com]",
        "sign_in_blocked",
        "Conditional Access",
    ),
    smtp(
        "exo-basic-auth-disabled",
        "basic",
        "auth",
        535,
        "5.7.139 Authentication unsuccessful, basic authentication is disabled. "
        "[PR3P191CA0013.EURP191.PROD.OUTLOOK.COM]",
        "basic_auth_disabled",
        "mailbroker setup microsoft",
    ),
    smtp(
        "exo-wrong-password",
        "basic",
        "auth",
        535,
        "5.7.139 Authentication unsuccessful, the user credentials were incorrect. "
        "[VI1PR0102CA0069.eurprd01.prod.exchangelabs.com]",
        "smtp_auth_failed",
        "correct the password",
    ),
    smtp(
        "exo-service-principal-missing",
        EXCHANGE,
        "auth",
        535,
        "5.7.3 Authentication unsuccessful [SN4PR0601CA0012.namprd06.prod.outlook.com]",
        "smtp_auth_failed",
        "New-ServicePrincipal -AppId client-",
    ),
    smtp(
        "exo-auth-temporary",
        EXCHANGE,
        "auth",
        454,
        "4.7.0 Temporary authentication failure [Hostname=DB8PR09MB3194.eurprd09.prod.outlook.com]",
        "throttled",
        "Retried with back-off",
    ),
    smtp(
        "exo-client-not-authenticated",
        EXCHANGE,
        "mail",
        530,
        "5.7.57 Client not authenticated to send mail. Error: 535 5.7.139 Authentication "
        "unsuccessful [AM6PR0732BE0065.eurprd07.prod.outlook.com]",
        "smtp_not_authenticated",
        "smtp.office365.com port 587",
    ),
    smtp(
        "exo-send-as-5.7.60",
        EXCHANGE,
        "mail",
        550,
        "5.7.60 SMTP; Client does not have permissions to send as this sender",
        "send_as_denied",
        "Add-RecipientPermission",
    ),
    smtp(
        "exo-bad-outbound-sender",
        EXCHANGE,
        "mail",
        550,
        "5.1.8 Access denied, bad outbound sender",
        "account_blocked",
        "Restricted entities",
    ),
    smtp(
        "exo-tenant-threshold",
        EXCHANGE,
        "mail",
        550,
        "5.7.705 Access denied, tenant has exceeded threshold",
        "account_blocked",
        "Microsoft Support",
    ),
    smtp(
        "exo-unregistered-domain",
        EXCHANGE,
        "mail",
        550,
        "5.7.750 Service unavailable. Client blocked from sending from unregistered domains.",
        "smtp_permanent",
        "Settings > Domains",
    ),
    smtp(
        "exo-sender-thread-limit",
        EXCHANGE,
        "mail",
        432,
        "4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded",
        "throttled",
        "max_connections",
    ),
    smtp(
        "exo-server-busy",
        EXCHANGE,
        "mail",
        451,
        "4.7.500 Server busy. Please try again later from [40.107.22.81]. (AS761)",
        "throttled",
        "Retried with back-off",
    ),
    smtp(
        "exo-service-unavailable",
        EXCHANGE,
        "greeting",
        421,
        "4.3.2 Service not available [DB6PR0301CA0017.eurprd03.prod.outlook.com]",
        "throttled",
        "Retried with back-off",
    ),
    smtp(
        "exo-continuous-send-as",
        EXCHANGE,
        "mail",
        550,
        "5.2.252 SendAsDenied; support@contoso.com not allowed to send as sales@contoso.com; "
        "Sender throttled due to continuous send as denied errors.",
        "send_as_denied",
        "Add-RecipientPermission",
    ),
    smtp(
        "exo-continuous-license",
        EXCHANGE,
        "mail",
        550,
        "5.2.253 Sender throttled due to continuous invalid license errors.",
        "smtp_permanent",
        "Licenses and apps",
    ),
    smtp(
        "exo-continuous-mailbox-full",
        EXCHANGE,
        "mail",
        550,
        "5.2.251 Sender throttled due to continuous mailbox full errors.",
        "smtp_permanent",
        "Sent Items",
    ),
    smtp(
        "exo-recipient-rate-limit",
        EXCHANGE,
        "rcpt",
        550,
        "5.1.90 Your message can't be sent because you've reached your daily limit for message recipients",
        "quota_exceeded",
        "recipients_per_day",
    ),
    smtp(
        "exo-recipient-not-found",
        EXCHANGE,
        "rcpt",
        550,
        "5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup",
        "recipient_rejected",
        "check the address",
    ),
    smtp(
        "exo-dbeb",
        EXCHANGE,
        "rcpt",
        550,
        "5.4.1 Recipient address rejected: Access denied. AS(201806281) "
        "[CO1NAM11FT034.eop-nam11.prod.protection.outlook.com]",
        "recipient_rejected",
        "check the address",
    ),
    smtp(
        "exo-send-as-denied",
        EXCHANGE,
        "eod",
        554,
        "5.2.0 STOREDRV.Submission.Exception:SendAsDeniedException.MapiExceptionSendAsDenied; Failed "
        "to process message due to a permanent exception with message Cannot submit message. "
        "0.35250:0A000000 [Hostname=PH0PR11MB4902.namprd11.prod.outlook.com]",
        "send_as_denied",
        "Add-RecipientPermission -Identity <from address> -Trustee support@contoso.com",
    ),
    smtp(
        "exo-submission-quota",
        EXCHANGE,
        "eod",
        554,
        "5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException; Failed to process "
        "message due to a permanent exception with message Cannot submit message. "
        "[Hostname=BY5PR11MB4305.namprd11.prod.outlook.com]",
        "quota_exceeded",
        "messages_per_minute",
    ),
    smtp(
        "exo-outbound-spam",
        EXCHANGE,
        "eod",
        554,
        "5.2.0 STOREDRV.Submission.Exception:OutboundSpamException; Failed to process message due "
        "to a permanent exception with message WASCL UserAction verdict is not None. Actual verdict "
        "is Suspend, ShowTierUpgrade. OutboundSpamException: WASCL UserAction verdict is not None. "
        "[Hostname=DM6PR11MB2587.namprd11.prod.outlook.com]",
        "account_blocked",
        "Remove-BlockedSenderAddress -SenderAddress support@contoso.com",
    ),
    smtp(
        "exo-message-too-large",
        EXCHANGE,
        "eod",
        552,
        "5.3.4 Message size exceeds fixed maximum message size",
        "message_too_large",
        "smaller attachments",
    ),
    # --- Gmail (smtp.gmail.com) ------------------------------------------------------------
    smtp(
        "gmail-daily-limit-mail",
        GMAIL,
        "mail",
        550,
        "5.4.5 Daily user sending limit exceeded. For more information on Gmail sending limits go "
        "to https://support.google.com/a/answer/166852 d2e1a72fcca58-7a2f3b sm12-20020a17 - gsmtp",
        "quota_exceeded",
        "2,000 messages",
    ),
    smtp(
        "gmail-daily-limit-rcpt",
        GMAIL,
        "rcpt",
        550,
        "5.4.5 Daily user sending limit exceeded. For more information on Gmail sending limits go "
        "to https://support.google.com/a/answer/166852 - gsmtp",
        "quota_exceeded",
        "recipients_per_day",
    ),
    smtp(
        "gmail-daily-quota",
        GMAIL,
        "mail",
        550,
        "5.4.5 Daily sending quota exceeded. - gsmtp",
        "quota_exceeded",
        "retried hourly",
    ),
    smtp(
        "gmail-bad-credentials",
        GMAIL,
        "auth",
        535,
        "5.7.8 Username and Password not accepted. For more information, go to\n"
        "5.7.8  https://support.google.com/mail/?p=BadCredentials a640c23a62f3a-ab67 - gsmtp",
        "smtp_auth_failed",
        "mailbroker consent google {integration}",
    ),
    smtp(
        "gmail-app-password-required",
        "basic",
        "auth",
        534,
        "5.7.9 Application-specific password required. For more information, go to\n"
        "5.7.9  https://support.google.com/mail/?p=InvalidSecondFactor - gsmtp",
        "basic_auth_disabled",
        "mailbroker consent google",
    ),
    smtp(
        "gmail-web-login-required",
        "basic",
        "auth",
        534,
        "5.7.14 <https://accounts.google.com/signin/continue?sarp=1&scc=1> Please log in via your "
        "web browser and\n5.7.14 then try again.\n5.7.14  Learn more at\n"
        "5.7.14  https://support.google.com/mail/answer/78754 - gsmtp",
        "sign_in_blocked",
        "https://accounts.google.com",
    ),
    smtp(
        "gmail-authentication-required",
        GMAIL,
        "mail",
        530,
        "5.7.0 Authentication Required. For more information, go to\n"
        "5.7.0  https://support.google.com/mail/?p=WantAuthError - gsmtp",
        "smtp_not_authenticated",
        "smtp.gmail.com",
    ),
    smtp(
        "gmail-relay-denied",
        GMAIL,
        "mail",
        550,
        "5.7.0 Mail relay denied [203.0.113.9]. Invalid credentials for relay for one of the "
        "domains in: contoso.com (as obtained from HELO and MAIL FROM). - gsmtp",
        "smtp_not_authenticated",
        "SMTP relay service",
    ),
    smtp(
        "gmail-try-again-later",
        GMAIL,
        "greeting",
        421,
        "4.7.0 Try again later, closing connection. (EHLO) - gsmtp",
        "throttled",
        "Retried with back-off",
    ),
    smtp(
        "gmail-unsolicited-rate",
        GMAIL,
        "mail",
        421,
        "4.7.0 Our system has detected an unusual rate of unsolicited mail originating from your IP "
        "address. To protect our users from spam, mail sent from your IP address has been "
        "temporarily blocked. - gsmtp",
        "throttled",
        "lower the integration's limits",
    ),
    smtp(
        "gmail-temporary-system-problem",
        GMAIL,
        "mail",
        451,
        "4.3.0 Mail server temporarily rejected message. - gsmtp",
        "smtp_transient",
        "Retried with back-off",
    ),
    smtp(
        "gmail-receiving-too-quickly",
        GMAIL,
        "rcpt",
        450,
        "4.2.1 The user you are trying to contact is receiving mail too quickly. Please resend your "
        "message at a later time. - gsmtp",
        "throttled",
        "Retried with back-off",
    ),
    smtp(
        "gmail-too-many-recipients",
        GMAIL,
        "rcpt",
        452,
        "4.5.3 Your message has too many recipients. For more information regarding Google's "
        "sending limits, go to https://support.google.com/mail/?p=TooManyRecipientsError - gsmtp",
        "throttled",
        "retried on their own",
    ),
    smtp(
        "gmail-no-such-user",
        GMAIL,
        "rcpt",
        550,
        "5.1.1 The email account that you tried to reach does not exist. Please try double-checking "
        "the recipient's email address for typos or unnecessary spaces. - gsmtp",
        "recipient_rejected",
        "check the address",
    ),
    smtp(
        "gmail-over-quota",
        GMAIL,
        "rcpt",
        552,
        "5.2.2 The email account that you tried to reach is over quota. - gsmtp",
        "recipient_rejected",
        "free space",
    ),
    smtp(
        "gmail-unsolicited-content",
        GMAIL,
        "eod",
        550,
        "5.7.1 [203.0.113.9] Our system has detected that this message is likely unsolicited mail. "
        "To reduce the amount of spam sent to Gmail, this message has been blocked. - gsmtp",
        "smtp_permanent",
        "DKIM",
    ),
    smtp(
        "gmail-dmarc-unauthenticated",
        GMAIL,
        "eod",
        550,
        "5.7.26 This mail has been blocked because the sender is unauthenticated. Gmail requires all "
        "senders to authenticate with either SPF or DKIM. - gsmtp",
        "smtp_permanent",
        "publish SPF",
    ),
    # --- Entra ID: OIDC discovery and the token endpoint ------------------------------------
    Signature(
        "entra-tenant-not-found",
        "microsoft",
        "discovery",
        400,
        "",
        "tenant_not_found",
        "'contosso.onmicrosoft.com'",
        tenant="contosso.onmicrosoft.com",
    ),
    Signature(
        "entra-tenant-malformed",
        "microsoft",
        "discovery",
        400,
        "",
        "tenant_not_found",
        "'contoso_prod'",
        tenant="contoso_prod",
    ),
    token(
        "entra-app-not-in-tenant",
        "microsoft",
        400,
        "unauthorized_client",
        "Application with identifier 'a1b2' was not found in the directory 'contoso'. This can "
        "happen if the application has not been installed by the administrator of the tenant or "
        "consented to by any user in the tenant. You may have sent your authentication request to "
        "the wrong tenant.",
        "app_not_found",
        # The sandbox's authority is not a Microsoft sign-in host: no consent link points at it.
        "must first consent to it: the Entra admin center (Enterprise applications > the app > "
        "Permissions > Grant admin consent)",
        aadsts=700016,
    ),
    token(
        "entra-invalid-secret",
        "microsoft",
        401,
        "invalid_client",
        "Invalid client secret provided. Ensure the secret being sent in the request is the client "
        "secret value, not the client secret ID, for a secret added to app 'a1b2'.",
        "token_invalid_client",
        "not its Secret ID",
        aadsts=7000215,
    ),
    token(
        "entra-secret-expired",
        "microsoft",
        401,
        "invalid_client",
        "The provided client secret keys for app 'a1b2' are expired. Visit the Azure portal to "
        "create new keys for your app: https://aka.ms/NewClientSecret, or consider using "
        "certificate credentials for added security: https://aka.ms/certCreds.",
        "token_invalid_client",
        "Certificates & secrets",
        aadsts=7000222,
    ),
    token(
        "entra-app-disabled",
        "microsoft",
        400,
        "unauthorized_client",
        "Application 'a1b2'(Mailer) is disabled.",
        "token_invalid_client",
        "Enabled for users to sign-in",
        aadsts=7000112,
    ),
    token(
        "entra-exchange-not-consented",
        "microsoft",
        400,
        "invalid_resource",
        "The resource principal named https://outlook.office365.com was not found in the tenant "
        "named contoso. This can happen if the application has not been installed by the "
        "administrator of the tenant or consented to by any user in the tenant. You might have "
        "sent your authentication request to the wrong tenant.",
        "consent_required",
        "SMTP.SendAsApp",
        aadsts=500011,
    ),
    token(
        "entra-invalid-scope",
        "microsoft",
        400,
        "invalid_scope",
        "The provided value for the input parameter 'scope' is not valid. The scope "
        "https://outlook.office365.com/SMTP.Send is not valid.",
        "token_scope_invalid",
        "https://outlook.office365.com/.default",
        aadsts=70011,
    ),
    token(
        "entra-transient",
        "microsoft",
        503,
        "temporarily_unavailable",
        "The service is temporarily unavailable. Please try again.",
        "token_unavailable",
        "Retried with back-off",
        aadsts=90033,
    ),
    # --- Google OAuth: a user's refresh token -------------------------------------------------
    token(
        "google-token-revoked",
        "google",
        400,
        "invalid_grant",
        "Token has been expired or revoked.",
        "token_invalid_grant",
        "Publish app",
    ),
    token(
        "google-bad-request",
        "google",
        400,
        "invalid_grant",
        "Bad Request",
        "token_invalid_grant",
        "mailbroker consent google {integration}",
    ),
    token(
        "google-client-not-found",
        "google",
        401,
        "invalid_client",
        "The OAuth client was not found.",
        "app_not_found",
        "APIs & Services > Credentials",
    ),
    token(
        "google-client-secret-wrong",
        "google",
        401,
        "invalid_client",
        "Unauthorized",
        "token_invalid_client",
        "copy the current secret",
    ),
    token(
        "google-token-of-another-client",
        "google",
        401,
        "unauthorized_client",
        "Unauthorized",
        "token_invalid_client",
        "mailbroker consent google {integration}",
    ),
    token(
        "google-client-deleted",
        "google",
        401,
        "deleted_client",
        "The OAuth client was deleted.",
        "app_not_found",
        "Deleted credentials",
    ),
    # --- Google OAuth: a service account with domain-wide delegation ------------------------
    token(
        "google-sa-no-delegation",
        "google_service_account",
        401,
        "unauthorized_client",
        "Client is unauthorized to retrieve access tokens using this method, or client not "
        "authorized for any of the scopes requested.",
        "consent_required",
        "Manage Domain Wide Delegation",
    ),
    token(
        "google-sa-unknown-subject",
        "google_service_account",
        400,
        "invalid_grant",
        "Invalid email or User ID",
        "token_invalid_grant",
        "'subject'",
    ),
    token(
        "google-sa-key-deleted",
        "google_service_account",
        400,
        "invalid_grant",
        "Invalid JWT Signature.",
        "token_invalid_client",
        "> Keys",
    ),
    token(
        "google-sa-backend-error",
        "google_service_account",
        500,
        "internal_failure",
        "Backend Error",
        "token_unavailable",
        "Retried with back-off",
    ),
    # --- any OAuth2 server -----------------------------------------------------------------
    token(
        "oauth2-client-rejected",
        "oauth2",
        401,
        "invalid_client",
        "Client authentication failed.",
        "token_invalid_client",
        "Create a new secret",
    ),
]


# ---------------------------------------------------------------------------------- harness


@pytest.fixture(scope="module")
def shared(
    moto_server: Any, template: dict[str, Any], token_server_session: Any, sandbox_ca: Any
) -> Iterator[MailPipeline]:
    """One stack, one SMTP server and the session's token endpoints for the whole corpus."""
    patch = pytest.MonkeyPatch()
    stack = provision(template, endpoint_url=moto_server.endpoint_url)
    smtp_server = None
    try:
        for name in PROFILE_VARIABLES:
            patch.delenv(name, raising=False)
        env = {**moto_server.env(), **sandbox_ca.trust_env(), **stack.function_env("SenderFunction")}
        for name, value in {**env, "TOKEN_HTTP_TIMEOUT_SECONDS": "2"}.items():
            patch.setenv(name, value)
        runtime.reset()
        gate = TokenGate(token_server_session)
        smtp_server = SandboxSmtpServer(sandbox_ca, verify_token=gate).start()

        def no_more_servers(**kwargs: Any) -> SandboxSmtpServer:
            raise AssertionError("the corpus uses one SMTP server")

        yield MailPipeline(stack, env, token_server_session, smtp_server, gate, patch, no_more_servers)
    finally:
        if smtp_server is not None:
            smtp_server.stop()
        stack.delete()
        patch.undo()
        runtime.reset()


@pytest.fixture
def pipeline(shared: MailPipeline, token_server: Any) -> Iterator[MailPipeline]:
    shared.smtp.reset()
    shared._message_ids.clear()
    shared.visibility.clear()
    shared._letters.clear()
    shared._waiting.clear()
    shared.uid = uuid.uuid4().hex[:8]
    shared.drain()
    yield shared
    shared.smtp.clear_faults()
    shared.drain()


def arrange(pipeline: MailPipeline, signature: Signature) -> str:
    """The integration meeting ``signature``, with the sandbox primed to answer with it."""
    provider, stage = signature.provider, signature.stage
    if stage == "discovery":
        integration = pipeline.add(provider, name=signature.name, tenant_id=signature.tenant)
    else:
        integration = pipeline.add(provider, name=signature.name)
    if stage == "token":
        pipeline.tokens.refuse_next(
            signature.reply,
            signature.error,
            signature.text,
            aadsts=signature.aadsts,
            times=3,
            path_contains="/token",
        )
    elif stage in ("greeting", "auth", "mail", "eod"):
        # Twice for AUTH: a refused token is tried once more, fresh.
        pipeline.smtp.fail(stage, signature.reply, signature.text, times=2)
    elif stage == "rcpt":
        pipeline.smtp.fail("rcpt", signature.reply, signature.text, times=RECIPIENTS)
    return integration


@pytest.mark.parametrize("signature", CORPUS, ids=[s.name for s in CORPUS])
def test_a_documented_failure_ends_with_its_code_fate_and_fix(
    pipeline: MailPipeline, signature: Signature
) -> None:
    # Given a mailbox that meets the failure where the provider sends it
    integration = arrange(pipeline, signature)
    message = pipeline.message(integration)

    # When its message goes through the sender
    pipeline.post(message)
    pipeline.round()

    # Then it ends with the code, the catalogue's fate, and a hint that names the fix
    outcome = pipeline.outcome(message["id"])
    assert outcome.deliveries == 0
    assert outcome.status is not None
    error = outcome.status["last_error"]
    assert error["code"] == signature.code, error
    fix = signature.fix.replace("{integration}", integration)
    assert fix in error["hint"], error["hint"]
    assert "<mailbox>" not in error["hint"] and "<integration>" not in error["hint"]
    if CATALOGUE[signature.code].retryable:
        assert outcome.state == "retrying"
        assert outcome.dead_letter is None
        assert pipeline.queue_depth() == (0, 1)
    else:
        assert outcome.state == "failed"
        assert outcome.dead_letter is not None
        assert outcome.dead_letter["error_code"] == signature.code
        assert fix in outcome.dead_letter["error_hint"]
        assert pipeline.queue_depth() == (0, 0)


def test_the_corpus_holds_at_least_forty_signatures_and_every_new_code() -> None:
    added = {
        "tenant_not_found",
        "app_not_found",
        "consent_required",
        "sign_in_blocked",
        "basic_auth_disabled",
        "smtp_not_authenticated",
        "quota_exceeded",
        "account_blocked",
    }
    assert len(CORPUS) >= 40
    assert len({s.name for s in CORPUS}) == len(CORPUS)
    assert added <= {s.code for s in CORPUS}


QUOTAS = [s for s in CORPUS if s.code == "quota_exceeded"]


@pytest.mark.parametrize("signature", QUOTAS, ids=[s.name for s in QUOTAS])
def test_a_quota_reply_waits_for_the_quota_window_and_slows_the_integration(
    pipeline: MailPipeline, signature: Signature
) -> None:
    integration = arrange(pipeline, signature)
    message = pipeline.message(integration)

    pipeline.post(message)
    pipeline.round()

    # The retry waits out the provider's window (not the schedule's first minute)...
    assert pipeline.delays()[-1] >= 900
    # ...and the governor halves the integration's pace meanwhile.
    table = pipeline.stack.client("dynamodb")
    items = table.scan(TableName=pipeline.env["MESSAGE_TABLE"])["Items"]
    slowed = [i for i in items if integration in i["pk"]["S"] and "slow_until" in i]
    assert slowed, "the governor was not slowed down"


def test_identifiers_survive_redaction_in_the_status_and_the_dead_letter(pipeline: MailPipeline) -> None:
    [signature] = [s for s in CORPUS if s.name == "exo-send-as-denied"]
    integration = arrange(pipeline, signature)
    message = pipeline.message(integration)

    pipeline.post(message)
    pipeline.round()

    outcome = pipeline.outcome(message["id"])
    for kept in (
        "SendAsDeniedException.MapiExceptionSendAsDenied",
        "PH0PR11MB4902.namprd11.prod.outlook.com",
    ):
        assert kept in outcome.status["last_error"]["message"]
        assert kept in outcome.status["last_error"]["reply"]
        assert outcome.dead_letter is not None and kept in outcome.dead_letter["error_message"]
