"""The retry schedule: about 1, 5, 15, 30, 60 minutes, then hourly; jittered; capped by SQS."""

from __future__ import annotations

import pytest
from mailbroker.messages.retry import MAX_VISIBILITY_SECONDS, base_delay, is_expired, retry_delay


def no_jitter(low: float, high: float) -> float:
    return 0.0


@pytest.mark.parametrize(
    ("attempts", "minutes"),
    [(1, 1), (2, 5), (3, 15), (4, 30), (5, 60), (6, 60), (24, 60)],
)
def test_delay_after_each_failed_attempt_follows_the_postfix_like_schedule(
    attempts: int, minutes: int
) -> None:
    assert retry_delay(attempts, uniform=no_jitter) == minutes * 60


def test_attempt_counts_below_one_are_treated_as_the_first_attempt() -> None:
    assert base_delay(0) == base_delay(1) == 60


@pytest.mark.parametrize("attempts", [1, 2, 3, 4, 5, 9])
def test_jitter_stays_within_ten_percent_of_the_scheduled_delay(attempts: int) -> None:
    base = base_delay(attempts)
    lowest = retry_delay(attempts, uniform=lambda low, high: low)
    highest = retry_delay(attempts, uniform=lambda low, high: high)
    assert lowest == pytest.approx(base * 0.9, abs=1)
    assert highest == pytest.approx(base * 1.1, abs=1)


def test_jitter_spreads_messages_that_failed_together() -> None:
    delays = {retry_delay(2) for _ in range(50)}
    assert len(delays) > 5
    assert all(270 <= d <= 330 for d in delays)


def test_a_longer_retry_after_from_the_server_wins() -> None:
    assert retry_delay(1, retry_after=600.4, uniform=no_jitter) == 601


def test_a_shorter_retry_after_does_not_shorten_the_schedule() -> None:
    assert retry_delay(3, retry_after=5, uniform=no_jitter) == 900


def test_no_delay_exceeds_what_sqs_accepts_for_a_visibility_timeout() -> None:
    assert retry_delay(5, retry_after=7 * 86400, uniform=no_jitter) == MAX_VISIBILITY_SECONDS
    assert MAX_VISIBILITY_SECONDS <= 12 * 3600


def test_a_message_is_expired_once_older_than_the_maximum_age() -> None:
    day = 24 * 3600
    assert not is_expired(1000.0, 1000.0 + day - 1, max_age_seconds=day)
    assert is_expired(1000.0, 1000.0 + day, max_age_seconds=day)
