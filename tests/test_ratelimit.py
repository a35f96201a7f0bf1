"""Tests of `parse_rate` and the rate limiters.

`MemoryRateLimiter` runs on a fake clock (nothing sleeps for real). `RedisRateLimiter` keeps
its windows in `limits`' Redis storage, which reads the wall clock, so its tests (at the end)
wait for real, on windows of one second.
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator

import anyio
import anyio.lowlevel
import limits
import pytest
import redis.asyncio as aioredis
from helpers import max_in_any_window
from redis.exceptions import RedisError
from redis_support import free_port

from hospital_bulk._exceptions import BackendError, ConfigurationError
from hospital_bulk._ratelimit import MemoryRateLimiter, parse_rate
from hospital_bulk.backends.redis import RedisKeys, RedisRateLimiter
from hospital_bulk.protocols import RateLimiter

T0 = 1_700_000_000.123


class FakeClock:
    """A clock whose `sleep` advances `now` instead of waiting."""

    def __init__(self, now: float = T0) -> None:
        self.now = now
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, dt: float) -> None:
        self.sleeps.append(dt)
        self.now += dt
        await anyio.lowlevel.checkpoint()


def limiter_on(clock: FakeClock, **kwargs: object) -> MemoryRateLimiter:
    return MemoryRateLimiter(clock=clock, sleep=clock.sleep, **kwargs)  # type: ignore[arg-type]


# --- parse_rate -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "amount", "seconds"),
    [
        ("30/minute", 30, 60),
        ("30 per minute", 30, 60),
        ("10/6 seconds", 10, 6),
        ("10 per 6 seconds", 10, 6),
        ("50/minutes", 50, 60),
        ("100 per 1 hour", 100, 3600),
    ],
)
def test_parse_rate_accepts_limits_notation(text: str, amount: int, seconds: int) -> None:
    item = parse_rate(text)
    assert isinstance(item, limits.RateLimitItem)
    assert (item.amount, item.get_expiry()) == (amount, seconds)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "cannot read"),
        ("thirty a minute", "cannot read"),
        ("30/fortnight", "cannot read"),
        ("-1/minute", "cannot read"),
        ("1.5/minute", "cannot read"),
        ("0/minute", "at least one request"),
        ("10/0 seconds", "zero length"),
        ("10 per 0 seconds", "zero length"),
        ("1/second;30/minute", "names 2 rates"),
    ],
)
def test_parse_rate_rejects_with_a_clear_message(text: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        parse_rate(text)


def test_parse_rate_rejects_non_strings() -> None:
    with pytest.raises(ConfigurationError, match="must be a string"):
        parse_rate(30)  # type: ignore[arg-type]


# --- construction ---------------------------------------------------------------------------


def test_defaults_and_properties() -> None:
    limiter = MemoryRateLimiter()
    assert isinstance(limiter, RateLimiter)
    assert (limiter.create_rate.amount, limiter.create_rate.get_expiry()) == (30, 60)
    assert (limiter.other_rate.amount, limiter.other_rate.get_expiry()) == (50, 60)
    assert limiter.margin == 1.0
    assert limiter.create_window == 61.0
    assert limiter.other_window == 61.0


def test_accepts_rate_items_and_zero_margin() -> None:
    limiter = MemoryRateLimiter(limits.RateLimitItemPerSecond(5, 2), "3/minute", margin=0)
    assert limiter.create_window == 2.0
    assert limiter.other_window == 60.0


@pytest.mark.parametrize("margin", [-0.1, math.nan, math.inf, "1", True])
def test_rejects_bad_margin(margin: object) -> None:
    with pytest.raises(ConfigurationError, match="margin"):
        MemoryRateLimiter(margin=margin)  # type: ignore[arg-type]


def test_bad_rate_names_its_setting() -> None:
    with pytest.raises(ConfigurationError, match="other_rate"):
        MemoryRateLimiter(other_rate="lots")
    with pytest.raises(ConfigurationError, match="create_rate"):
        MemoryRateLimiter(create_rate=limits.RateLimitItemPerMinute(0))


@pytest.mark.anyio
async def test_unknown_kind_is_a_configuration_error() -> None:
    limiter = MemoryRateLimiter()
    with pytest.raises(ConfigurationError, match="kind"):
        await limiter.acquire("delete")  # type: ignore[arg-type]


# --- the moving window ----------------------------------------------------------------------


@pytest.mark.anyio
async def test_the_31st_create_waits_exactly_until_the_first_leaves_the_window() -> None:
    clock = FakeClock()
    limiter = limiter_on(clock)
    for _ in range(30):
        await limiter.acquire("create")
    assert clock.sleeps == []
    assert await limiter.wait_time("create") == pytest.approx(61.0)

    await limiter.acquire("create")
    assert clock.sleeps == [pytest.approx(61.0)]  # one exact sleep, no polling
    assert clock.now == pytest.approx(T0 + 61.0)


@pytest.mark.anyio
async def test_window_is_moving_not_fixed() -> None:
    clock = FakeClock()
    limiter = limiter_on(clock, create_rate="3/10 seconds", margin=0)
    departures = []
    for gap in (0.0, 4.0, 4.0, 0.0, 0.0, 0.0):
        clock.now += gap
        await limiter.acquire("create")
        departures.append(round(clock.now - T0, 6))
    # 0, 4, 8 fill the window; then each next one waits for the oldest to leave.
    assert departures == [0.0, 4.0, 8.0, 10.0, 14.0, 18.0]


@pytest.mark.anyio
async def test_margin_widens_the_window() -> None:
    clock = FakeClock()
    limiter = limiter_on(clock, create_rate="2/10 seconds", margin=2.5)
    for _ in range(3):
        await limiter.acquire("create")
    assert clock.now - T0 == pytest.approx(12.5)


@pytest.mark.anyio
async def test_creates_share_one_budget_whatever_the_path() -> None:
    clock = FakeClock()
    limiter = limiter_on(clock, create_rate="2/minute", margin=0)
    await limiter.acquire("create", "/hospitals/")
    await limiter.acquire("create", "/elsewhere")
    assert await limiter.wait_time("create", "/third") == pytest.approx(60.0)


@pytest.mark.anyio
async def test_each_other_path_has_its_own_budget() -> None:
    clock = FakeClock()
    limiter = limiter_on(clock, create_rate="1/minute", other_rate="2/minute", margin=0)
    path = "/hospitals/batch/b1"
    await limiter.acquire("other", path)
    await limiter.acquire("other", path)
    assert await limiter.wait_time("other", path) == pytest.approx(60.0)
    assert await limiter.wait_time("other", "/hospitals/batch/b2") == 0.0
    assert await limiter.wait_time("create") == 0.0  # creates are not touched
    await limiter.acquire("other", "/hospitals/batch/b2")
    assert clock.sleeps == []


@pytest.mark.anyio
async def test_wait_time_counts_nothing() -> None:
    clock = FakeClock()
    limiter = limiter_on(clock, create_rate="1/minute", margin=0)
    for _ in range(5):
        assert await limiter.wait_time("create") == 0.0
    await limiter.acquire("create")
    assert clock.sleeps == []


@pytest.mark.anyio
async def test_idle_path_budgets_are_forgotten() -> None:
    clock = FakeClock()
    limiter = limiter_on(clock, margin=0)
    for i in range(100):
        await limiter.acquire("other", f"/hospitals/batch/{i}")
    clock.now += 61
    await limiter.acquire("other", "/hospitals/batch/new")
    assert list(limiter._budgets) == ["other:/hospitals/batch/new"]


@pytest.mark.anyio
async def test_a_clock_stepping_back_cannot_free_the_budget_early() -> None:
    clock = FakeClock()
    limiter = limiter_on(clock, create_rate="2/10 seconds", margin=0)
    await limiter.acquire("create")
    clock.now -= 5  # e.g. an NTP step of the wall clock
    await limiter.acquire("create")
    clock.now += 5
    # The second departure counts from T0 (the later of the two readings), not T0 - 5.
    assert await limiter.wait_time("create") == pytest.approx(10.0)


# --- pauses ---------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_pause_delays_every_kind_and_never_shortens() -> None:
    clock = FakeClock()
    limiter = limiter_on(clock)
    assert await limiter.paused_until() is None

    await limiter.pause(10)
    await limiter.pause(5)  # shorter: ignored
    assert await limiter.paused_until() == pytest.approx(T0 + 10)
    assert await limiter.wait_time("other", "/") == pytest.approx(10)

    await limiter.acquire("create")
    assert clock.now == pytest.approx(T0 + 10)
    assert await limiter.paused_until() is None
    await limiter.acquire("other", "/")
    assert clock.sleeps == [pytest.approx(10)]


@pytest.mark.anyio
async def test_a_pause_set_while_waiting_extends_the_wait() -> None:
    clock = FakeClock()
    limiter = limiter_on(clock, create_rate="1/10 seconds", margin=0)
    await limiter.acquire("create")

    async def pausing_sleep(dt: float) -> None:
        if not clock.sleeps:  # a 429 arrives while the first wait is under way
            await limiter.pause(30)
        await clock.sleep(dt)

    limiter._sleep = pausing_sleep
    await limiter.acquire("create")
    assert clock.now == pytest.approx(T0 + 30)
    assert clock.sleeps == [pytest.approx(10), pytest.approx(20)]


@pytest.mark.anyio
@pytest.mark.parametrize("seconds", [-1, math.nan, math.inf])
async def test_pause_rejects_bad_seconds(seconds: float) -> None:
    limiter = MemoryRateLimiter()
    with pytest.raises(ConfigurationError, match="pause"):
        await limiter.pause(seconds)


# --- concurrency and cancellation -----------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("margin", [0.0, 0.5])
async def test_fifty_concurrent_acquirers_never_exceed_the_budget(margin: float) -> None:
    clock = FakeClock()
    limiter = limiter_on(clock, create_rate="10/minute", margin=margin)
    returned: list[tuple[int, float]] = []

    async def one(i: int) -> None:
        await limiter.acquire("create")
        returned.append((i, clock.now))

    async with anyio.create_task_group() as tg:
        for i in range(50):
            tg.start_soon(one, i)

    times = [t for _, t in returned]
    assert len(times) == 50
    assert max_in_any_window(times, 60.0) == 10
    assert max_in_any_window(times, 60.0 + margin) == 10
    # As fast as the budget allows: five rounds of ten, one window apart, served in order.
    assert max(times) - T0 == pytest.approx(4 * (60.0 + margin), abs=0.01)
    assert [i for i, _ in returned] == list(range(50))


@pytest.mark.anyio
async def test_a_cancelled_wait_counts_nothing_and_frees_the_queue() -> None:
    clock = FakeClock()
    waiting = anyio.Event()

    async def stuck_sleep(dt: float) -> None:
        waiting.set()
        await anyio.sleep_forever()

    limiter = MemoryRateLimiter("2/minute", margin=0, clock=clock, sleep=stuck_sleep)
    await limiter.acquire("create")
    await limiter.acquire("create")

    with anyio.fail_after(1):  # guards against a hang only
        async with anyio.create_task_group() as tg:
            tg.start_soon(limiter.acquire, "create")
            tg.start_soon(limiter.acquire, "create")
            await waiting.wait()
            tg.cancel_scope.cancel()

    clock.now += 60  # both earlier departures leave the window
    limiter._sleep = clock.sleep
    await limiter.acquire("create")
    await limiter.acquire("create")  # two fit: the cancelled waiters took no slot
    assert clock.sleeps == []
    assert await limiter.wait_time("create") == pytest.approx(60.0)


# --- Redis: one budget for every process (real time: `limits` reads the wall clock) ---------


@pytest.fixture
async def redis_clients(redis_url: str) -> AsyncIterator[tuple[aioredis.Redis, aioredis.Redis]]:
    """Two clients of the tests' database: two processes, as far as Redis can tell."""
    first = aioredis.Redis.from_url(redis_url)
    second = aioredis.Redis.from_url(redis_url)
    yield first, second
    await first.aclose()
    await second.aclose()


def redis_limiter(client: aioredis.Redis, prefix: str, **kwargs: object) -> RedisRateLimiter:
    return RedisRateLimiter(client, keys=RedisKeys(prefix), **kwargs)  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_redis_limiters_share_one_budget(
    redis_clients: tuple[aioredis.Redis, aioredis.Redis], redis_prefix: str
) -> None:
    a, b = (
        redis_limiter(client, redis_prefix, create_rate="3/1 second", margin=0)
        for client in redis_clients
    )
    assert isinstance(a, RateLimiter)
    times: list[float] = []

    async def send(limiter: RedisRateLimiter) -> None:
        await limiter.acquire("create")
        times.append(time.time())

    start = time.time()
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            for limiter in (a, b, a, b, a, b):
                tg.start_soon(send, limiter)

    assert len(times) == 6
    # Three went at once, the other three one window later: the two share one budget.
    assert max(times) - start >= 0.95
    # `limits` stamps an acquire just before it returns here: allow that moment of slack.
    assert max_in_any_window(times, 1.0 - 0.02) == 3


@pytest.mark.anyio
async def test_a_process_reads_the_shared_pause_at_most_once_per_interval_while_there_is_none(
    redis_clients: tuple[aioredis.Redis, aioredis.Redis], redis_prefix: str
) -> None:
    a = redis_limiter(redis_clients[0], redis_prefix, margin=0)
    b = redis_limiter(redis_clients[1], redis_prefix, margin=0, pause_check_interval=0.3)
    reads = 0
    pttl = redis_clients[1].pttl

    async def counting_pttl(*args: object, **kwargs: object) -> int:
        nonlocal reads
        reads += 1
        return await pttl(*args, **kwargs)  # type: ignore[arg-type]

    redis_clients[1].pttl = counting_pttl  # type: ignore[method-assign]
    for _ in range(10):
        await b.acquire("other", "/hospitals/")
    assert reads == 1

    # A pause set elsewhere holds b once its last read is older than the interval.
    await anyio.sleep(0.3)
    start = time.time()
    await a.pause(0.6)
    with anyio.fail_after(5):
        await b.acquire("other", "/hospitals/")
    assert time.time() - start >= 0.55
    # A pause b sets itself holds it at once.
    reads = 0
    await b.acquire("other", "/hospitals/")
    await b.pause(0.4)
    start = time.time()
    await b.acquire("other", "/hospitals/")
    assert time.time() - start >= 0.35
    assert reads >= 2


@pytest.mark.anyio
async def test_redis_limiter_rejects_a_bad_pause_check_interval(
    redis_clients: tuple[aioredis.Redis, aioredis.Redis], redis_prefix: str
) -> None:
    with pytest.raises(ConfigurationError, match="pause_check_interval"):
        redis_limiter(redis_clients[0], redis_prefix, pause_check_interval=-1)


@pytest.mark.anyio
async def test_a_redis_pause_holds_every_process_and_never_shortens(
    redis_clients: tuple[aioredis.Redis, aioredis.Redis], redis_prefix: str
) -> None:
    a, b = (redis_limiter(client, redis_prefix, margin=0) for client in redis_clients)
    assert await a.paused_until() is None
    await a.pause(0)  # nothing to pause
    assert await b.paused_until() is None

    start = time.time()
    await a.pause(0.6)
    await b.pause(0.1)  # shorter: ignored
    for limiter in (a, b):
        until = await limiter.paused_until()
        assert until is not None
        assert until == pytest.approx(start + 0.6, abs=0.1)

    waits: list[float] = []
    with anyio.fail_after(5):
        await b.acquire("other", "/hospitals/", on_wait=waits.append)
    assert time.time() - start >= 0.55
    assert waits
    assert waits[0] == pytest.approx(start + 0.6, abs=0.1)
    assert await a.paused_until() is None


@pytest.mark.anyio
async def test_redis_paths_have_their_own_budgets_and_on_wait_sees_the_wait_end(
    redis_clients: tuple[aioredis.Redis, aioredis.Redis], redis_prefix: str
) -> None:
    limiter = redis_limiter(
        redis_clients[0], redis_prefix, create_rate="1/1 second", other_rate="1/1 second", margin=0
    )
    waits: list[tuple[float, float]] = []

    def on_wait(until: float) -> None:
        waits.append((time.time(), until))

    first = time.time()
    await limiter.acquire("other", "/a", on_wait=on_wait)
    await limiter.acquire("other", "/b", on_wait=on_wait)  # another path: no wait
    await limiter.acquire("create", on_wait=on_wait)  # creates: a budget of their own
    assert waits == []

    with anyio.fail_after(5):
        await limiter.acquire("other", "/a", on_wait=on_wait)
    done = time.time()

    assert waits, "the second acquire of /a waited without telling on_wait"
    called, until = waits[0]
    assert until > called  # a time in the future
    assert until == pytest.approx(first + 1.0, abs=0.1)
    assert done >= until - 0.01
    assert done - first >= 0.95


def test_redis_window_rounds_the_margin_up_to_whole_seconds() -> None:
    client = aioredis.Redis(port=free_port())  # never connects: constructing sends nothing
    assert redis_limiter(client, "p", create_rate="3/1 second", margin=0.5).create_window == 2
    assert redis_limiter(client, "p", create_rate="3/1 second", margin=0).create_window == 1
    limiter = redis_limiter(client, "p", create_rate="3/1 second", other_rate="50/minute")
    assert (limiter.create_window, limiter.other_window) == (2, 61)


@pytest.mark.parametrize("margin", [-0.1, math.nan, math.inf, "1", True])
def test_redis_limiter_rejects_bad_margin(margin: object) -> None:
    with pytest.raises(ConfigurationError, match="margin"):
        redis_limiter(aioredis.Redis(port=free_port()), "p", margin=margin)


def test_redis_limiter_rejects_bad_rates() -> None:
    client = aioredis.Redis(port=free_port())
    with pytest.raises(ConfigurationError, match="other_rate"):
        redis_limiter(client, "p", other_rate="lots")
    with pytest.raises(ConfigurationError, match="create_rate"):
        redis_limiter(client, "p", create_rate=limits.RateLimitItemPerMinute(0))


@pytest.mark.anyio
async def test_redis_limiter_rejects_a_bad_kind_and_bad_pauses(
    redis_clients: tuple[aioredis.Redis, aioredis.Redis], redis_prefix: str
) -> None:
    limiter = redis_limiter(redis_clients[0], redis_prefix)
    with pytest.raises(ConfigurationError, match="kind"):
        await limiter.acquire("delete")  # type: ignore[arg-type]
    for seconds in (-1, math.nan, math.inf, "1", True):
        with pytest.raises(ConfigurationError, match="pause"):
            await limiter.pause(seconds)  # type: ignore[arg-type]
    assert await limiter.paused_until() is None


@pytest.mark.anyio
async def test_unreachable_redis_is_a_backend_error_quickly() -> None:
    client = aioredis.Redis.from_url(
        f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=0.5, socket_timeout=0.5
    )
    limiter = redis_limiter(client, "hbtest-unreachable", margin=0)
    try:
        with anyio.fail_after(3):
            with pytest.raises(BackendError, match="unreachable") as caught:
                await limiter.acquire("create")
            assert not isinstance(caught.value, RedisError)
            with pytest.raises(BackendError, match="unreachable"):
                await limiter.acquire("other", "/hospitals/")
            with pytest.raises(BackendError, match="unreachable"):
                await limiter.pause(1)
            with pytest.raises(BackendError, match="unreachable"):
                await limiter.paused_until()
    finally:
        await client.aclose()
