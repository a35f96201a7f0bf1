"""The bulk service as a FastAPI `APIRouter`, and a ready app (extra ``fastapi``).

`create_router` gives the endpoints of the original bulk service, to mount in your own app
(behind your authentication); `create_app` is the whole service in one line (with
``HOSPITAL_API_BASE_URL`` set to the upstream's URL):

```bash
uvicorn "hospital_bulk.integrations.fastapi:create_app" --factory
```

The endpoints, relative to the router (`create_app` mounts it under ``/api/v1``):

| method and path | answers |
|---|---|
| ``POST /hospitals/bulk`` | 202 accepted (``Location``: the status URL); 400, 409, 413, 422 |
| ``POST /hospitals/bulk/validate`` | 200 the validation report (a dry run); 400, 413 |
| ``GET /hospitals/status/{job_id}`` | 200 progress, with the report once the job ended; 404 |
| ``GET /hospitals/status/{job_id}/events`` | 200 ``text/event-stream`` until the job ends; 404 |
| ``POST /hospitals/bulk/{job_id}/resume`` | 202 started again; 404, 409 |
| ``POST /hospitals/bulk/{job_id}/rollback`` | 200 the report, ``rolled_back``; 404, 409, 502 |
| ``GET /health`` | 200 healthy, 503 not (upstream, circuit breaker, backend) |

Every error answers one envelope, `ErrorResponse`: ``{"detail": str, "error_type": str,
"job_id": str | null}``, with ``error_type`` one of ``validation_error`` (400),
``not_found`` (404), ``conflict`` (409, 422), ``payload_too_large`` (413), ``upstream_error``
(502) and ``internal_error`` (500, 503). A 400 adds ``errors`` and ``warnings``: every problem
of the file, each with its ``code``, ``row``, ``line``, ``column`` and ``message``
(`ValidationErrorResponse`). Errors raised by your own dependencies (a 401 of your
authentication) are left to your app's exception handlers.

The choices made:

* ``Idempotency-Key`` (optional unless ``require_idempotency_key``; a missing required key
  is a 400, as the IETF idempotency-key draft says): the same key with the same file answers
  the same job, again ``202``, with ``Idempotent-Replayed: true`` and the job's present status
  (a replay does not start the job again). The same key with another file answers 422; a key
  whose first submission is still creating its job answers 409 with ``Retry-After: 1``. Keys
  are scoped by tenant. The structured-field form (``"abc"``) is accepted for ``abc``; a key
  is 1 to 255 visible ASCII characters.
* ``POST /hospitals/bulk/validate`` answers 200 with ``valid: false`` and the errors for a bad
  file (a dry run that found problems did its job); 400 only for a request without a file.
* A resume is refused (409) for a job that is running, completed or rolled back; a rollback
  (409) for a running job.
* A job created but not handed to its runner (the runner failed) answers 503 with its
  ``job_id``: start it with the resume endpoint.
* The event stream of a job that has already ended is its one ``snapshot`` event.

The router runs its jobs with a `JobRunner`; by default an internal `BackgroundRunner`
entered in the router's lifespan. FastAPI runs an included router's lifespan inside the app's
(``app.include_router(router)`` merges it), so nothing more is needed; when the app shuts
down, the jobs still running are cancelled (``cancelled``, resumable). An app that cannot run
the router's lifespan (a router mounted in a Starlette app, an ASGI server with lifespan off)
should pass its own runner: ``async with BackgroundRunner() as runner:`` around the app's life.
"""

# No `from __future__ import annotations` here: FastAPI reads the endpoints' annotations at run
# time, and they name dependencies that only exist in `create_router`'s scope.

import contextlib
import logging
import os
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Coroutine, Mapping, Sequence
from datetime import datetime, timezone
from typing import Annotated, Any, Literal
from uuid import UUID

import anyio
from fastapi import APIRouter, Depends, FastAPI, File, Header, Request, Response, UploadFile
from fastapi import params as fastapi_params
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, StreamingResponse
from starlette.types import Message, Receive, Scope, Send

from .._config import Settings
from .._exceptions import (
    BackendError,
    ConfigurationError,
    CSVSourceError,
    CSVValidationError,
    HospitalBulkError,
    IdempotencyConflictError,
    IdempotencyInProgressError,
    JobNotFoundError,
    JobStateError,
    UpstreamError,
)
from .._jobs import JobResult, JobSnapshot, JobStatus, RowState, WaitReason
from .._processor import AsyncBulkProcessor
from .._validation import ValidationIssue, ValidationReport
from . import BackgroundRunner, JobRunner

__all__ = [
    "ErrorResponse",
    "ErrorType",
    "HealthResponse",
    "Issue",
    "JobAccepted",
    "JobEventData",
    "JobProgress",
    "JobStatusResponse",
    "RowPreview",
    "ValidationErrorResponse",
    "ValidationResult",
    "create_app",
    "create_router",
]

logger = logging.getLogger("hospital_bulk.integrations.fastapi")

ProcessorSource = AsyncBulkProcessor | Callable[[], AsyncBulkProcessor]

ErrorType = Literal[
    "validation_error",
    "not_found",
    "conflict",
    "payload_too_large",
    "upstream_error",
    "internal_error",
]
"""The ``error_type`` of an error envelope (`ErrorResponse`)."""

# Room in a request body for the multipart framing around the file (boundaries, part headers).
_MULTIPART_SLACK = 16 * 1024
_KEY_MAX_LENGTH = 255
_RUNNING = frozenset({JobStatus.RUNNING, JobStatus.ACTIVATING})
# How long a rollback waits for a run that has just ended to let go of its job.
_SETTLE_SECONDS = 2.0
_TAGS: list[Any] = ["hospital bulk"]


# -- response bodies -------------------------------------------------------------------------


class ErrorResponse(BaseModel):
    """The error envelope every endpoint answers with.

    Attributes:
        detail: What went wrong, for a human.
        error_type: The kind of error: ``validation_error``, ``not_found``, ``conflict``,
            ``payload_too_large``, ``upstream_error`` or ``internal_error``.
        job_id: The job concerned, when there is one (e.g. the job an idempotency key
            already stands for, or a job created but not started).
    """

    detail: str
    error_type: ErrorType
    job_id: str | None = None


class Issue(BaseModel):
    """One problem found in a CSV file.

    Attributes:
        code: The stable machine-readable code (e.g. ``missing_value``, ``too_many_rows``).
        row: The data-row number (1 = first data row), or ``None`` for a file-level problem.
        line: The physical line (1-based), or ``None`` for a problem of the whole file.
        column: The column concerned (e.g. ``name``), or ``None``.
        message: What to fix.
    """

    code: str
    row: int | None
    line: int | None
    column: str | None
    message: str


class ValidationErrorResponse(ErrorResponse):
    """The envelope of a 400: the request or its file is not acceptable.

    Attributes:
        errors: Every error of the file (empty when the request itself is malformed).
        warnings: The file's warnings (duplicate rows, neutralised formulas, ...).
    """

    errors: list[Issue] = Field(default_factory=list)
    warnings: list[Issue] = Field(default_factory=list)


class JobAccepted(BaseModel):
    """The answer to an upload (or a resume): the job is accepted and will run.

    Attributes:
        job_id: The job's id.
        status: The job's status now: ``pending`` for a new job; a replayed key answers the
            earlier job's present status.
        message: A human summary.
        total_hospitals: Rows in the job.
        idempotency_key: The key it was submitted with, or ``None``.
        replayed: True when an ``Idempotency-Key`` gave back an earlier job.
        status_url: Where to poll the job (also in the ``Location`` header).
    """

    job_id: str
    status: JobStatus
    message: str
    total_hospitals: int
    idempotency_key: str | None = None
    replayed: bool = False
    status_url: str


class RowPreview(BaseModel):
    """One valid row of a validated file.

    Attributes:
        row: The data-row number (1 = first data row).
        line: The physical line where it starts.
        name: The hospital's name, trimmed.
        address: The address, trimmed.
        phone: The phone number, or ``None``.
    """

    row: int
    line: int
    name: str
    address: str
    phone: str | None


class ValidationResult(BaseModel):
    """The report of a dry run (`POST /hospitals/bulk/validate`).

    Attributes:
        valid: Whether the file has no error.
        accepted: Whether an upload of it would be accepted (with ``skip_invalid_rows`` a file
            whose only errors are in rows is accepted; those rows are skipped).
        total_rows: The data rows seen.
        valid_rows: The rows that would be created.
        invalid_rows: The rows with an error.
        errors: Every error (up to the validator's cap; see `truncated_errors`).
        warnings: Every warning.
        truncated_errors: Errors found but not listed.
        truncated_warnings: Warnings found but not listed.
        encoding: How the file was decoded.
        columns: The header's columns, normalised.
        rows: The valid rows, as they would be sent.
    """

    valid: bool
    accepted: bool
    total_rows: int
    valid_rows: int
    invalid_rows: int
    errors: list[Issue]
    warnings: list[Issue]
    truncated_errors: int
    truncated_warnings: int
    encoding: str
    columns: list[str]
    rows: list[RowPreview]


class JobProgress(BaseModel):
    """A job's progress at one moment.

    Attributes:
        job_id: The job's id.
        status: Where the job stands.
        total_hospitals: Rows in the job.
        counts: Rows per state (every state present, zeros included).
        progress_percentage: Rows settled (created, rejected, invalid), in percent.
        processing_time_seconds: Time spent running so far, over every run.
        eta_seconds: Estimated seconds until the job ends, or ``None`` when unknown.
        waiting_for: What the job waits for now (``rate_limit``, ``breaker``, ...), or
            ``None``.
        waiting_until: Until when, when known.
        batch_ids: The job's upstream batches.
        activated_batches: The batches verified active.
        idempotency_key: The key it was submitted with, or ``None``.
        created_at: When the job was created.
        started_at: When it last started running.
        completed_at: When it last stopped (whatever the outcome).
        error: Why the job failed or is partial, or ``None``.
    """

    job_id: str
    status: JobStatus
    total_hospitals: int
    counts: dict[RowState, int]
    progress_percentage: float
    processing_time_seconds: float
    eta_seconds: float | None
    waiting_for: WaitReason | None = None
    waiting_until: datetime | None = None
    batch_ids: list[UUID]
    activated_batches: list[UUID]
    idempotency_key: str | None = None
    created_at: datetime
    started_at: datetime | None = None
    completed_at: datetime | None = None
    error: str | None = None


class JobStatusResponse(JobProgress):
    """`GET /hospitals/status/{job_id}`: the job's progress, and its report once it ended.

    Attributes:
        result: The job's report (the original service's shape) when the job has stopped,
            else ``None``.
    """

    result: JobResult | None = None


class JobEventData(BaseModel):
    """The ``data`` of one server-sent event of `GET /hospitals/status/{job_id}/events`.

    The event's name (``event:``) is its `kind`: ``snapshot`` (first), ``job_started``,
    ``row_created``, ``row_rejected``, ``row_unknown``, ``row_deferred``, ``waiting``,
    ``batch_reconciled``, ``batch_activated``, ``progress`` (a change seen in a job that runs
    in another process) and ``job_finished`` (last; the stream ends). An ``error`` event, whose
    data is an `ErrorResponse`, ends a stream that could not go on.

    Attributes:
        kind: What happened.
        job_id: The job's id.
        row: The data-row number concerned, if any.
        message: A human detail, if any.
        snapshot: The job's progress right after it happened.
        result: The job's report, in the ``job_finished`` event only.
    """

    kind: str
    job_id: str
    row: int | None = None
    message: str | None = None
    snapshot: JobProgress
    result: JobResult | None = None


class HealthResponse(BaseModel):
    """`GET /health`: whether the service can do its work.

    Healthy (200) when the upstream answers, the circuit breaker is not open and the backend
    answers; else 503 with the same body.

    Attributes:
        status: ``ok`` or ``unavailable``.
        upstream: Whether the upstream answered its health check.
        upstream_error: Why it did not, or ``None``.
        breaker: The circuit breaker's state (``closed``, ``open``, ``half_open``), when known.
        backend: ``memory`` or ``redis``, when known.
        backend_reachable: Whether the backend answers.
        running_jobs: Jobs running in this process.
        error: Why the check itself failed, or ``None``.
    """

    status: Literal["ok", "unavailable"]
    upstream: bool
    upstream_error: str | None = None
    breaker: str | None = None
    backend: str | None = None
    backend_reachable: bool
    running_jobs: int
    error: str | None = None


# -- errors ----------------------------------------------------------------------------------


class _ApiError(HTTPException):
    """An error answered in the envelope.

    An `HTTPException`, so that FastAPI lets it through when it is raised while the request
    body is read (the upload limit).
    """

    def __init__(
        self,
        status_code: int,
        error_type: ErrorType,
        detail: str,
        *,
        job_id: str | None = None,
        report: ValidationReport | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(status_code=status_code, detail=detail, headers=dict(headers or {}))
        self.error_type: ErrorType = error_type
        self.message = detail
        self.job_id = job_id
        self.report = report

    def body(self) -> ErrorResponse:
        if self.status_code == 400:
            report = self.report
            return ValidationErrorResponse(
                detail=self.message,
                error_type=self.error_type,
                job_id=self.job_id,
                errors=_issues(report.errors) if report is not None else [],
                warnings=_issues(report.warnings) if report is not None else [],
            )
        return ErrorResponse(detail=self.message, error_type=self.error_type, job_id=self.job_id)

    def response(self) -> JSONResponse:
        return JSONResponse(
            self.body().model_dump(mode="json"),
            status_code=self.status_code,
            headers=self.headers,
        )


def _api_error(exc: HospitalBulkError) -> _ApiError:
    """The envelope of one of the library's errors."""
    if isinstance(exc, CSVValidationError):
        count = len(exc.report.errors) + exc.report.truncated_errors
        return _ApiError(
            400,
            "validation_error",
            f"the CSV file has {count} error(s); nothing was created",
            report=exc.report,
        )
    if isinstance(exc, CSVSourceError):
        return _ApiError(400, "validation_error", str(exc))
    if isinstance(exc, JobNotFoundError):
        return _not_found(exc.job_id)
    if isinstance(exc, IdempotencyConflictError):
        return _ApiError(422, "conflict", str(exc), job_id=exc.job_id)
    if isinstance(exc, IdempotencyInProgressError):
        return _ApiError(409, "conflict", str(exc), job_id=exc.job_id, headers={"Retry-After": "1"})
    if isinstance(exc, JobStateError):
        return _ApiError(409, "conflict", str(exc), job_id=exc.job_id)
    if isinstance(exc, UpstreamError):
        return _ApiError(502, "upstream_error", f"the Hospital Directory API failed: {exc}")
    if isinstance(exc, BackendError):
        return _ApiError(503, "internal_error", f"the job backend failed: {exc}")
    return _ApiError(500, "internal_error", str(exc))


def _not_found(job_id: str) -> _ApiError:
    # The same answer for a job that does not exist and for another tenant's job.
    return _ApiError(404, "not_found", f"no job with id {job_id!r}")


def _malformed(exc: RequestValidationError) -> _ApiError:
    problems = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error.get("loc", ()))
        problems.append(f"{where}: {error.get('msg', 'invalid')}")
    return _ApiError(400, "validation_error", "malformed request: " + "; ".join(problems))


def _issues(issues: Sequence[ValidationIssue]) -> list[Issue]:
    return [
        Issue(code=str(i.code), row=i.row, line=i.line, column=i.column, message=i.message)
        for i in issues
    ]


_DESCRIPTIONS = {
    400: "The request or its file is not acceptable (every error of the file is listed).",
    404: "No such job (or not the caller's).",
    409: "The job's state does not allow it (running, completed, rolled back), or the "
    "Idempotency-Key's first submission is still being created (retry shortly).",
    413: "The upload is larger than the service accepts.",
    422: "The Idempotency-Key was already used for another file.",
    500: "Internal error.",
    502: "The Hospital Directory API failed.",
    503: "The job backend or the job runner is unavailable.",
}


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The ``responses=`` entries documenting error answers in the envelope.

    ``4XX`` stands for the errors of the host app's own dependencies; it also keeps FastAPI
    from documenting a 422 of its own, which these routes never answer.
    """
    responses: dict[int | str, dict[str, Any]] = {
        code: {
            "model": ValidationErrorResponse if code == 400 else ErrorResponse,
            "description": _DESCRIPTIONS[code],
        }
        for code in codes
    }
    responses["4XX"] = {
        "description": "An error of the host app's own dependencies (e.g. a 401 of its "
        "authentication), in the app's format."
    }
    return responses


# -- routes that answer in the envelope ------------------------------------------------------


class _EnvelopeRoute(APIRoute):
    """A route whose errors are answered in the envelope, with an optional body limit.

    The router cannot register exception handlers (they belong to the app), so the route
    converts the library's errors itself; `HTTPException`s of other dependencies (the host
    app's authentication) go on to the app's handlers.
    """

    body_limit: int | None = None

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        limit = self.body_limit

        async def answer_in_envelope(request: Request) -> Response:
            try:
                if limit is not None:
                    request = _limited(request, limit)
                return await handler(request)
            except _ApiError as exc:
                return exc.response()
            except RequestValidationError as exc:
                return _malformed(exc).response()
            except HospitalBulkError as exc:
                error = _api_error(exc)
                if error.status_code >= 500:
                    logger.warning("%s %s: %s", request.method, request.url.path, error.message)
                return error.response()
            except HTTPException:
                raise  # the host app's own (its authentication): its handlers answer
            except Exception as exc:
                # A bug, not a refusal: logged with its traceback, answered in the envelope
                # without its text (which could hold anything).
                logger.exception("%s %s failed", request.method, request.url.path)
                return _ApiError(
                    500, "internal_error", f"internal error ({type(exc).__name__})"
                ).response()

        return answer_in_envelope


def _too_large(limit: int) -> _ApiError:
    return _ApiError(
        413, "payload_too_large", f"the upload is larger than the {limit} bytes accepted"
    )


def _limited(request: Request, limit: int) -> Request:
    """The request, its body cut off (413) past `limit` bytes, before it is read whole."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise _too_large(limit - _MULTIPART_SLACK)
    receive = request.receive
    seen = 0

    async def receive_limited() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise _too_large(limit - _MULTIPART_SLACK)
        return message

    return Request(request.scope, receive_limited)


# -- server-sent events ----------------------------------------------------------------------


class _EventStream(StreamingResponse):
    """A ``text/event-stream`` that ends with its events, or when the client leaves.

    A comment is sent every `heartbeat` seconds without an event, so that proxies keep an
    idle stream open and a client that left is noticed.

    The media type is given to each response, not set on the class: FastAPI documents the
    route's responses in the class's media type, and the errors are JSON.
    """

    def __init__(self, events: AsyncGenerator[bytes, None], *, heartbeat: float) -> None:
        super().__init__(
            events,
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            media_type="text/event-stream",
        )
        self._events = events
        self._heartbeat = heartbeat

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        start: Message = {
            "type": "http.response.start",
            "status": self.status_code,
            "headers": self.raw_headers,
        }
        try:
            await send(start)
        except OSError:  # the client already left
            await self._events.aclose()
            return
        lock = anyio.Lock()
        closed = False
        async with anyio.create_task_group() as tg:

            async def emit(chunk: bytes, *, more: bool = True) -> None:
                nonlocal closed
                async with lock:
                    if closed:
                        return
                    closed = not more
                    try:
                        await send({"type": "http.response.body", "body": chunk, "more_body": more})
                    except OSError:  # the client left
                        closed = True
                        tg.cancel_scope.cancel()

            async def until_disconnect() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                tg.cancel_scope.cancel()

            async def heartbeat() -> None:
                while True:
                    await anyio.sleep(self._heartbeat)
                    await emit(b": keep-alive\n\n")

            tg.start_soon(until_disconnect)
            tg.start_soon(heartbeat)
            try:
                async for chunk in self._events:
                    await emit(chunk)
                await emit(b"", more=False)
            finally:
                tg.cancel_scope.cancel()
                with anyio.CancelScope(shield=True):
                    await self._events.aclose()


# One event of the stream, described as OpenAPI 3.2 describes Server-Sent Events.
_EVENT_STREAM_CONTENT: dict[str, Any] = {
    "text/event-stream": {
        "itemSchema": {
            "type": "object",
            "required": ["event", "data"],
            "properties": {
                "event": {"type": "string", "description": "The event's kind."},
                "data": {
                    "type": "string",
                    "contentMediaType": "application/json",
                    "contentSchema": {"$ref": "#/components/schemas/JobEventData"},
                },
            },
        }
    }
}


def _sse(kind: str, data: str) -> bytes:
    return f"event: {kind}\ndata: {data}\n\n".encode()


async def _event_chunks(
    processor: AsyncBulkProcessor, job_id: str, poll_interval: float
) -> AsyncGenerator[bytes, None]:
    events = processor.events(job_id, poll_interval=poll_interval)
    try:
        async for event in events:
            result = await processor.result(job_id) if event.kind == "job_finished" else None
            data = JobEventData(
                kind=event.kind,
                job_id=event.job_id,
                row=event.row,
                message=event.message,
                snapshot=_progress(event.snapshot),
                result=result,
            )
            yield _sse(event.kind, data.model_dump_json())
            if event.kind == "snapshot" and event.snapshot.status.terminal:
                # The job has ended: nothing more will come. (Followed further, a run that
                # is still winding down, its last event already sent, would keep the stream
                # open.)
                return
    except HospitalBulkError as exc:
        logger.warning("Event stream of job %s stopped: %s", job_id, exc)
        yield _sse("error", _api_error(exc).body().model_dump_json())
    finally:
        close = getattr(events, "aclose", None)
        if close is not None:
            await close()


# -- conversions ------------------------------------------------------------------------------


def _time(seconds: float | None) -> datetime | None:
    return None if seconds is None else datetime.fromtimestamp(seconds, tz=timezone.utc)


def _progress_fields(snapshot: JobSnapshot) -> dict[str, Any]:
    return {
        "job_id": snapshot.job_id,
        "status": snapshot.status,
        "total_hospitals": snapshot.total_rows,
        "counts": snapshot.counts,
        "progress_percentage": snapshot.percent,
        "processing_time_seconds": snapshot.elapsed_seconds,
        "eta_seconds": snapshot.eta_seconds,
        "waiting_for": snapshot.waiting_for,
        "waiting_until": _time(snapshot.waiting_until),
        "batch_ids": snapshot.batch_ids,
        "activated_batches": snapshot.activated_batches,
        "idempotency_key": snapshot.idempotency_key,
        "created_at": _time(snapshot.created_at),
        "started_at": _time(snapshot.started_at),
        "completed_at": _time(snapshot.finished_at),
        "error": snapshot.error,
    }


def _progress(snapshot: JobSnapshot) -> JobProgress:
    return JobProgress(**_progress_fields(snapshot))


def _parse_key(raw: str | None) -> str | None:
    """The Idempotency-Key, from its plain or structured-field (quoted) form.

    Raises:
        _ApiError: A malformed key (400).
    """
    if raw is None:
        return None
    text = raw.strip(" \t")
    bad = _ApiError(
        400,
        "validation_error",
        f"the Idempotency-Key must be 1 to {_KEY_MAX_LENGTH} visible ASCII characters, "
        'optionally as a quoted string ("abc")',
    )
    if text.startswith('"'):
        if len(text) < 2 or not text.endswith('"'):
            raise bad
        chars: list[str] = []
        escaped = False
        for char in text[1:-1]:
            if escaped:
                if char not in '"\\':
                    raise bad
                chars.append(char)
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                raise bad
            else:
                chars.append(char)
        if escaped:
            raise bad
        text = "".join(chars)
    if not text or len(text) > _KEY_MAX_LENGTH or any(not " " <= c <= "~" for c in text):
        raise bad
    return text


def _check_positive(name: str, value: Any, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        allowed = "a whole number >= 1" + (" or None" if optional else "")
        raise ConfigurationError(f"{name} must be {allowed}, not {value!r}")


def _check_seconds(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ConfigurationError(f"{name} must be a positive number of seconds, not {value!r}")


async def _rollback(processor: AsyncBulkProcessor, snapshot: JobSnapshot) -> JobResult:
    """Roll a stopped job back, waiting out the moment its last run takes to wind down.

    A run reports its job's final status a moment before it lets go of the job (its lease is
    being released); `AsyncBulkProcessor.rollback` refuses the job as running meanwhile.
    """
    job_id = snapshot.job_id
    deadline = anyio.current_time() + _SETTLE_SECONDS
    while True:
        try:
            return await processor.rollback(job_id)
        except JobStateError:
            if not snapshot.status.terminal or anyio.current_time() > deadline:
                raise
        await anyio.sleep(0.02)
        snapshot = await processor.status(job_id)


# -- the service behind the routes -----------------------------------------------------------


async def _no_tenant() -> None:
    """No tenant: every caller sees every job."""
    return None


class _Service:
    """What the routes share: the processor, the runner and the limits."""

    def __init__(
        self,
        processor: ProcessorSource,
        runner: JobRunner | None,
        *,
        tenants: bool,
        max_rows: int | None,
    ) -> None:
        if isinstance(processor, AsyncBulkProcessor):
            self._processor: AsyncBulkProcessor | None = processor
            self._factory: Callable[[], AsyncBulkProcessor] | None = None
        elif callable(processor):
            self._processor = None
            self._factory = processor
        else:
            raise ConfigurationError(
                "processor must be an AsyncBulkProcessor or a callable returning one, "
                f"not {type(processor).__name__}"
            )
        if runner is not None and not isinstance(runner, JobRunner):
            raise ConfigurationError(f"runner must be a JobRunner, not {type(runner).__name__}")
        self._runner = runner
        self._background: BackgroundRunner | None = None
        self.tenants = tenants
        self.max_rows = max_rows

    def processor(self) -> AsyncBulkProcessor:
        """The processor; a factory is called once, at first need."""
        if self._processor is None:
            assert self._factory is not None
            made = self._factory()
            if not isinstance(made, AsyncBulkProcessor):
                raise ConfigurationError(
                    f"the processor factory returned {type(made).__name__}, "
                    "not an AsyncBulkProcessor"
                )
            self._processor = made
        return self._processor

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Any) -> AsyncIterator[None]:
        """Run the internal `BackgroundRunner` (when no runner was given) for the app's life."""
        try:
            if self._runner is not None:
                yield
                return
            async with BackgroundRunner() as background:
                self._background = background
                try:
                    yield
                finally:
                    self._background = None
        finally:
            if self._factory is not None:
                # A factory's processor belongs to its owner, who may close it now: the next
                # lifespan asks the factory again.
                self._processor = None

    async def start(self, processor: AsyncBulkProcessor, job_id: str, *, resume: bool) -> None:
        """Hand a job to the runner.

        Raises:
            _ApiError: The runner failed (503, with the job's id).
        """
        runner: JobRunner | None = self._runner if self._runner is not None else self._background
        try:
            if runner is None:
                raise ConfigurationError(
                    "the router's job runner is not running: its lifespan did not run "
                    "(include the router in a FastAPI app, or pass runner=...)"
                )
            await runner.start(processor, job_id, resume=resume)
        except Exception as exc:
            # The library's messages carry no secrets; another error (a broker's) might: only
            # its type is told, its traceback logged at debug level.
            cause = str(exc) if isinstance(exc, HospitalBulkError) else type(exc).__name__
            logger.error("Job %s could not be handed to its runner: %s", job_id, cause)
            logger.debug("The runner's error", exc_info=True)
            raise _ApiError(
                503,
                "internal_error",
                f"job {job_id} could not be started ({cause}); start it with "
                f"POST .../hospitals/bulk/{job_id}/resume",
                job_id=job_id,
            ) from exc

    async def visible(
        self, processor: AsyncBulkProcessor, job_id: str, caller: str | None
    ) -> JobSnapshot:
        """The job's snapshot, if the caller may see it.

        Raises:
            _ApiError: No such job, or another tenant's (404).
        """
        snapshot = await processor.status(job_id)
        if self.tenants and snapshot.tenant != caller:
            raise _not_found(job_id)
        return snapshot

    async def health(self, response: Response) -> HealthResponse:
        try:
            info = await self.processor().health()
        except HospitalBulkError as exc:
            logger.warning("Health check failed: %s", exc)
            response.status_code = 503
            return HealthResponse(
                status="unavailable",
                upstream=False,
                backend_reachable=False,
                running_jobs=0,
                error=str(exc),
            )
        healthy = bool(info["upstream"]) and bool(info["backend_reachable"])
        healthy = healthy and info["breaker"] != "open"
        if not healthy:
            response.status_code = 503
        return HealthResponse(
            status="ok" if healthy else "unavailable",
            upstream=bool(info["upstream"]),
            upstream_error=info["upstream_error"],
            breaker=info["breaker"],
            backend=info["backend"],
            backend_reachable=bool(info["backend_reachable"]),
            running_jobs=int(info["running_jobs"]),
        )


def _build(
    processor: ProcessorSource,
    *,
    runner: JobRunner | None = None,
    dependencies: Sequence[fastapi_params.Depends] = (),
    tenant: Callable[..., Any] | None = None,
    require_idempotency_key: bool = False,
    max_upload_bytes: int = 256 * 1024,
    max_rows: int | None = 20,
    events_poll_interval: float = 0.5,
    events_heartbeat: float = 15.0,
) -> tuple[APIRouter, APIRouter]:
    """Build the router and a router holding only the health route (for `create_app`)."""
    _check_positive("max_upload_bytes", max_upload_bytes)
    _check_positive("max_rows", max_rows, optional=True)
    _check_seconds("events_poll_interval", events_poll_interval)
    _check_seconds("events_heartbeat", events_heartbeat)
    if not isinstance(require_idempotency_key, bool):
        raise ConfigurationError("require_idempotency_key must be True or False")
    if tenant is not None and not callable(tenant):
        raise ConfigurationError("tenant must be a FastAPI dependency (a callable)")
    service = _Service(processor, runner, tenants=tenant is not None, max_rows=max_rows)
    depends = [d if isinstance(d, fastapi_params.Depends) else Depends(d) for d in dependencies]
    tenant_dependency: Callable[..., Any] = tenant if tenant is not None else _no_tenant
    Caller = Annotated[str | None, Depends(tenant_dependency)]
    JobId = Annotated[str, fastapi_params.Path(description="The job's id.")]

    class UploadRoute(_EnvelopeRoute):
        body_limit = max_upload_bytes + _MULTIPART_SLACK

    router = APIRouter(
        dependencies=depends,
        route_class=_EnvelopeRoute,
        lifespan=service.lifespan,
        tags=_TAGS,
    )

    def status_url(request: Request, job_id: str) -> str:
        return str(request.url_for("hospital_bulk_status", job_id=job_id))

    async def read_upload(file: UploadFile) -> bytes:
        data = await file.read(max_upload_bytes + 1)
        if len(data) > max_upload_bytes:
            raise _too_large(max_upload_bytes)
        return data

    async def submit(
        request: Request,
        response: Response,
        file: Annotated[UploadFile, File(description="The CSV file: name,address[,phone].")],
        caller: Caller,
        idempotency_key: Annotated[
            str | None,
            Header(
                alias="Idempotency-Key",
                description="The same key with the same file gives the same job"
                + (" (required by this service)." if require_idempotency_key else "."),
            ),
        ] = None,
    ) -> JobAccepted:
        key = _parse_key(idempotency_key)
        if key is None and require_idempotency_key:
            raise _ApiError(400, "validation_error", "this service requires an Idempotency-Key")
        data = await read_upload(file)
        processor = service.processor()
        snapshot = await processor.submit(
            data, idempotency_key=key, tenant=caller, max_rows=service.max_rows
        )
        job_id = snapshot.job_id
        if snapshot.replayed:
            response.headers["Idempotent-Replayed"] = "true"
            message = "Idempotency-Key replayed: the job created earlier for this file"
            logger.info("Upload replayed: job %s (%s)", job_id, snapshot.status.value)
        else:
            await service.start(processor, job_id, resume=False)
            message = (
                f"Bulk job accepted: {snapshot.total_rows} hospital(s) in "
                f"{len(snapshot.batch_ids)} batch(es); poll the status URL"
            )
            logger.info("Upload accepted: job %s, %d row(s)", job_id, snapshot.total_rows)
        url = status_url(request, job_id)
        response.headers["Location"] = url
        return JobAccepted(
            job_id=job_id,
            status=snapshot.status,
            message=message,
            total_hospitals=snapshot.total_rows,
            idempotency_key=snapshot.idempotency_key,
            replayed=snapshot.replayed,
            status_url=url,
        )

    async def validate(
        file: Annotated[UploadFile, File(description="The CSV file: name,address[,phone].")],
    ) -> ValidationResult:
        data = await read_upload(file)
        processor = service.processor()
        report = await processor.validate(data, max_rows=service.max_rows)
        return ValidationResult(
            valid=report.ok,
            accepted=processor.accepts(report),
            total_rows=report.total_rows,
            valid_rows=len(report.rows),
            invalid_rows=report.invalid_rows,
            errors=_issues(report.errors),
            warnings=_issues(report.warnings),
            truncated_errors=report.truncated_errors,
            truncated_warnings=report.truncated_warnings,
            encoding=report.encoding,
            columns=list(report.columns),
            rows=[
                RowPreview(row=r.row, line=r.line, name=r.name, address=r.address, phone=r.phone)
                for r in report.rows
            ],
        )

    async def status(job_id: JobId, caller: Caller) -> JobStatusResponse:
        processor = service.processor()
        snapshot = await service.visible(processor, job_id, caller)
        result = await processor.result(job_id) if snapshot.status.terminal else None
        return JobStatusResponse(**_progress_fields(snapshot), result=result)

    async def events(job_id: JobId, caller: Caller) -> Response:
        processor = service.processor()
        await service.visible(processor, job_id, caller)
        return _EventStream(
            _event_chunks(processor, job_id, events_poll_interval), heartbeat=events_heartbeat
        )

    async def resume(
        request: Request, response: Response, job_id: JobId, caller: Caller
    ) -> JobAccepted:
        processor = service.processor()
        snapshot = await service.visible(processor, job_id, caller)
        if snapshot.status in _RUNNING:
            raise _ApiError(409, "conflict", f"job {job_id} is running", job_id=job_id)
        if snapshot.status in (JobStatus.COMPLETED, JobStatus.ROLLED_BACK):
            raise _ApiError(
                409,
                "conflict",
                f"job {job_id} is {snapshot.status.value}: nothing to resume",
                job_id=job_id,
            )
        await service.start(processor, job_id, resume=True)
        logger.info("Job %s resumed (was %s)", job_id, snapshot.status.value)
        url = status_url(request, job_id)
        response.headers["Location"] = url
        return JobAccepted(
            job_id=job_id,
            status=snapshot.status,
            message=f"Job resumed (it was {snapshot.status.value}); poll the status URL",
            total_hospitals=snapshot.total_rows,
            idempotency_key=snapshot.idempotency_key,
            status_url=url,
        )

    async def rollback(job_id: JobId, caller: Caller) -> JobResult:
        processor = service.processor()
        snapshot = await service.visible(processor, job_id, caller)
        if snapshot.status in _RUNNING:
            raise _ApiError(
                409,
                "conflict",
                f"job {job_id} is running; it cannot be rolled back now",
                job_id=job_id,
            )
        result = await _rollback(processor, snapshot)
        logger.info("Job %s rolled back", job_id)
        return result

    router.add_api_route(
        "/hospitals/bulk",
        submit,
        methods=["POST"],
        status_code=202,
        response_model=JobAccepted,
        name="hospital_bulk_submit",
        summary="Upload a CSV file of hospitals",
        description="Validate the file, create its job and start it. Poll the `Location`.",
        responses={
            202: {"description": "Job accepted (or replayed: `Idempotent-Replayed: true`)."},
            **_errors(400, 409, 413, 422, 500, 503),
        },
        route_class_override=UploadRoute,
    )
    router.add_api_route(
        "/hospitals/bulk/validate",
        validate,
        methods=["POST"],
        response_model=ValidationResult,
        name="hospital_bulk_validate",
        summary="Validate a CSV file (dry run)",
        description="Nothing is created or sent. A bad file answers 200 with `valid: false`.",
        responses=_errors(400, 413, 500),
        route_class_override=UploadRoute,
    )
    router.add_api_route(
        "/hospitals/status/{job_id}",
        status,
        methods=["GET"],
        response_model=JobStatusResponse,
        name="hospital_bulk_status",
        summary="A job's progress (and its report once it ended)",
        responses=_errors(404, 500, 503),
    )
    router.add_api_route(
        "/hospitals/status/{job_id}/events",
        events,
        methods=["GET"],
        status_code=200,
        response_class=_EventStream,
        # Not what the route returns (a stream): it puts JobEventData in the schema's
        # components, for the event stream's documentation below.
        response_model=JobEventData,
        name="hospital_bulk_events",
        summary="A job's events, as Server-Sent Events, until it ends",
        description=(
            "`text/event-stream`: each event is `event: <kind>` and `data: <JobEventData as "
            "JSON>`, from a `snapshot` to `job_finished` (which carries the report). Comments "
            "keep an idle stream open."
        ),
        responses={
            200: {"description": "The event stream.", "content": _EVENT_STREAM_CONTENT},
            **_errors(404, 500, 503),
        },
    )
    router.add_api_route(
        "/hospitals/bulk/{job_id}/resume",
        resume,
        methods=["POST"],
        status_code=202,
        response_model=JobAccepted,
        name="hospital_bulk_resume",
        summary="Run a stopped job again (only rows not yet created are sent)",
        responses={202: {"description": "Job started again."}, **_errors(404, 409, 500, 503)},
    )
    router.add_api_route(
        "/hospitals/bulk/{job_id}/rollback",
        rollback,
        methods=["POST"],
        response_model=JobResult,
        name="hospital_bulk_rollback",
        summary="Delete a job's batches upstream",
        responses=_errors(404, 409, 500, 502, 503),
    )
    health_route: dict[str, Any] = {
        "methods": ["GET"],
        "response_model": HealthResponse,
        "summary": "Upstream reachability, circuit breaker state, backend connectivity",
        "responses": {
            200: {"description": "Healthy."},
            503: {"model": HealthResponse, "description": "Not healthy."},
            "4XX": _errors()["4XX"],
        },
    }
    router.add_api_route("/health", service.health, name="hospital_bulk_health", **health_route)
    root = APIRouter(dependencies=depends, route_class=_EnvelopeRoute, tags=_TAGS)
    root.add_api_route("/health", service.health, name="hospital_bulk_root_health", **health_route)
    return router, root


def create_router(
    processor: ProcessorSource,
    *,
    runner: JobRunner | None = None,
    dependencies: Sequence[fastapi_params.Depends] = (),
    tenant: Callable[..., Any] | None = None,
    require_idempotency_key: bool = False,
    max_upload_bytes: int = 256 * 1024,
    max_rows: int | None = 20,
    events_poll_interval: float = 0.5,
    events_heartbeat: float = 15.0,
) -> APIRouter:
    """Build the bulk service's endpoints as an `APIRouter` (see the module's documentation).

    Example:
        ```python
        processor = AsyncBulkProcessor(settings=Settings.from_env())
        app = FastAPI(lifespan=...)  # close the processor at shutdown
        app.include_router(
            create_router(processor, dependencies=[Depends(authenticate)], tenant=account_id),
            prefix="/api/v1",
        )
        ```

    Args:
        processor: The processor, or a zero-argument callable returning it (called once, at
            the first request that needs it, and again after the app's lifespan restarts).
            The router never closes it: its owner does.
        runner: What starts the jobs (e.g. the Celery integration's runner). ``None`` runs
            them in this process with a `BackgroundRunner` entered in the router's lifespan,
            which FastAPI runs within the app's when the router is included; at shutdown,
            running jobs are cancelled (left resumable).
        dependencies: FastAPI dependencies run for every route (your authentication), as
            ``Depends(...)`` (plain callables are wrapped).
        tenant: A FastAPI dependency returning the caller's tenant. Uploads record it and
            scope their idempotency keys by it; a job of another tenant answers 404
            everywhere.
        require_idempotency_key: Refuse (400) uploads without an ``Idempotency-Key``.
        max_upload_bytes: The largest file accepted; a larger upload answers 413 and is not
            read past the limit.
        max_rows: The most data rows a file may have (``too_many_rows``, 400), or ``None``
            for the processor's own limit only; the stricter of the two applies.
        events_poll_interval: Seconds between reads of a job that runs in another process,
            for the event stream.
        events_heartbeat: Seconds without an event after which the event stream sends a
            comment (keeps proxies from closing it).

    Returns:
        The router; mount it with ``app.include_router(router, prefix="/api/v1")``.

    Raises:
        ConfigurationError: An option has a wrong value.
    """
    router, _ = _build(
        processor,
        runner=runner,
        dependencies=dependencies,
        tenant=tenant,
        require_idempotency_key=require_idempotency_key,
        max_upload_bytes=max_upload_bytes,
        max_rows=max_rows,
        events_poll_interval=events_poll_interval,
        events_heartbeat=events_heartbeat,
    )
    return router


_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def _router_options_from_env(env: Mapping[str, str]) -> dict[str, Any]:
    """The router options set by ``HOSPITAL_BULK_*`` environment variables."""
    options: dict[str, Any] = {}
    name = "HOSPITAL_BULK_REQUIRE_IDEMPOTENCY_KEY"
    if name in env:
        text = env[name].strip().lower()
        if text not in _TRUE | _FALSE:
            raise ConfigurationError(f"{name}={env[name]!r} is not true or false")
        options["require_idempotency_key"] = text in _TRUE
    for name, option in (
        ("HOSPITAL_BULK_MAX_UPLOAD_BYTES", "max_upload_bytes"),
        ("HOSPITAL_BULK_MAX_ROWS", "max_rows"),
    ):
        if name not in env:
            continue
        text = env[name].strip()
        if option == "max_rows" and text.lower() in ("", "none"):
            options[option] = None
            continue
        try:
            value = int(text)
        except ValueError:
            value = 0
        if value < 1:
            raise ConfigurationError(f"{name}={env[name]!r} is not a whole number >= 1")
        options[option] = value
    return options


def create_app(
    settings: Settings | None = None,
    *,
    processor: ProcessorSource | None = None,
    runner: JobRunner | None = None,
    prefix: str = "/api/v1",
    **router_options: Any,
) -> FastAPI:
    """Build the whole bulk service: the router under `prefix`, and ``/health`` at the root.

    With no arguments (``uvicorn "hospital_bulk.integrations.fastapi:create_app" --factory``)
    everything comes from the environment: the processor's settings from `Settings.from_env`
    (``HOSPITAL_API_BASE_URL``, ``REDIS_URL``, ``RATE_LIMIT_REQUESTS``, ...) and the router's
    options from

    | variable | option |
    |---|---|
    | ``HOSPITAL_BULK_REQUIRE_IDEMPOTENCY_KEY`` (``true``/``false``) | `require_idempotency_key` |
    | ``HOSPITAL_BULK_MAX_UPLOAD_BYTES`` | `max_upload_bytes` |
    | ``HOSPITAL_BULK_MAX_ROWS`` (``none``: only the processor's limit) | `max_rows` |

    The environment is read only then (neither `settings` nor `processor` given); options
    passed as arguments win over it.

    Args:
        settings: The processor's settings; the processor is created in the app's lifespan
            and closed at shutdown.
        processor: A processor (or a factory) to use instead; its owner closes it.
        runner: What starts the jobs; ``None`` runs them in this process (see
            `create_router`).
        prefix: Where the router is mounted.
        **router_options: Any other option of `create_router` (``dependencies``, ``tenant``,
            ``max_rows``, ...). The root ``/health`` also runs ``dependencies``.

    Returns:
        The app.

    Raises:
        ConfigurationError: Both `settings` and `processor` were given, or a setting (or an
            environment variable) is wrong or missing.
    """
    if settings is not None and processor is not None:
        raise ConfigurationError("give create_app settings or a processor, not both")
    if settings is None and processor is None:
        settings = Settings.from_env()
        router_options = {**_router_options_from_env(os.environ), **router_options}
    owned: list[AsyncBulkProcessor] = []

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings is None:
            yield
            return
        async with AsyncBulkProcessor(settings=settings) as created:
            owned.append(created)
            try:
                yield
            finally:
                owned.clear()

    def current() -> AsyncBulkProcessor:
        if not owned:
            raise ConfigurationError(
                "the app's processor is created in its lifespan, which has not run"
            )
        return owned[0]

    from .. import __version__

    app = FastAPI(
        title="Hospital bulk service",
        version=__version__,
        description="Load CSV files of hospitals into the Hospital Directory API.",
        lifespan=lifespan,
    )
    router, health = _build(
        processor if processor is not None else current, runner=runner, **router_options
    )
    app.include_router(router, prefix=prefix)
    if prefix:
        app.include_router(health)
    return app
