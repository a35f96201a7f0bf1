"""The circuit breaker: its rules, which errors count, and the in-memory implementation.

States and transitions::

    closed ──(too many failures)──> open ──(recovery_time passed)──> half_open
      ^                              ^                                  │
      └──────(probe succeeded)───────┼──────────────────────────────────┤
                                     └─────────(probe failed)───────────┘

- **closed**: every call is allowed. It opens after `failure_threshold` consecutive failures,
  or, when `failure_rate` is set, as soon as at least `min_calls` calls reported in the last
  `window` seconds have a failure ratio of at least `failure_rate`.
- **open**: every call is refused with `CircuitOpenError` whose `retry_at` is the end of the
  open period. Results reported while open (late answers of calls made before it opened) are
  ignored.
- **half_open**: one probe call at a time is allowed; other callers are refused with a
  `retry_at` a little later (``now + min(1.0, recovery_time)``, never past the probe's lease).
  The probe's success closes the breaker; its failure opens it for another `recovery_time`.
  A probe that never reports (its task was cancelled) holds its place for `recovery_time` at
  most, then the next caller becomes the probe (the probe lease).

Which errors count as failures (`counts_as_failure`): the ones that say the upstream is
unwell, not the ones that say a request was wrong.

| error | counts |
|---|---|
| `RequestNotSentError` (connect error, connect or pool timeout) | yes |
| `AmbiguousOutcomeError` (read timeout, reset, 5xx) | yes |
| `ContractError` with outcome ambiguous (unexpected status, bad 2xx body) | yes |
| `RejectedError` and its family (400, 404, 409, 422) | no |
| `RateLimitedError` (429: the upstream is healthy, we were fast) | no |
| `ContractError` with outcome rejected (a redirect) | no |
| anything else (including `CircuitOpenError` and cancellation) | no |

The rules live in pure functions over a small state dataclass (`_BreakerState`,
`_before_call`, `_on_success`, `_on_failure`), with the time passed in, so that another
holder of the state (Redis, with the same rules in one atomic script) can reuse them and
tests never sleep. `MemoryCircuitBreaker` only holds the state, reads its clock and logs the
transitions on the ``hospital_bulk.breaker`` logger.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from typing import Final

from ._exceptions import (
    AmbiguousOutcomeError,
    CircuitOpenError,
    ConfigurationError,
    ContractError,
    Outcome,
    RequestNotSentError,
)
from .protocols import BreakerState

__all__ = ["MemoryCircuitBreaker", "counts_as_failure"]

logger = logging.getLogger("hospital_bulk.breaker")

# The longest a refused caller is told to wait while a probe is under way.
_PROBE_RETRY: Final = 1.0


def counts_as_failure(exc: BaseException) -> bool:
    """Tell whether an error says the upstream is unwell, so the breaker should count it.

    Args:
        exc: The error a call raised.

    Returns:
        True for `RequestNotSentError`, `AmbiguousOutcomeError` and a `ContractError` whose
        outcome is ambiguous; False for rejections (4xx), rate limiting (429), a rejected
        `ContractError`, and anything else.
    """
    if isinstance(exc, (RequestNotSentError, AmbiguousOutcomeError)):
        return True
    if isinstance(exc, ContractError):
        return exc.outcome is Outcome.AMBIGUOUS
    return False


@dataclasses.dataclass(frozen=True)
class _BreakerSettings:
    """The breaker's thresholds, validated."""

    failure_threshold: int
    failure_rate: float | None
    window: float
    min_calls: int
    recovery_time: float

    def __post_init__(self) -> None:
        if _not_int(self.failure_threshold) or self.failure_threshold < 1:
            raise ConfigurationError(
                f"failure_threshold must be an int >= 1, not {self.failure_threshold!r}"
            )
        if self.failure_rate is not None and (
            _not_number(self.failure_rate) or not 0 < self.failure_rate <= 1
        ):
            raise ConfigurationError(
                f"failure_rate must be None or a number in (0, 1], not {self.failure_rate!r}"
            )
        if _not_number(self.window) or self.window <= 0:
            raise ConfigurationError(f"window must be a number of seconds > 0, not {self.window!r}")
        if _not_int(self.min_calls) or self.min_calls < 1:
            raise ConfigurationError(f"min_calls must be an int >= 1, not {self.min_calls!r}")
        if _not_number(self.recovery_time) or self.recovery_time <= 0:
            raise ConfigurationError(
                f"recovery_time must be a number of seconds > 0, not {self.recovery_time!r}"
            )


@dataclasses.dataclass
class _BreakerState:
    """Everything the rules need to remember.

    Attributes:
        state: The state as last decided (``open`` may have lapsed; `_advance` settles it).
        consecutive_failures: Failures reported in a row while closed.
        open_until: When the open period ends.
        probe_until: When the half-open probe's lease ends (None: no probe under way).
        calls: ``(time, failed)`` of the calls reported while closed, in the last `window`
            seconds (only kept when a failure rate is set).
    """

    state: BreakerState = "closed"
    consecutive_failures: int = 0
    open_until: float = 0.0
    probe_until: float | None = None
    calls: deque[tuple[float, bool]] = dataclasses.field(default_factory=deque)


# A transition, (old state, new state), for the holder to log.
_Transition = tuple[BreakerState, BreakerState]


def _advance(s: _BreakerState, now: float) -> list[_Transition]:
    """Move an open breaker whose recovery time has passed to half open."""
    if s.state == "open" and now >= s.open_until:
        s.state = "half_open"
        s.probe_until = None
        return [("open", "half_open")]
    return []


def _open(s: _BreakerState, cfg: _BreakerSettings, now: float) -> list[_Transition]:
    old = s.state
    s.state = "open"
    s.open_until = now + cfg.recovery_time
    s.probe_until = None
    s.consecutive_failures = 0
    s.calls.clear()
    return [(old, "open")]


def _close(s: _BreakerState) -> list[_Transition]:
    old = s.state
    s.state = "closed"
    s.probe_until = None
    s.consecutive_failures = 0
    s.calls.clear()
    return [(old, "closed")]


def _before_call(
    s: _BreakerState, cfg: _BreakerSettings, now: float
) -> tuple[float | None, list[_Transition]]:
    """Decide whether one call may go now.

    Returns:
        ``(retry_at, transitions)``: `retry_at` is None when the call may go, else when to
        ask again.
    """
    changes = _advance(s, now)
    if s.state == "open":
        return s.open_until, changes
    if s.state == "half_open":
        if s.probe_until is not None and now < s.probe_until:
            return min(s.probe_until, now + min(_PROBE_RETRY, cfg.recovery_time)), changes
        s.probe_until = now + cfg.recovery_time
    return None, changes


def _on_success(s: _BreakerState, cfg: _BreakerSettings, now: float) -> list[_Transition]:
    """Apply a successful (or harmlessly failed) call."""
    changes = _advance(s, now)
    if s.state == "open":
        return changes
    if s.state == "half_open":
        return changes + _close(s)
    s.consecutive_failures = 0
    return changes + _record_call(s, cfg, now, failed=False)


def _on_failure(s: _BreakerState, cfg: _BreakerSettings, now: float) -> list[_Transition]:
    """Apply a failed call."""
    changes = _advance(s, now)
    if s.state == "open":
        return changes
    if s.state == "half_open":
        return changes + _open(s, cfg, now)
    s.consecutive_failures += 1
    if s.consecutive_failures >= cfg.failure_threshold:
        return changes + _open(s, cfg, now)
    return changes + _record_call(s, cfg, now, failed=True)


def _record_call(
    s: _BreakerState, cfg: _BreakerSettings, now: float, *, failed: bool
) -> list[_Transition]:
    """Add a call to the failure-rate window and open the breaker if the rate is reached."""
    if cfg.failure_rate is None:
        return []
    calls = s.calls
    calls.append((now, failed))
    cutoff = now - cfg.window
    while calls and calls[0][0] <= cutoff:
        calls.popleft()
    if len(calls) >= cfg.min_calls:
        failures = sum(1 for _, bad in calls if bad)
        if failures >= cfg.failure_rate * len(calls):
            return _open(s, cfg, now)
    return []


class MemoryCircuitBreaker:
    """The in-memory `CircuitBreaker`, for the calls of one process.

    See the module documentation for the states and which errors count. Meant for one event
    loop (the library's own); its state changes happen between awaits, so they are atomic.

    Args:
        name: The breaker's name, used in logs and in `CircuitOpenError`.
        failure_threshold: Consecutive failures that open the breaker (>= 1).
        failure_rate: When set, a failure ratio in (0, 1] that also opens it, once at least
            `min_calls` calls were reported in the last `window` seconds.
        window: The failure-rate window, in seconds (> 0).
        min_calls: Calls needed in the window before the failure rate is judged (>= 1).
        recovery_time: Seconds the breaker stays open before letting a probe through, and
            the probe's lease (> 0).
        clock: Returns the time now in seconds; `time.time` by default.

    Raises:
        ConfigurationError: A setting is out of range.
    """

    def __init__(
        self,
        name: str = "hospital_api",
        *,
        failure_threshold: int = 5,
        failure_rate: float | None = None,
        window: float = 60.0,
        min_calls: int = 10,
        recovery_time: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise ConfigurationError(f"name must be a non-empty string, not {name!r}")
        if not callable(clock):
            raise ConfigurationError("clock must be a callable returning seconds")
        self._name = name
        self._settings = _BreakerSettings(
            failure_threshold=failure_threshold,
            failure_rate=failure_rate,
            window=window,
            min_calls=min_calls,
            recovery_time=recovery_time,
        )
        self._clock = clock
        self._state = _BreakerState()

    @property
    def name(self) -> str:
        """The breaker's name, used in logs (``"hospital_api"``)."""
        return self._name

    async def before_call(self) -> None:
        """Ask to make one call.

        Raises:
            CircuitOpenError: The breaker is open, or half open with its probe under way;
                `CircuitOpenError.retry_at` says when to ask again.
        """
        retry_at, changes = _before_call(self._state, self._settings, self._clock())
        self._log(changes)
        if retry_at is not None:
            raise CircuitOpenError(self._name, retry_at=retry_at)

    async def record_success(self) -> None:
        """Report that the call allowed by `before_call` succeeded (or failed harmlessly)."""
        self._log(_on_success(self._state, self._settings, self._clock()))

    async def record_failure(self) -> None:
        """Report that the call failed in a way that counts (transport error, timeout, 5xx)."""
        self._log(_on_failure(self._state, self._settings, self._clock()))

    async def state(self) -> BreakerState:
        """Return the breaker's state now (an open breaker past its recovery time is half open)."""
        self._log(_advance(self._state, self._clock()))
        return self._state.state

    async def open_until(self) -> float | None:
        """Return when the open period ends (clock seconds) while open, else ``None``."""
        self._log(_advance(self._state, self._clock()))
        return self._state.open_until if self._state.state == "open" else None

    def _log(self, changes: list[_Transition]) -> None:
        for old, new in changes:
            if old == new:
                continue
            level = logging.WARNING if new == "open" else logging.INFO
            logger.log(level, "Circuit breaker '%s' state changed: %s -> %s", self._name, old, new)


def _not_int(value: object) -> bool:
    return isinstance(value, bool) or not isinstance(value, int)


def _not_number(value: object) -> bool:
    return (
        isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
    )
