"""``redis://``, ``rediss://``, ``unix://``: locks, ledger and shared state on one Redis
server.

Why these choices:

* The lock is a string with ``SET key owner NX PX ttl`` semantics; the owner is unique per
  acquisition, so renew and release compare it on the server (never GET-then-DEL from
  Python). The fencing token is an ``INCR`` of a counter **in the same script** as the
  acquisition: no token is issued without the lock, nor the lock granted without a token.
* Every step is one Lua script (:class:`Scripts`), registered once and run with EVALSHA;
  redis-py reloads a script after ``NOSCRIPT`` (a restarted server, ``SCRIPT FLUSH``). The
  fused fast paths are one script each: acquire + token + ledger claim, and ledger finish
  + release. :class:`Scripts` and :class:`KeySpace` take a client and a prefix only, so a
  Redlock backend can run the same scripts on each of its nodes.
* Keys are ``singleton:<prefix>:{<job>}:…``: one job's keys share the hash tag ``{<job>}``,
  so every script touches one Redis Cluster slot and different jobs spread across slots.
  Scripts build the attempt keys they read from that tag (as BullMQ does with its queue
  tag) because which attempt is the latest is known only on the server.
* Fencing is declared only when the server says ``appendonly yes`` and ``appendfsync
  always`` and evicts no key without a TTL (``CONFIG GET``), or, where ``CONFIG`` is
  disabled (managed Redis), when the ``durable: true`` option says so: with ``everysec``
  the last second of tokens can be lost in a crash, without persistence a restart resets
  the counter to zero, and an ``allkeys-*`` policy may evict it.
* The ledger lives on the same server as the counter, so a server that lost its counter
  lost the ledger's highest token with it: the backend therefore also remembers, in this
  process, the highest token it has seen per lock (its grants, a busy lock's counter, the
  ledger's highest) and reports it in :attr:`Claim.highest`; the runner's regression check
  then sees a reset that the server itself has forgotten.
* Standbys wait on pub/sub: a release publishes on the lock's channel; each backend object
  has one subscriber connection (a pattern over its prefix) and one listener thread. A
  missed message (a lease that simply expired, a reconnect) costs at most the caller's
  bounded wait.
* Shared state (fleet fingerprints, operator switches) is one hash of values, one sorted
  set of the keys at score 0 (``ZRANGEBYLEX`` finds a prefix in O(log n + found), never a
  walk of the keyspace) and one sorted set of deadlines by the server's ``TIME``, all under
  one hash tag (:class:`StateKeys`), so every state script names all it touches. A read
  skips an entry past its deadline; each write and ``prune`` delete a bounded batch of
  those. No thread, and no Redis key expiry: one key per entry with ``PX`` would leave its
  index member behind when Redis expired it, and a hash field has no TTL before Redis 7.4.
* Socket and connect timeouts are short (``timeout``, default 0.5 s) and redis-py retries
  a failed connection once, at once, on a new socket: a cut connection costs one retry, a
  paused or partitioned server a ``BackendUnavailable`` after ``timeout`` (timeouts are not
  retried), so the lease keeper reaches its deadline at most one ``timeout`` late. Every
  redis-py error is translated at this boundary.
"""

from __future__ import annotations

import random
import re
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast
from urllib.parse import urlsplit

import redis
from redis import exceptions as rex
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from singleton.backends.base import (
    RUNNING,
    Attempt,
    Capabilities,
    Claim,
    Holder,
    Lease,
    Outcome,
    Run,
    lease_deadline,
    owner_replica,
)
from singleton.clock import SYSTEM_CLOCK, Clock, iso_z, parse_iso
from singleton.durations import parse_duration
from singleton.errors import BackendError, BackendUnavailable, ConfigError, LeaseLost
from singleton.urls import redact

DEFAULT_PREFIX = "default"
#: Why a Redis without durable writes cannot fence (see docs/backends/redis.md).
NO_FENCING = (
    "its token counter is not durable: it needs appendonly yes, appendfsync always and no"
    " allkeys-* eviction, or 'durable: true' where CONFIG is disabled"
)
#: Socket and connect timeout of every command, in seconds.
DEFAULT_TIMEOUT = 0.5
#: How many attempts each ``prune`` script examines at most, so no script blocks Redis long.
PRUNE_BATCH = 500
#: Expired shared-state entries each ``put`` deletes at most: every entry was written by a
#: put, so this keeps up with them, and no put pays for a backlog in one go.
STATE_PURGE_BATCH = 10
#: Longest a woken standby waits before it returns, so fifty of them do not all try at once.
WAKE_JITTER = 0.05
#: A standby wakes this long after the holder's lease should have expired (the server
#: counted its TTL from before our request, so the estimate is already a little late).
EXPIRY_MARGIN = 0.002
#: Back-off of the listener thread while it cannot reach the server.
LISTEN_BACKOFF = (0.1, 2.0)
#: Longest pause between two polls of a standby that has no subscription.
POLL_BACKOFF_CAP = 2.0

_PREFIX = re.compile(r"[A-Za-z0-9._-]{1,64}")


# -- keys -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobKeys:
    """The keys of one job (one lock name); all share the hash tag ``{<job>}``."""

    base: str  # "singleton:<prefix>:{<job>}:"

    @property
    def lock(self) -> str:
        """String: the owner of the live lease, with the lease's TTL."""
        return self.base + "lock"

    @property
    def token(self) -> str:
        """Integer: the last fencing token issued; never expires, never goes down."""
        return self.base + "token"

    @property
    def runs(self) -> str:
        """Hash: run ID → number of its latest attempt."""
        return self.base + "runs"

    @property
    def index(self) -> str:
        """Sorted set: ``<run ID>:<attempt>`` scored by the server time of insertion (µs)."""
        return self.base + "attempts"

    @property
    def highest(self) -> str:
        """Integer: the highest token the ledger has recorded; kept when attempts are pruned."""
        return self.base + "highest"

    @property
    def attempts(self) -> str:
        """The prefix of the attempt hashes: ``<attempts><run ID>:<attempt>``."""
        return self.base + "attempt:"

    @property
    def channel(self) -> str:
        """Pub/sub channel told of each release."""
        return self.base + "released"

    def attempt(self, run_id: str, number: int) -> str:
        return f"{self.attempts}{run_id}:{number}"


@dataclass(frozen=True)
class StateKeys:
    """The keys of the shared state (:class:`~singleton.backends.base.SharedState`). They
    share the hash tag ``{@state}``, which no job can have (``@`` is not allowed in a job
    name), so every state script touches one Cluster slot of its own."""

    base: str  # "singleton:<prefix>:{@state}:"

    @property
    def values(self) -> str:
        """Hash: key → value."""
        return self.base + "values"

    @property
    def index(self) -> str:
        """Sorted set: every key, at score 0, so ``ZRANGEBYLEX`` finds a prefix's keys."""
        return self.base + "index"

    @property
    def expires(self) -> str:
        """Sorted set: key → its deadline in ms by the server's ``TIME``, for keys put with a
        TTL only."""
        return self.base + "expires"

    @property
    def all(self) -> list[str]:
        """The KEYS of every state script, in this order."""
        return [self.values, self.index, self.expires]


@dataclass(frozen=True)
class KeySpace:
    """Where one ``prefix`` keeps its keys: several applications can share one Redis."""

    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        if not _PREFIX.fullmatch(self.prefix):
            raise ConfigError(f"backend.prefix {self.prefix!r}: use 1 to 64 of A-Z a-z 0-9 . _ -")

    @property
    def root(self) -> str:
        return f"singleton:{self.prefix}:"

    def job(self, name: str) -> JobKeys:
        return JobKeys(f"{self.root}{{{name}}}:")

    @property
    def jobs(self) -> str:
        """Set of job names with a ledger, for ``history`` of all jobs and ``prune``. It has
        no hash tag of its own: only plain commands touch it, never a script."""
        return self.root + "jobs"

    @property
    def state(self) -> StateKeys:
        return StateKeys(f"{self.root}{{@state}}:")

    @property
    def released(self) -> str:
        """The pattern matching every lock's release channel under this prefix."""
        return self.root + "{*}:released"

    def job_of_channel(self, channel: str) -> str:
        return channel[len(self.root) + 1 : -len("}:released")]


# -- scripts ----------------------------------------------------------------------------------

# Helpers shared by the ledger scripts (prepended to them; a script cannot call another).
LEDGER_LIB = """
local function read(key)
  local row = redis.call('HGETALL', key)
  if #row == 0 then return false end
  return row
end

-- A score above the index's last one: the server's time in microseconds (one clock for
-- every replica), nudged up if the clock stepped back.
local function next_score(index)
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
  local last = redis.call('ZRANGE', index, -1, -1, 'WITHSCORES')
  if last[2] and tonumber(last[2]) >= now then now = tonumber(last[2]) + 1 end
  return string.format('%.0f', now)
end

local function insert(runs, index, prefix, run_id, n, fields)
  redis.call('HSET', prefix .. run_id .. ':' .. n, unpack(fields))
  redis.call('HSET', runs, run_id, n)
  redis.call('ZADD', index, next_score(index), run_id .. ':' .. n)
end

-- The claim (see Ledger.claim): returns {latest as found, the number of the attempt it
-- wrote or false, highest}. The caller has every field of the attempt it wrote (it sent
-- them), so the row is not read back: that saved a fifth of the fast path's time. A run
-- whose latest attempt succeeded is done, whatever the caller saw: nothing is written.
local function claim(runs, index, highest_key, prefix, run_id, seen, start, token,
                     job, replica, scheduled_at, ts, now)
  local n = tonumber(redis.call('HGET', runs, run_id) or '0')
  local latest, state = false, false
  if n > 0 then
    latest = read(prefix .. run_id .. ':' .. n)
    state = redis.call('HGET', prefix .. run_id .. ':' .. n, 'state')
  end
  local highest = tonumber(redis.call('GET', highest_key) or '0')
  if n ~= seen or state == 'succeeded' then return {latest, false, highest} end
  if state == 'running' then
    redis.call('HSET', prefix .. run_id .. ':' .. n, 'state', 'abandoned', 'finished_at', now)
  end
  if start ~= '1' then return {latest, false, highest} end
  insert(runs, index, prefix, run_id, n + 1, {
    'run_id', run_id, 'job', job, 'attempt', n + 1, 'state', 'running', 'token', token,
    'replica', replica, 'scheduled_at', scheduled_at, 'ts', ts, 'started_at', now})
  if tonumber(token) > highest then redis.call('SET', highest_key, token) end
  return {latest, n + 1, highest}
end
"""

_ACQUIRE_LIB = """
-- SET NX PX with a token: {1, token} when granted, {0, counter, ms the holder's lease has
-- left} when busy. A retried request that got through the first time finds its own owner
-- (unique per acquisition) and is granted again with the same token.
local function acquire(lock, counter, owner, ttl)
  local held = redis.call('GET', lock)
  if held == owner then return {1, tonumber(redis.call('GET', counter))} end
  if held then
    return {0, tonumber(redis.call('GET', counter) or '0'), redis.call('PTTL', lock)}
  end
  local token = redis.call('INCR', counter)
  redis.call('SET', lock, owner, 'PX', ttl)
  return {1, token}
end
"""

_RELEASE_LIB = """
-- Let go if still ours; with keep > 0 only shorten the TTL to keep ms (never lengthen).
local function release(lock, owner, keep, channel)
  if redis.call('GET', lock) ~= owner then return 0 end
  if tonumber(keep) > 0 then
    if redis.call('PTTL', lock) > tonumber(keep) then redis.call('PEXPIRE', lock, keep) end
    return 1
  end
  redis.call('DEL', lock)
  redis.call('PUBLISH', channel, owner)
  return 1
end
"""

_FINISH_LIB = """
local function finish(key, token, state, err, reason, now)
  if redis.call('HGET', key, 'state') ~= 'running' or redis.call('HGET', key, 'token') ~= token
  then return 0 end
  redis.call('HSET', key, 'state', state, 'finished_at', now)
  if err ~= '' then redis.call('HSET', key, 'error', err) end
  if reason ~= '' then redis.call('HSET', key, 'reason', reason) end
  return 1
end
"""


# Helpers of the shared-state scripts (prepended to them). KEYS of every one: values,
# index, expires (StateKeys.all). Keys are ASCII (SharedState), so '\255' sorts above every
# key that starts with a prefix, and ZRANGEBYLEX reads exactly that prefix's keys.
STATE_LIB = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function forget(values, index, expires, key)
  redis.call('HDEL', values, key)
  redis.call('ZREM', index, key)
  redis.call('ZREM', expires, key)
end

-- Deletes up to `batch` entries whose deadline has passed; how many went.
local function purge(values, index, expires, now, batch)
  local gone = redis.call('ZRANGEBYSCORE', expires, '-inf', now, 'LIMIT', 0, batch)
  for _, key in ipairs(gone) do forget(values, index, expires, key) end
  return #gone
end

-- ttl: ms, or '' for none (a deadline left by an earlier put goes).
local function store(values, index, expires, key, value, ttl, now)
  redis.call('HSET', values, key, value)
  redis.call('ZADD', index, 0, key)
  if ttl == '' then
    redis.call('ZREM', expires, key)
  else
    redis.call('ZADD', expires, now + tonumber(ttl), key)
  end
end

-- {key, value, ...}: the entries under `prefix` whose deadline, if any, is after `now`.
local function range(values, index, expires, prefix, now)
  local found = {}
  for _, key in ipairs(redis.call('ZRANGEBYLEX', index, '[' .. prefix, '(' .. prefix .. '\\255')) do
    local deadline = redis.call('ZSCORE', expires, key)
    if not deadline or tonumber(deadline) > now then
      found[#found + 1] = key
      found[#found + 1] = redis.call('HGET', values, key)
    end
  end
  return found
end
"""


class Scripts:
    """The Lua steps of the Redis backends, registered once on ``client``.

    Each method is one round trip. Keys come from :class:`JobKeys`; times are ISO-8601
    strings made by the caller's clock (ledger records), except the index scores, which
    come from the server's ``TIME`` so that every replica orders history the same way.
    """

    # KEYS: lock, token   ARGV: owner, ttl (ms)
    # → {1, token} granted | {0, counter} busy
    ACQUIRE = _ACQUIRE_LIB + "return acquire(KEYS[1], KEYS[2], ARGV[1], ARGV[2])"

    # KEYS: lock   ARGV: owner, ttl (ms)   → 1 extended | 0 not ours
    RENEW = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""

    # KEYS: lock   ARGV: owner, keep (ms), channel   → 1 released | 0 not ours
    RELEASE = _RELEASE_LIB + "return release(KEYS[1], ARGV[1], ARGV[2], ARGV[3])"

    # KEYS: lock, token   → {owner or false, pttl (ms), counter}
    HOLDER = """
return {redis.call('GET', KEYS[1]), redis.call('PTTL', KEYS[1]),
        tonumber(redis.call('GET', KEYS[2]) or '0')}
"""

    # KEYS: lock, token   ARGV: token_above, channel   → the counter
    EVICT = """
local counter = tonumber(redis.call('GET', KEYS[2]) or '0')
if tonumber(ARGV[1]) > counter then
  counter = tonumber(ARGV[1])
  redis.call('SET', KEYS[2], ARGV[1])
end
if redis.call('DEL', KEYS[1]) == 1 then redis.call('PUBLISH', ARGV[2], '') end
return counter
"""

    # KEYS: lock, runs, attempts index, highest
    # ARGV: owner, attempt prefix, run ID, seen, start (1/0), token, job, replica,
    #       scheduled_at, scheduled epoch, now
    # → {latest, attempt, highest} | error 'lease lost'
    CLAIM = (
        LEDGER_LIB
        + """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return redis.error_reply('lease lost') end
return claim(KEYS[2], KEYS[3], KEYS[4], ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5], ARGV[6],
             ARGV[7], ARGV[8], ARGV[9], ARGV[10], ARGV[11])
"""
    )

    # KEYS: lock, token, runs, attempts index, highest
    # ARGV: owner, ttl (ms), attempt prefix, run ID, job, replica, scheduled_at,
    #       scheduled epoch, now
    # → {0, counter} busy | {1, token, latest, attempt, highest}
    ACQUIRE_AND_CLAIM = (
        _ACQUIRE_LIB
        + LEDGER_LIB
        + """
local got = acquire(KEYS[1], KEYS[2], ARGV[1], ARGV[2])
if got[1] == 0 then return got end
local c = claim(KEYS[3], KEYS[4], KEYS[5], ARGV[3], ARGV[4], 0, '1',
                string.format('%.0f', got[2]),
                ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9])
return {1, got[2], c[1], c[2], c[3]}
"""
    )

    # KEYS: attempt   ARGV: token, state, error ('' for none), reason ('' for none), now
    # → 1 | 0 stale
    # Fenced by the attempt's own token and running state (a takeover marks it abandoned),
    # not by the lock: an overlap: allow job lets go of its lock right after the claim and
    # must still record its outcome.
    FINISH = _FINISH_LIB + "return finish(KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5])"

    # KEYS: attempt, lock   ARGV: token, state, error, reason, now, owner, keep (ms), channel
    # → 1 | 0 stale (released either way)
    FINISH_AND_RELEASE = (
        _FINISH_LIB
        + _RELEASE_LIB
        + """
local done = finish(KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5])
release(KEYS[2], ARGV[6], ARGV[7], ARGV[8])
return done
"""
    )

    # KEYS: runs, attempts index
    # ARGV: attempt prefix, run ID, job, replica, scheduled_at, scheduled epoch, reason, now
    # → 1 written | 0 the run has an attempt already
    SKIP = (
        LEDGER_LIB
        + """
if redis.call('HEXISTS', KEYS[1], ARGV[2]) == 1 then return 0 end
insert(KEYS[1], KEYS[2], ARGV[1], ARGV[2], 1, {
  'run_id', ARGV[2], 'job', ARGV[3], 'attempt', 1, 'state', 'skipped', 'replica', ARGV[4],
  'scheduled_at', ARGV[5], 'ts', ARGV[6], 'reason', ARGV[7], 'finished_at', ARGV[8]})
return 1
"""
    )

    # KEYS: runs   ARGV: attempt prefix, run ID   → the run's attempts, newest first
    ATTEMPTS = """
local n = tonumber(redis.call('HGET', KEYS[1], ARGV[2]) or '0')
local rows = {}
for i = n, 1, -1 do
  local row = redis.call('HGETALL', ARGV[1] .. ARGV[2] .. ':' .. i)
  if #row > 0 then rows[#rows + 1] = row end
end
return rows
"""

    # KEYS: attempts index   ARGV: attempt prefix, limit (0 = all)
    # → {score, attempt, score, attempt, …}, newest first
    HISTORY = """
local members = redis.call('ZREVRANGE', KEYS[1], 0, tonumber(ARGV[2]) - 1, 'WITHSCORES')
local rows = {}
for i = 1, #members, 2 do
  local row = redis.call('HGETALL', ARGV[1] .. members[i])
  if #row > 0 then
    rows[#rows + 1] = members[i + 1]
    rows[#rows + 1] = row
  end
end
return rows
"""

    # KEYS: attempts index, runs   ARGV: attempt prefix, before (epoch), keep, after, batch
    # Deletes, among the next `batch` attempts scored above `after` (oldest first), those
    # not running whose firing is older than `before` or beyond the newest `keep`.
    # → {deleted, last score examined or false when the index is done}
    PRUNE = """
local members = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. ARGV[4], '+inf', 'WITHSCORES',
                           'LIMIT', 0, tonumber(ARGV[5]))
local deleted, before, keep = 0, tonumber(ARGV[2]), tonumber(ARGV[3])
for i = 1, #members, 2 do
  local member, key = members[i], ARGV[1] .. members[i]
  local row = redis.call('HMGET', key, 'state', 'ts', 'run_id', 'attempt')
  local old = row[2] and tonumber(row[2]) < before
  local surplus = redis.call('ZREVRANK', KEYS[1], member) >= keep
  if not row[1] or (row[1] ~= 'running' and (old or surplus)) then
    redis.call('DEL', key)
    redis.call('ZREM', KEYS[1], member)
    if row[3] and redis.call('HGET', KEYS[2], row[3]) == row[4] then
      redis.call('HDEL', KEYS[2], row[3])
    end
    deleted = deleted + 1
  end
end
if #members < 2 * tonumber(ARGV[5]) then return {deleted, false} end
return {deleted, members[#members]}
"""

    # KEYS: values, index, expires   ARGV: key, value, ttl (ms, '' for none), purge batch
    # Expired entries are deleted a few at a time here, so none pile up without a thread.
    STATE_PUT = (
        STATE_LIB
        + """
local now = now_ms()
purge(KEYS[1], KEYS[2], KEYS[3], now, tonumber(ARGV[4]))
store(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2], ARGV[3], now)
return 1
"""
    )

    # KEYS: values, index, expires   ARGV: prefix   → {key, value, …} live under the prefix
    # Read-only: an expired entry is skipped, not deleted (puts and prune do that).
    STATE_SCAN = STATE_LIB + "return range(KEYS[1], KEYS[2], KEYS[3], ARGV[1], now_ms())"

    # KEYS: values, index, expires   ARGV: key   → 1
    STATE_DELETE = STATE_LIB + "forget(KEYS[1], KEYS[2], KEYS[3], ARGV[1]) return 1"

    # KEYS: values, index, expires   ARGV: batch   → how many expired entries went
    STATE_PURGE = STATE_LIB + "return purge(KEYS[1], KEYS[2], KEYS[3], now_ms(), ARGV[1])"

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._scripts = {
            name: client.register_script(getattr(self, name))
            for name in (
                "ACQUIRE",
                "RENEW",
                "RELEASE",
                "HOLDER",
                "EVICT",
                "CLAIM",
                "ACQUIRE_AND_CLAIM",
                "FINISH",
                "FINISH_AND_RELEASE",
                "SKIP",
                "ATTEMPTS",
                "HISTORY",
                "PRUNE",
                "STATE_PUT",
                "STATE_SCAN",
                "STATE_DELETE",
                "STATE_PURGE",
            )
        }

    def load(self) -> None:
        """Load every script in one round trip, so no first call pays a NOSCRIPT."""
        pipe = self.client.pipeline(transaction=False)
        for script in self._scripts.values():
            pipe.script_load(script.script)
        pipe.execute()

    def run(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        return self._scripts[name](keys=list(keys), args=list(args))

    # -- the lock -----------------------------------------------------------------------------

    def acquire(self, keys: JobKeys, owner: str, ttl: float) -> tuple[bool, int]:
        """(granted, token) or (False, the counter as it is)."""
        got = self.run("ACQUIRE", [keys.lock, keys.token], [owner, milliseconds(ttl)])
        return bool(got[0]), int(got[1])

    def renew(self, keys: JobKeys, owner: str, ttl: float) -> bool:
        return bool(self.run("RENEW", [keys.lock], [owner, milliseconds(ttl)]))

    def release(self, keys: JobKeys, owner: str, keep_for: float = 0.0) -> bool:
        keep = milliseconds(keep_for) if keep_for > 0 else 0
        return bool(self.run("RELEASE", [keys.lock], [owner, keep, keys.channel]))

    def holder(self, keys: JobKeys) -> tuple[str | None, float | None, int]:
        """(owner or None, seconds left or None, counter)."""
        owner, pttl, counter = self.run("HOLDER", [keys.lock, keys.token], [])
        left = int(pttl) / 1000 if int(pttl) >= 0 else None
        return owner, left, int(counter)

    def evict(self, keys: JobKeys, token_above: int) -> int:
        return int(self.run("EVICT", [keys.lock, keys.token], [token_above, keys.channel]))

    # -- the ledger ---------------------------------------------------------------------------

    def claim(
        self, keys: JobKeys, run: Run, lease: Lease, seen: int, start: bool, now: datetime
    ) -> Claim:
        try:
            fields = _attempt_args(run, lease.owner, now)
            found = self.run(
                "CLAIM",
                [keys.lock, keys.runs, keys.index, keys.highest],
                [
                    lease.owner,
                    keys.attempts,
                    run.run_id,
                    seen,
                    int(start),
                    lease.token,
                    *fields,
                ],
            )
        except rex.ResponseError as exc:
            if "lease lost" not in str(exc):
                raise
            raise LeaseLost(f"lock {lease.name!r}: lease with token {lease.token} is gone") from exc
        return _claim(found, run, lease.token, fields)

    def acquire_and_claim(
        self, keys: JobKeys, run: Run, ttl: float, owner: str, now: datetime
    ) -> tuple[int, Claim | None, float | None]:
        """(token, claim, None) when granted; (the counter, None, seconds the holder's lease
        has left) when busy."""
        fields = _attempt_args(run, owner, now)
        got = self.run(
            "ACQUIRE_AND_CLAIM",
            [keys.lock, keys.token, keys.runs, keys.index, keys.highest],
            [owner, milliseconds(ttl), keys.attempts, run.run_id, *fields],
        )
        token = int(got[1])
        if not got[0]:
            left = int(got[2]) if len(got) > 2 else -1
            return token, None, left / 1000 if left >= 0 else None
        return token, _claim(got[2:], run, token, fields), None

    def finish(
        self, keys: JobKeys, run: Run, lease: Lease, attempt: int, outcome: Outcome, now: datetime
    ) -> bool:
        return bool(
            self.run(
                "FINISH",
                [keys.attempt(run.run_id, attempt)],
                [
                    lease.token,
                    outcome.state,
                    outcome.error or "",
                    outcome.reason or "",
                    iso_z(now, millis=True),
                ],
            )
        )

    def finish_and_release(
        self,
        keys: JobKeys,
        run: Run,
        lease: Lease,
        attempt: int,
        outcome: Outcome,
        now: datetime,
        keep_for: float = 0.0,
    ) -> bool:
        keep = milliseconds(keep_for) if keep_for > 0 else 0
        return bool(
            self.run(
                "FINISH_AND_RELEASE",
                [keys.attempt(run.run_id, attempt), keys.lock],
                [
                    lease.token,
                    outcome.state,
                    outcome.error or "",
                    outcome.reason or "",
                    iso_z(now, millis=True),
                    lease.owner,
                    keep,
                    keys.channel,
                ],
            )
        )

    def skip(self, keys: JobKeys, run: Run, reason: str, replica: str, now: datetime) -> bool:
        return bool(
            self.run(
                "SKIP",
                [keys.runs, keys.index],
                [
                    keys.attempts,
                    run.run_id,
                    run.job,
                    replica,
                    iso_z(run.scheduled_at),
                    repr(run.scheduled_at.timestamp()),
                    reason,
                    iso_z(now, millis=True),
                ],
            )
        )

    def attempts(self, keys: JobKeys, run_id: str) -> list[Attempt]:
        rows = self.run("ATTEMPTS", [keys.runs], [keys.attempts, run_id])
        return [attempt_from(row) for row in rows]

    def history(self, keys: JobKeys, limit: int) -> list[tuple[float, Attempt]]:
        """(score, attempt) pairs, newest first; the score orders attempts across jobs."""
        rows = self.run("HISTORY", [keys.index], [keys.attempts, limit])
        return [(float(rows[i]), attempt_from(rows[i + 1])) for i in range(0, len(rows), 2)]

    def prune(self, keys: JobKeys, before: datetime, keep: int) -> int:
        """Enforce retention on one job, :data:`PRUNE_BATCH` attempts per round trip."""
        gone, after = 0, "-inf"
        while True:
            deleted, last = self.run(
                "PRUNE",
                [keys.index, keys.runs],
                [keys.attempts, repr(before.timestamp()), keep, after, PRUNE_BATCH],
            )
            gone += int(deleted)
            if last is None:
                return gone
            after = last

    # -- shared state -------------------------------------------------------------------------

    def state_put(self, keys: StateKeys, key: str, value: str, ttl: float | None) -> None:
        ttl_ms = "" if ttl is None else milliseconds(ttl)
        self.run("STATE_PUT", keys.all, [key, value, ttl_ms, STATE_PURGE_BATCH])

    def state_scan(self, keys: StateKeys, prefix: str) -> dict[str, str]:
        found = self.run("STATE_SCAN", keys.all, [prefix])
        return dict(zip(found[::2], found[1::2], strict=True))

    def state_delete(self, keys: StateKeys, key: str) -> None:
        self.run("STATE_DELETE", keys.all, [key])

    def state_purge(self, keys: StateKeys) -> int:
        """Delete every expired entry, :data:`PRUNE_BATCH` per round trip."""
        gone = 0
        while True:
            went = int(self.run("STATE_PURGE", keys.all, [PRUNE_BATCH]))
            gone += went
            if went < PRUNE_BATCH:
                return gone


def milliseconds(seconds: float) -> int:
    """A TTL as Redis takes it: whole milliseconds, at least 1 (``PX 0`` is an error)."""
    return max(1, round(seconds * 1000))


def _attempt_args(run: Run, owner: str, now: datetime) -> list[Any]:
    return [
        run.job,
        owner_replica(owner),
        iso_z(run.scheduled_at),
        repr(run.scheduled_at.timestamp()),
        iso_z(now, millis=True),
    ]


def attempt_from(row: Sequence[str]) -> Attempt:
    """An attempt from the flat field list of its hash (``HGETALL``)."""
    return Attempt.from_record(dict(zip(row[::2], row[1::2], strict=True)))


def _claim(found: Sequence[Any], run: Run, token: int, fields: Sequence[Any]) -> Claim:
    """A claim script's answer: the latest attempt's row, the number of the attempt written
    (or nil), the highest token. The written attempt is built from ``fields``
    (:func:`_attempt_args`), the very strings its row holds, so it equals what reading the
    row back would give."""
    latest, written, highest = found
    attempt = None
    if written:
        _job, replica, scheduled_at, _ts, now = fields
        attempt = Attempt(
            run_id=run.run_id,
            job=run.job,
            attempt=int(written),
            state=RUNNING,
            token=token,
            replica=replica,
            scheduled_at=parse_iso(scheduled_at),
            started_at=parse_iso(now),
        )
    return Claim(attempt_from(latest) if latest else None, attempt, int(highest))


# -- connections and errors -------------------------------------------------------------------


def connect(url: str, timeout: float = DEFAULT_TIMEOUT, **kwargs: Any) -> redis.Redis:
    """A client for ``url`` with short timeouts and one immediate retry on a new socket.

    Only connection errors are retried: a timeout means a paused or partitioned server,
    and waiting for it again would only hold a renewal past its lease's deadline. URL
    mistakes become one-line :class:`ConfigError` without the password.
    """
    parts = urlsplit(url)
    database = parts.path.strip("/")
    if parts.scheme in ("redis", "rediss") and database and not database.isdigit():
        raise ConfigError(f"backend.url {redact(url)!r}: the path must be a database number")
    try:
        return redis.Redis.from_url(
            url,
            decode_responses=True,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(ExponentialBackoff(cap=0.05, base=0.01), 1, (rex.ConnectionError,)),
            **kwargs,
        )
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"backend.url {redact(url)!r}: {redact(str(exc))}") from None


@contextmanager
def translated(url: str) -> Iterator[None]:
    """redis-py's errors as ours: unreachable (including a server loading its data or
    demoted to a read-only replica) → BackendUnavailable, the rest → BackendError."""
    try:
        yield
    except (rex.AuthenticationError, rex.AuthorizationError) as exc:
        # Connection errors to redis-py, but retrying will not fix credentials.
        raise BackendError(f"redis {redact(url)}: {redact(str(exc))}") from exc
    except (rex.ConnectionError, rex.TimeoutError, rex.ReadOnlyError) as exc:
        raise BackendUnavailable(f"redis {redact(url)}: {redact(str(exc))}") from exc
    except rex.RedisError as exc:
        raise BackendError(f"redis {redact(url)}: {redact(str(exc))}") from exc


def durability(client: redis.Redis) -> bool | None:
    """Whether a token, once issued, survives anything short of losing the disk: the AOF is
    fsynced before each answer (``appendonly yes``, ``appendfsync always``) and no
    ``allkeys-*`` eviction policy may drop the counter under memory pressure. None where
    ``CONFIG`` is disabled or not allowed (managed Redis)."""
    pipe = client.pipeline(transaction=False)
    pipe.config_get("append*")
    pipe.config_get("maxmemory-policy")
    try:
        append, memory = cast(list[dict[str, str]], pipe.execute())
    except rex.ResponseError:
        return None
    return (
        append.get("appendonly") == "yes"
        and append.get("appendfsync") == "always"
        and not memory.get("maxmemory-policy", "").startswith("allkeys-")
    )


def _flag(value: object, what: str) -> bool | None:
    """A yes/no option, from YAML (a bool) or the environment (text)."""
    if value is None or isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "yes", "on", "1"):
        return True
    if text in ("false", "no", "off", "0"):
        return False
    raise ConfigError(f"backend.{what}: want true or false, got {value!r}")


def seconds_option(value: object, what: str) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ConfigError(f"backend.{what}: must be above zero, got {value!r}")
    return seconds


# -- standby notification ---------------------------------------------------------------------


class _Listener:
    """One subscriber connection and one thread per backend object: a pattern subscription
    over the prefix's release channels, turned into a count of releases per lock."""

    def __init__(self, client: redis.Redis, keys: KeySpace) -> None:
        self._client = client
        self._keys = keys
        self._cond = threading.Condition()
        self._released: dict[str, int] = {}
        self.subscribed = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="redis-released", daemon=True)
        self._thread.start()

    def released(self, name: str) -> int:
        with self._cond:
            return self._released.get(name, 0)

    def wait(self, name: str, seen: int, timeout: float) -> int:
        """Block until ``name`` is released after ``seen`` or ``timeout``; its count now."""
        with self._cond:
            self._cond.wait_for(lambda: self._released.get(name, 0) != seen, timeout)
            return self._released.get(name, 0)

    def _run(self) -> None:
        pause = LISTEN_BACKOFF[0]
        while not self._stop.is_set():
            pubsub = self._client.pubsub()  # type: ignore[no-untyped-call,unused-ignore]
            try:
                pubsub.psubscribe(self._keys.released)
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=0.5)
                    if not message:
                        continue
                    if message["type"] == "psubscribe":
                        self.subscribed.set()
                        pause = LISTEN_BACKOFF[0]
                    elif message["type"] == "pmessage":
                        self._note(self._keys.job_of_channel(message["channel"]))
            except (rex.RedisError, OSError, ValueError):
                # Unreachable: standbys poll (bounded) meanwhile; releases during the gap
                # are not replayed, which costs a standby at most one wait.
                self.subscribed.clear()
                self._stop.wait(pause * random.uniform(0.5, 1.0))
                pause = min(pause * 2, LISTEN_BACKOFF[1])
            finally:
                self.subscribed.clear()
                try:
                    pubsub.close()
                except (rex.RedisError, OSError):
                    pass
        self._client.close()

    def _note(self, name: str) -> None:
        with self._cond:
            self._released[name] = self._released.get(name, 0) + 1
            self._cond.notify_all()

    def close(self) -> None:
        """Stop listening; the thread lets go of its connection within its poll (0.5 s),
        so that closing many backends does not wait for each in turn."""
        self._stop.set()


# -- the backend ------------------------------------------------------------------------------


class RedisBackend:
    """Locks, ledger and shared state on one Redis server (or one Cluster slot per job, and
    one for the shared state).

    Options (``backend:`` keys beside ``url``): ``prefix`` (default ``default``): keys live
    under ``singleton:<prefix>:`` so several applications can share one Redis; ``timeout``
    (default 500ms): socket and connect timeout, which bounds every call; ``durable``:
    declares the server's persistence where ``CONFIG GET`` is disabled (``true`` only if it
    runs ``appendonly yes`` + ``appendfsync always``), or ``false`` to never claim fencing.
    """

    def __init__(
        self,
        url: str,
        clock: Clock = SYSTEM_CLOCK,
        prefix: object = DEFAULT_PREFIX,
        timeout: object = DEFAULT_TIMEOUT,
        durable: object = None,
    ) -> None:
        self.url = url
        self.keys = KeySpace(str(prefix))
        self._clock = clock
        self._timeout = seconds_option(timeout, "timeout")
        declared = _flag(durable, "durable")
        self._client = connect(url, self._timeout)
        self.scripts = Scripts(self._client)
        try:
            with self._errors():
                try:
                    self.scripts.load()
                    detected = durability(self._client)
                except TypeError as exc:  # an unknown ?option in the URL surfaces here
                    raise ConfigError(f"backend.url {redact(url)!r}: {exc}") from None
                except (rex.AuthenticationError, rex.NoPermissionError) as exc:
                    # Wrong credentials, or an ACL user that may not run scripts: both are
                    # fixed in the configuration, not by retrying.
                    raise ConfigError(f"backend.url {redact(url)!r}: {redact(str(exc))}") from None
            if declared and detected is False:
                raise ConfigError(
                    f"backend.durable: true, but {redact(url)} does not run appendonly yes"
                    " with appendfsync always"
                )
        except BaseException:
            self._client.close()
            raise
        # The server's word when it can be read (an explicit ``false`` still turns fencing
        # off); the operator's declaration where it cannot.
        fencing = bool(declared) if detected is None else detected and declared is not False
        self.capabilities = Capabilities(
            fencing=fencing,
            shared=True,
            notify=True,
            min_ttl=2 * self._timeout,
            fencing_note="" if fencing else NO_FENCING,
        )
        self._observed: dict[str, int] = {}
        self._known_jobs: set[str] = set()
        self._state_lock = threading.Lock()
        self._listener: _Listener | None = None
        self._seen = threading.local()

    @contextmanager
    def _errors(self) -> Iterator[None]:
        with translated(self.url):
            yield

    def _observe(self, name: str, token: int) -> int:
        """Remember ``token`` as seen for ``name``; return what was remembered before."""
        with self._state_lock:
            before = self._observed.get(name, 0)
            if token > before:
                self._observed[name] = token
            return before

    def _with_memory(self, name: str, claim: Claim) -> Claim:
        """``claim`` with ``highest`` raised to what this process saw before (see the
        module's notes: the ledger's own highest is lost with the counter)."""
        before = self._observe(name, claim.highest)
        if claim.latest is not None and claim.latest.token is not None:
            self._observe(name, claim.latest.token)
        if before > claim.highest:
            return Claim(claim.latest, claim.attempt, before)
        return claim

    def _busy(self, name: str, counter: int, left: float | None = None) -> None:
        """After a refused acquire: remember the counter, and the releases of ``name`` seen
        so far, so that a release before this thread's next :meth:`wait` is not missed; and
        when the holder's lease runs out (``left`` seconds), so that the wait ends then."""
        self._observe(name, counter)
        expiries = self._expiries()
        if left is not None:
            expiries[name] = self._clock.monotonic() + left + EXPIRY_MARGIN
        else:
            expiries.pop(name, None)
        listener = self._listener
        if listener is not None:
            self._seen_releases()[name] = listener.released(name)

    def _expiries(self) -> dict[str, float]:
        """Per thread: when the lease that last refused this thread expires (monotonic)."""
        return cast(dict[str, float], self._seen.__dict__.setdefault("expiries", {}))

    def _seen_releases(self) -> dict[str, int]:
        """Per thread: how many releases of each lock it has seen (see :meth:`wait`)."""
        return cast(dict[str, int], self._seen.__dict__.setdefault("released", {}))

    def _register(self, job: str) -> None:
        """Add ``job`` to the prefix's job set once per process (history and prune use it)."""
        if job in self._known_jobs:
            return
        with self._errors():
            self._client.sadd(self.keys.jobs, job)
        self._known_jobs.add(job)

    # -- lock -------------------------------------------------------------------------------

    def try_acquire(self, name: str, ttl: float, owner: str) -> Lease | None:
        sent = self._clock.monotonic()
        with self._errors():
            granted, token = self.scripts.acquire(self.keys.job(name), owner, ttl)
        if not granted:
            self._busy(name, token)
            return None
        return Lease(name, owner, token, ttl, lease_deadline(sent, ttl))

    def renew(self, lease: Lease) -> Lease:
        sent = self._clock.monotonic()
        with self._errors():
            kept = self.scripts.renew(self.keys.job(lease.name), lease.owner, lease.ttl)
        if not kept:
            raise LeaseLost(f"lock {lease.name!r}: lease with token {lease.token} is gone")
        return lease.renewed(lease_deadline(sent, lease.ttl))

    def release(self, lease: Lease, keep_for: float = 0.0) -> None:
        with self._errors():
            self.scripts.release(self.keys.job(lease.name), lease.owner, keep_for)

    def holder(self, name: str) -> Holder | None:
        with self._errors():
            owner, left, counter = self.scripts.holder(self.keys.job(name))
        if owner is None:
            return None
        return Holder(name, owner, counter, left)

    def wait(self, name: str, timeout: float) -> None:
        """Block until a release of ``name`` is published (then a short random delay, so
        that many standbys do not all try at the same instant) or ``timeout`` passes.

        A release published since this thread's last refused acquire of ``name`` (or its
        previous wait) returns at once: it came between that and this call. Without a
        subscription (a new one coming up, or the server unreachable) it polls the lock
        with back-off until the subscription is back.
        """
        end = self._clock.monotonic() + timeout
        # A dead holder never publishes a release: wake when its lease expires instead of
        # sleeping out the whole timeout (a SIGKILLed owner's firing started up to a
        # standby pause late). A live holder renews long before that, so this costs nothing.
        expiry = self._expiries().pop(name, None)
        if expiry is not None:
            end = min(end, max(expiry, self._clock.monotonic()))
        listener = self._listen()
        patience = self._timeout  # a new subscription needs a round trip or two
        while (left := end - self._clock.monotonic()) > 0:
            if listener.subscribed.wait(min(left, patience)):
                self._wait_released(listener, name, end)
                return
            patience = min(patience * 2, POLL_BACKOFF_CAP)
            try:
                if self.holder(name) is None:
                    return
            except BackendError:
                continue

    def _wait_released(self, listener: _Listener, name: str, end: float) -> None:
        seen = self._seen_releases()
        before = seen.get(name, listener.released(name))
        after = listener.wait(name, before, max(0.0, end - self._clock.monotonic()))
        seen[name] = after
        if after != before:
            left = max(0.0, end - self._clock.monotonic())
            self._clock.sleep(min(left, random.uniform(0, WAKE_JITTER)))

    def _listen(self) -> _Listener:
        with self._state_lock:
            if self._listener is None:
                # Its own connection pool: the health check (a PING when idle) that keeps a
                # subscription honest would cost the fast paths a round trip.
                client = connect(self.url, self._timeout, health_check_interval=10)
                self._listener = _Listener(client, self.keys)
            return self._listener

    def evict(self, name: str, token_above: int = 0) -> int:
        with self._errors():
            counter = self.scripts.evict(self.keys.job(name), token_above)
        self._observe(name, counter)
        return counter

    # -- ledger -----------------------------------------------------------------------------

    def claim(self, run: Run, lease: Lease, *, seen: int = 0, start: bool = True) -> Claim:
        self._register(run.job)
        with self._errors():
            claim = self.scripts.claim(
                self.keys.job(run.job), run, lease, seen, start, self._clock.now()
            )
        return self._with_memory(run.job, claim)

    def acquire_and_claim(self, run: Run, ttl: float, owner: str) -> tuple[Lease, Claim] | None:
        self._register(run.job)
        sent = self._clock.monotonic()
        with self._errors():
            token, claim, left = self.scripts.acquire_and_claim(
                self.keys.job(run.job), run, ttl, owner, self._clock.now()
            )
        if claim is None:
            self._busy(run.job, token, left)
            return None
        lease = Lease(run.job, owner, token, ttl, lease_deadline(sent, ttl))
        claim = self._with_memory(run.job, claim)
        self._observe(run.job, token)  # after: this claim's highest is what came before it
        return lease, claim

    def finish(self, run: Run, lease: Lease, attempt: int, outcome: Outcome) -> bool:
        with self._errors():
            return self.scripts.finish(
                self.keys.job(run.job), run, lease, attempt, outcome, self._clock.now()
            )

    def finish_and_release(
        self, run: Run, lease: Lease, attempt: int, outcome: Outcome, keep_for: float = 0.0
    ) -> bool:
        with self._errors():
            return self.scripts.finish_and_release(
                self.keys.job(run.job), run, lease, attempt, outcome, self._clock.now(), keep_for
            )

    def skip(self, run: Run, reason: str, replica: str) -> bool:
        self._register(run.job)
        with self._errors():
            return self.scripts.skip(
                self.keys.job(run.job), run, reason, replica, self._clock.now()
            )

    def attempts(self, run_id: str) -> list[Attempt]:
        job = run_id.split("@", 1)[0]
        with self._errors():
            return self.scripts.attempts(self.keys.job(job), run_id)

    def _jobs(self) -> list[str]:
        with self._errors():
            if self._known_jobs:
                # Re-registers what this process knows, in case the server lost the set.
                self._client.sadd(self.keys.jobs, *self._known_jobs)
            return sorted(cast(set[str], self._client.smembers(self.keys.jobs)))

    def history(self, job: str | None, limit: int) -> list[Attempt]:
        names = [job] if job is not None else self._jobs()
        found: list[tuple[float, Attempt]] = []
        with self._errors():
            for name in names:
                found += self.scripts.history(self.keys.job(name), limit)
        found.sort(key=lambda pair: pair[0], reverse=True)
        rows = [attempt for _, attempt in found]
        return rows[:limit] if limit else rows

    def prune(self, before: datetime, keep: int) -> int:
        """Retention per job; also deletes every expired shared-state entry (not counted:
        the count is of attempts)."""
        gone = 0
        for name in self._jobs():
            with self._errors():
                gone += self.scripts.prune(self.keys.job(name), before, keep)
        with self._errors():
            self.scripts.state_purge(self.keys.state)
        return gone

    # -- shared state -----------------------------------------------------------------------

    def put(self, key: str, value: str, ttl: float | None = None) -> None:
        """One script: the value, its key in the prefix index, and its deadline by the
        server's ``TIME`` (so replica clocks do not matter); a few expired entries go too."""
        with self._errors():
            self.scripts.state_put(self.keys.state, key, value, ttl)

    def scan(self, prefix: str) -> dict[str, str]:
        """A ``ZRANGEBYLEX`` of the prefix (bounded by what it finds, not by the keyspace),
        skipping entries past their deadline."""
        with self._errors():
            return self.scripts.state_scan(self.keys.state, prefix)

    def delete(self, key: str) -> None:
        with self._errors():
            self.scripts.state_delete(self.keys.state, key)

    def server_time(self) -> datetime | None:
        with self._errors():
            seconds, micros = self._client.time()
        return datetime.fromtimestamp(seconds + micros / 1e6, UTC)

    def close(self) -> None:
        with self._state_lock:
            listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        self._client.close()
