"""The bulk web service with its jobs on Celery workers: one module for every process.

    celery -A app worker --loglevel=INFO       # runs the jobs (as many as you like)
    celery -A app beat --loglevel=INFO         # optional: the periodic recovery, once
    uvicorn app:web --factory --port 8080      # the web service

Every process reads the same environment:

- ``HOSPITAL_API_BASE_URL``: the Hospital Directory API (the upstream).
- ``REDIS_URL``: where hospital_bulk keeps jobs, idempotency keys, the shared rate budget and
  the circuit breaker (the Redis backend; required: workers and the web process share jobs).
- ``HOSPITAL_BULK_REDIS_PREFIX`` (optional, ``hospital_bulk``): the first part of those keys.
- ``CELERY_BROKER_URL`` (optional, ``redis://127.0.0.1:6379/1``): Celery's broker and result
  backend.
- ``CELERY_KEY_PREFIX`` (optional, ``hospital_bulk_celery:``): the first part of every key
  Celery writes there (queues, unacknowledged messages, results).
- The other variables of `Settings.from_env` (``RATE_LIMIT_REQUESTS``, ``RETRY_MAX_ATTEMPTS``,
  ...) and, for the web process, ``HOSPITAL_BULK_MAX_ROWS``, ``HOSPITAL_BULK_MAX_UPLOAD_BYTES``
  and ``HOSPITAL_BULK_REQUIRE_IDEMPOTENCY_KEY``.
"""

from __future__ import annotations

import os

from celery import Celery
from fastapi import FastAPI

from hospital_bulk import ConfigurationError
from hospital_bulk.integrations.celery import CeleryRunner, register_tasks
from hospital_bulk.integrations.fastapi import create_app

BROKER_URL = os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/1")
KEY_PREFIX = os.environ.get("CELERY_KEY_PREFIX", "hospital_bulk_celery:")
# How long a delivered, unacknowledged job stays invisible before the broker delivers it
# again: longer than the longest job (at 30 creates a minute, 10,000 rows take 5.6 hours).
# The periodic recovery takes over a dead worker's job long before that.
VISIBILITY_TIMEOUT = 24 * 3600

celery = Celery("hospital_bulk_service", broker=BROKER_URL, backend=BROKER_URL)
celery.conf.update(
    # A job's message is acknowledged only when its task ends: a worker that dies mid-job
    # leaves it to be delivered again (the job tasks set these two themselves as well).
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    # One message at a time per worker process: jobs waiting behind a long one stay in the
    # queue for other workers.
    worker_prefetch_multiplier=1,
    broker_transport_options={
        "visibility_timeout": VISIBILITY_TIMEOUT,
        "global_keyprefix": KEY_PREFIX,
    },
    result_backend_transport_options={"global_keyprefix": KEY_PREFIX},
    result_expires=24 * 3600,
    broker_connection_retry_on_startup=True,
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
)

# run_job, resume_job and recover_interrupted_jobs (scheduled every 60 s for `celery beat`).
# Each task builds its processor with Settings.from_env(): the Redis backend at REDIS_URL.
tasks = register_tasks(celery)


def web() -> FastAPI:
    """The web service (``uvicorn app:web --factory``), handing its jobs to the workers.

    Its processor and options come from the environment (`create_app` with no settings).
    """
    if not os.environ.get("REDIS_URL"):
        raise ConfigurationError(
            "REDIS_URL is not set: the web process and the workers share jobs through Redis"
        )
    return create_app(runner=CeleryRunner(tasks))
