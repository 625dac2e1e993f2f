"""One error vocabulary: every error a client can receive is a catalogue code, and its HTTP status
is the catalogue's."""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Any

import pytest
from mailbroker import errors
from mailbroker.api.resolver import build_resolver, error_response
from mailbroker.errors import CATALOGUE, ErrorKind, MailbrokerError
from mailbroker.handlers.token_broker import direct_invoke

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "layers" / "mailbroker" / "mailbroker"
EVENTS = ROOT / "events"
ERROR_KEYS = {"code", "message", "hint", "retryable"}


class LambdaContext:
    function_name = "mailbroker-token-broker"
    memory_limit_in_mb = 256
    invoked_function_arn = "arn:aws:lambda:us-east-1:123456789012:function:mailbroker-token-broker"
    aws_request_id = "c6af9ac6-7b61-11e6-9a41-93e8deadbeef"


def http_event(template: str, *, method: str, path: str, body: str | None = None) -> dict[str, Any]:
    event = json.loads((EVENTS / template).read_text())
    event["routeKey"] = event["requestContext"]["routeKey"] = "$default"
    event["rawPath"] = event["requestContext"]["http"]["path"] = path
    event["requestContext"]["http"]["method"] = method
    event["body"], event["isBase64Encoded"] = body, False
    return event


@pytest.mark.parametrize("code", sorted(CATALOGUE))
def test_error_response_answers_the_catalogue_status_and_body_of_every_code(code: str) -> None:
    error = MailbrokerError("what happened", code=code)

    response = error_response(error)

    assert response.status_code == CATALOGUE[code].http_status
    assert response.body == {"error": error.to_dict()}


def test_every_domain_error_class_names_a_catalogue_code() -> None:
    classes = [
        value
        for value in vars(errors).values()
        if isinstance(value, type) and issubclass(value, MailbrokerError)
    ]

    assert classes and all(cls.code in CATALOGUE for cls in classes)


def test_a_catalogue_entry_without_an_http_status_is_refused() -> None:
    with pytest.raises(TypeError, match="needs an HTTP error status"):
        ErrorKind("made_up", False, "a hint where the status belongs", "hint")  # type: ignore[arg-type]


def test_an_unknown_route_answers_the_catalogue_not_found() -> None:
    event = http_event("http_get_message.json", method="GET", path="/v1/nowhere")

    answer = build_resolver().resolve(event, LambdaContext())

    body = json.loads(answer["body"])
    assert answer["statusCode"] == CATALOGUE["not_found"].http_status == 404
    assert set(body["error"]) == ERROR_KEYS and body["error"]["code"] == "not_found"
    assert "GET /v1/nowhere" in body["error"]["message"] and body["error"]["retryable"] is False


def test_a_body_that_breaks_the_schema_answers_invalid_request_with_its_fields() -> None:
    event = http_event(
        "http_post_token.json", method="POST", path="/v1/integrations/x/token", body='{"force": 1}'
    )

    answer = build_resolver().resolve(event, LambdaContext())

    error = json.loads(answer["body"])["error"]
    assert answer["statusCode"] == CATALOGUE["invalid_request"].http_status == 400
    assert set(error) == ERROR_KEYS | {"details"} and error["code"] == "invalid_request"
    assert {"field": "force", "problem": "Extra inputs are not permitted"} in error["details"]


def test_a_direct_invoke_that_breaks_the_schema_answers_invalid_request_without_raising() -> None:
    answer = direct_invoke({"integration": "", "force_refresh": "often"})

    error = answer["error"]
    assert set(error) == ERROR_KEYS | {"details"} and error["code"] == "invalid_request"
    assert {d["field"] for d in error["details"]} == {"integration", "force_refresh"}


def _dicts_with_a_code_key(path: Path) -> list[int]:
    tree = ast.parse(path.read_text(), filename=str(path))
    return [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Dict)
        and any(isinstance(k, ast.Constant) and k.value == "code" for k in node.keys)
        and any(isinstance(k, ast.Constant) and k.value == "hint" for k in node.keys)
    ]


def test_no_api_route_or_handler_builds_an_error_body_by_hand() -> None:
    # Client answers are shaped in api/ and handlers/; an error body there (a dict with both
    # "code" and "hint") comes from MailbrokerError.to_dict, never a literal.
    found = {
        f"{path.relative_to(PACKAGE)}:{line}"
        for folder in (PACKAGE / "api", PACKAGE / "handlers")
        for path in sorted(folder.rglob("*.py"))
        for line in _dicts_with_a_code_key(path)
    }

    assert found == set()


def test_a_bug_is_answered_as_a_server_error_that_says_not_to_retry() -> None:
    # The sender dead-letters a message that meets a bug instead of retrying it; a caller of the
    # API or of a direct invoke reads the same verdict in ``retryable``.
    error = errors.classify_exception(TypeError("unsupported operand type(s) for +: 'int' and 'str'"))

    response = error_response(error)

    assert (error.code, error.retryable, response.status_code) == ("internal_error", False, 500)
    assert "TypeError" in error.message and "int" not in error.message
    assert "dlq redrive" in error.hint
