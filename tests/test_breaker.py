"""Tests of `MemoryCircuitBreaker` and `counts_as_failure`, on a fake clock."""

from __future__ import annotations

import logging
import math

import pytest

from hospital_bulk._breaker import MemoryCircuitBreaker, counts_as_failure
from hospital_bulk._exceptions import (
    AmbiguousOutcomeError,
    BatchFullError,
    CircuitOpenError,
    ConfigurationError,
    ContractError,
    Outcome,
    RateLimitedError,
    RejectedError,
    RequestNotSentError,
    UpstreamValidationError,
)
from hospital_bulk.protocols import CircuitBreaker

T0 = 1_700_000_000.0


class FakeClock:
    """A clock that only moves when a test moves it."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def breaker_on(clock: FakeClock, **kwargs: object) -> MemoryCircuitBreaker:
    return MemoryCircuitBreaker(clock=clock, **kwargs)  # type: ignore[arg-type]


def err(cls: type, outcome: Outcome, method: str = "POST", **kwargs: object) -> Exception:
    return cls("boom", method=method, path="/hospitals/", outcome=outcome, **kwargs)  # type: ignore[no-any-return]


async def fail_times(breaker: MemoryCircuitBreaker, n: int) -> None:
    for _ in range(n):
        await breaker.before_call()
        await breaker.record_failure()


# --- counts_as_failure ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "counts"),
    [
        (err(RequestNotSentError, Outcome.NOT_SENT), True),
        (err(AmbiguousOutcomeError, Outcome.AMBIGUOUS, status_code=503), True),
        (err(AmbiguousOutcomeError, Outcome.AMBIGUOUS, method="GET"), True),
        (err(ContractError, Outcome.AMBIGUOUS, status_code=200), True),
        (err(ContractError, Outcome.REJECTED, status_code=307), False),
        (err(RejectedError, Outcome.REJECTED, status_code=404), False),
        (err(UpstreamValidationError, Outcome.REJECTED, status_code=422), False),
        (err(BatchFullError, Outcome.REJECTED, status_code=400), False),
        (err(RateLimitedError, Outcome.RATE_LIMITED, status_code=429), False),
        (CircuitOpenError("hospital_api", retry_at=T0), False),
        (ValueError("bug"), False),
        (KeyboardInterrupt(), False),
    ],
)
def test_counts_as_failure(exc: BaseException, counts: bool) -> None:
    assert counts_as_failure(exc) is counts


# --- settings -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"name": ""}, "name"),
        ({"failure_threshold": 0}, "failure_threshold"),
        ({"failure_threshold": 2.5}, "failure_threshold"),
        ({"failure_threshold": True}, "failure_threshold"),
        ({"failure_rate": 0}, "failure_rate"),
        ({"failure_rate": 1.5}, "failure_rate"),
        ({"failure_rate": math.nan}, "failure_rate"),
        ({"window": 0}, "window"),
        ({"min_calls": 0}, "min_calls"),
        ({"recovery_time": 0}, "recovery_time"),
        ({"recovery_time": math.inf}, "recovery_time"),
        ({"clock": 3}, "clock"),
    ],
)
def test_rejects_bad_settings(kwargs: dict[str, object], name: str) -> None:
    with pytest.raises(ConfigurationError, match=name):
        MemoryCircuitBreaker(**kwargs)  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_defaults_and_protocol() -> None:
    breaker = MemoryCircuitBreaker()
    assert isinstance(breaker, CircuitBreaker)
    assert breaker.name == "hospital_api"
    assert await breaker.state() == "closed"
    assert await breaker.open_until() is None


# --- consecutive failures -------------------------------------------------------------------


@pytest.mark.anyio
async def test_opens_after_threshold_consecutive_failures() -> None:
    clock = FakeClock()
    breaker = breaker_on(clock, failure_threshold=3, recovery_time=30)
    await fail_times(breaker, 2)
    assert await breaker.state() == "closed"
    await fail_times(breaker, 1)
    assert await breaker.state() == "open"
    assert await breaker.open_until() == T0 + 30

    clock.now += 29.5
    with pytest.raises(CircuitOpenError) as info:
        await breaker.before_call()
    assert info.value.name == "hospital_api"
    assert info.value.retry_at == T0 + 30


@pytest.mark.anyio
async def test_a_success_resets_the_consecutive_count() -> None:
    breaker = breaker_on(FakeClock(), failure_threshold=3)
    await fail_times(breaker, 2)
    await breaker.before_call()
    await breaker.record_success()
    await fail_times(breaker, 2)
    assert await breaker.state() == "closed"


@pytest.mark.anyio
async def test_results_reported_while_open_are_ignored() -> None:
    clock = FakeClock()
    breaker = breaker_on(clock, failure_threshold=1, recovery_time=30)
    await fail_times(breaker, 1)
    clock.now += 10
    await breaker.record_success()  # a late answer of a call made before it opened
    await breaker.record_failure()
    assert await breaker.state() == "open"
    assert await breaker.open_until() == T0 + 30  # not extended either


# --- half open ------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_half_open_lets_one_probe_through_and_its_success_closes() -> None:
    clock = FakeClock()
    breaker = breaker_on(clock, failure_threshold=1, recovery_time=30)
    await fail_times(breaker, 1)
    clock.now += 30
    assert await breaker.state() == "half_open"

    await breaker.before_call()  # the probe
    with pytest.raises(CircuitOpenError) as info:
        await breaker.before_call()
    assert info.value.retry_at == clock.now + 1.0

    await breaker.record_success()
    assert await breaker.state() == "closed"
    await breaker.before_call()
    await breaker.before_call()


@pytest.mark.anyio
async def test_a_failed_probe_reopens_for_another_recovery_time() -> None:
    clock = FakeClock()
    breaker = breaker_on(clock, failure_threshold=1, recovery_time=30)
    await fail_times(breaker, 1)
    clock.now += 31
    await breaker.before_call()
    clock.now += 2
    await breaker.record_failure()
    assert await breaker.state() == "open"
    assert await breaker.open_until() == T0 + 33 + 30
    with pytest.raises(CircuitOpenError) as info:
        await breaker.before_call()
    assert info.value.retry_at == T0 + 63


@pytest.mark.anyio
async def test_a_probe_that_never_reports_stops_blocking_after_its_lease() -> None:
    clock = FakeClock()
    breaker = breaker_on(clock, failure_threshold=1, recovery_time=5)
    await fail_times(breaker, 1)
    clock.now += 5
    await breaker.before_call()  # this probe's task is cancelled: it never reports
    clock.now += 4.5
    with pytest.raises(CircuitOpenError) as info:
        await breaker.before_call()
    assert info.value.retry_at == T0 + 10  # capped at the lease's end
    clock.now += 0.5
    await breaker.before_call()  # the lease ran out: a new probe
    with pytest.raises(CircuitOpenError):
        await breaker.before_call()


@pytest.mark.anyio
async def test_short_recovery_time_shortens_the_probe_retry() -> None:
    clock = FakeClock()
    breaker = breaker_on(clock, failure_threshold=1, recovery_time=0.25)
    await fail_times(breaker, 1)
    clock.now += 0.25
    await breaker.before_call()
    with pytest.raises(CircuitOpenError) as info:
        await breaker.before_call()
    assert info.value.retry_at == pytest.approx(clock.now + 0.25)


# --- failure rate ---------------------------------------------------------------------------


@pytest.mark.anyio
async def test_failure_rate_opens_once_min_calls_are_reached() -> None:
    clock = FakeClock()
    breaker = breaker_on(clock, failure_threshold=100, failure_rate=0.5, min_calls=4, window=10)
    for ok in (True, False, True):
        await breaker.before_call()
        await (breaker.record_success() if ok else breaker.record_failure())
        clock.now += 1
    assert await breaker.state() == "closed"  # 1 of 3: under min_calls
    await fail_times(breaker, 1)  # 2 of 4 = 0.5
    assert await breaker.state() == "open"


@pytest.mark.anyio
async def test_failure_rate_forgets_calls_older_than_the_window() -> None:
    clock = FakeClock()
    breaker = breaker_on(clock, failure_threshold=100, failure_rate=0.5, min_calls=4, window=10)
    await fail_times(breaker, 3)
    clock.now += 10  # those three leave the window
    for _ in range(3):
        await breaker.before_call()
        await breaker.record_success()
    await fail_times(breaker, 1)  # 1 of 4 in the window
    assert await breaker.state() == "closed"
    await fail_times(breaker, 1)  # 2 of 5: still under 0.5
    assert await breaker.state() == "closed"
    await fail_times(breaker, 1)  # 3 of 6
    assert await breaker.state() == "open"


@pytest.mark.anyio
async def test_without_failure_rate_only_consecutive_failures_count() -> None:
    breaker = breaker_on(FakeClock(), failure_threshold=3)
    for _ in range(20):
        await fail_times(breaker, 2)
        await breaker.before_call()
        await breaker.record_success()
    assert await breaker.state() == "closed"


# --- logging --------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_state_changes_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="hospital_bulk.breaker")
    clock = FakeClock()
    breaker = breaker_on(clock, failure_threshold=1, recovery_time=10)
    await fail_times(breaker, 1)  # closed -> open
    clock.now += 10
    await breaker.before_call()  # open -> half_open
    await breaker.record_failure()  # half_open -> open
    clock.now += 10
    await breaker.before_call()  # open -> half_open
    await breaker.record_success()  # half_open -> closed

    logged = [
        (r.name, r.levelno, r.getMessage())
        for r in caplog.records
        if r.name == "hospital_bulk.breaker"
    ]
    prefix = "Circuit breaker 'hospital_api' state changed: "
    assert logged == [
        ("hospital_bulk.breaker", logging.WARNING, prefix + "closed -> open"),
        ("hospital_bulk.breaker", logging.INFO, prefix + "open -> half_open"),
        ("hospital_bulk.breaker", logging.WARNING, prefix + "half_open -> open"),
        ("hospital_bulk.breaker", logging.INFO, prefix + "open -> half_open"),
        ("hospital_bulk.breaker", logging.INFO, prefix + "half_open -> closed"),
    ]
