"""The message JSON contract: what is accepted, what is refused, and how refusals read."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mailbroker.errors import InvalidMessage, SenderNotAllowed
from mailbroker.integrations import parse_integration
from mailbroker.messages import models
from mailbroker.messages.models import OutgoingMessage, check_allowed, parse_message, with_sender_defaults

SAMPLE = Path(__file__).resolve().parents[2] / "events" / "message.json"


def minimal(**changes: Any) -> dict[str, Any]:
    message: dict[str, Any] = {
        "integration": "support-m365",
        "from": "support@contoso.com",
        "to": ["ana@example.com"],
        "subject": "Your order shipped",
        "text": "On its way.",
    }
    message.update(changes)
    return {k: v for k, v in message.items() if v is not ...}


def problems(raw: Any) -> list[dict[str, str]]:
    with pytest.raises(InvalidMessage) as caught:
        parse_message(raw)
    assert caught.value.code == "invalid_message"
    assert caught.value.retryable is False
    return caught.value.details


def fields(raw: Any) -> set[str]:
    return {p["field"] for p in problems(raw)}


# --- the contract's sample -------------------------------------------------------------------------


def test_sample_event_message_is_valid() -> None:
    # Given the message in events/message.json
    message = parse_message(SAMPLE.read_text())

    # Then every part of it is read
    assert message.integration == "support-m365"
    assert message.id == "order-8812-confirmation"
    assert message.from_.email == "support@contoso.com"
    assert message.from_.name == "Support Team"
    assert [a.email for a in message.to] == ["ana@example.com", "bo@example.com"]
    assert [a.email for a in message.reply_to] == ["help@contoso.com"]
    assert message.headers == {"X-Order": "8812"}
    assert message.attachments[0].content == b"Invoice 8812\n"
    assert message.needs_smtputf8 is False


def test_bytes_and_dict_inputs_give_the_same_message() -> None:
    raw = SAMPLE.read_bytes()

    assert parse_message(raw) == parse_message(json.loads(raw))


def test_usage_defaults_to_transactional() -> None:
    assert parse_message(minimal()).usage == "transactional"


def test_address_may_be_a_string_a_named_string_or_an_object() -> None:
    # Given the three ways to write a recipient
    message = parse_message(
        minimal(
            to=["ana@example.com", "Bo Jones <bo@example.com>", {"email": "cy@example.com", "name": "Cy"}]
        )
    )

    # Then each is an address with its display name
    assert [(a.email, a.name) for a in message.to] == [
        ("ana@example.com", None),
        ("bo@example.com", "Bo Jones"),
        ("cy@example.com", "Cy"),
    ]


def test_single_recipient_may_be_given_without_a_list() -> None:
    message = parse_message(minimal(to="ana@example.com", cc={"email": "bo@example.com"}))

    assert [a.email for a in message.to] == ["ana@example.com"]
    assert [a.email for a in message.cc] == ["bo@example.com"]


def test_bcc_alone_is_enough_recipients() -> None:
    message = parse_message(minimal(to=..., bcc=["hidden@example.com"]))

    assert [a.email for a in message.recipients] == ["hidden@example.com"]


def test_html_alone_is_enough_body() -> None:
    assert parse_message(minimal(text=..., html="<p>hi</p>")).html == "<p>hi</p>"


# --- input that is not a message ---------------------------------------------------------------


@pytest.mark.parametrize("raw", ["", "not json", "{", b"\xff\xfe\x00", "[" * 100_000, '{"a": ' * 50_000])
def test_input_that_is_not_json_is_refused_without_crashing(raw: str | bytes) -> None:
    assert problems(raw) == [{"field": "(root)", "problem": "not valid JSON"}]


@pytest.mark.parametrize("raw", ["[]", "42", '"text"', "null", "true"])
def test_json_that_is_not_an_object_is_refused(raw: str) -> None:
    assert fields(raw) == {"(root)"}


def test_input_larger_than_the_limit_is_refused_before_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models, "MAX_RAW_BYTES", 100)

    assert problems(json.dumps(minimal(text="x" * 200))) == [
        {"field": "(root)", "problem": "larger than 0 MiB"}
    ]


def test_duplicate_keys_are_refused() -> None:
    # Given JSON where a parser would silently keep one of two subjects
    raw = '{"integration":"a", "from": "a@b.co", "to": "c@d.co", "subject": "1", "subject": "2", "text": "t"}'

    # Then the duplicate is named
    assert problems(raw) == [{"field": "subject", "problem": "duplicate JSON key"}]


def test_unknown_fields_are_refused() -> None:
    assert fields(minimal(attachements=[])) == {"attachements"}


# --- every problem at once ---------------------------------------------------------------------


def test_every_problem_is_listed_at_once() -> None:
    # Given a message wrong in many independent ways
    raw = {
        "integration": "bad id!",
        "from": "not-an-address",
        "to": ["ok@example.com", "also bad"],
        "subject": "Hi\r\nBcc: victim@example.com",
        "headers": {"From": "x@y.co", "X-Fine": "ok"},
        "attachments": [{"filename": "a.txt", "content": "***"}],
    }

    # Then each is reported, with the missing body
    assert fields(raw) == {
        "integration",
        "from.email",
        "to[1].email",
        "subject",
        "headers.From",
        "attachments[0].content",
        "text",
    }


def test_problems_are_capped_with_a_count_of_the_rest() -> None:
    listed = problems(minimal(to=["bad"] * 300))

    assert len(listed) == models.MAX_PROBLEMS + 1
    assert listed[-1]["problem"].endswith("more problems")


def test_problems_never_echo_the_offending_value() -> None:
    # Given sensitive values that break the rules
    secret = "Bearer sk_live_51HdZZsupersecretvalue"
    raw = minimal(headers={"X-Api-Key": f"{secret}\r\n"}, subject=f"{secret}\x00", to=[f"{secret}@"])

    # When the message is refused
    with pytest.raises(InvalidMessage) as caught:
        parse_message(raw)

    # Then neither the message nor the details repeat them
    assert "supersecret" not in str(caught.value)
    assert "supersecret" not in json.dumps(caught.value.to_dict())


# --- whole-message rules -----------------------------------------------------------------------


def test_message_without_any_recipient_is_refused() -> None:
    assert problems(minimal(to=[], cc=[], bcc=[])) == [
        {"field": "to", "problem": "at least one recipient (to, cc or bcc) is required"}
    ]


def test_message_with_too_many_recipients_is_refused() -> None:
    to = [f"user{i}@example.com" for i in range(models.MAX_RECIPIENTS + 1)]

    assert fields(minimal(to=to)) == {"to"}


def test_message_without_text_or_html_is_refused() -> None:
    assert problems(minimal(text=..., html="")) == [{"field": "text", "problem": "text or html is required"}]


@pytest.mark.parametrize("subject", [..., "", "a\nb", "a\rb", "a\x00b", "x" * 999])
def test_subject_is_required_and_single_line(subject: Any) -> None:
    assert fields(minimal(subject=subject)) == {"subject"}


def test_body_text_may_span_lines_but_not_carry_nul() -> None:
    assert parse_message(minimal(text="line 1\r\nline 2\n")).text == "line 1\r\nline 2\n"
    assert fields(minimal(text="a\x00b")) == {"text"}


def test_lone_surrogates_are_refused() -> None:
    assert fields(json.dumps(minimal(text="\ud800", subject="ok \udfff"))) == {"text", "subject"}


def test_huge_fields_are_refused_by_length() -> None:
    assert fields(minimal(subject="s" * 5_000_000, to=["a" * 5_000_000 + "@example.com"])) == {
        "subject",
        "to[0].email",
    }


@pytest.mark.parametrize(
    ("key", "value"), [("integration", 5), ("subject", ["x"]), ("to", 7), ("headers", [])]
)
def test_wrong_types_are_refused(key: str, value: Any) -> None:
    assert key in {f.split("[")[0].split(".")[0] for f in fields(minimal(**{key: value}))}


# --- addresses -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "address",
    [
        "plain",
        "@example.com",
        "ana@",
        "ana@@example.com",
        "ana@example",
        "ana@-example.com",
        "ana@exa_mple.com",
        "ana@example.123",
        "a..b@example.com",
        ".ana@example.com",
        "ana.@example.com",
        "an a@example.com",
        "ana\r\n@example.com",
        '"quoted"@example.com',
        "ana@[127.0.0.1]",
        "a" * 65 + "@example.com",
        "ana@" + "a" * 250 + ".com",
        "ana\u200b@example.com",
    ],
)
def test_invalid_address_is_refused(address: str) -> None:
    assert fields(minimal(to=[address])) == {"to[0].email"}


@pytest.mark.parametrize(
    "address",
    ["ana@example.com", "a.b+tag@sub.example.co.uk", "o'neil@example.ie", "x!#$%&*=?^_`{|}~-@example.com"],
)
def test_valid_ascii_address_is_kept_as_given(address: str) -> None:
    assert parse_message(minimal(to=[address])).to[0].email == address


@pytest.mark.parametrize("name", ["Ana\r\nBcc: x@y.co", "Ana\nB", "Ana\x00", "Ana\x1b[31m"])
def test_display_name_with_control_characters_is_refused(name: str) -> None:
    assert fields(minimal(to=[{"email": "ana@example.com", "name": name}])) == {"to[0].name"}


def test_non_ascii_local_part_needs_smtputf8() -> None:
    # Given an address with a UTF-8 local part (RFC 6531)
    message = parse_message(minimal(to=["josé@example.com"]))

    # Then it is accepted and the message says it needs an SMTPUTF8 server
    assert message.to[0].email == "josé@example.com"
    assert message.needs_smtputf8 is True


def test_non_ascii_domain_is_converted_to_its_ascii_form() -> None:
    message = parse_message(minimal(to=["ana@bücher.example"]))

    assert message.to[0].email == "ana@xn--bcher-kva.example"
    assert message.needs_smtputf8 is False


def test_non_ascii_display_name_is_allowed() -> None:
    message = parse_message(minimal(**{"from": {"email": "support@contoso.com", "name": "Zoë Ångström"}}))

    assert message.from_.name == "Zoë Ångström"
    assert message.needs_smtputf8 is False


# --- headers ---------------------------------------------------------------------------------------


def test_custom_headers_are_kept() -> None:
    headers = {"X-Order": "8812", "List-Unsubscribe": "<mailto:unsub@contoso.com>", "X-Tab": "a\tb"}

    assert parse_message(minimal(headers=headers)).headers == headers


@pytest.mark.parametrize(
    "name",
    [
        "From",
        "to",
        "CC",
        "Bcc",
        "Subject",
        "Date",
        "Message-ID",
        "Reply-To",
        "MIME-Version",
        "Content-Type",
        "content-transfer-encoding",
        "Content-Disposition",
        "Sender",
        "Return-Path",
        "Resent-From",
    ],
)
def test_headers_mailbroker_writes_cannot_be_overridden(name: str) -> None:
    assert problems(minimal(headers={name: "x"})) == [
        {
            "field": f"headers.{name}",
            "problem": "this header is written by mailbroker and cannot be set by a message",
        }
    ]


@pytest.mark.parametrize("name", ["", "X Order", "X:Order", "X-Órder", "X-Order\n", "X" * 77])
def test_header_name_must_be_a_field_name(name: str) -> None:
    assert len(problems(minimal(headers={name: "v"}))) == 1


@pytest.mark.parametrize("value", ["a\r\nBcc: x@y.co", "a\nb", "a\rb", "a\x00b", "x" * 999])
def test_header_value_must_be_one_line(value: str) -> None:
    assert fields(minimal(headers={"X-Order": value})) == {"headers.X-Order"}


def test_same_header_twice_in_different_case_is_refused() -> None:
    assert fields(minimal(headers={"X-Order": "1", "x-order": "2"})) == {"headers"}


# --- attachments -----------------------------------------------------------------------------------


def attachment(**changes: Any) -> dict[str, Any]:
    item = {"filename": "invoice.pdf", "content_type": "application/pdf", "content": "JVBERi0xLjQK"}
    item.update(changes)
    return {k: v for k, v in item.items() if v is not ...}


def test_attachment_content_is_decoded() -> None:
    assert parse_message(minimal(attachments=[attachment()])).attachments[0].content == b"%PDF-1.4\n"


def test_base64_with_line_breaks_is_accepted() -> None:
    content = base64.encodebytes(b"x" * 200).decode()  # MIME-style, 76 characters a line

    assert (
        parse_message(minimal(attachments=[attachment(content=content)])).attachments[0].content == b"x" * 200
    )


@pytest.mark.parametrize("content", ["not base64!", "QUJD=", "QUJ", 42])
def test_content_that_is_not_base64_is_refused(content: Any) -> None:
    assert fields(minimal(attachments=[attachment(content=content)])) == {"attachments[0].content"}


@pytest.mark.parametrize(
    ("given", "kept"),
    [
        ("../../etc/passwd", "passwd"),
        ("C:\\Users\\ana\\report.pdf", "report.pdf"),
        ("in\x00voice\r\n.pdf", "invoice.pdf"),
        ("photo\u202egpj.exe", "photogpj.exe"),
        ("  spaced.txt  ", "spaced.txt"),
        ("Größe.pdf", "Größe.pdf"),
    ],
)
def test_filename_loses_path_and_control_characters(given: str, kept: str) -> None:
    assert parse_message(minimal(attachments=[attachment(filename=given)])).attachments[0].filename == kept


@pytest.mark.parametrize("filename", ["", "../", "dir/..", "\x00\x01", "x" * 256])
def test_filename_that_names_no_file_is_refused(filename: str) -> None:
    assert fields(minimal(attachments=[attachment(filename=filename)])) == {"attachments[0].filename"}


@pytest.mark.parametrize(
    "content_type",
    ["pdf", "application/", "text/plain; charset=utf-8", "multipart/mixed", "message/rfc822", "a b/c"],
)
def test_content_type_must_be_a_plain_attachable_type(content_type: str) -> None:
    assert fields(minimal(attachments=[attachment(content_type=content_type)])) == {
        "attachments[0].content_type"
    }


def test_content_type_is_guessed_from_the_filename_when_absent() -> None:
    message = parse_message(
        minimal(
            attachments=[
                attachment(content_type=..., filename="a.pdf"),
                attachment(content_type=..., filename="a"),
            ]
        )
    )

    assert [a.mime_type for a in message.attachments] == ["application/pdf", "application/octet-stream"]


def test_attachments_over_the_total_limit_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a limit of 10 octets and two attachments of 6
    monkeypatch.setattr(models, "MAX_ATTACHMENT_BYTES", 10)
    six = base64.b64encode(b"123456").decode()

    # Then the total is refused, each one alone is not
    assert fields(minimal(attachments=[attachment(content=six), attachment(content=six)])) == {"attachments"}
    parse_message(minimal(attachments=[attachment(content=six)]))


# --- sizes and ids ---------------------------------------------------------------------------------


def test_estimated_size_grows_with_attachments() -> None:
    small = parse_message(minimal())
    large = parse_message(minimal(attachments=[attachment(content=base64.b64encode(b"x" * 30_000).decode())]))

    assert large.estimated_size() - small.estimated_size() >= 40_000


def test_with_id_sets_the_idempotency_key() -> None:
    message = parse_message(minimal())

    assert message.id is None
    assert message.with_id("sqs-123").id == "sqs-123"


# --- who may send ----------------------------------------------------------------------------------


INTEGRATION = parse_integration(
    {
        "id": "support-m365",
        "provider": "basic",
        "smtp": {"host": "smtp.example.com"},
        "username": "relay@contoso.com",
        "senders": [{"email": "Support@Contoso.com"}],
        "usage": ["transactional"],
        "password": "pw",
    }
)


@pytest.mark.parametrize("sender", ["support@contoso.com", "SUPPORT@contoso.com", "relay@contoso.com"])
def test_listed_sender_or_username_may_send(sender: str) -> None:
    check_allowed(parse_message(minimal(**{"from": sender})), INTEGRATION)


def test_unlisted_sender_is_not_allowed() -> None:
    with pytest.raises(SenderNotAllowed) as caught:
        check_allowed(parse_message(minimal(**{"from": "ceo@contoso.com"})), INTEGRATION)

    assert caught.value.details == [{"field": "from", "problem": "not one of the integration's senders"}]


def test_usage_not_enabled_is_not_allowed() -> None:
    with pytest.raises(SenderNotAllowed) as caught:
        check_allowed(parse_message(minimal(usage="marketing")), INTEGRATION)

    assert caught.value.details == [{"field": "usage", "problem": "not enabled for the integration"}]


# --- senders as the integration defines them -------------------------------------------------------

NAMED = parse_integration(
    {
        "id": "support-m365",
        "provider": "basic",
        "smtp": {"host": "smtp.example.com"},
        "username": "relay@contoso.com",
        "senders": [
            {"email": "support@contoso.com", "name": "Contoso Support"},
            {"email": "billing@contoso.com", "name": "Contoso Billing"},
            {"email": "noreply@contoso.com"},
        ],
        "password": "pw",
    }
)


def test_a_message_without_from_is_sent_as_the_first_sender_with_its_name() -> None:
    message = with_sender_defaults(parse_message(minimal(**{"from": ...})), NAMED)

    assert (message.sender.email, message.sender.name) == ("support@contoso.com", "Contoso Support")
    check_allowed(message, NAMED)


def test_an_integration_without_senders_sends_as_its_username() -> None:
    message = with_sender_defaults(
        parse_message(minimal(**{"from": ...})), INTEGRATION.model_copy(update={"senders": []})
    )

    assert (message.sender.email, message.sender.name) == ("relay@contoso.com", None)


def test_a_from_without_a_name_takes_its_sender_entry_name() -> None:
    message = with_sender_defaults(parse_message(minimal(**{"from": "Billing@contoso.com"})), NAMED)

    assert (message.sender.email, message.sender.name) == ("Billing@contoso.com", "Contoso Billing")


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ({"email": "billing@contoso.com", "name": "Accounts"}, ("billing@contoso.com", "Accounts")),
        ("noreply@contoso.com", ("noreply@contoso.com", None)),
        ("relay@contoso.com", ("relay@contoso.com", None)),
    ],
)
def test_a_name_the_message_gives_or_a_sender_without_one_is_left_alone(given: Any, expected: Any) -> None:
    message = with_sender_defaults(parse_message(minimal(**{"from": given})), NAMED)

    assert (message.sender.email, message.sender.name) == expected


def test_a_message_without_from_cannot_be_built_before_the_default_is_applied() -> None:
    with pytest.raises(InvalidMessage) as caught:
        _ = parse_message(minimal(**{"from": ...})).sender

    assert caught.value.details == [{"field": "from", "problem": "missing"}]


# --- never crashes ---------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
nasty_text = st.text(
    alphabet=st.characters(codec="utf-8") | st.sampled_from("\r\n\x00\t@<>:\"'.\\/ "), max_size=40
)
address_like = nasty_text | st.builds(lambda a, b: f"{a}@{b}", nasty_text, nasty_text)
address_value = address_like | st.fixed_dictionaries(
    {"email": address_like}, optional={"name": nasty_text | json_values}
)
plausible = st.fixed_dictionaries(
    {},
    optional={
        "integration": nasty_text | json_values,
        "id": nasty_text | json_values,
        "usage": nasty_text,
        "from": address_value | json_values,
        "to": st.lists(address_value, max_size=3) | address_value | json_values,
        "cc": st.lists(address_value, max_size=2),
        "bcc": address_value,
        "reply_to": address_value,
        "subject": nasty_text | json_values,
        "text": nasty_text | json_values,
        "html": nasty_text,
        "headers": st.dictionaries(nasty_text, nasty_text | json_values, max_size=3) | json_values,
        "attachments": st.lists(
            st.fixed_dictionaries(
                {},
                optional={
                    "filename": nasty_text,
                    "content_type": nasty_text,
                    "content": nasty_text | json_values,
                },
            ),
            max_size=2,
        ),
    },
)


def _valid_or_invalid_message(raw: Any) -> None:
    try:
        message = parse_message(raw)
    except InvalidMessage as exc:
        assert exc.details
        assert all(set(p) == {"field", "problem"} for p in exc.details)
        return
    assert isinstance(message, OutgoingMessage)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(plausible)
def test_any_plausible_object_is_a_message_or_invalid_message(raw: dict[str, Any]) -> None:
    _valid_or_invalid_message(raw)
    _valid_or_invalid_message(json.dumps(raw))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200) | json_values.map(json.dumps) | st.text(max_size=200))
def test_any_input_is_a_message_or_invalid_message(raw: bytes | str) -> None:
    _valid_or_invalid_message(raw)
