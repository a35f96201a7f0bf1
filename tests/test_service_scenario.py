"""The bulk service's done-when, as an outside script would check it.

The fake upstream runs as its own process (``python -m hospital_bulk.testing``) and the service
as another (``uvicorn hospital_bulk.integrations.fastapi:create_app --factory``), configured by
environment variables only; the test talks to both over plain HTTP.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import httpx
import pytest
from helpers import csv_bytes

import hospital_bulk

pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

pytestmark = pytest.mark.slow

PACKAGE_ROOT = Path(hospital_bulk.__file__).resolve().parent.parent
API = "/api/v1"
ROWS = 15


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Process:
    """A child process whose output goes to a file, stopped (and if need be killed) at the end."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.name = name
        self.log_path = log
        self._log: IO[bytes] = log.open("wb")
        self.process = subprocess.Popen(
            argv, cwd=PACKAGE_ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT
        )

    def output(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def wait_until_answering(self, url: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=2.0) as client:
            while True:
                try:
                    if client.get(url).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                if self.process.poll() is not None:
                    pytest.fail(f"{self.name} exited early:\n{self.output()}")
                if time.monotonic() > deadline:
                    pytest.fail(f"{self.name} did not start in {timeout} s:\n{self.output()}")
                time.sleep(0.05)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self._log.close()


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[list[Process]]:
    started: list[Process] = []
    try:
        yield started
    finally:
        for process in reversed(started):
            process.stop()


def _clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without the service's own variables, plus `extra`."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("HOSPITAL_", "REDIS_URL", "RATE_LIMIT_", "RETRY_", "CIRCUIT_"))
    }
    env["PYTHONPATH"] = str(PACKAGE_ROOT)
    env.update(extra)
    return env


def _wait_for_status(client: httpx.Client, url: str, status: str) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while True:
        answer = client.get(url)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        if body["status"] == status:
            return body
        assert body["status"] in ("pending", "running", "activating"), body
        assert time.monotonic() < deadline, f"the job is still {body['status']}"
        time.sleep(0.05)


def _start_fake(processes: list[Process], tmp_path: Path) -> str:
    fake_port = _free_port()
    fake_url = f"http://127.0.0.1:{fake_port}"
    fake = Process(
        "the fake upstream",
        [
            sys.executable,
            "-m",
            "hospital_bulk.testing",
            "--port",
            str(fake_port),
            "--create-latency",
            "0.05",
            "--seed",
            "11",
            "--log-level",
            "warning",
        ],
        _clean_env(),
        tmp_path / "fake.log",
    )
    processes.append(fake)
    fake.wait_until_answering(fake_url + "/__fake__/state")
    return fake_url


def _start_service(processes: list[Process], tmp_path: Path, app: str, env: dict[str, str]) -> str:
    app_port = _free_port()
    app_url = f"http://127.0.0.1:{app_port}"
    service = Process(
        "the service",
        [
            sys.executable,
            "-m",
            "uvicorn",
            app,
            "--factory",
            "--host",
            "127.0.0.1",
            "--port",
            str(app_port),
            "--log-level",
            "warning",
        ],
        env,
        tmp_path / "service.log",
    )
    processes.append(service)
    service.wait_until_answering(app_url + "/openapi.json")
    return app_url


def test_the_service_loads_a_file_exactly_once(processes: list[Process], tmp_path: Path) -> None:
    fake_url = _start_fake(processes, tmp_path)
    # The upstream's real budget (30 creates a minute), given the way the original service
    # reads it; jobs run in the service's own process, with the memory backend.
    env = _clean_env(
        HOSPITAL_API_BASE_URL=fake_url, RATE_LIMIT_REQUESTS="30", RATE_LIMIT_PERIOD="60"
    )
    app_url = _start_service(
        processes, tmp_path, "hospital_bulk.integrations.fastapi:create_app", env
    )
    _scenario(app_url, fake_url)


def test_the_service_with_jobs_on_a_celery_worker(
    processes: list[Process], tmp_path: Path, redis_url: str, redis_prefix: str
) -> None:
    """The same scenario; the service hands each job to a real Celery worker process."""
    from redis_support import delete_prefix

    fake_url = _start_fake(processes, tmp_path)
    broker = redis_url.rsplit("/", 1)[0] + "/12"
    celery_keys = f"hbcelery-{redis_prefix}:"
    env = _clean_env(
        HOSPITAL_API_BASE_URL=fake_url,
        RATE_LIMIT_REQUESTS="30",
        RATE_LIMIT_PERIOD="60",
        REDIS_URL=redis_url,
        HOSPITAL_BULK_REDIS_PREFIX=redis_prefix,
        HB_CELERY_BROKER=broker,
        HB_CELERY_QUEUE=f"hbcelery-{redis_prefix}",
        HB_CELERY_KEYPREFIX=celery_keys,
    )
    env["PYTHONPATH"] = os.pathsep.join([str(PACKAGE_ROOT / "tests"), str(PACKAGE_ROOT)])
    try:
        worker = Process(
            "the celery worker",
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "celery_app",
                "worker",
                "--pool=solo",
                "--concurrency=1",
                "-Q",
                env["HB_CELERY_QUEUE"],
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
                "--loglevel=INFO",
            ],
            env,
            tmp_path / "worker.log",
        )
        processes.append(worker)
        app_url = _start_service(processes, tmp_path, "celery_app:web", env)
        result = _scenario(app_url, fake_url)
        # The worker ran the job (the service only handed it over), and only once.
        log = worker.output()
        assert worker.process.poll() is None, log
        assert log.count("hospital_bulk.run_job[") == 2, log  # received, then succeeded
        assert "succeeded" in log, log
        assert result["job_id"] in log, log
    finally:
        for process in reversed(processes):
            process.stop()
        delete_prefix(broker, celery_keys)


def _scenario(app_url: str, fake_url: str) -> dict[str, Any]:
    """Upload, poll, replay, conflict, bad file; then check at the fake. Returns the result."""
    data = csv_bytes(ROWS)
    key = {"Idempotency-Key": "scenario-upload-1"}
    with httpx.Client(base_url=app_url, timeout=10.0) as client:
        assert client.get("/health").json()["status"] == "ok"

        accepted = client.post(
            API + "/hospitals/bulk", files={"file": ("hospitals.csv", data)}, headers=key
        )
        assert accepted.status_code == 202, accepted.text
        job = accepted.json()
        assert job["status"] == "pending"
        assert job["total_hospitals"] == ROWS
        location = accepted.headers["location"]
        assert location == f"{app_url}{API}/hospitals/status/{job['job_id']}"

        done = _wait_for_status(client, location, "completed")
        result: dict[str, Any] = done["result"]
        assert result["processed_hospitals"] == ROWS
        assert result["failed_hospitals"] == 0
        assert result["batch_activated"] is True
        assert {h["status"] for h in result["hospitals"]} == {"created_and_activated"}

        replay = client.post(
            API + "/hospitals/bulk", files={"file": ("hospitals.csv", data)}, headers=key
        )
        assert replay.status_code == 202
        assert replay.headers["idempotent-replayed"] == "true"
        assert replay.json()["job_id"] == job["job_id"]

        other_file = client.post(
            API + "/hospitals/bulk",
            files={"file": ("hospitals.csv", csv_bytes(ROWS, start=1000))},
            headers=key,
        )
        assert other_file.status_code == 422, other_file.text
        assert other_file.json()["error_type"] == "conflict"

        bad = client.post(
            API + "/hospitals/bulk",
            files={"file": ("bad.csv", b"name,address,phone\n,1 Main St,555\nGood,,\n")},
        )
        assert bad.status_code == 400, bad.text
        assert bad.json()["error_type"] == "validation_error"
        assert [(e["code"], e["row"], e["line"], e["column"]) for e in bad.json()["errors"]] == [
            ("missing_value", 1, 2, "name"),
            ("missing_value", 2, 3, "address"),
        ]

    with httpx.Client(base_url=fake_url, timeout=10.0) as client:
        state = client.get("/__fake__/state").json()
    hospitals = state["hospitals"]
    wanted = Counter((f"Hospital {i}", f"{i} Main Street", f"555-{i:04d}") for i in range(1, 16))
    held = Counter((h["name"], h["address"], h["phone"]) for h in hospitals)
    assert held == wanted, "every row exactly once, and nothing else"
    assert all(h["active"] for h in hospitals)
    assert {h["creation_batch_id"] for h in hospitals} == {str(b) for b in result["batch_ids"]}
    creates = [r for r in state["requests"] if r["route"] == "create"]
    assert len(creates) == ROWS, "one create per row: the replay and the refused files sent none"
    assert all(r["committed"] for r in creates)
    return result
