"""Throughput and client CPU per row against a fast upstream, next to bare httpx loops.

One job of ``--rows`` hospitals (batches of 20) is run against the fake upstream with a fixed
create latency (``--latency``, 50 ms) and no rate limits, at several numbers of requests in
flight (``--in-flight``, 8, 32 and 64), four ways in the same run of this script:

* ``bare httpx``: one `httpx.AsyncClient` whose pool holds as many connections as there are
  requests in flight, and that many tasks pulling rows from one iterator, sending the requests
  the processor sends on a fault-free job: ``GET /`` (warm-up), one ``POST /hospitals/`` per
  row, then per batch ``GET /hospitals/batch/{id}`` (the processor's audit before activating)
  and ``PATCH /hospitals/batch/{id}/activate``. The CSV is parsed with the `csv` module.
  What a hand-written loop does; the reference of the goals.
* ``bare httpx, split pool``: the same loop with the tasks spread over several small clients
  (at most 8 connections each): what the same loop gets when it avoids the cost a single large
  pool pays per request.
* ``processor, memory``: `AsyncBulkProcessor(concurrency=<in flight>)` with the memory
  backends, a rate budget the limiter never waits for and ``rate_margin=0``, ``process(csv)``.
* ``processor, Redis``: the same with the Redis backends (``--redis-url``; a key prefix of its
  own per run, its keys deleted after the run; never a flush).

The fake upstream runs in its own process (uvicorn on loopback) and is reset before every run;
after every run its records are checked: every row created exactly once and active, no request
failed, and the same requests by route for every run of every variant. A run is timed around
``asyncio.run(job())`` for a fresh client or processor (its creation, the job, its closing):
wall time with ``time.perf_counter()``, the client's CPU with ``time.process_time()`` (every
thread of this process). The fake's and Redis's CPU are read apart. ``--warmup`` untimed runs
per variant, then ``--repeat`` rounds with the variants in rotating order; medians reported.

The ideal throughput is in-flight / latency (rows per second if every request took exactly the
create latency and nothing else); the ratio to it says how close a variant comes to the bound
the upstream's latency sets.

Usage::

    .venv/bin/python bench/throughput.py [--rows 2000] [--in-flight 8,32,64] [--repeat 3]

Writes ``bench/results/throughput.json`` and ``bench/results/throughput.md`` by default.
"""

from __future__ import annotations

import argparse
import cProfile
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import _harness

VARIANTS = ("bare", "bare_split", "memory", "redis")
LABELS = _harness.VARIANT_LABELS
BATCH = _harness.BATCH


class Bench(_harness.JobBench):
    def __init__(self, args: argparse.Namespace, url: str, fake: subprocess.Popen[bytes]) -> None:
        super().__init__("throughput", url, fake, args.rows, args.redis_url)
        self.latency = args.latency

    def run(
        self, variant: str, in_flight: int, *, profile: cProfile.Profile | None = None
    ) -> dict[str, Any]:
        """One timed run, with its throughput's ratio to the ideal (in-flight / latency)."""
        result = super().run(variant, in_flight, profile=profile)
        result["of_ideal"] = result["rows_per_s"] / (in_flight / self.latency)
        return result


def ratios_of(results: dict[str, Any]) -> dict[str, float]:
    """The figures the goals are stated in, from the medians of one in-flight level."""
    median = {variant: result["median"] for variant, result in results.items()}
    ratios: dict[str, float] = {}
    for variant in ("memory", "redis", "bare_split"):
        if variant in median and "bare" in median:
            ratios[f"{variant}_throughput_over_bare"] = (
                median[variant]["rows_per_s"] / median["bare"]["rows_per_s"]
            )
            ratios[f"{variant}_cpu_per_row_over_bare"] = (
                median[variant]["cpu_us_per_row"] / median["bare"]["cpu_us_per_row"]
            )
    if "memory" in median and "redis" in median:
        ratios["redis_cpu_per_row_over_memory"] = (
            median["redis"]["cpu_us_per_row"] / median["memory"]["cpu_us_per_row"]
        )
    return ratios


def table(levels: dict[int, dict[str, Any]]) -> str:
    rows = []
    for in_flight, results in levels.items():
        for variant in VARIANTS:
            if variant not in results:
                continue
            m = results[variant]["median"]
            rows.append(
                [
                    str(in_flight),
                    LABELS[variant],
                    f"{m['rows_per_s']:.0f}",
                    f"{m['of_ideal']:.2f}",
                    f"{m['cpu_us_per_row']:.0f}",
                    f"{m['wall_s']:.2f}",
                    f"{m['fake_cpu_us_per_row']:.0f}",
                ]
            )
    header = [
        "in flight",
        "variant",
        "rows/s",
        "of ideal",
        "client CPU per row (µs)",
        "wall time (s)",
        "fake upstream CPU per row (µs)",
    ]
    return _harness.markdown_table(header, rows, "rlrrrrr")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=2000, help="rows in the job (2000)")
    parser.add_argument("--latency", type=float, default=0.05, help="create latency (0.05 s)")
    parser.add_argument(
        "--in-flight", default="8,32,64", help="requests in flight, comma-separated (8,32,64)"
    )
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per variant (3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per variant (1)")
    parser.add_argument(
        "--redis-url",
        default="redis://127.0.0.1:6379/14",
        help="the Redis database of the Redis variant; only keys under a fresh prefix are "
        "written, then deleted (redis://127.0.0.1:6379/14)",
    )
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help=f"which to run ({','.join(VARIANTS)})"
    )
    parser.add_argument("--json", type=Path, default=None, help="(results/throughput.json)")
    parser.add_argument(
        "--profile",
        default=None,
        help="VARIANT:IN_FLIGHT: profile one more run of it with cProfile, print the top",
    )
    args = parser.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(variants) - set(VARIANTS)
    if unknown or not variants:
        parser.error(f"unknown variant(s): {sorted(unknown)}")
    levels_wanted = [int(n) for n in args.in_flight.split(",") if n.strip()]

    info = _harness.machine(args.redis_url if "redis" in variants else None)
    print(f"# {_harness.describe(info)}", file=sys.stderr)
    levels: dict[int, dict[str, Any]] = {}
    options = _harness.fast_upstream_options(args.rows, args.latency)
    profile_top = None
    with _harness.fake_upstream(options) as (url, fake):
        bench = Bench(args, url, fake)
        for in_flight in levels_wanted:
            runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
            for _ in range(args.warmup):
                for variant in variants:
                    bench.run(variant, in_flight)
            for n in range(args.repeat):
                order = variants[n % len(variants) :] + variants[: n % len(variants)]
                for variant in order:
                    run = bench.run(variant, in_flight)
                    runs[variant].append(run)
                    print(
                        f"{in_flight:3d} in flight, run {n + 1}: {variant:10} "
                        f"{run['rows_per_s']:6.0f} rows/s {run['cpu_us_per_row']:6.0f} µs "
                        f"CPU/row (load {run['load_average_1min']:.2f})",
                        file=sys.stderr,
                    )
            results = {v: _harness.summarised(runs[v]) for v in variants}
            levels[in_flight] = {"results": results, "ratios": ratios_of(results)}
        if args.profile:
            variant, _, level = args.profile.partition(":")
            profile = cProfile.Profile()
            bench.run(variant, int(level), profile=profile)
            profile_top = _harness.profile_top(profile, 30, 50)
        requests = bench.requests

    report = {
        "benchmark": "throughput",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": info,
        "config": {
            "rows": args.rows,
            "batch_size": BATCH,
            "create_latency_s": args.latency,
            "in_flight": levels_wanted,
            "repeat": args.repeat,
            "warmup": args.warmup,
            "split_pool_connections_per_client": _harness.SPLIT_CONNECTIONS,
            "create_rate": _harness.UNLIMITED,
            "other_rate": _harness.UNLIMITED,
            "rate_margin": 0,
            "fake_upstream": "python -m hospital_bulk.testing " + " ".join(options),
        },
        "levels": {str(k): v for k, v in levels.items()},
        "upstream_requests_per_run": requests,
    }
    text = table({k: v["results"] for k, v in levels.items()})
    print()
    print(f"{args.rows} rows, {args.latency * 1000:.0f} ms per create, median of {args.repeat}")
    print(_harness.describe(info))
    print()
    print(text)
    print()
    for in_flight, level in levels.items():
        for name, value in level["ratios"].items():
            print(f"{in_flight:3d} in flight: {name.replace('_', ' ')}: {value:.2f}x")
    if profile_top is not None:
        print()
        print(profile_top)
    _harness.write_outputs("throughput", report, text, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
