"""Notebook helpers: HTML rendering, pandas conversion and progress displays.

`JobResult`, `JobSnapshot` and `ValidationReport` call the renderers here from their
``_repr_html_`` methods (Jupyter shows a result as a table) and the converters from their
``to_pandas`` methods. `BulkProcessor` builds its progress displays with `progress_display`.

Nothing here imports pandas, tqdm or IPython at import time: they are optional (the
``notebook`` extra brings them) and are looked up when needed.
"""

from __future__ import annotations

import html
import importlib
import math
import shutil
import sys
import time
from collections.abc import Iterable, Sequence
from typing import IO, TYPE_CHECKING, Any, Protocol

from ._jobs import (
    SETTLED_STATES,
    HospitalResult,
    JobResult,
    JobSnapshot,
    JobStatus,
    RowState,
    WaitReason,
)

if TYPE_CHECKING:
    from ._validation import ValidationIssue, ValidationReport

__all__ = [
    "MAX_HTML_ROWS",
    "ProgressDisplay",
    "in_notebook",
    "job_result_frame",
    "job_result_html",
    "job_snapshot_html",
    "progress_display",
    "require_pandas",
    "validation_report_frame",
    "validation_report_html",
    "waiting_text",
]

#: Rows (or issues) shown in one HTML table; the rest are counted in a line below it.
MAX_HTML_ROWS = 200

_PANDAS_HINT = (
    "to_pandas() needs pandas: pip install pandas "
    "(or pip install 'hospital-bulk[notebook]', which also brings the progress widget)"
)

# Rows that went wrong: shown first and highlighted.
_PROBLEMS = frozenset({RowState.REJECTED, RowState.UNKNOWN, RowState.INVALID})
_GOOD = "#1a7f37"
_BAD = "#cf222e"
_PAUSED = "#9a6700"
_STATUS_COLOURS = {
    JobStatus.COMPLETED: _GOOD,
    JobStatus.PARTIALLY_FAILED: _BAD,
    JobStatus.FAILED: _BAD,
    JobStatus.CANCELLED: _PAUSED,
    JobStatus.INTERRUPTED: _PAUSED,
}
# Translucent, so that it reads on light and dark notebook themes alike.
_PROBLEM_ROW = "background-color: rgba(207, 34, 46, 0.12);"
_CELL = "text-align: left;"


# -- HTML ------------------------------------------------------------------------------------


def _e(value: object) -> str:
    """The text of a value, escaped for HTML (``None`` is an empty cell)."""
    return "" if value is None else html.escape(str(value), quote=True)


def _plural(count: int, word: str, plural: str | None = None) -> str:
    return f"{count:,} {word if count == 1 else (plural or word + 's')}"


def _status(status: JobStatus) -> str:
    colour = _STATUS_COLOURS.get(status)
    style = f' style="color: {colour};"' if colour else ""
    return f"<strong{style}>{_e(status.value)}</strong>"


def _table(headers: Sequence[str], rows: Iterable[tuple[Sequence[object], str]]) -> str:
    """An HTML table; each row is ``(cells, style)`` and every cell is escaped."""
    head = "".join(f'<th style="{_CELL}">{_e(h)}</th>' for h in headers)
    body = []
    for cells, style in rows:
        attr = f' style="{style}"' if style else ""
        tds = "".join(f'<td style="{_CELL}">{_e(c)}</td>' for c in cells)
        body.append(f"<tr{attr}>{tds}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _more(hidden: int, what: str, where: str) -> str:
    if hidden <= 0:
        return ""
    return f"<p>&hellip; {_e(f'{hidden:,}')} more {_e(what)} (all of them: {where})</p>"


def _ordered_rows(
    hospitals: Sequence[HospitalResult], limit: int
) -> tuple[list[HospitalResult], int]:
    """The rows to show: the problem rows first, then the others, each in file order."""
    problems = [h for h in hospitals if h.status in _PROBLEMS]
    shown = problems[:limit]
    if len(shown) < limit:
        for h in hospitals:
            if len(shown) >= limit:
                break
            if h.status not in _PROBLEMS:
                shown.append(h)
    return shown, len(problems)


def job_result_html(result: JobResult, *, max_rows: int = MAX_HTML_ROWS) -> str:
    """Render a job's report: a summary line and a table of its rows (problem rows first).

    Args:
        result: The report.
        max_rows: The most rows in the table; a line counts the rest.

    Returns:
        An HTML fragment; every text from the job is escaped.
    """
    total = result.total_hospitals
    deleted = sum(1 for h in result.hospitals if h.status is RowState.DELETED)
    parts = [
        _plural(total, "row"),
        f"{result.processed_hospitals:,} created",
        f"{result.failed_hospitals:,} failed",
    ]
    if deleted:
        parts.append(f"{deleted:,} deleted")
    batches = len(result.batch_ids)
    if batches:
        activated = "activated" if result.batch_activated else "not activated"
        parts.append(f"{_plural(batches, 'batch', 'batches')} {activated}")
    parts.append(f"{result.processing_time_seconds:.1f} s")
    summary = (
        f"<p>Job <code>{_e(result.job_id)}</code>: {_status(result.status)}<br>"
        f"{_e(', '.join(parts))}</p>"
    )
    if not result.hospitals:
        return f'<div class="hospital-bulk-result">{summary}</div>'
    shown, problems = _ordered_rows(result.hospitals, max(max_rows, 0))
    note = ""
    if problems:
        note = (
            f"<p>{_e(_plural(problems, 'row'))} with a problem (rejected, unknown or invalid), "
            "highlighted and listed first.</p>"
        )
    table = _table(
        ("row", "name", "status", "hospital id", "error"),
        (
            (
                (h.row, h.name, h.status.value, h.hospital_id, h.error),
                _PROBLEM_ROW if h.status in _PROBLEMS else "",
            )
            for h in shown
        ),
    )
    more = _more(
        len(result.hospitals) - len(shown),
        "rows",
        "<code>result.hospitals</code> or <code>result.to_pandas()</code>",
    )
    return f'<div class="hospital-bulk-result">{summary}{note}{table}{more}</div>'


def job_snapshot_html(snapshot: JobSnapshot) -> str:
    """Render a job's progress: status, rows per state, times and what it waits for.

    Args:
        snapshot: The snapshot.

    Returns:
        An HTML fragment; every text from the job is escaped.
    """
    settled = settled_rows(snapshot)
    parts = [
        f"{snapshot.percent:.1f}% ({settled:,}/{snapshot.total_rows:,} rows settled)",
        f"{snapshot.elapsed_seconds:.1f} s",
    ]
    if snapshot.eta_seconds is not None and not snapshot.status.terminal:
        parts.append(f"about {snapshot.eta_seconds:.0f} s to go")
    batches = len(snapshot.batch_ids)
    if batches:
        parts.append(f"{len(snapshot.activated_batches)}/{batches} batches activated")
    lines = [
        f"Job <code>{_e(snapshot.job_id)}</code>: {_status(snapshot.status)}",
        _e(", ".join(parts)),
    ]
    counts = [f"{count:,} {state.value}" for state, count in snapshot.counts.items() if count]
    if counts:
        lines.append(_e("rows: " + ", ".join(counts)))
    waiting = waiting_text(snapshot)
    if waiting:
        lines.append(_e(waiting))
    if snapshot.error:
        lines.append(_e(snapshot.error))
    return f'<div class="hospital-bulk-snapshot"><p>{"<br>".join(lines)}</p></div>'


def _issue_table(issues: Sequence[ValidationIssue], limit: int) -> str:
    return _table(
        ("code", "row", "line", "column", "message"),
        [((i.code, i.row, i.line, i.column, i.message), "") for i in issues[:limit]],
    )


def validation_report_html(report: ValidationReport, *, max_rows: int = MAX_HTML_ROWS) -> str:
    """Render a validation report: a summary, then its errors and warnings as tables.

    Args:
        report: The report.
        max_rows: The most issues in each table; a line counts the rest.

    Returns:
        An HTML fragment; every text from the file is escaped.
    """
    limit = max(max_rows, 0)
    errors = len(report.errors) + report.truncated_errors
    warnings = len(report.warnings) + report.truncated_warnings
    if errors:
        verdict = f'<strong style="color: {_BAD};">{_e(_plural(errors, "error"))}</strong>'
    else:
        verdict = f'<strong style="color: {_GOOD};">valid</strong>'
    head = [f"{_e(_plural(warnings, 'warning'))}"] if warnings else []
    valid = report.total_rows - report.invalid_rows
    facts = [
        f"{_plural(report.total_rows, 'data row')}: {valid:,} valid, {report.invalid_rows:,} "
        "invalid",
    ]
    if report.columns:
        facts.append("columns " + ", ".join(report.columns))
    facts.append(f"{report.encoding}, {_plural(report.bytes_read, 'byte')}")
    summary = f"<p>Validation: {', '.join([verdict, *head])}<br>{_e('; '.join(facts))}</p>"
    sections = [summary]
    for title, issues, truncated, what in (
        ("Errors", report.errors, report.truncated_errors, "errors"),
        ("Warnings", report.warnings, report.truncated_warnings, "warnings"),
    ):
        if not issues:
            continue
        sections.append(f"<p><strong>{_e(title)}</strong></p>")
        sections.append(_issue_table(issues, limit))
        sections.append(
            _more(
                len(issues) - min(len(issues), limit),
                what,
                f"<code>report.{what}</code> or <code>report.to_pandas()</code>",
            )
        )
        if truncated:
            sections.append(
                f"<p>{_e(f'{truncated:,}')} more {_e(what)} not listed "
                "(the <code>max_errors</code> cap).</p>"
            )
    return f'<div class="hospital-bulk-validation">{"".join(sections)}</div>'


# -- pandas ----------------------------------------------------------------------------------


def require_pandas() -> Any:
    """Import pandas, or raise an `ImportError` that says how to install it."""
    try:
        return importlib.import_module("pandas")
    except ImportError as exc:
        raise ImportError(_PANDAS_HINT) from exc


def job_result_frame(result: JobResult) -> Any:
    """A DataFrame of a job's rows: row, name, status, hospital_id, error (file order)."""
    pd = require_pandas()
    rows = result.hospitals
    return pd.DataFrame(
        {
            "row": pd.array([h.row for h in rows], dtype="int64"),
            "name": [h.name for h in rows],
            "status": [h.status.value for h in rows],
            "hospital_id": pd.array([h.hospital_id for h in rows], dtype="Int64"),
            "error": [h.error for h in rows],
        }
    )


def validation_report_frame(report: ValidationReport) -> Any:
    """A DataFrame of a report's issues, errors first: severity, code, row, line, ..."""
    pd = require_pandas()
    issues = [("error", i) for i in report.errors] + [("warning", i) for i in report.warnings]
    return pd.DataFrame(
        {
            "severity": [s for s, _ in issues],
            "code": [str(i.code) for _, i in issues],
            "row": pd.array([i.row for _, i in issues], dtype="Int64"),
            "line": pd.array([i.line for _, i in issues], dtype="Int64"),
            "column": [i.column for _, i in issues],
            "message": [i.message for _, i in issues],
        }
    )


# -- progress --------------------------------------------------------------------------------


def settled_rows(snapshot: JobSnapshot) -> int:
    """How many rows of the job have settled (see `SETTLED_STATES`)."""
    return sum(snapshot.counts.get(state, 0) for state in SETTLED_STATES)


def created_rows(snapshot: JobSnapshot) -> int:
    """How many rows of the job exist upstream (created, activated or not)."""
    return snapshot.counts.get(RowState.CREATED, 0) + snapshot.counts.get(
        RowState.CREATED_AND_ACTIVATED, 0
    )


def phase_text(snapshot: JobSnapshot) -> str:
    """What a job is doing, in a word (``creating``, ``activating``, ...)."""
    if snapshot.status is JobStatus.RUNNING:
        return "creating"
    if snapshot.status is JobStatus.ACTIVATING:
        return "activating"
    if snapshot.status is JobStatus.PENDING:
        return "starting"
    return str(snapshot.status)


def bar_text(done: int, total: int, width: int) -> str:
    """A text progress bar, ``[####----]``, `width` characters inside the brackets."""
    filled = round(width * (done / total if total else 1.0))
    return "[" + "#" * filled + "-" * (width - filled) + "]"


def _tally(snapshot: JobSnapshot) -> str:
    """Rows created, and the rejected and unknown ones when there are any."""
    parts = [f"{created_rows(snapshot)} created"]
    for state in (RowState.REJECTED, RowState.UNKNOWN):
        count = snapshot.counts.get(state, 0)
        if count:
            parts.append(f"{count} {state.value}")
    return ", ".join(parts)


def waiting_text(snapshot: JobSnapshot) -> str | None:
    """What a job waits for, in words, or ``None``."""
    reason = snapshot.waiting_for
    if reason is None:
        return None
    left = ""
    if snapshot.waiting_until is not None:
        seconds = snapshot.waiting_until - time.time()
        if seconds >= 0.5:
            left = f", {seconds:.0f} s"
    if reason is WaitReason.WARM_UP:
        return "waiting for the upstream to wake up"
    if reason is WaitReason.RATE_LIMIT:
        return f"waiting for the rate limit{left}"
    if reason is WaitReason.RECONCILE:
        return f"waiting before reading back rows whose outcome is unknown{left}"
    return f"waiting: circuit breaker open after upstream failures{left}"


class ProgressDisplay(Protocol):
    """Shows a job's progress; `BulkProcessor` calls it from the calling thread only."""

    def update(self, snapshot: JobSnapshot) -> None:
        """Show a new snapshot (called at most every tenth of a second)."""

    def close(self, snapshot: JobSnapshot | None) -> None:
        """Show the final snapshot (if any) and finish the display."""


class _TqdmDisplay:
    """tqdm's notebook widget: a live bar, green when the job completed, red otherwise."""

    def __init__(self, factory: Any) -> None:
        self._factory = factory
        self._bar: Any = None
        self._best = 0

    def _show(self, snapshot: JobSnapshot, *, final: bool) -> None:
        settled = min(settled_rows(snapshot), snapshot.total_rows)
        if self._bar is None:
            self._bar = self._factory(
                total=snapshot.total_rows, initial=settled, unit="row", desc=phase_text(snapshot)
            )
            self._best = settled
        # Settled rows only go down when a resumed job sends rejected rows again: keep the best.
        if settled > self._best:
            self._bar.update(settled - self._best)
            self._best = settled
        note = _tally(snapshot)
        waiting = None if final else waiting_text(snapshot)
        if waiting:
            note = f"{note}; {waiting}"
        self._bar.set_description(phase_text(snapshot), refresh=False)
        self._bar.set_postfix_str(note, refresh=True)

    def update(self, snapshot: JobSnapshot) -> None:
        self._show(snapshot, final=False)

    def close(self, snapshot: JobSnapshot | None) -> None:
        if snapshot is not None:
            self._show(snapshot, final=True)
        if self._bar is None:
            return
        self._bar.close()
        # tqdm paints a full bar green; a job that ended otherwise is shown red.
        disp = getattr(self._bar, "disp", None)
        if snapshot is not None and snapshot.status is not JobStatus.COMPLETED and disp:
            disp(bar_style="danger", check_delay=False)
        self._bar = None


class _TextDisplay:
    """One line of text redrawn in place (a terminal, or a notebook without ipywidgets)."""

    def __init__(self, stream: IO[str], *, terminal: bool) -> None:
        self._stream = stream
        self._terminal = terminal
        self._drawn = 0
        self._line_drawn = ""
        self._best = 0
        self._started = False

    def _line(self, snapshot: JobSnapshot, *, final: bool) -> str:
        total = snapshot.total_rows
        self._best = max(self._best, settled_rows(snapshot))
        done = min(self._best, total)
        fraction = done / total if total else 1.0
        parts = [
            f"{phase_text(snapshot):<10}",
            bar_text(done, total, 20),
            f"{done}/{total} {100 * fraction:3.0f}%",
            f"{snapshot.elapsed_seconds:.0f} s",
            _tally(snapshot),
        ]
        waiting = None if final else waiting_text(snapshot)
        if waiting:
            parts.append(waiting)
        line = "  ".join(parts)
        if self._terminal:
            columns = shutil.get_terminal_size((80, 24)).columns
            line = line[: max(columns - 1, 20)]
        return line

    def _draw(self, line: str) -> None:
        if self._started and line == self._line_drawn:
            return
        self._stream.write("\r" + line.ljust(self._drawn))
        self._stream.flush()
        self._drawn = len(line)
        self._line_drawn = line
        self._started = True

    def update(self, snapshot: JobSnapshot) -> None:
        self._draw(self._line(snapshot, final=False))

    def close(self, snapshot: JobSnapshot | None) -> None:
        if snapshot is not None:
            self._draw(self._line(snapshot, final=True))
        if self._started:
            self._stream.write("\n")
            self._stream.flush()
            self._started = False
            self._drawn = 0


class _LineDisplay:
    """Plain lines for a log: the start, every tenth of the job, and the end."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream
        self._shown: int | None = None
        self._waiting: WaitReason | None = None

    def _write(self, text: str) -> None:
        self._stream.write(text + "\n")
        self._stream.flush()

    def _progress(self, snapshot: JobSnapshot, settled: int) -> None:
        total = snapshot.total_rows
        percent = 100.0 * settled / total if total else 100.0
        self._write(
            f"progress: {settled}/{total} rows ({percent:.0f}%): {_tally(snapshot)}; "
            f"{snapshot.elapsed_seconds:.1f} s"
        )
        self._shown = settled

    def update(self, snapshot: JobSnapshot) -> None:
        total = snapshot.total_rows
        settled = settled_rows(snapshot)
        if self._shown is None:
            self._write(
                f"job {snapshot.job_id}: {_plural(total, 'row')} in "
                f"{_plural(len(snapshot.batch_ids), 'batch', 'batches')}"
            )
            self._shown = 0
        step = max(1, math.ceil(total / 10))
        if settled >= self._shown + step:
            self._progress(snapshot, settled)
        # A wait is told once, when it starts (a job may wait long for the rate limit).
        if snapshot.waiting_for is not self._waiting:
            self._waiting = snapshot.waiting_for
            waiting = waiting_text(snapshot)
            if waiting is not None:
                self._write(waiting)

    def close(self, snapshot: JobSnapshot | None) -> None:
        if snapshot is None:
            return
        if self._shown is None:
            self.update(snapshot)
        settled = settled_rows(snapshot)
        if settled != self._shown:
            self._progress(snapshot, settled)
        batches = len(snapshot.batch_ids)
        self._write(
            f"job {snapshot.job_id} {snapshot.status.value}: "
            f"{len(snapshot.activated_batches)}/{batches} batches activated"
            + (f" ({snapshot.error})" if snapshot.error else "")
        )


def in_notebook() -> bool:
    """Whether this code runs in a Jupyter kernel (a notebook, JupyterLab, VS Code, Colab).

    IPython in a terminal is not a notebook: its shell has no kernel.
    """
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return False
    try:
        shell = ipython.get_ipython()
    except Exception:  # an odd IPython: not a notebook we know how to draw in
        return False
    return shell is not None and getattr(shell, "kernel", None) is not None


def _tqdm_notebook() -> Any:
    """The notebook bar class of tqdm, or ``None`` without tqdm or ipywidgets."""
    try:
        module = importlib.import_module("tqdm.notebook")
    except ImportError:
        return None
    # tqdm imports without ipywidgets, but its widget bar then cannot be drawn.
    if getattr(module, "IProgress", None) is None:
        return None
    return module.tqdm


def _is_terminal(stream: IO[str]) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def progress_display(
    progress: bool | None, stream: IO[str] | None = None
) -> ProgressDisplay | None:
    """Choose how to show a job's progress.

    Args:
        progress: ``None``: a bar in a Jupyter kernel, nothing elsewhere. ``True``: always
            (tqdm's widget in a notebook where tqdm and ipywidgets are installed; else a
            line redrawn in place on a terminal or in a notebook; else a line every tenth of
            the job). ``False``: never.
        stream: Where text goes (standard error by default).

    Returns:
        The display, or ``None`` for none.

    Raises:
        TypeError: ``progress`` is not a bool or ``None``.
    """
    if progress is not None and not isinstance(progress, bool):
        raise TypeError(f"progress must be True, False or None, not {progress!r}")
    if progress is False:
        return None
    notebook = in_notebook()
    if progress is None and not notebook:
        return None
    out = sys.stderr if stream is None else stream
    if notebook:
        factory = _tqdm_notebook()
        if factory is not None:
            return _TqdmDisplay(factory)
        return _TextDisplay(out, terminal=False)
    if _is_terminal(out):
        return _TextDisplay(out, terminal=True)
    return _LineDisplay(out)
