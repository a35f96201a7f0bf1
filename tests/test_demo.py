"""The demo behind the README's first command."""

from __future__ import annotations

import subprocess
import sys

from hospital_bulk._demo import main


def test_the_demo_loads_the_sample_into_the_fake(capsys):
    assert main(["--latency", "0"]) == 0
    out = capsys.readouterr().out
    assert "validated 12 row(s)" in out
    assert "12 valid, 0 invalid" in out
    assert "progress: 12/12 created" in out
    assert "activated 12 hospital(s)" in out
    assert "result: 12/12 hospitals exist upstream and are active" in out


def test_the_demo_refuses_an_invalid_file_and_sends_nothing(tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("name,address\n,1 Main St\n", encoding="utf-8")
    assert main([str(bad)]) == 1
    out = capsys.readouterr().out
    assert "missing_value" in out
    assert "nothing was sent" in out
    assert "creating" not in out


def test_the_demo_reports_a_missing_file_without_a_traceback(tmp_path, capsys):
    assert main([str(tmp_path / "nope.csv")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert "Traceback" not in err


def test_python_dash_m_runs_the_demo():
    done = subprocess.run(
        [sys.executable, "-m", "hospital_bulk", "--latency", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "result: 12/12" in done.stdout
