"""Run jobs on Celery workers (extra ``celery``; only this module imports celery).

The web side submits a file (the job is stored in the shared Redis job store) and hands the
job's id to Celery with `CeleryRunner`; a worker runs the job with a processor of its own on
the same Redis database and key prefix; any process follows the job with `status`, `result`
or `events`, which read the shared store.

Example:
    The Celery app, imported by the workers and by the web process:

    ```python
    from celery import Celery
    from hospital_bulk.integrations.celery import register_tasks

    app = Celery("loader", broker="redis://redis:6379/1", backend="redis://redis:6379/1")
    app.conf.update(
        task_acks_late=True,  # the job tasks set these two themselves as well
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_transport_options={"visibility_timeout": 24 * 3600},  # > the longest job
    )
    tasks = register_tasks(app)  # workers build processors with Settings.from_env()
    ```

    The web process:

    ```python
    runner = CeleryRunner(tasks)
    async with AsyncBulkProcessor(settings=Settings.from_env()) as processor:
        snapshot = await processor.submit(data, idempotency_key=key)
        await runner.start(processor, snapshot.job_id, resume=False)
        ...
        snapshot = await processor.status(snapshot.job_id)  # from any process
    ```

Required settings for safe redelivery:

- **The Redis backend, everywhere.** The web process and every worker must build their
  processors with ``backend="redis://..."`` and the same ``redis_prefix`` (with
  `Settings.from_env`: ``REDIS_URL`` and ``HOSPITAL_BULK_REDIS_PREFIX``). A worker with the
  memory backend could never see a job the web process stored (and the web process could
  never see its progress): the tasks refuse it with `ConfigurationError`, and so does
  `CeleryRunner.start` for a processor whose jobs live in its own memory.
- **``acks_late=True`` and ``reject_on_worker_lost=True``** (set on the job tasks by
  `register_tasks`; ``task_acks_late`` and ``task_reject_on_worker_lost`` in the app's
  configuration say the same for every task). The message of a job is acknowledged only when
  its task ends, so a worker that dies mid-job (killed, out of memory, the machine lost) leaves
  it to be delivered again; a prefork child that dies has it requeued at once.
- **The Redis broker's ``visibility_timeout``** (``broker_transport_options``): how long a
  delivered, unacknowledged message stays invisible before the broker delivers it again. A
  dead worker's job task is redelivered only after it. Make it longer than the longest job
  (at the upstream's 30 creates per minute, 10,000 rows take 5.6 hours). When it is shorter,
  nothing runs twice (a job runs under a lease, one worker at a time), but the redelivered
  copy finds the job running in a live worker, retries and may finally fail with
  `JobStateError` while the job itself completes. It must also exceed the retry countdown
  (``lease_ttl`` + 1 s), or retries waiting for their countdown are redelivered too.
  A short timeout is safe, a long one is not slow: the periodic `recover_interrupted_jobs`
  takes over a dead worker's job once its lease lapses (after ``lease_ttl``), whatever the
  visibility timeout; the redelivered message later finds the job completed and returns it.
- **``worker_prefetch_multiplier=1``**: a worker reserves one message at a time, so jobs
  waiting behind a long one stay in the queue for other workers (and are not held
  unacknowledged by a worker that may die).
- **A pool that runs tasks in threads or processes** (``prefork``, ``solo``, ``threads``):
  every task runs its job in an event loop of its own (`anyio.run`); ``gevent`` and
  ``eventlet`` are not supported. No ``time_limit`` or ``soft_time_limit`` shorter than the
  longest job: a job stopped that way is left ``cancelled`` or ``interrupted`` (resumable).
- **The JSON serializer works**: the tasks take a job id and return a `JobResult` dumped with
  ``model_dump(mode="json")``.

A redelivered task resumes its job through the exactly-once machinery: rows are recorded in
flight before they are sent, rows whose outcome is unknown are reconciled with the upstream
after the safety horizon, and every batch is audited before activation, so no row is ever
created twice. While the dead worker's lease has not lapsed yet (a prefork child's task is
requeued at once), the task retries after ``lease_ttl`` + 1 s, at most ``lease_retries``
times, instead of failing. A job already completed returns its result at once.

Large jobs are not split by batch across workers: a job runs in one task under one lease.
Splitting it would need leases per batch in the job store and a final task to audit and
activate; and since every worker shares one upstream rate budget, more workers per job would
not make it faster.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import anyio
import anyio.to_thread
from celery import Celery  # type: ignore[import-untyped]
from kombu.exceptions import OperationalError

from .._config import Settings
from .._exceptions import BackendError, ConfigurationError, JobStateError
from .._jobs import JobResult, JobStatus
from .._processor import AsyncBulkProcessor

__all__ = [
    "CeleryRunner",
    "HospitalBulkTasks",
    "ProcessorFactory",
    "default_processor",
    "register_tasks",
]

logger = logging.getLogger("hospital_bulk.integrations.celery")

ProcessorFactory = Callable[[], AsyncBulkProcessor]
"""Builds a new processor for one task (called in the task's own event loop)."""

# Seconds added to `lease_ttl` before a task retries a job another worker still leases.
_LEASE_MARGIN = 1.0


@dataclasses.dataclass(frozen=True)
class HospitalBulkTasks:
    """The tasks `register_tasks` registered on a Celery app.

    Attributes:
        run_job: ``run_job(job_id)``: runs a submitted job to its end and returns its
            `JobResult` as JSON.
        resume_job: ``resume_job(job_id)``: the same for a stopped job (rows not yet created
            are sent, on the same batches).
        recover_interrupted_jobs: ``recover_interrupted_jobs()``: resumes every job whose
            worker died and returns their results as JSON (see
            `AsyncBulkProcessor.recover`).
        recover_schedule_key: The key of the periodic recovery in the app's
            ``beat_schedule``, or ``None`` when it is not scheduled.
    """

    run_job: Any
    resume_job: Any
    recover_interrupted_jobs: Any
    recover_schedule_key: str | None = None


def default_processor() -> AsyncBulkProcessor:
    """The default processor factory: ``AsyncBulkProcessor(settings=Settings.from_env())``.

    Returns:
        A new processor configured from the environment (``HOSPITAL_API_BASE_URL``,
        ``REDIS_URL``, ``HOSPITAL_BULK_REDIS_PREFIX``, ...; see `Settings.from_env`).

    Raises:
        ConfigurationError: A variable is missing or wrong.
    """
    return AsyncBulkProcessor(settings=Settings.from_env())


def register_tasks(
    app: Celery,
    processor_factory: ProcessorFactory | None = None,
    *,
    name_prefix: str = "hospital_bulk",
    recover_every: float | None = 60.0,
    lease_retries: int = 10,
) -> HospitalBulkTasks:
    """Register the job tasks on a Celery app (and the periodic recovery in its beat schedule).

    Call it where the app is defined, so that the workers and the processes sending tasks
    register the same names.

    Args:
        app: The Celery app.
        processor_factory: Builds a new processor for each task, in the task's own event loop;
            the task closes it afterwards. It must use the Redis backend shared with the
            submitting process. Default: `default_processor` (`Settings.from_env`).
        name_prefix: The tasks are named ``{name_prefix}.run_job``, ``.resume_job`` and
            ``.recover_interrupted_jobs``.
        recover_every: Seconds between runs of ``recover_interrupted_jobs`` in the app's beat
            schedule (run ``celery beat`` once for the deployment), or ``None`` not to
            schedule it. Each scheduled run expires after this long if no worker took it.
        lease_retries: How many times a job task retries while another worker holds the
            job's lease (after ``lease_ttl`` + 1 s each) before it fails with
            `JobStateError`.

    Returns:
        The registered tasks.

    Raises:
        ConfigurationError: An argument has a wrong value.
    """
    if not isinstance(name_prefix, str) or not name_prefix:
        raise ConfigurationError("name_prefix must be a non-empty string")
    if recover_every is not None and (
        isinstance(recover_every, bool)
        or not isinstance(recover_every, (int, float))
        or recover_every <= 0
    ):
        raise ConfigurationError(
            f"recover_every must be seconds > 0 or None, not {recover_every!r}"
        )
    if isinstance(lease_retries, bool) or not isinstance(lease_retries, int) or lease_retries < 0:
        raise ConfigurationError(
            f"lease_retries must be a whole number >= 0, not {lease_retries!r}"
        )
    factory = processor_factory or default_processor
    job_options: dict[str, Any] = {
        "bind": True,
        "acks_late": True,
        "reject_on_worker_lost": True,
        "max_retries": lease_retries,
    }

    def run_job(task: Any, job_id: str) -> dict[str, Any]:
        """Run a submitted hospital_bulk job to its end; return its result as JSON."""
        return _job_task(task, factory, job_id, resume=False, retries=lease_retries)

    def resume_job(task: Any, job_id: str) -> dict[str, Any]:
        """Resume a stopped hospital_bulk job and run it to its end; return its result."""
        return _job_task(task, factory, job_id, resume=True, retries=lease_retries)

    def recover_interrupted_jobs() -> list[dict[str, Any]]:
        """Resume every hospital_bulk job whose worker died; return their results as JSON."""
        results = anyio.run(_recover, factory)
        return [result.model_dump(mode="json") for result in results]

    run = app.task(name=f"{name_prefix}.run_job", **job_options)(run_job)
    resume = app.task(name=f"{name_prefix}.resume_job", **job_options)(resume_job)
    recover_name = f"{name_prefix}.recover_interrupted_jobs"
    # Not acks_late: a recovery lost with its worker is simply done again by the next one.
    recover = app.task(name=recover_name, acks_late=False)(recover_interrupted_jobs)
    key: str | None = None
    if recover_every is not None:
        key = str(
            app.add_periodic_task(
                float(recover_every),
                app.signature(recover_name),
                name=recover_name,
                expires=float(recover_every),
            )
        )
    return HospitalBulkTasks(
        run_job=run, resume_job=resume, recover_interrupted_jobs=recover, recover_schedule_key=key
    )


class CeleryRunner:
    """A `JobRunner` that hands jobs to Celery workers (the tasks of `register_tasks`).

    Args:
        tasks: The registered tasks.
        options: Extra ``apply_async`` options for every job task (``queue``, ``priority``,
            ``headers``, ...).
    """

    def __init__(self, tasks: HospitalBulkTasks, *, options: Mapping[str, Any] | None = None):
        self.tasks = tasks
        self._options = dict(options or {})

    async def start(self, processor: AsyncBulkProcessor, job_id: str, *, resume: bool) -> None:
        """Send the job to a worker and return once the broker has the task.

        Args:
            processor: The processor the job was submitted to (it must use a shared store).
            job_id: The job's id.
            resume: Send ``resume_job`` rather than ``run_job``.

        Raises:
            ConfigurationError: The processor keeps its jobs in its own memory.
            BackendError: The broker did not take the task; the job stays as it was
                (``pending`` for a new one) and can be started again.
        """
        await self.send(processor, job_id, resume=resume)

    async def send(self, processor: AsyncBulkProcessor, job_id: str, *, resume: bool) -> Any:
        """Like `start`, and return the task's Celery ``AsyncResult``.

        Args:
            processor: The processor the job was submitted to (it must use a shared store).
            job_id: The job's id.
            resume: Send ``resume_job`` rather than ``run_job``.

        Returns:
            The ``AsyncResult`` of the task; its value is the `JobResult` as JSON.

        Raises:
            ConfigurationError: The processor keeps its jobs in its own memory.
            BackendError: The broker did not take the task.
        """
        _require_shared_store(processor)
        task = self.tasks.resume_job if resume else self.tasks.run_job
        apply = functools.partial(task.apply_async, args=(job_id,), **self._options)
        try:
            # Publishing is blocking I/O (with the broker's own connection retries).
            sent = await anyio.to_thread.run_sync(apply)
        except (OperationalError, OSError) as exc:
            raise BackendError(
                f"job {job_id} could not be handed to Celery (the broker failed: {exc}); "
                "it was not started and can be started again"
            ) from exc
        logger.info("Job %s sent to Celery as task %s (%s)", job_id, sent.id, task.name)
        return sent


@dataclasses.dataclass(frozen=True)
class _Busy:
    """A job another worker holds: retry once its lease can have lapsed."""

    error: JobStateError
    lease_ttl: float


def _job_task(
    task: Any, factory: ProcessorFactory, job_id: str, *, resume: bool, retries: int
) -> dict[str, Any]:
    outcome = anyio.run(_run, factory, job_id, resume)
    if isinstance(outcome, _Busy):
        attempt = task.request.retries + 1
        if attempt > retries:
            logger.error(
                "Job %s is still held by another worker after %d retries: %s",
                job_id,
                retries,
                outcome.error,
            )
        else:
            logger.warning(
                "Job %s is held by another worker (%s); retrying in %.1f s (retry %d of %d)",
                job_id,
                outcome.error,
                outcome.lease_ttl + _LEASE_MARGIN,
                attempt,
                retries,
            )
        # Raises Retry, or the JobStateError itself once the retries are used up.
        raise task.retry(
            exc=outcome.error, countdown=outcome.lease_ttl + _LEASE_MARGIN, max_retries=retries
        )
    return outcome.model_dump(mode="json")


async def _run(factory: ProcessorFactory, job_id: str, resume: bool) -> JobResult | _Busy:
    async with _open(factory) as processor:
        try:
            if resume:
                return await processor.resume(job_id)
            return await processor.run(job_id)
        except JobStateError as exc:
            # Running in another worker (whose lease may be a dead worker's, not lapsed yet),
            # or taken over by one (LeaseLostError): retry. A rolled-back job stays so.
            if exc.status == JobStatus.ROLLED_BACK.value:
                raise
            return _Busy(exc, processor.settings.lease_ttl)


async def _recover(factory: ProcessorFactory) -> list[JobResult]:
    async with _open(factory) as processor:
        return await processor.recover()


@contextlib.asynccontextmanager
async def _open(factory: ProcessorFactory) -> AsyncIterator[AsyncBulkProcessor]:
    """A new processor from the factory, checked, and closed at the end."""
    async with factory() as processor:
        _require_shared_store(processor)
        yield processor


def _require_shared_store(processor: AsyncBulkProcessor) -> None:
    if not processor.shares_jobs:
        raise ConfigurationError(
            "the processor keeps its jobs in its own memory, where Celery workers and the "
            "web process cannot see each other's jobs; use the Redis backend "
            "(backend='redis://...', or REDIS_URL with Settings.from_env) everywhere"
        )
