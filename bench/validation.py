"""How fast, and in how much memory, `validate_csv` checks a 1,000,000-row CSV file.

One generated file (``--rows`` hospitals, about 68 bytes a row: name, address, phone; one
phone in nine empty, some with a leading ``+``; one address in 25 quoted because it holds a
comma; one name in 1,000 quoted with doubled quotes inside, one in 200 with spaces to trim; a
few accented town names; every row valid and distinct) is written once to a temporary file and
read by five variants:

* ``csv.reader``: `csv.reader` over the file opened as text, counting the records. The floor:
  parsing only.
* ``csv.reader + pydantic``: `csv.reader`, then one pydantic v2 model per row
  (``name`` and ``address`` required non-blank strings, ``phone`` optional; surrounding spaces
  stripped by the model) built with ``Hospital(name=..., address=..., phone=phone or None)``,
  rows with the wrong number of fields and `pydantic.ValidationError` counted as invalid, the
  models dropped as they are checked. The reference for the throughput goal.
* ``csv.reader + pydantic, kept``: the same, with every model kept in a list (what holding the
  rows costs that way).
* ``validate_csv``: the call the processor makes (``AsyncBulkProcessor.validate``): the path,
  ``max_rows``, ``max_bytes`` and ``formula_policy`` from a default `Settings`, every other
  argument left to its default, so the returned report holds every valid row.
* ``validate_csv, keep_rows=False``: the same as a dry run, keeping no row.

Every run is a fresh subprocess (this script with ``--child``), so one variant's memory never
counts in another's. The child imports everything first (the libraries, hospital_bulk, the
model class), runs `gc.collect`, resets the kernel's peak-RSS mark (writing ``5`` to
``/proc/self/clear_refs``) and reads ``VmRSS`` from ``/proc/self/status``; then it runs the
variant between `time.perf_counter` (wall) and `time.process_time` (CPU) and reads ``VmHWM``
and ``VmRSS`` again while the result (the report, the list of models) is still alive.

* **Peak memory** is ``VmHWM`` after the variant minus ``VmRSS`` just before it: how much the
  process's resident memory grew at its highest point while the variant ran, everything
  included (Python objects, buffers, allocator overhead, freed memory the allocator kept).
  ``ru_maxrss`` (`resource.getrusage`) is recorded too; it cannot be reset, so its growth is an
  upper bound when the imports peaked higher. **Retained** is ``VmRSS`` after minus before:
  what the result still holds.
* **Python heap peak** comes from one extra, untimed run of every variant with `tracemalloc`
  started just before the variant: the most memory Python's allocators had handed out (no
  allocator overhead, no freed pages), as a cross-check.

Each variant runs ``--repeat`` times (5 by default), in rotating order from round to round;
the **median** of every figure is reported (the least and the most in the JSON, with every
run). Throughput is rows per wall-clock second. The goals: `validate_csv` at least 60% of the
pydantic variant's throughput, measured in the same run, and a peak under 100 MiB.

Usage::

    .venv/bin/python bench/validation.py [--rows 1000000] [--repeat 5] [--json out.json]
        [--no-tracemalloc]

Writes ``bench/results/validation.json`` and ``bench/results/validation.md`` by default and
prints the Markdown table.
"""

from __future__ import annotations

import argparse
import csv
import gc
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import _harness
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from hospital_bulk import Settings, validate_csv

HERE = Path(__file__).resolve().parent
MIB = 1024 * 1024
VARIANTS = ("csv", "pydantic", "pydantic_kept", "validate_csv", "validate_csv_dry")
LABELS = {
    "csv": "csv.reader (floor)",
    "pydantic": "csv.reader + pydantic",
    "pydantic_kept": "csv.reader + pydantic, kept",
    "validate_csv": "validate_csv (as the processor)",
    "validate_csv_dry": "validate_csv, keep_rows=False",
}
THROUGHPUT_GOAL = 0.60
MEMORY_GOAL = 100 * MIB


# -- the file ---------------------------------------------------------------------------------

TOWNS = (
    "Springfield", "Riverton", "Lakeside", "Hillcrest", "Fairview", "Greenwood", "Kingsbridge",
    "Ashford", "Brookfield", "Montréal", "Malmö", "Oakham", "Westport",
)  # fmt: skip
KINDS = (
    "Hospital", "Medical Center", "Community Hospital", "Memorial Hospital",
    "Children's Hospital", "Clinic", "Infirmary", "Health Centre",
)  # fmt: skip
STREETS = (
    "Main Street", "Oak Avenue", "Hospital Road", "Station Lane", "Church Street", "Elm Drive",
    "Victoria Road", "Park Lane", "Mill Road", "High Street", "King's Way",
)  # fmt: skip


def make_row(i: int) -> str:
    """The ``i``-th data row (1-based) of the generated file, with its line end."""
    town = TOWNS[i % 13]
    name = f"{TOWNS[i // 13 % 13]} {KINDS[i % 8]} {i}"
    if i % 1000 == 7:
        name = f'"{name} ""North Wing"""'
    elif i % 200 == 3:
        name = f"  {name} "
    number = i % 997 + 1
    if i % 25 == 0:
        address = f'"{number} {STREETS[i % 11]}, {town}"'
    else:
        address = f"{number} {STREETS[i % 11]} {town}"
    if i % 9 == 0:
        phone = ""
    elif i % 4 == 0:
        phone = f"+1 {i % 1000:03d} 555 {i // 1000 % 10000:04d}"
    else:
        phone = f"555-{i % 1000:03d}-{i // 1000 % 10000:04d}"
    return f"{name},{address},{phone}\n"


def write_file(path: Path, rows: int) -> tuple[int, str]:
    """Write the file of `rows` rows; return its size and SHA-256."""
    sha = hashlib.sha256()
    size = 0
    with open(path, "wb") as out:
        block = ["name,address,phone\n"]
        for i in range(1, rows + 1):
            block.append(make_row(i))
            if len(block) >= 10_000 or i == rows:
                data = "".join(block).encode("utf-8")
                out.write(data)
                sha.update(data)
                size += len(data)
                block = []
    return size, sha.hexdigest()


# -- the variants (run in a child process) ----------------------------------------------------


class Hospital(BaseModel):
    """One row as a pydantic user would model it."""

    model_config = ConfigDict(str_strip_whitespace=True)

    name: str = Field(min_length=1)
    address: str = Field(min_length=1)
    phone: str | None = None


def run_csv(path: str) -> dict[str, Any]:
    records = 0
    with open(path, newline="", encoding="utf-8") as text:
        for _ in csv.reader(text):
            records += 1
    return {"records": records}


def run_pydantic(path: str, keep: bool) -> tuple[dict[str, Any], list[Hospital]]:
    kept: list[Hospital] = []
    valid = invalid = 0
    with open(path, newline="", encoding="utf-8-sig") as text:
        reader = csv.reader(text)
        header = [cell.strip().lower() for cell in next(reader)]
        if header != ["name", "address", "phone"]:
            raise RuntimeError(f"unexpected header {header}")
        for fields in reader:
            if len(fields) != 3:
                invalid += 1
                continue
            name, address, phone = fields
            try:
                model = Hospital(name=name, address=address, phone=phone or None)
            except ValidationError:
                invalid += 1
                continue
            valid += 1
            if keep:
                kept.append(model)
    return {"valid": valid, "invalid": invalid, "kept": len(kept)}, kept


def _status() -> dict[str, int]:
    """``VmRSS`` and ``VmHWM`` of this process, in bytes."""
    found: dict[str, int] = {}
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                found[key] = int(rest.split()[0]) * 1024
    return found


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (``VmHWM``) of this process; return whether it worked."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as clear:
            clear.write("5")
    except OSError:
        return False
    status = _status()
    return status["VmHWM"] <= status["VmRSS"] + 64 * 1024


def child(variant: str, path: str, trace: bool) -> dict[str, Any]:
    """Run one variant once in this (fresh) process and measure it."""
    settings = Settings(base_url="http://unused.invalid")
    gc.collect()
    reset = _reset_peak()
    before = _status()
    ru_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if trace:
        tracemalloc.start()
    started, cpu_started = time.perf_counter(), time.process_time()
    held: Any = None
    if variant == "csv":
        result = run_csv(path)
    elif variant in ("pydantic", "pydantic_kept"):
        result, held = run_pydantic(path, keep=variant == "pydantic_kept")
    else:
        held = validate_csv(
            path,
            max_rows=settings.max_rows,
            max_bytes=settings.max_bytes,
            formula_policy=settings.formula_policy,
            keep_rows=variant == "validate_csv",
        )
        result = {
            "ok": held.ok,
            "total_rows": held.total_rows,
            "kept": len(held.rows),
            "invalid": held.invalid_rows,
            "warnings": len(held.warnings),
            "sha256": held.sha256,
        }
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    traced = tracemalloc.get_traced_memory()[1] if trace else None
    if trace:
        tracemalloc.stop()
    after = _status()
    ru_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    del held
    return {
        "variant": variant,
        "tracemalloc": trace,
        "wall_s": wall,
        "cpu_s": cpu,
        "peak_mib": (after["VmHWM"] - before["VmRSS"]) / MIB,
        "retained_mib": (after["VmRSS"] - before["VmRSS"]) / MIB,
        "ru_maxrss_growth_mib": (ru_after - before["VmRSS"]) / MIB,
        "traced_peak_mib": traced / MIB if traced is not None else None,
        "rss_before_mib": before["VmRSS"] / MIB,
        "hwm_before_mib": before["VmHWM"] / MIB,
        "ru_maxrss_before_mib": ru_before / MIB,
        "hwm_reset": reset,
        "result": result,
    }


# -- the parent -------------------------------------------------------------------------------


def spawn(variant: str, path: Path, trace: bool) -> dict[str, Any]:
    """Run `child` in a fresh interpreter and return its measurements."""
    command = [sys.executable, str(Path(__file__).resolve()), "--child", variant, str(path)]
    if trace:
        command.append("--trace")
    env = dict(os.environ)
    root = str(HERE.parent)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode:
        raise RuntimeError(f"{variant} failed:\n{done.stderr}")
    run: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    run["load_avg_1m"] = os.getloadavg()[0]
    return run


def check(run: dict[str, Any], rows: int, sha256: str) -> None:
    """Every variant saw every row, and every row was valid."""
    variant, result = run["variant"], run["result"]
    if variant == "csv":
        good = result["records"] == rows + 1
    elif variant.startswith("pydantic"):
        kept = rows if variant == "pydantic_kept" else 0
        good = result == {"valid": rows, "invalid": 0, "kept": kept}
    else:
        kept = rows if variant == "validate_csv" else 0
        good = (
            result["ok"]
            and result["total_rows"] == rows
            and result["kept"] == kept
            and result["invalid"] == 0
            and result["warnings"] == 0
            and result["sha256"] == sha256
        )
    if not good:
        raise RuntimeError(f"{variant}: unexpected result {result}")


def max_of(runs: list[dict[str, Any]]) -> dict[str, float]:
    """The greatest of every numeric field over `runs`."""
    return {
        key: max(run[key] for run in runs)
        for key, value in runs[0].items()
        if isinstance(value, (int, float))
    }


def summarise(runs: list[dict[str, Any]], traced: dict[str, dict[str, Any]], rows: int) -> Any:
    summary: dict[str, dict[str, Any]] = {}
    for variant in VARIANTS:
        mine = [
            {k: v for k, v in run.items() if not isinstance(v, bool) and k != "round"}
            for run in runs
            if run["variant"] == variant
        ]
        median: dict[str, Any] = dict(_harness.median_of(mine))
        least, most = _harness.min_of(mine), max_of(mine)
        for key in ("wall_s", "cpu_s", "peak_mib", "retained_mib"):
            median[f"{key}_min"] = least[key]
            median[f"{key}_max"] = most[key]
        median["rows_per_s"] = rows / median["wall_s"]
        median["runs"] = len(mine)
        median["traced_peak_mib"] = traced[variant]["traced_peak_mib"] if traced else None
        summary[variant] = median
    throughput = summary["validate_csv"]["rows_per_s"] / summary["pydantic"]["rows_per_s"]
    peak = summary["validate_csv"]["peak_mib"]
    goals = {
        "throughput_ratio": throughput,
        "cpu_ratio": summary["pydantic"]["cpu_s"] / summary["validate_csv"]["cpu_s"],
        "throughput_goal": THROUGHPUT_GOAL,
        "throughput_met": throughput >= THROUGHPUT_GOAL,
        "peak_mib": peak,
        "peak_goal_mib": MEMORY_GOAL / MIB,
        "peak_met": peak * MIB < MEMORY_GOAL,
        "csv_floor_ratio": summary["validate_csv"]["rows_per_s"] / summary["csv"]["rows_per_s"],
    }
    return summary, goals


def table(summary: dict[str, dict[str, Any]], goals: dict[str, Any], caption: str) -> str:
    rows = []
    for variant in VARIANTS:
        s = summary[variant]
        traced = s["traced_peak_mib"]
        rows.append(
            [
                LABELS[variant],
                f"{s['rows_per_s']:,.0f}",
                f"{s['wall_s']:.2f}",
                f"{s['cpu_s']:.2f}",
                f"{s['peak_mib']:.1f}",
                f"{s['retained_mib']:.1f}",
                "-" if traced is None else f"{traced:.1f}",
            ]
        )
    text = _harness.markdown_table(
        [
            "variant",
            "rows/s",
            "wall s",
            "CPU s",
            "peak RSS growth MiB",
            "retained MiB",
            "Python heap peak MiB",
        ],
        rows,
        "lrrrrrr",
    )
    met = {True: "met", False: "NOT met"}
    vc = summary["validate_csv"]
    return (
        f"{caption}\n\n{text}\n\n"
        f"- validate_csv throughput / csv.reader + pydantic: **{goals['throughput_ratio']:.0%}** "
        f"(goal at least {goals['throughput_goal']:.0%}: {met[goals['throughput_met']]}); "
        f"/ csv.reader alone: {goals['csv_floor_ratio']:.0%}; by CPU time: "
        f"{goals['cpu_ratio']:.0%} of csv.reader + pydantic\n"
        f"- validate_csv peak RSS growth: **{goals['peak_mib']:.1f} MiB** "
        f"(runs: {vc['peak_mib_min']:.1f} to {vc['peak_mib_max']:.1f}; goal under "
        f"{goals['peak_goal_mib']:.0f} MiB: {met[goals['peak_met']]})"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="data rows in the file")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per variant")
    parser.add_argument("--json", type=Path, default=None, help="where to write the report")
    parser.add_argument(
        "--no-tracemalloc", action="store_true", help="skip the extra tracemalloc runs"
    )
    parser.add_argument("--child", nargs=2, metavar=("VARIANT", "PATH"), help=argparse.SUPPRESS)
    parser.add_argument("--trace", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], args.trace)))
        return 0

    info = _harness.machine()
    print(f"# {info['uname']}\n# {_harness.describe(info)}", file=sys.stderr)
    runs: list[dict[str, Any]] = []
    traced: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-validation-") as folder:
        path = Path(folder) / "hospitals.csv"
        started = time.perf_counter()
        size, sha256 = write_file(path, args.rows)
        print(
            f"file: {args.rows:,} rows, {size:,} bytes ({size / args.rows:.1f} bytes a row), "
            f"written in {time.perf_counter() - started:.1f} s",
            file=sys.stderr,
        )
        for n in range(args.repeat):
            shift = n % len(VARIANTS)
            for variant in VARIANTS[shift:] + VARIANTS[:shift]:
                run = spawn(variant, path, trace=False)
                check(run, args.rows, sha256)
                run["round"] = n + 1
                runs.append(run)
                print(
                    f"round {n + 1}: {variant:17s} {run['wall_s']:6.2f} s wall "
                    f"{run['cpu_s']:6.2f} s CPU  peak +{run['peak_mib']:6.1f} MiB  "
                    f"retained +{run['retained_mib']:6.1f} MiB",
                    file=sys.stderr,
                )
        if not args.no_tracemalloc:
            for variant in VARIANTS:
                run = spawn(variant, path, trace=True)
                check(run, args.rows, sha256)
                traced[variant] = run
                peak = run["traced_peak_mib"]
                print(
                    f"tracemalloc: {variant:17s} Python heap peak {peak:6.1f} MiB", file=sys.stderr
                )

    summary, goals = summarise(runs, traced, args.rows)
    caption = (
        f"{args.rows:,} rows, {size / MIB:.1f} MiB ({size:,} bytes); median of {args.repeat} "
        f"runs, each in a fresh process; {_harness.describe(info)}"
    )
    text = table(summary, goals, caption)
    report = {
        "benchmark": "validation",
        "method": __doc__,
        "machine": info,
        "settings": {"rows": args.rows, "repeat": args.repeat, "tracemalloc": bool(traced)},
        "file": {"rows": args.rows, "bytes": size, "sha256": sha256},
        "labels": LABELS,
        "summary": summary,
        "goals": goals,
        "runs": runs,
        "tracemalloc_runs": list(traced.values()),
    }
    print()
    print(text)
    _harness.write_outputs("validation", report, text, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
