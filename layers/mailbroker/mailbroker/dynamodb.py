"""The one way the stores talk to DynamoDB: get, conditional put and update, batch put, query.

Every store (token cache, message status, health records, send governor) keeps its items in a
table keyed by ``pk`` and writes them with conditional expressions. :class:`Table` does the calls
and the error handling once:

- a conditional write answers whether its condition held (``True``/``False``): a failed
  condition is an answer, not an error;
- a botocore error (``ClientError``: throttling, a missing table, access denied;
  ``BotoCoreError``: no connection, timeouts, missing credentials) becomes ``aws_unavailable``,
  which is retried with back-off;
- anything else is a bug and is left to propagate (so are botocore's ``ParamValidationError``,
  a request the code built wrong, refused before it was sent, and DynamoDB's
  ``ValidationException``, one refused after it was sent, such as an item over 400 KB, which no
  retry would change): the caller fails loudly as
  ``internal_error`` with its traceback logged, instead of retrying a bug for a day as if AWS
  were down.

Items travel in DynamoDB's attribute-value form (``{"N": "1"}``); :func:`number`,
:func:`integer`, :func:`text` and :func:`num` read and write the common shapes, :func:`iso` and
:func:`epoch` turn the stored epoch seconds into the ISO 8601 times records show, and back.

Another call (``TransactWriteItems``, say) is one more entry in ``_METHODS`` and a
method that goes through ``_call``, which keeps the error handling in one place.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterator
from typing import Any, overload

from botocore.exceptions import BotoCoreError, ClientError, ParamValidationError

from mailbroker.errors import AwsUnavailable, aws_error_code, aws_failure

# What an AWS SDK call raises when AWS, not the code, is the problem.
AWS_ERRORS: tuple[type[Exception], ...] = (ClientError, BotoCoreError)
CONDITION_FAILED = "ConditionalCheckFailedException"
TABLE_MISSING = "ResourceNotFoundException"
REQUEST_INVALID = "ValidationException"

Item = dict[str, Any]


class Table:
    """One DynamoDB table whose items are keyed by ``pk`` (a string).

    ``purpose`` completes error messages: ``DynamoDB PutItem for a message status failed:
    ProvisionedThroughputExceededException``. Nothing from the request or the response body is
    ever put in an error.
    """

    def __init__(self, client: Any, name: str, *, purpose: str = "") -> None:
        self.client = client
        self.name = name
        self._purpose = f" {purpose}" if purpose else ""

    def get(self, key: str, *, consistent: bool = True) -> Item | None:
        """The item at ``key``, or None."""
        answer = self._call("GetItem", TableName=self.name, Key=_key(key), ConsistentRead=consistent)
        item: Item | None = answer.get("Item") or None
        return item

    def put(
        self,
        item: Item,
        *,
        condition: str | None = None,
        values: Item | None = None,
        names: dict[str, str] | None = None,
    ) -> bool:
        """Write ``item`` whole. False when ``condition`` did not hold (nothing was written)."""
        request = _conditional(condition, values, names)
        return self._write("PutItem", TableName=self.name, Item=item, **request) is not None

    def update(
        self,
        key: str,
        expression: str,
        *,
        condition: str | None = None,
        values: Item | None = None,
        names: dict[str, str] | None = None,
    ) -> bool:
        """Apply the update ``expression`` to the item at ``key`` (created if absent). False when
        ``condition`` did not hold (nothing was written)."""
        answer = self._update(key, expression, condition, values, names, returning=None)
        return answer is not None

    def update_returning(
        self,
        key: str,
        expression: str,
        *,
        condition: str | None = None,
        values: Item | None = None,
        names: dict[str, str] | None = None,
        returning: str = "UPDATED_NEW",
    ) -> Item | None:
        """:meth:`update`, answering the attributes DynamoDB returns (``returning``: a
        ``ReturnValues`` choice), or None when ``condition`` did not hold."""
        answer = self._update(key, expression, condition, values, names, returning=returning)
        if answer is None:
            return None
        attributes: Item = answer.get("Attributes") or {}
        return attributes

    def update_or_current(
        self,
        key: str,
        expression: str,
        *,
        condition: str,
        values: Item | None = None,
        names: dict[str, str] | None = None,
    ) -> tuple[bool, Item | None]:
        """:meth:`update` in one request that also answers the item: ``(True, the item as it was
        before the update)`` when ``condition`` held, ``(False, the item as it is)`` when it did
        not (``ReturnValuesOnConditionCheckFailure``), so a conflict needs no second read. An
        absent item answers None."""
        request = _conditional(condition, values, names)
        request["ReturnValues"] = "ALL_OLD"
        request["ReturnValuesOnConditionCheckFailure"] = "ALL_OLD"
        try:
            answer = self._call(
                "UpdateItem", TableName=self.name, Key=_key(key), UpdateExpression=expression, **request
            )
        except _ConditionFailed as refused:
            return False, refused.item
        return True, answer.get("Attributes") or None

    def put_all(self, items: list[Item], *, rounds: int = 3) -> list[Item]:
        """Write every item whole and unconditionally, up to 25 in one ``BatchWriteItem``. Items
        DynamoDB answers as unprocessed (throttling inside a batch) are sent again, with back-off,
        up to ``rounds`` times in all; answers the items still not written."""
        left: list[Item] = []
        for start in range(0, len(items), _BATCH_WRITE_LIMIT):
            chunk = items[start : start + _BATCH_WRITE_LIMIT]
            for attempt in range(rounds):
                if attempt:
                    time.sleep(0.025 * 2**attempt)
                answer = self._call(
                    "BatchWriteItem", RequestItems={self.name: [{"PutRequest": {"Item": i}} for i in chunk]}
                )
                unprocessed = answer.get("UnprocessedItems", {}).get(self.name, [])
                chunk = [request["PutRequest"]["Item"] for request in unprocessed]
                if not chunk:
                    break
            left.extend(chunk)
        return left

    def query(
        self,
        key_condition: str,
        *,
        values: Item,
        names: dict[str, str] | None = None,
        index: str | None = None,
        consistent: bool = False,
        page_size: int | None = None,
    ) -> Iterator[Item]:
        """Every item matching ``key_condition``, fetched page by page (``page_size`` items per
        request at most; DynamoDB's own 1 MB page otherwise)."""
        request: dict[str, Any] = {
            "TableName": self.name,
            "KeyConditionExpression": key_condition,
            "ExpressionAttributeValues": values,
            "ConsistentRead": consistent,
        }
        if names:
            request["ExpressionAttributeNames"] = names
        if index:
            request["IndexName"] = index
        if page_size:
            request["Limit"] = page_size
        while True:
            answer = self._call("Query", **request)
            yield from answer.get("Items", [])
            start = answer.get("LastEvaluatedKey")
            if not start:
                return
            request["ExclusiveStartKey"] = start

    # ------------------------------------------------------------------ the calls

    def _update(
        self,
        key: str,
        expression: str,
        condition: str | None,
        values: Item | None,
        names: dict[str, str] | None,
        *,
        returning: str | None,
    ) -> dict[str, Any] | None:
        request = _conditional(condition, values, names)
        if returning:
            request["ReturnValues"] = returning
        return self._write(
            "UpdateItem", TableName=self.name, Key=_key(key), UpdateExpression=expression, **request
        )

    def _write(self, operation: str, **request: Any) -> dict[str, Any] | None:
        """The answer of a conditional write, or None when its condition did not hold."""
        try:
            return self._call(operation, **request)
        except _ConditionFailed:
            return None

    def _call(self, operation: str, **request: Any) -> dict[str, Any]:
        method = getattr(self.client, _METHODS[operation])
        try:
            answer: dict[str, Any] = method(**request)
        except ClientError as exc:
            code = aws_error_code(exc)
            if code == CONDITION_FAILED:
                raise _ConditionFailed(exc.response.get("Item") or None) from None
            if code == TABLE_MISSING:
                raise AwsUnavailable(f"DynamoDB table {self.name!r} does not exist") from exc
            if code == REQUEST_INVALID:
                raise  # DynamoDB refused what the code asked (an item over 400 KB): a bug
            raise aws_failure(exc, f"DynamoDB {operation}{self._purpose}") from exc
        except ParamValidationError:
            raise  # a request the code built wrong, refused before it was sent: a bug
        except BotoCoreError as exc:
            raise aws_failure(exc, f"DynamoDB {operation}{self._purpose}") from exc
        return answer


class _ConditionFailed(Exception):
    """A conditional write's condition did not hold; ``item`` is the stored item when the request
    asked for it (``ReturnValuesOnConditionCheckFailure``)."""

    def __init__(self, item: Item | None = None) -> None:
        super().__init__("the condition did not hold")
        self.item = item


_BATCH_WRITE_LIMIT = 25  # items DynamoDB takes in one BatchWriteItem

_METHODS = {
    "BatchWriteItem": "batch_write_item",
    "GetItem": "get_item",
    "PutItem": "put_item",
    "UpdateItem": "update_item",
    "Query": "query",
}


def _key(key: str) -> Item:
    return {"pk": {"S": key}}


def _conditional(condition: str | None, values: Item | None, names: dict[str, str] | None) -> dict[str, Any]:
    request: dict[str, Any] = {}
    if condition:
        request["ConditionExpression"] = condition
    if values:
        request["ExpressionAttributeValues"] = values
    if names:
        request["ExpressionAttributeNames"] = names
    return request


# ---------------------------------------------------------------------------------------- items


def number(item: Item, name: str, default: float = 0.0) -> float:
    """A number attribute (``{"N": ...}``), or ``default`` when the item has none."""
    return float(item[name]["N"]) if name in item else default


def integer(item: Item, name: str) -> int | None:
    """A whole-number attribute, or None when the item has none."""
    return int(item[name]["N"]) if name in item else None


def text(item: Item, name: str) -> str | None:
    """A string attribute (``{"S": ...}``), or None when the item has none."""
    return item[name]["S"] if name in item else None


def num(value: float, places: int = 3) -> str:
    """A number as DynamoDB's ``N`` text, with ``places`` decimals."""
    return f"{value:.{places}f}"


@overload
def iso(moment: float) -> str: ...
@overload
def iso(moment: None) -> None: ...
def iso(moment: float | None) -> str | None:
    """Epoch seconds as ISO 8601 UTC to the second (``2026-11-21T12:00:00Z``); None stays None."""
    if moment is None:
        return None
    return dt.datetime.fromtimestamp(moment, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def epoch(text: str | None) -> float | None:
    """An ISO 8601 time (as :func:`iso` writes it) as epoch seconds; None for none."""
    if not text:
        return None
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
