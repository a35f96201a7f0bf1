"""Notebooks: HTML rendering, to_pandas, progress displays, Ctrl-C, and the example notebook."""

from __future__ import annotations

import _thread
import functools
import importlib.util
import io
import json
import os
import re
import signal
import sys
import threading
import time
import types
import uuid
from pathlib import Path
from typing import ClassVar

import anyio
import httpx
import pytest
from helpers import REPORT_KEYS, check_against_fake, committed_beyond_file, csv_bytes, csv_of

from hospital_bulk import (
    BulkProcessor,
    HospitalResult,
    JobResult,
    JobSnapshot,
    JobStatus,
    RowState,
    WaitReason,
    _notebook,
    _sync,
    validate_csv,
)
from hospital_bulk.testing import FakeDirectory

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "docs" / "notebooks" / "example.ipynb"
SAMPLE = ROOT / "hospital_bulk" / "_samples" / "hospitals.csv"
HAS_PANDAS = importlib.util.find_spec("pandas") is not None
needs_pandas = pytest.mark.skipif(not HAS_PANDAS, reason="pandas is not installed")


def body_rows(html: str) -> list[str]:
    """The ``<tr>`` elements of every ``<tbody>`` in an HTML fragment."""
    rows: list[str] = []
    for body in re.findall(r"<tbody>(.*?)</tbody>", html, flags=re.S):
        rows += re.findall(r"<tr[ >].*?</tr>", body, flags=re.S)
    return rows


def cells(row: str) -> list[str]:
    return re.findall(r"<td(?: [^>]*)?>(.*?)</td>", row, flags=re.S)


def result_of(hospitals: list[HospitalResult], status: JobStatus = JobStatus.COMPLETED):
    exists = (RowState.CREATED, RowState.CREATED_AND_ACTIVATED)
    processed = sum(h.status in exists for h in hospitals)
    return JobResult(
        job_id="job-1",
        status=status,
        batch_id=uuid.uuid4(),
        batch_ids=[uuid.uuid4()],
        total_hospitals=len(hospitals),
        processed_hospitals=processed,
        failed_hospitals=len(hospitals) - processed,
        processing_time_seconds=1.25,
        batch_activated=status is JobStatus.COMPLETED,
        hospitals=hospitals,
    )


def created(row: int, name: str | None = None) -> HospitalResult:
    return HospitalResult(
        row=row,
        hospital_id=1000 + row,
        name=name or f"Hospital {row}",
        status=RowState.CREATED_AND_ACTIVATED,
    )


def fast_processor(fake: FakeDirectory, **options) -> BulkProcessor:
    options.setdefault("create_rate", "6000/minute")
    options.setdefault("other_rate", "6000/minute")
    return BulkProcessor("http://fake", transport=fake.transport(), **options)


# -- HTML ------------------------------------------------------------------------------------


def test_result_html_has_a_summary_and_a_row_per_hospital():
    html = result_of([created(1), created(2)])._repr_html_()
    assert "job-1" in html
    assert "completed" in html
    assert "2 rows, 2 created, 0 failed, 1 batch activated, 1.2 s" in html
    assert re.findall(r"<th(?: [^>]*)?>(.*?)</th>", html) == [
        "row",
        "name",
        "status",
        "hospital id",
        "error",
    ]
    rows = body_rows(html)
    assert [cells(r) for r in rows] == [
        ["1", "Hospital 1", "created_and_activated", "1001", ""],
        ["2", "Hospital 2", "created_and_activated", "1002", ""],
    ]


def test_result_html_escapes_every_text():
    evil = '<script>alert("x")</script> & <b>'
    hospitals = [
        HospitalResult(row=1, hospital_id=None, name=evil, status=RowState.REJECTED, error=evil),
    ]
    result = result_of(hospitals, JobStatus.PARTIALLY_FAILED).model_copy(
        update={"job_id": "<i>job</i>"}
    )
    html = result._repr_html_()
    assert "<script>" not in html
    assert "<b>" not in html
    assert "<i>" not in html
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &lt;b&gt;" in html
    assert "&lt;i&gt;job&lt;/i&gt;" in html


def test_result_html_lists_rows_with_a_problem_first_and_highlights_them():
    hospitals = [
        created(1),
        created(2),
        HospitalResult(row=3, hospital_id=None, name="Bad", status=RowState.REJECTED, error="no"),
        created(4),
        HospitalResult(row=5, hospital_id=None, name="Lost", status=RowState.UNKNOWN, error="?"),
    ]
    html = result_of(hospitals, JobStatus.PARTIALLY_FAILED)._repr_html_()
    rows = body_rows(html)
    assert [cells(r)[0] for r in rows] == ["3", "5", "1", "2", "4"]
    assert all("background-color" in r for r in rows[:2])
    assert not any("background-color" in r for r in rows[2:])
    assert "2 rows with a problem" in html
    assert "partially_failed" in html


def test_result_html_caps_long_tables():
    hospitals = [created(i) for i in range(1, 451)]
    html = result_of(hospitals)._repr_html_()
    rows = body_rows(html)
    assert len(rows) == _notebook.MAX_HTML_ROWS == 200
    assert [cells(r)[0] for r in rows[:2]] == ["1", "2"]
    assert "250 more rows" in html
    # Problem rows beyond the cap come first, so they are never hidden.
    hospitals[400] = HospitalResult(
        row=401, hospital_id=None, name="Late", status=RowState.REJECTED, error="bad"
    )
    rows = body_rows(_notebook.job_result_html(result_of(hospitals), max_rows=3))
    assert [cells(r)[0] for r in rows] == ["401", "1", "2"]


def test_result_html_of_a_job_without_rows():
    html = result_of([])._repr_html_()
    assert "0 rows" in html
    assert "<table" not in html


def test_the_html_methods_are_not_fields():
    result = result_of([created(1)])
    assert set(JobResult.model_fields) == REPORT_KEYS
    assert set(result.model_dump(mode="json")) == REPORT_KEYS
    assert JobResult.model_validate_json(result.model_dump_json()) == result
    assert not JobResult.__private_attributes__
    assert not JobSnapshot.__private_attributes__


def test_snapshot_html():
    counts = dict.fromkeys(RowState, 0)
    counts.update({RowState.CREATED: 3, RowState.PENDING: 2})
    snapshot = JobSnapshot(
        job_id="j<1>",
        status=JobStatus.RUNNING,
        total_rows=5,
        counts=counts,
        percent=60.0,
        elapsed_seconds=2.5,
        eta_seconds=1.7,
        batch_ids=[uuid.uuid4()],
        activated_batches=[],
        created_at=time.time(),
        waiting_for="rate_limit",
        waiting_until=time.time() + 30,
    )
    html = snapshot._repr_html_()
    assert "j&lt;1&gt;" in html
    assert "running" in html
    assert "60.0% (3/5 rows settled)" in html
    assert "2 pending, 3 created" in html
    assert "waiting for the rate limit" in html
    assert "0/1 batches activated" in html


def test_validation_html_lists_errors_and_warnings_with_row_line_and_column():
    report = validate_csv(
        b"name,address,phone\n"
        b"Good,1 Main Street,\n"
        b",2 Main Street,\n"
        b'"two\nlines",=cmd,\n'
        b"Good,1 Main Street,\n"
    )
    html = report._repr_html_()
    assert "2 errors" in html
    assert "1 warning" in html
    assert "4 data rows: 2 valid, 2 invalid" in html
    errors, warnings = re.findall(r"<tbody>(.*?)</tbody>", html, flags=re.S)
    assert [cells(r) for r in body_rows(f"<tbody>{errors}</tbody>")] == [
        ["missing_value", "2", "3", "name", "name is empty"],
        [
            "formula_injection",
            "3",
            "4",
            "address",
            cells(body_rows(f"<tbody>{errors}</tbody>")[1])[4],
        ],
    ]
    assert "=" in cells(body_rows(f"<tbody>{errors}</tbody>")[1])[4]
    assert [cells(r)[:4] for r in body_rows(f"<tbody>{warnings}</tbody>")] == [
        ["duplicate_row", "4", "6", ""],
    ]


def test_validation_html_of_a_valid_file():
    html = validate_csv(SAMPLE)._repr_html_()
    assert "valid" in html
    assert "12 data rows: 12 valid, 0 invalid" in html
    assert "columns name, address, phone" in html
    assert "<table" not in html


def test_validation_html_escapes_the_file_and_caps_the_issues():
    report = validate_csv(b"name,address,<img src=x>\n" + b"a,\n" * 300, max_errors=250)
    html = report._repr_html_()
    assert "<img" not in html
    assert "&lt;img src=x&gt;" in html
    assert len(body_rows(html)) == 200
    assert "more errors (all of them" in html
    assert "not listed" in html  # the max_errors cap, counted
    assert report.truncated_errors > 0


# -- pandas ----------------------------------------------------------------------------------


@needs_pandas
def test_result_to_pandas():
    hospitals = [
        created(1),
        HospitalResult(row=2, hospital_id=None, name="Bad", status=RowState.REJECTED, error="no"),
    ]
    frame = result_of(hospitals, JobStatus.PARTIALLY_FAILED).to_pandas()
    assert list(frame.columns) == ["row", "name", "status", "hospital_id", "error"]
    assert frame["row"].tolist() == [1, 2]
    assert frame["status"].tolist() == ["created_and_activated", "rejected"]
    assert str(frame["hospital_id"].dtype) == "Int64"
    assert frame["hospital_id"].iloc[0] == 1001
    assert frame["hospital_id"].isna().tolist() == [False, True]
    assert frame["error"].iloc[1] == "no"
    assert result_of([]).to_pandas().empty


@needs_pandas
def test_validation_report_to_pandas():
    report = validate_csv(b"name,address\n,1 Main Street\nA,B\nA,B\n")
    frame = report.to_pandas()
    assert list(frame.columns) == ["severity", "code", "row", "line", "column", "message"]
    assert frame["severity"].tolist() == ["error", "warning"]
    assert frame["code"].tolist() == ["missing_value", "duplicate_row"]
    assert frame["row"].tolist() == [1, 3]
    assert frame["line"].tolist() == [2, 4]
    assert frame["column"].iloc[0] == "name"
    assert validate_csv(SAMPLE).to_pandas().empty


def test_to_pandas_without_pandas_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "pandas", None)  # import pandas now fails
    with pytest.raises(ImportError, match=r"pip install pandas") as info:
        result_of([created(1)]).to_pandas()
    assert "hospital-bulk[notebook]" in str(info.value)
    with pytest.raises(ImportError, match=r"pip install pandas"):
        validate_csv(SAMPLE).to_pandas()


# -- choosing a progress display ---------------------------------------------------------------


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def fake_ipython(monkeypatch, shell):
    module = types.ModuleType("IPython")
    module.get_ipython = lambda: shell  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "IPython", module)


def test_in_notebook_needs_a_kernel(monkeypatch):
    monkeypatch.delitem(sys.modules, "IPython", raising=False)
    assert not _notebook.in_notebook()
    fake_ipython(monkeypatch, None)
    assert not _notebook.in_notebook()
    fake_ipython(monkeypatch, types.SimpleNamespace())  # IPython in a terminal
    assert not _notebook.in_notebook()
    fake_ipython(monkeypatch, types.SimpleNamespace(kernel=object()))
    assert _notebook.in_notebook()


def test_progress_display_choice(monkeypatch):
    monkeypatch.setattr(_notebook, "in_notebook", lambda: False)
    assert _notebook.progress_display(False, io.StringIO()) is None
    assert _notebook.progress_display(None, FakeTTY()) is None  # scripts stay quiet
    assert isinstance(_notebook.progress_display(True, FakeTTY()), _notebook._TextDisplay)
    assert isinstance(_notebook.progress_display(True, io.StringIO()), _notebook._LineDisplay)
    with pytest.raises(TypeError, match="progress"):
        _notebook.progress_display("yes", io.StringIO())  # type: ignore[arg-type]

    monkeypatch.setattr(_notebook, "in_notebook", lambda: True)
    assert _notebook.progress_display(False, io.StringIO()) is None
    monkeypatch.setattr(_notebook, "_tqdm_notebook", lambda: None)
    display = _notebook.progress_display(None, io.StringIO())
    assert isinstance(display, _notebook._TextDisplay)  # no tqdm or ipywidgets: text
    monkeypatch.setattr(_notebook, "_tqdm_notebook", lambda: FakeBar)
    assert isinstance(_notebook.progress_display(None, io.StringIO()), _notebook._TqdmDisplay)


def test_tqdm_notebook_needs_ipywidgets(monkeypatch):
    pytest.importorskip("tqdm")
    monkeypatch.setitem(sys.modules, "ipywidgets", None)
    monkeypatch.delitem(sys.modules, "tqdm.notebook", raising=False)
    assert _notebook._tqdm_notebook() is None
    monkeypatch.setitem(sys.modules, "tqdm.notebook", None)
    assert _notebook._tqdm_notebook() is None


class FakeBar:
    """Stands in for tqdm's notebook bar; records what it was told, and from which thread."""

    made: ClassVar[list[FakeBar]] = []

    def __init__(self, *, total, initial, unit, desc):
        self.total, self.n, self.unit = total, initial, unit
        self.descriptions = [desc]
        self.postfixes: list[str] = []
        self.threads = {threading.get_ident()}
        self.closed = False
        self.styles: list[str] = []
        FakeBar.made.append(self)

    def update(self, n):
        self.threads.add(threading.get_ident())
        self.n += n

    def set_description(self, desc, refresh=True):
        self.descriptions.append(desc)

    def set_postfix_str(self, text, refresh=True):
        self.threads.add(threading.get_ident())
        self.postfixes.append(text)

    def close(self):
        self.closed = True

    def disp(self, bar_style=None, check_delay=True):
        self.styles.append(bar_style)


@pytest.fixture
def in_a_notebook(monkeypatch):
    """Pretend to run in a Jupyter kernel whose tqdm draws `FakeBar`s."""
    FakeBar.made = []
    monkeypatch.setattr(_notebook, "in_notebook", lambda: True)
    monkeypatch.setattr(_notebook, "_tqdm_notebook", lambda: FakeBar)
    return FakeBar.made


# -- progress while processing ---------------------------------------------------------------


def test_a_notebook_shows_a_bar_by_default_drawn_from_the_calling_thread(in_a_notebook):
    fake = FakeDirectory(create_latency=0.02, create_rate=None, other_rate=None)
    seen: list[JobSnapshot] = []
    with fast_processor(fake, concurrency=2) as p:
        result = p.process(SAMPLE, on_progress=seen.append)
        assert result.status is JobStatus.COMPLETED
        (bar,) = in_a_notebook
        assert bar.total == 12
        assert bar.n == 12
        assert bar.closed
        assert bar.styles == []  # completed: tqdm's own green
        assert bar.descriptions[-1] == "completed"
        assert bar.postfixes[-1] == "12 created"
        assert bar.threads == {threading.get_ident()}
        # The caller's own callback saw every change, as without a display.
        assert seen[-1].status is JobStatus.COMPLETED
        assert seen[-1].percent == 100.0

        p.process(SAMPLE, progress=False)
        assert len(in_a_notebook) == 1


def test_a_job_that_did_not_complete_ends_red(in_a_notebook):
    fake = FakeDirectory(create_latency=0.0, create_rate=None, other_rate=None)
    fake.inject("reject", route="create", times=1)
    with fast_processor(fake) as p:
        result = p.process(csv_bytes(3))
    assert result.status is JobStatus.PARTIALLY_FAILED
    (bar,) = in_a_notebook
    assert bar.closed
    assert bar.styles == ["danger"]
    assert "1 rejected" in bar.postfixes[-1]


def test_async_on_progress_still_works_with_a_display(in_a_notebook):
    fake = FakeDirectory(create_latency=0.0, create_rate=None, other_rate=None)
    seen: list[str] = []

    async def on_progress(snapshot: JobSnapshot) -> None:
        await anyio.sleep(0)
        seen.append(snapshot.status.value)

    with fast_processor(fake) as p:
        assert p.process(csv_bytes(2), on_progress=on_progress).status is JobStatus.COMPLETED
    assert seen[-1] == "completed"
    assert in_a_notebook[0].n == 2


def test_text_progress_on_a_terminal_is_redrawn_in_place(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    stream = FakeTTY()
    monkeypatch.setattr(sys, "stderr", stream)
    fake = FakeDirectory(create_latency=0.05, create_rate=None, other_rate=None)
    with fast_processor(fake, concurrency=2) as p:
        result = p.process(SAMPLE, progress=True)
    assert result.status is JobStatus.COMPLETED
    text = stream.getvalue()
    assert text.startswith("\r")
    assert text.endswith("\n")
    assert text.count("\n") == 1
    frames = text.rstrip("\n").split("\r")[1:]
    assert len(frames) >= 2  # redrawn while it ran, then at the end
    assert frames[-1].rstrip().startswith("completed")
    assert "12/12 100%" in frames[-1]
    assert frames[-1].rstrip().endswith("12 created")


def test_text_progress_is_cut_to_the_terminal_width(monkeypatch):
    monkeypatch.setenv("COLUMNS", "40")
    stream = FakeTTY()
    display = _notebook._TextDisplay(stream, terminal=True)
    snapshot = running_snapshot()
    display.update(snapshot)
    display.close(snapshot.model_copy(update={"status": JobStatus.CANCELLED}))
    frames = stream.getvalue().rstrip("\n").split("\r")[1:]
    assert [len(f) for f in frames] == [39, 39]
    assert frames[-1].startswith("cancelled")
    # In a notebook the line is not cut.
    stream = io.StringIO()
    display = _notebook._TextDisplay(stream, terminal=False)
    display.close(snapshot)
    assert stream.getvalue().endswith("0 created\n")


def test_text_progress_in_a_log_is_a_line_per_tenth(monkeypatch):
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    fake = FakeDirectory(create_latency=0.0, create_rate=None, other_rate=None)
    with fast_processor(fake) as p:
        result = p.process(csv_bytes(40), progress=True)
        assert p.process(csv_bytes(3, start=100)).status is JobStatus.COMPLETED  # default: quiet
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    assert lines[0] == f"job {result.job_id}: 40 rows in 2 batches"
    assert lines[-2].startswith("progress: 40/40 rows (100%): 40 created")
    assert lines[-1] == f"job {result.job_id} completed: 2/2 batches activated"
    assert len(lines) <= 2 + 10 + 1


def running_snapshot() -> JobSnapshot:
    """A running job of 10 rows, none sent yet."""
    counts = dict.fromkeys(RowState, 0)
    counts[RowState.PENDING] = 10
    return JobSnapshot(
        job_id="j",
        status=JobStatus.RUNNING,
        total_rows=10,
        counts=counts,
        percent=0.0,
        elapsed_seconds=0.0,
        eta_seconds=None,
        batch_ids=[uuid.uuid4()],
        activated_batches=[],
        created_at=time.time(),
    )


def test_line_display_tells_waits_and_the_end_of_an_interrupted_job():
    stream = io.StringIO()
    display = _notebook._LineDisplay(stream)
    base = running_snapshot()
    display.update(base)
    waiting = base.model_copy(update={"waiting_for": WaitReason.RATE_LIMIT})
    display.update(waiting)
    display.update(waiting)
    display.close(base.model_copy(update={"status": JobStatus.CANCELLED, "error": "interrupted"}))
    assert stream.getvalue().splitlines() == [
        "job j: 10 rows in 1 batch",
        "waiting for the rate limit",
        "job j cancelled: 0/1 batches activated (interrupted)",
    ]


def test_the_tqdm_display_drives_a_real_tqdm():
    tqdm = pytest.importorskip("tqdm")
    stream = io.StringIO()
    display = _notebook._TqdmDisplay(functools.partial(tqdm.tqdm, file=stream, mininterval=0))
    fake = FakeDirectory(create_latency=0.0, create_rate=None, other_rate=None)
    with fast_processor(fake) as p:
        job = p.submit(csv_bytes(5))
        p.run(job.job_id, on_progress=display.update)
        display.close(p.status(job.job_id))
    text = stream.getvalue()
    assert "completed" in text
    assert "5/5" in text
    assert "5 created" in text


# -- Ctrl-C ----------------------------------------------------------------------------------


def interrupt_once(after_created: int, interrupt=_thread.interrupt_main):
    """An on_progress that interrupts the main thread once `after_created` rows exist."""
    fired = threading.Event()

    def on_progress(snapshot: JobSnapshot) -> None:
        done = snapshot.counts[RowState.CREATED] + snapshot.counts[RowState.CREATED_AND_ACTIVATED]
        if done >= after_created and not fired.is_set():
            fired.set()
            interrupt()

    return on_progress


ROWS = [(f"Hospital {i}", f"{i} Main Street", f"555-{i:04d}") for i in range(1, 17)]


def slow_fake() -> FakeDirectory:
    # 16 rows, one at a time, 0.05 s each: interrupted after 2, 0.7 s before the job would end
    # (the calling thread sees an interrupt within 0.1 s).
    return FakeDirectory(create_latency=0.05, create_rate=None, other_rate=None)


def assert_interrupted_then_resumed(p: BulkProcessor, fake: FakeDirectory, exc, job_id: str):
    message = str(exc.value)
    assert message.startswith(f"interrupted: job {job_id} cancelled with ")
    assert f"resume it with processor.resume({job_id!r})" in message
    stopped = p.status(job_id)
    assert stopped.status is JobStatus.CANCELLED
    assert stopped.counts[RowState.PENDING] > 0  # it really stopped half way
    assert stopped.counts[RowState.IN_FLIGHT] == 0
    result = p.resume(job_id)
    assert result.status is JobStatus.COMPLETED
    assert check_against_fake(fake, [ROWS], [result]) == []
    assert committed_beyond_file(fake, [ROWS], [result]) == []
    assert fake.duplicates() == []
    assert len(fake.hospitals) == len(ROWS)


def test_ctrl_c_cancels_a_processing_job_which_resumes_without_duplicates():
    fake = slow_fake()
    with fast_processor(fake, concurrency=1, reconcile_after=0.2) as p:
        with pytest.raises(KeyboardInterrupt) as exc:
            p.process(csv_of(ROWS), on_progress=interrupt_once(2))
        job_id = str(exc.value).split()[2]
        assert_interrupted_then_resumed(p, fake, exc, job_id)


def test_ctrl_c_names_the_job_without_a_callback_or_a_display():
    # Then the core builds no snapshots; the job is found among the processor's runs.
    fake = FakeDirectory(create_latency=0.1, create_rate=None, other_rate=None)
    with fast_processor(fake, concurrency=1, reconcile_after=0.2) as p:
        timer = threading.Timer(0.4, _thread.interrupt_main)  # the job takes 1.6 s
        timer.start()
        try:
            with pytest.raises(KeyboardInterrupt) as exc:
                p.process(csv_of(ROWS))
        finally:
            timer.cancel()
        job_id = str(exc.value).split()[2]
        assert_interrupted_then_resumed(p, fake, exc, job_id)


def test_ctrl_c_as_a_real_sigint_while_running_a_job(in_a_notebook):
    # What a Jupyter kernel interrupt does: SIGINT to the process, with a bar on screen.
    fake = slow_fake()
    with fast_processor(fake, concurrency=1, reconcile_after=0.2) as p:
        job = p.submit(csv_of(ROWS))
        sigint = functools.partial(os.kill, os.getpid(), signal.SIGINT)
        with pytest.raises(KeyboardInterrupt) as exc:
            p.run(job.job_id, on_progress=interrupt_once(2, sigint))
        (bar,) = in_a_notebook
        assert bar.closed
        assert bar.descriptions[-1] == "cancelled"
        assert bar.n < len(ROWS)
        assert_interrupted_then_resumed(p, fake, exc, job.job_id)


def test_ctrl_c_before_the_job_started(monkeypatch):
    fake = FakeDirectory()
    with fast_processor(fake) as p:

        async def slow_submit(*args, **kwargs):
            await anyio.sleep(30)

        monkeypatch.setattr(p._processor, "submit", slow_submit)
        timer = threading.Timer(0.2, _thread.interrupt_main)
        timer.start()
        try:
            with pytest.raises(KeyboardInterrupt, match="before the job started; nothing was sent"):
                p.process(csv_bytes(1))
        finally:
            timer.cancel()
    assert fake.requests == []


class HangingTransport(httpx.AsyncBaseTransport):
    def __init__(self) -> None:
        self.cancelled = threading.Event()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        try:
            await anyio.sleep(60)
        except anyio.get_cancelled_exc_class():
            self.cancelled.set()
            raise
        raise AssertionError("not reached")


def test_ctrl_c_cancels_any_call_in_the_loop():
    transport = HangingTransport()
    with BulkProcessor("http://fake", transport=transport) as p:
        timer = threading.Timer(0.2, _thread.interrupt_main)
        timer.start()
        started = time.monotonic()
        try:
            with pytest.raises(KeyboardInterrupt):
                p.health()
        finally:
            timer.cancel()
        assert time.monotonic() - started < 5
        assert transport.cancelled.is_set()  # cancelled in the loop, not left running
        assert p.validate(csv_bytes(1)).ok  # and the processor still works


def test_ctrl_c_waits_for_the_job_to_stop_only_so_long(monkeypatch):
    monkeypatch.setattr(_sync, "_STOP_SECONDS", 0.2)
    with BulkProcessor("http://fake", transport=FakeDirectory().transport()) as p:
        stubborn_done = threading.Event()

        async def stubborn(job_id, *, on_progress=None):
            with anyio.CancelScope(shield=True):
                await anyio.sleep(0.5)
            stubborn_done.set()

        monkeypatch.setattr(p._processor, "run", stubborn)
        timer = threading.Timer(0.2, _thread.interrupt_main)
        timer.start()
        try:
            with pytest.raises(KeyboardInterrupt, match="did not stop within"):
                p.run("some-job")
        finally:
            timer.cancel()
        assert stubborn_done.wait(5)


# -- the example notebook, in a real Jupyter kernel ----------------------------------------------


def test_the_example_notebook_is_committed_without_outputs():
    notebook = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
    code = [c for c in notebook["cells"] if c["cell_type"] == "code"]
    assert code
    for cell in code:
        assert cell["outputs"] == []
        assert cell["execution_count"] is None


def _require(module: str):
    try:
        return pytest.importorskip(module)
    except pytest.skip.Exception:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{module} is not installed, and CI must run the example notebook")
        raise


def _outputs(notebook, tag: str) -> tuple[str, str]:
    """The text of a tagged cell's streams, and of its rich outputs (HTML and plain)."""
    (cell,) = [c for c in notebook.cells if tag in c.metadata.get("tags", [])]
    streams, rich = [], []
    for output in cell.outputs:
        if output.output_type == "stream":
            streams.append(output.text)
        elif output.output_type in ("execute_result", "display_data"):
            rich.append(json.dumps(dict(output.data)))
            rich.append(output.data.get("text/html", ""))
    return "".join(streams), "\n".join(rich)


@pytest.mark.slow
def test_the_example_notebook_runs_in_a_real_kernel(tmp_path):
    nbformat = _require("nbformat")
    nbclient = _require("nbclient")
    _require("ipykernel")
    kernelspec = importlib.import_module("jupyter_client.kernelspec")
    manager = importlib.import_module("jupyter_client.manager")

    # A kernel spec of our own, so that the kernel is this interpreter whatever else is
    # installed for the user.
    spec_dir = tmp_path / "kernels" / "python3"
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "hospital_bulk tests",
                "language": "python",
            }
        ),
        encoding="utf-8",
    )
    specs = kernelspec.KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")])
    km = manager.AsyncKernelManager(kernel_name="python3", kernel_spec_manager=specs)
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        notebook,
        km=km,
        timeout=60,  # per cell
        startup_timeout=120,
        allow_errors=False,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    # Raises CellExecutionError if any cell fails; shuts the kernel down either way.
    client.execute(cleanup_kc=True)

    _, rich = _outputs(notebook, "validate-sample")
    assert "12 data rows: 12 valid, 0 invalid" in rich

    streams, rich = _outputs(notebook, "process-sample")
    html = next(o.data["text/html"] for o in _result(notebook, "process-sample"))
    assert "completed" in html
    assert "12 rows, 12 created, 0 failed, 1 batch activated" in html
    assert len(body_rows(html)) == 12
    if importlib.util.find_spec("ipywidgets") and importlib.util.find_spec("tqdm"):
        assert "application/vnd.jupyter.widget-view+json" in rich  # tqdm's widget
    else:
        assert "completed" in streams  # the text line

    streams, rich = _outputs(notebook, "to-pandas")
    if HAS_PANDAS:
        assert "{'created_and_activated': 12}" in streams
    else:
        assert "pandas is not installed" in streams

    _, rich = _outputs(notebook, "validate-broken")
    for code in ("missing_value", "formula_injection", "wrong_field_count", "duplicate_row"):
        assert code in rich

    streams, rich = _outputs(notebook, "interrupt")
    assert re.search(r"interrupted: job \w+ cancelled with \d+/80 rows created", streams)
    assert "cancelled" in rich

    streams, _ = _outputs(notebook, "resume")
    assert "completed 80 of 80 created" in streams
    assert "duplicates at the fake: 0" in streams

    _, rich = _outputs(notebook, "rollback")
    assert "rolled_back" in rich


def _result(notebook, tag: str):
    (cell,) = [c for c in notebook.cells if tag in c.metadata.get("tags", [])]
    return [o for o in cell.outputs if o.output_type == "execute_result"]
