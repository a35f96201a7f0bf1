"""``python -m hospital_bulk``: the ``hospital-bulk`` command line (see `hospital_bulk.cli`)."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
