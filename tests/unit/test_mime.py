"""The MIME message built from a message: structure, headers, exact bytes and the envelope."""

from __future__ import annotations

import base64
import datetime as dt
import email
import hashlib
import re
import sys
from email import policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mailbroker.messages import build_mime, envelope, message_id_for, parse_message
from mailbroker.messages.models import OutgoingMessage

SAMPLE = Path(__file__).resolve().parents[2] / "events" / "message.json"
NOW = dt.datetime(2026, 11, 21, 12, 0, tzinfo=dt.UTC)

SAMPLE_MIME = (
    b"From: Support Team <support@contoso.com>\r\n"
    b"To: ana@example.com, Bo <bo@example.com>\r\n"
    b"Reply-To: help@contoso.com\r\n"
    b"Subject: Your order shipped\r\n"
    b"Date: Sat, 21 Nov 2026 12:00:00 +0000\r\n"
    b"Message-ID: <43c818c8e157088d1a1186ed614fc7bb@contoso.com>\r\n"
    b"X-Order: 8812\r\n"
    b"MIME-Version: 1.0\r\n"
    b'Content-Type: multipart/mixed; boundary="=_ee78214b4048a36bab5e9b7775741e"\r\n'
    b"\r\n"
    b"--=_ee78214b4048a36bab5e9b7775741e\r\n"
    b"Content-Type: multipart/alternative;\r\n"
    b' boundary="=_eb8064d0cc9065cca52db80fe6e9cb"\r\n'
    b"\r\n"
    b"--=_eb8064d0cc9065cca52db80fe6e9cb\r\n"
    b'Content-Type: text/plain; charset="utf-8"\r\n'
    b"Content-Transfer-Encoding: 7bit\r\n"
    b"\r\n"
    b"Your order 8812 is on its way.\r\n"
    b"\r\n"
    b"--=_eb8064d0cc9065cca52db80fe6e9cb\r\n"
    b'Content-Type: text/html; charset="utf-8"\r\n'
    b"Content-Transfer-Encoding: 7bit\r\n"
    b"\r\n"
    b"<p>Your order <b>8812</b> is on its way.</p>\r\n"
    b"\r\n"
    b"--=_eb8064d0cc9065cca52db80fe6e9cb--\r\n"
    b"\r\n"
    b"--=_ee78214b4048a36bab5e9b7775741e\r\n"
    b"Content-Type: text/plain\r\n"
    b"Content-Transfer-Encoding: base64\r\n"
    b'Content-Disposition: attachment; filename="invoice.txt"\r\n'
    b"\r\n"
    b"SW52b2ljZSA4ODEyCg==\r\n"
    b"\r\n"
    b"--=_ee78214b4048a36bab5e9b7775741e--\r\n"
)


def message(**changes: Any) -> OutgoingMessage:
    data: dict[str, Any] = {
        "integration": "support-m365",
        "id": "order-1",
        "from": {"email": "support@contoso.com", "name": "Support"},
        "to": ["ana@example.com"],
        "subject": "Hello",
        "text": "Hi Ana.",
    }
    data.update(changes)
    return parse_message({k: v for k, v in data.items() if v is not ...})


def build(msg: OutgoingMessage, now: dt.datetime = NOW) -> bytes:
    return build_mime(msg, message_id_domain="contoso.com", now=now).as_bytes()


def parse(raw: bytes) -> EmailMessage:
    """Parsed as a reader does (UTF-8 headers, as an SMTPUTF8 server delivers them, included)."""
    parsed = email.message_from_string(raw.decode("utf-8"), policy=policy.default)
    assert isinstance(parsed, EmailMessage)
    return parsed


def text_of(part: Any) -> str:
    return part.get_content().replace("\r\n", "\n")


def test_sample_message_has_these_exact_bytes() -> None:
    assert build(parse_message(SAMPLE.read_text())) == SAMPLE_MIME


def test_same_message_and_time_give_the_same_bytes() -> None:
    msg = parse_message(SAMPLE.read_text())

    assert build(msg) == build(msg)


def test_message_id_is_derived_from_the_id_so_a_retry_carries_the_same() -> None:
    # Given the same message built at two different times
    first = parse(build(message(), NOW))
    retry = parse(build(message(), NOW + dt.timedelta(minutes=15)))

    # Then the Date differs but the Message-ID does not
    assert first["Date"] != retry["Date"]
    expected = f"<{hashlib.sha256(b'order-1').hexdigest()[:32]}@contoso.com>"
    assert first["Message-ID"] == retry["Message-ID"] == expected


def test_different_ids_get_different_message_ids_and_boundaries() -> None:
    one = build(message(id="a", html="<p>x</p>"))
    two = build(message(id="b", html="<p>x</p>"))

    assert parse(one)["Message-ID"] != parse(two)["Message-ID"]
    assert parse(one).get_boundary() != parse(two).get_boundary()


def test_message_without_id_still_gets_a_message_id() -> None:
    assert re.fullmatch(r"<[0-9a-f]{32}@contoso\.com>", parse(build(message(id=...)))["Message-ID"])


def test_message_id_domain_must_be_a_host_name() -> None:
    with pytest.raises(ValueError):
        message_id_for("x", "contoso.com>\r\nBcc: x@y.co")


def test_text_only_is_a_single_text_plain_part() -> None:
    parsed = parse(build(message()))

    assert parsed.get_content_type() == "text/plain"
    assert text_of(parsed) == "Hi Ana.\n"
    assert parsed["MIME-Version"] == "1.0"


def test_html_only_is_a_single_text_html_part() -> None:
    parsed = parse(build(message(text=..., html="<p>Hi</p>")))

    assert parsed.get_content_type() == "text/html"


def test_text_and_html_are_alternatives_with_text_first() -> None:
    parsed = parse(build(message(html="<p>Hi</p>")))

    assert parsed.get_content_type() == "multipart/alternative"
    assert [p.get_content_type() for p in parsed.iter_parts()] == ["text/plain", "text/html"]


def test_attachments_follow_the_body_in_multipart_mixed() -> None:
    content = base64.b64encode(b"%PDF-1.4 binary \x00\xff").decode()
    parsed = parse(
        build(
            message(
                html="<p>Hi</p>",
                attachments=[
                    {"filename": "Rechnung Größe.pdf", "content_type": "application/pdf", "content": content}
                ],
            )
        )
    )

    parts = list(parsed.iter_parts())
    assert parsed.get_content_type() == "multipart/mixed"
    assert [p.get_content_type() for p in parts] == ["multipart/alternative", "application/pdf"]
    assert parts[1].get_filename() == "Rechnung Größe.pdf"
    assert parts[1].get_content() == b"%PDF-1.4 binary \x00\xff"
    assert parts[1].get_content_disposition() == "attachment"


def test_sub_parts_carry_no_mime_version_header() -> None:
    raw = build(message(html="<p>Hi</p>"))

    assert raw.count(b"MIME-Version") == 1


def test_bcc_is_in_the_envelope_but_never_in_the_headers() -> None:
    msg = message(cc=["cy@example.com"], bcc=["hidden@example.com"])
    raw = build(msg)

    assert b"hidden@example.com" not in raw
    assert b"Bcc" not in raw
    assert envelope(msg) == (
        "support@contoso.com",
        ["ana@example.com", "cy@example.com", "hidden@example.com"],
    )


def test_envelope_lists_each_recipient_once() -> None:
    msg = message(to=["ana@example.com", "Ana@Example.com"], cc=["ana@example.com"], bcc=["bo@example.com"])

    assert envelope(msg)[1] == ["ana@example.com", "bo@example.com"]


def test_headers_and_addresses_are_written() -> None:
    parsed = parse(
        build(
            message(
                to=["Ana <ana@example.com>", "bo@example.com"],
                cc=["cy@example.com"],
                reply_to="help@contoso.com",
                headers={"X-Order": "8812", "List-Unsubscribe": "<mailto:u@contoso.com>"},
            )
        )
    )

    assert [(a.display_name, a.addr_spec) for a in parsed["To"].addresses] == [
        ("Ana", "ana@example.com"),
        ("", "bo@example.com"),
    ]
    assert parsed["Cc"] == "cy@example.com"
    assert parsed["Reply-To"] == "help@contoso.com"
    assert parsed["X-Order"] == "8812"
    assert parsed["List-Unsubscribe"] == "<mailto:u@contoso.com>"
    assert parsed["From"] == "Support <support@contoso.com>"


def test_non_ascii_subject_and_names_are_encoded_words_that_decode_back() -> None:
    raw = build(
        message(
            subject="Grüße aus Köln", **{"from": {"email": "support@contoso.com", "name": "Zoë, Support"}}
        )
    )

    assert raw.isascii()
    parsed = parse(raw)
    assert parsed["Subject"] == "Grüße aus Köln"
    assert parsed["From"].addresses[0].display_name == "Zoë, Support"


def test_non_ascii_text_is_quoted_printable_and_decodes_back() -> None:
    raw = build(message(text="Grüße,\nAna"))

    assert raw.isascii()
    assert b"Content-Transfer-Encoding: quoted-printable" in raw
    assert text_of(parse(raw)) == "Grüße,\nAna\n"


def test_ascii_text_with_long_lines_is_quoted_printable() -> None:
    raw = build(message(text="x" * 500))

    assert b"Content-Transfer-Encoding: quoted-printable" in raw
    assert max(len(line) for line in raw.split(b"\r\n")) <= 78


def test_non_ascii_local_part_gets_utf8_headers() -> None:
    raw = build(message(to=["José <josé@example.com>"]))

    assert "To: José <josé@example.com>".encode() in raw


def test_lines_end_in_crlf_only() -> None:
    raw = build(message(text="a\nb\rc\r\nd", html="<p>\n</p>"))

    assert b"\n" not in raw.replace(b"\r\n", b"")
    assert b"\r" not in raw.replace(b"\r\n", b"")


def test_boundary_never_occurs_in_the_content() -> None:
    # Given a text part that contains the boundary mailbroker would pick first
    first = "=_" + hashlib.sha256(b"order-1\x000\x000").hexdigest()[:30]
    msg = message(text=f"look: {first}", html="<p>x</p>")

    # Then another boundary is used
    parsed = parse(build(msg))
    assert parsed.get_boundary() != first
    assert [p.get_content_type() for p in parsed.iter_parts()] == ["text/plain", "text/html"]


# --- any valid message ----------------------------------------------------------------------------

safe_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cc", "Cs")), max_size=60)
body_text = st.text(
    st.characters(codec="utf-8", exclude_categories=("Cs",), exclude_characters="\x00"),
    min_size=1,
    max_size=300,
)
local = st.from_regex(r"[a-z0-9][a-z0-9.+_-]{0,15}", fullmatch=True).filter(
    lambda s: ".." not in s and s[-1] != "."
)
addresses = st.builds(
    lambda name, lp, domain: {"email": f"{lp}@{domain}.example", "name": name},
    safe_text,
    local | st.sampled_from(["josé", "ünïcode", "用户"]),
    st.from_regex(r"[a-z]{1,10}", fullmatch=True),
)
valid_messages = st.builds(
    lambda to, subject, text, html, names, files: {
        "integration": "i",
        "id": "m-1",
        "from": "support@contoso.com",
        "to": to,
        "subject": subject,
        "text": text,
        "html": html,
        "headers": {f"X-{n}": v for n, v in names.items()},
        "attachments": [
            {"filename": f"f{i}.bin", "content": base64.b64encode(data).decode()}
            for i, data in enumerate(files)
        ],
    },
    st.lists(addresses, min_size=1, max_size=3),
    safe_text.filter(str.strip),
    body_text,
    st.none() | body_text,
    st.dictionaries(st.from_regex(r"[a-z]{1,10}", fullmatch=True), safe_text, max_size=2),
    st.lists(st.binary(max_size=500), max_size=2),
)


def _lines(text: str) -> str:
    """The text with each line ended by one newline, as a MIME reader returns it."""
    lines = re.split(r"\r\n|\r|\n", text)
    if len(lines) > 1 and lines[-1] == "":
        lines.pop()
    return "".join(f"{line}\n" for line in lines)


# CPython before 3.11.9 / 3.12.3 encodes the separating comma when it folds an address list with
# encoded display names (python/cpython#100884, CVE-2025-1795): the header loses recipients.
_FOLDS_ADDRESS_LISTS_BADLY = sys.version_info < (3, 11, 9) or (3, 12) <= sys.version_info < (3, 12, 3)


@pytest.mark.skipif(
    _FOLDS_ADDRESS_LISTS_BADLY, reason="stdlib address-list folding bug, python/cpython#100884"
)
@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(valid_messages)
def test_any_valid_message_builds_and_parses_back_to_the_same_content(data: dict[str, Any]) -> None:
    # Given any valid message
    msg = parse_message(data)

    # When it is built and parsed by a MIME reader
    raw = build(msg)
    parsed = parse(raw)

    # Then the reader sees the same subject, recipients, bodies and attachments
    assert " ".join(str(parsed["Subject"]).split()) == " ".join(msg.subject.split())
    assert [a.addr_spec for a in parsed["To"].addresses] == [a.email for a in msg.to]
    # (the stdlib's folding may move whitespace inside long encoded display names; never characters)
    assert ["".join(a.display_name.split()) for a in parsed["To"].addresses] == [
        "".join((a.name or "").split()) for a in msg.to
    ]
    assert text_of(parsed.get_body(("plain",))) == _lines(msg.text or "")
    if msg.html:
        assert text_of(parsed.get_body(("html",))) == _lines(msg.html)
    assert [p.get_content() for p in parsed.iter_attachments()] == [a.content for a in msg.attachments]
    for name, value in msg.headers.items():
        assert " ".join(str(parsed[name]).split()) == " ".join(value.split())
    # and the size estimate is an upper bound
    assert msg.estimated_size() >= len(raw)
