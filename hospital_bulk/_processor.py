"""`AsyncBulkProcessor`: a CSV file into the Hospital Directory API, one job at a time or many.

The job flow:

1. Validate the file (strict by default: an invalid file creates no job and sends nothing).
2. Create the job with its rows and batch ids, stored before the first request (through the
   idempotency store when a key is given, atomically with the key's claim).
3. One coalesced warm-up ``GET /`` with a long timeout.
4. Send the rows: ``concurrency`` requests in flight at most, across every job of the
   processor; every create waits for the rate limiter and the circuit breaker; a row is
   recorded ``in_flight`` before its request leaves.
5. When every row of the job exists, activate each batch, and check the answer.
6. Report.

A row's fate follows the outcome class of its create (see `Outcome`): applied -> ``created``;
rejected -> ``rejected`` with the upstream's message; not sent or rate limited -> retried by the
retry policy, and left ``pending`` (resumable) if it still fails; ambiguous -> ``unknown``,
never re-sent blindly. While the circuit breaker is open, rows wait; they do not fail.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import inspect
import json
import logging
import math
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from os import PathLike
from types import TracebackType
from typing import IO, Any, Literal, NoReturn, TypeVar, Union

import anyio
import httpx
from anyio.streams.memory import MemoryObjectSendStream

from ._breaker import MemoryCircuitBreaker, counts_as_failure
from ._client import HospitalDirectoryClient
from ._config import Settings
from ._exceptions import (
    AmbiguousOutcomeError,
    BackendError,
    BatchAlreadyActiveError,
    BatchFullError,
    BatchNotFoundError,
    CircuitOpenError,
    ConfigurationError,
    CSVValidationError,
    HospitalBulkError,
    HospitalNotFoundError,
    JobNotFoundError,
    JobStateError,
    LeaseLostError,
    Outcome,
    RateLimitedError,
    RequestNotSentError,
    UpstreamError,
)
from ._jobs import (
    SETTLED_STATES,
    HospitalResult,
    JobRecord,
    JobResult,
    JobRow,
    JobSnapshot,
    JobStatus,
    RowState,
    WaitReason,
)
from ._models import Hospital, HospitalCreate
from ._ratelimit import MemoryRateLimiter
from ._retry import RetryPolicy
from ._validation import ValidationReport, validate_csv
from .backends.memory import MemoryIdempotencyStore, MemoryJobStore
from .protocols import CircuitBreaker, IdempotencyStore, JobStore, RateLimiter

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

__all__ = ["AsyncBulkProcessor", "JobEvent", "ProgressCallback"]

logger = logging.getLogger("hospital_bulk.processor")

Source = Union[str, "PathLike[str]", bytes, bytearray, memoryview, IO[bytes]]
RateKind = Literal["create", "other"]
_T = TypeVar("_T")
_A = TypeVar("_A")
ProgressCallback = Callable[[JobSnapshot], Awaitable[None] | None]

_EXISTS = frozenset({RowState.CREATED, RowState.CREATED_AND_ACTIVATED})
_AUDITED = frozenset({RowState.CREATED, RowState.UNKNOWN, RowState.PENDING})
_LOST = "no longer upstream (the upstream lost it); sent again"
# How long a known outcome may wait for another worker's write before it is written alone.
_DEFER_FOR = 0.02
# Audit-and-send rounds of one run before the job gives up as partially failed.
_MAX_ROUNDS = 5
_RUNNING = frozenset({JobStatus.RUNNING, JobStatus.ACTIVATING})


@dataclasses.dataclass(frozen=True, slots=True)
class JobEvent:
    """Something that happened to a job, for progress displays.

    Attributes:
        kind: What happened, in the past tense: ``job_started``, ``row_created``,
            ``row_rejected``, ``row_unknown``, ``row_deferred``, ``waiting``,
            ``batch_reconciled``, ``batch_activated``, ``job_finished``; ``snapshot`` first
            in `events`, and ``progress`` for a change seen in a job that runs in another
            process.
        job_id: The job's id.
        snapshot: The job's progress right after it happened.
        row: The data-row number concerned, if any.
        message: A human detail (never a secret; row contents only in ``row_*`` events).
    """

    kind: str
    job_id: str
    snapshot: JobSnapshot
    row: int | None = None
    message: str | None = None


class _RowWriter:
    """Writes rows of one run, combining the writes of workers that save at the same time.

    While one write is under way, the rows other workers save gather; the next write takes
    them all, so many requests in flight cost few store round trips. A caller of `save`
    returns once a write holding its rows succeeded, and raises that write's error if it
    failed. A write that is cancelled puts its rows back for the next one.

    A row whose outcome is known is `defer`-red instead: it goes out with the next write any
    worker makes (the next row's ``in_flight`` mark, which must be stored before its request
    leaves), or with `flush`; its callback (the row's event) runs once it is stored. Until
    then the store holds the row ``in_flight``, which a crash turns into ``unknown``, to be
    settled by reading its batch back: the same as a crash just after the request.
    """

    def __init__(self, write: Callable[[list[JobRow]], Awaitable[None]]) -> None:
        self._write = write
        self._pending: list[JobRow] = []
        self._callbacks: list[Callable[[], Awaitable[None]]] = []
        self._lock = anyio.Lock()
        self._started = 0
        self._finished = 0
        self._errors: dict[int, Exception] = {}
        self._wake = anyio.Event()

    @property
    def deferred(self) -> bool:
        """Whether rows wait to be written."""
        return bool(self._pending)

    def defer(self, row: JobRow, stored: Callable[[], Awaitable[None]]) -> None:
        """Write `row` with the next write; await `stored()` once it is written."""
        self._pending.append(row)
        self._callbacks.append(stored)
        self._wake.set()

    async def wait_deferred(self) -> None:
        """Return once rows wait to be written, or `wake` is called."""
        if not self._pending:
            self._wake = anyio.Event()
            await self._wake.wait()

    def wake(self) -> None:
        """End a `wait_deferred` now."""
        self._wake.set()

    def take_deferred(self) -> list[Callable[[], Awaitable[None]]]:
        """Drop the rows waiting (their caller writes every row itself); return callbacks."""
        callbacks, self._callbacks = self._callbacks, []
        self._pending = []
        return callbacks

    async def flush(self) -> None:
        """Write the rows waiting, if any."""
        if self.deferred:
            await self.save(())

    async def save(self, rows: Sequence[JobRow]) -> None:
        self._pending.extend(rows)
        ticket = self._started + 1  # the first write to start from now on takes these rows
        async with self._lock:
            if self._finished >= ticket:
                error = self._errors.get(ticket)
                if error is not None:
                    raise error
                return
            batch, self._pending = self._pending, []
            callbacks, self._callbacks = self._callbacks, []
            self._started += 1
            try:
                await self._write(batch)
            except Exception as exc:
                self._errors[self._started] = exc
                self._finished = self._started
                raise
            except BaseException:
                self._pending[:0] = batch
                self._callbacks[:0] = callbacks
                self._started -= 1
                raise
            self._finished = self._started
        for stored in callbacks:
            await stored()


@dataclasses.dataclass(slots=True)
class _Run:
    """A job running in this processor."""

    job: JobRecord
    scope: anyio.CancelScope
    started: float
    waiting_for: WaitReason | None = None
    waiting_until: float | None = None
    on_progress: ProgressCallback | None = None
    done: anyio.Event = dataclasses.field(default_factory=anyio.Event)
    token: int | None = None
    lost: bool = False
    # Set once the run has decided its end: it saves it, then lets the job go.
    finishing: bool = False
    store_error: HospitalBulkError | None = None
    # The rows' states as last saved, and their counts: a snapshot costs O(states), not
    # O(rows), however many events a job emits.
    states: list[RowState] = dataclasses.field(init=False)
    counts: dict[RowState, int] = dataclasses.field(init=False)
    # The sending workers' row writes, combined (set by the processor when the run starts).
    rows: _RowWriter | None = None

    def __post_init__(self) -> None:
        self.states = [row.state for row in self.job.rows]
        self.counts = dict.fromkeys(RowState, 0)
        for state in self.states:
            self.counts[state] += 1

    def saved(self, rows: Sequence[JobRow]) -> None:
        """Count the states of `rows`, which are being saved."""
        states, counts = self.states, self.counts
        for row in rows:
            old, new = states[row.index], row.state
            if old is not new:
                counts[old] -= 1
                counts[new] += 1
                states[row.index] = new


class AsyncBulkProcessor:
    """Loads CSV files of hospitals into the Hospital Directory API, safely and fast.

    Use it as an async context manager. Every method is safe to call from many tasks at once;
    `concurrency` bounds the requests in flight across all of them.

    Example:
        ```python
        async with AsyncBulkProcessor("http://127.0.0.1:8000") as processor:
            result = await processor.process("hospitals.csv")
            print(result.status, result.processed_hospitals)
        ```

    Args:
        base_url: The upstream's URL (or give `settings`).
        settings: All settings at once; keyword arguments override them.
        transport: An httpx transport to send through (e.g. the fake upstream's).
        headers: Extra headers for every request (an API key); never logged.
        auth: An httpx authentication for every request; never logged.
        job_store: A `JobStore` to use instead of the backend's.
        idempotency_store: An `IdempotencyStore` to use instead of the backend's.
        rate_limiter: A `RateLimiter` to use instead of the backend's.
        breaker: A `CircuitBreaker` to use instead of the backend's.
        retry: A `RetryPolicy` to use instead of one built from the settings.
        redis: A `redis.asyncio.Redis` client or `redis.asyncio.ConnectionPool` for the Redis
            backend, instead of connecting to `Settings.backend`'s URL (the caller closes it).
        **options: Any `Settings` field, e.g. ``create_rate="10/6 seconds"``,
            ``concurrency=20``, ``batch_size=20``, ``timeout=30.0``.

    Raises:
        ConfigurationError: A setting is wrong, or the backend is not available.
    """

    def __init__(
        self,
        base_url: str | None = None,
        *,
        settings: Settings | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        headers: dict[str, str] | None = None,
        auth: httpx.Auth | tuple[str, str] | None = None,
        job_store: JobStore | None = None,
        idempotency_store: IdempotencyStore | None = None,
        rate_limiter: RateLimiter | None = None,
        breaker: CircuitBreaker | None = None,
        retry: RetryPolicy | None = None,
        redis: Any = None,
        **options: Any,
    ) -> None:
        if settings is None:
            if base_url is None:
                raise ConfigurationError("give the upstream's base_url (or settings=...)")
            settings = Settings(base_url=base_url).replace(**options)
        else:
            if base_url is not None:
                options["base_url"] = base_url
            if options:
                settings = settings.replace(**options)
        self.settings = settings
        self._backend: Any = None
        if redis is not None or not settings.backend.startswith("memory://"):
            self._backend = _redis_backend(settings, redis)
        backend = self._backend
        if job_store is None:
            job_store = (
                MemoryJobStore(retention=settings.job_retention)
                if backend is None
                else backend.job_store(retention=settings.job_retention)
            )
        self._jobs: JobStore = job_store
        if idempotency_store is None:
            if isinstance(job_store, MemoryJobStore):
                idempotency_store = MemoryIdempotencyStore(job_store)
            elif backend is not None and backend.owns(job_store):
                idempotency_store = backend.idempotency_store(job_store)
            else:
                raise ConfigurationError(
                    "a custom job_store needs an idempotency_store that creates jobs in it"
                )
        self._keys: IdempotencyStore = idempotency_store
        if rate_limiter is None:
            rate_options: dict[str, Any] = {
                "create_rate": settings.create_rate,
                "other_rate": settings.other_rate,
                "margin": settings.rate_margin,
            }
            rate_limiter = (
                MemoryRateLimiter(**rate_options)
                if backend is None
                else backend.rate_limiter(**rate_options)
            )
        self._limiter: RateLimiter = rate_limiter
        # The library's limiters report their waits (shown as the job's `waiting_for`).
        self._limiter_reports = "on_wait" in inspect.signature(rate_limiter.acquire).parameters
        if breaker is None:
            breaker_options: dict[str, Any] = {
                "failure_threshold": settings.breaker_failure_threshold,
                "recovery_time": settings.breaker_recovery_time,
            }
            breaker = (
                MemoryCircuitBreaker("hospital_api", **breaker_options)
                if backend is None
                else backend.circuit_breaker("hospital_api", **breaker_options)
            )
        self._breaker: CircuitBreaker = breaker
        self._retry = retry or RetryPolicy(
            attempts=settings.retry_attempts,
            initial=settings.retry_initial,
            maximum=settings.retry_max,
        )
        self._client = HospitalDirectoryClient(
            settings.base_url,
            timeout=settings.timeout,
            connect_timeout=settings.connect_timeout,
            headers=headers,
            auth=auth,
            transport=transport,
            limits=httpx.Limits(
                max_connections=max(settings.concurrency, 1) + 4,
                max_keepalive_connections=max(settings.concurrency, 1) + 4,
            ),
        )
        self._slots = anyio.Semaphore(settings.concurrency)
        self._runs: dict[str, _Run] = {}
        # This processor's identity as a lease owner.
        self._owner = uuid.uuid4().hex
        self._subscribers: dict[str, list[MemoryObjectSendStream[JobEvent]]] = {}

    @property
    def shares_jobs(self) -> bool:
        """Whether other processes can see this processor's jobs (a shared job store).

        False for the in-memory job store of this process; True for the Redis backend or an
        injected store, whose jobs a worker elsewhere may run.
        """
        return not isinstance(self._jobs, MemoryJobStore)

    # -- lifecycle ----------------------------------------------------------------------------

    async def __aenter__(self) -> AsyncBulkProcessor:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Cancel running jobs (they become ``cancelled``, resumable) and close the pool."""
        for run in list(self._runs.values()):
            run.scope.cancel()
        for run in list(self._runs.values()):
            await run.done.wait()
        await self._client.aclose()
        if self._backend is not None:
            await self._backend.aclose()

    # -- the API ------------------------------------------------------------------------------

    async def validate(self, source: Source, *, max_rows: int | None = None) -> ValidationReport:
        """Validate a file with the processor's limits; nothing is sent.

        Args:
            source: A path, the file's bytes, or a binary file object.
            max_rows: A row limit for this file, on top of `Settings.max_rows` (the stricter
                of the two applies); e.g. a web service's own limit.

        Returns:
            The validation report (`accepts` tells whether `submit` would take the file).

        Raises:
            CSVSourceError: The source cannot be read.
        """
        settings = self.settings
        limit = settings.max_rows
        if max_rows is not None:
            limit = max_rows if limit is None else min(limit, max_rows)
        return await anyio.to_thread.run_sync(
            lambda: validate_csv(
                source,
                max_rows=limit,
                max_bytes=settings.max_bytes,
                formula_policy=settings.formula_policy,
            )
        )

    def accepts(self, report: ValidationReport) -> bool:
        """Return whether `submit` creates a job from a file with this report.

        A file without errors is accepted; with ``skip_invalid_rows``, so is one whose errors
        are all in rows, as long as it has valid rows.

        Args:
            report: The file's validation report.
        """
        if report.ok:
            return True
        file_level = any(issue.row is None for issue in report.errors)
        return self.settings.skip_invalid_rows and not file_level and bool(report.rows)

    async def submit(
        self,
        source: Source,
        *,
        idempotency_key: str | None = None,
        tenant: str | None = None,
        max_rows: int | None = None,
    ) -> JobSnapshot:
        """Validate a file and create its job, without running it.

        Args:
            source: A path, the file's bytes, or a binary file object.
            idempotency_key: With a key, the same key and the same file give the same job.
            tenant: Who submits (an account, a customer): idempotency keys are scoped by it,
                so one tenant can never replay another's, and the job records it
                (`JobSnapshot.tenant`) for the caller to check who may read the job.
            max_rows: A row limit for this file on top of `Settings.max_rows` (see `validate`).

        Returns:
            The new job's snapshot (or the earlier job's, for a repeated key, with
            `JobSnapshot.replayed` set).

        Raises:
            CSVValidationError: The file has errors (nothing was created or sent);
                `CSVValidationError.report` has every one.
            IdempotencyConflictError: The key was used for another file or other options.
            IdempotencyInProgressError: The key's first submission is still being created.
            CSVSourceError: The source cannot be read.
        """
        if tenant is not None and (not isinstance(tenant, str) or not tenant):
            raise ConfigurationError(f"a tenant must be a non-empty string, not {tenant!r:.80}")
        report = await self.validate(source, max_rows=max_rows)
        job = self._new_job(report, idempotency_key)
        job.tenant = tenant
        if idempotency_key is None:
            await self._jobs.create(job)
            job_id = job.job_id
        else:
            job_id = await self._keys.claim(
                _scoped_key(idempotency_key, tenant),
                job.fingerprint,
                job,
                ttl=self.settings.idempotency_ttl,
            )
        if job_id != job.job_id:
            logger.info("Idempotency key replayed: job %s", job_id)
            return (await self.status(job_id)).model_copy(update={"replayed": True})
        logger.info(
            "Job %s created: %d row(s) in %d batch(es)",
            job_id,
            len(job.rows),
            len(job.batch_ids),
        )
        return await self.status(job_id)

    async def run(self, job_id: str, *, on_progress: ProgressCallback | None = None) -> JobResult:
        """Run a job until it ends: send its pending rows, then activate its batches.

        A job that already ended returns its result at once, except a ``cancelled``,
        ``failed`` or ``partially_failed`` one, which is resumed.

        Args:
            job_id: The job's id.
            on_progress: Called with a snapshot after every change (sync or async).

        Returns:
            The job's report.

        Raises:
            JobNotFoundError: No job has this id.
            JobStateError: The job is already running (here, or in another worker that holds
                its lease), or was rolled back.
        """
        job = await self._jobs.get(job_id)
        if job.status is JobStatus.COMPLETED:
            return self._result(job)
        return await self._run(job, on_progress)

    async def process(
        self,
        source: Source,
        *,
        idempotency_key: str | None = None,
        tenant: str | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> JobResult:
        """Validate, create and run a job: `submit` then `run`.

        A repeated key whose job is running in this processor waits for that job and returns
        its result; a job never runs twice at once.

        Args:
            source: A path, the file's bytes, or a binary file object.
            idempotency_key: With a key, the same key and the same file give the same job.
            tenant: Who submits; scopes the idempotency key (see `submit`).
            on_progress: Called with a snapshot after every change (sync or async).

        Returns:
            The job's report.

        Raises:
            CSVValidationError: The file has errors (nothing was created or sent).
            IdempotencyConflictError: The key was used for another file or other options.
        """
        snapshot = await self.submit(source, idempotency_key=idempotency_key, tenant=tenant)
        running = self._runs.get(snapshot.job_id)
        if running is not None:
            # A repeated submission of a job running here: wait for it, do not run it twice.
            await running.done.wait()
            return await self.result(snapshot.job_id)
        return await self.run(snapshot.job_id, on_progress=on_progress)

    async def status(self, job_id: str) -> JobSnapshot:
        """Return a job's progress now.

        Args:
            job_id: The job's id.

        Returns:
            The snapshot.

        Raises:
            JobNotFoundError: No job has this id.
        """
        run = self._runs.get(job_id)
        if run is not None:
            return self._snapshot(run.job, run)
        return self._snapshot(await self._stored(job_id), None)

    async def _stored(self, job_id: str) -> JobRecord:
        """The stored job, reported ``interrupted`` when it claims to run but nobody does."""
        job = await self._jobs.get(job_id)
        if job.status in _RUNNING and await self._jobs.lease(job_id) is None:
            job.status = JobStatus.INTERRUPTED
        return job

    async def recover(self) -> list[JobResult]:
        """Resume every stored job whose worker died (``interrupted``), and wait for them.

        Call it when a service starts, or now and then from one worker: a job another worker
        still runs holds a live lease and is left alone.

        Returns:
            The results of the jobs it resumed.
        """
        interrupted = []
        for job_id in await self._jobs.list_ids():
            if job_id in self._runs:
                continue
            with contextlib.suppress(JobNotFoundError):
                if (await self._stored(job_id)).status is JobStatus.INTERRUPTED:
                    interrupted.append(job_id)
        results: list[JobResult] = []

        async def resume(job_id: str) -> None:
            with contextlib.suppress(JobStateError):  # another worker got there first
                results.append(await self.resume(job_id))

        async with anyio.create_task_group() as tg:
            for job_id in interrupted:
                logger.warning("Job %s was interrupted: resuming it", job_id)
                tg.start_soon(resume, job_id)
        return results

    async def result(self, job_id: str) -> JobResult:
        """Return a job's report as it stands (also while it runs).

        Args:
            job_id: The job's id.

        Returns:
            The report.

        Raises:
            JobNotFoundError: No job has this id.
        """
        run = self._runs.get(job_id)
        return self._result(run.job if run is not None else await self._stored(job_id))

    async def resume(
        self, job_id: str, *, on_progress: ProgressCallback | None = None
    ) -> JobResult:
        """Run a stopped job again: only rows not yet created are sent, on the same batches.

        Rejected rows are sent again (their cause may have been fixed); rows whose fate is
        unknown are not, so no row is ever created twice.

        Args:
            job_id: The job's id.
            on_progress: Called with a snapshot after every change (sync or async).

        Returns:
            The job's report.

        Raises:
            JobNotFoundError: No job has this id.
            JobStateError: The job is running, or was rolled back.
        """
        return await self.run(job_id, on_progress=on_progress)

    async def rollback(self, job_id: str) -> JobResult:
        """Delete the job's batches upstream (a batch already gone counts as deleted).

        Safe to repeat. Rows whose outcome is unknown are waited out first (the safety
        horizon), so a late create cannot land after its batch was deleted. The job's `error`
        says how many hospitals were deleted.

        Args:
            job_id: The job's id.

        Returns:
            The job's report, ``rolled_back``.

        Raises:
            JobNotFoundError: No job has this id.
            JobStateError: The job is running (cancel it first).
            UpstreamError: A batch could not be deleted; the job is left as it was.
        """
        await self._let_finish(job_id)
        if job_id in self._runs:
            raise JobStateError(
                f"job {job_id} is running; cancel it before rolling it back",
                job_id=job_id,
                status=self._runs[job_id].job.status.value,
            )
        job = await self._jobs.get(job_id)
        if await self._jobs.lease(job_id) is not None:
            raise JobStateError(
                f"job {job_id} is running in another worker; cancel it there first",
                job_id=job_id,
                status=job.status.value,
            )
        # A create whose outcome is unknown may still land: wait it out before deleting.
        await self._wait_horizon(None, job.rows)
        deleted = 0
        for batch_id in job.batch_ids:
            path = f"/hospitals/batch/{batch_id}"
            try:
                answer = await self._call("other", path, _bind(self._client.delete_batch, batch_id))
            except BatchNotFoundError:
                logger.info("Batch %s already gone (job %s rolled back)", batch_id, job_id)
                continue
            deleted += answer.deleted_count
            logger.info(
                "Batch %s deleted: %d hospital(s) (job %s rolled back)",
                batch_id,
                answer.deleted_count,
                job_id,
            )
        job.error = f"rolled back: {deleted} hospital(s) deleted upstream"
        for row in job.rows:
            if row.state in _EXISTS or row.state in (RowState.UNKNOWN, RowState.IN_FLIGHT):
                row.state = RowState.DELETED
        job.status = JobStatus.ROLLED_BACK
        job.activated_batches = []
        job.finished_at = time.time()
        await self._jobs.save_rows(job_id, job.rows)
        await self._jobs.save_job(job)
        return self._result(job)

    async def cancel(self, job_id: str) -> JobSnapshot:
        """Stop a job. Rows in flight become ``unknown``; the job can be resumed.

        Args:
            job_id: The job's id.

        Returns:
            The job's snapshot after it stopped.

        Raises:
            JobNotFoundError: No job has this id.
        """
        run = self._runs.get(job_id)
        if run is not None:
            run.scope.cancel()
            await run.done.wait()
            return await self.status(job_id)
        job = await self._jobs.get(job_id)
        if job.status is JobStatus.PENDING:
            job.status = JobStatus.CANCELLED
            job.finished_at = time.time()
            await self._jobs.save_job(job)
        return self._snapshot(job, None)

    async def events(self, job_id: str, *, poll_interval: float = 0.5) -> AsyncIterator[JobEvent]:
        """Yield the events of a job until it ends, a ``snapshot`` event first.

        A job running in this processor streams every event as it happens. A job running in
        another process (through a shared job store) is followed by reading its stored state
        every `poll_interval` seconds: a ``progress`` event for every change seen, and
        ``job_finished`` when it ends (or is found ``interrupted``).

        Args:
            job_id: The job's id.
            poll_interval: Seconds between reads of a job that runs elsewhere.

        Yields:
            Events, starting with a ``snapshot`` event of the job as it is now.

        Raises:
            JobNotFoundError: No job has this id.
        """
        await self._let_finish(job_id)
        snapshot = await self.status(job_id)
        yield JobEvent("snapshot", job_id, snapshot)
        if snapshot.status.terminal and job_id not in self._runs:
            return
        send, receive = anyio.create_memory_object_stream[JobEvent](1000)
        self._subscribers.setdefault(job_id, []).append(send)
        seen = _progress_key(snapshot)
        try:
            async with receive:
                while True:
                    event: JobEvent | None = None
                    with anyio.move_on_after(poll_interval):
                        event = await receive.receive()
                    if event is None:
                        if job_id in self._runs:
                            continue
                        # Not running here: follow its stored state (another process may).
                        snapshot = await self.status(job_id)
                        if _progress_key(snapshot) == seen:
                            continue
                        seen = _progress_key(snapshot)
                        kind = "job_finished" if snapshot.status.terminal else "progress"
                        event = JobEvent(kind, job_id, snapshot, message=snapshot.error)
                    yield event
                    if event.kind == "job_finished":
                        return
        finally:
            subscribers = self._subscribers.get(job_id, [])
            if send in subscribers:
                subscribers.remove(send)
            send.close()

    async def health(self) -> dict[str, Any]:
        """Check the upstream, the breaker and the backend.

        Returns:
            ``{"upstream": bool, "upstream_error": str | None, "breaker": state,
            "backend": "memory" | "redis", "backend_reachable": bool, "running_jobs": int}``.
        """
        error: str | None = None
        try:
            reachable = await self._client.health(timeout=self.settings.connect_timeout)
        except UpstreamError as exc:
            reachable, error = False, str(exc)
        return {
            "upstream": reachable,
            "upstream_error": error,
            "breaker": await self._breaker.state(),
            "backend": "memory" if self._backend is None else "redis",
            "backend_reachable": True if self._backend is None else await self._backend.ping(),
            "running_jobs": len(self._runs),
        }

    # -- jobs ----------------------------------------------------------------------------------

    def _new_job(self, report: ValidationReport, key: str | None) -> JobRecord:
        settings = self.settings
        invalid: dict[int, str] = {}
        if not self.accepts(report):
            raise CSVValidationError(report)
        if not report.ok:
            for issue in report.errors:
                if issue.row is not None:
                    invalid.setdefault(issue.row, str(issue))
        size = settings.batch_size
        valid = list(report.rows)
        batch_ids = [uuid.uuid4() for _ in range(math.ceil(len(valid) / size))]
        rows = [
            JobRow(
                index=0,
                row=r.row,
                line=r.line,
                name=r.name,
                address=r.address,
                phone=r.phone,
                batch_id=batch_ids[position // size],
            )
            for position, r in enumerate(valid)
        ]
        for number, message in invalid.items():
            rows.append(
                JobRow(
                    index=0,
                    row=number,
                    line=0,
                    name="",
                    address="",
                    phone=None,
                    batch_id=None,
                    state=RowState.INVALID,
                    error=message,
                )
            )
        rows.sort(key=lambda r: r.row)
        for index, row in enumerate(rows):
            row.index = index
        options = {
            "batch_size": size,
            "skip_invalid_rows": settings.skip_invalid_rows,
            "formula_policy": settings.formula_policy,
            "activate_partial": settings.activate_partial,
        }
        fingerprint = hashlib.sha256(
            (report.sha256 + json.dumps(options, sort_keys=True)).encode()
        ).hexdigest()
        return JobRecord(
            job_id=uuid.uuid4().hex,
            status=JobStatus.PENDING,
            batch_ids=batch_ids,
            rows=rows,
            fingerprint=fingerprint,
            created_at=time.time(),
            idempotency_key=key,
            options=options,
        )

    async def _run(self, job: JobRecord, on_progress: ProgressCallback | None) -> JobResult:
        job_id = job.job_id
        if await self._let_finish(job_id):
            job = await self._jobs.get(job_id)
            if job.status is JobStatus.COMPLETED:
                return self._result(job)
        if job_id in self._runs:
            raise JobStateError(
                f"job {job_id} is already running", job_id=job_id, status=job.status.value
            )
        if job.status is JobStatus.ROLLED_BACK:
            raise JobStateError(
                f"job {job_id} was rolled back; submit the file again",
                job_id=job_id,
                status=job.status.value,
            )
        run = _Run(job=job, scope=anyio.CancelScope(), started=time.monotonic())
        run.on_progress = on_progress
        self._runs[job_id] = run
        try:
            # Raises JobStateError when another worker holds a live lease on the job.
            run.token = await self._jobs.acquire_lease(job_id, self._owner, self.settings.lease_ttl)
            try:
                failure: Exception | None = None
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._keep_lease, run)
                    with run.scope:
                        try:
                            await self._execute(run)
                        except Exception as exc:  # raised below, outside the task group
                            error = _first_error(exc)
                            if isinstance(error, LeaseLostError):
                                run.lost = True
                            else:
                                failure = error
                    tg.cancel_scope.cancel()
                failure = failure or run.store_error
                if isinstance(failure, (JobNotFoundError, BackendError)):
                    await self._store_failed(run, failure)
                if failure is not None:
                    raise failure
                if run.lost:
                    raise LeaseLostError(
                        f"job {job_id} was taken over by another worker; this run stopped",
                        job_id=job_id,
                        status=job.status.value,
                    )
                if run.scope.cancelled_caught and not job.status.terminal:
                    await self._stopped(run, JobStatus.CANCELLED, "cancelled")
            except BaseException:
                # The caller's own cancellation (or a crash): leave a resumable job behind.
                if not job.status.terminal and not run.lost:
                    with anyio.CancelScope(shield=True):
                        await self._stopped(run, JobStatus.CANCELLED, "interrupted")
                raise
            finally:
                with anyio.CancelScope(shield=True):
                    try:
                        await self._jobs.release_lease(job_id, run.token)
                    except BackendError as exc:  # it lapses by itself; the error is raised
                        logger.warning("Job %s: lease not released: %s", job_id, exc)
        finally:
            del self._runs[job_id]
            run.done.set()
        return self._result(job)

    async def _let_finish(self, job_id: str) -> bool:
        """Wait for a run of the job that is finishing here; return whether there was one.

        A run that has decided its end still holds the job for an instant (it saves the end,
        then releases the lease): a resume, rollback or follower arriving then waits for it
        instead of finding the job "running".
        """
        run = self._runs.get(job_id)
        if run is None or not run.finishing:
            return False
        await run.done.wait()
        return True

    async def _keep_lease(self, run: _Run) -> None:
        """Renew the run's lease; when it is lost, stop the run (no more writes, no sends)."""
        ttl = self.settings.lease_ttl
        assert run.token is not None
        while True:
            await anyio.sleep(ttl / 3)
            try:
                await self._jobs.renew_lease(run.job.job_id, run.token, ttl)
            except LeaseLostError:
                logger.warning("Job %s: lease lost to another worker; stopping", run.job.job_id)
                run.lost = True
                run.scope.cancel()
                return
            except (BackendError, JobNotFoundError) as exc:
                run.store_error = exc
                run.scope.cancel()
                return

    async def _store_failed(self, run: _Run, exc: HospitalBulkError) -> NoReturn:
        """Stop a run whose job store failed or lost the job, and raise `BackendError`.

        The job is marked failed (resumable) if the store still takes writes; nothing more
        is sent either way, so nothing is guessed.
        """
        job_id = run.job.job_id
        if isinstance(exc, JobNotFoundError):
            message = (
                f"job {job_id} vanished from the job store while it ran (its data was lost, "
                "e.g. Redis restarted without persistence); this run stopped"
            )
        else:
            message = f"job {job_id} stopped: the job store failed: {exc}"
        logger.error("%s", message)
        with anyio.CancelScope(shield=True), contextlib.suppress(HospitalBulkError):
            await self._stopped(run, JobStatus.FAILED, message)
        run.job.status = JobStatus.FAILED
        raise BackendError(message) from exc

    async def _save_rows(self, run: _Run, rows: list[JobRow]) -> None:
        await self._jobs.save_rows(run.job.job_id, rows, token=run.token)
        run.saved(rows)  # counted once stored, as snapshots count

    def _writer(self, run: _Run) -> _RowWriter:
        if run.rows is None:
            run.rows = _RowWriter(functools.partial(self._save_rows, run))
        return run.rows

    async def _save_row(self, run: _Run, row: JobRow) -> None:
        """Save one row a sending worker changed, in a write shared with the other workers."""
        await self._writer(run).save((row,))

    def _defer_row(self, run: _Run, row: JobRow, kind: str, message: str | None) -> None:
        """Have a row's outcome written with the next write, and its event sent after it."""

        async def stored() -> None:
            await self._emit(run, kind, row=row.row, message=message)

        self._writer(run).defer(row, stored)

    async def _flush_while_sending(self, run: _Run, done: anyio.Event) -> None:
        """Write deferred outcomes that no worker's next write took within a short while.

        Workers that wait (for the rate limit, an open breaker) make no writes; their rows'
        outcomes and events are not held back longer than `_DEFER_FOR`.
        """
        writer = self._writer(run)
        try:
            while not done.is_set():
                await writer.wait_deferred()
                with anyio.move_on_after(_DEFER_FOR):
                    await done.wait()
                await writer.flush()
            await writer.flush()  # what the last workers left
        except LeaseLostError:
            run.lost = True
            run.scope.cancel()

    async def _save_job(self, run: _Run) -> None:
        await self._jobs.save_job(run.job, token=run.token)

    async def _execute(self, run: _Run) -> None:
        job = run.job
        for row in job.rows:
            if row.state is RowState.REJECTED:
                row.state, row.error = RowState.PENDING, None
            elif row.state is RowState.IN_FLIGHT:
                row.state = RowState.UNKNOWN
                row.error = "the previous run stopped while this row was in flight"
        job.status, job.error = JobStatus.RUNNING, None
        job.started_at, job.finished_at = time.time(), None
        await self._save_rows(run, job.rows)
        await self._save_job(run)
        await self._emit(run, "job_started")
        logger.info("Job %s started: %d row(s)", job.job_id, len(job.rows))

        try:
            await self._warm_up(run)
        except UpstreamError as exc:
            await self._stopped(run, JobStatus.FAILED, f"the upstream is unreachable: {exc}")
            return

        try:
            await self._send(run, [r for r in job.rows if r.state is RowState.PENDING])
            for _ in range(_MAX_ROUNDS):
                if await self._audit(run):
                    break
                again = [r for r in job.rows if r.state is RowState.PENDING and r.batch_id]
                if not again:
                    break
                await self._send(run, again)
        except UpstreamError as exc:
            # The batches could not be read back (an outage): stop, resumable, guessing nothing.
            await self._stopped(run, JobStatus.PARTIALLY_FAILED, f"stopped: {exc}")
            return

        missing = [r for r in job.rows if r.batch_id is not None and r.state not in _EXISTS]
        if missing and not self.settings.activate_partial:
            await self._stopped(
                run,
                JobStatus.PARTIALLY_FAILED,
                f"{len(missing)} row(s) not created; batches left inactive "
                "(fix the cause, then resume; or roll back)",
            )
            return
        await self._activate(run)

    async def _send(self, run: _Run, rows: list[JobRow]) -> None:
        """Create rows, at most `concurrency` at once across every job of the processor."""
        if not rows:
            return
        pending = iter(rows)
        done = anyio.Event()
        async with anyio.create_task_group() as flushing:
            flushing.start_soon(self._flush_while_sending, run, done)
            try:
                async with anyio.create_task_group() as tg:
                    for _ in range(min(self.settings.concurrency, len(rows))):
                        tg.start_soon(self._worker, run, pending)
            finally:
                done.set()
                self._writer(run).wake()

    async def _audit(self, run: _Run) -> bool:
        """Read back every batch not yet active and make it match the job's rows.

        Rows whose outcome is unknown are resolved (adopted when their hospital is there,
        sent again when it is not), rows the upstream lost go back to ``pending``, and
        hospitals in the batch that no row accounts for (duplicates, strangers) are deleted.

        Returns:
            True when nothing is left to send or delete.
        """
        job = run.job
        clean = True
        batches = _rows_by_batch(job.rows)
        activated = set(job.activated_batches)
        for batch_id in list(job.batch_ids):
            if batch_id in activated:
                continue
            rows = batches.get(batch_id, [])
            if not any(r.state in _AUDITED for r in rows):
                continue
            await self._wait_horizon(run, rows)
            path = f"/hospitals/batch/{batch_id}"
            listed = await self._call("other", path, _bind(self._client.list_batch, batch_id), run)
            changed, surplus = _reconcile(rows, listed)
            if surplus and self.settings.surplus_policy == "rebuild":
                await self._rebuild(run, batch_id, rows)
                clean = False
                continue
            for hospital in surplus:
                with contextlib.suppress(HospitalNotFoundError):
                    await self._call(
                        "other",
                        f"/hospitals/{hospital.id}",
                        _bind(self._client.delete_hospital, hospital.id),
                        run,
                    )
                logger.warning(
                    "Batch %s held hospital %d that no row accounts for: deleted",
                    batch_id,
                    hospital.id,
                )
            if changed:
                lost = sum(1 for r in changed if r.error == _LOST)
                if lost:
                    logger.warning(
                        "Batch %s: %d hospital(s) no longer upstream (did it restart?); "
                        "sending them again",
                        batch_id,
                        lost,
                    )
                await self._save_rows(run, changed)
                await self._emit(
                    run,
                    "batch_reconciled",
                    message=f"{batch_id}: {lost} row(s) lost upstream" if lost else str(batch_id),
                )
            if surplus or any(r.state is RowState.PENDING for r in rows):
                clean = False
        return clean

    async def _rebuild(self, run: _Run, batch_id: uuid.UUID, rows: list[JobRow]) -> None:
        """Delete a batch that holds hospitals no row accounts for; send its rows anew.

        The rows move to a new batch id only once the old batch is deleted, so a failure
        here leaves the job on the old batch, to be audited (and rebuilt) again on resume.
        """
        path = f"/hospitals/batch/{batch_id}"
        with contextlib.suppress(BatchNotFoundError):
            await self._call("other", path, _bind(self._client.delete_batch, batch_id), run)
        job = run.job
        fresh = uuid.uuid4()
        job.batch_ids[job.batch_ids.index(batch_id)] = fresh
        for row in rows:
            row.batch_id = fresh
            if row.state in _AUDITED:
                row.state, row.hospital_id = RowState.PENDING, None
                row.error = "its batch held unexpected hospitals and was rebuilt"
        await self._save_rows(run, rows)
        await self._save_job(run)
        logger.warning(
            "Batch %s held unexpected hospitals: deleted, rebuilt as %s", batch_id, fresh
        )
        await self._emit(run, "batch_reconciled", message=f"{batch_id} rebuilt as {fresh}")

    async def _wait_horizon(self, run: _Run | None, rows: list[JobRow]) -> None:
        """Wait until no create of an unknown row can still be executing upstream."""
        sent = [r.sent_at for r in rows if r.state is RowState.UNKNOWN and r.sent_at]
        if not sent:
            return
        until = max(sent) + self.settings.reconcile_horizon
        if until > time.time():
            self._waiting(run, WaitReason.RECONCILE, until)
            await self._emit(run, "waiting", message="reconciling rows whose outcome is unknown")
            await anyio.sleep(max(0.0, until - time.time()))  # the hook may have taken long
            self._waiting(run, None, None)

    async def _worker(self, run: _Run, pending: Iterator[JobRow]) -> None:
        for row in pending:
            async with self._slots:
                try:
                    await self._create(run, row)
                except LeaseLostError:
                    # Another worker owns the job now: stop sending at once, write nothing.
                    run.lost = True
                    run.scope.cancel()
                    return

    async def _create(self, run: _Run, row: JobRow) -> None:
        assert row.batch_id is not None
        body = HospitalCreate(
            name=row.name, address=row.address, phone=row.phone, creation_batch_id=row.batch_id
        )

        async def attempt() -> Hospital:
            await self._admit(run, "create", "/hospitals/")
            row.state = RowState.IN_FLIGHT
            row.attempts += 1
            row.sent_at = time.time()
            await self._save_row(run, row)
            try:
                return await self._client.create_hospital(body)
            except UpstreamError as exc:
                nothing = exc.outcome in (Outcome.NOT_SENT, Outcome.RATE_LIMITED, Outcome.REJECTED)
                row.state = RowState.PENDING if nothing else RowState.UNKNOWN
                # The horizon counts from when the outcome became unknown, which is never
                # before the request left (the stamp stored before sending serves a crash).
                row.sent_at = time.time()
                raise
            except BaseException:
                row.state = RowState.UNKNOWN  # cancelled mid-request: it may exist upstream
                row.sent_at = time.time()
                raise

        message: str | None
        try:
            hospital = await self._guarded(attempt, run)
        except (RequestNotSentError, RateLimitedError) as exc:
            row.state, row.error = RowState.PENDING, f"not sent: {exc.message}"
            kind, message = "row_deferred", row.error
        except BatchFullError as exc:
            # The batch holds hospitals from an earlier attempt: the audit sorts it out.
            row.state, row.error = RowState.PENDING, f"batch full upstream: {exc.message}"
            kind, message = "row_deferred", row.error
        except UpstreamError as exc:
            if exc.outcome is Outcome.REJECTED:  # a 4xx, or a redirect: nothing was created
                row.state, row.error = RowState.REJECTED, exc.message
                kind, message = "row_rejected", exc.message
                logger.warning("Row %d rejected by the upstream: %s", row.row, exc.message)
            else:  # ambiguous: it may exist upstream now
                row.state, row.error = RowState.UNKNOWN, f"outcome unknown: {exc.message}"
                kind, message = "row_unknown", row.error
                logger.warning("Row %d: %s", row.row, row.error)
        else:
            row.state, row.error, row.hospital_id = RowState.CREATED, None, hospital.id
            kind, message = "row_created", None
            logger.debug("Hospital created successfully: %s (ID: %d)", row.name, hospital.id)
        self._defer_row(run, row, kind, message)

    async def _guarded(self, attempt: Callable[[], Awaitable[_T]], run: _Run | None) -> _T:
        """One request through the retry policy, the breaker accounting included."""

        async def once() -> _T:
            try:
                result = await attempt()
            except HospitalBulkError as exc:
                if counts_as_failure(exc):
                    await self._breaker.record_failure()
                elif isinstance(exc, UpstreamError):  # an answer came: the upstream is up
                    await self._breaker.record_success()
                # Anything else (a lost lease, a failing store, an open breaker) says nothing
                # of the upstream; a probe that ends so lets the next caller probe later.
                raise
            await self._breaker.record_success()
            return result

        async def on_retry(error: UpstreamError, wait: float) -> None:
            if isinstance(error, RateLimitedError):
                logger.warning("Rate limited by the upstream: every sender waits %.1f s", wait)
                await self._limiter.pause(wait)
                self._waiting(run, WaitReason.RATE_LIMIT, time.time() + wait)

        return await self._retry.call(once, on_retry=on_retry)

    async def _admit(self, run: _Run | None, kind: RateKind, path: str) -> None:
        """Wait for the rate limiter, then the circuit breaker; rows wait here, never fail.

        The limiter comes first so that a half-open breaker's probe leaves as soon as it is
        granted (a probe that then waited for the limiter could outlive its lease).
        """

        def on_wait(until: float) -> None:
            self._waiting(run, WaitReason.RATE_LIMIT, until)

        while True:
            if self._limiter_reports:
                await self._limiter.acquire(kind, path, on_wait=on_wait)  # type: ignore[call-arg]
            else:
                await self._limiter.acquire(kind, path)
            try:
                await self._breaker.before_call()
            except CircuitOpenError as exc:
                self._waiting(run, WaitReason.BREAKER, exc.retry_at)
                await self._emit(run, "waiting", message=str(exc))
                await anyio.sleep(max(0.05, exc.retry_at - time.time()))
                continue
            self._waiting(run, None, None)
            return

    async def _call(
        self,
        kind: RateKind,
        path: str,
        request: Callable[[], Awaitable[_T]],
        run: _Run | None = None,
    ) -> _T:
        """A request other than a create: admitted, retried, accounted."""

        async def attempt() -> _T:
            await self._admit(run, kind, path)
            return await request()

        return await self._guarded(attempt, run)

    async def _warm_up(self, run: _Run) -> None:
        self._waiting(run, WaitReason.WARM_UP, None)
        try:
            await self._retry.call(
                lambda: self._client.warm_up(timeout=self.settings.warm_up_timeout)
            )
        finally:
            self._waiting(run, None, None)

    async def _activate(self, run: _Run) -> None:
        job = run.job
        job.status = JobStatus.ACTIVATING
        await self._save_job(run)
        problems: list[str] = []
        batches = _rows_by_batch(job.rows)
        activated = set(job.activated_batches)
        for batch_id in job.batch_ids:
            if batch_id in activated:
                continue
            members = [r for r in batches.get(batch_id, []) if r.state in _EXISTS]
            if not members:
                continue
            try:
                verified = await self._activate_batch(run, batch_id, len(members))
            except UpstreamError as exc:
                problems.append(f"batch {batch_id}: {exc.message}")
                continue
            if not verified:
                problems.append(f"batch {batch_id}: not verified active")
                continue
            job.activated_batches.append(batch_id)
            for row in members:
                row.state = RowState.CREATED_AND_ACTIVATED
            await self._save_rows(run, members)
            await self._save_job(run)
            logger.info("Batch %s activated: %d hospital(s)", batch_id, len(members))
            await self._emit(run, "batch_activated", message=str(batch_id))
        not_done = [
            r for r in job.rows if r.state not in (RowState.CREATED_AND_ACTIVATED, RowState.INVALID)
        ]
        if problems:
            await self._stopped(run, JobStatus.PARTIALLY_FAILED, "; ".join(problems))
        elif not_done:
            await self._stopped(
                run,
                JobStatus.PARTIALLY_FAILED,
                f"{len(not_done)} row(s) not created; the created ones were activated",
            )
        else:
            await self._stopped(run, JobStatus.COMPLETED, None)

    async def _activate_batch(self, run: _Run, batch_id: uuid.UUID, expected: int) -> bool:
        path = f"/hospitals/batch/{batch_id}/activate"
        try:
            answer = await self._call(
                "other", path, lambda: self._client.activate_batch(batch_id), run
            )
        except (BatchAlreadyActiveError, AmbiguousOutcomeError) as exc:
            logger.info("Activation of batch %s unclear (%s): reading it back", batch_id, exc)
        else:
            if answer.activated_count == expected:
                return True
        listed = await self._call(
            "other",
            f"/hospitals/batch/{batch_id}",
            lambda: self._client.list_batch(batch_id),
            run,
        )
        return len(listed) >= expected and all(h.active for h in listed)

    async def _stopped(self, run: _Run, status: JobStatus, error: str | None) -> None:
        run.finishing = True
        job = run.job
        for row in job.rows:
            if row.state is RowState.IN_FLIGHT:
                row.state = RowState.UNKNOWN
                row.error = "stopped while in flight"
        now = time.time()
        job.status, job.error, job.finished_at = status, error, now
        job.processing_seconds += time.monotonic() - run.started
        run.started = time.monotonic()
        # Outcomes still waiting for a write go out with every row now; their events follow.
        deferred = run.rows.take_deferred() if run.rows is not None else []
        await self._save_rows(run, job.rows)
        await self._save_job(run)
        for stored in deferred:
            await stored()
        level = logging.INFO if status is JobStatus.COMPLETED else logging.WARNING
        logger.log(level, "Job %s %s%s", job.job_id, status.value, f": {error}" if error else "")
        await self._emit(run, "job_finished", message=error)

    # -- progress ------------------------------------------------------------------------------

    def _waiting(self, run: _Run | None, reason: WaitReason | None, until: float | None) -> None:
        if run is not None:
            run.waiting_for, run.waiting_until = reason, until

    async def _emit(
        self, run: _Run | None, kind: str, *, row: int | None = None, message: str | None = None
    ) -> None:
        if run is None:
            return
        job = run.job
        subscribers = self._subscribers.get(job.job_id)
        if run.on_progress is None and not subscribers:
            return
        snapshot = self._snapshot(job, run)
        if run.on_progress is not None:
            outcome = run.on_progress(snapshot)
            if inspect.isawaitable(outcome):
                await outcome
        for send in list(subscribers or ()):
            with contextlib.suppress(
                anyio.WouldBlock, anyio.BrokenResourceError, anyio.ClosedResourceError
            ):
                send.send_nowait(JobEvent(kind, job.job_id, snapshot, row, message))

    def _snapshot(self, job: JobRecord, run: _Run | None) -> JobSnapshot:
        if run is not None:
            counts = dict(run.counts)
        else:
            counts = dict.fromkeys(RowState, 0)
            for row in job.rows:
                counts[row.state] += 1
        total = len(job.rows)
        settled = sum(counts[s] for s in SETTLED_STATES)
        elapsed = job.processing_seconds
        if run is not None:
            elapsed += time.monotonic() - run.started
        eta: float | None = None
        if job.status.terminal:
            eta = 0.0
        elif run is not None and settled and settled < total:
            eta = elapsed / settled * (total - settled)
        # Built without validation (every value is already of its field's type): a job emits
        # a snapshot per row event, and validating its batch ids each time cost O(batches).
        return JobSnapshot.model_construct(
            job_id=job.job_id,
            status=job.status,
            total_rows=total,
            counts=counts,
            percent=round(100.0 * settled / total, 1) if total else 100.0,
            elapsed_seconds=round(elapsed, 3),
            eta_seconds=None if eta is None else round(eta, 1),
            waiting_for=run.waiting_for if run is not None else None,
            waiting_until=run.waiting_until if run is not None else None,
            batch_ids=list(job.batch_ids),
            activated_batches=list(job.activated_batches),
            idempotency_key=job.idempotency_key,
            tenant=job.tenant,
            created_at=job.created_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
            error=job.error,
        )

    def _result(self, job: JobRecord) -> JobResult:
        hospitals = [
            HospitalResult(
                row=r.row, hospital_id=r.hospital_id, name=r.name, status=r.state, error=r.error
            )
            for r in job.rows
        ]
        processed = sum(1 for r in job.rows if r.state in _EXISTS)
        return JobResult(
            job_id=job.job_id,
            status=job.status,
            batch_id=job.batch_ids[0] if job.batch_ids else None,
            batch_ids=list(job.batch_ids),
            total_hospitals=len(job.rows),
            processed_hospitals=processed,
            failed_hospitals=len(job.rows)
            - processed
            - sum(1 for r in job.rows if r.state is RowState.DELETED),
            processing_time_seconds=round(job.processing_seconds, 3),
            batch_activated=bool(job.batch_ids)
            and set(job.batch_ids) <= set(job.activated_batches),
            hospitals=hospitals,
        )


def _bind(method: Callable[[_A], Awaitable[_T]], argument: _A) -> Callable[[], Awaitable[_T]]:
    return lambda: method(argument)


def _rows_by_batch(rows: list[JobRow]) -> dict[uuid.UUID, list[JobRow]]:
    """The job's rows grouped by batch, in one pass (not one scan per batch)."""
    batches: dict[uuid.UUID, list[JobRow]] = {}
    for row in rows:
        if row.batch_id is not None:
            batches.setdefault(row.batch_id, []).append(row)
    return batches


def _key(name: str, address: str, phone: str | None) -> tuple[str, str, str | None]:
    return (name, address, phone or None)


def _reconcile(rows: list[JobRow], listed: list[Hospital]) -> tuple[list[JobRow], list[Hospital]]:
    """Match one batch's rows with what the upstream lists, as a multiset of hospitals.

    Returns:
        The rows that changed, and the listed hospitals no row accounts for.
    """
    by_id = {h.id: h for h in listed}
    used: set[int] = set()
    changed: list[JobRow] = []
    for row in rows:
        if row.state not in _EXISTS or row.hospital_id is None:
            continue
        found = by_id.get(row.hospital_id)
        if found is not None and _key(found.name, found.address, found.phone) == _key(
            row.name, row.address, row.phone
        ):
            used.add(found.id)
            continue
        # The upstream lost it (a restart empties its storage and restarts its ids).
        row.state, row.hospital_id = RowState.PENDING, None
        row.error = _LOST
        changed.append(row)
    free: dict[tuple[str, str, str | None], list[Hospital]] = {}
    for hospital in sorted(listed, key=lambda h: h.id):
        if hospital.id not in used:
            free.setdefault(_key(hospital.name, hospital.address, hospital.phone), []).append(
                hospital
            )
    for row in rows:
        if row.state is not RowState.UNKNOWN:
            continue
        candidates = free.get(_key(row.name, row.address, row.phone))
        if candidates:
            adopted = candidates.pop(0)
            row.state, row.hospital_id, row.error = RowState.CREATED, adopted.id, None
        else:
            row.state, row.error = RowState.PENDING, None
        changed.append(row)
    surplus = [h for group in free.values() for h in group]
    return changed, surplus


def _redis_backend(settings: Settings, client: Any) -> Any:
    """The Redis backend of `settings` (or on `client`), imported only when asked for."""
    try:
        from .backends.redis import RedisBackend
    except ImportError as exc:  # the redis extra is not installed
        raise ConfigurationError(
            "the Redis backend needs the redis extra: pip install 'hospital-bulk[redis]'"
        ) from exc
    return RedisBackend(
        settings.backend if client is None else client, prefix=settings.redis_prefix
    )


def _progress_key(snapshot: JobSnapshot) -> tuple[Any, ...]:
    """What a follower compares to tell that a job changed."""
    return (
        snapshot.status,
        tuple(sorted(snapshot.counts.items())),
        len(snapshot.activated_batches),
        snapshot.error,
    )


def _first_error(exc: Exception) -> Exception:
    """The error to report from a task group's exception group: the library's, if any."""
    while isinstance(exc, BaseExceptionGroup):
        members = [e for e in exc.exceptions if isinstance(e, Exception)]
        if not members:
            break
        ours = [e for e in members if isinstance(e, HospitalBulkError)]
        exc = (ours or members)[0]
    return exc


def _scoped_key(key: str, tenant: str | None) -> str:
    """The idempotency key as stored: a tenant's keys live in a space of their own."""
    if tenant is None:
        return key
    return "tenant:" + hashlib.sha256(f"{tenant}\x00{key}".encode()).hexdigest()
