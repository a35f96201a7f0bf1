"""Small helpers shared by several test modules."""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Sequence

from hospital_bulk import JobResult, JobStatus, RowState
from hospital_bulk.testing import FakeDirectory, StoredHospital

# The keys of a JobResult dumped as JSON: the original bulk service's report shape.
REPORT_KEYS = {
    "job_id",
    "status",
    "batch_id",
    "batch_ids",
    "total_hospitals",
    "processed_hospitals",
    "failed_hospitals",
    "processing_time_seconds",
    "batch_activated",
    "hospitals",
}

# Figures a test wants shown at the end of every run (see conftest.pytest_terminal_summary).
SUMMARY_LINES: list[str] = []


def max_in_any_window(times: list[float], window: float) -> int:
    """The most events inside any half-open window ``[t, t + window)``."""
    times = sorted(times)
    best = 0
    for i, start in enumerate(times):
        count = sum(1 for t in times[i:] if t < start + window)
        best = max(best, count)
    return best


def csv_bytes(rows: int, *, start: int = 1, phone: bool = True) -> bytes:
    """A valid CSV file of `rows` distinct hospitals, numbered from `start`."""
    lines = ["name,address,phone" if phone else "name,address"]
    for i in range(start, start + rows):
        cells = [f"Hospital {i}", f"{i} Main Street"] + ([f"555-{i:04d}"] if phone else [])
        lines.append(",".join(cells))
    return ("\n".join(lines) + "\n").encode()


# -- exactly-once checks at the fake upstream ------------------------------------------------

Row = tuple[str, str, "str | None"]


def csv_of(rows: Sequence[Row]) -> bytes:
    """A CSV file (with a phone column) holding exactly `rows`; a ``None`` phone is empty."""
    lines = ["name,address,phone"]
    lines += [f"{name},{address},{phone or ''}" for name, address, phone in rows]
    return ("\n".join(lines) + "\n").encode()


def _hospital_key(name: str, address: str, phone: str | None) -> Row:
    return (name, address, phone or None)


def compare_with_fake(
    fake: FakeDirectory,
    file_rows: Sequence[Sequence[Row]],
    results: Sequence[JobResult],
    *,
    batch_size: int = 20,
) -> list[tuple[str, int, str]]:
    """Compare the fake's hospitals with the files submitted, job by job.

    `file_rows[i]` are the data rows of the file whose job reported `results[i]`; row ``p``
    of a file belongs to the job's batch ``p // batch_size``. Identical rows of one file are
    as many hospitals. The library's report is only trusted for what it claims: a job that
    says ``completed`` and a row that says it exists are checked against the fake.

    Returns:
        ``(kind, rows, message)`` per problem, where kind is one of ``duplicate``,
        ``missing``, ``unexpected``, ``inactive`` and ``dishonest`` (the report claims
        something the fake contradicts), and rows how many hospitals or rows it concerns.
    """
    found: list[tuple[str, int, str]] = []
    if len(file_rows) != len(results):
        return [("dishonest", 0, f"{len(file_rows)} file(s) but {len(results)} result(s)")]
    stored = fake.hospitals
    by_id = {h.id: h for h in stored}
    by_batch: dict[str | None, list[StoredHospital]] = defaultdict(list)
    for h in stored:
        by_batch[h.creation_batch_id].append(h)
    wanted: dict[str, Counter[Row]] = {}
    for number, (rows, result) in enumerate(zip(file_rows, results, strict=True)):
        label = f"job {number} ({result.job_id}, {result.status.value})"
        rows = [_hospital_key(*r) for r in rows]
        batches = [str(b) for b in result.batch_ids]
        if len(batches) != math.ceil(len(rows) / batch_size):
            problem = f"{label}: {len(batches)} batch(es) for {len(rows)} rows"
            found.append(("dishonest", 0, problem))
            continue
        if len(result.hospitals) != len(rows):
            found.append(("dishonest", 0, f"{label}: {len(result.hospitals)} rows reported"))
            continue
        completed = result.status is JobStatus.COMPLETED
        for position, batch in enumerate(batches):
            want = Counter(rows[position * batch_size : (position + 1) * batch_size])
            wanted[batch] = want
            held = by_batch.get(batch, [])
            have = Counter(_hospital_key(h.name, h.address, h.phone) for h in held)
            for key, count in want.items():
                if have[key] < count:
                    lacking = count - have[key]
                    found.append(("missing", lacking, f"{label}: batch {batch} lacks {key}"))
            for key, count in have.items():
                if key not in want:
                    found.append(("unexpected", count, f"{label}: batch {batch} holds {key}"))
            if completed:
                inactive = sorted(h.id for h in held if not h.active)
                if inactive:
                    found.append(
                        ("inactive", len(inactive), f"{label}: inactive hospitals {inactive}")
                    )
        if completed and not result.batch_activated:
            found.append(("dishonest", 0, f"{label}: completed but batch_activated is false"))
        claimed: Counter[int] = Counter()
        for position, entry in enumerate(result.hospitals):
            if completed and entry.status is not RowState.CREATED_AND_ACTIVATED:
                found.append(("dishonest", 1, f"{label}: row {entry.row} is {entry.status}"))
            if entry.status not in (RowState.CREATED, RowState.CREATED_AND_ACTIVATED):
                continue
            batch = batches[position // batch_size]
            hospital = by_id.get(entry.hospital_id) if entry.hospital_id is not None else None
            if (
                hospital is None
                or hospital.creation_batch_id != batch
                or _hospital_key(hospital.name, hospital.address, hospital.phone) != rows[position]
            ):
                found.append(
                    (
                        "dishonest",
                        1,
                        f"{label}: row {entry.row} reported {entry.status} as hospital "
                        f"{entry.hospital_id}, which the fake does not hold for it",
                    )
                )
                continue
            claimed[hospital.id] += 1
            if entry.status is RowState.CREATED_AND_ACTIVATED and not hospital.active:
                found.append(("dishonest", 1, f"{label}: row {entry.row} reported active"))
        for hospital_id, count in claimed.items():
            if count > 1:
                found.append(
                    ("dishonest", count, f"{label}: {count} rows claim hospital {hospital_id}")
                )
    for group in fake.duplicates():
        first = group[0]
        key = _hospital_key(first.name, first.address, first.phone)
        batch = first.creation_batch_id
        expected = wanted.get(batch, Counter()).get(key, 0) if batch is not None else 0
        if expected and len(group) > expected:
            ids = [h.id for h in group]
            found.append(
                (
                    "duplicate",
                    len(group) - expected,
                    f"batch {batch}: {len(group)} hospitals {ids} for {expected} row(s) {key}",
                )
            )
    for batch, held in by_batch.items():
        if batch is None or batch not in wanted:
            ids = [h.id for h in held]
            found.append(("unexpected", len(held), f"hospitals {ids} in batch {batch}: no job's"))
    return found


def check_against_fake(
    fake: FakeDirectory,
    file_rows: Sequence[Sequence[Row]],
    results: Sequence[JobResult],
    *,
    batch_size: int = 20,
) -> list[str]:
    """The problems `compare_with_fake` finds, as readable lines (empty when all is well)."""
    return [
        f"{kind}: {message}"
        for kind, _, message in compare_with_fake(fake, file_rows, results, batch_size=batch_size)
    ]


def committed_beyond_file(
    fake: FakeDirectory,
    file_rows: Sequence[Sequence[Row]],
    results: Sequence[JobResult],
    *,
    batch_size: int = 20,
) -> list[str]:
    """Rows whose hospital the fake committed more often than the file holds them.

    This counts every committed create in the fake's request log, so a duplicate that was
    created and deleted again before the end still shows. It holds only while the fake never
    loses hospitals (no `FakeDirectory.restart`), when a row legitimately goes out again.
    """
    wanted: Counter[tuple[str | None, Row]] = Counter()
    for rows, result in zip(file_rows, results, strict=True):
        for position, row in enumerate(rows):
            batch = str(result.batch_ids[position // batch_size])
            wanted[(batch, _hospital_key(*row))] += 1
    committed: Counter[tuple[str | None, Row]] = Counter()
    for request in fake.requests:
        if request.route != "create" or not request.committed:
            continue
        body = request.body
        assert isinstance(body, dict)
        key = _hospital_key(body["name"], body["address"], body.get("phone"))
        batch = body.get("creation_batch_id")
        committed[(None if batch is None else str(batch).lower(), key)] += 1
    return [
        f"created {count} time(s) for {wanted[where]} row(s): {where[1]} in batch {where[0]}"
        for where, count in committed.items()
        if count > wanted[where]
    ]
