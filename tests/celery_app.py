"""The Celery app of the worker processes tests/test_celery.py starts (``celery -A celery_app``).

Everything comes from environment variables the test sets, so that every test has its own
queue, its own broker keys and its own hospital_bulk key prefix:

- ``HB_CELERY_BROKER``: the broker and result backend (Redis database 12).
- ``HB_CELERY_QUEUE``: the queue the worker consumes and the tasks are sent to.
- ``HB_CELERY_KEYPREFIX``: kombu's and the result backend's ``global_keyprefix``: every
  Celery key of the test (queues, unacknowledged messages, results) starts with it, so
  workers of other test sessions on the same database never see them, and the test deletes
  them afterwards.
- ``HB_CELERY_SETTINGS`` (optional): JSON of extra `Settings` for the workers' processors
  (``lease_ttl``, ``reconcile_after``, ...) on top of `Settings.from_env`. Without it the
  tasks use the default factory (`Settings.from_env` alone).
- ``HOSPITAL_API_BASE_URL``, ``REDIS_URL``, ``HOSPITAL_BULK_REDIS_PREFIX``,
  ``RATE_LIMIT_REQUESTS``/``RATE_LIMIT_PERIOD``: read by `Settings.from_env`.

The test process builds the same app with `build_app` to send tasks and read their results.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from celery import Celery

from hospital_bulk import AsyncBulkProcessor, Settings
from hospital_bulk.integrations.celery import HospitalBulkTasks, register_tasks

DEFAULT_BROKER = "redis://127.0.0.1:6379/12"
# Seconds a delivered, unacknowledged message stays invisible before the broker redelivers it.
VISIBILITY_TIMEOUT = 5


def build_app(env: Mapping[str, str]) -> tuple[Celery, HospitalBulkTasks]:
    """The app and its tasks, configured from `env`."""
    broker = env.get("HB_CELERY_BROKER", DEFAULT_BROKER)
    queue = env.get("HB_CELERY_QUEUE", "hospital_bulk_tests")
    keyprefix = env.get("HB_CELERY_KEYPREFIX", "hbcelery-default:")
    app = Celery("hospital_bulk_tests", broker=broker, backend=broker)
    app.conf.update(
        task_default_queue=queue,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_transport_options={
            "visibility_timeout": VISIBILITY_TIMEOUT,
            "global_keyprefix": keyprefix,
            # Sweep for messages to redeliver every second (kombu's default is ~100 s).
            "unacked_restore_interval": 1,
            "unacked_restore_throttle": 1,
        },
        result_backend_transport_options={"global_keyprefix": keyprefix},
        result_expires=600,
        broker_connection_retry_on_startup=True,
        worker_enable_remote_control=False,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
    )
    extra: dict[str, Any] | None = None
    if env.get("HB_CELERY_SETTINGS"):
        extra = json.loads(env["HB_CELERY_SETTINGS"])

    def factory() -> AsyncBulkProcessor:
        return AsyncBulkProcessor(settings=Settings.from_env(env, **(extra or {})))

    tasks = register_tasks(
        app,
        factory if extra is not None else None,
        recover_every=30.0,
        lease_retries=5,
    )
    return app, tasks


app, tasks = build_app(os.environ)


def web() -> Any:
    """The web service handing its jobs to this app's workers (``uvicorn celery_app:web
    --factory``), configured from the same environment (`Settings.from_env`)."""
    from hospital_bulk.integrations.celery import CeleryRunner
    from hospital_bulk.integrations.fastapi import create_app

    return create_app(runner=CeleryRunner(tasks))
