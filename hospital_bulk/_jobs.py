"""Jobs and rows: their states, the stored records, the snapshots and the final report.

A job is created from a validated file: it gets its id, its rows and its batch ids, chosen once
and stored before the first request. A row goes ``pending`` -> ``in_flight`` -> ``created`` |
``rejected`` | ``unknown``, and after its batch is activated ``created_and_activated``.

`JobRecord` and `JobRow` are what a `JobStore` keeps (plain data, JSON-ready through
`JobRecord.to_dict` / `JobRecord.from_dict`); `JobSnapshot` and `JobResult` are what users
see (pydantic models).
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any
from uuid import UUID

from pydantic import BaseModel, ConfigDict

__all__ = [
    "HospitalResult",
    "JobRecord",
    "JobResult",
    "JobRow",
    "JobSnapshot",
    "JobStatus",
    "Lease",
    "RowState",
    "WaitReason",
]


class RowState(str, enum.Enum):
    """Where one row of a job stands.

    Attributes:
        PENDING: Not sent yet (or to be sent again).
        IN_FLIGHT: Sent; the answer has not come yet. Recorded before the request leaves.
        CREATED: The upstream created it (inactive while its batch waits for activation).
        CREATED_AND_ACTIVATED: Created and its batch activated.
        REJECTED: The upstream refused it with a definite 4xx; `JobRow.error` says why.
        UNKNOWN: Sent, but whether it exists upstream is not known (timeout, reset, 5xx).
        INVALID: Not sent: the row failed validation (only with ``skip_invalid_rows``).
        DELETED: Its batch was rolled back.
    """

    PENDING = "pending"
    IN_FLIGHT = "in_flight"
    CREATED = "created"
    CREATED_AND_ACTIVATED = "created_and_activated"
    REJECTED = "rejected"
    UNKNOWN = "unknown"
    INVALID = "invalid"
    DELETED = "deleted"

    def __str__(self) -> str:
        return self.value


SETTLED_STATES = frozenset(
    {
        RowState.CREATED,
        RowState.CREATED_AND_ACTIVATED,
        RowState.REJECTED,
        RowState.INVALID,
        RowState.DELETED,
    }
)
"""Row states that will not change any more in a run: what progress counts as done."""


class JobStatus(str, enum.Enum):
    """Where a job stands.

    Attributes:
        PENDING: Created, not started.
        RUNNING: Sending rows.
        ACTIVATING: Every row exists; activating the batches.
        COMPLETED: Every row exists upstream and every batch is verified active.
        PARTIALLY_FAILED: Some rows were rejected or are unknown; batches are left inactive
            (unless activation of partial jobs was asked for). `resume` can finish it.
        FAILED: The job could not run (e.g. the upstream stayed unreachable).
        ROLLED_BACK: Its batches were deleted.
        CANCELLED: Stopped by `cancel`; resumable.
        INTERRUPTED: Stored as running, but no worker holds its lease any more (the worker
            died): reported so by `status`, picked up by `resume` or `recover`.
    """

    PENDING = "pending"
    RUNNING = "running"
    ACTIVATING = "activating"
    COMPLETED = "completed"
    PARTIALLY_FAILED = "partially_failed"
    FAILED = "failed"
    ROLLED_BACK = "rolled_back"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"

    @property
    def terminal(self) -> bool:
        """Whether the job has stopped (it may still be resumed or rolled back)."""
        return self in _TERMINAL

    def __str__(self) -> str:
        return self.value


_TERMINAL = frozenset(
    {
        JobStatus.COMPLETED,
        JobStatus.PARTIALLY_FAILED,
        JobStatus.FAILED,
        JobStatus.ROLLED_BACK,
        JobStatus.CANCELLED,
        JobStatus.INTERRUPTED,
    }
)


class WaitReason(str, enum.Enum):
    """What a running job is waiting for.

    Attributes:
        WARM_UP: The upstream is waking up (the first request after idleness).
        RATE_LIMIT: The client-side rate budget is spent, or a 429 paused every sender.
        BREAKER: The circuit breaker is open after upstream failures.
        RECONCILE: Rows whose outcome is unknown wait out a safety horizon before their batch
            is read back.
    """

    WARM_UP = "warm_up"
    RATE_LIMIT = "rate_limit"
    BREAKER = "breaker"
    RECONCILE = "reconcile"

    def __str__(self) -> str:
        return self.value


@dataclasses.dataclass(frozen=True, slots=True)
class Lease:
    """Who runs a job, until when, with which fencing token.

    Attributes:
        owner: The worker holding the lease (a processor's id).
        token: The fencing token: larger than every token issued for the job before. Writes
            carrying an older token are refused, so a worker that lost its lease cannot
            overwrite its successor's work.
        expires_at: When the lease lapses unless renewed (`time.time()` seconds).
    """

    owner: str
    token: int
    expires_at: float


@dataclasses.dataclass(slots=True)
class JobRow:
    """One row of a job, as stored.

    Attributes:
        index: Position in the job, from 0.
        row: The data-row number in the file (1 = first data row).
        line: The physical line in the file.
        name: The hospital's name (validated, trimmed).
        address: The address.
        phone: The phone number, or ``None``.
        batch_id: The upstream batch the row goes into.
        state: Where the row stands.
        hospital_id: The upstream's id once created.
        error: Why the row was rejected, is unknown, or is invalid.
        attempts: How many creates were sent for it.
        sent_at: When its last create was about to leave (`time.time()` seconds), then, once
            its outcome is unknown, when that became so; the reconciliation waits a safety
            horizon after it before reading the batch back.
    """

    index: int
    row: int
    line: int
    name: str
    address: str
    phone: str | None
    batch_id: UUID | None
    state: RowState = RowState.PENDING
    hospital_id: int | None = None
    error: str | None = None
    attempts: int = 0
    sent_at: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """Return the row as JSON-ready data."""
        data = dataclasses.asdict(self)
        data["batch_id"] = None if self.batch_id is None else str(self.batch_id)
        data["state"] = self.state.value
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobRow:
        """Build a row from `to_dict` data.

        Args:
            data: The row's data.

        Returns:
            The row.
        """
        values = dict(data)
        values["batch_id"] = None if values["batch_id"] is None else UUID(values["batch_id"])
        values["state"] = RowState(values["state"])
        return cls(**values)


@dataclasses.dataclass(slots=True)
class JobRecord:
    """A job, as stored.

    Attributes:
        job_id: The job's id.
        status: Where the job stands.
        batch_ids: The upstream batches, in order; row ``i`` goes to ``batch_ids[i // size]``.
        rows: Every row, in file order (invalid rows included, in ``INVALID`` state, when
            they were skipped).
        fingerprint: A digest of the file and the options that shape the job.
        created_at: When the job was created (`time.time()` seconds).
        started_at: When it last started running, or ``None``.
        finished_at: When it last stopped, or ``None``.
        activated_batches: The batches verified active.
        idempotency_key: The key it was submitted with, or ``None``.
        error: Why the job failed or is partial, in one line, or ``None``.
        options: The options the job was submitted with (JSON-ready).
        processing_seconds: Time spent running, over every run.
        tenant: Who submitted it (see `AsyncBulkProcessor.submit`), or ``None``.
    """

    job_id: str
    status: JobStatus
    batch_ids: list[UUID]
    rows: list[JobRow]
    fingerprint: str
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    activated_batches: list[UUID] = dataclasses.field(default_factory=list)
    idempotency_key: str | None = None
    error: str | None = None
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    processing_seconds: float = 0.0
    tenant: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Return the job as JSON-ready data."""
        return {
            "job_id": self.job_id,
            "status": self.status.value,
            "batch_ids": [str(b) for b in self.batch_ids],
            "rows": [r.to_dict() for r in self.rows],
            "fingerprint": self.fingerprint,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "activated_batches": [str(b) for b in self.activated_batches],
            "idempotency_key": self.idempotency_key,
            "error": self.error,
            "options": dict(self.options),
            "processing_seconds": self.processing_seconds,
            "tenant": self.tenant,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobRecord:
        """Build a job from `to_dict` data.

        Args:
            data: The job's data.

        Returns:
            The job.
        """
        return cls(
            job_id=data["job_id"],
            status=JobStatus(data["status"]),
            batch_ids=[UUID(b) for b in data["batch_ids"]],
            rows=[JobRow.from_dict(r) for r in data["rows"]],
            fingerprint=data["fingerprint"],
            created_at=data["created_at"],
            started_at=data.get("started_at"),
            finished_at=data.get("finished_at"),
            activated_batches=[UUID(b) for b in data.get("activated_batches", [])],
            idempotency_key=data.get("idempotency_key"),
            error=data.get("error"),
            options=dict(data.get("options", {})),
            processing_seconds=data.get("processing_seconds", 0.0),
            tenant=data.get("tenant"),
        )


class JobSnapshot(BaseModel):
    """A job's progress at one moment, for polling and progress hooks.

    Attributes:
        job_id: The job's id.
        status: Where the job stands.
        total_rows: Rows in the job (invalid rows included when they were skipped).
        counts: Rows per state (every state present, zeros included).
        percent: Rows settled (created, rejected, invalid) as a percentage of all rows.
        elapsed_seconds: Time spent running so far.
        eta_seconds: Estimated seconds until the job ends, or ``None`` when unknown.
        waiting_for: What the job waits for now, or ``None``.
        waiting_until: Until when (`time.time()` seconds), when known.
        batch_ids: The job's upstream batches.
        activated_batches: The batches verified active.
        idempotency_key: The key it was submitted with.
        tenant: Who submitted it, or ``None``.
        replayed: True when this snapshot answers a submission whose idempotency key gave
            back an earlier job (set by `AsyncBulkProcessor.submit` only).
        created_at: When the job was created (`time.time()` seconds).
        started_at: When it last started running.
        finished_at: When it last stopped.
        error: Why the job failed or is partial, or ``None``.
    """

    model_config = ConfigDict(frozen=True)

    job_id: str
    status: JobStatus
    total_rows: int
    counts: dict[RowState, int]
    percent: float
    elapsed_seconds: float
    eta_seconds: float | None
    waiting_for: WaitReason | None = None
    waiting_until: float | None = None
    batch_ids: list[UUID]
    activated_batches: list[UUID]
    idempotency_key: str | None = None
    tenant: str | None = None
    replayed: bool = False
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    error: str | None = None

    def _repr_html_(self) -> str:
        """The snapshot as HTML, for Jupyter: status, rows per state, times, waits."""
        from ._notebook import job_snapshot_html

        return job_snapshot_html(self)


class HospitalResult(BaseModel):
    """One row of a job's report.

    Attributes:
        row: The data-row number in the file (1 = first data row).
        hospital_id: The upstream's id, when created.
        name: The hospital's name.
        status: The row's state, e.g. ``created_and_activated``.
        error: Why the row was rejected, is unknown or invalid, or ``None``.
    """

    model_config = ConfigDict(frozen=True)

    row: int
    hospital_id: int | None
    name: str
    status: RowState
    error: str | None = None


class JobResult(BaseModel):
    """A job's report; ``model_dump(mode="json")`` is the shape of the original bulk service.

    Attributes:
        job_id: The job's id.
        status: Where the job stands.
        batch_id: The first batch (``None`` for a job without rows to send).
        batch_ids: Every batch of the job.
        total_hospitals: Rows in the job.
        processed_hospitals: Rows that exist upstream (created, activated or not).
        failed_hospitals: Rows rejected, unknown or invalid.
        processing_time_seconds: Time spent running, over every run.
        batch_activated: Whether every batch of the job is verified active.
        hospitals: One entry per row, in file order.
    """

    model_config = ConfigDict(frozen=True)

    job_id: str
    status: JobStatus
    batch_id: UUID | None
    batch_ids: list[UUID]
    total_hospitals: int
    processed_hospitals: int
    failed_hospitals: int
    processing_time_seconds: float
    batch_activated: bool
    hospitals: list[HospitalResult]

    def _repr_html_(self) -> str:
        """The report as HTML, for Jupyter: a summary and a table of the rows.

        Rows that went wrong (rejected, unknown, invalid) are highlighted and listed first;
        the table shows at most 200 rows and counts the rest. Every text is escaped.
        """
        from ._notebook import job_result_html

        return job_result_html(self)

    def to_pandas(self) -> Any:
        """Return the rows as a pandas DataFrame, in file order.

        Columns: ``row``, ``name``, ``status`` (the row's state as text), ``hospital_id``
        (nullable integers) and ``error``.

        Returns:
            A `pandas.DataFrame`.

        Raises:
            ImportError: pandas is not installed (``pip install pandas``, or the
                ``notebook`` extra).
        """
        from ._notebook import job_result_frame

        return job_result_frame(self)
