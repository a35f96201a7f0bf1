r"""Streaming validation of hospital CSV files.

`validate_csv` reads a CSV file of hospitals (``name,address,phone``; ``phone`` optional) and
reports every problem in one pass, each with its data-row number (1 = first data row; blank lines
do not count) and its physical line (1-based; a record that spans several lines reports its first
line). Nothing is sent anywhere: the report says whether the file may be loaded.

How it works, and why:

* **Streaming.** The source is read in chunks of `CHUNK_SIZE` bytes and hashed as it goes
  (``sha256`` is the file's fingerprint). Chunks are decoded incrementally and cut into physical
  lines (``\n``, ``\r\n`` and a lone ``\r`` all end a line; no other character does), and the
  lines are handed one at a time to `csv.reader` (a chunk's lines through `itertools.chain`), so
  ``reader.line_num`` counts physical lines. Only the current chunk, a partial line and the
  record being parsed are held. A line longer than the line cap (1 MiB, or
  ``8 * max_field_length + 1024`` characters when that is larger) is skipped without being
  buffered whole; a record that keeps a quoted field open across more than the cap is cut short
  the same way.
* **Decoding.** A byte order mark selects UTF-8 (``"utf-8-sig"``), UTF-16 or UTF-32 (``"utf-16"``
  and ``"utf-32"``, either byte order); without one the file must be strict UTF-8 (``"utf-8"``).
  A line holding bytes that do not decode, or a NUL byte, is an error on that line and makes its
  row invalid; validation goes on with the next line.
* **Compact rows.** Valid rows are kept as one ``bytearray`` of UTF-8 ``name\0address\0phone``
  records (NUL never occurs in an accepted value) with an `array.array` of end offsets. Row and
  line numbers are stored as runs (a new run only where a row or line number does not follow on
  from the previous kept row), so a clean file costs nothing for them. `ValidationReport.rows`
  builds each `HospitalRow` on access. The rows of a 65 MiB file of a million rows take about
  66 MiB; validating it peaks at about 81 MiB, the duplicate table included.
* **Duplicates.** Identical rows (same name, address and phone after trimming) are a warning, not
  an error: the file asked for both. They are found with an open-addressing table of references
  into an `array.array` of fingerprints. The table grows when half full: it doubles, or grows up
  to 8 times at once when the bytes still to read (the size of a regular file or of bytes is
  known) promise as many rows, which saves moving every entry at each doubling. The row
  fingerprint is Python's keyed 64-bit SipHash of the record's text (the builtin ``hash``,
  called directly; BLAKE2b on platforms whose ``hash`` is narrower). When rows are kept, the low
  32 bits of each row's fingerprint are kept and a match is confirmed by comparing the stored
  row, so a warning is never wrong. With ``keep_rows=False`` only the 64-bit fingerprints of
  distinct rows are kept: two different rows would be reported as identical only on a
  fingerprint collision (about one chance in 2**64 per pair of rows).
* **Formula injection.** Spreadsheet programs run a cell that starts with ``=``, ``@``, ``+``, a
  tab or a carriage return as a formula. Such a ``name`` or ``address`` (``phone`` may start with
  ``+``) is rejected, or with ``formula_policy="neutralize"`` kept behind a leading ``'``.
* **Limits.** ``max_bytes`` and ``max_rows`` stop reading at once (``bytes_read`` and ``sha256``
  then cover only what was read); ``max_errors`` caps the issues listed (errors and warnings
  separately), counting the rest. File-level errors (empty file, no data rows, a limit reached)
  are always listed.
"""

from __future__ import annotations

import codecs
import csv
import enum
import hashlib
import io
import logging
import os
import re
import secrets
import stat
import sys
from array import array
from bisect import bisect_right
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any, Literal, Protocol, TypeAlias, Union, overload

from ._exceptions import ConfigurationError, CSVSourceError, CSVValidationError

__all__ = [
    "CSVSource",
    "HospitalRow",
    "IssueCode",
    "ValidationIssue",
    "ValidationReport",
    "validate_csv",
]

logger = logging.getLogger("hospital_bulk.validation")

#: Bytes read from the source at a time.
CHUNK_SIZE = 64 * 1024

_MIN_LINE_CAP = 1 << 20
_U32 = (1 << 32) - 1

FormulaPolicy = Literal["reject", "neutralize"]


class BinaryReadable(Protocol):
    """Anything with a ``read(n)`` returning bytes: a file opened with ``"rb"``, `io.BytesIO`."""

    def read(self, size: int, /) -> bytes | None:  # pragma: no cover - protocol
        """Read and return up to ``size`` bytes; ``b""`` at the end of the data."""
        ...


CSVSource: TypeAlias = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, BinaryReadable]


class IssueCode(str, enum.Enum):
    """The stable, machine-readable code of a `ValidationIssue`.

    Each member is also a plain string (``IssueCode.MISSING_VALUE == "missing_value"``).
    The codes marked *warning* never make a file fail; all others are errors.

    Attributes:
        EMPTY_FILE: The file holds no record (it is empty or has only blank lines).
        NO_DATA_ROWS: The file has a header but no data row.
        MISSING_COLUMN: A required column (``name`` or ``address``) is not in the header.
        UNKNOWN_COLUMN: The header names a column that is not ``name``, ``address`` or
            ``phone`` (an empty header cell is reported by its position).
        DUPLICATE_COLUMN: A column appears more than once in the header.
        DELIMITER_HINT: *Warning.* The header looks separated by semicolons, tabs or pipes.
        INVALID_ENCODING: A line holds bytes that are not valid in the file's encoding.
        NUL_BYTE: A line holds a NUL byte.
        LINE_TOO_LONG: A physical line is longer than the line cap; it was skipped.
        RECORD_TOO_LONG: A record keeps a quoted field open for longer than the line cap.
        WRONG_FIELD_COUNT: A row has more or fewer fields than the header.
        UNTERMINATED_QUOTE: A quoted field is never closed before the end of the file.
        BAD_QUOTING: A closing quote is followed by something other than a comma or the end
            of the line (``"a"b``).
        FIELD_TOO_LONG: A value is longer than ``max_field_length`` characters (or than the
            CSV reader's own field limit).
        MALFORMED_ROW: Any other problem the CSV reader found in a row.
        MISSING_VALUE: A required value (``name`` or ``address``) is empty.
        FORMULA_INJECTION: A value starts with a character spreadsheet programs run as a
            formula.
        FORMULA_NEUTRALIZED: *Warning.* Such a value was kept behind a leading ``'``.
        DUPLICATE_ROW: *Warning.* The row is identical to an earlier row; both will be created.
        FILE_TOO_LARGE: The file is larger than ``max_bytes``; reading stopped there.
        TOO_MANY_ROWS: The file has more data rows than ``max_rows``; reading stopped there.
        TOO_MANY_ERRORS: More errors than ``max_errors`` were found; the rest are not listed.
        TOO_MANY_WARNINGS: *Warning.* More warnings than ``max_errors``; the rest are not listed.
    """

    EMPTY_FILE = "empty_file"
    NO_DATA_ROWS = "no_data_rows"
    MISSING_COLUMN = "missing_column"
    UNKNOWN_COLUMN = "unknown_column"
    DUPLICATE_COLUMN = "duplicate_column"
    DELIMITER_HINT = "delimiter_hint"
    INVALID_ENCODING = "invalid_encoding"
    NUL_BYTE = "nul_byte"
    LINE_TOO_LONG = "line_too_long"
    RECORD_TOO_LONG = "record_too_long"
    WRONG_FIELD_COUNT = "wrong_field_count"
    UNTERMINATED_QUOTE = "unterminated_quote"
    BAD_QUOTING = "bad_quoting"
    FIELD_TOO_LONG = "field_too_long"
    MALFORMED_ROW = "malformed_row"
    MISSING_VALUE = "missing_value"
    FORMULA_INJECTION = "formula_injection"
    FORMULA_NEUTRALIZED = "formula_neutralized"
    DUPLICATE_ROW = "duplicate_row"
    FILE_TOO_LARGE = "file_too_large"
    TOO_MANY_ROWS = "too_many_rows"
    TOO_MANY_ERRORS = "too_many_errors"
    TOO_MANY_WARNINGS = "too_many_warnings"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True, slots=True)
class ValidationIssue:
    """One problem found in a CSV file.

    Attributes:
        code: The stable machine-readable code, an `IssueCode` (equal to its string value).
        row: The data-row number (1 = first data row; blank lines do not count), or ``None``
            for a problem of the header or of the whole file.
        line: The physical line (1-based) where the record starts, or ``None`` for a problem
            of the whole file.
        column: The normalised column name (e.g. ``"name"``), or ``None`` when the problem is
            not about one column.
        message: A human explanation, saying what to fix.
    """

    code: str
    row: int | None
    line: int | None
    column: str | None
    message: str

    def __str__(self) -> str:
        if self.row is not None:
            where = f"row {self.row}"
            if self.line is not None:
                where += f" (line {self.line})"
        elif self.line is not None:
            where = f"line {self.line}"
        else:
            where = ""
        if self.column is not None:
            where = f"{where}, column {self.column}" if where else f"column {self.column}"
        text = f"{self.message} [{self.code!s}]"
        return f"{where}: {text}" if where else text


@dataclass(frozen=True, slots=True)
class HospitalRow:
    """One valid data row of a CSV file, trimmed and ready to be created upstream.

    Attributes:
        row: The data-row number (1 = first data row). Identical rows stay distinct by it.
        line: The physical line where the row starts.
        name: The hospital's name (never empty).
        address: The hospital's address (never empty).
        phone: The phone number, or ``None`` when the cell is empty or there is no phone column.
    """

    row: int
    line: int
    name: str
    address: str
    phone: str | None


class _RowStore(Sequence[HospitalRow]):
    """The valid rows of a file, stored compactly; `HospitalRow` objects are built on access.

    ``_data`` holds the UTF-8 records back to back and ``_ends`` the end offset of each. Row and
    line numbers are runs: kept row ``i`` of the run starting at kept index ``_run_start[r]``
    has row ``_run_row[r] + i - _run_start[r]`` and line ``_run_line[r] + i - _run_start[r]``.
    `_KeptRows` fills it.
    """

    __slots__ = ("_data", "_ends", "_run_line", "_run_row", "_run_start")

    def __init__(self) -> None:
        self._data = bytearray()
        self._ends = array("I")
        self._run_start = array("Q")
        self._run_row = array("Q")
        self._run_line = array("Q")

    def _record(self, index: int) -> bytearray:
        ends = self._ends
        return self._data[ends[index - 1] if index else 0 : ends[index]]

    def _row_number(self, index: int) -> int:
        run = bisect_right(self._run_start, index) - 1
        return self._run_row[run] + index - self._run_start[run]

    def _build(self, index: int, row: int, line: int, start: int) -> HospitalRow:
        raw = self._data[start : self._ends[index]].decode("utf-8", "surrogatepass")
        name, address, phone = raw.split("\x00")
        return HospitalRow(row, line, name, address, phone or None)

    def __len__(self) -> int:
        return len(self._ends)

    @overload
    def __getitem__(self, index: int) -> HospitalRow: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[HospitalRow]: ...

    def __getitem__(self, index: int | slice) -> HospitalRow | Sequence[HospitalRow]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        size = len(self._ends)
        if index < 0:
            index += size
        if not 0 <= index < size:
            raise IndexError("row index out of range")
        run = bisect_right(self._run_start, index) - 1
        offset = index - self._run_start[run]
        start = self._ends[index - 1] if index else 0
        return self._build(index, self._run_row[run] + offset, self._run_line[run] + offset, start)

    def __iter__(self) -> Iterator[HospitalRow]:
        run_start, run_row, run_line = self._run_start, self._run_row, self._run_line
        runs = len(run_start)
        run = -1
        next_run = run_start[0] if runs else -1
        base = row0 = line0 = 0
        start = 0
        for index, end in enumerate(self._ends):
            if index == next_run:
                run += 1
                base, row0, line0 = index, run_row[run], run_line[run]
                next_run = run_start[run + 1] if run + 1 < runs else -1
            yield self._build(index, row0 + index - base, line0 + index - base, start)
            start = end

    def __repr__(self) -> str:
        return f"<{len(self)} hospital rows>"


_fingerprint: Callable[[str], int]
if sys.hash_info.width == 64 and sys.hash_info.algorithm.startswith("siphash"):
    # A keyed 64-bit hash, as a signed integer; the builtin itself, with no call in between.
    _fingerprint = hash
else:  # pragma: no cover - platforms with a 32-bit or unkeyed str hash
    _BLAKE_KEY = secrets.token_bytes(16)

    def _blake_fingerprint(text: str) -> int:
        record = text.encode("utf-8", "surrogatepass")
        digest = hashlib.blake2b(record, digest_size=8, key=_BLAKE_KEY).digest()
        return int.from_bytes(digest, "little", signed=True)

    _fingerprint = _blake_fingerprint


def _same(count: int) -> int:
    """The default projection of a `_FingerprintTable`: no growth expected beyond what is."""
    return count


def _record_text(name: str, address: str, phone: str) -> str:
    """A valid row as one string: its values joined by NUL, which no accepted value holds."""
    return f"{name}\x00{address}\x00{phone}"


class _FingerprintTable:
    """An open-addressing table (linear probing) of references into ``_fps``.

    ``_fps[0]`` is a placeholder, so that a reference (never 0, which marks an empty slot) is
    the index of its fingerprint in ``_fps``. An entry's home slot is its fingerprint masked by
    ``_mask``; the table is doubled when half full.
    """

    __slots__ = ("_fps", "_limit", "_mask", "_table", "project", "store")

    def __init__(self, fps: array[int]) -> None:
        size = 1 << 12
        self._table = array("I", [0]) * size
        self._mask = size - 1
        self._limit = self._mask >> 1  # the most entries before the table grows
        self._fps = fps
        fps.append(0)
        #: The kept rows (empty unless rows are kept).
        self.store = _RowStore()
        #: Given the entries so far, how many the table is likely to end with.
        self.project: Callable[[int], int] = _same

    def _widen(self, slot: int, ref: int) -> None:
        """``_table[slot] = ref`` for a reference beyond 2**32: the table takes 64-bit items."""
        self._table = array("Q", self._table)
        self._table[slot] = ref

    def _grow(self) -> None:
        """Double the table, or grow it up to 8 times at once if `project` expects as much.

        Moving every entry to the new table is most of the cost of a growth: growing by more
        at once when the rest of the file promises as many rows saves most of those moves.
        """
        old = self._table
        size = len(old) * 2
        wanted = 2 * self.project(self._limit + 1)  # at most half full at the end
        while size < wanted and size < len(old) * 8:
            size *= 2
        mask = size - 1
        table = array(old.typecode, [0]) * size
        fps = self._fps
        for ref in filter(None, old):
            slot = fps[ref] & mask
            while table[slot]:
                slot = (slot + 1) & mask
            table[slot] = ref
        self._table = table
        self._mask = mask
        self._limit = mask >> 1


class _KeptRows(_FingerprintTable):
    """Keeps the valid rows in a `_RowStore` and finds rows identical to an earlier one.

    ``_fps`` holds the low 32 bits of the fingerprint of every stored row (kept row ``i`` at
    ``_fps[i + 1]``); the table refers to the first of identical rows only. A fingerprint match
    is confirmed against the stored record, so a duplicate is never wrong.
    """

    __slots__ = ("_data", "_ends", "_line_off", "_row_off")

    def __init__(self) -> None:
        super().__init__(array("I"))
        self._data = self.store._data
        self._ends = self.store._ends
        # row - ref and line - ref of the current run of rows; -1 before the first row.
        self._row_off = self._line_off = -1

    def add(self, row: int, line: int, text: str) -> int:
        """Keep a valid row (its `_record_text`); return an identical earlier row's number, or 0."""
        fp = _fingerprint(text) & _U32
        record = text.encode("utf-8", "surrogatepass")
        table, mask, fps = self._table, self._mask, self._fps
        ref = len(fps)  # this row's reference: its index in the store, plus one
        slot = fp & mask
        other = table[slot]
        earlier = 0
        while other:
            if fps[other] == fp and self.store._record(other - 1) == record:
                earlier = self.store._row_number(other - 1)
                break
            slot = (slot + 1) & mask
            other = table[slot]
        fps.append(fp)
        if not earlier:
            try:
                table[slot] = ref
            except OverflowError:  # more than 2**32 rows
                self._widen(slot, ref)
            if ref > self._limit:  # half full, counting duplicates too
                self._grow()
        if row - ref != self._row_off or line - ref != self._line_off:
            self._new_run(ref, row, line)
        data = self._data
        data += record
        try:
            self._ends.append(len(data))
        except OverflowError:  # more than 4 GiB of row data
            self._ends = self.store._ends = array("Q", self._ends)
            self._ends.append(len(data))
        return earlier

    def _new_run(self, ref: int, row: int, line: int) -> None:
        store = self.store
        store._run_start.append(ref - 1)
        store._run_row.append(row)
        store._run_line.append(line)
        self._row_off = row - ref
        self._line_off = line - ref


class _Fingerprints(_FingerprintTable):
    """Finds rows identical to an earlier one without keeping rows (``keep_rows=False``).

    ``_fps`` holds the full 64-bit fingerprint of each distinct row and ``_rows`` its first row
    number, both after a placeholder; a table reference is an index into both.
    """

    __slots__ = ("_rows",)

    def __init__(self) -> None:
        super().__init__(array("q"))
        self._rows = array("I", [0])

    def add(self, row: int, line: int, text: str) -> int:
        """Note a valid row (its `_record_text`); return an identical earlier row's number, or 0."""
        fp = _fingerprint(text)
        table, mask, fps = self._table, self._mask, self._fps
        slot = fp & mask
        other = table[slot]
        while other:
            if fps[other] == fp:
                return self._rows[other]
            slot = (slot + 1) & mask
            other = table[slot]
        ref = len(fps)
        fps.append(fp)
        try:
            self._rows.append(row)
        except OverflowError:  # a row number beyond 2**32
            self._rows = array("Q", self._rows)
            self._rows.append(row)
        try:
            table[slot] = ref
        except OverflowError:  # more than 2**32 rows
            self._widen(slot, ref)
        if ref > self._limit:  # half full
            self._grow()
        return 0


class _IssueList:
    """Issues of one kind (errors or warnings), listed up to a cap and counted beyond it."""

    __slots__ = ("items", "kind", "limit", "overflow", "truncated")

    def __init__(self, limit: int | None, overflow: IssueCode, kind: str) -> None:
        self.items: list[ValidationIssue] = []
        self.limit = limit
        self.overflow = overflow
        self.kind = kind
        self.truncated = 0

    def add(
        self,
        code: IssueCode,
        row: int | None,
        line: int | None,
        column: str | None,
        message: str,
        *,
        always: bool = False,
    ) -> None:
        if always or self.limit is None or len(self.items) < self.limit:
            self.items.append(ValidationIssue(code, row, line, column, message))
        else:
            self.truncated += 1

    def finish(self) -> list[ValidationIssue]:
        if self.truncated:
            self.items.append(
                ValidationIssue(
                    self.overflow,
                    None,
                    None,
                    None,
                    f"{self.truncated} more {self.kind} not listed "
                    f"(only the first {self.limit} are; raise max_errors to see them all)",
                )
            )
        return self.items


@dataclass(frozen=True, eq=False, repr=False)
class ValidationReport:
    """The result of `validate_csv`: every problem found, and the valid rows.

    Attributes:
        errors: The errors, in the order found. Any error means the file must not be loaded.
        warnings: The warnings (duplicate rows, neutralised formulas, a delimiter hint).
        rows: The valid rows in file order (empty when ``keep_rows=False``, and when the
            header is unusable). Built on access from a compact store.
        total_rows: The data rows seen (blank lines and all-blank records excluded).
        invalid_rows: The data rows not accepted: rows with an error, and every row when the
            header lacks ``name`` or ``address``. With ``keep_rows=True``,
            ``len(rows) + invalid_rows == total_rows``.
        truncated_errors: The errors not listed because of ``max_errors``.
        truncated_warnings: The warnings not listed because of ``max_errors``.
        bytes_read: The bytes read from the source (all of it, unless a limit stopped reading).
        sha256: The hex SHA-256 digest of the bytes read: the file's fingerprint.
        encoding: How the file was decoded: ``"utf-8"``, ``"utf-8-sig"`` (UTF-8 with a byte
            order mark), ``"utf-16"`` or ``"utf-32"`` (with a byte order mark, either order).
        columns: The header's column names, normalised (trimmed, lower case), in file order.
    """

    errors: list[ValidationIssue]
    warnings: list[ValidationIssue]
    rows: Sequence[HospitalRow]
    total_rows: int
    invalid_rows: int
    truncated_errors: int
    truncated_warnings: int
    bytes_read: int
    sha256: str
    encoding: str
    columns: tuple[str, ...]

    @property
    def ok(self) -> bool:
        """Whether the file has no error (warnings allowed): it may be loaded."""
        return not self.errors

    def raise_for_errors(self) -> None:
        """Raise `CSVValidationError` carrying this report if the file has any error.

        Raises:
            CSVValidationError: The file has at least one error.
        """
        if self.errors:
            raise CSVValidationError(self)

    def __repr__(self) -> str:
        return (
            f"ValidationReport(ok={self.ok}, errors={len(self.errors)}, "
            f"warnings={len(self.warnings)}, total_rows={self.total_rows}, "
            f"invalid_rows={self.invalid_rows}, rows={len(self.rows)}, "
            f"encoding={self.encoding!r}, sha256={self.sha256[:12]!r}...)"
        )

    def _repr_html_(self) -> str:
        """The report as HTML, for Jupyter: a summary, then the errors and the warnings.

        Each issue shows its code, row, line, column and message; each table shows at most
        200 issues and counts the rest. Every text from the file is escaped.
        """
        from ._notebook import validation_report_html

        return validation_report_html(self)

    def to_pandas(self) -> Any:
        """Return the errors and warnings as a pandas DataFrame, errors first.

        Columns: ``severity`` (``"error"`` or ``"warning"``), ``code``, ``row`` and ``line``
        (nullable integers), ``column`` and ``message``.

        Returns:
            A `pandas.DataFrame`.

        Raises:
            ImportError: pandas is not installed (``pip install pandas``, or the
                ``notebook`` extra).
        """
        from ._notebook import validation_report_frame

        return validation_report_frame(self)


# --- decoding and line splitting ------------------------------------------------------------

_Decoder = Callable[[bytes | memoryview, str, bool], tuple[str, int]]

# Characters str.splitlines() breaks on that CSV does not treat as line ends.
_OTHER_BREAKS = "\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"
_LINE_RE = re.compile(r"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+")
_EOL_RE = re.compile(r"[\r\n]")
_SURROGATE_RE = re.compile("[\ud800-\udfff]")
# Stands for bytes that do not decode; no strict decoder ever produces a lone surrogate.
_UNDECODABLE = "\udcff"
_REPLACEMENT = "\ufffd"


def _split_lines(text: str) -> list[str]:
    """Split text into physical lines, keeping their ends (only LF, CR LF and CR end one)."""
    for char in _OTHER_BREAKS:
        if char in text:
            return _LINE_RE.findall(text)
    return text.splitlines(True)


def _sniff(head: bytes) -> tuple[_Decoder, str, int]:
    """Pick the decoder from a byte order mark: (decode function, encoding name, BOM length)."""
    if head.startswith(codecs.BOM_UTF32_LE):
        return codecs.utf_32_le_decode, "utf-32", 4
    if head.startswith(codecs.BOM_UTF32_BE):
        return codecs.utf_32_be_decode, "utf-32", 4
    if head.startswith(codecs.BOM_UTF8):
        return codecs.utf_8_decode, "utf-8-sig", 3
    if head.startswith(codecs.BOM_UTF16_LE):
        return codecs.utf_16_le_decode, "utf-16", 2
    if head.startswith(codecs.BOM_UTF16_BE):
        return codecs.utf_16_be_decode, "utf-16", 2
    return codecs.utf_8_decode, "utf-8", 0


def _decode(decoder: _Decoder, data: bytes, final: bool) -> tuple[str, int, bool]:
    """Decode as much of data as possible: (text, bytes used, whether some bytes were bad).

    Bytes that do not decode become lone surrogates, which strict decoding never produces.
    """
    try:
        text, used = decoder(data, "strict", final)
    except UnicodeDecodeError:
        pass
    else:
        return text, used, False
    if decoder is codecs.utf_8_decode:
        # Invalid UTF-8 is always made of bytes >= 0x80, which surrogateescape maps to
        # U+DC80..U+DCFF.
        text, used = decoder(data, "surrogateescape", final)
        return text, used, True
    parts: list[str] = []
    view = memoryview(data)
    pos = 0
    while True:
        try:
            text, used = decoder(view[pos:], "strict", final)
        except UnicodeDecodeError as exc:
            good, _ = decoder(view[pos : pos + exc.start], "strict", True)
            parts.append(good)
            parts.append(_UNDECODABLE)
            pos += max(exc.end, exc.start + 1)
        else:
            parts.append(text)
            pos += used
            return "".join(parts), pos, True


# --- the source -------------------------------------------------------------------------------


class _Source:
    """A readable view of any accepted source, raising only `CSVSourceError`."""

    def __init__(self, source: object) -> None:
        self._close: Callable[[], None] | None = None
        self._read: Callable[[int], object] | None = None
        self._view: memoryview | None = None
        self._pos = 0
        #: The bytes there are to read, when known (a regular file, bytes); a hint only.
        self.size: int | None = None
        if isinstance(source, (str, os.PathLike)):
            handle = self._open_path(source)
            self.description = repr(handle.name)
            self._read = handle.read
            self._close = handle.close
            try:
                status = os.fstat(handle.fileno())
            except OSError:  # pragma: no cover - an open file that cannot be stat'ed
                pass
            else:
                if stat.S_ISREG(status.st_mode):
                    self.size = status.st_size
        elif isinstance(source, (bytes, bytearray, memoryview)):
            try:
                view = memoryview(source)
                try:
                    view = view.cast("B")
                except (TypeError, ValueError):  # not C-contiguous, or several dimensions
                    view = memoryview(view.tobytes())
            except ValueError as exc:  # a released memoryview
                raise CSVSourceError(
                    f"cannot read the CSV source: {exc}", source=type(source).__name__
                ) from exc
            self.description = f"<{type(source).__name__} of {view.nbytes} bytes>"
            self._view = view
            self.size = view.nbytes
            self._close = view.release
        elif isinstance(source, io.TextIOBase):
            raise CSVSourceError(
                "the CSV source is a text stream; open the file in binary mode "
                "(open(path, 'rb')) or pass its path",
                source=type(source).__name__,
            )
        elif callable(read := getattr(source, "read", None)):
            self.description = f"<{type(source).__name__}>"
            self._read = read
        else:
            raise CSVSourceError(
                f"cannot read a CSV file from a {type(source).__name__}: pass a path, bytes, "
                "or a file opened in binary mode",
                source=type(source).__name__,
            )

    @staticmethod
    def _open_path(source: str | os.PathLike[str]) -> io.BufferedReader:
        try:
            path = os.fspath(source)
        except TypeError as exc:  # __fspath__ returned something else than str or bytes
            raise CSVSourceError(f"cannot use {source!r} as a path: {exc}") from exc
        try:
            return open(path, "rb")
        except (OSError, ValueError) as exc:
            hint = ""
            if isinstance(path, str) and "\n" in path:
                hint = " (a str is a path; pass CSV content as bytes)"
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise CSVSourceError(
                f"cannot open the CSV file {path!r}: {reason}{hint}", source=str(path)
            ) from exc

    def read(self, size: int) -> bytes:
        """Read up to size bytes; b"" at the end."""
        view = self._view
        if view is not None:
            chunk = view[self._pos : self._pos + size].tobytes()
            self._pos += len(chunk)
            return chunk
        assert self._read is not None
        try:
            data = self._read(size)
        except Exception as exc:
            raise CSVSourceError(
                f"reading the CSV source {self.description} failed: {exc}",
                source=self.description,
            ) from exc
        if isinstance(data, bytes):
            return data
        if isinstance(data, (bytearray, memoryview)):
            return bytes(data)
        if isinstance(data, str):
            raise CSVSourceError(
                f"the CSV source {self.description} returned text, not bytes; open the file "
                "in binary mode (open(path, 'rb'))",
                source=self.description,
            )
        if data is None:
            raise CSVSourceError(
                f"the CSV source {self.description} has no data ready (a non-blocking "
                "stream); pass a blocking binary stream",
                source=self.description,
            )
        raise CSVSourceError(
            f"the CSV source {self.description} returned {type(data).__name__} from read(); "
            "expected bytes",
            source=self.description,
        )

    def close(self) -> None:
        """Close what this object opened (never the caller's own stream)."""
        close, self._close = self._close, None
        if close is not None:
            try:
                close()
            except Exception:  # pragma: no cover - closing a read-only file
                logger.debug("closing the CSV source failed", exc_info=True)


class _CSVReader(Protocol):
    line_num: int

    def __iter__(self) -> Iterator[list[str]]: ...  # pragma: no cover - protocol

    def __next__(self) -> list[str]: ...  # pragma: no cover - protocol


# --- the validator ----------------------------------------------------------------------------

_KNOWN = ("name", "address", "phone")
_REQUIRED = ("name", "address")
_DELIMITERS = ((";", "semicolon"), ("\t", "tab"), ("|", "pipe"))
# Leading characters spreadsheet programs run as a formula.
_FORMULA_TEXT = "=@+"
_FORMULA_PHONE = "=@"  # a phone number legitimately starts with "+"
_TAB_CR = ("\t", "\r")
_FORMULA_NAMES = {"=": "'='", "@": "'@'", "+": "'+'", "\t": "a tab", "\r": "a carriage return"}


class _Validator:
    """One validation run; `validate_csv` is its public face."""

    def __init__(
        self,
        source: _Source,
        *,
        max_rows: int | None,
        max_bytes: int | None,
        max_field_length: int,
        max_errors: int | None,
        formula_policy: str,
        keep_rows: bool,
    ) -> None:
        self._source = source
        self._max_rows = max_rows
        self._max_bytes = max_bytes
        self._max_field_length = max_field_length
        self._neutralize = formula_policy == "neutralize"
        self._line_cap = max(_MIN_LINE_CAP, 8 * max_field_length + 1024)
        self._errors = _IssueList(max_errors, IssueCode.TOO_MANY_ERRORS, "errors")
        self._warnings = _IssueList(max_errors, IssueCode.TOO_MANY_WARNINGS, "warnings")
        self._sha = hashlib.sha256()
        self._bytes_read = 0
        self._encoding = "utf-8"
        self._stopped = False
        # Problems found while cutting lines, waiting for the record they belong to:
        # (line, code, message, whether the line's content was lost).
        self._pending: list[tuple[int, IssueCode, str, bool]] = []
        # The physical line where the last record returned by the csv reader ended.
        self._shared = [0]
        self._rows: _KeptRows | _Fingerprints = _KeptRows() if keep_rows else _Fingerprints()
        self._rows.project = self._project_rows
        self._invalid = 0
        self._total = 0
        self._columns: tuple[str, ...] = ()
        self._ncols = 0
        self._checks_on = False
        self._index_name = self._index_address = 0
        self._index_phone = -1

    def _project_rows(self, count: int) -> int:
        """How many valid rows the file will have, from `count` so far and the bytes read."""
        size = self._source.size
        if size is None or not self._bytes_read:
            return count
        if self._max_bytes is not None:
            size = min(size, self._max_bytes)
        projected = count * size // self._bytes_read
        if self._max_rows is not None:
            projected = min(projected, self._max_rows)
        return max(projected, count)

    # -- reading ----------------------------------------------------------------------------

    def _raw_chunks(self) -> Iterator[bytes]:
        read = self._source.read
        limit = self._max_bytes
        sha = self._sha
        while True:
            size = CHUNK_SIZE if limit is None else min(CHUNK_SIZE, limit - self._bytes_read + 1)
            data = read(size)
            if not data:
                return
            self._bytes_read += len(data)
            sha.update(data)
            if limit is not None and self._bytes_read > limit:
                keep = len(data) - (self._bytes_read - limit)
                self._stop(
                    IssueCode.FILE_TOO_LARGE,
                    None,
                    f"the file is larger than max_bytes ({limit} bytes); reading stopped there",
                )
                if keep > 0:
                    yield data[:keep]
                return
            yield data

    def _text_chunks(self) -> Iterator[tuple[str, bool, bool, bool]]:
        """Yield (text, has NUL, has undecodable bytes, is the last chunk)."""
        raw = self._raw_chunks()
        head = b""
        for data in raw:
            head = head + data if head else data
            if len(head) >= 4:
                break
        decoder, self._encoding, bom = _sniff(head)
        buf = head[bom:]
        while True:
            more = next(raw, None)
            final = more is None
            if more is not None:
                buf = buf + more if buf else more
            if final and self._stopped:
                # Cut short by max_bytes: decode what is complete, drop the rest.
                text, _, bad = _decode(decoder, buf, False)
                if text:
                    yield text, "\x00" in text, bad, False
                return
            text, used, bad = _decode(decoder, buf, final)
            buf = buf[used:]
            if text or final:
                yield text, "\x00" in text, bad, final
            if final:
                return

    def _line_batches(self) -> Generator[list[str], None, None]:
        """Yield the physical lines of the file, each with its line end, in lists.

        The csv reader takes them one at a time through `itertools.chain`, so this generator
        resumes once a chunk, not once a line. A line that comes with a problem (pending
        until its record is read) is yielded in a list of its own, so that the problem is
        noted just before the reader takes that line.
        """
        cap = self._line_cap
        shared = self._shared
        pending = self._pending
        carry = ""  # the start of a line whose end has not been read yet
        carry_nul = carry_bad = False
        lineno = 0  # physical lines handed out so far
        skipping = False  # inside an over-long line, dropping its text
        skip_quotes = 0
        eat_lf = False  # an over-long line ended with "\r" at the end of a chunk
        open_chars = 0  # characters read while one record stayed open
        prev_len = 0
        for text, nul, bad, final in self._text_chunks():
            if eat_lf and text:
                eat_lf = False
                if text[0] == "\n":
                    text = text[1:]
            if skipping:
                match = _EOL_RE.search(text)
                if match is None:
                    skip_quotes += text.count('"')
                    if not final:
                        continue
                    text = ""
                else:
                    i = match.start()
                    skip_quotes += text.count('"', 0, i)
                    j = i + 1
                    if text[i] == "\r":
                        if j < len(text):
                            if text[j] == "\n":
                                j += 1
                        elif not final:
                            eat_lf = True
                    text = text[j:]
                skipping = False
                lineno += 1
                yield [self._skipped_line(lineno, skip_quotes)]
            if carry:
                text = carry + text
                nul = nul or carry_nul
                bad = bad or carry_bad
                carry = ""
            if not text:
                continue
            lines = _split_lines(text)
            if not final and lines[-1][-1] != "\n":
                carry = lines.pop()
                carry_nul, carry_bad = nul, bad
                if len(carry) > cap:
                    if carry[-1] == "\r":  # complete, but a "\n" may follow in the next chunk
                        lines.append(carry)
                        eat_lf = True
                    else:
                        skipping = True
                        skip_quotes = carry.count('"')
                    carry = ""
            if not lines:
                continue
            if lineno > shared[0]:  # a quoted field has stayed open since an earlier chunk
                open_chars += prev_len
                if open_chars > cap:
                    open_chars = 0
                    start = shared[0] + 1
                    pending.append(
                        (
                            start,
                            IssueCode.RECORD_TOO_LONG,
                            f"the record starting on line {start} runs past line {lineno + 1} "
                            f"and is longer than {cap} characters; a closing quote is "
                            "probably missing",
                            True,
                        )
                    )
                    lines[0] = _REPLACEMENT + '"\n'  # closes the open field and the record
            else:
                open_chars = 0
            prev_len = len(text)
            if nul or bad or len(text) > cap:
                for line in lines:
                    lineno += 1
                    if len(line) > cap:
                        yield [self._skipped_line(lineno, line.count('"'))]
                        continue
                    if nul and "\x00" in line:
                        pending.append((lineno, IssueCode.NUL_BYTE, self._nul_message(line), False))
                        line = line.replace("\x00", _REPLACEMENT)
                    if bad and _SURROGATE_RE.search(line):
                        pending.append(
                            (lineno, IssueCode.INVALID_ENCODING, self._encoding_message(), False)
                        )
                    yield [line]
            else:
                yield lines
                lineno += len(lines)

    def _skipped_line(self, lineno: int, quotes: int) -> str:
        """Report an over-long line and return a short stand-in keeping the quoting state."""
        self._pending.append(
            (
                lineno,
                IssueCode.LINE_TOO_LONG,
                f"line {lineno} is longer than {self._line_cap} characters; it was skipped",
                True,
            )
        )
        at_record_start = self._shared[0] == lineno - 1
        if quotes % 2 == 0:
            return _REPLACEMENT + "\n"
        # An odd number of quotes opens a field (at a record start) or closes the open one.
        return '"' + _REPLACEMENT + "\n" if at_record_start else _REPLACEMENT + '"\n'

    def _nul_message(self, line: str) -> str:
        message = "the line contains a NUL byte, which is not allowed in a CSV file"
        if self._encoding == "utf-8" and line.count("\x00") * 3 >= len(line):
            message += "; the file looks like UTF-16 without a byte order mark: save it as UTF-8"
        return message

    def _encoding_message(self) -> str:
        if self._encoding in ("utf-8", "utf-8-sig"):
            return (
                "the line contains bytes that are not valid UTF-8; save the file as UTF-8 "
                "(it may be in Windows-1252 or Latin-1)"
            )
        return f"the line contains bytes that are not valid {self._encoding.upper()}"

    # -- issues -----------------------------------------------------------------------------

    def _stop(self, code: IssueCode, line: int | None, message: str) -> None:
        self._stopped = True
        self._errors.add(code, None, line, None, message, always=True)

    def _attach_pending(self, row: int | None) -> bool:
        """Report the line problems of the record just read; return whether content was lost."""
        lost = False
        add = self._errors.add
        for line, code, message, content_lost in self._pending:
            add(code, row, line, None, message)
            lost = lost or content_lost
        self._pending.clear()
        return lost

    # -- header -----------------------------------------------------------------------------

    def _read_header(self, fields: list[str], line: int) -> None:
        self._attach_pending(None)
        add = self._errors.add
        names = [cell.replace("\ufeff", "").strip().lower() for cell in fields]
        self._columns = tuple(names)
        self._ncols = len(names)
        positions: dict[str, list[int]] = {name: [] for name in _KNOWN}
        for index, name in enumerate(names):
            if name in positions:
                positions[name].append(index)
            elif not name:
                add(
                    IssueCode.UNKNOWN_COLUMN,
                    None,
                    line,
                    None,
                    f"column {index + 1} of the header has no name; "
                    "allowed columns are name, address and phone",
                )
            else:
                add(
                    IssueCode.UNKNOWN_COLUMN,
                    None,
                    line,
                    name,
                    f"unknown column {name!r} (column {index + 1}); "
                    "allowed columns are name, address and phone",
                )
        for name in _KNOWN:
            found = positions[name]
            if len(found) > 1:
                where = ", ".join(str(i + 1) for i in found)
                add(
                    IssueCode.DUPLICATE_COLUMN,
                    None,
                    line,
                    name,
                    f"column {name!r} appears {len(found)} times (columns {where})",
                )
        for name in _REQUIRED:
            if not positions[name]:
                shown = ", ".join(repr(n) for n in names) or "none"
                add(
                    IssueCode.MISSING_COLUMN,
                    None,
                    line,
                    name,
                    f"the header has no {name!r} column (columns found: {shown})",
                )
        for separator, label in _DELIMITERS:
            if any(
                len({part.strip().strip('"').lower() for part in cell.split(separator)} & {*_KNOWN})
                >= 2
                for cell in fields
                if separator in cell
            ):
                self._warnings.add(
                    IssueCode.DELIMITER_HINT,
                    None,
                    line,
                    None,
                    f"the file looks {label}-separated; save it as comma-separated (CSV)",
                )
                break
        self._checks_on = len(positions["name"]) == 1 and len(positions["address"]) == 1
        self._index_name = positions["name"][0] if positions["name"] else 0
        self._index_address = positions["address"][0] if positions["address"] else 0
        self._index_phone = positions["phone"][0] if positions["phone"] else -1

    # -- rows -------------------------------------------------------------------------------

    def _check_value(
        self, row: int, line: int, column: str, raw: str, value: str, formula: str
    ) -> str | None:
        """Check one trimmed value; return it (maybe neutralised), or None if invalid."""
        if not value:
            if column == "phone":
                return value
            self._errors.add(IssueCode.MISSING_VALUE, row, line, column, f"{column} is empty")
            return None
        limit = self._max_field_length
        if len(value) > limit:
            self._errors.add(
                IssueCode.FIELD_TOO_LONG,
                row,
                line,
                column,
                f"{column} is {len(value)} characters long; the limit is {limit}",
            )
            return None
        first = value[0]
        hazard = first if first in formula else raw.lstrip(" ")[:1]
        if hazard and (hazard in formula or hazard in _TAB_CR):
            if not self._neutralize:
                self._errors.add(
                    IssueCode.FORMULA_INJECTION,
                    row,
                    line,
                    column,
                    f"{column} starts with {_FORMULA_NAMES[hazard]}, which spreadsheet "
                    "programs run as a formula; remove it, or validate with "
                    "formula_policy='neutralize'",
                )
                return None
            if first in formula:
                self._warnings.add(
                    IssueCode.FORMULA_NEUTRALIZED,
                    row,
                    line,
                    column,
                    f"{column} starts with {_FORMULA_NAMES[first]}; it was prefixed with ' "
                    "so that spreadsheet programs do not run it as a formula",
                )
                return "'" + value
        return value

    def _slow_row(self, fields: list[str], row: int, line: int) -> None:
        """Check a row the fast path did not accept: report its problems, keep it if valid."""
        bad = bool(self._pending)
        lost = self._attach_pending(row) if bad else False
        ncols = self._ncols
        if lost:
            pass  # the record's text is gone: nothing more to check
        elif ncols and len(fields) != ncols:
            hint = ""
            if len(fields) > ncols:
                hint = "; a value containing a comma must be in double quotes"
            self._errors.add(
                IssueCode.WRONG_FIELD_COUNT,
                row,
                line,
                None,
                f"expected {ncols} fields, found {len(fields)}{hint}",
            )
            bad = True
        elif self._checks_on and not lost:
            raw_name = fields[self._index_name]
            raw_address = fields[self._index_address]
            raw_phone = fields[self._index_phone] if self._index_phone >= 0 else ""
            name = self._check_value(row, line, "name", raw_name, raw_name.strip(), _FORMULA_TEXT)
            address = self._check_value(
                row, line, "address", raw_address, raw_address.strip(), _FORMULA_TEXT
            )
            phone = self._check_value(
                row, line, "phone", raw_phone, raw_phone.strip(), _FORMULA_PHONE
            )
            if name is not None and address is not None and phone is not None and not bad:
                self._accept(row, line, name, address, phone)
                return
            bad = True
        if bad or not self._checks_on:
            self._invalid += 1

    def _accept(self, row: int, line: int, name: str, address: str, phone: str) -> None:
        earlier = self._rows.add(row, line, _record_text(name, address, phone))
        if earlier:
            self._duplicate(row, line, earlier)

    def _duplicate(self, row: int, line: int, earlier: int) -> None:
        self._warnings.add(
            IssueCode.DUPLICATE_ROW,
            row,
            line,
            None,
            f"row {row} is identical to row {earlier}; both will be created",
        )

    def _csv_error(self, exc: csv.Error, row: int | None, line: int, end: int) -> None:
        text = str(exc)
        at = f" (detected on line {end})" if end != line else ""
        if "end of data" in text:
            code = IssueCode.UNTERMINATED_QUOTE
            message = (
                f"a quoted field starting on line {line} is never closed: "
                "a closing double quote is missing"
            )
        elif "field limit" in text:
            code = IssueCode.FIELD_TOO_LONG
            message = (
                f"a field is longer than {csv.field_size_limit()} characters, the CSV "
                f"reader's limit{at}; a closing double quote may be missing"
            )
        elif "expected after" in text:
            code = IssueCode.BAD_QUOTING
            message = (
                f"a closing double quote is followed by other characters{at}; put the whole "
                'value in double quotes and double any quote inside it ("")'
            )
        else:
            code = IssueCode.MALFORMED_ROW
            message = f"the row cannot be read as CSV: {text}{at}"
        self._attach_pending(row)
        self._errors.add(code, row, line, None, message)
        if row is not None:
            self._invalid += 1

    # -- the run ----------------------------------------------------------------------------

    def run(self) -> ValidationReport:
        batches = self._line_batches()
        try:
            self._run(csv.reader(chain.from_iterable(batches), strict=True))
        finally:
            batches.close()
            self._rows.project = _same  # no cycle: the table goes as soon as this run does
        return self._report()

    def _run(self, reader: _CSVReader) -> None:
        shared = self._shared
        prev_end = 0
        header_line = 0
        # The header: the first record that is not blank.
        while True:
            try:
                fields = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:
                end = reader.line_num
                header_line = prev_end + 1
                prev_end = shared[0] = end
                if not self._stopped:
                    self._csv_error(exc, None, header_line, end)
                break
            end = reader.line_num
            start = prev_end + 1
            prev_end = shared[0] = end
            if fields and "".join(fields).strip():
                header_line = start
                self._read_header(fields, start)
                break
        if not header_line:
            if not self._stopped:
                self._errors.add(
                    IssueCode.EMPTY_FILE,
                    None,
                    None,
                    None,
                    "the file is empty: expected a header line (name,address,phone) and rows",
                    always=True,
                )
            return

        # The rows. Everything on the fast path is inlined for speed but keeping the row (one
        # call); anything unusual goes to _slow_row.
        max_rows = self._max_rows if self._max_rows is not None else sys.maxsize
        ncols = self._ncols
        fast = self._checks_on
        extra = ncols > 3 or self._index_phone < 0
        i_name, i_address, i_phone = self._index_name, self._index_address, self._index_phone
        limit = self._max_field_length
        pending = self._pending
        slow_row = self._slow_row
        add = self._rows.add
        duplicate = self._duplicate
        formula = _FORMULA_TEXT
        formula_phone = _FORMULA_PHONE
        tab_cr = _TAB_CR
        row = 0
        stopped = False
        while not stopped:
            try:
                for fields in reader:
                    end = reader.line_num
                    start = prev_end + 1
                    prev_end = shared[0] = end
                    if fast and len(fields) == ncols:
                        raw_name = fields[i_name]
                        raw_address = fields[i_address]
                        name = raw_name.strip()
                        address = raw_address.strip()
                        if i_phone >= 0:
                            raw_phone = fields[i_phone]
                            phone = raw_phone.strip()
                        else:
                            raw_phone = phone = ""
                        if not (name or address or phone) and (
                            not extra or not "".join(fields).strip()
                        ):
                            continue  # blank
                        row += 1
                        if row > max_rows:
                            stopped = True
                            break
                        text = f"{name}\x00{address}\x00{phone}"  # _record_text, inlined
                        if (
                            pending
                            or not name
                            or not address
                            or len(text) > limit  # then one value may be too long
                            or name[0] in formula
                            or address[0] in formula
                            or (phone and phone[0] in formula_phone)
                            or (name is not raw_name and raw_name.lstrip(" ")[:1] in tab_cr)
                            or (
                                address is not raw_address and raw_address.lstrip(" ")[:1] in tab_cr
                            )
                            or (phone is not raw_phone and raw_phone.lstrip(" ")[:1] in tab_cr)
                        ):
                            slow_row(fields, row, start)
                        else:
                            earlier = add(row, start, text)
                            if earlier:
                                duplicate(row, start, earlier)
                        continue
                    if not fields or not "".join(fields).strip():
                        continue  # blank
                    row += 1
                    if row > max_rows:
                        stopped = True
                        break
                    slow_row(fields, row, start)
                else:
                    break
            except csv.Error as exc:
                end = reader.line_num
                start = prev_end + 1
                prev_end = shared[0] = end
                if self._stopped:
                    break
                row += 1
                if row > max_rows:
                    stopped = True
                    break
                self._csv_error(exc, row, start, end)
        if stopped:
            row -= 1
            self._stop(
                IssueCode.TOO_MANY_ROWS,
                start,
                f"the file has more than {self._max_rows} data rows (max_rows); "
                "reading stopped there",
            )
        self._total = row
        if self._pending:  # cut short in the middle of a record
            self._attach_pending(None)
        if row == 0 and not self._stopped and self._columns:
            self._errors.add(
                IssueCode.NO_DATA_ROWS,
                None,
                header_line,
                None,
                "the file has a header but no data rows",
                always=True,
            )

    def _report(self) -> ValidationReport:
        errors = self._errors.finish()
        warnings = self._warnings.finish()
        total = self._total
        rows: Sequence[HospitalRow] = self._rows.store
        report = ValidationReport(
            errors=errors,
            warnings=warnings,
            rows=rows,
            total_rows=total,
            invalid_rows=self._invalid if self._checks_on else total,
            truncated_errors=self._errors.truncated,
            truncated_warnings=self._warnings.truncated,
            bytes_read=self._bytes_read,
            sha256=self._sha.hexdigest(),
            encoding=self._encoding,
            columns=self._columns,
        )
        logger.debug(
            "validated %s: %d rows, %d invalid, %d errors, %d warnings, %d bytes, %s",
            self._source.description,
            report.total_rows,
            report.invalid_rows,
            len(errors),
            len(warnings),
            report.bytes_read,
            report.encoding,
        )
        return report


def _check_count(name: str, value: object, *, minimum: int, optional: bool) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        allowed = f"an integer >= {minimum}" + (" or None" if optional else "")
        raise ConfigurationError(f"{name} must be {allowed}, got {value!r}")


def validate_csv(
    source: CSVSource,
    *,
    max_rows: int | None = None,
    max_bytes: int | None = None,
    max_field_length: int = 1000,
    max_errors: int | None = 1000,
    formula_policy: FormulaPolicy = "reject",
    keep_rows: bool = True,
) -> ValidationReport:
    """Validate a CSV file of hospitals in one streaming pass.

    The file needs a header with ``name`` and ``address`` columns and optionally ``phone``
    (any order, any case, surrounding spaces ignored), then one hospital per row. Every problem
    is reported with its code, data-row number, physical line and column; the valid rows come
    back trimmed, in file order.

    Args:
        source: A path (`str` or `os.PathLike`), the file's content as `bytes`, `bytearray` or
            `memoryview`, or a binary file object (anything whose ``read(n)`` returns bytes).
            A file object is read from its current position and left open.
        max_rows: The most data rows allowed; more is an error and stops reading.
        max_bytes: The most bytes allowed; more is an error and stops reading.
        max_field_length: The longest value allowed, in characters (after trimming).
        max_errors: How many errors (and, separately, warnings) to list; the rest are
            counted. ``None`` lists them all.
        formula_policy: What to do with a value spreadsheet programs would run as a formula:
            ``"reject"`` it (an error), or ``"neutralize"`` it (keep it behind a leading
            ``'``, with a warning).
        keep_rows: Keep the valid rows in the report. ``False`` is a dry run: nothing is kept
            and memory stays small.

    Returns:
        The report: ``report.ok`` is true when the file has no error.

    Raises:
        CSVSourceError: The source cannot be opened or read, is a text stream, or is of an
            unsupported type.
        ConfigurationError: A setting has a wrong value.
    """
    _check_count("max_rows", max_rows, minimum=1, optional=True)
    _check_count("max_bytes", max_bytes, minimum=1, optional=True)
    _check_count("max_field_length", max_field_length, minimum=1, optional=False)
    _check_count("max_errors", max_errors, minimum=0, optional=True)
    if formula_policy not in ("reject", "neutralize"):
        raise ConfigurationError(
            f"formula_policy must be 'reject' or 'neutralize', got {formula_policy!r}"
        )
    if not isinstance(keep_rows, bool):
        raise ConfigurationError(f"keep_rows must be True or False, got {keep_rows!r}")
    reader = _Source(source)
    try:
        validator = _Validator(
            reader,
            max_rows=max_rows,
            max_bytes=max_bytes,
            max_field_length=max_field_length,
            max_errors=max_errors,
            formula_policy=formula_policy,
            keep_rows=keep_rows,
        )
        return validator.run()
    finally:
        reader.close()
