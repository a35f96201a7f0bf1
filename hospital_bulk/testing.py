"""A faithful fake of the Hospital Directory API, for your tests and benchmarks.

In process, with no sockets:

```python
fake = FakeDirectory(create_latency=0.05, seed=7)
async with httpx.AsyncClient(transport=fake.transport(), base_url="http://fake") as client:
    ...
assert fake.duplicates() == []
```

Served on loopback by uvicorn (``pip install "hospital-bulk[testing]"``):

```python
with FakeServer(create_latency=0.05) as server:
    ...  # point the code under test at server.url; inspect server.fake
```

Or from a shell, for other processes (``--help`` lists every option)::

    python -m hospital_bulk.testing --port 8000 --create-latency 5 --seed 1

The fake records every request (keeping the last ``max_log``, 100,000 by default) and never
deduplicates; inject faults with `Faults` (seeded random rates) or `FakeDirectory.inject` (a
deterministic script of `Fault` values). A served fake is also controlled over HTTP under
``/__fake__/``: ``GET state``, ``PUT faults`` (a `Faults` as JSON), ``POST inject`` (``{"fault",
"route", "times"}``), ``POST restart``, ``POST reset``.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Sequence

from ._exceptions import ConfigurationError
from ._fake import (
    FakeDirectory,
    FakeServer,
    Fault,
    Faults,
    RecordedRequest,
    StoredHospital,
    serve,
)

__all__ = [
    "FakeDirectory",
    "FakeServer",
    "Fault",
    "Faults",
    "RecordedRequest",
    "StoredHospital",
]


def _rate(text: str) -> tuple[int, float]:
    """Parse ``"COUNT/SECONDS"``, e.g. ``"30/60"``."""
    try:
        count, _, seconds = text.partition("/")
        return int(count), float(seconds or "60")
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected COUNT/SECONDS, e.g. 30/60, got {text!r}"
        ) from None


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hospital_bulk.testing",
        description="Serve a fake Hospital Directory API (uvicorn) for tests and benchmarks.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to bind (8000)")
    parser.add_argument(
        "--create-latency",
        type=float,
        default=5.0,
        help="seconds each create takes, as upstream (5.0)",
    )
    parser.add_argument("--seed", type=int, default=None, help="seed of the random faults")
    parser.add_argument("--no-rate-limits", action="store_true", help="disable every rate limit")
    for name, default in (("create", (30, 60.0)), ("other", (50, 60.0)), ("root", (100, 60.0))):
        parser.add_argument(
            f"--{name}-rate",
            type=_rate,
            metavar="N/SECONDS",
            default=default,
            help=f"COUNT/SECONDS ({default[0]}/{default[1]:g})",
        )
    parser.add_argument("--batch-cap", type=int, default=20, help="hospitals per batch (20)")
    parser.add_argument(
        "--max-hospitals", type=int, default=10_000, help="storage size, oldest dropped (10000)"
    )
    parser.add_argument(
        "--max-concurrent-creates", type=int, default=40, help="creates in parallel (40)"
    )
    parser.add_argument(
        "--max-log",
        type=int,
        default=100_000,
        metavar="N",
        help="requests the log keeps, oldest dropped (100000; 0 keeps every request)",
    )
    faults = parser.add_argument_group("faults (random, drawn from the seeded generator)")
    faults.add_argument("--latency-jitter", type=float, default=0.0, help="extra 0..N s per create")
    faults.add_argument("--error-rate", type=float, default=0.0, help="503 before commit")
    faults.add_argument(
        "--timeout-after-commit-rate", type=float, default=0.0, help="commit, then hang"
    )
    faults.add_argument(
        "--reset-after-commit-rate", type=float, default=0.0, help="commit, then reset"
    )
    faults.add_argument("--rate-limit-rate", type=float, default=0.0, help="spurious 429")
    faults.add_argument("--down", action="store_true", help="every request gets a 502")
    faults.add_argument(
        "--fault-routes",
        default=None,
        help="comma-separated route names random faults apply to (default: mutating routes)",
    )
    faults.add_argument(
        "--hang", type=float, default=30.0, help="seconds a timed-out request is held (30)"
    )
    parser.add_argument("--log-level", default="info", help="uvicorn log level (info)")
    parser.add_argument(
        "--http",
        choices=("auto", "h11", "httptools"),
        default="auto",
        help="uvicorn's HTTP parser (auto: httptools when installed, else h11; httptools "
        "costs the fake less CPU per request)",
    )
    return parser


def _missing_parser(http: str) -> str | None:
    """Why the HTTP parser asked for cannot be used, or ``None``."""
    if http == "httptools" and importlib.util.find_spec("httptools") is None:
        return "--http httptools needs httptools: pip install httptools"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the fake from the command line: ``python -m hospital_bulk.testing --help``.

    Args:
        argv: The arguments (``sys.argv[1:]`` when ``None``).

    Returns:
        The process exit status.
    """
    parser = _build_parser()
    args = parser.parse_args(argv)
    routes = None
    if args.fault_routes:
        routes = frozenset(name.strip() for name in args.fault_routes.split(",") if name.strip())
    limits = not args.no_rate_limits
    try:
        fake = _build_fake(args, routes, limits)
    except ConfigurationError as exc:
        parser.error(str(exc))
    if missing := _missing_parser(args.http):
        parser.error(missing)
    print(
        f"hospital_bulk fake upstream on http://{args.host}:{args.port} (seed {fake.seed})",
        file=sys.stderr,
    )
    serve(
        fake,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        http=args.http,
    )
    return 0


def _build_fake(
    args: argparse.Namespace, routes: frozenset[str] | None, limits: bool
) -> FakeDirectory:
    return FakeDirectory(
        create_latency=args.create_latency,
        create_rate=args.create_rate if limits else None,
        other_rate=args.other_rate if limits else None,
        root_rate=args.root_rate if limits else None,
        batch_cap=args.batch_cap,
        max_hospitals=args.max_hospitals,
        max_concurrent_creates=args.max_concurrent_creates,
        max_log=args.max_log or None,
        seed=args.seed,
        faults=Faults(
            latency_jitter=args.latency_jitter,
            error_rate=args.error_rate,
            timeout_after_commit_rate=args.timeout_after_commit_rate,
            reset_after_commit_rate=args.reset_after_commit_rate,
            rate_limit_rate=args.rate_limit_rate,
            down=args.down,
            routes=routes,
            hang=args.hang,
        ),
    )


if __name__ == "__main__":
    raise SystemExit(main())
