"""`BulkProcessor`: the synchronous twin of `AsyncBulkProcessor`, for scripts and notebooks.

It owns one event loop running in a background thread (an anyio blocking portal) and runs
every call of the async core there. So it works the same in a plain script and inside
Jupyter, where the notebook's own loop is already running in the calling thread: nothing here
calls ``asyncio.run`` or patches the running loop.

Progress callbacks run in the processor's loop thread; keep them quick (update a widget or a
progress bar, append to a list). The built-in progress display (``progress=``) is drawn from the
calling thread instead, so in Jupyter it lands in the cell that runs the job.

The calling thread never blocks without a timeout: it waits for the loop in short steps, so a
Ctrl-C (a Jupyter kernel interrupt) is seen at once, and cancels what it waits for in the loop.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from types import TracebackType
from typing import Any, Generic, TypeVar

import anyio.from_thread

from ._exceptions import HospitalBulkError
from ._jobs import JobResult, JobSnapshot, JobStatus, RowState
from ._notebook import ProgressDisplay, progress_display
from ._processor import AsyncBulkProcessor, JobEvent, ProgressCallback, Source
from ._validation import ValidationReport

__all__ = ["BulkProcessor"]

_T = TypeVar("_T")

logger = logging.getLogger("hospital_bulk.processor")

#: How often the calling thread wakes while it waits: Ctrl-C and display redraws.
_POLL_SECONDS = 0.1
#: How often a running job's status is read for the display (waits emit no event).
_STATUS_SECONDS = 1.0
#: How long a Ctrl-C waits for the cancelled call to stop in the loop before giving up.
_STOP_SECONDS = 10.0


class BulkProcessor:
    """Loads CSV files of hospitals into the Hospital Directory API, without async code.

    Takes exactly the arguments of `AsyncBulkProcessor` and offers the same methods, blocking.
    Use it as a context manager, or call `close`.

    Example:
        ```python
        with BulkProcessor("http://127.0.0.1:8000") as processor:
            result = processor.process("hospitals.csv", on_progress=print)
        print(result.status)
        ```

    Args:
        *args: As for `AsyncBulkProcessor`.
        **kwargs: As for `AsyncBulkProcessor`.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._portal_cm = anyio.from_thread.start_blocking_portal()
        self._portal = self._portal_cm.__enter__()
        try:
            self._processor: AsyncBulkProcessor = self._portal.call(_construct, args, kwargs)
        except BaseException:
            self._portal_cm.__exit__(None, None, None)
            raise
        self._closed = False

    @property
    def settings(self) -> Any:
        """The processor's `Settings`."""
        return self._processor.settings

    def __enter__(self) -> BulkProcessor:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Cancel running jobs (they stay resumable), close the pool and stop the loop thread."""
        if self._closed:
            return
        self._closed = True
        try:
            self._portal.call(self._processor.aclose)
        finally:
            self._portal_cm.__exit__(None, None, None)

    @property
    def shares_jobs(self) -> bool:
        """Whether other processes can see this processor's jobs (a shared job store)."""
        return self._processor.shares_jobs

    def validate(self, source: Source, *, max_rows: int | None = None) -> ValidationReport:
        """Validate a file; see `AsyncBulkProcessor.validate`.

        Args:
            source: A path, the file's bytes, or a binary file object.
            max_rows: A row limit for this file on top of `Settings.max_rows`.

        Returns:
            The validation report.
        """
        return self._call(lambda: self._processor.validate(source, max_rows=max_rows))

    def accepts(self, report: ValidationReport) -> bool:
        """Return whether `submit` creates a job from a file with this report.

        Args:
            report: The file's validation report.
        """
        return self._processor.accepts(report)

    def submit(
        self,
        source: Source,
        *,
        idempotency_key: str | None = None,
        tenant: str | None = None,
        max_rows: int | None = None,
    ) -> JobSnapshot:
        """Validate a file and create its job; see `AsyncBulkProcessor.submit`.

        Args:
            source: A path, the file's bytes, or a binary file object.
            idempotency_key: With a key, the same key and the same file give the same job.
            tenant: Who submits; scopes the idempotency key.
            max_rows: A row limit for this file on top of `Settings.max_rows`.

        Returns:
            The job's snapshot.
        """
        return self._call(
            lambda: self._processor.submit(
                source, idempotency_key=idempotency_key, tenant=tenant, max_rows=max_rows
            )
        )

    def recover(self) -> list[JobResult]:
        """Resume every job whose worker died; see `AsyncBulkProcessor.recover`.

        Returns:
            The results of the jobs it resumed.
        """
        return self._call(self._processor.recover)

    def run(
        self,
        job_id: str,
        *,
        on_progress: ProgressCallback | None = None,
        progress: bool | None = None,
    ) -> JobResult:
        """Run a job until it ends; see `AsyncBulkProcessor.run`.

        Args:
            job_id: The job's id.
            on_progress: Called with a snapshot after every change (in the loop thread).
            progress: Show a progress bar: ``None`` (the default) in a Jupyter kernel only,
                ``True`` anywhere, ``False`` never. See `process`.

        Returns:
            The job's report.

        Raises:
            KeyboardInterrupt: Ctrl-C: the job was cancelled and stays resumable.
        """
        return self._run_job(
            lambda hook: self._processor.run(job_id, on_progress=hook),
            job_id,
            on_progress,
            progress,
        )

    def process(
        self,
        source: Source,
        *,
        idempotency_key: str | None = None,
        tenant: str | None = None,
        on_progress: ProgressCallback | None = None,
        progress: bool | None = None,
    ) -> JobResult:
        """Validate, create and run a job; see `AsyncBulkProcessor.process`.

        Progress: with ``progress=None`` (the default) a bar is shown when running in a
        Jupyter kernel: tqdm's widget where tqdm and ipywidgets are installed (the
        ``notebook`` extra), else a line of text redrawn in place. ``progress=True`` shows
        one anywhere (on standard error: redrawn in place on a terminal, a line per tenth of
        the job otherwise); ``False`` never. It is drawn from the calling thread and works
        alongside ``on_progress``.

        Ctrl-C (a kernel interrupt) cancels the job in the loop, waits for it to stop (at
        most ten seconds) and raises `KeyboardInterrupt`, whose message names the job:
        it is left ``cancelled``, and `resume` finishes it without creating any row twice.

        Args:
            source: A path, the file's bytes, or a binary file object.
            idempotency_key: With a key, the same key and the same file give the same job.
            tenant: Who submits; scopes the idempotency key.
            on_progress: Called with a snapshot after every change (in the loop thread).
            progress: Show a progress bar: ``None`` in a Jupyter kernel only, ``True``
                anywhere, ``False`` never.

        Returns:
            The job's report.

        Raises:
            KeyboardInterrupt: Ctrl-C: the job was cancelled and stays resumable.
        """
        return self._run_job(
            lambda hook: self._processor.process(
                source, idempotency_key=idempotency_key, tenant=tenant, on_progress=hook
            ),
            None,
            on_progress,
            progress,
        )

    def status(self, job_id: str) -> JobSnapshot:
        """Return a job's progress; see `AsyncBulkProcessor.status`.

        Args:
            job_id: The job's id.

        Returns:
            The snapshot.
        """
        return self._call(lambda: self._processor.status(job_id))

    def result(self, job_id: str) -> JobResult:
        """Return a job's report as it stands; see `AsyncBulkProcessor.result`.

        Args:
            job_id: The job's id.

        Returns:
            The report.
        """
        return self._call(lambda: self._processor.result(job_id))

    def resume(
        self,
        job_id: str,
        *,
        on_progress: ProgressCallback | None = None,
        progress: bool | None = None,
    ) -> JobResult:
        """Run a stopped job again; see `AsyncBulkProcessor.resume`.

        Args:
            job_id: The job's id.
            on_progress: Called with a snapshot after every change (in the loop thread).
            progress: Show a progress bar: ``None`` (the default) in a Jupyter kernel only,
                ``True`` anywhere, ``False`` never. See `process`.

        Returns:
            The job's report.

        Raises:
            KeyboardInterrupt: Ctrl-C: the job was cancelled and stays resumable.
        """
        return self._run_job(
            lambda hook: self._processor.resume(job_id, on_progress=hook),
            job_id,
            on_progress,
            progress,
        )

    def rollback(self, job_id: str) -> JobResult:
        """Delete the job's batches upstream; see `AsyncBulkProcessor.rollback`.

        Args:
            job_id: The job's id.

        Returns:
            The job's report.
        """
        return self._call(lambda: self._processor.rollback(job_id))

    def cancel(self, job_id: str) -> JobSnapshot:
        """Stop a running job; see `AsyncBulkProcessor.cancel`.

        Args:
            job_id: The job's id.

        Returns:
            The job's snapshot after it stopped.
        """
        return self._call(lambda: self._processor.cancel(job_id))

    def events(self, job_id: str, *, poll_interval: float = 0.5) -> Iterator[JobEvent]:
        """Yield a job's events until it ends; see `AsyncBulkProcessor.events`.

        Args:
            job_id: The job's id.
            poll_interval: Seconds between reads of a job that runs in another process.

        Yields:
            The job's events.
        """
        agen = self._processor.events(job_id, poll_interval=poll_interval)
        with contextlib.closing(_Closer(self._portal, agen)):
            while True:
                try:
                    yield self._portal.call(agen.__anext__)
                except StopAsyncIteration:
                    return

    def health(self) -> dict[str, Any]:
        """Check the upstream, the breaker and the backend; see `AsyncBulkProcessor.health`.

        Returns:
            The health report.
        """
        return self._call(self._processor.health)

    # -- waiting for the loop ---------------------------------------------------------------

    def _call(self, func: Callable[[], Awaitable[_T]]) -> _T:
        """Run ``func()`` in the loop and wait; Ctrl-C cancels it there, then is raised."""
        call = _Call(self._portal, func)
        try:
            return call.wait(None)
        except KeyboardInterrupt:
            call.stop()
            raise

    def _run_job(
        self,
        start: Callable[[ProgressCallback | None], Awaitable[JobResult]],
        job_id: str | None,
        on_progress: ProgressCallback | None,
        progress: bool | None,
    ) -> JobResult:
        """Run a job in the loop, with the progress display and Ctrl-C handling.

        ``job_id`` is ``None`` for `process`, whose job is not known before it starts.
        """
        watch = _Watch(on_progress)
        display = progress_display(progress)
        # Without a display or a callback the core builds no snapshots (they cost a pass over
        # the rows at every change); the job of `process` is then found among the runs.
        hook = None if display is None and on_progress is None else watch.hook
        before = self._running() if job_id is None else frozenset()
        call = _Call(self._portal, lambda: start(hook))
        try:
            result = call.wait(
                None if display is None else lambda: self._redraw(display, watch, job_id)
            )
        except KeyboardInterrupt:
            if job_id is None:
                job_id = watch.job_id or self._started_since(before)
            stopped = call.stop()
            snapshot = self._final(job_id, watch) if stopped else watch.snapshot
            if display is not None:
                with contextlib.suppress(Exception):
                    display.close(snapshot)
            raise KeyboardInterrupt(_interrupted(job_id, snapshot, stopped)) from None
        except BaseException:
            if display is not None:
                with contextlib.suppress(Exception):
                    display.close(self._final(job_id or watch.job_id, watch))
            raise
        if display is not None:
            display.close(self._final(result.job_id, watch))
        return result

    def _running(self) -> frozenset[str]:
        """The ids of the jobs running in this processor now."""
        return self._portal.call(lambda: frozenset(self._processor._runs))

    def _started_since(self, before: frozenset[str]) -> str | None:
        """The job that started running since ``before``, if exactly one did."""
        with contextlib.suppress(Exception):
            started = self._running() - before
            if len(started) == 1:
                return next(iter(started))
        return None

    def _redraw(self, display: ProgressDisplay, watch: _Watch, job_id: str | None) -> None:
        """Show the latest snapshot; read the job's status now and then (waits emit none)."""
        job_id = job_id or watch.job_id
        now = time.monotonic()
        if job_id is not None and now - watch.polled >= _STATUS_SECONDS:
            watch.polled = now
            # Not created yet, or gone: the hook's snapshots do.
            with contextlib.suppress(HospitalBulkError):
                watch.offer(self._portal.call(self._processor.status, job_id))
        snapshot = watch.snapshot
        if snapshot is not None and snapshot is not watch.drawn:
            watch.drawn = snapshot
            display.update(snapshot)

    def _final(self, job_id: str | None, watch: _Watch) -> JobSnapshot | None:
        """The job's snapshot now, for the end of the display (the last one seen if unknown)."""
        if job_id is None:
            return watch.snapshot
        try:
            return self._portal.call(self._processor.status, job_id)
        except Exception:
            return watch.snapshot


class _Watch:
    """Wraps the caller's ``on_progress`` and keeps the latest snapshot for the display."""

    def __init__(self, on_progress: ProgressCallback | None) -> None:
        self._on_progress = on_progress
        self._lock = threading.Lock()
        self.snapshot: JobSnapshot | None = None
        self.drawn: JobSnapshot | None = None
        self.polled = time.monotonic()

    @property
    def job_id(self) -> str | None:
        snapshot = self.snapshot
        return None if snapshot is None else snapshot.job_id

    def offer(self, snapshot: JobSnapshot) -> None:
        """Keep ``snapshot`` unless a newer one is kept (the hook and the status poll race)."""
        with self._lock:
            kept = self.snapshot
            # Time spent running only grows, over every run of the job.
            if kept is None or snapshot.elapsed_seconds >= kept.elapsed_seconds:
                self.snapshot = snapshot

    def hook(self, snapshot: JobSnapshot) -> Awaitable[None] | None:
        """The ``on_progress`` given to the async core (runs in the loop thread)."""
        self.offer(snapshot)
        if self._on_progress is None:
            return None
        return self._on_progress(snapshot)


class _Call(Generic[_T]):
    """One call of the async core, run in the portal's loop, waited for in short steps."""

    def __init__(
        self, portal: anyio.from_thread.BlockingPortal, func: Callable[[], Awaitable[_T]]
    ) -> None:
        self._finished = threading.Event()
        self._future: concurrent.futures.Future[_T] = portal.start_task_soon(
            _tracked, func, self._finished
        )

    def wait(self, tick: Callable[[], None] | None) -> _T:
        """Wait for the result, calling ``tick`` every step; the call's error is raised."""
        future = self._future
        while True:
            done, _ = concurrent.futures.wait((future,), timeout=_POLL_SECONDS)
            if tick is not None:
                tick()
            if done:
                return future.result()

    def stop(self) -> bool:
        """Cancel the call in the loop and wait for it to end; return whether it did in time."""
        self._future.cancel()
        stopped = self._finished.wait(_STOP_SECONDS)
        if not stopped:
            logger.warning("the interrupted call did not stop within %.0f s", _STOP_SECONDS)
        return stopped


async def _tracked(func: Callable[[], Awaitable[_T]], finished: threading.Event) -> _T:
    try:
        return await func()
    finally:
        finished.set()


def _interrupted(job_id: str | None, snapshot: JobSnapshot | None, stopped: bool) -> str:
    """The message of the `KeyboardInterrupt` raised after Ctrl-C stopped a job."""
    if job_id is None:
        return "interrupted before the job started; nothing was sent"
    if not stopped:
        return (
            f"interrupted: job {job_id} did not stop within {_STOP_SECONDS:.0f} s; "
            f"check processor.status({job_id!r})"
        )
    if snapshot is None:
        return f"interrupted: job {job_id}; see processor.status({job_id!r})"
    counts = snapshot.counts
    created = counts.get(RowState.CREATED, 0) + counts.get(RowState.CREATED_AND_ACTIVATED, 0)
    text = (
        f"interrupted: job {job_id} {snapshot.status.value} with {created}/"
        f"{snapshot.total_rows} rows created"
    )
    if snapshot.status is JobStatus.COMPLETED:
        return text
    return f"{text}; resume it with processor.resume({job_id!r})"


class _Closer:
    def __init__(self, portal: anyio.from_thread.BlockingPortal, agen: Any) -> None:
        self._portal = portal
        self._agen = agen

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._portal.call(self._agen.aclose)


async def _construct(args: tuple[Any, ...], kwargs: dict[str, Any]) -> AsyncBulkProcessor:
    # Built inside the portal's loop, so every loop-bound object belongs to that loop.
    return AsyncBulkProcessor(*args, **kwargs)
