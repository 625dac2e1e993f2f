"""The outgoing message: the JSON applications queue (docs/design.md, "Messages"), validated.

``parse_message`` turns any input into an :class:`OutgoingMessage` or raises ``InvalidMessage``
whose ``details`` list every problem as ``{"field", "problem"}``. Problems name fields and rules,
never the offending value: a header value or an address may be personal or secret.

What is refused, and why:

- header injection: CR, LF and NUL never reach a header (subject, display names, header values);
  header names are RFC 5322 field names, and a caller cannot set the headers mailbroker writes
  itself (From, To, Cc, Bcc, Subject, Date, Message-ID, Reply-To, MIME-Version, Content-*, ...);
- addresses that are not ``local@domain`` dot-atoms; a non-ASCII local part is allowed and marks
  the message ``needs_smtputf8`` (the transport refuses it when the server lacks SMTPUTF8);
  non-ASCII domains are converted to their ASCII (IDNA) form;
- attachments whose content is not base64 or whose type is not ``type/subtype``; file names lose
  any path and control characters;
- duplicate JSON keys (which value would win is parser-dependent) and unknown fields.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import math
import mimetypes
import re
import unicodedata
from collections.abc import Mapping
from email.headerregistry import HeaderRegistry, UnstructuredHeader
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    model_validator,
)
from pydantic_core import PydanticCustomError

from mailbroker.errors import InvalidMessage, SenderNotAllowed
from mailbroker.integrations import Tracking

if TYPE_CHECKING:
    from mailbroker.integrations import Integration

MAX_RAW_BYTES = 40 * 1024 * 1024  # the JSON itself: 25 MiB of attachments is ~34 MiB of base64
MAX_ATTACHMENT_BYTES = 25 * 1024 * 1024  # decoded, all attachments together
MAX_ATTACHMENTS = 100
MAX_RECIPIENTS = 500  # to + cc + bcc (Microsoft 365's per-message limit)
MAX_HEADERS = 100
MAX_BODY_CHARS = 20 * 1024 * 1024
MAX_PROBLEMS = 100  # details listed; a summary entry says how many more there were
MAX_DISPLAY_NAME_CHARS = 200
# From, To, Cc, Bcc and Reply-To together (the HTTP transports write a Bcc header too): addresses
# and display names, in UTF-8 octets. 500 recipients of 40-octet addresses with 80-octet names fit;
# Exchange Online refuses a message whose headers pass 256 KiB, and writing such headers is work
# the sender does before it may claim the id.
MAX_ADDRESS_HEADER_BYTES = 64 * 1024

# Headers mailbroker writes itself: a caller's copy would contradict the envelope or the MIME tree.
RESERVED_HEADERS = frozenset(
    {
        "from",
        "to",
        "cc",
        "bcc",
        "subject",
        "date",
        "message-id",
        "reply-to",
        "mime-version",
        "sender",
        "return-path",
    }
)
# Every header the email package parses as structured (addresses, dates, MIME fields, Resent-*)
# is one mailbroker owns as well.
_STRUCTURED_HEADERS = frozenset(
    name for name, cls in HeaderRegistry().registry.items() if not issubclass(cls, UnstructuredHeader)
)

_ATEXT = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+")
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_FTEXT = re.compile(r"[\x21-\x39\x3b-\x7e]+")  # printable ASCII except ':'
_MIME_NAME = r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}"
_MIME_TYPE = re.compile(rf"{_MIME_NAME}/{_MIME_NAME}")
_NAMED_ADDRESS = re.compile(r"\s*(?P<name>[^<>]*?)\s*<(?P<email>[^<>]*)>\s*")


# --- field rules ---------------------------------------------------------------------------------


def _unicode(value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("is not valid Unicode (it contains a lone surrogate)") from None
    return value


def _single_line(value: str) -> str:
    """Header material: no CR, LF, NUL or other control character (TAB is allowed)."""
    _unicode(value)
    # Cc holds CR, LF, NUL, VT, FF and NEL; Zl and Zp (U+2028, U+2029) are line breaks too.
    if any(ch != "\t" and unicodedata.category(ch) in ("Cc", "Zl", "Zp") for ch in value):
        raise ValueError("must not contain line breaks, NUL or other control characters")
    return value


def _body_text(value: str) -> str:
    _unicode(value)
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    return value


def _email_address(value: str) -> str:
    """Validate ``local@domain`` and return it with the domain in ASCII (IDNA) form."""
    value = _unicode(value).strip()
    if not value or len(value.encode("utf-8")) > 254:
        raise ValueError("must be an email address of at most 254 octets")
    local, at, domain = value.rpartition("@")
    if not at or not local or not domain:
        raise ValueError("must be an email address: local@domain")
    if len(local.encode("utf-8")) > 64:
        raise ValueError("has a local part longer than 64 octets")
    for atom in local.split("."):
        if not atom:
            raise ValueError("has a local part with an empty dot-separated part")
        if not all(
            _ATEXT.fullmatch(ch) if ch.isascii() else unicodedata.category(ch)[0] not in "CZ" for ch in atom
        ):
            raise ValueError("has a local part with characters not allowed in an address")
    return f"{local}@{_ascii_domain(domain)}"


def _ascii_domain(domain: str) -> str:
    if not domain.isascii():
        try:
            domain = domain.encode("idna").decode("ascii")
        except UnicodeError:
            raise ValueError("has a domain that is not a valid internationalised name") from None
    labels = domain.split(".")
    if len(labels) < 2 or len(domain) > 253:
        raise ValueError("has a domain that is not a fully qualified host name")
    if not all(_LABEL.fullmatch(label) for label in labels) or labels[-1].isdigit():
        raise ValueError("has a domain that is not a valid host name")
    return domain


def _display_name(value: str | None) -> str | None:
    if value is None:
        return None
    value = _single_line(value).strip()
    return value or None


def _address_input(value: Any) -> Any:
    """``"ana@example.com"`` and ``"Ana <ana@example.com>"`` become ``{"email", "name"}``."""
    if isinstance(value, str):
        match = _NAMED_ADDRESS.fullmatch(value)
        if match:
            return {"email": match.group("email"), "name": match.group("name").strip('" ') or None}
        return {"email": value}
    return value


def _one_or_many(value: Any) -> Any:
    if isinstance(value, str | Mapping):
        return [value]
    return [] if value is None else value


def _header_name(value: str) -> str:
    if not 1 <= len(value) <= 76 or not _FTEXT.fullmatch(value):
        raise ValueError("header names are 1 to 76 printable ASCII characters without ':' or spaces")
    lowered = value.lower()
    if lowered in RESERVED_HEADERS or lowered in _STRUCTURED_HEADERS or lowered.startswith("content-"):
        raise ValueError("this header is written by mailbroker and cannot be set by a message")
    return value


def _filename(value: str) -> str:
    """Keep the last path component, drop control and format characters (including bidi
    overrides, which disguise extensions). Refuse RFC 2047 encoded-word syntax: the email
    package decodes ``=?utf-8?q?x=0D=0AX-Injected:_yes?=`` inside a parameter, so a CR or LF
    would reach the part's headers after every check here. A name is given in Unicode instead."""
    name = _unicode(value).replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(ch for ch in name if unicodedata.category(ch)[0] != "C").strip()
    if "=?" in name:
        raise ValueError("must not contain '=?' (RFC 2047 encoded-word syntax): give the name in Unicode")
    if name in {"", ".", ".."}:
        raise ValueError("must name a file (path parts and control characters are removed)")
    if len(name) > 255:
        raise ValueError("must be at most 255 characters")
    return name


def _content_type(value: str) -> str:
    if not _MIME_TYPE.fullmatch(value):
        raise ValueError("must be a MIME type type/subtype, without parameters")
    value = value.lower()
    if value.split("/", 1)[0] in {"multipart", "message"}:
        raise ValueError("multipart and message types cannot be attached: use application/octet-stream")
    return value


def _base64_content(value: Any) -> bytes:
    if isinstance(value, bytes):  # already decoded (a model built in code)
        return value
    if not isinstance(value, str):
        raise PydanticCustomError("string_type", "Input should be a valid string")
    compact = "".join(value.split())
    if len(compact) > math.ceil(MAX_ATTACHMENT_BYTES / 3) * 4 + 4:
        raise ValueError(f"decodes to more than {MAX_ATTACHMENT_BYTES // (1024 * 1024)} MiB")
    if len(compact) % 4:  # padded base64 comes in quads (older Pythons accept stray padding)
        raise ValueError("is not valid base64")
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("is not valid base64") from None


def _base64_text(value: bytes) -> str:
    return base64.b64encode(value).decode("ascii")


EmailStr = Annotated[str, AfterValidator(_email_address)]
HeaderName = Annotated[str, AfterValidator(_header_name)]
HeaderValue = Annotated[str, Field(max_length=998), AfterValidator(_single_line)]
SubjectStr = Annotated[str, Field(min_length=1, max_length=998), AfterValidator(_single_line)]
BodyStr = Annotated[str, Field(max_length=MAX_BODY_CHARS), AfterValidator(_body_text)]
Base64Content = Annotated[
    bytes, BeforeValidator(_base64_content), PlainSerializer(_base64_text, return_type=str)
]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class EmailAddress(_Model):
    email: EmailStr
    name: Annotated[str | None, Field(max_length=MAX_DISPLAY_NAME_CHARS), AfterValidator(_display_name)] = (
        None
    )

    @property
    def header_bytes(self) -> int:
        """Octets of address and display name, before encoding (the address-header budget)."""
        return len(self.email.encode("utf-8")) + len((self.name or "").encode("utf-8"))

    @property
    def local_part(self) -> str:
        return self.email.rpartition("@")[0]

    @property
    def domain(self) -> str:
        return self.email.rpartition("@")[2]

    @property
    def needs_smtputf8(self) -> bool:
        return not self.local_part.isascii()


Address = Annotated[EmailAddress, BeforeValidator(_address_input)]
AddressList = Annotated[list[Address], BeforeValidator(_one_or_many)]


class Attachment(_Model):
    filename: Annotated[str, Field(max_length=4096), AfterValidator(_filename)]
    content_type: Annotated[str, Field(max_length=255), AfterValidator(_content_type)] | None = None
    content: Base64Content

    @property
    def mime_type(self) -> str:
        """The declared type, else one guessed from the file name."""
        if self.content_type:
            return self.content_type
        guessed, _ = _mime_types().guess_type(self.filename, strict=False)
        if guessed and guessed.split("/", 1)[0] not in {"multipart", "message"}:
            return guessed
        return "application/octet-stream"


class OutgoingMessage(_Model):
    """One message as applications post it (docs/design.md, "Messages")."""

    integration: Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]
    id: Annotated[str, Field(min_length=1, max_length=256, pattern=r"^[\x21-\x7e]+$")] | None = None
    usage: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")] = (
        "transactional"
    )
    # Absent: the integration's default sender (:func:`with_sender_defaults`), applied when queued and sent.
    from_: Address | None = Field(default=None, alias="from")
    to: AddressList = Field(default_factory=list)
    cc: AddressList = Field(default_factory=list)
    bcc: AddressList = Field(default_factory=list)
    reply_to: AddressList = Field(default_factory=list)
    subject: SubjectStr
    text: BodyStr | None = None
    html: BodyStr | None = None
    headers: Annotated[dict[HeaderName, HeaderValue], Field(max_length=MAX_HEADERS)] = Field(
        default_factory=dict
    )
    attachments: Annotated[list[Attachment], Field(max_length=MAX_ATTACHMENTS)] = Field(default_factory=list)
    # Open and click tracking; absent: the integration's default (itself off unless set).
    tracking: Tracking | None = None

    @model_validator(mode="after")
    def _whole_message_rules(self) -> OutgoingMessage:
        problems = _rule_problems(
            recipients=len(self.to) + len(self.cc) + len(self.bcc),
            has_body=bool(self.text or self.html),
            attachment_bytes=sum(len(a.content) for a in self.attachments),
            header_names=list(self.headers),
            address_header_bytes=sum(
                a.header_bytes for a in (*self._from, *self.to, *self.cc, *self.bcc, *self.reply_to)
            ),
        )
        if problems:
            first = problems[0]
            raise PydanticCustomError("message_rule", "{field}: {problem}", first)
        return self

    @property
    def recipients(self) -> list[EmailAddress]:
        return [*self.to, *self.cc, *self.bcc]

    @property
    def sender(self) -> EmailAddress:
        """``from``, once :func:`with_sender_defaults` has filled it in from the integration."""
        if self.from_ is None:
            raise InvalidMessage(
                "the message has no 'from' and its integration's default sender was not applied",
                details=[{"field": "from", "problem": "missing"}],
            )
        return self.from_

    @property
    def _from(self) -> list[EmailAddress]:
        return [self.from_] if self.from_ is not None else []

    @property
    def needs_smtputf8(self) -> bool:
        """True when an address has a non-ASCII local part: only an SMTPUTF8 server can take it."""
        return any(a.needs_smtputf8 for a in (*self._from, *self.recipients, *self.reply_to))

    def estimated_size(self) -> int:
        """An upper bound, in octets, of the MIME message ``build_mime`` makes of this message
        (quoted-printable text at worst 3 octets per non-ASCII octet, base64 attachments)."""
        size = 1024  # fixed headers, MIME-Version, boundaries
        size += len(self.subject.encode()) * 3 + 64
        for addr in (*self._from, *self.to, *self.cc, *self.reply_to):
            size += (len(addr.email) + len((addr.name or "").encode()) * 3) + 16
        for name, value in self.headers.items():
            size += len(name) + len(value.encode()) * 3 + 64
        for body in (self.text, self.html):
            if body:
                size += _qp_upper_bound(body) + 256
        for attachment in self.attachments:
            encoded = math.ceil(len(attachment.content) / 3) * 4
            size += encoded + 2 * math.ceil(encoded / 76) + len(attachment.filename.encode()) * 3 + 512
        return size

    def with_id(self, message_id: str) -> OutgoingMessage:
        """This message with ``id`` set (the queue's message id stands in when the caller gave none)."""
        return OutgoingMessage.model_validate({**self.model_dump(by_alias=True), "id": message_id})


@functools.cache
def _mime_types() -> mimetypes.MimeTypes:
    """The standard library's built-in table only, so every machine guesses the same type."""
    return mimetypes.MimeTypes()


def _qp_upper_bound(text: str) -> int:
    data = text.encode("utf-8")
    non_ascii = sum(1 for b in data if b > 0x7E or (b < 0x20 and b not in (0x0A, 0x0D, 0x09)))
    length = len(data) + 2 * non_ascii + data.count(b"=") * 2
    return length + 3 * math.ceil(length / 73) + data.count(b"\n") + 2


def _rule_problems(
    *,
    recipients: int,
    has_body: bool,
    attachment_bytes: int,
    header_names: list[str],
    address_header_bytes: int = 0,
) -> list[dict[str, str]]:
    problems = []
    if address_header_bytes > MAX_ADDRESS_HEADER_BYTES:
        problems.append(
            {
                "field": "to",
                "problem": f"from, to, cc, bcc and reply_to together hold more than "
                f"{MAX_ADDRESS_HEADER_BYTES // 1024} KiB of addresses and display names: "
                "shorten the display names or split the recipients over several messages",
            }
        )
    if recipients == 0:
        problems.append({"field": "to", "problem": "at least one recipient (to, cc or bcc) is required"})
    elif recipients > MAX_RECIPIENTS:
        problems.append({"field": "to", "problem": f"at most {MAX_RECIPIENTS} recipients in total"})
    if not has_body:
        problems.append({"field": "text", "problem": "text or html is required"})
    if attachment_bytes > MAX_ATTACHMENT_BYTES:
        problems.append(
            {
                "field": "attachments",
                "problem": f"attachments total more than {MAX_ATTACHMENT_BYTES // (1024 * 1024)} MiB",
            }
        )
    lowered = [n.lower() for n in header_names if isinstance(n, str)]
    if len(set(lowered)) != len(lowered):
        problems.append({"field": "headers", "problem": "a header name appears twice (names ignore case)"})
    return problems


# --- parsing -------------------------------------------------------------------------------------


class _DuplicateKeys:
    """``json.loads`` object hook that remembers every key given twice in one object."""

    def __init__(self) -> None:
        self.keys: list[str] = []

    def __call__(self, pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        obj: dict[str, Any] = {}
        for key, value in pairs:
            if key in obj:
                self.keys.append(key)
            obj[key] = value
        return obj


def parse_message(raw: str | bytes | bytearray | Mapping[str, Any]) -> OutgoingMessage:
    """Validate a queued or posted message. Raises ``InvalidMessage`` listing every problem."""
    problems: list[dict[str, str]] = []
    if isinstance(raw, str | bytes | bytearray):
        if len(raw) > MAX_RAW_BYTES:
            _raise([{"field": "(root)", "problem": f"larger than {MAX_RAW_BYTES // (1024 * 1024)} MiB"}])
        duplicates = _DuplicateKeys()
        try:
            data = json.loads(raw, object_pairs_hook=duplicates)
        except (ValueError, RecursionError):
            _raise([{"field": "(root)", "problem": "not valid JSON"}])
        problems += [
            {"field": _printable(key), "problem": "duplicate JSON key"}
            for key in dict.fromkeys(duplicates.keys)
        ]
    else:
        data = raw
    if not isinstance(data, Mapping):
        _raise([*problems, {"field": "(root)", "problem": "must be a JSON object"}])
    try:
        message = OutgoingMessage.model_validate(data)
    except ValidationError as exc:
        problems += [p for p in _field_problems(exc) if p is not None]
        problems += _raw_rule_problems(data)
    except RecursionError:
        problems.append({"field": "(root)", "problem": "nested too deeply"})
    if problems:
        _raise(problems)
    return message


def _raise(problems: list[dict[str, str]]) -> NoReturn:
    problems = list({(p["field"], p["problem"]): p for p in problems}.values())
    if len(problems) > MAX_PROBLEMS:
        extra = len(problems) - MAX_PROBLEMS
        problems = [*problems[:MAX_PROBLEMS], {"field": "(root)", "problem": f"{extra} more problems"}]
    summary = "; ".join(f"{p['field']}: {p['problem']}" for p in problems[:5])
    if len(problems) > 5:
        summary += f"; and {len(problems) - 5} more"
    raise InvalidMessage(f"invalid message: {summary}", details=problems)


def _field_problems(exc: ValidationError) -> list[dict[str, str] | None]:
    problems: list[dict[str, str] | None] = []
    for err in exc.errors(include_input=False, include_url=False, include_context=False):
        if err["type"] == "message_rule":
            problems.append(None)  # reported from the raw input, with every other rule
            continue
        problems.append({"field": _location(err["loc"]), "problem": _problem(err["msg"])})
    return problems


def _location(loc: tuple[Any, ...]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part == "[key]" or part in {"function-after[_address_input(), EmailAddress]", "EmailAddress"}:
            continue
        else:
            path += f".{_printable(str(part))}" if path else _printable(str(part))
    return path or "(root)"


def _printable(text: str) -> str:
    cleaned = "".join(ch if ch.isprintable() else "?" for ch in text)
    return cleaned if len(cleaned) <= 64 else cleaned[:61] + "..."


def _problem(msg: str) -> str:
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            return msg[len(prefix) :]
    return msg


def _raw_rule_problems(data: Mapping[str, Any]) -> list[dict[str, str]]:
    """The whole-message rules on input that failed field validation, so they are listed too."""

    def count(value: Any) -> int:
        if value is None:
            return 0
        if isinstance(value, list):
            return len(value)
        return 1

    def decoded_size(attachment: Any) -> int:
        content = attachment.get("content") if isinstance(attachment, Mapping) else None
        if not isinstance(content, str):
            return 0
        compact = "".join(content.split())
        return len(compact) * 3 // 4 - compact[-2:].count("=")

    attachments = data.get("attachments")
    headers = data.get("headers")
    return _rule_problems(
        recipients=sum(count(data.get(key)) for key in ("to", "cc", "bcc")),
        has_body=bool(data.get("text") or data.get("html")),
        attachment_bytes=sum(decoded_size(a) for a in attachments) if isinstance(attachments, list) else 0,
        header_names=list(headers) if isinstance(headers, Mapping) else [],
        address_header_bytes=sum(
            _raw_address_bytes(data.get(key)) for key in ("from", "to", "cc", "bcc", "reply_to")
        ),
    )


def _raw_address_bytes(value: Any) -> int:
    """The address-header octets of a field as given (a string, an object or a list of them).
    Each part counts at most its own limit: a part over it is reported on its own field."""
    if isinstance(value, list):
        return sum(_raw_address_bytes(item) for item in value)
    if isinstance(value, Mapping):
        email, name = value.get("email"), value.get("name")
        return _capped(email, 254) + _capped(name, MAX_DISPLAY_NAME_CHARS * 4)
    return _capped(value, 254 + MAX_DISPLAY_NAME_CHARS * 4 + 3)


def _capped(value: Any, limit: int) -> int:
    return min(len(value.encode("utf-8", "replace")), limit) if isinstance(value, str) else 0


# --- authorisation -------------------------------------------------------------------------------


def with_sender_defaults(message: OutgoingMessage, integration: Integration) -> OutgoingMessage:
    """``from`` as the integration defines its senders: without ``from``, the integration's
    default sender (the first of ``senders``, else ``username``); a ``from`` without a display
    name takes the ``name`` its sender entry gives. A name the message gives always wins."""
    if message.from_ is None:
        default = integration.default_sender()
        chosen = EmailAddress(email=default.email, name=default.name)
    elif message.from_.name is None:
        named = {_comparable(s.email): s.name for s in integration.senders if s.name}
        name = named.get(_comparable(message.from_.email))
        if name is None:
            return message
        chosen = EmailAddress(email=message.from_.email, name=name)
    else:
        return message
    return message.model_copy(update={"from_": chosen})


def check_allowed(message: OutgoingMessage, integration: Integration) -> OutgoingMessage:
    """Raise ``SenderNotAllowed`` unless the integration may send as ``from`` for this ``usage``.

    Returns the message with ``from`` spelled exactly as the integration lists it: addresses are
    compared ignoring the case of ASCII letters only (``str.lower`` would take the Kelvin sign
    U+212A for ``k``), and what is sent is what was configured, never the caller's spelling."""
    configured = {
        _comparable(address): address
        for address in (*(s.email for s in integration.senders), integration.username)
    }
    sender = configured.get(_ascii_lower(message.sender.email))
    problems = []
    if sender is None:
        problems.append({"field": "from", "problem": "not one of the integration's senders"})
    if message.usage not in integration.usage:
        problems.append({"field": "usage", "problem": "not enabled for the integration"})
    if problems:
        what = " and ".join(p["field"] for p in problems)
        raise SenderNotAllowed(
            f"integration {integration.id!r} does not allow this message's {what}", details=problems
        )
    if sender is None or sender == message.sender.email:
        return message
    try:
        as_configured = EmailAddress(email=sender, name=message.sender.name)
    except ValidationError:  # a configured address this model refuses: keep the caller's spelling
        return message
    return message.model_copy(update={"from_": as_configured})


_ASCII_UPPER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def _ascii_lower(text: str) -> str:
    return text.translate(_ASCII_UPPER)


def _comparable(address: str) -> str:
    try:
        return _ascii_lower(_email_address(address))
    except ValueError:
        return _ascii_lower(address)
