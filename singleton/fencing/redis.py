"""The fencing guard for data the job keeps in Redis: one Lua script checks and raises the
resource's token, records the run ID, and applies the caller's writes, atomically.

Usage, with the job's writes given as commands whose first argument is their key::

    fence(client, "orders", ctx.token, ctx.run_id,
          ("HSET", "{orders}:totals", "2026-12-01", "1234"),
          ("RPUSH", "{orders}:log", ctx.run_id))

Stale token → :class:`~singleton.errors.StaleToken`; the run applied before →
:class:`~singleton.errors.AlreadyApplied`; either way nothing was written. Keys:
``singleton:fence:{<resource>}:token`` (the highest accepted token) and
``…:{<resource>}:runs`` (a sorted set of applied run IDs scored by token). On Redis Cluster,
put the resource in braces in your own keys too (``{orders}:totals``), so that the guard
and the writes live in one slot.

Redis has no rollback: a write that fails inside the script (say ``WRONGTYPE``) leaves the
writes before it applied. The token and the run are recorded only after every write
succeeded, so such a run is neither fenced in nor recorded as applied.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import redis

from singleton.errors import AlreadyApplied, StaleToken

#: A write: a command name, its key, then its other arguments, e.g. ``("SET", "k", "v")``.
Write = Sequence[Any]

DEFAULT_PREFIX = "singleton:fence"

# KEYS: token, runs, then the key of each write
# ARGV: token, run ID ('' for none), runs to keep (0 = all), then per write:
#       the count of its other arguments, its command, those arguments
# → {1, {reply of each write}} | {0, highest accepted token} | {-1, token it was applied under}
_GUARD = """
local token = tonumber(ARGV[1])
local highest = redis.call('GET', KEYS[1])
if highest and token < tonumber(highest) then return {0, highest} end
if ARGV[2] ~= '' then
  local before = redis.call('ZSCORE', KEYS[2], ARGV[2])
  if before then return {-1, before} end
end
local replies, at = {}, 4
for w = 3, #KEYS do
  local argc = tonumber(ARGV[at])
  local call = {ARGV[at + 1], KEYS[w]}
  for j = 1, argc do call[#call + 1] = ARGV[at + 1 + j] end
  replies[#replies + 1] = redis.call(unpack(call))
  at = at + 2 + argc
end
if not highest or token > tonumber(highest) then redis.call('SET', KEYS[1], ARGV[1]) end
if ARGV[2] ~= '' then
  redis.call('ZADD', KEYS[2], ARGV[1], ARGV[2])
  local keep = tonumber(ARGV[3])
  if keep > 0 then redis.call('ZREMRANGEBYRANK', KEYS[2], 0, -keep - 1) end
end
return {1, replies}
"""


class RedisFence:
    """The guard on one client, its script registered once (EVALSHA, reloaded on NOSCRIPT).

    ``keep_runs`` bounds the applied-run record per resource to the newest N runs by token
    (0 keeps them all): a takeover repeats a run within minutes, not months.
    """

    def __init__(
        self, client: redis.Redis, prefix: str = DEFAULT_PREFIX, keep_runs: int = 0
    ) -> None:
        self.client = client
        self.prefix = prefix
        self.keep_runs = keep_runs
        self._script = client.register_script(_GUARD)

    def keys(self, resource: str) -> tuple[str, str]:
        """The token key and the applied-runs key of ``resource``."""
        base = f"{self.prefix}:{{{resource}}}:"
        return base + "token", base + "runs"

    def apply(
        self, resource: str, token: int, run_id: str | None = None, *writes: Write
    ) -> list[Any]:
        """Apply ``writes`` unless ``token`` is below the highest ``resource`` has accepted
        (an equal token passes: one run may write several times) or, given ``run_id``,
        unless that run was applied before. Returns each write's reply."""
        keys = list(self.keys(resource))
        args: list[Any] = [token, run_id or "", self.keep_runs]
        for write in writes:
            if len(write) < 2:
                raise ValueError(f"a fenced write needs a command and a key, got {write!r}")
            command, key, *rest = write
            keys.append(key)
            args += [len(rest), command, *rest]
        status, detail = self._script(keys=keys, args=args)
        if status == 0:
            raise StaleToken(
                f"resource {resource!r}: token {token} is lower than {_int(detail)},"
                " already accepted"
            )
        if status == -1:
            raise AlreadyApplied(
                f"resource {resource!r}: run {run_id} was already applied under token"
                f" {_int(detail)}"
            )
        return list(detail)

    def highest(self, resource: str) -> int | None:
        """The highest token ``resource`` has accepted, or None."""
        value = self.client.get(self.keys(resource)[0])
        return None if value is None else _int(value)

    def applied(self, resource: str, run_id: str) -> int | None:
        """The token under which ``run_id`` was applied to ``resource``, or None."""
        score = self.client.zscore(self.keys(resource)[1], run_id)
        return None if score is None else int(score)


def fence(
    client: redis.Redis, resource: str, token: int, run_id: str | None = None, *writes: Write
) -> list[Any]:
    """:meth:`RedisFence.apply` with the default prefix (registers the script each call:
    keep a :class:`RedisFence` for a hot path)."""
    return RedisFence(client).apply(resource, token, run_id, *writes)


def _int(value: Any) -> int:
    return int(value.decode() if isinstance(value, bytes) else value)
