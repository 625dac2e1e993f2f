"""Finding 5: CR/LF reached a MIME part header through an attachment file name.

The email package decodes an encoded word inside a parameter (``=?utf-8?q?x=0D=0AX-Injected:_yes?=``)
and ``as_bytes()`` writes headers without ``verify_generated_headers``: the caller could add part
headers, or close the multipart early (its boundary derives from the message id, so it can be
predicted), hiding later attachments and slipping a message/* part past the attachment-type ban.
"""

from __future__ import annotations

import base64
import email
import hashlib
import re
from email import policy

import pytest
from mailbroker.errors import InvalidMessage
from mailbroker.messages.mime import build_mime
from mailbroker.messages.models import Attachment, parse_message

HOSTILE_NAMES = [
    "=?utf-8?q?x=0D=0AX-Injected:_yes?=",
    "=?utf-8?b?eA0KWC1JbmplY3RlZDogeWVz?=",  # the same, base64
    "invoice =?UTF-8?Q?=0A?= .pdf",
    "a.pdf=?iso-8859-1?q?=0D?=",
]


def _boundary(seed: str, index: int) -> str:
    """The boundary ``build_mime`` derives for a message id (what an attacker can predict)."""
    return "=_" + hashlib.sha256(f"{seed}\x00{index}\x000".encode()).hexdigest()[:30]


def _message(*filenames: str) -> dict:
    return {
        "integration": "support",
        "id": "f5-order",
        "from": "support@contoso.com",
        "to": ["ana@example.com"],
        "subject": "Invoice",
        "text": "See attached.",
        "attachments": [
            {"filename": name, "content": base64.b64encode(f"file {i}".encode()).decode()}
            for i, name in enumerate(filenames)
        ],
    }


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_finding_5_an_encoded_word_in_a_file_name_is_refused(name):
    with pytest.raises(InvalidMessage) as refused:
        parse_message(_message("ok.txt", name))

    assert refused.value.code == "invalid_message"
    assert {d["field"] for d in refused.value.details} == {"attachments[1].filename"}
    assert "encoded-word" in refused.value.details[0]["problem"]


def test_finding_5_closing_the_multipart_early_is_refused():
    """The attack: end the mixed part, then add a message/rfc822 part the type ban would refuse."""
    closing = (
        f"x\r\n--{_boundary('f5-order', 0)}--\r\nContent-Type: message/rfc822\r\n\r\nFrom: ceo@contoso.com"
    )
    encoded = "=?utf-8?b?" + base64.b64encode(closing.encode()).decode() + "?="

    with pytest.raises(InvalidMessage):
        parse_message(_message("ok.txt", encoded, "later.pdf"))


def test_finding_5_the_mime_builder_refuses_a_part_header_with_a_line_break():
    """Backstop: a model that skipped validation (built in code) still gets no broken header."""
    message = parse_message(_message("ok.txt"))
    hostile = Attachment.model_construct(filename=HOSTILE_NAMES[0], content_type=None, content=b"x")
    smuggled = message.model_copy(update={"attachments": [hostile]})

    with pytest.raises(InvalidMessage) as refused:
        build_mime(smuggled, message_id_domain="contoso.com")

    assert refused.value.code == "invalid_message"


# Names a caller may legitimately give: quotes, separators, non-ASCII, boundary look-alikes.
LEGAL_NAMES = [
    'report "final"; v2.pdf',
    "Grüße aus Köln \u2013 résumé.pdf",
    f"--{_boundary('f5-order', 0)}--.txt",
    "a" * 200 + ".txt",
    "semi;colon=equals.csv",
]


def test_finding_5_no_generated_header_anywhere_carries_a_bare_cr_or_lf():
    raw = build_mime(parse_message(_message(*LEGAL_NAMES)), message_id_domain="contoso.com").as_bytes()

    # Every header line of every part: a field or a continuation, and no CR or LF inside a line.
    blocks = [raw.split(b"\r\n\r\n", 1)[0]]
    blocks += [chunk.split(b"\r\n\r\n", 1)[0] for chunk in re.split(rb"\r\n--=_[0-9a-f]{30}\r\n", raw)[1:]]
    for block in blocks:
        for line in block.split(b"\r\n"):
            assert b"\r" not in line and b"\n" not in line
            assert re.match(rb"[!-9;-~]+: |[ \t]", line), line
    assert b"X-Injected" not in raw
    assert b"\n" not in raw.replace(b"\r\n", b"") and b"\r" not in raw.replace(b"\r\n", b"")

    # and a MIME reader sees every attachment, under its own name, in one closed multipart
    parsed = email.message_from_bytes(raw, policy=policy.default)
    assert [p.get_filename() for p in parsed.iter_attachments()] == LEGAL_NAMES
    assert raw.count(f"--{_boundary('f5-order', 0)}--\r\n".encode()) == 1
