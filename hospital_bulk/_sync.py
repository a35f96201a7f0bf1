"""`BulkProcessor`: the synchronous twin of `AsyncBulkProcessor`, for scripts and notebooks.

It owns one event loop running in a background thread (an anyio blocking portal) and runs
every call of the async core there. So it works the same in a plain script and inside
Jupyter, where the notebook's own loop is already running in the calling thread: nothing here
calls ``asyncio.run`` or patches the running loop.

Progress callbacks run in the processor's loop thread; keep them quick (update a widget or a
progress bar, append to a list).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from types import TracebackType
from typing import Any, TypeVar

import anyio.from_thread

from ._jobs import JobResult, JobSnapshot
from ._processor import AsyncBulkProcessor, JobEvent, ProgressCallback, Source
from ._validation import ValidationReport

__all__ = ["BulkProcessor"]

_T = TypeVar("_T")


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

    def validate(self, source: Source) -> ValidationReport:
        """Validate a file; see `AsyncBulkProcessor.validate`.

        Args:
            source: A path, the file's bytes, or a binary file object.

        Returns:
            The validation report.
        """
        return self._portal.call(self._processor.validate, source)

    def submit(
        self, source: Source, *, idempotency_key: str | None = None, tenant: str | None = None
    ) -> JobSnapshot:
        """Validate a file and create its job; see `AsyncBulkProcessor.submit`.

        Args:
            source: A path, the file's bytes, or a binary file object.
            idempotency_key: With a key, the same key and the same file give the same job.
            tenant: Who submits; scopes the idempotency key.

        Returns:
            The job's snapshot.
        """
        return self._portal.call(
            lambda: self._processor.submit(source, idempotency_key=idempotency_key, tenant=tenant)
        )

    def run(self, job_id: str, *, on_progress: ProgressCallback | None = None) -> JobResult:
        """Run a job until it ends; see `AsyncBulkProcessor.run`.

        Args:
            job_id: The job's id.
            on_progress: Called with a snapshot after every change.

        Returns:
            The job's report.
        """
        return self._portal.call(lambda: self._processor.run(job_id, on_progress=on_progress))

    def process(
        self,
        source: Source,
        *,
        idempotency_key: str | None = None,
        tenant: str | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> JobResult:
        """Validate, create and run a job; see `AsyncBulkProcessor.process`.

        Args:
            source: A path, the file's bytes, or a binary file object.
            idempotency_key: With a key, the same key and the same file give the same job.
            tenant: Who submits; scopes the idempotency key.
            on_progress: Called with a snapshot after every change.

        Returns:
            The job's report.
        """
        return self._portal.call(
            lambda: self._processor.process(
                source, idempotency_key=idempotency_key, tenant=tenant, on_progress=on_progress
            )
        )

    def status(self, job_id: str) -> JobSnapshot:
        """Return a job's progress; see `AsyncBulkProcessor.status`.

        Args:
            job_id: The job's id.

        Returns:
            The snapshot.
        """
        return self._portal.call(self._processor.status, job_id)

    def result(self, job_id: str) -> JobResult:
        """Return a job's report as it stands; see `AsyncBulkProcessor.result`.

        Args:
            job_id: The job's id.

        Returns:
            The report.
        """
        return self._portal.call(self._processor.result, job_id)

    def resume(self, job_id: str, *, on_progress: ProgressCallback | None = None) -> JobResult:
        """Run a stopped job again; see `AsyncBulkProcessor.resume`.

        Args:
            job_id: The job's id.
            on_progress: Called with a snapshot after every change.

        Returns:
            The job's report.
        """
        return self._portal.call(lambda: self._processor.resume(job_id, on_progress=on_progress))

    def rollback(self, job_id: str) -> JobResult:
        """Delete the job's batches upstream; see `AsyncBulkProcessor.rollback`.

        Args:
            job_id: The job's id.

        Returns:
            The job's report.
        """
        return self._portal.call(self._processor.rollback, job_id)

    def cancel(self, job_id: str) -> JobSnapshot:
        """Stop a running job; see `AsyncBulkProcessor.cancel`.

        Args:
            job_id: The job's id.

        Returns:
            The job's snapshot after it stopped.
        """
        return self._portal.call(self._processor.cancel, job_id)

    def events(self, job_id: str) -> Iterator[JobEvent]:
        """Yield a job's events until it ends; see `AsyncBulkProcessor.events`.

        Args:
            job_id: The job's id.

        Yields:
            The job's events.
        """
        agen = self._processor.events(job_id)
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
        return self._portal.call(self._processor.health)


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
