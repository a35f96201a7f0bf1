"""The retry policy: which failures are retried, and how long to wait between attempts.

Only what the outcome table of the design allows is retried:

| error | retried |
|---|---|
| `RequestNotSentError` (never reached the upstream) | yes |
| `RateLimitedError` (429: nothing happened) | yes, after the upstream's window |
| any `UpstreamError` whose `safe_to_retry` is true (e.g. an ambiguous GET) | yes |
| `RejectedError` and its family (a definite 4xx) | never |
| an ambiguous POST, PATCH, DELETE or PUT (it may have been applied) | never |
| anything else (`CircuitOpenError`, cancellation, bugs) | never |

An ambiguous create is never re-sent here: the processor reads its batch back instead.

Waits:

- after a 429: the error's `retry_after` when the upstream sent one (clamped to
  ``[0, 10 * maximum]``), else its `window` (the upstream names it in the 429 body, e.g.
  "30 per 1 minute" gives 60 s), else `rate_limit_wait`;
- otherwise exponential backoff with full jitter: attempt ``n`` (from 1) failed, so wait a
  uniformly random time in ``[0, min(maximum, initial * multiplier ** (n - 1))]``. Full jitter
  spreads the retries of many concurrent rows instead of sending them back in lockstep.

Each `RetryPolicy.call` builds its own tenacity `AsyncRetrying` (a retrying object keeps
per-call state, so one shared by concurrent tasks would mix their attempts). The last error
is re-raised as itself, never wrapped in tenacity's `RetryError`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio
import anyio.lowlevel
import tenacity
from tenacity.asyncio import AsyncRetrying

from ._exceptions import ConfigurationError, RateLimitedError, RejectedError, UpstreamError

__all__ = ["RetryPolicy"]

_T = TypeVar("_T")


async def _no_wait(seconds: float) -> None:
    """Let other tasks run, without waiting (the testing policy's sleep)."""
    await anyio.lowlevel.checkpoint()


class RetryPolicy:
    """Retries upstream calls that are safe to retry, with capped, jittered backoff.

    Args:
        attempts: The most attempts per call, the first included (>= 1; 1 never retries).
        initial: The backoff cap after the first failure, in seconds (>= 0).
        maximum: The largest backoff cap, in seconds (>= `initial`).
        multiplier: How much the backoff cap grows per failure (>= 1).
        rate_limit_wait: The wait after a 429 that names neither a ``Retry-After`` nor a
            window, in seconds (>= 0).
        sleep: Awaited to wait a number of seconds; `anyio.sleep` by default.
        rng: The random source of the jitter; a new `random.Random` by default.

    Raises:
        ConfigurationError: A setting is out of range.
    """

    def __init__(
        self,
        *,
        attempts: int = 5,
        initial: float = 0.5,
        maximum: float = 30.0,
        multiplier: float = 2.0,
        rate_limit_wait: float = 60.0,
        sleep: Callable[[float], Awaitable[None]] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 1:
            raise ConfigurationError(f"attempts must be an int >= 1, not {attempts!r}")
        _check_seconds("initial", initial)
        _check_seconds("maximum", maximum)
        _check_seconds("rate_limit_wait", rate_limit_wait)
        if maximum < initial:
            raise ConfigurationError(
                f"maximum ({maximum!r}) must not be smaller than initial ({initial!r})"
            )
        if _not_number(multiplier) or multiplier < 1:
            raise ConfigurationError(f"multiplier must be a number >= 1, not {multiplier!r}")
        if sleep is not None and not callable(sleep):
            raise ConfigurationError("sleep must be an async callable taking seconds")
        if rng is not None and not isinstance(rng, random.Random):
            raise ConfigurationError(f"rng must be a random.Random, not {type(rng).__name__}")
        self._attempts = attempts
        self._initial = float(initial)
        self._maximum = float(maximum)
        self._multiplier = float(multiplier)
        self._rate_limit_wait = float(rate_limit_wait)
        self._sleep: Callable[[float], Awaitable[None]] = (
            sleep if sleep is not None else anyio.sleep
        )
        self._rng = rng if rng is not None else random.Random()

    @classmethod
    def testing(cls, *, attempts: int = 5, rng: random.Random | None = None) -> RetryPolicy:
        """Return a policy that retries like the default one but never waits.

        For tests: the waits are still computed and passed to ``on_retry``, but skipped.

        Args:
            attempts: The most attempts per call (>= 1).
            rng: The random source of the (skipped) jitter.

        Returns:
            The policy.
        """
        return cls(attempts=attempts, sleep=_no_wait, rng=rng)

    @property
    def attempts(self) -> int:
        """The most attempts per call, the first included."""
        return self._attempts

    def should_retry(self, exc: BaseException) -> bool:
        """Tell whether a call that raised `exc` may be tried again.

        Args:
            exc: The error the attempt raised.

        Returns:
            True for `RequestNotSentError`, `RateLimitedError` and any other `UpstreamError`
            whose `safe_to_retry` is true; False for a `RejectedError`, an ambiguous
            write, and anything that is not an `UpstreamError`.
        """
        if not isinstance(exc, UpstreamError) or isinstance(exc, RejectedError):
            return False
        return exc.safe_to_retry

    def wait_for(self, exc: BaseException, attempt: int) -> float:
        """Return the seconds to wait after attempt number `attempt` failed with `exc`.

        Args:
            exc: The error the attempt raised.
            attempt: The attempt's number, from 1.

        Returns:
            For a `RateLimitedError`, its ``retry_after`` (clamped to
            ``[0, 10 * maximum]``), else its ``window``, else `rate_limit_wait`; for any
            other error a uniformly random wait in
            ``[0, min(maximum, initial * multiplier ** (attempt - 1))]``.
        """
        if isinstance(exc, RateLimitedError):
            if exc.retry_after is not None and math.isfinite(exc.retry_after):
                return min(max(exc.retry_after, 0.0), 10 * self._maximum)
            if exc.window is not None and math.isfinite(exc.window) and exc.window >= 0:
                return float(exc.window)
            return self._rate_limit_wait
        cap = self._initial * self._multiplier ** max(attempt - 1, 0)
        return self._rng.uniform(0.0, min(self._maximum, cap))

    async def call(
        self,
        fn: Callable[[], Awaitable[_T]],
        *,
        on_retry: Callable[[UpstreamError, float], Awaitable[None]] | None = None,
    ) -> _T:
        """Call `fn`, retrying it while its failures are safe to retry and attempts remain.

        Args:
            fn: Makes one attempt (a fresh awaitable each time it is called).
            on_retry: Awaited as ``on_retry(error, wait_seconds)`` before each wait, e.g. to
                pause every sender after a 429.

        Returns:
            What `fn` returned.

        Raises:
            BaseException: The last attempt's error, as raised by `fn`, when it is not safe
                to retry or the attempts ran out.
        """
        # The first attempt runs on its own: most calls succeed at once, and building the
        # retry machinery for every call costs more than a fast request's own handling.
        try:
            return await fn()
        except BaseException as exc:
            if self._attempts <= 1 or not self.should_retry(exc):
                raise
            first = exc
        wait_first = self.wait_for(first, 1)
        if on_retry is not None and isinstance(first, UpstreamError):
            await on_retry(first, wait_first)
        await self._sleep(wait_first)

        async def before_sleep(state: tenacity.RetryCallState) -> None:
            if on_retry is None or state.outcome is None:
                return
            exc = state.outcome.exception()
            if isinstance(exc, UpstreamError):
                await on_retry(exc, state.upcoming_sleep)

        def wait(state: tenacity.RetryCallState) -> float:
            # Attempt numbers count the first attempt, made above.
            exc = state.outcome.exception() if state.outcome is not None else None
            return self.wait_for(exc, state.attempt_number + 1) if exc is not None else 0.0

        retrying = AsyncRetrying(
            sleep=self._sleep,
            stop=tenacity.stop_after_attempt(self._attempts - 1),
            wait=wait,
            retry=tenacity.retry_if_exception(self.should_retry),
            before_sleep=before_sleep,
            reraise=True,
        )

        async def attempt() -> _T:
            # tenacity awaits only what a coroutine function returns; `fn` may be any callable
            # returning an awaitable (a lambda, a functools.partial).
            return await fn()

        result: _T = await retrying(attempt)
        return result

    def __repr__(self) -> str:
        return (
            f"RetryPolicy(attempts={self._attempts}, initial={self._initial}, "
            f"maximum={self._maximum}, multiplier={self._multiplier}, "
            f"rate_limit_wait={self._rate_limit_wait})"
        )


def _not_number(value: object) -> bool:
    return (
        isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
    )


def _check_seconds(name: str, value: float) -> None:
    if _not_number(value) or value < 0:
        raise ConfigurationError(f"{name} must be a finite number of seconds >= 0, not {value!r}")
