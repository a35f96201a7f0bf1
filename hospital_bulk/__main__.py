"""`python -m hospital_bulk [FILE.csv]`: the demo (see `hospital_bulk._demo`)."""

from ._demo import main

raise SystemExit(main())
