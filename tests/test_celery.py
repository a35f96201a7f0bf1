"""The Celery integration: real worker processes, a Redis broker, SIGKILL and redelivery.

Workers are real ``celery worker`` processes (``--pool=solo``) running the app of
tests/celery_app.py, configured from environment variables: each test has its own queue, its
own Celery key prefix (broker queues, unacknowledged messages and results, in database 12 of
the tests' Redis server; deleted afterwards, never flushed) and its own hospital_bulk key
prefix. The fake upstream is served by uvicorn in this process (`FakeServer`), so its records
count every request of every worker; the checks count there, never trusting the workers'
reports. Workers still running at the end of a test are killed by their own pid.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import anyio
import pytest
from celery import Celery
from celery_app import VISIBILITY_TIMEOUT, build_app
from helpers import SUMMARY_LINES, Row, check_against_fake, committed_beyond_file, csv_bytes
from redis_support import delete_prefix

from hospital_bulk import (
    AsyncBulkProcessor,
    BackendError,
    ConfigurationError,
    HospitalBulkError,
    JobResult,
    JobStatus,
    RowState,
)
from hospital_bulk.backends.redis import RedisBackend
from hospital_bulk.integrations import JobRunner
from hospital_bulk.integrations.celery import (
    CeleryRunner,
    HospitalBulkTasks,
    register_tasks,
)
from hospital_bulk.testing import FakeDirectory, FakeServer

TESTS = Path(__file__).parent
MP_WORKER = TESTS / "mp_worker.py"
# The URL of an upstream that is never called (submissions only validate and store).
NOWHERE = "http://127.0.0.1:9"
CELERY_DB = 12
LEASE_TTL = 2.0

_T = TypeVar("_T")


def rows_of(count: int, start: int = 1) -> list[Row]:
    """The rows of ``csv_bytes(count, start=start)``."""
    return [
        (f"Hospital {i}", f"{i} Main Street", f"555-{i:04d}") for i in range(start, start + count)
    ]


def with_processor(
    redis_url: str, redis_prefix: str, use: Callable[[AsyncBulkProcessor], Awaitable[_T]]
) -> _T:
    """Run `use(processor)` with a processor of this process on the shared Redis store."""

    async def main() -> _T:
        async with AsyncBulkProcessor(
            NOWHERE, backend=redis_url, redis_prefix=redis_prefix
        ) as processor:
            return await use(processor)

    return anyio.run(main)


# -- worker processes --------------------------------------------------------------------------


class Process:
    """A child process whose output goes to a file (no pipe can fill up)."""

    def __init__(self, name: str, log: Path, command: list[str], env: dict[str, str]) -> None:
        self.name = name
        self.log = log
        with log.open("wb") as out:
            self.process = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, cwd=TESTS, env=env
            )

    def output(self) -> str:
        text = self.log.read_text(errors="replace")
        return f"--- {self.name} (exit code {self.process.poll()}):\n{text[-6000:]}"

    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL: the process dies at once, without running any cleanup."""
        if self.alive():
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)


class CeleryWorker(Process):
    """``celery -A celery_app worker --pool=solo`` consuming the test's queue."""

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while " ready." not in self.log.read_text(errors="replace"):
            if not self.alive() or time.monotonic() > deadline:
                pytest.fail(f"{self.name} did not start\n{self.output()}")
            time.sleep(0.05)


class Harness:
    """One test's Celery setup: its queue, keys, environment, sending app and workers."""

    def __init__(self, directory: Path, redis_url: str, redis_prefix: str) -> None:
        parts = urlsplit(redis_url)
        self.directory = directory
        self.redis_url = redis_url
        self.redis_prefix = redis_prefix
        self.broker = urlunsplit((parts.scheme, parts.netloc, f"/{CELERY_DB}", parts.query, ""))
        token = uuid.uuid4().hex[:12]
        self.queue = f"hbcelery-{token}"
        self.keyprefix = f"hbcelery-{token}:"
        self.env = {
            "HB_CELERY_BROKER": self.broker,
            "HB_CELERY_QUEUE": self.queue,
            "HB_CELERY_KEYPREFIX": self.keyprefix,
            "REDIS_URL": redis_url,
            "HOSPITAL_BULK_REDIS_PREFIX": redis_prefix,
            "RATE_LIMIT_REQUESTS": "1000",
            "RATE_LIMIT_PERIOD": "1",
        }
        self.app, self.tasks = build_app(self.env)
        self.processes: list[Process] = []

    def worker_env(self, base_url: str, settings: dict[str, Any] | None) -> dict[str, str]:
        env = {key: value for key, value in os.environ.items() if not key.startswith("HB_")}
        env.update(self.env)
        env["HOSPITAL_API_BASE_URL"] = base_url
        env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
        if settings is not None:
            env["HB_CELERY_SETTINGS"] = json.dumps(settings)
        return env

    def start_worker(
        self, name: str, base_url: str, settings: dict[str, Any] | None = None
    ) -> CeleryWorker:
        command = [
            sys.executable, "-m", "celery", "-A", "celery_app", "worker",
            "--pool=solo", "--concurrency=1", "-Q", self.queue,
            "-n", f"{name}-{self.queue}@%h",
            "--without-gossip", "--without-mingle", "--without-heartbeat",
            "--loglevel=INFO",
        ]  # fmt: skip
        worker = CeleryWorker(
            name, self.directory / f"{name}.log", command, self.worker_env(base_url, settings)
        )
        self.processes.append(worker)
        return worker

    def start_process(self, name: str, spec: dict[str, Any]) -> Process:
        """A tests/mp_worker.py process (a plain processor, no Celery)."""
        command = [sys.executable, str(MP_WORKER), json.dumps(spec)]
        process = Process(name, self.directory / f"{name}.log", command, dict(os.environ))
        self.processes.append(process)
        return process

    def outputs(self) -> str:
        return "\n".join(p.output() for p in self.processes)

    def close(self) -> None:
        for process in self.processes:
            process.kill()
        self.app.close()
        delete_prefix(self.broker, self.keyprefix)


@pytest.fixture
def celery(tmp_path: Path, redis_url: str, redis_prefix: str) -> Iterator[Harness]:
    harness = Harness(tmp_path, redis_url, redis_prefix)
    try:
        yield harness
    finally:
        harness.close()


# -- waiting, at the fake and in the shared store ---------------------------------------------


def committed_creates(fake: FakeDirectory) -> int:
    return sum(1 for r in fake.creates() if r.committed)


def wait_for_creates(fake: FakeDirectory, count: int, process: Process, timeout: float) -> None:
    """Wait until the fake has committed `count` creates (the process being mid-job)."""
    deadline = time.monotonic() + timeout
    while committed_creates(fake) < count:
        if not process.alive():
            pytest.fail(f"{process.name} ended before the fault\n{process.output()}")
        if time.monotonic() > deadline:
            pytest.fail(f"the fake never saw {count} creates\n{process.output()}")
        time.sleep(0.005)


def follow(
    harness: Harness, job_id: str, until: set[JobStatus], timeout: float
) -> tuple[JobStatus, list[JobStatus]]:
    """Poll the job's status from this process until it is one of `until`.

    Returns:
        The final status and every distinct status seen, in order.
    """

    async def poll(processor: AsyncBulkProcessor) -> tuple[JobStatus, list[JobStatus]]:
        seen: list[JobStatus] = []
        with anyio.move_on_after(timeout):
            while True:
                status = (await processor.status(job_id)).status
                if not seen or seen[-1] is not status:
                    seen.append(status)
                if status in until:
                    return status, seen
                await anyio.sleep(0.05)
        pytest.fail(f"job {job_id} still {seen[-1:]} after {timeout} s\n{harness.outputs()}")

    return with_processor(harness.redis_url, harness.redis_prefix, poll)


def result_of(harness: Harness, job_id: str) -> JobResult:
    async def read(processor: AsyncBulkProcessor) -> JobResult:
        return await processor.result(job_id)

    return with_processor(harness.redis_url, harness.redis_prefix, read)


def check_exactly_once(fake: FakeDirectory, rows: list[Row], result: JobResult) -> None:
    assert result.status is JobStatus.COMPLETED
    assert check_against_fake(fake, [rows], [result]) == []
    assert committed_beyond_file(fake, [rows], [result]) == []
    assert fake.duplicates() == []
    assert len(fake.hospitals) == len(rows)
    assert all(h.active for h in fake.hospitals)
    assert {r.status for r in result.hospitals} == {RowState.CREATED_AND_ACTIVATED}


def figures(fake: FakeDirectory, rows: list[Row], result: JobResult) -> str:
    problems = check_against_fake(fake, [rows], [result])
    duplicates = len(committed_beyond_file(fake, [rows], [result]))
    missing = sum(1 for p in problems if p.startswith("missing"))
    return (
        f"{committed_creates(fake)} creates committed for {len(rows)} rows, "
        f"{duplicates} duplicate(s), {missing} missing, {len(fake.hospitals)} hospitals "
        f"({sum(h.active for h in fake.hospitals)} active), job {result.status.value}"
    )


# -- registration, without workers ------------------------------------------------------------


def test_register_tasks_names_options_and_schedule() -> None:
    app = Celery("unit", broker="memory://", set_as_current=False)
    tasks = register_tasks(app, name_prefix="loader", recover_every=15)
    assert isinstance(tasks, HospitalBulkTasks)
    assert tasks.run_job.name == "loader.run_job"
    assert tasks.resume_job.name == "loader.resume_job"
    assert tasks.recover_interrupted_jobs.name == "loader.recover_interrupted_jobs"
    for task in (tasks.run_job, tasks.resume_job):
        assert task.acks_late is True
        assert task.reject_on_worker_lost is True
        assert task.max_retries == 10
    assert tasks.recover_interrupted_jobs.acks_late is False
    assert tasks.recover_schedule_key == "loader.recover_interrupted_jobs"
    entry = app.conf.beat_schedule["loader.recover_interrupted_jobs"]
    assert entry["task"] == "loader.recover_interrupted_jobs"
    assert entry["schedule"] == 15.0
    assert entry["options"]["expires"] == 15.0
    assert {"loader.run_job", "loader.resume_job"} <= set(app.tasks)

    quiet = Celery("unit2", broker="memory://", set_as_current=False)
    unscheduled = register_tasks(quiet, recover_every=None)
    assert unscheduled.recover_schedule_key is None
    assert quiet.conf.beat_schedule == {}
    assert unscheduled.run_job.name == "hospital_bulk.run_job"


@pytest.mark.parametrize(
    "options",
    [{"name_prefix": ""}, {"recover_every": 0}, {"recover_every": True}, {"lease_retries": -1}],
)
def test_register_tasks_rejects_wrong_arguments(options: dict[str, Any]) -> None:
    app = Celery("unit", broker="memory://", set_as_current=False)
    with pytest.raises(ConfigurationError):
        register_tasks(app, **options)


def test_the_runner_refuses_a_processor_with_jobs_in_its_own_memory() -> None:
    app = Celery("unit", broker="memory://", set_as_current=False)
    runner = CeleryRunner(register_tasks(app))
    assert isinstance(runner, JobRunner)

    async def main() -> None:
        async with AsyncBulkProcessor(NOWHERE) as processor:
            job = await processor.submit(csv_bytes(2))
            with pytest.raises(ConfigurationError, match="Redis backend"):
                await runner.start(processor, job.job_id, resume=False)

    anyio.run(main)


def test_a_task_refuses_a_factory_with_jobs_in_its_own_memory() -> None:
    app = Celery("unit", broker="memory://", set_as_current=False)
    tasks = register_tasks(app, lambda: AsyncBulkProcessor(NOWHERE))
    with pytest.raises(ConfigurationError, match="Redis backend"):
        tasks.run_job("some-job")


def test_a_broker_that_is_down_is_a_backend_error(redis_url: str, redis_prefix: str) -> None:
    app = Celery("unit", broker="redis://127.0.0.1:9/0", set_as_current=False)
    # No publishing retries: the refused connection is an error at once.
    app.conf.update(task_publish_retry=False, broker_transport_options={"max_retries": 0})
    runner = CeleryRunner(register_tasks(app, recover_every=None))

    async def main() -> JobStatus:
        async with AsyncBulkProcessor(
            NOWHERE, backend=redis_url, redis_prefix=redis_prefix
        ) as processor:
            job = await processor.submit(csv_bytes(2))
            with pytest.raises(BackendError, match="could not be handed to Celery"):
                await runner.start(processor, job.job_id, resume=False)
            return (await processor.status(job.job_id)).status

    try:
        assert anyio.run(main) is JobStatus.PENDING
    finally:
        app.close()


# -- the task bodies in this process (no broker) ---------------------------------------------


def local_tasks(
    redis_url: str, redis_prefix: str, fake: FakeDirectory, made: list[AsyncBulkProcessor]
) -> HospitalBulkTasks:
    """Tasks whose processors use the shared store and the in-process fake."""

    def factory() -> AsyncBulkProcessor:
        processor = AsyncBulkProcessor(
            "http://fake",
            transport=fake.transport(),
            backend=redis_url,
            redis_prefix=redis_prefix,
            create_rate="1000/1 second",
            lease_ttl=LEASE_TTL,
        )
        made.append(processor)
        return processor

    app = Celery("local", broker="memory://", set_as_current=False)
    return register_tasks(app, factory, recover_every=None, lease_retries=3)


def test_task_bodies_run_return_json_retry_when_leased_and_stop_when_rolled_back(
    redis_url: str, redis_prefix: str
) -> None:
    fake = FakeDirectory(create_rate=None)
    made: list[AsyncBulkProcessor] = []
    tasks = local_tasks(redis_url, redis_prefix, fake, made)

    async def submit(processor: AsyncBulkProcessor) -> str:
        return (await processor.submit(csv_bytes(5))).job_id

    # Run to the end; the value is the JobResult as JSON.
    job_id = with_processor(redis_url, redis_prefix, submit)
    value = tasks.run_job(job_id)
    assert json.loads(json.dumps(value)) == value
    result = JobResult.model_validate(value)
    check_exactly_once(fake, rows_of(5), result)
    # Completed: the result at once, nothing sent.
    sent = len(fake.requests)
    assert tasks.resume_job(job_id) == value
    assert len(fake.requests) == sent

    # Leased by another (dead) worker: retried, at most `lease_retries` times, then the error.
    leased = with_processor(redis_url, redis_prefix, submit)

    async def hold(job: str) -> None:
        backend = RedisBackend(redis_url, prefix=redis_prefix)
        try:
            await backend.job_store().acquire_lease(job, "a-dead-worker", 30.0)
        finally:
            await backend.aclose()

    anyio.run(hold, leased)
    made.clear()
    eager = tasks.run_job.apply(args=(leased,))  # eager retries come at once (no countdown)
    # A JobStateError; Celery hands it on as a HospitalBulkError, since the library's
    # exceptions with keyword-only arguments do not survive pickling.
    assert isinstance(eager.result, HospitalBulkError), eager.result
    assert "running in another worker" in str(eager.result)
    assert len(made) == 1 + 3

    # Rolled back: no retry.
    async def roll_back() -> None:
        async with AsyncBulkProcessor(
            "http://fake", transport=fake.transport(), backend=redis_url, redis_prefix=redis_prefix
        ) as processor:
            await processor.rollback(job_id)

    anyio.run(roll_back)
    made.clear()
    eager = tasks.run_job.apply(args=(job_id,))
    assert isinstance(eager.result, HospitalBulkError), eager.result
    assert "rolled back" in str(eager.result)
    assert len(made) == 1


# -- 1. a job handed to a worker -------------------------------------------------------------


@pytest.mark.slow
def test_a_job_handed_to_celery_completes_exactly_once(celery: Harness) -> None:
    fake = FakeDirectory(create_rate=None)
    with FakeServer(fake) as server:
        worker = celery.start_worker("worker", server.url)  # the default factory (from_env)
        worker.wait_ready()
        runner = CeleryRunner(celery.tasks)
        rows = rows_of(30)

        async def submit_and_start(processor: AsyncBulkProcessor) -> str:
            job = await processor.submit(csv_bytes(30))
            await runner.start(processor, job.job_id, resume=False)
            return job.job_id

        started = time.monotonic()
        job_id = with_processor(celery.redis_url, celery.redis_prefix, submit_and_start)
        status, seen = follow(celery, job_id, {JobStatus.COMPLETED, JobStatus.FAILED}, 45)
        took = time.monotonic() - started
        result = result_of(celery, job_id)
        SUMMARY_LINES.append(
            f"celery run_job: statuses seen {[s.value for s in seen]}, done in {took:.1f} s; "
            + figures(fake, rows, result)
        )
        assert status is JobStatus.COMPLETED, celery.outputs()
        check_exactly_once(fake, rows, result)
        assert committed_creates(fake) == 30
        assert worker.alive(), worker.output()


# -- 2. a worker killed mid-job; the task is delivered again ---------------------------------


@pytest.mark.slow
def test_a_job_of_a_killed_worker_is_redelivered_and_completes_exactly_once(
    celery: Harness,
) -> None:
    fake = FakeDirectory(create_latency=0.2, create_rate=None)
    settings = {"lease_ttl": LEASE_TTL, "reconcile_after": 0.5, "concurrency": 2}
    with FakeServer(fake) as server:
        first = celery.start_worker("first", server.url, settings)
        first.wait_ready()
        runner = CeleryRunner(celery.tasks)
        rows = rows_of(40)

        async def submit_and_start(processor: AsyncBulkProcessor) -> str:
            job = await processor.submit(csv_bytes(40))
            await runner.start(processor, job.job_id, resume=False)
            return job.job_id

        job_id = with_processor(celery.redis_url, celery.redis_prefix, submit_and_start)
        wait_for_creates(fake, 8, first, timeout=30)
        first.kill()
        killed_at = time.monotonic()
        assert first.process.returncode == -signal.SIGKILL
        before = committed_creates(fake)
        assert before < 40, "the worker was not killed mid-job"

        async def status(processor: AsyncBulkProcessor) -> JobStatus:
            return (await processor.status(job_id)).status

        # Its lease is still live: the job still counts as running.
        assert with_processor(celery.redis_url, celery.redis_prefix, status) is JobStatus.RUNNING
        second = celery.start_worker("second", server.url, settings)
        final, seen = follow(celery, job_id, {JobStatus.COMPLETED, JobStatus.FAILED}, 60)
        took = time.monotonic() - killed_at
        result = result_of(celery, job_id)
        log = second.log.read_text(errors="replace")
        SUMMARY_LINES.append(
            f"celery SIGKILL + redelivery (visibility {VISIBILITY_TIMEOUT} s, lease "
            f"{LEASE_TTL:g} s): {before} row(s) created before SIGKILL, completed {took:.1f} s "
            f"after it, statuses seen {[s.value for s in seen]}; " + figures(fake, rows, result)
        )
        assert final is JobStatus.COMPLETED, celery.outputs()
        # The second worker ran the redelivered task (it was never sent twice).
        assert log.count("Task hospital_bulk.run_job[") >= 2, second.output()
        check_exactly_once(fake, rows, result)
        assert committed_creates(fake) == 40


# -- 3. the periodic recovery picks up an interrupted job ---------------------------------------


@pytest.mark.slow
def test_recover_interrupted_jobs_takes_over_a_dead_workers_job(
    celery: Harness, tmp_path: Path
) -> None:
    fake = FakeDirectory(create_latency=0.2, create_rate=None)
    settings = {"lease_ttl": LEASE_TTL, "reconcile_after": 0.5, "concurrency": 2}
    with FakeServer(fake) as server:
        rows = rows_of(30)
        path = tmp_path / "thirty.csv"
        path.write_bytes(csv_bytes(30))
        # A plain worker process (no Celery) runs the job, and is killed mid-job.
        plain = celery.start_process(
            "plain",
            {
                "mode": "process",
                "base_url": server.url,
                "settings": {
                    "backend": celery.redis_url,
                    "redis_prefix": celery.redis_prefix,
                    "create_rate": "1000/1 second",
                    **settings,
                },
                "file": str(path),
            },
        )
        worker = celery.start_worker("worker", server.url, settings)
        wait_for_creates(fake, 6, plain, timeout=30)
        plain.kill()
        before = committed_creates(fake)
        submitted = [
            json.loads(line)
            for line in plain.log.read_text().splitlines()
            if line.startswith('{"event": "submitted"')
        ]
        job_id = submitted[0]["job_id"]
        status, _ = follow(celery, job_id, {JobStatus.INTERRUPTED}, LEASE_TTL + 5)
        assert status is JobStatus.INTERRUPTED
        worker.wait_ready()

        sent = celery.tasks.recover_interrupted_jobs.apply_async()
        values = sent.get(timeout=45, propagate=True)
        results = [JobResult.model_validate(v) for v in values]
        assert [r.job_id for r in results] == [job_id], celery.outputs()
        result = results[0]
        SUMMARY_LINES.append(
            f"celery recover_interrupted_jobs: {before} row(s) created before SIGKILL; "
            + figures(fake, rows, result)
        )
        check_exactly_once(fake, rows, result)
        assert committed_creates(fake) == 30
        assert result_of(celery, job_id).status is JobStatus.COMPLETED


# -- 4. a redelivered task finds the job still leased: it retries, not fails ------------------


@pytest.mark.slow
def test_a_task_retries_while_another_worker_holds_the_lease(celery: Harness) -> None:
    fake = FakeDirectory(create_rate=None)
    settings = {"lease_ttl": LEASE_TTL}
    held_for = 3.0
    with FakeServer(fake) as server:
        worker = celery.start_worker("worker", server.url, settings)
        runner = CeleryRunner(celery.tasks)
        rows = rows_of(10)

        async def submit_held_and_send(processor: AsyncBulkProcessor) -> tuple[str, Any, float]:
            job = await processor.submit(csv_bytes(10))
            # A worker that died holding the job: its lease lapses in `held_for` seconds.
            backend = RedisBackend(celery.redis_url, prefix=celery.redis_prefix)
            try:
                await backend.job_store().acquire_lease(job.job_id, "a-dead-worker", held_for)
            finally:
                await backend.aclose()
            lapses = time.monotonic() + held_for
            sent = await runner.send(processor, job.job_id, resume=True)
            return job.job_id, sent, lapses

        worker.wait_ready()
        job_id, sent, lapses = with_processor(
            celery.redis_url, celery.redis_prefix, submit_held_and_send
        )
        value = sent.get(timeout=45, propagate=True)
        result = JobResult.model_validate(value)
        log = worker.log.read_text(errors="replace")
        first = min(r.arrived_at for r in fake.creates())
        SUMMARY_LINES.append(
            f"celery lease retry: the first create {first - lapses:+.2f} s after the dead "
            f"worker's lease lapsed, {log.count('retry: Retry in')} retry(ies); "
            + figures(fake, rows, result)
        )
        assert result.job_id == job_id
        assert "retry: Retry in" in log, worker.output()
        assert "held by another worker" in log, worker.output()
        assert first >= lapses - 0.2, "the job was run while another worker held it"
        check_exactly_once(fake, rows, result)
