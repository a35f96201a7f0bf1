"""Tests of the circuit breakers and `counts_as_failure`, on a fake clock.

The state-machine tests run over `MemoryCircuitBreaker` and `RedisCircuitBreaker` alike (the
`breaker_on` fixture); the Redis breaker takes the injected clock too, so nothing sleeps. Tests
of what only a shared breaker does (several processes, Redis's clock, Redis unreachable) are
at the end.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from collections.abc import AsyncIterator, Callable

import anyio
import pytest
import redis.asyncio as aioredis
from redis_support import free_port

import hospital_bulk.backends.redis as redis_backend
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
from hospital_bulk.backends.redis import RedisCircuitBreaker, RedisKeys
from hospital_bulk.protocols import CircuitBreaker

T0 = 1_700_000_000.0
BREAKERS = ["memory", "redis"]
# Where each breaker logs its state changes.
LOGGERS = {"memory": "hospital_bulk.breaker", "redis": "hospital_bulk.backends.redis"}


class FakeClock:
    """A clock that only moves when a test moves it."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


BreakerFactory = Callable[..., CircuitBreaker]


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """A client of the tests' Redis database, closed after the test."""
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture(params=BREAKERS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def breaker_on(kind: str, request: pytest.FixtureRequest) -> BreakerFactory:
    """Makes a breaker of the kind under test on a fake clock (memory runs need no Redis)."""
    if kind == "redis":
        client = request.getfixturevalue("redis_client")
        keys = RedisKeys(request.getfixturevalue("redis_prefix"))

    def make(clock: FakeClock, **kwargs: object) -> CircuitBreaker:
        if kind == "memory":
            return MemoryCircuitBreaker(clock=clock, **kwargs)  # type: ignore[arg-type]
        return RedisCircuitBreaker(client, keys=keys, clock=clock, **kwargs)  # type: ignore[arg-type]

    return make


def err(cls: type, outcome: Outcome, method: str = "POST", **kwargs: object) -> Exception:
    return cls("boom", method=method, path="/hospitals/", outcome=outcome, **kwargs)  # type: ignore[no-any-return]


async def fail_times(breaker: CircuitBreaker, n: int) -> None:
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
def test_rejects_bad_settings(kind: str, kwargs: dict[str, object], name: str) -> None:
    with pytest.raises(ConfigurationError, match=name):
        construct(kind, **kwargs)


def construct(kind: str, **kwargs: object) -> CircuitBreaker:
    if kind == "memory":
        return MemoryCircuitBreaker(**kwargs)  # type: ignore[arg-type]
    # Constructing a Redis breaker sends nothing: this client never connects.
    return RedisCircuitBreaker(aioredis.Redis(port=free_port()), **kwargs)  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_defaults_and_protocol(breaker_on: BreakerFactory) -> None:
    breaker = breaker_on(FakeClock())
    assert isinstance(breaker, CircuitBreaker)
    assert breaker.name == "hospital_api"
    assert await breaker.state() == "closed"
    assert await breaker.open_until() is None


# --- consecutive failures -------------------------------------------------------------------


@pytest.mark.anyio
async def test_opens_after_threshold_consecutive_failures(breaker_on: BreakerFactory) -> None:
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
async def test_a_success_resets_the_consecutive_count(breaker_on: BreakerFactory) -> None:
    breaker = breaker_on(FakeClock(), failure_threshold=3)
    await fail_times(breaker, 2)
    await breaker.before_call()
    await breaker.record_success()
    await fail_times(breaker, 2)
    assert await breaker.state() == "closed"


@pytest.mark.anyio
async def test_results_reported_while_open_are_ignored(breaker_on: BreakerFactory) -> None:
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
async def test_half_open_lets_one_probe_through_and_its_success_closes(
    breaker_on: BreakerFactory,
) -> None:
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
async def test_a_failed_probe_reopens_for_another_recovery_time(breaker_on: BreakerFactory) -> None:
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
async def test_a_probe_that_never_reports_stops_blocking_after_its_lease(
    breaker_on: BreakerFactory,
) -> None:
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
async def test_short_recovery_time_shortens_the_probe_retry(breaker_on: BreakerFactory) -> None:
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
async def test_failure_rate_opens_once_min_calls_are_reached(breaker_on: BreakerFactory) -> None:
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
async def test_failure_rate_forgets_calls_older_than_the_window(breaker_on: BreakerFactory) -> None:
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
async def test_without_failure_rate_only_consecutive_failures_count(
    breaker_on: BreakerFactory,
) -> None:
    breaker = breaker_on(FakeClock(), failure_threshold=3)
    for _ in range(20):
        await fail_times(breaker, 2)
        await breaker.before_call()
        await breaker.record_success()
    assert await breaker.state() == "closed"


# --- logging --------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_state_changes_are_logged(
    breaker_on: BreakerFactory, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    # The same messages from both breakers, each on its module's logger.
    caplog.set_level(logging.INFO, logger=LOGGERS[kind])
    clock = FakeClock()
    breaker = breaker_on(clock, failure_threshold=1, recovery_time=10)
    await fail_times(breaker, 1)  # closed -> open
    clock.now += 10
    await breaker.before_call()  # open -> half_open
    await breaker.record_failure()  # half_open -> open
    clock.now += 10
    await breaker.before_call()  # open -> half_open
    await breaker.record_success()  # half_open -> closed

    name = LOGGERS[kind]
    logged = [
        (r.name, r.levelno, r.getMessage())
        for r in caplog.records
        if r.name.startswith("hospital_bulk")
    ]
    prefix = "Circuit breaker 'hospital_api' state changed: "
    assert logged == [
        (name, logging.WARNING, prefix + "closed -> open"),
        (name, logging.INFO, prefix + "open -> half_open"),
        (name, logging.WARNING, prefix + "half_open -> open"),
        (name, logging.INFO, prefix + "open -> half_open"),
        (name, logging.INFO, prefix + "half_open -> closed"),
    ]


# --- Redis only: one state for every process --------------------------------------------------


@pytest.fixture
async def second_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """Another client of the same database: another process, as far as Redis can tell."""
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


def redis_breaker(
    client: aioredis.Redis, prefix: str, clock: FakeClock | None, **kwargs: object
) -> RedisCircuitBreaker:
    return RedisCircuitBreaker(client, keys=RedisKeys(prefix), clock=clock, **kwargs)  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_two_processes_share_one_breaker(
    redis_client: aioredis.Redis, second_client: aioredis.Redis, redis_prefix: str
) -> None:
    clock = FakeClock()
    a = redis_breaker(redis_client, redis_prefix, clock, failure_threshold=2, recovery_time=30)
    b = redis_breaker(second_client, redis_prefix, clock, failure_threshold=2, recovery_time=30)
    elsewhere = redis_breaker(redis_client, f"{redis_prefix}-other", clock, failure_threshold=2)

    await fail_times(a, 1)
    await fail_times(b, 1)  # the two failures add up: consecutive across processes

    assert await a.state() == "open"
    with pytest.raises(CircuitOpenError) as info:
        await b.before_call()  # b opened nothing itself, and is refused
    assert info.value.retry_at == T0 + 30
    assert await b.open_until() == T0 + 30
    assert await elsewhere.state() == "closed"  # another prefix: another breaker
    await elsewhere.before_call()

    clock.now += 30
    # Half open: of six callers in two processes asking at once, exactly one gets the probe.
    probes: list[CircuitBreaker] = []
    refused: list[float] = []

    async def ask(breaker: CircuitBreaker) -> None:
        try:
            await breaker.before_call()
        except CircuitOpenError as exc:
            refused.append(exc.retry_at)
        else:
            probes.append(breaker)

    async with anyio.create_task_group() as tg:
        for breaker in (a, b, a, b, a, b):
            tg.start_soon(ask, breaker)
    assert len(probes) == 1
    assert refused == [T0 + 31] * 5
    other = b if probes[0] is a else a
    assert await other.state() == "half_open"

    await probes[0].record_success()
    assert await other.state() == "closed"
    await other.before_call()
    await a.before_call()


@pytest.mark.anyio
async def test_a_failed_probe_in_one_process_reopens_for_all(
    redis_client: aioredis.Redis, second_client: aioredis.Redis, redis_prefix: str
) -> None:
    clock = FakeClock()
    a = redis_breaker(redis_client, redis_prefix, clock, failure_threshold=1, recovery_time=30)
    b = redis_breaker(second_client, redis_prefix, clock, failure_threshold=1, recovery_time=30)
    await fail_times(a, 1)
    clock.now += 30
    await b.before_call()  # b's probe
    clock.now += 1
    await b.record_failure()

    assert await a.state() == "open"
    assert await a.open_until() == T0 + 61


@pytest.mark.anyio
async def test_a_new_breaker_neither_resets_nor_extends_the_shared_state(
    redis_client: aioredis.Redis, second_client: aioredis.Redis, redis_prefix: str
) -> None:
    clock = FakeClock()
    first = redis_breaker(redis_client, redis_prefix, clock, failure_threshold=1, recovery_time=30)
    await fail_times(first, 1)
    clock.now += 10

    # A process starting now, even with other settings, joins the open period as it is.
    late = redis_breaker(second_client, redis_prefix, clock, failure_threshold=5, recovery_time=99)

    assert await late.state() == "open"
    assert await late.open_until() == T0 + 30
    with pytest.raises(CircuitOpenError) as info:
        await late.before_call()
    assert info.value.retry_at == T0 + 30
    assert await first.open_until() == T0 + 30
    clock.now = T0 + 30
    assert await late.state() == "half_open"


@pytest.mark.anyio
async def test_without_a_clock_the_open_period_is_timed_by_redis(
    redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    breaker = redis_breaker(redis_client, redis_prefix, None, failure_threshold=1, recovery_time=30)
    before = time.time()
    await fail_times(breaker, 1)
    after = time.time()

    with pytest.raises(CircuitOpenError) as info:
        await breaker.before_call()

    # Redis's clock, moved to this process's: the same machine here, so within a round trip.
    assert before + 30 - 0.5 <= info.value.retry_at <= after + 30 + 0.5
    open_until = await breaker.open_until()
    assert open_until == pytest.approx(info.value.retry_at, abs=0.5)
    assert await breaker.state() == "open"


def unreachable_client() -> aioredis.Redis:
    """A client of a port nobody listens on, failing fast."""
    return aioredis.Redis.from_url(
        f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=0.5, socket_timeout=0.5
    )


def fallback_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "hospital_bulk.backends.redis" and r.levelno == logging.WARNING
    ]


@pytest.mark.anyio
async def test_unreachable_redis_falls_back_to_a_local_breaker(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.INFO)
    # Ask Redis again at every step (instead of every few seconds): still one warning.
    monkeypatch.setattr(redis_backend, "_FALLBACK_RETRY", 0.0)
    client = unreachable_client()
    clock = FakeClock()
    breaker = redis_breaker(client, "hbtest-unreachable", clock, failure_threshold=3)
    try:
        with anyio.fail_after(10):
            assert await breaker.state() == "closed"
            await fail_times(breaker, 2)
            assert await breaker.state() == "closed"
            await breaker.before_call()
            await breaker.record_success()  # resets the local count too
            await fail_times(breaker, 2)
            assert await breaker.state() == "closed"
            await fail_times(breaker, 1)
            assert await breaker.state() == "open"
            assert await breaker.open_until() == T0 + 30
            with pytest.raises(CircuitOpenError) as info:
                await breaker.before_call()
            assert info.value.retry_at == T0 + 30
    finally:
        await client.aclose()

    warnings = fallback_warnings(caplog)
    assert len(warnings) == 1, warnings
    assert "unreachable" in warnings[0]
    assert "local breaker" in warnings[0]


@pytest.mark.anyio
async def test_the_breaker_shares_state_again_once_redis_answers(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from redis_support import RedisServer

    caplog.set_level(logging.INFO, logger="hospital_bulk.backends.redis")
    monkeypatch.setattr(redis_backend, "_FALLBACK_RETRY", 0.0)
    try:
        server = RedisServer()
    except RuntimeError as exc:
        pytest.skip(str(exc))
    client = aioredis.Redis.from_url(server.url, socket_connect_timeout=0.5, socket_timeout=0.5)
    clock = FakeClock()
    breaker = redis_breaker(client, "hbtest", clock, failure_threshold=1)
    try:
        assert await breaker.state() == "closed"  # the local breaker: nobody listens yet
        assert len(fallback_warnings(caplog)) == 1
        await anyio.to_thread.run_sync(server.start)

        await fail_times(breaker, 1)  # counted in Redis again

        witness = redis_breaker(client, "hbtest", clock, failure_threshold=1)
        assert await witness.state() == "open"
        assert any("Redis is back" in r.getMessage() for r in caplog.records)
    finally:
        await client.aclose()
        server.stop()
        shutil.rmtree(server.dir, ignore_errors=True)


@pytest.mark.anyio
async def test_a_success_in_one_process_resets_the_failures_another_counted(
    redis_client: aioredis.Redis, second_client: aioredis.Redis, redis_prefix: str
) -> None:
    # The rule of consecutive failures holds across processes: a's call, asked for before b's
    # failure, succeeds after it, and that success breaks the run of failures.
    clock = FakeClock()
    a = redis_breaker(redis_client, redis_prefix, clock, failure_threshold=2)
    b = redis_breaker(second_client, redis_prefix, clock, failure_threshold=2)
    await a.before_call()
    await fail_times(b, 1)
    await a.record_success()
    await fail_times(b, 1)

    assert await a.state() == "closed"
    assert await b.state() == "closed"
    await fail_times(a, 1)  # the second in a row now
    assert await b.state() == "open"
