"""Shared fixtures for the hospital_bulk test suite."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
from redis_support import answers, database_url, delete_prefix, redis_server


@pytest.fixture
def anyio_backend() -> str:
    """Run `@pytest.mark.anyio` tests on asyncio (the backend services and notebooks use)."""
    return "asyncio"


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """The URL of a real Redis database the tests own (see `redis_support`).

    The configured server (``REDIS_URL``, default 127.0.0.1:6379) when it answers; otherwise a
    private server started for the session. In CI (``CI=true``) a missing server fails the
    test instead: the Redis backends are never left untested there.
    """
    url = database_url()
    if answers(url):
        yield url
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"no Redis answers at {url}, and CI must test the Redis backends")
    try:
        with redis_server() as server:
            yield server.url
    except RuntimeError as exc:
        pytest.skip(f"no Redis at {url} and none could be started: {exc}")


@pytest.fixture
def redis_prefix(redis_url: str) -> Iterator[str]:
    """A key prefix of this test's own; its keys are deleted afterwards."""
    prefix = f"hbtest-{uuid.uuid4().hex[:12]}"
    yield prefix
    delete_prefix(redis_url, prefix)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Show the figures tests recorded (e.g. the exactly-once suite's totals) in every run."""
    from helpers import SUMMARY_LINES

    if SUMMARY_LINES:
        terminalreporter.section("hospital_bulk figures")
        for line in SUMMARY_LINES:
            terminalreporter.write_line(line)
