"""Shared fixtures for the hospital_bulk test suite."""

from __future__ import annotations

import pytest


@pytest.fixture
def anyio_backend() -> str:
    """Run `@pytest.mark.anyio` tests on asyncio (the backend services and notebooks use)."""
    return "asyncio"
