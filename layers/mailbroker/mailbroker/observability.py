"""The one Logger, Metrics and Tracer of every function.

Every log record passes a filter that masks anything shaped like a bearer token, JWT or
Google credential: a second line of defence behind code that never logs credentials.
"""

from __future__ import annotations

import logging
import re

from aws_lambda_powertools import Logger, Metrics, Tracer

_CREDENTIAL_SHAPES = re.compile(
    r"(eyJ[\w-]{8,}\.[\w-]{8,}\.[\w-]*"  # JWT
    r"|ya29\.[\w.-]+"  # Google access token
    r"|1//[\w-]{8,}"  # Google refresh token
    r"|(?i:bearer)\s+[\w.~+/=-]{8,}"  # Authorization / XOAUTH2 payload
    r"|-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?-----END [A-Z ]*PRIVATE KEY-----)"
)


def mask_credentials(text: str) -> str:
    return _CREDENTIAL_SHAPES.sub("[redacted]", text)


class CredentialFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = mask_credentials(record.msg)
        if record.args:
            record.args = tuple(mask_credentials(a) if isinstance(a, str) else a for a in record.args)
        return True


logger = Logger()
logger.addFilter(CredentialFilter())
metrics = Metrics()
# X-Ray patching is done per library, when that library is first used (``trace_library``), not
# for every supported library at import: patching everything at import was most of the handlers'
# cold start.
tracer = Tracer(auto_patch=False)
_patched: set[str] = set()


def trace_library(name: str) -> None:
    """Patch ``name`` (``botocore``, ``requests``) for X-Ray once per environment."""
    if name not in _patched:
        _patched.add(name)
        tracer.patch([name])


def integration_metric(
    name: str, integration_id: str, value: float, unit: str = "Count", **dimensions: str
) -> None:
    """One metric with the integration (and any other) dimension, flushed at once: a batch mixes
    integrations, so the handler's shared dimension set cannot carry them. Never raises."""
    from aws_lambda_powertools.metrics import MetricUnit, single_metric

    try:
        with single_metric(
            name=name,
            unit=MetricUnit(unit),
            value=value,
            namespace=metrics.namespace,
            default_dimensions=metrics.default_dimensions,
        ) as metric:
            metric.add_dimension(name="integration", value=integration_id)
            for key, dimension in dimensions.items():
                metric.add_dimension(name=key, value=dimension)
    except Exception as exc:  # a metric never fails a delivery
        logger.debug("metric not emitted", extra={"metric": name, "why": type(exc).__name__})
