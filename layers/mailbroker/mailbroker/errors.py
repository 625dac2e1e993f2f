"""Every failure mailbroker knows, classified once, here.

A failure has a stable ``code`` (a contract: see docs/design.md), a ``retryable`` flag, the HTTP
status the API answers with it, and a ``hint`` that tells an operator what to do. The HTTP API,
the direct invoke, status records and the README's troubleshooting table all read this catalogue.
Token endpoint answers and SMTP replies are mapped to codes by the two tables in this module
(``classify_token_error`` and ``classify_smtp_reply``); nothing else decides what a failure means.

Messages never carry a credential: callers pass descriptions, never tokens or secrets, and the
token classifier keeps only the provider's error code and description.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ErrorKind:
    """One code of the catalogue: whether mailbroker retries it, the HTTP status the API answers
    with it, and the hint that names the fix."""

    code: str
    retryable: bool
    http_status: int
    hint: str

    def __post_init__(self) -> None:
        if not isinstance(self.http_status, int) or not 400 <= self.http_status < 600:
            raise TypeError(f"error kind {self.code!r} needs an HTTP error status, got {self.http_status!r}")


def _kinds(*kinds: ErrorKind) -> dict[str, ErrorKind]:
    return {k.code: k for k in kinds}


# A code's HTTP status is what the HTTP API answers when the error reaches it: 4xx for a request
# the caller must change, 502 for an upstream (token endpoint, SMTP server) that refused, 503 for
# what is worth retrying as it is.
CATALOGUE: dict[str, ErrorKind] = _kinds(
    ErrorKind(
        "invalid_request",
        False,
        400,
        "The request does not match the API's schema (or, for a direct invoke, "
        '{"integration": "<id>", "force_refresh": false}): fix the fields listed in \'details\'.',
    ),
    ErrorKind(
        "not_found",
        False,
        404,
        "Nothing is recorded at this route or id: check the route against the README's HTTP API "
        "table and the id. Message status records are kept for IDEMPOTENCY_HOURS after their last "
        "change; a health record appears after the keeper's first run.",
    ),
    ErrorKind(
        "invalid_message",
        False,
        400,
        "Fix the message JSON: every problem is listed in 'details'. It will not be retried.",
    ),
    ErrorKind(
        "invalid_integration",
        False,
        400,
        "The integration's secret does not match the schema for its provider: fix the named field "
        "with 'mailbroker integration add' (it validates before writing).",
    ),
    ErrorKind(
        "unknown_integration",
        False,
        404,
        "No secret named ${SECRET_PREFIX}<id> exists: register it with 'mailbroker integration add' "
        "or correct the integration id in the message.",
    ),
    ErrorKind(
        "sender_not_allowed",
        False,
        403,
        "The 'from' address must be listed in the integration's 'senders' (or be its 'username'), "
        "and the message 'usage' must be enabled in its 'usage' list.",
    ),
    ErrorKind(
        "token_invalid_grant",
        False,
        502,
        "The grant was rejected: the refresh token expired or was revoked (6 months unused, a "
        "password change, access removed; Google apps in 'Testing' after 7 days; Microsoft delegated "
        "tokens after 90 days unused, AADSTS700082, or on sign-in frequency or revocation, 70043, "
        "50173), or a service account may not act for its subject. The user consents again "
        "('mailbroker consent google <id>' for Gmail, 'mailbroker consent microsoft <id>' for a "
        "delegated Microsoft mailbox) and the new refresh token is stored; the hint of each failure "
        "names the provider's own fix.",
    ),
    ErrorKind(
        "token_invalid_client",
        False,
        502,
        "The client id or secret was rejected (AADSTS7000215: secret value wrong — use the secret's "
        "Value, not its ID; AADSTS7000222: secret expired; unauthorized_client: the app may not use "
        "this grant). Create a new secret and update the integration.",
    ),
    ErrorKind(
        "token_certificate_mismatch",
        False,
        502,
        "client_certificate.private_key is not the key of client_certificate.certificate (or is not "
        "an unencrypted PEM key): store the key and certificate of one pair, or make a new pair with "
        "'mailbroker cert create <id>' and upload its certificate to the app registration.",
    ),
    ErrorKind(
        "token_certificate_unknown",
        False,
        502,
        "Entra does not know the certificate that signed the client assertion (AADSTS700027): upload "
        "the certificate file 'mailbroker cert create <id>' wrote to the app registration > "
        "Certificates & secrets > Certificates, and check tenant_id and client_id. For subject-name/"
        "issuer authentication set client_certificate.send_x5c to true.",
    ),
    ErrorKind(
        "token_certificate_expired",
        False,
        502,
        "The client certificate has expired (its notAfter has passed, or Entra answered AADSTS700027 "
        "'key used is expired'): make a new pair with 'mailbroker cert create <id>', upload the new "
        "certificate to the app registration, then remove the old one.",
    ),
    ErrorKind(
        "federation_disabled",
        False,
        502,
        "AWS outbound identity federation is not enabled in this account, so STS GetWebIdentityToken "
        "gives the function no JWT: run 'aws iam enable-outbound-web-identity-federation' once per "
        "account, then 'mailbroker setup microsoft <id> --federated' or 'mailbroker setup google <id> "
        "--workload-identity' to see the issuer URL to trust.",
    ),
    ErrorKind(
        "federation_not_permitted",
        False,
        502,
        "The function's role may not call sts:GetWebIdentityToken for this audience: deploy the stack "
        "with the audience in the KeylessAudiences parameter (api://AzureADTokenExchange for Entra, "
        "https://iam.googleapis.com/projects/... for a Google workload identity provider).",
    ),
    ErrorKind(
        "token_federation_mismatch",
        False,
        502,
        "The provider did not accept the function's AWS web identity token: its issuer, subject (the "
        "role ARN) or audience does not match what was registered (Entra: a federated identity "
        "credential on the app registration, AADSTS70021/700211/700212/700213; Google: the workload "
        "identity pool provider's issuer, allowed audience and attribute condition). 'mailbroker setup "
        "microsoft <id> --federated' or 'mailbroker setup google <id> --workload-identity' prints the "
        "exact values.",
    ),
    ErrorKind(
        "token_impersonation_denied",
        False,
        502,
        "Google IAM refused to let the workload identity act as the service account "
        "(iam.serviceAccounts.getAccessToken or iam.serviceAccounts.signJwt denied): grant the pool's "
        "principal roles/iam.workloadIdentityUser and the service account roles/iam."
        "serviceAccountTokenCreator on itself ('mailbroker setup google <id> --workload-identity' "
        "prints both commands), and enable the IAM Service Account Credentials API.",
    ),
    ErrorKind(
        "token_unavailable",
        True,
        503,
        "The token endpoint did not answer usefully (5xx, 429 or timeout). Retried with back-off; "
        "if it persists, check the provider's status page and the endpoint URL.",
    ),
    ErrorKind(
        "token_scope_invalid",
        False,
        502,
        "The provider refused the requested scope: Microsoft needs "
        "'https://outlook.office365.com/.default' with the SMTP.SendAsApp application permission "
        "granted; Google needs 'https://mail.google.com/'.",
    ),
    ErrorKind(
        "tenant_not_found",
        False,
        502,
        "Entra ID has no tenant by the integration's tenant_id (AADSTS90002, 900023): set it to the "
        "Directory (tenant) ID from the Entra admin center > Overview, or a verified domain of the "
        "tenant.",
    ),
    ErrorKind(
        "app_not_found",
        False,
        502,
        "The provider knows no application with the integration's client id in that tenant or "
        "project (AADSTS700016; Google: 'The OAuth client was not found'): check client_id and "
        "tenant_id, and that an admin of the tenant consented to the app.",
    ),
    ErrorKind(
        "consent_required",
        False,
        502,
        "The app holds no grant for the mailbox: Microsoft — an admin grants Office 365 Exchange "
        "Online > SMTP.SendAsApp at https://login.microsoftonline.com/<tenant>/adminconsent?client_id="
        "<client id>; Google service account — Admin console > Security > API controls > Manage "
        "Domain Wide Delegation, scope https://mail.google.com/.",
    ),
    ErrorKind(
        "sign_in_blocked",
        False,
        502,
        "The provider refused the sign-in by policy: Microsoft — security defaults or a Conditional "
        "Access policy (Entra admin center > Identity > Overview > Properties > Manage security "
        "defaults); Google — an unusual sign-in, cleared by signing in once in a browser.",
    ),
    ErrorKind(
        "basic_auth_disabled",
        False,
        502,
        "The server no longer accepts a password for SMTP AUTH: move the integration to OAuth "
        "(provider 'microsoft' or 'google'; 'mailbroker setup microsoft <id>' or 'mailbroker consent "
        "google <id>').",
    ),
    ErrorKind(
        "smtp_not_authenticated",
        False,
        502,
        "The server took the message as anonymous (530 5.7.57; Gmail 530 5.7.0): submit through the "
        "provider's submission host (smtp.office365.com or smtp.gmail.com, port 587 STARTTLS), not "
        "an MX host, with SMTP AUTH enabled for the mailbox.",
    ),
    ErrorKind(
        "quota_exceeded",
        True,
        503,
        "The mailbox reached the provider's sending quota (Gmail 550 5.4.5: 2,000 messages a day; "
        "Exchange Online 5.1.90 / SubmissionQuotaExceededException: 10,000 recipients a day, 30 "
        "messages a minute). Retried when the quota window allows, with the integration slowed "
        "down; lower its limits or spread the mail over more mailboxes.",
    ),
    ErrorKind(
        "account_blocked",
        False,
        502,
        "The provider blocked the mailbox from sending (Exchange OutboundSpamException / 5.1.8 bad "
        "outbound sender): secure the account, then release it in the Microsoft Defender portal > "
        "Email & collaboration > Review > Restricted entities (Remove-BlockedSenderAddress).",
    ),
    ErrorKind(
        "smtp_auth_failed",
        False,
        502,
        "The server refused the token even after a fresh one. Microsoft 365: the Exchange service "
        "principal is missing or lacks mailbox permission — run 'mailbroker setup microsoft <id>' "
        "for the New-ServicePrincipal and Add-MailboxPermission commands (use the Enterprise "
        "Application's object id). Google: the token's user must be the mailbox.",
    ),
    ErrorKind(
        "smtp_auth_disabled",
        False,
        502,
        "SMTP AUTH is disabled for the tenant or mailbox (535 5.7.139), or security defaults block "
        "it: Set-CASMailbox -Identity <mailbox> -SmtpClientAuthenticationDisabled $false.",
    ),
    ErrorKind(
        "send_as_denied",
        False,
        502,
        "The mailbox may not send as this 'from' address (SendAsDenied): grant it with "
        "Add-RecipientPermission <from> -AccessRights SendAs -Trustee <service principal>.",
    ),
    ErrorKind(
        "throttled",
        True,
        503,
        "The server asked to slow down (432 4.3.2, 421, 451 4.7.x, 454 4.7.0, 450 4.2.1; HTTP 429 "
        "or Gmail rateLimitExceeded). Retried with back-off, never sooner than its Retry-After; "
        "lower the integration's limits if it recurs (Microsoft 365: 30 msg/min, 3 SMTP connections "
        "or 4 Graph requests at once per mailbox).",
    ),
    ErrorKind(
        "recipient_rejected",
        False,
        502,
        "The server refused this recipient (550/553 on RCPT): check the address; the other "
        "recipients were delivered.",
    ),
    ErrorKind(
        "message_too_large",
        False,
        502,
        "The message exceeds the server's size limit (SMTP 552 or the EHLO SIZE; Graph 413 / "
        "ErrorMessageSizeExceeded or its 4 MB request limit; Gmail's 35 MB): send smaller "
        "attachments or a link instead.",
    ),
    ErrorKind(
        "smtp_transient",
        True,
        503,
        "A temporary SMTP failure (other 4xx, dropped connection or timeout). Retried with back-off.",
    ),
    ErrorKind(
        "smtp_permanent",
        False,
        502,
        "The server refused the message permanently (5xx): its reply is in 'message'.",
    ),
    ErrorKind(
        "tls_failed",
        False,
        502,
        "TLS could not be established or the certificate is not trusted. Certificates are always "
        "verified: install a private CA through SSL_CERT_FILE, and check host and 'security' "
        "(starttls on 587, tls on 465).",
    ),
    ErrorKind(
        "address_not_allowed",
        False,
        400,
        "The SMTP host or token URL resolves to a link-local or instance-metadata address, or "
        "'security: none' points off loopback: credentials are never sent there.",
    ),
    ErrorKind(
        "delivery_uncertain",
        False,
        502,
        "The connection was lost after the message body was sent but before the server's reply: "
        "the server may have accepted it. It is not resent automatically, to avoid a duplicate; "
        "check the recipient's mailbox, then re-drive it from the dead-letter queue if it is missing.",
    ),
    # --- the HTTP transports (Microsoft Graph sendMail, Gmail API users.messages.send) ---------
    ErrorKind(
        "api_auth_failed",
        False,
        502,
        "The mail API refused the access token even after a fresh one (401). Graph needs a token "
        "for 'https://graph.microsoft.com' (scope https://graph.microsoft.com/.default, set by "
        "transport 'graph'), not an Outlook/SMTP token; Gmail needs the mailbox's own token "
        "(username, or the service account's subject). 'mailbroker doctor <id>' shows the claims.",
    ),
    ErrorKind(
        "graph_access_denied",
        False,
        502,
        "Graph answered 403 ErrorAccessDenied: the app lacks the Mail.Send application permission "
        "(SMTP.SendAsApp does not count), admin consent is missing, or an application access policy "
        "or RBAC for Applications leaves this mailbox out. 'mailbroker setup microsoft <id> "
        "--transport graph' prints the grants, e.g. Test-ApplicationAccessPolicy -Identity <mailbox> "
        "-AppId <client_id> and New-ManagementRoleAssignment -App <service principal> "
        "-Role 'Application Mail.Send' -CustomResourceScope <scope>.",
    ),
    ErrorKind(
        "mailbox_not_found",
        False,
        502,
        "The API does not know this mailbox (Graph 404 ErrorInvalidUser or "
        "MailboxNotEnabledForRESTAPI: wrong username, an unlicensed, soft-deleted or on-premises "
        "mailbox; Gmail 404). Fix the integration's username or license the mailbox.",
    ),
    ErrorKind(
        "api_access_denied",
        False,
        502,
        "The mail API refused this mailbox (403) for a reason other than the token's scope, e.g. "
        "a Workspace domain policy that blocks API access: its answer is in 'message'.",
    ),
    ErrorKind(
        "gmail_insufficient_scope",
        False,
        502,
        "Gmail answered 403 insufficientPermissions: the token lacks "
        "https://www.googleapis.com/auth/gmail.send (or https://mail.google.com/). Refresh-token "
        "integrations: re-consent with that scope ('mailbroker consent google <id>'); service "
        "accounts: add the scope to the client's domain-wide delegation in the Admin console.",
    ),
    ErrorKind(
        "gmail_api_disabled",
        False,
        502,
        "The Gmail API is not enabled in the OAuth client's Google Cloud project (403 "
        "accessNotConfigured / SERVICE_DISABLED): enable it under APIs & Services > Library > "
        "Gmail API, wait a few minutes, and retry.",
    ),
    ErrorKind(
        "gmail_not_enabled",
        False,
        502,
        "Gmail answered 400 failedPrecondition: Gmail is not enabled for this user (Workspace Admin "
        "console > Apps > Google Workspace > Gmail: service status for the user's organisational "
        "unit), or the account has no Gmail mailbox.",
    ),
    ErrorKind(
        "gmail_quota_exceeded",
        True,
        503,
        "A Gmail daily sending quota is used up (dailyLimitExceeded; Workspace allows 2,000 messages "
        "and 10,000 recipients a day per user). Retried later, not dead-lettered at once; spread the "
        "load over more mailboxes or lower the integration's limits.",
    ),
    ErrorKind(
        "api_rejected_message",
        False,
        502,
        "The mail API refused the message as invalid (Graph 400, Gmail 400 invalidArgument): its "
        "answer is in 'message'; fix the message's addresses or headers.",
    ),
    ErrorKind(
        "api_transient",
        True,
        503,
        "A temporary failure of the mail API (5xx, or the connection failed before the request was "
        "sent). Retried with back-off.",
    ),
    ErrorKind(
        "expired",
        False,
        500,
        "The message stayed undeliverable longer than the maximum retry age; the last error is "
        "attached. Re-drive it from the dead-letter queue once the cause is fixed.",
    ),
    ErrorKind(
        "caller_not_allowed",
        False,
        403,
        "This IAM principal may not use this integration. List it in the integration's "
        "allowed_callers ('mailbroker integration add --allowed-caller ROLE_ARN --replace' adds the "
        "role's ARN for the API and its unique id, which SQS reports as SenderId, for the queue), "
        "or, for every integration's tokens, in the stack's TokenApiPrincipals parameter.",
    ),
    ErrorKind(
        "aws_unavailable",
        True,
        503,
        "An AWS dependency (DynamoDB, Secrets Manager, SQS, KMS) was throttled or unavailable. "
        "Retried with back-off.",
    ),
    ErrorKind(
        "internal_error",
        False,
        500,
        "An unexpected error (a bug), logged with its stack trace, without credentials. A message "
        "that meets one fails at once, dead-lettered rather than retried for a day: once the cause "
        "is fixed, `mailbroker dlq redrive --id ID`.",
    ),
)


class MailbrokerError(Exception):
    """A classified failure. ``str()`` and ``to_dict()`` never contain a credential."""

    code: str = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        details: list[dict[str, Any]] | None = None,
        retry_after: float | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        if self.code not in CATALOGUE:
            raise ValueError(f"unknown error code {self.code!r}")
        self.message = message
        self.details = details or []
        self.retry_after = retry_after
        self._hint = hint

    @property
    def kind(self) -> ErrorKind:
        return CATALOGUE[self.code]

    @property
    def retryable(self) -> bool:
        return self.kind.retryable

    @property
    def hint(self) -> str:
        return self._hint or self.kind.hint

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "code": self.code,
            "message": self.message,
            "hint": self.hint,
            "retryable": self.retryable,
        }
        if self.details:
            body["details"] = self.details
        if self.retry_after is not None:
            body["retry_after"] = self.retry_after
        return body


class InvalidRequest(MailbrokerError):
    """A request (HTTP body, path or direct-invoke event) that does not match the API's schema."""

    code = "invalid_request"


class NotFound(MailbrokerError):
    """Nothing at this route, or no record for this id."""

    code = "not_found"


class InvalidMessage(MailbrokerError):
    code = "invalid_message"


class InvalidIntegration(MailbrokerError):
    code = "invalid_integration"


class UnknownIntegration(MailbrokerError):
    code = "unknown_integration"


class SenderNotAllowed(MailbrokerError):
    code = "sender_not_allowed"


class TokenError(MailbrokerError):
    """A failure to obtain an access token; the code says which."""

    code = "token_unavailable"


class TokenUnavailable(TokenError):
    code = "token_unavailable"


class AddressNotAllowed(MailbrokerError):
    code = "address_not_allowed"


class AwsUnavailable(MailbrokerError):
    code = "aws_unavailable"


def aws_error_code(exc: BaseException) -> str:
    """The AWS error code of a botocore ``ClientError`` (else the exception's class name)."""
    return str(getattr(exc, "response", {}).get("Error", {}).get("Code", type(exc).__name__))


def aws_failure(exc: BaseException, what: str) -> AwsUnavailable:
    """An AWS call that failed, as ``aws_unavailable``: ``what`` names the call, the AWS error code
    follows. Nothing from the request or the response body is included."""
    return AwsUnavailable(f"{what} failed: {aws_error_code(exc)}")


@dataclass(frozen=True)
class SmtpReply:
    """One SMTP reply: the basic code, the RFC 3463 enhanced status code if any, and the text."""

    code: int
    text: str = ""
    enhanced: str | None = field(default=None)

    @classmethod
    def parse(cls, code: int, message: bytes | str) -> SmtpReply:
        text = message.decode("utf-8", "replace") if isinstance(message, bytes) else message
        match = _ENHANCED.match(text.strip())
        return cls(code=code, text=text.strip(), enhanced=match.group(1) if match else None)

    def __str__(self) -> str:
        return f"{self.code} {self.text}".strip()


_ENHANCED = re.compile(r"^([245]\.\d{1,3}\.\d{1,3})\b")


class SmtpFailure(MailbrokerError):
    """A classified SMTP failure, with the reply (if the server gave one) and the stage."""

    def __init__(
        self,
        message: str,
        *,
        code: str,
        reply: SmtpReply | None = None,
        stage: str = "",
        hint: str | None = None,
        hint_template: str | None = None,
    ) -> None:
        super().__init__(message, code=code, hint=hint)
        self.reply = reply
        self.stage = stage
        self._template = hint_template
        if hint is None and hint_template is not None:
            self.bind({})

    @property
    def hint_template(self) -> str | None:
        return self._template

    def bind(self, context: dict[str, str]) -> SmtpFailure:
        """Name what the hint can name (mailbox, integration, client_id, tenant) from ``context``;
        later calls add to what earlier ones named."""
        from mailbroker.diagnosis import render_hint

        if self._template is not None:
            self._context = {**getattr(self, "_context", {}), **{k: v for k, v in context.items() if v}}
            self._hint = render_hint(self._template, self._context)
        return self

    def to_dict(self) -> dict[str, Any]:
        body = super().to_dict()
        if self.reply is not None:
            body["reply"] = scrub(str(self.reply))
        if self.stage:
            body["stage"] = self.stage
        return body


# --- token endpoint answers -------------------------------------------------------------------

_AADSTS = re.compile(r"\bAADSTS(\d{5,8})\b")
# The client assertion's certificate is not one the app registration holds (or has expired there).
_AAD_CERTIFICATE = {700027}
# A delegated refresh token that can no longer be redeemed: expired after 90 days idle (700082),
# sign-in frequency (70043), password change or revocation (50173, 50132), consent withdrawn (65001).
_AAD_RECONSENT = {700082, 70043, 50173, 50132, 65001, 70000, 70008}
DELEGATED_RECONSENT_HINT = (
    "Microsoft no longer accepts the user's refresh token (AADSTS700082: unused for 90 days; 70043 "
    "or 50173: sign-in frequency, password change or revoked sessions; 65001: consent withdrawn). "
    "The user signs in again: 'mailbroker consent microsoft <id>' (device code, or --browser)."
)


def classify_token_error(
    *,
    status: int | None = None,
    error: str | None = None,
    description: str | None = None,
    error_codes: list[int] | None = None,
    retry_after: float | None = None,
    provider: str = "",
    context: dict[str, str] | None = None,
) -> TokenError:
    """Map a token endpoint answer (RFC 6749 §5.2 error, HTTP status, or a transport failure
    given as ``status=None, error=None``) to a classified :class:`TokenError`.

    The provider's identifiers decide (``diagnosis.TOKEN_SIGNATURES``): AADSTS numbers from
    ``error_codes`` or the description, Google's ``error`` and documented descriptions. ``context``
    (integration, tenant, client_id, mailbox, authority) fills the hint's names."""
    from mailbroker.diagnosis import match_token, render_hint

    codes = set(error_codes or []) | {int(n) for n in _AADSTS.findall(description or "")}
    desc = scrub(description or "")
    what = f"{provider} token endpoint".strip()
    if codes & _AAD_CERTIFICATE:
        expired = "expired" in desc.lower()
        return TokenError(
            f"{what} refused the client certificate: {desc}".rstrip(": "),
            code="token_certificate_expired" if expired else "token_certificate_unknown",
        )
    if provider == "microsoft_delegated" and (error == "invalid_grant" or codes & _AAD_RECONSENT):
        return TokenError(
            f"{what} answered invalid_grant: {desc}".rstrip(": "),
            code="token_invalid_grant",
            hint=DELEGATED_RECONSENT_HINT,
        )
    if status == 429 or error in {"temporarily_unavailable", "slow_down"}:
        return TokenUnavailable(
            f"{what} is throttling (HTTP {status or 429}); retry after {retry_after or 'a while'} s",
            retry_after=retry_after,
        )
    if status is None and error is None:
        return TokenUnavailable(f"{what} could not be reached: {desc}".rstrip(": "))
    if status is not None and status >= 500 and not codes:
        return TokenUnavailable(f"{what} failed with HTTP {status}", retry_after=retry_after)
    signature = match_token(provider, error, codes, description or "")
    told = f"{what} answered {error or f'HTTP {status}'}: {desc}".rstrip(": ")
    if signature is not None:
        known = dict(context or {})
        if codes:
            known.setdefault("aadsts", str(min(codes)))
        hint = render_hint(signature.hint, known) if signature.hint else None
        if signature.code == "token_unavailable":
            return TokenUnavailable(told, retry_after=retry_after, hint=hint)
        return TokenError(told, code=signature.code, hint=hint)
    if error:
        # An RFC 6749 error we do not know more about is a configuration problem, not transient.
        return TokenError(told, code="token_invalid_client")
    return TokenUnavailable(f"{what} answered HTTP {status} without a token", retry_after=retry_after)


def _causes(exc: BaseException) -> list[BaseException]:
    """``exc`` and what it wraps: causes, contexts and exceptions carried in args (urllib3's
    ``MaxRetryError.reason``, requests wrapping urllib3), without looping."""
    seen: list[BaseException] = []
    todo: list[BaseException] = [exc]
    while todo and len(seen) < 20:
        current = todo.pop(0)
        if any(current is known for known in seen):
            continue
        seen.append(current)
        wrapped = [current.__cause__, current.__context__, getattr(current, "reason", None)]
        wrapped += [arg for arg in current.args if isinstance(arg, BaseException)]
        todo += [w for w in wrapped if isinstance(w, BaseException)]
    return seen


def classify_transport_error(exc: BaseException, provider: str = "") -> TokenError:
    """A token endpoint that could not be talked to, named by what went wrong: the host name does
    not resolve (DNS), nothing listens there (connection refused), TLS failed or the certificate is
    not trusted, or it did not answer in time. Each has its own hint; only TLS is not retried."""
    import socket
    import ssl

    what = f"{provider} token endpoint".strip()
    causes = _causes(exc)
    names = {type(c).__name__ for c in causes}
    if any(isinstance(c, ssl.SSLCertVerificationError) for c in causes):
        reason = next(c.verify_message for c in causes if isinstance(c, ssl.SSLCertVerificationError))
        return TokenError(f"{what}: TLS certificate not trusted: {_scrub(str(reason))}", code="tls_failed")
    if any(isinstance(c, ssl.SSLError) for c in causes) or "SSLError" in names:
        return TokenError(f"{what}: TLS handshake failed", code="tls_failed")
    if any(isinstance(c, socket.gaierror) for c in causes) or "NameResolutionError" in names:
        return TokenUnavailable(
            f"{what} could not be reached: DNS lookup failed (the host name does not resolve)",
            hint="Check the host name in the integration's authority, token_uri or token_url, and this "
            "machine's DNS and network (offline?). Retried with back-off.",
        )
    if any(isinstance(c, ConnectionRefusedError) for c in causes):
        return TokenUnavailable(
            f"{what} could not be reached: connection refused (nothing listens at that host and port)",
            hint="Check the port and host of the integration's authority, token_uri or token_url, and any "
            "proxy or firewall in between. Retried with back-off.",
        )
    if any(isinstance(c, TimeoutError | socket.timeout) for c in causes) or names & {
        "Timeout", "ReadTimeout", "ConnectTimeout", "ReadTimeoutError", "ConnectTimeoutError"
    }:  # fmt: skip
        return TokenUnavailable(
            f"{what} did not answer in time",
            hint="The endpoint or the network is slow or dropping packets: check the network, a proxy or "
            "firewall, and the provider's status page. Retried with back-off.",
        )
    return TokenUnavailable(
        f"{what} could not be reached: {type(exc).__name__}",
        hint="The connection failed before any answer: check the network and the endpoint URL. "
        "Retried with back-off.",
    )


# --- redaction ------------------------------------------------------------------------------------

# What can authenticate, by shape: a JWT (three base64url parts, the first a JSON header), Google's
# access and refresh tokens, an XOAUTH2 initial response (base64 of "user=..."), an HTTP
# Authorization value, and a long run mixing upper case, lower case and digits with no dots
# (an opaque secret). Identifiers stay: Exchange's SendAsDeniedException.MapiExceptionSendAsDenied,
# host names such as AM6PR0732BE0065.eurprd07.prod.outlook.com, GUIDs, trace and correlation ids.
_CREDENTIAL_SHAPES = re.compile(
    r"eyJ[\w-]{8,}\.[\w-]{8,}\.[\w-]*"
    r"|ya29\.[\w.-]+"
    r"|1//[\w-]{10,}"
    r"|dXNlcj[A-Za-z0-9+/]{16,}={0,2}"
    r"|(?i:\b(?:bearer|basic)\s+)[\w~+/.=-]{8,}"
    r"|(?<![\w~+/=-])(?=[\w~+/=-]*[A-Z])(?=[\w~+/=-]*[a-z])(?=[\w~+/=-]*\d)[\w~+/=-]{32,}"
)
_KNOWN_SECRETS: dict[str, None] = {}
_MAX_KNOWN_SECRETS = 512


def remember_secret(value: str) -> None:
    """Make ``value`` (a secret, password, token this process holds) redacted wherever it shows
    up in an error. The newest 512 are kept."""
    if len(value) < 8:
        return
    _KNOWN_SECRETS.pop(value, None)
    _KNOWN_SECRETS[value] = None
    while len(_KNOWN_SECRETS) > _MAX_KNOWN_SECRETS:
        del _KNOWN_SECRETS[next(iter(_KNOWN_SECRETS))]


def scrub(text: str, *, limit: int = 500) -> str:
    """Provider prose made safe to keep: every known secret value and everything shaped like a
    credential is replaced by ``[redacted]``; identifiers are kept."""
    for secret in list(_KNOWN_SECRETS):
        if secret in text:
            text = text.replace(secret, "[redacted]")
    return _CREDENTIAL_SHAPES.sub("[redacted]", text)[:limit]


_scrub = scrub


# --- SMTP replies --------------------------------------------------------------------------------


def classify_smtp_reply(reply: SmtpReply, stage: str, context: dict[str, str] | None = None) -> SmtpFailure:
    """Classify an SMTP reply received at ``stage`` (greeting, ehlo, starttls, auth, mail, rcpt,
    data, body, quit) into an :class:`SmtpFailure`, by the provider's documented identifiers
    (``diagnosis.SMTP_SIGNATURES``); else by its first digit."""
    from mailbroker.diagnosis import match_smtp

    signature = match_smtp(reply.code, reply.enhanced or "", stage, reply.text)
    if signature is None:
        code = "smtp_transient" if 400 <= reply.code < 500 else "smtp_permanent"
        template = None
        retry_after = None
    else:
        code, template, retry_after = signature.code, signature.hint, signature.retry_after
    failure = SmtpFailure(
        f"{stage}: {scrub(str(reply))}", code=code, reply=reply, stage=stage, hint_template=template
    )
    failure.retry_after = retry_after
    if context:
        failure.bind(context)
    return failure


def smtp_connection_failure(stage: str, exc: BaseException, *, after_body: bool = False) -> SmtpFailure:
    """Classify a socket-level failure (reset, timeout, TLS) at ``stage``."""
    import ssl

    if after_body:
        return SmtpFailure(
            f"{stage}: connection lost after the message body, before the server's reply "
            f"({type(exc).__name__})",
            code="delivery_uncertain",
            stage=stage,
        )
    if isinstance(exc, ssl.SSLCertVerificationError):
        return SmtpFailure(
            f"{stage}: certificate not trusted: {exc.verify_message}", code="tls_failed", stage=stage
        )
    if isinstance(exc, ssl.SSLError):
        return SmtpFailure(
            f"{stage}: TLS failed: {exc.reason or type(exc).__name__}", code="tls_failed", stage=stage
        )
    return SmtpFailure(
        f"{stage}: {type(exc).__name__}: {scrub(str(exc))}".rstrip(": "), code="smtp_transient", stage=stage
    )


def classify_exception(exc: BaseException) -> MailbrokerError:
    """Any exception as a classified error (unknown ones become ``internal_error``)."""
    if isinstance(exc, MailbrokerError):
        return exc
    return MailbrokerError(f"unexpected {type(exc).__name__}", code="internal_error")
