"""A worker process for tests/test_multiprocess.py: one `AsyncBulkProcessor`, one task.

Run as ``python tests/mp_worker.py SPEC`` where SPEC is a JSON object:

- ``mode``: ``process`` (submit ``file``, then run it), ``submit_many`` (``count`` concurrent
  submissions of ``file`` with ``key``), ``submit`` (one submission, ``key`` optional),
  ``takeover`` (print the status of ``job_id``, then take it over with ``how``: ``resume`` or
  ``recover``), ``status``.
- ``base_url``: the fake upstream; ``settings``: keyword arguments for the processor
  (``backend``, ``redis_prefix``, ``create_rate``, ...).
- ``ready`` and ``go`` (optional): paths of a start barrier. Once the processor is built (and
  has reached Redis; in ``takeover`` mode, once the status is printed), the worker creates
  ``ready`` and waits until ``go`` exists.

It prints one JSON object per line on stdout (``{"event": ...}``), flushed at once, so that a
killed worker still leaves what it printed. A failure prints ``{"event": "error", "type",
"module", "message"}`` (the exception the library raised, unwrapped from nothing), its
traceback on stderr, and exits with status 3. Library warnings are logged on stderr.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import anyio

from hospital_bulk import AsyncBulkProcessor, JobNotFoundError

EXIT_ERROR = 3


def emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


async def barrier(processor: AsyncBulkProcessor, spec: dict[str, Any]) -> None:
    """Reach Redis once (so connecting is not part of the race), then wait for the go file."""
    if "ready" not in spec:
        return
    with contextlib.suppress(JobNotFoundError):
        await processor.status("no-such-job")
    Path(spec["ready"]).touch()
    go = Path(spec["go"])
    deadline = time.monotonic() + 60.0
    while not go.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"the go file {go} never appeared")
        await anyio.sleep(0.001)


async def main(spec: dict[str, Any]) -> None:
    mode = spec["mode"]
    async with AsyncBulkProcessor(spec["base_url"], **spec.get("settings", {})) as processor:
        if mode != "takeover":
            await barrier(processor, spec)
        if mode == "process":
            data = Path(spec["file"]).read_bytes()
            snapshot = await processor.submit(data, idempotency_key=spec.get("key"))
            emit(
                "submitted",
                job_id=snapshot.job_id,
                batch_ids=[str(b) for b in snapshot.batch_ids],
                at=time.time(),
            )
            result = await processor.run(snapshot.job_id)
            emit("result", result=result.model_dump(mode="json"))
        elif mode == "submit_many":
            data = Path(spec["file"]).read_bytes()
            answers: list[str] = []

            async def submit_one() -> None:
                snapshot = await processor.submit(data, idempotency_key=spec["key"])
                answers.append(snapshot.job_id)

            async with anyio.create_task_group() as tg:
                for _ in range(spec["count"]):
                    tg.start_soon(submit_one)
            emit("submitted_many", job_ids=answers)
        elif mode == "submit":
            data = Path(spec["file"]).read_bytes()
            snapshot = await processor.submit(data, idempotency_key=spec.get("key"))
            emit("submitted", job_id=snapshot.job_id, status=snapshot.status.value)
        elif mode == "status":
            snapshot = await processor.status(spec["job_id"])
            emit("status", status=snapshot.status.value, counts=_counts(snapshot.counts))
        elif mode == "takeover":
            snapshot = await processor.status(spec["job_id"])
            emit("status", status=snapshot.status.value, counts=_counts(snapshot.counts))
            await barrier(processor, spec)  # racing takeovers: each read the status first
            if spec["how"] == "resume":
                results = [await processor.resume(spec["job_id"])]
            else:
                results = await processor.recover()
            emit("results", results=[r.model_dump(mode="json") for r in results])
        else:
            raise ValueError(f"unknown mode {mode!r}")


def _counts(counts: dict[Any, int]) -> dict[str, int]:
    return {str(state): number for state, number in counts.items() if number}


if __name__ == "__main__":
    logging.basicConfig(
        level=logging.WARNING,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        anyio.run(main, json.loads(sys.argv[1]))
    except Exception as exc:
        emit(
            "error",
            type=type(exc).__name__,
            module=type(exc).__module__,
            message=str(exc),
        )
        traceback.print_exc()
        sys.exit(EXIT_ERROR)
