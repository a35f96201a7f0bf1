"""What only the Redis backends do: their keys, large jobs, expiry, re-sent scripts, outages.

The behaviour they share with the memory backends is tested by the contract suites
(test_stores.py, test_breaker.py, test_ratelimit.py), which run over both.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Iterator

import anyio
import pytest
import redis.asyncio as aioredis
from helpers import csv_bytes
from redis_support import RedisServer, free_port

from hospital_bulk import AsyncBulkProcessor, JobStatus
from hospital_bulk._exceptions import (
    BackendError,
    ConfigurationError,
    IdempotencyConflictError,
    JobNotFoundError,
    JobStateError,
    LeaseLostError,
)
from hospital_bulk._jobs import JobRecord, JobRow, RowState
from hospital_bulk.backends import redis as redis_backend
from hospital_bulk.backends.memory import MemoryJobStore
from hospital_bulk.backends.redis import (
    RedisBackend,
    RedisCircuitBreaker,
    RedisIdempotencyStore,
    RedisJobStore,
    RedisKeys,
    RedisRateLimiter,
    connect,
)
from hospital_bulk.testing import FakeDirectory

pytestmark = pytest.mark.anyio

NAMESPACE = uuid.UUID("6ba7b810-9dad-11d1-80b4-00c04fd430c8")
RETENTION = 600.0
TTL = 3600.0
BIG = 1500  # rows: more than one script call carries, and more than one staging chunk
PASSWORD = "s3cret"


def make_job(
    job_id: str = "job-1",
    *,
    rows: int = 3,
    batch_size: int = 20,
    status: JobStatus = JobStatus.PENDING,
    **fields: object,
) -> JobRecord:
    """A job as a processor makes it, with distinct row contents (so a mix-up shows)."""
    batches = max(1, math.ceil(rows / batch_size))
    batch_ids = [uuid.uuid5(NAMESPACE, f"{job_id}/{n}") for n in range(batches)]
    job = JobRecord(
        job_id=job_id,
        status=status,
        batch_ids=batch_ids,
        rows=[
            JobRow(
                index=i,
                row=i + 1,
                line=i + 2,
                name=f"Hospital {i} «{job_id}»",
                address=f"{i} Main St",
                phone=None if i % 3 == 0 else f"555-{i:04d}",
                batch_id=batch_ids[i // batch_size],
            )
            for i in range(rows)
        ],
        fingerprint=f"sha256:{job_id}",
        created_at=time.time(),
    )
    return dataclasses.replace(job, **fields)  # type: ignore[arg-type]


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
def keys(redis_prefix: str) -> RedisKeys:
    return RedisKeys(redis_prefix)


@pytest.fixture
def store(client: aioredis.Redis, keys: RedisKeys) -> RedisJobStore:
    return RedisJobStore(client, keys=keys, retention=RETENTION)


@pytest.fixture
def idem(store: RedisJobStore) -> RedisIdempotencyStore:
    return RedisIdempotencyStore(store)


async def keys_under(client: aioredis.Redis, pattern: str) -> set[str]:
    return {key.decode() async for key in client.scan_iter(match=pattern, count=1000)}


# --- keys -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def private_redis() -> Iterator[RedisServer]:
    """A server of this module's own: every key in it was written by the test using it."""
    try:
        server = RedisServer()
        server.start()
    except RuntimeError as exc:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI must test the Redis backends: {exc}")
        pytest.skip(str(exc))
    yield server
    server.stop()
    shutil.rmtree(server.dir, ignore_errors=True)


async def test_every_key_lies_under_the_prefix_and_follows_the_templates(
    private_redis: RedisServer,
) -> None:
    client = aioredis.Redis.from_url(private_redis.url)
    keys = RedisKeys(f"hbtest-{uuid.uuid4().hex[:8]}")
    try:
        store = RedisJobStore(client, keys=keys, retention=RETENTION)
        idem = RedisIdempotencyStore(store)
        small, big = make_job("small"), make_job("big", rows=BIG)
        await store.create(small)
        await store.create(big)  # staged first, then renamed
        assert await idem.claim("key-1", "fp", make_job("claimed"), ttl=TTL) == "claimed"
        token = await store.acquire_lease("small", "worker-a", 30)
        await store.save_rows("small", [small.rows[0]], token=token)
        done = dataclasses.replace(small, status=JobStatus.COMPLETED, finished_at=time.time())
        await store.save_job(done, token=token)
        await store.release_lease("small", token)
        await store.list_ids()
        await idem.list_keys()
        limiter = RedisRateLimiter(client, keys=keys, margin=0)
        await limiter.acquire("create")
        await limiter.acquire("other", "/hospitals/batch/b1")
        await limiter.pause(60)
        breaker = RedisCircuitBreaker(client, keys=keys, failure_rate=0.5)
        await breaker.before_call()
        await breaker.record_failure()

        # Every key of the whole database: nothing was written outside the prefix.
        written = {key.decode() async for key in client.scan_iter(count=1000)}
    finally:
        await client.aclose()

    expected = {
        *(keys.job(j) for j in ("small", "big", "claimed")),
        *(keys.rows(j) for j in ("small", "big", "claimed")),
        keys.lease("small"),
        keys.jobs,
        keys.expiring,
        keys.idempotency("key-1"),
        keys.idempotency_index,
        f"{keys.rate_prefix}:create",
        f"{keys.rate_prefix}:other:/hospitals/batch/b1",
        keys.pause,
        keys.breaker("hospital_api"),
        keys.breaker_calls("hospital_api"),
        keys.breaker_steps("hospital_api"),
    }
    assert written == expected  # no staging key left behind either
    assert all(key.startswith(keys.prefix + ":") for key in written)


def test_key_templates() -> None:
    keys = RedisKeys("p")
    assert [keys.job("j"), keys.rows("j"), keys.lease("j"), keys.staging("j", "n")] == [
        "p:job:j",
        "p:job:j:rows",
        "p:job:j:lease",
        "p:job:j:staging:n",
    ]
    assert [keys.jobs, keys.expiring, keys.idempotency("k"), keys.idempotency_index] == [
        "p:jobs",
        "p:jobs:expiring",
        "p:idem:k",
        "p:idem",
    ]
    assert [
        keys.rate_prefix,
        keys.pause,
        keys.breaker("b"),
        keys.breaker_calls("b"),
        keys.breaker_steps("b"),
    ] == ["p:rate", "p:rate:pause", "p:breaker:b", "p:breaker:b:calls", "p:breaker:b:steps"]
    assert RedisKeys().prefix == "hospital_bulk"
    for bad in ("", None, 3):
        with pytest.raises(ConfigurationError, match="prefix"):
            RedisKeys(bad)  # type: ignore[arg-type]


# --- large jobs -----------------------------------------------------------------------------


async def test_a_large_job_round_trips_through_create_and_leaves_no_staging_key(
    store: RedisJobStore, client: aioredis.Redis, keys: RedisKeys
) -> None:
    assert redis_backend._INLINE_ROWS < BIG
    job = make_job("big", rows=BIG)

    await store.create(job)

    assert await store.get("big") == job
    assert await client.hlen(keys.rows("big")) == BIG
    assert await keys_under(client, f"{keys.prefix}:job:*:staging:*") == set()

    # Writing many rows at once is one script call too.
    settled = [
        dataclasses.replace(row, state=RowState.CREATED, hospital_id=row.index + 1)
        for row in job.rows
    ]
    await store.save_rows("big", settled)
    assert (await store.get("big")).rows == settled


async def test_a_large_job_round_trips_through_claim(
    store: RedisJobStore,
    idem: RedisIdempotencyStore,
    client: aioredis.Redis,
    keys: RedisKeys,
) -> None:
    job = make_job("big", rows=BIG)

    assert await idem.claim("key-1", "fp", job, ttl=TTL) == "big"
    # The same key again: the earlier job, and the new rows staged for nothing are dropped.
    assert await idem.claim("key-1", "fp", make_job("other", rows=BIG), ttl=TTL) == "big"

    assert await store.get("big") == job
    assert await store.list_ids() == ["big"]
    assert await keys_under(client, f"{keys.prefix}:job:*:staging:*") == set()
    with pytest.raises(JobNotFoundError):
        await store.get("other")


async def test_a_refused_large_job_leaves_no_staging_key(
    store: RedisJobStore, client: aioredis.Redis, keys: RedisKeys
) -> None:
    await store.create(make_job("big", rows=2))

    with pytest.raises(ConfigurationError, match="already exists"):
        await store.create(make_job("big", rows=BIG))

    assert len((await store.get("big")).rows) == 2
    assert await keys_under(client, f"{keys.prefix}:job:*:staging:*") == set()


# --- retention as Redis expiry --------------------------------------------------------------


async def ttls(client: aioredis.Redis, keys: RedisKeys, job_id: str) -> list[int]:
    return [
        await client.pttl(key) for key in (keys.job(job_id), keys.rows(job_id), keys.lease(job_id))
    ]


async def test_a_finished_job_expires_after_retention_and_a_resumed_one_is_kept(
    store: RedisJobStore, client: aioredis.Redis, keys: RedisKeys
) -> None:
    job = make_job(status=JobStatus.RUNNING)
    await store.create(job)
    token = await store.acquire_lease(job.job_id, "worker-a", 30)
    assert await ttls(client, keys, job.job_id) == [-1, -1, -1]

    finished = dataclasses.replace(job, status=JobStatus.COMPLETED, finished_at=time.time())
    await store.save_job(finished, token=token)

    for ttl in await ttls(client, keys, job.job_id):
        assert RETENTION * 1000 - 5000 < ttl <= RETENTION * 1000
    assert await client.zscore(keys.expiring, job.job_id) == pytest.approx(
        finished.finished_at + RETENTION  # type: ignore[operator]
    )

    # Resumed: kept again, whatever time passes.
    await store.save_job(dataclasses.replace(finished, status=JobStatus.RUNNING), token=token)
    assert await ttls(client, keys, job.job_id) == [-1, -1, -1]
    assert await client.zscore(keys.expiring, job.job_id) is None


async def test_a_job_stored_finished_expires_too(
    store: RedisJobStore, client: aioredis.Redis, keys: RedisKeys
) -> None:
    # A job created terminal (e.g. copied from another store) starts its retention at once.
    finished_at = time.time() - 100
    job = make_job(status=JobStatus.FAILED, finished_at=finished_at)
    await store.create(job)

    job_ttl, rows_ttl, _ = await ttls(client, keys, job.job_id)
    for ttl in (job_ttl, rows_ttl):
        assert (RETENTION - 100) * 1000 - 5000 < ttl <= (RETENTION - 100) * 1000
    # A lease taken on it (to resume it) ends with the job.
    await store.acquire_lease(job.job_id, "worker-a", 30)
    lease_ttl = (await ttls(client, keys, job.job_id))[2]
    assert (RETENTION - 100) * 1000 - 5000 < lease_ttl <= (RETENTION - 100) * 1000


async def test_infinite_retention_sets_no_expiry(client: aioredis.Redis, keys: RedisKeys) -> None:
    store = RedisJobStore(client, keys=keys, retention=math.inf)
    job = make_job(status=JobStatus.COMPLETED, finished_at=time.time())
    await store.create(job)
    await store.save_job(job)

    assert (await ttls(client, keys, job.job_id))[:2] == [-1, -1]
    assert await client.zscore(keys.expiring, job.job_id) is None


# --- scripts re-sent after a connection error ------------------------------------------------


async def test_a_resent_creation_does_not_corrupt_the_job(
    store: RedisJobStore, client: aioredis.Redis, keys: RedisKeys
) -> None:
    for job in (make_job("small"), make_job("big", rows=BIG)):
        script_keys, args = await store._creation(job)
        # redis-py sends a command again after a connection error: the first may have run.
        assert await store._create(script_keys, args) == 1
        assert await store._create(script_keys, args) == 2  # "this very creation": no error
        assert await store.get(job.job_id) == job

        # Re-sent after the job already moved on: still recognised, and nothing is undone.
        token = await store.acquire_lease(job.job_id, "worker-a", 30)
        moved = dataclasses.replace(job.rows[1], state=RowState.CREATED, hospital_id=7)
        await store.save_rows(job.job_id, [moved], token=token)
        await store.save_job(dataclasses.replace(job, status=JobStatus.RUNNING), token=token)
        assert await store._create(script_keys, args) == 2
        got = await store.get(job.job_id)
        assert got.status is JobStatus.RUNNING
        assert got.rows[1] == moved
        assert len(got.rows) == len(job.rows)
        assert (await store.lease(job.job_id)) is not None
    assert await keys_under(client, f"{keys.prefix}:job:*:staging:*") == set()
    assert await store.list_ids() == ["small", "big"]


async def test_another_creation_with_the_same_id_is_refused_even_with_the_same_fields(
    store: RedisJobStore,
) -> None:
    # Only the rows differ: a re-sent script is told apart by its creation, not by its data.
    first = make_job("job-1", rows=2)
    await store.create(first)

    with pytest.raises(ConfigurationError, match="already exists"):
        await store.create(dataclasses.replace(first, rows=make_job("job-1", rows=5).rows))
    with pytest.raises(ConfigurationError, match="already exists"):
        await store.create(first)  # the same job, created a second time: a caller's bug

    assert await store.get("job-1") == first


async def test_a_resent_claim_returns_its_job(
    store: RedisJobStore, idem: RedisIdempotencyStore, keys: RedisKeys
) -> None:
    job = make_job("job-1")
    job_keys, job_args = await store._creation(job)
    now = time.time()
    script_keys = [keys.idempotency("key-1"), keys.idempotency_index, *job_keys]
    args = ["key-1", "fp", repr(now + TTL), int(TTL * 1000), repr(now), *job_args]

    first = await idem._script(script_keys, args)
    again = await idem._script(script_keys, args)

    assert [x.decode() for x in first] == ["created", "job-1"]
    assert [x.decode() for x in again] == ["same", "job-1"]
    assert await store.get("job-1") == job
    assert await idem.list_keys() == ["key-1"]
    # Through the API: the same claim twice gives the same job.
    assert await idem.claim("key-1", "fp", job, ttl=TTL) == "job-1"
    with pytest.raises(IdempotencyConflictError):
        await idem.claim("key-1", "fp-other", job, ttl=TTL)


async def test_a_cancelled_claim_leaves_its_key_and_job_together_or_neither(
    store: RedisJobStore, idem: RedisIdempotencyStore
) -> None:
    # The counterpart of the memory store's cancelled-claim test: a claim is one script, so
    # wherever it is cancelled, the key exists exactly when its job does.
    for n, delay in enumerate([0, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.02]):
        key, job = f"key-{n}", make_job(f"job-{n}", rows=BIG)
        with anyio.move_on_after(delay):
            await idem.claim(key, "fp", job, ttl=TTL)
        claimed = key in await idem.list_keys()
        try:
            created = await store.get(job.job_id) == job
        except JobNotFoundError:
            created = False
        assert claimed == created, (delay, claimed, created)
        # And the key works either way.
        assert await idem.claim(key, "fp", make_job(f"again-{n}"), ttl=TTL) == (
            job.job_id if claimed else f"again-{n}"
        )


# --- several processes ----------------------------------------------------------------------


async def test_two_processes_see_one_job_and_one_lease(
    redis_url: str, client: aioredis.Redis, keys: RedisKeys
) -> None:
    now = [time.time()]
    clock = lambda: now[0]  # noqa: E731 - one clock for both "processes"
    store = RedisJobStore(client, keys=keys, retention=RETENTION, clock=clock)
    other_client = aioredis.Redis.from_url(redis_url)
    try:
        other = RedisJobStore(other_client, keys=keys, retention=RETENTION, clock=clock)
        job = make_job()
        await store.create(job)
        assert await other.get(job.job_id) == job

        old = await store.acquire_lease(job.job_id, "worker-a", 30)
        with pytest.raises(JobStateError, match="another worker"):
            await other.acquire_lease(job.job_id, "worker-b", 30)
        now[0] += 31  # worker-a's lease ran out
        new = await other.acquire_lease(job.job_id, "worker-b", 30)

        assert new > old
        with pytest.raises(LeaseLostError):
            await store.save_rows(job.job_id, job.rows[:1], token=old)
        lease = await store.lease(job.job_id)
        assert lease is not None
        assert (lease.owner, lease.token) == ("worker-b", new)
    finally:
        await other_client.aclose()


async def test_the_idempotency_store_needs_a_redis_job_store() -> None:
    with pytest.raises(ConfigurationError, match="RedisJobStore"):
        RedisIdempotencyStore(MemoryJobStore())  # type: ignore[arg-type]


# --- Redis unreachable ----------------------------------------------------------------------


def unreachable_url() -> str:
    return f"redis://:{PASSWORD}@127.0.0.1:{free_port()}/0"


def assert_no_password(exc: BaseException) -> None:
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    assert PASSWORD not in text
    assert PASSWORD not in repr(exc)


async def test_every_store_method_raises_backend_error_without_the_password() -> None:
    client = aioredis.Redis.from_url(
        unreachable_url(), socket_connect_timeout=0.5, socket_timeout=0.5
    )
    store = RedisJobStore(client, retention=RETENTION)
    idem = RedisIdempotencyStore(store)
    job = make_job()
    calls = {
        "create": lambda: store.create(job),
        "create (staged)": lambda: store.create(make_job("big", rows=BIG)),
        "get": lambda: store.get("job-1"),
        "save_rows": lambda: store.save_rows("job-1", job.rows),
        "save_job": lambda: store.save_job(job, token=1),
        "list_ids": store.list_ids,
        "delete": lambda: store.delete("job-1"),
        "acquire_lease": lambda: store.acquire_lease("job-1", "worker-a", 30),
        "renew_lease": lambda: store.renew_lease("job-1", 1, 30),
        "release_lease": lambda: store.release_lease("job-1", 1),
        "lease": lambda: store.lease("job-1"),
        "claim": lambda: idem.claim("key-1", "fp", job, ttl=TTL),
        "list_keys": idem.list_keys,
    }
    try:
        with anyio.fail_after(10):
            for name, call in calls.items():
                with pytest.raises(BackendError, match="unreachable") as caught:
                    await call()
                assert "127.0.0.1" in str(caught.value), name
                assert_no_password(caught.value)
    finally:
        await client.aclose()


async def test_connect_retries_then_raises_backend_error_without_the_password() -> None:
    client = connect(unreachable_url())
    try:
        with anyio.fail_after(10), pytest.raises(BackendError) as caught:
            await RedisJobStore(client).get("job-1")
    finally:
        await client.aclose()
    assert_no_password(caught.value)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:6379/0",
        "127.0.0.1:6379",
        "",
        "redis://127.0.0.1:notaport/0",
        f"redis://:{PASSWORD}@127.0.0.1:notaport/0",
        "redis://127.0.0.1:6379/zero",  # redis-py would read it as database 0
        "redis://127.0.0.1:6379/0?socket_timeout=soon",
    ],
)
def test_connect_refuses_a_bad_url(url: str) -> None:
    with pytest.raises(ConfigurationError, match="Redis URL") as caught:
        connect(url)
    assert PASSWORD not in str(caught.value)


def test_connect_takes_a_client_or_a_pool() -> None:
    client = aioredis.Redis(port=free_port())
    assert connect(client) is client
    pool = aioredis.ConnectionPool(port=free_port())
    assert connect(pool).connection_pool is pool
    with pytest.raises(ConfigurationError, match="URL, a client or a connection pool"):
        connect(42)  # type: ignore[arg-type]


async def test_backend_ping(redis_url: str) -> None:
    down = RedisBackend(unreachable_url())
    up = RedisBackend(redis_url)
    try:
        with anyio.fail_after(10):
            assert await down.ping() is False
        assert await up.ping() is True
    finally:
        await down.aclose()
        await up.aclose()


async def test_a_backend_on_a_callers_client_leaves_it_open(redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    try:
        backend = RedisBackend(client, prefix="hbtest-owned")
        assert backend.client is client
        assert backend.owns(backend.job_store())
        assert not backend.owns(MemoryJobStore())
        await backend.aclose()
        assert await client.ping() is True  # still usable: the caller closes it
    finally:
        await client.aclose()


# --- the processor on Redis -----------------------------------------------------------------


def processor(fake: FakeDirectory, backend: str, prefix: str) -> AsyncBulkProcessor:
    return AsyncBulkProcessor(
        "http://fake",
        backend=backend,
        redis_prefix=prefix,
        transport=fake.transport(),
        create_rate="1000/minute",
        other_rate="1000/minute",
        reconcile_after=0.01,
    )


async def test_a_processor_on_redis_completes_a_job_another_one_reads(
    redis_url: str, redis_prefix: str
) -> None:
    fake = FakeDirectory(create_rate=None, other_rate=None)
    async with processor(fake, redis_url, redis_prefix) as first:
        result = await first.process(csv_bytes(25))
        health = await first.health()

    assert result.status is JobStatus.COMPLETED
    assert (result.total_hospitals, result.processed_hospitals) == (25, 25)
    assert len(fake.hospitals) == 25
    assert fake.duplicates() == []
    assert health["backend"] == "redis"
    assert health["backend_reachable"] is True
    assert health["upstream"] is True

    # Another processor (another process) on the same Redis and prefix.
    async with processor(fake, redis_url, redis_prefix) as second:
        snapshot = await second.status(result.job_id)
        again = await second.result(result.job_id)
    assert snapshot.status is JobStatus.COMPLETED
    assert again == result

    # Another prefix shares nothing.
    async with processor(fake, redis_url, f"{redis_prefix}-other") as stranger:
        with pytest.raises(JobNotFoundError):
            await stranger.status(result.job_id)


async def test_processor_health_reports_an_unreachable_backend() -> None:
    fake = FakeDirectory(create_rate=None, other_rate=None)
    async with processor(fake, unreachable_url(), "hbtest-down") as p:
        with anyio.fail_after(10):
            health = await p.health()
    assert health["backend"] == "redis"
    assert health["backend_reachable"] is False
    assert health["upstream"] is True


async def test_a_resent_breaker_step_is_applied_once(
    client: aioredis.Redis, keys: RedisKeys
) -> None:
    now = [1_000.0]
    breaker = RedisCircuitBreaker(
        client, keys=keys, failure_threshold=2, recovery_time=10, clock=lambda: now[0]
    )
    script, script_keys = breaker._script, breaker._redis_keys

    async def step(op: str, nonce: str) -> list[object]:
        return list(await script(script_keys, [op, repr(now[0]), *breaker._args, nonce]))

    # A failure re-sent by the client (same nonce) counts once: the breaker stays closed.
    await step("failure", "n1")
    await step("failure", "n1")
    assert await breaker.state() == "closed"
    await step("failure", "n2")
    assert await breaker.state() == "open"

    # In half open, a re-sent probe request keeps its grant; a new caller is refused.
    now[0] += 10
    granted = await step("before", "p1")
    assert granted[1] in (b"", "")
    again = await step("before", "p1")
    assert again[1] in (b"", "")
    other = await step("before", "p2")
    assert other[1] not in (b"", "")


async def test_the_limiter_keeps_no_lock_for_a_budget_nobody_waits_for(
    client: aioredis.Redis, keys: RedisKeys
) -> None:
    limiter = RedisRateLimiter(client, keys=keys, other_rate="1000/minute", margin=0)
    for n in range(20):
        await limiter.acquire("other", f"/hospitals/batch/{n}")
    assert limiter._queues == {}


async def test_creating_and_claiming_drop_index_entries_of_expired_jobs_and_keys(
    client: aioredis.Redis, keys: RedisKeys
) -> None:
    now = [1_000_000.0]
    store = RedisJobStore(client, keys=keys, retention=60, clock=lambda: now[0])
    idem = RedisIdempotencyStore(store, clock=lambda: now[0])
    finished = make_job("old", status=JobStatus.COMPLETED, finished_at=now[0])
    await store.create(finished)
    await idem.claim("old-key", "fp", make_job("old-claimed"), ttl=60)
    assert await client.zcard(keys.jobs) == 2
    now[0] += 120  # past the retention of "old" and the key's time to live
    await idem.claim("new-key", "fp", make_job("new"), ttl=60)
    assert await client.zrange(keys.idempotency_index, 0, -1) == [b"new-key"]
    assert set(await client.zrange(keys.jobs, 0, -1)) == {b"old-claimed", b"new"}
    assert await client.zrange(keys.expiring, 0, -1) == []
