"""AsyncBulkProcessor against the in-process fake upstream: the whole job flow.

Every claim is checked at the fake (the source of truth), not only in the library's report.
"""

from __future__ import annotations

import io
import json
import logging
import time

import anyio
import httpx
import pytest
from helpers import REPORT_KEYS, csv_bytes

from hospital_bulk import (
    AsyncBulkProcessor,
    BackendError,
    BulkProcessor,
    ConfigurationError,
    CSVValidationError,
    IdempotencyConflictError,
    JobNotFoundError,
    JobStateError,
    JobStatus,
    LeaseLostError,
    RetryPolicy,
    RowState,
    Settings,
    WaitReason,
)
from hospital_bulk.testing import FakeDirectory, Fault

pytestmark = pytest.mark.anyio


def processor(fake: FakeDirectory, **options) -> AsyncBulkProcessor:
    options.setdefault("create_rate", "1000/minute")
    options.setdefault("other_rate", "1000/minute")
    options.setdefault("reconcile_after", 0.01)
    return AsyncBulkProcessor("http://fake", transport=fake.transport(), **options)


def assert_exactly_once(fake: FakeDirectory, expected_rows: int) -> None:
    assert fake.duplicates() == [], f"duplicates at the upstream: {fake.duplicates()}"
    assert len(fake.hospitals) == expected_rows


@pytest.fixture
def fake():
    return FakeDirectory(create_rate=None, other_rate=None)


async def test_a_45_row_file_goes_into_three_active_batches(fake):
    async with processor(fake) as p:
        result = await p.process(csv_bytes(45))
    assert result.status is JobStatus.COMPLETED
    assert len(result.batch_ids) == 3
    assert result.batch_id == result.batch_ids[0]
    assert result.batch_activated is True
    assert (result.total_hospitals, result.processed_hospitals, result.failed_hospitals) == (
        45,
        45,
        0,
    )
    assert {h.status for h in result.hospitals} == {RowState.CREATED_AND_ACTIVATED}
    assert [h.row for h in result.hospitals] == list(range(1, 46))
    assert_exactly_once(fake, 45)
    sizes = sorted(len(fake.batch(b)) for b in result.batch_ids)
    assert sizes == [5, 20, 20]
    assert all(h.active for h in fake.hospitals)
    by_id = {h.id: h for h in fake.hospitals}
    for entry in result.hospitals:
        assert by_id[entry.hospital_id].name == entry.name


async def test_the_report_has_the_original_service_shape(fake):
    async with processor(fake) as p:
        result = await p.process(csv_bytes(2))
    data = result.model_dump(mode="json")
    assert set(data) == REPORT_KEYS
    assert data["status"] == "completed"
    assert data["hospitals"][0] == {
        "row": 1,
        "hospital_id": 1,
        "name": "Hospital 1",
        "status": "created_and_activated",
        "error": None,
    }
    json.dumps(data)


async def test_an_invalid_file_sends_nothing_and_reports_every_error(fake):
    bad = b"name,address\n,1 Main St\nOk,2 Main St\n=cmd,3 Main St\n"
    async with processor(fake) as p:
        with pytest.raises(CSVValidationError) as info:
            await p.process(bad)
    errors = info.value.report.errors
    assert [(e.code, e.row, e.line) for e in errors] == [
        ("missing_value", 1, 2),
        ("formula_injection", 3, 4),
    ]
    assert fake.requests == []


async def test_skip_invalid_rows_loads_the_rest_and_reports_the_invalid(fake):
    bad = b"name,address\n,1 Main St\nOk,2 Main St\n"
    async with processor(fake, skip_invalid_rows=True) as p:
        result = await p.process(bad)
    assert result.status is JobStatus.COMPLETED
    assert [(h.row, h.status) for h in result.hospitals] == [
        (1, RowState.INVALID),
        (2, RowState.CREATED_AND_ACTIVATED),
    ]
    assert "missing_value" in result.hospitals[0].error
    assert result.failed_hospitals == 1
    assert_exactly_once(fake, 1)


async def test_a_rejected_row_leaves_the_batch_inactive_and_resume_finishes(fake):
    fake.inject(Fault.REJECT)
    async with processor(fake, concurrency=1) as p:
        first = await p.process(csv_bytes(3))
        assert first.status is JobStatus.PARTIALLY_FAILED
        assert [h.status for h in first.hospitals] == [
            RowState.REJECTED,
            RowState.CREATED,
            RowState.CREATED,
        ]
        assert "refused by the fake upstream" in first.hospitals[0].error
        assert first.batch_activated is False
        assert len(fake.hospitals) == 2
        assert not any(h.active for h in fake.hospitals)

        resumed = await p.resume(first.job_id)
    assert resumed.job_id == first.job_id
    assert resumed.status is JobStatus.COMPLETED
    assert {h.status for h in resumed.hospitals} == {RowState.CREATED_AND_ACTIVATED}
    assert_exactly_once(fake, 3)
    assert all(h.active for h in fake.hospitals)
    assert len(fake.creates()) == 4  # 3 rows + the one rejected attempt, nothing more


async def test_activate_partial_activates_what_was_created(fake):
    fake.inject(Fault.REJECT)
    async with processor(fake, concurrency=1, activate_partial=True) as p:
        result = await p.process(csv_bytes(3))
    assert result.status is JobStatus.PARTIALLY_FAILED
    assert [h.status for h in result.hospitals] == [
        RowState.REJECTED,
        RowState.CREATED_AND_ACTIVATED,
        RowState.CREATED_AND_ACTIVATED,
    ]
    assert all(h.active for h in fake.hospitals)


async def test_an_ambiguous_create_is_adopted_after_the_horizon_not_sent_again(fake):
    fake.inject(Fault.TIMEOUT_AFTER_COMMIT)
    snapshots = []
    async with processor(fake, concurrency=1, reconcile_after=0.2) as p:
        result = await p.process(csv_bytes(3), on_progress=snapshots.append)
    assert result.status is JobStatus.COMPLETED
    assert {h.status for h in result.hospitals} == {RowState.CREATED_AND_ACTIVATED}
    # The hospital committed before the timeout was adopted, never created a second time.
    assert_exactly_once(fake, 3)
    assert len(fake.creates()) == 3
    assert any(s.waiting_for is WaitReason.RECONCILE for s in snapshots)
    # The batch was read back only after the horizon, and never through GET /hospitals/.
    sent = next(r.arrived_at for r in fake.requests if r.route == "create")
    reads = [r.arrived_at for r in fake.requests if r.route == "batch_list"]
    assert reads
    assert min(reads) >= sent + 0.2
    assert not [r for r in fake.requests if r.route == "list"]


@pytest.mark.parametrize("fault", [Fault.ERROR, Fault.RESET_AFTER_COMMIT])
async def test_a_5xx_or_reset_is_reconciled_into_exactly_one_hospital(fake, fault):
    fake.inject(fault, times=2)
    async with processor(fake, concurrency=2) as p:
        result = await p.process(csv_bytes(4))
    assert result.status is JobStatus.COMPLETED
    assert_exactly_once(fake, 4)


async def test_identical_rows_stay_two_hospitals_through_reconciliation(fake):
    same = b"name,address\nTwin,1 Main St\nTwin,1 Main St\nOther,2 Main St\n"
    fake.inject(Fault.TIMEOUT_AFTER_COMMIT, times=2)
    async with processor(fake, concurrency=3) as p:
        result = await p.process(same)
    assert result.status is JobStatus.COMPLETED
    assert sorted(h.name for h in fake.hospitals) == ["Other", "Twin", "Twin"]
    assert len({h.hospital_id for h in result.hospitals}) == 3


async def test_the_audit_deletes_hospitals_no_row_accounts_for(fake):
    async with processor(fake) as p:
        job = await p.submit(csv_bytes(2))
        batch = job.batch_ids[0]
        # A stray duplicate lands in the job's batch (an earlier, forgotten attempt).
        async with httpx.AsyncClient(transport=fake.transport(), base_url="http://fake") as c:
            stray = {"name": "Hospital 1", "address": "1 Main Street", "phone": "555-0001"}
            await c.post("/hospitals/", json={**stray, "creation_batch_id": str(batch)})
        result = await p.run(job.job_id)
    assert result.status is JobStatus.COMPLETED
    assert_exactly_once(fake, 2)
    assert all(h.active for h in fake.hospitals)


async def test_rows_the_upstream_lost_are_sent_again(fake):
    fake.inject(Fault.REJECT)
    async with processor(fake, concurrency=1) as p:
        first = await p.process(csv_bytes(3))
        assert first.status is JobStatus.PARTIALLY_FAILED
        fake.restart()  # the upstream loses everything and restarts its ids
        resumed = await p.resume(first.job_id)
    assert resumed.status is JobStatus.COMPLETED
    assert_exactly_once(fake, 3)
    assert all(h.active for h in fake.hospitals)


async def test_rollback_deletes_the_jobs_batches(fake):
    fake.inject(Fault.REJECT)
    async with processor(fake) as p:
        first = await p.process(csv_bytes(25))
        assert first.status is JobStatus.PARTIALLY_FAILED
        rolled = await p.rollback(first.job_id)
        assert rolled.status is JobStatus.ROLLED_BACK
        assert (
            await p.status(first.job_id)
        ).error == "rolled back: 24 hospital(s) deleted upstream"
        assert fake.hospitals == []
        assert {h.status for h in rolled.hospitals} <= {RowState.DELETED, RowState.REJECTED}
        again = await p.rollback(first.job_id)  # every batch already gone: still fine
        assert again.status is JobStatus.ROLLED_BACK
        assert (await p.status(first.job_id)).error == "rolled back: 0 hospital(s) deleted upstream"
        with pytest.raises(JobStateError):
            await p.resume(first.job_id)


async def test_same_idempotency_key_same_file_is_the_same_job(fake):
    async with processor(fake) as p:
        one = await p.submit(csv_bytes(3), idempotency_key="key-1")
        two = await p.submit(io.BytesIO(csv_bytes(3)), idempotency_key="key-1")
        assert one.job_id == two.job_id
        result = await p.run(one.job_id)
        replay = await p.process(csv_bytes(3), idempotency_key="key-1")
        with pytest.raises(IdempotencyConflictError) as info:
            await p.submit(csv_bytes(4), idempotency_key="key-1")
    assert replay.job_id == one.job_id
    assert replay.status is JobStatus.COMPLETED
    assert result.status is JobStatus.COMPLETED
    assert info.value.key == "key-1"
    assert_exactly_once(fake, 3)


async def test_rows_of_a_batch_go_out_together(fake):
    slow = FakeDirectory(create_latency=0.05, create_rate=None, other_rate=None)
    async with processor(slow, concurrency=20) as p:
        result = await p.process(csv_bytes(20))
    assert result.status is JobStatus.COMPLETED
    assert slow.peak_creates_in_flight == 20


async def test_concurrency_bounds_requests_in_flight():
    slow = FakeDirectory(create_latency=0.02, create_rate=None, other_rate=None)
    async with processor(slow, concurrency=4) as p, anyio.create_task_group() as tg:
        for start in (1, 101):
            tg.start_soon(p.process, csv_bytes(10, start=start))
    assert slow.peak_creates_in_flight == 4
    assert_exactly_once(slow, 20)


async def test_a_429_pauses_and_retries_without_losing_or_duplicating(fake):
    limited = FakeDirectory(create_rate=(3, 1.0), other_rate=None)
    async with processor(limited, create_rate="1000/minute") as p:
        result = await p.process(csv_bytes(5))
    assert result.status is JobStatus.COMPLETED
    assert_exactly_once(limited, 5)
    assert any(r.status == 429 for r in limited.requests)


async def test_while_the_breaker_is_open_rows_wait_and_do_not_fail(fake):
    fake.inject(Fault.DOWN, times=3)
    snapshots = []
    async with processor(
        fake,
        concurrency=1,
        breaker_failure_threshold=2,
        breaker_recovery_time=0.2,
        retry_attempts=2,
        retry_initial=0.01,
    ) as p:
        result = await p.process(csv_bytes(2), on_progress=snapshots.append)
        if result.status is not JobStatus.COMPLETED:
            result = await p.resume(result.job_id)
    assert result.status is JobStatus.COMPLETED
    assert_exactly_once(fake, 2)
    assert any(s.waiting_for is WaitReason.BREAKER for s in snapshots)


async def test_progress_snapshots_and_events(fake):
    seen = []
    async with processor(fake) as p:
        submitted = await p.submit(csv_bytes(5))
        assert submitted.status is JobStatus.PENDING
        assert submitted.counts[RowState.PENDING] == 5

        events = []

        async def listen():
            async for event in p.events(submitted.job_id):
                events.append(event)

        async with anyio.create_task_group() as tg:
            tg.start_soon(listen)
            await anyio.sleep(0.01)
            await p.run(submitted.job_id, on_progress=seen.append)
        final = await p.status(submitted.job_id)
    percents = [s.percent for s in seen]
    assert percents == sorted(percents)
    assert percents[-1] == 100.0
    assert final.status is JobStatus.COMPLETED
    assert final.counts[RowState.CREATED_AND_ACTIVATED] == 5
    assert final.eta_seconds == 0.0
    kinds = [e.kind for e in events]
    assert kinds[0] == "snapshot"
    assert kinds.count("row_created") == 5
    assert kinds[-1] == "job_finished"


async def test_row_contents_are_logged_at_debug_only(fake, caplog):
    caplog.set_level(logging.INFO, logger="hospital_bulk")
    async with processor(fake) as p:
        await p.process(csv_bytes(2))
    assert "Hospital 1" not in caplog.text
    assert "Job " in caplog.text
    caplog.clear()
    caplog.set_level(logging.DEBUG, logger="hospital_bulk")
    async with processor(FakeDirectory(create_rate=None)) as p:
        await p.process(csv_bytes(1))
    assert "Hospital created successfully: Hospital 1 (ID: 1)" in caplog.text


async def test_cancel_stops_a_job_and_it_can_be_resumed():
    slow = FakeDirectory(create_latency=0.2, create_rate=None, other_rate=None)
    async with processor(slow, concurrency=1) as p:
        job = await p.submit(csv_bytes(5))
        async with anyio.create_task_group() as tg:
            tg.start_soon(p.run, job.job_id)
            await anyio.sleep(0.3)
            with pytest.raises(JobStateError):
                await p.run(job.job_id)
            cancelled = await p.cancel(job.job_id)
        assert cancelled.status is JobStatus.CANCELLED
        result = await p.resume(job.job_id)
    # The row in flight when cancelled was reconciled: found missing, sent again, once.
    assert result.status is JobStatus.COMPLETED
    assert_exactly_once(slow, 5)


async def test_unknown_job_and_bad_settings(fake):
    async with processor(fake) as p:
        with pytest.raises(JobNotFoundError):
            await p.status("nope")
    for bad in (
        {"create_rate": "lots"},
        {"concurrency": 0},
        {"batch_size": 21},
        {"timeout": -1},
        {"no_such_setting": 1},
        {"backend": "postgres://x"},
    ):
        with pytest.raises(ConfigurationError):
            AsyncBulkProcessor("http://fake", **bad)
    with pytest.raises(ConfigurationError):
        AsyncBulkProcessor()


def test_settings_from_env():
    env = {
        "HOSPITAL_API_BASE_URL": "http://directory:8000",
        "RATE_LIMIT_REQUESTS": "10",
        "RATE_LIMIT_PERIOD": "6",
        "RETRY_MAX_ATTEMPTS": "7",
        "CIRCUIT_BREAKER_FAILURE_THRESHOLD": "3",
        "CIRCUIT_BREAKER_RECOVERY_TIMEOUT": "12.5",
    }
    settings = Settings.from_env(env, concurrency=5)
    assert settings.base_url == "http://directory:8000"
    assert settings.create_rate == "10/6 seconds"
    assert (settings.retry_attempts, settings.breaker_failure_threshold) == (7, 3)
    assert settings.breaker_recovery_time == 12.5
    assert settings.concurrency == 5
    with pytest.raises(ConfigurationError, match="HOSPITAL_API_BASE_URL"):
        Settings.from_env({})
    with pytest.raises(ConfigurationError, match="RETRY_MAX_ATTEMPTS"):
        Settings.from_env({"HOSPITAL_API_BASE_URL": "http://x", "RETRY_MAX_ATTEMPTS": "many"})


async def test_health(fake):
    async with processor(fake) as p:
        health = await p.health()
    assert health["upstream"] is True
    assert health["breaker"] == "closed"
    assert health["backend"] == "memory"
    assert health["backend_reachable"] is True


async def test_the_sync_facade_works_inside_a_running_event_loop(fake):
    # This test body runs inside an event loop, as a notebook cell does.
    with BulkProcessor(
        "http://fake",
        transport=fake.transport(),
        create_rate="1000/minute",
        other_rate="1000/minute",
    ) as p:
        seen = []
        result = p.process(csv_bytes(3), on_progress=seen.append)
        assert p.status(result.job_id).status is JobStatus.COMPLETED
        assert p.validate(csv_bytes(1)).ok
    assert result.status is JobStatus.COMPLETED
    assert seen[-1].percent == 100.0
    assert_exactly_once(fake, 3)


def test_the_sync_facade_from_plain_code(fake):
    with BulkProcessor("http://fake", transport=fake.transport(), create_rate="1000/minute") as p:
        job = p.submit(csv_bytes(2), idempotency_key="k")
        result = p.run(job.job_id)
        events = list(p.events(job.job_id))
    assert result.status is JobStatus.COMPLETED
    assert events[0].kind == "snapshot"
    assert_exactly_once(fake, 2)


async def test_a_repeated_key_while_its_job_runs_waits_for_it():
    slow = FakeDirectory(create_latency=0.1, create_rate=None, other_rate=None)
    results = []
    async with processor(slow) as p:

        async def submit_once():
            results.append(await p.process(csv_bytes(3), idempotency_key="same"))

        async with anyio.create_task_group() as tg:
            tg.start_soon(submit_once)
            tg.start_soon(submit_once)
    assert len({r.job_id for r in results}) == 1
    assert {r.status for r in results} == {JobStatus.COMPLETED}
    assert_exactly_once(slow, 3)


async def test_a_redirected_create_is_rejected_not_unknown():
    def upstream(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/":
            return httpx.Response(200, json={"status": "OK"})
        return httpx.Response(307, headers={"Location": "http://fake/elsewhere/"})

    async with AsyncBulkProcessor(
        "http://fake", transport=httpx.MockTransport(upstream), create_rate="1000/minute"
    ) as p:
        result = await p.process(csv_bytes(1))
    assert result.status is JobStatus.PARTIALLY_FAILED
    assert result.hospitals[0].status is RowState.REJECTED
    assert "redirect" in result.hospitals[0].error


def shared_processors(fake: FakeDirectory, **options):
    """Two processors (two workers) sharing one job store, as two processes share Redis."""
    from hospital_bulk.backends.memory import MemoryIdempotencyStore, MemoryJobStore

    jobs = MemoryJobStore()
    keys = MemoryIdempotencyStore(jobs)
    return [processor(fake, job_store=jobs, idempotency_store=keys, **options) for _ in range(2)]


async def test_a_job_runs_in_one_worker_at_a_time():
    slow = FakeDirectory(create_latency=0.2, create_rate=None, other_rate=None)
    a, b = shared_processors(slow)
    async with a, b:
        job = await a.submit(csv_bytes(3))
        async with anyio.create_task_group() as tg:
            tg.start_soon(a.run, job.job_id)
            await anyio.sleep(0.05)
            with pytest.raises(JobStateError, match="another worker"):
                await b.run(job.job_id)
            assert (await b.status(job.job_id)).status is JobStatus.RUNNING
        assert (await b.status(job.job_id)).status is JobStatus.COMPLETED
    assert_exactly_once(slow, 3)


async def test_a_job_whose_worker_died_is_interrupted_and_recovered(fake):
    a, b = shared_processors(fake, lease_ttl=0.1)
    async with a, b:
        job = await a.submit(csv_bytes(4))
        # Worker A dies mid-job: its job is stored as running, one row was in flight.
        record = await a._jobs.get(job.job_id)
        record.status = JobStatus.RUNNING
        record.rows[0].state = RowState.IN_FLIGHT
        record.rows[0].sent_at = 0.0
        await a._jobs.save_job(record)
        await a._jobs.save_rows(job.job_id, record.rows)
        await a._jobs.acquire_lease(job.job_id, "dead-worker", 0.1)
        assert (await b.status(job.job_id)).status is JobStatus.RUNNING
        await anyio.sleep(0.15)
        assert (await b.status(job.job_id)).status is JobStatus.INTERRUPTED
        results = await b.recover()
    assert [r.job_id for r in results] == [job.job_id]
    assert results[0].status is JobStatus.COMPLETED
    assert_exactly_once(fake, 4)


async def test_a_worker_that_lost_its_lease_stops_sending():
    slow = FakeDirectory(create_latency=0.1, create_rate=None, other_rate=None)
    a, b = shared_processors(slow, lease_ttl=0.15, concurrency=1)

    async def never_renew(run):  # worker A stalls: its lease lapses
        await anyio.sleep_forever()

    a._keep_lease = never_renew
    async with a, b:
        job = await a.submit(csv_bytes(6))
        outcome = {}

        async def run_a():
            try:
                await a.run(job.job_id)
            except JobStateError as exc:
                outcome["a"] = exc

        async with anyio.create_task_group() as tg:
            tg.start_soon(run_a)
            await anyio.sleep(0.2)  # A's lease has lapsed; B takes the job over
            outcome["b"] = await b.resume(job.job_id)
    assert isinstance(outcome["a"], LeaseLostError)
    assert outcome["b"].status is JobStatus.COMPLETED
    assert_exactly_once(slow, 6)


async def test_the_rebuild_policy_recreates_a_batch_that_held_strangers(fake):
    async with processor(fake, surplus_policy="rebuild") as p:
        job = await p.submit(csv_bytes(2))
        old = job.batch_ids[0]
        async with httpx.AsyncClient(transport=fake.transport(), base_url="http://fake") as c:
            stray = {"name": "Someone else", "address": "9 Elm St", "creation_batch_id": str(old)}
            await c.post("/hospitals/", json=stray)
        result = await p.run(job.job_id)
    assert result.status is JobStatus.COMPLETED
    assert result.batch_ids != [old]
    assert fake.batch(old) == []
    assert_exactly_once(fake, 2)
    assert sorted(h.name for h in fake.batch(result.batch_ids[0])) == ["Hospital 1", "Hospital 2"]
    assert all(h.active for h in fake.hospitals)


async def test_rows_lost_upstream_are_reported(fake, caplog):
    caplog.set_level(logging.WARNING, logger="hospital_bulk")
    fake.inject(Fault.REJECT)
    async with processor(fake, concurrency=1) as p:
        first = await p.process(csv_bytes(3))
        fake.restart()
        snapshots = []
        result = await p.resume(first.job_id, on_progress=snapshots.append)
    assert result.status is JobStatus.COMPLETED
    assert "2 hospital(s) no longer upstream (did it restart?)" in caplog.text
    # While they were being sent again, the lost rows showed as pending, not as created.
    assert any(s.counts[RowState.PENDING] >= 2 for s in snapshots)


async def test_events_follow_a_job_that_runs_in_another_worker():
    slow = FakeDirectory(create_latency=0.05, create_rate=None, other_rate=None)
    a, b = shared_processors(slow, concurrency=2)
    async with a, b:
        job = await a.submit(csv_bytes(6))
        seen = []

        async def follow():
            async for event in b.events(job.job_id, poll_interval=0.01):
                seen.append(event)

        async with anyio.create_task_group() as tg:
            tg.start_soon(follow)
            await anyio.sleep(0.02)
            await a.run(job.job_id)
    kinds = [event.kind for event in seen]
    assert kinds[0] == "snapshot"
    assert kinds[-1] == "job_finished"
    assert seen[-1].snapshot.status is JobStatus.COMPLETED
    assert "progress" in kinds
    created = [
        event.snapshot.counts[RowState.CREATED] for event in seen if event.kind == "progress"
    ]
    assert any(0 < n < 6 for n in created), created  # rows were seen landing one by one


async def test_a_job_the_store_loses_mid_run_stops_with_a_backend_error(fake):
    from hospital_bulk.backends.memory import MemoryIdempotencyStore, MemoryJobStore

    jobs = MemoryJobStore()
    async with processor(
        fake, job_store=jobs, idempotency_store=MemoryIdempotencyStore(jobs), concurrency=1
    ) as p:
        job = await p.submit(csv_bytes(5))

        async def lose_it(snapshot):  # the store loses the job (a Redis restart, say)
            if snapshot.counts[RowState.CREATED] == 2 and job.job_id in await jobs.list_ids():
                await jobs.delete(job.job_id)

        with pytest.raises(BackendError, match="vanished from the job store"):
            await p.run(job.job_id, on_progress=lose_it)
    assert fake.duplicates() == []
    assert len(fake.hospitals) <= 3  # it stopped at the next write; nothing was guessed


async def test_an_error_that_says_nothing_of_the_upstream_is_not_reported_to_the_breaker(fake):
    class Spy:
        name = "spy"

        def __init__(self):
            self.calls: list[str] = []

        async def before_call(self):
            self.calls.append("before")

        async def record_success(self):
            self.calls.append("success")

        async def record_failure(self):
            self.calls.append("failure")

        async def state(self):
            return "half_open"

    spy = Spy()
    async with processor(fake, breaker=spy) as p:

        async def store_fails():
            raise BackendError("Redis is unreachable")

        with pytest.raises(BackendError):
            await p._guarded(store_fails, None)
    # Had this been the half-open probe, a success would have closed the breaker unproven.
    assert spy.calls == []


async def test_tenants_have_their_own_idempotency_keys_and_replays_say_so(fake):
    async with processor(fake) as p:
        first = await p.submit(csv_bytes(2), idempotency_key="k", tenant="acme")
        again = await p.submit(csv_bytes(2), idempotency_key="k", tenant="acme")
        other = await p.submit(csv_bytes(2), idempotency_key="k", tenant="globex")
        with pytest.raises(IdempotencyConflictError):
            await p.submit(csv_bytes(3), idempotency_key="k", tenant="acme")
        with pytest.raises(ConfigurationError, match="tenant"):
            await p.submit(csv_bytes(2), tenant="")
        status = await p.status(first.job_id)
    assert (first.replayed, again.replayed, other.replayed) == (False, True, False)
    assert again.job_id == first.job_id
    assert other.job_id != first.job_id  # another tenant's key is another key
    assert (status.tenant, other.tenant, status.idempotency_key) == ("acme", "globex", "k")


async def test_a_resume_or_follower_arriving_as_a_run_finishes_waits_for_it(fake):
    fake.inject(Fault.REJECT)
    outcome = {}
    async with processor(fake, concurrency=1) as p:
        job = await p.submit(csv_bytes(3))
        async with anyio.create_task_group() as tg:

            async def resume_now():  # the run has decided its end but still holds the job
                outcome["resumed"] = await p.resume(job.job_id)

            async def follow_now():
                outcome["events"] = [e.kind async for e in p.events(job.job_id)]

            def on_progress(snapshot):
                if snapshot.status is JobStatus.PARTIALLY_FAILED and "resumed" not in outcome:
                    outcome["resumed"] = None
                    tg.start_soon(resume_now)
                    tg.start_soon(follow_now)

            first = await p.run(job.job_id, on_progress=on_progress)
    assert first.status is JobStatus.PARTIALLY_FAILED
    assert outcome["resumed"].status is JobStatus.COMPLETED  # not "already running"
    assert outcome["events"][0] == "snapshot"
    assert outcome["events"][-1] == "job_finished"
    assert_exactly_once(fake, 3)


def test_the_sync_facade_has_the_async_processors_methods(fake):
    async_methods = {
        name
        for name in dir(AsyncBulkProcessor)
        if not name.startswith("_") and name not in ("aclose",)
    }
    sync_methods = {name for name in dir(BulkProcessor) if not name.startswith("_")}
    assert async_methods - sync_methods == set()
    with BulkProcessor("http://fake", transport=fake.transport(), create_rate="1000/minute") as p:
        report = p.validate(csv_bytes(3), max_rows=2)
        assert p.accepts(report) is False
        assert p.shares_jobs is False
        assert p.recover() == []


@pytest.mark.parametrize("seed", [7, 8, 9])
async def test_every_snapshot_counts_the_rows_as_saved_in_the_job_store(seed):
    # The processor keeps the counts as rows are saved instead of recounting every row for
    # every event; each event's counts must equal a recount of the stored rows.
    from hospital_bulk.backends.memory import MemoryJobStore
    from hospital_bulk.testing import Faults

    fake = FakeDirectory(
        create_rate=None,
        other_rate=None,
        seed=seed,
        faults=Faults(error_rate=0.15, reset_after_commit_rate=0.1),
    )
    store = MemoryJobStore()
    checked: list[int] = []

    async def on_progress(snapshot):
        stored = await store.get(snapshot.job_id)
        recount = dict.fromkeys(RowState, 0)
        for row in stored.rows:
            recount[row.state] += 1
        assert snapshot.counts == recount, f"seed {seed}"
        assert sum(snapshot.counts.values()) == snapshot.total_rows
        checked.append(1)

    async with processor(fake, job_store=store, retry=RetryPolicy.testing()) as p:
        result = await p.process(csv_bytes(45), on_progress=on_progress)
    assert len(checked) >= 45, f"seed {seed}"
    assert result.status in {JobStatus.COMPLETED, JobStatus.PARTIALLY_FAILED}, f"seed {seed}"
    final = dict.fromkeys(RowState, 0)
    for hospital in result.hospitals:
        final[hospital.status] += 1
    assert sum(final.values()) == 45


# -- the sending workers' combined row writes ---------------------------------------------------


def _rows(n):
    from hospital_bulk.protocols import JobRow

    return [
        JobRow(index=i, row=i + 1, line=i + 2, name=f"H{i}", address="A", phone=None, batch_id=None)
        for i in range(n)
    ]


async def test_rows_saved_while_a_write_is_under_way_go_out_together_in_the_next():
    from hospital_bulk._processor import _RowWriter

    writes: list[list[int]] = []
    gate = anyio.Event()

    async def write(rows):
        writes.append([r.index for r in rows])
        if len(writes) == 1:
            await gate.wait()

    writer = _RowWriter(write)
    rows = _rows(6)
    async with anyio.create_task_group() as tg:
        tg.start_soon(writer.save, [rows[0]])
        await anyio.wait_all_tasks_blocked()  # the first write is under way
        for row in rows[1:]:
            tg.start_soon(writer.save, [row])
        await anyio.wait_all_tasks_blocked()
        gate.set()
    assert writes == [[0], [1, 2, 3, 4, 5]]


async def test_a_failed_write_fails_every_saver_of_its_rows_and_not_the_later_ones():
    from hospital_bulk._processor import _RowWriter

    gate = anyio.Event()
    calls = 0

    async def write(rows):
        nonlocal calls
        calls += 1
        if calls == 1:
            await gate.wait()
        elif calls == 2:
            raise BackendError("store down")

    writer = _RowWriter(write)
    rows = _rows(4)
    outcomes: dict[int, str] = {}

    async def save(row):
        try:
            await writer.save([row])
        except BackendError:
            outcomes[row.index] = "failed"
        else:
            outcomes[row.index] = "saved"

    async with anyio.create_task_group() as tg:
        tg.start_soon(save, rows[0])
        await anyio.wait_all_tasks_blocked()  # the first write is under way
        for row in rows[1:3]:
            tg.start_soon(save, row)
        await anyio.wait_all_tasks_blocked()
        gate.set()
    await save(rows[3])
    assert outcomes == {0: "saved", 1: "failed", 2: "failed", 3: "saved"}
    assert calls == 3


async def test_a_cancelled_write_leaves_its_rows_to_the_next_one():
    from hospital_bulk._processor import _RowWriter

    writes: list[list[int]] = []
    started = anyio.Event()

    async def write(rows):
        if not writes:
            writes.append([])
            started.set()
            await anyio.sleep_forever()
        writes.append([r.index for r in rows])

    writer = _RowWriter(write)
    rows = _rows(2)
    async with anyio.create_task_group() as tg:
        tg.start_soon(writer.save, [rows[0]])
        await started.wait()
        tg.cancel_scope.cancel()
    await writer.save([rows[1]])
    assert writes == [[], [0, 1]]


async def test_deferred_outcomes_go_out_with_the_next_write_or_on_flush_then_their_callbacks():
    from hospital_bulk._processor import _RowWriter

    writes: list[list[int]] = []
    events: list[str] = []

    async def write(rows):
        writes.append([r.index for r in rows])

    writer = _RowWriter(write)
    rows = _rows(4)

    async def stored(name):
        events.append(name)

    writer.defer(rows[0], lambda: stored("row 0 stored"))
    writer.defer(rows[1], lambda: stored("row 1 stored"))
    assert writer.deferred
    assert writes == []  # nothing written yet, no event sent
    await writer.save([rows[2]])  # the next in-flight mark takes them along
    assert writes == [[0, 1, 2]]
    assert events == ["row 0 stored", "row 1 stored"]
    writer.defer(rows[3], lambda: stored("row 3 stored"))
    await writer.flush()
    await writer.flush()  # nothing waits: no write
    assert writes == [[0, 1, 2], [3]]
    assert events[-1] == "row 3 stored"
    writer.defer(rows[0], lambda: stored("dropped"))
    callbacks = writer.take_deferred()
    assert not writer.deferred
    assert len(callbacks) == 1


async def test_an_outcome_is_stored_and_announced_soon_while_every_worker_waits(fake):
    # One worker waits for the rate limit after its first create: no later write carries the
    # first row's outcome, which the flusher writes (and announces) within a short while.
    seen: list[tuple[str, float]] = []
    start = 0.0

    async def on_event(snapshot):
        seen.append((snapshot.counts[RowState.CREATED], time.monotonic() - start))

    async with processor(fake, create_rate="1/2 seconds", rate_margin=0, concurrency=1) as p:
        start = time.monotonic()
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: p.process(csv_bytes(2), on_progress=on_event))
            with anyio.fail_after(5):
                while not any(created == 1 for created, _ in seen):
                    await anyio.sleep(0.01)
            first = next(at for created, at in seen if created == 1)
            assert first < 1.0  # not held until the second create, 2 s later
            tg.cancel_scope.cancel()
