"""What every command needs: settings and AWS clients.

AWS is reached the standard way (``AWS_PROFILE``, ``AWS_REGION``, ``AWS_ENDPOINT_URL`` …). The
stack's names come from the same variables the functions read (``SECRET_PREFIX``,
``TOKEN_TABLE``, ``MESSAGE_TABLE``, ``SEND_QUEUE_URL``, ``DEAD_LETTER_QUEUE_URL``) or, with
``--stack NAME`` (or ``MAILBROKER_STACK``), from that CloudFormation stack's outputs; variables
that are set win over outputs.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from functools import cached_property
from typing import Any

from mailbroker.settings import Settings

# Stack output -> the environment variable the functions read.
STACK_OUTPUTS = {
    "SecretPrefix": "SECRET_PREFIX",
    "TokenTableName": "TOKEN_TABLE",
    "MessageTableName": "MESSAGE_TABLE",
    "SendQueueUrl": "SEND_QUEUE_URL",
    "DeadLetterQueueUrl": "DEAD_LETTER_QUEUE_URL",
    "AlertTopicArn": "ALERT_TOPIC_ARN",
    "TokenKeyArn": "TOKEN_KEY_ID",
}


class CliError(Exception):
    """A problem with how the command was called or configured (exit code 2)."""

    def __init__(self, message: str, *, hint: str | None = None, code: str = "usage_error") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.code = code


class Context:
    def __init__(self, *, stack: str | None = None, env: Mapping[str, str] | None = None) -> None:
        self.env = dict(os.environ if env is None else env)
        self.stack = stack or self.env.get("MAILBROKER_STACK") or None

    @cached_property
    def settings(self) -> Settings:
        values: dict[str, str] = {}
        if self.stack:
            values.update(self._stack_outputs(self.stack))
        values.update({k: v for k, v in self.env.items() if v})
        return Settings.from_env(values)

    def client(self, service: str) -> Any:
        from mailbroker import runtime

        return runtime.aws_client(service)

    @cached_property
    def integrations(self) -> Any:
        from mailbroker.integrations import IntegrationStore

        return IntegrationStore(self.client("secretsmanager"), self.settings.secret_prefix, max_age=0)

    @cached_property
    def health(self) -> Any:
        from mailbroker.health import HealthStore

        return HealthStore(self.client("dynamodb"), self.require("token_table", "TOKEN_TABLE"))

    def require(self, attribute: str, variable: str) -> str:
        value = getattr(self.settings, attribute)
        if not value:
            raise CliError(
                f"{variable} is not set",
                code="not_configured",
                hint=f"Export {variable} (as the functions see it), or pass --stack <name> to read it "
                "from the deployed stack's outputs. 'mailbroker local' prints the sandbox's values.",
            )
        return str(value)

    def _stack_outputs(self, name: str) -> dict[str, str]:
        answer = self.client("cloudformation").describe_stacks(StackName=name)
        outputs = answer["Stacks"][0].get("Outputs", [])
        return {
            STACK_OUTPUTS[key]: o["OutputValue"] for o in outputs if (key := o["OutputKey"]) in STACK_OUTPUTS
        }


def describe_failure(exc: BaseException) -> tuple[str, str, str] | None:
    """(code, message, hint) for a classified error or an AWS client problem; None for a bug."""
    from mailbroker.errors import MailbrokerError

    if isinstance(exc, MailbrokerError):
        return exc.code, exc.message, exc.hint
    try:
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, NoRegionError
    except ImportError:  # pragma: no cover - boto3 is a dependency
        return None
    if isinstance(exc, NoRegionError):
        return (
            "aws_unavailable",
            "no AWS region is configured",
            "Set AWS_DEFAULT_REGION (or AWS_REGION), or use a profile with a region.",
        )
    if isinstance(exc, NoCredentialsError):
        return (
            "aws_unavailable",
            "no AWS credentials were found",
            "Set AWS_PROFILE, or run 'aws sso login' / 'aws configure'.",
        )
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        return (
            "aws_unavailable",
            f"{exc.operation_name} failed: {error.get('Code')}: {error.get('Message', '')}".strip(),
            "Check the AWS account, region and permissions (or AWS_ENDPOINT_URL for the sandbox).",
        )
    if isinstance(exc, BotoCoreError):
        return "aws_unavailable", str(exc), "Check the network and AWS_ENDPOINT_URL."
    return None
