"""The FastAPI integration: every endpoint, status code and error envelope.

In process through `httpx.ASGITransport` against the in-process fake upstream (the app's
lifespan entered explicitly), and once over real HTTP with uvicorn against a served fake.
"""

# No `from __future__ import annotations`: FastAPI reads the test dependencies' annotations.

import contextlib
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Annotated, Any

import anyio
import httpx
import pytest
from fastapi import Depends, FastAPI, Header, HTTPException
from helpers import REPORT_KEYS, csv_bytes

from hospital_bulk import (
    AsyncBulkProcessor,
    BackendError,
    ConfigurationError,
    IdempotencyInProgressError,
    JobStateError,
    JobStatus,
    Settings,
)
from hospital_bulk.integrations.fastapi import create_app, create_router
from hospital_bulk.testing import FakeDirectory, FakeServer, Fault, Faults

pytestmark = pytest.mark.anyio

API = "/api/v1"
ENVELOPE_TYPES = {
    "validation_error",
    "not_found",
    "conflict",
    "payload_too_large",
    "upstream_error",
    "internal_error",
}


# -- helpers ---------------------------------------------------------------------------------


def make_processor(transport: httpx.AsyncBaseTransport, **options: Any) -> AsyncBulkProcessor:
    options.setdefault("create_rate", "1000/minute")
    options.setdefault("other_rate", "1000/minute")
    options.setdefault("reconcile_after", 0.01)
    return AsyncBulkProcessor("http://fake", transport=transport, **options)


def new_fake() -> FakeDirectory:
    return FakeDirectory(create_rate=None, other_rate=None)


class Gate(httpx.AsyncBaseTransport):
    """Holds every create until `opened` is set: the job is then running, not finished."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner
        self.opened = anyio.Event()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.method == "POST" and request.url.path == "/hospitals/":
            await self.opened.wait()
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


class SignallingProcessor(AsyncBulkProcessor):
    """Sets `following` once an event stream has read its first event (it then follows)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.following = anyio.Event()

    async def events(self, job_id, *, poll_interval=0.5):
        async for event in super().events(job_id, poll_interval=poll_interval):
            yield event
            self.following.set()


class RecordingRunner:
    """A JobRunner that only records what it was asked to start."""

    def __init__(self) -> None:
        self.started: list[tuple[str, bool]] = []

    async def start(self, processor: AsyncBulkProcessor, job_id: str, *, resume: bool) -> None:
        self.started.append((job_id, resume))


@contextlib.asynccontextmanager
async def serve(
    processor: Any, *, lifespan: bool = True, **options: Any
) -> AsyncIterator[httpx.AsyncClient]:
    """A client of a host app that includes the router under /api/v1."""
    app = FastAPI()
    app.include_router(create_router(processor, **options), prefix=API)
    async with contextlib.AsyncExitStack() as stack:
        if lifespan:
            await stack.enter_async_context(app.router.lifespan_context(app))
        client = await stack.enter_async_context(
            httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://test")
        )
        yield client


async def upload(
    client: httpx.AsyncClient,
    data: bytes,
    *,
    key: str | None = None,
    headers: dict[str, str] | None = None,
    path: str = "/hospitals/bulk",
) -> httpx.Response:
    sent = dict(headers or {})
    if key is not None:
        sent["Idempotency-Key"] = key
    return await client.post(
        API + path, files={"file": ("hospitals.csv", data, "text/csv")}, headers=sent
    )


async def wait_for(
    client: httpx.AsyncClient,
    url: str,
    *statuses: str,
    headers: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Poll a job's status until it is one of `statuses` (bounded)."""
    with anyio.fail_after(10):
        while True:
            answer = await client.get(url, headers=headers)
            assert answer.status_code == 200, answer.text
            body = answer.json()
            if body["status"] in statuses:
                return body
            await anyio.sleep(0.01)


async def wait_until_idle(client: httpx.AsyncClient) -> None:
    """Wait (bounded) until no job runs in the app's process, as its health check reports.

    A run reports its job's final status a moment before it lets go of the job; a resume
    handed to the runner in that moment finds the job still running, and is dropped.
    """
    with anyio.fail_after(10):
        while (await client.get(API + "/health")).json()["running_jobs"]:
            await anyio.sleep(0.01)


def assert_envelope(answer: httpx.Response, status: int, error_type: str) -> dict[str, Any]:
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"] == "application/json"
    body = answer.json()
    assert body["error_type"] == error_type
    assert error_type in ENVELOPE_TYPES
    assert isinstance(body["detail"], str)
    assert body["detail"]
    return body


def parse_sse(text: str) -> list[tuple[str, dict[str, Any]]]:
    """The (event, data) pairs of an event stream; comments are skipped."""
    events = []
    for block in text.split("\n\n"):
        kind, data = None, []
        for line in block.split("\n"):
            if not line or line.startswith(":"):
                continue
            field, _, value = line.partition(": ")
            if field == "event":
                kind = value
            elif field == "data":
                data.append(value)
        if kind is not None:
            events.append((kind, json.loads("\n".join(data))))
    return events


def multipart(data: bytes, boundary: str = "hb-test-boundary") -> tuple[bytes, str]:
    head = (
        f"--{boundary}\r\n"
        'Content-Disposition: form-data; name="file"; filename="hospitals.csv"\r\n'
        "Content-Type: text/csv\r\n\r\n"
    ).encode()
    return (
        head + data + f"\r\n--{boundary}--\r\n".encode(),
        f"multipart/form-data; boundary={boundary}",
    )


# -- upload, status, report ------------------------------------------------------------------


async def test_an_upload_is_accepted_polled_to_completed_and_reported() -> None:
    fake = new_fake()
    async with make_processor(fake.transport()) as processor, serve(processor) as client:
        answer = await upload(client, csv_bytes(5))
        assert answer.status_code == 202, answer.text
        body = answer.json()
        assert body["status"] == "pending"
        assert body["total_hospitals"] == 5
        assert body["idempotency_key"] is None
        assert body["replayed"] is False
        assert body["message"]
        location = answer.headers["location"]
        assert location == f"http://test{API}/hospitals/status/{body['job_id']}"
        assert body["status_url"] == location
        assert "idempotent-replayed" not in answer.headers

        status = await wait_for(client, location, "completed")
    assert status["job_id"] == body["job_id"]
    assert status["total_hospitals"] == 5
    assert status["progress_percentage"] == 100.0
    assert status["counts"]["created_and_activated"] == 5
    assert status["eta_seconds"] == 0.0
    assert status["started_at"]
    assert status["completed_at"]
    assert status["created_at"]
    assert status["processing_time_seconds"] >= 0
    assert status["error"] is None
    result = status["result"]
    assert set(result) == REPORT_KEYS
    assert result["status"] == "completed"
    assert result["processed_hospitals"] == 5
    assert result["batch_activated"] is True
    assert len(fake.hospitals) == 5
    assert all(h.active for h in fake.hospitals)
    assert fake.duplicates() == []


async def test_the_status_of_a_running_job_has_progress_and_no_result_yet() -> None:
    fake = new_fake()
    gate = Gate(fake.transport())
    async with make_processor(gate) as processor, serve(processor) as client:
        answer = await upload(client, csv_bytes(3))
        url = answer.headers["location"]
        running = await wait_for(client, url, "running")
        assert running["result"] is None
        assert running["completed_at"] is None
        assert running["progress_percentage"] == 0.0
        gate.opened.set()
        done = await wait_for(client, url, "completed")
    assert done["result"]["processed_hospitals"] == 3


async def test_an_invalid_file_answers_400_with_every_error_and_sends_nothing() -> None:
    fake = new_fake()
    bad = b"name,address\n,1 Main St\nOk,2 Main St\n=cmd,3 Main St\n"
    async with make_processor(fake.transport()) as processor, serve(processor) as client:
        answer = await upload(client, bad, key="bad-file")
    body = assert_envelope(answer, 400, "validation_error")
    assert [(e["code"], e["row"], e["line"], e["column"]) for e in body["errors"]] == [
        ("missing_value", 1, 2, "name"),
        ("formula_injection", 3, 4, "name"),
    ]
    assert all(e["message"] for e in body["errors"])
    assert body["warnings"] == []
    assert fake.requests == []


async def test_too_many_rows_answers_400_and_the_stricter_limit_applies() -> None:
    fake = new_fake()
    async with make_processor(fake.transport()) as processor:
        async with serve(processor, max_rows=5) as client:
            over = await upload(client, csv_bytes(6))
            at_limit = await upload(client, csv_bytes(5))
        async with serve(processor) as client:  # the default: 20 rows
            default = await upload(client, csv_bytes(21))
    body = assert_envelope(over, 400, "validation_error")
    assert [e["code"] for e in body["errors"]] == ["too_many_rows"]
    assert body["errors"][0]["row"] is None
    assert at_limit.status_code == 202
    assert [e["code"] for e in default.json()["errors"]] == ["too_many_rows"]

    # The processor's own limit applies when the router's is looser (or off).
    async with (
        make_processor(fake.transport(), max_rows=2) as processor,
        serve(processor, max_rows=None) as client,
    ):
        answer = await upload(client, csv_bytes(3))
    assert [e["code"] for e in assert_envelope(answer, 400, "validation_error")["errors"]] == [
        "too_many_rows"
    ]


async def test_with_skip_invalid_rows_a_file_with_bad_rows_is_accepted() -> None:
    fake = new_fake()
    bad = b"name,address\n,1 Main St\nOk,2 Main St\n"
    async with (
        make_processor(fake.transport(), skip_invalid_rows=True) as processor,
        serve(processor, max_rows=5) as client,
    ):
        answer = await upload(client, bad)
        assert answer.status_code == 202, answer.text
        status = await wait_for(client, answer.headers["location"], "completed")
        header_only = await upload(client, b"name,address\n")
    assert [h["status"] for h in status["result"]["hospitals"]] == [
        "invalid",
        "created_and_activated",
    ]
    assert len(fake.hospitals) == 1
    assert [e["code"] for e in assert_envelope(header_only, 400, "validation_error")["errors"]] == [
        "no_data_rows"
    ]


async def test_an_upload_over_the_limit_answers_413_without_reading_it_all() -> None:
    fake = new_fake()
    limit = 1000
    async with (
        make_processor(fake.transport()) as processor,
        serve(processor, max_upload_bytes=limit) as client,
    ):
        # Declared too large by its Content-Length: refused before it is read.
        huge = await upload(client, b"x" * 100_000)
        # Within the framing allowance, but the file itself is one byte too many.
        one_over = await upload(client, b"x" * (limit + 1))
        exact = await upload(client, b"name,address\n" + b"x" * (limit - 13))
        validate = await upload(client, b"x" * 100_000, path="/hospitals/bulk/validate")

        # Streamed without a Content-Length: cut off once past the limit.
        body, content_type = multipart(b"x" * 1_000_000)
        pulled = 0

        async def chunks() -> AsyncIterator[bytes]:
            nonlocal pulled
            for start in range(0, len(body), 4096):
                pulled += 1
                yield body[start : start + 4096]

        streamed = await client.post(
            API + "/hospitals/bulk", content=chunks(), headers={"content-type": content_type}
        )
    for answer in (huge, one_over, validate, streamed):
        body_json = assert_envelope(answer, 413, "payload_too_large")
        assert str(limit) in body_json["detail"]
    assert pulled < 10, f"{pulled} chunks of 4 KiB read for a 1 KB limit"
    assert exact.status_code == 400  # read whole: its one row is invalid, not too large
    assert fake.requests == []


async def test_a_request_without_a_file_answers_400_in_the_envelope() -> None:
    fake = new_fake()
    async with make_processor(fake.transport()) as processor, serve(processor) as client:
        no_file = await client.post(API + "/hospitals/bulk")
        other_field = await client.post(
            API + "/hospitals/bulk/validate", files={"upload": ("a.csv", b"name,address\n")}
        )
    for answer in (no_file, other_field):
        body = assert_envelope(answer, 400, "validation_error")
        assert "file" in body["detail"]
        assert body["errors"] == []


# -- idempotency -----------------------------------------------------------------------------


async def test_a_replayed_key_gives_the_same_job_and_another_file_422() -> None:
    fake = new_fake()
    async with make_processor(fake.transport()) as processor, serve(processor) as client:
        first = await upload(client, csv_bytes(4), key='"upload-42"')  # structured-field form
        assert first.status_code == 202, first.text
        job_id = first.json()["job_id"]
        assert first.json()["idempotency_key"] == "upload-42"
        await wait_for(client, first.headers["location"], "completed")

        replay = await upload(client, csv_bytes(4), key="upload-42")
        quoted_replay = await upload(client, csv_bytes(4), key='"upload-42"')
        conflict = await upload(client, csv_bytes(5), key="upload-42")
        status = await client.get(first.headers["location"])
    for answer in (replay, quoted_replay):
        assert answer.status_code == 202
        assert answer.headers["idempotent-replayed"] == "true"
        assert answer.headers["location"] == first.headers["location"]
        body = answer.json()
        assert body["job_id"] == job_id
        assert body["replayed"] is True
        assert body["status"] == "completed"  # the job's present status
    body = assert_envelope(conflict, 422, "conflict")
    assert body["job_id"] == job_id
    assert status.json()["result"]["processed_hospitals"] == 4
    assert len(fake.creates()) == 4
    assert len(fake.hospitals) == 4


async def test_a_required_key_is_enforced_with_400() -> None:
    fake = new_fake()
    async with (
        make_processor(fake.transport()) as processor,
        serve(processor, require_idempotency_key=True) as client,
    ):
        missing = await upload(client, csv_bytes(2))
        given = await upload(client, csv_bytes(2), key="k-1")
        spec = (await client.get("/openapi.json")).json()
    body = assert_envelope(missing, 400, "validation_error")
    assert "Idempotency-Key" in body["detail"]
    assert given.status_code == 202
    parameters = spec["paths"][f"{API}/hospitals/bulk"]["post"]["parameters"]
    assert [p["name"] for p in parameters] == ["Idempotency-Key"]
    assert "required" in parameters[0]["description"]


@pytest.mark.parametrize(
    "key",
    ['"abc', '"a"b"', '"a\\qb"', '"abc\\"', '""', "x" * 256, "caf\u00e9", "tab\there"],
)
async def test_a_malformed_key_answers_400(key: str) -> None:
    fake = new_fake()
    async with make_processor(fake.transport()) as processor, serve(processor) as client:
        answer = await client.post(
            API + "/hospitals/bulk",
            files={"file": ("h.csv", csv_bytes(1))},
            headers=[("Idempotency-Key", key.encode("latin-1"))],
        )
    assert_envelope(answer, 400, "validation_error")
    assert fake.requests == []


async def test_escapes_of_a_quoted_key_are_undone() -> None:
    fake = new_fake()
    async with make_processor(fake.transport()) as processor, serve(processor) as client:
        quoted = await upload(client, csv_bytes(1), key='"a\\"b\\\\c"')
        plain = await upload(client, csv_bytes(1), key='a"b\\c')
    assert quoted.json()["idempotency_key"] == 'a"b\\c'
    assert plain.json()["job_id"] == quoted.json()["job_id"]
    assert plain.headers["idempotent-replayed"] == "true"


async def test_a_key_still_being_claimed_answers_409_with_retry_after(monkeypatch) -> None:
    fake = new_fake()
    async with make_processor(fake.transport()) as processor, serve(processor) as client:

        async def in_progress(*args: Any, **kwargs: Any) -> Any:
            raise IdempotencyInProgressError("still being created", key="k", job_id="j-1")

        monkeypatch.setattr(processor, "submit", in_progress)
        answer = await upload(client, csv_bytes(1), key="k")
    body = assert_envelope(answer, 409, "conflict")
    assert body["job_id"] == "j-1"
    assert answer.headers["retry-after"] == "1"


# -- tenants and authentication --------------------------------------------------------------


def tenant_header(x_tenant: Annotated[str, Header()]) -> str:
    return x_tenant


async def test_a_tenant_cannot_see_or_replay_another_tenants_jobs() -> None:
    fake = new_fake()
    a, b = {"X-Tenant": "tenant-a"}, {"X-Tenant": "tenant-b"}
    async with (
        make_processor(fake.transport()) as processor,
        serve(processor, tenant=tenant_header) as client,
    ):
        mine = await upload(client, csv_bytes(3), key="shared-key", headers=a)
        url = mine.headers["location"]
        job_id = mine.json()["job_id"]
        await wait_for(client, url, "completed", headers=a)

        theirs = await upload(client, csv_bytes(3), key="shared-key", headers=b)
        replay = await upload(client, csv_bytes(3), key="shared-key", headers=a)
        hidden = [
            await client.get(url, headers=b),
            await client.get(url + "/events", headers=b),
            await client.post(f"{API}/hospitals/bulk/{job_id}/resume", headers=b),
            await client.post(f"{API}/hospitals/bulk/{job_id}/rollback", headers=b),
        ]
        unknown = await client.get(f"{API}/hospitals/status/nope", headers=b)
        await wait_for(client, theirs.headers["location"], "completed", headers=b)
        no_tenant = await client.get(url)
    assert theirs.status_code == 202
    assert theirs.json()["job_id"] != job_id
    assert "idempotent-replayed" not in theirs.headers
    assert replay.json()["job_id"] == job_id
    assert replay.headers["idempotent-replayed"] == "true"
    for answer in hidden:
        body = assert_envelope(answer, 404, "not_found")
        # Exactly what an unknown id answers: nothing tells that the job exists.
        assert body["detail"] == unknown.json()["detail"].replace("nope", job_id)
    assert_envelope(no_tenant, 400, "validation_error")
    assert (await processor.status(job_id)).tenant == "tenant-a"
    assert len(fake.hospitals) == 6  # two jobs, each created once
    assert fake.duplicates() == []


def require_token(authorization: Annotated[str | None, Header()] = None) -> None:
    if authorization != "Bearer good":
        raise HTTPException(401, "not authenticated", headers={"WWW-Authenticate": "Bearer"})


ROUTES = [
    ("POST", "/hospitals/bulk"),
    ("POST", "/hospitals/bulk/validate"),
    ("GET", "/hospitals/status/JOB"),
    ("GET", "/hospitals/status/JOB/events"),
    ("POST", "/hospitals/bulk/JOB/resume"),
    ("POST", "/hospitals/bulk/JOB/rollback"),
    ("GET", "/health"),
]


async def test_an_authentication_dependency_guards_every_route() -> None:
    fake = new_fake()
    async with (
        make_processor(fake.transport()) as processor,
        serve(processor, dependencies=[Depends(require_token)]) as client,
    ):
        allowed = await upload(client, csv_bytes(1), headers={"Authorization": "Bearer good"})
        job_id = allowed.json()["job_id"]
        answers = []
        for method, path in ROUTES:
            kwargs: dict[str, Any] = {}
            if method == "POST" and path.startswith("/hospitals/bulk") and "JOB" not in path:
                kwargs["files"] = {"file": ("h.csv", csv_bytes(1))}
            url = API + path.replace("JOB", job_id)
            answers.append(await client.request(method, url, **kwargs))
        await wait_for(
            client,
            allowed.headers["location"],
            "completed",
            headers={"Authorization": "Bearer good"},
        )
    assert allowed.status_code == 202
    for (method, path), answer in zip(ROUTES, answers, strict=True):
        assert answer.status_code == 401, (method, path, answer.text)
        # The host app's own error, in its own format, not the router's envelope.
        assert answer.json() == {"detail": "not authenticated"}
        assert answer.headers["www-authenticate"] == "Bearer"
    assert len(fake.hospitals) == 1


# -- events ----------------------------------------------------------------------------------


async def test_the_event_stream_follows_the_job_until_it_finishes() -> None:
    fake = new_fake()
    gate = Gate(fake.transport())
    async with (
        SignallingProcessor(
            "http://fake", transport=gate, create_rate="1000/minute", reconcile_after=0.01
        ) as processor,
        serve(processor, events_poll_interval=0.05) as client,
    ):
        accepted = await upload(client, csv_bytes(3))
        job_id = accepted.json()["job_id"]
        stream: dict[str, httpx.Response] = {}

        async def read() -> None:
            stream["answer"] = await client.get(accepted.headers["location"] + "/events")

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(read)
                await processor.following.wait()  # the stream follows the job: let it run
                gate.opened.set()
    answer = stream["answer"]
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/event-stream")
    assert answer.headers["cache-control"] == "no-cache"
    events = parse_sse(answer.text)
    kinds = [kind for kind, _ in events]
    assert kinds[0] == "snapshot"
    assert kinds[-1] == "job_finished"
    assert kinds.count("job_finished") == 1
    assert kinds.count("row_created") == 3
    assert "batch_activated" in kinds
    for kind, data in events:
        assert data["kind"] == kind
        assert data["job_id"] == job_id
        assert data["snapshot"]["job_id"] == job_id
    assert sorted(d["row"] for k, d in events if k == "row_created") == [1, 2, 3]
    assert events[0][1]["snapshot"]["status"] in ("pending", "running")
    finished = events[-1][1]
    assert finished["snapshot"]["status"] == "completed"
    assert finished["result"]["status"] == "completed"
    assert finished["result"]["processed_hospitals"] == 3
    assert all(data["result"] is None for _, data in events[:-1])


async def test_the_event_stream_of_a_finished_job_is_one_snapshot() -> None:
    fake = new_fake()
    async with make_processor(fake.transport()) as processor, serve(processor) as client:
        accepted = await upload(client, csv_bytes(2))
        await wait_for(client, accepted.headers["location"], "completed")
        answer = await client.get(accepted.headers["location"] + "/events")
        unknown = await client.get(f"{API}/hospitals/status/nope/events")
    events = parse_sse(answer.text)
    assert [kind for kind, _ in events] == ["snapshot"]
    assert events[0][1]["snapshot"]["status"] == "completed"
    assert_envelope(unknown, 404, "not_found")


async def raw_get(app: Any, path: str, received: list[bytes], leave: anyio.Event) -> int:
    """GET through the ASGI interface, collecting body chunks as they are sent."""
    status = 0
    asked = False

    async def receive() -> dict[str, Any]:
        nonlocal asked
        if not asked:
            asked = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await leave.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            received.append(message.get("body", b""))

    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"test")],
        "client": ("127.0.0.1", 50000),
        "server": ("test", 80),
    }
    await app(scope, receive, send)
    return status


async def test_an_idle_stream_sends_heartbeats_and_ends_when_the_client_leaves() -> None:
    fake = new_fake()
    gate = Gate(fake.transport())
    async with make_processor(gate) as processor:
        app = FastAPI()
        app.include_router(
            create_router(processor, events_heartbeat=0.01, events_poll_interval=0.01), prefix=API
        )
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(
                transport=httpx.ASGITransport(app), base_url="http://test"
            ) as client:
                accepted = await upload(client, csv_bytes(2))
            path = f"{API}/hospitals/status/{accepted.json()['job_id']}/events"
            received: list[bytes] = []
            leave = anyio.Event()
            with anyio.fail_after(10):
                async with anyio.create_task_group() as tg:

                    async def get() -> None:
                        assert await raw_get(app, path, received, leave) == 200

                    tg.start_soon(get)
                    # The job is held at the gate: only heartbeats come after the snapshot.
                    while received.count(b": keep-alive\n\n") < 2:
                        await anyio.sleep(0.005)
                    leave.set()  # the client leaves: the stream ends, the request returns
            assert (await processor.status(accepted.json()["job_id"])).status is JobStatus.RUNNING
            gate.opened.set()
    assert received[0].startswith(b"event: snapshot\n")
    assert b"job_finished" not in b"".join(received)


# -- resume and rollback ---------------------------------------------------------------------


async def test_resume_finishes_a_partially_failed_job_and_is_refused_when_done() -> None:
    fake = new_fake()
    fake.inject(Fault.REJECT, route="create")
    async with make_processor(fake.transport()) as processor, serve(processor) as client:
        accepted = await upload(client, csv_bytes(3))
        job_id = accepted.json()["job_id"]
        url = accepted.headers["location"]
        partial = await wait_for(client, url, "partially_failed")
        await wait_until_idle(client)
        resumed = await client.post(f"{API}/hospitals/bulk/{job_id}/resume")
        done = await wait_for(client, url, "completed")
        again = await client.post(f"{API}/hospitals/bulk/{job_id}/resume")
        unknown = await client.post(f"{API}/hospitals/bulk/nope/resume")
    assert partial["result"]["failed_hospitals"] == 1
    assert partial["error"]
    assert resumed.status_code == 202, resumed.text
    assert resumed.headers["location"] == url
    assert resumed.json()["job_id"] == job_id
    assert resumed.json()["status"] == "partially_failed"  # as it was when resumed
    assert done["result"]["processed_hospitals"] == 3
    assert assert_envelope(again, 409, "conflict")["job_id"] == job_id
    assert_envelope(unknown, 404, "not_found")
    assert len(fake.hospitals) == 3
    assert fake.duplicates() == []


async def test_a_running_job_cannot_be_resumed_or_rolled_back() -> None:
    fake = new_fake()
    gate = Gate(fake.transport())
    async with make_processor(gate) as processor, serve(processor) as client:
        accepted = await upload(client, csv_bytes(2))
        job_id = accepted.json()["job_id"]
        await wait_for(client, accepted.headers["location"], "running")
        resume = await client.post(f"{API}/hospitals/bulk/{job_id}/resume")
        rollback = await client.post(f"{API}/hospitals/bulk/{job_id}/rollback")
        gate.opened.set()
        await wait_for(client, accepted.headers["location"], "completed")
    for answer in (resume, rollback):
        assert assert_envelope(answer, 409, "conflict")["job_id"] == job_id


async def test_rollback_deletes_the_batches_and_the_job_cannot_be_resumed() -> None:
    fake = new_fake()
    async with make_processor(fake.transport()) as processor, serve(processor) as client:
        accepted = await upload(client, csv_bytes(3))
        job_id = accepted.json()["job_id"]
        await wait_for(client, accepted.headers["location"], "completed")
        assert len(fake.hospitals) == 3
        rolled = await client.post(f"{API}/hospitals/bulk/{job_id}/rollback")
        status = await client.get(accepted.headers["location"])
        resume = await client.post(f"{API}/hospitals/bulk/{job_id}/resume")
        unknown = await client.post(f"{API}/hospitals/bulk/nope/rollback")
    assert rolled.status_code == 200, rolled.text
    assert set(rolled.json()) == REPORT_KEYS
    assert rolled.json()["status"] == "rolled_back"
    assert {h["status"] for h in rolled.json()["hospitals"]} == {"deleted"}
    assert status.json()["status"] == "rolled_back"
    assert status.json()["result"]["status"] == "rolled_back"
    assert fake.hospitals == []
    assert_envelope(resume, 409, "conflict")
    assert_envelope(unknown, 404, "not_found")


async def test_a_rollback_waits_for_a_run_that_is_letting_go_of_its_job(monkeypatch) -> None:
    fake = new_fake()
    async with make_processor(fake.transport()) as processor, serve(processor) as client:
        accepted = await upload(client, csv_bytes(2))
        job_id = accepted.json()["job_id"]
        await wait_for(client, accepted.headers["location"], "completed")
        await wait_until_idle(client)
        real_rollback = processor.rollback
        refusals = []

        async def still_winding_down(job_id: str) -> Any:
            if len(refusals) < 3:  # as the processor answers while the run lets go
                refusals.append(job_id)
                raise JobStateError("still running", job_id=job_id, status="completed")
            return await real_rollback(job_id)

        monkeypatch.setattr(processor, "rollback", still_winding_down)
        rolled = await client.post(f"{API}/hospitals/bulk/{job_id}/rollback")
    assert rolled.status_code == 200, rolled.text
    assert rolled.json()["status"] == "rolled_back"
    assert refusals == [job_id] * 3
    assert fake.hospitals == []


async def test_a_rollback_the_upstream_refuses_answers_502() -> None:
    fake = new_fake()
    async with make_processor(fake.transport()) as processor, serve(processor) as client:
        accepted = await upload(client, csv_bytes(2))
        job_id = accepted.json()["job_id"]
        await wait_for(client, accepted.headers["location"], "completed")
        fake.inject(Fault.REJECT, route="batch_delete")
        refused = await client.post(f"{API}/hospitals/bulk/{job_id}/rollback")
        status = await client.get(accepted.headers["location"])
    assert_envelope(refused, 502, "upstream_error")
    assert status.json()["status"] == "completed"  # left as it was
    assert len(fake.hospitals) == 2


async def test_a_failing_backend_answers_503(monkeypatch) -> None:
    fake = new_fake()
    async with make_processor(fake.transport()) as processor, serve(processor) as client:

        async def broken(job_id: str) -> Any:
            raise BackendError("the job store is unreachable")

        monkeypatch.setattr(processor, "status", broken)
        answer = await client.get(f"{API}/hospitals/status/some-job")
    body = assert_envelope(answer, 503, "internal_error")
    assert "unreachable" in body["detail"]


# -- runners and lifespans -------------------------------------------------------------------


async def test_a_given_runner_starts_new_jobs_and_resumes_not_replays() -> None:
    fake = new_fake()
    runner = RecordingRunner()
    async with (
        make_processor(fake.transport()) as processor,
        serve(processor, runner=runner, lifespan=False) as client,
    ):
        first = await upload(client, csv_bytes(2), key="k")
        job_id = first.json()["job_id"]
        replay = await upload(client, csv_bytes(2), key="k")
        resume = await client.post(f"{API}/hospitals/bulk/{job_id}/resume")  # still pending
    assert first.status_code == replay.status_code == resume.status_code == 202
    assert runner.started == [(job_id, False), (job_id, True)]
    assert fake.requests == []  # the runner never ran anything


async def test_a_failing_runner_answers_503_without_its_message(caplog) -> None:
    class BrokenRunner:
        async def start(self, processor: Any, job_id: str, *, resume: bool) -> None:
            raise RuntimeError("cannot reach redis://:s3cret@broker:6379/0")

    fake = new_fake()
    async with (
        make_processor(fake.transport()) as processor,
        serve(processor, runner=BrokenRunner()) as client,
    ):
        answer = await upload(client, csv_bytes(1))
    body = assert_envelope(answer, 503, "internal_error")
    assert body["job_id"]
    assert "RuntimeError" in body["detail"]
    assert "s3cret" not in answer.text
    assert "s3cret" not in caplog.text


async def test_without_its_lifespan_the_router_answers_503_and_the_job_can_be_resumed() -> None:
    fake = new_fake()
    async with make_processor(fake.transport()) as processor:
        async with serve(processor, lifespan=False) as client:
            answer = await upload(client, csv_bytes(2))
        body = assert_envelope(answer, 503, "internal_error")
        job_id = body["job_id"]
        assert "resume" in body["detail"]
        assert (await processor.status(job_id)).status is JobStatus.PENDING
        async with serve(processor) as client:
            resumed = await client.post(f"{API}/hospitals/bulk/{job_id}/resume")
            assert resumed.status_code == 202
            await wait_for(client, resumed.headers["location"], "completed")
    assert len(fake.hospitals) == 2


async def test_shutting_down_cancels_running_jobs_leaving_them_resumable() -> None:
    fake = new_fake()
    gate = Gate(fake.transport())
    async with make_processor(gate) as processor:
        async with serve(processor) as client:
            accepted = await upload(client, csv_bytes(3))
            job_id = accepted.json()["job_id"]
            await wait_for(client, accepted.headers["location"], "running")
        # The app stopped: its runner cancelled the job.
        assert (await processor.status(job_id)).status is JobStatus.CANCELLED
        gate.opened.set()
        async with serve(processor) as client:
            resumed = await client.post(f"{API}/hospitals/bulk/{job_id}/resume")
            assert resumed.status_code == 202
            done = await wait_for(client, accepted.headers["location"], "completed")
    assert done["result"]["processed_hospitals"] == 3
    assert len(fake.hospitals) == 3
    assert fake.duplicates() == []


async def test_the_routers_lifespan_runs_inside_the_host_apps_own() -> None:
    fake = new_fake()
    order: list[str] = []
    async with make_processor(fake.transport()) as processor:

        @contextlib.asynccontextmanager
        async def host_lifespan(app: FastAPI) -> AsyncIterator[dict[str, str]]:
            order.append("host up")
            yield {"host": "state"}
            order.append("host down")

        app = FastAPI(lifespan=host_lifespan)
        app.include_router(create_router(processor), prefix="/bulk")
        async with app.router.lifespan_context(app) as state:
            assert state == {"host": "state"}
            async with httpx.AsyncClient(
                transport=httpx.ASGITransport(app), base_url="http://test"
            ) as client:
                answer = await client.post(
                    "/bulk/hospitals/bulk", files={"file": ("h.csv", csv_bytes(1))}
                )
                assert answer.status_code == 202
                assert answer.headers["location"].startswith("http://test/bulk/hospitals/status/")
                await wait_for(client, answer.headers["location"], "completed")
    assert order == ["host up", "host down"]


async def test_a_processor_factory_is_called_once_at_first_need() -> None:
    fake = new_fake()
    async with make_processor(fake.transport()) as processor:
        calls = []

        def factory() -> AsyncBulkProcessor:
            calls.append(1)
            return processor

        router = create_router(factory)
        assert calls == []
        app = FastAPI()
        app.include_router(router, prefix=API)
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://test") as client,
        ):
            assert calls == []
            accepted = await upload(client, csv_bytes(1))
            await wait_for(client, accepted.headers["location"], "completed")
            assert (await client.get(API + "/health")).status_code == 200
        assert calls == [1]

        broken = create_router(lambda: "not a processor")
        app = FastAPI()
        app.include_router(broken, prefix=API)
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://test") as client,
        ):
            answer = await client.get(f"{API}/hospitals/status/x")
        assert (
            "not an AsyncBulkProcessor" in assert_envelope(answer, 500, "internal_error")["detail"]
        )


def test_wrong_options_are_refused_at_once() -> None:
    with pytest.raises(ConfigurationError, match="max_rows"):
        create_router(lambda: None, max_rows=0)
    with pytest.raises(ConfigurationError, match="max_upload_bytes"):
        create_router(lambda: None, max_upload_bytes=-1)
    with pytest.raises(ConfigurationError, match="events_poll_interval"):
        create_router(lambda: None, events_poll_interval=0)
    with pytest.raises(ConfigurationError, match="processor"):
        create_router("http://fake")
    with pytest.raises(ConfigurationError, match="runner"):
        create_router(lambda: None, runner=object())
    with pytest.raises(ConfigurationError, match="not both"):
        create_app(Settings(base_url="http://fake"), processor=lambda: None)


# -- health ----------------------------------------------------------------------------------


async def test_health_answers_200_when_healthy_and_503_when_not() -> None:
    fake = new_fake()
    async with make_processor(fake.transport()) as processor:
        app = create_app(processor=processor)
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://test") as client,
        ):
            healthy = [await client.get("/health"), await client.get(API + "/health")]
            fake.faults = Faults(down=True)
            unhealthy = [await client.get("/health"), await client.get(API + "/health")]
    for answer in healthy:
        assert answer.status_code == 200
        assert answer.json() == {
            "status": "ok",
            "upstream": True,
            "upstream_error": None,
            "breaker": "closed",
            "backend": "memory",
            "backend_reachable": True,
            "running_jobs": 0,
            "error": None,
        }
    for answer in unhealthy:
        assert answer.status_code == 503
        body = answer.json()
        assert body["status"] == "unavailable"
        assert body["upstream"] is False
        assert body["upstream_error"]


async def test_health_answers_503_when_the_processor_is_not_there() -> None:
    app = create_app(Settings(base_url="http://fake"))  # its lifespan does not run
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app), base_url="http://test"
    ) as client:
        answer = await client.get("/health")
        upload_answer = await upload(client, csv_bytes(1))
    assert answer.status_code == 503
    assert answer.json()["status"] == "unavailable"
    assert "lifespan" in answer.json()["error"]
    assert_envelope(upload_answer, 500, "internal_error")


# -- create_app and the schema ---------------------------------------------------------------


def clean_environment(monkeypatch) -> None:
    for name in ("REDIS_URL", "RATE_LIMIT_REQUESTS", "RATE_LIMIT_PERIOD", "RETRY_MAX_ATTEMPTS"):
        monkeypatch.delenv(name, raising=False)
    for name in ("REQUIRE_IDEMPOTENCY_KEY", "MAX_ROWS", "MAX_UPLOAD_BYTES", "REDIS_PREFIX"):
        monkeypatch.delenv("HOSPITAL_BULK_" + name, raising=False)


async def test_create_app_reads_its_options_from_the_environment(monkeypatch) -> None:
    clean_environment(monkeypatch)
    monkeypatch.setenv("HOSPITAL_API_BASE_URL", "http://127.0.0.1:9")  # never reached
    monkeypatch.setenv("HOSPITAL_BULK_REQUIRE_IDEMPOTENCY_KEY", "true")
    monkeypatch.setenv("HOSPITAL_BULK_MAX_ROWS", "2")
    monkeypatch.setenv("HOSPITAL_BULK_MAX_UPLOAD_BYTES", "500")
    app = create_app()
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://test") as client,
    ):
        no_key = await upload(client, csv_bytes(1))
        too_many = await upload(client, csv_bytes(3), key="k")
        too_large = await upload(client, b"x" * 501, key="k")
        validated = await upload(client, csv_bytes(2), path="/hospitals/bulk/validate")
    assert "Idempotency-Key" in assert_envelope(no_key, 400, "validation_error")["detail"]
    assert [e["code"] for e in too_many.json()["errors"]] == ["too_many_rows"]
    assert_envelope(too_large, 413, "payload_too_large")
    assert validated.json()["valid"] is True

    # Arguments win over the environment.
    app = create_app(max_rows=None, require_idempotency_key=False)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://test") as client,
    ):
        validated = await upload(client, csv_bytes(3), path="/hospitals/bulk/validate")
    assert validated.json()["valid"] is True


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("HOSPITAL_BULK_REQUIRE_IDEMPOTENCY_KEY", "maybe"),
        ("HOSPITAL_BULK_MAX_ROWS", "many"),
        ("HOSPITAL_BULK_MAX_UPLOAD_BYTES", "0"),
    ],
)
def test_create_app_refuses_wrong_environment_values(monkeypatch, name: str, value: str) -> None:
    clean_environment(monkeypatch)
    monkeypatch.setenv("HOSPITAL_API_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigurationError, match=name):
        create_app()


def test_create_app_needs_the_upstreams_url(monkeypatch) -> None:
    monkeypatch.delenv("HOSPITAL_API_BASE_URL", raising=False)
    with pytest.raises(ConfigurationError, match="HOSPITAL_API_BASE_URL"):
        create_app()


async def test_the_dry_run_reports_without_sending_anything() -> None:
    fake = new_fake()
    async with (
        make_processor(fake.transport()) as processor,
        serve(processor, max_rows=3) as client,
    ):
        good = await upload(
            client,
            b"name,address,phone\nA, 1 Main St ,555\nA,1 Main St,555\n",
            path="/hospitals/bulk/validate",
        )
        bad = await upload(client, b"name,address\n,1 Main St\n", path="/hospitals/bulk/validate")
        too_many = await upload(client, csv_bytes(4), path="/hospitals/bulk/validate")
    assert good.status_code == 200
    body = good.json()
    assert body["valid"] is True
    assert body["accepted"] is True
    assert body["rows"] == [
        {"row": 1, "line": 2, "name": "A", "address": "1 Main St", "phone": "555"},
        {"row": 2, "line": 3, "name": "A", "address": "1 Main St", "phone": "555"},
    ]
    assert [w["code"] for w in body["warnings"]] == ["duplicate_row"]
    assert body["columns"] == ["name", "address", "phone"]
    assert bad.status_code == 200
    assert bad.json()["valid"] is False
    assert bad.json()["accepted"] is False
    assert [(e["code"], e["row"], e["line"]) for e in bad.json()["errors"]] == [
        ("missing_value", 1, 2)
    ]
    assert too_many.status_code == 200
    assert [e["code"] for e in too_many.json()["errors"]] == ["too_many_rows"]
    assert fake.requests == []


def test_the_openapi_schema_documents_every_response() -> None:
    spec = create_app(processor=lambda: None).openapi()
    expected = {
        ("post", f"{API}/hospitals/bulk"): {"202", "400", "409", "413", "422", "500", "503"},
        ("post", f"{API}/hospitals/bulk/validate"): {"200", "400", "413", "500"},
        ("get", f"{API}/hospitals/status/{{job_id}}"): {"200", "404", "500", "503"},
        ("get", f"{API}/hospitals/status/{{job_id}}/events"): {"200", "404", "500", "503"},
        ("post", f"{API}/hospitals/bulk/{{job_id}}/resume"): {"202", "404", "409", "500", "503"},
        ("post", f"{API}/hospitals/bulk/{{job_id}}/rollback"): {
            "200",
            "404",
            "409",
            "500",
            "502",
            "503",
        },
        ("get", f"{API}/health"): {"200", "503"},
        ("get", "/health"): {"200", "503"},
    }
    schemas = spec["components"]["schemas"]
    assert "HTTPValidationError" not in schemas  # FastAPI's 422 is never answered
    for (method, path), codes in expected.items():
        responses = spec["paths"][path][method]["responses"]
        assert set(responses) == codes | {"4XX"}, (method, path)
        for code in codes - {"200", "202"}:
            content = responses[code]["content"]
            assert list(content) == ["application/json"], (method, path, code)
            ref = content["application/json"]["schema"]["$ref"].rsplit("/", 1)[-1]
            if path.endswith("health"):
                assert ref == "HealthResponse"
            elif code == "400":
                assert ref == "ValidationErrorResponse"
            else:
                assert ref == "ErrorResponse"
    assert set(schemas["ErrorResponse"]["properties"]["error_type"]["enum"]) == ENVELOPE_TYPES
    assert {"errors", "warnings"} <= set(schemas["ValidationErrorResponse"]["properties"])
    events = spec["paths"][f"{API}/hospitals/status/{{job_id}}/events"]["get"]["responses"]
    item = events["200"]["content"]["text/event-stream"]["itemSchema"]
    ref = item["properties"]["data"]["contentSchema"]["$ref"].rsplit("/", 1)[-1]
    assert ref in schemas
    assert ref == "JobEventData"
    ok = spec["paths"][f"{API}/hospitals/bulk"]["post"]["responses"]["202"]
    assert ok["content"]["application/json"]["schema"]["$ref"].endswith("/JobAccepted")
    body = spec["paths"][f"{API}/hospitals/bulk"]["post"]["requestBody"]
    assert list(body["content"]) == ["multipart/form-data"]


# -- over real HTTP --------------------------------------------------------------------------


@contextlib.contextmanager
def uvicorn_serving(app: Any) -> Iterator[str]:
    """Serve `app` with uvicorn on a free loopback port, in a thread (lifespan on)."""
    uvicorn = pytest.importorskip("uvicorn")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        log_level="warning",
        log_config=None,
        lifespan="on",
        ws="none",
        http="h11",
        loop="asyncio",
        timeout_graceful_shutdown=2,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            assert thread.is_alive(), "uvicorn failed to start"
            assert time.monotonic() < deadline, "uvicorn did not start in time"
            time.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
        assert not thread.is_alive()


def test_the_app_served_by_uvicorn_over_real_http() -> None:
    with FakeServer(create_latency=0.05, create_rate=None, other_rate=None) as upstream:
        settings = Settings(
            base_url=upstream.url,
            create_rate="1000/minute",
            other_rate="1000/minute",
            reconcile_after=0.01,
        )
        with (
            uvicorn_serving(create_app(settings)) as url,
            httpx.Client(base_url=url, timeout=10) as client,
        ):
            assert client.get("/health").json()["status"] == "ok"
            accepted = client.post(
                API + "/hospitals/bulk",
                files={"file": ("h.csv", csv_bytes(8))},
                headers={"Idempotency-Key": "over-http"},
            )
            assert accepted.status_code == 202, accepted.text
            location = accepted.headers["location"]
            assert location.startswith(url + API + "/hospitals/status/")

            # The event stream arrives as it is sent, and ends with the job.
            kinds = []
            with client.stream("GET", location + "/events") as stream:
                assert stream.headers["content-type"].startswith("text/event-stream")
                for line in stream.iter_lines():
                    if line.startswith("event: "):
                        kinds.append(line.removeprefix("event: "))
            assert kinds[0] == "snapshot"
            assert kinds[-1] == "job_finished" or kinds == ["snapshot"]

            with anyio.from_thread.start_blocking_portal() as portal:

                async def poll() -> dict[str, Any]:
                    async with httpx.AsyncClient(base_url=url, timeout=10) as aclient:
                        return await wait_for(aclient, location, "completed")

                status = portal.call(poll)
            assert status["result"]["processed_hospitals"] == 8
            replay = client.post(
                API + "/hospitals/bulk",
                files={"file": ("h.csv", csv_bytes(8))},
                headers={"Idempotency-Key": "over-http"},
            )
            assert replay.headers["idempotent-replayed"] == "true"
            assert replay.json()["job_id"] == accepted.json()["job_id"]
        hospitals = upstream.fake.hospitals
    assert len(hospitals) == 8
    assert all(h.active for h in hospitals)
    assert upstream.fake.duplicates() == []


async def test_an_unexpected_error_is_answered_in_the_envelope_without_its_text() -> None:
    from hospital_bulk.integrations.fastapi import create_router

    class Broken:
        settings = None

        async def status(self, job_id):
            raise RuntimeError("secret-token-123 leaked")

    from fastapi import FastAPI

    app = FastAPI()
    app.include_router(create_router(lambda: Broken()), prefix="/api/v1")  # type: ignore[arg-type,return-value]
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://service") as client,
    ):
        answer = await client.get("/api/v1/hospitals/status/j1")
    assert answer.status_code == 500
    assert answer.json()["error_type"] == "internal_error"
    assert "secret-token-123" not in answer.text
