"""Tests of `RetryPolicy`, with an injected sleep (nothing sleeps for real)."""

from __future__ import annotations

import math
import random
from collections.abc import Awaitable, Callable

import anyio
import anyio.lowlevel
import pytest

from hospital_bulk._exceptions import (
    AmbiguousOutcomeError,
    BatchNotFoundError,
    CircuitOpenError,
    ConfigurationError,
    ContractError,
    Outcome,
    RateLimitedError,
    RejectedError,
    RequestNotSentError,
    UpstreamError,
)
from hospital_bulk._retry import RetryPolicy


class FakeSleep:
    """Records the waits asked for, and waits for none of them."""

    def __init__(self, log: list[tuple[str, float]] | None = None) -> None:
        self.log = log if log is not None else []

    @property
    def waits(self) -> list[float]:
        return [dt for what, dt in self.log if what == "sleep"]

    async def __call__(self, dt: float) -> None:
        self.log.append(("sleep", dt))
        await anyio.lowlevel.checkpoint()


def not_sent(method: str = "POST") -> RequestNotSentError:
    return RequestNotSentError(
        "connect", method=method, path="/hospitals/", outcome=Outcome.NOT_SENT
    )


def ambiguous(method: str) -> AmbiguousOutcomeError:
    return AmbiguousOutcomeError(
        "read timeout", method=method, path="/hospitals/", outcome=Outcome.AMBIGUOUS
    )


def limited(retry_after: float | None = None, window: float | None = None) -> RateLimitedError:
    return RateLimitedError(
        "Rate limit exceeded",
        method="POST",
        path="/hospitals/",
        outcome=Outcome.RATE_LIMITED,
        status_code=429,
        retry_after=retry_after,
        window=window,
    )


def scripted(*steps: BaseException | str) -> tuple[Callable[[], Awaitable[str]], list[int]]:
    """An attempt function raising or returning each step in turn; and its call counter."""
    calls = [0]

    async def fn() -> str:
        step = steps[calls[0]]
        calls[0] += 1
        if isinstance(step, BaseException):
            raise step
        return step

    return fn, calls


class MaxRandom(random.Random):
    """Always draws the top of the range, to read the backoff caps."""

    def uniform(self, a: float, b: float) -> float:
        return b


# --- settings -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"attempts": 0}, "attempts"),
        ({"attempts": 2.0}, "attempts"),
        ({"attempts": True}, "attempts"),
        ({"initial": -1}, "initial"),
        ({"maximum": math.inf}, "maximum"),
        ({"initial": 5, "maximum": 1}, "maximum"),
        ({"multiplier": 0.5}, "multiplier"),
        ({"rate_limit_wait": -1}, "rate_limit_wait"),
        ({"sleep": 3}, "sleep"),
        ({"rng": 42}, "rng"),
    ],
)
def test_rejects_bad_settings(kwargs: dict[str, object], name: str) -> None:
    with pytest.raises(ConfigurationError, match=name):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


# --- what is retried ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "retried"),
    [
        (not_sent("POST"), True),
        (not_sent("PATCH"), True),
        (limited(), True),
        (ambiguous("GET"), True),
        (ambiguous("POST"), False),
        (ambiguous("PATCH"), False),
        (ambiguous("DELETE"), False),
        (ambiguous("PUT"), False),
        (ContractError("bad body", method="GET", path="/", outcome=Outcome.AMBIGUOUS), True),
        (ContractError("bad body", method="POST", path="/", outcome=Outcome.AMBIGUOUS), False),
        (RejectedError("no", method="GET", path="/", outcome=Outcome.REJECTED), False),
        (BatchNotFoundError("404", method="GET", path="/", outcome=Outcome.REJECTED), False),
        (CircuitOpenError("hospital_api", retry_at=0.0), False),
        (ValueError("bug"), False),
    ],
)
def test_should_retry(exc: BaseException, retried: bool) -> None:
    assert RetryPolicy().should_retry(exc) is retried


@pytest.mark.anyio
async def test_success_first_time_does_not_wait() -> None:
    sleep = FakeSleep()
    fn, calls = scripted("ok")
    assert await RetryPolicy(sleep=sleep).call(fn) == "ok"
    assert calls == [1]
    assert sleep.log == []


@pytest.mark.anyio
async def test_retries_until_success_and_reports_each_retry_before_its_wait() -> None:
    log: list[tuple[str, float]] = []
    sleep = FakeSleep(log)
    errors = [not_sent(), ambiguous("GET")]
    seen: list[UpstreamError] = []

    async def on_retry(error: UpstreamError, wait: float) -> None:
        seen.append(error)
        log.append(("on_retry", wait))

    fn, calls = scripted(*errors, "ok")
    assert await RetryPolicy(sleep=sleep).call(fn, on_retry=on_retry) == "ok"
    assert calls == [3]
    assert seen == errors
    assert [what for what, _ in log] == ["on_retry", "sleep", "on_retry", "sleep"]
    assert log[0][1] == log[1][1]
    assert log[2][1] == log[3][1]


@pytest.mark.anyio
async def test_gives_up_after_attempts_and_reraises_the_last_error_itself() -> None:
    sleep = FakeSleep()
    errors = [not_sent() for _ in range(3)]
    fn, calls = scripted(*errors, "never")
    with pytest.raises(RequestNotSentError) as info:
        await RetryPolicy(attempts=3, sleep=sleep).call(fn)
    assert info.value is errors[-1]
    assert calls == [3]
    assert len(sleep.waits) == 2


@pytest.mark.anyio
@pytest.mark.parametrize(
    "exc",
    [
        ambiguous("POST"),
        ambiguous("PATCH"),
        RejectedError("422", method="POST", path="/", outcome=Outcome.REJECTED),
        ValueError("bug"),
    ],
)
async def test_never_retries_what_is_not_safe(exc: BaseException) -> None:
    sleep = FakeSleep()
    retried: list[float] = []

    async def on_retry(error: UpstreamError, wait: float) -> None:
        retried.append(wait)

    fn, calls = scripted(exc, "never")
    with pytest.raises(type(exc)) as info:
        await RetryPolicy(sleep=sleep).call(fn, on_retry=on_retry)
    assert info.value is exc
    assert calls == [1]
    assert sleep.log == []
    assert retried == []


@pytest.mark.anyio
async def test_attempts_one_never_retries() -> None:
    sleep = FakeSleep()
    fn, calls = scripted(not_sent(), "ok")
    with pytest.raises(RequestNotSentError):
        await RetryPolicy(attempts=1, sleep=sleep).call(fn)
    assert calls == [1]


# --- waits ----------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_backoff_is_full_jitter_from_the_injected_rng() -> None:
    sleep = FakeSleep()
    fn, _ = scripted(*[not_sent() for _ in range(5)], "ok")
    policy = RetryPolicy(attempts=6, initial=0.5, maximum=3.0, sleep=sleep, rng=random.Random(7))
    await policy.call(fn)

    expected_rng = random.Random(7)
    caps = [0.5, 1.0, 2.0, 3.0, 3.0]
    assert sleep.waits == [expected_rng.uniform(0, cap) for cap in caps]
    assert all(0 <= w <= cap for w, cap in zip(sleep.waits, caps, strict=True))


@pytest.mark.anyio
async def test_backoff_caps_grow_by_multiplier_up_to_maximum() -> None:
    sleep = FakeSleep()
    fn, _ = scripted(*[not_sent() for _ in range(6)], "ok")
    policy = RetryPolicy(
        attempts=7, initial=1.0, multiplier=3.0, maximum=20.0, sleep=sleep, rng=MaxRandom()
    )
    await policy.call(fn)
    assert sleep.waits == [1.0, 3.0, 9.0, 20.0, 20.0, 20.0]


@pytest.mark.parametrize(
    ("exc", "wait"),
    [
        (limited(retry_after=3.0), 3.0),
        (limited(retry_after=3.0, window=60.0), 3.0),
        (limited(retry_after=1e6), 100.0),  # clamped to 10 * maximum
        (limited(retry_after=-5.0), 0.0),
        (limited(window=60.0), 60.0),
        (limited(), 42.0),
    ],
)
def test_rate_limited_waits(exc: RateLimitedError, wait: float) -> None:
    policy = RetryPolicy(maximum=10.0, rate_limit_wait=42.0, rng=MaxRandom())
    for attempt in (1, 4):  # the attempt number does not matter for a 429
        assert policy.wait_for(exc, attempt) == wait


@pytest.mark.anyio
async def test_a_429_waits_the_window_and_tells_on_retry() -> None:
    sleep = FakeSleep()
    told: list[tuple[UpstreamError, float]] = []

    async def on_retry(error: UpstreamError, wait: float) -> None:
        told.append((error, wait))

    error = limited(window=60.0)
    fn, _ = scripted(error, "ok")
    assert await RetryPolicy(sleep=sleep).call(fn, on_retry=on_retry) == "ok"
    assert told == [(error, 60.0)]
    assert sleep.waits == [60.0]


# --- per call state and testing -------------------------------------------------------------


@pytest.mark.anyio
async def test_concurrent_calls_keep_their_own_attempt_counts() -> None:
    sleep = FakeSleep()
    policy = RetryPolicy(attempts=3, sleep=sleep, rng=MaxRandom(), initial=1.0)
    results: dict[str, str] = {}
    counters: dict[str, list[int]] = {}

    async def run(name: str, failures: int) -> None:
        fn, calls = scripted(*[not_sent() for _ in range(failures)], name)
        counters[name] = calls
        results[name] = await policy.call(fn)

    async with anyio.create_task_group() as tg:
        tg.start_soon(run, "a", 2)
        tg.start_soon(run, "b", 1)
        tg.start_soon(run, "c", 0)

    assert results == {"a": "a", "b": "b", "c": "c"}
    assert {k: v[0] for k, v in counters.items()} == {"a": 3, "b": 2, "c": 1}
    assert sorted(sleep.waits) == [1.0, 1.0, 2.0]


@pytest.mark.anyio
async def test_testing_policy_never_waits() -> None:
    told: list[float] = []

    async def on_retry(error: UpstreamError, wait: float) -> None:
        told.append(wait)

    fn, calls = scripted(limited(window=600.0), not_sent(), "ok")
    with anyio.fail_after(1):
        assert await RetryPolicy.testing().call(fn, on_retry=on_retry) == "ok"
    assert calls == [3]
    assert told[0] == 600.0
    assert len(told) == 2


@pytest.mark.anyio
async def test_default_sleep_is_real_but_short_when_waits_are_zero() -> None:
    fn, calls = scripted(not_sent(), "ok")
    with anyio.fail_after(1):
        assert await RetryPolicy(initial=0.0, maximum=0.0).call(fn) == "ok"
    assert calls == [2]


@pytest.mark.anyio
async def test_cancellation_during_a_wait_stops_retrying() -> None:
    fn, calls = scripted(not_sent(), "ok")
    with anyio.CancelScope() as scope:

        async def on_retry(error: UpstreamError, wait: float) -> None:
            scope.cancel()

        await RetryPolicy(sleep=FakeSleep()).call(fn, on_retry=on_retry)
    assert scope.cancelled_caught
    assert calls == [1]


@pytest.mark.anyio
async def test_a_plain_callable_returning_an_awaitable_is_awaited():
    calls = []

    async def work(value):
        calls.append(value)
        return value * 2

    policy = RetryPolicy.testing()
    assert await policy.call(lambda: work(21)) == 42
    assert calls == [21]
