"""Which record changes become which delivery events, with which detail (the contract in
docs/design.md, "Delivery events"), read from the sample stream batch in events/."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from mailbroker.events import DETAIL_TYPES, SOURCE, events_for_change

EVENTS = Path(__file__).resolve().parents[2] / "events"
BATCH = json.loads((EVENTS / "dynamodb_stream_batch.json").read_text())
DELIVERED = json.loads((EVENTS / "delivery_events.json").read_text())
CONTRACT_FIELDS = {"id", "integration", "status", "attempts", "at"}
OPTIONAL_FIELDS = {"code", "hint", "reply", "accepted", "refused", "url"}


def status_change(old: dict[str, Any] | None, new: dict[str, Any] | None) -> dict[str, Any]:
    """The sample status-record change with its images edited."""
    record = copy.deepcopy(BATCH["Records"][0])
    change = record["dynamodb"]
    for name, edits in (("OldImage", old), ("NewImage", new)):
        if edits is None:
            change.pop(name, None)
        else:
            change[name].update(edits)
    return record


def test_the_sample_stream_batch_becomes_the_sample_events():
    produced = [event for record in BATCH["Records"] for event in events_for_change(record)]

    assert [(e.detail_type, e.detail) for e in produced] == [
        (sample["detail-type"], sample["detail"]) for sample in DELIVERED
    ]
    assert {sample["source"] for sample in DELIVERED} == {SOURCE}


def test_every_detail_holds_the_contract_fields_and_nothing_else():
    for sample in DELIVERED:
        assert sample["detail-type"] in DETAIL_TYPES
        assert CONTRACT_FIELDS <= set(sample["detail"]) <= CONTRACT_FIELDS | OPTIONAL_FIELDS


def test_nothing_outside_the_named_fields_reaches_an_event():
    record = status_change(
        None,
        {
            "lease_owner": {"S": "env-7"},
            "body": {"S": "Dear Ana, your password is hunter2"},
            "client_secret": {"S": "s3cr3t-value"},
        },
    )

    (event,) = events_for_change(record)

    text = json.dumps(event.entry("default"))
    assert "hunter2" not in text and "s3cr3t-value" not in text and "env-7" not in text


def test_queued_and_sending_announce_nothing():
    for status in ("queued", "sending"):
        assert events_for_change(status_change(None, {"status": {"S": status}})) == []


def test_a_rewrite_with_the_same_status_and_attempts_announces_nothing_again():
    sent = {"status": {"S": "sent"}, "attempts": {"N": "1"}}
    assert events_for_change(status_change(sent, sent)) == []


def test_each_new_retry_is_announced_with_its_attempt_count():
    error = {
        "S": json.dumps({"code": "throttled", "message": "m", "hint": "Wait.", "reply": "450 4.2.1 later"})
    }
    first = {"status": {"S": "retrying"}, "attempts": {"N": "1"}, "last_error": error}
    second = {"status": {"S": "retrying"}, "attempts": {"N": "2"}, "last_error": error}

    (event,) = events_for_change(status_change(first, second))

    assert event.key == ("order-8812-confirmation", "Message Retrying", 2)
    assert (event.detail["code"], event.detail["hint"], event.detail["reply"]) == (
        "throttled",
        "Wait.",
        "450 4.2.1 later",
    )
    assert "refused" in event.detail  # the sample record keeps its refused recipients


def test_a_failure_whose_delivery_is_uncertain_has_its_own_detail_type():
    error = {"S": json.dumps({"code": "delivery_uncertain", "message": "m", "hint": "Check the mailbox."})}

    (event,) = events_for_change(status_change(None, {"status": {"S": "failed"}, "last_error": error}))

    assert (event.detail_type, event.detail["status"], event.detail["code"]) == (
        "Message Delivery Uncertain",
        "failed",
        "delivery_uncertain",
    )


def test_accepted_recipients_are_the_delivered_outcomes_of_the_record():
    outcomes = [
        {"recipient": "ana@example.com", "status": "delivered", "reply": "250 2.1.5 OK"},
        {"recipient": "bo@example.com", "status": "retrying", "code": "mailbox_busy"},
        {"recipient": "cy@example.com", "status": "failed", "code": "recipient_rejected"},
    ]
    change = {"recipients": {"S": json.dumps(outcomes)}}

    (event,) = events_for_change(status_change(None, change))

    assert event.detail["accepted"] == ["ana@example.com"]


def test_no_accepted_field_when_no_recipient_was_delivered():
    change = {"recipients": {"S": json.dumps([{"recipient": "bo@example.com", "status": "retrying"}])}}

    (event,) = events_for_change(status_change(None, change))

    assert "accepted" not in event.detail


def test_a_deleted_record_announces_nothing():
    record = status_change(None, None)
    record["eventName"] = "REMOVE"
    assert events_for_change(record) == []


def test_a_health_record_that_stays_healthy_announces_nothing():
    record = copy.deepcopy(BATCH["Records"][1])
    record["dynamodb"]["NewImage"] = record["dynamodb"]["OldImage"]
    assert events_for_change(record) == []


def test_a_first_health_record_is_announced_only_when_it_is_unhealthy():
    unhealthy = copy.deepcopy(BATCH["Records"][1])
    del unhealthy["dynamodb"]["OldImage"]
    healthy = copy.deepcopy(unhealthy)
    healthy["dynamodb"]["NewImage"] = BATCH["Records"][1]["dynamodb"]["OldImage"]

    assert [e.detail["status"] for e in events_for_change(unhealthy)] == ["unhealthy"]
    assert events_for_change(healthy) == []


def test_each_open_and_click_of_tracked_mail_is_its_own_event_flagged_when_machine_like():
    sent = {"status": {"S": "sent"}, "attempts": {"N": "1"}}
    before = {**sent, "opens": {"N": "1"}, "machine_opens": {"N": "1"}, "last_opened_at": {"N": "1795780810"}}
    opened = {**before, "opens": {"N": "2"}, "last_opened_at": {"N": "1795780900"}}
    clicked = {
        **opened,
        "clicks": {"N": "1"},
        "machine_clicks": {"N": "0"},
        "last_clicked_at": {"N": "1795780910"},
        "last_click_link": {"N": "3"},
        "link#3": {"S": "https://shop.example/orders/8812"},
    }

    (open_event,) = events_for_change(status_change(before, opened))
    (click_event,) = events_for_change(status_change(opened, clicked))

    assert open_event.key == ("order-8812-confirmation", "Message Opened", 2)
    assert (open_event.detail["status"], open_event.detail["machine"], open_event.detail["at"]) == (
        "opened",
        False,
        "2026-11-27T12:01:40Z",
    )
    assert click_event.key == ("order-8812-confirmation", "Message Link Clicked", 1)
    assert (click_event.detail["url"], click_event.detail["machine"]) == (
        "https://shop.example/orders/8812",
        False,
    )
    assert CONTRACT_FIELDS <= set(click_event.detail) <= CONTRACT_FIELDS | OPTIONAL_FIELDS | {"machine"}
