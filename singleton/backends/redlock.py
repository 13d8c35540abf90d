"""``redlock://h1:6379,h2:6379,h3:6379[/db]``: the lock on a quorum of independent Redis
masters (the Redlock algorithm), and the ledger and the shared state on a quorum of the
same nodes.

Why these choices:

* Every step runs the **same Lua scripts as the Redis backend** (:class:`Scripts`, keys from
  :class:`KeySpace`) on every node at once, one thread per node call, and waits for every
  answer (each bounded by ``timeout``). A majority decides: ``N // 2 + 1`` of an odd
  number, three or more, of independent masters. A node that is down refuses the connection
  at once; a paused or partitioned one costs each call one ``timeout``.
* A lease is granted when a majority granted it and time is left: the validity is the TTL
  minus the time the grant took (measured from when the requests were *sent*) minus the
  drift allowance (1 % of the TTL + 2 ms), which is :func:`lease_deadline`. A grant that
  arrives after its validity is released on every node and reported as
  :class:`BackendUnavailable`: a coordinator that slow is a fault, not a busy lock. A
  partial grant (the lock was free on some nodes, but no majority) is released on every
  node and retried after a random delay, a bounded number of times, so that replicas
  racing for a free lock do not all split the vote and all give up.
* No fencing. Each node's ``INCR`` counter only counts the grants that node saw, and two
  majorities share a node but not necessarily the one with the highest count, so the
  token (the highest of the granting nodes' tokens) can repeat or go down when majorities
  change; and the lock itself rests on timing (bounded pauses and clock drift). ``ownership``
  jobs are refused at start. The token still orders grants while the same nodes answer, and
  the runner's regression check repairs a repeat with :meth:`RedlockBackend.evict`, which
  levels every node's counter to the highest.
* The ledger lives **on a quorum**, not on one node: on one named node, that node's outage
  would stop every ``singleton`` and ``efficiency`` firing (no claim, no dedup), which is
  the outage Redlock is chosen to survive. Each ledger write runs the Redis script on every
  node and counts where it took effect; it stands when a majority took it, so any later
  majority read sees it. The claim script checks the lock on its own node, so a claim takes
  effect exactly on the nodes where this lease holds the lock, and stands only when that is
  a majority: the lease is current. Reads merge the nodes' answers (:func:`_settled`).
  Nodes disagree only after a failure during a write; a node that missed a run's writes
  (it was down) is brought up to date (:data:`ADOPT`) when a claim or a finish would
  otherwise lack a majority, so a second node failing later does not strand the run.
* Shared state (fleet fingerprints, operator switches) is on the quorum too, for the same
  reason: a pause held by one named node would be lifted, or forgotten, by its outage. Each
  node keeps it in the Redis backend's layout (:class:`StateKeys`, with its ``STATE_LIB``),
  every entry stamped with a version (this writer's wall clock in ms, never repeating in
  this process) and its deadline by that node's ``TIME``. A node takes a write only if it
  is newer than what it holds, so order of arrival does not matter; a put or a delete
  stands when a majority answered. A read merges the nodes' copies: the newest version
  wins (:func:`_newest`), so a read of any majority sees every write that stood. A delete
  writes a newer *dead* entry, and an entry past its deadline stays as one, so a node that
  missed the delete or the expiry cannot bring back the older copy it holds; dead entries
  are dropped by a read that heard every node and found every copy dead for a minute
  (:data:`DROP_AFTER`), and a read copies the newest entry to the nodes it found behind
  (:meth:`RedlockBackend._settle`).
* Standbys poll (``notify`` is off): a release is published on each node's channel, but a
  standby would need a subscription on every node to hear it reliably. :meth:`wait` polls
  the lock with doubling pauses and random jitter; the runner's own standby loop looks
  again every 0.5 s.
"""

from __future__ import annotations

import random
import statistics
import threading
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import NoReturn, TypeVar, cast
from urllib.parse import urlsplit

import redis
from redis import exceptions as rex
from redis.commands.core import Script

from singleton.backends.base import (
    RUNNING,
    SKIPPED,
    SUCCEEDED,
    Attempt,
    Capabilities,
    Claim,
    Composed,
    Holder,
    Lease,
    Outcome,
    Run,
    lease_deadline,
)
from singleton.backends.redis import (
    DEFAULT_PREFIX,
    DEFAULT_TIMEOUT,
    LEDGER_LIB,
    STATE_LIB,
    JobKeys,
    KeySpace,
    Scripts,
    StateKeys,
    connect,
    milliseconds,
    seconds_option,
    translated,
)
from singleton.clock import SYSTEM_CLOCK, Clock
from singleton.errors import (
    BackendError,
    BackendUnavailable,
    ConfigError,
    LeaseLost,
    SingletonError,
)
from singleton.urls import redact

DEFAULT_PORT = 6379
#: Further tries of an acquisition that got some nodes but no majority (a split vote).
SPLIT_RETRIES = 2
#: Longest random pause before such a retry.
SPLIT_JITTER = 0.05
#: First and longest pause between two polls of a standby (each randomised by half).
POLL_BACKOFF = (0.1, 1.0)
#: Node calls in flight at once, per node: several firings and lease keepers share a backend.
CALLS_PER_NODE = 8
#: How long a shared-state entry stays dead on every node before a read may drop it: far
#: longer than any call is in flight, so that a repair planned from a read made before the
#: delete cannot land after the drop and bring the old value back.
DROP_AFTER = 60.0

T = TypeVar("T")

# KEYS: runs, attempts index, highest
# ARGV: attempt prefix, run ID, then for each row its field count and its fields (HGETALL)
# → the attempt numbers this node took
# Copies a run's rows from a node that has them. A row is taken where it is missing or less
# settled (skipped < running < ended), so a copy never moves an attempt back.
ADOPT = (
    LEDGER_LIB
    + """
local function rank(state)
  if state == 'skipped' then return 0 end
  if state == 'running' then return 1 end
  return 2
end
local taken, i = {}, 3
while i <= #ARGV do
  local last = i + tonumber(ARGV[i])
  local row = {}
  for j = i + 1, last, 2 do row[ARGV[j]] = ARGV[j + 1] end
  local key = ARGV[1] .. ARGV[2] .. ':' .. row.attempt
  local held = redis.call('HGET', key, 'state')
  if not held or rank(row.state) > rank(held) then
    redis.call('DEL', key)
    redis.call('HSET', key, unpack(ARGV, i + 1, last))
    redis.call('ZADD', KEYS[2], 'NX', next_score(KEYS[2]), ARGV[2] .. ':' .. row.attempt)
    if tonumber(redis.call('HGET', KEYS[1], ARGV[2]) or '0') < tonumber(row.attempt) then
      redis.call('HSET', KEYS[1], ARGV[2], row.attempt)
    end
    if row.token and tonumber(row.token) > tonumber(redis.call('GET', KEYS[3]) or '0') then
      redis.call('SET', KEYS[3], row.token)
    end
    taken[#taken + 1] = tonumber(row.attempt)
  end
  i = last + 1
end
return taken
"""
)


# Shared state on each node: the Redis backend's layout (StateKeys), each value stored as
# '<version>:<deadline>:<value>', the deadline in ms by that node's TIME ('' for none). No
# Redis-side expiry: an entry past its deadline (and a deleted one, whose deadline is its
# deletion) stays, dead, so that it still outvotes older copies on other nodes; STATE_DROP
# removes it once no node holds a live older copy.

# KEYS: values, index, expires   ARGV: per entry: key, version, ttl (ms, '' for none), value
# → how many entries this node took
# Takes each entry unless this node holds that version or a newer one: whatever order
# writes and repairs arrive in, a node only moves forward.
STATE_STAMP = (
    STATE_LIB
    + """
local now, took = now_ms(), 0
for i = 1, #ARGV, 4 do
  local held = redis.call('HGET', KEYS[1], ARGV[i])
  if not held or tonumber(string.match(held, '^%d+')) < tonumber(ARGV[i + 1]) then
    local deadline = ''
    if ARGV[i + 2] ~= '' then deadline = string.format('%.0f', now + tonumber(ARGV[i + 2])) end
    store(KEYS[1], KEYS[2], KEYS[3], ARGV[i],
          ARGV[i + 1] .. ':' .. deadline .. ':' .. ARGV[i + 3], '', now)
    took = took + 1
  end
end
return took
"""
)

# KEYS: values, index, expires   ARGV: prefix
# → {this node's TIME in ms, {key, entry, …}}: every entry under the prefix, dead ones too
STATE_READ = (
    STATE_LIB
    + """
local now = now_ms()
return {now, range(KEYS[1], KEYS[2], KEYS[3], ARGV[1], now)}
"""
)

# KEYS: values, index, expires   ARGV: per key: key, version   → how many went
# Removes each key whose entry is that version or older: a newer write stays.
STATE_DROP = (
    STATE_LIB
    + """
local gone = 0
for i = 1, #ARGV, 2 do
  local held = redis.call('HGET', KEYS[1], ARGV[i])
  if held and tonumber(string.match(held, '^%d+')) <= tonumber(ARGV[i + 1]) then
    forget(KEYS[1], KEYS[2], KEYS[3], ARGV[i])
    gone = gone + 1
  end
end
return gone
"""
)


# -- nodes --------------------------------------------------------------------------------------


def node_urls(url: str) -> list[tuple[str, str]]:
    """``(host:port, redis:// URL)`` per node of a ``redlock://`` URL, in the order written.

    The credentials, database and query options apply to every node. Refused in one line:
    an even number of nodes or fewer than three (a majority of them would not survive the
    loss of as many nodes as an odd set one larger), and a node listed twice (it would vote
    twice).
    """
    parts = urlsplit(url)
    auth, _, hosts = parts.netloc.rpartition("@")
    database = parts.path.strip("/")
    if database and not database.isdigit():
        raise ConfigError(f"backend.url {redact(url)!r}: the path must be a database number")
    nodes: dict[str, str] = {}
    for written in hosts.split(","):
        address = _address(url, written.strip())
        if address in nodes:
            raise ConfigError(f"backend.url {redact(url)!r}: duplicate node {address}")
        nodes[address] = written.strip()
    if len(nodes) < 3 or len(nodes) % 2 == 0:
        raise ConfigError(
            f"backend.url {redact(url)!r}: redlock needs an odd number (≥3) of independent"
            f" masters; got {len(nodes)}"
        )
    prefix = f"redis://{auth}@" if auth else "redis://"
    suffix = f"/{database or 0}" + (f"?{parts.query}" if parts.query else "")
    return [(address, f"{prefix}{written}{suffix}") for address, written in nodes.items()]


def _address(url: str, written: str) -> str:
    """``host:port`` of one listed node, lower-cased, with the default port filled in."""
    try:
        split = urlsplit(f"//{written}")
        host, port = split.hostname, split.port or DEFAULT_PORT
    except ValueError as exc:
        raise ConfigError(f"backend.url {redact(url)!r}: node {written!r}: {exc}") from None
    if not host:
        raise ConfigError(f"backend.url {redact(url)!r}: an empty node in the list")
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True)
class _Node:
    """One Redis master of the set, with the Redis backend's scripts registered on it."""

    address: str
    url: str
    client: redis.Redis
    scripts: Scripts
    adopter: Script
    stamper: Script
    reader: Script
    dropper: Script

    @classmethod
    def open(cls, address: str, url: str, timeout: float) -> _Node:
        client = connect(url, timeout)
        return cls(
            address,
            url,
            client,
            Scripts(client),
            client.register_script(ADOPT),
            client.register_script(STATE_STAMP),
            client.register_script(STATE_READ),
            client.register_script(STATE_DROP),
        )

    def adopt(self, keys: JobKeys, run_id: str, rows: Sequence[Sequence[str]]) -> list[int]:
        """Run :data:`ADOPT` here; the attempt numbers this node took."""
        args: list[str | int] = [keys.attempts, run_id]
        for row in rows:
            args += [len(row), *row]
        taken = self.adopter(keys=[keys.runs, keys.index, keys.highest], args=args)
        return [int(number) for number in taken]

    def stamp(self, keys: StateKeys, entries: Sequence[_Stamp]) -> int:
        """Run :data:`STATE_STAMP` here; how many of ``entries`` this node took."""
        args = [part for entry in entries for part in entry]
        return int(self.stamper(keys=keys.all, args=args))

    def read(self, keys: StateKeys, prefix: str) -> dict[str, _Entry]:
        """This node's copies under ``prefix``, dead ones included."""
        now, found = self.reader(keys=keys.all, args=[prefix])
        return {found[i]: _entry(found[i + 1], int(now)) for i in range(0, len(found), 2)}

    def drop(self, keys: StateKeys, entries: Sequence[tuple[str, int]]) -> int:
        """Run :data:`STATE_DROP` here; how many keys went."""
        args = [part for entry in entries for part in entry]
        return int(self.dropper(keys=keys.all, args=args))


# -- shared state: one node's copy, and the merge -----------------------------------------------

#: What :data:`STATE_STAMP` takes per entry: key, version, ttl (ms, "" for none), value.
_Stamp = tuple[str, int, int | str, str]


@dataclass(frozen=True)
class _Entry:
    """One node's copy of a shared-state key."""

    version: int
    #: Milliseconds to its deadline by its node's clock (≤ 0: dead); None: it has none.
    left: int | None
    value: str

    @property
    def live(self) -> bool:
        return self.left is None or self.left > 0

    def dead_for(self, seconds: float) -> bool:
        return self.left is not None and -self.left >= seconds * 1000

    def stamp(self, key: str) -> _Stamp:
        """This entry, to be copied to another node: the time it has left, or dead."""
        ttl: int | str = "" if self.left is None else max(self.left, 0)
        return key, self.version, ttl, self.value


def _entry(stored: str, now: int) -> _Entry:
    version, deadline, value = stored.split(":", 2)
    return _Entry(int(version), int(deadline) - now if deadline else None, value)


def _newest(copies: Iterable[_Entry]) -> _Entry:
    """The copy of a key that readers see: the newest version; among copies of it (nodes'
    clocks differ, and a repair copies the time left), the one with the most time left, so
    that the slowest clock decides its end. Equal versions from two writers (the same ms
    and the same random digits) are settled by value, so every reader picks the same."""
    copies = list(copies)
    top = max(copy.version for copy in copies)
    return max(
        (copy for copy in copies if copy.version == top),
        key=lambda copy: (copy.value, copy.left is None, copy.left or 0),
    )


# -- merging the nodes' answers -----------------------------------------------------------------


def _rank(attempt: Attempt) -> int:
    """How settled an attempt is. A skip is written only where no attempt exists, so any
    attempt outranks it; a running attempt can still end; an ended one is final."""
    return {SKIPPED: 0, RUNNING: 1}.get(attempt.state, 2)


def _settled(versions: Sequence[Attempt]) -> Attempt:
    """The version of one attempt that readers see, among the nodes' versions: the most
    settled, then the one most nodes hold, then the first listed node's."""
    held = Counter(versions)
    return max(versions, key=lambda version: (_rank(version), held[version]))


def _latest(found: Iterable[Attempt | None]) -> Attempt | None:
    """The latest attempt of a run, from each node's latest."""
    versions = [attempt for attempt in found if attempt is not None]
    if not versions:
        return None
    top = max(attempt.attempt for attempt in versions)
    return _settled([attempt for attempt in versions if attempt.attempt == top])


# -- the backend --------------------------------------------------------------------------------


class RedlockBackend(Composed):
    """Locks, ledger and shared state on a majority of an odd number (≥3) of independent
    Redis masters.

    Options (``backend:`` keys beside ``url``): ``prefix`` (default ``default``) and
    ``timeout`` (default 500ms, the socket and connect timeout of each node call), as for
    ``redis://``. ``acquire_and_claim`` is the composed pair (acquire on a quorum, then claim
    on it): fused per node, a node that granted without a majority would record an attempt
    for a lease that was never granted.
    """

    def __init__(
        self,
        url: str,
        clock: Clock = SYSTEM_CLOCK,
        prefix: object = DEFAULT_PREFIX,
        timeout: object = DEFAULT_TIMEOUT,
    ) -> None:
        self.url = url
        self.keys = KeySpace(str(prefix))
        self._clock = clock
        self._timeout = seconds_option(timeout, "timeout")
        listed = node_urls(url)
        self._nodes = [_Node.open(address, node_url, self._timeout) for address, node_url in listed]
        self.quorum = len(self._nodes) // 2 + 1
        self._pool = ThreadPoolExecutor(
            max_workers=CALLS_PER_NODE * len(self._nodes), thread_name_prefix="redlock"
        )
        try:
            self._check_nodes()
        except BaseException:
            self.close()
            raise
        self.capabilities = Capabilities(
            fencing=False,
            shared=True,
            notify=False,
            min_ttl=2 * self._timeout,
            fencing_note="a quorum of independent counters gives no ordered token; its safety"
            " rests on timing assumptions",
        )
        self._known_jobs: set[str] = set()
        self._version_lock = threading.Lock()
        self._last_version = 0

    # -- calling the nodes ----------------------------------------------------------------------

    def _each(
        self, call: Callable[[_Node], T], nodes: Sequence[_Node] | None = None
    ) -> list[T | SingletonError]:
        """``call`` on every node (or ``nodes``) at once; per node, in order, its result or
        the error it raised, translated (unreachable → BackendUnavailable)."""
        targets = self._nodes if nodes is None else nodes
        futures = [self._pool.submit(_guarded, node, call) for node in targets]
        return [future.result() for future in futures]

    def _fail(self, results: Sequence[object], what: str) -> NoReturn:
        """Raise for a step that no majority could decide because nodes did not answer:
        BackendUnavailable, or BackendError if every failed node answered with an error."""
        errors = [r for r in results if isinstance(r, BackendError)]
        unreachable = not errors or any(isinstance(e, BackendUnavailable) for e in errors)
        kind = BackendUnavailable if unreachable else BackendError
        cause = errors[0] if errors else None
        raise kind(
            f"redlock {redact(self.url)}: {what}: no majority of the {len(results)} nodes"
            f" decided, {len(errors)} failed" + (f"; {cause}" if cause else "")
        ) from cause

    def _answers(self, results: Sequence[T | SingletonError], what: str) -> list[T]:
        """The nodes' answers; BackendUnavailable when fewer than a majority answered."""
        answers = [r for r in results if not isinstance(r, SingletonError)]
        if len(answers) < self.quorum:
            self._fail(results, what)
        return answers

    def _check_nodes(self) -> None:
        """Load the scripts everywhere, and refuse a set that is not independent masters: a
        replica follows its master (one failure, two votes), and two addresses of one
        server vote twice. A minority may be down at start."""
        found = self._answers(self._each(self._identify), "open")
        servers: dict[str, str] = {}
        for address, role, server in found:
            if role not in (None, "master"):
                raise ConfigError(
                    f"backend.url {redact(self.url)!r}: node {address} is not a master"
                    f" ({role}); redlock needs independent masters"
                )
            if server is not None and server in servers:
                raise ConfigError(
                    f"backend.url {redact(self.url)!r}: duplicate node {address}: the same"
                    f" server as {servers[server]}"
                )
            if server is not None:
                servers[server] = address

    def _identify(self, node: _Node) -> tuple[str, str | None, str | None]:
        """(address, role, server run id) of ``node``; role and run id are None where the
        ACL does not allow ``ROLE`` or ``INFO`` (they are checks, not requirements)."""
        try:
            node.scripts.load()
        except TypeError as exc:  # an unknown ?option in the URL surfaces here
            raise ConfigError(f"backend.url {redact(self.url)!r}: {exc}") from None
        except (rex.AuthenticationError, rex.NoPermissionError) as exc:
            raise ConfigError(f"backend.url {redact(self.url)!r}: {redact(str(exc))}") from None
        try:
            role = str(node.client.role()[0])
            server = str(node.client.info("server")["run_id"])
        except rex.ResponseError:
            return node.address, None, None
        return node.address, role, server

    # -- lock -----------------------------------------------------------------------------------

    def try_acquire(self, name: str, ttl: float, owner: str) -> Lease | None:
        keys = self.keys.job(name)
        retries = 0
        while True:
            lease, split = self._acquire_once(keys, name, ttl, owner)
            if lease is not None or not split or retries == SPLIT_RETRIES:
                return lease
            retries += 1
            self._clock.sleep(random.uniform(0, SPLIT_JITTER))

    def _acquire_once(
        self, keys: JobKeys, name: str, ttl: float, owner: str
    ) -> tuple[Lease | None, bool]:
        """One round of Redlock: (the lease or None, whether the vote was split: some nodes
        granted, not a majority, so another try may win)."""
        sent = self._clock.monotonic()
        results = self._each(lambda node: node.scripts.acquire(keys, owner, ttl))
        took = self._clock.monotonic() - sent
        tokens = [r[1] for r in results if not isinstance(r, SingletonError) and r[0]]
        deadline = lease_deadline(sent, ttl)
        if len(tokens) >= self.quorum and sent + took < deadline:
            return Lease(name, owner, max(tokens), ttl, deadline), False
        if tokens:
            self._each(lambda node: node.scripts.release(keys, owner))
        if len(tokens) >= self.quorum:
            raise BackendUnavailable(
                f"redlock {redact(self.url)}: the grant of {name!r} took {took:.3f}s, past"
                f" the validity of a {ttl:g}s lease"
            )
        self._answers(results, f"acquire {name!r}")
        return None, bool(tokens)

    def renew(self, lease: Lease) -> Lease:
        keys = self.keys.job(lease.name)
        sent = self._clock.monotonic()
        results = self._each(lambda node: node.scripts.renew(keys, lease.owner, lease.ttl))
        took = self._clock.monotonic() - sent
        deadline = lease_deadline(sent, lease.ttl)
        if sum(r is True for r in results) >= self.quorum:
            if sent + took < deadline:
                return lease.renewed(deadline)
            raise BackendUnavailable(
                f"redlock {redact(self.url)}: renewing {lease.name!r} took {took:.3f}s, past"
                " the validity of the renewal"
            )
        if sum(r is False for r in results) > len(self._nodes) - self.quorum:
            raise LeaseLost(f"lock {lease.name!r}: lease with token {lease.token} is gone")
        self._fail(results, f"renew {lease.name!r}")

    def release(self, lease: Lease, keep_for: float = 0.0) -> None:
        keys = self.keys.job(lease.name)
        results = self._each(lambda node: node.scripts.release(keys, lease.owner, keep_for))
        self._answers(results, f"release {lease.name!r}")

    def holder(self, name: str) -> Holder | None:
        """The owner holding ``name`` on a majority; its token is the highest of those
        nodes' counters (each is the token that node granted it), and the lease ends when
        fewer than a majority still hold it."""
        keys = self.keys.job(name)
        found = self._answers(self._each(lambda node: node.scripts.holder(keys)), "holder")
        owners = Counter(owner for owner, _, _ in found if owner is not None)
        for owner, count in owners.items():
            if count >= self.quorum:
                held = [(left, counter) for who, left, counter in found if who == owner]
                lefts = sorted((left for left, _ in held if left is not None), reverse=True)
                left = lefts[self.quorum - 1] if len(lefts) >= self.quorum else None
                return Holder(name, owner, max(counter for _, counter in held), left)
        return None

    def wait(self, name: str, timeout: float) -> None:
        """Poll ``name`` until no majority holds it or ``timeout`` passes, with pauses that
        double from 0.1 s up to 1 s, each shortened at random by up to half so that
        standbys spread out."""
        end = self._clock.monotonic() + timeout
        pause = POLL_BACKOFF[0]
        while (left := end - self._clock.monotonic()) > 0:
            self._clock.sleep(min(left, pause * random.uniform(0.5, 1.0)))
            pause = min(pause * 2, POLL_BACKOFF[1])
            if self._clock.monotonic() >= end:
                return  # the caller tries to acquire next: a last look would be wasted
            try:
                if self.holder(name) is None:
                    return
            except BackendError:
                continue  # the caller's next acquire reports it

    def evict(self, name: str, token_above: int = 0) -> int:
        """Remove the holder everywhere, then level the counters: every node is raised to
        the highest, so the next majority's grant is above every token any node issued."""
        keys = self.keys.job(name)
        results = self._each(lambda node: node.scripts.evict(keys, token_above))
        counters = self._answers(results, f"evict {name!r}")
        top = max(counters)
        if any(r != top for r in results):
            self._each(lambda node: node.scripts.evict(keys, top))
        return top

    # -- ledger ---------------------------------------------------------------------------------

    def _register(self, job: str) -> None:
        """Add ``job`` to the job set on every node (history and prune read the union);
        remembered once every node has it."""
        if job in self._known_jobs:
            return
        results = self._each(lambda node: node.client.sadd(self.keys.jobs, job))
        if len(self._answers(results, "register")) == len(self._nodes):
            self._known_jobs.add(job)

    def claim(self, run: Run, lease: Lease, *, seen: int = 0, start: bool = True) -> Claim:
        self._register(run.job)
        keys = self.keys.job(run.job)
        now = self._clock.now()
        results = self._each(lambda node: node.scripts.claim(keys, run, lease, seen, start, now))
        current = [
            (node, r) for node, r in zip(self._nodes, results, strict=True) if isinstance(r, Claim)
        ]
        if len(current) < self.quorum:
            if sum(isinstance(r, LeaseLost) for r in results) > len(self._nodes) - self.quorum:
                raise LeaseLost(f"lock {run.job!r}: lease with token {lease.token} is gone")
            self._fail(results, f"claim {run.run_id!r}")
        latest = _latest(claim.latest for _, claim in current)
        highest = max(claim.highest for _, claim in current)
        written = next((c.attempt for _, c in current if c.attempt is not None), None)
        if written is None:
            return Claim(latest, None, highest)
        took = [node for node, c in current if c.attempt is not None]
        if len(took) < self.quorum and latest is not None and latest.state == SUCCEEDED:
            # The run is done where the finish landed (the script writes nothing there); a
            # node that missed the finish wrote, but no other node is brought up to it.
            return Claim(latest, None, highest)
        ahead = latest is not None and latest.attempt > seen
        if len(took) < self.quorum and not ahead:
            # The others missed earlier attempts of this run (they were down): catch them up.
            behind = [node for node, c in current if c.attempt is None]
            took += self._bring_up(keys, run.run_id, took[0], behind, written.attempt)
        if len(took) >= self.quorum:
            return Claim(latest, written, highest)
        if ahead:
            # A minority wrote; a node knows a later attempt: the caller decides again.
            return Claim(latest, None, highest)
        self._fail(results, f"claim {run.run_id!r}")

    def _bring_up(
        self, keys: JobKeys, run_id: str, source: _Node, behind: Sequence[_Node], attempt: int
    ) -> list[_Node]:
        """Copy ``run_id``'s rows from ``source`` to the nodes ``behind`` it (they missed
        writes while down); those that now hold ``attempt`` as ``source`` does."""
        if not behind:
            return []
        with translated(source.url):
            rows = source.scripts.run("ATTEMPTS", [keys.runs], [keys.attempts, run_id])
        taken = self._each(lambda node: node.adopt(keys, run_id, rows), behind)
        return [
            node
            for node, t in zip(behind, taken, strict=True)
            if isinstance(t, list) and attempt in t
        ]

    def finish(self, run: Run, lease: Lease, attempt: int, outcome: Outcome) -> bool:
        keys = self.keys.job(run.job)
        now = self._clock.now()
        results = self._each(
            lambda node: node.scripts.finish(keys, run, lease, attempt, outcome, now)
        )
        return self._recorded(keys, run, attempt, results)

    def finish_and_release(
        self, run: Run, lease: Lease, attempt: int, outcome: Outcome, keep_for: float = 0.0
    ) -> bool:
        keys = self.keys.job(run.job)
        now = self._clock.now()
        results = self._each(
            lambda node: node.scripts.finish_and_release(
                keys, run, lease, attempt, outcome, now, keep_for
            )
        )
        return self._recorded(keys, run, attempt, results)

    def _recorded(
        self, keys: JobKeys, run: Run, attempt: int, results: Sequence[bool | SingletonError]
    ) -> bool:
        """Whether an outcome stands on a majority, after bringing up nodes that lacked the
        attempt; undecided (too many nodes unreachable) → BackendUnavailable."""
        done = [node for node, r in zip(self._nodes, results, strict=True) if r is True]
        refused = [node for node, r in zip(self._nodes, results, strict=True) if r is False]
        if done and refused and len(done) < self.quorum:
            done += self._bring_up(keys, run.run_id, done[0], refused, attempt)
        if len(done) >= self.quorum:
            return True
        failed = sum(isinstance(r, SingletonError) for r in results)
        if len(done) + failed >= self.quorum:
            self._fail(results, f"finish {run.run_id!r}")
        return False

    def skip(self, run: Run, reason: str, replica: str) -> bool:
        self._register(run.job)
        keys = self.keys.job(run.job)
        now = self._clock.now()
        results = self._each(lambda node: node.scripts.skip(keys, run, reason, replica, now))
        wrote = sum(r is True for r in results)
        if wrote >= self.quorum:
            return True
        if wrote + sum(isinstance(r, SingletonError) for r in results) >= self.quorum:
            self._fail(results, f"skip {run.run_id!r}")
        return False

    def attempts(self, run_id: str) -> list[Attempt]:
        keys = self.keys.job(run_id.split("@", 1)[0])
        found = self._answers(
            self._each(lambda node: node.scripts.attempts(keys, run_id)), "attempts"
        )
        versions: dict[int, list[Attempt]] = defaultdict(list)
        for attempt in (a for rows in found for a in rows):
            versions[attempt.attempt].append(attempt)
        return [_settled(versions[n]) for n in sorted(versions, reverse=True)]

    def _jobs(self) -> list[str]:
        """The union of the nodes' job sets: a node may have missed a registration."""
        found = self._answers(
            self._each(lambda node: cast(set[str], node.client.smembers(self.keys.jobs))),
            "jobs",
        )
        return sorted(set().union(*found, self._known_jobs))

    def history(self, job: str | None, limit: int) -> list[Attempt]:
        """Newest first by the earliest time any node recorded each attempt (a node that
        was brought up later recorded it later). Each node gives its newest ``limit``: a
        row on a majority is among them on at least one node of any majority read."""
        names = [job] if job is not None else self._jobs()
        found = self._answers(
            self._each(
                lambda node: [
                    pair
                    for name in names
                    for pair in node.scripts.history(self.keys.job(name), limit)
                ]
            ),
            "history",
        )
        first: dict[tuple[str, int], float] = {}
        versions: dict[tuple[str, int], list[Attempt]] = defaultdict(list)
        for score, attempt in (pair for pairs in found for pair in pairs):
            key = (attempt.run_id, attempt.attempt)
            first[key] = min(first.get(key, score), score)
            versions[key].append(attempt)
        rows = [
            _settled(versions[key]) for key in sorted(first, key=first.__getitem__, reverse=True)
        ]
        return rows[:limit] if limit else rows

    def prune(self, before: datetime, keep: int) -> int:
        """Retention on every node; the count is the most any node deleted (each holds a
        copy of the same rows)."""
        names = self._jobs()
        gone = self._answers(
            self._each(
                lambda node: sum(
                    node.scripts.prune(self.keys.job(name), before, keep) for name in names
                )
            ),
            "prune",
        )
        self.scan("")  # drops dead shared-state entries under prefixes nobody reads
        return max(gone)

    # -- shared state ---------------------------------------------------------------------------

    def put(self, key: str, value: str, ttl: float | None = None) -> None:
        """Stamp ``value`` on every node; it stands when a majority answered (each took it,
        or holds a newer write). The TTL runs on each node's clock from when it took it."""
        self._stamp(key, "" if ttl is None else milliseconds(ttl), value, f"put {key!r}")

    def delete(self, key: str) -> None:
        """A put of a dead entry (deadline now), newer than every copy: see :meth:`scan`."""
        self._stamp(key, 0, "", f"delete {key!r}")

    def _stamp(self, key: str, ttl: int | str, value: str, what: str) -> None:
        entry: _Stamp = (key, self._version(), ttl, value)
        keys = self.keys.state
        self._answers(self._each(lambda node: node.stamp(keys, [entry])), what)

    def _version(self) -> int:
        """This host's wall clock in ms, times 1000, plus random digits (two writers in one
        ms rarely tie), and above every version this backend gave before, so that its own
        put-then-delete is ordered whatever its clock does. Across hosts the newer write
        is the one with the later clock: writes to one key further apart than the hosts'
        clock skew are ordered right (``check`` and ``run`` watch each host's skew to the
        nodes' ``TIME``)."""
        stamp = int(self._clock.now().timestamp() * 1000) * 1000 + random.randrange(1000)
        with self._version_lock:
            self._last_version = max(stamp, self._last_version + 1)
            return self._last_version

    def scan(self, prefix: str) -> dict[str, str]:
        """Every node's copies under ``prefix``, merged by :func:`_newest`: any majority of
        answers holds every write that stood. Returned: the newest copies still live."""
        keys = self.keys.state
        results = self._each(lambda node: node.read(keys, prefix))
        self._answers(results, f"scan {prefix!r}")
        held = [
            (node, found)
            for node, found in zip(self._nodes, results, strict=True)
            if isinstance(found, dict)
        ]
        names = {key for _, found in held for key in found}
        newest = {key: _newest(f[key] for _, f in held if key in f) for key in names}
        self._settle(keys, newest, held)
        return {key: entry.value for key, entry in sorted(newest.items()) if entry.live}

    def _settle(
        self,
        keys: StateKeys,
        newest: dict[str, _Entry],
        held: Sequence[tuple[_Node, dict[str, _Entry]]],
    ) -> None:
        """After a read, best effort (a node that fails is left as it was): copy each live
        newest entry to the nodes that answered without it (a node that missed a write
        while down, so that one more failure does not lose it), and a dead one over older
        live copies. A dead entry is dropped everywhere only when every node answered and
        every copy has been dead for :data:`DROP_AFTER`: then nothing older is left
        anywhere for it to outvote, and a drop that fails on some node leaves only dead
        copies behind."""
        everyone = len(held) == len(self._nodes)
        settled = {
            key
            for key in newest
            if everyone and all(f[key].dead_for(DROP_AFTER) for _, f in held if key in f)
        }
        work: dict[str, tuple[list[_Stamp], list[tuple[str, int]]]] = {}
        for node, found in held:
            stamps = [
                entry.stamp(key)
                for key, entry in newest.items()
                if key not in settled
                and (key not in found or found[key].version < entry.version)
                and (entry.live or (key in found and found[key].live))
            ]
            drops = [(key, newest[key].version) for key in settled if key in found]
            if stamps or drops:
                work[node.address] = (stamps, drops)

        def apply(node: _Node) -> None:
            stamps, drops = work[node.address]
            if stamps:
                node.stamp(keys, stamps)
            if drops:
                node.drop(keys, drops)

        if work:
            self._each(apply, [node for node in self._nodes if node.address in work])

    def server_time(self) -> datetime | None:
        """The median of the nodes' ``TIME``: lease expiry runs on each node's own clock,
        and one node with a wrong clock should neither trigger nor hide the skew check."""
        found = self._answers(self._each(lambda node: node.client.time()), "time")
        return datetime.fromtimestamp(
            statistics.median(seconds + micros / 1e6 for seconds, micros in found), UTC
        )

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        for node in self._nodes:
            node.client.close()


def _guarded(node: _Node, call: Callable[[_Node], T]) -> T | SingletonError:
    """``call(node)`` with redis-py's errors translated, and ours returned, not raised, so
    that one node's failure is one vote."""
    try:
        with translated(node.url):
            return call(node)
    except (BackendError, LeaseLost) as exc:
        return exc
