"""Small helpers shared by several test modules."""

from __future__ import annotations


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
