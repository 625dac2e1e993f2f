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
tracer = Tracer()
