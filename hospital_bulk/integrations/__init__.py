"""Integrations with frameworks: each module needs its extra and is imported only when used.

- `hospital_bulk.integrations.fastapi` (extra ``fastapi``): an `APIRouter` of the bulk service
  and a ready app factory.
- `hospital_bulk.integrations.celery` (extra ``celery``): tasks that run jobs on Celery workers,
  and a `JobRunner` that hands jobs to them.

A `JobRunner` is what starts a submitted job somewhere: `BackgroundRunner` runs it in this
process's event loop; the Celery integration's runner sends it to a worker. The web router
takes either.
"""

from __future__ import annotations

import logging
from types import TracebackType
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import anyio
from anyio.abc import TaskGroup

from .._exceptions import ConfigurationError, HospitalBulkError

if TYPE_CHECKING:
    from .._processor import AsyncBulkProcessor

__all__ = ["BackgroundRunner", "JobRunner"]

logger = logging.getLogger("hospital_bulk.integrations")


@runtime_checkable
class JobRunner(Protocol):
    """Starts submitted jobs somewhere: in this process, or on workers."""

    async def start(self, processor: AsyncBulkProcessor, job_id: str, *, resume: bool) -> None:
        """Hand a job over to whatever runs it; return as soon as it is handed over.

        Args:
            processor: The processor the job was submitted to.
            job_id: The job's id.
            resume: Whether this continues a stopped job (`resume`) rather than its first run.
        """
        ...


class BackgroundRunner:
    """A `JobRunner` that runs jobs as tasks of this process's event loop.

    Use it as an async context manager around the time jobs may be started (a web app's
    lifespan); leaving it cancels the jobs still running, which leaves them ``cancelled`` and
    resumable. A job's failure is logged, never raised into the caller that started it.
    """

    def __init__(self) -> None:
        self._group: TaskGroup | None = None

    async def __aenter__(self) -> BackgroundRunner:
        self._group = anyio.create_task_group()
        await self._group.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        group, self._group = self._group, None
        if group is None:
            return None
        group.cancel_scope.cancel()
        return await group.__aexit__(exc_type, exc, tb)

    async def start(self, processor: AsyncBulkProcessor, job_id: str, *, resume: bool) -> None:
        """Start running the job in the background; see `JobRunner.start`.

        Raises:
            ConfigurationError: The runner was not entered (``async with runner:``).
        """
        if self._group is None:
            raise ConfigurationError("enter the BackgroundRunner (async with) before starting jobs")
        self._group.start_soon(_run_logged, processor, job_id, resume)


async def _run_logged(processor: AsyncBulkProcessor, job_id: str, resume: bool) -> None:
    try:
        if resume:
            await processor.resume(job_id)
        else:
            await processor.run(job_id)
    except HospitalBulkError as exc:
        logger.warning("Job %s did not run: %s", job_id, exc)
    except Exception:
        logger.exception("Job %s failed unexpectedly", job_id)
