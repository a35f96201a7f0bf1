"""What the Redis backends cost the client, per row, next to the memory backends and bare httpx.

One job (``--rows`` hospitals, ``--concurrency`` requests in flight, batches of 20) is run
against the fake upstream three ways, in the same run of this script:

* ``bare httpx``: a plain `httpx.AsyncClient` loop sending the requests the processor sends
  on a fault-free job: ``GET /`` (warm-up), the creates (``POST /hospitals/``, the same
  concurrency), one ``GET /hospitals/batch/{id}`` per batch (the processor's pre-activation
  audit), one ``PATCH /hospitals/batch/{id}/activate`` per batch. The floor: HTTP only.
* ``memory``: `AsyncBulkProcessor` with the in-memory backends.
* ``redis``: `AsyncBulkProcessor` with the Redis backends (``--redis-url``, a key prefix of
  its own per run, deleted after the run; never a flush).

The fake upstream (`hospital_bulk.testing`) runs in a process of its own (uvicorn on loopback,
no create latency, no rate limits, no faults) and is reset between runs, so the client
process's CPU time (`time.process_time`, every thread of this process) is the client's work
alone. Each variant runs ``--repeat`` times (after ``--warmup`` untimed runs, in rotating
order); the medians are reported. The upstream's request log is checked after every run: every
row created once and active, and the same requests for every variant.

Redis round trips are counted in one extra, untimed run of the Redis variant, by wrapping the
redis-py connection's ``send_packed_command``: one call is one round trip (a single command,
one ``EVALSHA`` of a Lua script, or a whole pipeline), connection set-up included. The server's
``INFO commandstats`` is diffed around that run too (commands executed, those run inside Lua
scripts included; server-wide, so other clients of that Redis would count).

Usage::

    .venv/bin/python bench/redis_overhead.py [--rows 2000] [--repeat 3] [--json out.json]
        [--profile redis.prof]

Writes ``bench/results/redis_overhead.json`` by default and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import hashlib
import json
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Any

import _harness
import redis
import redis.asyncio.connection as redis_connection

from hospital_bulk.backends import redis as redis_backend

HERE = Path(__file__).resolve().parent
DEFAULT_JSON = HERE / "results" / "redis_overhead.json"
VARIANTS = ("bare", "memory", "redis")
LABELS = _harness.VARIANT_LABELS
# A budget the limiter never waits for (and `rate_margin=0`).
UNLIMITED = _harness.UNLIMITED
BATCH = _harness.BATCH


# -- counting Redis round trips ----------------------------------------------------------------


def _script_names() -> dict[str, str]:
    names = {}
    for name in dir(redis_backend):
        value = getattr(redis_backend, name)
        if name.startswith("_") and name.isupper() and isinstance(value, str) and "redis." in value:
            if name.startswith("_LUA_"):
                continue
            names[hashlib.sha1(value.encode()).hexdigest()] = f"EVALSHA {name.strip('_').lower()}"
    folder = resources.files("limits").joinpath("resources/redis/lua_scripts")
    for entry in folder.iterdir():
        if entry.name.endswith(".lua"):
            sha = hashlib.sha1(entry.read_bytes()).hexdigest()
            names[sha] = f"EVALSHA limits:{entry.name.removesuffix('.lua')}"
    return names


def _commands(packed: bytes) -> list[list[bytes]]:
    """The commands in a packed RESP request (names and first arguments only)."""
    commands = []
    at = 0
    while at < len(packed):
        end = packed.index(b"\r\n", at)
        count = int(packed[at + 1 : end])
        at = end + 2
        parts: list[bytes] = []
        for _ in range(count):
            end = packed.index(b"\r\n", at)
            size = int(packed[at + 1 : end])
            if len(parts) < 2:
                parts.append(packed[end + 2 : end + 2 + size])
            at = end + 2 + size + 2
        commands.append(parts)
    return commands


def _label(packed: bytes, scripts: dict[str, str]) -> str:
    commands = _commands(packed)

    def one(parts: list[bytes]) -> str:
        name = parts[0].decode().upper()
        if name == "EVALSHA":
            return scripts.get(parts[1].decode(), f"EVALSHA {parts[1][:8].decode()}")
        if name == "CLIENT" and len(parts) > 1:
            return f"CLIENT {parts[1].decode().upper()}"
        return name

    if len(commands) == 1:
        return one(commands[0])
    names = [one(parts) for parts in commands]
    inner = Counter(names)
    return "pipeline(" + ", ".join(f"{n} x{c}" if c > 1 else n for n, c in inner.items()) + ")"


# Who sends each kind of round trip (for the per-row explanation).
def _part(label: str) -> str:
    if label in ("PTTL",) or label.startswith("EVALSHA limits:"):
        return "rate limiter"
    if label == "EVALSHA breaker":
        return "circuit breaker"
    if label.startswith(("CLIENT", "SELECT", "HELLO", "PING", "AUTH", "SCRIPT")):
        return "connection set-up / script loading"
    return "job store"


@contextmanager
def counting_round_trips() -> Iterator[Counter[str]]:
    counts: Counter[str] = Counter()
    scripts = _script_names()
    cls = redis_connection.AbstractConnection
    original = cls.send_packed_command

    async def send_packed_command(self: Any, command: Any, check_health: bool = True) -> None:
        packed = command
        if isinstance(packed, str):
            packed = packed.encode()
        if not isinstance(packed, bytes):
            packed = b"".join(bytes(chunk) for chunk in packed)
        counts[_label(packed, scripts)] += 1
        await original(self, command, check_health)

    cls.send_packed_command = send_packed_command  # type: ignore[method-assign]
    try:
        yield counts
    finally:
        cls.send_packed_command = original  # type: ignore[method-assign]


def _commandstats(redis_url: str) -> dict[str, int]:
    client = redis.Redis.from_url(redis_url)
    try:
        stats = client.info("commandstats")
    finally:
        client.close()
    return {name.removeprefix("cmdstat_"): value["calls"] for name, value in stats.items()}


# -- running ---------------------------------------------------------------------------------


class Bench(_harness.JobBench):
    def __init__(self, args: argparse.Namespace, url: str, fake: subprocess.Popen[bytes]) -> None:
        super().__init__("redis-overhead", url, fake, args.rows, args.redis_url)
        self.concurrency = args.concurrency

    def count_round_trips(self) -> dict[str, Any]:
        """One untimed Redis run with every round trip counted."""
        _harness.fake_control(self.url, "reset")
        job, prefix = self.job("redis", self.concurrency)
        assert prefix is not None
        before = _commandstats(self.redis_url)
        try:
            with counting_round_trips() as counts:
                asyncio.run(job())
        finally:
            after = _commandstats(self.redis_url)
            _harness.delete_prefix(self.redis_url, prefix)
        _harness.check_upstream(self.url, self.rows)
        rows = self.rows
        batches = -(-rows // BATCH)
        commands = {
            name: after[name] - before.get(name, 0)
            for name in after
            if after[name] - before.get(name, 0) > 0
        }
        commands.pop("info", None)  # the two INFO calls reading these statistics
        parts: Counter[str] = Counter()
        for label, count in counts.items():
            parts[_part(label)] += count
        total = sum(counts.values())
        return {
            "what": "round trips: calls of the redis-py connection's send_packed_command "
            "(one command, one EVALSHA, or one whole pipeline each), connection set-up included",
            "rows": rows,
            "batches": batches,
            "total": total,
            "per_row": total / rows,
            "by_call": dict(counts.most_common()),
            "by_part": dict(parts.most_common()),
            "by_part_per_row": {k: v / rows for k, v in parts.most_common()},
            "server_commands": {
                "what": "INFO commandstats diff (server-wide), commands run inside Lua scripts "
                "included, INFO itself excluded",
                "total": sum(commands.values()),
                "per_row": sum(commands.values()) / rows,
                "by_command": dict(sorted(commands.items(), key=lambda kv: -kv[1])),
            },
        }


def table(results: dict[str, Any], round_trips: dict[str, Any] | None) -> str:
    lines = [
        "| variant | wall time (s) | rows/s | client CPU (s) | client CPU per row (µs) "
        "| best run's CPU per row (µs) | Redis round trips per row "
        "| fake upstream CPU per row (µs) | Redis server CPU per row (µs) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for variant in VARIANTS:
        if variant not in results:
            continue
        m = results[variant]["median"]
        best = results[variant]["min"]["cpu_us_per_row"]
        rt = "-"
        if variant == "redis" and round_trips is not None:
            rt = f"{round_trips['per_row']:.2f}"
        lines.append(
            f"| {LABELS[variant]} | {m['wall_s']:.2f} | {m['rows_per_s']:.0f} | {m['cpu_s']:.2f} "
            f"| {m['cpu_us_per_row']:.0f} | {best:.0f} | {rt} | {m['fake_cpu_us_per_row']:.0f} "
            f"| {m['redis_server_cpu_us_per_row']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=2000, help="rows in the job (2000)")
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight (32)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per variant (3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per variant first (1)")
    parser.add_argument(
        "--redis-url",
        default="redis://127.0.0.1:6379/14",
        help="the Redis database to use; only keys under a fresh prefix are written, then "
        "deleted (redis://127.0.0.1:6379/14)",
    )
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help="which to run (bare,memory,redis)"
    )
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"({DEFAULT_JSON})")
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="also profile one Redis run with cProfile: write the stats here, print the top",
    )
    args = parser.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(variants) - set(VARIANTS)
    if unknown or not variants:
        parser.error(f"unknown variant(s): {sorted(unknown)}")

    info = _harness.machine(args.redis_url)
    print(f"# {info['uname']}\n# CPU: {info['cpu_model']} x {info['cpus']}", file=sys.stderr)
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    round_trips = None
    profile_top = None
    options = _harness.fast_upstream_options(args.rows)
    with _harness.fake_upstream(options) as (url, fake):
        bench = Bench(args, url, fake)
        for n in range(args.warmup):
            for variant in variants:
                bench.run(variant, args.concurrency)
                print(f"warm-up {n + 1}: {variant}", file=sys.stderr)
        for n in range(args.repeat):
            order = variants[n % len(variants) :] + variants[: n % len(variants)]
            for variant in order:
                run = bench.run(variant, args.concurrency)
                runs[variant].append(run)
                print(
                    f"run {n + 1}: {variant:7} {run['wall_s']:6.2f} s "
                    f"{run['cpu_us_per_row']:6.0f} µs CPU/row",
                    file=sys.stderr,
                )
        if "redis" in variants:
            round_trips = bench.count_round_trips()
        if args.profile is not None and "redis" in variants:
            profile = cProfile.Profile()
            bench.run("redis", args.concurrency, profile=profile)
            args.profile.parent.mkdir(parents=True, exist_ok=True)
            profile.dump_stats(args.profile)
            profile_top = _harness.profile_top(profile, 25, 40)
        requests = bench.requests

    results: dict[str, Any] = {v: _harness.summarised(runs[v]) for v in variants}
    ratios: dict[str, float] = {}
    for stat in ("median", "min"):
        cpu = {v: results[v][stat]["cpu_us_per_row"] for v in variants}
        if "redis" in cpu and "memory" in cpu:
            ratios[f"redis_cpu_per_row_over_memory_{stat}"] = cpu["redis"] / cpu["memory"]
        if "memory" in cpu and "bare" in cpu:
            ratios[f"memory_cpu_per_row_over_bare_httpx_{stat}"] = cpu["memory"] / cpu["bare"]
    report = {
        "benchmark": "redis_overhead",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": info,
        "config": {
            "rows": args.rows,
            "concurrency": args.concurrency,
            "batch_size": BATCH,
            "repeat": args.repeat,
            "warmup": args.warmup,
            "create_rate": UNLIMITED,
            "other_rate": UNLIMITED,
            "rate_margin": 0,
            "redis_url": args.redis_url,
            "fake_upstream": "python -m hospital_bulk.testing --create-latency 0 "
            "--no-rate-limits (a separate process, uvicorn on loopback), reset between runs",
            "cpu": "time.process_time() of the benchmark process (all its threads), "
            "around asyncio.run(job) only",
        },
        "results": results,
        "ratios": ratios,
        "upstream_requests_per_run": requests,
        "redis_round_trips": round_trips,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")

    print()
    print(f"{args.rows} rows, concurrency {args.concurrency}, median of {args.repeat} runs")
    print(
        f"{info['cpu_model']} x {info['cpus']}; Python {info['python']}, "
        f"httpx {info['httpx']}, redis-py {info['redis']}, Redis {info['redis_server']}"
    )
    print()
    print(table(results, round_trips))
    print()
    for name, value in ratios.items():
        print(f"{name.replace('_', ' ')}: {value:.2f}x")
    if round_trips is not None:
        print()
        print(
            f"Redis round trips: {round_trips['total']} for {args.rows} rows "
            f"= {round_trips['per_row']:.2f} per row"
        )
        for label, count in round_trips["by_call"].items():
            print(f"  {count:7d}  {count / args.rows:6.3f}/row  {label}")
        server = round_trips["server_commands"]
        print(
            f"Redis commands executed (server-wide, inside scripts included): "
            f"{server['total']} = {server['per_row']:.2f} per row"
        )
    if profile_top is not None:
        print()
        print(profile_top)
    print(f"\nwritten: {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
