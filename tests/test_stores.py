"""Contract tests of the job and idempotency stores, parametrised over backends.

Every test here speaks to the stores through the Protocols (`JobStore`, `IdempotencyStore`)
plus the housekeeping methods every backend provides (`list_ids`, `delete`, `list_keys`), via the
`job_store` / `idempotency_store` fixtures. A new backend plugs in by adding its name to
`BACKENDS` and a branch to `make_job_store` / `make_idempotency_store`. The Redis runs use the
tests' real Redis (`redis_url`) with a key prefix of their own, on the same fake clock; the
memory runs never touch Redis. Memory only: the tests that wrap the job store in a custom one
(`GatedJobStore`, `FailingJobStore`; see `memory_job_store`), and the tests at the end that
look inside `MemoryJobStore` / `MemoryIdempotencyStore`.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING, Protocol

import anyio
import anyio.lowlevel
import pytest

from hospital_bulk._exceptions import (
    ConfigurationError,
    HospitalBulkError,
    IdempotencyConflictError,
    IdempotencyError,
    IdempotencyInProgressError,
    JobNotFoundError,
    JobStateError,
    LeaseLostError,
)
from hospital_bulk._jobs import JobRecord, JobRow, JobStatus, RowState
from hospital_bulk.backends.memory import MemoryIdempotencyStore, MemoryJobStore
from hospital_bulk.protocols import IdempotencyStore, JobStore

if TYPE_CHECKING:
    import redis.asyncio as aioredis

pytestmark = pytest.mark.anyio

BACKENDS = ["memory", "redis"]

START = 1_750_000_000.0
RETENTION = 3600.0
TTL = 86_400.0
NAMESPACE = uuid.UUID("6ba7b810-9dad-11d1-80b4-00c04fd430c8")

TERMINAL = [s for s in JobStatus if s.terminal]
NOT_TERMINAL = [s for s in JobStatus if not s.terminal]


class FakeClock:
    """A clock the tests move by hand."""

    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class HousekeptJobStore(JobStore, Protocol):
    """A job store with the housekeeping methods every backend provides."""

    async def list_ids(self) -> list[str]: ...

    async def delete(self, job_id: str) -> None: ...


class HousekeptIdempotencyStore(IdempotencyStore, Protocol):
    """An idempotency store that can list its keys."""

    async def list_keys(self) -> list[str]: ...


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """A client of the tests' Redis database, closed after the test."""
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
def make_job_store(
    backend: str, clock: FakeClock, request: pytest.FixtureRequest
) -> Callable[..., HousekeptJobStore]:
    # Redis is only asked for when the Redis backend runs: memory runs never need a server.
    if backend == "redis":
        from hospital_bulk.backends.redis import RedisJobStore, RedisKeys

        client = request.getfixturevalue("redis_client")
        keys = RedisKeys(request.getfixturevalue("redis_prefix"))

    def make(*, retention: float = RETENTION) -> HousekeptJobStore:
        if backend == "memory":
            return MemoryJobStore(retention=retention, clock=clock)
        if backend == "redis":
            return RedisJobStore(client, keys=keys, retention=retention, clock=clock)
        raise AssertionError(f"unknown backend {backend!r}")

    return make


@pytest.fixture
def job_store(make_job_store: Callable[..., HousekeptJobStore]) -> HousekeptJobStore:
    return make_job_store()


@pytest.fixture
def make_idempotency_store(
    backend: str, clock: FakeClock
) -> Callable[[JobStore], HousekeptIdempotencyStore]:
    def make(jobs: JobStore) -> HousekeptIdempotencyStore:
        if backend == "memory":
            return MemoryIdempotencyStore(jobs, clock=clock)
        if backend == "redis":
            from hospital_bulk.backends.redis import RedisIdempotencyStore, RedisJobStore

            assert isinstance(jobs, RedisJobStore)
            return RedisIdempotencyStore(jobs, clock=clock)
        raise AssertionError(f"unknown backend {backend!r}")

    return make


@pytest.fixture
def memory_job_store(clock: FakeClock) -> MemoryJobStore:
    """For the tests that wrap the job store in a custom one (`GatedJobStore`,
    `FailingJobStore`): only `MemoryIdempotencyStore` creates its jobs in any `JobStore`
    (`RedisIdempotencyStore` creates them inside its claiming script), so those tests are
    for the memory backend only. Their Redis counterparts are in test_redis_backend.py.
    """
    return MemoryJobStore(retention=RETENTION, clock=clock)


@pytest.fixture
def idempotency_store(
    make_idempotency_store: Callable[[JobStore], HousekeptIdempotencyStore],
    job_store: HousekeptJobStore,
) -> HousekeptIdempotencyStore:
    return make_idempotency_store(job_store)


def make_job(
    job_id: str = "job-1",
    *,
    rows: int = 45,
    batch_size: int = 20,
    status: JobStatus = JobStatus.PENDING,
    **fields: object,
) -> JobRecord:
    """A job as a processor would create it: rows split into batches with UUID batch ids."""
    batches = max(1, math.ceil(rows / batch_size))
    batch_ids = [uuid.uuid5(NAMESPACE, f"{job_id}/{n}") for n in range(batches)]
    job_rows = [
        JobRow(
            index=i,
            row=i + 1,
            line=i + 2,
            name=f"Hospital {i}",
            address=f"{i} Main St",
            phone=None if i % 3 == 0 else f"555-{i:04d}",
            batch_id=batch_ids[i // batch_size],
        )
        for i in range(rows)
    ]
    job = JobRecord(
        job_id=job_id,
        status=status,
        batch_ids=batch_ids,
        rows=job_rows,
        fingerprint=f"sha256:{job_id}",
        created_at=START,
    )
    return dataclasses.replace(job, **fields)  # type: ignore[arg-type]


def full_job(job_id: str = "job-full") -> JobRecord:
    """A job with every field, and every row field, set to something other than its default."""
    job = make_job(
        job_id,
        status=JobStatus.PARTIALLY_FAILED,
        started_at=START + 1.5,
        finished_at=START + 95.25,
        idempotency_key="key-123",
        error="2 rows were rejected",
        options={"activate_partial": False, "batch_size": 20, "tags": ["north", {"x": 1}]},
        processing_seconds=93.75,
    )
    job.activated_batches = [job.batch_ids[0]]
    states = list(RowState)
    for row in job.rows:
        row.state = states[row.index % len(states)]
        row.hospital_id = 1000 + row.index
        row.error = f"problem {row.index}"
        row.attempts = row.index % 4 + 1
    return job


class GatedJobStore:
    """Wraps a job store and counts creates.

    With a gate, the first `create` waits for it before creating; without one, every `create`
    yields to the event loop once before creating.
    """

    def __init__(self, inner: JobStore, *, gate: anyio.Event | None = None) -> None:
        self.inner = inner
        self.gate = gate
        self.entered = anyio.Event()
        self.creates = 0

    async def create(self, job: JobRecord) -> None:
        self.creates += 1
        if self.gate is None:
            await anyio.lowlevel.checkpoint()
        elif self.creates == 1:
            self.entered.set()
            await self.gate.wait()
        await self.inner.create(job)

    async def get(self, job_id: str) -> JobRecord:
        return await self.inner.get(job_id)

    async def save_rows(self, job_id: str, rows: Sequence[JobRow]) -> None:
        await self.inner.save_rows(job_id, rows)

    async def save_job(self, job: JobRecord) -> None:
        await self.inner.save_job(job)


class FailingJobStore(GatedJobStore):
    """A job store whose `create` fails without storing anything."""

    async def create(self, job: JobRecord) -> None:
        self.creates += 1
        raise RuntimeError("the job store is down")


# --- the job store ----------------------------------------------------------------------------


async def test_stores_satisfy_the_protocols(
    job_store: HousekeptJobStore, idempotency_store: HousekeptIdempotencyStore
) -> None:
    assert isinstance(job_store, JobStore)
    assert isinstance(idempotency_store, IdempotencyStore)


async def test_create_then_get_round_trips_every_field(job_store: HousekeptJobStore) -> None:
    job = full_job()
    expected = copy.deepcopy(job.to_dict())

    await job_store.create(job)
    got = await job_store.get(job.job_id)

    assert got == job
    assert got.to_dict() == expected
    assert got is not job
    assert all(isinstance(b, uuid.UUID) for b in got.batch_ids)
    assert [r.index for r in got.rows] == list(range(45))
    assert {r.state for r in got.rows} == set(RowState)


async def test_create_keeps_a_copy(job_store: HousekeptJobStore) -> None:
    job = full_job()
    expected = copy.deepcopy(job.to_dict())
    await job_store.create(job)

    job.status = JobStatus.RUNNING
    job.rows[0].state = RowState.UNKNOWN
    job.rows.append(dataclasses.replace(job.rows[0], index=45))
    job.batch_ids.append(uuid.uuid4())
    job.activated_batches.clear()
    job.options["tags"][1]["x"] = 2

    assert (await job_store.get(job.job_id)).to_dict() == expected


async def test_get_returns_independent_copies(job_store: HousekeptJobStore) -> None:
    job = full_job()
    expected = copy.deepcopy(job.to_dict())
    await job_store.create(job)

    first = await job_store.get(job.job_id)
    second = await job_store.get(job.job_id)
    assert first is not second
    assert first.rows[0] is not second.rows[0]

    first.status = JobStatus.FAILED
    first.rows[3].hospital_id = None
    first.rows[4] = dataclasses.replace(first.rows[4], name="changed")
    del first.rows[10:]
    first.batch_ids.clear()
    first.activated_batches.append(uuid.uuid4())
    first.options["tags"][1]["x"] = 99
    first.options["new"] = True

    assert second.to_dict() == expected
    assert (await job_store.get(job.job_id)).to_dict() == expected


async def test_create_with_an_existing_id_is_refused(job_store: HousekeptJobStore) -> None:
    await job_store.create(make_job("job-1", rows=3))

    with pytest.raises(ConfigurationError, match="already exists"):
        await job_store.create(make_job("job-1", rows=5, status=JobStatus.RUNNING))

    kept = await job_store.get("job-1")
    assert len(kept.rows) == 3
    assert kept.status is JobStatus.PENDING


async def test_create_refuses_rows_whose_index_is_not_their_position(
    job_store: HousekeptJobStore,
) -> None:
    job = make_job(rows=4)
    job.rows[2].index = 7

    with pytest.raises(ConfigurationError, match="index"):
        await job_store.create(job)

    with pytest.raises(JobNotFoundError):
        await job_store.get(job.job_id)


async def test_a_job_without_rows_round_trips(job_store: HousekeptJobStore) -> None:
    job = make_job("empty", rows=0)
    await job_store.create(job)

    got = await job_store.get("empty")

    assert got.rows == []
    assert got == job


async def test_save_rows_replaces_rows_by_index(job_store: HousekeptJobStore) -> None:
    job = make_job(rows=45)
    await job_store.create(job)

    late = dataclasses.replace(job.rows[40], state=RowState.CREATED, hospital_id=7040, attempts=1)
    early = dataclasses.replace(
        job.rows[3], state=RowState.REJECTED, error="422: phone is invalid", attempts=2
    )
    await job_store.save_rows(job.job_id, [late, early])

    got = await job_store.get(job.job_id)
    assert got.rows[40] == late
    assert got.rows[3] == early
    assert [r.index for r in got.rows] == list(range(45))
    untouched = [i for i in range(45) if i not in (3, 40)]
    assert [got.rows[i] for i in untouched] == [job.rows[i] for i in untouched]


async def test_save_rows_keeps_copies(job_store: HousekeptJobStore) -> None:
    job = make_job(rows=5)
    await job_store.create(job)
    row = dataclasses.replace(job.rows[1], state=RowState.IN_FLIGHT, attempts=1)
    await job_store.save_rows(job.job_id, [row])

    row.state = RowState.UNKNOWN
    row.attempts = 9

    stored = (await job_store.get(job.job_id)).rows[1]
    assert stored.state is RowState.IN_FLIGHT
    assert stored.attempts == 1


async def test_save_rows_with_no_rows_changes_nothing(job_store: HousekeptJobStore) -> None:
    job = make_job(rows=5)
    await job_store.create(job)

    await job_store.save_rows(job.job_id, [])

    assert await job_store.get(job.job_id) == job


@pytest.mark.parametrize("index", [-1, 5, 1000])
async def test_save_rows_refuses_an_index_out_of_range_and_writes_nothing(
    job_store: HousekeptJobStore, index: int
) -> None:
    job = make_job(rows=5)
    await job_store.create(job)
    valid = dataclasses.replace(job.rows[0], state=RowState.CREATED, hospital_id=1)
    bad = dataclasses.replace(job.rows[1], index=index, state=RowState.CREATED)

    with pytest.raises(ConfigurationError, match="out of range"):
        await job_store.save_rows(job.job_id, [valid, bad])

    assert await job_store.get(job.job_id) == job


async def test_concurrent_row_writes_all_land(job_store: HousekeptJobStore) -> None:
    job = make_job(rows=45)
    await job_store.create(job)

    async def settle(row: JobRow) -> None:
        await job_store.save_rows(
            job.job_id,
            [dataclasses.replace(row, state=RowState.CREATED, hospital_id=row.index + 1)],
        )

    async with anyio.create_task_group() as tg:
        for row in job.rows:
            tg.start_soon(settle, row)

    got = await job_store.get(job.job_id)
    assert [r.hospital_id for r in got.rows] == [i + 1 for i in range(45)]
    assert {r.state for r in got.rows} == {RowState.CREATED}


async def test_save_job_updates_every_field_but_rows(job_store: HousekeptJobStore) -> None:
    job = make_job(rows=45)
    await job_store.create(job)
    settled = dataclasses.replace(job.rows[0], state=RowState.CREATED, hospital_id=1)
    await job_store.save_rows(job.job_id, [settled])

    update = await job_store.get(job.job_id)
    update.status = JobStatus.COMPLETED
    update.batch_ids = [*update.batch_ids, uuid.uuid5(NAMESPACE, "extra")]
    update.fingerprint = "sha256:other"
    update.created_at = START - 10
    update.started_at = START + 1
    update.finished_at = START + 60
    update.activated_batches = list(update.batch_ids)
    update.idempotency_key = "key-9"
    update.error = "none"
    update.options = {"activate_partial": True}
    update.processing_seconds = 59.0
    # Rows passed to save_job are ignored: these changes must not be stored.
    update.rows[1].state = RowState.REJECTED
    del update.rows[20:]
    await job_store.save_job(update)

    got = await job_store.get(job.job_id)
    for field in dataclasses.fields(JobRecord):
        if field.name != "rows":
            assert getattr(got, field.name) == getattr(update, field.name), field.name
    assert len(got.rows) == 45
    assert got.rows[0] == settled
    assert got.rows[1:] == job.rows[1:]


async def test_save_job_keeps_a_copy(job_store: HousekeptJobStore) -> None:
    job = make_job(rows=2)
    await job_store.create(job)
    update = dataclasses.replace(job, activated_batches=[job.batch_ids[0]], options={"a": [1]})
    await job_store.save_job(update)

    update.activated_batches.clear()
    update.options["a"].append(2)

    got = await job_store.get(job.job_id)
    assert got.activated_batches == [job.batch_ids[0]]
    assert got.options == {"a": [1]}


async def test_unknown_ids_raise_job_not_found(job_store: HousekeptJobStore) -> None:
    await job_store.create(make_job("job-1", rows=2))
    stranger = make_job("nobody", rows=2)

    with pytest.raises(JobNotFoundError) as caught:
        await job_store.get("nobody")
    assert caught.value.job_id == "nobody"
    assert isinstance(caught.value, KeyError)
    assert isinstance(caught.value, HospitalBulkError)
    assert "nobody" in str(caught.value)

    with pytest.raises(KeyError):
        await job_store.save_rows("nobody", stranger.rows)
    with pytest.raises(JobNotFoundError):
        await job_store.save_job(stranger)
    with pytest.raises(JobNotFoundError):
        await job_store.delete("nobody")

    assert await job_store.list_ids() == ["job-1"]


async def test_list_ids_is_oldest_first_and_delete_removes(job_store: HousekeptJobStore) -> None:
    # Each job is created a little later than the one before, as a processor creates them
    # (`created_at` is the time of creation): the memory store lists in creation order, the
    # Redis store by `created_at` (jobs of many processes), and the two agree on that.
    for n, job_id in enumerate(["c", "a", "b"]):
        await job_store.create(make_job(job_id, rows=1, created_at=START + n))
    # Saving a job does not move it.
    await job_store.save_job(make_job("c", rows=1, status=JobStatus.RUNNING))

    assert await job_store.list_ids() == ["c", "a", "b"]

    await job_store.delete("a")

    assert await job_store.list_ids() == ["c", "b"]
    with pytest.raises(JobNotFoundError):
        await job_store.get("a")
    await job_store.create(make_job("a", rows=1, created_at=START + 3))
    assert await job_store.list_ids() == ["c", "b", "a"]


# --- retention --------------------------------------------------------------------------------


@pytest.mark.parametrize("status", TERMINAL)
async def test_a_terminal_job_expires_after_retention(
    job_store: HousekeptJobStore, clock: FakeClock, status: JobStatus
) -> None:
    job = make_job(rows=3, status=status, finished_at=clock.now)
    await job_store.create(job)

    clock.advance(RETENTION)
    assert (await job_store.get(job.job_id)).status is status

    clock.advance(0.001)
    with pytest.raises(JobNotFoundError):
        await job_store.get(job.job_id)
    with pytest.raises(JobNotFoundError):
        await job_store.save_rows(job.job_id, job.rows[:1])
    with pytest.raises(JobNotFoundError):
        await job_store.save_job(job)
    assert await job_store.list_ids() == []


@pytest.mark.parametrize("status", NOT_TERMINAL)
async def test_a_job_that_is_not_terminal_never_expires(
    job_store: HousekeptJobStore, clock: FakeClock, status: JobStatus
) -> None:
    # finished_at from an earlier run does not count while the job is not terminal.
    job = make_job(rows=3, status=status, finished_at=clock.now - 10 * RETENTION)
    await job_store.create(job)

    clock.advance(100 * RETENTION)
    await job_store.create(make_job("later", rows=1))

    assert (await job_store.get(job.job_id)).status is status
    assert await job_store.list_ids() == [job.job_id, "later"]


async def test_retention_counts_from_finished_at(
    job_store: HousekeptJobStore, clock: FakeClock
) -> None:
    job = make_job(rows=2, status=JobStatus.RUNNING, started_at=clock.now)
    await job_store.create(job)
    clock.advance(10 * RETENTION)
    # The job stopped half the retention ago: it has half the retention left.
    finished = clock.now - RETENTION / 2
    await job_store.save_job(
        dataclasses.replace(job, status=JobStatus.FAILED, finished_at=finished)
    )

    clock.advance(RETENTION / 2)
    assert (await job_store.get(job.job_id)).status is JobStatus.FAILED
    clock.advance(1)
    with pytest.raises(JobNotFoundError):
        await job_store.get(job.job_id)


async def test_a_resumed_job_does_not_expire_until_it_finishes_again(
    job_store: HousekeptJobStore, clock: FakeClock
) -> None:
    job = make_job(rows=2, status=JobStatus.PARTIALLY_FAILED, finished_at=clock.now)
    await job_store.create(job)

    clock.advance(RETENTION / 2)
    await job_store.save_job(dataclasses.replace(job, status=JobStatus.RUNNING))
    clock.advance(5 * RETENTION)
    await job_store.create(make_job("other", rows=1))
    assert (await job_store.get(job.job_id)).status is JobStatus.RUNNING

    await job_store.save_job(
        dataclasses.replace(job, status=JobStatus.COMPLETED, finished_at=clock.now)
    )
    clock.advance(RETENTION)
    await job_store.create(make_job("another", rows=1))
    assert (await job_store.get(job.job_id)).status is JobStatus.COMPLETED
    clock.advance(1)
    with pytest.raises(JobNotFoundError):
        await job_store.get(job.job_id)


async def test_a_terminal_job_without_finished_at_expires_from_created_at(
    job_store: HousekeptJobStore, clock: FakeClock
) -> None:
    job = make_job(rows=1, status=JobStatus.CANCELLED, created_at=clock.now)
    await job_store.create(job)

    clock.advance(RETENTION)
    assert (await job_store.get(job.job_id)).finished_at is None
    clock.advance(1)
    with pytest.raises(JobNotFoundError):
        await job_store.get(job.job_id)


async def test_expired_jobs_are_purged_on_the_next_create(
    job_store: HousekeptJobStore, clock: FakeClock
) -> None:
    for n in range(1000):
        await job_store.create(
            make_job(f"done-{n}", rows=2, status=JobStatus.COMPLETED, finished_at=clock.now)
        )
    await job_store.create(make_job("running", rows=2, status=JobStatus.RUNNING))
    assert len(await job_store.list_ids()) == 1001

    clock.advance(RETENTION + 1)
    await job_store.create(make_job("new", rows=2, created_at=clock.now))

    assert await job_store.list_ids() == ["running", "new"]
    with pytest.raises(JobNotFoundError):
        await job_store.get("done-0")


async def test_an_expired_id_can_be_used_again(
    job_store: HousekeptJobStore, clock: FakeClock
) -> None:
    await job_store.create(make_job("job-1", rows=1, status=JobStatus.FAILED, finished_at=START))
    clock.advance(RETENTION + 1)

    await job_store.create(make_job("job-1", rows=4))

    got = await job_store.get("job-1")
    assert got.status is JobStatus.PENDING
    assert len(got.rows) == 4


@pytest.mark.parametrize("retention", [0, -1, -0.5, math.nan, "3600", None, True])
async def test_bad_retention_is_refused(
    make_job_store: Callable[..., HousekeptJobStore], retention: object
) -> None:
    with pytest.raises(ConfigurationError, match="retention"):
        make_job_store(retention=retention)


async def test_infinite_retention_keeps_finished_jobs(
    make_job_store: Callable[..., HousekeptJobStore], clock: FakeClock
) -> None:
    store = make_job_store(retention=math.inf)
    await store.create(make_job(rows=1, status=JobStatus.COMPLETED, finished_at=START))

    clock.advance(1e9)
    await store.create(make_job("later", rows=1))

    assert await store.list_ids() == ["job-1", "later"]


# --- the idempotency store --------------------------------------------------------------------


async def test_a_new_key_creates_the_job(
    idempotency_store: HousekeptIdempotencyStore, job_store: HousekeptJobStore
) -> None:
    job = make_job("job-1", rows=3)

    job_id = await idempotency_store.claim("key-1", "fp-A", job, ttl=TTL)

    assert job_id == "job-1"
    assert await job_store.get("job-1") == job
    assert await idempotency_store.list_keys() == ["key-1"]


async def test_the_same_key_and_fingerprint_give_the_earlier_job(
    idempotency_store: HousekeptIdempotencyStore, job_store: HousekeptJobStore
) -> None:
    first = await idempotency_store.claim("key-1", "fp-A", make_job("job-1"), ttl=TTL)

    again = await idempotency_store.claim("key-1", "fp-A", make_job("job-2"), ttl=TTL)

    assert first == again == "job-1"
    assert await job_store.list_ids() == ["job-1"]
    with pytest.raises(JobNotFoundError):
        await job_store.get("job-2")


async def test_the_same_key_with_another_fingerprint_conflicts(
    idempotency_store: HousekeptIdempotencyStore, job_store: HousekeptJobStore
) -> None:
    await idempotency_store.claim("key-1", "fp-A", make_job("job-1"), ttl=TTL)

    with pytest.raises(IdempotencyConflictError, match="another file or other options") as caught:
        await idempotency_store.claim("key-1", "fp-B", make_job("job-2"), ttl=TTL)

    assert caught.value.key == "key-1"
    assert caught.value.job_id == "job-1"
    assert isinstance(caught.value, IdempotencyError)
    assert await job_store.list_ids() == ["job-1"]
    # The conflict changes nothing: the first fingerprint still gets its job.
    assert await idempotency_store.claim("key-1", "fp-A", make_job("job-3"), ttl=TTL) == "job-1"


async def test_keys_are_independent(
    idempotency_store: HousekeptIdempotencyStore, job_store: HousekeptJobStore
) -> None:
    a = await idempotency_store.claim("key-a", "fp", make_job("job-a"), ttl=TTL)
    b = await idempotency_store.claim("key-b", "fp", make_job("job-b"), ttl=TTL)

    assert (a, b) == ("job-a", "job-b")
    assert await job_store.list_ids() == ["job-a", "job-b"]
    assert await idempotency_store.list_keys() == ["key-a", "key-b"]


async def test_a_key_is_kept_for_its_ttl_then_freed(
    idempotency_store: HousekeptIdempotencyStore,
    job_store: HousekeptJobStore,
    clock: FakeClock,
) -> None:
    await idempotency_store.claim("key-1", "fp-A", make_job("job-1"), ttl=TTL)

    clock.advance(TTL)
    assert await idempotency_store.claim("key-1", "fp-A", make_job("job-2"), ttl=TTL) == "job-1"
    with pytest.raises(IdempotencyConflictError):
        await idempotency_store.claim("key-1", "fp-B", make_job("job-2"), ttl=TTL)

    clock.advance(0.001)
    assert await idempotency_store.claim("key-1", "fp-B", make_job("job-2"), ttl=TTL) == "job-2"
    assert await job_store.list_ids() == ["job-1", "job-2"]

    # The new claim has a ttl of its own.
    clock.advance(TTL)
    assert await idempotency_store.claim("key-1", "fp-B", make_job("job-3"), ttl=TTL) == "job-2"


async def test_each_claim_keeps_its_own_ttl(
    idempotency_store: HousekeptIdempotencyStore, clock: FakeClock
) -> None:
    await idempotency_store.claim("short", "fp", make_job("job-1"), ttl=10)
    await idempotency_store.claim("long", "fp", make_job("job-2"), ttl=1000)

    clock.advance(11)

    assert await idempotency_store.list_keys() == ["long"]
    assert await idempotency_store.claim("short", "fp", make_job("job-3"), ttl=10) == "job-3"
    assert await idempotency_store.claim("long", "fp", make_job("job-4"), ttl=10) == "job-2"


async def test_expired_keys_are_purged(
    idempotency_store: HousekeptIdempotencyStore, clock: FakeClock
) -> None:
    for n in range(1000):
        await idempotency_store.claim(f"key-{n}", "fp", make_job(f"job-{n}", rows=1), ttl=TTL)
    assert len(await idempotency_store.list_keys()) == 1000

    clock.advance(TTL + 1)
    await idempotency_store.claim("fresh", "fp", make_job("fresh", rows=1), ttl=TTL)

    assert await idempotency_store.list_keys() == ["fresh"]


async def test_twenty_concurrent_claims_create_one_job(
    idempotency_store: HousekeptIdempotencyStore, job_store: HousekeptJobStore
) -> None:
    results: list[str] = []

    async def submit(n: int) -> None:
        results.append(await idempotency_store.claim("key-1", "fp", make_job(f"job-{n}"), ttl=TTL))

    async with anyio.create_task_group() as tg:
        for n in range(20):
            tg.start_soon(submit, n)

    assert len(results) == 20
    assert len(set(results)) == 1
    assert await job_store.list_ids() == results[:1]


async def test_concurrent_claims_with_a_yielding_job_store_create_one_job(
    backend: str,
    make_idempotency_store: Callable[[JobStore], HousekeptIdempotencyStore],
    job_store: HousekeptJobStore,
) -> None:
    # Memory: create() yields to the event loop, so the other claims run while the first one
    # creates, and see the key "in progress". Redis: every claim is a network round trip (the
    # claims interleave as much), but claiming and creating are one script, so a key is never
    # seen in progress: `RedisIdempotencyStore` never raises `IdempotencyInProgressError`.
    gated = GatedJobStore(job_store) if backend == "memory" else None
    store = make_idempotency_store(job_store if gated is None else gated)
    results: list[str] = []
    in_progress = 0

    async def submit(n: int) -> None:
        nonlocal in_progress
        while True:
            try:
                results.append(await store.claim("key-1", "fp", make_job(f"job-{n}"), ttl=TTL))
            except IdempotencyInProgressError:
                in_progress += 1
                await anyio.lowlevel.checkpoint()
            else:
                return

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            for n in range(20):
                tg.start_soon(submit, n)

    if gated is not None:
        assert in_progress > 0
        assert gated.creates == 1
    else:
        assert in_progress == 0
    assert len(results) == 20
    assert len(set(results)) == 1
    assert await job_store.list_ids() == results[:1]


async def test_a_claim_still_creating_its_job_blocks_other_claims(
    memory_job_store: MemoryJobStore, clock: FakeClock
) -> None:
    job_store = memory_job_store
    gate = anyio.Event()
    gated = GatedJobStore(job_store, gate=gate)
    store = MemoryIdempotencyStore(gated, clock=clock)
    first: list[str] = []

    async def submit_first() -> None:
        first.append(await store.claim("key-1", "fp-A", make_job("job-1"), ttl=TTL))

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(submit_first)
            await gated.entered.wait()

            with pytest.raises(IdempotencyInProgressError, match="retry shortly") as caught:
                await store.claim("key-1", "fp-A", make_job("job-2"), ttl=TTL)
            assert caught.value.key == "key-1"
            assert caught.value.job_id is None
            with pytest.raises(IdempotencyConflictError) as conflict:
                await store.claim("key-1", "fp-B", make_job("job-3"), ttl=TTL)
            assert conflict.value.key == "key-1"
            # Other keys are not held up.
            assert await store.claim("key-2", "fp-A", make_job("job-4"), ttl=TTL) == "job-4"

            gate.set()

    assert first == ["job-1"]
    assert gated.creates == 2
    assert await store.claim("key-1", "fp-A", make_job("job-5"), ttl=TTL) == "job-1"
    assert sorted(await job_store.list_ids()) == ["job-1", "job-4"]


async def test_a_failed_creation_frees_the_key(
    memory_job_store: MemoryJobStore, clock: FakeClock
) -> None:
    job_store = memory_job_store
    failing = FailingJobStore(job_store)
    store = MemoryIdempotencyStore(failing, clock=clock)

    with pytest.raises(RuntimeError, match="down"):
        await store.claim("key-1", "fp-A", make_job("job-1"), ttl=TTL)

    assert failing.creates == 1
    assert await store.list_keys() == []
    with pytest.raises(JobNotFoundError):
        await job_store.get("job-1")


async def test_a_refused_job_frees_the_key(
    idempotency_store: HousekeptIdempotencyStore, job_store: HousekeptJobStore
) -> None:
    await job_store.create(make_job("taken", rows=1))

    with pytest.raises(ConfigurationError, match="already exists"):
        await idempotency_store.claim("key-1", "fp-A", make_job("taken", rows=3), ttl=TTL)

    # Free again, for any fingerprint.
    assert await idempotency_store.claim("key-1", "fp-B", make_job("job-2"), ttl=TTL) == "job-2"
    assert len((await job_store.get("taken")).rows) == 1


async def test_a_cancelled_claim_frees_the_key(
    memory_job_store: MemoryJobStore, clock: FakeClock
) -> None:
    job_store = memory_job_store
    gate = anyio.Event()
    gated = GatedJobStore(job_store, gate=gate)
    store = MemoryIdempotencyStore(gated, clock=clock)

    async def submit() -> None:
        await store.claim("key-1", "fp-A", make_job("job-1"), ttl=TTL)
        raise AssertionError("the claim should have been cancelled")

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(submit)
            await gated.entered.wait()
            assert await store.list_keys() == ["key-1"]
            tg.cancel_scope.cancel()

    assert await store.list_keys() == []
    assert await job_store.list_ids() == []
    gate.set()
    assert await store.claim("key-1", "fp-B", make_job("job-2"), ttl=TTL) == "job-2"


@pytest.mark.parametrize("key", ["", "k" * 256, None, 42, b"key"])
async def test_a_bad_key_is_refused(
    idempotency_store: HousekeptIdempotencyStore, job_store: HousekeptJobStore, key: object
) -> None:
    with pytest.raises(ConfigurationError, match="idempotency key"):
        await idempotency_store.claim(key, "fp", make_job("job-1"), ttl=TTL)  # type: ignore[arg-type]

    assert await job_store.list_ids() == []
    assert await idempotency_store.list_keys() == []


async def test_a_key_of_255_characters_is_accepted(
    idempotency_store: HousekeptIdempotencyStore,
) -> None:
    key = "k" * 255

    assert await idempotency_store.claim(key, "fp", make_job("job-1"), ttl=TTL) == "job-1"
    assert await idempotency_store.list_keys() == [key]


@pytest.mark.parametrize("ttl", [0, -1, math.nan, "60", None, True])
async def test_a_bad_ttl_is_refused(
    idempotency_store: HousekeptIdempotencyStore, job_store: HousekeptJobStore, ttl: object
) -> None:
    with pytest.raises(ConfigurationError, match="ttl"):
        await idempotency_store.claim("key-1", "fp", make_job("job-1"), ttl=ttl)  # type: ignore[arg-type]

    assert await job_store.list_ids() == []
    assert await idempotency_store.list_keys() == []


@pytest.mark.parametrize("fingerprint", ["", None])
async def test_a_bad_fingerprint_is_refused(
    idempotency_store: HousekeptIdempotencyStore, job_store: HousekeptJobStore, fingerprint: object
) -> None:
    with pytest.raises(ConfigurationError, match="fingerprint"):
        await idempotency_store.claim("key-1", fingerprint, make_job("job-1"), ttl=TTL)  # type: ignore[arg-type]

    assert await job_store.list_ids() == []
    assert await idempotency_store.list_keys() == []


# --- the memory backend only ------------------------------------------------------------------


async def test_memory_job_store_drops_expired_jobs_on_create_alone(clock: FakeClock) -> None:
    store = MemoryJobStore(retention=RETENTION, clock=clock)
    for n in range(1000):
        job = make_job(f"done-{n}", rows=1, status=JobStatus.RUNNING)
        await store.create(job)
        # Each job is saved terminal twice: one deadline is tracked per job, not per save.
        await store.save_job(dataclasses.replace(job, status=JobStatus.FAILED, finished_at=START))
        await store.save_job(
            dataclasses.replace(job, status=JobStatus.FAILED, finished_at=START, error="x")
        )
    assert len(store._heap) == 1000

    clock.advance(RETENTION + 1)
    await store.create(make_job("new", rows=1))

    assert list(store._jobs) == ["new"]
    assert store._deadlines == {}
    assert store._heap == []


async def test_memory_idempotency_store_drops_expired_keys_on_claim_alone(
    clock: FakeClock,
) -> None:
    jobs = MemoryJobStore(retention=RETENTION, clock=clock)
    store = MemoryIdempotencyStore(jobs, clock=clock)
    for n in range(1000):
        await store.claim(f"key-{n}", "fp", make_job(f"job-{n}", rows=1), ttl=TTL)
    assert len(store._claims) == 1000

    clock.advance(TTL + 1)
    await store.claim("fresh", "fp", make_job("fresh", rows=1), ttl=TTL)

    assert list(store._claims) == ["fresh"]
    assert len(store._heap) == 1


async def test_memory_store_defaults() -> None:
    store = MemoryJobStore()

    assert store.retention == 7 * 24 * 3600


# -- leases and fencing tokens ---------------------------------------------------------------


async def test_lease_tokens_grow_and_a_live_lease_keeps_others_out(
    job_store: HousekeptJobStore, clock: FakeClock
) -> None:
    await job_store.create(make_job("job-1", rows=2))
    first = await job_store.acquire_lease("job-1", "worker-a", 30.0)
    lease = await job_store.lease("job-1")
    assert lease is not None
    assert (lease.owner, lease.token, lease.expires_at) == ("worker-a", first, clock.now + 30.0)
    with pytest.raises(JobStateError):
        await job_store.acquire_lease("job-1", "worker-b", 30.0)
    clock.advance(31.0)
    assert await job_store.lease("job-1") is None
    second = await job_store.acquire_lease("job-1", "worker-b", 30.0)
    assert second > first


async def test_a_stale_token_cannot_write(job_store: HousekeptJobStore, clock: FakeClock) -> None:
    job = make_job("job-1", rows=2)
    await job_store.create(job)
    old = await job_store.acquire_lease("job-1", "worker-a", 10.0)
    clock.advance(5.0)
    await job_store.renew_lease("job-1", old, 10.0)
    clock.advance(11.0)  # expired, but nobody took over: the token still fences nothing out
    await job_store.save_rows("job-1", [job.rows[0]], token=old)
    new = await job_store.acquire_lease("job-1", "worker-b", 10.0)
    with pytest.raises(LeaseLostError):
        await job_store.save_rows("job-1", [job.rows[0]], token=old)
    with pytest.raises(LeaseLostError):
        await job_store.save_job(job, token=old)
    with pytest.raises(LeaseLostError):
        await job_store.renew_lease("job-1", old, 10.0)
    await job_store.save_job(job, token=new)
    await job_store.release_lease("job-1", old)  # a stale release changes nothing
    assert (await job_store.lease("job-1")) is not None
    await job_store.release_lease("job-1", new)
    assert await job_store.lease("job-1") is None


async def test_leases_of_unknown_jobs(job_store: HousekeptJobStore) -> None:
    with pytest.raises(JobNotFoundError):
        await job_store.acquire_lease("nope", "worker-a", 10.0)
    with pytest.raises(JobNotFoundError):  # a lost job is not a lost lease
        await job_store.renew_lease("nope", 1, 10.0)
    assert await job_store.lease("nope") is None
