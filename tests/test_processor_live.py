"""The processor against the fake upstream served by uvicorn on loopback, with real timing.

These tests take real seconds (the upstream's creates take 5 s): they prove the defaults sit
on the upstream's limits without crossing them. Counting is done at the fake.
"""

from __future__ import annotations

import time

import pytest
from helpers import csv_bytes, max_in_any_window

from hospital_bulk import AsyncBulkProcessor, JobStatus, RowState
from hospital_bulk.testing import FakeServer

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


async def test_20_rows_with_the_real_timing_complete_in_one_create_latency():
    # The upstream as it is: 5 s per create, 30 creates a minute, 20 rows per batch.
    with FakeServer(create_latency=5.0) as server:
        started = time.perf_counter()
        async with AsyncBulkProcessor(server.url) as processor:
            result = await processor.process(csv_bytes(20))
        elapsed = time.perf_counter() - started
        fake = server.fake
        assert result.status is JobStatus.COMPLETED
        assert {h.status for h in result.hospitals} == {RowState.CREATED_AND_ACTIVATED}
        assert elapsed <= 7.0, f"took {elapsed:.2f} s"
        assert fake.duplicates() == []
        assert len(fake.hospitals) == 20
        assert all(h.active for h in fake.hospitals)
        assert [r for r in fake.requests if r.status == 429] == []


async def test_45_rows_under_10_per_6_seconds_never_cross_the_limit():
    with FakeServer(create_latency=0.2, create_rate=(10, 6.0)) as server:
        async with AsyncBulkProcessor(server.url, create_rate="10/6 seconds") as processor:
            result = await processor.process(csv_bytes(45))
        fake = server.fake
        assert result.status is JobStatus.COMPLETED
        assert len(result.batch_ids) == 3
        assert sorted(len(fake.batch(b)) for b in result.batch_ids) == [5, 20, 20]
        assert all(h.active for h in fake.hospitals)
        assert fake.duplicates() == []
        creates = [r.arrived_at for r in fake.requests if r.route == "create"]
        assert len(creates) == 45
        assert max_in_any_window(creates, 6.0) <= 10
        assert [r for r in fake.requests if r.status == 429] == []
