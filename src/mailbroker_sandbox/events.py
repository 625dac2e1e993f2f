"""What AWS hands a function: the Lambda context, and events shaped like the samples in events/.

One place builds them for the sandbox, the tests and the benchmarks. Every event starts from its
sample under ``events/`` (the real shapes the contracts promise, also used by ``sam local invoke
-e``) and changes only what a given invocation changes, so a field the samples gain reaches every
caller at once.

- :class:`LambdaContext`: the ``context`` argument, with the remaining time counted down from the
  function's timeout (or fixed, for tests about what a handler does with it);
- :func:`sqs_event`: the SQS event source mapping's batch for messages ``ReceiveMessage`` returned;
- :func:`http_event`: the API Gateway HTTP API (payload 2.0) request for one route;
- :func:`schedule_event`: EventBridge Scheduler's event for the keeper.
"""

from __future__ import annotations

import base64
import copy
import datetime as dt
import functools
import hashlib
import json
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mailbroker_sandbox.checkout import repo_root

ACCOUNT_ID = "123456789012"
# The sample every HTTP route without a sample of its own is shaped after.
_HTTP_BASE_SAMPLE = "http_post_message.json"


@dataclass
class LambdaContext:
    """What Lambda passes as ``context`` for one invocation: the parts handlers and Powertools read."""

    function_name: str = "mailbroker-function"
    memory_limit_in_mb: int = 512
    timeout_seconds: float = 90
    invoked_function_arn: str = ""
    aws_request_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    function_version: str = "$LATEST"
    log_group_name: str = ""
    log_stream_name: str = ""
    # A fixed answer of get_remaining_time_in_millis(); None counts down from timeout_seconds.
    remaining_ms: int | None = None
    _deadline: float = field(default=0.0, repr=False)

    def __post_init__(self) -> None:
        self._deadline = time.monotonic() + self.timeout_seconds
        if not self.invoked_function_arn:
            self.invoked_function_arn = f"arn:aws:lambda:us-east-1:{ACCOUNT_ID}:function:{self.function_name}"
        if not self.log_group_name:
            self.log_group_name = f"/aws/lambda/{self.function_name}"

    def get_remaining_time_in_millis(self) -> int:
        if self.remaining_ms is not None:
            return self.remaining_ms
        return max(int((self._deadline - time.monotonic()) * 1000), 0)


def events_dir() -> Path:
    return repo_root() / "events"


@functools.cache
def _sample_text(name: str) -> str:
    return (events_dir() / name).read_text(encoding="utf-8")


def sample(name: str) -> Any:
    """A fresh copy of ``events/<name>``, to change at will."""
    return json.loads(_sample_text(name))


# --- SQS ----------------------------------------------------------------------------------------


def sqs_record(message: Mapping[str, Any], queue_arn: str) -> dict[str, Any]:
    """One record of Lambda's SQS event (``events/sqs_batch.json``'s shape) for one message as
    ``ReceiveMessage`` returned it (``AttributeNames``/``MessageAttributeNames`` ``["All"]``)."""
    record: dict[str, Any] = copy.deepcopy(sample("sqs_batch.json")["Records"][0])
    attributes = {}
    for name, value in (message.get("MessageAttributes") or {}).items():
        binary = value.get("BinaryValue")
        attributes[name] = {
            "stringValue": value.get("StringValue"),
            "binaryValue": base64.b64encode(binary).decode() if binary else None,
            "stringListValues": [],
            "binaryListValues": [],
            "dataType": value.get("DataType", "String"),
        }
    body = message["Body"]
    record.update(
        messageId=message["MessageId"],
        receiptHandle=message["ReceiptHandle"],
        body=body,
        attributes=dict(message.get("Attributes") or {}),
        messageAttributes=attributes,
        md5OfBody=message.get("MD5OfBody") or hashlib.md5(body.encode()).hexdigest(),  # noqa: S324
        eventSourceARN=queue_arn,
        awsRegion=queue_arn.split(":")[3],
    )
    return record


def sqs_event(messages: Iterable[Mapping[str, Any]], queue_arn: str) -> dict[str, Any]:
    """The SQS event source mapping's event for a batch ``ReceiveMessage`` returned."""
    return {"Records": [sqs_record(message, queue_arn) for message in messages]}


# --- API Gateway HTTP API -----------------------------------------------------------------------


@functools.cache
def _http_samples() -> dict[str, str]:
    """Route key → the sample file of that route."""
    found: dict[str, str] = {}
    for path in sorted(events_dir().glob("http_*.json")):
        route = json.loads(path.read_text(encoding="utf-8")).get("routeKey")
        if route:
            found.setdefault(route, path.name)
    return found


class _Sample:
    def __repr__(self) -> str:
        return "SAMPLE"


SAMPLE: Any = _Sample()  # "keep what the sample has" (the default of ``http_event``'s ``body``)


def http_event(
    route: str,
    *,
    path: str | None = None,
    path_parameters: Mapping[str, str] | None = None,
    body: Any = SAMPLE,
    headers: Mapping[str, str] | None = None,
    query: str = "",
) -> dict[str, Any]:
    """API Gateway's payload 2.0 event for ``route`` (a route key, ``"POST /v1/messages"``, or
    ``"$default"``), starting from that route's sample.

    ``path_parameters`` replace the sample's; ``path`` is the raw path (default: the route's path
    with its parameters filled in). ``body``: the sample's unless given; a ``str`` as is, ``bytes``
    base64-encoded, ``None`` for no body, anything else as JSON. ``headers`` replace the sample's.
    """
    event: dict[str, Any] = sample(_http_samples().get(route, _HTTP_BASE_SAMPLE))
    own_sample = event.get("routeKey") == route
    method, _, template = route.partition(" ")
    parameters = dict(event.get("pathParameters") or {}) if own_sample else {}
    parameters.update(path_parameters or {})
    if path is None:
        path = template or "/"
        for name, value in parameters.items():
            path = path.replace("{" + name + "}", value)
    context = event["requestContext"]
    event["routeKey"] = context["routeKey"] = route
    event["rawPath"] = context["http"]["path"] = path
    if method and route != "$default":
        context["http"]["method"] = method
    if parameters:
        event["pathParameters"] = parameters
    else:
        event.pop("pathParameters", None)
    if headers is not None:
        event["headers"] = {k.lower(): v for k, v in headers.items()}
    event["rawQueryString"] = query
    if query:
        from urllib.parse import parse_qsl

        event["queryStringParameters"] = dict(parse_qsl(query))
    if body is not SAMPLE or not own_sample:
        _set_body(event, None if body is SAMPLE else body)
    return event


def _set_body(event: dict[str, Any], body: Any) -> None:
    event["isBase64Encoded"] = False
    if body is None:
        event.pop("body", None)
    elif isinstance(body, bytes):
        event["body"], event["isBase64Encoded"] = base64.b64encode(body).decode("ascii"), True
    else:
        event["body"] = body if isinstance(body, str) else json.dumps(body)


# --- EventBridge Scheduler ----------------------------------------------------------------------


def schedule_event(
    account: str = ACCOUNT_ID, region: str = "us-east-1", name: str = "keeper"
) -> dict[str, Any]:
    """The event EventBridge Scheduler sends the keeper (``events/schedule.json``'s shape), now."""
    event: dict[str, Any] = sample("schedule.json")
    event.update(
        id=str(uuid.uuid4()),
        account=account,
        region=region,
        time=dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        resources=[f"arn:aws:scheduler:{region}:{account}:schedule/default/{name}"],
    )
    return event
