"""Bad input, generated: message bodies and integration secrets from hypothesis — non-JSON, wrong
types, huge fields, CR/LF and NUL in headers and addresses, RFC 2047 look-alikes, unicode
addresses, path-like attachment names, duplicate keys — and what becomes of each.

Every input ends as a deliverable message or a clear ``invalid_message`` listing its problems;
nothing raises outside classification; the MIME and SMTP envelope built from an accepted message
carry exactly the headers and recipients it asked for; the HTTP API answers 400 with field errors
(never 500) for any body; a batch mixing bad and good input delivers every good message once.

Example counts come from the hypothesis profile chosen in tests/reliability/conftest.py: a few
hundred per property by default, 10,000 per property with ``--long``.
"""

from __future__ import annotations

import base64
import copy
import email
import json
import re
import uuid
from email import policy
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from mailbroker import runtime
from mailbroker.errors import InvalidIntegration, InvalidMessage
from mailbroker.integrations import IntegrationStore, parse_integration
from mailbroker.messages.mime import build_mime, envelope
from mailbroker.messages.models import EmailAddress, parse_message

from tests.fixtures.events import context, http_event

EVENTS = Path(__file__).resolve().parents[2] / "events"
BASE_MESSAGE = json.loads((EVENTS / "message.json").read_text())
STANDARD_HEADERS = {
    "from",
    "to",
    "cc",
    "reply-to",
    "subject",
    "date",
    "message-id",
    "mime-version",
    "content-type",
    "content-transfer-encoding",
}

# ---------------------------------------------------------------- strategies

CONTROL = st.sampled_from(["\r", "\n", "\r\n", "\x00", "\x0b", "\x1b", "\u2028", "\u0085", "\t"])
INJECTIONS = st.sampled_from(
    [
        "\r\nBcc: thief@evil.example",
        "\nTo: thief@evil.example",
        "\r\n\r\n<html>body takeover</html>",
        "\r\nContent-Type: text/html",
        "\x00",
        "\r\n.\r\nMAIL FROM:<thief@evil.example>",
    ]
)
RFC2047 = st.sampled_from(
    [
        "=?utf-8?q?hello?=",
        "=?utf-8?b?SGVsbG8gd29ybGQ=?=",
        "=?utf-8?q?=0D=0ABcc:_thief@evil.example?=",
        "=?iso-8859-1?q?caf=E9?=",
        "=?utf-8?b?invalid*base64?=",
        "=?x-unknown?q?x?=",
        "=??=",
        "=?utf-8?q?" + "a" * 200 + "?=",
    ]
)
HUGE = st.sampled_from(["x" * 999, "y" * 70_000, "é" * 2_000])


def text_with_hazards(max_size: int = 80) -> st.SearchStrategy[str]:
    """Header or body material: ordinary and exotic text, control characters, injections."""
    pieces = st.one_of(st.text(max_size=max_size), CONTROL, INJECTIONS, RFC2047)
    return st.one_of(
        st.text(max_size=max_size),
        st.lists(pieces, min_size=1, max_size=4).map("".join),
        HUGE,
    )


LOCAL_PARTS = st.one_of(
    st.from_regex(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]{1,12}(\.[A-Za-z0-9_-]{1,8}){0,2}", fullmatch=True),
    st.sampled_from(["josé", "用户", "ana..bo", ".ana", "ana.", '"quoted"', "a b", "a<b", "a,b", "x" * 65]),
    st.text(min_size=1, max_size=20),
)
DOMAINS = st.one_of(
    st.sampled_from(["example.com", "contoso.com", "bücher.example", "例え.jp", "xn--bcher-kva.example"]),
    st.sampled_from(["localhost", "example", "-bad.example", "a..b", "192.168.0.1", "example.123", ""]),
    st.from_regex(r"[a-z0-9-]{1,20}(\.[a-z]{2,6}){1,2}", fullmatch=True),
)
ADDRESSES = st.one_of(
    st.builds(lambda local, domain: f"{local}@{domain}", LOCAL_PARTS, DOMAINS),
    st.builds(lambda a, hazard: a + hazard, st.just("ana@example.com"), st.one_of(CONTROL, INJECTIONS)),
    st.builds(lambda name, a: f"{name} <{a}>", text_with_hazards(20), st.just("bo@example.com")),
    st.emails(),
)
ADDRESS_VALUES = st.one_of(
    ADDRESSES,
    st.fixed_dictionaries(
        {"email": ADDRESSES}, optional={"name": st.one_of(st.none(), text_with_hazards(30))}
    ),
    st.integers(),
    st.none(),
    st.just({"email": ["list@example.com"]}),
)
HEADER_NAMES = st.one_of(
    st.from_regex(r"X-[A-Za-z0-9-]{1,20}", fullmatch=True),
    st.sampled_from(["Bcc", "To", "bcc", "Content-Type", "Received", "Resent-To", "X-Ok:Bad", "X Bad", ""]),
    st.text(max_size=30),
)
FILENAMES = st.one_of(
    st.sampled_from(
        [
            "invoice.pdf",
            "../../etc/passwd",
            "..\\..\\windows\\win.ini",
            "/abs/path.txt",
            "C:\\Users\\x\\file.doc",
            "file\u202etxt.exe",
            "name\r\nContent-Type: text/html",
            "..",
            ".",
            "",
            "=?utf-8?q?evil=0D=0A.txt?=",
            "n" * 300,
        ]
    ),
    st.text(max_size=40),
)
ATTACHMENTS = st.fixed_dictionaries(
    {
        "filename": FILENAMES,
        "content": st.one_of(
            st.binary(max_size=64).map(lambda b: base64.b64encode(b).decode()),
            st.sampled_from(["not base64!", "QQ", "QQ===", "", "\u00e9\u00e9\u00e9\u00e9"]),
            st.integers(),
        ),
    },
    optional={
        "content_type": st.one_of(
            st.sampled_from(["application/pdf", "text/plain", "multipart/mixed", "text", "a/b; x=y"]),
            st.text(max_size=20),
        )
    },
)
FIELD_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "integration": st.one_of(st.just("support-m365"), st.text(max_size=40), st.integers(), st.none()),
    "id": st.one_of(st.none(), st.from_regex(r"[\x21-\x7e]{1,40}", fullmatch=True), st.text(max_size=300)),
    "usage": st.one_of(st.just("transactional"), st.just("marketing"), st.text(max_size=20)),
    "from": ADDRESS_VALUES,
    "to": st.one_of(ADDRESS_VALUES, st.lists(ADDRESS_VALUES, max_size=4)),
    "cc": st.one_of(st.lists(ADDRESS_VALUES, max_size=3), ADDRESS_VALUES),
    "bcc": st.one_of(st.lists(ADDRESS_VALUES, max_size=3), ADDRESS_VALUES),
    "reply_to": ADDRESS_VALUES,
    "subject": st.one_of(text_with_hazards(), st.integers(), st.none(), st.lists(st.text(max_size=5))),
    "text": st.one_of(text_with_hazards(200), st.none(), st.integers()),
    "html": st.one_of(text_with_hazards(200), st.none()),
    "headers": st.one_of(
        st.dictionaries(HEADER_NAMES, st.one_of(text_with_hazards(60), st.integers()), max_size=4),
        st.lists(st.text(max_size=5), max_size=2),
    ),
    "attachments": st.one_of(st.lists(ATTACHMENTS, max_size=3), st.just("invoice.pdf")),
}
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


@st.composite
def message_objects(draw: st.DrawFn, integration: str = "support-m365") -> dict[str, Any]:
    """The sample message with some fields replaced, dropped or added."""
    message = copy.deepcopy(BASE_MESSAGE) | {"integration": integration}
    for name in draw(st.lists(st.sampled_from(sorted(FIELD_VALUES)), max_size=4, unique=True)):
        message[name] = draw(FIELD_VALUES[name])
    for name in draw(st.lists(st.sampled_from(sorted(BASE_MESSAGE)), max_size=2, unique=True)):
        message.pop(name, None)
    if draw(st.booleans()) and draw(st.booleans()):
        message[draw(st.text(min_size=1, max_size=12))] = draw(JSON_VALUES)
    return message


@st.composite
def with_duplicate_key(draw: st.DrawFn, message: dict[str, Any]) -> str:
    """The message as JSON text with one key written twice (which value wins is parser-dependent)."""
    key = draw(st.sampled_from(sorted(message))) if message else "id"
    items = [*message.items(), (key, draw(FIELD_VALUES.get(key, JSON_VALUES)))]
    return "{" + ", ".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in items) + "}"


@st.composite
def message_bodies(draw: st.DrawFn, integration: str = "support-m365") -> str | bytes:
    """Anything an application might put on the queue or in a request body."""
    kind = draw(st.sampled_from(["object", "object", "object", "duplicate", "json", "text", "bytes"]))
    if kind == "text":
        return draw(st.text(max_size=200))
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    if kind == "json":
        return json.dumps(draw(JSON_VALUES))
    message = draw(message_objects(integration))
    if kind == "duplicate":
        return draw(with_duplicate_key(message))
    return json.dumps(message, ensure_ascii=draw(st.booleans()))


# ---------------------------------------------------------------- messages, without AWS


@given(message_bodies())
def test_every_body_is_a_message_or_an_invalid_message_listing_its_problems(body):
    try:
        message = parse_message(body)
    except InvalidMessage as invalid:
        assert invalid.code == "invalid_message" and not invalid.retryable
        assert invalid.details, "an invalid message lists at least one problem"
        for problem in invalid.details:
            assert set(problem) == {"field", "problem"}
            assert all(isinstance(v, str) and v for v in problem.values())
            assert "\r" not in problem["field"] and "\n" not in problem["field"]
        return
    assert message.subject and (message.text or message.html)


@given(message_objects())
def test_an_accepted_message_carries_exactly_its_own_headers_and_recipients(data):
    try:
        message = parse_message(json.dumps(data))
    except InvalidMessage:
        assume(False)
    if message.from_ is None:  # as the sender does: the integration's default sender
        message = message.model_copy(update={"from_": EmailAddress(email="support@contoso.com")})
    raw = build_mime(message, message_id_domain="contoso.com").as_bytes()

    parsed = email.message_from_bytes(raw, policy=policy.SMTP)
    names = [name.lower() for name in parsed]
    own = {name.lower() for name in message.headers}
    assert set(names) <= STANDARD_HEADERS | own, "a header the message did not ask for"
    assert all(names.count(n) == 1 for n in names), "a header appears twice"
    assert "bcc" not in names
    assert all(len(line) <= 998 for line in raw.split(b"\r\n")), "a line longer than SMTP allows"
    assert b"\r" not in raw.replace(b"\r\n", b"") and b"\n" not in raw.replace(b"\r\n", b"")
    mail_from, rcpts = envelope(message)
    asked = {same_mailbox(a.email) for a in (*message.to, *message.cc, *message.bcc)}
    assert sorted(same_mailbox(r) for r in rcpts) == sorted(asked), "recipients added, lost or repeated"
    assert mail_from == message.from_.email
    for part in parsed.walk():
        filename = part.get_filename()
        if filename is not None:
            assert "/" not in filename and "\\" not in filename and filename != ".."


def same_mailbox(address: str) -> str:
    """Domains compare without case; local parts are the server's business."""
    local, _, domain = address.rpartition("@")
    return f"{local}@{domain.lower()}"


# ---------------------------------------------------------------- integration secrets

SECRET_MARK = "s3cr3t-mark"


@st.composite
def integration_secrets(draw: st.DrawFn) -> tuple[str | bytes, list[str]]:
    """An integration secret's JSON (possibly broken) and the secret values planted in it."""
    planted = [f"{SECRET_MARK}-{draw(st.uuids()).hex}" for _ in range(3)]
    provider = draw(
        st.sampled_from(["microsoft", "google", "google_service_account", "oauth2", "basic", "x"])
    )
    data: dict[str, Any] = {
        "id": draw(st.one_of(st.just("support-m365"), st.text(max_size=30))),
        "provider": provider,
        "smtp": draw(
            st.one_of(
                st.fixed_dictionaries(
                    {"host": st.sampled_from(["smtp.office365.com", "127.0.0.1", "169.254.169.254", ""])},
                    optional={
                        "port": st.one_of(st.integers(-5, 70_000), st.text(max_size=5)),
                        "security": st.sampled_from(["starttls", "tls", "none", "ssl", ""]),
                    },
                ),
                JSON_VALUES,
            )
        ),
        "username": draw(st.one_of(ADDRESSES, st.integers())),
        "tenant_id": "contoso",
        "client_id": draw(st.one_of(st.just("app"), st.text(max_size=10), st.integers())),
        "client_secret": draw(st.one_of(st.just(planted[0]), st.integers(), st.none())),
        "refresh_token": planted[1],
        "password": planted[2],
        "service_account_info": {"client_email": "sa@p.iam.gserviceaccount.com", "private_key": planted[1]},
        "subject": "ana@example.com",
        "scope": draw(st.text(max_size=10)),
        "token_url": draw(
            st.sampled_from(["https://auth.example.com/t", "http://auth.example.com/t", "ftp://x"])
        ),
        "limits": draw(st.one_of(st.none(), JSON_VALUES)),
    }
    for name in draw(st.lists(st.sampled_from(sorted(data)), max_size=3, unique=True)):
        data.pop(name)
    kind = draw(st.sampled_from(["object", "object", "duplicate", "text"]))
    if kind == "text":
        return draw(st.one_of(st.text(max_size=60), st.binary(max_size=60))), planted
    if kind == "duplicate":
        return draw(with_duplicate_key(data)), planted
    return json.dumps(data), planted


@given(integration_secrets())
def test_every_secret_is_an_integration_or_an_invalid_integration_that_never_echoes_a_secret(case):
    raw, _planted = case
    try:
        integration = parse_integration(raw)
    except InvalidIntegration as invalid:
        assert invalid.details
        said = json.dumps(invalid.to_dict()) + str(invalid) + repr(invalid)
        assert SECRET_MARK not in said
        return
    shown = repr(integration) + str(integration) + json.dumps(integration.redacted())
    assert SECRET_MARK not in shown, "a secret in the integration's repr or redacted form"


# ---------------------------------------------------------------- the HTTP API


@pytest.fixture
def api(stack, aws_env, monkeypatch):
    """The token broker function's HTTP API over the template's tables, queue and secrets, with
    one integration registered."""
    env = stack.function_env("TokenBrokerFunction")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    runtime.reset()
    integrations = IntegrationStore(runtime.aws_client("secretsmanager"), env["SECRET_PREFIX"], max_age=0)
    integrations.put(
        parse_integration(
            {
                "id": "support-m365",
                "provider": "basic",
                "smtp": {"host": "127.0.0.1", "port": 2525, "security": "none"},
                "username": "support@contoso.com",
                "senders": [{"email": "support@contoso.com"}],
                "password": "planted-api-password-61fe",
            }
        )
    )
    yield
    runtime.reset()


def call(event):
    from token_broker.app import lambda_handler

    return lambda_handler(event, context("TokenBrokerFunction"))


def assert_clear_answer(answer):
    assert answer["statusCode"] < 500, answer
    body = json.loads(answer["body"])
    if answer["statusCode"] == 400:
        error = body["error"]
        assert error["code"] in {"invalid_message", "invalid_request", "invalid_integration"}
        if error["code"] != "invalid_integration":  # the integration, not the body, is at fault
            assert error["details"] and all(set(d) == {"field", "problem"} for d in error["details"])
    return body


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.one_of(message_bodies(), st.none(), st.just("")))
def test_post_message_answers_202_or_400_with_field_errors_never_500(api, body):
    answer = call(http_event("POST /v1/messages", body=body))

    assert answer["statusCode"] in {202, 400, 403, 404}, answer
    body = assert_clear_answer(answer)
    if answer["statusCode"] == 202:
        assert body["status"] in {"queued", "sending", "sent", "retrying"}


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.one_of(st.text(max_size=80), st.binary(max_size=80), JSON_VALUES.map(json.dumps), st.none()))
def test_token_route_answers_every_body_without_a_500(api, body):
    answer = call(http_event("POST /v1/integrations/{id}/token", body=body))

    assert answer["statusCode"] in {400, 403, 404}, answer
    assert_clear_answer(answer)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(message_id=st.text(min_size=1, max_size=300))
def test_message_status_route_answers_any_id_without_a_500(api, message_id):
    from urllib.parse import quote

    path = "/v1/messages/" + quote(message_id, safe="")
    answer = call(
        http_event(
            "GET /v1/messages/{id}", body=None, path=path, path_parameters={"id": path.rsplit("/", 1)[-1]}
        )
    )

    assert answer["statusCode"] in {200, 400, 403, 404}, answer


# ---------------------------------------------------------------- batches through the sender


def tagged(message: dict[str, Any]) -> dict[str, Any]:
    return {**message, "id": f"fuzz-{uuid.uuid4().hex[:16]}"}


# Each example is a whole batch through SQS, the sender and SMTP: a twelfth of the profile's count.
@settings(
    max_examples=max(25, settings().max_examples // 12),
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(batch=st.lists(message_objects(), min_size=1, max_size=6))
def test_a_batch_of_good_and_bad_input_delivers_every_good_message_once(mail_pipeline, batch):
    p = mail_pipeline
    accepted_before = len(p.smtp.accepted)
    integration = getattr(p, "fuzz_integration", None) or p.add("basic")
    p.fuzz_integration = integration  # one integration for every example of the test
    bodies = []
    for message in batch:
        if message.get("integration") == "support-m365":
            message["integration"] = integration
        bodies.append(json.dumps(tagged(message)))  # a fresh id, so that every input is traceable
    assume(all(len(body) < 200_000 for body in bodies))  # SQS takes 256 KiB
    expected = {}  # id -> "sent" or the code it fails with
    for body in bodies:
        message_id = json.loads(body)["id"]
        try:
            parsed = parse_message(body)
        except InvalidMessage:
            expected[message_id] = "invalid_message"
        else:
            if parsed.integration != integration:
                expected[message_id] = "unknown_integration"
            # Without 'from', the integration's default sender (its first) sends it.
            elif (parsed.from_ is not None and parsed.from_.email.lower() != "support@contoso.com") or (
                parsed.usage != "transactional"
            ):
                expected[message_id] = "sender_not_allowed"
            else:
                expected[message_id] = "sent"
        p.post(body)

    p.drive()

    letters = p.dead_letters()
    for message_id, fate in expected.items():
        if fate == "sent":
            assert p.delivered(message_id) == 1, message_id
            assert p.status(message_id)["status"] == "sent"
        else:
            assert p.delivered(message_id) == 0
            assert letters[message_id]["error_code"] == fate
    assert p.queue_depth() == (0, 0)
    for accepted in p.smtp.accepted[accepted_before:]:
        parsed = email.message_from_bytes(accepted.data, policy=policy.SMTP)
        assert "bcc" not in {k.lower() for k in parsed}
        assert all(re.fullmatch(r"[^\s<>]+@[^\s<>]+", r) for r in accepted.rcpt_tos)
