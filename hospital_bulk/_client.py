"""`HospitalDirectoryClient`: the Hospital Directory API, exactly as it behaves.

One method per endpoint of the upstream contract, on pooled `httpx.AsyncClient`s (at most 8
connections each, see `_lane_limits`), with the exact paths (a trailing slash on
``/hospitals/`` only), redirects off, and every failure turned into one exception of the
library's tree carrying the request's outcome class:

| what happened                                           | exception               | outcome      |
|---------------------------------------------------------|-------------------------|--------------|
| connect error or timeout, pool timeout, bad URL         | `RequestNotSentError`   | not sent     |
| 2xx                                                     | (the parsed result)     | applied      |
| 400, 404, 405, 409, 422, other 4xx; a 3xx redirect      | `RejectedError` family  | rejected     |
| 429                                                     | `RateLimitedError`      | rate limited |
| read/write timeout, reset, broken response, 5xx         | `AmbiguousOutcomeError` | ambiguous    |
| 2xx whose body does not parse                           | `ContractError`         | ambiguous    |

A write error or write timeout counts as ambiguous, not as "not sent": part of the request may
have reached the upstream, and the library never guesses in the direction that can duplicate.
"""

from __future__ import annotations

import email.utils
import logging
import os
import re
import select
import ssl
import time
from collections.abc import Iterable
from types import TracebackType
from typing import Any, Final, Protocol, TypeVar
from uuid import UUID

import anyio
import certifi
import httpcore
import httpx
from pydantic import TypeAdapter, ValidationError

from ._exceptions import (
    AmbiguousOutcomeError,
    BatchAlreadyActiveError,
    BatchFullError,
    BatchNotFoundError,
    ConfigurationError,
    ContractError,
    HospitalNotFoundError,
    Outcome,
    RateLimitedError,
    RejectedError,
    RequestNotSentError,
    UpstreamError,
    UpstreamValidationError,
)
from ._models import BatchActivation, BatchDeletion, Hospital, HospitalCreate, HospitalUpdate

__all__ = ["HospitalDirectoryClient"]

logger = logging.getLogger("hospital_bulk.client")

_T = TypeVar("_T")

_HOSPITAL: Final = TypeAdapter(Hospital)
_HOSPITAL_LIST: Final = TypeAdapter(list[Hospital])
_ACTIVATION: Final = TypeAdapter(BatchActivation)
_DELETION: Final = TypeAdapter(BatchDeletion)
# Exceptions raised before any byte of the request can have reached the upstream.
_NOT_SENT_ERRORS: Final = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.PoolTimeout,
    httpx.UnsupportedProtocol,
    httpx.LocalProtocolError,
    httpx.ProxyError,
)
_WINDOW_RE: Final = re.compile(r"(\d+)\s+per\s+(\d+)?\s*(second|minute|hour|day)", re.IGNORECASE)
_UNIT_SECONDS: Final = {"second": 1.0, "minute": 60.0, "hour": 3600.0, "day": 86400.0}
_DETAIL_LIMIT: Final = 500
# Connections per httpx pool; a larger `limits.max_connections` is spread over several pools.
LANE_CONNECTIONS: Final = 8


class HospitalDirectoryClient:
    """An async client for the Hospital Directory API.

    Use it as an async context manager (or call `aclose`). Every method either returns the
    upstream's parsed answer or raises an `UpstreamError` subclass whose `outcome` says what is
    known about the request's effect.

    Example:
        ```python
        async with HospitalDirectoryClient("http://127.0.0.1:8000") as client:
            hospital = await client.create_hospital(
                HospitalCreate(name="St. Mary", address="1 Main St")
            )
        ```

    Args:
        base_url: The API's base URL, e.g. ``"https://hospital-directory.onrender.com"``; a
            path prefix is kept (``"https://host/api"`` sends to ``/api/hospitals/``).
        timeout: The read timeout in seconds (default 30, well above the upstream's 5 s
            creates), or a complete `httpx.Timeout`.
        connect_timeout: The connect timeout in seconds, when `timeout` is a number.
        headers: Extra headers sent with every request (e.g. an API key). Never logged.
        auth: An httpx authentication (e.g. ``("user", "secret")`` or an `httpx.Auth`).
        limits: Connection limits in all (default 40 connections), spread over httpx
            clients of at most 8 connections each: one large httpx pool costs more CPU per
            request the more connections it holds.
        transport: An httpx transport to send through instead of the network (for example
            the fake upstream's `hospital_bulk.testing.FakeDirectory.transport`).
        http_client: A ready `httpx.AsyncClient` to use as it is. Its base URL is ignored,
            its redirects must be off, and it is not closed by `aclose`.

    Raises:
        ConfigurationError: The base URL is not an absolute http(s) URL, or a timeout is not
            positive.
    """

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float | httpx.Timeout = 30.0,
        connect_timeout: float = 10.0,
        headers: dict[str, str] | None = None,
        auth: httpx.Auth | tuple[str, str] | None = None,
        limits: httpx.Limits | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        self._base_url = _check_base_url(base_url)
        self._timeout = _make_timeout(timeout, connect_timeout)
        if http_client is not None:
            if http_client.follow_redirects:
                raise ConfigurationError(
                    "http_client must not follow redirects: a redirect from the Hospital "
                    "Directory API means a wrong path and must be seen, not followed"
                )
            self._lanes = [http_client]
            self._owns_http = False
        else:
            limits = limits or httpx.Limits(max_connections=40, max_keepalive_connections=40)
            lanes = _lane_limits(limits) if transport is None else [limits]
            # One TLS context for every lane: each costs tens of milliseconds to load.
            verify: ssl.SSLContext | bool = _default_ssl_context() if len(lanes) > 1 else True
            self._lanes = [
                httpx.AsyncClient(
                    base_url=self._base_url,
                    timeout=self._timeout,
                    headers=headers,
                    auth=auth,
                    limits=lane,
                    verify=verify,
                    transport=transport,
                    follow_redirects=False,
                )
                for lane in lanes
            ]
            if transport is None:
                for lane_client in self._lanes:
                    _check_idle_connections_cheaply(lane_client)
            self._owns_http = True
        self._busy = [0] * len(self._lanes)
        self._warm_lock = anyio.Lock()
        self._warm_at: float | None = None

    @property
    def base_url(self) -> str:
        """The API's base URL, without a trailing slash."""
        return self._base_url

    async def __aenter__(self) -> HospitalDirectoryClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool (unless the `httpx.AsyncClient` was injected)."""
        if self._owns_http:
            for lane in self._lanes:
                await lane.aclose()

    # -- endpoints -------------------------------------------------------------------------

    async def health(self, *, timeout: float | None = None) -> bool:
        """Check that the service answers (`GET /`).

        Args:
            timeout: A timeout for this call only, in seconds (e.g. a long one to wake up a
                sleeping deployment).

        Returns:
            True when the upstream answered ``{"status": "OK"}``.

        Raises:
            UpstreamError: The request failed; see its `outcome`.
        """
        response = await self._request("GET", "/", timeout=timeout)
        body = _json_or_none(response)
        return isinstance(body, dict) and body.get("status") == "OK"

    async def warm_up(self, *, timeout: float = 120.0, fresh_for: float = 60.0) -> None:
        """Wake up the deployment with one `GET /` shared by every concurrent caller.

        The public deployment sleeps when idle and its first answer can take 25-90 s. Callers
        that arrive while a warm-up is under way wait for it instead of sending their own, and
        nothing is sent when the last successful warm-up is younger than `fresh_for` seconds.

        Args:
            timeout: How long the warm-up request may take, in seconds.
            fresh_for: How long a successful warm-up counts, in seconds.

        Raises:
            UpstreamError: The upstream did not answer.
        """
        async with self._warm_lock:
            now = time.monotonic()
            if self._warm_at is not None and now - self._warm_at < fresh_for:
                return
            await self._request("GET", "/", timeout=timeout)
            self._warm_at = time.monotonic()

    async def create_hospital(self, hospital: HospitalCreate) -> Hospital:
        """Create one hospital (`POST /hospitals/`). Not idempotent upstream.

        Args:
            hospital: The hospital to create.

        Returns:
            The created hospital (inactive when it names a batch).

        Raises:
            BatchFullError: The batch already holds the upstream's maximum of hospitals.
            UpstreamValidationError: The upstream refused the body (422).
            RateLimitedError: Over the upstream's create budget (429).
            AmbiguousOutcomeError: The hospital may or may not exist now: read the batch back
                before sending it again.
            UpstreamError: Any other failure; see its `outcome`.
        """
        body = hospital.model_dump(mode="json")
        return await self._call("POST", "/hospitals/", _HOSPITAL, json=body)

    async def list_hospitals(self) -> list[Hospital]:
        """List every hospital the upstream holds (`GET /hospitals/`, at most 10,000).

        Returns:
            Every hospital. Expensive upstream; to see a batch use `list_batch`.

        Raises:
            UpstreamError: The request failed; see its `outcome`.
        """
        return await self._call("GET", "/hospitals/", _HOSPITAL_LIST)

    async def get_hospital(self, hospital_id: int) -> Hospital:
        """Read one hospital (`GET /hospitals/{id}`).

        Args:
            hospital_id: The upstream's id.

        Returns:
            The hospital.

        Raises:
            HospitalNotFoundError: No hospital has this id.
            UpstreamError: Any other failure; see its `outcome`.
        """
        return await self._call("GET", f"/hospitals/{_int_id(hospital_id)}", _HOSPITAL)

    async def update_hospital(self, hospital_id: int, update: HospitalUpdate) -> Hospital:
        """Change a hospital's name, address or phone (`PUT /hospitals/{id}`).

        Args:
            hospital_id: The upstream's id.
            update: The fields to change; fields left ``None`` are not sent.

        Returns:
            The hospital as it is now.

        Raises:
            HospitalNotFoundError: No hospital has this id.
            UpstreamValidationError: The upstream refused the body (422).
            UpstreamError: Any other failure; see its `outcome`.
        """
        body = update.model_dump(mode="json", exclude_none=True)
        path = f"/hospitals/{_int_id(hospital_id)}"
        return await self._call("PUT", path, _HOSPITAL, json=body)

    async def delete_hospital(self, hospital_id: int) -> None:
        """Delete one hospital (`DELETE /hospitals/{id}`, 204 upstream).

        Args:
            hospital_id: The upstream's id.

        Raises:
            HospitalNotFoundError: No hospital has this id.
            UpstreamError: Any other failure; see its `outcome`.
        """
        await self._request("DELETE", f"/hospitals/{_int_id(hospital_id)}")

    async def list_batch(self, batch_id: UUID | str) -> list[Hospital]:
        """List the hospitals of one batch (`GET /hospitals/batch/{batch_id}`).

        The upstream answers 404 for an empty or unknown batch; this returns ``[]`` then.

        Args:
            batch_id: The batch id, as a `uuid.UUID` or a string in any case.

        Returns:
            The batch's hospitals, possibly none.

        Raises:
            ConfigurationError: `batch_id` is not a UUID.
            UpstreamError: The request failed; see its `outcome`.
        """
        try:
            return await self._call("GET", f"/hospitals/batch/{_uuid(batch_id)}", _HOSPITAL_LIST)
        except BatchNotFoundError:
            return []

    async def activate_batch(self, batch_id: UUID | str) -> BatchActivation:
        """Activate every hospital of a batch (`PATCH /hospitals/batch/{batch_id}/activate`).

        All or nothing upstream, and not idempotent: a second activation is refused.

        Args:
            batch_id: The batch id, as a `uuid.UUID` or a string in any case.

        Returns:
            The upstream's count of activated hospitals.

        Raises:
            ConfigurationError: `batch_id` is not a UUID.
            BatchNotFoundError: The batch is empty or unknown.
            BatchAlreadyActiveError: One or more hospitals of the batch are already active.
            AmbiguousOutcomeError: The activation may have happened: read the batch back.
            UpstreamError: Any other failure; see its `outcome`.
        """
        path = f"/hospitals/batch/{_uuid(batch_id)}/activate"
        return await self._call("PATCH", path, _ACTIVATION)

    async def delete_batch(self, batch_id: UUID | str) -> BatchDeletion:
        """Delete every hospital of a batch (`DELETE /hospitals/batch/{batch_id}`).

        Args:
            batch_id: The batch id, as a `uuid.UUID` or a string in any case.

        Returns:
            The upstream's count of deleted hospitals.

        Raises:
            ConfigurationError: `batch_id` is not a UUID.
            BatchNotFoundError: The batch is empty or unknown.
            UpstreamError: Any other failure; see its `outcome`.
        """
        path = f"/hospitals/batch/{_uuid(batch_id)}"
        return await self._call("DELETE", path, _DELETION)

    # -- plumbing --------------------------------------------------------------------------

    async def _request(
        self,
        method: str,
        path: str,
        *,
        json: dict[str, Any] | None = None,
        timeout: float | None = None,
    ) -> httpx.Response:
        started = time.perf_counter()
        extensions = {} if timeout is None else {"timeout": httpx.Timeout(timeout).as_dict()}
        lane = self._least_busy_lane()
        http = self._lanes[lane]
        self._busy[lane] += 1
        try:
            request = http.build_request(method, path, json=json, extensions=extensions)
            response = await http.send(request)
        except _NOT_SENT_ERRORS as exc:
            logger.debug("%s %s not sent: %s", method, path, type(exc).__name__)
            raise RequestNotSentError(
                f"the request was not sent: {_describe(exc)}",
                method=method,
                path=path,
                outcome=Outcome.NOT_SENT,
            ) from exc
        except httpx.InvalidURL as exc:
            raise RequestNotSentError(
                f"the request was not sent: invalid URL: {exc}",
                method=method,
                path=path,
                outcome=Outcome.NOT_SENT,
            ) from exc
        except httpx.HTTPError as exc:
            logger.debug("%s %s ambiguous: %s", method, path, type(exc).__name__)
            raise AmbiguousOutcomeError(
                f"no complete answer: {_describe(exc)}; the request may have taken effect",
                method=method,
                path=path,
                outcome=Outcome.AMBIGUOUS,
            ) from exc
        finally:
            self._busy[lane] -= 1
        if logger.isEnabledFor(logging.DEBUG):
            elapsed = (time.perf_counter() - started) * 1000
            logger.debug("%s %s -> %d in %.1f ms", method, path, response.status_code, elapsed)
        if response.is_success:
            return response
        raise _error_for(method, path, response)

    def _least_busy_lane(self) -> int:
        busy = self._busy
        if len(busy) == 1:
            return 0
        return busy.index(min(busy))

    async def _call(
        self,
        method: str,
        path: str,
        answer: TypeAdapter[_T],
        *,
        json: dict[str, Any] | None = None,
    ) -> _T:
        response = await self._request(method, path, json=json)
        try:
            return answer.validate_json(response.content)
        except ValidationError as exc:
            raise ContractError(
                f"the upstream's {response.status_code} answer does not match its contract "
                f"({exc.error_count()} problem(s), first: {exc.errors()[0]['msg']}); "
                "the request may have taken effect",
                method=method,
                path=path,
                status_code=response.status_code,
                outcome=Outcome.AMBIGUOUS,
            ) from exc


def _check_idle_connections_cheaply(client: httpx.AsyncClient) -> None:
    """Have the client's pool check its idle connections on their cached sockets.

    Before each request, httpcore asks every idle connection of the pool whether its socket
    turned readable (the server closed it). The default network stream answers by rebuilding
    all its attributes, a system call included, each time; `_Stream` keeps the socket. The
    pool is reached through httpx's transport; when that layout is not there (another httpx
    version), nothing changes.
    """
    pool = getattr(getattr(client, "_transport", None), "_pool", None)
    if isinstance(pool, httpcore.AsyncConnectionPool):
        inner = getattr(pool, "_network_backend", None)
        if isinstance(inner, httpcore.AsyncNetworkBackend) and not isinstance(inner, _Backend):
            pool._network_backend = _Backend(inner)


class _Backend(httpcore.AsyncNetworkBackend):
    """A network backend whose streams answer ``is_readable`` from their cached socket."""

    def __init__(self, inner: httpcore.AsyncNetworkBackend) -> None:
        self._inner = inner

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        stream = await self._inner.connect_tcp(
            host, port, timeout=timeout, local_address=local_address, socket_options=socket_options
        )
        return _Stream(stream)

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        stream = await self._inner.connect_unix_socket(
            path, timeout=timeout, socket_options=socket_options
        )
        return _Stream(stream)

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class _Stream(httpcore.AsyncNetworkStream):
    """A network stream that keeps its socket, for the pool's frequent idle checks."""

    __slots__ = ("_inner", "_socket")

    def __init__(self, inner: httpcore.AsyncNetworkStream) -> None:
        self._inner = inner
        # A `socket.socket`, or asyncio's wrapper of one; either has `fileno()`.
        sock = inner.get_extra_info("socket")
        self._socket: _HasFileno | None = sock if hasattr(sock, "fileno") else None

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return await self._inner.read(max_bytes, timeout)

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        await self._inner.write(buffer, timeout)

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.AsyncNetworkStream:
        return _Stream(await self._inner.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str) -> Any:
        if info == "is_readable" and self._socket is not None:
            return _is_readable(self._socket)
        return self._inner.get_extra_info(info)


class _HasFileno(Protocol):
    def fileno(self) -> int: ...


def _is_readable(sock: _HasFileno) -> bool:
    """Whether a read would return at once (data, or the end a server's close leaves)."""
    fd = sock.fileno()
    if fd < 0:
        return True
    if hasattr(select, "poll"):
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        return bool(poller.poll(0))
    readable, _, _ = select.select([fd], [], [], 0)
    return bool(readable)


def _default_ssl_context() -> ssl.SSLContext:
    """The TLS context httpx makes by default: certifi's CAs, or ``SSL_CERT_FILE``/``_DIR``."""
    cafile = os.environ.get("SSL_CERT_FILE")
    capath = os.environ.get("SSL_CERT_DIR")
    if cafile and os.path.isfile(cafile):
        return ssl.create_default_context(cafile=cafile)
    if capath and os.path.isdir(capath):
        return ssl.create_default_context(capath=capath)
    return ssl.create_default_context(cafile=certifi.where())


def _lane_limits(limits: httpx.Limits) -> list[httpx.Limits]:
    """Split a pool's connection limits over lanes of at most `LANE_CONNECTIONS` connections.

    One httpx pool's bookkeeping costs more per request the more connections it holds (it
    scans its requests against its connections), so that many requests in flight through one
    pool spend most of their CPU there; several small pools do the same work for a fraction.
    """
    total = limits.max_connections
    if total is None or total <= LANE_CONNECTIONS:
        return [limits]
    count = -(-total // LANE_CONNECTIONS)
    keepalive = limits.max_keepalive_connections
    lanes = []
    for n in range(count):
        size = total // count + (1 if n < total % count else 0)
        lane_keepalive = None if keepalive is None else min(size, -(-keepalive // count))
        lanes.append(
            httpx.Limits(
                max_connections=size,
                max_keepalive_connections=lane_keepalive,
                keepalive_expiry=limits.keepalive_expiry,
            )
        )
    return lanes


def _check_base_url(base_url: str) -> str:
    if not isinstance(base_url, str):
        raise ConfigurationError(f"base_url must be a string, not {type(base_url).__name__}")
    try:
        url = httpx.URL(base_url)
    except httpx.InvalidURL as exc:
        raise ConfigurationError(f"base_url {base_url!r} is not a valid URL: {exc}") from exc
    if url.scheme not in ("http", "https") or not url.host:
        raise ConfigurationError(
            f"base_url {base_url!r} must be an absolute http:// or https:// URL"
        )
    return base_url.rstrip("/")


def _make_timeout(timeout: float | httpx.Timeout, connect_timeout: float) -> httpx.Timeout:
    if isinstance(timeout, httpx.Timeout):
        return timeout
    for name, value in (("timeout", timeout), ("connect_timeout", connect_timeout)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ConfigurationError(f"{name} must be a positive number of seconds, not {value!r}")
    return httpx.Timeout(timeout, connect=connect_timeout)


def _int_id(hospital_id: int) -> int:
    if isinstance(hospital_id, bool) or not isinstance(hospital_id, int):
        raise ConfigurationError(f"a hospital id is an int, not {hospital_id!r}")
    return hospital_id


def _uuid(batch_id: UUID | str) -> UUID:
    if isinstance(batch_id, UUID):
        return batch_id
    try:
        return UUID(str(batch_id))
    except ValueError as exc:
        raise ConfigurationError(f"batch id {batch_id!r} is not a UUID") from exc


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _json_or_none(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def _detail_of(response: httpx.Response) -> str | list[dict[str, Any]] | None:
    """The upstream's explanation, from any of its three error body shapes."""
    body = _json_or_none(response)
    if isinstance(body, dict):
        detail = body.get("detail", body.get("error"))
        if isinstance(detail, str):
            return detail
        if isinstance(detail, list):
            return [item if isinstance(item, dict) else {"msg": str(item)} for item in detail]
    text = response.text.strip()
    return text[:_DETAIL_LIMIT] if text else None


def _summarise_422(detail: list[dict[str, Any]]) -> str:
    parts = []
    for item in detail:
        loc = ".".join(str(part) for part in item.get("loc", ()))
        msg = item.get("msg", "invalid")
        parts.append(f"{loc}: {msg}" if loc else str(msg))
    return "; ".join(parts) or "the upstream refused the request body"


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After")
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - time.time())


def _window_of(detail: str | None) -> float | None:
    match = _WINDOW_RE.search(detail or "")
    if match is None:
        return None
    count = float(match.group(2) or 1)
    return count * _UNIT_SECONDS[match.group(3).lower()]


def _error_for(method: str, path: str, response: httpx.Response) -> UpstreamError:
    status = response.status_code
    detail = _detail_of(response)
    text = detail if isinstance(detail, str) else ""
    lowered = text.lower()
    common: dict[str, Any] = {
        "method": method,
        "path": path,
        "status_code": status,
        "detail": detail,
    }
    on_batch = path.startswith("/hospitals/batch/")
    if status == 429:
        return RateLimitedError(
            text or "rate limit exceeded",
            retry_after=_retry_after(response),
            window=_window_of(text),
            outcome=Outcome.RATE_LIMITED,
            **common,
        )
    if status >= 500:
        return AmbiguousOutcomeError(
            f"the upstream answered {status}; the request may have taken effect",
            outcome=Outcome.AMBIGUOUS,
            **common,
        )
    if 300 <= status < 400:
        location = response.headers.get("Location", "?")
        return ContractError(
            f"unexpected redirect to {location}: the path is wrong for this API",
            outcome=Outcome.REJECTED,
            **common,
        )
    if status == 422 and isinstance(detail, list):
        return UpstreamValidationError(_summarise_422(detail), outcome=Outcome.REJECTED, **common)
    if status == 404:
        if on_batch and "batch" in lowered:
            return BatchNotFoundError(text, outcome=Outcome.REJECTED, **common)
        if not on_batch and path != "/hospitals/" and "hospital not found" in lowered:
            return HospitalNotFoundError(text, outcome=Outcome.REJECTED, **common)
        return ContractError(
            f"unexpected 404 ({text or 'no detail'}): is the base URL right?",
            outcome=Outcome.REJECTED,
            **common,
        )
    if status == 400 and "cannot exceed" in lowered:
        return BatchFullError(text, outcome=Outcome.REJECTED, **common)
    if status == 400 and "already active" in lowered:
        return BatchAlreadyActiveError(text, outcome=Outcome.REJECTED, **common)
    if 400 <= status < 500:
        return RejectedError(
            text or f"the upstream refused the request ({status})",
            outcome=Outcome.REJECTED,
            **common,
        )
    return ContractError(f"unexpected status {status}", outcome=Outcome.AMBIGUOUS, **common)
