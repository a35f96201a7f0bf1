"""HospitalDirectoryClient against respx: exact paths, parsing, and every outcome class."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import uuid

import anyio
import httpx
import pytest
import respx

from hospital_bulk import (
    AmbiguousOutcomeError,
    BatchAlreadyActiveError,
    BatchFullError,
    BatchNotFoundError,
    ConfigurationError,
    ContractError,
    HospitalCreate,
    HospitalDirectoryClient,
    HospitalNotFoundError,
    HospitalUpdate,
    Outcome,
    RateLimitedError,
    RejectedError,
    RequestNotSentError,
    UpstreamError,
    UpstreamValidationError,
)

pytestmark = pytest.mark.anyio

BASE = "http://directory.test"
BATCH = uuid.UUID("3F2504E0-4F89-11D3-9A0C-0305E82C3301")


def hospital_json(**overrides):
    body = {
        "id": 1,
        "name": "St. Mary",
        "address": "1 Main St",
        "phone": None,
        "creation_batch_id": str(BATCH).lower(),
        "active": False,
        "created_at": "2025-09-20T09:50:50.824234",
    }
    body.update(overrides)
    return body


@pytest.fixture
def api():
    with respx.mock(base_url=BASE, assert_all_called=False) as router:
        yield router


@pytest.fixture
async def client():
    async with HospitalDirectoryClient(BASE) as c:
        yield c


NEW = HospitalCreate(name="St. Mary", address="1 Main St", creation_batch_id=BATCH)


# -- applied: exact paths and parsed answers -------------------------------------------------


async def test_create_posts_to_the_exact_path_and_parses_the_hospital(api, client):
    route = api.post("/hospitals/").respond(200, json=hospital_json())
    hospital = await client.create_hospital(NEW)
    assert route.call_count == 1
    sent = route.calls.last.request
    assert sent.url.path == "/hospitals/"
    assert sent.read() == (
        b'{"name":"St. Mary","address":"1 Main St","phone":null,'
        b'"creation_batch_id":"3f2504e0-4f89-11d3-9a0c-0305e82c3301"}'
    )
    assert hospital.id == 1
    assert hospital.active is False
    assert hospital.creation_batch_id == BATCH
    assert hospital.created_at == dt.datetime(2025, 9, 20, 9, 50, 50, 824234)
    assert hospital.created_at.tzinfo is None


async def test_a_zoned_timestamp_is_made_naive_utc(api, client):
    api.get("/hospitals/7").respond(
        200, json=hospital_json(id=7, created_at="2025-09-20T11:50:50.1+02:00")
    )
    hospital = await client.get_hospital(7)
    assert hospital.created_at == dt.datetime(2025, 9, 20, 9, 50, 50, 100000)
    assert hospital.created_at.tzinfo is None


async def test_every_endpoint_uses_its_exact_path(api, client):
    batch = str(BATCH)
    routes = {
        "health": api.get("/").respond(200, json={"status": "OK"}),
        "list": api.get("/hospitals/").respond(200, json=[hospital_json()]),
        "get": api.get("/hospitals/5").respond(200, json=hospital_json(id=5)),
        "put": api.put("/hospitals/5").respond(200, json=hospital_json(id=5, name="New")),
        "delete": api.delete("/hospitals/5").respond(204),
        "batch": api.get(f"/hospitals/batch/{batch}").respond(200, json=[hospital_json()]),
        "activate": api.patch(f"/hospitals/batch/{batch}/activate").respond(
            200, json={"activated_count": 1, "message": "ok"}
        ),
        "delete_batch": api.delete(f"/hospitals/batch/{batch}").respond(
            200, json={"deleted_count": 1, "message": "ok"}
        ),
    }
    assert await client.health() is True
    assert [h.id for h in await client.list_hospitals()] == [1]
    assert (await client.get_hospital(5)).id == 5
    assert (await client.update_hospital(5, HospitalUpdate(name="New"))).name == "New"
    assert await client.delete_hospital(5) is None
    assert len(await client.list_batch(batch.upper())) == 1
    assert (await client.activate_batch(BATCH)).activated_count == 1
    assert (await client.delete_batch(BATCH)).deleted_count == 1
    for name, route in routes.items():
        assert route.call_count == 1, name
    assert routes["put"].calls.last.request.read() == b'{"name":"New"}'


async def test_base_url_path_prefix_is_kept(api):
    with respx.mock(base_url="http://gateway.test/api/v2") as prefixed:
        route = prefixed.post("/hospitals/").respond(200, json=hospital_json())
        async with HospitalDirectoryClient("http://gateway.test/api/v2/") as c:
            await c.create_hospital(NEW)
    assert route.calls.last.request.url.path == "/api/v2/hospitals/"


async def test_an_empty_or_unknown_batch_lists_as_empty(api, client):
    api.get(f"/hospitals/batch/{BATCH}").respond(
        404, json={"detail": "No hospitals found with the specified batch ID"}
    )
    assert await client.list_batch(BATCH) == []


# -- rejected --------------------------------------------------------------------------------


async def test_activation_of_an_unknown_batch_is_a_typed_batch_not_found(api, client):
    api.patch(f"/hospitals/batch/{BATCH}/activate").respond(
        404, json={"detail": "No hospitals found with the specified batch ID"}
    )
    with pytest.raises(BatchNotFoundError) as info:
        await client.activate_batch(BATCH)
    err = info.value
    assert (err.method, err.path, err.status_code) == (
        "PATCH",
        f"/hospitals/batch/{BATCH}/activate",
        404,
    )
    assert err.outcome is Outcome.REJECTED
    assert err.detail == "No hospitals found with the specified batch ID"


async def test_deleting_an_unknown_batch_is_batch_not_found(api, client):
    api.delete(f"/hospitals/batch/{BATCH}").respond(
        404, json={"detail": "No hospitals found with the specified batch ID"}
    )
    with pytest.raises(BatchNotFoundError):
        await client.delete_batch(BATCH)


async def test_reactivation_is_batch_already_active(api, client):
    api.patch(f"/hospitals/batch/{BATCH}/activate").respond(
        400,
        json={
            "detail": "Cannot activate batch: one or more hospitals in the batch are already active"
        },
    )
    with pytest.raises(BatchAlreadyActiveError) as info:
        await client.activate_batch(BATCH)
    assert info.value.outcome is Outcome.REJECTED
    assert info.value.safe_to_retry is False


async def test_a_full_batch_is_batch_full(api, client):
    api.post("/hospitals/").respond(400, json={"detail": "Batch cannot exceed 20 hospitals"})
    with pytest.raises(BatchFullError) as info:
        await client.create_hospital(NEW)
    assert info.value.status_code == 400
    assert "20" in str(info.value)


async def test_a_422_carries_the_upstream_error_list(api, client):
    detail = [
        {
            "type": "string_too_short",
            "loc": ["body", "name"],
            "msg": "String should have at least 1 character",
            "input": "",
        }
    ]
    api.post("/hospitals/").respond(422, json={"detail": detail})
    with pytest.raises(UpstreamValidationError) as info:
        await client.create_hospital(NEW)
    err = info.value
    assert err.detail == detail
    assert err.outcome is Outcome.REJECTED
    assert "body.name: String should have at least 1 character" in str(err)


async def test_missing_hospital_is_hospital_not_found(api, client):
    api.get("/hospitals/99").respond(404, json={"detail": "Hospital not found"})
    api.delete("/hospitals/99").respond(404, json={"detail": "Hospital not found"})
    with pytest.raises(HospitalNotFoundError):
        await client.get_hospital(99)
    with pytest.raises(HospitalNotFoundError) as info:
        await client.delete_hospital(99)
    assert info.value.method == "DELETE"


async def test_other_4xx_are_rejected(api, client):
    api.post("/hospitals/").respond(409, json={"detail": "Conflict"})
    with pytest.raises(RejectedError) as info:
        await client.create_hospital(NEW)
    assert info.value.status_code == 409
    assert info.value.outcome is Outcome.REJECTED
    assert info.value.detail == "Conflict"


async def test_a_route_404_says_the_base_url_may_be_wrong(api, client):
    api.get(f"/hospitals/batch/{BATCH}").respond(404, json={"detail": "Not Found"})
    with pytest.raises(ContractError) as info:
        await client.list_batch(BATCH)
    assert "base URL" in str(info.value)
    assert info.value.outcome is Outcome.REJECTED


async def test_a_redirect_is_never_followed(api, client):
    api.post("/hospitals/").respond(307, headers={"Location": f"{BASE}/elsewhere/"})
    with pytest.raises(ContractError) as info:
        await client.create_hospital(NEW)
    assert info.value.status_code == 307
    assert info.value.outcome is Outcome.REJECTED
    assert "redirect" in str(info.value)


# -- rate limited ----------------------------------------------------------------------------


async def test_a_429_is_rate_limited_with_the_window_from_its_body(api, client):
    api.post("/hospitals/").respond(429, json={"error": "Rate limit exceeded: 30 per 1 minute"})
    with pytest.raises(RateLimitedError) as info:
        await client.create_hospital(NEW)
    err = info.value
    assert err.outcome is Outcome.RATE_LIMITED
    assert err.detail == "Rate limit exceeded: 30 per 1 minute"
    assert err.retry_after is None
    assert err.window == 60.0
    assert err.safe_to_retry is True


@pytest.mark.parametrize(
    ("header", "expected"),
    [("7", 7.0), ("0.5", 0.5), ("-3", 0.0), ("soon", None)],
)
async def test_retry_after_in_seconds_is_honoured(api, client, header, expected):
    api.get("/").respond(429, headers={"Retry-After": header}, json={"error": "slow down"})
    with pytest.raises(RateLimitedError) as info:
        await client.health()
    assert info.value.retry_after == expected
    assert info.value.window is None


async def test_retry_after_as_a_date_is_honoured(api, client):
    when = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=120)
    header = when.strftime("%a, %d %b %Y %H:%M:%S GMT")
    api.get("/").respond(429, headers={"Retry-After": header})
    with pytest.raises(RateLimitedError) as info:
        await client.health()
    assert info.value.retry_after is not None
    assert 100 < info.value.retry_after <= 120


# -- not sent --------------------------------------------------------------------------------


@pytest.mark.parametrize("error", [httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout])
async def test_failures_before_sending_are_not_sent(api, client, error):
    api.post("/hospitals/").mock(side_effect=error("boom"))
    with pytest.raises(RequestNotSentError) as info:
        await client.create_hospital(NEW)
    err = info.value
    assert err.outcome is Outcome.NOT_SENT
    assert err.status_code is None
    assert err.safe_to_retry is True
    assert isinstance(err.__cause__, error)


# -- ambiguous -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "error",
    [
        httpx.ReadTimeout,
        httpx.WriteTimeout,
        httpx.ReadError,
        httpx.WriteError,
        httpx.RemoteProtocolError,
    ],
)
async def test_failures_after_sending_are_ambiguous(api, client, error):
    api.post("/hospitals/").mock(side_effect=error("boom"))
    with pytest.raises(AmbiguousOutcomeError) as info:
        await client.create_hospital(NEW)
    assert info.value.outcome is Outcome.AMBIGUOUS
    assert info.value.safe_to_retry is False
    assert info.value.status_code is None


@pytest.mark.parametrize(
    ("status", "body"),
    [(500, b""), (502, b"<html><body>Bad Gateway</body></html>"), (503, b"")],
)
async def test_5xx_is_ambiguous(api, client, status, body):
    api.post("/hospitals/").respond(status, content=body, headers={"Content-Type": "text/html"})
    with pytest.raises(AmbiguousOutcomeError) as info:
        await client.create_hospital(NEW)
    err = info.value
    assert err.status_code == status
    assert err.outcome is Outcome.AMBIGUOUS
    assert err.detail == (body.decode() or None)


async def test_a_5xx_on_a_read_is_safe_to_retry(api, client):
    api.get(f"/hospitals/batch/{BATCH}").respond(503)
    with pytest.raises(AmbiguousOutcomeError) as info:
        await client.list_batch(BATCH)
    assert info.value.safe_to_retry is True


async def test_a_2xx_that_breaks_the_contract_is_ambiguous(api, client):
    api.post("/hospitals/").respond(200, json={"unexpected": True})
    with pytest.raises(ContractError) as info:
        await client.create_hospital(NEW)
    assert info.value.outcome is Outcome.AMBIGUOUS
    assert info.value.status_code == 200
    assert info.value.path == "/hospitals/"


async def test_every_error_is_an_upstream_error_with_context(api, client):
    api.post("/hospitals/").respond(500)
    with pytest.raises(UpstreamError) as info:
        await client.create_hospital(NEW)
    text = str(info.value)
    assert text.startswith("POST /hospitals/ 500 (ambiguous)")
    assert "status_code=500" in repr(info.value)


# -- settings and hygiene --------------------------------------------------------------------


@pytest.mark.parametrize("url", ["", "directory.test", "ftp://directory.test", "http://"])
def test_a_bad_base_url_is_a_configuration_error(url):
    with pytest.raises(ConfigurationError):
        HospitalDirectoryClient(url)


@pytest.mark.parametrize("timeout", [0, -1, "30", True])
def test_a_bad_timeout_is_a_configuration_error(timeout):
    with pytest.raises(ConfigurationError, match="timeout"):
        HospitalDirectoryClient(BASE, timeout=timeout)


async def test_a_bad_batch_id_is_a_configuration_error(client):
    with pytest.raises(ConfigurationError, match="not a UUID"):
        await client.list_batch("batch-1")


async def test_a_redirect_following_http_client_is_refused():
    async with httpx.AsyncClient(follow_redirects=True) as http:
        with pytest.raises(ConfigurationError, match="redirects"):
            HospitalDirectoryClient(BASE, http_client=http)


async def test_default_timeouts_are_connect_10_read_30():
    async with HospitalDirectoryClient(BASE) as c:
        timeouts = {(lane.timeout.connect, lane.timeout.read) for lane in c._lanes}
    assert timeouts == {(10.0, 30.0)}
    assert all(lane.is_closed for lane in c._lanes)


async def test_an_injected_http_client_is_left_open(api):
    api.get("/").respond(200, json={"status": "OK"})
    async with httpx.AsyncClient(base_url=BASE) as http:
        async with HospitalDirectoryClient(BASE, http_client=http) as c:
            assert await c.health() is True
        assert not http.is_closed


async def test_secrets_and_bodies_are_never_logged(api, caplog):
    api.post("/hospitals/").respond(200, json=hospital_json())
    caplog.set_level(logging.DEBUG, logger="hospital_bulk")
    headers = {"Authorization": "Bearer s3cret-token", "X-API-Key": "k3y"}
    async with HospitalDirectoryClient(BASE, headers=headers) as c:
        await c.create_hospital(NEW)
    assert api.calls.last.request.headers["Authorization"] == "Bearer s3cret-token"
    assert "POST /hospitals/ -> 200" in caplog.text
    for secret in ("s3cret-token", "k3y", "St. Mary", "1 Main St"):
        assert secret not in caplog.text


async def test_concurrent_warm_ups_send_one_request(api, client):
    route = api.get("/").respond(200, json={"status": "OK"})
    async with anyio.create_task_group() as tg:
        for _ in range(5):
            tg.start_soon(client.warm_up)
    assert route.call_count == 1
    await client.warm_up(fresh_for=0.0)
    assert route.call_count == 2


async def test_warm_up_uses_its_own_long_timeout(api, client):
    route = api.get("/").respond(200, json={"status": "OK"})
    await client.warm_up(timeout=95.0)
    assert route.calls.last.request.extensions["timeout"]["read"] == 95.0


# -- the connection pool's layout ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("total", "sizes"),
    [(8, [8]), (9, [5, 4]), (24, [8, 8, 8]), (40, [8, 8, 8, 8, 8]), (68, [8] * 5 + [7] * 4)],
)
def test_a_large_pool_is_split_into_lanes_of_at_most_eight_connections(total, sizes):
    from hospital_bulk._client import _lane_limits

    lanes = _lane_limits(httpx.Limits(max_connections=total, max_keepalive_connections=total))
    assert [lane.max_connections for lane in lanes] == sizes
    assert sum(lane.max_connections for lane in lanes) == total
    assert all(lane.max_keepalive_connections <= lane.max_connections for lane in lanes)


def test_an_unbounded_pool_stays_one_lane():
    from hospital_bulk._client import _lane_limits

    limits = httpx.Limits(max_connections=None)
    assert _lane_limits(limits) == [limits]


async def test_requests_in_flight_are_spread_over_the_lanes_and_counted_back(api):
    release = anyio.Event()
    started = 0

    async def held(request):
        nonlocal started
        started += 1
        await release.wait()
        return httpx.Response(200, json=hospital_json())

    api.post("/hospitals/").mock(side_effect=held)
    limits = httpx.Limits(max_connections=24, max_keepalive_connections=24)
    async with HospitalDirectoryClient(BASE, limits=limits) as client:
        assert len(client._lanes) == 3
        async with anyio.create_task_group() as tg:
            for _ in range(12):
                tg.start_soon(client.create_hospital, NEW)
            with anyio.fail_after(5):
                while started < 12:
                    await anyio.sleep(0.01)
            assert client._busy == [4, 4, 4]
            release.set()
        assert client._busy == [0, 0, 0]
        # A failed request gives its lane back too.
        api.post("/hospitals/").mock(side_effect=httpx.ConnectError("refused"))
        with pytest.raises(RequestNotSentError):
            await client.create_hospital(NEW)
        assert client._busy == [0, 0, 0]


async def test_the_lanes_share_one_tls_context_and_an_injected_transport_is_one_lane():
    limits = httpx.Limits(max_connections=32, max_keepalive_connections=32)
    async with HospitalDirectoryClient("https://directory.test", limits=limits) as client:
        contexts = {id(lane._transport._pool._ssl_context) for lane in client._lanes}
        assert len(client._lanes) == 4
        assert len(contexts) == 1
    transport = httpx.MockTransport(lambda request: httpx.Response(200, json={"status": "OK"}))
    async with HospitalDirectoryClient(BASE, limits=limits, transport=transport) as client:
        assert len(client._lanes) == 1
        assert await client.health()


async def test_a_connection_the_server_closed_while_idle_is_not_reused():
    # The pool checks idle connections through the client's own network stream, which keeps
    # its socket; a server closing a kept-alive connection must be noticed before reuse.
    from hospital_bulk._client import _Backend

    peers: list[int] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peers.append(writer.get_extra_info("peername")[1])
        await reader.readuntil(b"\r\n\r\n")
        body = b'{"status": "OK"}'
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n%s" % (len(body), body)
        )
        await writer.drain()
        writer.close()  # kept alive as far as the client knows, then closed

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        limits = httpx.Limits(max_connections=16, max_keepalive_connections=16)
        async with HospitalDirectoryClient(f"http://127.0.0.1:{port}", limits=limits) as client:
            assert all(
                isinstance(lane._transport._pool._network_backend, _Backend)
                for lane in client._lanes
            )
            for _ in range(4):
                assert await client.health()
                await anyio.sleep(0.05)  # the close reaches the client's socket
    finally:
        server.close()
        await server.wait_closed()
    assert len(set(peers)) == 4


async def test_the_client_stream_tells_a_closed_idle_connection_from_an_open_one():
    import httpcore

    from hospital_bulk._client import _Backend

    closing = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await closing.wait()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        stream = await _Backend(httpcore.AnyIOBackend()).connect_tcp("127.0.0.1", port)
        assert stream._socket is not None  # the check is answered by the cached socket
        assert stream.get_extra_info("is_readable") is False
        closing.set()
        with anyio.fail_after(5):
            while not stream.get_extra_info("is_readable"):
                await anyio.sleep(0.01)
        await stream.aclose()
    finally:
        server.close()
        await server.wait_closed()
