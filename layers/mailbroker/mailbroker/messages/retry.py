"""When a retryable failure is tried again: a Postfix-like schedule on SQS visibility.

After the n-th failed attempt the message becomes visible again after about 1, 5, 15, 30 and 60
minutes, then every hour. Each delay is jittered by ±10 % so that messages that failed together
do not come back together, and a server's or provider's ``retry_after`` wins when it is longer.
No delay exceeds what SQS accepts for ``ChangeMessageVisibility`` (12 hours from the receive, less
a margin for the time this receive has already used).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

# Seconds to wait after the 1st, 2nd, ... failed attempt; the last step repeats.
SCHEDULE: tuple[int, ...] = (60, 300, 900, 1800, 3600)
JITTER = 0.10
# SQS refuses a visibility timeout beyond 12 hours after the receive; keep 5 minutes in hand for
# the time the current invocation has already spent.
MAX_VISIBILITY_SECONDS = 12 * 3600 - 300


def base_delay(attempts: int) -> int:
    """The un-jittered delay after ``attempts`` failed attempts (1 or more)."""
    step = min(max(attempts, 1), len(SCHEDULE)) - 1
    return SCHEDULE[step]


def retry_delay(
    attempts: int,
    *,
    retry_after: float | None = None,
    jitter: float = JITTER,
    uniform: Callable[[float, float], float] = random.uniform,
    cap: int = MAX_VISIBILITY_SECONDS,
) -> int:
    """Whole seconds until the next attempt, after ``attempts`` failed attempts."""
    delay = base_delay(attempts) * (1.0 + uniform(-jitter, jitter))
    if retry_after is not None and retry_after > delay:
        delay = retry_after
    return max(1, min(cap, math.ceil(delay)))


def is_expired(first_sent_at: float, now: float, *, max_age_seconds: float) -> bool:
    """True when a message first queued at ``first_sent_at`` may not be retried any more."""
    return now - first_sent_at >= max_age_seconds
