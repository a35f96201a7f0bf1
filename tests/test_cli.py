"""The `hospital-bulk` command line: validate, process, demo; exit codes, output, progress.

`process` runs against a fake upstream served on loopback, and every claim about the upstream
is checked there (the oracle), not only in the printed report.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from importlib import resources

import pytest
from helpers import REPORT_KEYS

import hospital_bulk
from hospital_bulk import BulkProcessor, JobSnapshot, JobStatus, RowState, WaitReason, cli
from hospital_bulk.cli import main
from hospital_bulk.testing import FakeServer, Fault

SAMPLE = resources.files("hospital_bulk").joinpath("_samples/hospitals.csv").read_bytes()
SAMPLE_NAMES = [line.split(",")[0] for line in SAMPLE.decode().splitlines()[1:]]


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
    assert captured.err.count("progress: ") == 3
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


def test_help_and_version_exit_0(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"hospital-bulk {hospital_bulk.__version__}"
    for argv in (["--help"], ["validate", "--help"], ["process", "--help"], ["demo", "--help"]):
        assert main(argv) == 0
        assert "usage: hospital-bulk" in capsys.readouterr().out
    assert main(["process", "--help"]) == 0
    assert "HOSPITAL_API_BASE_URL" in capsys.readouterr().out


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
    for command in ("validate", "process", "demo"):
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
