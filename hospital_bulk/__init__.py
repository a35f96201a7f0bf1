"""hospital_bulk: load CSV files of hospitals into the Hospital Directory API, safely and fast.

This module is the library's public contract: everything a user may rely on is imported here
and listed in `__all__`; every other module is private (`hospital_bulk.testing` excepted, which
holds the fake upstream for tests).
"""

from __future__ import annotations

import logging

from ._client import HospitalDirectoryClient
from ._exceptions import (
    AmbiguousOutcomeError,
    BatchAlreadyActiveError,
    BatchFullError,
    BatchNotFoundError,
    ConfigurationError,
    ContractError,
    CSVSourceError,
    CSVValidationError,
    HospitalBulkError,
    HospitalNotFoundError,
    Outcome,
    RateLimitedError,
    RejectedError,
    RequestNotSentError,
    UpstreamError,
    UpstreamValidationError,
)
from ._models import BatchActivation, BatchDeletion, Hospital, HospitalCreate, HospitalUpdate
from ._validation import HospitalRow, IssueCode, ValidationIssue, ValidationReport, validate_csv

__all__ = [
    "AmbiguousOutcomeError",
    "BatchActivation",
    "BatchAlreadyActiveError",
    "BatchDeletion",
    "BatchFullError",
    "BatchNotFoundError",
    "CSVSourceError",
    "CSVValidationError",
    "ConfigurationError",
    "ContractError",
    "Hospital",
    "HospitalBulkError",
    "HospitalCreate",
    "HospitalDirectoryClient",
    "HospitalNotFoundError",
    "HospitalRow",
    "HospitalUpdate",
    "IssueCode",
    "Outcome",
    "RateLimitedError",
    "RejectedError",
    "RequestNotSentError",
    "UpstreamError",
    "UpstreamValidationError",
    "ValidationIssue",
    "ValidationReport",
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
