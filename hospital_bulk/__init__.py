"""hospital_bulk: load CSV files of hospitals into the Hospital Directory API, safely and fast.

This module is the library's public contract: everything a user may rely on is imported here
and listed in `__all__`; every other module is private (`hospital_bulk.testing` excepted, which
holds the fake upstream for tests).
"""

from __future__ import annotations

import logging

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
    ContractError,
    CSVSourceError,
    CSVValidationError,
    HospitalBulkError,
    HospitalNotFoundError,
    IdempotencyConflictError,
    IdempotencyError,
    IdempotencyInProgressError,
    JobNotFoundError,
    JobStateError,
    LeaseLostError,
    Outcome,
    RateLimitedError,
    RejectedError,
    RequestNotSentError,
    UpstreamError,
    UpstreamValidationError,
)
from ._jobs import HospitalResult, JobResult, JobSnapshot, JobStatus, RowState, WaitReason
from ._models import BatchActivation, BatchDeletion, Hospital, HospitalCreate, HospitalUpdate
from ._processor import AsyncBulkProcessor, JobEvent
from ._retry import RetryPolicy
from ._sync import BulkProcessor
from ._validation import HospitalRow, IssueCode, ValidationIssue, ValidationReport, validate_csv

__all__ = [
    "AmbiguousOutcomeError",
    "AsyncBulkProcessor",
    "BackendError",
    "BatchActivation",
    "BatchAlreadyActiveError",
    "BatchDeletion",
    "BatchFullError",
    "BatchNotFoundError",
    "BulkProcessor",
    "CSVSourceError",
    "CSVValidationError",
    "CircuitOpenError",
    "ConfigurationError",
    "ContractError",
    "Hospital",
    "HospitalBulkError",
    "HospitalCreate",
    "HospitalDirectoryClient",
    "HospitalNotFoundError",
    "HospitalResult",
    "HospitalRow",
    "HospitalUpdate",
    "IdempotencyConflictError",
    "IdempotencyError",
    "IdempotencyInProgressError",
    "IssueCode",
    "JobEvent",
    "JobNotFoundError",
    "JobResult",
    "JobSnapshot",
    "JobStateError",
    "JobStatus",
    "LeaseLostError",
    "Outcome",
    "RateLimitedError",
    "RejectedError",
    "RequestNotSentError",
    "RetryPolicy",
    "RowState",
    "Settings",
    "UpstreamError",
    "UpstreamValidationError",
    "ValidationIssue",
    "ValidationReport",
    "WaitReason",
    "validate_csv",
]

logging.getLogger(__name__).addHandler(logging.NullHandler())


def __getattr__(name: str) -> str:
    # `__version__` is read from the installed package's metadata, lazily, so that importing
    # the library costs nothing for it.
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("hospital-bulk")
        except PackageNotFoundError:  # pragma: no cover - running from a bare checkout
            from ._version import __version__

            return __version__
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
