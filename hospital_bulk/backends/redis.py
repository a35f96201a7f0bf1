"""Redis backends: every part's state shared by all the processes that use one Redis.

Install the ``redis`` extra (``pip install "hospital-bulk[redis]"``). This is the only module of
the library that imports `redis`; nothing imports it unless a Redis backend is asked for.

| class | implements | state in Redis |
|---|---|---|
| `RedisJobStore` | `JobStore` | jobs, rows, leases with fencing tokens |
| `RedisIdempotencyStore` | `IdempotencyStore` | keys, claimed with their job in one script |
| `RedisRateLimiter` | `RateLimiter` | `limits`' moving windows, and the shared pause |
| `RedisCircuitBreaker` | `CircuitBreaker` | the breaker's state, one Lua script per step |

`RedisBackend` builds them all on one client (from a URL, a client or a connection pool) and
one key prefix. Every key is made by `RedisKeys`, the one place that knows their names.

How they behave:

- **Atomic steps.** Every step that reads and then writes shared state is one Lua script, so
  processes never interleave inside it. A script sent twice does no harm (redis-py sends a
  command again after a connection error, and the first may have run): a job's creation and
  a breaker step carry a nonce and are applied once; writes of rows, fields and pauses set
  values; a re-sent lease grab just issues the newer token. The one exception is `limits`'
  rate-window script, which may count a re-sent request twice (erring on the slow side).
- **Fencing.** Every job write carries the writer's fencing token and is refused unless it is
  the job's latest; the check and the write are one script.
- **One round trip per write.** `RedisJobStore.save_rows` writes any number of rows in one
  script call; reads of a job are one pipelined transaction.
- **Retention.** A finished job is kept `retention` seconds after it finished (as in the
  memory store), then Redis deletes its keys (``PEXPIRE``); a job resumed before that is kept
  again (``PERSIST``). Idempotency keys expire after their time to live the same way.
- **Clocks.** Job times, lease ends and retention deadlines are the processes' own clocks
  (``time.time()``), which must agree to within seconds (NTP). The breaker reads Redis's clock
  (``TIME``), so every process sees one open period. The rate limiter's windows are `limits`'
  (client timestamps): clock skew between hosts shortens a window by the skew at most, which
  the rate margin (`Settings.rate_margin`, default 1 s) must cover.
- **Failures.** A Redis error becomes `BackendError` (its message never holds a password).
  The breaker falls back to a local breaker while Redis is unreachable and logs it; the other
  parts raise, so a job stops loudly instead of guessing.
- **Not supported:** Redis Cluster (scripts touch keys of several slots). Keep persistence on
  (AOF) where the idempotency and job records must survive a Redis restart.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Final, Literal
from uuid import UUID

import anyio
import limits
import redis.asyncio as aioredis
from limits.aio.storage import RedisStorage
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .._breaker import MemoryCircuitBreaker
from .._exceptions import (
    BackendError,
    CircuitOpenError,
    ConfigurationError,
    IdempotencyConflictError,
    JobNotFoundError,
    JobStateError,
    LeaseLostError,
)
from .._jobs import JobRecord, JobRow, Lease, RowState
from .._ratelimit import as_rate, check_margin, non_negative_seconds
from ..protocols import BreakerState, CircuitBreaker, IdempotencyStore, JobStore, RateLimiter
from .memory import DEFAULT_RETENTION, MAX_KEY_LENGTH, check_seconds

__all__ = [
    "DEFAULT_PREFIX",
    "RedisBackend",
    "RedisCircuitBreaker",
    "RedisIdempotencyStore",
    "RedisJobStore",
    "RedisKeys",
    "RedisRateLimiter",
    "connect",
]

logger = logging.getLogger("hospital_bulk.backends.redis")

DEFAULT_PREFIX: Final = "hospital_bulk"
"""The key prefix used unless another is given."""

# Rows sent inside the creating script; larger jobs stage their rows first (see `_Payload`).
_INLINE_ROWS: Final = 512
# Fields per HSET when rows are staged or written in bulk.
_CHUNK: Final = 1000
# Staged rows of a creation that never completed are dropped after this long.
_STAGING_TTL_MS: Final = 3_600_000
# While Redis is unreachable, the breaker asks it again this often (seconds).
_FALLBACK_RETRY: Final = 5.0
_MIN_SLEEP: Final = 0.001


class RedisKeys:
    """Every Redis key the backends use, made from one prefix.

    | key | type | holds |
    |---|---|---|
    | ``{prefix}:job:{id}`` | hash | ``data`` (JSON), ``rows`` (count), ``deadline``, ``creation`` |
    | ``{prefix}:job:{id}:rows`` | hash | row index -> the row (a JSON array) |
    | ``{prefix}:job:{id}:lease`` | hash | ``owner``, ``token`` (fencing), ``expires_at`` |
    | ``{prefix}:job:{id}:staging:{n}`` | hash | rows of a large job being created (1 h at most) |
    | ``{prefix}:jobs`` | sorted set | job ids by creation time |
    | ``{prefix}:jobs:expiring`` | sorted set | finished job ids by retention deadline |
    | ``{prefix}:idem:{key}`` | hash | ``fingerprint``, ``job_id``, ``expires_at`` |
    | ``{prefix}:idem`` | sorted set | idempotency keys by expiry |
    | ``{prefix}:rate:create``, ``{prefix}:rate:other:{path}`` | list | `limits`' moving windows |
    | ``{prefix}:rate:pause`` | string | present while every sender is paused (its TTL) |
    | ``{prefix}:breaker:{name}`` | hash | the breaker's state |
    | ``{prefix}:breaker:{name}:calls`` | sorted set | recent calls (failure-rate mode) |
    | ``{prefix}:breaker:{name}:steps`` | list | nonces of the last 64 steps (one minute) |

    A finished job's three keys expire with its retention; idempotency keys with their time to
    live; the index entries of either are dropped by the next creation or claim.

    Args:
        prefix: The first part of every key (``"hospital_bulk"`` by default); processes share
            state exactly when they use the same Redis database and prefix.

    Raises:
        ConfigurationError: The prefix is empty or not a string.
    """

    def __init__(self, prefix: str = DEFAULT_PREFIX) -> None:
        if not isinstance(prefix, str) or not prefix:
            raise ConfigurationError(f"a key prefix must be a non-empty string, not {prefix!r}")
        self.prefix = prefix

    def job(self, job_id: str) -> str:
        """The job's own fields."""
        return f"{self.prefix}:job:{job_id}"

    def rows(self, job_id: str) -> str:
        """The job's rows."""
        return f"{self.prefix}:job:{job_id}:rows"

    def lease(self, job_id: str) -> str:
        """The job's lease and fencing token."""
        return f"{self.prefix}:job:{job_id}:lease"

    def staging(self, job_id: str, nonce: str) -> str:
        """The rows of a large job while it is being created."""
        return f"{self.prefix}:job:{job_id}:staging:{nonce}"

    @property
    def jobs(self) -> str:
        """Every job id, by creation time."""
        return f"{self.prefix}:jobs"

    @property
    def expiring(self) -> str:
        """Finished job ids, by retention deadline."""
        return f"{self.prefix}:jobs:expiring"

    def idempotency(self, key: str) -> str:
        """One idempotency key's claim."""
        return f"{self.prefix}:idem:{key}"

    @property
    def idempotency_index(self) -> str:
        """Every idempotency key, by expiry."""
        return f"{self.prefix}:idem"

    @property
    def rate_prefix(self) -> str:
        """The prefix `limits` puts before its window keys (``create``, ``other:{path}``)."""
        return f"{self.prefix}:rate"

    @property
    def pause(self) -> str:
        """The shared pause of every sender."""
        return f"{self.prefix}:rate:pause"

    def breaker(self, name: str) -> str:
        """A breaker's state."""
        return f"{self.prefix}:breaker:{name}"

    def breaker_steps(self, name: str) -> str:
        """The nonces of a breaker's last steps (so a re-sent step is not applied twice)."""
        return f"{self.prefix}:breaker:{name}:steps"

    def breaker_calls(self, name: str) -> str:
        """A breaker's recent calls (failure-rate mode)."""
        return f"{self.prefix}:breaker:{name}:calls"


def connect(target: str | aioredis.Redis | aioredis.ConnectionPool) -> aioredis.Redis:
    """Return a Redis client for a URL, a client, or a connection pool.

    A client made from a URL times out after 5 s (connect and commands) and retries a command
    up to three times after a connection error, with short backoffs, so an outage surfaces as
    an error within seconds instead of a hang.

    Args:
        target: ``"redis://host:6379/0"`` (also ``rediss://`` and ``unix://``), a
            `redis.asyncio.Redis` (used as it is), or a `redis.asyncio.ConnectionPool`.

    Returns:
        The client.

    Raises:
        ConfigurationError: The URL cannot be read, or names a database that is not a number.
    """
    if isinstance(target, aioredis.Redis):
        return target
    if isinstance(target, aioredis.ConnectionPool):
        return aioredis.Redis(connection_pool=target)
    if not isinstance(target, str):
        raise ConfigurationError(
            f"a Redis backend needs a URL, a client or a connection pool, not {target!r:.80}"
        )
    # redis-py reads a database path that is not a number as database 0, silently: a typo
    # would share another application's database.
    scheme, _, rest = target.partition("://")
    if scheme in ("redis", "rediss"):
        path = rest.split("?", 1)[0].split("#", 1)[0].partition("/")[2]
        if path not in ("", "/") and not path.rstrip("/").isdigit():
            raise ConfigurationError(
                "cannot read the Redis URL: its database must be a number, as in "
                "redis://host:6379/0"
            )
    try:
        return aioredis.Redis.from_url(
            target,
            socket_timeout=5.0,
            socket_connect_timeout=5.0,
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 3),
            health_check_interval=30,
        )
    except ValueError as exc:
        raise ConfigurationError(f"cannot read the Redis URL: {exc}") from None


def _where(client: aioredis.Redis) -> str:
    """Describe a client's server for error messages, never with credentials."""
    kwargs = client.connection_pool.connection_kwargs
    if "path" in kwargs:
        return f"unix:{kwargs['path']} db {kwargs.get('db', 0)}"
    return f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)} db {kwargs.get('db', 0)}"


@contextlib.asynccontextmanager
async def _redis_errors(client: aioredis.Redis, what: str) -> AsyncIterator[None]:
    """Turn Redis errors into `BackendError` naming the server and the operation."""
    try:
        yield
    except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
        raise BackendError(
            f"Redis at {_where(client)} is unreachable ({what}): {type(exc).__name__}: {exc}"
        ) from exc
    except RedisError as exc:
        raise BackendError(f"Redis at {_where(client)} failed ({what}): {exc}") from exc


def _text(value: Any) -> str:
    """A Redis reply as text, whether the client decodes replies or not."""
    if isinstance(value, bytes):
        return value.decode()
    return str(value)


def _number(value: Any) -> float | None:
    if value is None or value in (b"", ""):
        return None
    return float(_text(value))


# -- Lua --------------------------------------------------------------------------------------

# Shared by the scripts of the job store: is the job at KEYS[1] live at time `now`?
# A job past its retention deadline is dropped on sight (its keys may not have expired yet when
# clocks are injected), so every backend answers "not found" at the same moment.
_LUA_LIVE = """
local function live(job_key, rows_key, lease_key, index_key, expiring_key, job_id, now)
  local deadline = redis.call('hget', job_key, 'deadline')
  if not deadline then return false end
  if deadline ~= '' and now > tonumber(deadline) then
    redis.call('del', job_key, rows_key, lease_key)
    redis.call('zrem', index_key, job_id)
    redis.call('zrem', expiring_key, job_id)
    return false
  end
  return true
end
local function hset_pairs(key, args, first)
  for i = first, #args, 2000 do
    redis.call('hset', key, unpack(args, i, math.min(i + 1999, #args)))
  end
end
"""

# Shared by create and claim: store a new job. KEYS: job, rows, lease, jobs, expiring, staging.
# ARGV[a..]: job_id, created_at, data, row count, now, deadline ('' = none: not terminal),
# ttl_ms (of the deadline), then the rows as index/JSON pairs.
# The staging key's name is unique to one creation (a nonce): it is kept in the job as
# ``creation``, so a script re-sent by the client (after a connection error) is told from
# another creation with the same id, whatever the job's fields.
# Returns 1 (created), 0 (the id is taken), 2 (this very creation ran already: re-sent).
_LUA_CREATE = """
local function create(keys, job_id, created_at, data, count, now, deadline, ttl, args, first)
  -- Drop (a bounded number of) index entries of jobs past retention, as the memory store
  -- purges on create: the indexes stay as small as the live jobs.
  local gone = redis.call('zrangebyscore', keys[5], '-inf', '(' .. now, 'LIMIT', 0, 100)
  for _, old in ipairs(gone) do
    redis.call('zrem', keys[4], old); redis.call('zrem', keys[5], old)
  end
  if live(keys[1], keys[2], keys[3], keys[4], keys[5], job_id, now) then
    redis.call('del', keys[6])
    if redis.call('hget', keys[1], 'creation') == keys[6] then return 2 end
    return 0
  end
  redis.call('del', keys[1], keys[2], keys[3])
  if redis.call('exists', keys[6]) == 1 then redis.call('rename', keys[6], keys[2]) end
  hset_pairs(keys[2], args, first)
  redis.call('persist', keys[2])
  redis.call('hset', keys[1], 'data', data, 'rows', count, 'deadline', deadline,
    'creation', keys[6])
  redis.call('zadd', keys[4], created_at, job_id)
  if deadline == '' then
    redis.call('zrem', keys[5], job_id)
  else
    local ms = math.max(1, tonumber(ttl))
    redis.call('pexpire', keys[1], ms); redis.call('pexpire', keys[2], ms)
    redis.call('zadd', keys[5], deadline, job_id)
  end
  return 1
end
"""

_CREATE = (
    _LUA_LIVE
    + _LUA_CREATE
    + """
return create(KEYS, ARGV[1], ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5]), ARGV[6], ARGV[7],
  ARGV, 8)
"""
)

# KEYS: idem key, idem index, then create's six keys.
# ARGV: key, fingerprint, expires_at, ttl_ms, now, then create's arguments.
# Returns {outcome, job_id}: outcome 'created', 'same' (the key's job), 'conflict', 'taken'.
_CLAIM = (
    _LUA_LIVE
    + _LUA_CREATE
    + """
local now = tonumber(ARGV[5])
redis.call('zremrangebyscore', KEYS[2], '-inf', '(' .. now)
local held = redis.call('hmget', KEYS[1], 'fingerprint', 'job_id', 'expires_at')
if held[1] and tonumber(held[3]) >= now then
  redis.call('del', KEYS[8])
  if held[1] ~= ARGV[2] then return {'conflict', held[2]} end
  return {'same', held[2]}
end
local job_keys = {KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8]}
local made = create(job_keys, ARGV[6], ARGV[7], ARGV[8], ARGV[9], now, ARGV[11], ARGV[12],
  ARGV, 13)
if made == 0 then return {'taken', ARGV[6]} end
redis.call('hset', KEYS[1], 'fingerprint', ARGV[2], 'job_id', ARGV[6], 'expires_at', ARGV[3])
redis.call('pexpire', KEYS[1], ARGV[4])
redis.call('zadd', KEYS[2], ARGV[3], ARGV[1])
return {'created', ARGV[6]}
"""
)

# KEYS: job, rows, lease, jobs, expiring. ARGV: job_id, now, token ('' = unfenced), rows...
# Returns 1, or -1 (no such job), -2 (stale token), -3 (an index out of range).
_SAVE_ROWS = (
    _LUA_LIVE
    + """
if not live(KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], ARGV[1], tonumber(ARGV[2])) then
  return -1
end
if ARGV[3] ~= '' and redis.call('hget', KEYS[3], 'token') ~= ARGV[3] then return -2 end
local count = tonumber(redis.call('hget', KEYS[1], 'rows'))
for i = 4, #ARGV, 2 do
  local index = tonumber(ARGV[i])
  if index < 0 or index >= count then return -3 end
end
hset_pairs(KEYS[2], ARGV, 4)
return 1
"""
)

# KEYS: job, rows, lease, jobs, expiring.
# ARGV: job_id, now, token, data, deadline ('' = none), ttl_ms (of the deadline).
# Returns 1, -1 (no such job) or -2 (stale token).
_SAVE_JOB = (
    _LUA_LIVE
    + """
if not live(KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], ARGV[1], tonumber(ARGV[2])) then
  return -1
end
if ARGV[3] ~= '' and redis.call('hget', KEYS[3], 'token') ~= ARGV[3] then return -2 end
redis.call('hset', KEYS[1], 'data', ARGV[4], 'deadline', ARGV[5])
if ARGV[5] == '' then
  redis.call('persist', KEYS[1]); redis.call('persist', KEYS[2]); redis.call('persist', KEYS[3])
  redis.call('zrem', KEYS[5], ARGV[1])
else
  local ttl = math.max(1, tonumber(ARGV[6]))
  redis.call('pexpire', KEYS[1], ttl); redis.call('pexpire', KEYS[2], ttl)
  redis.call('pexpire', KEYS[3], ttl)
  redis.call('zadd', KEYS[5], ARGV[5], ARGV[1])
end
return 1
"""
)

# KEYS: jobs, expiring. ARGV: now. Drops the index entries of expired jobs; returns the ids.
_LIST = """
local gone = redis.call('zrangebyscore', KEYS[2], '-inf', '(' .. ARGV[1])
for _, job_id in ipairs(gone) do redis.call('zrem', KEYS[1], job_id) end
redis.call('zremrangebyscore', KEYS[2], '-inf', '(' .. ARGV[1])
return redis.call('zrange', KEYS[1], 0, -1)
"""

# KEYS: job, rows, lease, jobs, expiring. ARGV: job_id, now. Returns 1 or -1 (no such job).
_DELETE = (
    _LUA_LIVE
    + """
if not live(KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], ARGV[1], tonumber(ARGV[2])) then
  return -1
end
redis.call('del', KEYS[1], KEYS[2], KEYS[3])
redis.call('zrem', KEYS[4], ARGV[1]); redis.call('zrem', KEYS[5], ARGV[1])
return 1
"""
)

# KEYS: job, rows, lease, jobs, expiring. ARGV: job_id, now, owner, expires_at.
# Returns {token} or {-1} (no such job) or {-2, data} (held by another owner).
_ACQUIRE = (
    _LUA_LIVE
    + """
local now = tonumber(ARGV[2])
if not live(KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], ARGV[1], now) then return {-1} end
local held = redis.call('hmget', KEYS[3], 'owner', 'expires_at')
if held[1] and held[1] ~= '' and held[1] ~= ARGV[3] and tonumber(held[2]) > now then
  return {-2, redis.call('hget', KEYS[1], 'data')}
end
local token = redis.call('hincrby', KEYS[3], 'token', 1)
redis.call('hset', KEYS[3], 'owner', ARGV[3], 'expires_at', ARGV[4])
if redis.call('pttl', KEYS[1]) > 0 then
  redis.call('pexpire', KEYS[3], redis.call('pttl', KEYS[1]))
end
return {token}
"""
)

# KEYS: job, rows, lease, jobs, expiring. ARGV: job_id, now, token, expires_at.
# Returns 1, -1 (the job is gone: a lost job is not a lost lease) or -2 (stale token).
_RENEW = (
    _LUA_LIVE
    + """
if not live(KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], ARGV[1], tonumber(ARGV[2])) then
  return -1
end
if redis.call('hget', KEYS[3], 'token') ~= ARGV[3] then return -2 end
redis.call('hset', KEYS[3], 'expires_at', ARGV[4])
return 1
"""
)

# KEYS: lease. ARGV: token. Gives the lease up when the token is the latest; keeps the token.
_RELEASE = """
if redis.call('hget', KEYS[1], 'token') == ARGV[1] then
  redis.call('hset', KEYS[1], 'owner', '', 'expires_at', '0')
end
return 1
"""

# KEYS: pause. ARGV: milliseconds. A pause never shortens one already in force.
_PAUSE = """
local ms = tonumber(ARGV[1])
if ms > 0 and redis.call('pttl', KEYS[1]) < ms then
  redis.call('set', KEYS[1], '1', 'PX', ms)
end
return 1
"""

# The breaker's rules (`hospital_bulk._breaker`) as one script; every step is one call.
# KEYS: state, calls, steps. ARGV: op (before|success|failure|state), now ('' = Redis's clock),
# threshold, rate ('' = none), window, min_calls, recovery, probe_retry, nonce.
# Returns {state, retry_at or '', open_until, failures, now, transitions...}.
_BREAKER = """
local op = ARGV[1]
local now = tonumber(ARGV[2])
if not now then
  local t = redis.call('time')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local threshold, rate = tonumber(ARGV[3]), tonumber(ARGV[4])
local window, min_calls = tonumber(ARGV[5]), tonumber(ARGV[6])
local recovery, probe_retry = tonumber(ARGV[7]), tonumber(ARGV[8])
local h = redis.call('hmget', KEYS[1], 'state', 'failures', 'open_until', 'probe_until')
local state = h[1] or 'closed'
local failures = tonumber(h[2] or '0')
local open_until = tonumber(h[3] or '0')
local probe_until = tonumber(h[4] or '')
local changes = {}
local function move(new)
  table.insert(changes, state .. '>' .. new)
  state = new
end
local function open_()
  move('open'); open_until = now + recovery; probe_until = nil; failures = 0
  redis.call('del', KEYS[2])
end
local function close_()
  move('closed'); probe_until = nil; failures = 0
  redis.call('del', KEYS[2])
end
local function record_call(failed)
  if not rate then return end
  local mark = 's'
  if failed then mark = 'f' end
  redis.call('zadd', KEYS[2], now, ARGV[9] .. ':' .. mark)
  redis.call('zremrangebyscore', KEYS[2], '-inf', now - window)
  redis.call('pexpire', KEYS[2], math.ceil(window * 1000) + 1000)
  local calls = redis.call('zrange', KEYS[2], 0, -1)
  if #calls >= min_calls then
    local bad = 0
    for _, call in ipairs(calls) do
      if string.sub(call, -1) == 'f' then bad = bad + 1 end
    end
    if bad >= rate * #calls then open_() end
  end
end
if state == 'open' and now >= open_until then
  move('half_open'); probe_until = nil
end
-- A step re-sent by the client (after a connection error) is recognised by its nonce among
-- the last steps, and changes nothing the second time; a re-sent probe keeps its grant.
local replay = op ~= 'state' and redis.call('lpos', KEYS[3], ARGV[9]) ~= false
if op ~= 'state' and not replay then
  redis.call('lpush', KEYS[3], ARGV[9])
  redis.call('ltrim', KEYS[3], 0, 63)
  redis.call('pexpire', KEYS[3], 60000)
end
local retry = ''
if replay then
  if op == 'before' and state == 'open' then retry = open_until end
elseif op == 'before' then
  if state == 'open' then
    retry = open_until
  elseif state == 'half_open' then
    if probe_until and now < probe_until then
      retry = math.min(probe_until, now + math.min(probe_retry, recovery))
    else
      probe_until = now + recovery
    end
  end
elseif op == 'success' then
  if state == 'half_open' then close_()
  elseif state == 'closed' then failures = 0; record_call(false) end
elseif op == 'failure' then
  if state == 'half_open' then open_()
  elseif state == 'closed' then
    failures = failures + 1
    if failures >= threshold then open_() else record_call(true) end
  end
end
local probe = ''
if probe_until then probe = string.format('%.6f', probe_until) end
redis.call('hset', KEYS[1], 'state', state, 'failures', failures,
  'open_until', string.format('%.6f', open_until), 'probe_until', probe)
local reply = {state, '', string.format('%.6f', open_until), failures,
  string.format('%.6f', now)}
if retry ~= '' then reply[2] = string.format('%.6f', retry) end
for _, change in ipairs(changes) do table.insert(reply, change) end
return reply
"""


# -- rows and jobs as stored ------------------------------------------------------------------


def _dump_row(row: JobRow) -> str:
    return json.dumps(
        [
            row.index,
            row.row,
            row.line,
            row.name,
            row.address,
            row.phone,
            None if row.batch_id is None else str(row.batch_id),
            row.state.value,
            row.hospital_id,
            row.error,
            row.attempts,
            row.sent_at,
        ],
        ensure_ascii=False,
        separators=(",", ":"),
    )


def _load_row(text: str | bytes) -> JobRow:
    (index, row, line, name, address, phone, batch, state, hospital, error, attempts, sent) = (
        json.loads(text)
    )
    return JobRow(
        index,
        row,
        line,
        name,
        address,
        phone,
        None if batch is None else UUID(batch),
        RowState(state),
        hospital,
        error,
        attempts,
        sent,
    )


def _dump_job(job: JobRecord) -> str:
    """The job's own fields as JSON (rows are stored apart: never serialized here)."""
    data = dataclasses.replace(job, rows=[]).to_dict()
    del data["rows"]
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"), sort_keys=True)


def _row_args(rows: Sequence[JobRow]) -> list[str | int]:
    args: list[str | int] = []
    for row in rows:
        args.append(row.index)
        args.append(_dump_row(row))
    return args


class RedisJobStore:
    """A `JobStore` in Redis: any process sharing the Redis database and prefix sees the jobs.

    Reads return fresh objects and writes store serialized copies, as in the memory store.

    Args:
        client: The Redis client (see `connect`).
        keys: The key layout (its prefix).
        retention: How long a terminal job is kept after it finished, in seconds (> 0;
            ``math.inf`` keeps jobs forever).
        clock: Returns the time now in `time.time()` seconds (lease ends and retention are
            measured with it). Tests inject a fake one.

    Raises:
        ConfigurationError: `retention` is not a number > 0.
    """

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        keys: RedisKeys | None = None,
        retention: float = DEFAULT_RETENTION,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._client = client
        self._keys = keys or RedisKeys()
        self._retention = check_seconds("retention", retention)
        self._clock = clock
        self._create = client.register_script(_CREATE)
        self._claim = client.register_script(_CLAIM)
        self._save_rows = client.register_script(_SAVE_ROWS)
        self._save_job = client.register_script(_SAVE_JOB)
        self._list = client.register_script(_LIST)
        self._delete = client.register_script(_DELETE)
        self._acquire = client.register_script(_ACQUIRE)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)

    @property
    def retention(self) -> float:
        """How long a terminal job is kept after it finished, in seconds."""
        return self._retention

    @property
    def keys(self) -> RedisKeys:
        """The key layout."""
        return self._keys

    def _job_keys(self, job_id: str) -> list[str]:
        k = self._keys
        return [k.job(job_id), k.rows(job_id), k.lease(job_id), k.jobs, k.expiring]

    async def create(self, job: JobRecord) -> None:
        """Store a new job with its rows, atomically: it appears whole or not at all.

        Args:
            job: The job; its id must be new and each row's `JobRow.index` its position.

        Raises:
            ConfigurationError: A job with this id is already stored, the id is empty, or a
                row's index is not its position. Nothing is stored then.
            BackendError: Redis failed.
        """
        keys, args = await self._creation(job)
        async with _redis_errors(self._client, "create a job"):
            made = await self._create(keys, args)
        if int(made) == 0:
            raise ConfigurationError(
                f"a job with id {job.job_id!r} already exists; every job needs a new id"
            )

    async def _creation(self, job: JobRecord) -> tuple[list[str], list[str | int | float]]:
        """Check a new job and return the keys and arguments of the creating script.

        A job of more rows than fit one script call has them staged first, under a key of
        its own that the script renames (or drops when the id is taken).
        """
        if not isinstance(job.job_id, str) or not job.job_id:
            raise ConfigurationError(f"a job id must be a non-empty string, got {job.job_id!r}")
        for position, row in enumerate(job.rows):
            if row.index != position:
                raise ConfigurationError(
                    f"row {position} of job {job.job_id!r} has index {row.index}; "
                    "each row's index must be its position in the job"
                )
        staging = self._keys.staging(job.job_id, uuid.uuid4().hex)
        inline: Sequence[JobRow] = job.rows
        if len(job.rows) > _INLINE_ROWS:
            inline = ()
            async with _redis_errors(self._client, "stage a job's rows"):
                pipe = self._client.pipeline(transaction=False)
                for start in range(0, len(job.rows), _CHUNK):
                    pipe.hset(
                        staging,
                        mapping={
                            str(row.index): _dump_row(row)
                            for row in job.rows[start : start + _CHUNK]
                        },
                    )
                pipe.pexpire(staging, _STAGING_TTL_MS)
                await pipe.execute()
        keys = [*self._job_keys(job.job_id), staging]
        now = self._clock()
        # A job stored terminal (an import of a finished job) starts its retention at once.
        deadline, ttl_ms = self._deadline(job, now)
        args: list[str | int | float] = [
            job.job_id,
            repr(job.created_at),
            _dump_job(job),
            len(job.rows),
            repr(now),
            deadline,
            ttl_ms,
            *_row_args(inline),
        ]
        return keys, args

    def _deadline(self, job: JobRecord, now: float) -> tuple[str, int]:
        """The job's retention deadline as stored ('' = none) and the milliseconds to it."""
        if not job.status.terminal or not math.isfinite(self._retention):
            return "", 0
        finished = job.finished_at if job.finished_at is not None else job.created_at
        deadline = finished + self._retention
        return repr(deadline), math.ceil((deadline - now) * 1000)

    async def get(self, job_id: str) -> JobRecord:
        """Return a job with its rows, read in one transaction.

        Args:
            job_id: The job's id.

        Returns:
            The job.

        Raises:
            JobNotFoundError: No job has this id, or its retention has passed.
            BackendError: Redis failed.
        """
        async with _redis_errors(self._client, "read a job"):
            pipe = self._client.pipeline(transaction=True)
            pipe.hmget(self._keys.job(job_id), ["data", "deadline"])
            pipe.hgetall(self._keys.rows(job_id))
            (data, deadline), stored = await pipe.execute()
        if data is None:
            raise JobNotFoundError(job_id)
        limit = _number(deadline)
        if limit is not None and self._clock() > limit:
            raise JobNotFoundError(job_id)
        job = JobRecord.from_dict({**json.loads(data), "rows": []})
        rows = [_load_row(text) for text in stored.values()]
        rows.sort(key=lambda row: row.index)
        job.rows = rows
        return job

    async def save_rows(
        self, job_id: str, rows: Sequence[JobRow], *, token: int | None = None
    ) -> None:
        """Replace the given rows of a job, each by its `JobRow.index`, in one round trip.

        The token and every index are checked before anything is written: either every row
        is stored or none is. When several given rows share an index, the last one wins.

        Args:
            job_id: The job's id.
            rows: The rows to write.
            token: The writer's fencing token; the write is refused unless it is the latest.

        Raises:
            JobNotFoundError: No job has this id, or its retention has passed.
            ConfigurationError: A row's index is outside the job's rows.
            LeaseLostError: `token` is not the latest lease's.
            BackendError: Redis failed.
        """
        args: list[str | int] = [job_id, repr(self._clock()), "" if token is None else token]
        args.extend(_row_args(rows))
        async with _redis_errors(self._client, "save rows"):
            answer = int(await self._save_rows(self._job_keys(job_id), args))
        if answer == -3:
            raise ConfigurationError(f"a row index is out of range for job {job_id!r}")
        self._check(answer, job_id, token)

    async def save_job(self, job: JobRecord, *, token: int | None = None) -> None:
        """Store every field of a job except its rows, which stay as stored.

        A terminal job starts its retention here; a job made non-terminal again is kept.

        Args:
            job: The job.
            token: The writer's fencing token; the write is refused unless it is the latest.

        Raises:
            JobNotFoundError: No job has this id, or its retention has passed.
            LeaseLostError: `token` is not the latest lease's.
            BackendError: Redis failed.
        """
        now = self._clock()
        deadline, ttl_ms = self._deadline(job, now)
        args = [
            job.job_id,
            repr(now),
            "" if token is None else token,
            _dump_job(job),
            deadline,
            ttl_ms,
        ]
        async with _redis_errors(self._client, "save a job"):
            answer = int(await self._save_job(self._job_keys(job.job_id), args))
        self._check(answer, job.job_id, token)

    async def list_ids(self) -> list[str]:
        """Return the ids of the stored jobs, oldest first (by `JobRecord.created_at`).

        Jobs whose retention has passed are dropped first and are not listed.

        Raises:
            BackendError: Redis failed.
        """
        async with _redis_errors(self._client, "list jobs"):
            ids = await self._list([self._keys.jobs, self._keys.expiring], [repr(self._clock())])
        return [_text(job_id) for job_id in ids]

    async def delete(self, job_id: str) -> None:
        """Remove a job, its rows and its lease.

        Args:
            job_id: The job's id.

        Raises:
            JobNotFoundError: No job has this id, or its retention has passed.
            BackendError: Redis failed.
        """
        async with _redis_errors(self._client, "delete a job"):
            answer = int(await self._delete(self._job_keys(job_id), [job_id, repr(self._clock())]))
        self._check(answer, job_id, None)

    async def acquire_lease(self, job_id: str, owner: str, ttl: float) -> int:
        """Take the job's lease for `owner`; see `hospital_bulk.protocols.JobStore`.

        Args:
            job_id: The job's id.
            owner: The worker taking it.
            ttl: Seconds the lease lasts unless renewed.

        Returns:
            A new fencing token.

        Raises:
            JobNotFoundError: No job has this id.
            JobStateError: Another owner holds a lease that has not expired.
            BackendError: Redis failed.
        """
        seconds = check_seconds("ttl", ttl)
        now = self._clock()
        async with _redis_errors(self._client, "take a lease"):
            answer = await self._acquire(
                self._job_keys(job_id), [job_id, repr(now), owner, repr(now + seconds)]
            )
        code = int(answer[0])
        if code == -1:
            raise JobNotFoundError(job_id)
        if code == -2:
            status = json.loads(answer[1]).get("status", "running")
            raise JobStateError(
                f"job {job_id} is already running in another worker",
                job_id=job_id,
                status=status,
            )
        return code

    async def renew_lease(self, job_id: str, token: int, ttl: float) -> None:
        """Extend the lease; see `hospital_bulk.protocols.JobStore`.

        Args:
            job_id: The job's id.
            token: The holder's fencing token.
            ttl: Seconds the lease lasts from now.

        Raises:
            JobNotFoundError: The job is gone (expired, deleted, or lost with Redis's data).
            LeaseLostError: `token` is not the latest lease's.
            BackendError: Redis failed.
        """
        seconds = check_seconds("ttl", ttl)
        now = self._clock()
        async with _redis_errors(self._client, "renew a lease"):
            answer = int(
                await self._renew(
                    self._job_keys(job_id), [job_id, repr(now), token, repr(now + seconds)]
                )
            )
        self._check(answer, job_id, token)

    async def release_lease(self, job_id: str, token: int) -> None:
        """Give the lease up; nothing happens when `token` is no longer the latest.

        Args:
            job_id: The job's id.
            token: The holder's fencing token.

        Raises:
            BackendError: Redis failed.
        """
        async with _redis_errors(self._client, "release a lease"):
            await self._release([self._keys.lease(job_id)], [token])

    async def lease(self, job_id: str) -> Lease | None:
        """Return the job's lease while it has not expired, else ``None``.

        Args:
            job_id: The job's id.

        Raises:
            BackendError: Redis failed.
        """
        async with _redis_errors(self._client, "read a lease"):
            owner, token, expires = await self._client.hmget(
                self._keys.lease(job_id), ["owner", "token", "expires_at"]
            )
        until = _number(expires)
        if not owner or token is None or until is None or until <= self._clock():
            return None
        return Lease(owner=_text(owner), token=int(token), expires_at=until)

    @staticmethod
    def _check(answer: int, job_id: str, token: int | None) -> None:
        if answer == -1:
            raise JobNotFoundError(job_id)
        if answer == -2:
            raise LeaseLostError(
                f"job {job_id} was taken over by another worker (fencing token {token} is "
                "stale); this worker must stop",
                job_id=job_id,
                status="running",
            )


class RedisIdempotencyStore:
    """An `IdempotencyStore` in Redis: a key is claimed and its job created in one script.

    So two processes submitting the same key at once get one job: the first script creates
    it, the second finds the key. A claim never leaves a key "being created" behind, so
    `IdempotencyInProgressError` is never raised by this store.

    Args:
        jobs: The `RedisJobStore` the claimed jobs are created in (same client and prefix).
        clock: Returns the time now in `time.time()` seconds. Tests inject a fake one.
    """

    def __init__(self, jobs: RedisJobStore, *, clock: Callable[[], float] = time.time) -> None:
        if not isinstance(jobs, RedisJobStore):
            raise ConfigurationError("a RedisIdempotencyStore needs a RedisJobStore")
        self._jobs = jobs
        self._client = jobs._client
        self._keys = jobs.keys
        self._clock = clock
        self._script = jobs._claim

    async def claim(self, key: str, fingerprint: str, job: JobRecord, *, ttl: float) -> str:
        """Claim `key` for `job` and create the job, in one atomic step.

        Args:
            key: The idempotency key (a non-empty string of at most 255 characters).
            fingerprint: A digest of the file and options (a non-empty string).
            job: The job to create when the key is free.
            ttl: How long the key is kept after its job was created, in seconds (> 0).

        Returns:
            The id of the key's job: `job`'s when the key was free (the job is now stored),
            the earlier job's when the key was used with the same fingerprint.

        Raises:
            ConfigurationError: `key`, `fingerprint` or `ttl` has a wrong value, or the job's
                id is taken.
            IdempotencyConflictError: The key was used with another fingerprint.
            BackendError: Redis failed.
        """
        if not isinstance(key, str) or not key or len(key) > MAX_KEY_LENGTH:
            raise ConfigurationError(
                f"an idempotency key must be a non-empty string of at most {MAX_KEY_LENGTH} "
                f"characters, got {key!r:.80}"
            )
        if not isinstance(fingerprint, str) or not fingerprint:
            raise ConfigurationError(
                f"a fingerprint must be a non-empty string, got {fingerprint!r:.80}"
            )
        seconds = check_seconds("ttl", ttl)
        job_keys, job_args = await self._jobs._creation(job)
        now = self._clock()
        keys = [self._keys.idempotency(key), self._keys.idempotency_index, *job_keys]
        args: list[str | int | float] = [
            key,
            fingerprint,
            repr(now + seconds),
            math.ceil(seconds * 1000),
            repr(now),
        ]
        async with _redis_errors(self._client, "claim an idempotency key"):
            outcome, job_id = await self._script(keys, [*args, *job_args])
        outcome, job_id = _text(outcome), _text(job_id)
        if outcome == "conflict":
            raise IdempotencyConflictError(
                f"idempotency key {key!r} was already used for another file or other options; "
                "use a new key for a different submission",
                key=key,
                job_id=job_id,
            )
        if outcome == "taken":
            raise ConfigurationError(
                f"a job with id {job.job_id!r} already exists; every job needs a new id"
            )
        return job_id

    async def list_keys(self) -> list[str]:
        """Return the keys held, soonest to expire first (expired keys are dropped first).

        Raises:
            BackendError: Redis failed.
        """
        index = self._keys.idempotency_index
        now = self._clock()
        async with _redis_errors(self._client, "list idempotency keys"):
            pipe = self._client.pipeline(transaction=True)
            pipe.zremrangebyscore(index, "-inf", f"({now!r}")
            pipe.zrange(index, 0, -1)
            _, keys = await pipe.execute()
        return [_text(key) for key in keys]


class _Queue:
    """The waiters of one budget in this process: a FIFO lock and how many use it."""

    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = anyio.Lock()
        self.users = 0


class RedisRateLimiter:
    """A `RateLimiter` whose budgets every process shares, on `limits`' Redis moving window.

    Creates share one budget; every other path has its own; each window is widened by the
    margin (rounded up to whole seconds, which is what `limits` counts in). A `pause` is a key
    with a time to live, so every process sees it and no clock is involved. Within one process
    waiting tasks are served in arrival order; across processes the first to ask after a slot
    frees gets it.

    A process reads the pause at most every `pause_check_interval` seconds while it finds
    none (one Redis round trip saved per request at high rates): a pause set by another
    process holds this one within that interval; a pause this limiter sets holds it at once.

    Args:
        client: The Redis client (see `connect`).
        keys: The key layout (its prefix).
        create_rate: The budget of creates, in `limits` notation or as a `limits.RateLimitItem`.
        other_rate: The budget of each other path.
        margin: Seconds added to every window (>= 0): arrival jitter, and clock skew between
            the hosts that share the budget.
        sleep: Awaited to wait a number of seconds; `anyio.sleep` by default.
        pause_check_interval: Seconds a read of the shared pause that found none is trusted
            (>= 0; 0 reads it before every request).

    Raises:
        ConfigurationError: A rate cannot be parsed, or the margin or interval is out of
            range.
    """

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        keys: RedisKeys | None = None,
        create_rate: str | limits.RateLimitItem = "30/minute",
        other_rate: str | limits.RateLimitItem = "50/minute",
        margin: float = 1.0,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
        pause_check_interval: float = 0.1,
    ) -> None:
        self._client = client
        self._keys = keys or RedisKeys()
        self._create_rate = as_rate(create_rate, "create_rate")
        self._other_rate = as_rate(other_rate, "other_rate")
        self._margin = check_margin(margin)
        self._sleep = sleep
        self._create_window = math.ceil(self._create_rate.get_expiry() + self._margin)
        self._other_window = math.ceil(self._other_rate.get_expiry() + self._margin)
        self._storage = RedisStorage(
            "async+redis://",
            implementation="redispy",
            key_prefix=self._keys.rate_prefix,
            connection_pool=client.connection_pool,  # type: ignore[arg-type]
        )
        self._pause = client.register_script(_PAUSE)
        self._pause_check_interval = non_negative_seconds(
            "pause_check_interval", pause_check_interval
        )
        # Until when (`time.monotonic()`) a read that found no pause is trusted.
        self._unpaused_until = -math.inf
        # This process's waiters of each budget, served in arrival order.
        self._queues: dict[str, _Queue] = {}

    @property
    def create_window(self) -> int:
        """The length in seconds of the creates' window, margin included (whole seconds)."""
        return self._create_window

    @property
    def other_window(self) -> int:
        """The length in seconds of each other path's window, margin included."""
        return self._other_window

    async def acquire(
        self,
        kind: Literal["create", "other"],
        path: str = "",
        *,
        on_wait: Callable[[float], None] | None = None,
    ) -> None:
        """Wait until one request of this kind may leave (in any process), and count it.

        Args:
            kind: ``"create"`` for `POST /hospitals/`, ``"other"`` for every other call.
            path: The request path; every ``"other"`` path has a budget of its own.
            on_wait: Called with the `time.time()` a wait should end, before each wait.

        Raises:
            ConfigurationError: `kind` is neither ``"create"`` nor ``"other"``.
            BackendError: Redis failed.
        """
        key, limit, window = self._budget(kind, path)
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = _Queue()
        queue.users += 1
        try:
            async with queue.lock:
                await self._acquire(key, limit, window, on_wait)
        finally:
            # Batch paths are many: a budget nobody waits for keeps no lock here.
            queue.users -= 1
            if queue.users == 0:
                del self._queues[key]

    async def _acquire(
        self, key: str, limit: int, window: int, on_wait: Callable[[float], None] | None
    ) -> None:
        """Wait past the shared pause and the window, then count one request (in Redis)."""
        while True:
            async with _redis_errors(self._client, "wait for the rate limit"):
                paused = 0
                if time.monotonic() >= self._unpaused_until:
                    read_at = time.monotonic()
                    paused = await self._client.pttl(self._keys.pause)
                    if paused <= 0:
                        self._unpaused_until = read_at + self._pause_check_interval
                if paused > 0:
                    wait = paused / 1000
                elif await self._storage.acquire_entry(key, limit, window):
                    return
                else:
                    start, count = await self._storage.get_moving_window(key, limit, window)
                    # A slot may have freed since the refusal: then ask again at once.
                    wait = start + window - time.time() if count >= limit else 0.0
            if on_wait is not None:
                on_wait(time.time() + wait)
            await self._sleep(max(wait, _MIN_SLEEP))

    async def pause(self, seconds: float) -> None:
        """Make every `acquire`, in every process, wait until `seconds` from now.

        Args:
            seconds: How long to pause from now (>= 0).

        Raises:
            ConfigurationError: `seconds` is negative or not a finite number.
            BackendError: Redis failed.
        """
        seconds = non_negative_seconds("a pause", seconds)
        self._unpaused_until = -math.inf  # read it again before the next request
        async with _redis_errors(self._client, "pause the senders"):
            await self._pause([self._keys.pause], [math.ceil(seconds * 1000)])

    async def paused_until(self) -> float | None:
        """Return when the current pause ends (`time.time()` seconds), or ``None``.

        Raises:
            BackendError: Redis failed.
        """
        async with _redis_errors(self._client, "read the pause"):
            left = await self._client.pttl(self._keys.pause)
        return time.time() + left / 1000 if left > 0 else None

    def _budget(self, kind: str, path: str) -> tuple[str, int, int]:
        if kind == "create":
            return "create", self._create_rate.amount, self._create_window
        if kind == "other":
            return f"other:{path}", self._other_rate.amount, self._other_window
        raise ConfigurationError(f"kind must be 'create' or 'other', not {kind!r}")


class RedisCircuitBreaker:
    """A `CircuitBreaker` whose state every process shares; each step is one Lua script.

    The rules are those of `MemoryCircuitBreaker` (see `hospital_bulk._breaker`), timed by
    Redis's clock unless a clock is injected: one open period for all, one half-open probe
    across all processes. Creating a breaker writes nothing, so starting a process never
    resets or extends the shared state.

    While Redis is unreachable the breaker falls back to a local `MemoryCircuitBreaker` with
    the same settings (a warning is logged), and asks Redis again every few seconds; a job
    never fails because the breaker's store did.

    Args:
        client: The Redis client (see `connect`).
        name: The breaker's name; processes share a breaker by name and prefix.
        keys: The key layout (its prefix).
        failure_threshold: Consecutive failures that open it (>= 1).
        failure_rate: When set, a failure ratio in (0, 1] that also opens it, once at least
            `min_calls` calls were reported in the last `window` seconds.
        window: The failure-rate window, in seconds (> 0).
        min_calls: Calls needed in the window before the rate is judged (>= 1).
        recovery_time: Seconds it stays open before one probe, and the probe's lease (> 0).
        clock: Returns the time now in seconds, instead of Redis's clock (tests).

    Raises:
        ConfigurationError: A setting is out of range.
    """

    def __init__(
        self,
        client: aioredis.Redis,
        name: str = "hospital_api",
        *,
        keys: RedisKeys | None = None,
        failure_threshold: int = 5,
        failure_rate: float | None = None,
        window: float = 60.0,
        min_calls: int = 10,
        recovery_time: float = 30.0,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self._local = MemoryCircuitBreaker(
            name,
            failure_threshold=failure_threshold,
            failure_rate=failure_rate,
            window=window,
            min_calls=min_calls,
            recovery_time=recovery_time,
            clock=clock or time.time,
        )
        self._client = client
        self._name = name
        k = keys or RedisKeys()
        self._redis_keys = [k.breaker(name), k.breaker_calls(name), k.breaker_steps(name)]
        self._clock = clock
        self._args: list[str | int] = [
            failure_threshold,
            "" if failure_rate is None else repr(float(failure_rate)),
            repr(float(window)),
            min_calls,
            repr(float(recovery_time)),
            repr(min(1.0, float(recovery_time))),
        ]
        self._script = client.register_script(_BREAKER)
        self._fallback_until = -math.inf

    @property
    def name(self) -> str:
        """The breaker's name, used in logs (``"hospital_api"``)."""
        return self._name

    async def before_call(self) -> None:
        """Ask to make one call.

        Raises:
            CircuitOpenError: The breaker is open, or half open with its probe under way;
                `CircuitOpenError.retry_at` says when to ask again (`time.time()` seconds).
        """
        reply = await self._step("before")
        if reply is None:
            await self._local.before_call()
            return
        if reply.retry_at is not None:
            raise CircuitOpenError(self._name, retry_at=reply.retry_at)

    async def record_success(self) -> None:
        """Report that the call allowed by `before_call` succeeded (or failed harmlessly).

        Always one step in Redis, even when this process last saw no failures: another
        process may have counted one since, and this success ends that run of failures.
        """
        if await self._step("success") is None:
            await self._local.record_success()

    async def record_failure(self) -> None:
        """Report that the call failed in a way that counts (transport error, timeout, 5xx)."""
        if await self._step("failure") is None:
            await self._local.record_failure()

    async def state(self) -> BreakerState:
        """Return the shared state now (the local one while Redis is unreachable)."""
        reply = await self._step("state")
        if reply is None:
            return await self._local.state()
        return reply.state

    async def open_until(self) -> float | None:
        """Return when the open period ends (`time.time()` seconds) while open, else ``None``."""
        reply = await self._step("state")
        if reply is None:
            return await self._local.open_until()
        return reply.open_until if reply.state == "open" else None

    async def _step(self, op: str) -> _BreakerReply | None:
        """Run one step in Redis; ``None`` when Redis is unreachable (use the local breaker)."""
        if time.monotonic() < self._fallback_until:
            return None
        now = "" if self._clock is None else repr(self._clock())
        try:
            raw = await self._script(self._redis_keys, [op, now, *self._args, uuid.uuid4().hex])
        except (RedisConnectionError, RedisTimeoutError) as exc:
            if not self._quiet_fallback():
                logger.warning(
                    "Circuit breaker '%s': Redis at %s is unreachable (%s); using a local "
                    "breaker for now",
                    self._name,
                    _where(self._client),
                    type(exc).__name__,
                )
            self._fallback_until = time.monotonic() + _FALLBACK_RETRY
            return None
        except RedisError as exc:
            raise BackendError(
                f"Redis at {_where(self._client)} failed (circuit breaker): {exc}"
            ) from exc
        if self._fallback_until != -math.inf:
            logger.info("Circuit breaker '%s': Redis is back; shared state again", self._name)
            self._fallback_until = -math.inf
        reply = _BreakerReply.parse(raw, self._clock)
        for change in reply.changes:
            old, new = change.split(">")
            if old != new:
                level = logging.WARNING if new == "open" else logging.INFO
                logger.log(
                    level, "Circuit breaker '%s' state changed: %s -> %s", self._name, old, new
                )
        return reply

    def _quiet_fallback(self) -> bool:
        """Whether the fallback was already announced (during this outage)."""
        return self._fallback_until != -math.inf


class _BreakerReply:
    """One step's answer, with Redis's times moved to this process's clock."""

    __slots__ = ("changes", "failures", "open_until", "retry_at", "state")

    def __init__(
        self,
        state: BreakerState,
        retry_at: float | None,
        open_until: float,
        failures: int,
        changes: list[str],
    ) -> None:
        self.state = state
        self.retry_at = retry_at
        self.open_until = open_until
        self.failures = failures
        self.changes = changes

    @classmethod
    def parse(cls, raw: Sequence[Any], clock: Callable[[], float] | None) -> _BreakerReply:
        state, retry, open_until, failures, server_now, *changes = (
            _text(value) if isinstance(value, bytes) else value for value in raw
        )
        # Times come in the clock the script used: translate Redis's into ours.
        shift = 0.0 if clock is not None else time.time() - float(server_now)
        name: BreakerState = "closed"
        if state == "open":
            name = "open"
        elif state == "half_open":
            name = "half_open"
        return cls(
            name,
            None if retry == "" else float(retry) + shift,
            float(open_until) + shift,
            int(failures),
            [str(change) for change in changes],
        )


class RedisBackend:
    """Every Redis part on one client and one key prefix.

    Example:
        ```python
        backend = RedisBackend("redis://127.0.0.1:6379/0", prefix="hospital_bulk")
        jobs = backend.job_store()
        keys = backend.idempotency_store(jobs)
        ```

    Args:
        target: A URL (``"redis://host:6379/0"``), a `redis.asyncio.Redis`, or a
            `redis.asyncio.ConnectionPool`.
        prefix: The first part of every key.

    Raises:
        ConfigurationError: The URL or the prefix is wrong.
    """

    def __init__(
        self,
        target: str | aioredis.Redis | aioredis.ConnectionPool,
        *,
        prefix: str = DEFAULT_PREFIX,
    ) -> None:
        self._owned = not isinstance(target, aioredis.Redis)
        self.client = connect(target)
        self.keys = RedisKeys(prefix)

    def job_store(
        self, *, retention: float = DEFAULT_RETENTION, clock: Callable[[], float] = time.time
    ) -> RedisJobStore:
        """Return a `RedisJobStore` on this backend."""
        return RedisJobStore(self.client, keys=self.keys, retention=retention, clock=clock)

    def idempotency_store(
        self, jobs: RedisJobStore, *, clock: Callable[[], float] = time.time
    ) -> RedisIdempotencyStore:
        """Return a `RedisIdempotencyStore` creating its jobs in `jobs`."""
        return RedisIdempotencyStore(jobs, clock=clock)

    def rate_limiter(self, **options: Any) -> RedisRateLimiter:
        """Return a `RedisRateLimiter` on this backend (options as its constructor's)."""
        return RedisRateLimiter(self.client, keys=self.keys, **options)

    def circuit_breaker(self, name: str = "hospital_api", **options: Any) -> RedisCircuitBreaker:
        """Return a `RedisCircuitBreaker` on this backend (options as its constructor's)."""
        return RedisCircuitBreaker(self.client, name, keys=self.keys, **options)

    def owns(self, store: object) -> bool:
        """Return whether `store` is a `RedisJobStore` on this backend's client."""
        return isinstance(store, RedisJobStore) and store._client is self.client

    async def ping(self) -> bool:
        """Return whether Redis answers."""
        try:
            return bool(await self.client.ping())
        except (RedisError, OSError):
            return False

    async def aclose(self) -> None:
        """Close the client's connections, when the backend made the client."""
        if self._owned:
            await self.client.aclose()


if TYPE_CHECKING:
    # The parts satisfy the Protocols (checked by mypy only).
    def _conforms(
        jobs: RedisJobStore,
        keys: RedisIdempotencyStore,
        limiter: RedisRateLimiter,
        breaker: RedisCircuitBreaker,
    ) -> tuple[JobStore, IdempotencyStore, RateLimiter, CircuitBreaker]:
        return jobs, keys, limiter, breaker
