"""Every error hospital_bulk raises, in one tree.

```text
HospitalBulkError
├── ConfigurationError (also a ValueError)     a wrong setting or argument
├── CSVSourceError                             the CSV source cannot be opened or read
├── CSVValidationError                         a file failed validation (carries the report)
├── JobNotFoundError                           no job has this id
├── JobStateError                              the job cannot do that now (e.g. already running)
│   └── LeaseLostError                         another worker took the job over: stop writing
├── IdempotencyError                           an Idempotency-Key cannot be used
│   ├── IdempotencyConflictError               the key was used with another file or options
│   └── IdempotencyInProgressError             the key's first submission is still being created
├── CircuitOpenError                           the circuit breaker refuses calls until `retry_at`
├── BackendError                               the shared backend (Redis) failed or lost state
└── UpstreamError                              a request to the Hospital Directory API failed
    ├── RequestNotSentError                    outcome NOT_SENT: safe to retry
    ├── AmbiguousOutcomeError                  outcome AMBIGUOUS: may have been applied
    ├── RateLimitedError                       outcome RATE_LIMITED: wait, then retry
    ├── RejectedError                          outcome REJECTED: the upstream said no
    │   ├── UpstreamValidationError            422, with the upstream's error list
    │   ├── HospitalNotFoundError              404 on /hospitals/{id}
    │   ├── BatchNotFoundError                 404 on a batch (empty or unknown)
    │   ├── BatchFullError                     400 "Batch cannot exceed 20 hospitals"
    │   └── BatchAlreadyActiveError            400 on activation: already active
    └── ContractError                          the upstream broke its contract (3xx, bad body)
```

Every `UpstreamError` carries the request's `method` and `path`, the `status_code` (``None``
when no response arrived), the upstream's `detail` (the text of ``{"detail": str}``, the list of
a 422, or the text of a 429's ``{"error": str}``) and the request's `outcome`, one of
`Outcome`: what a caller may safely do next depends on it alone.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._validation import ValidationReport

__all__ = [
    "AmbiguousOutcomeError",
    "BackendError",
    "BatchAlreadyActiveError",
    "BatchFullError",
    "BatchNotFoundError",
    "CSVSourceError",
    "CSVValidationError",
    "CircuitOpenError",
    "ConfigurationError",
    "ContractError",
    "HospitalBulkError",
    "HospitalNotFoundError",
    "IdempotencyConflictError",
    "IdempotencyError",
    "IdempotencyInProgressError",
    "JobNotFoundError",
    "JobStateError",
    "LeaseLostError",
    "Outcome",
    "RateLimitedError",
    "RejectedError",
    "RequestNotSentError",
    "UpstreamError",
    "UpstreamValidationError",
]


class Outcome(str, enum.Enum):
    """What is known about the effect of one upstream request.

    Attributes:
        NOT_SENT: The request never reached the upstream (connect error or timeout, pool
            timeout, refused locally). Retrying cannot create a duplicate.
        APPLIED: The upstream answered 2xx: the request took effect.
        REJECTED: The upstream answered a definite 4xx (400, 404, 409, 422, ...): nothing
            happened and retrying the same request will not help.
        RATE_LIMITED: The upstream answered 429: nothing happened; wait, then retry.
        AMBIGUOUS: The request may or may not have taken effect (read timeout, connection
            reset after sending, 5xx). Never re-send a create blindly: read the batch back.
    """

    NOT_SENT = "not_sent"
    APPLIED = "applied"
    REJECTED = "rejected"
    RATE_LIMITED = "rate_limited"
    AMBIGUOUS = "ambiguous"

    def __str__(self) -> str:
        return self.value


class HospitalBulkError(Exception):
    """Base class of every exception raised by hospital_bulk.

    Every one pickles with its attributes (task queues carry them between processes), even
    where its constructor takes keyword-only arguments.
    """

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.args, dict(self.__dict__)))


def _rebuild(cls: type[HospitalBulkError], args: tuple[Any, ...], state: dict[str, Any]) -> Any:
    """Unpickle an error without calling its constructor: its arguments, then its attributes."""
    error = cls.__new__(cls, *args)
    error.args = args
    error.__dict__.update(state)
    return error


class ConfigurationError(HospitalBulkError, ValueError):
    """A setting or argument has a wrong value; the message names it and says what is allowed."""


class CSVSourceError(HospitalBulkError):
    """The CSV source cannot be used: a missing or unreadable file, or a source of a wrong type.

    Args:
        message: What went wrong, naming the source.
        source: A short description of the source (a path, or the type of object given).
    """

    def __init__(self, message: str, *, source: str | None = None) -> None:
        super().__init__(message)
        self.source = source


class CSVValidationError(HospitalBulkError):
    """A CSV file failed validation; nothing was sent upstream.

    Args:
        report: The full validation report, with every error and warning.
    """

    def __init__(self, report: ValidationReport) -> None:
        self.report = report
        shown = "; ".join(str(issue) for issue in report.errors[:3])
        more = len(report.errors) - 3
        suffix = f" (and {more} more)" if more > 0 else ""
        super().__init__(f"the CSV file has {len(report.errors)} error(s): {shown}{suffix}")


class JobNotFoundError(HospitalBulkError, KeyError):
    """No job has this id (it never existed, or it expired).

    Args:
        job_id: The id asked for.
    """

    def __init__(self, job_id: str) -> None:
        super().__init__(f"no job with id {job_id!r}")
        self.job_id = job_id

    def __str__(self) -> str:
        return str(self.args[0])


class JobStateError(HospitalBulkError):
    """The job cannot do what was asked in its present state (for example it is running).

    Args:
        message: What was asked and why it cannot be done.
        job_id: The job's id.
        status: The job's status, as a string.
    """

    def __init__(self, message: str, *, job_id: str, status: str) -> None:
        super().__init__(message)
        self.job_id = job_id
        self.status = status


class LeaseLostError(JobStateError):
    """This worker's lease on the job is gone (it expired and another worker took the job).

    The worker must stop writing and sending for the job; the new owner carries on.
    """


class IdempotencyError(HospitalBulkError):
    """An ``Idempotency-Key`` cannot be used for this submission.

    Args:
        message: What is wrong.
        key: The idempotency key.
        job_id: The job the key already stands for, when known.
    """

    def __init__(self, message: str, *, key: str, job_id: str | None = None) -> None:
        super().__init__(message)
        self.key = key
        self.job_id = job_id


class IdempotencyConflictError(IdempotencyError):
    """The key was already used for another file or other options."""


class IdempotencyInProgressError(IdempotencyError):
    """The key's first submission is still creating its job; try again shortly."""


class BackendError(HospitalBulkError):
    """The shared backend (Redis) failed, or lost the state of a running job.

    It was unreachable, timed out, refused a command, or no longer holds a job that was
    running (a server restarted without persistence).

    Nothing is guessed when this is raised: the write or read it interrupted did not happen
    (or its effect is unknown, for a timeout), and the job is left as the store last held it.
    Its message says what failed, never with credentials.
    """


class CircuitOpenError(HospitalBulkError):
    """The circuit breaker refuses calls to the upstream for now.

    Args:
        name: The breaker's name.
        retry_at: When a call may be tried again, in `time.time()` seconds.
    """

    def __init__(self, name: str, *, retry_at: float) -> None:
        super().__init__(f"circuit breaker {name!r} is open")
        self.name = name
        self.retry_at = retry_at


class UpstreamError(HospitalBulkError):
    """A request to the Hospital Directory API did not succeed.

    Args:
        message: A human summary.
        method: The HTTP method, e.g. ``"POST"``.
        path: The request path, e.g. ``"/hospitals/"``.
        outcome: What is known about the request's effect.
        status_code: The response status, or ``None`` when no response arrived.
        detail: The upstream's own explanation: a string, or the 422 error list.
    """

    def __init__(
        self,
        message: str,
        *,
        method: str,
        path: str,
        outcome: Outcome,
        status_code: int | None = None,
        detail: str | list[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.method = method
        self.path = path
        self.outcome = outcome
        self.status_code = status_code
        self.detail = detail

    @property
    def safe_to_retry(self) -> bool:
        """Whether sending the same request again cannot cause a second effect.

        True when the request was not sent or was rate limited, or when it only reads.
        """
        if self.outcome in (Outcome.NOT_SENT, Outcome.RATE_LIMITED):
            return True
        return self.method in ("GET", "HEAD") and self.outcome is Outcome.AMBIGUOUS

    def __str__(self) -> str:
        status = f" {self.status_code}" if self.status_code is not None else ""
        return f"{self.method} {self.path}{status} ({self.outcome.value}): {self.message}"

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(method={self.method!r}, path={self.path!r}, "
            f"status_code={self.status_code!r}, outcome={self.outcome.value!r}, "
            f"message={self.message!r})"
        )


class RequestNotSentError(UpstreamError):
    """The request never reached the upstream (outcome `Outcome.NOT_SENT`)."""


class AmbiguousOutcomeError(UpstreamError):
    """The request may have taken effect upstream (outcome `Outcome.AMBIGUOUS`)."""


class RateLimitedError(UpstreamError):
    """The upstream answered 429 (outcome `Outcome.RATE_LIMITED`).

    Args:
        message: A human summary.
        retry_after: Seconds to wait, from a ``Retry-After`` header, if the upstream sent one.
        window: The length in seconds of the upstream's rate window, when the 429 body names
            it (``"Rate limit exceeded: 30 per 1 minute"`` gives 60.0).
        **kwargs: As for `UpstreamError`.
    """

    def __init__(
        self,
        message: str,
        *,
        retry_after: float | None = None,
        window: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(message, **kwargs)
        self.retry_after = retry_after
        self.window = window


class RejectedError(UpstreamError):
    """The upstream refused the request with a definite 4xx (outcome `Outcome.REJECTED`)."""


class UpstreamValidationError(RejectedError):
    """The upstream answered 422; `detail` holds its list of errors."""


class HospitalNotFoundError(RejectedError):
    """No hospital has this id upstream (404)."""


class BatchNotFoundError(RejectedError):
    """The batch is empty or unknown upstream (404 on activate or delete)."""


class BatchFullError(RejectedError):
    """The batch already holds the upstream's maximum of hospitals (400 on create)."""


class BatchAlreadyActiveError(RejectedError):
    """Activation refused: one or more hospitals of the batch are already active (400)."""


class ContractError(UpstreamError):
    """The upstream answered something its contract does not allow (a redirect, a bad body)."""
