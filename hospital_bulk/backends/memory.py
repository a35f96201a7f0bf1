"""In-memory backends: the state of one process, kept in its own memory.

`MemoryJobStore` implements `hospital_bulk.protocols.JobStore`, `MemoryIdempotencyStore`
implements `hospital_bulk.protocols.IdempotencyStore`, `MemoryRateLimiter` the `RateLimiter`
and `MemoryCircuitBreaker` the `CircuitBreaker`. They suit a single process (a script,
a notebook, one service instance); processes that must share jobs and keys need a shared backend.

How they behave:

- **Copies in, copies out.** Every write stores a copy of what it is given and every read
  returns a fresh copy, so a caller mutating a `JobRecord` never changes the store behind its
  back. Copying a job costs O(rows).
- **Retention.** A job whose status is terminal (`JobStatus.terminal`) is kept `retention`
  seconds after its `finished_at` (after its `created_at` if it has no `finished_at`), then it
  is gone: reads and writes raise `JobNotFoundError`. A job that is not terminal never expires;
  a job resumed before its deadline is kept, and expires `retention` after its next finish.
- **Lazy, bounded purging.** Expired jobs and keys are dropped on the next `create` / `claim`
  (and `list_ids` / `list_keys`), through a heap of deadlines: each expired entry is removed
  once, in O(log n), so memory stays bounded by what is still live without ever scanning
  everything.
- **Concurrency.** Every method is a coroutine that changes state without awaiting in
  between, so concurrent tasks of one event loop never see a half-done write. The stores are
  not meant to be shared between threads or event loops.
- **Idempotency.** `MemoryIdempotencyStore.claim` reserves the key before it awaits the job
  store's `create`, so a concurrent claim of the same key sees the reservation (and gets
  `IdempotencyInProgressError`, or `IdempotencyConflictError` for another fingerprint) instead
  of creating a second job. The reservation is released if the creation fails or is
  cancelled; the job store's `create` must store nothing when it raises (as
  `MemoryJobStore.create` does). A key whose job was created is kept at least `ttl` seconds.
"""

from __future__ import annotations

import copy
import dataclasses
import heapq
import operator
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from .._breaker import MemoryCircuitBreaker
from .._exceptions import (
    ConfigurationError,
    IdempotencyConflictError,
    IdempotencyInProgressError,
    JobNotFoundError,
    JobStateError,
    LeaseLostError,
)
from .._jobs import JobRecord, JobRow, Lease
from .._ratelimit import MemoryRateLimiter
from ..protocols import IdempotencyStore, JobStore

__all__ = [
    "DEFAULT_RETENTION",
    "MAX_KEY_LENGTH",
    "MemoryCircuitBreaker",
    "MemoryIdempotencyStore",
    "MemoryJobStore",
    "MemoryRateLimiter",
]

DEFAULT_RETENTION: float = 7 * 24 * 3600.0
"""How long a finished job is kept by default, in seconds (seven days)."""

MAX_KEY_LENGTH: int = 255
"""The longest idempotency key accepted, in characters."""

# Every field of a row, in constructor order: copying a row is one call, and stays complete
# when a field is added to `JobRow`. Every field holds an immutable value, so this copy is deep.
_row_values = operator.attrgetter(*(field.name for field in dataclasses.fields(JobRow)))


def _copy_row(row: JobRow) -> JobRow:
    return JobRow(*_row_values(row))


def _copy_job(job: JobRecord, rows: list[JobRow]) -> JobRecord:
    """Return an independent copy of `job`'s own fields, holding `rows` as its rows."""
    return dataclasses.replace(
        job,
        batch_ids=list(job.batch_ids),
        rows=rows,
        activated_batches=list(job.activated_batches),
        options=copy.deepcopy(job.options),
    )


def check_seconds(name: str, value: object) -> float:
    """Return `value` as a float, or raise `ConfigurationError` unless it is a number > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigurationError(f"{name} must be a number of seconds > 0, got {value!r}")
    return float(value)


class MemoryJobStore:
    """A `JobStore` keeping jobs in this process's memory, with retention of finished jobs.

    Args:
        retention: How long a terminal job is kept after it finished, in seconds (> 0;
            ``math.inf`` keeps jobs forever).
        clock: Returns the time now in `time.time()` seconds; the same clock the jobs'
            `finished_at` is measured with. Tests inject a fake one.

    Raises:
        ConfigurationError: `retention` is not a number > 0.
    """

    def __init__(
        self,
        *,
        retention: float = DEFAULT_RETENTION,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._retention = check_seconds("retention", retention)
        self._clock = clock
        # Insertion order is creation order: `list_ids` relies on it.
        self._jobs: dict[str, JobRecord] = {}
        # The deadline of every stored terminal job, and a heap of (deadline, job id) entries.
        # A heap entry is live while `_deadlines` holds the same deadline for its job; entries
        # left behind by a resumed or re-finished job are dropped when they reach the top.
        self._deadlines: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []
        self._leases: dict[str, Lease] = {}
        self._tokens: dict[str, int] = {}

    @property
    def retention(self) -> float:
        """How long a terminal job is kept after it finished, in seconds."""
        return self._retention

    async def create(self, job: JobRecord) -> None:
        """Store a copy of a new job (and drop the jobs whose retention has passed).

        Args:
            job: The job; its id must be new and each row's `JobRow.index` its position.

        Raises:
            ConfigurationError: A job with this id is already stored, the id is empty, or a
                row's index is not its position. Nothing is stored then.
        """
        self._purge(self._clock())
        if not isinstance(job.job_id, str) or not job.job_id:
            raise ConfigurationError(f"a job id must be a non-empty string, got {job.job_id!r}")
        if job.job_id in self._jobs:
            raise ConfigurationError(
                f"a job with id {job.job_id!r} already exists; every job needs a new id"
            )
        rows: list[JobRow] = []
        for position, row in enumerate(job.rows):
            if row.index != position:
                raise ConfigurationError(
                    f"row {position} of job {job.job_id!r} has index {row.index}; "
                    "each row's index must be its position in the job"
                )
            rows.append(_copy_row(row))
        stored = _copy_job(job, rows)
        self._jobs[job.job_id] = stored
        self._track(stored)

    async def get(self, job_id: str) -> JobRecord:
        """Return an independent copy of a job with its rows.

        Args:
            job_id: The job's id.

        Returns:
            The job; changing it changes nothing in the store.

        Raises:
            JobNotFoundError: No job has this id, or its retention has passed.
        """
        job = self._live(job_id)
        return _copy_job(job, [_copy_row(row) for row in job.rows])

    async def save_rows(
        self, job_id: str, rows: Sequence[JobRow], *, token: int | None = None
    ) -> None:
        """Replace the given rows of a job, each by its `JobRow.index`, with copies.

        Every index is checked before anything is written: either every row is stored or
        none is. When several given rows share an index, the last one wins.

        Args:
            job_id: The job's id.
            rows: The rows to write.
            token: The writer's fencing token; the write is refused unless it is the latest.

        Raises:
            JobNotFoundError: No job has this id, or its retention has passed.
            ConfigurationError: A row's index is outside the job's rows.
            LeaseLostError: `token` is not the latest lease's.
        """
        stored = self._live(job_id).rows
        self._check_token(job_id, token)
        copies: list[JobRow] = []
        for row in rows:
            if not 0 <= row.index < len(stored):
                raise ConfigurationError(
                    f"row index {row.index} is out of range for job {job_id!r}, "
                    f"which has {len(stored)} rows"
                )
            copies.append(_copy_row(row))
        for row in copies:
            stored[row.index] = row

    async def save_job(self, job: JobRecord, *, token: int | None = None) -> None:
        """Store a copy of every field of a job except its rows, which stay as stored.

        Args:
            job: The job.
            token: The writer's fencing token; the write is refused unless it is the latest.

        Raises:
            JobNotFoundError: No job has this id, or its retention has passed.
            LeaseLostError: `token` is not the latest lease's.
        """
        current = self._live(job.job_id)
        self._check_token(job.job_id, token)
        stored = _copy_job(job, current.rows)
        self._jobs[job.job_id] = stored
        self._track(stored)

    async def list_ids(self) -> list[str]:
        """Return the ids of the stored jobs, oldest first (in the order they were created).

        Jobs whose retention has passed are dropped first and are not listed.
        """
        self._purge(self._clock())
        return list(self._jobs)

    async def delete(self, job_id: str) -> None:
        """Remove a job and its rows.

        Args:
            job_id: The job's id.

        Raises:
            JobNotFoundError: No job has this id, or its retention has passed.
        """
        self._live(job_id)
        self._forget(job_id)

    async def acquire_lease(self, job_id: str, owner: str, ttl: float) -> int:
        """Take the job's lease for `owner`; see `hospital_bulk.protocols.JobStore`.

        Args:
            job_id: The job's id.
            owner: The worker taking it.
            ttl: Seconds the lease lasts unless renewed.

        Returns:
            A new fencing token.

        Raises:
            JobNotFoundError: No job has this id.
            JobStateError: Another owner holds a lease that has not expired.
        """
        job = self._live(job_id)
        ttl = check_seconds("ttl", ttl)
        now = self._clock()
        held = self._leases.get(job_id)
        if held is not None and held.owner != owner and held.expires_at > now:
            raise JobStateError(
                f"job {job_id} is already running in another worker",
                job_id=job_id,
                status=job.status.value,
            )
        token = self._tokens.get(job_id, 0) + 1
        self._tokens[job_id] = token
        self._leases[job_id] = Lease(owner=owner, token=token, expires_at=now + ttl)
        return token

    async def renew_lease(self, job_id: str, token: int, ttl: float) -> None:
        """Extend the lease; see `hospital_bulk.protocols.JobStore`.

        Args:
            job_id: The job's id.
            token: The holder's fencing token.
            ttl: Seconds the lease lasts from now.

        Raises:
            JobNotFoundError: The job is gone (expired or deleted).
            LeaseLostError: `token` is not the latest lease's.
        """
        self._live(job_id)
        self._check_token(job_id, token)
        held = self._leases[job_id]
        ttl = check_seconds("ttl", ttl)
        self._leases[job_id] = dataclasses.replace(held, expires_at=self._clock() + ttl)

    async def release_lease(self, job_id: str, token: int) -> None:
        """Give the lease up; nothing happens when `token` is no longer the latest.

        Args:
            job_id: The job's id.
            token: The holder's fencing token.
        """
        held = self._leases.get(job_id)
        if held is not None and held.token == token:
            del self._leases[job_id]

    async def lease(self, job_id: str) -> Lease | None:
        """Return the job's lease while it has not expired, else ``None``.

        Args:
            job_id: The job's id.
        """
        held = self._leases.get(job_id)
        if held is None or held.expires_at <= self._clock():
            return None
        return held

    def _check_token(self, job_id: str, token: int | None) -> None:
        """Refuse a write whose fencing token is not the job's latest.

        A token stays valid after its lease expired as long as no other worker took a newer
        one: fencing is by token, expiry only lets another worker take over.
        """
        if token is None:
            return
        if self._tokens.get(job_id) != token:
            raise LeaseLostError(
                f"job {job_id} was taken over by another worker (fencing token {token} is "
                "stale); this worker must stop",
                job_id=job_id,
                status="running",
            )

    def _live(self, job_id: str) -> JobRecord:
        """Return the stored job (not a copy), dropping it if its retention has passed."""
        job = self._jobs.get(job_id)
        if job is None:
            raise JobNotFoundError(job_id)
        deadline = self._deadlines.get(job_id)
        if deadline is not None and self._clock() > deadline:
            self._forget(job_id)
            raise JobNotFoundError(job_id)
        return job

    def _track(self, job: JobRecord) -> None:
        """Record when a just-stored job expires (never, unless it is terminal)."""
        if not job.status.terminal:
            self._deadlines.pop(job.job_id, None)
            return
        finished = job.finished_at if job.finished_at is not None else job.created_at
        deadline = finished + self._retention
        if self._deadlines.get(job.job_id) != deadline:
            self._deadlines[job.job_id] = deadline
            heapq.heappush(self._heap, (deadline, job.job_id))

    def _purge(self, now: float) -> None:
        """Drop every job whose deadline has passed."""
        heap = self._heap
        while heap and heap[0][0] < now:
            deadline, job_id = heapq.heappop(heap)
            if self._deadlines.get(job_id) == deadline:
                self._forget(job_id)

    def _forget(self, job_id: str) -> None:
        del self._jobs[job_id]
        self._deadlines.pop(job_id, None)
        self._leases.pop(job_id, None)
        self._tokens.pop(job_id, None)


@dataclasses.dataclass(slots=True)
class _Claim:
    """One idempotency key's claim: reserved while `expires_at` is ``None``, then done."""

    fingerprint: str
    job_id: str
    expires_at: float | None = None


class MemoryIdempotencyStore:
    """An `IdempotencyStore` keeping keys in this process's memory.

    Args:
        jobs: The job store the claimed jobs are created in (a `MemoryJobStore`, or any
            `JobStore` whose `create` stores nothing when it raises).
        clock: Returns the time now in `time.time()` seconds. Tests inject a fake one.
    """

    def __init__(self, jobs: JobStore, *, clock: Callable[[], float] = time.time) -> None:
        self._jobs = jobs
        self._clock = clock
        self._claims: dict[str, _Claim] = {}
        # (expires_at, key) of every done claim; entries of keys since expired and claimed
        # again are dropped when they reach the top.
        self._heap: list[tuple[float, str]] = []

    async def claim(self, key: str, fingerprint: str, job: JobRecord, *, ttl: float) -> str:
        """Claim `key` for `job` and create the job, atomically with respect to other claims.

        A free key (never used, or expired) is reserved, the job is created, and the key is
        kept for at least `ttl` seconds from then. A key already used with the same
        fingerprint gives back its job's id and `job` is not created.

        Args:
            key: The idempotency key (a non-empty string of at most 255 characters).
            fingerprint: A digest of the file and options (a non-empty string).
            job: The job to create when the key is free.
            ttl: How long the key is kept after its job was created, in seconds (> 0).

        Returns:
            The id of the key's job: `job`'s when the key was free (the job is now stored),
            the earlier job's when the key was used with the same fingerprint.

        Raises:
            ConfigurationError: `key`, `fingerprint` or `ttl` has a wrong value.
            IdempotencyConflictError: The key is used (or being used) with another fingerprint.
            IdempotencyInProgressError: The key's first claim is still creating its job.
            Exception: Whatever the job store's `create` raised; the key is left free.
        """
        if not isinstance(key, str) or not key or len(key) > MAX_KEY_LENGTH:
            raise ConfigurationError(
                f"an idempotency key must be a non-empty string of at most {MAX_KEY_LENGTH} "
                f"characters, got {key!r:.80}"
            )
        if not isinstance(fingerprint, str) or not fingerprint:
            raise ConfigurationError(
                f"a fingerprint must be a non-empty string, got {fingerprint!r:.80}"
            )
        seconds = check_seconds("ttl", ttl)
        self._purge(self._clock())
        held = self._claims.get(key)
        if held is not None:
            return self._reuse(key, fingerprint, held)

        claim = _Claim(fingerprint=fingerprint, job_id=job.job_id)
        self._claims[key] = claim
        try:
            await self._jobs.create(job)
        except BaseException:
            # Failed or cancelled: the job store kept nothing, so the key is free again.
            if self._claims.get(key) is claim:
                del self._claims[key]
            raise
        claim.expires_at = self._clock() + seconds
        heapq.heappush(self._heap, (claim.expires_at, key))
        return job.job_id

    async def list_keys(self) -> list[str]:
        """Return the keys held (done or still creating), oldest claim first.

        Expired keys are dropped first and are not listed.
        """
        self._purge(self._clock())
        return list(self._claims)

    def _reuse(self, key: str, fingerprint: str, held: _Claim) -> str:
        """Answer a claim of a key already held: its job id, or the reason it cannot be used."""
        done = held.expires_at is not None
        if held.fingerprint != fingerprint:
            raise IdempotencyConflictError(
                f"idempotency key {key!r} was already used for another file or other options; "
                "use a new key for a different submission",
                key=key,
                job_id=held.job_id if done else None,
            )
        if not done:
            raise IdempotencyInProgressError(
                f"the first submission with idempotency key {key!r} is still creating its job; "
                "retry shortly",
                key=key,
            )
        return held.job_id

    def _purge(self, now: float) -> None:
        """Drop every key whose time to live has passed."""
        heap = self._heap
        while heap and heap[0][0] < now:
            expires_at, key = heapq.heappop(heap)
            held = self._claims.get(key)
            if held is not None and held.expires_at == expires_at:
                del self._claims[key]


if TYPE_CHECKING:
    # The stores satisfy the Protocols (checked by mypy only).
    def _conforms(
        jobs: MemoryJobStore, keys: MemoryIdempotencyStore
    ) -> tuple[JobStore, IdempotencyStore]:
        return jobs, keys
