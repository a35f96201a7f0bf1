"""The benchmarks in ``bench/`` still run: each script once, on a tiny job, end to end.

These are not measurements (the figures of such small runs mean nothing); they keep the
scripts working as the library changes, and check that each writes its JSON report and the
Markdown table the documentation includes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"

pytestmark = pytest.mark.slow


def run_bench(script: str, *args: str, timeout: float = 240) -> None:
    completed = subprocess.run(
        [sys.executable, str(BENCH / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]


def test_throughput_runs_every_variant(tmp_path, redis_url):
    out = tmp_path / "throughput.json"
    run_bench(
        "throughput.py",
        "--rows", "60", "--in-flight", "4,16", "--latency", "0.01",
        "--repeat", "1", "--warmup", "0", "--redis-url", redis_url, "--json", str(out),
    )  # fmt: skip
    report = json.loads(out.read_text())
    assert set(report["levels"]) == {"4", "16"}
    for level in report["levels"].values():
        assert set(level["results"]) == {"bare", "bare_split", "memory", "redis"}
        assert level["ratios"]["memory_throughput_over_bare"] > 0
        assert level["ratios"]["redis_cpu_per_row_over_memory"] > 0
    assert report["upstream_requests_per_run"]["POST create"] == 60
    assert "| in flight |" in out.with_suffix(".md").read_text()


def test_redis_overhead_runs_and_counts_round_trips(tmp_path, redis_url):
    out = tmp_path / "redis_overhead.json"
    run_bench(
        "redis_overhead.py",
        "--rows", "40", "--repeat", "1", "--warmup", "0",
        "--redis-url", redis_url, "--json", str(out),
    )  # fmt: skip
    report = json.loads(out.read_text())
    assert report["redis_round_trips"]["per_row"] > 0
    assert set(report["results"]) == {"bare", "memory", "redis"}


def test_real_timing_runs_with_a_short_create_latency(tmp_path):
    out = tmp_path / "real_timing.json"
    run_bench(
        "real_timing.py",
        "--scenarios", "20", "--repeat", "1", "--create-latency", "0.2", "--json", str(out),
    )  # fmt: skip
    scenario = json.loads(out.read_text())["scenarios"]["20"]
    assert set(scenario["results"]) == {"bare", "processor"}
    assert scenario["goal"]["max_ratio"] == 1.15
    assert scenario["reference"]["create_s"] >= 0.2
    assert "| rows |" in out.with_suffix(".md").read_text()


def test_the_summary_states_every_goal_from_the_committed_reports(tmp_path):
    out = tmp_path / "summary.md"
    run_bench("summary.py", "--out", str(out))
    lines = out.read_text().splitlines()
    assert len(lines) == 2 + 6  # header, alignment, one row per goal
    assert all(line.endswith(("| met |", "| **not met** |")) for line in lines[2:])
