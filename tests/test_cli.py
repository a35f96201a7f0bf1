"""The `hospital-bulk` command line: every command, its exit codes, output and progress.

`process`, `status`, `resume` and `rollback` run against a fake upstream served on loopback
(and, for jobs that outlive one command, the real Redis of the `redis_url` fixture), and every
claim about the upstream is checked there (the oracle), not only in the printed report.
"""

from __future__ import annotations

import io
import json
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from importlib import resources

import httpx
import pytest
from helpers import REPORT_KEYS

import hospital_bulk
from hospital_bulk import BulkProcessor, JobSnapshot, JobStatus, RowState, WaitReason, cli
from hospital_bulk.cli import main
from hospital_bulk.testing import FakeServer, Fault

SAMPLE = resources.files("hospital_bulk").joinpath("_samples/hospitals.csv").read_bytes()
SAMPLE_NAMES = [line.split(",")[0] for line in SAMPLE.decode().splitlines()[1:]]
COMMANDS = ("validate", "process", "status", "resume", "rollback", "demo", "fake-upstream")


class TTY(io.StringIO):
    """A captured stream that claims to be a terminal."""

    def isatty(self) -> bool:
        return True


def write_csv(tmp_path, text: str, name: str = "hospitals.csv") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def csv_text(rows: int) -> str:
    lines = ["name,address,phone"] + [
        f"Hospital {i},{i} Main Street,555-{i:04d}" for i in range(1, rows + 1)
    ]
    return "\n".join(lines) + "\n"


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("hospital-bulk: error: "), err
    assert "Traceback" not in err
    return lines[0]


def blank_environment(monkeypatch):
    for name in (
        "HOSPITAL_API_BASE_URL",
        "RATE_LIMIT_REQUESTS",
        "RATE_LIMIT_PERIOD",
        "RETRY_MAX_ATTEMPTS",
        "CIRCUIT_BREAKER_FAILURE_THRESHOLD",
        "CIRCUIT_BREAKER_RECOVERY_TIMEOUT",
        "REDIS_URL",
        "HOSPITAL_BULK_REDIS_PREFIX",
    ):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def server(monkeypatch):
    blank_environment(monkeypatch)
    with FakeServer(create_latency=0) as server:
        yield server


@pytest.fixture
def sample_file(tmp_path):
    path = tmp_path / "sample.csv"
    path.write_bytes(SAMPLE)
    return str(path)


# -- validate ------------------------------------------------------------------------------------


def test_validate_a_valid_file_exits_0_with_a_summary(sample_file, capsys):
    assert main(["validate", sample_file]) == 0
    out = capsys.readouterr().out
    assert f"{sample_file}: valid: 12 rows (12 valid, 0 invalid), 0 errors, 0 warnings" in out
    assert "utf-8" in out
    assert "sha256 " in out


def test_validate_an_invalid_file_exits_2_and_lists_every_issue(tmp_path, capsys):
    path = write_csv(
        tmp_path,
        "name,address\n,1 Main St\nGood,2 Main St\n=HYPERLINK(1),3 Main St\nGood,2 Main St\n",
    )
    assert main(["validate", path]) == 2
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split() == ["kind", "code", "row", "line", "column", "message"]
    missing = next(line for line in lines if "missing_value" in line)
    assert missing.split()[:5] == ["error", "missing_value", "1", "2", "name"]
    formula = next(line for line in lines if "formula_injection" in line)
    assert formula.split()[:5] == ["error", "formula_injection", "3", "4", "name"]
    duplicate = next(line for line in lines if "duplicate_row" in line)
    assert duplicate.split()[:3] == ["warning", "duplicate_row", "4"]
    assert "invalid: 4 rows (2 valid, 2 invalid), 2 errors, 1 warning" in out


def test_validate_json_has_the_report_shape(tmp_path, capsys):
    path = write_csv(tmp_path, "name,address\n,1 Main St\nGood,2 Main St\n")
    assert main(["validate", path, "--json"]) == 2
    report = json.loads(capsys.readouterr().out)
    assert {"ok", "total_rows", "valid_rows", "invalid_rows", "errors", "warnings"} <= set(report)
    assert {"sha256", "encoding"} <= set(report)
    assert (report["ok"], report["total_rows"], report["valid_rows"], report["invalid_rows"]) == (
        False,
        2,
        1,
        1,
    )
    assert report["errors"] == [
        {
            "code": "missing_value",
            "row": 1,
            "line": 2,
            "column": "name",
            "message": report["errors"][0]["message"],
        }
    ]
    assert report["warnings"] == []
    assert report["encoding"] == "utf-8"
    assert len(report["sha256"]) == 64


def test_validate_json_of_a_valid_file_exits_0(sample_file, capsys):
    assert main(["validate", "--json", sample_file]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is True
    assert report["valid_rows"] == 12


def test_validate_limits_and_formula_policy(tmp_path, sample_file, capsys):
    assert main(["validate", sample_file, "--max-rows", "5"]) == 2
    assert "too_many_rows" in capsys.readouterr().out
    assert main(["validate", sample_file, "--max-bytes", "100"]) == 2
    assert "file_too_large" in capsys.readouterr().out
    formula = write_csv(tmp_path, "name,address\n=SUM(1),1 Main St\n", "formula.csv")
    assert main(["validate", formula]) == 2
    assert main(["validate", formula, "--formula-policy", "neutralize"]) == 0
    assert "formula_neutralized" in capsys.readouterr().out


def test_validate_reads_standard_input(monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(SAMPLE)))
    assert main(["validate", "-"]) == 0
    assert "<stdin>: valid: 12 rows" in capsys.readouterr().out


def test_validate_of_a_missing_file_is_one_error_line(tmp_path, capsys):
    assert main(["validate", str(tmp_path / "nope.csv")]) == 2
    captured = capsys.readouterr()
    assert "nope.csv" in one_error_line(captured.err)
    assert captured.out == ""


# -- process -------------------------------------------------------------------------------------


def test_process_loads_every_row_once_and_prints_the_table(server, sample_file, capsys):
    assert main(["process", sample_file, "--base-url", server.url]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0].split() == ["row", "hospital_id", "name", "status", "error"]
    for number, name in enumerate(SAMPLE_NAMES, start=1):
        row = lines[number]
        assert row.startswith(f"{number} ")
        assert name in row
        assert row.rstrip().endswith("created_and_activated")
    assert "status completed: 12/12 processed, 0 failed" in captured.out
    assert "batch activated: yes" in captured.out
    # Not a terminal: plain progress lines, at most one per 5 rows.
    assert "progress: 12/12 rows (100%)" in captured.err
    assert 1 <= captured.err.count("progress: ") <= 3
    assert "batches activated: 1/1" in captured.err
    fake = server.fake
    assert fake.duplicates() == []
    assert sorted(h.name for h in fake.hospitals) == sorted(SAMPLE_NAMES)
    assert all(h.active for h in fake.hospitals)
    assert len(fake.creates()) == 12


def test_process_json_is_the_result_and_progress_stays_on_stderr(server, sample_file, capsys):
    assert main(["process", sample_file, "--base-url", server.url, "--json"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)  # stdout is the JSON document and nothing else
    assert set(result) == REPORT_KEYS
    assert result["status"] == "completed"
    assert result["batch_activated"] is True
    assert (result["total_hospitals"], result["processed_hospitals"]) == (12, 12)
    assert [h["row"] for h in result["hospitals"]] == list(range(1, 13))
    assert set(result["hospitals"][0]) == {"row", "hospital_id", "name", "status", "error"}
    assert "progress: 12/12" in captured.err
    stored = {h.id: h for h in server.fake.hospitals}
    for entry in result["hospitals"]:
        assert entry["status"] == "created_and_activated"
        assert stored[entry["hospital_id"]].name == entry["name"]
        assert stored[entry["hospital_id"]].active
    assert server.fake.duplicates() == []


def test_process_takes_the_base_url_and_rates_from_the_environment(
    server, sample_file, monkeypatch, capsys
):
    monkeypatch.setenv("HOSPITAL_API_BASE_URL", server.url)
    monkeypatch.setenv("RATE_LIMIT_REQUESTS", "25")
    monkeypatch.setenv("RATE_LIMIT_PERIOD", "60")
    assert main(["process", sample_file, "--batch-size", "5", "--concurrency", "4"]) == 0
    result_lines = capsys.readouterr().out.splitlines()
    batches = next(line for line in result_lines if line.startswith("job "))
    assert batches.count(",") == 2  # 12 rows in batches of 5: three batches
    assert len(server.fake.hospitals) == 12
    assert server.fake.peak_creates_in_flight <= 4


def test_process_with_a_rejected_row_exits_1(server, sample_file, capsys):
    server.fake.inject(Fault.REJECT)
    assert main(["process", sample_file, "--base-url", server.url]) == 1
    captured = capsys.readouterr()
    assert "rejected" in captured.out
    assert "status partially_failed: 11/12 processed, 1 failed" in captured.out
    assert "batch activated: no" in captured.out
    assert "batches activated" not in captured.err
    error = one_error_line(captured.err.splitlines()[-1])
    assert "partially_failed" in error
    # The fake: 11 rows, none twice, batch left inactive.
    assert len(server.fake.hospitals) == 11
    assert server.fake.duplicates() == []
    assert not any(h.active for h in server.fake.hospitals)


def test_process_activate_partial_activates_what_was_created(server, sample_file, capsys):
    server.fake.inject(Fault.REJECT)
    assert main(["process", sample_file, "--base-url", server.url, "--activate-partial"]) == 1
    assert len(server.fake.hospitals) == 11
    assert all(h.active for h in server.fake.hospitals)


def test_process_skip_invalid_rows_loads_the_valid_ones(server, tmp_path, capsys):
    path = write_csv(tmp_path, "name,address\nA,1 Main St\n,2 Main St\nC,3 Main St\n")
    assert main(["process", path, "--base-url", server.url]) == 2
    assert server.fake.requests == []
    capsys.readouterr()
    assert main(["process", path, "--base-url", server.url, "--skip-invalid-rows", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [h["status"] for h in result["hospitals"]] == [
        "created_and_activated",
        "invalid",
        "created_and_activated",
    ]
    assert sorted(h.name for h in server.fake.hospitals) == ["A", "C"]


def test_process_of_an_invalid_file_sends_nothing_and_exits_2(server, tmp_path, capsys):
    path = write_csv(tmp_path, "name,address\n,1 Main St\nB,\n")
    assert main(["process", path, "--base-url", server.url]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err.splitlines()
    assert sum("missing_value" in line for line in err) == 2  # every error is listed
    assert err[0].split() == ["kind", "code", "row", "line", "column", "message"]
    # With its row, line and column.
    assert err[1].split()[:5] == ["error", "missing_value", "1", "2", "name"]
    assert err[2].split()[:5] == ["error", "missing_value", "2", "3", "address"]
    assert "nothing was sent" in one_error_line(err[-1])
    assert server.fake.requests == []


def test_process_without_a_base_url_is_one_error_line(monkeypatch, sample_file, capsys):
    blank_environment(monkeypatch)
    assert main(["process", sample_file]) == 2
    captured = capsys.readouterr()
    assert "HOSPITAL_API_BASE_URL" in one_error_line(captured.err)
    assert captured.out == ""


def test_process_of_an_unreadable_file_is_one_error_line(server, tmp_path, capsys):
    assert main(["process", str(tmp_path), "--base-url", server.url]) == 2  # a directory
    one_error_line(capsys.readouterr().err)
    assert main(["process", str(tmp_path / "nope.csv"), "--base-url", server.url]) == 2
    assert "nope.csv" in one_error_line(capsys.readouterr().err)
    assert server.fake.requests == []


@pytest.mark.parametrize(
    ("options", "named"),
    [
        (["--concurrency", "0"], "concurrency"),
        (["--batch-size", "21"], "batch_size"),
        (["--create-rate", "often"], "create_rate"),
        (["--timeout", "-1"], "timeout"),
    ],
)
def test_wrong_settings_are_one_error_line(server, sample_file, capsys, options, named):
    assert main(["process", sample_file, "--base-url", server.url, *options]) == 2
    assert named in one_error_line(capsys.readouterr().err)
    assert server.fake.requests == []


def test_a_wrong_environment_variable_is_one_error_line(monkeypatch, sample_file, capsys):
    blank_environment(monkeypatch)
    monkeypatch.setenv("HOSPITAL_API_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("RATE_LIMIT_REQUESTS", "lots")
    assert main(["process", sample_file]) == 2
    assert "RATE_LIMIT_REQUESTS" in one_error_line(capsys.readouterr().err)


def test_credentials_in_a_url_never_reach_the_output(monkeypatch, sample_file, capsys):
    blank_environment(monkeypatch)
    assert main(["process", sample_file, "--base-url", "ftp://admin:s3cret@example.org/"]) == 2
    captured = capsys.readouterr()
    line = one_error_line(captured.err)
    assert "s3cret" not in captured.err + captured.out
    assert "ftp://***@example.org" in line


def test_usage_errors_are_one_line_with_exit_2(capsys):
    assert main(["process"]) == 2
    assert "FILE" in one_error_line(capsys.readouterr().err)
    assert main(["validate", "x.csv", "--formula-policy", "maybe"]) == 2
    assert "--formula-policy" in one_error_line(capsys.readouterr().err)
    assert main([]) == 2
    one_error_line(capsys.readouterr().err)


def test_version_exits_0(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"hospital-bulk {hospital_bulk.__version__}"


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_examples_and_exit_statuses(command, capsys):
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: hospital-bulk {command}")
    examples = out[out.index("Examples:") :]
    assert f"hospital-bulk {command}" in examples
    assert "Exit status:" in out


def test_the_main_help_lists_every_command_and_every_exit_status(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in COMMANDS:
        assert f"    {command}" in out
    assert "Examples:" in out
    statuses = out[out.index("Exit status:") :].splitlines()[1:]
    codes = [line.split()[0] for line in statuses if line[:3].strip().isdigit()]
    assert codes == ["0", "1", "2", "3", "4", "130"]
    assert main(["process", "--help"]) == 0
    out = capsys.readouterr().out
    assert "HOSPITAL_API_BASE_URL" in out
    assert "REDIS_URL" in out


def test_ctrl_c_cancels_the_job_and_exits_130(monkeypatch, capsys):
    def interrupted(self, job_id, *, on_progress=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(BulkProcessor, "run", interrupted)
    assert main(["demo", "--fast"]) == 130
    captured = capsys.readouterr()
    line = one_error_line(captured.err.splitlines()[-1])
    assert "interrupted: job" in line
    assert "cancelled with 0/12 rows created" in line
    assert "status " not in captured.out


def test_ctrl_c_while_validating_exits_130(monkeypatch, sample_file, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "validate_csv", interrupted)
    assert main(["validate", sample_file]) == 130
    assert one_error_line(capsys.readouterr().err) == "hospital-bulk: error: interrupted"


# -- demo ----------------------------------------------------------------------------------------


def test_demo_fast_creates_and_activates_every_row_and_checks_the_fake(capsys):
    assert main(["demo", "--fast"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line[:1].isdigit()]
    assert len(rows) == 12
    assert all(line.rstrip().endswith("created_and_activated") for line in rows)
    assert "status completed: 12/12 processed, 0 failed" in out
    assert "upstream check: 12 hospitals, 0 duplicates, all active" in out


def test_demo_json_prints_only_the_result_on_stdout(capsys):
    assert main(["demo", "--fast", "--json"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert set(result) == REPORT_KEYS
    assert [h["status"] for h in result["hospitals"]] == ["created_and_activated"] * 12
    assert "upstream check: 12 hospitals, 0 duplicates, all active" in captured.err


def test_demo_check_reports_a_problem_at_the_fake(monkeypatch, capsys):
    def check(fake, result):
        fake.restart()  # every hospital lost: the check must notice
        return real_check(fake, result)

    real_check = cli._check_fake
    monkeypatch.setattr(cli, "_check_fake", check)
    assert main(["demo", "--fast"]) == 1
    line = one_error_line(capsys.readouterr().err.splitlines()[-1])
    assert "upstream check: 0 hospitals" in line
    assert "rows missing at the fake: [1, 2, 3," in line


# -- progress on a terminal ------------------------------------------------------------------------


def test_on_a_terminal_rich_draws_the_bar_and_the_table(monkeypatch, capsys):
    pytest.importorskip("rich")
    out, err = TTY(), TTY()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    assert main(["demo", "--fast"]) == 0
    assert "12/12" in err.getvalue()
    assert "\x1b[" in err.getvalue()  # a live display, not plain lines
    assert "progress: " not in err.getvalue()
    table = out.getvalue()
    assert "hospital_id" in table
    assert "Summit Cancer Care" in table
    assert "upstream check: 12 hospitals, 0 duplicates, all active" in table


def test_the_rich_table_shows_names_literally(server, tmp_path, monkeypatch):
    pytest.importorskip("rich")
    path = write_csv(tmp_path, 'name,address\n"[/b] [red]Odd :smile:",1 Main St\n')
    out = TTY()
    monkeypatch.setattr(sys, "stdout", out)
    assert main(["process", path, "--base-url", server.url]) == 0
    assert "[/b] [red]Odd :smile:" in out.getvalue()


def test_on_a_terminal_without_rich_a_plain_bar_is_redrawn(monkeypatch, capsys):
    for name in ("rich", "rich.console", "rich.progress", "rich.table"):
        monkeypatch.setitem(sys.modules, name, None)
    out, err = TTY(), TTY()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    assert main(["demo", "--fast"]) == 0
    bar = err.getvalue()
    assert "\r" in bar
    assert "[########################]  12/12  100%" in bar
    assert "\x1b[" not in bar + out.getvalue()
    assert out.getvalue().splitlines()[2].split() == [
        "row",
        "hospital_id",
        "name",
        "status",
        "error",
    ]


def snapshot(
    settled: int,
    total: int,
    *,
    status: JobStatus = JobStatus.RUNNING,
    waiting: WaitReason | None = None,
) -> JobSnapshot:
    counts = dict.fromkeys(RowState, 0)
    counts[RowState.CREATED] = settled
    counts[RowState.PENDING] = total - settled
    return JobSnapshot(
        job_id="job1",
        status=status,
        total_rows=total,
        counts=counts,
        percent=100.0 * settled / total,
        elapsed_seconds=1.0,
        eta_seconds=None,
        waiting_for=waiting,
        batch_ids=[],
        activated_batches=[],
        created_at=0.0,
    )


@pytest.mark.parametrize(
    ("total", "expected"), [(12, [5, 10, 12]), (100, list(range(10, 101, 10)))]
)
def test_plain_progress_lines_come_at_most_every_5_rows_or_10_percent(total, expected):
    stream = io.StringIO()
    display = cli._LineDisplay(stream)
    for settled in range(total + 1):
        display.update(snapshot(settled, total))
        display.update(snapshot(settled, total))
    display.close(snapshot(total, total, status=JobStatus.COMPLETED))
    shown = [
        int(line.split()[1].split("/")[0])
        for line in stream.getvalue().splitlines()
        if line.startswith("progress: ")
    ]
    assert shown == expected


def test_plain_progress_says_what_the_job_waits_for_once_per_reason():
    stream = io.StringIO()
    display = cli._LineDisplay(stream)
    for waiting in [WaitReason.WARM_UP, WaitReason.WARM_UP, None, WaitReason.RATE_LIMIT]:
        display.update(snapshot(0, 50, waiting=waiting))
    display.update(snapshot(1, 50, waiting=WaitReason.RATE_LIMIT))
    display.update(snapshot(1, 50, waiting=WaitReason.BREAKER))
    lines = stream.getvalue().splitlines()
    assert lines[1:] == [
        "waiting for the upstream to wake up",
        "waiting for the rate limit",
        "waiting: circuit breaker open after upstream failures",
    ]


# -- python -m hospital_bulk ---------------------------------------------------------------------


def test_python_dash_m_help_exits_0():
    done = subprocess.run(
        [sys.executable, "-m", "hospital_bulk", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "usage: hospital-bulk" in done.stdout
    for command in COMMANDS:
        assert command in done.stdout


def test_python_dash_m_runs_the_fast_demo():
    done = subprocess.run(
        [sys.executable, "-m", "hospital_bulk", "demo", "--fast"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "upstream check: 12 hospitals, 0 duplicates, all active" in done.stdout
    assert "Traceback" not in done.stderr


# -- jobs that outlive a command: process, status, resume, rollback on Redis ----------------------


@pytest.fixture
def stored(redis_url, redis_prefix, server):
    """The options that keep jobs in the tests' Redis, under this test's own prefix."""
    return ["--backend", redis_url, "--redis-prefix", redis_prefix]


def test_process_json_with_quiet_prints_the_result_and_no_progress(server, sample_file, capsys):
    assert main(["process", sample_file, "--base-url", server.url, "--json", "-q"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["status"] == "completed"
    assert captured.err == ""


def test_a_stored_job_across_commands_status_resume_rollback(server, sample_file, stored, capsys):
    upstream = ["--base-url", server.url]
    server.fake.inject(Fault.REJECT)
    assert main(["process", sample_file, *upstream, *stored, "--json"]) == 1
    captured = capsys.readouterr()
    job = json.loads(captured.out)["job_id"]
    error = one_error_line(captured.err.splitlines()[-1])
    assert f"job {job} partially_failed" in error
    assert f"'hospital-bulk resume {job} --backend " in error  # what to do next
    assert f"'hospital-bulk rollback {job} --backend " in error
    assert len(server.fake.hospitals) == 11

    # A later command finds the stored job: its snapshot, and 1 (ended, not completed).
    assert main(["status", job, *stored, "--json"]) == 1
    snapshot = json.loads(capsys.readouterr().out)
    assert (snapshot["job_id"], snapshot["status"]) == (job, "partially_failed")
    assert snapshot["counts"]["rejected"] == 1
    assert snapshot["counts"]["created"] == 11
    assert main(["status", job, *stored]) == 1
    out = capsys.readouterr().out
    assert f"job {job}: partially_failed" in out
    assert "rows: 12 (11 created, 1 rejected)" in out
    assert f"next: 'hospital-bulk resume {job}" in out

    # resume sends the rejected row only, on the job's own batch, then activates it.
    assert main(["resume", job, *upstream, *stored]) == 0
    captured = capsys.readouterr()
    assert "status completed: 12/12 processed, 0 failed" in captured.out
    assert "batches activated: 1/1" in captured.err
    fake = server.fake
    assert len(fake.creates()) == 13  # 12 rows, one of them sent twice (rejected, then created)
    assert fake.duplicates() == []
    assert sorted(h.name for h in fake.hospitals) == sorted(SAMPLE_NAMES)
    assert all(h.active for h in fake.hospitals)
    assert main(["status", job, *stored]) == 0
    assert f"job {job}: completed" in capsys.readouterr().out
    assert main(["status", job, *stored, "--result", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == REPORT_KEYS
    assert [h["status"] for h in result["hospitals"]] == ["created_and_activated"] * 12

    # rollback deletes the job's batch upstream; the job stays stored, rolled back.
    assert main(["rollback", job, *upstream, *stored]) == 0
    out = capsys.readouterr().out
    assert "status rolled_back" in out
    assert "reason: rolled back: 12 hospital(s) deleted upstream" in out
    assert fake.hospitals == []
    assert main(["status", job, *stored, "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["status"] == "rolled_back"
    # A rolled-back job cannot be resumed: the job's state refuses it (3), nothing is sent.
    sent = len(fake.requests)
    assert main(["resume", job, *upstream, *stored]) == 3
    captured = capsys.readouterr()
    assert "rolled back" in one_error_line(captured.err)
    assert len(fake.requests) == sent


def test_status_result_prints_the_row_table(server, sample_file, stored, capsys):
    assert main(["process", sample_file, "--base-url", server.url, *stored, "--json"]) == 0
    job = json.loads(capsys.readouterr().out)["job_id"]
    assert main(["status", job, *stored, "--result"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["row", "hospital_id", "name", "status", "error"]
    assert len([line for line in lines if line.rstrip().endswith("created_and_activated")]) == 12


def test_process_resume_option_resumes_a_stored_job(server, sample_file, stored, capsys):
    server.fake.inject(Fault.REJECT, times=2)
    assert main(["process", sample_file, "--base-url", server.url, *stored, "--json"]) == 1
    job = json.loads(capsys.readouterr().out)["job_id"]
    assert main(["process", "--resume", job, "--base-url", server.url, *stored, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["job_id"], result["status"]) == (job, "completed")
    assert len(server.fake.hospitals) == 12
    assert server.fake.duplicates() == []


@pytest.mark.parametrize(
    ("options", "named"),
    [
        (["FILE.csv", "--resume", "JOB"], "not both"),
        (["--resume", "JOB", "--batch-size", "5"], "--batch-size"),
        (["--resume", "JOB", "--idempotency-key", "k"], "--idempotency-key"),
        (["--resume", "JOB", "--skip-invalid-rows"], "--skip-invalid-rows"),
    ],
)
def test_process_resume_option_usage_errors(server, options, named, capsys):
    assert main(["process", *options, "--base-url", server.url]) == 2
    assert named in one_error_line(capsys.readouterr().err)
    assert server.fake.requests == []


def test_the_backend_and_prefix_come_from_the_environment(
    server, sample_file, redis_url, redis_prefix, monkeypatch, capsys
):
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("HOSPITAL_BULK_REDIS_PREFIX", redis_prefix)
    assert main(["process", sample_file, "--base-url", server.url, "--json", "-q"]) == 0
    job = json.loads(capsys.readouterr().out)["job_id"]
    assert main(["status", job]) == 0
    assert f"job {job}: completed" in capsys.readouterr().out
    # The options win over the environment: another prefix holds no such job.
    assert main(["status", job, "--redis-prefix", f"{redis_prefix}-other"]) == 2
    assert f"no job with id '{job}'" in one_error_line(capsys.readouterr().err)


def test_an_idempotency_key_gives_back_the_stored_job_in_a_later_command(
    server, sample_file, tmp_path, stored, capsys
):
    key = ["--idempotency-key", "upload-42"]
    command = ["process", sample_file, "--base-url", server.url, *stored, *key, "--json"]
    assert main(command) == 0
    first = json.loads(capsys.readouterr().out)
    assert main(command) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["job_id"] == first["job_id"]
    assert f"job {first['job_id']}, completed" in captured.err
    assert len(server.fake.creates()) == 12  # nothing sent twice
    # The same key with another file is refused: invalid input.
    other = write_csv(tmp_path, csv_text(3), "other.csv")
    assert main(["process", other, "--base-url", server.url, *stored, *key]) == 2
    assert "upload-42" in one_error_line(capsys.readouterr().err)
    assert len(server.fake.creates()) == 12


def test_status_of_an_unknown_job_exits_2_naming_where_it_looked(stored, redis_prefix, capsys):
    assert main(["status", "no-such-job", *stored]) == 2
    captured = capsys.readouterr()
    line = one_error_line(captured.err)
    assert "no job with id 'no-such-job'" in line
    assert redis_prefix in line
    assert captured.out == ""
    assert main(["rollback", "no-such-job", *stored, "--base-url", "http://127.0.0.1:9"]) == 2
    one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize(
    "argv",
    [
        ["status", "JOB"],
        ["resume", "JOB", "--base-url", "http://127.0.0.1:9"],
        ["rollback", "JOB", "--base-url", "http://127.0.0.1:9"],
        ["process", "--resume", "JOB", "--base-url", "http://127.0.0.1:9"],
        ["status", "JOB", "--backend", "memory://"],
    ],
)
def test_job_commands_need_a_shared_backend(monkeypatch, argv, capsys):
    blank_environment(monkeypatch)
    assert main(argv) == 2
    captured = capsys.readouterr()
    line = one_error_line(captured.err)
    assert "needs the shared backend" in line
    assert "--backend redis://" in line
    assert "REDIS_URL" in line
    assert captured.out == ""


def test_an_unreachable_backend_exits_3_without_its_credentials(
    monkeypatch, sample_file, server, capsys
):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    backend = ["--backend", f"redis://:s3cret@127.0.0.1:{port}/0"]
    assert main(["status", "JOB", *backend]) == 3
    captured = capsys.readouterr()
    assert "unreachable" in one_error_line(captured.err)
    assert main(["process", sample_file, "--base-url", server.url, *backend]) == 3
    captured2 = capsys.readouterr()
    one_error_line(captured2.err)
    assert "s3cret" not in captured.err + captured2.err + captured.out + captured2.out
    assert server.fake.creates() == []


def test_status_of_a_job_not_ended_exits_4_and_resume_runs_it(
    server, redis_url, redis_prefix, stored, capsys
):
    with BulkProcessor(server.url, backend=redis_url, redis_prefix=redis_prefix) as processor:
        job = processor.submit(SAMPLE).job_id  # created, never run
    assert main(["status", job, *stored]) == 4
    out = capsys.readouterr().out
    assert f"job {job}: pending" in out
    assert f"next: not started; 'hospital-bulk resume {job}" in out
    assert main(["resume", job, "--base-url", server.url, *stored, "--json", "-q"]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "completed"
    assert len(server.fake.hospitals) == 12
    assert main(["resume", job, "--base-url", server.url, *stored, "-q"]) == 0
    assert "already completed" in capsys.readouterr().err
    assert len(server.fake.creates()) == 12


def test_ctrl_c_on_a_stored_job_says_how_to_resume_it(
    server, sample_file, stored, monkeypatch, capsys
):
    def interrupted(self, job_id, *, on_progress=None):
        raise KeyboardInterrupt

    run = BulkProcessor.run
    monkeypatch.setattr(BulkProcessor, "run", interrupted)
    assert main(["process", sample_file, "--base-url", server.url, *stored]) == 130
    line = one_error_line(capsys.readouterr().err.splitlines()[-1])
    assert "cancelled with 0/12 rows created" in line
    hint = re.search(r"resume it with '(hospital-bulk resume [^']+)'$", line)
    assert hint is not None, line
    monkeypatch.setattr(BulkProcessor, "run", run)
    # The command it names, run as it is written, finishes the job.
    assert main(shlex.split(hint.group(1))[1:]) == 0
    assert "status completed: 12/12 processed" in capsys.readouterr().out
    assert len(server.fake.hospitals) == 12
    assert server.fake.duplicates() == []


def test_ctrl_c_on_a_job_in_memory_says_it_cannot_be_resumed(
    server, sample_file, monkeypatch, capsys
):
    def interrupted(self, job_id, *, on_progress=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(BulkProcessor, "run", interrupted)
    assert main(["process", sample_file, "--base-url", server.url]) == 130
    line = one_error_line(capsys.readouterr().err.splitlines()[-1])
    assert "cannot be resumed" in line
    assert "--backend redis://" in line


def test_progress_says_when_rows_of_unknown_outcome_are_waited_for():
    stream = io.StringIO()
    display = cli._LineDisplay(stream)
    display.update(snapshot(0, 10, waiting=WaitReason.RECONCILE))
    assert "waiting before reading back rows whose outcome is unknown" in stream.getvalue()


# -- fake-upstream -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until_served(url: str, process: subprocess.Popen, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return httpx.get(f"{url}/__fake__/state", timeout=2).json()
        except httpx.TransportError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_fake_upstream_serves_with_its_options_until_ctrl_c(sample_file, monkeypatch, capsys):
    blank_environment(monkeypatch)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    options = ["--create-latency", "0", "--no-rate-limits", "--batch-cap", "5", "--seed", "7"]
    options += ["--http", "h11"]
    process = subprocess.Popen(
        [sys.executable, "-m", "hospital_bulk", "fake-upstream", "--port", str(port), *options],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        state = wait_until_served(url, process)
        assert state["seed"] == 7
        assert httpx.get(f"{url}/", timeout=5).status_code == 200
        # Its batch cap is 5: a client sending batches of 5 loads every row.
        assert main(["process", sample_file, "--base-url", url, "--batch-size", "5", "-q"]) == 0
        assert "status completed: 12/12 processed" in capsys.readouterr().out
        hospitals = httpx.get(f"{url}/__fake__/state", timeout=5).json()["hospitals"]
        assert len(hospitals) == 12
        assert len({h["creation_batch_id"] for h in hospitals}) == 3
        process.send_signal(signal.SIGINT)  # Ctrl-C
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    err = process.stderr.read() if process.stderr else ""
    process.stdout.close()
    process.stderr.close()
    assert f"serving the fake upstream on {url}" in err
    assert "Traceback" not in err


def test_fake_upstream_on_a_taken_port_exits_3(monkeypatch):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "hospital_bulk", "fake-upstream", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert done.returncode == 3, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"hospital-bulk: error: the fake upstream could not serve on 127.0.0.1:{port}"
    )


@pytest.mark.parametrize(
    ("options", "named"),
    [(["--create-rate", "often"], "--create-rate"), (["--port", "http"], "--port")],
)
def test_fake_upstream_wrong_options_are_one_error_line(options, named, capsys):
    assert main(["fake-upstream", *options]) == 2
    assert named in one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("http", ["auto", "h11", "httptools"])
def test_fake_upstream_passes_its_http_parser_to_the_server(http, monkeypatch):
    import hospital_bulk._fake as fake_module

    blank_environment(monkeypatch)
    seen: dict[str, object] = {}
    monkeypatch.setattr(fake_module, "serve", lambda fake, **options: seen.update(options))
    assert main(["fake-upstream", "--port", "0", "--http", http]) == 0
    assert seen["http"] == http


def test_fake_upstream_with_httptools_missing_exits_2(monkeypatch, capsys):
    import importlib.util

    blank_environment(monkeypatch)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, package=None: None if name == "httptools" else real_find_spec(name, package),
    )
    assert main(["fake-upstream", "--http", "httptools"]) == 2
    assert "--http httptools needs httptools" in capsys.readouterr().err
