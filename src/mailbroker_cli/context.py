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
from typing import TYPE_CHECKING, Any, TypeVar

from mailbroker.settings import (
    EnvModel,
    MessageWindowEnv,
    SecretsEnv,
    SettingsError,
    TokenPolicyEnv,
    TokenTableEnv,
)
from pydantic import Field

if TYPE_CHECKING:
    from mailbroker.health import HealthStore
    from mailbroker.integrations import IntegrationStore

M = TypeVar("M", bound=EnvModel)

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


class OperatorSettings(SecretsEnv, TokenPolicyEnv, MessageWindowEnv):
    """What the CLI reads: the functions' variables, each name optional because each command needs
    only some of them (:meth:`Context.require` names the one that is missing)."""

    token_table: str | None = Field(default=None, alias="TOKEN_TABLE")
    token_key_id: str | None = Field(default=None, alias="TOKEN_KEY_ID")
    message_table: str | None = Field(default=None, alias="MESSAGE_TABLE")
    send_queue_url: str | None = Field(default=None, alias="SEND_QUEUE_URL")
    dead_letter_queue_url: str | None = Field(default=None, alias="DEAD_LETTER_QUEUE_URL")
    alert_topic_arn: str | None = Field(default=None, alias="ALERT_TOPIC_ARN")


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
    def values(self) -> dict[str, str]:
        """The stack's outputs (with ``--stack``) under the functions' variable names, overridden by
        the variables that are set."""
        values: dict[str, str] = {}
        if self.stack:
            values.update(self._stack_outputs(self.stack))
        values.update({k: v for k, v in self.env.items() if v})
        return values

    @cached_property
    def settings(self) -> OperatorSettings:
        return OperatorSettings.from_env(self.values)

    def needs(self, model: type[M]) -> M:
        """The settings ``model`` a command needs (a mixin of :mod:`mailbroker.settings`); a variable
        it requires that is not set is a :class:`CliError` naming it."""
        try:
            return model.from_env(self.values)
        except SettingsError as exc:
            raise self._not_configured(" and ".join(exc.variables), "; ".join(exc.problems)) from None

    def client(self, service: str) -> Any:
        from mailbroker import runtime

        return runtime.aws_client(service)

    @cached_property
    def integrations(self) -> IntegrationStore:
        from mailbroker import runtime

        return runtime.build_integration_store(self.settings, max_age=0)

    @cached_property
    def health(self) -> HealthStore:
        from mailbroker import runtime

        return runtime.health_store(self.needs(TokenTableEnv))

    def require(self, attribute: str, variable: str) -> str:
        value = getattr(self.settings, attribute)
        if not value:
            raise self._not_configured(variable, f"{variable} is not set")
        return str(value)

    @staticmethod
    def _not_configured(variables: str, message: str) -> CliError:
        return CliError(
            message,
            code="not_configured",
            hint=f"Export {variables} (as the functions see it), or pass --stack <name> to read it "
            "from the deployed stack's outputs. 'mailbroker local' prints the sandbox's values.",
        )

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
