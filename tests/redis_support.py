"""Real Redis for the tests: find the one on this machine, or start one.

The tests use the server at ``REDIS_URL`` (default ``redis://127.0.0.1:6379``) in database
`TEST_DB`, a database of their own, and give every test a key prefix of its own that is
deleted key by key afterwards; they never flush a database. Where no server answers, a private
``redis-server`` is started on a free port (a fresh laptop); in CI (``CI=true``) a missing Redis
is a failure, never a skip.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit, urlunsplit

import redis

TEST_DB = 13
DEFAULT_URL = "redis://127.0.0.1:6379"


def database_url() -> str:
    """The URL of the tests' database on the configured server."""
    parts = urlsplit(os.environ.get("REDIS_URL", DEFAULT_URL))
    return urlunsplit((parts.scheme, parts.netloc, f"/{TEST_DB}", parts.query, ""))


def answers(url: str, timeout: float = 1.0) -> bool:
    """Whether a Redis server answers PING at `url`."""
    client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """A private ``redis-server`` on a free loopback port, keeping nothing on disk.

    `stop` and `start` again on the same port simulate a restart that loses every key.
    """

    def __init__(self, port: int | None = None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed")
        self.binary = binary
        self.port = port or free_port()
        self.dir = tempfile.mkdtemp(prefix="hb-redis-")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        self.process = subprocess.Popen(
            [
                self.binary,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", self.dir,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while not answers(self.url, timeout=0.2):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


@contextmanager
def redis_server() -> Iterator[RedisServer]:
    """A private server for the duration of the block."""
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.dir, ignore_errors=True)


def delete_prefix(url: str, prefix: str) -> None:
    """Delete every key whose name starts with `prefix` (never the rest of the database)."""
    client = redis.Redis.from_url(url)
    try:
        batch = []
        for key in client.scan_iter(match=f"{prefix}*", count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                client.delete(*batch)
                batch.clear()
        if batch:
            client.delete(*batch)
    finally:
        client.close()
