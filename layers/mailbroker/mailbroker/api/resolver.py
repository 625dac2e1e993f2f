"""One resolver for every route; one mapping from domain errors to HTTP statuses."""

from __future__ import annotations

from typing import Any

from aws_lambda_powertools.event_handler import APIGatewayHttpResolver, Response, content_types
from aws_lambda_powertools.event_handler.openapi.exceptions import RequestValidationError

from mailbroker.errors import MailbrokerError
from mailbroker.observability import logger

STATUS_BY_CODE = {
    "invalid_message": 400,
    "invalid_integration": 400,
    "unknown_integration": 404,
    "not_found": 404,
    "sender_not_allowed": 403,
    "caller_not_allowed": 403,
    "address_not_allowed": 400,
    "token_invalid_grant": 502,
    "token_invalid_client": 502,
    "token_scope_invalid": 502,
}


def error_response(status: int, body: dict[str, Any], retry_after: float | None = None) -> Response:
    headers = {"Retry-After": str(max(int(retry_after + 0.999), 1))} if retry_after else None
    return Response(
        status_code=status,
        content_type=content_types.APPLICATION_JSON,
        body={"error": body},
        headers=headers,
    )


def build_resolver() -> APIGatewayHttpResolver:
    from mailbroker.api import messages, status, tokens

    app = APIGatewayHttpResolver(enable_validation=True)
    app.include_router(tokens.router)
    app.include_router(messages.router)
    app.include_router(status.router)

    @app.exception_handler(MailbrokerError)
    def _domain_error(exc: MailbrokerError) -> Response:
        status = STATUS_BY_CODE.get(exc.code, 503 if exc.retryable else 500)
        if status >= 500:
            logger.warning("request failed", extra={"code": exc.code, "path": app.current_event.path})
        return error_response(status, exc.to_dict(), exc.retry_after)

    @app.exception_handler(RequestValidationError)
    def _invalid_request(exc: RequestValidationError) -> Response:
        details = []
        for err in exc.errors():
            loc = [str(p) for p in err.get("loc", ()) if p not in ("body",)]
            details.append({"field": ".".join(loc) or "(body)", "problem": err.get("msg", "invalid")})
        return error_response(
            400,
            {
                "code": "invalid_request",
                "message": "the request does not match the API's schema",
                "hint": "Fix the fields listed in 'details'.",
                "retryable": False,
                "details": details,
            },
        )

    @app.exception_handler(UnicodeDecodeError)
    def _undecodable_body(exc: UnicodeDecodeError) -> Response:
        # A base64 body (isBase64Encoded) that is not UTF-8: Powertools fails decoding it.
        return error_response(
            400,
            {
                "code": "invalid_request",
                "message": "the request body is not UTF-8 text",
                "hint": "Send the JSON body as UTF-8.",
                "retryable": False,
                "details": [{"field": "(body)", "problem": "not valid UTF-8"}],
            },
        )

    @app.not_found
    def _not_found(exc: Exception) -> Response:
        return error_response(
            404,
            {
                "code": "not_found",
                "message": f"no route {app.current_event.http_method} {app.current_event.path}",
                "hint": "See the README's HTTP API table for the routes.",
                "retryable": False,
            },
        )

    return app
