"""One resolver for every route; one mapping from domain errors to HTTP answers.

Routes raise domain errors (:mod:`mailbroker.errors`); :func:`error_response` is the only place
that turns one into an HTTP answer, with the status the error catalogue gives its code. Route
modules never import this one, so the routers and the resolver form no import cycle.
"""

from __future__ import annotations

from aws_lambda_powertools.event_handler import APIGatewayHttpResolver, Response, content_types
from aws_lambda_powertools.event_handler.openapi.exceptions import RequestValidationError

from mailbroker.api import messages, status, tokens
from mailbroker.errors import InvalidRequest, MailbrokerError, NotFound
from mailbroker.observability import logger


def error_response(error: MailbrokerError) -> Response[dict[str, object]]:
    """``{"error": {...}}`` with the catalogue's HTTP status for the code, and ``Retry-After`` when
    the error says when to come back."""
    retry_after = error.retry_after
    headers = {"Retry-After": str(max(int(retry_after + 0.999), 1))} if retry_after else None
    return Response(
        status_code=error.kind.http_status,
        content_type=content_types.APPLICATION_JSON,
        body={"error": error.to_dict()},
        headers=headers,
    )


def invalid_request_details(errors: list[dict[str, object]]) -> list[dict[str, object]]:
    """Pydantic's error list as ``[{"field", "problem"}]``, the body's own prefix dropped."""
    details: list[dict[str, object]] = []
    for err in errors:
        loc = err.get("loc", ())
        path = [str(p) for p in loc if p != "body"] if isinstance(loc, list | tuple) else []
        details.append({"field": ".".join(path) or "(body)", "problem": err.get("msg", "invalid")})
    return details


def build_resolver() -> APIGatewayHttpResolver:
    app = APIGatewayHttpResolver(enable_validation=True)
    app.include_router(tokens.router)
    app.include_router(messages.router)
    app.include_router(status.router)

    @app.exception_handler(MailbrokerError)
    def _domain_error(exc: MailbrokerError) -> Response[dict[str, object]]:
        if exc.kind.http_status >= 500:
            logger.warning("request failed", extra={"code": exc.code, "path": app.current_event.path})
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    def _invalid_request(exc: RequestValidationError) -> Response[dict[str, object]]:
        return error_response(
            InvalidRequest(
                "the request does not match the API's schema",
                details=invalid_request_details(list(exc.errors())),
                hint="Fix the fields listed in 'details'.",
            )
        )

    @app.exception_handler(UnicodeDecodeError)
    def _undecodable_body(exc: UnicodeDecodeError) -> Response[dict[str, object]]:
        # A base64 body (isBase64Encoded) that is not UTF-8: Powertools fails decoding it.
        return error_response(
            InvalidRequest(
                "the request body is not UTF-8 text",
                details=[{"field": "(body)", "problem": "not valid UTF-8"}],
                hint="Send the JSON body as UTF-8.",
            )
        )

    @app.not_found
    def _not_found(exc: Exception) -> Response[dict[str, object]]:
        return error_response(
            NotFound(
                f"no route {app.current_event.http_method} {app.current_event.path}",
                hint="See the README's HTTP API table for the routes.",
            )
        )

    return app
