"""``GET /v1/integrations/{id}/health`` and ``POST /v1/integrations/{id}/check``."""

from __future__ import annotations

from aws_lambda_powertools.event_handler.api_gateway import Router

router = Router()
