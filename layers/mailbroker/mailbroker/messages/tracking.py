"""Open and click tracking, off unless a message (or its integration) asks for it.

A tracked message's HTML part gets a 1x1 image ``GET /v1/t/o/{token}`` (opens) and its ``http``
and ``https`` links rewritten to ``GET /v1/t/c/{token}`` (clicks), which answers ``302`` to the
original URL. Only the HTML part changes, and in it only the ``href`` value of those links and the
one added image: text parts, ``mailto:`` and other links, and untracked messages keep every byte.

A token is ``<payload>.<mac>``, both base64url: the payload names the message, the kind (``o`` or
``c``), and for a click the link's position and URL; the MAC is KMS ``GenerateMac`` (HMAC-SHA-256)
under the stack's tracking key, whose secret never leaves KMS. The click route redirects only to
the URL inside a token whose MAC verifies, so it can never send anyone where the message did not
link, and a forged or altered token answers 404. The same message always gets the same tokens
(HMAC is deterministic), so every attempt sends the same bytes.
"""

from __future__ import annotations

import base64
import binascii
import html
import json
import re
from dataclasses import dataclass
from html.parser import HTMLParser
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from mailbroker.errors import aws_failure

if TYPE_CHECKING:  # the tracking function verifies links without the message models
    from mailbroker.integrations import Tracking
    from mailbroker.messages.models import OutgoingMessage

OPEN = "o"
CLICK = "c"
MAC_ALGORITHM = "HMAC_SHA_256"
# What the MAC covers besides the payload: a token for anything else cannot pass for one of these.
_CONTEXT = b"mailbroker tracking v1\n"
# A link is tracked only when its URL can stand in a Location header as it is.
_TRACKABLE = re.compile(r"^[\x21-\x7e]+$")
_HREF = re.compile(r"""(\shref\s*=\s*)("[^"]*"|'[^']*'|[^\s"'=<>`]+)""", re.IGNORECASE)
_BODY_END = re.compile(r"</body\s*>", re.IGNORECASE)
MAX_TOKEN_CHARS = 4096
# A transparent 1x1 GIF.
PIXEL = base64.b64decode("R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7")


@dataclass(frozen=True)
class TrackedLink:
    """What a verified token says."""

    kind: str  # OPEN or CLICK
    message_id: str
    link: int | None = None
    url: str | None = None


class TrackingSigner:
    """HMAC under the stack's KMS key: ``GenerateMac`` when building a message, ``VerifyMac`` when a
    token comes back."""

    def __init__(self, kms_client: Any, key_id: str) -> None:
        self._kms = kms_client
        self.key_id = key_id

    def mac(self, payload: bytes) -> bytes:
        try:
            answer = self._kms.generate_mac(
                KeyId=self.key_id, Message=_CONTEXT + payload, MacAlgorithm=MAC_ALGORITHM
            )
        except Exception as exc:
            raise aws_failure(exc, "KMS GenerateMac for a tracking link") from exc
        return bytes(answer["Mac"])

    def verify(self, payload: bytes, mac: bytes) -> bool:
        try:
            answer = self._kms.verify_mac(
                KeyId=self.key_id, Message=_CONTEXT + payload, MacAlgorithm=MAC_ALGORITHM, Mac=mac
            )
        except self._kms.exceptions.KMSInvalidMacException:
            return False
        except Exception as exc:
            raise aws_failure(exc, "KMS VerifyMac for a tracking link") from exc
        return bool(answer.get("MacValid"))


def make_token(signer: TrackingSigner, link: TrackedLink) -> str:
    fields: dict[str, Any] = {"k": link.kind, "m": link.message_id}
    if link.kind == CLICK:
        fields.update(l=link.link, u=link.url)
    payload = _b64(json.dumps(fields, separators=(",", ":"), ensure_ascii=True).encode())
    return f"{payload}.{_b64(signer.mac(payload.encode()))}"


def read_token(signer: TrackingSigner, token: str, kind: str) -> TrackedLink | None:
    """The link a token stands for, or None for anything mailbroker did not sign as ``kind``."""
    if not token or len(token) > MAX_TOKEN_CHARS or token.count(".") != 1:
        return None
    payload, mac = token.split(".")
    try:
        raw_mac = _unb64(mac)
    except (binascii.Error, ValueError):
        return None
    if not raw_mac or not signer.verify(payload.encode(), raw_mac):
        return None
    fields = json.loads(_unb64(payload))
    if fields.get("k") != kind:
        return None
    if kind == OPEN:
        return TrackedLink(OPEN, str(fields["m"]))
    return TrackedLink(CLICK, str(fields["m"]), int(fields["l"]), str(fields["u"]))


# ------------------------------------------------------------------------ the HTML part


@dataclass(frozen=True)
class _Anchor:
    start: int  # offset of the tag in the HTML
    text: str  # the tag as written
    url: str  # its href, entities decoded: where a browser would go


class _AnchorFinder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.found: list[tuple[tuple[int, int], str, str]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag != "a":
            return
        href = next((value for name, value in attrs if name == "href"), None)
        text = self.get_starttag_text()
        if href is not None and text is not None:
            self.found.append((self.getpos(), text, href))

    handle_startendtag = handle_starttag


def anchors(document: str) -> list[_Anchor]:
    """The ``<a href>`` tags of ``document`` whose URL is trackable (http or https, with a host,
    printable ASCII), at their offsets."""
    finder = _AnchorFinder()
    finder.feed(document)
    finder.close()
    line_starts = [0]
    for index, char in enumerate(document):
        if char == "\n":
            line_starts.append(index + 1)
    found = []
    for (line, column), text, url in finder.found:
        start = line_starts[line - 1] + column
        if document[start : start + len(text)] != text or not trackable(url):
            continue
        found.append(_Anchor(start, text, url))
    return found


def _with_href(tag: str, url: str) -> str:
    """``tag`` with its href attribute's value replaced by ``url``, quoted and escaped."""
    match = _HREF.search(tag)
    if match is None:
        return tag
    return f'{tag[: match.start(2)]}"{html.escape(url)}"{tag[match.end(2) :]}'


def _href_of(tag: str) -> str | None:
    finder = _AnchorFinder()
    finder.feed(tag)
    finder.close()
    return finder.found[0][2] if len(finder.found) == 1 else None


def trackable(url: str) -> bool:
    if not _TRACKABLE.match(url):
        return False
    parts = urlsplit(url)
    return parts.scheme.lower() in ("http", "https") and bool(parts.hostname)


def track_html(
    document: str,
    *,
    message_id: str,
    base_url: str,
    signer: TrackingSigner,
    opens: bool,
    clicks: bool,
) -> str:
    """``document`` with its trackable links rewritten (``clicks``) and the image added
    (``opens``); every other byte as it was."""
    base = base_url.rstrip("/")
    out = document
    if clicks:
        pieces: list[str] = []
        cursor = 0
        for index, anchor in enumerate(anchors(document)):
            token = make_token(signer, TrackedLink(CLICK, message_id, index, anchor.url))
            target = f"{base}/v1/t/c/{token}"
            tag = _with_href(anchor.text, target)
            if _href_of(tag) != target:  # an odd tag the pattern misread: leave it as written
                continue
            pieces += [document[cursor : anchor.start], tag]
            cursor = anchor.start + len(anchor.text)
        out = "".join([*pieces, document[cursor:]])
    if opens:
        token = make_token(signer, TrackedLink(OPEN, message_id))
        pixel = (
            f'<img src="{html.escape(f"{base}/v1/t/o/{token}")}" width="1" height="1" alt="" '
            'style="display:block;width:1px;height:1px;border:0">'
        )
        ends = list(_BODY_END.finditer(out))
        at = ends[-1].start() if ends else len(out)
        out = out[:at] + pixel + out[at:]
    return out


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    if not re.fullmatch(r"[A-Za-z0-9_-]*", text):
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class LinkTracker:
    """What the sender applies to each message before building its MIME: tracking as the message
    (or, when it says nothing, its integration) asks, or the message untouched."""

    def __init__(self, signer: TrackingSigner, base_url: str) -> None:
        self.signer = signer
        self.base_url = base_url

    def apply(self, message: OutgoingMessage, message_id: str, default: Tracking) -> OutgoingMessage:
        wanted = message.tracking or default
        if not (wanted.opens or wanted.clicks) or not message.html:
            return message
        tracked = track_html(
            message.html,
            message_id=message_id,
            base_url=self.base_url,
            signer=self.signer,
            opens=wanted.opens,
            clicks=wanted.clicks,
        )
        return message.model_copy(update={"html": tracked})
