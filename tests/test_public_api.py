"""The package root is the contract: nothing becomes public by accident."""

from __future__ import annotations

import logging
import re
import types

import hospital_bulk

EXPECTED = [
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


def test_all_is_pinned_and_sorted():
    assert hospital_bulk.__all__ == EXPECTED
    assert sorted(hospital_bulk.__all__) == hospital_bulk.__all__


def test_every_exported_name_exists_and_claims_the_package():
    for name in hospital_bulk.__all__:
        member = getattr(hospital_bulk, name)
        assert member.__module__.startswith("hospital_bulk"), name
        assert member.__doc__, f"{name} has no docstring"


def test_every_public_module_level_name_is_exported():
    public = {
        name
        for name, value in vars(hospital_bulk).items()
        if not name.startswith("_")
        and not isinstance(value, types.ModuleType)  # submodules such as `testing`
        and name != "annotations"
    }
    assert public == set(EXPECTED)


def test_every_error_derives_from_the_base():
    for name in EXPECTED:
        member = getattr(hospital_bulk, name)
        if isinstance(member, type) and issubclass(member, Exception):
            assert issubclass(member, hospital_bulk.HospitalBulkError), name


def test_version_is_a_version_string():
    assert re.match(r"^\d+\.\d+", hospital_bulk.__version__)


def test_library_logger_has_a_null_handler_and_no_other():
    handlers = logging.getLogger("hospital_bulk").handlers
    assert [type(h) for h in handlers] == [logging.NullHandler]


def test_every_error_pickles_with_its_attributes() -> None:
    import pickle

    from hospital_bulk import _exceptions as errors

    samples = [
        errors.JobNotFoundError("j1"),
        errors.JobStateError("busy", job_id="j1", status="running"),
        errors.LeaseLostError("lost", job_id="j1", status="running"),
        errors.IdempotencyConflictError("used", key="k", job_id="j1"),
        errors.CircuitOpenError("hospital_api", retry_at=12.5),
        errors.BackendError("Redis is unreachable"),
        errors.ConfigurationError("bad"),
        errors.RateLimitedError(
            "slow down",
            method="POST",
            path="/hospitals/",
            outcome=errors.Outcome.RATE_LIMITED,
            status_code=429,
        ),
    ]
    for error in samples:
        copy = pickle.loads(pickle.dumps(error))
        assert type(copy) is type(error)
        assert str(copy) == str(error)
        assert copy.__dict__ == error.__dict__
