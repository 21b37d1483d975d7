"""The retry policy's arithmetic and checks, on their own (no services needed)."""

from __future__ import annotations

import pytest

from durable import RetryPolicy
from durable.retry import is_retryable, retry_delay


class Declined(Exception):
    pass


class CardExpired(Declined):
    pass


def test_a_wait_that_overflows_is_capped_at_max_interval() -> None:
    policy = RetryPolicy(max_attempts=10_000, backoff=1e6, max_interval=60.0).to_dict()
    assert retry_delay(policy, 5_000) == 60.0  # 1e6 ** 4999 overflows a float


def test_no_initial_wait_stays_none_however_steep_the_backoff() -> None:
    policy = RetryPolicy(max_attempts=10_000, initial_interval=0, backoff=1e6).to_dict()
    assert retry_delay(policy, 5_000) == 0.0  # not 0 * inf, which is nan


def test_a_subclass_of_a_non_retryable_error_is_not_retried() -> None:
    policy = RetryPolicy(non_retryable=(Declined,)).to_dict()
    assert not is_retryable(policy, CardExpired("expired"))
    assert is_retryable(policy, ValueError("other"))


def test_max_attempts_must_be_an_int_not_a_bool() -> None:
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy(max_attempts=True)
