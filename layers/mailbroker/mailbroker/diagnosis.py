"""What a provider's failure means, kept as data: the identifiers providers document, mapped to a
catalogue code and a hint that names the fix.

Two tables, read top to bottom, first match wins:

- ``TOKEN_SIGNATURES``: an answer of a token endpoint (or of Entra's OIDC discovery), matched by
  provider type, the RFC 6749 ``error``, Entra's AADSTS numbers, and where the provider documents
  one, a phrase of its ``error_description`` (Google gives no numbers, only fixed descriptions);
- ``SMTP_SIGNATURES``: an SMTP reply, matched by its basic code, its RFC 3463 enhanced status code,
  the stage of the dialogue it answered (greeting, ehlo, starttls, auth, mail, rcpt, data, body —
  the reply after the message content, for DATA and BDAT alike), and where the provider documents
  one, an identifier in the text: Exchange's ``STOREDRV`` exception names
  (``SendAsDeniedException``, ``SubmissionQuotaExceededException``, ``OutboundSpamException``) and
  the fixed reasons Exchange and Gmail append to an enhanced code that they reuse for several
  causes (``535 5.7.139``, ``550 5.4.5``).

Hints are templates: ``{integration}``, ``{mailbox}``, ``{tenant}``, ``{client_id}`` and
``{authority}`` are filled from what the caller knows (``render_hint``), and a name nobody knows
stays as ``<name>``. ``{consent_url}`` is derived from them, and is a link only on one of
Microsoft's own sign-in hosts: the authority comes from an integration secret, and a hint must not
send an administrator to someone else's site to grant consent. Every code used here is in the
catalogue of ``errors.py``; the corpus of real signatures in the integration tests replays each
row end to end.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote, urlencode, urlsplit

ANY_STAGE: frozenset[str] = frozenset()
MICROSOFT = frozenset({"microsoft", "microsoft_delegated"})
GOOGLE_USER = frozenset({"google"})
GOOGLE_SERVICE_ACCOUNT = frozenset({"google_service_account"})
GOOGLE = GOOGLE_USER | GOOGLE_SERVICE_ACCOUNT

# Retry delays that fit the providers' quota windows: Gmail's and Exchange Online's daily limits
# are rolling 24-hour windows, so capacity comes back gradually; an hour between attempts lets a
# message through as soon as the window allows without hammering a blocked mailbox.
DAILY_QUOTA_RETRY_SECONDS = 3600.0
# Exchange's submission quota (messages per minute and recipients per day per mailbox).
SUBMISSION_QUOTA_RETRY_SECONDS = 900.0

ADMIN_CONSENT_URL = "{consent_url}"
# Where consent is granted when the integration's authority is not a Microsoft sign-in host.
ENTRA_ADMIN_CONSENT = (
    "the Entra admin center (Enterprise applications > the app > Permissions > Grant admin consent)"
)
EXCHANGE_SERVICE_PRINCIPAL = (
    "New-ServicePrincipal -AppId {client_id} -ObjectId <Enterprise application Object ID> and "
    "Add-MailboxPermission -Identity {mailbox} -User <that ObjectId> -AccessRights FullAccess "
    "('mailbroker setup microsoft {integration}' prints both with the right ids)"
)


@dataclass(frozen=True)
class TokenSignature:
    """One documented token endpoint failure."""

    code: str
    hint: str
    providers: frozenset[str] = frozenset()  # empty: any provider
    error: str | None = None  # RFC 6749 "error"
    aadsts: frozenset[int] = frozenset()  # any of these Entra error codes
    says: str | None = None  # a phrase of error_description, compared case-insensitively

    def matches(self, provider: str, error: str | None, codes: set[int], description: str) -> bool:
        if self.providers and provider not in self.providers:
            return False
        if self.error is not None and self.error != error:
            return False
        if self.aadsts and not self.aadsts & codes:
            return False
        return self.says is None or self.says.casefold() in description.casefold()


@dataclass(frozen=True)
class SmtpSignature:
    """One documented SMTP reply."""

    code: str
    hint: str | None = None  # None: the catalogue's hint
    reply: int | None = None  # basic code
    enhanced: str | None = None  # exact enhanced code, or a class prefix ending in "."
    stages: frozenset[str] = ANY_STAGE
    says: str | None = None  # an identifier in the reply text, compared case-insensitively
    retry_after: float | None = None

    def matches(self, basic: int, enhanced: str, stage: str, text: str) -> bool:
        if self.reply is not None and self.reply != basic:
            return False
        if self.enhanced is not None and not _enhanced_matches(self.enhanced, enhanced):
            return False
        if self.stages and stage not in self.stages:
            return False
        return self.says is None or self.says.casefold() in text.casefold()


def _enhanced_matches(pattern: str, enhanced: str) -> bool:
    return enhanced.startswith(pattern) if pattern.endswith(".") else enhanced == pattern


def _stages(*names: str) -> frozenset[str]:
    return frozenset(names)


AUTH = _stages("auth")
ENVELOPE = _stages("mail", "rcpt")
CONTENT = _stages("data", "body")
RCPT = _stages("rcpt")

# --- token endpoints ---------------------------------------------------------------------------

TOKEN_SIGNATURES: tuple[TokenSignature, ...] = (
    # Entra ID: the tenant.
    TokenSignature(
        "tenant_not_found",
        "Entra ID has no tenant '{tenant}' at {authority}: set the integration's tenant_id to the "
        "Directory (tenant) ID shown in the Entra admin center > Overview (a GUID), or to a verified "
        "domain of that tenant, then re-register it with 'mailbroker integration add'.",
        providers=MICROSOFT,
        aadsts=frozenset({90002, 900023, 90072}),
    ),
    # Entra ID: the application.
    TokenSignature(
        "app_not_found",
        "Entra ID found no application with client id {client_id} in tenant '{tenant}' "
        "(AADSTS700016): check that client_id is the app registration's Application (client) ID and "
        "that tenant_id is the tenant the app lives in; for an app registered in another tenant, an "
        "admin of '{tenant}' must first consent to it: " + ADMIN_CONSENT_URL + ".",
        providers=MICROSOFT,
        aadsts=frozenset({700016}),
    ),
    TokenSignature(
        "token_invalid_client",
        "The application {client_id} is disabled in tenant '{tenant}' (AADSTS7000112): enable it in "
        "the Entra admin center > Enterprise applications > the app > Properties > 'Enabled for "
        "users to sign-in?' = Yes.",
        providers=MICROSOFT,
        aadsts=frozenset({7000112}),
    ),
    TokenSignature(
        "token_invalid_client",
        "The client secret has expired (AADSTS7000222): create a new one in the Entra admin center > "
        "App registrations > {client_id} > Certificates & secrets, then store its Value with "
        "'mailbroker integration add' (and set client_secret_expires_at so the keeper warns next "
        "time).",
        providers=MICROSOFT,
        aadsts=frozenset({7000222}),
    ),
    TokenSignature(
        "token_invalid_client",
        "Entra ID rejected the client secret (AADSTS7000215): store the secret's Value, not its "
        "Secret ID, from App registrations > {client_id} > Certificates & secrets, with 'mailbroker "
        "integration add'.",
        providers=MICROSOFT,
        aadsts=frozenset({7000215, 7000218, 700027}),
    ),
    # Entra ID: keyless, a federated identity credential on the app registration.
    TokenSignature(
        "token_federation_mismatch",
        "Entra found no federated identity credential on app {client_id} whose issuer matches the "
        "function's AWS token (AADSTS700211): add one whose Issuer is this account's issuer URL "
        "('aws iam get-outbound-web-identity-federation-info'); 'mailbroker setup microsoft "
        "{integration} --federated' prints the Graph call.",
        providers=MICROSOFT,
        aadsts=frozenset({700211}),
    ),
    TokenSignature(
        "token_federation_mismatch",
        "The federated identity credential on app {client_id} expects another audience (AADSTS700212): "
        "set its Audience and the integration's federated.audience to the same value "
        "(api://AzureADTokenExchange).",
        providers=MICROSOFT,
        aadsts=frozenset({700212}),
    ),
    TokenSignature(
        "token_federation_mismatch",
        "The federated identity credential on app {client_id} names another subject (AADSTS700213): "
        "its Subject must be the ARN of the function's role, exactly as 'mailbroker setup microsoft "
        "{integration} --federated' prints it (the stack's TokenBrokerRoleArn, KeeperRoleArn and "
        "SenderRoleArn outputs; one credential per role).",
        providers=MICROSOFT,
        aadsts=frozenset({700213}),
    ),
    TokenSignature(
        "token_federation_mismatch",
        "App {client_id} has no federated identity credential matching the function's AWS token "
        "(AADSTS70021): add one in App registrations > {client_id} > Certificates & secrets > "
        "Federated credentials (Other issuer), with the issuer, subject and audience 'mailbroker setup "
        "microsoft {integration} --federated' prints.",
        providers=MICROSOFT,
        aadsts=frozenset({70021}),
    ),
    TokenSignature(
        "consent_required",
        "The tenant '{tenant}' has no consent for Office 365 Exchange Online (AADSTS500011 / 65001): "
        "add the application permission Office 365 Exchange Online > SMTP.SendAsApp to app "
        "{client_id} and have an admin grant it at " + ADMIN_CONSENT_URL + ".",
        providers=MICROSOFT,
        aadsts=frozenset({500011, 65001, 90094, 90008}),
    ),
    TokenSignature(
        "token_scope_invalid",
        "Entra ID refused the scope (AADSTS70011): the client-credentials flow needs exactly "
        "'https://outlook.office365.com/.default' for SMTP; remove any other 'scope' from the "
        "integration.",
        providers=MICROSOFT,
        aadsts=frozenset({70011}),
    ),
    TokenSignature(
        "token_invalid_grant",
        "The user's refresh token for {mailbox} expired or was revoked (AADSTS{aadsts}): the user "
        "must consent again to app {client_id} in tenant '{tenant}', and the new refresh token be "
        "stored in the integration.",
        providers=MICROSOFT,
        error="invalid_grant",
    ),
    TokenSignature(
        "token_unavailable",
        "Entra ID reported a transient failure. Retried with back-off; if it persists, check "
        "https://status.cloud.microsoft and the integration's authority ({authority}).",
        providers=MICROSOFT,
        aadsts=frozenset({90033, 50196}),
    ),
    # Google: an OAuth client with a user's refresh token.
    TokenSignature(
        "app_not_found",
        "Google knows no OAuth client {client_id} (deleted, or from another project): copy the "
        "client id and secret from Google Cloud console > APIs & Services > Credentials, store them "
        "with 'mailbroker integration add', then re-consent: 'mailbroker consent google "
        "{integration}'.",
        providers=GOOGLE_USER,
        says="The OAuth client was not found",
    ),
    TokenSignature(
        "app_not_found",
        "The OAuth client {client_id} was deleted in Google Cloud console: restore it within 30 days "
        "(APIs & Services > Credentials > Deleted credentials) or create a new one, then "
        "'mailbroker consent google {integration}'.",
        providers=GOOGLE,
        error="deleted_client",
    ),
    TokenSignature(
        "token_invalid_grant",
        "Google revoked or expired the refresh token of {mailbox}. An app whose OAuth consent "
        "screen is in 'Testing' loses refresh tokens after 7 days: publish it (Google Cloud console > "
        "APIs & Services > OAuth consent screen > Publish app). Tokens also die after 6 months "
        "unused, on a password change, or when the user removes access. Then re-consent: "
        "'mailbroker consent google {integration}'.",
        providers=GOOGLE_USER,
        error="invalid_grant",
    ),
    TokenSignature(
        "token_invalid_client",
        "The refresh token was issued to another OAuth client than {client_id}: consent again with "
        "this client, 'mailbroker consent google {integration}'.",
        providers=GOOGLE_USER,
        error="unauthorized_client",
    ),
    TokenSignature(
        "token_invalid_client",
        "Google rejected the client secret of {client_id}: copy the current secret from Google Cloud "
        "console > APIs & Services > Credentials > the OAuth client, and store it with 'mailbroker "
        "integration add'.",
        providers=GOOGLE_USER,
        error="invalid_client",
    ),
    TokenSignature(
        "consent_required",
        "The Workspace admin blocks this app's access to Gmail: in the Admin console > Security > "
        "Access and data control > API controls > App access control, mark client {client_id} as "
        "Trusted, then 'mailbroker consent google {integration}'.",
        providers=GOOGLE,
        error="admin_policy_enforced",
    ),
    # Google: a service account with domain-wide delegation.
    TokenSignature(
        "consent_required",
        "The service account may not act for {mailbox}: grant domain-wide delegation in the Google "
        "Admin console > Security > Access and data control > API controls > Manage Domain Wide "
        "Delegation > Add new, with client ID {client_id} and the scope https://mail.google.com/ "
        "(it can take a few minutes to apply).",
        providers=GOOGLE_SERVICE_ACCOUNT,
        error="unauthorized_client",
    ),
    TokenSignature(
        "token_invalid_grant",
        "Google knows no Workspace user {mailbox} to impersonate: set the integration's 'subject' "
        "(and username) to an existing user of the domain that granted delegation.",
        providers=GOOGLE_SERVICE_ACCOUNT,
        error="invalid_grant",
        says="Invalid email or User ID",
    ),
    TokenSignature(
        "token_invalid_client",
        "Google no longer accepts this service account key (deleted or disabled): create a new key "
        "in Google Cloud console > IAM & Admin > Service accounts > {client_id} > Keys and store it "
        "with 'mailbroker integration add'.",
        providers=GOOGLE_SERVICE_ACCOUNT,
        error="invalid_grant",
        says="Invalid JWT Signature",
    ),
    TokenSignature(
        "token_invalid_client",
        "The service account {client_id} is disabled or deleted: enable it in Google Cloud console > "
        "IAM & Admin > Service accounts, or create a new one and its key.",
        providers=GOOGLE_SERVICE_ACCOUNT,
        error="disabled_client",
    ),
    TokenSignature(
        "token_invalid_grant",
        "Google refused the service account's assertion for {mailbox}: check that 'subject' is an "
        "active user and that delegation is granted to client {client_id} with https://mail.google.com/.",
        providers=GOOGLE_SERVICE_ACCOUNT,
        error="invalid_grant",
    ),
    # Google: keyless, the STS exchange of the AWS token through a workload identity pool provider.
    TokenSignature(
        "token_federation_mismatch",
        "Google's STS knows no enabled workload identity pool provider for this audience: check "
        "workload_identity.audience against 'gcloud iam workload-identity-pools providers describe' "
        "(the full name, with the project number).",
        providers=frozenset({"google_workload_identity"}),
        error="invalid_target",
    ),
    TokenSignature(
        "token_federation_mismatch",
        "Google's STS rejected the function's AWS token: the provider's issuer URI must be this "
        "account's issuer URL, its allowed audiences must include the token's audience, and its "
        "attribute condition must accept the role ARN ('mailbroker setup google {integration} "
        "--workload-identity' prints the provider to create).",
        providers=frozenset({"google_workload_identity"}),
        error="invalid_grant",
    ),
    # Any provider: RFC 6749 errors with the catalogue's hint.
    TokenSignature("token_invalid_grant", "", error="invalid_grant"),
    TokenSignature("token_invalid_client", "", error="invalid_client"),
    TokenSignature(
        "token_invalid_client",
        "The token endpoint does not let client {client_id} use the client-credentials grant: allow "
        "it in the authorisation server's client settings.",
        error="unauthorized_client",
    ),
    TokenSignature("token_scope_invalid", "", error="invalid_scope"),
)

# --- SMTP replies --------------------------------------------------------------------------------

_SET_CAS = "Set-CASMailbox -Identity {mailbox} -SmtpClientAuthenticationDisabled $false"
_SECURITY_DEFAULTS = (
    "Entra admin center > Identity > Overview > Properties > Manage security defaults: set them to "
    "Disabled (and protect the tenant with Conditional Access instead)"
)
_OUTBOUND_SPAM = (
    "Exchange Online Protection blocked {mailbox} as a source of outbound spam: secure the account "
    "(the mailbox may be compromised), then release it in the Microsoft Defender portal > Email & "
    "collaboration > Review > Restricted entities, or with Remove-BlockedSenderAddress "
    "-SenderAddress {mailbox}. Messages fail until it is released."
)
_GMAIL_DAILY = (
    "Gmail's daily sending limit for {mailbox} is reached (Google Workspace: 2,000 messages and "
    "10,000 recipients a day per user, counted over a rolling 24 hours; trial and consumer "
    "accounts: 500): the message waits and is retried hourly until the window frees up. Lower the "
    "integration's limits (messages_per_minute, recipients_per_day) or spread the mail over more "
    "mailboxes."
)

SMTP_SIGNATURES: tuple[SmtpSignature, ...] = (
    # --- AUTH: Exchange Online's 535 5.7.139 carries the reason after the code.
    SmtpSignature(
        "smtp_auth_disabled",
        "SMTP AUTH is turned off for the whole tenant: Set-TransportConfig "
        "-SmtpClientAuthenticationDisabled $false (Exchange admin center > Settings > Mail flow: "
        "untick 'Turn off SMTP AUTH protocol for your organization'); a mailbox-level setting still "
        "overrides it: " + _SET_CAS + ".",
        535,
        "5.7.139",
        AUTH,
        says="disabled for the Tenant",
    ),
    SmtpSignature(
        "smtp_auth_disabled",
        "SMTP AUTH is turned off for the mailbox {mailbox}: " + _SET_CAS + " (or Microsoft 365 admin "
        "center > Users > the user > Mail > Manage email apps > Authenticated SMTP).",
        535,
        "5.7.139",
        AUTH,
        says="disabled for the Mailbox",
    ),
    SmtpSignature(
        "sign_in_blocked",
        "Security defaults block SMTP AUTH for {mailbox}: " + _SECURITY_DEFAULTS + ".",
        535,
        "5.7.139",
        AUTH,
        says="security defaults",
    ),
    SmtpSignature(
        "sign_in_blocked",
        "A Conditional Access policy (or MFA requirement) refused the sign-in of {mailbox}: exclude "
        "the app's service principal or this mailbox from the policy in the Entra admin center > "
        "Protection > Conditional Access, and check " + _SET_CAS + ".",
        535,
        "5.7.139",
        AUTH,
        says="did not meet the criteria",
    ),
    SmtpSignature(
        "basic_auth_disabled",
        "Exchange Online no longer accepts passwords for SMTP AUTH: move the integration to OAuth "
        "(provider 'microsoft', 'mailbroker setup microsoft {integration}' prints the steps).",
        535,
        "5.7.139",
        AUTH,
        says="basic authentication is disabled",
    ),
    SmtpSignature(
        "smtp_auth_failed",
        "Exchange Online rejected the user name or password of {mailbox}: correct the password with "
        "'mailbroker integration add', or better move to OAuth (provider 'microsoft').",
        535,
        "5.7.139",
        AUTH,
        says="credentials were incorrect",
    ),
    SmtpSignature(
        "smtp_auth_disabled",
        "Exchange Online refused SMTP AUTH (535 5.7.139): it must be on for the tenant "
        "(Set-TransportConfig -SmtpClientAuthenticationDisabled $false) and for the mailbox ("
        + _SET_CAS
        + "), and security defaults must be off.",
        535,
        "5.7.139",
        AUTH,
    ),
    SmtpSignature(
        "smtp_auth_failed",
        "The token was refused even fresh (535 5.7.3): the Exchange service principal of app "
        "{client_id} is missing or lacks permission on {mailbox}: " + EXCHANGE_SERVICE_PRINCIPAL + ".",
        535,
        "5.7.3",
        AUTH,
    ),
    # --- AUTH: Gmail.
    SmtpSignature(
        "basic_auth_disabled",
        "Google requires an app password for {mailbox} (2-Step Verification is on) and is retiring "
        "password sign-in: move the integration to OAuth, provider 'google' with 'mailbroker consent "
        "google {integration}', or a Workspace service account.",
        534,
        "5.7.9",
        AUTH,
    ),
    SmtpSignature(
        "sign_in_blocked",
        "Google blocked the sign-in of {mailbox} as unusual: sign in once at "
        "https://accounts.google.com from a browser to clear it, and move the integration to OAuth "
        "(provider 'google').",
        534,
        "5.7.14",
        AUTH,
    ),
    SmtpSignature(
        "smtp_auth_failed",
        "Gmail refused the credentials of {mailbox} (535 5.7.8). With OAuth, the token's user must be "
        "the mailbox itself and its scope https://mail.google.com/: re-consent as that user, "
        "'mailbroker consent google {integration}'. With a password, use an app password or move "
        "to OAuth.",
        535,
        "5.7.8",
        AUTH,
    ),
    SmtpSignature("throttled", None, 454, "4.7.0", AUTH),
    SmtpSignature("smtp_auth_failed", None, 535, None, AUTH),
    SmtpSignature("smtp_auth_failed", None, 534, None, AUTH),
    SmtpSignature("smtp_auth_failed", None, 530, "5.7.0", AUTH),
    # --- MAIL: a sender the server will not take.
    SmtpSignature(
        "smtp_not_authenticated",
        "The server took MAIL FROM as anonymous mail (530 5.7.57): mailbroker must submit through "
        "smtp.office365.com port 587 with STARTTLS, where SMTP AUTH is on for {mailbox} (" + _SET_CAS + "); "
        "a receiving MX host (*.mail.protection.outlook.com) does not accept authenticated submission.",
        530,
        "5.7.57",
    ),
    SmtpSignature(
        "smtp_not_authenticated",
        "Gmail wants authentication before MAIL (530 5.7.0): submit through smtp.gmail.com port 587 "
        "(STARTTLS) or 465 (tls) with OAuth, not through the MX host or the relay without "
        "credentials.",
        530,
        "5.7.0",
        ENVELOPE,
    ),
    SmtpSignature(
        "smtp_not_authenticated",
        "Gmail's SMTP relay does not know this client (550 5.7.0 Mail relay denied): submit through "
        "smtp.gmail.com with OAuth as {mailbox}, or allow the sending IP addresses in the Admin "
        "console > Apps > Google Workspace > Gmail > Routing > SMTP relay service.",
        550,
        "5.7.0",
        says="relay denied",
    ),
    SmtpSignature(
        "send_as_denied",
        "The mailbox {mailbox} may not send as this 'from' address (550 5.7.60): Add-RecipientPermission "
        "-Identity <from address> -Trustee {mailbox} -AccessRights SendAs, or send from {mailbox} "
        "itself.",
        550,
        "5.7.60",
    ),
    SmtpSignature(
        "account_blocked",
        _OUTBOUND_SPAM,
        550,
        "5.1.8",
    ),
    SmtpSignature(
        "account_blocked",
        "Exchange Online blocked outbound mail of the whole tenant (5.7.705: too much spam or bulk "
        "mail, or a lapsed subscription): find and secure the compromised account or connector, then "
        "ask Microsoft Support to lift the block.",
        550,
        "5.7.705",
    ),
    SmtpSignature(
        "account_blocked",
        "Exchange Online suspended {mailbox}'s sending because it sent to too many recipients that "
        "do not exist, or too much: review the Restricted entities page of the Microsoft Defender "
        "portal, secure the account, and release it there.",
        550,
        "5.7.520",
    ),
    SmtpSignature(
        "quota_exceeded",
        _GMAIL_DAILY,
        550,
        "5.4.5",
        ENVELOPE,
        retry_after=DAILY_QUOTA_RETRY_SECONDS,
    ),
    SmtpSignature(
        "quota_exceeded",
        "Exchange Online's recipient rate limit for {mailbox} is reached (10,000 recipients a day, a "
        "rolling 24 hours, 5.1.90): the message waits and is retried hourly. Lower the "
        "integration's recipients_per_day or spread the mail over more mailboxes.",
        550,
        "5.1.90",
        retry_after=DAILY_QUOTA_RETRY_SECONDS,
    ),
    SmtpSignature(
        "smtp_permanent",
        "Exchange Online will not send for a domain it does not host (5.7.750): add and verify the "
        "'from' domain in the Microsoft 365 admin center > Settings > Domains, or send from "
        "{mailbox}'s own domain.",
        550,
        "5.7.750",
    ),
    # --- RCPT: throttling, then refusals of one recipient.
    SmtpSignature(
        "throttled",
        "The server accepts no more recipients in this transaction (452 4.5.3): the refused "
        "recipients are retried on their own; lower the number of recipients per message if it "
        "recurs (Exchange Online: 1,000 per message, Gmail: 100 for SMTP submission).",
        452,
        "4.5.3",
        RCPT,
    ),
    SmtpSignature("throttled", None, 450, "4.2.1"),
    SmtpSignature(
        "recipient_rejected",
        "The recipient's mailbox is full (552 5.2.2): the other recipients were delivered; ask the "
        "recipient to free space, then send again.",
        552,
        "5.2.2",
        RCPT,
    ),
    SmtpSignature(
        "recipient_rejected",
        "The recipient's domain blocks the sender (550 5.7.1 / 5.7.26 at RCPT): ask its postmaster "
        "to allow {mailbox}, and check SPF, DKIM and DMARC of the 'from' domain.",
        550,
        "5.7.",
        RCPT,
    ),
    SmtpSignature("recipient_rejected", None, 550, None, RCPT),
    SmtpSignature("recipient_rejected", None, 553, None, RCPT),
    SmtpSignature("recipient_rejected", None, 551, None, RCPT),
    SmtpSignature("recipient_rejected", None, 554, None, RCPT),
    # --- after the content: Exchange's store driver names the exception.
    SmtpSignature(
        "send_as_denied",
        "The mailbox {mailbox} may not send as this 'from' address (SendAsDeniedException): "
        "Add-RecipientPermission -Identity <from address> -Trustee {mailbox} -AccessRights SendAs "
        "(for the app's own sending rights: " + EXCHANGE_SERVICE_PRINCIPAL + ").",
        says="SendAsDeniedException",
    ),
    SmtpSignature(
        "quota_exceeded",
        "Exchange Online's submission quota for {mailbox} is used up (SubmissionQuotaExceededException: "
        "30 messages a minute, 10,000 recipients a day): the message waits and is retried; lower "
        "the integration's messages_per_minute (and recipients_per_day) to stay under it.",
        says="SubmissionQuotaExceededException",
        retry_after=SUBMISSION_QUOTA_RETRY_SECONDS,
    ),
    SmtpSignature("account_blocked", _OUTBOUND_SPAM, says="OutboundSpamException"),
    SmtpSignature(
        "send_as_denied",
        "Exchange Online now refuses {mailbox} for a while because every send was denied as this "
        "sender (5.2.252): Add-RecipientPermission -Identity <from address> -Trustee {mailbox} "
        "-AccessRights SendAs, then re-drive the failed messages.",
        550,
        "5.2.252",
    ),
    SmtpSignature(
        "smtp_permanent",
        "The sending mailbox {mailbox} is full (5.2.251 / 5.2.2): empty its Sent Items or raise its "
        "quota, then re-drive the failed messages.",
        550,
        "5.2.251",
    ),
    SmtpSignature(
        "smtp_permanent",
        "{mailbox} has no Exchange Online license (5.2.253): assign one in the Microsoft 365 admin "
        "center > Users > Active users > the user > Licenses and apps.",
        550,
        "5.2.253",
    ),
    SmtpSignature(
        "throttled",
        "Exchange Online's store driver limits concurrent submissions (432 4.3.2): at most 3 "
        "connections per mailbox; lower the integration's max_connections.",
        432,
        "4.3.2",
    ),
    SmtpSignature(
        "smtp_permanent",
        "The recipient's mailbox is full (552 5.2.2): ask the recipient to free space, then re-drive "
        "the message.",
        552,
        "5.2.2",
    ),
    SmtpSignature("message_too_large", None, 552, None),
    SmtpSignature("message_too_large", None, None, "5.3.4"),
    SmtpSignature(
        "smtp_permanent",
        "The receiving side requires the 'from' domain to authenticate (DMARC, 5.7.26): publish SPF "
        "and DKIM for the domain of the 'from' address so they align with it.",
        550,
        "5.7.26",
    ),
    SmtpSignature(
        "smtp_permanent",
        "Gmail judged the content unsolicited (550 5.7.1): authenticate the 'from' domain with SPF, "
        "DKIM and DMARC, follow Google's email sender guidelines (one-click unsubscribe for bulk "
        "mail), and review what {mailbox} sends before re-driving it.",
        550,
        "5.7.1",
        CONTENT,
        says="unsolicited mail",
    ),
    # --- whole-connection throttling and temporary blocks.
    SmtpSignature(
        "throttled",
        "Gmail temporarily blocks mail from this sender for an unusual rate of unsolicited mail "
        "(421 4.7.0): retried with back-off; review what {mailbox} sends and lower the "
        "integration's limits.",
        421,
        "4.7.0",
        says="unsolicited mail",
    ),
    SmtpSignature("throttled", None, 421, None),
    SmtpSignature("throttled", None, 451, "4.7."),
    SmtpSignature("throttled", None, 454, "4.7.0"),
)


def match_token(provider: str, error: str | None, codes: set[int], description: str) -> TokenSignature | None:
    """The first token signature that fits, or None."""
    for signature in TOKEN_SIGNATURES:
        if signature.matches(provider, error, codes, description):
            return signature
    return None


def match_smtp(basic: int, enhanced: str, stage: str, text: str) -> SmtpSignature | None:
    """The first SMTP signature that fits, or None."""
    for signature in SMTP_SIGNATURES:
        if signature.matches(basic, enhanced, stage, text):
            return signature
    return None


class _Known(dict[str, str]):
    def __missing__(self, key: str) -> str:
        return f"<{key}>"


def render_hint(template: str, context: dict[str, str] | None = None) -> str:
    """The hint with what the caller knows filled in; an unknown ``{name}`` stays ``<name>``."""
    known = _Known({k: v for k, v in (context or {}).items() if v})
    if "{consent_url}" in template and "consent_url" not in known:
        url = microsoft_admin_consent_url(
            known.get("authority", ""), known.get("tenant", ""), known.get("client_id", "")
        )
        known["consent_url"] = url or ENTRA_ADMIN_CONSENT
    return template.format_map(known)


def microsoft_admin_consent_url(
    authority: str, tenant: str, client_id: str, *, scope: str | None = None, redirect_uri: str = ""
) -> str | None:
    """The admin-consent URL for an app, or None unless ``authority`` is exactly one of
    Microsoft's sign-in hosts (public and sovereign clouds, as MSAL lists them): https, no port,
    no user information, no path. With ``scope``, the identity platform v2.0 form (which needs
    ``redirect_uri``); without, the form that consents to every permission the app lists."""
    from msal.authority import WELL_KNOWN_AUTHORITY_HOSTS

    parts = urlsplit(authority or "")
    if (
        parts.scheme != "https"
        or parts.hostname not in WELL_KNOWN_AUTHORITY_HOSTS
        or parts.netloc != parts.hostname
        or parts.path.strip("/")
        or parts.query
        or parts.fragment
        or not (tenant and client_id)
    ):
        return None
    base = f"https://{parts.hostname}/{quote(tenant, safe='')}"
    if scope is None:
        return f"{base}/adminconsent?{urlencode({'client_id': client_id})}"
    query = urlencode({"client_id": client_id, "scope": scope, "redirect_uri": redirect_uri}, safe=":/")
    return f"{base}/v2.0/adminconsent?{query}"


def codes_used() -> set[str]:
    """Every catalogue code the tables can produce (a test keeps them in the catalogue)."""
    return {s.code for s in TOKEN_SIGNATURES} | {s.code for s in SMTP_SIGNATURES}
