"""Finding 8: the sender check let a Kelvin sign through.

``"\\u212aate@contoso.com".lower() == "kate@contoso.com"``, so ``check_allowed`` passed an address
that MAIL FROM then sent differently. Addresses are now compared ignoring the case of ASCII letters
only, and the message is sent as the configured address that matched. End to end: the sandbox
SMTP server (STARTTLS, XOAUTH2) records the envelope and headers it receives.
"""

from __future__ import annotations

import email
from email import policy

import pytest
from mailbroker.errors import SenderNotAllowed
from mailbroker.integrations import parse_integration
from mailbroker.messages.models import check_allowed, parse_message

KATE = "kate@contoso.com"


def _integration():
    return parse_integration(
        {
            "id": "kate",
            "provider": "basic",
            "smtp": {"host": "smtp.example.com"},
            "username": "support@contoso.com",
            "senders": [{"email": KATE}],
            "password": "p",
        }
    )


def _message(sender: str):
    return parse_message(
        {"integration": "kate", "from": sender, "to": ["a@example.com"], "subject": "s", "text": "t"}
    )


@pytest.mark.parametrize("lookalike", ["\u212aate@contoso.com", "\u212aATE@contoso.com"])  # KELVIN SIGN
def test_finding_8_a_unicode_case_lookalike_of_a_sender_is_not_allowed(lookalike):
    with pytest.raises(SenderNotAllowed) as refused:
        check_allowed(_message(lookalike), _integration())

    assert refused.value.details == [{"field": "from", "problem": "not one of the integration's senders"}]


def test_finding_8_ascii_case_still_matches_and_the_configured_spelling_is_sent():
    sent = check_allowed(_message("KATE@Contoso.COM"), _integration())

    assert sent.from_.email == KATE


def test_finding_8_kelvin_sign_is_refused_end_to_end_and_nothing_reaches_smtp(mail_pipeline):
    pipeline = mail_pipeline
    integration = pipeline.add("microsoft", name="kelvin", username=KATE)
    lookalike = pipeline.message(integration, **{"from": {"email": "\u212aate@contoso.com", "name": "Kate"}})
    pipeline.post(lookalike)

    pipeline.drive()

    outcome = pipeline.outcome(lookalike["id"])
    assert outcome.deliveries == 0 and outcome.code == "sender_not_allowed"
    assert all(m.mail_from != "\u212aate@contoso.com" for m in pipeline.smtp.accepted)


def test_finding_8_mail_from_and_from_are_the_configured_address(mail_pipeline):
    pipeline = mail_pipeline
    integration = pipeline.add("microsoft", name="ascii-case", username=KATE)
    message = pipeline.message(integration, **{"from": {"email": "Kate@CONTOSO.com", "name": "Kate"}})
    pipeline.post(message)

    pipeline.drive()

    assert pipeline.delivered(message["id"]) == 1
    accepted = [m for m in pipeline.smtp.accepted if m.auth_user == KATE]
    assert [m.mail_from for m in accepted] == [KATE]
    headers = email.message_from_bytes(accepted[0].data, policy=policy.default)
    assert headers["From"].addresses[0].addr_spec == KATE
