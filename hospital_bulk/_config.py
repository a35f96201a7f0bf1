"""`Settings`: every knob of a processor, checked once, frozen; `Settings.from_env()`.

Nothing is read from the environment implicitly: `from_env` must be called. Wrong values raise
`ConfigurationError` at construction, naming the setting.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any, Literal

import httpx
import limits

from ._exceptions import ConfigurationError

__all__ = ["Settings"]

_DAY = 24 * 3600.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings:
    """How a processor talks to the upstream and runs jobs.

    Attributes:
        base_url: The Hospital Directory API, e.g. ``"https://hospital-directory.onrender.com"``.
        backend: Where jobs, keys, rate budgets and breaker state live: ``"memory://"`` (one
            process) or, with the ``redis`` extra, ``"redis://host:6379/0"``.
        create_rate: The create budget in `limits` notation (``"30/minute"``,
            ``"10/6 seconds"``, ``"30 per minute"``).
        other_rate: The budget of every other endpoint path, each path its own.
        rate_margin: Seconds added to every rate window, so that jitter between sending and
            arrival can never put one request too many into one of the upstream's windows.
        concurrency: The most requests in flight at once, across every job of the processor.
        batch_size: Rows per upstream batch (the upstream takes at most 20).
        max_rows: The most data rows a file may have, or ``None``.
        max_bytes: The largest file accepted, in bytes, or ``None``.
        formula_policy: ``"reject"`` or ``"neutralize"`` cells that spreadsheets run as formulas.
        skip_invalid_rows: Load the valid rows of a file with invalid rows (reporting the
            invalid ones) instead of refusing the whole file.
        activate_partial: Activate the batches even when some rows could not be created.
        timeout: The read timeout in seconds, or a complete `httpx.Timeout`.
        connect_timeout: The connect timeout in seconds (when `timeout` is a number).
        warm_up_timeout: How long the first request after idleness may take (the public
            deployment sleeps and can take 25-90 s to wake).
        retry_attempts: Attempts per request for retryable outcomes (not sent, 429).
        retry_initial: The first backoff, in seconds (full jitter, doubling).
        retry_max: The longest backoff, in seconds.
        breaker_failure_threshold: Consecutive failures (transport errors, timeouts, 5xx)
            that open the circuit breaker.
        breaker_recovery_time: Seconds the breaker stays open before one probe.
        reconcile_after: Seconds to wait after an ambiguous create before its batch is read
            back, so the original request can no longer be executing upstream; ``None``
            derives it from the read timeout (at least 10 s).
        surplus_policy: What the pre-activation audit does with hospitals in a batch that no
            row accounts for (duplicates, strangers): ``"delete"`` them one by one
            (`DELETE /hospitals/{id}`), or ``"rebuild"``: delete the whole batch and create
            its rows again under a new batch id.
        lease_ttl: How long a worker's lease on a running job lasts unless renewed (it is
            renewed every third of that); a job whose worker died is reported
            ``interrupted`` once it lapses.
        idempotency_ttl: How long an idempotency key is kept, in seconds (at least 24 h).
        job_retention: How long finished jobs are kept, in seconds.
        redis_prefix: The first part of every Redis key; processes share jobs, keys, rate
            budgets and breaker state exactly when they use the same Redis database and prefix.
    """

    base_url: str
    backend: str = "memory://"
    create_rate: str = "30/minute"
    other_rate: str = "50/minute"
    rate_margin: float = 1.0
    concurrency: int = 20
    batch_size: int = 20
    max_rows: int | None = None
    max_bytes: int | None = None
    formula_policy: Literal["reject", "neutralize"] = "reject"
    skip_invalid_rows: bool = False
    activate_partial: bool = False
    timeout: float | httpx.Timeout = 30.0
    connect_timeout: float = 10.0
    warm_up_timeout: float = 120.0
    retry_attempts: int = 5
    retry_initial: float = 0.5
    retry_max: float = 30.0
    breaker_failure_threshold: int = 5
    breaker_recovery_time: float = 30.0
    reconcile_after: float | None = None
    surplus_policy: Literal["delete", "rebuild"] = "delete"
    lease_ttl: float = 30.0
    idempotency_ttl: float = _DAY
    job_retention: float = 7 * _DAY
    redis_prefix: str = "hospital_bulk"

    def __post_init__(self) -> None:
        if not isinstance(self.base_url, str) or not self.base_url.strip():
            raise ConfigurationError("base_url must be the upstream's URL, e.g. http://host:8000")
        for name in ("create_rate", "other_rate"):
            text = getattr(self, name)
            try:
                item = limits.parse(text)
            except (ValueError, TypeError) as exc:
                raise ConfigurationError(
                    f"{name} {text!r} is not a rate; write e.g. '30/minute' or '10/6 seconds'"
                ) from exc
            if item.amount < 1:
                raise ConfigurationError(f"{name} must allow at least one request")
        _positive_int(self, "concurrency", "batch_size", "retry_attempts")
        _positive_int(self, "breaker_failure_threshold")
        _optional_positive_int(self, "max_rows", "max_bytes")
        _positive_number(self, "connect_timeout", "warm_up_timeout", "retry_max")
        _positive_number(self, "breaker_recovery_time", "job_retention", "retry_initial")
        _positive_number(self, "lease_ttl")
        if not isinstance(self.timeout, httpx.Timeout):
            _positive_number(self, "timeout")
        if self.reconcile_after is not None:
            _positive_number(self, "reconcile_after")
        if self.batch_size > 20:
            raise ConfigurationError(
                f"batch_size {self.batch_size} is over the upstream's cap of 20 rows per batch"
            )
        if isinstance(self.rate_margin, bool) or not isinstance(self.rate_margin, (int, float)):
            raise ConfigurationError("rate_margin must be a number of seconds")
        if self.rate_margin < 0:
            raise ConfigurationError("rate_margin must be >= 0")
        if self.idempotency_ttl < _DAY:
            raise ConfigurationError("idempotency_ttl must be at least 24 hours (86400 s)")
        if self.surplus_policy not in ("delete", "rebuild"):
            raise ConfigurationError("surplus_policy must be 'delete' or 'rebuild'")
        if self.formula_policy not in ("reject", "neutralize"):
            raise ConfigurationError("formula_policy must be 'reject' or 'neutralize'")
        for flag in ("skip_invalid_rows", "activate_partial"):
            if not isinstance(getattr(self, flag), bool):
                raise ConfigurationError(f"{flag} must be True or False")
        if not isinstance(self.redis_prefix, str) or not self.redis_prefix:
            raise ConfigurationError("redis_prefix must be a non-empty string")
        if not isinstance(self.backend, str) or not self.backend.startswith(
            ("memory://", "redis://", "rediss://", "unix://")
        ):
            raise ConfigurationError(
                f"backend {self.backend!r} is not known; use 'memory://' or 'redis://host:port/db'"
            )

    @property
    def reconcile_horizon(self) -> float:
        """The safety horizon in seconds: `reconcile_after`, or derived from the read timeout."""
        if self.reconcile_after is not None:
            return float(self.reconcile_after)
        read = self.timeout.read if isinstance(self.timeout, httpx.Timeout) else self.timeout
        return max(float(read or 30.0), 10.0)

    def replace(self, **changes: Any) -> Settings:
        """Return a copy with some settings changed (and checked again).

        Args:
            **changes: Settings to change, by name.

        Returns:
            The new settings.
        """
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ConfigurationError(f"unknown setting(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Read the settings from environment variables (those of the original bulk service).

        | variable | setting |
        |---|---|
        | ``HOSPITAL_API_BASE_URL`` | `base_url` |
        | ``RATE_LIMIT_REQUESTS`` and ``RATE_LIMIT_PERIOD`` (seconds) | `create_rate` |
        | ``RETRY_MAX_ATTEMPTS`` | `retry_attempts` |
        | ``CIRCUIT_BREAKER_FAILURE_THRESHOLD`` | `breaker_failure_threshold` |
        | ``CIRCUIT_BREAKER_RECOVERY_TIMEOUT`` (seconds) | `breaker_recovery_time` |
        | ``REDIS_URL`` | `backend` |
        | ``HOSPITAL_BULK_REDIS_PREFIX`` | `redis_prefix` |

        Args:
            environ: The variables (default: `os.environ`).
            **overrides: Settings that win over the environment.

        Returns:
            The settings.

        Raises:
            ConfigurationError: A variable is missing or has a wrong value.
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        if "HOSPITAL_API_BASE_URL" in env:
            values["base_url"] = env["HOSPITAL_API_BASE_URL"]
        if "RATE_LIMIT_REQUESTS" in env or "RATE_LIMIT_PERIOD" in env:
            requests = _env_number(env, "RATE_LIMIT_REQUESTS", int, 30)
            period = _env_number(env, "RATE_LIMIT_PERIOD", int, 60)
            values["create_rate"] = f"{requests}/{period} seconds"
        if "RETRY_MAX_ATTEMPTS" in env:
            values["retry_attempts"] = _env_number(env, "RETRY_MAX_ATTEMPTS", int, 5)
        if "CIRCUIT_BREAKER_FAILURE_THRESHOLD" in env:
            values["breaker_failure_threshold"] = _env_number(
                env, "CIRCUIT_BREAKER_FAILURE_THRESHOLD", int, 5
            )
        if "CIRCUIT_BREAKER_RECOVERY_TIMEOUT" in env:
            values["breaker_recovery_time"] = _env_number(
                env, "CIRCUIT_BREAKER_RECOVERY_TIMEOUT", float, 30.0
            )
        if "REDIS_URL" in env:
            values["backend"] = env["REDIS_URL"]
        if "HOSPITAL_BULK_REDIS_PREFIX" in env:
            values["redis_prefix"] = env["HOSPITAL_BULK_REDIS_PREFIX"]
        values.update(overrides)
        if "base_url" not in values:
            raise ConfigurationError("HOSPITAL_API_BASE_URL is not set (or pass base_url=...)")
        return cls(**values)


def _env_number(env: Mapping[str, str], name: str, kind: type[Any], default: Any) -> Any:
    text = env.get(name)
    if text is None:
        return default
    try:
        return kind(text)
    except ValueError as exc:
        raise ConfigurationError(f"{name}={text!r} is not a {kind.__name__}") from exc


def _positive_int(settings: Settings, *names: str) -> None:
    for name in names:
        value = getattr(settings, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigurationError(f"{name} must be a whole number >= 1, not {value!r}")


def _optional_positive_int(settings: Settings, *names: str) -> None:
    for name in names:
        if getattr(settings, name) is not None:
            _positive_int(settings, name)


def _positive_number(settings: Settings, *names: str) -> None:
    for name in names:
        value = getattr(settings, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ConfigurationError(f"{name} must be a positive number, not {value!r}")
