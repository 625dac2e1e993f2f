"""The one DynamoDB access module and the four stores built on it, against the template's tables
on moto server: conditional writes answer whether their condition held; AWS trouble (a refused
connection, a throttling reply from a real client) is ``aws_unavailable``; a bug raised inside a
call is not dressed up as an AWS outage."""

from __future__ import annotations

import socket
import uuid
from collections.abc import Callable
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import EndpointConnectionError, ParamValidationError
from mailbroker.dynamodb import Table, epoch, integer, iso, num, number, text
from mailbroker.errors import AwsUnavailable
from mailbroker.governor import SendGovernor
from mailbroker.health import HealthRecord, HealthStore
from mailbroker.integrations import Limits
from mailbroker.messages.status import MessageStatusStore
from mailbroker.tokens.crypto import TokenCipher
from mailbroker.tokens.store import TokenStore


@pytest.fixture
def tables(stack: Any) -> dict[str, str]:
    return stack.table_names


@pytest.fixture
def dynamodb(stack: Any) -> Any:
    """A client of this test's own: the hooks a test registers on it die with it (the stack's
    shared clients must not carry them into other tests)."""
    from mailbroker_sandbox.aws import aws_environment

    env = aws_environment(stack.endpoint_url, stack.region)
    return boto3.client(
        "dynamodb",
        endpoint_url=stack.endpoint_url,
        region_name=stack.region,
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        aws_session_token=env["AWS_SESSION_TOKEN"],
    )


@pytest.fixture
def table(dynamodb: Any, tables: dict[str, str]) -> Table:
    return Table(dynamodb, tables["MessageTable"], purpose="for a test")


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def unreachable() -> Any:
    """A real DynamoDB client whose endpoint refuses connections, retrying once."""
    return boto3.client(
        "dynamodb",
        endpoint_url=f"http://127.0.0.1:{closed_port()}",
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        config=Config(connect_timeout=1, read_timeout=1, retries={"mode": "standard", "max_attempts": 1}),
    )


def raising_inside(client: Any, operation: str, error: Exception) -> Any:
    """``client``, with ``error`` raised from inside its next ``operation`` calls (a bug in code
    the call runs, as a programming error would be)."""

    def hook(**kwargs: Any) -> None:
        raise error

    service = client.meta.service_model.service_id.hyphenize()
    client.meta.events.register(f"before-call.{service}.{operation}", hook)
    return client


# ---------------------------------------------------------------- the four stores


def token_store(client: Any, tables: dict[str, str], stack: Any) -> Callable[[], Any]:
    store = TokenStore(client, tables["TokenTable"], TokenCipher(stack.client("kms"), "alias/unused"))
    return lambda: store.read("token#abc")


def status_store(client: Any, tables: dict[str, str], stack: Any) -> Callable[[], Any]:
    store = MessageStatusStore(client, tables["MessageTable"], window_seconds=3600)
    return lambda: store.load("msg-1")


def health_store(client: Any, tables: dict[str, str], stack: Any) -> Callable[[], Any]:
    store = HealthStore(client, tables["TokenTable"])
    return lambda: store.get("m365")


def governor(client: Any, tables: dict[str, str], stack: Any) -> Callable[[], Any]:
    store = SendGovernor(client, tables["MessageTable"], sleep=lambda s: None)
    return lambda: store.take_message("m365", Limits(messages_per_minute=30), recipients=1)


STORES = [token_store, status_store, health_store, governor]


@pytest.mark.parametrize("build", STORES, ids=lambda f: f.__name__)
def test_a_store_that_cannot_reach_dynamodb_is_aws_unavailable(build, unreachable, tables, stack):
    read = build(unreachable, tables, stack)

    with pytest.raises(AwsUnavailable) as raised:
        read()

    assert raised.value.code == "aws_unavailable"
    assert raised.value.retryable
    assert "DynamoDB GetItem" in raised.value.message
    assert isinstance(raised.value.__cause__, EndpointConnectionError)


@pytest.mark.parametrize("build", STORES, ids=lambda f: f.__name__)
def test_a_bug_inside_a_store_call_is_not_an_aws_outage(build, dynamodb, tables, stack):
    read = build(raising_inside(dynamodb, "GetItem", TypeError("a bug")), tables, stack)

    with pytest.raises(TypeError, match="a bug"):
        read()


def test_a_throttling_reply_from_a_real_client_is_aws_unavailable(table):
    def throttled(**kwargs: Any) -> Any:
        return _Response(400), {
            "Error": {"Code": "ProvisionedThroughputExceededException", "Message": "slow down"},
            "ResponseMetadata": {"HTTPStatusCode": 400},
        }

    table.client.meta.events.register("before-call.dynamodb.UpdateItem", throttled)

    with pytest.raises(AwsUnavailable, match="ProvisionedThroughputExceededException") as raised:
        table.update("pk-1", "SET a = :a", values={":a": {"S": "x"}})

    assert raised.value.message == (
        "DynamoDB UpdateItem for a test failed: ProvisionedThroughputExceededException"
    )


def test_a_missing_table_is_aws_unavailable_and_named(dynamodb):
    with pytest.raises(AwsUnavailable, match="'no-such-table' does not exist"):
        Table(dynamodb, "no-such-table").get("pk-1")


def test_a_malformed_request_is_a_bug_not_an_outage(table):
    with pytest.raises(ParamValidationError):
        table.put({"pk": {"S": "pk-1"}, "n": {"N": 5}})


# ---------------------------------------------------------------- the operations


def test_conditional_put_answers_whether_its_condition_held(table):
    item = {"pk": {"S": "pk-1"}, "version": {"N": "1"}}

    assert table.put(item, condition="attribute_not_exists(pk)") is True
    assert table.put({**item, "version": {"N": "9"}}, condition="attribute_not_exists(pk)") is False
    assert table.get("pk-1") == item
    assert table.put(
        {**item, "version": {"N": "2"}}, condition="version = :seen", values={":seen": {"N": "1"}}
    )
    assert integer(table.get("pk-1") or {}, "version") == 2


def test_conditional_update_answers_whether_its_condition_held(table):
    bump = "SET version = if_not_exists(version, :zero) + :one"
    values = {":zero": {"N": "0"}, ":one": {"N": "1"}}

    assert table.update("pk-2", bump, condition="attribute_not_exists(version)", values=values)
    assert not table.update("pk-2", bump, condition="attribute_not_exists(version)", values=values)
    assert table.update_returning("pk-2", bump, values=values) == {"version": {"N": "2"}}
    assert (
        table.update_returning(
            "pk-2", bump, condition="version = :seen", values={**values, ":seen": {"N": "1"}}
        )
        is None
    )
    assert table.get("pk-3") is None


def test_query_pages_through_every_match(dynamodb):
    name = f"query-{uuid.uuid4().hex[:8]}"
    dynamodb.create_table(
        TableName=name,
        KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}, {"AttributeName": "sk", "KeyType": "RANGE"}],
        AttributeDefinitions=[
            {"AttributeName": "pk", "AttributeType": "S"},
            {"AttributeName": "sk", "AttributeType": "S"},
        ],
        BillingMode="PAY_PER_REQUEST",
    )
    try:
        table = Table(dynamodb, name)
        for n in range(7):
            table.put({"pk": {"S": "a"}, "sk": {"S": f"{n:02d}"}})
        table.put({"pk": {"S": "b"}, "sk": {"S": "00"}})

        found = list(table.query("pk = :pk", values={":pk": {"S": "a"}}, page_size=3, consistent=True))

        assert [text(item, "sk") for item in found] == [f"{n:02d}" for n in range(7)]
    finally:
        dynamodb.delete_table(TableName=name)


def test_item_helpers_read_and_write_the_common_shapes():
    item = {"n": {"N": "1.5"}, "i": {"N": "7"}, "s": {"S": "x"}}

    assert number(item, "n") == 1.5
    assert number(item, "absent") == 0.0
    assert integer(item, "i") == 7
    assert integer(item, "absent") is None
    assert text(item, "s") == "x"
    assert text(item, "absent") is None
    assert num(1.23456) == "1.235"
    assert num(1.5, places=6) == "1.500000"
    assert iso(0) == "1970-01-01T00:00:00Z"
    assert iso(None) is None
    assert epoch(iso(1_800_000_000.9)) == 1_800_000_000
    assert epoch(None) is None


def test_a_health_record_round_trips_through_its_conditional_put(dynamodb, tables):
    store = HealthStore(dynamodb, tables["TokenTable"])
    record = HealthRecord(integration="m365", healthy=True, checked_at=1_800_000_000.0)

    written = store.put(record, seen_version=None)

    assert written is not None and written.version == 1
    assert store.put(record, seen_version=None) is None  # another keeper came first
    assert store.get("m365") == written


class _Response:
    def __init__(self, status: int) -> None:
        self.status_code = status
        self.headers: dict[str, str] = {}
        self.content = b""
        self.text = ""
