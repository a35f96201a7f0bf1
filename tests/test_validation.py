"""Tests of the streaming CSV validator (hospital_bulk._validation)."""

from __future__ import annotations

import codecs
import csv
import dataclasses
import gc
import hashlib
import importlib.util
import io
import json
import logging
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import hospital_bulk
from hospital_bulk import _validation
from hospital_bulk._exceptions import ConfigurationError, CSVSourceError, CSVValidationError
from hospital_bulk._validation import (
    HospitalRow,
    IssueCode,
    ValidationIssue,
    ValidationReport,
    validate_csv,
)

DATA = Path(__file__).resolve().parent / "data" / "csv"
HEADER = "name,address,phone\n"


def load(name: str) -> bytes:
    return (DATA / name).read_bytes()


def where(issues):
    """The (code, row, line, column) of each issue: what most tests pin."""
    return [(str(i.code), i.row, i.line, i.column) for i in issues]


def summary(report: ValidationReport):
    """Everything a report says, in comparable form."""
    return (
        [dataclasses.astuple(i) for i in report.errors],
        [dataclasses.astuple(i) for i in report.warnings],
        list(report.rows),
        report.total_rows,
        report.invalid_rows,
        report.truncated_errors,
        report.truncated_warnings,
        report.bytes_read,
        report.sha256,
        report.encoding,
        report.columns,
    )


def rows_of(report: ValidationReport):
    return [(r.row, r.line, r.name, r.address, r.phone) for r in report.rows]


# --- the fixture corpus -------------------------------------------------------------------------


def test_fixture_corpus_matches_its_generator():
    spec = importlib.util.spec_from_file_location("make_fixtures", DATA / "make_fixtures.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    stored = {p.name for p in DATA.glob("*.csv")}
    assert stored == set(module.FIXTURES), "run tests/data/csv/make_fixtures.py"
    for name, data in module.FIXTURES.items():
        assert load(name) == data, f"{name} is stale: run tests/data/csv/make_fixtures.py"


def test_valid_file():
    data = load("valid.csv")
    report = validate_csv(data)
    assert report.ok
    assert report.errors == []
    assert report.warnings == []
    assert rows_of(report) == [
        (1, 2, "St Mary's Hospital", "1 Main Street Springfield", "+1 555 0100"),
        (2, 3, "General Hospital", "2 Oak Avenue Riverton", None),
        (3, 4, "Clinic, North", '3 "Old" Road', "555-0102"),
    ]
    assert report.total_rows == 3
    assert report.invalid_rows == 0
    assert report.bytes_read == len(data)
    assert report.sha256 == hashlib.sha256(data).hexdigest()
    assert report.encoding == "utf-8"
    assert report.columns == ("name", "address", "phone")
    report.raise_for_errors()  # no error: does not raise


@pytest.mark.parametrize(
    ("fixture", "encoding", "expected"),
    [
        ("bom_utf8.csv", "utf-8-sig", (1, 2, "Hôpital Saint-Éloi", "1 rue de Paris", None)),
        ("utf16_le.csv", "utf-16", (1, 2, "Hôpital Saint-Éloi", "1 rue de Paris", "+33 1 23")),
        ("utf16_be.csv", "utf-16", (1, 2, "Hôpital Saint-Éloi", "1 rue de Paris", "+33 1 23")),
        ("utf32_le.csv", "utf-32", (1, 2, "Krankenhaus Süd", "Hauptstraße 1", None)),
    ],
)
def test_byte_order_marks(fixture, encoding, expected):
    report = validate_csv(DATA / fixture)
    assert report.ok, report.errors
    assert report.encoding == encoding
    assert report.columns == ("name", "address", "phone")  # the BOM is not part of "name"
    assert rows_of(report) == [expected]


def test_utf32_big_endian_built_in_test():
    data = codecs.BOM_UTF32_BE + (HEADER + "A,1 Road,\n").encode("utf-32-be")
    report = validate_csv(data)
    assert report.ok
    assert report.encoding == "utf-32"
    assert rows_of(report) == [(1, 2, "A", "1 Road", None)]


@pytest.mark.parametrize("fixture", ["crlf.csv", "cr_only.csv"])
def test_line_endings(fixture):
    report = validate_csv(DATA / fixture)
    assert report.ok
    assert rows_of(report) == [(1, 2, "A", "1 Road", "1"), (2, 3, "B", "2 Road", "2")]


def test_mixed_line_endings_and_no_final_newline():
    report = validate_csv(DATA / "mixed_endings.csv")
    assert report.ok
    assert [(r.row, r.line, r.name) for r in report.rows] == [(1, 2, "A"), (2, 3, "B"), (3, 4, "C")]


def test_header_is_case_space_and_order_insensitive():
    report = validate_csv(DATA / "header_variants.csv")
    assert report.ok
    assert report.columns == ("phone", "address", "name")
    assert rows_of(report) == [(1, 2, "Royal Infirmary", "1 High Street", "+44 20")]


def test_phone_column_is_optional():
    report = validate_csv(DATA / "no_phone_column.csv")
    assert report.ok
    assert rows_of(report) == [(1, 2, "Royal Infirmary", "1 High Street", None)]


# --- header problems ------------------------------------------------------------------------------


def test_header_problems_are_reported_together():
    report = validate_csv(DATA / "header_problems.csv")
    assert not report.ok
    assert where(report.errors) == [
        ("unknown_column", None, 1, "email"),
        ("unknown_column", None, 1, None),
        ("duplicate_column", None, 1, "name"),
        ("missing_column", None, 1, "address"),
    ]
    assert "column 4" in report.errors[1].message
    # Without a usable name and address, rows are not checked, so none is valid.
    assert report.total_rows == 1
    assert report.invalid_rows == 1
    assert len(report.rows) == 0
    assert report.columns == ("name", "name", "email", "", "phone")


def test_unknown_column_still_validates_rows():
    report = validate_csv(DATA / "unknown_column.csv")
    assert where(report.errors) == [("unknown_column", None, 1, "email")]
    assert rows_of(report) == [(1, 2, "A", "1 Road", "1")]


def test_header_after_blank_lines_reports_its_own_line():
    report = validate_csv(b"\n\r\n  \nname,phone\nA,1\n")
    assert where(report.errors) == [("missing_column", None, 4, "address")]


@pytest.mark.parametrize(
    ("fixture", "label"),
    [("semicolon.csv", "semicolon"), ("tab.csv", "tab"), ("pipe.csv", "pipe")],
)
def test_delimiter_hint(fixture, label):
    report = validate_csv(DATA / fixture)
    assert not report.ok
    assert where(report.warnings) == [("delimiter_hint", None, 1, None)]
    assert f"looks {label}-separated" in report.warnings[0].message
    assert "comma-separated" in report.warnings[0].message
    assert ("missing_column", None, 1, "name") in where(report.errors)
    assert ("missing_column", None, 1, "address") in where(report.errors)


def test_no_delimiter_hint_for_an_ordinary_bad_header():
    report = validate_csv(b"title;subtitle,address\nA,B\n")
    assert report.warnings == []


@pytest.mark.parametrize("fixture", ["empty.csv", "blank_only.csv"])
def test_empty_file(fixture):
    report = validate_csv(DATA / fixture)
    assert where(report.errors) == [("empty_file", None, None, None)]
    assert report.total_rows == 0
    assert report.columns == ()


def test_header_only_file():
    report = validate_csv(DATA / "header_only.csv")
    assert where(report.errors) == [("no_data_rows", None, 1, None)]
    assert report.total_rows == 0


def test_file_that_is_one_unterminated_quote():
    report = validate_csv(b'"name,address\nA,B\n')
    assert where(report.errors) == [("unterminated_quote", None, 1, None)]


def test_header_with_a_quoting_error():
    report = validate_csv(b'"name"x,address\nA,B\n')
    assert where(report.errors) == [("bad_quoting", None, 1, None)]
    assert report.total_rows == 1
    assert report.invalid_rows == 1


# --- rows -----------------------------------------------------------------------------------------


def test_blank_lines_keep_row_numbers_dense_and_lines_physical():
    report = validate_csv(DATA / "blank_lines.csv")
    assert report.ok, report.errors
    assert rows_of(report) == [(1, 5, "A", "1 Road", "1"), (2, 10, "B", "2 Road", "2")]
    assert report.total_rows == 2


def test_whitespace_only_values_and_empty_phone():
    report = validate_csv(DATA / "missing_values.csv")
    assert where(report.errors) == [
        ("missing_value", 1, 2, "name"),
        ("missing_value", 2, 3, "address"),
    ]
    assert str(report.errors[0]) == "row 1 (line 2), column name: name is empty [missing_value]"
    # '"",,' is a blank record: not counted. D's phone is only spaces: None.
    assert rows_of(report) == [(3, 5, "D", "4 Road", None)]
    assert report.total_rows == 3
    assert report.invalid_rows == 2


def test_ragged_rows():
    report = validate_csv(DATA / "ragged.csv")
    assert where(report.errors) == [
        ("wrong_field_count", 1, 2, None),
        ("wrong_field_count", 2, 3, None),
    ]
    assert "expected 3 fields, found 2" in report.errors[0].message
    assert "expected 3 fields, found 4" in report.errors[1].message
    assert "double quotes" in report.errors[1].message
    assert rows_of(report) == [(3, 4, "C", "3 Road", "3")]


def test_unterminated_quote_reports_the_line_where_the_record_starts():
    report = validate_csv(DATA / "unterminated_quote.csv")
    assert where(report.errors) == [("unterminated_quote", 2, 3, None)]
    assert rows_of(report) == [(1, 2, "A", "1 Road", "1")]
    assert report.total_rows == 2


def test_bad_quoting_then_validation_continues():
    report = validate_csv(DATA / "bad_quoting.csv")
    assert where(report.errors) == [("bad_quoting", 1, 2, None)]
    assert rows_of(report) == [(2, 3, "B", "2 Road", "2")]


def test_bad_quoting_in_a_multi_line_record_names_both_lines():
    report = validate_csv((HEADER + '"A\nB"x,1 Road,1\nC,3 Road,3\n').encode())
    assert where(report.errors) == [("bad_quoting", 1, 2, None)]
    assert "line 3" in report.errors[0].message
    assert rows_of(report) == [(2, 4, "C", "3 Road", "3")]


def test_field_longer_than_max_field_length():
    report = validate_csv(DATA / "long_field.csv")
    assert where(report.errors) == [("field_too_long", 1, 2, "name")]
    assert "1001" in report.errors[0].message
    assert [r.row for r in report.rows] == [2]
    assert validate_csv(DATA / "long_field.csv", max_field_length=1001).ok


def test_field_longer_than_the_csv_readers_own_limit():
    limit_before = csv.field_size_limit()
    data = (HEADER + '"' + "x" * 200_000 + '",1 Road,1\n' + "B,2 Road,2\n").encode()
    report = validate_csv(data, max_field_length=1_000_000)
    assert where(report.errors) == [("field_too_long", 1, 2, None)]
    assert rows_of(report) == [(2, 3, "B", "2 Road", "2")]
    assert csv.field_size_limit() == limit_before  # never changed globally


def test_quoted_newline_is_valid_and_reports_its_first_line():
    report = validate_csv(DATA / "quoted_newline.csv")
    assert report.ok
    assert rows_of(report) == [
        (1, 2, "Multi\nLine Hospital", "1 Road\r\nSecond line", "1"),
        (2, 5, "Next", "2 Road", "2"),
    ]


def test_other_unicode_line_breaks_are_ordinary_characters():
    data = (HEADER + "A\x0bB,1\u2028Road,\x85\nC,3 Road,3\n").encode()
    report = validate_csv(data)
    assert report.ok
    assert rows_of(report) == [(1, 2, "A\x0bB", "1\u2028Road", None), (2, 3, "C", "3 Road", "3")]


def test_formula_injection_rejected():
    report = validate_csv(DATA / "formula.csv")
    assert where(report.errors) == [
        ("formula_injection", 1, 2, "name"),
        ("formula_injection", 2, 3, "address"),
        ("formula_injection", 3, 4, "name"),
        ("formula_injection", 4, 5, "name"),
        ("formula_injection", 5, 6, "phone"),
        ("formula_injection", 6, 7, "name"),
        ("formula_injection", 7, 9, "phone"),
    ]
    assert "a tab" in report.errors[3].message
    assert "a carriage return" in report.errors[5].message
    # A phone may start with "+"; leading spaces are not a formula.
    assert rows_of(report) == [(8, 10, "Plain", "8 Road", "+1 555")]


def test_formula_injection_neutralized():
    report = validate_csv(DATA / "formula.csv", formula_policy="neutralize")
    assert report.ok
    assert where(report.warnings) == [
        ("formula_neutralized", 1, 2, "name"),
        ("formula_neutralized", 2, 3, "address"),
        ("formula_neutralized", 3, 4, "name"),
        ("formula_neutralized", 5, 6, "phone"),
        ("formula_neutralized", 7, 9, "phone"),
    ]
    assert rows_of(report) == [
        (1, 2, "'=HYPERLINK(1)", "1 Road", "1"),
        (2, 3, "Clinic", "'@SUM(A1)", "2"),
        (3, 4, "'+Clinic", "3 Road", "+44 20 7946"),
        (4, 5, "Tabbed", "4 Road", "4"),  # the tab went with trimming: nothing to neutralize
        (5, 6, "Clinic 5", "5 Road", "'=1+1"),
        (6, 7, "CR Clinic", "6 Road", "6"),
        (7, 9, "Safe", "7 Road", "'@home"),
        (8, 10, "Plain", "8 Road", "+1 555"),
    ]


@pytest.mark.parametrize("keep_rows", [True, False])
def test_duplicate_rows_are_warnings(keep_rows):
    report = validate_csv(DATA / "duplicates.csv", keep_rows=keep_rows)
    assert report.ok
    assert where(report.warnings) == [("duplicate_row", 3, 4, None), ("duplicate_row", 5, 6, None)]
    assert report.warnings[0].message == "row 3 is identical to row 1; both will be created"
    assert report.warnings[1].message == "row 5 is identical to row 2; both will be created"
    assert len(report.rows) == (5 if keep_rows else 0)
    assert report.total_rows == 5


def test_identical_rows_stay_distinct():
    report = validate_csv(DATA / "duplicates.csv")
    first, third = report.rows[0], report.rows[2]
    assert (first.name, first.address, first.phone) == (third.name, third.address, third.phone)
    assert first != third


def test_duplicate_detection_never_trusts_a_fingerprint_alone(monkeypatch):
    # Every row gets the same fingerprint: kept rows must be compared for real.
    monkeypatch.setattr(_validation, "_fingerprint", lambda record: 42)
    lines = [f"Hospital {i},{i} Road,\n" for i in range(300)]
    lines.insert(150, "Hospital 7,7 Road,\n")
    report = validate_csv((HEADER + "".join(lines)).encode())
    assert report.ok
    assert [w.message for w in report.warnings] == [
        "row 151 is identical to row 8; both will be created"
    ]


def test_duplicates_found_across_table_growth():
    distinct = [f"Hospital {i},{i} Road,{i}\n" for i in range(20_000)]
    data = (HEADER + "".join(distinct) + distinct[0] + distinct[-1]).encode()
    for keep_rows in (True, False):
        report = validate_csv(data, keep_rows=keep_rows)
        assert [w.message for w in report.warnings] == [
            "row 20001 is identical to row 1; both will be created",
            "row 20002 is identical to row 20000; both will be created",
        ], keep_rows


@pytest.mark.parametrize("make", [bytes, io.BytesIO], ids=["size-known", "stream"])
@pytest.mark.parametrize("keep_rows", [True, False])
def test_duplicates_found_whatever_the_table_growth(make, keep_rows):
    # Short rows first, then long ones: judging by its start, the file promises more rows than
    # it has (the table grows by up to 8 times at once); a stream's size is unknown (it doubles).
    short = [f"H{i},{i},\n" for i in range(5000)]
    long = [f"Hospital {i},{'x' * 200} {i} Road,{i}\n" for i in range(5000)]
    data = (HEADER + "".join(short + long) + short[0] + long[-1] + short[4096]).encode()
    report = validate_csv(make(data), keep_rows=keep_rows)
    assert [w.message for w in report.warnings] == [
        "row 10001 is identical to row 1; both will be created",
        "row 10002 is identical to row 10000; both will be created",
        "row 10003 is identical to row 4097; both will be created",
    ]
    assert len(report.rows) == (10_003 if keep_rows else 0)


def test_the_duplicate_table_grows_as_projected_but_at_most_eightfold():
    def size_after_first_growth(project):
        table = _validation._Fingerprints()
        table.project = project
        for i in range(2048):  # the 2048th entry fills half of the first 4096 slots
            assert table.add(i + 1, i + 2, f"H{i}\x00Road\x00") == 0
        return len(table._table)

    assert size_after_first_growth(lambda count: count) == 8192
    assert size_after_first_growth(lambda count: 3 * count) == 16384
    assert size_after_first_growth(lambda count: 10**9) == 32768


def test_the_source_size_is_known_for_regular_files_and_bytes_only(tmp_path):
    data = load("valid.csv")
    path = tmp_path / "h.csv"
    path.write_bytes(data)
    cases = [
        (path, len(data)),
        (str(path), len(data)),
        (data, len(data)),
        (bytearray(data), len(data)),
        (memoryview(data), len(data)),
        (io.BytesIO(data), None),
    ]
    for source, size in cases:
        reader = _validation._Source(source)
        try:
            assert reader.size == size, source
        finally:
            reader.close()


def test_the_projection_respects_the_limits(tmp_path):
    path = tmp_path / "h.csv"
    path.write_bytes((HEADER + "".join(f"H{i},{i} Road,\n" for i in range(10_000))).encode())
    report = validate_csv(path, max_rows=3000)
    assert report.total_rows == 3000
    assert len(report.rows) == 3000
    assert where(report.errors) == [("too_many_rows", None, 3002, None)]
    report = validate_csv(path, max_bytes=50_000)
    assert where(report.errors) == [("file_too_large", None, None, None)]
    assert report.rows[-1].row == report.total_rows


@pytest.mark.parametrize("policy", ["reject", "neutralize"])
def test_duplicates_are_the_same_with_and_without_rows_kept(policy):
    text = HEADER + "".join(
        [
            "A,1 Road,\n",
            "  A , 1 Road ,  \n",  # 2: identical to 1 once trimmed
            "A,1 Road,0\n",  # differs by its phone
            "=B,2 Road,\n",  # 4: neutralised to '=B, or rejected
            "'=B,2 Road,\n",  # 5: identical to 4 once 4 is neutralised
            "Ä,中 Road,😀\n",
            "Ä,中 Road,😀\n",  # 7: identical to 6
            '"A,1",Road,\n',
            'A,"1,Road",\n',  # not identical to 8: the comma is in another value
        ]
    )
    kept = validate_csv(text.encode(), formula_policy=policy)
    dry = validate_csv(text.encode(), formula_policy=policy, keep_rows=False)
    duplicates = [(w.row, w.message) for w in kept.warnings if w.code == "duplicate_row"]
    expected = [(2, "row 2 is identical to row 1; both will be created")]
    if policy == "neutralize":
        expected.append((5, "row 5 is identical to row 4; both will be created"))
    expected.append((7, "row 7 is identical to row 6; both will be created"))
    assert duplicates == expected
    assert summary(dry)[:2] == summary(kept)[:2]


@pytest.mark.parametrize("column", ["name", "address", "phone"])
def test_values_up_to_the_limit_are_kept_however_long_the_row(column):
    limit = 40
    values = {"name": " N" + "n" * (limit - 1) + " ", "address": "A" * limit, "phone": "1" * limit}
    good = ",".join(values.values())  # each value at the limit, the row three times as long
    values[column] = values[column].strip() + "x"
    bad = ",".join(values.values())
    report = validate_csv((HEADER + good + "\n" + bad + "\n").encode(), max_field_length=limit)
    assert where(report.errors) == [("field_too_long", 2, 3, column)]
    assert [(r.row, len(r.name), len(r.address), len(r.phone)) for r in report.rows] == [
        (1, limit, limit, limit)
    ]


def test_line_problems_stay_with_their_record_inside_one_chunk():
    data = (
        (HEADER + "A,1 Road,\n" + '"B\nb",2 Road,\n').encode()
        + b"C\x00,3 Road,\n"
        + b'"D\n\x00d",4 Road,\n'
        + b"E,5 Road,\n"
    )
    report = validate_csv(data)
    assert where(report.errors) == [("nul_byte", 3, 5, None), ("nul_byte", 4, 7, None)]
    assert rows_of(report) == [
        (1, 2, "A", "1 Road", None),
        (2, 3, "B\nb", "2 Road", None),
        (5, 8, "E", "5 Road", None),
    ]


@pytest.mark.parametrize("keep_rows", [True, False])
def test_validation_leaves_nothing_for_the_garbage_collector(keep_rows, tmp_path):
    # The duplicate table (megabytes for a large file) goes as soon as validate_csv returns,
    # not at some later collection.
    data = (
        HEADER + "".join(f"H{i},{i} Road,\n" for i in range(5000)) + "H1,1 Road,\n"
        '"a"b,x,\n=A,1,\nC\x00,1,\n"open,1,\n'
    ).encode()
    path = tmp_path / "h.csv"
    path.write_bytes(data)
    gc.collect()
    gc.disable()
    try:
        for source in (path, data, io.BytesIO(data)):
            report = validate_csv(source, keep_rows=keep_rows)
            assert report.errors
            assert report.warnings
            assert gc.collect() == 0
    finally:
        gc.enable()


@pytest.mark.skipif(
    not (sys.hash_info.width == 64 and sys.hash_info.algorithm.startswith("siphash")),
    reason="the builtin hash is not a keyed 64-bit SipHash here",
)
def test_the_row_fingerprint_is_the_builtin_hash_itself():
    # One builtin call per row, no Python function in between.
    assert _validation._fingerprint is hash


# --- encoding problems ---------------------------------------------------------------------------


def test_latin1_bytes_are_an_invalid_encoding_on_the_right_line():
    report = validate_csv(DATA / "latin1.csv")
    assert where(report.errors) == [("invalid_encoding", 2, 3, None)]
    message = report.errors[0].message
    assert "UTF-8" in message
    assert "Latin-1" in message
    assert [(r.row, r.name) for r in report.rows] == [(1, "Good"), (3, "Also good")]


def test_invalid_utf8_split_across_a_chunk_boundary(monkeypatch):
    monkeypatch.setattr(_validation, "CHUNK_SIZE", 3)
    data = (HEADER + "Caf").encode() + b"\xc3" + b",1 Road,\nH\xe9,2 Road,\nOk,3 Road,\n"
    report = validate_csv(data)
    assert where(report.errors) == [
        ("invalid_encoding", 1, 2, None),
        ("invalid_encoding", 2, 3, None),
    ]
    assert rows_of(report) == [(3, 4, "Ok", "3 Road", None)]


def test_invalid_utf16_is_reported_on_its_line():
    good = (HEADER + "A,1 Road,\n").encode("utf-16-le")
    bad = "B,2 Road,\n".encode("utf-16-le").replace(b"B\x00", b"\x00\xd8", 1)  # lone surrogate
    tail = "C,3 Road,\n".encode("utf-16-le")
    report = validate_csv(codecs.BOM_UTF16_LE + good + bad + tail)
    assert report.encoding == "utf-16"
    assert where(report.errors) == [("invalid_encoding", 2, 3, None)]
    assert "UTF-16" in report.errors[0].message
    assert [r.name for r in report.rows] == ["A", "C"]


def test_truncated_utf16_file():
    data = codecs.BOM_UTF16_LE + (HEADER + "A,1 Road,\nB,2 Road,").encode("utf-16-le") + b"x"
    report = validate_csv(data)
    assert where(report.errors) == [("invalid_encoding", 2, 3, None)]
    assert [r.name for r in report.rows] == ["A"]


def test_nul_byte():
    report = validate_csv(DATA / "nul_byte.csv")
    assert where(report.errors) == [("nul_byte", 2, 3, None)]
    assert [r.name for r in report.rows] == ["Good", "Also good"]


def test_utf16_without_bom_gets_a_hint():
    report = validate_csv(DATA / "utf16_no_bom.csv")
    assert report.errors[0].code == "nul_byte"
    assert report.errors[0].line == 1
    assert "UTF-16" in report.errors[0].message
    assert len(report.rows) == 0


# --- over-long lines and records -----------------------------------------------------------------


def test_line_too_long_is_skipped_and_validation_continues():
    long_name = "x" * (2 * 1024 * 1024)
    data = (HEADER + "A,1 Road,1\n" + f"{long_name},2 Road,2\n" + "C,3 Road,3\n").encode()
    report = validate_csv(data, max_field_length=10)
    assert where(report.errors) == [("line_too_long", 2, 3, None)]
    assert rows_of(report) == [(1, 2, "A", "1 Road", "1"), (3, 4, "C", "3 Road", "3")]


@pytest.mark.parametrize(
    "text",
    [
        # Inside a quoted field, with an even number of quotes: the record goes on.
        '"Start\n' + "y" * 1500 + "\n" + 'end",1 Road,1\n' + "C,3 Road,3\n",
        # The long line opens a quoted field that the next line closes.
        '"' + "y" * 1500 + "\n" + 'rest",1 Road,1\n' + "C,3 Road,3\n",
        # The long line closes the quoted field opened on the line before.
        '"Start\n' + "y" * 1500 + '",1 Road,1\n' + "C,3 Road,3\n",
    ],
)
@pytest.mark.parametrize("chunk_size", [5, 64, 65536])
@pytest.mark.parametrize("ending", ["\n", "\r\n", "\r"])
def test_long_line_keeps_the_quoting_state(monkeypatch, text, chunk_size, ending):
    monkeypatch.setattr(_validation, "_MIN_LINE_CAP", 0)
    monkeypatch.setattr(_validation, "CHUNK_SIZE", chunk_size)
    data = (HEADER + text).replace("\n", ending).encode()
    report = validate_csv(data, max_field_length=10)  # line cap: 8 * 10 + 1024 = 1104
    assert [e.code for e in report.errors] == ["line_too_long"]
    assert report.errors[0].row == 1
    assert [(r.row, r.name) for r in report.rows] == [(2, "C")]
    assert report.total_rows == 2


@pytest.mark.parametrize("chunk_size", [7, 65536])
def test_long_last_line_without_newline(monkeypatch, chunk_size):
    monkeypatch.setattr(_validation, "_MIN_LINE_CAP", 0)
    monkeypatch.setattr(_validation, "CHUNK_SIZE", chunk_size)
    data = (HEADER + "A,1 Road,1\n" + "z" * 3000).encode()
    report = validate_csv(data, max_field_length=10)
    assert where(report.errors) == [("line_too_long", 2, 3, None)]
    assert [r.name for r in report.rows] == ["A"]


def test_record_too_long(monkeypatch):
    monkeypatch.setattr(_validation, "_MIN_LINE_CAP", 0)
    monkeypatch.setattr(_validation, "CHUNK_SIZE", 64)
    # Every line closes one quoted field and opens the next: one record, ever longer.
    data = (HEADER + '"a\n' + '","b\n' * 2000).encode()
    report = validate_csv(data, max_field_length=10, max_errors=None)  # cap 1104 characters
    assert where(report.errors[:1]) == [("record_too_long", 1, 2, None)]
    assert "closing quote" in report.errors[0].message


# --- limits ---------------------------------------------------------------------------------------


def test_max_rows():
    report = validate_csv(DATA / "valid.csv", max_rows=2)
    assert where(report.errors) == [("too_many_rows", None, 4, None)]
    assert report.total_rows == 2
    assert [r.row for r in report.rows] == [1, 2]
    assert validate_csv(DATA / "valid.csv", max_rows=3).ok


def test_max_rows_stops_reading():
    data = (HEADER + "".join(f"H{i},{i} Road,\n" for i in range(100_000))).encode()
    report = validate_csv(data, max_rows=10)
    assert report.total_rows == 10
    assert report.bytes_read < len(data)


def test_max_bytes():
    data = load("valid.csv")
    assert validate_csv(data, max_bytes=len(data)).ok
    report = validate_csv(data, max_bytes=len(data) - 1)
    assert where(report.errors) == [("file_too_large", None, None, None)]
    assert report.bytes_read <= len(data)
    assert report.total_rows == 2  # the cut last line is not read


def test_max_bytes_in_the_middle_of_a_quoted_field_is_only_too_large():
    data = (HEADER + "A,1 Road,1\n" + '"B\nstill in the quote\nand more\n').encode()
    report = validate_csv(data, max_bytes=len(HEADER) + 20)
    assert where(report.errors) == [("file_too_large", None, None, None)]


def test_max_bytes_stops_reading_a_large_stream():
    stream = io.BytesIO((HEADER + "A,1 Road,1\n" * 100_000).encode())
    report = validate_csv(stream, max_bytes=1000)
    assert report.bytes_read <= 1001
    assert stream.tell() <= 1001
    assert where(report.errors) == [("file_too_large", None, None, None)]


def test_max_errors_truncates_the_list():
    report = validate_csv(DATA / "many_errors.csv", max_errors=5)
    assert where(report.errors) == [("missing_value", i, i + 1, "name") for i in range(1, 6)] + [
        ("too_many_errors", None, None, None)
    ]
    assert "7 more errors" in report.errors[-1].message
    assert report.truncated_errors == 7
    assert report.invalid_rows == 12
    assert [r.row for r in report.rows] == [13]
    unlimited = validate_csv(DATA / "many_errors.csv", max_errors=None)
    assert len(unlimited.errors) == 12
    assert unlimited.truncated_errors == 0
    assert len(validate_csv(DATA / "many_errors.csv").errors) == 12  # the default cap is 1000


def test_max_errors_zero_lists_only_the_summary():
    data = (HEADER + ",1 Road,\n,2 Road,\n").encode()
    report = validate_csv(data, max_errors=0)
    assert where(report.errors) == [("too_many_errors", None, None, None)]
    assert report.truncated_errors == 2
    assert not report.ok


def test_warnings_are_capped_the_same_way():
    data = (HEADER + "A,1 Road,\n" * 21).encode()
    report = validate_csv(data, max_errors=5)
    assert report.ok
    assert [w.code for w in report.warnings] == ["duplicate_row"] * 5 + ["too_many_warnings"]
    assert report.truncated_warnings == 15
    assert len(report.rows) == 21


def test_file_level_errors_are_listed_even_past_max_errors():
    data = (HEADER + ",1 Road,\n" * 5).encode()
    report = validate_csv(data, max_errors=2, max_rows=3)
    assert [e.code for e in report.errors] == [
        "missing_value",
        "missing_value",
        "too_many_rows",
        "too_many_errors",
    ]


# --- sources -------------------------------------------------------------------------------------


class Trickle(io.RawIOBase):
    """A non-seekable raw stream giving a few bytes per read."""

    def __init__(self, data: bytes, step: int) -> None:
        self._data = data
        self._pos = 0
        self._step = step

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self._step, len(self._data) - self._pos)
        buffer[:n] = self._data[self._pos : self._pos + n]
        self._pos += n
        return n


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda path: str(path), id="str-path"),
        pytest.param(lambda path: path, id="pathlib"),
        pytest.param(lambda path: path.read_bytes(), id="bytes"),
        pytest.param(lambda path: bytearray(path.read_bytes()), id="bytearray"),
        pytest.param(lambda path: memoryview(path.read_bytes()), id="memoryview"),
        pytest.param(lambda path: io.BytesIO(path.read_bytes()), id="bytesio"),
        pytest.param(lambda path: Trickle(path.read_bytes(), 3), id="raw-stream"),
        pytest.param(lambda path: io.BufferedReader(Trickle(path.read_bytes(), 5)), id="buffered"),
    ],
)
def test_every_source_kind_gives_the_same_report(make):
    path = DATA / "utf16_le.csv"
    expected = summary(validate_csv(path.read_bytes()))
    assert summary(validate_csv(make(path))) == expected


def test_file_object_is_read_from_its_position_and_left_open(tmp_path):
    path = tmp_path / "h.csv"
    path.write_bytes(b"junk\n" + load("valid.csv"))
    with open(path, "rb") as handle:
        handle.read(5)
        report = validate_csv(handle)
        assert not handle.closed
    assert len(report.rows) == 3


def test_wide_memoryview_is_read_as_bytes():
    data = load("valid.csv")
    data += b"\n" * (-len(data) % 4)
    report = validate_csv(memoryview(data).cast("I"))
    assert len(report.rows) == 3


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda path: io.StringIO(path.read_text()), id="stringio"),
        pytest.param(lambda path: open(path, encoding="utf-8"), id="text-file"),  # noqa: SIM115
    ],
)
def test_text_stream_is_rejected(make):
    source = make(DATA / "valid.csv")
    try:
        with pytest.raises(CSVSourceError, match="binary mode"):
            validate_csv(source)
    finally:
        source.close()


def test_object_whose_read_returns_text_is_rejected():
    class TextReader:
        def read(self, size):
            return "name,address\n"

    with pytest.raises(CSVSourceError, match="binary mode"):
        validate_csv(TextReader())


def test_non_blocking_stream_without_data_is_rejected():
    class NoData:
        def read(self, size):
            return None

    with pytest.raises(CSVSourceError, match="non-blocking"):
        validate_csv(NoData())


def test_read_failure_is_a_source_error():
    class Broken:
        def __init__(self):
            self.calls = 0

        def read(self, size):
            self.calls += 1
            if self.calls > 1:
                raise OSError("disk on fire")
            return HEADER.encode()

    with pytest.raises(CSVSourceError, match="disk on fire") as info:
        validate_csv(Broken())
    assert isinstance(info.value.__cause__, OSError)


def test_missing_file(tmp_path):
    with pytest.raises(CSVSourceError, match="cannot open") as info:
        validate_csv(tmp_path / "nope.csv")
    assert info.value.source == str(tmp_path / "nope.csv")


def test_directory_is_a_source_error(tmp_path):
    with pytest.raises(CSVSourceError):
        validate_csv(tmp_path)


def test_csv_text_passed_as_str_gets_a_hint():
    with pytest.raises(CSVSourceError, match="as bytes"):
        validate_csv("name,address\nA,B\n")


def test_released_memoryview_is_a_source_error():
    view = memoryview(load("valid.csv"))
    view.release()
    with pytest.raises(CSVSourceError, match="released"):
        validate_csv(view)


def test_path_like_returning_a_non_path_is_a_source_error():
    class Odd(os.PathLike):
        def __fspath__(self):
            return 42

    with pytest.raises(CSVSourceError, match="as a path"):
        validate_csv(Odd())


@pytest.mark.parametrize("source", [3, None, 2.5, ["name,address\n"], object()])
def test_unsupported_source_types(source):
    with pytest.raises(CSVSourceError, match="cannot read a CSV file from"):
        validate_csv(source)


@pytest.mark.parametrize(
    "settings",
    [
        {"max_rows": 0},
        {"max_rows": -1},
        {"max_rows": True},
        {"max_rows": 1.5},
        {"max_rows": "10"},
        {"max_bytes": 0},
        {"max_bytes": -5},
        {"max_field_length": 0},
        {"max_field_length": None},
        {"max_errors": -1},
        {"max_errors": False},
        {"formula_policy": "escape"},
        {"formula_policy": None},
        {"keep_rows": "yes"},
        {"keep_rows": 1},
    ],
)
def test_bad_settings(settings, tmp_path):
    # Settings are checked before the source is opened.
    with pytest.raises(ConfigurationError) as info:
        validate_csv(tmp_path / "missing.csv", **settings)
    assert isinstance(info.value, ValueError)
    assert next(iter(settings)) in str(info.value)


# --- the report and its parts --------------------------------------------------------------------


def test_raise_for_errors_carries_the_report():
    report = validate_csv(DATA / "ragged.csv")
    with pytest.raises(CSVValidationError) as info:
        report.raise_for_errors()
    assert info.value.report is report
    assert "2 error(s)" in str(info.value)
    assert "row 1 (line 2): expected 3 fields, found 2 [wrong_field_count]" in str(info.value)


@pytest.mark.parametrize(
    ("issue", "text"),
    [
        (
            ValidationIssue(IssueCode.MISSING_VALUE, 3, 5, "name", "name is empty"),
            "row 3 (line 5), column name: name is empty [missing_value]",
        ),
        (
            ValidationIssue(IssueCode.UNKNOWN_COLUMN, None, 1, "email", "unknown"),
            "line 1, column email: unknown [unknown_column]",
        ),
        (ValidationIssue("bad_quoting", 2, 3, None, "oops"), "row 2 (line 3): oops [bad_quoting]"),
        (ValidationIssue(IssueCode.EMPTY_FILE, None, None, None, "empty"), "empty [empty_file]"),
    ],
)
def test_issue_str(issue, text):
    assert str(issue) == text


def test_issue_and_row_are_frozen_and_slotted():
    issue = ValidationIssue(IssueCode.NUL_BYTE, 1, 2, None, "m")
    row = HospitalRow(1, 2, "A", "B", None)
    for obj in (issue, row):
        assert not hasattr(obj, "__dict__")
        with pytest.raises(dataclasses.FrozenInstanceError):
            obj.row = 5


def test_issue_codes_are_strings():
    assert IssueCode.MISSING_VALUE == "missing_value"
    assert str(IssueCode.DUPLICATE_ROW) == "duplicate_row"
    assert json.dumps([IssueCode.NUL_BYTE]) == '["nul_byte"]'
    assert len({c.value for c in IssueCode}) == len(IssueCode)


def test_rows_sequence():
    report = validate_csv(DATA / "blank_lines.csv")
    rows = report.rows
    assert len(rows) == 2
    assert rows[0] == HospitalRow(1, 5, "A", "1 Road", "1")
    assert rows[-1] == HospitalRow(2, 10, "B", "2 Road", "2")
    assert list(rows[::-1]) == [rows[1], rows[0]]
    assert list(rows[5:]) == []
    assert list(rows) == [rows[0], rows[1]]
    assert rows.index(rows[1]) == 1
    assert rows[1] in rows
    with pytest.raises(IndexError):
        rows[2]
    with pytest.raises(IndexError):
        rows[-3]


def test_rows_numbering_survives_gaps_and_multi_line_records():
    # Rows 7, 14, ... span two lines and lack an address: invalid, so the kept rows have gaps
    # in both row and line numbers.
    text = HEADER
    expected = []
    line = 2
    for i in range(1, 60):
        if i % 7:
            text += f"H{i},{i} Road,\n"
            expected.append((i, line))
            line += 1
        else:
            text += f'"H{i}\nsecond",,\n'
            line += 2
    report = validate_csv(text.encode())
    assert [(r.row, r.line) for r in report.rows] == expected
    assert [(report.rows[i].row, report.rows[i].line) for i in range(len(expected))] == expected


def test_report_repr_is_short():
    report = validate_csv(DATA / "valid.csv")
    text = repr(report)
    assert "ok=True" in text
    assert "St Mary" not in text
    assert repr(report.rows) == "<3 hospital rows>"


def test_row_contents_are_never_logged_above_debug(caplog):
    caplog.set_level(logging.DEBUG, logger="hospital_bulk")
    validate_csv((HEADER + "Secret Clinic,1 Hidden Road,\n").encode())
    assert caplog.records, "expected a debug summary"
    for record in caplog.records:
        assert record.levelno <= logging.DEBUG
        assert "Secret" not in record.getMessage()


# --- properties ---------------------------------------------------------------------------------

_ALPHABET = [
    "a",
    "Z",
    " ",
    "é",
    "中",
    "😀",
    ",",
    '"',
    "'",
    "=",
    "+",
    "@",
    "\t",
    "\n",
    "\r",
    "\r\n",
    "-",
    "1",
]


def _random_value(rng: random.Random) -> str:
    return "".join(rng.choice(_ALPHABET) for _ in range(rng.randint(0, 8)))


def _quote(value: str, rng: random.Random) -> str:
    if rng.random() < 0.7 and not any(c in value for c in ',"\r\n'):
        return value
    return '"' + value.replace('"', '""') + '"'


def _random_file(rng: random.Random) -> bytes:
    header = rng.choice(
        [
            "name,address,phone",
            "Name , ADDRESS",
            "address,name,phone,extra",
            "name;address;phone",
            "name,name,address",
            "",
        ]
    )
    ending = rng.choice(["\n", "\r\n", "\r"])
    lines = [header]
    for _ in range(rng.randint(0, 12)):
        cells = [_quote(_random_value(rng), rng) for _ in range(rng.choice([1, 2, 3, 3, 3, 4]))]
        lines.append(",".join(cells))
        if rng.random() < 0.1:
            lines.append(rng.choice(["", "  ", ",,"]))
    text = ending.join(lines) + rng.choice([ending, ""])
    encoding = rng.choice(["utf-8", "utf-8", "utf-8", "utf-8-sig", "utf-16", "utf-32"])
    return text.encode(encoding, "surrogatepass")


_NASTY = [
    b"\x00",
    b"\xff",
    b"\xe9",
    b"\xc3",
    b"\xed\xa0\x80",
    b'"',
    b",",
    b"\n",
    b"\r",
    b"\xef\xbb\xbf",
]


def _mutate(data: bytes, rng: random.Random) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        pos = rng.randint(0, len(buf))
        action = rng.random()
        if action < 0.4:
            buf[pos:pos] = rng.choice(_NASTY)
        elif action < 0.7:
            del buf[pos : pos + rng.randint(1, 3)]
        else:
            buf[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 4)))
    return bytes(buf)


def _check_invariants(data: bytes, report: ValidationReport, keep_rows: bool, seed: int) -> None:
    msg = f"seed={seed}"
    assert report.ok == (not report.errors), msg
    assert report.bytes_read == len(data), msg
    assert report.sha256 == hashlib.sha256(data).hexdigest(), msg
    if keep_rows:
        assert len(report.rows) + report.invalid_rows == report.total_rows, msg
    else:
        assert len(report.rows) == 0, msg
    assert 0 <= report.invalid_rows <= report.total_rows, msg
    codes = {c.value for c in IssueCode}
    for issue in report.errors + report.warnings:
        assert issue.code in codes, msg
        assert issue.row is None or 1 <= issue.row <= report.total_rows, msg
        assert issue.line is None or issue.line >= 1, msg
    previous = (0, 0)
    for row in report.rows:
        assert row.name, msg
        assert row.name == row.name.strip(), msg
        assert row.address, msg
        assert row.address == row.address.strip(), msg
        assert row.phone is None or (row.phone and row.phone == row.phone.strip()), msg
        assert "\x00" not in row.name + row.address + (row.phone or ""), msg
        assert row.row > previous[0], msg
        assert row.line > previous[1], msg
        previous = (row.row, row.line)


@pytest.mark.parametrize("seed", range(40))
def test_fuzz_never_raises_and_counts_add_up(seed, monkeypatch):
    rng = random.Random(seed)
    for case in range(25):
        kind = rng.random()
        if kind < 0.15:
            data = bytes(rng.randrange(256) for _ in range(rng.randint(0, 200)))
        elif kind < 0.5:
            data = _random_file(rng)
        else:
            data = _mutate(_random_file(rng), rng)
        tag = seed * 1000 + case
        settings = {
            "max_errors": rng.choice([None, 1000, 3, 0]),
            "formula_policy": rng.choice(["reject", "neutralize"]),
            "max_field_length": rng.choice([1000, 4]),
        }
        try:
            report = validate_csv(data, **settings)
            dry = validate_csv(data, keep_rows=False, **settings)
            monkeypatch.setattr(_validation, "CHUNK_SIZE", rng.choice([1, 2, 3, 5, 8]))
            chunked = validate_csv(io.BytesIO(data), **settings)
            monkeypatch.setattr(_validation, "CHUNK_SIZE", 64 * 1024)
        except Exception as exc:  # pragma: no cover - the failure report
            pytest.fail(f"seed={seed} case={case} data={data!r}: {exc!r}")
        _check_invariants(data, report, True, tag)
        _check_invariants(data, dry, False, tag)
        # The answer does not depend on how the bytes arrive.
        assert summary(chunked) == summary(report), f"seed={seed} case={case} data={data!r}"
        # A dry run says the same, without rows.
        assert summary(dry)[:2] == summary(report)[:2], f"seed={seed} case={case}"
        assert summary(dry)[3:] == summary(report)[3:], f"seed={seed} case={case}"


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 4, 7, 13])
def test_corpus_is_independent_of_chunk_size(monkeypatch, chunk_size):
    expected = {p.name: summary(validate_csv(p)) for p in sorted(DATA.glob("*.csv"))}
    monkeypatch.setattr(_validation, "CHUNK_SIZE", chunk_size)
    for path in sorted(DATA.glob("*.csv")):
        assert summary(validate_csv(path)) == expected[path.name], path.name


# --- memory and speed ---------------------------------------------------------------------------

_CHILD = textwrap.dedent(
    """
    import json, resource, sys, time

    from hospital_bulk._validation import validate_csv

    def peak():
        try:
            with open("/proc/self/status") as status:
                for line in status:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        scale = 1 if sys.platform == "darwin" else 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale

    before = peak()
    started = time.perf_counter()
    report = validate_csv(sys.argv[1], keep_rows=sys.argv[2] == "1")
    elapsed = time.perf_counter() - started
    growth = peak() - before
    rows = report.rows
    print(json.dumps({
        "growth": growth,
        "elapsed": elapsed,
        "ok": report.ok,
        "total": report.total_rows,
        "rows": len(rows),
        "last": [rows[-1].row, rows[-1].line, rows[-1].name] if len(rows) else None,
    }))
    """
)


def _run_child(path: Path, keep_rows: bool) -> dict:
    root = str(Path(hospital_bulk.__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, str(path), "1" if keep_rows else "0"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="measures RSS with resource or /proc")
def test_a_million_rows_in_bounded_memory(tmp_path):
    path = tmp_path / "million.csv"
    streets = ["Main Street", "Oak Avenue", "Hospital Road", "Station Lane", "Church Street"]
    towns = ["Springfield", "Riverton", "Lakeside", "Hillcrest", "Fairview"]
    with open(path, "w", encoding="utf-8", newline="") as out:
        out.write("name,address,phone\n")
        out.writelines(
            f"St Mary Hospital {i},{i % 997 + 1} {streets[i % 5]} {towns[i // 5 % 5]},"
            f"+1-555-{i % 10000:04d}\n"
            for i in range(1_000_000)
        )
    size = path.stat().st_size
    assert 55_000_000 < size < 70_000_000  # about 60 bytes a row

    kept = _run_child(path, keep_rows=True)
    dry = _run_child(path, keep_rows=False)
    mib = 1024 * 1024
    numbers = (
        f"keep_rows=True: +{kept['growth'] / mib:.1f} MiB in {kept['elapsed']:.2f} s "
        f"({1_000_000 / kept['elapsed']:,.0f} rows/s); keep_rows=False: "
        f"+{dry['growth'] / mib:.1f} MiB in {dry['elapsed']:.2f} s"
    )
    print(numbers)
    assert kept["ok"], numbers
    assert kept["total"] == 1_000_000
    assert kept["rows"] == 1_000_000
    assert kept["last"] == [1_000_000, 1_000_001, "St Mary Hospital 999999"]
    assert kept["growth"] < 100 * mib, numbers
    assert dry["ok"]
    assert dry["rows"] == 0
    assert dry["total"] == 1_000_000
    assert dry["growth"] < kept["growth"] / 2, numbers
    assert dry["growth"] < 40 * mib, numbers
