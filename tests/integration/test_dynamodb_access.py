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
from botocore.exceptions import ClientError, EndpointConnectionError, ParamValidationError
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
# The request each store's first call sends: the governor takes a place with a conditional write,
# reading nothing first.
FIRST_REQUEST = {
    token_store: "GetItem",
    status_store: "GetItem",
    health_store: "GetItem",
    governor: "UpdateItem",
}


@pytest.mark.parametrize("build", STORES, ids=lambda f: f.__name__)
def test_a_store_that_cannot_reach_dynamodb_is_aws_unavailable(build, unreachable, tables, stack):
    read = build(unreachable, tables, stack)

    with pytest.raises(AwsUnavailable) as raised:
        read()

    assert raised.value.code == "aws_unavailable"
    assert raised.value.retryable
    assert f"DynamoDB {FIRST_REQUEST[build]}" in raised.value.message
    assert isinstance(raised.value.__cause__, EndpointConnectionError)


@pytest.mark.parametrize("build", STORES, ids=lambda f: f.__name__)
def test_a_bug_inside_a_store_call_is_not_an_aws_outage(build, dynamodb, tables, stack):
    read = build(raising_inside(dynamodb, FIRST_REQUEST[build], TypeError("a bug")), tables, stack)

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


def test_a_request_dynamodb_refuses_as_invalid_is_a_bug_not_an_outage(table):
    oversized = {"pk": {"S": "pk-1"}, "blob": {"S": "x" * 410_000}}  # over the 400 KB item limit

    with pytest.raises(ClientError) as refused:
        table.put(oversized)

    assert refused.value.response["Error"]["Code"] == "ValidationException"
    assert table.get("pk-1") is None


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


# ---------------------------------------------------------------- claiming an id in one write


def count_requests(client: Any) -> list[str]:
    """The operations ``client`` sends from now on, in order."""
    sent: list[str] = []
    client.meta.events.register("before-call.dynamodb", lambda model, **_: sent.append(model.name))
    return sent


def as_stored(record: Any) -> dict[str, Any] | None:
    """A status record as its item (times to the millisecond, as stored)."""
    from mailbroker.messages.status import _to_item

    return None if record is None else _to_item(record)


def test_update_or_current_answers_the_item_before_or_the_item_that_refused(table: Table) -> None:
    key = f"item-{uuid.uuid4().hex}"

    assert table.update_or_current(
        key, "SET n = :one", condition="attribute_not_exists(pk)", values={":one": {"N": "1"}}
    ) == (True, None)
    written, before = table.update_or_current(
        key, "SET n = :two", condition="n = :one", values={":one": {"N": "1"}, ":two": {"N": "2"}}
    )
    assert written and before is not None and before["n"] == {"N": "1"}
    refused, current = table.update_or_current(
        key, "SET n = :three", condition="n = :one", values={":one": {"N": "1"}, ":three": {"N": "3"}}
    )
    assert not refused and current is not None and current["n"] == {"N": "2"}


@pytest.mark.parametrize("earlier", ["none", "queued", "retrying"])
def test_a_new_queued_or_retrying_id_is_claimed_in_one_request_as_start_sending_would(
    earlier: str, dynamodb: Any, table: Table, tables: dict[str, str]
) -> None:
    from mailbroker.messages.status import MessageStatusStore

    store = MessageStatusStore(dynamodb, tables["MessageTable"], window_seconds=3600)
    message_id = f"claim-{uuid.uuid4().hex}"
    seen = None
    if earlier != "none":
        seen = store.queue(message_id, "m365", None)
    if earlier == "retrying":
        error = {"code": "smtp_transient", "message": "busy", "hint": "wait"}
        seen = store.retrying(message_id, "m365", seen, error=error, attempts=1, next_attempt_at=1e10)
    sent = count_requests(dynamodb)

    before, claimed = store.claim(message_id, "m365", holder="env-a", lease_seconds=60)

    assert sent == ["UpdateItem"]
    assert as_stored(before) == as_stored(seen)
    assert claimed.status == "sending" and claimed.lease_owner == "env-a"
    assert claimed.attempts == (1 if earlier == "retrying" else 0)
    assert table.get("msg#" + message_id) == as_stored(claimed)  # what the caller keeps is stored
    assert (claimed.last_error is not None) == (earlier == "retrying")
    # and the next write on its version holds: the record is exactly the one stored
    store.sent(message_id, "m365", claimed, reply="250 ok", refused=[])
    assert store.load(message_id).version == claimed.version + 1  # type: ignore[union-attr]


@pytest.mark.parametrize("state", ["sent", "sending", "failed"])
def test_a_claim_that_does_not_hold_answers_the_stored_record_without_a_read(
    state: str, dynamodb: Any, tables: dict[str, str]
) -> None:
    from mailbroker.messages.status import ClaimRefused, MessageStatusStore

    store = MessageStatusStore(dynamodb, tables["MessageTable"], window_seconds=3600)
    message_id = f"claim-{uuid.uuid4().hex}"
    seen = store.start_sending(message_id, "m365", None, holder="env-a", lease_seconds=60)
    if state == "sent":
        seen = store.sent(message_id, "m365", seen, reply="250 ok", refused=[])
    elif state == "failed":
        error = {"code": "smtp_rejected", "message": "no", "hint": "fix"}
        seen = store.failed(message_id, "m365", seen, error=error, attempts=1)
    sent = count_requests(dynamodb)

    with pytest.raises(ClaimRefused) as refused:
        store.claim(message_id, "m365", holder="env-b", lease_seconds=60)

    assert sent == ["UpdateItem"]
    assert as_stored(refused.value.current) == as_stored(seen)
    assert as_stored(store.load(message_id)) == as_stored(seen)  # nothing written


def test_a_record_past_its_window_is_not_claimed_blind(dynamodb: Any, tables: dict[str, str]) -> None:
    from mailbroker.messages.status import ClaimRefused, MessageStatusStore

    clock = {"now": 1_800_000_000.0}
    store = MessageStatusStore(
        dynamodb, tables["MessageTable"], window_seconds=60, clock=lambda: clock["now"]
    )
    message_id = f"claim-{uuid.uuid4().hex}"
    queued = store.queue(message_id, "m365", None)
    clock["now"] += 120  # the window ended; DynamoDB has not deleted the item yet

    with pytest.raises(ClaimRefused) as refused:
        store.claim(message_id, "m365", holder="env-a", lease_seconds=60)

    assert as_stored(refused.value.current) == as_stored(queued)


def test_put_all_writes_every_item_twenty_five_to_a_request(table: Table, dynamodb: Any) -> None:
    requests: list[int] = []
    dynamodb.meta.events.register(
        "before-parameter-build.dynamodb.BatchWriteItem",
        lambda params, **_: requests.append(len(params["RequestItems"][table.name])),
    )
    items = [{"pk": {"S": f"all-{uuid.uuid4().hex}"}, "n": {"N": str(n)}} for n in range(60)]

    assert table.put_all(items) == []

    assert requests == [25, 25, 10]
    assert [integer(table.get(i["pk"]["S"]) or {}, "n") for i in items] == list(range(60))


def test_put_all_sends_again_what_dynamodb_left_unprocessed(table: Table, dynamodb: Any) -> None:
    # DynamoDB may take part of a BatchWriteItem and answer the rest as unprocessed (throttling
    # inside the batch): here the first request's last three items are held back from moto and
    # answered as unprocessed, as the service would answer them.
    held_back: list[dict[str, Any]] = []
    sizes: list[int] = []

    def before(params: dict[str, Any], **_: Any) -> None:
        sizes.append(len(params["RequestItems"][table.name]))
        if len(sizes) == 1:
            held_back.extend(params["RequestItems"][table.name][-3:])
            del params["RequestItems"][table.name][-3:]

    def after(parsed: dict[str, Any], **_: Any) -> None:
        if held_back and len(sizes) == 1:
            parsed["UnprocessedItems"] = {table.name: list(held_back)}

    dynamodb.meta.events.register("before-parameter-build.dynamodb.BatchWriteItem", before)
    dynamodb.meta.events.register("after-call.dynamodb.BatchWriteItem", after)
    items = [{"pk": {"S": f"left-{uuid.uuid4().hex}"}} for _ in range(8)]

    assert table.put_all(items) == []

    assert sizes == [8, 3]  # five of the eight taken at once, the three left over sent again
    assert all(table.get(i["pk"]["S"]) for i in items)


def test_put_all_answers_the_items_still_unprocessed_after_its_rounds(table: Table, dynamodb: Any) -> None:
    # Every request's last item is answered as unprocessed (moto writes a scratch item instead).
    def before(params: dict[str, Any], context: dict[str, Any], **_: Any) -> None:
        requests = params["RequestItems"][table.name]
        context["held_back"] = requests[-1]
        requests[-1] = {"PutRequest": {"Item": {"pk": {"S": f"scratch-{uuid.uuid4().hex}"}}}}

    def after(parsed: dict[str, Any], context: dict[str, Any], **_: Any) -> None:
        parsed["UnprocessedItems"] = {table.name: [context["held_back"]]}

    dynamodb.meta.events.register("before-parameter-build.dynamodb.BatchWriteItem", before)
    dynamodb.meta.events.register("after-call.dynamodb.BatchWriteItem", after)
    items = [{"pk": {"S": f"stuck-{uuid.uuid4().hex}"}} for _ in range(4)]

    left = table.put_all(items, rounds=2)

    assert left == items[-1:]  # the last item, unprocessed in both rounds
    assert [bool(table.get(i["pk"]["S"])) for i in items] == [True, True, True, False]


def test_sent_records_written_together_read_back_as_each_alone(dynamodb: Any, tables: dict[str, str]) -> None:
    statuses = MessageStatusStore(dynamodb, tables["MessageTable"], window_seconds=3600)
    ids = [f"together-{uuid.uuid4().hex}" for _ in range(3)]
    claimed = [statuses.claim(i, "m365", holder="me", lease_seconds=60)[1] for i in ids]
    records = [
        statuses.sent_record(i, "m365", seen, reply="250 2.0.0 OK", refused=[])
        for i, seen in zip(ids, claimed, strict=True)
    ]

    assert statuses.record_all(records) == []

    for record in records:
        stored = statuses.get(record.id)
        assert stored is not None
        assert (stored.status, stored.attempts, stored.reply, stored.version) == (
            "sent",
            1,
            "250 2.0.0 OK",
            2,
        )
        assert (stored.lease_owner, stored.integration) == (None, "m365")
