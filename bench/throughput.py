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
import io
import os
import pstats
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import _harness

VARIANTS = ("bare", "bare_split", "memory", "redis")
LABELS = {
    "bare": "bare httpx",
    "bare_split": "bare httpx, split pool",
    "memory": "processor, memory",
    "redis": "processor, Redis",
}
SPLIT_CONNECTIONS = 8
BATCH = _harness.BATCH


class Bench:
    def __init__(self, args: argparse.Namespace, url: str, fake: subprocess.Popen[bytes]) -> None:
        self.args = args
        self.url = url
        self.fake = fake
        self.data = _harness.make_csv(args.rows)
        self.base_prefix = f"bench-throughput-{uuid.uuid4().hex[:12]}"
        self.serial = 0
        self.requests: dict[str, int] | None = None

    def job(
        self, variant: str, in_flight: int
    ) -> tuple[Callable[[], Coroutine[Any, Any, None]], str | None]:
        url, data = self.url, self.data
        if variant == "bare":
            return (lambda: _harness.bare_job(url, data, in_flight, 1)), None
        if variant == "bare_split":
            clients = -(-in_flight // SPLIT_CONNECTIONS)
            return (lambda: _harness.bare_job(url, data, in_flight, clients)), None
        if variant == "memory":
            return (lambda: _harness.processor_job(url, data, in_flight)), None
        self.serial += 1
        prefix = f"{self.base_prefix}-{self.serial}"
        redis_url = self.args.redis_url
        return (
            lambda: _harness.processor_job(
                url, data, in_flight, backend=redis_url, redis_prefix=prefix
            )
        ), prefix

    def run(
        self, variant: str, in_flight: int, *, profile: cProfile.Profile | None = None
    ) -> dict[str, Any]:
        """One timed run of one variant, checked at the upstream afterwards."""
        redis_url = self.args.redis_url
        _harness.fake_control(self.url, "reset")
        job, prefix = self.job(variant, in_flight)
        try:
            times = _harness.timed(job, self.fake.pid, redis_url if prefix else None, profile)
        finally:
            if prefix is not None:
                _harness.delete_prefix(redis_url, prefix)
        wall, cpu = times["wall_s"], times["cpu_s"]
        fake_cpu, redis_server = times["fake_cpu_s"], times["redis_cpu_s"]
        requests = _harness.check_upstream(self.url, self.args.rows)
        if self.requests is None:
            self.requests = requests
        elif self.requests != requests:
            raise RuntimeError(f"{variant}: other requests than before: {requests}")
        rows = self.args.rows
        ideal = in_flight / self.args.latency
        return {
            "load_average_1min": os.getloadavg()[0],
            "wall_s": wall,
            "rows_per_s": rows / wall,
            "of_ideal": rows / wall / ideal,
            "cpu_s": cpu,
            "cpu_us_per_row": cpu / rows * 1e6,
            "fake_cpu_us_per_row": fake_cpu / rows * 1e6,
            "redis_server_cpu_us_per_row": redis_server / rows * 1e6,
        }


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
            results = {
                v: {
                    "runs": runs[v],
                    "median": _harness.median_of(runs[v]),
                    "min": _harness.min_of(runs[v]),
                }
                for v in variants
            }
            levels[in_flight] = {"results": results, "ratios": ratios_of(results)}
        if args.profile:
            variant, _, level = args.profile.partition(":")
            profile = cProfile.Profile()
            bench.run(variant, int(level), profile=profile)
            out = io.StringIO()
            stats = pstats.Stats(profile, stream=out)
            stats.sort_stats("tottime").print_stats(30)
            stats.sort_stats("cumulative").print_stats(50)
            profile_top = out.getvalue()
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
            "split_pool_connections_per_client": SPLIT_CONNECTIONS,
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
