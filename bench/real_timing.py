"""Whole jobs against the fake upstream with the upstream's real timing, with default settings.

The fake upstream (`hospital_bulk.testing`) runs in a process of its own (uvicorn on loopback)
with the real service's timing, given explicitly: every create takes 5 s (``--create-latency
5``), creates run in parallel (up to 40), 30 creates per minute (``--create-rate 30/60``), 50
per minute on every other path (``--other-rate 50/60``), 100 per minute on ``GET /``, at most
20 hospitals per batch. Its rate limits are fixed windows per client address and exact path,
counted by arrival time; ``POST /__fake__/reset`` empties its storage, its request log *and*
its rate windows, so every run starts with a full budget.

Each scenario (``--scenarios``, rows per job, default ``20,100``) is run two ways in the same
run of this script, plus a reference measurement:

* ``reference``: on a freshly reset fake, a fresh `httpx.AsyncClient` sends ``GET /``
  (warm-up, untimed), then times one lone ``POST /hospitals/`` with a batch id (the
  single-create latency), one ``GET /hospitals/batch/{id}`` of that 1-row batch (read-back)
  and one ``PATCH /hospitals/batch/{id}/activate`` (one activation). The fake is reset again
  afterwards.
* ``bare httpx, ideal schedule``: a fresh `httpx.AsyncClient` (pool large enough for a whole
  window of creates), ``GET /`` (warm-up), then the creates in waves of 30 (the create budget),
  every create of a wave at once; wave k+1 leaves 60 s + ``--epsilon`` (0.1 s) after wave k
  left, i.e. as soon as the fake's fixed window allows it (the epsilon covers the spread of
  the delay between a wave leaving and its first create arriving: a few ms on a warm
  connection, up to ~70 ms when the pool has to reconnect, the fake's server closing idle
  connections after 5 s; the wait is slept in steps of at most 1 s, because Linux lets one
  long ``epoll_wait`` end 0.1% late, 60 ms on 60 s); then, once every create answered,
  ``GET /hospitals/batch/{id}`` for every batch (the read-back the processor does before
  activating) and ``PATCH /hospitals/batch/{id}/activate`` for every batch. The best a
  hand-written client can do with no margin at all.
* ``processor, defaults``: ``AsyncBulkProcessor(url)`` with every setting at its default
  (``create_rate="30/minute"``, ``other_rate="50/minute"``, ``rate_margin=1.0``,
  ``concurrency=20``, ``batch_size=20``, memory backends), ``process(csv_bytes)``.

A run is timed around ``asyncio.run(job())`` for a fresh client or processor (its creation,
the job, its closing): wall time with ``time.perf_counter()``, the client's CPU with
``time.process_time()`` (every thread of this process; the fake runs elsewhere). After every
run the fake's state is read: every row must exist exactly once and be active, and no request
may have failed other than with a 429; the requests are counted by route and by status (the
429s among them). The fake's request log stamps every request with its arrival time on the
fake's ``time.monotonic()`` clock, the same system-wide clock as this process's, so the
arrivals are placed on the run's own timeline (offsets from its start): warm-up, the fake's
create windows (start and count), the read-backs, the activations.

The goals, both against figures measured in the same run (medians of the reference runs):

* a job that fits in one create window (at most 30 rows): the processor's wall time at most
  1.15 x (single-create latency + one activation);
* a rate-bound job: the processor's wall time within 5% of the rate bound, (ceil(rows / 30) -
  1) x 60 s + the single-create latency (the last wave cannot leave before the previous waves'
  windows have passed, and takes one create latency), and no 429 at the fake.

Scenarios of at most 30 rows run ``--repeat`` times (3), rate-bound ones ``--repeat-long``
times (1, about three minutes per run and variant); the variants alternate their order from
one repeat to the next; medians are reported.

Usage::

    .venv/bin/python bench/real_timing.py [--scenarios 20,100] [--repeat 3] [--repeat-long 1]

Writes ``bench/results/real_timing.json`` and ``bench/results/real_timing.md`` by default.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import math
import os
import statistics
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import _harness
import anyio
import httpx

from hospital_bulk import AsyncBulkProcessor, JobStatus, Settings

# The upstream's real timing (upstream-contract.md), given to the fake explicitly.
CREATE_LATENCY = 5.0
CREATES_PER_WINDOW = 30
WINDOW = 60.0
OTHER_PER_WINDOW = 50
ROOT_PER_WINDOW = 100
BATCH_CAP = 20
FAKE_OPTIONS = [
    "--create-rate", f"{CREATES_PER_WINDOW}/{WINDOW:g}",
    "--other-rate", f"{OTHER_PER_WINDOW}/{WINDOW:g}",
    "--root-rate", f"{ROOT_PER_WINDOW}/{WINDOW:g}",
    "--batch-cap", str(BATCH_CAP),
]  # fmt: skip
# The goals: wall time over its reference.
LATENCY_GOAL = 1.15
RATE_GOAL = 1.05
VARIANTS = ("bare", "processor")
LABELS = {"bare": "bare httpx, ideal schedule", "processor": "processor, defaults"}
TIMEOUT = httpx.Timeout(30.0, connect=10.0)
# The processor's settings when nothing is given but the URL.
DEFAULTS = Settings(base_url="http://127.0.0.1:8000")
ROUTE_LABELS = {
    "root": "GET /",
    "create": "POST /hospitals/",
    "batch_list": "GET /hospitals/batch/{id}",
    "batch_activate": "PATCH /hospitals/batch/{id}/activate",
}

# -- the jobs --------------------------------------------------------------------------------


async def reference_job(url: str) -> dict[str, float]:
    """One lone create, its batch's read-back and its activation, each timed."""
    async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT) as client:
        (await client.get("/", timeout=120.0)).raise_for_status()
        batch = uuid.uuid4()
        body = {
            "name": "Reference Hospital",
            "address": "1 Reference Street",
            "phone": None,
            "creation_batch_id": str(batch),
        }
        start = time.perf_counter()
        (await client.post("/hospitals/", json=body)).raise_for_status()
        created = time.perf_counter()
        (await client.get(f"/hospitals/batch/{batch}")).raise_for_status()
        read = time.perf_counter()
        response = await client.patch(f"/hospitals/batch/{batch}/activate")
        activated = time.perf_counter()
        response.raise_for_status()
        if response.json()["activated_count"] != 1:
            raise RuntimeError("the reference activation did not activate its one hospital")
    return {
        "create_s": created - start,
        "read_back_s": read - created,
        "activation_s": activated - read,
    }


async def sleep_until(deadline: float) -> None:
    """Sleep until `deadline` (``time.monotonic()``), in steps of at most one second.

    Linux lets a long ``epoll_wait`` end up to 0.1% late (its timer slack: 60 ms for 60 s);
    short steps keep the wake-up within a millisecond or so of the deadline.
    """
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return
        await anyio.sleep(min(left, 1.0))


async def bare_job(url: str, data: bytes, epsilon: float) -> dict[str, Any]:
    """The processor's requests, on the best schedule the fake's windows allow."""
    rows = list(csv.DictReader(io.StringIO(data.decode())))
    batches = [uuid.uuid4() for _ in range(math.ceil(len(rows) / BATCH_CAP))]
    size = CREATES_PER_WINDOW + 4
    limits = httpx.Limits(max_connections=size, max_keepalive_connections=size)
    waves: list[float] = []
    async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT, limits=limits) as client:
        (await client.get("/", timeout=120.0)).raise_for_status()

        async def create(position: int) -> None:
            body = _harness.create_body(rows[position], batches[position // BATCH_CAP])
            response = await client.post("/hospitals/", json=body)
            if response.status_code == 429:
                raise RuntimeError(
                    "the bare loop's wave reached the fake before its window ended; raise --epsilon"
                )
            response.raise_for_status()

        async with anyio.create_task_group() as tg:
            for first in range(0, len(rows), CREATES_PER_WINDOW):
                if waves:
                    await sleep_until(waves[-1] + WINDOW + epsilon)
                waves.append(time.monotonic())
                for position in range(first, min(first + CREATES_PER_WINDOW, len(rows))):
                    tg.start_soon(create, position)
        await _harness.audit_and_activate(client, batches)
    return {"waves_left_at": waves}


async def processor_job(url: str, data: bytes) -> dict[str, Any]:
    """`AsyncBulkProcessor` with every setting at its default."""
    async with AsyncBulkProcessor(url) as processor:
        result = await processor.process(data)
    rows = result.total_hospitals
    if result.status is not JobStatus.COMPLETED or result.processed_hospitals != rows:
        raise RuntimeError(f"the job ended {result.status.value}: {result.processed_hospitals}")
    return {"processing_time_seconds": result.processing_time_seconds}


# -- reading the fake's records --------------------------------------------------------------


def check_state(url: str, rows: int) -> dict[str, Any]:
    """Every row once and active; the requests by route and by status, 429s tolerated."""
    state = _harness.fake_control(url, "state")
    requests: list[dict[str, Any]] = state["requests"]
    statuses = Counter(str(r["status"]) for r in requests)
    by_route = _harness.audit_state(state, rows, tolerate=(429,))
    return {
        "requests": requests,
        "by_route": by_route,
        "by_status": dict(sorted(statuses.items())),
        "count_429": statuses.get("429", 0),
        "peak_creates_in_flight": state["peak_creates_in_flight"],
    }


def create_windows(arrivals: list[float]) -> list[dict[str, float]]:
    """The fake's fixed create windows over these arrival offsets: start and count of each."""
    windows: list[dict[str, float]] = []
    for at in sorted(arrivals):
        if not windows or at - windows[-1]["start_s"] >= WINDOW:
            windows.append({"start_s": at, "count": 0, "last_s": at})
        windows[-1]["count"] += 1
        windows[-1]["last_s"] = at
    return [{k: round(v, 4) for k, v in w.items()} for w in windows]


def timeline(
    requests: list[dict[str, Any]], start: float, wall: float, latency: float
) -> dict[str, Any]:
    """The run's requests as offsets from its start (the fake's clock is this process's)."""
    by_route: dict[str, list[float]] = {}
    for request in requests:
        by_route.setdefault(str(request["route"]), []).append(request["arrived_at"] - start)
    offsets = [at for ats in by_route.values() for at in ats]
    aligned = bool(offsets) and min(offsets) >= -0.01 and max(offsets) <= wall + 0.01
    result: dict[str, Any] = {"aligned": aligned}
    for route, ats in by_route.items():
        result[f"{route}_first_s"] = round(min(ats), 4)
        result[f"{route}_last_s"] = round(max(ats), 4)
    creates = by_route.get("create", [])
    result["create_windows"] = create_windows(creates)
    if creates:
        # The last create answers about one create latency after it arrived.
        result["last_create_done_est_s"] = round(max(creates) + latency, 4)
        result["after_last_create_s"] = round(wall - max(creates) - latency, 4)
    return result


# -- running ---------------------------------------------------------------------------------


class Bench:
    def __init__(
        self, url: str, fake: subprocess.Popen[bytes], epsilon: float, latency: float
    ) -> None:
        self.url = url
        self.fake = fake
        self.epsilon = epsilon
        self.latency = latency

    def reference(self) -> dict[str, float]:
        _harness.fake_control(self.url, "reset")
        measured = asyncio.run(reference_job(self.url))
        _harness.fake_control(self.url, "reset")
        return measured

    def run(self, variant: str, rows: int) -> dict[str, Any]:
        data = _harness.make_csv(rows)
        _harness.fake_control(self.url, "reset")
        job: Callable[[], Coroutine[Any, Any, dict[str, Any]]]
        if variant == "bare":

            async def job() -> dict[str, Any]:
                return await bare_job(self.url, data, self.epsilon)
        else:

            async def job() -> dict[str, Any]:
                return await processor_job(self.url, data)

        fake0 = _harness.proc_cpu(self.fake.pid)
        mono0 = time.monotonic()
        cpu0 = time.process_time()
        wall0 = time.perf_counter()
        extra = asyncio.run(job())
        wall = time.perf_counter() - wall0
        cpu = time.process_time() - cpu0
        fake_cpu = _harness.proc_cpu(self.fake.pid) - fake0
        checked = check_state(self.url, rows)
        line = timeline(checked["requests"], mono0, wall, self.latency)
        if "waves_left_at" in extra:
            extra["waves_left_at_s"] = [round(at - mono0, 4) for at in extra.pop("waves_left_at")]
        return {
            "wall_s": wall,
            "client_cpu_s": cpu,
            "fake_cpu_s": fake_cpu,
            "count_429": checked["count_429"],
            "requests": len(checked["requests"]),
            "peak_creates_in_flight": checked["peak_creates_in_flight"],
            "load_average_1min": os.getloadavg()[0],
            "by_route": checked["by_route"],
            "by_status": checked["by_status"],
            "timeline": line,
            **extra,
        }


def goal_of(rows: int, latency: dict[str, float]) -> dict[str, Any]:
    """The scenario's goal: its kind, its reference time, the largest ratio allowed.

    Also the bound the processor's own limiter sets with the default ``rate_margin`` (every
    window longer by the margin), to tell the margin's cost from the rest.
    """
    waves = math.ceil(rows / CREATES_PER_WINDOW)
    create = latency["create_s"]
    bound = (waves - 1) * WINDOW + create
    margin = DEFAULTS.rate_margin
    common = {
        "rate_bound_s": bound,
        "limiter_bound_s": (waves - 1) * (WINDOW + margin) + create,
        "rate_margin_s": margin,
    }
    if waves == 1:
        return {
            "kind": "latency",
            "reference_s": create + latency["activation_s"],
            "reference": "single-create latency + one activation",
            "max_ratio": LATENCY_GOAL,
            **common,
        }
    return {
        "kind": "rate",
        "reference_s": bound,
        "reference": f"rate bound: {waves - 1} x {WINDOW:g} s + single-create latency",
        "max_ratio": RATE_GOAL,
        **common,
    }


def scenario(bench: Bench, rows: int, repeat: int) -> dict[str, Any]:
    references: list[dict[str, float]] = []
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
    for n in range(repeat):
        references.append(bench.reference())
        ref = references[-1]
        print(
            f"{rows} rows, repeat {n + 1}: reference create {ref['create_s']:.3f} s, "
            f"read-back {ref['read_back_s'] * 1000:.1f} ms, "
            f"activation {ref['activation_s'] * 1000:.1f} ms",
            file=sys.stderr,
        )
        order = VARIANTS[n % 2 :] + VARIANTS[: n % 2]
        for variant in order:
            run = bench.run(variant, rows)
            runs[variant].append(run)
            print(
                f"{rows} rows, repeat {n + 1}: {LABELS[variant]:28} {run['wall_s']:8.3f} s "
                f"wall, {run['client_cpu_s']:.3f} s CPU, {run['count_429']} x 429, "
                f"load {run['load_average_1min']:.2f}",
                file=sys.stderr,
            )
    reference = {k: statistics.median(r[k] for r in references) for k in references[0]}
    goal = goal_of(rows, reference)
    results: dict[str, Any] = {}
    for variant in VARIANTS:
        median = _harness.median_of(runs[variant])
        ratio = median["wall_s"] / goal["reference_s"]
        total_429 = sum(r["count_429"] for r in runs[variant])
        results[variant] = {
            "runs": runs[variant],
            "median": median,
            "ratio_to_reference": ratio,
            "ratio_to_rate_bound": median["wall_s"] / goal["rate_bound_s"],
            "count_429_total": total_429,
            "goal_met": ratio <= goal["max_ratio"] and total_429 == 0,
        }
    return {
        "rows": rows,
        "repeat": repeat,
        "references": references,
        "reference": reference,
        "goal": goal,
        "results": results,
        "processor_over_bare": results["processor"]["median"]["wall_s"]
        / results["bare"]["median"]["wall_s"],
    }


# -- output ----------------------------------------------------------------------------------


def table(scenarios: list[dict[str, Any]]) -> str:
    header = [
        "rows",
        "variant",
        "runs",
        "wall time (s)",
        "single create (s)",
        "activation (ms)",
        "reference (s)",
        "rate bound (s)",
        "wall / reference",
        "goal",
        "429s",
        "client CPU (s)",
    ]
    lines: list[list[str]] = []
    for sc in scenarios:
        goal = sc["goal"]
        ref = sc["reference"]
        for variant in VARIANTS:
            res = sc["results"][variant]
            median = res["median"]
            if variant == "processor":
                met = "met" if res["goal_met"] else "**missed**"
                verdict = f"<= {goal['max_ratio']:.2f}x: {met}"
            else:
                verdict = "-"
            lines.append(
                [
                    str(sc["rows"]),
                    LABELS[variant],
                    str(len(res["runs"])),
                    f"{median['wall_s']:.3f}",
                    f"{ref['create_s']:.3f}",
                    f"{ref['activation_s'] * 1000:.1f}",
                    f"{goal['reference_s']:.3f}",
                    f"{goal['rate_bound_s']:.3f}",
                    f"{res['ratio_to_reference']:.3f}x",
                    verdict,
                    str(res["count_429_total"]),
                    f"{median['client_cpu_s']:.3f}",
                ]
            )
    return _harness.markdown_table(header, lines, "rlrrrrrrrlrr")


def timeline_table(scenarios: list[dict[str, Any]]) -> str:
    """Where each variant's time went, from the fake's arrival log (the first run of each)."""
    header = [
        "rows",
        "variant",
        "warm-up at (s)",
        "create windows: start (s) x count",
        "last create at (s)",
        "read-backs at (s)",
        "activations at (s)",
        "end (s)",
    ]
    lines: list[list[str]] = []
    for sc in scenarios:
        for variant in VARIANTS:
            run = sc["results"][variant]["runs"][0]
            line = run["timeline"]
            windows = ", ".join(
                f"{w['start_s']:.3f} x {int(w['count'])}" for w in line["create_windows"]
            )
            lines.append(
                [
                    str(sc["rows"]),
                    LABELS[variant],
                    f"{line.get('root_first_s', float('nan')):.3f}",
                    windows,
                    f"{line.get('create_last_s', float('nan')):.3f}",
                    f"{line.get('batch_list_first_s', float('nan')):.3f}"
                    f"-{line.get('batch_list_last_s', float('nan')):.3f}",
                    f"{line.get('batch_activate_first_s', float('nan')):.3f}"
                    f"-{line.get('batch_activate_last_s', float('nan')):.3f}",
                    f"{run['wall_s']:.3f}",
                ]
            )
    return _harness.markdown_table(header, lines, "rlrlrrrr")


def summary(scenarios: list[dict[str, Any]]) -> list[str]:
    lines = []
    for sc in scenarios:
        goal = sc["goal"]
        res = sc["results"]["processor"]
        met = "met" if res["goal_met"] else "MISSED"
        lines.append(
            f"- {sc['rows']} rows: processor {res['median']['wall_s']:.3f} s = "
            f"{res['ratio_to_reference']:.3f}x the {goal['reference']} "
            f"({goal['reference_s']:.3f} s); goal <= {goal['max_ratio']:.2f}x and no 429: "
            f"{met} ({res['count_429_total']} x 429); bare httpx "
            f"{sc['results']['bare']['median']['wall_s']:.3f} s; processor / bare "
            f"{sc['processor_over_bare']:.3f}x."
        )
        if goal["kind"] == "rate":
            lines.append(
                f"  The processor's own limiter, with `rate_margin={goal['rate_margin_s']:g}` "
                f"(every window {WINDOW + goal['rate_margin_s']:g} s), bounds it at "
                f"{goal['limiter_bound_s']:.3f} s: processor / that "
                f"{res['median']['wall_s'] / goal['limiter_bound_s']:.4f}x."
            )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--scenarios", default="20,100", help="rows per job, comma-separated (20,100)"
    )
    parser.add_argument(
        "--repeat", type=int, default=3, help="runs of a scenario of at most 30 rows (3)"
    )
    parser.add_argument(
        "--repeat-long", type=int, default=1, help="runs of a rate-bound scenario (1)"
    )
    parser.add_argument(
        "--epsilon",
        type=float,
        default=0.1,
        help="seconds the bare loop adds to each 60 s window before its next wave (0.1)",
    )
    parser.add_argument(
        "--create-latency",
        type=float,
        default=CREATE_LATENCY,
        help=f"seconds each create takes at the fake ({CREATE_LATENCY:g}, the upstream's); "
        "shorter only to try the script quickly",
    )
    parser.add_argument("--json", type=Path, default=None, help="(results/real_timing.json)")
    args = parser.parse_args(argv)
    wanted = [int(n) for n in args.scenarios.split(",") if n.strip()]
    if not wanted or min(wanted) < 1 or args.repeat < 1 or args.repeat_long < 1:
        parser.error("scenarios and repeats must be whole numbers >= 1")

    info = _harness.machine()
    print(f"# {_harness.describe(info)}", file=sys.stderr)
    options = [
        *FAKE_OPTIONS,
        "--create-latency", str(args.create_latency),
        "--max-hospitals", str(max(10_000, 2 * max(wanted))),
    ]  # fmt: skip
    scenarios: list[dict[str, Any]] = []
    with _harness.fake_upstream(options) as (url, fake):
        bench = Bench(url, fake, args.epsilon, args.create_latency)
        for rows in wanted:
            long = rows > CREATES_PER_WINDOW
            scenarios.append(scenario(bench, rows, args.repeat_long if long else args.repeat))

    report = {
        "benchmark": "real_timing",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": info,
        "config": {
            "scenarios": wanted,
            "repeat": args.repeat,
            "repeat_long": args.repeat_long,
            "bare_epsilon_s": args.epsilon,
            "fake_upstream": "python -m hospital_bulk.testing "
            + " ".join(options)
            + " (a separate process, uvicorn on loopback), reset before every run",
            "processor_settings": {  # every one its default
                "create_rate": DEFAULTS.create_rate,
                "other_rate": DEFAULTS.other_rate,
                "rate_margin": DEFAULTS.rate_margin,
                "concurrency": DEFAULTS.concurrency,
                "batch_size": DEFAULTS.batch_size,
                "timeout": str(DEFAULTS.timeout),
                "backend": DEFAULTS.backend,
            },
            "goals": {
                "one_window": f"wall <= {LATENCY_GOAL} x (single create + one activation)",
                "rate_bound": f"wall <= {RATE_GOAL} x ((ceil(rows/30) - 1) x 60 s + single "
                "create), and 0 x 429",
            },
            "cpu": "time.process_time() of the benchmark process (all its threads), "
            "around asyncio.run(job) only",
        },
        "scenarios": {str(sc["rows"]): sc for sc in scenarios},
    }
    text = "\n".join(
        [
            table(scenarios),
            "",
            *summary(scenarios),
            "",
            "Timeline of the first run of each (arrivals at the fake, seconds from the run's "
            "start):",
            "",
            timeline_table(scenarios),
        ]
    )
    print()
    print(_harness.describe(info))
    print()
    print(text)
    _harness.write_outputs("real_timing", report, text, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
