"""How tracking changes a message's HTML part: only the href of web links, and one image; every
other byte as posted. The MAC here is a local HMAC standing in for KMS GenerateMac (the
integration tests use moto's KMS); what is under test is the rewriting and the token format."""

from __future__ import annotations

import hashlib
import hmac
import re

import pytest
from mailbroker.messages.tracking import CLICK, OPEN, anchors, read_token, track_html

BASE = "https://mail-api.example"


class LocalMac:
    def __init__(self, key: bytes = b"k" * 32) -> None:
        self.key = key

    def mac(self, payload: bytes) -> bytes:
        return hmac.new(self.key, payload, hashlib.sha256).digest()

    def verify(self, payload: bytes, mac: bytes) -> bool:
        return hmac.compare_digest(self.mac(payload), mac)


SIGNER = LocalMac()


def tracked(document: str, *, opens: bool = True, clicks: bool = True) -> str:
    return track_html(document, message_id="m-1", base_url=BASE, signer=SIGNER, opens=opens, clicks=clicks)  # type: ignore[arg-type]


def strip_tracking(document: str) -> str:
    """The document with each tracking URL replaced by a marker and the image removed."""
    without_image = re.sub(r'<img src="[^"]+/v1/t/o/[^"]+"[^>]*>', "", document)
    return re.sub(r'"' + re.escape(BASE) + r'/v1/t/c/[^"]+"', "TRACKED", without_image)


def test_only_the_href_of_web_links_changes():
    document = (
        "<!DOCTYPE html><html><head><style>a{color:red}</style></head><body>\r\n"
        '<p class="x">Hi&nbsp;Ana,\n<a   href = "https://a.example/x?y=1&amp;z=2" data-href="keep">one</a>'
        " <A HREF='HTTP://b.example'>two</A> <a href=https://c.example/p>three</a>"
        ' <a href="mailto:help@example.com">mail</a> <a href="tel:+1">tel</a> <a href="#top">top</a>'
        ' <a name="n">anchor</a> <!-- <a href="https://comment.example"> --></p>\n</body></html>'
    )

    out = tracked(document, opens=False)

    assert strip_tracking(out) == (
        "<!DOCTYPE html><html><head><style>a{color:red}</style></head><body>\r\n"
        '<p class="x">Hi&nbsp;Ana,\n<a   href = TRACKED data-href="keep">one</a>'
        " <A HREF=TRACKED>two</A> <a href=TRACKED>three</a>"
        ' <a href="mailto:help@example.com">mail</a> <a href="tel:+1">tel</a> <a href="#top">top</a>'
        ' <a name="n">anchor</a> <!-- <a href="https://comment.example"> --></p>\n</body></html>'
    )


def test_each_link_token_carries_where_a_browser_would_have_gone():
    document = '<a href="https://a.example/x?y=1&amp;z=%20#f">a</a><a href="https://a.example/x?y=1&amp;z=%20#f">b</a>'

    tokens = re.findall(r"/v1/t/c/([^\"]+)", tracked(document, opens=False))

    links = [read_token(SIGNER, token, CLICK) for token in tokens]  # type: ignore[arg-type]
    assert [(link.link, link.url) for link in links if link] == [
        (0, "https://a.example/x?y=1&z=%20#f"),
        (1, "https://a.example/x?y=1&z=%20#f"),
    ]


def test_the_image_goes_before_the_last_body_end_or_at_the_end():
    with_body = tracked("<html><body><p>x</p></BODY ></html>", clicks=False)
    without_body = tracked("<p>x</p>", clicks=False)

    assert re.fullmatch(r'<html><body><p>x</p><img src="[^"]+/v1/t/o/[^"]+"[^>]*></BODY ></html>', with_body)
    assert re.fullmatch(r'<p>x</p><img src="[^"]+/v1/t/o/[^"]+"[^>]*>', without_body)
    (token,) = re.findall(r"/v1/t/o/([^\"]+)", with_body)
    assert read_token(SIGNER, token, OPEN).message_id == "m-1"  # type: ignore[arg-type,union-attr]


def test_the_same_message_gets_the_same_bytes_every_time():
    document = '<body><a href="https://a.example">a</a></body>'
    assert tracked(document) == tracked(document)


@pytest.mark.parametrize(
    "url",
    [
        "https://ä.example/",
        "https://a.example/with space",
        " https://a.example/",
        "javascript:alert(1)",
        "//a.example",
    ],
)
def test_links_that_cannot_stand_in_a_location_header_stay_as_written(url):
    document = f'<a href="{url}">x</a>'
    assert anchors(document) == []
    assert tracked(document, opens=False) == document


def test_a_token_for_another_kind_or_another_key_is_refused():
    (token,) = re.findall(r"/v1/t/c/([^\"]+)", tracked('<a href="https://a.example">a</a>', opens=False))

    assert read_token(SIGNER, token, OPEN) is None  # type: ignore[arg-type]
    assert read_token(LocalMac(b"other" * 8), token, CLICK) is None  # type: ignore[arg-type]
    for broken in ("", ".", "a.b.c", token + "A", token.replace(".", "!"), "x" * 5000):
        assert read_token(SIGNER, broken, CLICK) is None  # type: ignore[arg-type]
