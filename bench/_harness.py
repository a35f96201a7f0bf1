"""What every benchmark here shares: the machine's description, the fake upstream in a process
of its own, the checks of its records, the CSV, and the JSON and Markdown output.

Benchmarks run as scripts (``python bench/<name>.py``), so this module is imported by its bare
name from the scripts' own folder.
"""

from __future__ import annotations

import asyncio
import cProfile
import csv
import gc
import io
import json
import os
import platform
import pstats
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator, Sequence
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

import anyio
import httpx

import hospital_bulk
from hospital_bulk import AsyncBulkProcessor, JobStatus

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
BATCH = 20
# A budget the limiter never waits for (used with `rate_margin=0`).
UNLIMITED = "1000000/minute"


# -- the machine ------------------------------------------------------------------------------


def version_of(name: str) -> str:
    """The installed version of a distribution, or ``"not installed"``."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def _redis_server_version(redis_url: str | None) -> str | None:
    if redis_url is None:
        return None
    import redis

    server = redis.Redis.from_url(redis_url)
    try:
        return str(server.info("server")["redis_version"])
    finally:
        server.close()


def machine(redis_url: str | None = None) -> dict[str, Any]:
    """Where and with what a benchmark ran: CPU, kernel, Python and the libraries' versions."""
    cpu = "unknown"
    with open("/proc/cpuinfo", encoding="utf-8") as info:
        for line in info:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    try:
        commit = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=HERE.parent,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    info: dict[str, Any] = {
        "uname": subprocess.run(
            ["uname", "-a"], capture_output=True, text=True, check=False
        ).stdout.strip()
        or " ".join(platform.uname()),
        "cpu_model": cpu,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "hospital_bulk": hospital_bulk.__version__,
        "hospital_bulk_commit": commit,
        "event_loop": "asyncio (stdlib)",
    }
    for name in ("httpx", "httpcore", "h11", "anyio", "sniffio", "pydantic", "tenacity",
                 "limits", "redis", "hiredis", "uvicorn", "httptools"):  # fmt: skip
        info[name.replace("-", "_")] = version_of(name)
    server = _redis_server_version(redis_url)
    if server is not None:
        info["redis_server"] = server
    return info


def describe(info: dict[str, Any]) -> str:
    """One line naming the machine and the versions that matter, for the printed report."""
    parts = [
        f"{info['cpu_model']} x {info['cpus']}",
        f"Python {info['python']}",
        f"httpx {info['httpx']}",
        f"httpcore {info['httpcore']}",
        f"pydantic {info['pydantic']}",
    ]
    if "redis_server" in info:
        parts += [f"redis-py {info['redis']}", f"Redis {info['redis_server']}"]
    return "; ".join(parts) + f"; hospital_bulk {info['hospital_bulk_commit']}"


# -- the fake upstream, in a process of its own ----------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) a process used so far, from /proc."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


@contextmanager
def fake_upstream(options: Sequence[str]) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """``python -m hospital_bulk.testing <options>`` on a free loopback port, until the block ends.

    Yields the base URL and the process (whose CPU time `proc_cpu` reads).
    """
    port = free_port()
    command = [
        sys.executable, "-m", "hospital_bulk.testing",
        "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
        *options,
    ]  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log)
        try:
            deadline = time.monotonic() + 30
            while True:
                if process.poll() is not None:
                    log.seek(0)
                    tail = log.read().decode(errors="replace")[-2000:]
                    raise RuntimeError(f"the fake upstream exited: {tail}")
                try:
                    if httpx.get(f"{url}/__fake__/state", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("the fake upstream did not start within 30 s")
                time.sleep(0.1)
            yield url, process
        finally:
            process.terminate()  # the process this function started, by its handle
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def fast_upstream_options(rows: int, create_latency: float = 0.0) -> list[str]:
    """A fake with no rate limits, room for every row, and creates that take `create_latency`."""
    return [
        "--create-latency", str(create_latency),
        "--no-rate-limits",
        "--max-hospitals", str(max(10_000, 2 * rows)),
        "--max-concurrent-creates", "10000",
    ]  # fmt: skip


def fake_control(url: str, action: str) -> Any:
    """``GET /__fake__/state`` or ``POST /__fake__/<action>`` (e.g. ``reset``)."""
    method = "GET" if action == "state" else "POST"
    response = httpx.request(method, f"{url}/__fake__/{action}", timeout=60)
    response.raise_for_status()
    return response.json()


def check_upstream(url: str, rows: int) -> dict[str, int]:
    """Every row created exactly once and active; return the requests seen, by route."""
    return audit_state(fake_control(url, "state"), rows)


def audit_state(state: dict[str, Any], rows: int, tolerate: Sequence[int] = ()) -> dict[str, int]:
    """Check the fake's state (``GET /__fake__/state``): every row created exactly once and
    active, and no request failed but with a status in `tolerate`; return the requests seen,
    by route."""
    hospitals = state["hospitals"]
    names = Counter(h["name"] for h in hospitals)
    if len(hospitals) != rows or len(names) != rows:
        raise RuntimeError(f"expected {rows} distinct hospitals, found {len(hospitals)}")
    if not all(h["active"] for h in hospitals):
        raise RuntimeError("some hospitals are not active")
    bad = [
        r
        for r in state["requests"]
        if (r["status"] is None or r["status"] >= 300) and r["status"] not in tolerate
    ]
    if bad:
        raise RuntimeError(f"{len(bad)} request(s) failed upstream, first: {bad[0]}")
    return dict(sorted(Counter(f"{r['method']} {r['route']}" for r in state["requests"]).items()))


def make_csv(rows: int) -> bytes:
    """A valid CSV of `rows` distinct hospitals (``name,address,phone``)."""
    lines = ["name,address,phone"]
    lines += [f"Hospital {i},{i} Main Street,555-{i:04d}" for i in range(1, rows + 1)]
    return ("\n".join(lines) + "\n").encode()


async def bare_job(url: str, data: bytes, in_flight: int, clients: int) -> None:
    """The processor's requests on a fault-free job, with nothing else around them."""
    rows = list(csv.DictReader(io.StringIO(data.decode())))
    batches = [uuid.uuid4() for _ in range(-(-len(rows) // BATCH))]
    per_client = -(-in_flight // clients)
    limits = httpx.Limits(max_connections=per_client, max_keepalive_connections=per_client)
    timeout = httpx.Timeout(30.0, connect=10.0)
    pool = [httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) for _ in range(clients)]
    try:
        first = pool[0]
        (await first.get("/", timeout=120.0)).raise_for_status()
        pending = iter(enumerate(rows))

        async def worker(client: httpx.AsyncClient) -> None:
            for position, row in pending:
                body = create_body(row, batches[position // BATCH])
                response = await client.post("/hospitals/", json=body)
                response.raise_for_status()
                response.json()

        async with anyio.create_task_group() as tg:
            for n in range(min(in_flight, len(rows))):
                tg.start_soon(worker, pool[n % clients])
        await audit_and_activate(first, batches)
    finally:
        for client in pool:
            await client.aclose()


def create_body(row: dict[str, str], batch: uuid.UUID) -> dict[str, str | None]:
    """The body of ``POST /hospitals/`` for a CSV row (``csv.DictReader``) in a batch."""
    return {
        "name": row["name"],
        "address": row["address"],
        "phone": row["phone"] or None,
        "creation_batch_id": str(batch),
    }


async def audit_and_activate(client: httpx.AsyncClient, batches: list[uuid.UUID]) -> None:
    """What the processor does once every row is sent: read every batch back, activate it."""
    sizes = {}
    for batch in batches:
        response = await client.get(f"/hospitals/batch/{batch}")
        response.raise_for_status()
        sizes[batch] = len(response.json())
    for batch in batches:
        response = await client.patch(f"/hospitals/batch/{batch}/activate")
        response.raise_for_status()
        if response.json()["activated_count"] != sizes[batch]:
            raise RuntimeError(f"batch {batch}: the activated count differs")


def timed(
    job: Callable[[], Coroutine[Any, Any, Any]],
    fake_pid: int,
    redis_url: str | None = None,
    profile: cProfile.Profile | None = None,
) -> dict[str, float]:
    """Run `asyncio.run(job())`; its wall time and this process's CPU, the fake's, Redis's."""
    gc.collect()
    redis0 = redis_cpu(redis_url) if redis_url else 0.0
    fake0 = proc_cpu(fake_pid)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    if profile is not None:
        profile.enable()
    asyncio.run(job())
    if profile is not None:
        profile.disable()
    wall = time.perf_counter() - wall0
    cpu = time.process_time() - cpu0
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "fake_cpu_s": proc_cpu(fake_pid) - fake0,
        "redis_cpu_s": redis_cpu(redis_url) - redis0 if redis_url else 0.0,
    }


async def processor_job(url: str, data: bytes, in_flight: int, **backend: Any) -> None:
    async with AsyncBulkProcessor(
        url,
        create_rate=UNLIMITED,
        other_rate=UNLIMITED,
        rate_margin=0,
        concurrency=in_flight,
        **backend,
    ) as processor:
        result = await processor.process(data)
    rows = result.total_hospitals
    if result.status is not JobStatus.COMPLETED or result.processed_hospitals != rows:
        raise RuntimeError(f"the job ended {result.status.value}: {result.processed_hospitals}")


# Connections per client of the bare split-pool loop (the client's own lane size).
SPLIT_CONNECTIONS = 8
VARIANT_LABELS = {
    "bare": "bare httpx",
    "bare_split": "bare httpx, split pool",
    "memory": "processor, memory",
    "redis": "processor, Redis",
}


class JobBench:
    """One job, run against the served fake by variant, timed, and checked at the fake.

    Variants: ``bare`` (one `httpx.AsyncClient`), ``bare_split`` (clients of
    `SPLIT_CONNECTIONS` connections), ``memory`` and ``redis`` (the processor with those
    backends; the Redis one under a fresh key prefix per run, deleted after it).
    """

    def __init__(
        self, name: str, url: str, fake: subprocess.Popen[bytes], rows: int, redis_url: str
    ) -> None:
        self.url = url
        self.fake = fake
        self.rows = rows
        self.redis_url = redis_url
        self.data = make_csv(rows)
        self.base_prefix = f"bench-{name}-{uuid.uuid4().hex[:12]}"
        self.serial = 0
        # The fake's requests by route, the same for every run of every variant.
        self.requests: dict[str, int] | None = None

    def job(
        self, variant: str, in_flight: int
    ) -> tuple[Callable[[], Coroutine[Any, Any, None]], str | None]:
        """The job of `variant` to run, and the Redis key prefix it writes under (if any)."""
        url, data = self.url, self.data
        if variant == "bare":
            return (lambda: bare_job(url, data, in_flight, 1)), None
        if variant == "bare_split":
            clients = -(-in_flight // SPLIT_CONNECTIONS)
            return (lambda: bare_job(url, data, in_flight, clients)), None
        if variant == "memory":
            return (lambda: processor_job(url, data, in_flight)), None
        self.serial += 1
        prefix = f"{self.base_prefix}-{self.serial}"
        redis_url = self.redis_url
        return (
            lambda: processor_job(url, data, in_flight, backend=redis_url, redis_prefix=prefix)
        ), prefix

    def run(
        self, variant: str, in_flight: int, *, profile: cProfile.Profile | None = None
    ) -> dict[str, Any]:
        """One timed run of one variant, checked at the upstream afterwards."""
        fake_control(self.url, "reset")
        job, prefix = self.job(variant, in_flight)
        try:
            times = timed(job, self.fake.pid, self.redis_url if prefix else None, profile)
        finally:
            if prefix is not None:
                delete_prefix(self.redis_url, prefix)
        requests = check_upstream(self.url, self.rows)
        if self.requests is None:
            self.requests = requests
        elif self.requests != requests:
            raise RuntimeError(f"{variant}: other requests than before: {requests}")
        rows = self.rows
        wall, cpu = times["wall_s"], times["cpu_s"]
        return {
            "load_average_1min": os.getloadavg()[0],
            "wall_s": wall,
            "rows_per_s": rows / wall,
            "cpu_s": cpu,
            "cpu_us_per_row": cpu / rows * 1e6,
            "fake_cpu_us_per_row": times["fake_cpu_s"] / rows * 1e6,
            "redis_server_cpu_us_per_row": times["redis_cpu_s"] / rows * 1e6,
        }


def profile_top(profile: cProfile.Profile, by_own_time: int, by_cumulative: int) -> str:
    """The profile's top functions, by own time and by cumulative time, as text."""
    out = io.StringIO()
    stats = pstats.Stats(profile, stream=out)
    stats.sort_stats("tottime").print_stats(by_own_time)
    stats.sort_stats("cumulative").print_stats(by_cumulative)
    return out.getvalue()


def summarised(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """A variant's runs with their median and least of every numeric field."""
    return {"runs": runs, "median": median_of(runs), "min": min_of(runs)}


def delete_prefix(redis_url: str, prefix: str) -> int:
    """Delete every key under `prefix` (never anything else); return how many."""
    import redis

    client = redis.Redis.from_url(redis_url)
    deleted = 0
    try:
        batch: list[bytes] = []
        for key in client.scan_iter(match=f"{prefix}:*", count=1000):
            batch.append(key)
            if len(batch) >= 500:
                deleted += client.delete(*batch)
                batch.clear()
        if batch:
            deleted += client.delete(*batch)
    finally:
        client.close()
    return deleted


def redis_cpu(redis_url: str) -> float:
    """The Redis server's CPU seconds so far (server-wide, from ``INFO cpu``)."""
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        info = client.info("cpu")
    finally:
        client.close()
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def median_of(runs: list[dict[str, Any]]) -> dict[str, float]:
    """The median of every numeric field over `runs`."""
    return {
        key: statistics.median(run[key] for run in runs)
        for key, value in runs[0].items()
        if isinstance(value, (int, float))
    }


def min_of(runs: list[dict[str, Any]]) -> dict[str, float]:
    """The least of every numeric field over `runs`."""
    return {
        key: min(run[key] for run in runs)
        for key, value in runs[0].items()
        if isinstance(value, (int, float))
    }


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str) -> str:
    """A Markdown table; `align` has one character per column: ``l`` or ``r``."""
    marks = {"l": "---", "r": "---:"}
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(marks[a] for a in align) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def write_outputs(name: str, report: dict[str, Any], table: str, json_path: Path | None) -> None:
    """Write the JSON report and the Markdown table (``results/<name>.md``) the docs include."""
    json_path = json_path or RESULTS / f"{name}.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    markdown = json_path.with_suffix(".md")
    markdown.write_text(table + "\n", encoding="utf-8")
    print(f"\nwritten: {json_path} and {markdown}")
