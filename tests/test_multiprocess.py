"""Several real processes sharing one Redis: the rate budget, idempotency, leases, restarts.

Every worker is its own Python process (tests/mp_worker.py, run with `sys.executable`) with its
own `AsyncBulkProcessor` on the Redis backend; processes share state exactly when they use the
same Redis database and key prefix (each test has its own prefix, see conftest). The fake
upstream is served by uvicorn on loopback in this process (`FakeServer`), so it sees every
request of every worker, and the checks count at the fake from its records, never trusting
the workers' own reports. Nothing here is randomised.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import anyio
import pytest
from helpers import (
    SUMMARY_LINES,
    Row,
    check_against_fake,
    committed_beyond_file,
    csv_bytes,
    max_in_any_window,
)
from redis_support import RedisServer, redis_server

from hospital_bulk import (
    AsyncBulkProcessor,
    IdempotencyConflictError,
    JobResult,
    JobStatus,
    RowState,
)
from hospital_bulk.backends.redis import RedisBackend
from hospital_bulk.testing import FakeDirectory, FakeServer

WORKER = Path(__file__).with_name("mp_worker.py")
# The URL of an upstream that is never called (submissions only validate and store).
NOWHERE = "http://127.0.0.1:9"

_T = TypeVar("_T")


# -- worker processes --------------------------------------------------------------------------


class Worker:
    """One worker process; its stdout and stderr go to files (no pipe can fill up)."""

    def __init__(self, directory: Path, name: str, spec: dict[str, Any]) -> None:
        self.name = name
        self.stdout = directory / f"{name}.out"
        self.stderr = directory / f"{name}.err"
        with self.stdout.open("wb") as out, self.stderr.open("wb") as err:
            self.process = subprocess.Popen(
                [sys.executable, str(WORKER), json.dumps(spec)],
                stdout=out,
                stderr=err,
                cwd=directory,
            )

    def wait(self, timeout: float) -> int:
        """Wait for the worker to exit; fail the test (with its output) if it hangs."""
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            pytest.fail(f"{self.name} did not exit within {timeout} s (a hang)\n{self.output()}")

    def kill(self) -> None:
        """SIGKILL: the process dies at once, without running any cleanup."""
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        lines = self.stdout.read_text().splitlines()
        events = [json.loads(line) for line in lines if line.startswith("{")]
        return [e for e in events if kind is None or e["event"] == kind]

    def event(self, kind: str) -> dict[str, Any]:
        found = self.events(kind)
        assert len(found) == 1, f"{self.name}: expected one {kind!r} event\n{self.output()}"
        return found[0]

    def output(self) -> str:
        return (
            f"--- {self.name}: exit code {self.process.returncode}\n"
            f"--- stdout:\n{self.stdout.read_text()}"
            f"--- stderr:\n{self.stderr.read_text()}"
        )

    def assert_clean_exit(self) -> None:
        """Exit code 0 and nothing alarming on stderr."""
        assert self.process.returncode == 0, self.output()
        err = self.stderr.read_text()
        for alarm in ("Traceback", "ERROR", "CRITICAL"):
            assert alarm not in err, f"{self.name} logged {alarm!r}\n{self.output()}"


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Callable[[str, dict[str, Any]], Worker]]:
    """Start workers; any still running at the end of the test is killed (by its own pid)."""
    started: list[Worker] = []

    def start(name: str, spec: dict[str, Any]) -> Worker:
        worker = Worker(tmp_path, name, spec)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        if worker.process.poll() is None:
            worker.process.kill()
            worker.process.wait()


def release(workers: list[Worker], directory: Path, timeout: float = 30.0) -> None:
    """Wait until every worker is ready at the barrier, then let them all go at once."""
    deadline = time.monotonic() + timeout
    for worker in workers:
        while not (directory / f"{worker.name}.ready").exists():
            if worker.process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"{worker.name} never reached the barrier\n{worker.output()}")
            time.sleep(0.01)
    (directory / "go").touch()


def barrier_spec(directory: Path, name: str) -> dict[str, str]:
    return {"ready": str(directory / f"{name}.ready"), "go": str(directory / "go")}


def write_csv(directory: Path, name: str, rows: int, start: int) -> tuple[Path, list[Row]]:
    path = directory / name
    path.write_bytes(csv_bytes(rows, start=start))
    expected: list[Row] = [
        (f"Hospital {i}", f"{i} Main Street", f"555-{i:04d}") for i in range(start, start + rows)
    ]
    return path, expected


# -- reading the fake and the shared store -------------------------------------------------


def committed_creates(fake: FakeDirectory) -> list[Any]:
    return [r for r in fake.creates() if r.committed]


def wait_for_creates(fake: FakeDirectory, count: int, worker: Worker, timeout: float) -> None:
    """Wait until the fake has committed `count` creates (the worker being mid-job)."""
    deadline = time.monotonic() + timeout
    while len(committed_creates(fake)) < count:
        if worker.process.poll() is not None:
            pytest.fail(f"{worker.name} ended before the fault was injected\n{worker.output()}")
        if time.monotonic() > deadline:
            pytest.fail(f"the fake never saw {count} creates\n{worker.output()}")
        time.sleep(0.005)


def creates_per_row(fake: FakeDirectory) -> Counter[tuple[Any, ...]]:
    """How often each (name, address, phone, batch) was committed, from the request log."""
    counts: Counter[tuple[Any, ...]] = Counter()
    for request in committed_creates(fake):
        body = request.body
        assert isinstance(body, dict)
        batch = body.get("creation_batch_id")
        key = (body["name"], body["address"], body.get("phone"), str(batch).lower())
        counts[key] += 1
    return counts


def with_processor(
    settings: dict[str, Any], use: Callable[[AsyncBulkProcessor], Awaitable[_T]]
) -> _T:
    """Run `use(processor)` with a processor of this process on the shared backend."""

    async def main() -> _T:
        async with AsyncBulkProcessor(NOWHERE, **settings) as processor:
            return await use(processor)

    return anyio.run(main)


def shared(redis_url: str, redis_prefix: str, **settings: Any) -> dict[str, Any]:
    return {"backend": redis_url, "redis_prefix": redis_prefix, **settings}


def job_ids(redis_url: str, redis_prefix: str) -> list[str]:
    """The ids the job store lists under the prefix."""

    async def main() -> list[str]:
        backend = RedisBackend(redis_url, prefix=redis_prefix)
        try:
            return await backend.job_store().list_ids()
        finally:
            await backend.aclose()

    return anyio.run(main)


# -- 1. one shared rate budget --------------------------------------------------------------

BUDGET, WINDOW = 20, 5.0


@pytest.mark.slow
def test_four_processes_share_one_create_budget(
    tmp_path: Path, redis_url: str, redis_prefix: str, workers: Any
) -> None:
    fake = FakeDirectory(create_latency=0.05, create_rate=(BUDGET, WINDOW))
    with FakeServer(fake) as server:
        settings = shared(redis_url, redis_prefix, create_rate=f"{BUDGET}/{WINDOW:g} seconds")
        files: list[list[Row]] = []
        started: list[Worker] = []
        for number in range(4):
            path, rows = write_csv(tmp_path, f"file{number}.csv", 15, start=1 + 15 * number)
            files.append(rows)
            name = f"worker{number}"
            spec = {
                "mode": "process",
                "base_url": server.url,
                "settings": settings,
                "file": str(path),
                **barrier_spec(tmp_path, name),
            }
            started.append(workers(name, spec))
        release(started, tmp_path)
        for worker in started:
            worker.wait(timeout=60)
        for worker in started:
            worker.assert_clean_exit()
        results = [JobResult.model_validate(w.event("result")["result"]) for w in started]

        creates = fake.creates()
        arrivals = [r.arrived_at for r in creates]
        peak = max_in_any_window(arrivals, WINDOW)
        ordered = sorted(arrivals)
        # The shortest time over which BUDGET + 1 creates arrived (a figure for the report;
        # the client-side window is WINDOW plus the 1 s margin).
        tightest = min(b - a for a, b in zip(ordered, ordered[BUDGET:], strict=False))
        statuses = Counter(r.status for r in fake.requests)
        span = max(arrivals) - min(arrivals)
        SUMMARY_LINES.append(
            f"multiprocess budget: {len(creates)} creates from 4 processes over {span:.1f} s; "
            f"max {peak} in any {WINDOW:g} s window, {BUDGET + 1} creates took {tightest:.2f} s "
            f"at least, {statuses[429]} answers 429, statuses {dict(statuses)}"
        )
        assert [r.status for r in results] == [JobStatus.COMPLETED] * 4, [
            (r.status, r.job_id) for r in results
        ]
        assert statuses[429] == 0, f"the fake answered 429 {statuses[429]} time(s)"
        assert peak <= BUDGET, f"{peak} creates in one {WINDOW:g} s window (budget {BUDGET})"
        assert len(creates) == 60, f"{len(creates)} create requests for 60 rows"
        assert check_against_fake(fake, files, results) == []
        assert committed_beyond_file(fake, files, results) == []
        assert fake.duplicates() == []
        assert len(fake.hospitals) == 60
        assert len(set(job_ids(redis_url, redis_prefix))) == 4


# -- 2. one idempotency space ---------------------------------------------------------------


@pytest.mark.slow
def test_sixty_four_concurrent_submissions_of_one_key_make_one_job(
    tmp_path: Path, redis_url: str, redis_prefix: str, workers: Any
) -> None:
    path, rows = write_csv(tmp_path, "same.csv", 30, start=1)
    settings = shared(redis_url, redis_prefix)
    started = [
        workers(
            f"submitter{number}",
            {
                "mode": "submit_many",
                "base_url": NOWHERE,
                "settings": settings,
                "file": str(path),
                "key": "same-key",
                "count": 16,
                **barrier_spec(tmp_path, f"submitter{number}"),
            },
        )
        for number in range(4)
    ]
    release(started, tmp_path)
    for worker in started:
        worker.wait(timeout=30)
    for worker in started:
        worker.assert_clean_exit()
    answers = [job_id for w in started for job_id in w.event("submitted_many")["job_ids"]]
    assert len(answers) == 64
    assert len(set(answers)) == 1, Counter(answers)
    (job_id,) = set(answers)
    assert job_ids(redis_url, redis_prefix) == [job_id]

    async def stored(processor: AsyncBulkProcessor) -> tuple[JobStatus, int, str | None]:
        snapshot = await processor.status(job_id)
        return snapshot.status, snapshot.total_rows, snapshot.idempotency_key

    assert with_processor(settings, stored) == (JobStatus.PENDING, len(rows), "same-key")

    other, _ = write_csv(tmp_path, "other.csv", 30, start=101)
    conflicting = workers(
        "conflict",
        {
            "mode": "submit",
            "base_url": NOWHERE,
            "settings": settings,
            "file": str(other),
            "key": "same-key",
        },
    )
    assert conflicting.wait(timeout=30) == 3, conflicting.output()
    error = conflicting.event("error")
    assert error["type"] == IdempotencyConflictError.__name__, conflicting.output()
    assert job_ids(redis_url, redis_prefix) == [job_id]
    SUMMARY_LINES.append(
        f"multiprocess idempotency: 64 submissions from 4 processes -> {len(set(answers))} "
        f"job id(s), {len(job_ids(redis_url, redis_prefix))} job(s) stored; "
        f"another file with the key -> {error['type']}"
    )


# -- 3. a worker killed mid-job, taken over by another process ---------------------------------

LEASE_TTL = 2.0


@pytest.mark.slow
@pytest.mark.parametrize(
    ("how", "takers"),
    [("resume", 1), ("recover", 2)],
    ids=["resume", "two-racing-recovers"],
)
def test_a_job_of_a_killed_worker_is_taken_over_exactly_once(
    tmp_path: Path, redis_url: str, redis_prefix: str, workers: Any, how: str, takers: int
) -> None:
    fake = FakeDirectory(create_latency=0.25, create_rate=None)
    with FakeServer(fake) as server:
        path, rows = write_csv(tmp_path, "forty.csv", 40, start=1)
        settings = shared(
            redis_url,
            redis_prefix,
            create_rate="1000/1 second",
            concurrency=4,
            lease_ttl=LEASE_TTL,
            reconcile_after=0.5,
        )
        first = workers(
            "first",
            {"mode": "process", "base_url": server.url, "settings": settings, "file": str(path)},
        )
        wait_for_creates(fake, 10, first, timeout=30)
        first.kill()
        killed_at = time.monotonic()
        assert first.process.returncode == -signal.SIGKILL
        before = len(committed_creates(fake))
        assert before < 40, "the worker was not killed mid-job"
        job_id = first.event("submitted")["job_id"]

        async def status(processor: AsyncBulkProcessor) -> JobStatus:
            return (await processor.status(job_id)).status

        # Its lease is still live: the job still counts as running.
        assert with_processor(settings, status) is JobStatus.RUNNING
        time.sleep(max(0.0, killed_at + LEASE_TTL + 0.3 - time.monotonic()))
        # Fresh processes: each reads the status, then (with two, together) takes the job over.
        names = [f"taker{number}" for number in range(takers)]
        taking = [
            workers(
                name,
                {
                    "mode": "takeover",
                    "how": how,
                    "base_url": server.url,
                    "settings": settings,
                    "job_id": job_id,
                    **(barrier_spec(tmp_path, name) if takers > 1 else {}),
                },
            )
            for name in names
        ]
        if takers > 1:
            release(taking, tmp_path)
        for taker in taking:
            taker.wait(timeout=45)
        for taker in taking:
            taker.assert_clean_exit()
        counts: dict[str, int] = {}
        for taker in taking:
            interrupted = taker.event("status")
            assert interrupted["status"] == "interrupted", taker.output()
            counts = interrupted["counts"]
            # Every create the fake committed was stored in flight (or created) before it left.
            assert counts.get("created", 0) + counts.get("in_flight", 0) >= before, counts
        found = [JobResult.model_validate(r) for t in taking for r in t.event("results")["results"]]
        outputs = "\n".join(t.output() for t in taking)
        assert found, f"nobody took the job over\n{outputs}"
        assert all(r.job_id == job_id for r in found)
        assert [r.status for r in found] == [JobStatus.COMPLETED] * len(found), outputs
        result = found[0]

        problems = check_against_fake(fake, [rows], [result])
        beyond = committed_beyond_file(fake, [rows], [result])
        SUMMARY_LINES.append(
            f"multiprocess takeover ({how} x{takers}, {len(found)} reported the job): "
            f"{before} row(s) created before SIGKILL "
            f"(stored then: {counts}), "
            f"{len(committed_creates(fake))} creates committed in all for 40 rows, "
            f"{len(beyond)} duplicate(s), {len(problems)} problem(s), job {result.status.value}"
        )
        assert problems == []
        assert beyond == []
        assert fake.duplicates() == []
        assert len(committed_creates(fake)) == 40
        assert len(fake.hospitals) == 40
        assert all(h.active for h in fake.hospitals)
        assert {r.status for r in result.hospitals} == {RowState.CREATED_AND_ACTIVATED}
        assert with_processor(settings, status) is JobStatus.COMPLETED


# -- 4. Redis restarted (all keys lost) mid-job ------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RedisLoss:
    """When and how the job's Redis goes away."""

    down: float  # seconds the server is down before it starts again (empty)
    rows: int
    create_rate: str
    concurrency: int
    create_latency: float
    after_creates: int  # creates committed at the fake before the server stops
    settle: float = 0.0  # seconds more before it stops


REDIS_LOSSES = {
    # Restarted at once while rows are being created.
    "restart-while-sending": RedisLoss(0.0, 40, "1000/1 second", 4, 0.2, 8),
    # Down for 3 s while rows are being created, then back empty.
    "outage-while-sending": RedisLoss(3.0, 40, "1000/1 second", 4, 0.2, 8),
    # Restarted while the job waits for its rate budget (3 creates per 10 s): no store write
    # is due for seconds, only the lease's renewals.
    "restart-while-waiting-for-the-budget": RedisLoss(0.0, 10, "3/10 seconds", 2, 0.05, 3, 0.3),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(REDIS_LOSSES))
def test_a_redis_restart_mid_job_fails_loudly_and_never_duplicates(
    tmp_path: Path, workers: Any, case: str
) -> None:
    if shutil.which("redis-server") is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("redis-server is not installed, and CI must run this test")
        pytest.skip("redis-server is not installed")
    loss = REDIS_LOSSES[case]
    fake = FakeDirectory(create_latency=loss.create_latency, create_rate=None)
    with redis_server() as private, FakeServer(fake) as server:
        path, rows = write_csv(tmp_path, "file.csv", loss.rows, start=1)
        settings = {
            "backend": private.url,
            "redis_prefix": "restart",
            "create_rate": loss.create_rate,
            "concurrency": loss.concurrency,
            "lease_ttl": 3.0,
            "reconcile_after": 0.5,
        }
        worker = workers(
            "worker",
            {"mode": "process", "base_url": server.url, "settings": settings, "file": str(path)},
        )
        wait_for_creates(fake, loss.after_creates, worker, timeout=30)
        time.sleep(loss.settle)
        assert worker.process.poll() is None, worker.output()
        restart(private, loss.down)
        code = worker.wait(timeout=45)

        per_row = creates_per_row(fake)
        twice = {key: n for key, n in per_row.items() if n > 1}
        outcome = _outcome(worker, code)
        SUMMARY_LINES.append(
            f"multiprocess redis {case}: {outcome}; {sum(per_row.values())} creates committed "
            f"for {loss.rows} rows, {len(twice)} row(s) created twice"
        )
        print(outcome)
        print(worker.output())
        # Nothing of the lost job came back half-written after the restart.
        assert job_ids(private.url, "restart") == [], worker.output()
        assert twice == {}, twice
        assert fake.duplicates() == []
        if code == 0:
            result = JobResult.model_validate(worker.event("result")["result"])
            assert result.status is JobStatus.COMPLETED, worker.output()
            assert check_against_fake(fake, [rows], [result]) == []
        else:
            # A clear error of the library's that names the lost store, not a raw redis error
            # and not a takeover that never happened (LeaseLostError).
            assert code == 3, worker.output()
            error = worker.event("error")
            assert error["type"] in ("BackendError", "JobNotFoundError"), worker.output()
            assert error["module"].startswith("hospital_bulk"), worker.output()
            message = error["message"].lower()
            assert "redis" in message or "store" in message, worker.output()


def restart(redis: RedisServer, down: float) -> None:
    """Stop the server (every key is lost: it keeps nothing on disk), start it on its port."""
    redis.stop()
    time.sleep(down)
    redis.start()


def _outcome(worker: Worker, code: int) -> str:
    if code == 0:
        return f"the job ended {worker.event('result')['result']['status']}"
    errors = worker.events("error")
    if errors:
        return f"the worker exited {code}: {errors[0]['type']}: {errors[0]['message']}"
    return f"the worker exited {code} with no error reported"
