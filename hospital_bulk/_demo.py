"""The demo: a CSV validated, then loaded into the built-in fake upstream with the bulk workflow.

`python -m hospital_bulk [FILE.csv]` validates the file (the bundled sample by default) and,
when it is valid, creates its rows concurrently in one batch of the in-process fake Hospital
Directory API, activates the batch and prints the result. Nothing leaves the machine.
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from importlib import resources
from pathlib import Path

import anyio

from ._client import HospitalDirectoryClient
from ._exceptions import HospitalBulkError
from ._models import HospitalCreate
from ._validation import HospitalRow, ValidationReport, validate_csv
from .testing import FakeDirectory


def _print_report(report: ValidationReport) -> None:
    print(
        f"validated {report.total_rows} row(s), {report.bytes_read} bytes ({report.encoding}): "
        f"{len(report.rows)} valid, {report.invalid_rows} invalid, "
        f"{len(report.warnings)} warning(s)"
    )
    for issue in report.errors:
        print(f"  error   {issue}")
    for issue in report.warnings:
        print(f"  warning {issue}")


async def _load(rows: list[HospitalRow], latency: float) -> None:
    fake = FakeDirectory(create_latency=latency)
    batch_id = uuid.uuid4()
    started = time.perf_counter()
    done = 0
    results: dict[int, str] = {}
    live = sys.stdout.isatty()  # redraw one progress line on a terminal, else print lines
    async with HospitalDirectoryClient("http://fake.local", transport=fake.transport()) as api:

        async def create(row: HospitalRow) -> None:
            nonlocal done
            payload = HospitalCreate(
                name=row.name, address=row.address, phone=row.phone, creation_batch_id=batch_id
            )
            try:
                hospital = await api.create_hospital(payload)
                results[row.row] = f"created (id {hospital.id})"
            except HospitalBulkError as exc:
                results[row.row] = f"failed: {exc}"
            done += 1
            if live:
                print(f"\r  progress: {done}/{len(rows)} created", end="", flush=True)
            elif done == len(rows) or done % 5 == 0:
                print(f"  progress: {done}/{len(rows)} created", flush=True)

        print(f"creating {len(rows)} hospital(s) in batch {batch_id} (fake upstream)")
        async with anyio.create_task_group() as tg:
            for row in rows:
                tg.start_soon(create, row)
        if live:
            print()
        activation = await api.activate_batch(batch_id)
        stored = await api.list_batch(batch_id)
    elapsed = time.perf_counter() - started
    print(f"activated {activation.activated_count} hospital(s) in {elapsed:.2f} s")
    for row in rows:
        print(f"  row {row.row:>3}  {row.name:<40} {results[row.row]}")
    active = sum(h.active for h in stored)
    print(f"result: {active}/{len(rows)} hospitals exist upstream and are active")


def main(argv: list[str] | None = None) -> int:
    """Run the demo.

    Args:
        argv: Command-line arguments (default: `sys.argv[1:]`).

    Returns:
        The process exit code: 0 when the file was valid and loaded, 1 otherwise.
    """
    parser = argparse.ArgumentParser(
        prog="python -m hospital_bulk",
        description="Validate a CSV of hospitals and load it into the built-in fake upstream.",
    )
    parser.add_argument("csv", nargs="?", type=Path, help="a CSV file (default: a sample)")
    parser.add_argument(
        "--latency", type=float, default=0.5, help="the fake's seconds per create (default 0.5)"
    )
    args = parser.parse_args(argv)
    try:
        if args.csv is None:
            sample = resources.files("hospital_bulk").joinpath("_samples/hospitals.csv")
            print("file: the bundled sample (hospital_bulk/_samples/hospitals.csv)")
            report = validate_csv(sample.read_bytes(), max_rows=20)
        else:
            print(f"file: {args.csv}")
            report = validate_csv(args.csv, max_rows=20)
        _print_report(report)
        if not report.ok:
            print("nothing was sent: fix the errors above first")
            return 1
        anyio.run(_load, list(report.rows), args.latency)
    except HospitalBulkError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
