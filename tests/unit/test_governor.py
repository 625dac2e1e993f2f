"""The per-mailbox send governor against DynamoDB emulated in-process (moto), with a clock the
tests move: connection leases, the message bucket, the daily recipient cap, slow-down windows,
and the limits holding while many environments race for them."""

from __future__ import annotations

import threading
from datetime import UTC, datetime

import boto3
import pytest
from mailbroker.errors import AwsUnavailable
from mailbroker.governor import GovernorDelay, SendGovernor
from mailbroker.integrations import Limits
from moto import mock_aws

from mailbroker_sandbox.moto_atomic import atomic_item_writes

TABLE = "messages"
START = datetime(2026, 3, 2, 9, 0, tzinfo=UTC).timestamp()


class Clock:
    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def dynamodb():
    with mock_aws(), atomic_item_writes():
        db = boto3.client("dynamodb", region_name="us-east-1")
        db.create_table(
            TableName=TABLE,
            KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}],
            AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}],
            BillingMode="PAY_PER_REQUEST",
        )
        yield db


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def governor(dynamodb, clock):
    return SendGovernor(dynamodb, TABLE, clock=clock, sleep=lambda s: None)


def another_environment(clock, **kwargs):
    """A governor with its own DynamoDB client, as a second Lambda environment would have."""
    return SendGovernor(
        boto3.client("dynamodb", region_name="us-east-1"), TABLE, clock=clock, sleep=lambda s: None, **kwargs
    )


M365 = Limits(messages_per_minute=30, max_connections=3)


# ---------------------------------------------------------------- connections


def test_connections_up_to_the_limit_are_granted_and_the_next_is_delayed(governor):
    for n in range(3):
        governor.open_connection("m365", M365, holder=f"env-{n}", lease_seconds=120)

    with pytest.raises(GovernorDelay) as delay:
        governor.open_connection("m365", M365, holder="env-4", lease_seconds=120)

    assert delay.value.reason == "connections"


def test_full_semaphore_delay_is_the_busy_poll_when_leases_last_longer(governor):
    for n in range(3):
        governor.open_connection("m365", M365, holder=f"env-{n}", lease_seconds=120)

    with pytest.raises(GovernorDelay) as delay:
        governor.open_connection("m365", M365, holder="env-4", lease_seconds=120)

    assert delay.value.retry_after == pytest.approx(5.0)


def test_full_semaphore_delay_is_the_earliest_lease_expiry_when_sooner(governor, clock):
    governor.open_connection("m365", M365, holder="a", lease_seconds=30)
    clock.now += 1
    governor.open_connection("m365", M365, holder="b", lease_seconds=30)
    governor.open_connection("m365", M365, holder="c", lease_seconds=30)
    clock.now += 27

    with pytest.raises(GovernorDelay) as delay:
        governor.open_connection("m365", M365, holder="d", lease_seconds=30)

    assert delay.value.retry_after == pytest.approx(2.0)


def test_released_slot_can_be_taken_by_another_environment(governor, clock):
    slots = [governor.open_connection("m365", M365, holder=f"env-{n}", lease_seconds=120) for n in range(3)]

    governor.release_connection(slots[1])

    slot = another_environment(clock).open_connection("m365", M365, holder="env-9", lease_seconds=120)
    assert slot.integration_id == "m365"


def test_dead_holders_lease_expires_and_its_slot_is_taken_again(governor, clock):
    for n in range(3):
        governor.open_connection("m365", M365, holder=f"crashed-{n}", lease_seconds=30)
    clock.now += 30.5

    slots = [governor.open_connection("m365", M365, holder=f"alive-{n}", lease_seconds=30) for n in range(3)]

    assert len({s.slot_id for s in slots}) == 3


def test_late_release_of_a_lapsed_lease_does_not_free_anyone_elses_slot(governor, clock):
    lapsed = governor.open_connection("m365", M365, holder="slow", lease_seconds=10)
    clock.now += 11
    for n in range(3):
        governor.open_connection("m365", M365, holder=f"env-{n}", lease_seconds=120)

    governor.release_connection(lapsed)

    with pytest.raises(GovernorDelay):
        governor.open_connection("m365", M365, holder="env-4", lease_seconds=120)


def test_a_live_slot_is_renewed_for_longer_or_shorter(governor, clock):
    slot = governor.open_connection("m365", M365, holder="a", lease_seconds=30)

    renewed = governor.renew_connection(slot, lease_seconds=240)
    assert renewed is not None and renewed.expires_at == pytest.approx(clock.now + 240)
    for n in range(2):
        governor.open_connection("m365", M365, holder=f"b{n}", lease_seconds=300)
    clock.now += 100  # past the original lease: the renewed one still counts
    with pytest.raises(GovernorDelay):
        governor.open_connection("m365", M365, holder="c", lease_seconds=30)

    shorter = governor.renew_connection(renewed, lease_seconds=5)
    assert shorter is not None
    clock.now += 6
    governor.open_connection("m365", M365, holder="d", lease_seconds=30)


def test_a_lapsed_slot_is_not_renewed_so_its_holder_takes_a_new_one(governor, clock):
    slot = governor.open_connection("m365", M365, holder="a", lease_seconds=30)
    clock.now += 31
    for n in range(3):
        governor.open_connection("m365", M365, holder=f"b{n}", lease_seconds=60)

    assert governor.renew_connection(slot, lease_seconds=60) is None
    with pytest.raises(GovernorDelay):
        governor.open_connection("m365", M365, holder="a", lease_seconds=60)


def test_a_released_slot_is_not_renewed(governor):
    slot = governor.open_connection("m365", M365, holder="a", lease_seconds=30)
    governor.release_connection(slot)

    assert governor.renew_connection(slot, lease_seconds=60) is None


def test_an_idle_holder_is_refused_its_renewal_while_another_sender_waits_for_a_slot(governor, clock):
    # Given every slot held, one of them by an idle session,
    idle = governor.open_connection("m365", M365, holder="idle", lease_seconds=600)
    for n in range(2):
        governor.open_connection("m365", M365, holder=f"busy{n}", lease_seconds=600)
    assert governor.renew_connection(idle, lease_seconds=600, unless_wanted=True) is not None

    # when a sender is refused a slot, the idle holder may not keep its own,
    with pytest.raises(GovernorDelay):
        governor.open_connection("m365", M365, holder="waiting", lease_seconds=60)
    assert governor.renew_connection(idle, lease_seconds=600, unless_wanted=True) is None
    # (a holder at work may: it releases its slot when its batch ends)
    assert governor.renew_connection(idle, lease_seconds=60) is not None

    # and once the waiting sender has a slot, idle holders may keep theirs again.
    governor.release_connection(idle)
    waiting = governor.open_connection("m365", M365, holder="waiting", lease_seconds=60)
    assert governor.renew_connection(waiting, lease_seconds=600, unless_wanted=True) is not None


def test_integration_without_a_connection_limit_is_never_held_back(governor):
    slots = [
        governor.open_connection("relay", Limits(), holder=f"env-{n}", lease_seconds=60) for n in range(50)
    ]

    assert all(not s.leased for s in slots)


def test_integrations_have_separate_semaphores(governor):
    for n in range(3):
        governor.open_connection("m365-a", M365, holder=f"env-{n}", lease_seconds=60)

    slot = governor.open_connection("m365-b", M365, holder="env-0", lease_seconds=60)

    assert slot.integration_id == "m365-b"


# ---------------------------------------------------------------- messages per minute


def test_bucket_allows_a_tenth_of_the_minute_as_a_burst_then_delays(governor):
    for _ in range(3):
        governor.take_message("m365", M365)

    with pytest.raises(GovernorDelay) as delay:
        governor.take_message("m365", M365)

    assert delay.value.reason == "rate"
    assert delay.value.retry_after == pytest.approx(60 / 28)


def test_message_is_allowed_exactly_when_the_delay_has_passed(governor, clock):
    for _ in range(3):
        governor.take_message("m365", M365)
    with pytest.raises(GovernorDelay) as delay:
        governor.take_message("m365", M365)

    clock.now += delay.value.retry_after - 0.01
    with pytest.raises(GovernorDelay):
        governor.take_message("m365", M365)
    clock.now += 0.02
    governor.take_message("m365", M365)


@pytest.mark.parametrize("per_minute", [1, 2, 7, 30, 60])
def test_no_sixty_second_window_holds_more_than_messages_per_minute(governor, clock, per_minute):
    limits = Limits(messages_per_minute=per_minute)
    sent: list[float] = []
    end = clock.now + 180
    while clock.now < end:
        try:
            governor.take_message("mbx", limits)
            sent.append(clock.now)
        except GovernorDelay as delay:
            clock.now += delay.retry_after

    busiest = max(sum(1 for t in sent if start <= t < start + 60) for start in sent)
    assert busiest == per_minute


def test_sustained_pace_stays_close_to_messages_per_minute(governor, clock):
    sent = 0
    end = clock.now + 300
    while clock.now < end:
        try:
            governor.take_message("m365", M365)
            sent += 1
        except GovernorDelay as delay:
            clock.now += delay.retry_after

    assert 28 * 5 <= sent <= 30 * 5


def test_environments_share_one_bucket(governor, clock):
    governor.take_message("m365", M365)
    another_environment(clock).take_message("m365", M365)
    governor.take_message("m365", M365)

    with pytest.raises(GovernorDelay):
        another_environment(clock).take_message("m365", M365)


# ---------------------------------------------------------------- recipients per day


def test_daily_recipient_cap_delays_until_the_next_utc_midnight(governor, clock):
    limits = Limits(recipients_per_day=10)
    governor.take_message("gmail", limits, recipients=6)
    governor.take_message("gmail", limits, recipients=4)

    with pytest.raises(GovernorDelay) as delay:
        governor.take_message("gmail", limits, recipients=1)

    assert delay.value.reason == "recipients_per_day"
    assert delay.value.retry_after == pytest.approx(15 * 3600)  # 09:00 -> midnight


def test_new_day_restores_the_recipient_cap(governor, clock):
    limits = Limits(recipients_per_day=10)
    governor.take_message("gmail", limits, recipients=10)
    clock.now += 15 * 3600

    governor.take_message("gmail", limits, recipients=10)


def test_message_held_back_by_the_rate_does_not_use_up_recipients(governor):
    limits = Limits(messages_per_minute=1, recipients_per_day=5)
    governor.take_message("gmail", limits, recipients=3)
    for _ in range(5):
        with pytest.raises(GovernorDelay):
            governor.take_message("gmail", limits, recipients=2)

    with pytest.raises(GovernorDelay) as delay:
        governor.take_message("gmail", Limits(recipients_per_day=5), recipients=3)

    assert delay.value.reason == "recipients_per_day"
    governor.take_message("gmail", Limits(recipients_per_day=5), recipients=2)


def test_message_larger_than_the_daily_cap_goes_through_on_an_empty_day(governor):
    limits = Limits(recipients_per_day=5)

    governor.take_message("gmail", limits, recipients=8)

    with pytest.raises(GovernorDelay):
        governor.take_message("gmail", limits, recipients=1)


# ---------------------------------------------------------------- slow-down after throttling


def test_throttling_reply_empties_the_bucket(governor, clock):
    governor.slow_down("m365", seconds=300)

    with pytest.raises(GovernorDelay) as delay:
        governor.take_message("m365", M365)

    assert delay.value.retry_after == pytest.approx(4.0)  # half of 30/min: one every 4 s


def test_slow_down_window_halves_the_pace_then_ends(governor, clock):
    governor.slow_down("m365", seconds=120)
    sent_slowed = 0
    end = clock.now + 120
    while clock.now < end:
        try:
            governor.take_message("m365", M365)
            sent_slowed += 1
        except GovernorDelay as delay:
            clock.now += delay.retry_after
    sent_after = 0
    end = clock.now + 120
    while clock.now < end:
        try:
            governor.take_message("m365", M365)
            sent_after += 1
        except GovernorDelay as delay:
            clock.now += delay.retry_after

    assert 29 <= sent_slowed <= 30  # 15 a minute, starting from an emptied bucket
    assert 56 <= sent_after <= 60


def test_slow_down_halves_the_connections_new_senders_may_open(governor):
    governor.slow_down("m365", seconds=60)
    governor.open_connection("m365", Limits(max_connections=4), holder="a", lease_seconds=60)
    governor.open_connection("m365", Limits(max_connections=4), holder="b", lease_seconds=60)

    with pytest.raises(GovernorDelay):
        governor.open_connection("m365", Limits(max_connections=4), holder="c", lease_seconds=60)


def test_slow_down_serialises_connections_of_an_integration_without_limits(governor):
    governor.slow_down("relay", seconds=60)
    governor.open_connection("relay", Limits(), holder="a", lease_seconds=60)

    with pytest.raises(GovernorDelay):
        governor.open_connection("relay", Limits(), holder="b", lease_seconds=60)


def test_shorter_slow_down_does_not_cut_an_open_window_short(governor, clock):
    governor.slow_down("m365", seconds=600)
    clock.now += 100
    governor.slow_down("m365", seconds=10)
    clock.now += 200

    governor.open_connection("m365", M365, holder="a", lease_seconds=60)
    with pytest.raises(GovernorDelay):
        governor.open_connection("m365", M365, holder="b", lease_seconds=60)


# ---------------------------------------------------------------- a batch's places at once


def test_a_batch_takes_as_many_places_as_the_bucket_holds_in_one_write(governor, dynamodb):
    grant = governor.take_messages("m365", M365, 10)

    assert grant.granted == 3  # the burst of 30 a minute
    with pytest.raises(GovernorDelay) as delay:
        governor.take_message("m365", M365)
    assert delay.value.reason == "rate"


def test_a_batch_takes_no_more_places_than_it_wants(governor):
    grant = governor.take_messages("m365", M365, 2)

    assert grant.granted == 2
    governor.take_message("m365", M365)  # the third place of the burst is still there
    with pytest.raises(GovernorDelay):
        governor.take_message("m365", M365)


def test_an_empty_bucket_delays_a_batch_without_taking_anything(governor):
    governor.take_messages("m365", M365, 3)

    with pytest.raises(GovernorDelay) as delay:
        governor.take_messages("m365", M365, 5)

    assert delay.value.retry_after == pytest.approx(60 / 28)


def test_unused_places_given_back_are_there_for_the_next_message(governor):
    grant = governor.take_messages("m365", M365, 3)

    governor.give_back(grant, 2)

    governor.take_message("m365", M365)
    governor.take_message("m365", M365)
    with pytest.raises(GovernorDelay):
        governor.take_message("m365", M365)


def test_places_are_not_given_back_over_another_environments_write(governor, clock):
    grant = governor.take_messages("m365", M365, 2)
    another_environment(clock).take_message("m365", M365)

    governor.give_back(grant, 2)

    with pytest.raises(GovernorDelay):
        governor.take_message("m365", M365)


def test_places_are_not_given_back_into_a_slow_down_window(governor):
    grant = governor.take_messages("m365", M365, 3)
    governor.slow_down("m365", seconds=60)

    governor.give_back(grant, 3)

    with pytest.raises(GovernorDelay):
        governor.take_message("m365", M365)


@pytest.mark.parametrize("per_minute", [1, 7, 30, 60])
def test_no_sixty_second_window_holds_more_than_messages_per_minute_taken_by_batches(
    governor, clock, per_minute
):
    limits = Limits(messages_per_minute=per_minute)
    sent: list[float] = []
    end = clock.now + 180
    batch = 0
    while clock.now < end:
        batch += 1
        try:
            grant = governor.take_messages("mbx", limits, 10)
        except GovernorDelay as delay:
            clock.now += delay.retry_after
            continue
        used = grant.granted if batch % 3 else grant.granted // 2  # some batches use only part
        sent.extend([clock.now] * used)
        governor.give_back(grant, grant.granted - used)
        clock.now += 0.5

    busiest = max(sum(1 for t in sent if start <= t < start + 60) for start in sent)
    assert busiest <= per_minute


def test_an_integration_without_a_rate_limit_grants_the_whole_batch_without_a_request(governor, dynamodb):
    grant = governor.take_messages("smtp", Limits(max_connections=2), 10)

    assert grant.granted == 10
    assert "Item" not in dynamodb.get_item(TableName=TABLE, Key={"pk": {"S": "gov#smtp#rate"}})


def test_a_batch_counts_each_messages_recipients_against_the_daily_cap(governor):
    limits = Limits(recipients_per_day=5)
    governor.count_recipients("gmail", limits, 3)

    with pytest.raises(GovernorDelay) as delay:
        governor.count_recipients("gmail", limits, 3)

    assert delay.value.reason == "recipients_per_day"
    governor.count_recipients("gmail", limits, 2)


# ---------------------------------------------------------------- many environments at once


def race(sender, environments: int = 8) -> None:
    """Run ``sender(n)`` for ``n`` environments at once, each on its own thread."""
    threads = [threading.Thread(target=sender, args=(n,)) for n in range(environments)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def messages_taken(clock, integration_id: str, limits: Limits, **take) -> int:
    """Eight environments each try six messages at once; how many the governor let through."""
    taken = []

    def sender(n: int) -> None:
        governor = another_environment(clock)
        for _ in range(6):
            try:
                governor.take_message(integration_id, limits, **take)
                taken.append(1)
            except GovernorDelay:
                pass

    race(sender)
    return len(taken)


def test_racing_environments_never_hold_more_connections_than_the_limit(dynamodb):
    limits = Limits(max_connections=3)
    lock = threading.Lock()
    state = {"open": 0, "peak": 0, "sessions": 0}

    def sender(n: int) -> None:
        governor = SendGovernor(boto3.client("dynamodb", region_name="us-east-1"), TABLE)
        for i in range(12):
            try:
                slot = governor.open_connection("m365", limits, holder=f"env-{n}-{i}", lease_seconds=60)
            except GovernorDelay:
                continue
            with lock:
                state["open"] += 1
                state["sessions"] += 1
                state["peak"] = max(state["peak"], state["open"])
            threading.Event().wait(0.002)
            with lock:
                state["open"] -= 1
            governor.release_connection(slot)

    race(sender)

    assert 1 <= state["peak"] <= 3
    assert state["sessions"] >= 8  # the limit held while work got done


def test_racing_environments_take_exactly_the_bucket_and_no_more(dynamodb, clock):
    limits = Limits(messages_per_minute=100)  # burst of 10; the clock stands still: no refill

    assert messages_taken(clock, "m365", limits) == 10


def test_racing_batches_take_exactly_the_bucket_and_no_more(dynamodb, clock):
    limits = Limits(messages_per_minute=100)  # burst of 10; the clock stands still: no refill
    taken = []

    def sender(n: int) -> None:
        governor = another_environment(clock)
        for _ in range(3):
            try:
                grant = governor.take_messages("m365", limits, 4)
            except GovernorDelay:
                continue
            taken.append(grant.granted - 1)
            governor.give_back(grant, 1)  # each batch uses all but one

    race(sender)

    assert sum(taken) <= 10
    assert sum(taken) >= 5  # the limit held while work got done


def test_racing_environments_never_pass_the_daily_recipient_cap(dynamodb, clock):
    limits = Limits(recipients_per_day=25)

    assert messages_taken(clock, "gmail", limits, recipients=1) == 25


# ---------------------------------------------------------------- DynamoDB failures


def test_missing_table_is_aws_unavailable_not_a_delay(dynamodb, clock):
    governor = SendGovernor(dynamodb, "no-such-table", clock=clock)

    with pytest.raises(AwsUnavailable):
        governor.open_connection("m365", M365, holder="a", lease_seconds=60)


# ---------------------------------------------------------------- one write a batch


@pytest.fixture
def requests_made(dynamodb):
    """The DynamoDB operations the ``dynamodb`` client sends, in order."""
    made: list[str] = []
    dynamodb.meta.events.register(
        "before-call.dynamodb", lambda model, **_: made.append(model.name), unique_id="count"
    )
    return made


def bucket(dynamodb, integration_id: str) -> dict:
    return dynamodb.get_item(TableName=TABLE, Key={"pk": {"S": f"gov#{integration_id}#rate"}}).get("Item", {})


def test_a_batch_takes_its_places_in_a_full_bucket_with_one_write_and_no_read(governor, requests_made):
    grant = governor.take_messages("m365", M365, 10)

    assert grant.granted == 3
    assert requests_made == ["UpdateItem"]


def test_a_batch_takes_its_places_in_a_refilling_bucket_with_one_write(governor, clock, requests_made):
    # Given a bucket this environment left partly taken (one place out of three),
    governor.take_messages("m365", M365, 1)
    clock.now += 0.5
    requests_made.clear()

    # when the next batch comes before it has refilled, it takes the two places left in one write,
    assert governor.take_messages("m365", M365, 10).granted == 2
    # and so does one after the bucket has refilled by a place.
    clock.now += 60 / 28
    assert governor.take_messages("m365", M365, 10).granted == 1
    assert requests_made == ["UpdateItem", "UpdateItem"]
    with pytest.raises(GovernorDelay):
        governor.take_messages("m365", M365, 1)


def test_a_stale_guess_costs_one_refused_write_and_one_exact_write_never_a_read(
    governor, clock, dynamodb, requests_made
):
    # Given an environment that last left the bucket with two places of three,
    governor.take_messages("m365", M365, 1)
    # and another that took both since,
    assert another_environment(clock).take_messages("m365", M365, 2).granted == 2
    clock.now += 60 / 28 + 0.001  # one place refills
    requests_made.clear()

    # when the first takes a batch's places, its guess (three places) is refused with the stored
    # item, and the exact write takes the one place there is.
    assert governor.take_messages("m365", M365, 10).granted == 1
    assert requests_made == ["UpdateItem", "UpdateItem"]
    with pytest.raises(GovernorDelay):
        another_environment(clock).take_messages("m365", M365, 1)


def test_a_full_bucket_guessed_where_another_environment_took_places_costs_no_read(
    governor, clock, requests_made
):
    governor.take_messages("m365", M365, 1)
    clock.now += 10  # refilled, as far as this environment knows
    another_environment(clock).take_messages("m365", M365, 2)
    requests_made.clear()

    assert governor.take_messages("m365", M365, 10).granted == 1
    assert requests_made == ["UpdateItem", "UpdateItem"]


def test_an_empty_bucket_answers_its_delay_without_a_read(governor, clock, requests_made):
    governor.take_messages("m365", M365, 3)
    requests_made.clear()

    with pytest.raises(GovernorDelay) as delay:
        governor.take_messages("m365", M365, 1)

    assert delay.value.retry_after == pytest.approx(60 / 28, abs=1e-5)
    assert requests_made == ["UpdateItem"]


def test_the_next_invocation_of_an_environment_guesses_from_what_the_last_one_left(
    dynamodb, clock, requests_made
):
    # Each invocation builds its governor; the environment keeps what they learned.
    known: dict = {}
    SendGovernor(dynamodb, TABLE, clock=clock, known_tats=known).take_messages("m365", M365, 1)
    clock.now += 0.5
    requests_made.clear()

    grant = SendGovernor(dynamodb, TABLE, clock=clock, known_tats=known).take_messages("m365", M365, 10)

    assert grant.granted == 2
    assert requests_made == ["UpdateItem"]


def test_a_delay_answered_by_the_stored_item_guides_the_next_guess(governor, clock, requests_made):
    another_environment(clock).take_messages("m365", M365, 3)
    with pytest.raises(GovernorDelay) as delay:
        governor.take_messages("m365", M365, 10)
    clock.now += delay.value.retry_after
    requests_made.clear()

    assert governor.take_messages("m365", M365, 10).granted == 1
    assert requests_made == ["UpdateItem"]


def test_places_given_back_are_known_to_the_next_guess(governor, clock, requests_made):
    grant = governor.take_messages("m365", M365, 3)
    governor.give_back(grant, 2)
    requests_made.clear()

    assert governor.take_messages("m365", M365, 10).granted == 2
    assert requests_made == ["UpdateItem"]


# ---------------------------------------------------------------- buckets written as tokens


def old_bucket(dynamodb, integration_id: str, **attributes: float) -> None:
    """A bucket item as written before the bucket kept a theoretical arrival time."""
    item = {"pk": {"S": f"gov#{integration_id}#rate"}, "version": {"N": "7"}}
    item.update({name: {"N": f"{value:.6f}"} for name, value in attributes.items()})
    dynamodb.put_item(TableName=TABLE, Item=item)


def test_a_bucket_written_as_tokens_keeps_its_tokens_and_is_converted(
    governor, clock, dynamodb, requests_made
):
    # Given a bucket of 30 a minute written as 1.5 tokens a second ago (1.5 + 28/60 now),
    old_bucket(dynamodb, "m365", tokens=1.5, refilled_at=clock.now - 1)
    requests_made.clear()

    # a batch takes the one whole place it holds (the guessed write refused, no read),
    assert governor.take_messages("m365", M365, 10).granted == 1
    assert requests_made == ["UpdateItem", "UpdateItem"]
    # and the next place comes when the old bucket would have refilled it: no extra burst.
    with pytest.raises(GovernorDelay) as delay:
        another_environment(clock).take_messages("m365", M365, 10)
    left = 1.5 + 28 / 60 - 1
    assert delay.value.retry_after == pytest.approx((1 - left) * 60 / 28, abs=1e-5)
    item = bucket(dynamodb, "m365")
    assert "tokens" not in item and "refilled_at" not in item and int(item["version"]["N"]) == 8


def test_a_full_bucket_written_as_tokens_gives_its_burst_once(governor, clock, dynamodb):
    old_bucket(dynamodb, "m365", tokens=3, refilled_at=clock.now - 600)

    assert governor.take_messages("m365", M365, 10).granted == 3
    with pytest.raises(GovernorDelay):
        governor.take_messages("m365", M365, 10)


def test_tokens_written_over_a_converted_bucket_are_honoured(governor, clock, dynamodb, requests_made):
    # Given a converted bucket, full again, that an older sender then emptied as it wrote buckets,
    governor.take_messages("m365", M365, 1)
    clock.now += 60
    dynamodb.update_item(
        TableName=TABLE,
        Key={"pk": {"S": "gov#m365#rate"}},
        UpdateExpression="SET tokens = :zero, refilled_at = :now",
        ExpressionAttributeValues={":zero": {"N": "0"}, ":now": {"N": f"{clock.now:.6f}"}},
    )
    requests_made.clear()

    # the guessed write is refused and the empty bucket's delay holds.
    with pytest.raises(GovernorDelay) as delay:
        governor.take_messages("m365", M365, 10)
    assert delay.value.retry_after == pytest.approx(60 / 28, abs=1e-5)
    assert requests_made == ["UpdateItem"]


def test_a_slow_down_window_written_with_tokens_keeps_the_bucket_empty(governor, clock, dynamodb):
    # As a throttling reply left it: emptied, half the pace for five minutes.
    old_bucket(dynamodb, "m365", tokens=0, refilled_at=clock.now, slow_until=clock.now + 300)
    clock.now += 1

    with pytest.raises(GovernorDelay) as delay:
        governor.take_messages("m365", M365, 10)

    assert delay.value.retry_after == pytest.approx(3.0, abs=1e-5)  # one every 4 s


# ---------------------------------------------------------------- slow-down windows, batch by batch


def test_a_slow_down_window_grants_one_place_at_a_time_at_half_the_pace(governor, clock, requests_made):
    governor.take_messages("m365", M365, 1)
    governor.slow_down("m365", seconds=60)
    requests_made.clear()

    with pytest.raises(GovernorDelay) as delay:
        governor.take_messages("m365", M365, 10)
    assert delay.value.retry_after == pytest.approx(4.0, abs=1e-5)
    grants = []
    while clock.now < START + 60:
        try:
            grants.append(governor.take_messages("m365", M365, 10).granted)
        except GovernorDelay as delay:
            clock.now += delay.retry_after

    assert grants == [1] * 14  # at 4, 8, ... 56 s: 15 a minute from an emptied bucket
    assert "GetItem" not in requests_made


@pytest.mark.parametrize("per_minute", [1, 7, 30, 60])
def test_no_sixty_second_window_holds_more_than_messages_per_minute_around_a_slow_down(
    governor, clock, per_minute
):
    limits = Limits(messages_per_minute=per_minute)
    sent: list[float] = []
    end = clock.now + 300
    slowed = False
    while clock.now < end:
        if not slowed and clock.now >= START + 70:
            governor.slow_down("mbx", seconds=90)
            slowed = True
        try:
            grant = governor.take_messages("mbx", limits, 4)
        except GovernorDelay as delay:
            clock.now += delay.retry_after
            continue
        sent.extend([clock.now] * grant.granted)
        clock.now += 0.25

    busiest = max(sum(1 for t in sent if start <= t < start + 60) for start in sent)
    assert busiest <= per_minute
    slowed_window = [t for t in sent if START + 70 <= t < START + 160]
    assert len(slowed_window) <= per_minute * 90 / 120 + 1


# ---------------------------------------------------------------- racing batches with time passing


class RacingClock:
    """A clock shared by racing environments: each reading moves it on by ``step``; each thread
    remembers the last reading it got (the time its governor's write was computed for)."""

    def __init__(self, step: float) -> None:
        self.now = START
        self.step = step
        self._lock = threading.Lock()
        self.seen = threading.local()

    def __call__(self) -> float:
        with self._lock:
            self.now += self.step
            self.seen.last = self.now
            return self.now


@pytest.mark.parametrize("per_minute", [7, 30, 100])
def test_racing_environments_never_put_more_than_messages_per_minute_in_a_sixty_second_window(
    dynamodb, per_minute
):
    limits = Limits(messages_per_minute=per_minute)
    clock = RacingClock(step=0.5)  # about 80 s in all
    sent: list[float] = []
    lock = threading.Lock()

    def sender(n: int) -> None:
        governor = another_environment(clock)
        for i in range(30):
            try:
                grant = governor.take_messages("mbx", limits, 1 + (n + i) % 5)
            except GovernorDelay:
                continue
            taken_at = clock.seen.last
            used = grant.granted if i % 3 else max(1, grant.granted // 2)
            governor.give_back(grant, grant.granted - used)
            with lock:
                sent.extend([taken_at] * used)
            if n == 0 and i == 12:
                governor.slow_down("mbx", seconds=20)

    race(sender, environments=4)

    busiest = max(sum(1 for t in sent if start <= t < start + 60) for start in sent)
    assert busiest <= per_minute
    assert len(sent) >= per_minute  # the limit held while work got done
