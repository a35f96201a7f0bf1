"""The fake Hospital Directory API served by uvicorn on 127.0.0.1, with a real httpx client."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

import hospital_bulk
import hospital_bulk.testing as testing
from hospital_bulk import _fake
from hospital_bulk.testing import FakeDirectory, FakeServer, Fault, Faults

pytest.importorskip("uvicorn")

BATCH = "3f2b8c1e-5d4a-4c6b-9e7f-0a1b2c3d4e5f"
ROW = {"name": "General", "address": "1 Main St", "phone": "555-0100"}
PACKAGE_ROOT = Path(hospital_bulk.__file__).resolve().parent.parent


def _server_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("hospital-bulk-fake-")]


def _port_is_closed(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(0.5)
        return probe.connect_ex(("127.0.0.1", port)) != 0


@pytest.fixture(autouse=True)
def no_leftovers() -> Iterator[None]:
    before = set(threading.enumerate())
    yield
    assert _server_threads() == []
    assert set(threading.enumerate()) <= before


def client_for(server: FakeServer, **timeouts: Any) -> httpx.AsyncClient:
    timeout = httpx.Timeout(5.0, **timeouts)
    return httpx.AsyncClient(base_url=server.url, timeout=timeout)


@pytest.mark.anyio
async def test_a_sweep_of_the_contract_over_http() -> None:
    async with FakeServer(create_latency=0.01) as server, client_for(server) as client:
        assert server.url.startswith("http://127.0.0.1:")
        root = await client.get("/")
        created = await client.post("/hospitals/", json={**ROW, "creation_batch_id": BATCH})
        redirected = await client.post("/hospitals", json=ROW)
        missing_batch = await client.get("/hospitals/batch/9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d")
        batch = await client.get(f"/hospitals/batch/{BATCH.upper()}")
        first = await client.patch(f"/hospitals/batch/{BATCH}/activate")
        second = await client.patch(f"/hospitals/batch/{BATCH}/activate")
        invalid = await client.post("/hospitals/", json={**ROW, "name": "  "})
        not_found = await client.get("/hospitals/99")
        wrong_method = await client.patch("/hospitals/")
        unknown = await client.get("/nowhere")
        deleted = await client.delete("/hospitals/1")
    assert root.json() == {"status": "OK"}
    assert created.status_code == 200
    assert created.json()["active"] is False
    assert redirected.status_code == 307
    assert redirected.headers["location"] == f"{server.url}/hospitals/"
    assert missing_batch.status_code == 404
    assert missing_batch.json() == {"detail": "No hospitals found with the specified batch ID"}
    assert [h["id"] for h in batch.json()] == [1]
    assert first.json()["activated_count"] == 1
    assert second.status_code == 400
    assert second.json() == {
        "detail": "Cannot activate batch: one or more hospitals in the batch are already active"
    }
    assert invalid.status_code == 422
    assert invalid.json()["detail"][0]["loc"] == ["body", "name"]
    assert not_found.json() == {"detail": "Hospital not found"}
    assert wrong_method.status_code == 405
    assert unknown.json() == {"detail": "Not Found"}
    assert deleted.status_code == 204
    assert deleted.content == b""
    assert server.fake.hospitals == []
    assert [r.client for r in server.fake.requests] == ["127.0.0.1"] * 12
    assert _port_is_closed(server.port)


@pytest.mark.anyio
async def test_the_rate_limit_over_http() -> None:
    async with FakeServer(create_rate=(3, 60.0)) as server, client_for(server) as client:
        statuses = [(await client.post("/hospitals/", json=ROW)).status_code for _ in range(3)]
        limited = await client.post("/hospitals/", json=ROW)
        # Another client address (uvicorn trusts X-Forwarded-For from loopback).
        elsewhere = await client.post(
            "/hospitals/", json=ROW, headers={"x-forwarded-for": "127.0.0.2"}
        )
    assert statuses == [200, 200, 200]
    assert elsewhere.status_code == 200
    assert server.fake.creates()[-1].client == "127.0.0.2"
    assert limited.status_code == 429
    assert limited.json() == {"error": "Rate limit exceeded: 3 per 1 minute"}
    assert "retry-after" not in limited.headers
    assert len(server.fake.hospitals) == 4


@pytest.mark.anyio
async def test_the_racy_batch_cap_over_http() -> None:
    server = FakeServer(create_latency=0.2, create_rate=None)
    statuses: list[int] = []
    async with server, client_for(server) as client:

        async def one(i: int) -> None:
            body = {**ROW, "name": f"H{i}", "creation_batch_id": BATCH}
            statuses.append((await client.post("/hospitals/", json=body)).status_code)

        started = time.monotonic()
        async with anyio.create_task_group() as tg:
            for i in range(22):
                tg.start_soon(one, i)
        elapsed = time.monotonic() - started
    assert statuses == [200] * 22
    assert len(server.fake.batch(BATCH)) == 22
    assert elapsed < 2.0  # in parallel, not 22 x 0.2 s


@pytest.mark.anyio
async def test_timeout_after_commit_over_http() -> None:
    fake = FakeDirectory(faults=Faults(hang=3.0))
    fake.inject(Fault.TIMEOUT_AFTER_COMMIT)
    async with FakeServer(fake) as server:
        async with client_for(server, read=0.5) as client:
            started = time.monotonic()
            with pytest.raises(httpx.ReadTimeout):
                await client.post("/hospitals/", json=ROW)
            waited = time.monotonic() - started
            listed = await client.get("/hospitals/")
        assert len(listed.json()) == 1
        stopping = time.monotonic()
    assert 0.4 < waited < 2.0
    assert time.monotonic() - stopping < 2.0
    assert [(r.fault, r.committed) for r in fake.creates()] == [("timeout_after_commit", True)]


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("method", "path", "body"),
    [("POST", "/hospitals/", ROW), ("DELETE", "/hospitals/1", None)],
)
async def test_reset_after_commit_over_http(
    method: str, path: str, body: dict[str, str] | None
) -> None:
    fake = FakeDirectory()
    async with FakeServer(fake) as server, client_for(server) as client:
        if method == "DELETE":
            await client.post("/hospitals/", json=ROW)
        before = len(fake.hospitals)
        fake.inject(Fault.RESET_AFTER_COMMIT, route=None)
        with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
            await client.request(method, path, json=body)
        after = len(fake.hospitals)
        follow_up = await client.get("/")
    assert after == before + (1 if method == "POST" else -1)
    assert follow_up.status_code == 200
    assert fake.requests[-2].committed is True
    assert fake.requests[-2].status is None


@pytest.mark.anyio
async def test_down_and_error_are_proxy_pages_over_http() -> None:
    fake = FakeDirectory(faults=Faults(down=True))
    async with FakeServer(fake) as server, client_for(server) as client:
        down = await client.post("/hospitals/", json=ROW)
        root_down = await client.get("/")
        fake.faults = Faults()
        fake.inject(Fault.ERROR)
        error = await client.post("/hospitals/", json=ROW)
    assert down.status_code == 502
    assert root_down.status_code == 502
    assert down.headers["content-type"].startswith("text/html")
    assert error.status_code == 503
    assert "<html>" in error.text
    assert fake.hospitals == []
    assert [r.status for r in fake.requests] == [502, 502, 503]


@pytest.mark.anyio
async def test_control_endpoints_over_http() -> None:
    async with FakeServer(seed=99) as server, client_for(server) as client:
        await client.post("/hospitals/", json=ROW)
        state = (await client.get("/__fake__/state")).json()
        set_down = await client.put("/__fake__/faults", json={"down": True})
        down = await client.get("/")
        await client.put("/__fake__/faults", json={})
        await client.post(
            "/__fake__/inject", json={"fault": "error", "route": "create", "times": 2}
        )
        errors = [(await client.post("/hospitals/", json=ROW)).status_code for _ in range(3)]
        await client.post("/__fake__/restart")
        restarted = (await client.post("/hospitals/", json=ROW)).json()["id"]
        await client.post("/__fake__/reset")
        after_reset = (await client.get("/__fake__/state")).json()
        rejected = await client.put("/__fake__/faults", json={"hang": -1})
    assert state["seed"] == 99
    assert [h["name"] for h in state["hospitals"]] == ["General"]
    assert state["requests"][0]["status"] == 200
    assert set_down.json()["down"] is True
    assert down.status_code == 502
    assert errors == [503, 503, 200]
    assert restarted == 1
    assert after_reset["hospitals"] == []
    assert after_reset["requests"] == []
    assert rejected.status_code == 400


def test_sync_context_manager_and_settings() -> None:
    with FakeServer(create_latency=0.0, batch_cap=1) as server:
        assert server.fake.create_latency == 0.0
        with httpx.Client(base_url=server.url) as client:
            ok = client.post("/hospitals/", json={**ROW, "creation_batch_id": BATCH})
            full = client.post("/hospitals/", json={**ROW, "creation_batch_id": BATCH})
        port = server.port
    assert ok.status_code == 200
    assert full.json() == {"detail": "Batch cannot exceed 1 hospitals"}
    assert _port_is_closed(port)
    with pytest.raises(ValueError, match="either a fake or settings"):
        FakeServer(FakeDirectory(), create_latency=1.0)


def test_a_missing_uvicorn_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvicorn", None)
    with pytest.raises(ImportError, match=r'pip install "hospital-bulk\[testing\]"'):
        FakeServer()


def test_command_line_help() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "hospital_bulk.testing", "--help"],
        cwd=PACKAGE_ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    for option in (
        "--create-latency",
        "--seed",
        "--no-rate-limits",
        "--port",
        "--max-log",
        "--http",
    ):
        assert option in result.stdout


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_command_line_serves_the_fake() -> None:
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(PACKAGE_ROOT)}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "hospital_bulk.testing",
            "--port",
            str(port),
            "--create-latency",
            "0",
            "--seed",
            "5",
            "--no-rate-limits",
            "--log-level",
            "warning",
        ],
        cwd=PACKAGE_ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        with httpx.Client(base_url=url, timeout=2.0) as client:
            while True:
                try:
                    root = client.get("/")
                    break
                except httpx.TransportError:
                    assert process.poll() is None, "the fake exited early"
                    assert time.monotonic() < deadline, "the fake did not start"
                    time.sleep(0.05)
            statuses = [client.post("/hospitals/", json=ROW).status_code for _ in range(35)]
            state = client.get("/__fake__/state").json()
    finally:
        process.send_signal(signal.SIGINT)
        try:
            _, stderr = process.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            _, stderr = process.communicate()
    assert root.json() == {"status": "OK"}
    assert statuses == [200] * 35  # --no-rate-limits
    assert state["seed"] == 5
    assert "seed 5" in stderr
    assert process.returncode == 0


@contextlib.contextmanager
def _served_command(*options: str) -> Iterator[httpx.Client]:
    """``python -m hospital_bulk.testing <options>`` on a free port, with a client for it."""
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(PACKAGE_ROOT)}
    command = [sys.executable, "-m", "hospital_bulk.testing", "--port", str(port), *options]
    process = subprocess.Popen(
        command, cwd=PACKAGE_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 20
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5.0) as client:
            while True:
                try:
                    client.get("/__fake__/state")
                    break
                except httpx.TransportError:
                    assert process.poll() is None, "the fake exited early"
                    assert time.monotonic() < deadline, "the fake did not start"
                    time.sleep(0.05)
            yield client
    finally:
        process.send_signal(signal.SIGINT)
        try:
            _, stderr = process.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            _, stderr = process.communicate()
    assert process.returncode == 0, stderr
    assert b"Traceback" not in stderr, stderr


@pytest.mark.parametrize("http", ["auto", "h11", "httptools"])
def test_command_line_http_parsers_serve_the_same_fake(http: str) -> None:
    if http == "httptools":
        pytest.importorskip("httptools")
    options = ["--create-latency", "0", "--no-rate-limits", "--log-level", "warning"]
    with _served_command(*options, "--http", http, "--max-log", "4", "--hang", "0.2") as client:
        created = client.post("/hospitals/", json={**ROW, "creation_batch_id": BATCH.upper()})
        listed = client.get(f"/hospitals/batch/{BATCH}")
        client.post("/__fake__/inject", json={"fault": "reset_after_commit"})
        with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
            client.post("/hospitals/", json=ROW)
        client.post("/__fake__/inject", json={"fault": "timeout_after_commit"})
        with pytest.raises(httpx.ReadTimeout):
            client.post("/hospitals/", json=ROW, timeout=0.05)
        late = client.post("/hospitals/", json=ROW)
        activated = client.patch(f"/hospitals/batch/{BATCH}/activate")
        state = client.get("/__fake__/state").json()
    assert created.status_code == 200
    assert [h["name"] for h in listed.json()] == ["General"]
    assert late.status_code == 200
    assert activated.json()["activated_count"] == 1
    assert len(state["hospitals"]) == 4
    # Six requests were recorded (control requests never are); the log keeps the last four.
    assert state["requests_dropped"] == 2
    assert [(r["route"], r["status"], r["committed"]) for r in state["requests"]] == [
        ("create", None, True),  # reset after commit
        ("create", None, True),  # timed out after commit; the client went away
        ("create", 200, True),
        ("batch_activate", 200, True),
    ]


def test_command_line_http_httptools_needs_httptools(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, package: str | None = None) -> Any:
        return None if name == "httptools" else real_find_spec(name, package)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(SystemExit) as exited:
        testing.main(["--http", "httptools"])
    assert exited.value.code == 2
    assert "--http httptools needs httptools: pip install httptools" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("log_level", "access_log"),
    [("warning", False), ("error", False), ("info", True), ("debug", True), ("trace", True)],
)
def test_serve_passes_the_http_choice_and_skips_an_access_log_nobody_sees(
    monkeypatch: pytest.MonkeyPatch, log_level: str, access_log: bool
) -> None:
    import uvicorn

    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: calls.append(kwargs))
    monkeypatch.setattr(_fake, "_DropSimulatedResets", lambda: logging.Filter())
    _fake.serve(FakeDirectory(), port=1, log_level=log_level, http="h11")
    assert [(c["http"], c["log_level"], c["access_log"]) for c in calls] == [
        ("h11", log_level, access_log)
    ]
