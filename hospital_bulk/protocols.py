"""The parts a processor is built from, as Protocols.

Each part has an in-memory implementation (`hospital_bulk.backends.memory`) and a Redis one
(`hospital_bulk.backends.redis`), which pass the same contract tests. Write your own by
implementing the Protocol; nothing checks inheritance.

| part | what it promises |
|---|---|
| `RateLimiter` | never lets a request leave over its budget (moving window); a shared pause |
| `CircuitBreaker` | refuses calls while the upstream is failing; one probe at a time after |
| `JobStore` | jobs and their rows, written before requests leave |
| `IdempotencyStore` | one job per ``Idempotency-Key``, claimed atomically with the job's creation |
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Protocol, runtime_checkable

from ._jobs import JobRecord, JobRow, Lease

__all__ = [
    "BreakerState",
    "CircuitBreaker",
    "IdempotencyStore",
    "JobRecord",
    "JobRow",
    "JobStore",
    "Lease",
    "RateLimiter",
]

BreakerState = Literal["closed", "open", "half_open"]
"""A breaker's state: ``closed`` (calls go), ``open`` (refused), ``half_open`` (one probe)."""


@runtime_checkable
class RateLimiter(Protocol):
    """Client-side rate budgets: one for creates, one per path for every other call."""

    async def acquire(self, kind: Literal["create", "other"], path: str = "") -> None:
        """Wait until one request of this kind may leave, and count it.

        Waits past any shared pause too. Cancellation-safe: a cancelled wait counts nothing.

        Args:
            kind: ``"create"`` for `POST /hospitals/`, ``"other"`` for every other call.
            path: The request path; every ``"other"`` path has a budget of its own.
        """
        ...

    async def pause(self, seconds: float) -> None:
        """Make every `acquire` (in every process sharing the limiter) wait `seconds`.

        A pause never shortens one already in force.

        Args:
            seconds: How long to pause from now.
        """
        ...

    async def paused_until(self) -> float | None:
        """Return when the current pause ends (`time.time()` seconds), or ``None``."""
        ...


@runtime_checkable
class CircuitBreaker(Protocol):
    """Stops calling a failing upstream; lets one probe through after a recovery time."""

    @property
    def name(self) -> str:
        """The breaker's name, used in logs (``"hospital_api"``)."""
        ...

    async def before_call(self) -> None:
        """Ask to make one call.

        Raises:
            CircuitOpenError: The breaker is open, or half open with its probe under way;
                `CircuitOpenError.retry_at` says when to ask again.
        """
        ...

    async def record_success(self) -> None:
        """Report that the call allowed by `before_call` succeeded (or failed harmlessly)."""
        ...

    async def record_failure(self) -> None:
        """Report that the call failed in a way that counts (transport error, timeout, 5xx)."""
        ...

    async def state(self) -> BreakerState:
        """Return the breaker's state now."""
        ...


@runtime_checkable
class JobStore(Protocol):
    """Jobs and their rows. Writes are whole rows or job fields; reads return copies."""

    async def create(self, job: JobRecord) -> None:
        """Store a new job.

        Args:
            job: The job; its id must be new.
        """
        ...

    async def get(self, job_id: str) -> JobRecord:
        """Return a copy of a job with its rows.

        Args:
            job_id: The job's id.

        Raises:
            JobNotFoundError: No job has this id.
        """
        ...

    async def save_rows(
        self, job_id: str, rows: Sequence[JobRow], *, token: int | None = None
    ) -> None:
        """Store the given rows of a job (by `JobRow.index`), in one round trip.

        Args:
            job_id: The job's id.
            rows: The rows to write.
            token: The writer's fencing token; when given, the write is refused unless it is
                the token of the job's latest lease.

        Raises:
            JobNotFoundError: No job has this id.
            LeaseLostError: `token` is not the latest lease's.
        """
        ...

    async def save_job(self, job: JobRecord, *, token: int | None = None) -> None:
        """Store a job's own fields (status, times, activated batches, error), not its rows.

        Args:
            job: The job.
            token: The writer's fencing token, checked as for `save_rows`.

        Raises:
            JobNotFoundError: No job has this id.
            LeaseLostError: `token` is not the latest lease's.
        """
        ...

    async def list_ids(self) -> list[str]:
        """Return the ids of the stored jobs, oldest first."""
        ...

    async def acquire_lease(self, job_id: str, owner: str, ttl: float) -> int:
        """Take the job's lease for `owner` for `ttl` seconds.

        Args:
            job_id: The job's id.
            owner: The worker taking it.
            ttl: How long the lease lasts unless renewed, in seconds.

        Returns:
            A new fencing token, larger than every earlier one of the job.

        Raises:
            JobNotFoundError: No job has this id.
            JobStateError: Another owner holds a lease that has not expired.
        """
        ...

    async def renew_lease(self, job_id: str, token: int, ttl: float) -> None:
        """Extend the lease to `ttl` seconds from now.

        Args:
            job_id: The job's id.
            token: The holder's fencing token.
            ttl: How long the lease lasts from now, in seconds.

        Raises:
            JobNotFoundError: The job is gone (expired, deleted, or lost with the store's data).
            LeaseLostError: `token` is not the latest lease's (another worker took over).
        """
        ...

    async def release_lease(self, job_id: str, token: int) -> None:
        """Give the lease up (nothing happens when `token` is no longer the latest).

        Args:
            job_id: The job's id.
            token: The holder's fencing token.
        """
        ...

    async def lease(self, job_id: str) -> Lease | None:
        """Return the job's lease while it has not expired, else ``None``.

        Args:
            job_id: The job's id.
        """
        ...


@runtime_checkable
class IdempotencyStore(Protocol):
    """One job per idempotency key, for at least the key's time to live."""

    async def claim(self, key: str, fingerprint: str, job: JobRecord, *, ttl: float) -> str:
        """Claim `key` for `job` and create the job, atomically.

        Args:
            key: The idempotency key.
            fingerprint: A digest of the file and options.
            job: The job to create when the key is new.
            ttl: How long the key is kept, in seconds.

        Returns:
            The id of the key's job: `job`'s when the key was new (the job is now stored),
            the earlier job's when the key was used with the same fingerprint.

        Raises:
            IdempotencyConflictError: The key was used with another fingerprint.
            IdempotencyInProgressError: The key's first claim is still creating its job.
        """
        ...
