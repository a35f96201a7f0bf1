"""Every goal of the benchmarks, with the figure that meets it or not, from the JSON reports.

Reads ``results/real_timing.json``, ``results/throughput.json`` and ``results/validation.json``
(written by the scripts beside this one) and writes ``results/summary.md``, the table at the top
of the documentation's performance page. Each figure is a ratio measured within one run of its
script, as the goals are stated.

Usage::

    .venv/bin/python bench/summary.py
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import _harness


def _load(name: str) -> dict[str, Any]:
    return dict(json.loads((_harness.RESULTS / f"{name}.json").read_text(encoding="utf-8")))


def _met(ok: bool) -> str:
    return "met" if ok else "**not met**"


def rows() -> list[list[str]]:
    out: list[list[str]] = []
    timing = _load("real_timing")["scenarios"]
    for rows_, scenario in sorted(timing.items(), key=lambda kv: int(kv[0])):
        goal = scenario["goal"]
        result = scenario["results"]["processor"]
        ratio = result["median"]["wall_s"] / goal["reference_s"]
        count_429 = result["count_429_total"]
        out.append(
            [
                f"real timing, {rows_} rows",
                f"wall time at most {goal['max_ratio']:.2f}x {goal['reference']}, no 429",
                f"{ratio:.3f}x ({result['median']['wall_s']:.1f} s against "
                f"{goal['reference_s']:.1f} s), {count_429} x 429",
                _met(ratio <= goal["max_ratio"] and count_429 == 0),
            ]
        )
    levels = _load("throughput")["levels"]
    latency = _load("throughput")["config"]["create_latency_s"]
    if "8" in levels:
        ratios = levels["8"]["ratios"]
        through, cpu = ratios["memory_throughput_over_bare"], ratios["memory_cpu_per_row_over_bare"]
        out.append(
            [
                "fast upstream, 8 in flight, memory",
                "throughput at least 0.9x the bare httpx loop; CPU per row at most 1.5x",
                f"{through:.2f}x throughput, {cpu:.2f}x CPU per row",
                _met(through >= 0.9 and cpu <= 1.5),
            ]
        )
    if "64" in levels:
        memory = levels["64"]["results"]["memory"]["median"]
        over_bare = levels["64"]["ratios"]["memory_throughput_over_bare"]
        out.append(
            [
                "fast upstream, 64 in flight, memory",
                f"at least 0.7 of the ideal (64 / {latency * 1000:.0f} ms = "
                f"{64 / latency:.0f} rows/s) and 5x the bare single-client loop",
                f"{memory['of_ideal']:.2f} of ideal ({memory['rows_per_s']:.0f} rows/s), "
                f"{over_bare:.1f}x the bare loop",
                _met(memory["of_ideal"] >= 0.7 and over_bare >= 5),
            ]
        )
    redis = {
        level: data["ratios"]["redis_cpu_per_row_over_memory"]
        for level, data in levels.items()
        if "redis_cpu_per_row_over_memory" in data["ratios"]
    }
    if redis:
        out.append(
            [
                "fast upstream, Redis backends",
                "client CPU per row at most 2x the memory backends'",
                ", ".join(f"{value:.2f}x at {level}" for level, value in redis.items()),
                _met(max(redis.values()) <= 2),
            ]
        )
    goals = _load("validation")["goals"]
    out.append(
        [
            "validation, 1,000,000 rows",
            f"at least {goals['throughput_goal']:.0%} of csv.reader + pydantic's throughput; "
            f"peak memory under {goals['peak_goal_mib']:.0f} MiB",
            f"{goals['throughput_ratio']:.0%}; {goals['peak_mib']:.1f} MiB",
            _met(goals["throughput_met"] and goals["peak_met"]),
        ]
    )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, default=_harness.RESULTS / "summary.md", help="(results/summary.md)"
    )
    args = parser.parse_args(argv)
    table = _harness.markdown_table(["scenario", "goal", "measured", ""], rows(), "llll")
    path: Path = args.out
    path.write_text(table + "\n", encoding="utf-8")
    print(table)
    print(f"\nwritten: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
