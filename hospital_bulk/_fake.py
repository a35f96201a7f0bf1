"""A faithful fake of the Hospital Directory API, for tests and benchmarks.

`FakeDirectory` models the upstream contract (``upstream-contract.md``) in memory: exact paths
with 307 redirects for a wrong trailing slash, 200 on create, inactive batched hospitals, naive
timestamps with microseconds, 404 for an empty batch, 400 on a second activation, the racy batch
cap (checked before the create latency), the storage cap, per-client per-path fixed-window rate
limits whose 429 has no ``Retry-After``, and FastAPI-shaped 422 bodies. It never deduplicates and
records every request with its arrival time, so tests count duplicates and missing rows here,
at the oracle, not in the library's own report. The log keeps the last ``max_log`` requests
(100,000 by default) so that a long-running served fake keeps a bounded memory.

Three front ends share one core:

* `FakeDirectory.transport`: an httpx transport calling the core directly (no sockets). Faults
  become the httpx exceptions a real client would see: ``DOWN`` a `httpx.ConnectError`,
  ``TIMEOUT_AFTER_COMMIT`` a `httpx.ReadTimeout` (raised at once, no waiting),
  ``RESET_AFTER_COMMIT`` a `httpx.ReadError`.
* `FakeDirectory.app`: an ASGI 3 application, served by `FakeServer` (uvicorn on loopback) or
  ``python -m hospital_bulk.testing``. There ``DOWN`` is the hosting proxy's 502 page (the
  service is unreachable but the proxy answers), ``TIMEOUT_AFTER_COMMIT`` holds the request for
  `Faults.hang` seconds (the client's read timeout fires first) and then answers 504,
  ``RESET_AFTER_COMMIT`` sends the headers and part of the body, then drops the connection.
* Control endpoints under ``/__fake__/`` (a prefix the contract never uses) for other
  processes: ``GET /__fake__/state``, ``PUT /__fake__/faults``, ``POST /__fake__/inject``,
  ``POST /__fake__/restart``, ``POST /__fake__/reset``. They are neither rate limited nor
  recorded.

Choices where the contract is silent:

* Request order for a create: body validation (422) -> rate limit (429) -> batch cap (400) ->
  latency -> commit -> 200. Path parameters are validated with the body, as FastAPI does, and
  named ``hospital_id`` and ``batch_id`` in 422 locations. A blank ``name`` or ``address`` is
  ``string_too_short`` when empty and ``value_error`` when only white space.
* Rate limit windows are fixed, keyed by (limit kind, client address, exact path), and start at
  the first counted hit. Requests that reach a handler count (200, 204, 400, 404); 422, 307,
  405, 404 for an unknown path, and injected faults do not. The 429 text follows the ``limits``
  library: ``"N per K unit"`` with the largest of day, hour, minute, second that divides the
  window exactly (``(30, 60.0)`` gives ``"30 per 1 minute"``, ``(5, 10.0)`` gives ``"5 per 10
  second"``, ``(5, 0.5)`` gives ``"5 per 0.5 second"``). A spurious 429 for a route whose limit
  is disabled uses the contract's numbers.
* Faults are chosen when a request arrives, before validation: ``down`` first (nothing reaches
  the service, scripted faults wait), then the script of `FakeDirectory.inject`, then the seeded
  random rates. ``ERROR``, ``RATE_LIMIT`` and ``DOWN`` answer at once (nothing validated,
  counted or stored). ``TIMEOUT_AFTER_COMMIT`` and ``RESET_AFTER_COMMIT`` let the request run
  to its end, whatever its answer, and lose the answer; `RecordedRequest.committed` says
  whether it changed anything.
* With no create latency, the batch-cap check and the commit happen atomically; with a latency,
  concurrent creates can overfill a batch, as upstream. At most ``max_concurrent_creates``
  creates are in the latency phase at once per event loop; the others wait their turn.
* PUT applies the fields it was given: ``name`` and ``address`` must be non-blank strings (a
  null is ignored), ``phone`` may be set to null. Unknown fields, ``creation_batch_id`` and
  ``active`` are ignored.
* `FakeDirectory.restart` is a service restart (storage, ids and rate windows start over; the
  request log, faults and script stay); `FakeDirectory.reset` makes the fake as new. A create in
  its latency phase during a restart is lost and its connection breaks.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import functools
import importlib
import json
import logging
import random
import re
import secrets
import socket
import threading
import time
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping
from dataclasses import dataclass, field
from datetime import datetime
from types import TracebackType
from typing import Annotated, Any, Literal
from uuid import UUID

import anyio
import httpx
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from ._exceptions import ConfigurationError

__all__ = [
    "FakeDirectory",
    "FakeServer",
    "Fault",
    "Faults",
    "RecordedRequest",
    "StoredHospital",
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_CONTROL_PREFIX = "/__fake__"
_TIMESTAMP_FORMAT = "%Y-%m-%dT%H:%M:%S.%f"
_INSTALL_HINT = 'FakeServer needs uvicorn: pip install "hospital-bulk[testing]"'

ROUTE_NAMES = frozenset(
    {
        "root",
        "create",
        "list",
        "get",
        "update",
        "delete",
        "batch_list",
        "batch_activate",
        "batch_delete",
    }
)
MUTATING_ROUTES = frozenset({"create", "update", "delete", "batch_activate", "batch_delete"})

# What the contract states, used for a spurious 429 on a route whose limit is disabled.
_CONTRACT_RATES: dict[str, tuple[int, float]] = {
    "create": (30, 60.0),
    "other": (50, 60.0),
    "root": (100, 60.0),
}


# --------------------------------------------------------------------------------------------
# Public value types
# --------------------------------------------------------------------------------------------


class Fault(str, enum.Enum):
    """A fault the fake can inject into one request.

    Attributes:
        ERROR: The hosting proxy answers 503 with an HTML page; the service never sees the
            request (nothing stored, nothing counted).
        TIMEOUT_AFTER_COMMIT: The service handles the request (a create commits), then the
            client never hears: in process a `httpx.ReadTimeout`; served, the request is held
            for `Faults.hang` seconds.
        RESET_AFTER_COMMIT: The service handles the request, then the connection breaks: in
            process a `httpx.ReadError`; served, the response is cut short (the client sees
            `httpx.RemoteProtocolError` or `httpx.ReadError`).
        RATE_LIMIT: A spurious 429 with the contract's body, not counted against any window.
        DOWN: Nothing reaches the service: in process a `httpx.ConnectError`; served, the
            hosting proxy's 502 page.
        REJECT: The service refuses the request with a 422 in FastAPI's shape (nothing stored,
            not counted), as it would a body it cannot accept. Scripted only (`inject`).
    """

    ERROR = "error"
    TIMEOUT_AFTER_COMMIT = "timeout_after_commit"
    RESET_AFTER_COMMIT = "reset_after_commit"
    RATE_LIMIT = "rate_limit"
    DOWN = "down"
    REJECT = "reject"

    def __str__(self) -> str:
        return self.value


def _check_rate(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ConfigurationError(f"Faults.{name} must be between 0 and 1, got {value!r}")


@dataclass(frozen=True)
class Faults:
    """Random faults and extra latency, drawn from the fake's seeded generator.

    The rates are probabilities per eligible request and are mutually exclusive (one draw per
    request picks at most one fault), so their sum must not exceed 1.

    Attributes:
        latency_jitter: Up to this many seconds (uniform) added to every create's latency.
        error_rate: Probability of `Fault.ERROR` (503 before the service sees the request).
        timeout_after_commit_rate: Probability of `Fault.TIMEOUT_AFTER_COMMIT`.
        reset_after_commit_rate: Probability of `Fault.RESET_AFTER_COMMIT`.
        rate_limit_rate: Probability of `Fault.RATE_LIMIT` (a spurious 429).
        down: Every request fails with `Fault.DOWN`, whatever its route.
        routes: The route names random faults apply to, among ``"root"``, ``"create"``,
            ``"list"``, ``"get"``, ``"update"``, ``"delete"``, ``"batch_list"``,
            ``"batch_activate"``, ``"batch_delete"``; ``None`` means the mutating routes
            (create, update, delete, batch_activate, batch_delete).
        hang: Seconds the served app holds a request hit by `Fault.TIMEOUT_AFTER_COMMIT`
            before giving up with a 504 (it stops as soon as the client disconnects).
    """

    latency_jitter: float = 0.0
    error_rate: float = 0.0
    timeout_after_commit_rate: float = 0.0
    reset_after_commit_rate: float = 0.0
    rate_limit_rate: float = 0.0
    down: bool = False
    routes: frozenset[str] | None = None
    hang: float = 30.0

    def __post_init__(self) -> None:
        if self.latency_jitter < 0:
            raise ConfigurationError("Faults.latency_jitter must be >= 0")
        if self.hang < 0:
            raise ConfigurationError("Faults.hang must be >= 0")
        rates = {
            "error_rate": self.error_rate,
            "timeout_after_commit_rate": self.timeout_after_commit_rate,
            "reset_after_commit_rate": self.reset_after_commit_rate,
            "rate_limit_rate": self.rate_limit_rate,
        }
        for name, value in rates.items():
            _check_rate(name, value)
        if sum(rates.values()) > 1.0 + 1e-9:
            raise ConfigurationError("the Faults rates must add up to at most 1")
        if self.routes is not None:
            routes = frozenset(self.routes)
            unknown = routes - ROUTE_NAMES
            if unknown:
                raise ConfigurationError(
                    f"unknown route name(s) in Faults.routes: {sorted(unknown)}; "
                    f"known: {sorted(ROUTE_NAMES)}"
                )
            object.__setattr__(self, "routes", routes)

    def to_dict(self) -> dict[str, Any]:
        """Return the settings as JSON-ready data (``routes`` as a sorted list or null)."""
        data = dataclasses.asdict(self)
        data["routes"] = None if self.routes is None else sorted(self.routes)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Faults:
        """Build a `Faults` from data shaped like `to_dict` (missing keys take defaults).

        Args:
            data: The settings; ``routes`` may be a list of route names or null.

        Returns:
            The new settings.

        Raises:
            ConfigurationError: An unknown key or a wrong value.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ConfigurationError(f"unknown Faults field(s): {sorted(unknown)}")
        kwargs = dict(data)
        if kwargs.get("routes") is not None:
            kwargs["routes"] = frozenset(kwargs["routes"])
        try:
            return cls(**kwargs)
        except TypeError as exc:  # pragma: no cover - guarded by the key check above
            raise ConfigurationError(str(exc)) from exc


@dataclass(frozen=True, slots=True)
class StoredHospital:
    """One hospital as the fake stores it.

    Attributes:
        id: The global counter value (from 1, restarting at 1 on a restart).
        name: As sent (not trimmed).
        address: As sent (not trimmed).
        phone: As sent, or ``None``.
        creation_batch_id: The batch UUID in lower case, or ``None``.
        active: ``False`` for a hospital created with a batch id until its batch is activated.
        created_at: Naive commit time.
    """

    id: int
    name: str
    address: str
    phone: str | None
    creation_batch_id: str | None
    active: bool
    created_at: datetime

    def to_dict(self) -> dict[str, Any]:
        """Return the hospital exactly as the API shows it (``created_at`` with microseconds)."""
        return {
            "id": self.id,
            "name": self.name,
            "address": self.address,
            "phone": self.phone,
            "creation_batch_id": self.creation_batch_id,
            "active": self.active,
            "created_at": _timestamp(self.created_at),
        }


def _timestamp(moment: datetime) -> str:
    """``created_at`` as the API shows it: naive ISO 8601 with microseconds."""
    if type(moment) is datetime and moment.tzinfo is None and moment.year >= 1000:
        # The same text as the strftime format below, about ten times cheaper.
        return moment.isoformat(timespec="microseconds")
    return moment.strftime(_TIMESTAMP_FORMAT)


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    """One request as the fake saw it (control endpoints are not recorded).

    Attributes:
        method: The HTTP method.
        path: The exact path, e.g. ``"/hospitals/"``.
        route: The route name (see `Faults.routes`), or ``None`` for a redirect, an unknown
            path or a wrong method.
        status: The status the client received; ``None`` while the request is in progress or
            when no complete response reached the client (connect error, timeout, reset).
        arrived_at: The fake's clock when the request arrived.
        client: The client address.
        body: The JSON body, parsed; the raw text when it is not JSON; ``None`` when empty.
        fault: The injected fault's value (see `Fault`), or ``None``.
        committed: Whether the request changed the stored hospitals.
    """

    method: str
    path: str
    route: str | None
    status: int | None
    arrived_at: float
    client: str
    body: object | None
    fault: str | None
    committed: bool

    def to_dict(self) -> dict[str, Any]:
        """Return the record as JSON-ready data."""
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------
# Request bodies and 422 errors (FastAPI / pydantic v2 shape)
# --------------------------------------------------------------------------------------------


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty or only white space")
    return value


_Text = Annotated[str, Field(min_length=1), AfterValidator(_not_blank)]


class _HospitalCreateBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: _Text
    address: _Text
    phone: str | None = None
    creation_batch_id: UUID | None = None


class _HospitalUpdateBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: _Text | None = None
    address: _Text | None = None
    phone: str | None = None


_INT = TypeAdapter(int)
_UUID = TypeAdapter(UUID)
_JSON_SCALARS = (str, int, float, bool, type(None))


def _error_items(exc: ValidationError, prefix: tuple[str | int, ...]) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    for err in exc.errors(include_url=False):
        item: dict[str, Any] = {
            "type": err["type"],
            "loc": [*prefix, *err["loc"]],
            "msg": err["msg"],
            "input": err["input"],
        }
        ctx = err.get("ctx")
        if ctx:
            # FastAPI encodes an exception in ``ctx`` as an empty object.
            item["ctx"] = {
                key: value if isinstance(value, _JSON_SCALARS) else {} for key, value in ctx.items()
            }
        items.append(item)
    return items


def _param(
    adapter: TypeAdapter[Any], name: str, raw: str, errors: list[dict[str, Any]]
) -> Any | None:
    try:
        return adapter.validate_python(raw)
    except ValidationError as exc:
        errors.extend(_error_items(exc, ("path", name)))
        return None


def _body_value(req: _Request, errors: list[dict[str, Any]]) -> object | None:
    """Decode a JSON body as FastAPI does; append errors and return None when it cannot."""
    if not req.body:
        errors.append({"type": "missing", "loc": ["body"], "msg": "Field required", "input": None})
        return None
    ctype = (req.content_type or "").split(";")[0].strip().lower()
    if ctype and not (ctype == "application/json" or ctype.endswith("+json")):
        text = req.body.decode("utf-8", "replace")
        errors.append(_not_an_object(text))
        return None
    value, exc = req.parsed
    if isinstance(exc, json.JSONDecodeError):
        errors.append(
            {
                "type": "json_invalid",
                "loc": ["body", exc.pos],
                "msg": "JSON decode error",
                "input": {},
                "ctx": {"error": exc.msg},
            }
        )
        return None
    if exc is not None:  # undecodable bytes
        errors.append(
            {
                "type": "json_invalid",
                "loc": ["body", 0],
                "msg": "JSON decode error",
                "input": {},
                "ctx": {"error": "Invalid encoding"},
            }
        )
        return None
    if not isinstance(value, dict):
        errors.append(_not_an_object(value))
        return None
    return value


def _not_an_object(value: object) -> dict[str, Any]:
    return {
        "type": "model_attributes_type",
        "loc": ["body"],
        "msg": "Input should be a valid dictionary or object to extract fields from",
        "input": value,
    }


def _log_body(req: _Request) -> object | None:
    if not req.body:
        return None
    value, exc = req.parsed
    if exc is not None:
        return req.body.decode("utf-8", "replace")
    return value


# --------------------------------------------------------------------------------------------
# Routing
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Route:
    name: str
    method: str
    template: str
    kind: Literal["root", "create", "other"]
    regex: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        pattern = re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", self.template)
        object.__setattr__(self, "regex", re.compile(pattern))


# The order matters as in the upstream's router: the first route whose path matches but whose
# method differs names the ``Allow`` header of a 405.
_ROUTES = (
    _Route("root", "GET", "/", "root"),
    _Route("list", "GET", "/hospitals/", "other"),
    _Route("create", "POST", "/hospitals/", "create"),
    _Route("get", "GET", "/hospitals/{hospital_id}", "other"),
    _Route("update", "PUT", "/hospitals/{hospital_id}", "other"),
    _Route("delete", "DELETE", "/hospitals/{hospital_id}", "other"),
    _Route("batch_list", "GET", "/hospitals/batch/{batch_id}", "other"),
    _Route("batch_activate", "PATCH", "/hospitals/batch/{batch_id}/activate", "other"),
    _Route("batch_delete", "DELETE", "/hospitals/batch/{batch_id}", "other"),
)


def _match(method: str, path: str) -> tuple[_Route | None, dict[str, str], _Route | None]:
    """Return (route, path params, first path-only match) for a request."""
    partial: _Route | None = None
    for route in _ROUTES:
        found = route.regex.fullmatch(path)
        if found is None:
            continue
        if route.method == method:
            return route, found.groupdict(), None
        if partial is None:
            partial = route
    return None, {}, partial


def _path_exists(path: str) -> bool:
    return any(route.regex.fullmatch(path) for route in _ROUTES)


def _describe_rate(amount: int, seconds: float) -> str:
    for unit, length in (("day", 86400), ("hour", 3600), ("minute", 60), ("second", 1)):
        multiples = seconds / length
        if multiples >= 1 and multiples == int(multiples):
            return f"{amount} per {int(multiples)} {unit}"
    return f"{amount} per {seconds:g} second"


def _activated(hospital: StoredHospital) -> StoredHospital:
    """``dataclasses.replace(hospital, active=True)``, without its per-call introspection."""
    return StoredHospital(
        id=hospital.id,
        name=hospital.name,
        address=hospital.address,
        phone=hospital.phone,
        creation_batch_id=hospital.creation_batch_id,
        active=True,
        created_at=hospital.created_at,
    )


# --------------------------------------------------------------------------------------------
# Requests and replies shared by the front ends
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Request:
    method: str
    path: str
    query: str
    scheme: str
    host: str
    content_type: str | None
    body: bytes
    client: str

    @functools.cached_property
    def parsed(self) -> tuple[object, ValueError | None]:
        """The body decoded as JSON once, for the log and the validation: (value, error)."""
        try:
            return json.loads(self.body), None
        except ValueError as exc:
            exc.__traceback__ = None
            return None, exc


class _Delivery(enum.Enum):
    ANSWER = "answer"  # send the reply
    REFUSE = "refuse"  # nothing reaches the service (DOWN)
    HANG = "hang"  # the client never hears (TIMEOUT_AFTER_COMMIT)
    BREAK = "break"  # the connection breaks mid-response (RESET_AFTER_COMMIT, restart)


@dataclass
class _Reply:
    status: int
    headers: list[tuple[str, str]]
    body: bytes = b""
    delivery: _Delivery = _Delivery.ANSWER
    entry: _Entry | None = None


@dataclass
class _Entry:
    method: str
    path: str
    route: str | None
    arrived_at: float
    client: str
    body: object | None
    fault: Fault | None = None
    status: int | None = None
    committed: bool = False

    def freeze(self) -> RecordedRequest:
        return RecordedRequest(
            method=self.method,
            path=self.path,
            route=self.route,
            status=self.status,
            arrived_at=self.arrived_at,
            client=self.client,
            body=self.body,
            fault=None if self.fault is None else self.fault.value,
            committed=self.committed,
        )


@dataclass
class _Scripted:
    fault: Fault
    route: str | None
    remaining: int


# One encoder for every reply (what ``json.dumps`` with these options builds on each call).
_encode_json = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode


def _json_reply(status: int, payload: object, headers: Iterable[tuple[str, str]] = ()) -> _Reply:
    encoded = _encode_json(payload).encode("utf-8")
    return _Reply(
        status,
        [
            ("content-length", str(len(encoded))),
            ("content-type", "application/json"),
            *headers,
        ],
        encoded,
    )


def _with_entry(reply: _Reply, entry: _Entry | None) -> _Reply:
    reply.entry = entry
    return reply


def _detail(status: int, text: str) -> _Reply:
    return _json_reply(status, {"detail": text})


_PROXY_PAGES = {
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


def _proxy_reply(status: int) -> _Reply:
    title = f"{status} {_PROXY_PAGES[status]}"
    page = (
        "<!DOCTYPE html>\n<html><head><title>"
        f"{title}</title></head>\n<body><h1>{title}</h1>\n"
        "<p>The service is not available right now. Please try again shortly.</p>\n"
        "</body></html>\n"
    ).encode()
    return _Reply(
        status,
        [("content-length", str(len(page))), ("content-type", "text/html; charset=utf-8")],
        page,
    )


def _current_loop() -> object:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        trio = importlib.import_module("trio")
        token: object = trio.lowlevel.current_trio_token()
        return token


class _SimulatedReset(ConnectionResetError):
    """Raised by the ASGI app to make the server drop a connection mid-response."""


class _DropSimulatedResets(logging.Filter):
    """Keep the server's error log free of the fake's own simulated connection resets."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, _SimulatedReset)


# --------------------------------------------------------------------------------------------
# The fake
# --------------------------------------------------------------------------------------------

RateSetting = tuple[int, float] | None


def _check_rate_setting(name: str, value: RateSetting) -> RateSetting:
    if value is None:
        return None
    amount, seconds = value
    if int(amount) != amount or amount < 1 or seconds <= 0:
        raise ConfigurationError(
            f"{name} must be None or (count >= 1, window seconds > 0), got {value!r}"
        )
    return int(amount), float(seconds)


class FakeDirectory:
    """An in-memory Hospital Directory API that behaves like the real one, faults included.

    Everything is thread-safe: the served app runs on another thread than the test.

    Args:
        create_latency: Seconds each create sleeps after the batch-cap check and before it
            commits; 5.0 reproduces the real service.
        create_rate: ``(count, window seconds)`` for creates, or ``None`` for no limit.
        other_rate: The same for every other endpoint path, each path with its own budget.
        root_rate: The same for ``GET /``.
        batch_cap: The most hospitals one batch may hold (checked before the latency).
        max_hospitals: Storage size; beyond it the oldest hospitals are dropped.
        max_concurrent_creates: How many creates may be in their latency phase at once (per
            event loop); the others wait their turn.
        max_log: How many requests the log keeps (`requests`, `creates`, ``GET
            /__fake__/state``); beyond it the oldest are dropped, so a long-running fake keeps
            a bounded memory. ``None`` keeps every request.
        faults: Random faults and latency jitter, see `Faults`.
        seed: Seeds the random fault generator; ``None`` picks one (see `seed`).
        clock: Monotonic seconds, for the rate windows and request arrival times.
        now: The current local time, for ``created_at`` (made naive if it is not).

    Raises:
        ConfigurationError: A setting has a wrong value.
    """

    def __init__(
        self,
        *,
        create_latency: float = 0.0,
        create_rate: RateSetting = (30, 60.0),
        other_rate: RateSetting = (50, 60.0),
        root_rate: RateSetting = (100, 60.0),
        batch_cap: int = 20,
        max_hospitals: int = 10_000,
        max_concurrent_creates: int = 40,
        max_log: int | None = 100_000,
        faults: Faults | None = None,
        seed: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        now: Callable[[], datetime] = datetime.now,
    ) -> None:
        if create_latency < 0:
            raise ConfigurationError("create_latency must be >= 0")
        if batch_cap < 0:
            raise ConfigurationError("batch_cap must be >= 0")
        if max_hospitals < 1:
            raise ConfigurationError("max_hospitals must be >= 1")
        if max_concurrent_creates < 1:
            raise ConfigurationError("max_concurrent_creates must be >= 1")
        if max_log is not None and max_log < 1:
            raise ConfigurationError("max_log must be None or >= 1")
        self._create_latency = float(create_latency)
        self._rates: dict[str, RateSetting] = {
            "create": _check_rate_setting("create_rate", create_rate),
            "other": _check_rate_setting("other_rate", other_rate),
            "root": _check_rate_setting("root_rate", root_rate),
        }
        self._batch_cap = batch_cap
        self._max_hospitals = max_hospitals
        self._max_concurrent = max_concurrent_creates
        self._initial_faults = faults if faults is not None else Faults()
        self._seed = seed if seed is not None else secrets.randbits(32)
        self._clock = clock
        self._now = now

        self._lock = threading.Lock()
        self._slots: weakref.WeakKeyDictionary[object, anyio.Semaphore] = (
            weakref.WeakKeyDictionary()
        )
        self._strong_slots: dict[object, anyio.Semaphore] = {}
        self._faults = self._initial_faults
        self._rng = random.Random(self._seed)
        self._script: list[_Scripted] = []
        self._max_log = max_log
        self._log: deque[_Entry] = deque(maxlen=max_log)
        self._logged = 0
        self._store: dict[int, StoredHospital] = {}
        # Batch id -> the ids of its stored hospitals, oldest first (dict keys as an ordered
        # set). Kept in step with ``_store`` by `_add_locked` and `_drop_locked`, so batch
        # operations cost O(batch) instead of a scan of the storage.
        self._batches: dict[str, dict[int, None]] = {}
        self._next_id = 1
        self._oldest_id = 1  # no stored hospital has a smaller id (see `_oldest_locked`)
        self._windows: dict[tuple[str, str, str], tuple[float, int]] = {}
        self._generation = 0
        self._in_flight = 0
        self._peak_in_flight = 0

    # ---------------------------------------------------------------------------- settings

    @property
    def seed(self) -> int:
        """The seed of the random fault generator (print it when a seeded test fails)."""
        return self._seed

    @property
    def faults(self) -> Faults:
        """The random faults in force; assign a new `Faults` to change them at run time."""
        with self._lock:
            return self._faults

    @faults.setter
    def faults(self, value: Faults) -> None:
        if not isinstance(value, Faults):
            raise ConfigurationError("faults must be a Faults instance")
        with self._lock:
            self._faults = value

    @property
    def create_latency(self) -> float:
        """Seconds each create spends between its batch-cap check and its commit."""
        return self._create_latency

    def inject(self, fault: Fault | str, *, route: str | None = "create", times: int = 1) -> None:
        """Script a fault for the next matching requests; it takes precedence over random ones.

        Args:
            fault: The fault (or its value, e.g. ``"timeout_after_commit"``).
            route: The route name it applies to (see `Faults.routes`); ``None`` for any
                request, even a redirect or an unknown path.
            times: How many matching requests it hits.

        Raises:
            ConfigurationError: An unknown fault or route, or ``times`` below 1.
        """
        try:
            kind = Fault(fault)
        except ValueError:
            raise ConfigurationError(
                f"unknown fault {fault!r}; known: {[f.value for f in Fault]}"
            ) from None
        if route is not None and route not in ROUTE_NAMES:
            raise ConfigurationError(f"unknown route {route!r}; known: {sorted(ROUTE_NAMES)}")
        if times < 1:
            raise ConfigurationError("times must be >= 1")
        with self._lock:
            self._script.append(_Scripted(kind, route, times))

    # ---------------------------------------------------------------------------- inspection

    @property
    def hospitals(self) -> list[StoredHospital]:
        """A snapshot of every stored hospital, oldest first."""
        with self._lock:
            return list(self._store.values())

    def hospital(self, hospital_id: int) -> StoredHospital | None:
        """Return the stored hospital with this id, or ``None``."""
        with self._lock:
            return self._store.get(hospital_id)

    def batch(self, batch_id: str | UUID) -> list[StoredHospital]:
        """Return the hospitals of one batch (matched case-insensitively), oldest first.

        Raises:
            ValueError: ``batch_id`` is not a UUID.
        """
        key = str(UUID(str(batch_id)))
        with self._lock:
            return self._members_locked(key)

    @property
    def requests(self) -> list[RecordedRequest]:
        """A snapshot of the recorded requests, in arrival order.

        The log keeps the last ``max_log`` requests (see `FakeDirectory`); `requests_dropped`
        says how many older ones were dropped.
        """
        with self._lock:
            return [entry.freeze() for entry in self._log]

    def creates(self) -> list[RecordedRequest]:
        """Return the recorded requests that reached the create route (``POST /hospitals/``).

        Like `requests`, only what the log keeps.
        """
        with self._lock:
            return [entry.freeze() for entry in self._log if entry.route == "create"]

    @property
    def max_log(self) -> int | None:
        """How many requests the log keeps (``None``: every request)."""
        return self._max_log

    @property
    def requests_dropped(self) -> int:
        """How many recorded requests the log dropped to stay within ``max_log``."""
        with self._lock:
            return self._logged - len(self._log)

    def duplicates(self) -> list[list[StoredHospital]]:
        """Return groups of stored hospitals sharing (name, address, phone, batch id).

        An empty list means no duplicates. Groups are ordered by their first hospital's id.
        """
        groups: dict[tuple[str, str, str | None, str | None], list[StoredHospital]] = {}
        for h in self.hospitals:
            key = (h.name, h.address, h.phone, h.creation_batch_id)
            groups.setdefault(key, []).append(h)
        return [group for group in groups.values() if len(group) > 1]

    @property
    def creates_in_flight(self) -> int:
        """How many creates are in their latency phase right now."""
        with self._lock:
            return self._in_flight

    @property
    def peak_creates_in_flight(self) -> int:
        """The most creates ever in their latency phase at once (since the last `reset`)."""
        with self._lock:
            return self._peak_in_flight

    def restart(self) -> None:
        """Simulate a service restart.

        The stored hospitals are lost, ids restart at 1 and rate windows are cleared. The
        request log, the faults and the script are kept. Creates in their latency phase are
        lost; their connections break.
        """
        with self._lock:
            self._restart_locked()

    def reset(self) -> None:
        """Make the fake as new, as if just constructed.

        A `restart`, plus an empty request log, no scripted faults, the constructor's faults,
        the generator reseeded with `seed`, and `peak_creates_in_flight` counted afresh.
        """
        with self._lock:
            self._restart_locked()
            self._log.clear()
            self._logged = 0
            self._script.clear()
            self._faults = self._initial_faults
            self._rng = random.Random(self._seed)
            self._peak_in_flight = self._in_flight

    def _restart_locked(self) -> None:
        self._store.clear()
        self._batches.clear()
        self._next_id = 1
        self._oldest_id = 1
        self._windows.clear()
        self._generation += 1

    # ---------------------------------------------------------------------------- front ends

    def transport(self, client_address: str = "127.0.0.1") -> httpx.AsyncBaseTransport:
        """Return an httpx transport that calls this fake directly, with no sockets.

        Faults become httpx exceptions (`httpx.ConnectError`, `httpx.ReadTimeout`,
        `httpx.ReadError`) carrying the request. Use it as
        ``httpx.AsyncClient(transport=fake.transport(), base_url="http://fake")``.

        Args:
            client_address: The client address the fake sees (rate limits are per address).
        """
        return _InProcessTransport(self, client_address)

    async def app(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The fake as an ASGI 3 application (for uvicorn or `httpx.ASGITransport`).

        Args:
            scope: The ASGI connection scope.
            receive: The ASGI receive channel.
            send: The ASGI send channel.
        """
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        body = await _read_body(receive)
        if body is None:
            return
        host: bytes | None = None
        content_type: bytes | None = None
        for key, value in scope.get("headers", ()):
            name = key.lower()  # the same as decoding first: only ASCII folds to these names
            if name == b"host":
                host = value
            elif name == b"content-type":
                content_type = value
        client = scope.get("client")
        if host is None:
            server = scope.get("server")
            host = f"{server[0]}:{server[1]}".encode("latin-1") if server else b"127.0.0.1"
        request = _Request(
            method=scope["method"],
            path=scope["path"],
            query=scope.get("query_string", b"").decode("latin-1"),
            scheme=scope.get("scheme", "http"),
            host=host.decode("latin-1"),
            content_type=None if content_type is None else content_type.decode("latin-1"),
            body=body,
            client=client[0] if client else "unknown",
        )
        reply = await self._dispatch(request)
        if reply.delivery is _Delivery.REFUSE:
            reply = _with_entry(_proxy_reply(502), reply.entry)
        if reply.delivery is _Delivery.ANSWER:
            self._finish(reply, reply.status)
            await _send_reply(send, reply)
        elif reply.delivery is _Delivery.HANG:
            if await _wait_for_disconnect(receive, self.faults.hang):
                return
            late = _proxy_reply(504)
            self._finish(reply, late.status)
            await _send_reply(send, late)
        else:  # BREAK
            await _send_broken_reply(send, reply)

    # ---------------------------------------------------------------------------- core

    def _finish(self, reply: _Reply, status: int | None) -> None:
        if reply.entry is not None:
            with self._lock:
                reply.entry.status = status

    async def _dispatch(self, req: _Request) -> _Reply:
        if req.path == _CONTROL_PREFIX or req.path.startswith(_CONTROL_PREFIX + "/"):
            return self._control(req)
        route, params, partial = _match(req.method, req.path)
        with self._lock:
            entry = _Entry(
                method=req.method,
                path=req.path,
                route=route.name if route else None,
                arrived_at=self._clock(),
                client=req.client,
                body=_log_body(req),
            )
            self._log.append(entry)
            self._logged += 1
            entry.fault = fault = self._pick_fault_locked(entry.route)
        if fault is Fault.DOWN:
            return _Reply(502, [], delivery=_Delivery.REFUSE, entry=entry)
        if fault is Fault.ERROR:
            return _with_entry(_proxy_reply(503), entry)
        if fault is Fault.REJECT:
            item = {
                "type": "value_error",
                "loc": ["body"],
                "msg": "Value error, refused by the fake upstream (Fault.REJECT)",
                "input": _log_body(req),
            }
            return _with_entry(_json_reply(422, {"detail": [item]}), entry)
        if fault is Fault.RATE_LIMIT:
            kind = route.kind if route else "other"
            amount, seconds = self._rates[kind] or _CONTRACT_RATES[kind]
            return _with_entry(self._too_many(amount, seconds), entry)
        reply = await self._route(req, route, params, partial, entry)
        reply.entry = entry
        if reply.delivery is _Delivery.ANSWER:
            if fault is Fault.TIMEOUT_AFTER_COMMIT:
                reply.delivery = _Delivery.HANG
            elif fault is Fault.RESET_AFTER_COMMIT:
                reply.delivery = _Delivery.BREAK
        return reply

    def _pick_fault_locked(self, route: str | None) -> Fault | None:
        faults = self._faults
        if faults.down:
            return Fault.DOWN
        for index, scripted in enumerate(self._script):
            if scripted.route is None or scripted.route == route:
                scripted.remaining -= 1
                if scripted.remaining <= 0:
                    del self._script[index]
                return scripted.fault
        if route is None:
            return None
        eligible = faults.routes if faults.routes is not None else MUTATING_ROUTES
        if route not in eligible:
            return None
        chances = (
            (Fault.ERROR, faults.error_rate),
            (Fault.TIMEOUT_AFTER_COMMIT, faults.timeout_after_commit_rate),
            (Fault.RESET_AFTER_COMMIT, faults.reset_after_commit_rate),
            (Fault.RATE_LIMIT, faults.rate_limit_rate),
        )
        if not any(rate for _, rate in chances):
            return None
        draw = self._rng.random()
        threshold = 0.0
        for fault, rate in chances:
            threshold += rate
            if draw < threshold:
                return fault
        return None

    def _too_many(self, amount: int, seconds: float) -> _Reply:
        return _json_reply(
            429, {"error": f"Rate limit exceeded: {_describe_rate(amount, seconds)}"}
        )

    def _hit_locked(self, kind: str, client: str, path: str, now: float) -> _Reply | None:
        """Count one hit; return the 429 reply when the window is already full."""
        setting = self._rates[kind]
        if setting is None:
            return None
        amount, seconds = setting
        key = (kind, client, path)
        start, count = self._windows.get(key, (now, 0))
        if now - start >= seconds:
            start, count = now, 0
        if count >= amount:
            return self._too_many(amount, seconds)
        if len(self._windows) > 50_000:
            self._prune_windows_locked(now)
        self._windows[key] = (start, count + 1)
        return None

    def _prune_windows_locked(self, now: float) -> None:
        for key, (start, _) in list(self._windows.items()):
            setting = self._rates[key[0]]
            if setting is None or now - start >= setting[1]:
                del self._windows[key]

    async def _route(
        self,
        req: _Request,
        route: _Route | None,
        params: dict[str, str],
        partial: _Route | None,
        entry: _Entry,
    ) -> _Reply:
        if route is None:
            if partial is not None:
                return _json_reply(
                    405, {"detail": "Method Not Allowed"}, [("allow", partial.method)]
                )
            if req.path != "/":
                toggled = req.path.rstrip("/") if req.path.endswith("/") else req.path + "/"
                if _path_exists(toggled):
                    location = f"{req.scheme}://{req.host}{toggled}"
                    if req.query:
                        location += f"?{req.query}"
                    return _Reply(307, [("content-length", "0"), ("location", location)])
            return _detail(404, "Not Found")

        errors: list[dict[str, Any]] = []
        hospital_id: int | None = None
        batch_id: str | None = None
        if "hospital_id" in params:
            hospital_id = _param(_INT, "hospital_id", params["hospital_id"], errors)
        if "batch_id" in params:
            parsed = _param(_UUID, "batch_id", params["batch_id"], errors)
            batch_id = None if parsed is None else str(parsed)
        create: _HospitalCreateBody | None = None
        update: _HospitalUpdateBody | None = None
        if route.name in ("create", "update"):
            value = _body_value(req, errors)
            if value is not None:
                model = _HospitalCreateBody if route.name == "create" else _HospitalUpdateBody
                try:
                    validated = model.model_validate(value)
                except ValidationError as exc:
                    errors.extend(_error_items(exc, ("body",)))
                else:
                    if isinstance(validated, _HospitalCreateBody):
                        create = validated
                    else:
                        update = validated
        if errors:
            return _json_reply(422, {"detail": errors})

        with self._lock:
            limited = self._hit_locked(route.kind, req.client, req.path, entry.arrived_at)
        if limited is not None:
            return limited

        if create is not None:
            return await self._create(create, entry)
        with self._lock:
            return self._handle_locked(route.name, hospital_id, batch_id, update, entry)

    def _handle_locked(
        self,
        name: str,
        hospital_id: int | None,
        batch_id: str | None,
        update: _HospitalUpdateBody | None,
        entry: _Entry,
    ) -> _Reply:
        if name == "root":
            return _json_reply(200, {"status": "OK"})
        if name == "list":
            return _json_reply(200, [h.to_dict() for h in self._store.values()])
        if hospital_id is not None:
            found = self._store.get(hospital_id)
            if found is None:
                return _detail(404, "Hospital not found")
            if name == "get":
                return _json_reply(200, found.to_dict())
            if name == "delete":
                self._drop_locked(found)
                entry.committed = True
                return _Reply(204, [])
            assert update is not None
            changes: dict[str, Any] = {}
            for key in ("name", "address"):
                value = getattr(update, key)
                if key in update.model_fields_set and value is not None:
                    changes[key] = value
            if "phone" in update.model_fields_set:
                changes["phone"] = update.phone
            changed = dataclasses.replace(found, **changes)
            self._store[hospital_id] = changed
            entry.committed = True
            return _json_reply(200, changed.to_dict())
        assert batch_id is not None
        members = self._members_locked(batch_id)
        if not members:
            return _detail(404, "No hospitals found with the specified batch ID")
        if name == "batch_list":
            return _json_reply(200, [h.to_dict() for h in members])
        if name == "batch_activate":
            if any(h.active for h in members):
                return _detail(
                    400,
                    "Cannot activate batch: one or more hospitals in the batch are already active",
                )
            for h in members:
                self._store[h.id] = _activated(h)
            entry.committed = True
            return _json_reply(
                200,
                {
                    "activated_count": len(members),
                    "message": f"Activated {len(members)} hospitals in batch {batch_id}",
                },
            )
        # batch_delete
        for h in members:
            self._drop_locked(h)
        entry.committed = True
        return _json_reply(
            200,
            {
                "deleted_count": len(members),
                "message": f"Deleted {len(members)} hospitals from batch {batch_id}",
            },
        )

    async def _create(self, body: _HospitalCreateBody, entry: _Entry) -> _Reply:
        batch_id = None if body.creation_batch_id is None else str(body.creation_batch_id)
        with self._lock:
            if batch_id is not None:
                held = len(self._batches.get(batch_id, ()))
                if held >= self._batch_cap:
                    return _detail(400, f"Batch cannot exceed {self._batch_cap} hospitals")
            jitter = self._faults.latency_jitter
            delay = self._create_latency + (self._rng.uniform(0.0, jitter) if jitter else 0.0)
            generation = self._generation
        if delay > 0:
            await self._latency_phase(delay)
        with self._lock:
            if generation != self._generation:
                # The service restarted while this create was in flight: it is lost.
                return _Reply(500, [], delivery=_Delivery.BREAK)
            hospital = StoredHospital(
                id=self._next_id,
                name=body.name,
                address=body.address,
                phone=body.phone,
                creation_batch_id=batch_id,
                active=batch_id is None,
                created_at=self._now().replace(tzinfo=None),
            )
            self._next_id += 1
            self._add_locked(hospital)
            while len(self._store) > self._max_hospitals:
                self._drop_locked(self._oldest_locked())
            entry.committed = True
        return _json_reply(200, hospital.to_dict())

    def _oldest_locked(self) -> StoredHospital:
        """The oldest stored hospital (the storage must not be empty).

        Ids only grow and hospitals are stored in id order, so the oldest is the smallest id
        still stored: a cursor that only moves forward finds it in amortized O(1), where
        ``next(iter(self._store))`` would walk over the slots of every hospital dropped since
        the dict was last resized.
        """
        store = self._store
        while self._oldest_id not in store:
            self._oldest_id += 1
        return store[self._oldest_id]

    def _members_locked(self, batch_id: str) -> list[StoredHospital]:
        """The stored hospitals of a batch (a lower-case UUID string), oldest first."""
        ids = self._batches.get(batch_id)
        if not ids:
            return []
        store = self._store
        return [store[i] for i in ids]

    def _add_locked(self, hospital: StoredHospital) -> None:
        self._store[hospital.id] = hospital
        if hospital.creation_batch_id is not None:
            self._batches.setdefault(hospital.creation_batch_id, {})[hospital.id] = None

    def _drop_locked(self, hospital: StoredHospital) -> None:
        del self._store[hospital.id]
        batch_id = hospital.creation_batch_id
        if batch_id is not None:
            ids = self._batches[batch_id]
            del ids[hospital.id]
            if not ids:
                del self._batches[batch_id]

    async def _latency_phase(self, delay: float) -> None:
        async with self._slot():
            with self._lock:
                self._in_flight += 1
                self._peak_in_flight = max(self._peak_in_flight, self._in_flight)
            try:
                await anyio.sleep(delay)
            finally:
                with self._lock:
                    self._in_flight -= 1

    def _slot(self) -> anyio.Semaphore:
        loop = _current_loop()
        with self._lock:
            slots: MutableMapping[object, anyio.Semaphore] = self._slots
            try:
                semaphore = slots.get(loop)
            except TypeError:  # a loop object that cannot be weakly referenced
                slots = self._strong_slots
                semaphore = slots.get(loop)
            if semaphore is None:
                semaphore = anyio.Semaphore(self._max_concurrent)
                slots[loop] = semaphore
            return semaphore

    # ---------------------------------------------------------------------------- control

    def state(self) -> dict[str, Any]:
        """Return everything a test may inspect, as JSON-ready data.

        Keys: ``seed``, ``faults``, ``hospitals`` (in the API's shape), ``requests`` (what the
        log keeps, see ``max_log``), ``requests_dropped``, ``creates_in_flight``,
        ``peak_creates_in_flight``. This is what ``GET /__fake__/state`` answers.
        """
        return {
            "seed": self.seed,
            "faults": self.faults.to_dict(),
            "hospitals": [h.to_dict() for h in self.hospitals],
            "requests": [r.to_dict() for r in self.requests],
            "requests_dropped": self.requests_dropped,
            "creates_in_flight": self.creates_in_flight,
            "peak_creates_in_flight": self.peak_creates_in_flight,
        }

    def _control(self, req: _Request) -> _Reply:
        action = req.path[len(_CONTROL_PREFIX) :].strip("/")
        allowed = {"state": "GET", "faults": "PUT", "inject": "POST", "restart": "POST"}
        allowed["reset"] = "POST"
        if action not in allowed:
            return _detail(404, "Not Found")
        if req.method != allowed[action]:
            return _json_reply(405, {"detail": "Method Not Allowed"}, [("allow", allowed[action])])
        if action == "state":
            return _json_reply(200, self.state())
        if action == "restart":
            self.restart()
            return _json_reply(200, {"restarted": True})
        if action == "reset":
            self.reset()
            return _json_reply(200, {"reset": True})
        try:
            data = json.loads(req.body or b"{}")
            if not isinstance(data, dict):
                raise ConfigurationError("the body must be a JSON object")
            if action == "faults":
                self.faults = Faults.from_dict(data)
                return _json_reply(200, self.faults.to_dict())
            unknown = set(data) - {"fault", "route", "times"}
            if unknown:
                raise ConfigurationError(f"unknown field(s): {sorted(unknown)}")
            if "fault" not in data:
                raise ConfigurationError("'fault' is required")
            self.inject(
                data["fault"], route=data.get("route", "create"), times=data.get("times", 1)
            )
            return _json_reply(200, {"injected": data["fault"]})
        except (ValueError, TypeError) as exc:
            return _detail(400, str(exc))


# --------------------------------------------------------------------------------------------
# ASGI helpers
# --------------------------------------------------------------------------------------------


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def _read_body(receive: Receive) -> bytes | None:
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def _raw_headers(headers: list[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    return [(key.encode("latin-1"), value.encode("latin-1")) for key, value in headers]


async def _send_reply(send: Send, reply: _Reply) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": reply.status,
            "headers": _raw_headers(reply.headers),
        }
    )
    await send({"type": "http.response.body", "body": reply.body, "more_body": False})


async def _wait_for_disconnect(receive: Receive, seconds: float) -> bool:
    """Wait up to ``seconds`` for the client to go away; return whether it did."""
    with anyio.move_on_after(seconds):
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return True
    return False


async def _send_broken_reply(send: Send, reply: _Reply) -> None:
    """Send the headers and part of the body, then make the server drop the connection."""
    body = reply.body
    status = reply.status
    headers = reply.headers
    if not body:
        # A body-less answer (204) cannot be cut short: announce one byte under a 200 and
        # break before sending it. The client never sees a complete response either way.
        status = 200
        headers = [("content-length", "1"), ("content-type", "application/json")]
    await send({"type": "http.response.start", "status": status, "headers": _raw_headers(headers)})
    if body:
        await send(
            {"type": "http.response.body", "body": body[: len(body) // 2], "more_body": True}
        )
    raise _SimulatedReset("simulated connection reset after commit")


# --------------------------------------------------------------------------------------------
# In-process transport
# --------------------------------------------------------------------------------------------


class _InProcessTransport(httpx.AsyncBaseTransport):
    def __init__(self, fake: FakeDirectory, client_address: str) -> None:
        self._fake = fake
        self._client = client_address

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        body = await request.aread()
        url = request.url
        port = f":{url.port}" if url.port is not None else ""
        reply = await self._fake._dispatch(
            _Request(
                method=request.method,
                path=url.path,
                query=url.query.decode("ascii", "replace"),
                scheme=url.scheme,
                host=request.headers.get("host", f"{url.host}{port}"),
                content_type=request.headers.get("content-type"),
                body=body,
                client=self._client,
            )
        )
        if reply.delivery is _Delivery.REFUSE:
            raise httpx.ConnectError("[Errno 111] Connection refused", request=request)
        if reply.delivery is _Delivery.HANG:
            raise httpx.ReadTimeout("timed out", request=request)
        if reply.delivery is _Delivery.BREAK:
            raise httpx.ReadError("connection reset by peer", request=request)
        self._fake._finish(reply, reply.status)
        return httpx.Response(reply.status, headers=reply.headers, content=reply.body)


# --------------------------------------------------------------------------------------------
# Served by uvicorn
# --------------------------------------------------------------------------------------------


def _import_uvicorn() -> Any:
    try:
        return importlib.import_module("uvicorn")
    except ImportError as exc:
        raise ImportError(_INSTALL_HINT) from exc


class FakeServer:
    """Serve a `FakeDirectory` with uvicorn on loopback, in a background thread.

    Use it as a context manager (``with`` or ``async with``); it picks a free port, waits
    until the server accepts connections and stops it quickly on exit (requests still held
    by a `Fault.TIMEOUT_AFTER_COMMIT` are cancelled after about a second).

    uvicorn trusts ``X-Forwarded-For`` from 127.0.0.1, so a test can pose as several client
    addresses (each with its own rate limit budget) by sending that header.

    Args:
        fake: The fake to serve; ``None`` builds one from ``settings``.
        host: The loopback address to bind.
        port: The port; 0 picks a free one.
        log_level: The level of uvicorn's loggers. uvicorn installs no handlers (its records
            propagate to yours), and the fake's own simulated resets are not logged as errors.
        startup_timeout: Seconds to wait for the server to start.
        **settings: Keyword arguments for `FakeDirectory` when ``fake`` is ``None``.

    Raises:
        ImportError: uvicorn is not installed (``pip install "hospital-bulk[testing]"``).
        ConfigurationError: Both ``fake`` and ``settings`` were given.
    """

    def __init__(
        self,
        fake: FakeDirectory | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        log_level: str = "warning",
        startup_timeout: float = 10.0,
        **settings: Any,
    ) -> None:
        self._uvicorn = _import_uvicorn()
        if fake is not None and settings:
            raise ConfigurationError("give FakeServer either a fake or settings, not both")
        self.fake: FakeDirectory = fake if fake is not None else FakeDirectory(**settings)
        self._host = host
        self._port = port
        self._log_level = log_level
        self._startup_timeout = startup_timeout
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None
        self._filter = _DropSimulatedResets()
        self.url = ""

    @property
    def port(self) -> int:
        """The bound port (0 before `start`)."""
        return self._port

    def _launch(self) -> None:
        if self._thread is not None:
            raise RuntimeError("this FakeServer is already running")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self._host, self._port))
        except OSError:
            sock.close()
            raise
        self._socket = sock
        self._port = sock.getsockname()[1]
        self.url = f"http://{self._host}:{self._port}"
        config = self._uvicorn.Config(
            self.fake.app,
            log_level=self._log_level,
            log_config=None,
            lifespan="off",
            ws="none",
            http="h11",
            loop="asyncio",
            interface="asgi3",
            timeout_graceful_shutdown=1,
        )
        self._server = self._uvicorn.Server(config)
        logging.getLogger("uvicorn.error").addFilter(self._filter)
        self._thread = threading.Thread(
            target=self._server.run,
            kwargs={"sockets": [sock]},
            name=f"hospital-bulk-fake-{self._port}",
            daemon=True,
        )
        self._thread.start()

    def _check_started(self) -> bool:
        assert self._thread is not None
        if self._server.started:
            return True
        if not self._thread.is_alive():
            self._cleanup()
            raise RuntimeError("the fake server failed to start (see the uvicorn log)")
        return False

    def _cleanup(self) -> None:
        logging.getLogger("uvicorn.error").removeFilter(self._filter)
        if self._socket is not None:
            self._socket.close()
            self._socket = None
        self._thread = None
        self._server = None

    def start(self) -> None:
        """Start serving and wait until the server is ready.

        Raises:
            RuntimeError: It is already running, or did not start in time.
        """
        self._launch()
        deadline = time.monotonic() + self._startup_timeout
        while not self._check_started():
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the fake server did not start in time")
            time.sleep(0.005)

    def stop(self) -> None:
        """Stop the server and wait for its thread to end (no-op when not running)."""
        if self._thread is None:
            return
        self._server.should_exit = True
        self._thread.join(timeout=10.0)
        self._cleanup()

    async def astart(self) -> None:
        """Start serving without blocking the event loop; see `start`."""
        self._launch()
        with anyio.fail_after(self._startup_timeout):
            # uvicorn offers no event to await across threads: poll its flag.
            while not self._check_started():  # noqa: ASYNC110
                await anyio.sleep(0.005)

    async def astop(self) -> None:
        """Stop the server without blocking the event loop; see `stop`."""
        thread = self._thread
        if thread is None:
            return
        self._server.should_exit = True
        with anyio.move_on_after(10.0):
            while thread.is_alive():  # noqa: ASYNC110
                await anyio.sleep(0.01)
        thread.join(timeout=0.1)
        self._cleanup()

    def __enter__(self) -> FakeServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def __aenter__(self) -> FakeServer:
        await self.astart()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.astop()


def serve(
    fake: FakeDirectory,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
    http: str = "auto",
) -> None:
    """Serve ``fake`` in the foreground until interrupted (what the command line runs).

    Args:
        fake: The fake to serve.
        host: The address to bind.
        port: The port to bind.
        log_level: uvicorn's log level. Above ``"info"`` uvicorn's access log is switched
            off (it would print nothing), which saves its work on every request.
        http: uvicorn's HTTP implementation: ``"auto"`` (httptools when installed, else
            h11), ``"h11"`` or ``"httptools"``.

    Raises:
        ImportError: uvicorn is not installed (``pip install "hospital-bulk[testing]"``).
    """
    uvicorn = _import_uvicorn()
    logging.getLogger("uvicorn.error").addFilter(_DropSimulatedResets())
    with contextlib.suppress(KeyboardInterrupt):
        uvicorn.run(
            fake.app,
            host=host,
            port=port,
            log_level=log_level,
            access_log=_logs_access(log_level),
            http=http,
            lifespan="off",
            ws="none",
            interface="asgi3",
            timeout_graceful_shutdown=1,
        )


def _logs_access(log_level: str | int) -> bool:
    """Whether uvicorn's access log (records at INFO) can print anything at ``log_level``."""
    if isinstance(log_level, str):
        level = logging.getLevelName(log_level.upper())
        if not isinstance(level, int):  # uvicorn's own "trace", or a name it will reject
            return True
    else:
        level = log_level
    return level <= logging.INFO
