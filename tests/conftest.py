"""Shared fixtures for the hospital_bulk test suite."""

from __future__ import annotations

import pytest


@pytest.fixture
def anyio_backend() -> str:
    """Run `@pytest.mark.anyio` tests on asyncio (the backend services and notebooks use)."""
    return "asyncio"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Show the figures tests recorded (e.g. the exactly-once suite's totals) in every run."""
    from helpers import SUMMARY_LINES

    if SUMMARY_LINES:
        terminalreporter.section("hospital_bulk figures")
        for line in SUMMARY_LINES:
            terminalreporter.write_line(line)
