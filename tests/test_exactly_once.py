"""No duplicate and no lost row: seeded fault schedules, cancellations and resumes.

Every job here runs against the fake upstream with random faults drawn from a seeded
generator (503 before commit, commit then timeout, commit then reset, spurious 429), is
cancelled once at a point chosen from its seed, and is resumed until it reports
``completed``. The fake is the oracle: `helpers.check_against_fake` compares what it holds
with the files submitted (duplicates, missing and unexpected rows, inactive rows, reports the
fake contradicts), never trusting the library's own report.

Reproducing a failure: every assertion names its seed and schedule; run
``pytest tests/test_exactly_once.py -k "seeds_<chunk>"`` or call `run_schedule(make_schedule(
seed))` from a scratch test. Timing-dependent details (which of twenty concurrent rows a fault
hits) follow the event loop's scheduling, which is deterministic for a given schedule as long
as nothing else runs.

How the harness works:

- `Tap` sits between the processor and the fake's transport: it records what the *client*
  saw of every request (its departure time, its answer or its error, or its cancellation)
  and fires the schedule's cancellation at an exact request: ``before`` the fake sees it,
  ``during`` its handling (the fake's create is in its latency phase: cancelling the caller
  cancels it there, uncommitted), or ``after`` the fake committed and answered (the answer
  is lost on the way back).
- Other schedules cancel on the job's event stream (``processor.events``) after the k-th
  event of a kind; the cancellation then lands shortly after that event.
- A cancellation is either ``processor.cancel(job_id)`` or the caller's own task being
  cancelled (the job is left ``cancelled`` in both cases).
- The processor's rate limiter runs on a virtual clock: a spurious 429 names the contract's
  one-minute window and pauses every sender for that long, which costs no real time here.
  The retry policy is `RetryPolicy.testing()` (no backoff sleeps); the reconciliation
  horizon, the breaker's recovery time and the fake's latencies are real but tiny.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any

import anyio
import anyio.lowlevel
import httpx
import pytest
from anyio.abc import TaskGroup, TaskStatus
from helpers import (
    SUMMARY_LINES,
    Row,
    check_against_fake,
    committed_beyond_file,
    compare_with_fake,
    csv_of,
)

from hospital_bulk import (
    AsyncBulkProcessor,
    JobResult,
    JobSnapshot,
    JobStatus,
    RetryPolicy,
    RowState,
    WaitReason,
)
from hospital_bulk._jobs import JobRow
from hospital_bulk._ratelimit import MemoryRateLimiter
from hospital_bulk.backends.memory import MemoryJobStore
from hospital_bulk.testing import FakeDirectory, FakeServer, Fault, Faults

pytestmark = pytest.mark.anyio

HORIZON = 0.02  # reconcile_after of the seeded jobs, in seconds
# How much sooner than the horizon a read may follow an ambiguous create's departure (as the
# tap times them). The processor counts the horizon from its own stamp, taken just before
# the request leaves; on a loaded machine the process can be preempted for a few ms between
# the two (and see test_the_horizon_counts_from_when_the_create_left). Half the horizon
# still catches a processor that does not wait: its reads follow within a few ms.
TOLERANCE = HORIZON / 2
JITTER = 0.002  # the fake's create latency: up to 2 ms, so a create can be cancelled mid-way
ROUTES = frozenset({"create", "batch_activate", "batch_list", "batch_delete", "delete"})
SEED_COUNT = 200
CHUNK = 20
SEEDS = list(range(1, SEED_COUNT + 1))
MAX_RESUMES = 10
ROWS = 20

EVENT_KINDS = (
    "job_started",
    "row_created",
    "row_unknown",
    "waiting",
    "batch_reconciled",
    "batch_activated",
)
PHASES = ("before", "during", "after")


def random_faults(**changes: Any) -> Faults:
    """The seeded fault rates of the suite."""
    values: dict[str, Any] = {
        "error_rate": 0.10,
        "timeout_after_commit_rate": 0.05,
        "reset_after_commit_rate": 0.03,
        "rate_limit_rate": 0.05,
        "latency_jitter": JITTER,
        "routes": ROUTES,
    }
    values.update(changes)
    return Faults(**values)


# -- the tap between the processor and the fake ------------------------------------------------


@dataclasses.dataclass
class Sent:
    """One request as the client saw it."""

    route: str
    batch: str | None
    name: str | None  # the hospital's name, for a create
    at: float  # time.monotonic() when it left the client
    outcome: str = "in flight"  # a status code, "not sent", an httpx error name, "cancelled"

    @property
    def ambiguous(self) -> bool:
        """Whether the client cannot know if the request took effect."""
        if self.outcome in ("not sent", "in flight"):
            return False
        return not self.outcome.isdigit() or int(self.outcome) >= 500


Hook = Callable[[str, int, str], Awaitable[None]]


def classify(request: httpx.Request) -> tuple[str, str | None, str | None]:
    """The fake's route name of a request, the batch it concerns, and a create's name."""
    method, path = request.method, request.url.path
    if path == "/":
        return "root", None, None
    if path == "/hospitals/":
        if method != "POST":
            return "list", None, None
        body = json.loads(request.content or b"{}")
        batch = body.get("creation_batch_id")
        return "create", None if batch is None else str(uuid.UUID(batch)), body.get("name")
    found = re.fullmatch(r"/hospitals/batch/([^/]+)(/activate)?", path)
    if found:
        batch = str(uuid.UUID(found.group(1)))
        if found.group(2):
            return "batch_activate", batch, None
        return ("batch_list" if method == "GET" else "batch_delete"), batch, None
    if re.fullmatch(r"/hospitals/\d+", path):
        route = {"GET": "get", "PUT": "update", "DELETE": "delete"}.get(method, "other")
        return route, None, None
    return "other", None, None


class Tap(httpx.AsyncBaseTransport):
    """Passes every request to `inner`, records what the client saw, and calls `hook`.

    The hook is awaited as ``hook(route, number, phase)`` with the request's route name, its
    number among the requests of that route (from 1), and the phase: ``"before"`` (the fake
    has not seen it), ``"during"`` (handed to the fake at the next await) or ``"after"`` (the
    fake answered; the client has not seen the answer yet).
    """

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner
        self.sent: list[Sent] = []
        self.hook: Hook | None = None
        self._counts: Counter[str] = Counter()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        route, batch, name = classify(request)
        self._counts[route] += 1
        number = self._counts[route]
        record = Sent(route, batch, name, time.monotonic())
        self.sent.append(record)
        try:
            await self._at(route, number, "before")
            await self._at(route, number, "during")
            response = await self.inner.handle_async_request(request)
            try:
                content = await response.aread()
            finally:
                await response.aclose()
            await self._at(route, number, "after")
        except httpx.ConnectError:
            record.outcome = "not sent"
            raise
        except httpx.TransportError as exc:
            record.outcome = type(exc).__name__
            raise
        except BaseException:
            record.outcome = "cancelled"
            raise
        record.outcome = str(response.status_code)
        return httpx.Response(
            response.status_code, headers=response.headers, content=content, request=request
        )

    async def _at(self, route: str, number: int, phase: str) -> None:
        if self.hook is not None:
            await self.hook(route, number, phase)

    async def aclose(self) -> None:
        await self.inner.aclose()


def horizon_gaps(sent: list[Sent]) -> Iterator[tuple[float, Sent, Sent]]:
    """(gap, create, read) for every batch read after an ambiguous create of its batch."""
    for read in sent:
        if read.route != "batch_list":
            continue
        for create in sent:
            same_batch = create.route == "create" and create.batch == read.batch
            if same_batch and create.ambiguous and create.at < read.at:
                yield read.at - create.at, create, read


def horizon_violations(sent: list[Sent], horizon: float, tolerance: float) -> list[str]:
    """Batch reads that came sooner than `horizon` after an ambiguous create of the batch."""
    return [
        f"batch {read.batch} read {gap * 1000:.1f} ms after a create that ended "
        f"{create.outcome!r} (horizon {horizon * 1000:.0f} ms)"
        for gap, create, read in horizon_gaps(sent)
        if gap < horizon - tolerance
    ]


# -- the schedules --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Schedule:
    """One seeded job: its file and its one cancellation.

    Attributes:
        seed: Seeds the fake's faults and everything below.
        rows: The file's rows (two identical rows in some seeds).
        mode: ``"cancel"`` (`processor.cancel`) or ``"caller"`` (the caller's task is
            cancelled).
        trigger: ``"event"``, or the route whose request triggers it (``"create"``,
            ``"batch_list"``, ``"batch_activate"``).
        kind: The event kind, or the request phase (see `Tap`).
        number: Which occurrence of that event or request (from 1, over every run).
    """

    seed: int
    rows: tuple[Row, ...]
    mode: str
    trigger: str
    kind: str
    number: int

    def describe(self) -> str:
        twins = len(set(self.rows)) < len(self.rows)
        return (
            f"seed {self.seed}: cancel by {self.mode} at {self.trigger} {self.kind} "
            f"#{self.number}{', identical rows' if twins else ''}"
        )


def make_schedule(seed: int) -> Schedule:
    """The schedule of a seed (always the same for the same seed)."""
    rng = random.Random(f"exactly-once schedule {seed}")
    rows = [
        (
            f"Seed {seed} Hospital {i}",
            f"{i} Main Street",
            f"555-{i:04d}" if rng.random() < 0.8 else None,
        )
        for i in range(1, ROWS + 1)
    ]
    if rng.random() < 0.3:
        rows[-1] = rows[rng.randrange(ROWS - 1)]
    mode = rng.choice(("cancel", "caller"))
    pick = rng.random()
    if pick < 0.45:
        kind = rng.choice(EVENT_KINDS)
        number = rng.randint(1, 15) if kind == "row_created" else 1
        return Schedule(seed, tuple(rows), mode, "event", kind, number)
    phase = rng.choice(PHASES)
    if pick < 0.8:
        return Schedule(seed, tuple(rows), mode, "create", phase, rng.randint(1, ROWS))
    route = "batch_list" if pick < 0.9 else "batch_activate"
    return Schedule(seed, tuple(rows), mode, route, phase, 1)


class Trigger:
    """Fires a schedule's one cancellation, from the tap or from the job's event stream."""

    def __init__(self, schedule: Schedule, processor: AsyncBulkProcessor, job_id: str) -> None:
        self.schedule = schedule
        self.processor = processor
        self.job_id = job_id
        self.fired = False
        self.seen: Counter[str] = Counter()
        self._tg: TaskGroup | None = None
        self._caller: anyio.CancelScope | None = None

    @property
    def listens(self) -> bool:
        return not self.fired and self.schedule.trigger == "event"

    def arm(self, tg: TaskGroup, caller: anyio.CancelScope) -> None:
        self._tg, self._caller = tg, caller

    def disarm(self) -> None:
        self._tg = self._caller = None

    def _fire(self) -> None:
        if self._tg is None or self._caller is None:
            return
        self.fired = True
        if self.schedule.mode == "cancel":
            self._tg.start_soon(self.processor.cancel, self.job_id)
        else:
            self._caller.cancel()

    async def on_request(self, route: str, number: int, phase: str) -> None:
        s = self.schedule
        if self.fired or (route, number, phase) != (s.trigger, s.number, s.kind):
            return
        self._fire()
        if phase != "during":
            # The cancellation lands in this sleep: before the fake sees the request, or
            # after it answered and before the client reads the answer.
            await anyio.sleep(1.0)

    async def listen(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        async for event in self.processor.events(self.job_id):
            if event.kind == "snapshot":
                task_status.started()
                continue
            self.seen[event.kind] += 1
            s = self.schedule
            if not self.fired and event.kind == s.kind and self.seen[event.kind] == s.number:
                self._fire()


@dataclasses.dataclass
class Outcome:
    """What one seeded job did."""

    schedule: Schedule
    fake: FakeDirectory
    tap: Tap
    result: JobResult
    fired: bool
    statuses: list[str]
    horizon: float = HORIZON

    @property
    def resumes(self) -> int:
        return len(self.statuses) - 1

    @property
    def cancelled_runs(self) -> int:
        return self.statuses.count("cancelled")

    def problems(self) -> list[str]:
        """Everything wrong with this job, each line naming the seed and schedule."""
        where = self.schedule.describe()
        found = [
            *check_against_fake(self.fake, [self.schedule.rows], [self.result]),
            *committed_beyond_file(self.fake, [self.schedule.rows], [self.result]),
            *horizon_violations(self.tap.sent, self.horizon, TOLERANCE),
        ]
        if self.result.status is not JobStatus.COMPLETED:
            found.append(f"ended {self.result.status.value} after runs {self.statuses}")
        states = Counter(h.status.value for h in self.result.hospitals)
        if states != Counter({RowState.CREATED_AND_ACTIVATED.value: ROWS}):
            found.append(f"row states {dict(states)}")
        reads = [r for r in self.fake.requests if r.route == "list"]
        if reads:
            found.append(f"{len(reads)} GET /hospitals/ request(s)")
        return [f"{where}: {problem}" for problem in found]


def seeded_processor(
    seed: int,
    transport: httpx.AsyncBaseTransport,
    base_url: str = "http://fake",
    **options: Any,
) -> AsyncBulkProcessor:
    """A processor with fast settings; its rate limiter runs on a virtual clock."""
    now = [1_000_000.0]

    def clock() -> float:
        return now[0]

    async def sleep(seconds: float) -> None:
        now[0] += max(seconds, 0.0)
        await anyio.lowlevel.checkpoint()

    options.setdefault("reconcile_after", HORIZON)
    options.setdefault("breaker_recovery_time", 0.02)
    options.setdefault("retry", RetryPolicy.testing(rng=random.Random(seed)))
    return AsyncBulkProcessor(
        base_url,
        transport=transport,
        create_rate="100000/minute",
        other_rate="100000/minute",
        rate_limiter=MemoryRateLimiter(
            "100000/minute", "100000/minute", margin=0.0, clock=clock, sleep=sleep
        ),
        **options,
    )


async def one_run(processor: AsyncBulkProcessor, trigger: Trigger, *, first: bool) -> JobResult:
    """Run (or resume) the job once, with the trigger armed; return its report."""
    job_id = trigger.job_id
    async with anyio.create_task_group() as tg:
        caller = anyio.CancelScope()
        trigger.arm(tg, caller)
        if trigger.listens:
            await tg.start(trigger.listen)
        with caller:
            if first:
                await processor.run(job_id)
            else:
                await processor.resume(job_id)
        trigger.disarm()
        tg.cancel_scope.cancel()
    return await processor.result(job_id)


async def run_schedule(schedule: Schedule, **options: Any) -> Outcome:
    """Submit the schedule's file, cancel it once, resume it until it completes."""
    fake = FakeDirectory(
        seed=schedule.seed, create_rate=None, other_rate=None, faults=random_faults()
    )
    tap = Tap(fake.transport())
    statuses: list[str] = []
    async with seeded_processor(schedule.seed, tap, **options) as processor:
        result, fired = await run_until_completed(processor, schedule, tap, statuses)
    return Outcome(schedule, fake, tap, result, fired, statuses)


async def run_until_completed(
    processor: AsyncBulkProcessor, schedule: Schedule, tap: Tap, statuses: list[str]
) -> tuple[JobResult, bool]:
    """Submit the schedule's file, then run and resume it (cancelled once) until it completes."""
    job = await processor.submit(csv_of(schedule.rows))
    trigger = Trigger(schedule, processor, job.job_id)
    tap.hook = trigger.on_request
    for attempt in range(MAX_RESUMES + 1):
        result = await one_run(processor, trigger, first=attempt == 0)
        statuses.append(result.status.value)
        if result.status is JobStatus.COMPLETED:
            break
    tap.hook = None
    return result, trigger.fired


# -- figures ------------------------------------------------------------------------------------

TOTALS: Counter[str] = Counter()


def figures(outcomes: list[Outcome]) -> Counter[str]:
    """The counts printed per chunk and for the whole module."""
    counts: Counter[str] = Counter()
    for outcome in outcomes:
        counts["jobs"] += 1
        counts["jobs with identical rows"] += len(set(outcome.schedule.rows)) < ROWS
        counts["rows"] += len(outcome.schedule.rows)
        counts["cancellations fired"] += outcome.fired
        counts["runs ended cancelled"] += outcome.cancelled_runs
        counts["resumes"] += outcome.resumes
        counts["jobs completed"] += outcome.result.status is JobStatus.COMPLETED
        for request in outcome.fake.requests:
            counts["requests"] += 1
            if request.fault is not None:
                counts[f"fault {request.fault}"] += 1
        for kind, rows, _ in compare_with_fake(
            outcome.fake, [outcome.schedule.rows], [outcome.result]
        ):
            counts[kind] += rows
        counts["created more than once"] += len(
            committed_beyond_file(outcome.fake, [outcome.schedule.rows], [outcome.result])
        )
        counts["creates cancelled inside the fake"] += sum(
            1
            for r in outcome.fake.requests
            if r.route == "create" and r.fault is None and r.status is None
        )
        counts["ambiguous creates"] += sum(
            1 for r in outcome.tap.sent if r.route == "create" and r.ambiguous
        )
    return counts


def format_figures(title: str, counts: Counter[str]) -> str:
    fixed = [
        "jobs",
        "jobs with identical rows",
        "rows",
        "requests",
        "cancellations fired",
        "runs ended cancelled",
    ]
    fixed += ["resumes", "jobs completed", "duplicate", "missing", "unexpected"]
    fixed += ["inactive", "dishonest", "created more than once", "ambiguous creates"]
    fixed += ["creates cancelled inside the fake"]
    parts = [f"{name}={counts[name]}" for name in fixed]
    parts += [f"{name}={counts[name]}" for name in sorted(counts) if name.startswith("fault ")]
    return f"{title}: " + ", ".join(parts)


@pytest.fixture(scope="module", autouse=True)
def print_totals() -> Iterator[None]:
    yield
    if TOTALS:
        SUMMARY_LINES.append(format_figures("exactly-once totals", TOTALS))


# -- the seeded suite ---------------------------------------------------------------------------


def chunks() -> list[list[int]]:
    return [SEEDS[i : i + CHUNK] for i in range(0, len(SEEDS), CHUNK)]


@pytest.mark.parametrize("seeds", chunks(), ids=[f"seeds_{c[0]}_{c[-1]}" for c in chunks()])
async def test_seeded_fault_schedules_create_every_row_exactly_once(seeds: list[int]) -> None:
    started = time.perf_counter()
    outcomes = [await run_schedule(make_schedule(seed)) for seed in seeds]
    counts = figures(outcomes)
    TOTALS.update(counts)
    elapsed = time.perf_counter() - started
    print("\n" + format_figures(f"seeds {seeds[0]}-{seeds[-1]} in {elapsed:.2f} s", counts))
    problems = [problem for outcome in outcomes for problem in outcome.problems()]
    assert problems == [], "\n".join(problems)
    # The schedules did what they are for: faults of every kind, and cancellations.
    # (A few schedules name an event that never comes, e.g. no row_unknown without faults,
    # or an event that arrives after the job finished.)
    fired = counts["cancellations fired"]
    assert fired >= len(seeds) * 0.75, f"only {fired} cancellations in seeds {seeds}"
    assert counts["runs ended cancelled"] > 0, f"no run was cancelled in seeds {seeds}"
    for fault in ("error", "timeout_after_commit", "reset_after_commit", "rate_limit"):
        assert counts[f"fault {fault}"] > 0, f"no {fault} in seeds {seeds}"


REDIS_SEEDS = list(range(3001, 3021))


async def test_seeded_fault_schedules_with_the_redis_stores_and_breaker(
    redis_url: str, redis_prefix: str
) -> None:
    """The same machinery with its jobs, keys and breaker in a real Redis."""
    started = time.perf_counter()
    outcomes = [
        await run_schedule(make_schedule(seed), backend=redis_url, redis_prefix=redis_prefix)
        for seed in REDIS_SEEDS
    ]
    counts = figures(outcomes)
    elapsed = time.perf_counter() - started
    SUMMARY_LINES.append(
        format_figures(f"redis seeds {REDIS_SEEDS[0]}-{REDIS_SEEDS[-1]} in {elapsed:.2f} s", counts)
    )
    problems = [problem for outcome in outcomes for problem in outcome.problems()]
    assert problems == [], "\n".join(problems)
    assert counts["jobs completed"] == len(REDIS_SEEDS)
    assert counts["cancellations fired"] >= len(REDIS_SEEDS) * 0.75
    for fault in ("error", "timeout_after_commit", "reset_after_commit", "rate_limit"):
        assert counts[f"fault {fault}"] > 0, f"no {fault} in the Redis seeds"


# -- a permanent outage -------------------------------------------------------------------------


def distinct_rows(count: int, tag: str) -> list[Row]:
    return [
        (f"{tag} Hospital {i}", f"{i} Main Street", f"555-{i:04d}") for i in range(1, count + 1)
    ]


def assert_nothing_guessed(result: JobResult, rows: list[Row], tap: Tap, where: str) -> None:
    """Rows are reported created only when the client saw their 2xx; the rest stay open."""
    answered = {s.name for s in tap.sent if s.route == "create" and s.outcome.startswith("2")}
    ambiguous = {s.name for s in tap.sent if s.route == "create" and s.ambiguous} - answered
    assert ambiguous, f"{where}: the schedule left no row with an unknown fate"
    for (name, _, _), entry in zip(rows, result.hospitals, strict=True):
        if name in answered:
            assert entry.status is RowState.CREATED, f"{where}: {entry}"
        elif name in ambiguous:
            assert entry.status in (RowState.UNKNOWN, RowState.PENDING), f"{where}: {entry}"
        else:
            assert entry.status is RowState.PENDING, f"{where}: {entry}"
    assert result.processed_hospitals == sum(
        1 for h in result.hospitals if h.status is RowState.CREATED
    )


async def resume_until_completed(processor: AsyncBulkProcessor, job_id: str) -> list[str]:
    statuses = []
    for _ in range(MAX_RESUMES):
        result = await processor.resume(job_id)
        statuses.append(result.status.value)
        if result.status is JobStatus.COMPLETED:
            break
    return statuses


@pytest.mark.parametrize("breaker", ["never_opens", "opens_and_rows_wait"])
async def test_an_outage_mid_job_guesses_nothing_and_a_resume_after_it_completes(breaker):
    # Two creates commit and lose their answers, four more are answered, then the upstream
    # goes down for good. The job must stop without guessing; once the outage is lifted, a
    # resume creates every row exactly once.
    rows = distinct_rows(12, f"Outage {breaker}")
    fake = FakeDirectory(seed=7, create_rate=None, other_rate=None)
    fake.inject(Fault.TIMEOUT_AFTER_COMMIT, times=2)
    tap = Tap(fake.transport())

    async def outage_after_six(route: str, number: int, phase: str) -> None:
        if (route, number, phase) == ("create", 6, "after"):
            fake.faults = Faults(down=True)

    tap.hook = outage_after_six
    options: dict[str, Any] = {"concurrency": 3, "retry": RetryPolicy.testing(attempts=2)}
    if breaker == "never_opens":
        options["breaker_failure_threshold"] = 10_000
    else:
        options["breaker_failure_threshold"] = 3
        options["breaker_recovery_time"] = 0.01
    snapshots = []
    async with seeded_processor(7, tap, **options) as processor:
        job = await processor.submit(csv_of(rows))
        with anyio.move_on_after(0.5):
            await processor.run(job.job_id, on_progress=snapshots.append)
        stopped = await processor.status(job.job_id)
        if not stopped.status.terminal:
            # The breaker keeps every row waiting: stop the job as a user would.
            stopped = await processor.cancel(job.job_id)
        result = await processor.result(job.job_id)
        where = f"{breaker}: stopped {stopped.status.value} ({stopped.error})"
        assert stopped.status in (
            JobStatus.PARTIALLY_FAILED,
            JobStatus.FAILED,
            JobStatus.CANCELLED,
        ), where
        if breaker == "never_opens":
            assert stopped.status is JobStatus.PARTIALLY_FAILED, where
        else:
            assert any(s.waiting_for is WaitReason.BREAKER for s in snapshots), where
        assert_nothing_guessed(result, rows, tap, where)
        # What the fake holds is what was reported, plus the two unknown rows: nothing more.
        kinds = Counter(kind for kind, _, _ in compare_with_fake(fake, [rows], [result]))
        assert set(kinds) <= {"missing"}, f"{where}: {kinds}"
        assert len(fake.hospitals) == 6, where
        assert not any(h.active for h in fake.hospitals), where

        fake.faults = Faults()
        tap.hook = None
        statuses = await resume_until_completed(processor, job.job_id)
        final = await processor.result(job.job_id)
    assert statuses[-1] == "completed", f"{where}: resumes {statuses}"
    assert check_against_fake(fake, [rows], [final]) == [], where
    assert committed_beyond_file(fake, [rows], [final]) == [], where
    assert [r for r in fake.requests if r.route == "list"] == []
    assert horizon_violations(tap.sent, HORIZON, TOLERANCE) == [], where


async def test_an_outage_from_the_start_fails_the_job_and_a_resume_completes_it():
    rows = distinct_rows(5, "Down")
    fake = FakeDirectory(seed=8, create_rate=None, other_rate=None, faults=Faults(down=True))
    async with seeded_processor(8, fake.transport(), breaker_failure_threshold=10_000) as p:
        first = await p.process(csv_of(rows))
        assert first.status is JobStatus.FAILED
        assert {h.status for h in first.hospitals} == {RowState.PENDING}
        assert fake.hospitals == []
        assert {r.route for r in fake.requests} == {"root"}
        fake.faults = Faults()
        resumed = await p.resume(first.job_id)
    assert resumed.status is JobStatus.COMPLETED
    assert check_against_fake(fake, [rows], [resumed]) == []
    assert len(fake.creates()) == 5


# -- the fake served by uvicorn ---------------------------------------------------------------

SERVED_SEEDS = [1001, 1002, 1003, 1004, 1005]
SERVED_HORIZON = 0.6


async def run_served(schedule: Schedule) -> Outcome:
    """A schedule against the fake served on loopback: real sockets, real read timeouts."""
    fake = FakeDirectory(
        seed=schedule.seed,
        create_rate=None,
        other_rate=None,
        create_latency=0.05,
        faults=random_faults(latency_jitter=0.0, hang=2.0),
    )
    statuses: list[str] = []
    async with FakeServer(fake) as server:
        tap = Tap(httpx.AsyncHTTPTransport())
        processor = seeded_processor(
            schedule.seed, tap, server.url, timeout=0.5, reconcile_after=SERVED_HORIZON
        )
        async with processor:
            result, fired = await run_until_completed(processor, schedule, tap, statuses)
    return Outcome(schedule, fake, tap, result, fired, statuses, SERVED_HORIZON)


async def test_seeded_schedules_against_the_fake_served_on_loopback():
    started = time.perf_counter()
    outcomes: list[Outcome] = []

    async def one(seed: int) -> None:
        outcomes.append(await run_served(make_schedule(seed)))

    async with anyio.create_task_group() as tg:
        for seed in SERVED_SEEDS:
            tg.start_soon(one, seed)
    counts = figures(outcomes)
    elapsed = time.perf_counter() - started
    SUMMARY_LINES.append(format_figures(f"served seeds {SERVED_SEEDS} in {elapsed:.2f} s", counts))
    problems = [problem for outcome in outcomes for problem in outcome.problems()]
    assert problems == [], "\n".join(problems)
    assert counts["fault timeout_after_commit"] > 0
    assert counts["cancellations fired"] >= 4


# -- the reconciliation's reads -----------------------------------------------------------------

SCRIPTED_HORIZON = 0.15
# The processor takes `sent_at` a few microseconds before the fake's arrival time.
CLOCK_SLACK = 0.001


def first_read_after(fake: FakeDirectory, arrived_at: float) -> float:
    reads = [r.arrived_at for r in fake.requests if r.route == "batch_list"]
    assert reads, "the batch was never read back"
    later = [t for t in reads if t > arrived_at]
    assert later, "no read of the batch after the ambiguous create"
    return min(later)


@pytest.mark.parametrize(
    "fault", [Fault.TIMEOUT_AFTER_COMMIT, Fault.RESET_AFTER_COMMIT, Fault.ERROR]
)
async def test_a_batch_is_read_back_only_after_the_horizon_of_its_ambiguous_create(fault):
    rows = distinct_rows(5, f"Scripted {fault.value}")
    fake = FakeDirectory(seed=3, create_rate=None, other_rate=None)
    tap = Tap(fake.transport())

    async def third_create_is_ambiguous(route: str, number: int, phase: str) -> None:
        if (route, number, phase) == ("create", 3, "before"):
            fake.inject(fault)

    tap.hook = third_create_is_ambiguous
    async with seeded_processor(
        3, tap, concurrency=1, reconcile_after=SCRIPTED_HORIZON
    ) as processor:
        result = await processor.process(csv_of(rows))
    creates = fake.creates()
    hit = [r for r in creates if r.fault == fault.value]
    assert len(hit) == 1
    assert hit[0].body["name"] == rows[2][0]
    # Every read of the batch comes after the horizon; the batch is never listed whole.
    reads = [r.arrived_at for r in fake.requests if r.route == "batch_list"]
    assert reads
    assert min(reads) >= hit[0].arrived_at + SCRIPTED_HORIZON - CLOCK_SLACK
    assert [r for r in fake.requests if r.route == "list"] == []
    assert result.status is JobStatus.COMPLETED
    assert check_against_fake(fake, [rows], [result]) == []
    assert committed_beyond_file(fake, [rows], [result]) == []
    # A commit whose answer was lost is adopted; a 503 (nothing committed) is sent again.
    assert len(creates) == (6 if fault is Fault.ERROR else 5)


@pytest.mark.parametrize("phase", ["after", "during"])
async def test_a_create_cancelled_in_flight_is_resolved_after_the_horizon_on_resume(phase):
    # "after": the fake committed and answered, the caller was cancelled before reading it.
    # "during": the caller was cancelled while the fake's create was in its latency phase.
    rows = distinct_rows(5, f"Cancelled {phase}")
    fake = FakeDirectory(seed=4, create_rate=None, other_rate=None, create_latency=0.01)
    tap = Tap(fake.transport())
    schedule = Schedule(4, tuple(rows), "cancel", "create", phase, 3)
    async with seeded_processor(
        4, tap, concurrency=1, reconcile_after=SCRIPTED_HORIZON
    ) as processor:
        job = await processor.submit(csv_of(rows))
        trigger = Trigger(schedule, processor, job.job_id)
        tap.hook = trigger.on_request
        first = await one_run(processor, trigger, first=True)
        resumed_at = fake.requests[-1].arrived_at
        result = await processor.resume(job.job_id)
    assert trigger.fired
    assert first.status is JobStatus.CANCELLED
    assert [h.status for h in first.hospitals] == [
        RowState.CREATED,
        RowState.CREATED,
        RowState.UNKNOWN,
        RowState.PENDING,
        RowState.PENDING,
    ]
    third = fake.creates()[2]
    assert third.body["name"] == rows[2][0]
    assert third.committed is (phase == "after")
    assert first_read_after(fake, resumed_at) >= third.arrived_at + SCRIPTED_HORIZON - CLOCK_SLACK
    assert result.status is JobStatus.COMPLETED
    assert check_against_fake(fake, [rows], [result]) == []
    assert committed_beyond_file(fake, [rows], [result]) == []
    assert len(fake.creates()) == (5 if phase == "after" else 6)


async def test_a_slow_progress_hook_during_the_reconcile_wait_does_not_break_the_job():
    rows = distinct_rows(3, "Slow hook")
    fake = FakeDirectory(seed=5, create_rate=None, other_rate=None)
    fake.inject(Fault.TIMEOUT_AFTER_COMMIT)

    async def slow_hook(snapshot: JobSnapshot) -> None:
        if snapshot.waiting_for is WaitReason.RECONCILE:
            await anyio.sleep(0.1)  # e.g. progress written to a slow store

    async with seeded_processor(5, fake.transport(), reconcile_after=0.05) as processor:
        result = await processor.process(csv_of(rows), on_progress=slow_hook)
    assert result.status is JobStatus.COMPLETED
    assert check_against_fake(fake, [rows], [result]) == []


class SlowInFlightWrites(MemoryJobStore):
    """A job store whose write of a row going in flight takes `delay` seconds (a busy Redis)."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay

    async def save_rows(
        self, job_id: str, rows: Sequence[JobRow], *, token: int | None = None
    ) -> None:
        if any(row.state is RowState.IN_FLIGHT for row in rows):
            await anyio.sleep(self.delay)
        await super().save_rows(job_id, rows, token=token)


async def test_the_horizon_counts_from_when_the_create_left():
    rows = distinct_rows(2, "Slow store")
    fake = FakeDirectory(seed=6, create_rate=None, other_rate=None)
    fake.inject(Fault.TIMEOUT_AFTER_COMMIT)
    async with seeded_processor(
        6,
        fake.transport(),
        concurrency=1,
        reconcile_after=SCRIPTED_HORIZON,
        job_store=SlowInFlightWrites(delay=SCRIPTED_HORIZON / 2),
    ) as processor:
        result = await processor.process(csv_of(rows))
    assert result.status is JobStatus.COMPLETED
    assert check_against_fake(fake, [rows], [result]) == []
    ambiguous = fake.creates()[0]
    assert ambiguous.fault == Fault.TIMEOUT_AFTER_COMMIT.value
    read = first_read_after(fake, ambiguous.arrived_at)
    assert read >= ambiguous.arrived_at + SCRIPTED_HORIZON - CLOCK_SLACK, (
        f"read {1000 * (read - ambiguous.arrived_at):.0f} ms after the ambiguous create left"
    )
