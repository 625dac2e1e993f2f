"""Open and click tracking through the whole path: a message queued with ``tracking``, sent by the
sender to the sandbox SMTP server, its HTML read back from what the server received, its image
and links requested through the HTTP API's tracking routes (the tracking function, KMS HMAC on
moto), the counts on its status record, and the events the publisher put on EventBridge."""

from __future__ import annotations

import email
import email.policy
import json
import re
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest

from mailbroker_sandbox.local import QueuePoller, Sandbox

pytestmark = pytest.mark.xdist_group("tracking-sandbox")

HTML = (
    "<html><body>\n"
    '<p>Your order <a href="https://shop.example/orders/8812?ref=mail&amp;utm_source=x#top">8812</a>'
    " shipped.</p>\n"
    "<p><A class=cta HREF='http://track.example/a%20b?q=%C3%A9'>Track it</A> or write to "
    '<a href="mailto:help@relay.example">us</a>, <a href="/relative">relative</a>.</p>\n'
    "</body></html>\n"
)
TEXT = "Your order 8812 shipped: https://shop.example/orders/8812\n"
HUMAN = {"User-Agent": "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_5) AppleWebKit/605.1.15 Mail"}


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Sandbox]:
    with Sandbox(stack_name=f"tr{uuid.uuid4().hex[:6]}") as running:
        running.register_demo()
        yield running


@pytest.fixture
def human_window(sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch) -> None:
    """Hits right after sending count as a person's, not a scanner's (the test cannot wait)."""
    from mailbroker import runtime
    from mailbroker.handlers import tracking

    monkeypatch.setenv("TRACKING_MACHINE_WINDOW_SECONDS", "0")
    runtime.reset()
    tracking.reset()
    yield
    tracking.reset()


def send(sandbox: Sandbox, **extra: Any) -> tuple[str, Any]:
    """Queue one message through ``POST /v1/messages``, drive the sender, and answer its id and the
    message the SMTP server received."""
    message_id = f"order-{uuid.uuid4().hex[:8]}"
    body = {
        "integration": "relay",
        "id": message_id,
        "from": "alerts@relay.example",
        "to": ["ana@example.com"],
        "subject": "Your order shipped",
        "text": TEXT,
        "html": HTML,
        **extra,
    }
    status, _, answer = sandbox.http("POST", "/v1/messages", json.dumps(body))
    assert status == 202, answer
    poller = QueuePoller(sandbox)
    for _ in range(10):
        if not poller.poll_once(wait_seconds=1).received and poller.in_flight() == 0:
            break
    (received,) = [
        m for m in sandbox.smtp.accepted if message_id.encode() in m.data or _has_id(m, message_id)
    ]
    return message_id, email.message_from_bytes(received.data, policy=email.policy.SMTP)


def _has_id(accepted: Any, message_id: str) -> bool:
    from mailbroker.messages.mime import message_id_for

    parsed = email.message_from_bytes(accepted.data, policy=email.policy.SMTP)
    return str(parsed["Message-ID"]) == message_id_for(message_id, "relay.example")


def part(message: Any, subtype: str) -> str:
    """The decoded text of a part (SMTP's CRLF line ends as posted: LF)."""
    return raw_part(message, subtype).get_content().replace("\r\n", "\n")


def raw_part(message: Any, subtype: str) -> Any:
    (found,) = [p for p in message.walk() if p.get_content_type() == f"text/{subtype}"]
    return found


def tracking_paths(html: str) -> tuple[str, list[str]]:
    (pixel,) = re.findall(r'<img src="([^"]+/v1/t/o/[^"]+)"', html)
    links = re.findall(r'href="([^"]+/v1/t/c/[^"]+)"', html, re.IGNORECASE)
    return urlsplit(pixel).path, [urlsplit(link).path for link in links]


def record(sandbox: Sandbox, message_id: str) -> dict[str, Any]:
    status, _, answer = sandbox.http("GET", f"/v1/messages/{message_id}")
    assert status == 200, answer
    return dict(answer)


def test_tracked_mail_counts_opens_and_clicks_and_redirects_to_the_original_url(sandbox, human_window):
    message_id, received = send(sandbox, tracking={"opens": True, "clicks": True})
    html = part(received, "html")
    pixel, links = tracking_paths(html)
    assert len(links) == 2  # the two web links; mailto: and the relative link stay as written
    assert 'href="mailto:help@relay.example"' in html and 'href="/relative"' in html
    assert part(received, "plain") == TEXT

    opened = sandbox.http("GET", pixel, headers=HUMAN)
    sandbox.http("GET", pixel, headers=HUMAN)
    first = sandbox.http("GET", links[0], headers=HUMAN)
    second = sandbox.http("GET", links[1], headers=HUMAN)

    assert opened[0] == 200 and opened[1]["Content-Type"] == "image/gif" and opened[2][:6] == b"GIF89a"
    assert (first[0], first[1]["Location"]) == (
        302,
        "https://shop.example/orders/8812?ref=mail&utm_source=x#top",
    )
    assert (second[0], second[1]["Location"]) == (302, "http://track.example/a%20b?q=%C3%A9")
    counted = record(sandbox, message_id)
    assert counted["opens"]["count"] == 2 and counted["opens"]["machine"] == 0
    assert counted["opens"]["first_at"] <= counted["opens"]["last_at"]
    assert [(c["link"], c["url"], c["count"]) for c in counted["clicks"]] == [
        (0, "https://shop.example/orders/8812?ref=mail&utm_source=x#top", 1),
        (1, "http://track.example/a%20b?q=%C3%A9", 1),
    ]


def test_each_open_and_click_is_published_as_an_event(sandbox, human_window):
    publisher = sandbox.stream_poller()
    message_id, received = send(sandbox, tracking={"opens": True, "clicks": True})
    pixel, links = tracking_paths(part(received, "html"))
    sandbox.http("GET", pixel, headers=HUMAN)
    sandbox.http("GET", links[1], headers=HUMAN)

    publisher.drain()
    events = [e for e in sandbox.delivery_events(wait_seconds=1) if e["detail"]["id"] == message_id]

    assert [e["detail-type"] for e in events] == ["Message Sent", "Message Opened", "Message Link Clicked"]
    assert events[0]["detail"]["accepted"] == ["ana@example.com"]
    opened, clicked = events[1]["detail"], events[2]["detail"]
    assert {k: v for k, v in opened.items() if k != "at"} == {
        "id": message_id,
        "integration": "relay",
        "status": "opened",
        "attempts": 1,
        "machine": False,
    }
    assert clicked["url"] == "http://track.example/a%20b?q=%C3%A9" and clicked["attempts"] == 1


def test_a_scanner_fetching_every_link_at_once_is_flagged_not_hidden(sandbox, human_window):
    message_id, received = send(sandbox, tracking={"clicks": True})
    _, links = tracking_paths(part(received, "html") + '<img src="x/v1/t/o/none">')

    for path in links:
        sandbox.http("GET", path, headers=HUMAN)  # both within the same second: a link scanner
    sandbox.http("GET", links[0], headers={"User-Agent": "Mozilla/5.0 (compatible; Barracuda Sentinel)"})

    clicks = record(sandbox, message_id)["clicks"]
    assert [(c["count"], c["machine"]) for c in clicks] == [(2, 1), (1, 1)]


def test_forged_and_altered_tokens_answer_404_and_redirect_nowhere(sandbox):
    message_id, received = send(sandbox, tracking={"opens": True, "clicks": True})
    pixel, links = tracking_paths(part(received, "html"))
    payload, mac = links[0].rsplit("/", 1)[1].split(".")
    other = json.dumps({"k": "c", "m": message_id, "l": 0, "u": "https://evil.example/"}).encode()
    import base64

    forged_payload = base64.urlsafe_b64encode(other).rstrip(b"=").decode()
    attempts = [
        f"/v1/t/c/{forged_payload}.{mac}",  # another URL under a real MAC
        f"/v1/t/c/{payload}.{mac[:-2]}{'AA' if mac[-2:] != 'AA' else 'BB'}",  # altered MAC
        f"/v1/t/c/{pixel.rsplit('/', 1)[1]}",  # an open token used as a click
        "/v1/t/c/bm90LWEtdG9rZW4",
        "/v1/t/o/bm90LWEtdG9rZW4.AAAA",
    ]

    answers = [sandbox.http("GET", path, headers=HUMAN) for path in attempts]

    assert [a[0] for a in answers] == [404] * len(attempts)
    assert all("Location" not in a[1] for a in answers)
    assert {a[2]["error"]["code"] for a in answers} == {"not_found"}
    assert "clicks" not in record(sandbox, message_id)


def test_untracked_mail_is_byte_identical_to_what_was_posted(sandbox):
    _, received = send(sandbox)
    _, explicitly_off = send(sandbox, tracking={"opens": False, "clicks": False})
    _, tracked = send(sandbox, tracking={"opens": True, "clicks": True})

    for message in (received, explicitly_off):
        assert part(message, "html") == HTML
        assert part(message, "plain") == TEXT
        assert "/v1/t/" not in message.as_string()
    # The text part of tracked mail is the same bytes on the wire as untracked mail's.
    assert raw_part(tracked, "plain").as_bytes() == raw_part(received, "plain").as_bytes()
    assert raw_part(explicitly_off, "html").as_bytes() == raw_part(received, "html").as_bytes()
