"""The ``hospital-bulk`` command line: check a CSV file, load it, follow, resume or undo a job.

```text
hospital-bulk validate FILE [--max-rows N] [--max-bytes N] [--max-errors N]
                            [--formula-policy reject|neutralize] [--json]
hospital-bulk process FILE [--base-url URL] [--create-rate R] [--other-rate R]
                           [--concurrency N] [--batch-size N] [--timeout S]
                           [--idempotency-key K] [--skip-invalid-rows] [--activate-partial]
                           [--backend URL] [--redis-prefix P] [--json] [-q] [-v]
hospital-bulk process --resume JOB [options of resume]
hospital-bulk status JOB [--backend URL] [--redis-prefix P] [--result] [--json]
hospital-bulk resume JOB [--base-url URL] [--create-rate R] [--other-rate R]
                         [--concurrency N] [--timeout S] [--activate-partial]
                         [--backend URL] [--redis-prefix P] [--json] [-q] [-v]
hospital-bulk rollback JOB [--base-url URL] [--other-rate R] [--timeout S]
                           [--backend URL] [--redis-prefix P] [--json] [-v]
hospital-bulk demo [--fast] [--json] [-v]
hospital-bulk fake-upstream [--host H] [--port N] [--create-latency S] [--no-rate-limits]
                            [--batch-cap N] [fault options]   (python -m hospital_bulk.testing)
```

``python -m hospital_bulk`` runs the same command line. ``FILE`` may be ``-`` for standard
input.

Jobs live in the backend: ``memory://`` (the default) keeps them in the command's own memory,
so they end with it; ``--backend redis://HOST:6379/0`` (or ``$REDIS_URL``) stores them where a
later ``status``, ``resume`` or ``rollback`` finds them.

Exit statuses: 0 success (the file is valid; the job completed; the rollback is done); 1 the
job ended without completing; 2 invalid input (an invalid or unreadable file, a wrong option
or setting, no upstream URL, an unknown job, a job command without a shared backend; nothing
was sent); 3 the command could not be carried out (the backend or the upstream failed outside
a job's run, the job's state refuses it); 4 (``status`` only) the job has not ended yet; 130
interrupted.

Output: results go to standard output (a table, or JSON with ``--json``); progress and errors
go to standard error, so ``--json`` output can be piped. On a terminal the progress is a live
bar (drawn by ``rich`` when it is installed: ``pip install "hospital-bulk[cli]"``); elsewhere
it is a plain line at most every 5 rows or 10 % of the file, so logs stay readable. An
expected failure is one line, ``hospital-bulk: error: ...``, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import math
import os
import re
import shlex
import shutil
import sys
import textwrap
import threading
import time
import types
from collections.abc import Callable, Sequence
from importlib import resources
from typing import IO, Any, NoReturn, Protocol

from ._config import Settings
from ._exceptions import (
    ConfigurationError,
    CSVSourceError,
    CSVValidationError,
    HospitalBulkError,
    IdempotencyError,
    JobNotFoundError,
    JobStateError,
)
from ._jobs import JobResult, JobSnapshot, JobStatus, RowState, WaitReason
from ._notebook import bar_text, created_rows, phase_text, settled_rows, waiting_text
from ._sync import BulkProcessor
from ._validation import IssueCode, ValidationIssue, ValidationReport, validate_csv

__all__ = ["main"]

PROG = "hospital-bulk"

EXIT_OK = 0
EXIT_NOT_COMPLETED = 1
EXIT_INVALID = 2
EXIT_ERROR = 3
EXIT_NOT_ENDED = 4
EXIT_INTERRUPTED = 130

_DEMO_URL = "http://fake-upstream.local"
# `status` reads the backend only; settings still need an upstream URL, never used.
_NO_UPSTREAM = "http://upstream.not-configured.invalid"
_SAMPLE = "_samples/hospitals.csv"
_TICK = 0.5  # seconds between polls of a running job (for what it waits for)
_NAME_WIDTH = 40  # the longest name shown in the plain result table
_URL_CREDENTIALS = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s@'\"]+@")

_log = logging.getLogger("hospital_bulk")


# -- errors and output ---------------------------------------------------------------------------


class _UsageError(Exception):
    """A wrong command line (argparse's complaint)."""


class _Interrupted(KeyboardInterrupt):
    """Ctrl-C, with a one-line account of the job it stopped."""


class _CheckFailed(Exception):
    """The demo's check at the fake upstream found a problem."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _UsageError(f"{message} (see '{self.prog} --help')")


def _redact(text: str) -> str:
    """Hide the credentials of any URL in a message (``scheme://user:password@``)."""
    return _URL_CREDENTIALS.sub(r"\1***@", text)


def _out(text: str = "") -> None:
    print(text, file=sys.stdout, flush=True)


def _err(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _fail(message: str, status: int) -> int:
    _err(f"{PROG}: error: {_redact(' '.join(message.split()))}")
    return status


def _is_terminal(stream: IO[str]) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def _load_rich() -> Any | None:
    """Return rich's console, progress and table modules, or ``None`` without rich."""
    try:
        return types.SimpleNamespace(
            console=importlib.import_module("rich.console"),
            progress=importlib.import_module("rich.progress"),
            table=importlib.import_module("rich.table"),
        )
    except ImportError:
        return None


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Lay out a plain-text table; the last column is not padded."""
    widths = [len(h) for h in headers]
    for cells in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, cells, strict=True)]
    lines = []
    for cells in [list(headers), *rows]:
        padded = [c.ljust(w) for c, w in zip(cells[:-1], widths[:-1], strict=True)] + [cells[-1]]
        lines.append("  ".join(padded).rstrip())
    return lines


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _plural(count: int, word: str, words: str | None = None) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {words or word + 's'}"


def _count(issues: list[ValidationIssue], truncated: int) -> int:
    """How many issues a list stands for: the listed ones, plus those not listed."""
    overflow = (IssueCode.TOO_MANY_ERRORS, IssueCode.TOO_MANY_WARNINGS)
    return sum(1 for i in issues if i.code not in overflow) + truncated


# -- validate ------------------------------------------------------------------------------------


def _issue_rows(report: ValidationReport) -> list[list[str]]:
    def cells(kind: str, issue: ValidationIssue) -> list[str]:
        return [
            kind,
            str(issue.code),
            "-" if issue.row is None else str(issue.row),
            "-" if issue.line is None else str(issue.line),
            issue.column or "-",
            issue.message,
        ]

    return [cells("error", i) for i in report.errors] + [
        cells("warning", i) for i in report.warnings
    ]


def _print_issues(report: ValidationReport, write: Callable[[str], None]) -> None:
    rows = _issue_rows(report)
    if rows:
        for line in _table(["kind", "code", "row", "line", "column", "message"], rows):
            write(line)


def _issue_json(issue: ValidationIssue) -> dict[str, Any]:
    return {
        "code": str(issue.code),
        "row": issue.row,
        "line": issue.line,
        "column": issue.column,
        "message": issue.message,
    }


def _report_json(report: ValidationReport) -> dict[str, Any]:
    return {
        "ok": report.ok,
        "total_rows": report.total_rows,
        "valid_rows": report.total_rows - report.invalid_rows,
        "invalid_rows": report.invalid_rows,
        "errors": [_issue_json(i) for i in report.errors],
        "warnings": [_issue_json(i) for i in report.warnings],
        "truncated_errors": report.truncated_errors,
        "truncated_warnings": report.truncated_warnings,
        "bytes_read": report.bytes_read,
        "sha256": report.sha256,
        "encoding": report.encoding,
    }


def _source(path: str) -> Any:
    """The CSV source for a FILE argument: a path, or standard input for ``-``."""
    return sys.stdin.buffer if path == "-" else path


def _label(path: str) -> str:
    return "<stdin>" if path == "-" else path


def _cmd_validate(args: argparse.Namespace) -> int:
    report = validate_csv(
        _source(args.file),
        max_rows=args.max_rows,
        max_bytes=args.max_bytes,
        max_errors=args.max_errors,
        formula_policy=args.formula_policy,
        keep_rows=False,
    )
    if args.json:
        _out(json.dumps(_report_json(report), indent=2))
    else:
        _print_issues(report, _out)
        valid = report.total_rows - report.invalid_rows
        verdict = "valid" if report.ok else "invalid"
        _out(
            f"{_label(args.file)}: {verdict}: {_plural(report.total_rows, 'row')} "
            f"({valid} valid, {report.invalid_rows} invalid), "
            f"{_plural(_count(report.errors, report.truncated_errors), 'error')}, "
            f"{_plural(_count(report.warnings, report.truncated_warnings), 'warning')}"
        )
        _out(f"  {report.encoding}, {report.bytes_read} bytes, sha256 {report.sha256}")
    return EXIT_OK if report.ok else EXIT_INVALID


# -- progress ------------------------------------------------------------------------------------


class _Display(Protocol):
    def update(self, snapshot: JobSnapshot) -> None: ...

    def close(self, snapshot: JobSnapshot | None) -> None: ...


class _LineDisplay:
    """Plain progress lines for logs: at most one per 5 rows or 10 % of the job."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream
        self._lock = threading.Lock()
        self._shown: int | None = None
        self._activated = 0
        self._waiting: WaitReason | None = None
        self._waiting_shown_at = 0.0

    def _write(self, text: str) -> None:
        self._stream.write(text + "\n")
        self._stream.flush()

    def _progress_line(self, snapshot: JobSnapshot, settled: int) -> None:
        total = snapshot.total_rows
        percent = 100.0 * settled / total if total else 100.0
        eta = snapshot.eta_seconds
        eta_text = f", eta {eta:.0f} s" if eta is not None and eta >= 1 else ""
        self._write(
            f"progress: {settled}/{total} rows ({percent:.0f}%): "
            f"{created_rows(snapshot)} created, {snapshot.counts.get(RowState.REJECTED, 0)} "
            f"rejected, {snapshot.counts.get(RowState.UNKNOWN, 0)} unknown; "
            f"{snapshot.elapsed_seconds:.1f} s{eta_text}"
        )
        self._shown = settled

    def update(self, snapshot: JobSnapshot) -> None:
        with self._lock:
            total = snapshot.total_rows
            settled = settled_rows(snapshot)
            if self._shown is None:
                self._write(
                    f"job {snapshot.job_id}: {_plural(total, 'row')} in "
                    f"{_plural(len(snapshot.batch_ids), 'batch', 'batches')}"
                )
                self._shown = 0
            step = max(5, math.ceil(total / 10))
            if settled >= self._shown + step or (settled == total and self._shown < total):
                self._progress_line(snapshot, settled)
            self._batches(snapshot)
            waiting = waiting_text(snapshot)
            now = time.monotonic()
            if waiting is not None and (
                snapshot.waiting_for is not self._waiting or now - self._waiting_shown_at >= 30
            ):
                self._write(waiting)
                self._waiting, self._waiting_shown_at = snapshot.waiting_for, now

    def _batches(self, snapshot: JobSnapshot) -> None:
        batches, activated = len(snapshot.batch_ids), len(snapshot.activated_batches)
        step = max(1, math.ceil(batches / 10))
        if activated >= self._activated + step or (activated == batches > self._activated):
            self._write(f"batches activated: {activated}/{batches}")
            self._activated = activated

    def close(self, snapshot: JobSnapshot | None) -> None:
        with self._lock:
            if snapshot is not None and settled_rows(snapshot) != self._shown:
                self._progress_line(snapshot, settled_rows(snapshot))
            if snapshot is not None:
                self._batches(snapshot)


class _BarDisplay:
    """A one-line progress bar redrawn in place, for a terminal without rich."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream
        self._lock = threading.Lock()
        self._drawn = 0
        self._last = 0.0
        self._best = 0

    def _draw(self, snapshot: JobSnapshot) -> None:
        total = snapshot.total_rows
        self._best = max(self._best, settled_rows(snapshot))
        done = min(self._best, total)
        fraction = done / total if total else 1.0
        parts = [
            f"{phase_text(snapshot):<10}",
            bar_text(done, total, 24),
            f"{done}/{total}",
            f"{100 * fraction:3.0f}%",
            f"{snapshot.elapsed_seconds:.0f} s",
        ]
        waiting = waiting_text(snapshot)
        if waiting:
            parts.append(waiting)
        line = "  ".join(parts)
        columns = shutil.get_terminal_size((80, 24)).columns
        line = line[: max(columns - 1, 20)]
        self._stream.write("\r" + line.ljust(self._drawn))
        self._stream.flush()
        self._drawn = len(line)
        self._last = time.monotonic()

    def update(self, snapshot: JobSnapshot) -> None:
        with self._lock:
            # At most ten redraws a second; the last state is drawn by `close`.
            if time.monotonic() - self._last >= 0.1:
                self._draw(snapshot)

    def close(self, snapshot: JobSnapshot | None) -> None:
        with self._lock:
            if snapshot is not None:
                self._draw(snapshot)
            if self._drawn:
                self._stream.write("\n")
                self._stream.flush()
                self._drawn = 0


class _RichDisplay:
    """rich's live progress bar, for a terminal."""

    def __init__(self, stream: IO[str], rich: Any) -> None:
        columns = rich.progress
        self._progress = columns.Progress(
            columns.SpinnerColumn(),
            columns.TextColumn("{task.description}"),
            columns.BarColumn(),
            columns.MofNCompleteColumn(),
            columns.TaskProgressColumn(),
            columns.TimeElapsedColumn(),
            columns.TextColumn("{task.fields[note]}", markup=False),
            console=rich.console.Console(file=stream),
        )
        self._task: Any = None
        self._lock = threading.Lock()
        self._best = 0

    def update(self, snapshot: JobSnapshot) -> None:
        with self._lock:
            self._best = max(self._best, settled_rows(snapshot))
            note = waiting_text(snapshot) or ""
            if self._task is None:
                self._progress.start()
                self._task = self._progress.add_task(
                    phase_text(snapshot), total=snapshot.total_rows, note=note
                )
            self._progress.update(
                self._task, completed=self._best, description=phase_text(snapshot), note=note
            )

    def close(self, snapshot: JobSnapshot | None) -> None:
        with self._lock:
            if self._task is None:
                return
            if snapshot is not None:
                self._progress.update(
                    self._task,
                    completed=settled_rows(snapshot),
                    description=phase_text(snapshot),
                    note="",
                )
            self._progress.stop()
            self._task = None


class _NoDisplay:
    """No progress at all (``--quiet``)."""

    def update(self, snapshot: JobSnapshot) -> None:
        pass

    def close(self, snapshot: JobSnapshot | None) -> None:
        pass


def _display(stream: IO[str], *, quiet: bool = False) -> _Display:
    if quiet:
        return _NoDisplay()
    if not _is_terminal(stream):
        return _LineDisplay(stream)
    rich = _load_rich()
    if rich is None:
        return _BarDisplay(stream)
    return _RichDisplay(stream, rich)


class _Ticker:
    """Polls a running job, so that waits (warm-up, rate limit, breaker) show as they happen."""

    def __init__(self, poll: Callable[[], JobSnapshot], show: Callable[[JobSnapshot], None]):
        self._poll = poll
        self._show = show
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="hospital-bulk-ticker", daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(_TICK):
            try:
                self._show(self._poll())
            except Exception:  # the job ended, the processor closed: the next tick stops
                _log.debug("progress poll failed", exc_info=True)

    def __enter__(self) -> _Ticker:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# -- settings and backends -----------------------------------------------------------------------


def _again(args: argparse.Namespace, *, upstream: bool = False) -> str:
    """The options a later command needs to find this command's job: those given here."""
    parts: list[str] = []
    if getattr(args, "backend", None) is not None:
        parts += ["--backend", shlex.quote(_redact(args.backend))]
    if getattr(args, "redis_prefix", None) is not None:
        parts += ["--redis-prefix", shlex.quote(args.redis_prefix)]
    if upstream and getattr(args, "base_url", None) is not None:
        parts += ["--base-url", shlex.quote(_redact(args.base_url))]
    return "".join(" " + part for part in parts)


def _settings(
    args: argparse.Namespace, command: str, *, upstream: bool = True, shared: bool = False
) -> Settings:
    """The settings of a command: its options, over the environment, over the defaults.

    Args:
        args: The parsed command line.
        command: The command's name, for messages.
        upstream: Whether the command talks to the upstream (and so needs its URL).
        shared: Whether the command works on a stored job (and so needs a shared backend).

    Raises:
        ConfigurationError: A setting is wrong or missing.
    """
    backend = args.backend
    if backend is None:
        backend = os.environ.get("REDIS_URL") or "memory://"
    prefix = args.redis_prefix
    if prefix is None:
        prefix = os.environ.get("HOSPITAL_BULK_REDIS_PREFIX") or None
    if shared and backend.startswith("memory://"):
        raise ConfigurationError(
            f"'{command}' needs the shared backend the job was processed with: a job kept in "
            "memory ends with the command that ran it. Pass --backend redis://HOST:6379/0 (or "
            "set REDIS_URL) and the same --redis-prefix as when it was processed"
        )
    overrides: dict[str, Any] = {"backend": backend}
    if prefix is not None:
        overrides["redis_prefix"] = prefix
    for option in ("base_url", "create_rate", "other_rate", "concurrency", "batch_size", "timeout"):
        value = getattr(args, option, None)
        if value is not None:
            overrides[option] = value
    for flag in ("skip_invalid_rows", "activate_partial"):
        if getattr(args, flag, False):
            overrides[flag] = True
    if "base_url" not in overrides and not os.environ.get("HOSPITAL_API_BASE_URL"):
        if upstream:
            raise ConfigurationError(
                "no upstream URL: pass --base-url URL or set HOSPITAL_API_BASE_URL"
            )
        overrides["base_url"] = _NO_UPSTREAM
    settings = Settings.from_env(os.environ, **overrides)
    args.where = (
        "memory"
        if settings.backend.startswith("memory://")
        else f"{_redact(settings.backend)} (prefix {settings.redis_prefix!r})"
    )
    return settings


def _shared(settings: Settings) -> bool:
    return not settings.backend.startswith("memory://")


# -- process, resume, status, rollback, demo -----------------------------------------------------


def _execute(
    processor: BulkProcessor,
    snapshot: JobSnapshot,
    *,
    resume: bool = False,
    quiet: bool = False,
    after_interrupt: str = "",
) -> tuple[JobResult, JobSnapshot]:
    """Run a created or stored job with a progress display on standard error.

    Args:
        processor: The processor that holds the job.
        snapshot: The job as it stands.
        resume: Resume the job (a stored one) rather than run it (a new one).
        quiet: Show no progress.
        after_interrupt: What to tell after Ctrl-C (how to resume), from ``"; "`` on.

    Raises:
        _Interrupted: Ctrl-C; the job was cancelled, and the message says how far it got.
    """
    job_id = snapshot.job_id
    display = _display(sys.stderr, quiet=quiet)
    go = processor.resume if resume else processor.run
    try:
        display.update(snapshot)
        with _Ticker(lambda: processor.status(job_id), display.update):
            result = go(job_id, on_progress=display.update)
    except KeyboardInterrupt:
        display.close(None)
        stopped = processor.cancel(job_id)
        raise _Interrupted(
            f"interrupted: job {job_id} {stopped.status} with {created_rows(stopped)}/"
            f"{stopped.total_rows} rows created, {stopped.counts.get(RowState.UNKNOWN, 0)} "
            f"unknown, {len(stopped.activated_batches)}/{len(stopped.batch_ids)} batches "
            f"activated{after_interrupt}"
        ) from None
    except BaseException:
        display.close(None)
        raise
    final = processor.status(job_id)
    display.close(final)
    return result, final


def _print_result(result: JobResult, final: JobSnapshot) -> None:
    headers = ["row", "hospital_id", "name", "status", "error"]
    rich = _load_rich() if _is_terminal(sys.stdout) else None
    if rich is not None:
        table = rich.table.Table(*headers)
        for h in result.hospitals:
            table.add_row(
                str(h.row),
                "" if h.hospital_id is None else str(h.hospital_id),
                h.name,
                str(h.status),
                h.error or "",
            )
        # Cells are the user's data: no markup, emoji codes or highlighting applied to them.
        console = rich.console.Console(file=sys.stdout, markup=False, emoji=False, highlight=False)
        console.print(table)
    else:
        rows = [
            [
                str(h.row),
                "-" if h.hospital_id is None else str(h.hospital_id),
                _clip(h.name, _NAME_WIDTH),
                str(h.status),
                h.error or "",
            ]
            for h in result.hospitals
        ]
        for line in _table(headers, rows):
            _out(line)
    _out(
        f"status {result.status}: {result.processed_hospitals}/{result.total_hospitals} "
        f"processed, {result.failed_hospitals} failed, {result.processing_time_seconds:.2f} s, "
        f"batch activated: {'yes' if result.batch_activated else 'no'}"
    )
    batches = ", ".join(str(b) for b in result.batch_ids) or "none"
    _out(f"job {result.job_id}; batches: {batches}")
    if final.error:
        _out(f"reason: {final.error}")


def _report(
    result: JobResult,
    final: JobSnapshot,
    as_json: bool,
    *,
    success: JobStatus = JobStatus.COMPLETED,
    next_steps: str = "",
) -> int:
    """Print a job's report; return 0 when it ended as hoped, else 1 (with an error line)."""
    if as_json:
        _out(json.dumps(result.model_dump(mode="json"), indent=2))
    else:
        _print_result(result, final)
    if result.status is success:
        return EXIT_OK
    reason = f": {final.error}" if final.error else ""
    return _fail(f"job {result.job_id} {result.status}{reason}{next_steps}", EXIT_NOT_COMPLETED)


def _next_steps(args: argparse.Namespace, settings: Settings, job_id: str) -> str:
    """What to do with a job that did not complete, for the end of an error line."""
    if not _shared(settings):
        return ""
    again = _again(args, upstream=True)
    return (
        f"; send what is missing with '{PROG} resume {job_id}{again}', or delete its batches "
        f"with '{PROG} rollback {job_id}{again}'"
    )


def _after_interrupt(args: argparse.Namespace, settings: Settings, job_id: str) -> str:
    """How to go on after Ctrl-C, for the end of the interruption's line."""
    if not _shared(settings):
        return (
            "; the job was kept in this command's memory and cannot be resumed "
            "(--backend redis://HOST:6379/0 keeps jobs resumable)"
        )
    return f"; resume it with '{PROG} resume {job_id}{_again(args, upstream=True)}'"


def _cmd_process(args: argparse.Namespace) -> int:
    if args.resume is not None:
        if args.file is not None:
            raise _UsageError(f"give FILE or --resume JOB, not both (see '{PROG} process --help')")
        given = {
            "--idempotency-key": args.idempotency_key is not None,
            "--batch-size": args.batch_size is not None,
            "--skip-invalid-rows": args.skip_invalid_rows,
        }
        for option, present in given.items():
            if present:
                raise _UsageError(
                    f"{option} shapes a new job; it cannot change a job resumed with --resume"
                )
        return _resume(args, args.resume, "process --resume")
    if args.file is None:
        raise _UsageError(
            "the following arguments are required: FILE (or --resume JOB) "
            f"(see '{PROG} process --help')"
        )
    settings = _settings(args, "process")
    with BulkProcessor(settings=settings) as processor:
        # `submit` then `run` is `process`, with the job id known before the rows are sent.
        snapshot = processor.submit(_source(args.file), idempotency_key=args.idempotency_key)
        job_id = snapshot.job_id
        if snapshot.replayed:
            _err(
                f"idempotency key {args.idempotency_key!r} was used before with this file: "
                f"job {job_id}, {snapshot.status}"
            )
        result, final = _execute(
            processor,
            snapshot,
            quiet=args.quiet,
            after_interrupt=_after_interrupt(args, settings, job_id),
        )
    return _report(result, final, args.json, next_steps=_next_steps(args, settings, job_id))


def _resume(args: argparse.Namespace, job_id: str, command: str) -> int:
    settings = _settings(args, command, shared=True)
    with BulkProcessor(settings=settings) as processor:
        snapshot = processor.status(job_id)
        if snapshot.status is JobStatus.ROLLED_BACK:  # before any progress is shown
            raise JobStateError(
                f"job {job_id} was rolled back; submit the file again",
                job_id=job_id,
                status=str(snapshot.status),
            )
        if snapshot.status is JobStatus.COMPLETED:
            _err(f"job {job_id} has already completed: nothing to send")
        result, final = _execute(
            processor,
            snapshot,
            resume=True,
            quiet=args.quiet,
            after_interrupt=_after_interrupt(args, settings, job_id),
        )
    return _report(result, final, args.json, next_steps=_next_steps(args, settings, job_id))


def _cmd_resume(args: argparse.Namespace) -> int:
    return _resume(args, args.job, "resume")


def _when(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))


def _print_status(snapshot: JobSnapshot, again: str) -> None:
    job_id = snapshot.job_id
    counts = ", ".join(f"{n} {state}" for state, n in snapshot.counts.items() if n)
    _out(f"job {job_id}: {snapshot.status}")
    _out(f"  rows: {snapshot.total_rows}" + (f" ({counts})" if counts else ""))
    _out(f"  batches: {len(snapshot.batch_ids)}, {len(snapshot.activated_batches)} activated")
    if snapshot.idempotency_key is not None:
        _out(f"  idempotency key: {snapshot.idempotency_key}")
    _out(
        f"  created {_when(snapshot.created_at)}, started {_when(snapshot.started_at)}, "
        f"finished {_when(snapshot.finished_at)}; {snapshot.elapsed_seconds:.2f} s running"
    )
    if snapshot.error:
        _out(f"  reason: {snapshot.error}")
    status = snapshot.status
    if status is JobStatus.PENDING:
        _out(f"  next: not started; '{PROG} resume {job_id}{again}' runs it")
    elif status.terminal and status not in (JobStatus.COMPLETED, JobStatus.ROLLED_BACK):
        _out(
            f"  next: '{PROG} resume {job_id}{again}' sends what is missing; "
            f"'{PROG} rollback {job_id}{again}' deletes its batches"
        )


def _cmd_status(args: argparse.Namespace) -> int:
    settings = _settings(args, "status", upstream=False, shared=True)
    with BulkProcessor(settings=settings) as processor:
        snapshot = processor.status(args.job)
        result = processor.result(args.job) if args.result else None
    if result is not None:
        if args.json:
            _out(json.dumps(result.model_dump(mode="json"), indent=2))
        else:
            _print_result(result, snapshot)
    elif args.json:
        _out(json.dumps(snapshot.model_dump(mode="json"), indent=2))
    else:
        _print_status(snapshot, _again(args))
    if snapshot.status is JobStatus.COMPLETED:
        return EXIT_OK
    return EXIT_NOT_COMPLETED if snapshot.status.terminal else EXIT_NOT_ENDED


def _cmd_rollback(args: argparse.Namespace) -> int:
    settings = _settings(args, "rollback", shared=True)
    job_id = args.job
    with BulkProcessor(settings=settings) as processor:
        before = processor.status(job_id)
        unsure = before.counts.get(RowState.UNKNOWN, 0) + before.counts.get(RowState.IN_FLIGHT, 0)
        if unsure and before.status is not JobStatus.ROLLED_BACK:
            _err(
                f"{_plural(unsure, 'row')} of unknown outcome may still land upstream: waiting "
                f"up to {settings.reconcile_horizon:.0f} s before deleting the batches"
            )
        try:
            result = processor.rollback(job_id)
        except KeyboardInterrupt:
            raise _Interrupted(
                f"interrupted: the rollback of job {job_id} may be incomplete; it is safe to "
                f"repeat: '{PROG} rollback {job_id}{_again(args, upstream=True)}'"
            ) from None
        final = processor.status(job_id)
    return _report(result, final, args.json, success=JobStatus.ROLLED_BACK)


def _check_fake(fake: Any, result: JobResult) -> str:
    """Check at the fake that every row of the job exists exactly once and is active.

    Returns:
        The check's one-line summary.

    Raises:
        _CheckFailed: A row is missing, duplicated, or inactive.
    """
    stored = [h for batch_id in result.batch_ids for h in fake.batch(batch_id)]
    duplicates = fake.duplicates()
    inactive = [h for h in stored if not h.active]
    by_id = {h.id: h for h in stored}
    missing = [
        h.row
        for h in result.hospitals
        if h.hospital_id not in by_id or by_id[h.hospital_id].name != h.name
    ]
    summary = (
        f"upstream check: {_plural(len(stored), 'hospital')}, "
        f"{len(duplicates)} duplicates, "
        + ("all active" if not inactive else f"{len(inactive)} inactive")
    )
    if duplicates or inactive or missing or len(stored) != result.total_hospitals:
        detail = f"; rows missing at the fake: {missing}" if missing else ""
        raise _CheckFailed(summary + detail)
    return summary


def _cmd_demo(args: argparse.Namespace) -> int:
    from .testing import FakeDirectory

    info = _err if args.json else _out
    latency = 0.2 if args.fast else 5.0
    sample = resources.files("hospital_bulk").joinpath(_SAMPLE).read_bytes()
    fake = FakeDirectory(create_latency=latency)
    info("demo: the bundled sample CSV into a fake Hospital Directory API, in this process")
    info(
        f"      with the real service's limits: {latency:g} s per create, "
        "30 creates/minute, 20 per batch"
    )
    with BulkProcessor(_DEMO_URL, transport=fake.transport()) as processor:
        snapshot = processor.submit(sample)
        result, final = _execute(
            processor,
            snapshot,
            after_interrupt="; the demo's job and fake live in this command's memory",
        )
    status = _report(result, final, args.json)
    try:
        info(_check_fake(fake, result))
    except _CheckFailed as exc:
        return _fail(str(exc), EXIT_NOT_COMPLETED)
    return status


def _cmd_fake_upstream(args: argparse.Namespace) -> int:
    # The options, the fake they build and the server are those of `python -m
    # hospital_bulk.testing` (its parser is this command's parent).
    from ._fake import serve
    from .testing import _build_fake, _missing_parser

    if missing := _missing_parser(args.http):
        return _fail(missing, EXIT_INVALID)
    routes = None
    if args.fault_routes:
        routes = frozenset(name.strip() for name in args.fault_routes.split(",") if name.strip())
    fake = _build_fake(args, routes, not args.no_rate_limits)
    limits = (
        "no rate limits"
        if args.no_rate_limits
        else f"{args.create_rate[0]} creates per {args.create_rate[1]:g} s"
    )
    _err(
        f"{PROG}: serving the fake upstream on http://{args.host}:{args.port}: "
        f"{args.create_latency:g} s per create, {limits}, {args.batch_cap} per batch, "
        f"seed {fake.seed}; Ctrl-C stops it"
    )
    try:
        serve(fake, host=args.host, port=args.port, log_level=args.log_level, http=args.http)
    except ImportError as exc:  # uvicorn is not installed
        return _fail(str(exc), EXIT_INVALID)
    except SystemExit:  # uvicorn could not start (e.g. the port is taken) and logged why
        return _fail(f"the fake upstream could not serve on {args.host}:{args.port}", EXIT_ERROR)
    return EXIT_OK


# -- the parser ----------------------------------------------------------------------------------


def _version() -> str:
    import hospital_bulk

    return str(hospital_bulk.__version__)


_EXIT_TEXT = """\
Exit status:
  0    success: the file is valid; the job completed; the rollback is done
  1    the job ended without completing (partially_failed, failed, cancelled,
       interrupted; for status also rolled_back)
  2    invalid input: an invalid file (its errors, with row and line, on
       standard error), a wrong option or setting, no upstream URL, an unknown
       job, a job command without a shared backend; nothing was sent
  3    the command could not be carried out: the backend (Redis) or the
       upstream failed outside a job's run, or the job's state refuses it
       (running in another process, rolled back)
  4    status only: the job has not ended yet (pending, running, activating)
  130  interrupted (Ctrl-C): a running job is cancelled; the message says how
       to resume it
"""

_MAIN_EPILOG = f"""\
Examples:
  {PROG} demo --fast
  {PROG} validate hospitals.csv
  {PROG} process hospitals.csv --base-url https://hospital-directory.onrender.com
  {PROG} process hospitals.csv --backend redis://localhost:6379/0 --json > report.json
  {PROG} status JOB --backend redis://localhost:6379/0
  {PROG} resume JOB --backend redis://localhost:6379/0
  {PROG} fake-upstream --port 8000 --create-latency 0.2

Run '{PROG} COMMAND --help' for a command's options and examples.

{_EXIT_TEXT}"""

_BACKEND_NOTE = """\
Jobs live in the backend: memory:// (the default) keeps them in this command's
memory, so they end with it; --backend redis://HOST:6379/0 (or $REDIS_URL)
stores them where a later status, resume or rollback finds them (with the same
--redis-prefix)."""

_JOB_NOTE = """\
The job must be stored in a shared backend: give the --backend (or $REDIS_URL)
and --redis-prefix (or $HOSPITAL_BULK_REDIS_PREFIX) it was processed with."""


def _command(
    commands: Any,
    name: str,
    *,
    help: str,
    description: str,
    examples: str,
    exits: str,
    parents: Sequence[argparse.ArgumentParser] = (),
    add_help: bool = True,
) -> argparse.ArgumentParser:
    """A command whose --help ends with its examples and exit statuses, laid out as written."""
    parser: argparse.ArgumentParser = commands.add_parser(
        name,
        help=help,
        description=description,
        epilog=f"Examples:\n{examples}\nExit status:\n"
        + textwrap.fill(exits, width=78, initial_indent="  ", subsequent_indent="  "),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=list(parents),
        add_help=add_help,
    )
    return parser


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="""\
Validate CSV files of hospitals and load them into the Hospital Directory API,
safely and as fast as the upstream allows; follow, resume or roll back stored
jobs; serve a fake of the upstream for tests.""",
        epilog=_MAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    verbose = _Parser(add_help=False)
    verbose.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="log the library's messages to standard error (-vv: debug)",
    )

    backend = _Parser(add_help=False)
    group = backend.add_argument_group("where jobs are kept")
    group.add_argument(
        "--backend",
        metavar="URL",
        help="memory:// (jobs end with the command) or redis://HOST:6379/0 (jobs stored for "
        "later commands and other processes) (default: $REDIS_URL, else memory://)",
    )
    group.add_argument(
        "--redis-prefix",
        metavar="P",
        help="the first part of every Redis key; commands share jobs exactly when they use "
        "the same database and prefix (default: $HOSPITAL_BULK_REDIS_PREFIX, else "
        "hospital_bulk)",
    )

    connection = _Parser(add_help=False)
    connection.add_argument(
        "--base-url", metavar="URL", help="the upstream's URL (default: $HOSPITAL_API_BASE_URL)"
    )
    connection.add_argument(
        "--other-rate",
        metavar="RATE",
        help="the budget of each endpoint other than create (default 50/minute)",
    )
    connection.add_argument(
        "--timeout", type=float, metavar="S", help="read timeout in seconds (default 30)"
    )

    sending = _Parser(add_help=False)
    sending.add_argument(
        "--create-rate",
        metavar="RATE",
        help="the create budget, e.g. '30/minute' or '10/6 seconds' (default 30/minute, or "
        "$RATE_LIMIT_REQUESTS per $RATE_LIMIT_PERIOD seconds)",
    )
    sending.add_argument(
        "--concurrency", type=int, metavar="N", help="requests in flight at most (default 20)"
    )
    sending.add_argument(
        "--activate-partial",
        action="store_true",
        help="activate the batches even when some rows could not be created",
    )

    output = _Parser(add_help=False)
    output.add_argument(
        "--json",
        action="store_true",
        help="print the report as JSON (the original service's shape); progress stays on "
        "standard error",
    )
    output.add_argument(
        "-q", "--quiet", action="store_true", help="show no progress (errors still show)"
    )

    # -- validate
    check = _command(
        commands,
        "validate",
        help="check a CSV file; nothing is sent",
        description="""\
Check a CSV file of hospitals (name,address[,phone]) and list every error and
warning with its code, row, line and column. Nothing is sent.""",
        examples=f"""\
  {PROG} validate hospitals.csv
  {PROG} validate hospitals.csv --json | jq '.errors[] | [.row, .line, .message]'
  cat hospitals.csv | {PROG} validate - --max-rows 1000
""",
        exits="0 the file is valid, 2 it is not (or cannot be read), 130 interrupted.",
    )
    check.add_argument("file", metavar="FILE", help="the CSV file ('-' for standard input)")
    check.add_argument("--max-rows", type=int, metavar="N", help="the most data rows allowed")
    check.add_argument("--max-bytes", type=int, metavar="N", help="the largest file allowed")
    check.add_argument(
        "--max-errors",
        type=int,
        metavar="N",
        default=1000,
        help="list at most N errors and N warnings; the rest are counted (default 1000)",
    )
    check.add_argument(
        "--formula-policy",
        choices=["reject", "neutralize"],
        default="reject",
        help="cells spreadsheets run as formulas (=, @, +): an error, or kept behind a "
        "leading ' with a warning (default reject)",
    )
    check.add_argument("--json", action="store_true", help="print the report as JSON")
    check.set_defaults(handler=_cmd_validate)

    # -- process
    new_job = _Parser(add_help=False)
    new_job.add_argument(
        "file", metavar="FILE", nargs="?", help="the CSV file ('-' for standard input)"
    )
    new_job.add_argument(
        "--resume",
        metavar="JOB",
        help="resume this stored job instead of submitting a file (needs a shared backend)",
    )
    new_job.add_argument(
        "--batch-size", type=int, metavar="N", help="rows per upstream batch, 1-20 (default 20)"
    )
    new_job.add_argument(
        "--idempotency-key",
        metavar="K",
        help="a key for the job: the same key with the same file gives back the same job "
        "(run again if it did not complete), with another file it is refused; kept 24 h in "
        "a shared backend, for this command only in memory",
    )
    new_job.add_argument(
        "--skip-invalid-rows",
        action="store_true",
        help="load the valid rows of a file with invalid rows (reported as invalid) instead "
        "of refusing the file",
    )
    load = _command(
        commands,
        "process",
        parents=[new_job, connection, sending, backend, output, verbose],
        help="validate a CSV file and load it into the upstream",
        description=f"""\
Validate a CSV file of hospitals, create every row upstream (in batches of at
most 20, within the rate limits), activate the batches, and print the report.
An invalid file sends nothing: its errors, with row and line, go to standard
error. With --resume JOB, resume a stored job instead (as 'resume JOB').

Settings also come from the original service's environment variables
(HOSPITAL_API_BASE_URL, RATE_LIMIT_REQUESTS, RATE_LIMIT_PERIOD,
RETRY_MAX_ATTEMPTS, CIRCUIT_BREAKER_FAILURE_THRESHOLD,
CIRCUIT_BREAKER_RECOVERY_TIMEOUT) and REDIS_URL, HOSPITAL_BULK_REDIS_PREFIX;
options win.

{_BACKEND_NOTE}""",
        examples=f"""\
  {PROG} process hospitals.csv --base-url https://hospital-directory.onrender.com
  HOSPITAL_API_BASE_URL=http://127.0.0.1:8000 {PROG} process - --json < hospitals.csv
  {PROG} process hospitals.csv --backend redis://localhost:6379/0 --idempotency-key upload-42
  {PROG} process --resume JOB --backend redis://localhost:6379/0
""",
        exits="0 the job completed, 1 it did not, 2 invalid input or settings (nothing "
        "sent), 3 the backend or upstream failed outside the job's run, 130 interrupted.",
    )
    load.set_defaults(handler=_cmd_process)

    # -- status
    status = _command(
        commands,
        "status",
        parents=[backend],
        help="show a stored job's progress or report",
        description=f"""\
Show where a stored job stands: its status, rows per state, batches, times and
the reason it stopped, and what to do next. Nothing is sent upstream.

{_JOB_NOTE}""",
        examples=f"""\
  {PROG} status JOB --backend redis://localhost:6379/0
  REDIS_URL=redis://localhost:6379/0 {PROG} status JOB --json
  {PROG} status JOB --backend redis://localhost:6379/0 --result
""",
        exits="0 the job completed, 1 it ended without completing (rolled back "
        "included), 2 unknown job or no shared backend, 3 the backend failed, 4 the job "
        "has not ended yet.",
    )
    status.add_argument("job", metavar="JOB", help="the job's id")
    status.add_argument(
        "--result",
        action="store_true",
        help="print the job's report, one line per row, instead of its progress",
    )
    status.add_argument("--json", action="store_true", help="print it as JSON")
    status.set_defaults(handler=_cmd_status)

    # -- resume
    again = _command(
        commands,
        "resume",
        parents=[connection, sending, backend, output, verbose],
        help="send what a stored job is missing, then activate it",
        description=f"""\
Resume a stored job that stopped (partially_failed, failed, cancelled,
interrupted): only rows not yet created are sent, on the job's own batches;
rows of unknown outcome are read back first, never sent twice. Then the
batches are activated. A completed job is reported as it is.

{_JOB_NOTE}""",
        examples=f"""\
  {PROG} resume JOB --backend redis://localhost:6379/0 --base-url http://127.0.0.1:8000
  REDIS_URL=redis://localhost:6379/0 {PROG} resume JOB --json > report.json
""",
        exits="0 the job completed, 1 it did not, 2 unknown job or no shared backend, "
        "3 the backend failed or the job cannot be resumed (rolled back, running "
        "elsewhere), 130 interrupted.",
    )
    again.add_argument("job", metavar="JOB", help="the job's id")
    again.set_defaults(handler=_cmd_resume)

    # -- rollback
    undo = _command(
        commands,
        "rollback",
        parents=[connection, backend, verbose],
        help="delete a stored job's batches upstream",
        description=f"""\
Delete every batch of a stored job upstream (a batch already gone counts as
deleted) and mark the job rolled_back. Rows of unknown outcome are waited out
first, so no late create lands after its batch is deleted. Safe to repeat.

{_JOB_NOTE}""",
        examples=f"""\
  {PROG} rollback JOB --backend redis://localhost:6379/0 --base-url http://127.0.0.1:8000
  REDIS_URL=redis://localhost:6379/0 {PROG} rollback JOB --json
""",
        exits="0 rolled back, 2 unknown job or no shared backend, 3 a batch could not be "
        "deleted (the job is left as it was) or the job runs elsewhere, 130 interrupted.",
    )
    undo.add_argument("job", metavar="JOB", help="the job's id")
    undo.add_argument("--json", action="store_true", help="print the report as JSON")
    undo.set_defaults(handler=_cmd_rollback)

    # -- demo
    demo = _command(
        commands,
        "demo",
        parents=[verbose],
        help="load a bundled sample into an in-process fake upstream",
        description="""\
Load the bundled 12-row sample into an in-process fake of the Hospital
Directory API that keeps the real service's timing (5 s per create, 30
creates a minute, 20 hospitals per batch), then check at the fake that every
row exists exactly once and is active. Nothing leaves this machine.""",
        examples=f"""\
  {PROG} demo
  {PROG} demo --fast --json
""",
        exits="0 the job completed and the check passed, 1 otherwise, 130 interrupted.",
    )
    demo.add_argument("--fast", action="store_true", help="0.2 s per create instead of 5 s")
    demo.add_argument("--json", action="store_true", help="print the report as JSON")
    demo.set_defaults(handler=_cmd_demo)

    # -- fake-upstream: the options of `python -m hospital_bulk.testing`, parsed by its parser
    from .testing import _build_parser as _fake_parser

    fake = _command(
        commands,
        "fake-upstream",
        parents=[_fake_parser()],
        add_help=False,  # the parent's -h/--help is kept
        help="serve the fake Hospital Directory API on a port",
        description="""\
Serve the library's fake Hospital Directory API over HTTP (uvicorn; pip
install "hospital-bulk[testing]"), faithful to the upstream's contract and
timing, with seeded faults; the same as 'python -m hospital_bulk.testing'.
Point 'process --base-url' or any other program at it. A test controls it under
/__fake__/: GET state, PUT faults, POST inject, POST restart, POST reset.
Ctrl-C stops it.""",
        examples=f"""\
  {PROG} fake-upstream --port 8000          # the real timing: 5 s creates, 30/minute
  {PROG} fake-upstream --port 8000 --create-latency 0.05 --no-rate-limits
  {PROG} fake-upstream --create-rate 10/6 --batch-cap 5 --seed 1
  {PROG} fake-upstream --error-rate 0.1 --timeout-after-commit-rate 0.05 --seed 7
  curl http://127.0.0.1:8000/__fake__/state
""",
        exits="0 stopped with Ctrl-C, 2 a wrong option (or uvicorn missing), 3 it could "
        "not serve (e.g. the port is taken).",
    )
    fake.set_defaults(handler=_cmd_fake_upstream)
    return parser


# -- main ----------------------------------------------------------------------------------------


class _StderrHandler(logging.Handler):
    """Writes log records to the current ``sys.stderr`` (a live display may replace it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()
        except Exception:
            self.handleError(record)


def _tolerant_output() -> None:
    """Let a report print in any terminal encoding (unencodable characters escaped)."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if callable(reconfigure):
            with contextlib.suppress(Exception):
                reconfigure(errors="backslashreplace")


def _silence_stdout() -> None:
    """After a broken pipe (``hospital-bulk ... | head``), drop what is left to print."""
    with contextlib.suppress(Exception):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


def main(argv: list[str] | None = None) -> int:
    """Run the ``hospital-bulk`` command line.

    Args:
        argv: The arguments, without the program name (default: ``sys.argv[1:]``).

    Returns:
        The exit status: 0 success, 1 the job did not complete, 2 invalid input or settings,
        3 the command could not be carried out (backend or upstream failure, the job's state
        refuses it), 4 (``status``) the job has not ended yet, 130 interrupted.
    """
    try:
        parser = _build_parser()
        args = parser.parse_args(argv)
    except _UsageError as exc:
        return _fail(str(exc), EXIT_INVALID)
    except SystemExit as exc:  # --help, --version
        return exc.code if isinstance(exc.code, int) else EXIT_OK
    except KeyboardInterrupt:
        return _fail("interrupted", EXIT_INTERRUPTED)
    _tolerant_output()
    handler: logging.Handler | None = None
    if getattr(args, "verbose", 0):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        _log.addHandler(handler)
        _log.setLevel(logging.DEBUG if args.verbose > 1 else logging.INFO)
    try:
        return int(args.handler(args))
    except KeyboardInterrupt as exc:
        return _fail(str(exc) or "interrupted", EXIT_INTERRUPTED)
    except _UsageError as exc:
        return _fail(str(exc), EXIT_INVALID)
    except CSVValidationError as exc:
        report = exc.report
        _print_issues(report, _err)
        count = _count(report.errors, report.truncated_errors)
        return _fail(
            f"{_label(args.file)} has {_plural(count, 'error')}; nothing was sent "
            f"(see '{PROG} validate {args.file}')",
            EXIT_INVALID,
        )
    except (ConfigurationError, CSVSourceError, IdempotencyError) as exc:
        return _fail(str(exc), EXIT_INVALID)
    except JobNotFoundError as exc:
        where = getattr(args, "where", None)
        return _fail(f"{exc}" + (f" in {where}" if where else ""), EXIT_INVALID)
    except HospitalBulkError as exc:  # the backend, the upstream, the job's state
        return _fail(str(exc), EXIT_ERROR)
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_NOT_COMPLETED
    finally:
        if handler is not None:
            _log.removeHandler(handler)
            _log.setLevel(logging.NOTSET)
