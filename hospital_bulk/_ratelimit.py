"""Client-side rate budgets: rate parsing and the in-memory moving-window limiter.

The upstream allows 30 creates per minute and 50 calls per minute on every other path, per
client address. `MemoryRateLimiter` keeps one budget for creates and one per path for every
other call, and never lets a request leave over its budget.

Moving window, exactly
    A request may leave at time ``t`` only if fewer than ``N`` requests left in the window
    ``(t - W, t]``. Any ``N + 1`` consecutive departures therefore span at least ``W`` seconds,
    so no window of length ``W``, wherever it starts, holds more than ``N`` of them. (Fixed
    windows and sliding counters are approximations that can let up to ``2N`` through around
    a window edge, which is exactly what the upstream would answer with a 429.)

Why a margin widens every window
    The upstream counts requests in fixed windows that start at the first request it sees,
    and it sees requests when they *arrive*, not when they leave here. Network and scheduling
    jitter moves arrivals: two requests that left exactly ``W`` apart can arrive less than
    ``W`` apart, and then ``N + 1`` arrivals can fall into one upstream window. The limiter
    therefore enforces ``N`` requests per ``W + margin`` seconds (`margin` defaults to one
    second, well above the usual spread of network and scheduling delays; raise it for a
    distant or congested link). The cost is small: 30 creates per 61 s instead of per 60 s.

Why the moving window is ours and not the `limits` library's
    Rates are parsed with `limits` (its notation and `RateLimitItem` objects), but the
    in-memory window is a deque of departure times per budget, kept here, because the memory
    storage of `limits` cannot follow an injected clock: it reads `time.time()` directly, so
    tests would have to sleep for real or patch a global. It also answers only "yes or no"
    (the limiter needs "how long until yes", to sleep exactly that long instead of polling),
    counts windows in whole seconds (a fractional margin would be lost), and starts an
    asyncio-only expiry task. A deque of at most ``N`` timestamps per budget is tiny and its
    rule is a few lines (`_Budget.wait_at`). The Redis limiter (`hospital_bulk.backends.redis`)
    uses `limits`' Redis moving window instead, in whole seconds.

Waiting
    Each budget has a FIFO lock: one task at a time computes how long until the oldest
    departure leaves the window (or the shared pause ends) and sleeps exactly that long; the
    others queue behind it in arrival order. Counting happens with no ``await`` between the
    check and the record, after the last sleep, so a task cancelled while waiting counts
    nothing.
"""

from __future__ import annotations

import math
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Final, Literal

import anyio
import limits

from ._exceptions import ConfigurationError

__all__ = ["MemoryRateLimiter", "as_rate", "check_margin", "non_negative_seconds", "parse_rate"]

# A window written with an explicit zero multiple ("10/0 seconds"): `limits` reads it as one.
_ZERO_MULTIPLE: Final = re.compile(r"(?:/|\bper\b)\s*0+\s*[a-z]", re.IGNORECASE)
# The shortest sleep: guards against float rounding leaving a wait of a few ulps forever.
_MIN_SLEEP: Final = 0.001
_NOTATION_HELP: Final = (
    "use the notation '<amount>/<unit>' or '<amount> per <count> <unit>', "
    "e.g. '30/minute' or '10 per 6 seconds'"
)


def parse_rate(text: str) -> limits.RateLimitItem:
    """Parse one rate written in the `limits` notation.

    Accepted forms: ``"30/minute"``, ``"30 per minute"``, ``"10/6 seconds"``,
    ``"10 per 6 seconds"``; units from second to year, singular or plural.

    Args:
        text: The rate.

    Returns:
        The rate as a `limits.RateLimitItem` (``item.amount`` requests per
        ``item.get_expiry()`` seconds).

    Raises:
        ConfigurationError: The text is not one rate in that notation, names several rates,
            has a zero window, or allows fewer than one request.
    """
    if not isinstance(text, str):
        raise ConfigurationError(f"a rate must be a string, not {type(text).__name__}")
    try:
        items = limits.parse_many(text)
    except ValueError as exc:
        raise ConfigurationError(f"cannot read the rate {text!r}: {_NOTATION_HELP}") from exc
    if len(items) != 1:
        raise ConfigurationError(f"the rate {text!r} names {len(items)} rates; give exactly one")
    if _ZERO_MULTIPLE.search(text):
        raise ConfigurationError(f"the rate {text!r} has a window of zero length")
    item = items[0]
    if item.amount < 1:
        raise ConfigurationError(f"the rate {text!r} must allow at least one request")
    return item


class _Budget:
    """One moving window: the departure times still inside it, and its FIFO lock."""

    __slots__ = ("hits", "limit", "lock", "users", "window")

    def __init__(self, limit: int, window: float) -> None:
        self.limit = limit
        self.window = window
        self.hits: deque[float] = deque()
        self.lock: anyio.Lock | None = None
        self.users = 0

    def prune(self, now: float) -> None:
        """Forget departures that left the window ``(now - window, now]``."""
        cutoff = now - self.window
        hits = self.hits
        while hits and hits[0] <= cutoff:
            hits.popleft()

    def wait_at(self, now: float) -> float:
        """Return the seconds from `now` until one more departure fits (0 if it fits now)."""
        self.prune(now)
        if len(self.hits) < self.limit:
            return 0.0
        return self.hits[-self.limit] + self.window - now

    def record(self, now: float) -> None:
        """Count one departure at `now` (never before the latest, if the clock went back)."""
        if self.hits and now < self.hits[-1]:
            now = self.hits[-1]
        self.hits.append(now)


class MemoryRateLimiter:
    """The in-memory `RateLimiter`: exact moving windows for one process.

    Creates share one budget; every other call has a budget per request path. See the module
    documentation for the window rule and the margin.

    Args:
        create_rate: The budget of creates (`POST /hospitals/`), in `parse_rate` notation or
            as a `limits.RateLimitItem`.
        other_rate: The budget of every other path, each path counted on its own.
        margin: Seconds added to every window (>= 0), to absorb arrival jitter upstream.
        clock: Returns the time now in seconds; `time.time` by default. Pause ends are in
            this clock's time.
        sleep: Awaited to wait a number of seconds; `anyio.sleep` by default.

    Raises:
        ConfigurationError: A rate cannot be parsed, or the margin is negative or not finite.
    """

    def __init__(
        self,
        create_rate: str | limits.RateLimitItem = "30/minute",
        other_rate: str | limits.RateLimitItem = "50/minute",
        *,
        margin: float = 1.0,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
    ) -> None:
        self._create_rate = as_rate(create_rate, "create_rate")
        self._other_rate = as_rate(other_rate, "other_rate")
        if not callable(clock) or not callable(sleep):
            raise ConfigurationError("clock and sleep must be callables")
        self._margin = check_margin(margin)
        self._clock = clock
        self._sleep = sleep
        self._create_window = self._create_rate.get_expiry() + self._margin
        self._other_window = self._other_rate.get_expiry() + self._margin
        self._budgets: dict[str, _Budget] = {}
        self._pause_end = -math.inf
        self._next_sweep = -math.inf

    @property
    def create_rate(self) -> limits.RateLimitItem:
        """The budget of creates, as parsed."""
        return self._create_rate

    @property
    def other_rate(self) -> limits.RateLimitItem:
        """The budget of each other path, as parsed."""
        return self._other_rate

    @property
    def margin(self) -> float:
        """The seconds added to every window."""
        return self._margin

    @property
    def create_window(self) -> float:
        """The length in seconds of the creates' window, margin included."""
        return self._create_window

    @property
    def other_window(self) -> float:
        """The length in seconds of each other path's window, margin included."""
        return self._other_window

    async def acquire(
        self,
        kind: Literal["create", "other"],
        path: str = "",
        *,
        on_wait: Callable[[float], None] | None = None,
    ) -> None:
        """Wait until one request of this kind may leave, and count it.

        Waits past any pause too. Waiting tasks of one budget are served in arrival order.
        Cancellation-safe: a task cancelled while waiting counts nothing.

        Args:
            kind: ``"create"`` for `POST /hospitals/`, ``"other"`` for every other call.
            path: The request path; every ``"other"`` path has a budget of its own.
            on_wait: Called with the clock time a wait should end, before each wait.

        Raises:
            ConfigurationError: `kind` is neither ``"create"`` nor ``"other"``.
        """
        budget = self._budget(kind, path)
        if budget.lock is None:
            budget.lock = anyio.Lock()
        budget.users += 1
        try:
            async with budget.lock:
                while True:
                    now = self._clock()
                    wait = max(budget.wait_at(now), self._pause_end - now)
                    if wait <= 0:
                        budget.record(now)
                        return
                    if on_wait is not None:
                        on_wait(now + wait)
                    await self._sleep(max(wait, _MIN_SLEEP))
        finally:
            budget.users -= 1

    async def wait_time(self, kind: Literal["create", "other"], path: str = "") -> float:
        """Return how long a request of this kind would wait if it asked now.

        Counts nothing; tasks already queued for the budget are not included.

        Args:
            kind: ``"create"`` or ``"other"``, as for `acquire`.
            path: The request path, for ``"other"``.

        Returns:
            Seconds until the request could leave (the window and any pause), 0.0 if now.

        Raises:
            ConfigurationError: `kind` is neither ``"create"`` nor ``"other"``.
        """
        budget = self._budget(kind, path)
        now = self._clock()
        return max(0.0, budget.wait_at(now), self._pause_end - now)

    async def pause(self, seconds: float) -> None:
        """Make every `acquire` wait until `seconds` from now.

        A pause never shortens one already in force.

        Args:
            seconds: How long to pause from now (>= 0).

        Raises:
            ConfigurationError: `seconds` is negative or not a finite number.
        """
        seconds = non_negative_seconds("a pause", seconds)
        self._pause_end = max(self._pause_end, self._clock() + seconds)

    async def paused_until(self) -> float | None:
        """Return when the current pause ends (in the clock's seconds), or ``None``."""
        if self._pause_end > self._clock():
            return self._pause_end
        return None

    def _budget(self, kind: str, path: str) -> _Budget:
        if kind == "create":
            key, limit, window = "create", self._create_rate.amount, self._create_window
        elif kind == "other":
            key, limit, window = f"other:{path}", self._other_rate.amount, self._other_window
        else:
            raise ConfigurationError(f"kind must be 'create' or 'other', not {kind!r}")
        self._sweep()
        budget = self._budgets.get(key)
        if budget is None:
            budget = self._budgets[key] = _Budget(limit, window)
        return budget

    def _sweep(self) -> None:
        """Drop idle budgets (batch paths are many), at most once per window."""
        now = self._clock()
        if now < self._next_sweep:
            return
        self._next_sweep = now + min(self._create_window, self._other_window)
        for key, budget in list(self._budgets.items()):
            budget.prune(now)
            if not budget.hits and budget.users == 0:
                del self._budgets[key]


def check_margin(margin: object) -> float:
    """Return a rate margin as a float, or raise `ConfigurationError` unless finite and >= 0."""
    return non_negative_seconds("margin", margin)


def non_negative_seconds(subject: str, value: object) -> float:
    """Return `value` as a float, or raise `ConfigurationError` naming `subject`.

    Args:
        subject: What the value is, to start the error message (``"a pause"``).
        value: The value, which must be a finite number >= 0 (not a bool).
    """
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
    ):
        raise ConfigurationError(
            f"{subject} must be a finite number of seconds >= 0, not {value!r}"
        )
    return float(value)


def as_rate(value: str | limits.RateLimitItem, name: str) -> limits.RateLimitItem:
    if isinstance(value, limits.RateLimitItem):
        if value.amount < 1:
            raise ConfigurationError(f"{name} must allow at least one request, not {value!r}")
        return value
    try:
        return parse_rate(value)
    except ConfigurationError as exc:
        raise ConfigurationError(f"{name}: {exc}") from None
