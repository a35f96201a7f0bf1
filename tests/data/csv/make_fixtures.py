"""Write the CSV fixture corpus used by tests/test_validation.py.

Run ``python tests/data/csv/make_fixtures.py`` after changing a fixture here; a test checks
that the stored files match this script. Each entry is the exact bytes of one file, so line
endings, byte order marks and invalid bytes are explicit.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

HEADER = "name,address,phone\n"


def _utf8(text: str) -> bytes:
    return text.encode("utf-8")


FIXTURES: dict[str, bytes] = {
    # Valid files.
    "valid.csv": _utf8(
        HEADER
        + "St Mary's Hospital,1 Main Street Springfield,+1 555 0100\n"
        + "General Hospital,2 Oak Avenue Riverton,\n"
        + '"Clinic, North","3 ""Old"" Road",555-0102\n'
    ),
    "bom_utf8.csv": b"\xef\xbb\xbf" + _utf8(HEADER + "Hôpital Saint-Éloi,1 rue de Paris,\n"),
    "utf16_le.csv": b"\xff\xfe"
    + (HEADER + "Hôpital Saint-Éloi,1 rue de Paris,+33 1 23\r\n").encode("utf-16-le"),
    "utf16_be.csv": b"\xfe\xff"
    + (HEADER + "Hôpital Saint-Éloi,1 rue de Paris,+33 1 23\r\n").encode("utf-16-be"),
    "utf32_le.csv": b"\xff\xfe\x00\x00"
    + (HEADER + "Krankenhaus Süd,Hauptstraße 1,\n").encode("utf-32-le"),
    "crlf.csv": b"name,address,phone\r\nA,1 Road,1\r\nB,2 Road,2\r\n",
    "cr_only.csv": b"name,address,phone\rA,1 Road,1\rB,2 Road,2\r",
    "mixed_endings.csv": b"name,address,phone\nA,1 Road,1\r\nB,2 Road,2\rC,3 Road,3",
    "header_variants.csv": _utf8(" PHONE , Address,NAME \n+44 20,1 High Street,Royal Infirmary\n"),
    "no_phone_column.csv": _utf8("Address,Name\n1 High Street,Royal Infirmary\n"),
    "blank_lines.csv": _utf8(
        "\n"
        + "  \n"
        + HEADER
        + "\n"
        + "A,1 Road,1\n"
        + "\r\n"
        + "   \t \n"
        + ",,\n"
        + ' ,"",  \n'
        + "B,2 Road,2\n"
        + "\n"
    ),
    "quoted_newline.csv": _utf8(
        HEADER + '"Multi\nLine Hospital","1 Road\r\nSecond line",1\n' + "Next,2 Road,2\n"
    ),
    "duplicates.csv": _utf8(
        HEADER
        + "A,1 Road,1\n"
        + "B,2 Road,\n"
        + " A , 1 Road , 1 \n"
        + "A,1 Road,2\n"
        + "B,2 Road,\n"
    ),
    # Files with errors.
    "latin1.csv": b"name,address,phone\nGood,1 Road,\nH\xf4pital Nord,2 Road,\nAlso good,3 Road,\n",
    "nul_byte.csv": b"name,address,phone\nGood,1 Road,\nBad\x00Name,2 Road,\nAlso good,3 Road,\n",
    "utf16_no_bom.csv": (HEADER + "A,1 Road,\n").encode("utf-16-le"),
    "header_problems.csv": _utf8("name,Name,email,,phone\nA,B,C,D,E\n"),
    "unknown_column.csv": _utf8("name,address,phone,email\nA,1 Road,1,a@example.org\n"),
    "semicolon.csv": _utf8("name;address;phone\nA;1 Road;1\n"),
    "tab.csv": _utf8("Name\tAddress\tPhone\nA\t1 Road\t1\n"),
    "pipe.csv": _utf8("name|address|phone\nA|1 Road|1\n"),
    "missing_values.csv": _utf8(
        HEADER + "   ,1 Road,1\n" + "B,\t,2\n" + '"",,\n' + "D,4 Road,   \n"
    ),
    "ragged.csv": _utf8(HEADER + "A,1 Road\n" + "B,2 Road,2,extra\n" + "C,3 Road,3\n"),
    "unterminated_quote.csv": _utf8(HEADER + "A,1 Road,1\n" + '"B,2 Road,2\n' + "C,3 Road,3\n"),
    "bad_quoting.csv": _utf8(HEADER + '"A"x,1 Road,1\n' + "B,2 Road,2\n"),
    "long_field.csv": _utf8(HEADER + "N" * 1001 + ",1 Road,1\n" + "B,2 Road,2\n"),
    "formula.csv": _utf8(
        HEADER
        + "=HYPERLINK(1),1 Road,1\n"
        + "Clinic,@SUM(A1),2\n"
        + "+Clinic,3 Road,+44 20 7946\n"
        + '"\tTabbed",4 Road,4\n'
        + "Clinic 5,5 Road,=1+1\n"
        + '"\rCR Clinic",6 Road,6\n'
        + "Safe,7 Road,@home\n"
        + "  Plain  ,8 Road,+1 555\n"
    ),
    "many_errors.csv": _utf8(
        HEADER + "".join(f",{i} Road,\n" for i in range(1, 13)) + "Good,13 Road,\n"
    ),
    "empty.csv": b"",
    "blank_only.csv": b"\n  \r\n\t\n",
    "header_only.csv": _utf8(HEADER),
}


def main() -> None:
    """Write every fixture next to this script."""
    for name, data in FIXTURES.items():
        (HERE / name).write_bytes(data)
    sys.stdout.write(f"wrote {len(FIXTURES)} fixtures to {HERE}\n")


if __name__ == "__main__":
    main()
