"""``zookeeper://[user:password@]h1:2181,h2:2181,h3:2181/prefix``: locks and ledger in ZooKeeper.

Why these choices:

* **A lock is an ephemeral sequential znode** under ``{prefix}/locks/{name}``; the lowest
  ``lock-`` node holds the lock. Ephemeral means the node dies with the session of the
  replica that made it: a crashed, paused or partitioned holder loses the lock when the
  servers expire its session, not when a client-side timer says so.
* **One session per backend object** (per replica), so its timeout bounds every lease held
  through it. A lease's TTL is the job's ``lock_ttl`` capped by the session timeout the
  servers *granted*: once a holder stops hearing from ZooKeeper, its session may be expired
  (and its lock taken) one session timeout after the servers last heard from it, so its
  local deadline may not run longer. A ``lock_ttl`` shorter than the session timeout is
  kept by this backend itself: it deletes the node of a lease that was not renewed in time.
  That works only while the holder's process runs; a crashed or paused holder keeps the lock
  for the whole session timeout (:attr:`ZookeeperBackend.session_timeout`).
* **The fencing token is the lock node's czxid**, the id of the transaction that created it.
  Zxids rise across restarts and leader changes, while a sequence suffix restarts at 0 when
  the parent node is recreated. ZooKeeper assigns czxids, so a token cannot be "raised": to
  move past a token (after a coordinator lost its data), ``evict`` stores an offset in the
  lock's parent node that is added to every czxid from then on.
* **try_acquire does not queue**: it creates a node only when no ``lock-`` node exists, and
  deletes its node again when it lost the race, so a replica that moved on leaves nothing
  behind. **Standbys queue in wait()**: each has one ``wait-`` node and watches only the
  node ahead of it (the holder for the first in line), so a release wakes exactly one
  standby, not the herd.
* **Not kazoo's ``Lock`` itself**, but its ideas (order by the sequence suffix, watch the
  predecessor only, a marker in the node's name as Curator does): its blocking acquire keeps
  a place in line that a replica which moved on never gives back, it re-creates its node
  after the session is lost and does not reset ``is_acquired``, and it hides the czxid.
* **The ledger is znodes**: ``{prefix}/runs/{job}/{run_id}/{attempt}``, and the job's node
  keeps the highest token recorded. Every ledger write that needs the lease is one ``multi``
  that checks the lock node still exists, so a stale owner cannot write; the compare-and-set
  on the attempt number is a ``create`` that fails if the attempt exists, and every read the
  decision rests on is pinned by a version check in the same ``multi`` (reads may come from a
  follower that lags; the ``multi`` always goes through the leader). A finish needs only its
  attempt: a ``set`` at the version read, refused if a takeover marked it abandoned.
* **Shared state is znodes too**: ``{prefix}/state/{namespace}/{name}``, one node per key, so a
  scan lists one namespace's children, never the whole tree. A TTL is kept in the node's data
  and measured from the node's ``mtime``, the leader's clock when it wrote the value, against
  the ``mtime`` of a write the scan makes first: ZooKeeper's TTL nodes are off unless the
  servers enable them, and no replica's clock takes part. Expired nodes are deleted by the
  scans that find them (and by ``prune``).
* **Session states**: SUSPENDED (connection lost) means the lease is in doubt: renewals raise
  :class:`BackendUnavailable`, so the lease keeper lets the deadline run out unless the
  session reconnects first. LOST (the servers expired the session) means every lease of this
  backend is lost at once: its ephemeral nodes are gone.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import uuid
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote, urlsplit

from kazoo.client import KazooClient, KazooState
from kazoo.exceptions import (
    BadVersionError,
    ConnectionLoss,
    NoAuthError,
    NodeExistsError,
    NoNodeError,
    NotEmptyError,
    OperationTimeoutError,
    RolledBackError,
    RuntimeInconsistency,
    SessionExpiredError,
)
from kazoo.handlers.threading import KazooTimeoutError
from kazoo.retry import KazooRetry
from kazoo.security import make_digest_acl

from singleton.backends.base import (
    ABANDONED,
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
    owner_replica,
)
from singleton.clock import SYSTEM_CLOCK, Clock
from singleton.durations import parse_duration
from singleton.errors import BackendError, BackendUnavailable, ConfigError, LeaseLost
from singleton.urls import redact

log = logging.getLogger("singleton.backends.zookeeper")

DEFAULT_PORT = 2181
DEFAULT_PREFIX = "/singleton"
LOCK = "lock-"
WAIT = "wait-"

#: A standby's ``wait-`` node outlives its wait() by this much, so a standby polling in a
#: loop keeps its place in line; after that it goes, so the line never stalls behind a
#: replica that stopped waiting.
WAITER_LINGER = 2.0
#: Compare-and-set rounds before a ledger write gives up on a node that keeps changing.
CAS_TRIES = 8
#: How often a caller waiting for a reply looks whether the connection is still up.
CONNECTION_POLL = 0.1
#: After a failed clean-up (or a standby's failed watch), try again this much later.
RETRY_AFTER = 0.2
#: ZooKeeper refuses a znode over 1 MB (``jute.maxbuffer``): an attempt's error is cut here.
MAX_ERROR = 65536
#: The most bytes of data and path a shared-state put sends. A server drops the connection of
#: a request over its ``jute.maxbuffer`` (1 MiB - 1 by default), which would put every lease of
#: this session in doubt until it reconnects; 1 KiB is left for the rest of the request (ACLs).
MAX_STATE = 0xFFFFF - 1024
#: Shared-state node names escape what a key may hold but a node name may not: ``/`` (a key's
#: name may have several parts) and a whole name of ``.`` or ``..`` (reserved), or empty.
_ESCAPES = {"": "%", ".": "%2E", "..": "%2E%2E"}

_UNREACHABLE = (
    KazooTimeoutError,
    ConnectionLoss,
    SessionExpiredError,
    OperationTimeoutError,
)


@dataclass(frozen=True)
class Target:
    """What a ``zookeeper://`` URL names."""

    hosts: str
    prefix: str
    credentials: tuple[str, str] | None


def _host(text: str, url: str) -> str:
    host, port = text, ""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        host, port = f"[{host}]", rest.removeprefix(":")
    elif ":" in text:
        host, _, port = text.partition(":")
    port = port or str(DEFAULT_PORT)
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(
            f"backend.url {redact(url)!r}: bad server {text!r};"
            " want zookeeper://host:port[,host:port…]/prefix"
        )
    return f"{host}:{port}"


def parse_url(url: str) -> Target:
    """Servers, prefix and digest credentials of a ``zookeeper://`` URL."""
    parts = urlsplit(url)
    if parts.query or parts.fragment:
        raise ConfigError(
            f"backend.url {redact(url)!r}: a zookeeper:// URL takes no query;"
            " put options such as session_timeout under backend:"
        )
    userinfo, _, servers = parts.netloc.rpartition("@")
    credentials = None
    if userinfo:
        user, colon, password = userinfo.partition(":")
        if not user or not colon:
            raise ConfigError(f"backend.url {redact(url)!r}: digest credentials are user:password@")
        credentials = (unquote(user), unquote(password))
    hosts = ",".join(_host(text, url) for text in servers.split(","))
    prefix = parts.path.rstrip("/") or DEFAULT_PREFIX
    if any(part in ("", ".", "..") for part in prefix.split("/")[1:]):
        raise ConfigError(f"backend.url {redact(url)!r}: bad prefix {prefix!r}")
    return Target(hosts, prefix, credentials)


def _segment(name: str) -> str:
    """``name`` as one path segment; ZooKeeper reserves ``.`` and ``..``."""
    if name in ("", ".", "..") or "/" in name:
        raise ConfigError(f"lock name {name!r} cannot be a ZooKeeper node name")
    return name


def _sequence(child: str) -> str:
    """A sequential node's counter, the ten digits ZooKeeper appended to its name."""
    return child[-10:]


def _holder(children: list[str]) -> str | None:
    """The lowest ``lock-`` node: the one holding the lock."""
    return min((c for c in children if c.startswith(LOCK)), key=_sequence, default=None)


def _state_node(part: str) -> str:
    """A namespace or a name of a shared-state key as one node name. Keys never hold ``%``,
    so every ``%`` in a node name is an escape of ours."""
    escaped = part.replace("/", "%2F")
    return _ESCAPES.get(escaped, escaped)


def _state_part(node: str) -> str:
    """The inverse of :func:`_state_node`."""
    return "" if node == "%" else unquote(node)


def _encode(attempt: Attempt) -> bytes:
    record = attempt.to_record()
    if attempt.error:
        record["error"] = attempt.error[:MAX_ERROR]
    return json.dumps(record).encode()


def _decode(data: bytes) -> Attempt:
    return Attempt.from_record(json.loads(data))


def _number(data: bytes, key: str) -> int:
    """An integer field of a small JSON node body; 0 for an empty node."""
    return int(json.loads(data)[key]) if data else 0


def _failure(results: list[Any]) -> tuple[int, Exception] | None:
    """The op that failed a ``multi`` and its error; the others report a roll-back."""
    for index, result in enumerate(results):
        if isinstance(result, Exception) and not isinstance(
            result, RolledBackError | RuntimeInconsistency
        ):
            return index, result
    return None


@dataclass
class _Held:
    """A lease held through this session."""

    name: str
    path: str
    token: int
    expires: float
    lost: bool = False
    released: bool = False


@dataclass
class _Waiter:
    """A standby's place in one lock's line, shared by this backend's wait() calls."""

    woken: threading.Event = field(default_factory=threading.Event)
    creating: threading.Lock = field(default_factory=threading.Lock)
    path: str | None = None
    users: int = 0
    idle_since: float = 0.0

    def wake(self, _event: object = None) -> None:
        self.woken.set()


class ZookeeperBackend(Composed):
    """Locks as ephemeral sequential znodes, fenced by czxid; the ledger as znodes.

    ``session_timeout`` (a duration, default 10 s) is what this replica asks for; the
    servers may grant another (:attr:`session_timeout`).
    """

    capabilities = Capabilities(fencing=True, shared=True, notify=True)

    def __init__(
        self, url: str, clock: Clock = SYSTEM_CLOCK, session_timeout: float | str = 10.0
    ) -> None:
        self.url = url
        self._target = parse_url(url)
        self._where = redact(url)
        requested = parse_duration(session_timeout)
        if requested <= 0:
            raise ConfigError(f"backend.session_timeout: must be positive, got {session_timeout!r}")
        self._requested = self._negotiated = requested
        self._clock = clock
        self._mutex = threading.Lock()
        self._changed = threading.Condition(self._mutex)
        self._held: dict[str, _Held] = {}
        self._waiters: dict[str, _Waiter] = {}
        self._doomed: set[str] = set()
        self._orphans: set[tuple[str, str]] = set()
        self._offsets: dict[str, tuple[tuple[int, int], int]] = {}
        self._retry_at = 0.0
        self._closed = False
        self._negotiation = threading.Event()
        self._client = self._connect()
        self._housekeeper = threading.Thread(
            target=self._housekeep, name="zookeeper-housekeeper", daemon=True
        )
        self._housekeeper.start()

    def _connect(self) -> Any:
        credentials = self._target.credentials
        self._client = client = KazooClient(
            hosts=self._target.hosts,
            timeout=self._requested,
            # Reconnect promptly after an outage; kazoo's default backs off to an hour.
            connection_retry=KazooRetry(max_tries=-1, delay=0.05, max_delay=1.0),
            auth_data=[("digest", ":".join(credentials))] if credentials else None,
            default_acl=[make_digest_acl(*credentials, all=True)] if credentials else None,
        )
        self._learn_negotiated_timeout(client)
        client.add_listener(self._on_state)
        try:
            client.start(timeout=max(self._requested, 2.0))
        except KazooTimeoutError as exc:
            raise BackendUnavailable(f"zookeeper {self._where}: no server answered") from exc
        try:
            self._negotiation.wait(self._requested)
            for folder in ("locks", "runs", "state"):
                path = f"{self._target.prefix}/{folder}"
                self._wait(client.ensure_path_async(path), f"create {path}")
                # exists (inside ensure_path) needs no permission; reading does.
                self._wait(client.get_children_async(path), f"read {path}")
        except BaseException:
            client.stop()
            client.close()
            raise
        return client

    def _learn_negotiated_timeout(self, client: Any) -> None:
        """Record the session timeout the server granted. kazoo keeps it to itself: it sizes
        its read timeout as 2/3 of it, which ``_connect`` returns. The granted timeout, not
        the requested one, is how long the servers wait before expiring a silent session."""
        connection = client._connection
        connect = connection._connect

        def connect_and_learn(*args: Any) -> Any:
            read_timeout, connect_timeout = connect(*args)
            self._negotiated = round(read_timeout * 1.5) / 1000.0
            self._negotiation.set()
            return read_timeout, connect_timeout

        connection._connect = connect_and_learn

    @property
    def session_timeout(self) -> float:
        """Seconds the servers wait before expiring this replica's session, as granted for
        the current session (the servers clamp the requested ``session_timeout`` between
        2 and 20 ticks by default). A crashed or paused holder keeps its locks this long,
        whatever the job's ``lock_ttl``."""
        return self._negotiated

    def _lease_ttl(self, ttl: float) -> float:
        return min(ttl, self._requested, self._negotiated)

    # -- talking to ZooKeeper -----------------------------------------------------------------

    def _wait(self, pending: Any, what: str, timeout: float | None = None) -> Any:
        """The result of an asynchronous kazoo call, with driver errors translated once:
        unreachable → BackendUnavailable, refused by the ACL → ConfigError. Node-level
        outcomes (NoNodeError, NodeExistsError, BadVersionError …) are answers, left to the
        caller.

        A request made while kazoo reconnects waits in its queue until a connection is back;
        we stop waiting as soon as the connection is down, so a renewal in doubt fails fast
        instead of holding the lease keeper past its deadline."""
        end = self._clock.monotonic() + (self._negotiated if timeout is None else timeout)
        try:
            while True:
                try:
                    return pending.get(timeout=min(CONNECTION_POLL, end - self._clock.monotonic()))
                except KazooTimeoutError:
                    if not self._client.connected or self._clock.monotonic() >= end:
                        raise
        except _UNREACHABLE as exc:
            raise BackendUnavailable(
                f"zookeeper {self._where}: {what}: {type(exc).__name__} {exc}".rstrip()
            ) from exc
        except NoAuthError as exc:
            raise ConfigError(
                f"backend.url {self._where}: ZooKeeper refused to {what}:"
                " the URL's user and password do not grant access"
            ) from exc

    def _ensure_connected(self) -> None:
        if not self._client.connected:
            raise BackendUnavailable(
                f"zookeeper {self._where}: not connected (the session is suspended)"
            )

    def _synced(self) -> None:
        """Have the server this session talks to catch up with the leader before the next
        read: a follower may lag, and a replica must see a release another one just made.
        A session's requests are answered in order, so the read waits for the sync without
        a round trip of its own."""
        self._client.sync_async("/")

    def _children(self, path: str, what: str) -> list[str]:
        try:
            return list(self._wait(self._client.get_children_async(path), what))
        except NoNodeError:
            return []

    def _children_and_stat(self, path: str, what: str) -> tuple[list[str], Any]:
        children, stat = self._wait(self._client.get_children_async(path, include_data=True), what)
        return list(children), stat

    def _commit(
        self, ops: list[tuple[Any, ...]], what: str, timeout: float | None = None
    ) -> tuple[int, Exception] | None:
        """One ``multi`` of ``(operation, *arguments)``; the op that failed it, or None."""
        transaction = self._client.transaction()
        for operation, *arguments in ops:
            getattr(transaction, operation)(*arguments)
        return _failure(self._wait(transaction.commit_async(), what, timeout))

    def _delete(self, path: str, what: str) -> None:
        try:
            self._wait(self._client.delete_async(path), what)
        except NoNodeError:
            pass

    def _doom(self, *paths: str) -> None:
        """Have the housekeeper delete ``paths`` (now, or once the connection is back)."""
        with self._mutex:
            self._doomed.update(paths)
            self._changed.notify_all()

    # -- session states -------------------------------------------------------------------

    def _on_state(self, state: str) -> None:
        """Called on kazoo's connection thread: record and wake, never block."""
        with self._mutex:
            if state == KazooState.LOST:
                # The servers expired the session: every ephemeral node of ours is gone.
                for held in self._held.values():
                    held.lost = True
                for waiter in self._waiters.values():
                    waiter.path = None
                self._doomed.clear()
                self._orphans.clear()
            for waiter in self._waiters.values():
                waiter.wake()
            self._changed.notify_all()

    # -- the lock ---------------------------------------------------------------------------

    def _lock_dir(self, name: str) -> str:
        return f"{self._target.prefix}/locks/{_segment(name)}"

    def _offset(self, lock_dir: str, stat: Any) -> int:
        """The token offset stored by ``evict`` in the lock's parent node, re-read only when
        that node's data changed (or the node was recreated)."""
        if stat.version == 0:
            return 0
        key = (stat.czxid, stat.version)
        cached = self._offsets.get(lock_dir)
        if cached is not None and cached[0] == key:
            return cached[1]
        data, fresh = self._wait(self._client.get_async(lock_dir), "read the token offset")
        offset = _number(data, "offset")
        self._offsets[lock_dir] = ((fresh.czxid, fresh.version), offset)
        return offset

    def try_acquire(self, name: str, ttl: float, owner: str) -> Lease | None:
        lock_dir = self._lock_dir(name)
        self._ensure_connected()
        sent = self._clock.monotonic()
        self._synced()
        if _holder(self._children(lock_dir, "acquire")) is not None:
            return None
        # The marker in the node's name finds it again if the reply to the create is lost
        # (props to Netflix Curator, as kazoo's Lock says): an orphan would hold the lock.
        marker = uuid.uuid4().hex
        try:
            path, stat = self._wait(
                self._client.create_async(
                    f"{lock_dir}/{LOCK}{marker}-",
                    owner.encode(),
                    ephemeral=True,
                    sequence=True,
                    makepath=True,
                    include_data=True,
                ),
                "acquire",
            )
        except BackendError:
            with self._mutex:
                self._orphans.add((lock_dir, marker))
            raise
        try:
            children, parent = self._children_and_stat(lock_dir, "acquire")
            if _holder(children) != path.rsplit("/", 1)[1]:
                self._delete(path, "withdraw")
                return None
            token = int(stat.czxid) + self._offset(lock_dir, parent)
        except NoNodeError:
            return None  # the lock's node was deleted under us, with ours in it
        except BackendError:
            self._doom(path)
            raise
        return self._hold(name, owner, path, token, sent, ttl)

    def _hold(self, name: str, owner: str, path: str, token: int, sent: float, ttl: float) -> Lease:
        lease_ttl = self._lease_ttl(ttl)
        with self._mutex:
            self._held[owner] = _Held(name, path, token, sent + lease_ttl)
            waiter = self._waiters.get(name)
            if waiter is not None and waiter.users == 0:
                # This replica stood in line and now holds the lock: leave the line. The one
                # behind us wakes once, sees a holder, and watches it.
                del self._waiters[name]
                if waiter.path:
                    self._doomed.add(waiter.path)
            self._changed.notify_all()
        return Lease(name, owner, token, lease_ttl, lease_deadline(sent, lease_ttl))

    def _current(self, lease: Lease) -> _Held:
        """This session's record of ``lease``; LeaseLost if it is gone as far as we know."""
        with self._mutex:
            held = self._held.get(lease.owner)
            if held is None or held.token != lease.token or held.lost or held.released:
                raise LeaseLost(f"lock {lease.name!r}: lease with token {lease.token} is gone")
            if self._clock.monotonic() >= held.expires:
                raise LeaseLost(f"lock {lease.name!r}: lease with token {lease.token} expired")
            return held

    def _lose(self, held: _Held, lease: Lease) -> LeaseLost:
        with self._mutex:
            held.lost = True
        return LeaseLost(f"lock {lease.name!r}: lease with token {lease.token} is gone")

    def renew(self, lease: Lease) -> Lease:
        held = self._current(lease)
        self._ensure_connected()
        sent = self._clock.monotonic()
        # A check op in a multi goes through the leader: a lagging follower cannot vouch for
        # a node the leader already deleted (evicted, or expired with a session).
        failed = self._commit(
            [("check", held.path, -1)], "renew", timeout=max(lease.deadline - sent, 0.01)
        )
        if failed is not None:
            raise self._lose(held, lease)
        with self._mutex:
            if held.lost:
                raise LeaseLost(f"lock {lease.name!r}: lease with token {lease.token} expired")
            held.expires = sent + lease.ttl
            self._changed.notify_all()
        return lease.renewed(lease_deadline(sent, lease.ttl))

    def release(self, lease: Lease, keep_for: float = 0.0) -> None:
        with self._mutex:
            held = self._held.get(lease.owner)
            if held is None or held.token != lease.token:
                return
            if held.lost:
                del self._held[lease.owner]
                return
            if keep_for > 0:
                held.expires = min(held.expires, self._clock.monotonic() + keep_for)
                held.released = True
                self._changed.notify_all()
                return
            del self._held[lease.owner]
        try:
            self._delete(held.path, "release")
        except BackendError:
            # The node goes when the connection is back, or with the session.
            self._doom(held.path)

    def holder(self, name: str) -> Holder | None:
        lock_dir = self._lock_dir(name)
        self._ensure_connected()
        self._synced()
        try:
            children, parent = self._children_and_stat(lock_dir, "holder")
            node = _holder(children)
            if node is None:
                return None
            path = f"{lock_dir}/{node}"
            data, stat = self._wait(self._client.get_async(path), "holder")
            token = int(stat.czxid) + self._offset(lock_dir, parent)
        except NoNodeError:
            return None
        expires_in = None
        with self._mutex:
            for held in self._held.values():
                if held.path == path and not held.lost:
                    expires_in = max(0.0, held.expires - self._clock.monotonic())
        return Holder(name, bytes(data).decode(), token, expires_in)

    def wait(self, name: str, timeout: float) -> None:
        """Stand in line for ``name`` and return when the lock is free, or at ``timeout``.

        Only the first standby in line watches the holder; each other one watches the
        standby ahead of it, so a release wakes one standby. The ``wait-`` node stays after
        a return (see :data:`WAITER_LINGER`), so calling wait() again keeps the place."""
        lock_dir = self._lock_dir(name)
        end = self._clock.monotonic() + timeout
        with self._mutex:
            waiter = self._waiters.setdefault(name, _Waiter())
            waiter.users += 1
        try:
            while (left := end - self._clock.monotonic()) > 0:
                waiter.woken.clear()
                if self._client.connected:
                    try:
                        if not self._watch_ahead(lock_dir, waiter):
                            return
                    except BackendError:
                        # No watch is set: look again soon (a state change wakes us sooner).
                        left = min(left, RETRY_AFTER)
                waiter.woken.wait(left)
        finally:
            with self._mutex:
                waiter.users -= 1
                waiter.idle_since = self._clock.monotonic()
                self._changed.notify_all()

    def _watch_ahead(self, lock_dir: str, waiter: _Waiter) -> bool:
        """Watch the node ahead of ours in line; False when there is none (the lock is
        free). Wakes ``waiter`` at once if the line changed under us."""
        own = self._queue_node(lock_dir, waiter)
        children = self._children(lock_dir, "wait")
        ours = own.rsplit("/", 1)[1]
        if ours not in children:
            with self._mutex:
                if waiter.path == own:
                    waiter.path = None
            waiter.wake()
            return True
        line = sorted((c for c in children if c.startswith(WAIT)), key=_sequence)
        place = line.index(ours)
        ahead = line[place - 1] if place else _holder(children)
        if ahead is None:
            return False
        # get, not exists: exists would leave a watch behind on a node already gone.
        try:
            self._wait(self._client.get_async(f"{lock_dir}/{ahead}", watch=waiter.wake), "wait")
        except NoNodeError:
            waiter.wake()
        return True

    def _queue_node(self, lock_dir: str, waiter: _Waiter) -> str:
        with waiter.creating:
            if waiter.path is not None:
                return waiter.path
            marker = uuid.uuid4().hex
            try:
                path = self._wait(
                    self._client.create_async(
                        f"{lock_dir}/{WAIT}{marker}-",
                        ephemeral=True,
                        sequence=True,
                        makepath=True,
                    ),
                    "wait",
                )
            except BackendError:
                with self._mutex:
                    self._orphans.add((lock_dir, marker))
                raise
            with self._mutex:
                waiter.path = str(path)
            return str(path)

    def evict(self, name: str, token_above: int = 0) -> int:
        lock_dir = self._lock_dir(name)
        self._ensure_connected()
        self._wait(self._client.ensure_path_async(lock_dir), "evict")
        for _ in range(CAS_TRIES):
            self._synced()
            data, stat = self._wait(self._client.get_async(lock_dir), "evict")
            # Every node created after this write has a czxid above the zxids seen here.
            seen = int(max(stat.czxid, stat.mzxid, stat.pzxid))
            offset = max(_number(data, "offset"), token_above - seen)
            body = json.dumps({"offset": offset}).encode()
            try:
                written = self._wait(self._client.set_async(lock_dir, body, stat.version), "evict")
            except BadVersionError:
                continue
            break
        else:
            raise BackendError(f"zookeeper {self._where}: evict {name!r}: the lock kept changing")
        # Only now take out the holder (and any contender): a node created after the offset
        # was written reads the new offset, and every node created before is deleted here.
        for child in self._children(lock_dir, "evict"):
            if child.startswith(LOCK):
                self._delete(f"{lock_dir}/{child}", "evict")
        with self._mutex:
            for held in self._held.values():
                if held.name == name:
                    held.lost = True
        return int(written.mzxid) + offset

    # -- the housekeeper ------------------------------------------------------------------

    def _housekeep(self) -> None:
        """Delete what must go: nodes of leases that were not renewed in time, released
        while the connection was down, or left by a create whose reply was lost; and the
        ``wait-`` nodes of standbys that stopped waiting."""
        while True:
            with self._mutex:
                while not self._closed:
                    now = self._clock.monotonic()
                    paths, orphans = self._due(now)
                    if paths or orphans:
                        break
                    self._changed.wait(self._next_due(now))
                else:
                    return
            try:
                self._sweep(paths, orphans)
            except Exception:
                # Never let the housekeeper die: what it dropped goes with the session.
                log.exception("zookeeper clean-up failed", extra={"fields": {"url": self._where}})

    def _due(self, now: float) -> tuple[set[str], set[tuple[str, str]]]:
        """Under the mutex: take what is due, if ZooKeeper can be reached now."""
        for owner, held in list(self._held.items()):
            if not held.lost and held.expires <= now:
                held.lost = True
                self._doomed.add(held.path)
                if held.released:
                    del self._held[owner]
        for name, waiter in list(self._waiters.items()):
            if waiter.users == 0 and now - waiter.idle_since >= WAITER_LINGER:
                del self._waiters[name]
                if waiter.path:
                    self._doomed.add(waiter.path)
        if not self._client.connected or now < self._retry_at:
            return set(), set()
        paths, orphans = self._doomed, self._orphans
        self._doomed, self._orphans = set(), set()
        return paths, orphans

    def _next_due(self, now: float) -> float | None:
        times = [held.expires for held in self._held.values() if not held.lost]
        times += [w.idle_since + WAITER_LINGER for w in self._waiters.values() if not w.users]
        if self._doomed or self._orphans:
            times.append(max(self._retry_at, now + RETRY_AFTER))
        return max(0.0, min(times) - now) if times else None

    def _sweep(self, paths: set[str], orphans: set[tuple[str, str]]) -> None:
        failed: set[str] = set()
        lost: set[tuple[str, str]] = set()
        for path in paths:
            try:
                self._delete(path, "clean up")
            except BackendError:
                failed.add(path)
        for lock_dir, marker in orphans:
            try:
                for child in self._children(lock_dir, "clean up"):
                    if marker in child:
                        self._delete(f"{lock_dir}/{child}", "clean up")
            except BackendError:
                lost.add((lock_dir, marker))
        if failed or lost:
            with self._mutex:
                self._doomed |= failed
                self._orphans |= lost
                self._retry_at = self._clock.monotonic() + RETRY_AFTER

    # -- the ledger -------------------------------------------------------------------------

    def _job_dir(self, job: str) -> str:
        return f"{self._target.prefix}/runs/{_segment(job)}"

    def _run_dir(self, run_id: str) -> str:
        return f"{self._job_dir(run_id.split('@', 1)[0])}/{_segment(run_id)}"

    def _highest(self, job_dir: str) -> tuple[int, int]:
        """The highest token recorded for the job, and the version of the node keeping it."""
        try:
            data, stat = self._wait(self._client.get_async(job_dir), "read the ledger")
        except NoNodeError:
            self._wait(self._client.ensure_path_async(job_dir), "write the ledger")
            data, stat = self._wait(self._client.get_async(job_dir), "read the ledger")
        return _number(data, "highest"), int(stat.version)

    def _latest(self, run_dir: str) -> tuple[Attempt | None, int, bool]:
        """The run's newest attempt, its node's version, and whether the run's node exists."""
        try:
            children = self._wait(self._client.get_children_async(run_dir), "read the ledger")
        except NoNodeError:
            return None, -1, False
        if not children:
            return None, -1, True
        data, stat = self._wait(
            self._client.get_async(f"{run_dir}/{max(children)}"), "read the ledger"
        )
        return _decode(data), int(stat.version), True

    def claim(self, run: Run, lease: Lease, *, seen: int = 0, start: bool = True) -> Claim:
        held = self._current(lease)
        self._ensure_connected()
        job_dir, run_dir = self._job_dir(run.job), self._run_dir(run.run_id)
        for _ in range(CAS_TRIES):
            self._synced()
            highest, job_version = self._highest(job_dir)
            try:
                latest, version, exists = self._latest(run_dir)
            except NoNodeError:
                continue  # the newest attempt was pruned as we looked
            ops: list[tuple[Any, ...]] = [("check", held.path, -1)]
            # Never a new attempt over a succeeded one, whatever the caller saw: a stale
            # owner's finish can land between its read and this claim. The multi below
            # checks (or sets) the latest attempt at the version read here, so a finish
            # that lands after this read fails the multi and the next round sees it.
            current = (latest.attempt if latest else 0) == seen and (
                latest is None or latest.state != SUCCEEDED
            )
            if latest is not None:
                latest_path = f"{run_dir}/{latest.attempt:010d}"
                if current and latest.state == RUNNING:
                    abandoned = replace(latest, state=ABANDONED, finished_at=self._now())
                    ops.append(("set_data", latest_path, _encode(abandoned), version))
                else:
                    ops.append(("check", latest_path, version))
            new = self._new_attempt(run, lease, seen + 1) if current and start else None
            if new is None:
                ops.append(("check", job_dir, job_version))
            else:
                if not exists:
                    ops.append(("create", run_dir))
                ops.append(("create", f"{run_dir}/{new.attempt:010d}", _encode(new)))
                body = json.dumps({"highest": max(highest, lease.token)}).encode()
                ops.append(("set_data", job_dir, body, job_version))
            failed = self._commit(ops, "claim")
            if failed is None:
                return Claim(latest, new, highest)
            if failed[0] == 0:
                raise self._lose(held, lease)
        raise BackendError(f"zookeeper {self._where}: claim {run.run_id}: the ledger kept changing")

    def _now(self) -> datetime:
        """Now, to the millisecond the ledger keeps, so what a call returns is what it wrote."""
        moment = self._clock.now()
        return moment.replace(microsecond=moment.microsecond // 1000 * 1000)

    def _new_attempt(self, run: Run, lease: Lease, number: int) -> Attempt:
        return Attempt(
            run_id=run.run_id,
            job=run.job,
            attempt=number,
            state=RUNNING,
            token=lease.token,
            replica=owner_replica(lease.owner),
            scheduled_at=run.scheduled_at,
            started_at=self._now(),
        )

    def finish(self, run: Run, lease: Lease, attempt: int, outcome: Outcome) -> bool:
        """Read the attempt, then set it only at the version read: ZooKeeper refuses the
        write if anything (a takeover marking it abandoned) changed the node meanwhile, so
        the row's token and ``running`` state fence it atomically. No check on the lock node:
        the lease need not be held any more (``overlap: allow`` releases the lock right after
        the claim and must still record its outcome)."""
        self._ensure_connected()
        path = f"{self._run_dir(run.run_id)}/{attempt:010d}"
        for _ in range(CAS_TRIES):
            self._synced()
            try:
                data, stat = self._wait(self._client.get_async(path), "finish")
            except NoNodeError:
                return False
            row = _decode(data)
            if row.state != RUNNING or row.token != lease.token:
                return False
            done = replace(
                row,
                state=outcome.state,
                error=outcome.error,
                reason=outcome.reason,
                finished_at=self._now(),
            )
            body = _encode(done)
            try:
                self._wait(self._client.set_async(path, body, stat.version), "finish")
            except BadVersionError:
                continue
            except NoNodeError:
                return False
            return True
        raise BackendError(f"zookeeper {self._where}: finish {run.run_id}: it kept changing")

    def skip(self, run: Run, reason: str, replica: str) -> bool:
        self._ensure_connected()
        job_dir, run_dir = self._job_dir(run.job), self._run_dir(run.run_id)
        row = Attempt(
            run_id=run.run_id,
            job=run.job,
            attempt=1,
            state=SKIPPED,
            token=None,
            replica=replica,
            scheduled_at=run.scheduled_at,
            finished_at=self._now(),
            reason=reason,
        )
        self._wait(self._client.ensure_path_async(job_dir), "skip")
        first = f"{run_dir}/{1:010d}"
        if self._commit([("create", run_dir), ("create", first, _encode(row))], "skip") is None:
            return True
        # The run's node exists: write the row only if it has no attempt (create fails if so).
        self._synced()
        if self._children(run_dir, "skip"):
            return False
        try:
            self._wait(self._client.create_async(first, _encode(row)), "skip")
        except (NodeExistsError, NoNodeError):
            return False
        return True

    def _rows(self, jobs: list[str]) -> list[tuple[str, Attempt]]:
        """Every attempt of ``jobs`` with its node's path, newest first (by czxid, the order
        in which they were written). Reads are pipelined: one round trip per level."""
        client = self._client
        run_lists = [(self._job_dir(j), client.get_children_async(self._job_dir(j))) for j in jobs]
        attempt_lists = [
            (f"{job_dir}/{run_id}", client.get_children_async(f"{job_dir}/{run_id}"))
            for job_dir, pending in run_lists
            for run_id in self._gather(pending, [])
        ]
        reads = [
            (f"{run_dir}/{child}", client.get_async(f"{run_dir}/{child}"))
            for run_dir, pending in attempt_lists
            for child in self._gather(pending, [])
        ]
        found: list[tuple[int, str, Attempt]] = []
        for path, pending in reads:
            got = self._gather(pending, None)
            if got is not None:
                found.append((int(got[1].czxid), path, _decode(got[0])))
        found.sort(key=lambda item: item[0], reverse=True)
        return [(path, attempt) for _, path, attempt in found]

    def _gather(self, pending: Any, missing: Any) -> Any:
        try:
            return self._wait(pending, "read the ledger")
        except NoNodeError:
            return missing

    def _jobs(self, job: str | None) -> list[str]:
        if job is not None:
            return [job]
        return self._children(f"{self._target.prefix}/runs", "read the ledger")

    def attempts(self, run_id: str) -> list[Attempt]:
        self._ensure_connected()
        self._synced()
        run_dir = self._run_dir(run_id)
        pending = [
            self._client.get_async(f"{run_dir}/{child}")
            for child in self._children(run_dir, "read the ledger")
        ]
        rows = [_decode(got[0]) for got in (self._gather(p, None) for p in pending) if got]
        return sorted(rows, key=lambda row: row.attempt, reverse=True)

    def history(self, job: str | None, limit: int) -> list[Attempt]:
        self._ensure_connected()
        self._synced()
        rows = [attempt for _, attempt in self._rows(self._jobs(job))]
        return rows[:limit] if limit else rows

    def prune(self, before: datetime, keep: int) -> int:
        """Also deletes expired shared state, by a scan of every namespace: a namespace that
        nobody scans would otherwise keep its expired nodes."""
        self.scan("")
        self._ensure_connected()
        self._synced()
        gone = 0
        for job in self._jobs(None):
            left: dict[str, int] = {}
            doomed = []
            for place, (path, row) in enumerate(self._rows([job])):
                run_dir = path.rsplit("/", 1)[0]
                left[run_dir] = left.get(run_dir, 0) + 1
                if row.state != RUNNING and (row.scheduled_at < before or place >= keep):
                    doomed.append(path)
                    left[run_dir] -= 1
            for pending in [self._client.delete_async(path) for path in doomed]:
                self._gather(pending, None)
            gone += len(doomed)
            for run_dir in [run_dir for run_dir, count in left.items() if count == 0]:
                try:
                    self._delete(run_dir, "prune")
                except NotEmptyError:
                    pass  # a new attempt arrived meanwhile
        return gone

    # -- shared state -----------------------------------------------------------------------

    def _state_path(self, key: str) -> str:
        namespace, slash, name = key.partition("/")
        if not slash:
            raise ValueError(f"shared-state key {key!r}: want namespace/name")
        return f"{self._target.prefix}/state/{_state_node(namespace)}/{_state_node(name)}"

    def put(self, key: str, value: str, ttl: float | None = None) -> None:
        """The node's data is a header line (the TTL in seconds, empty without one) and the
        value: a line rather than JSON, so that escaping cannot push a value towards the
        1 MiB a znode may hold (``jute.maxbuffer``). A value too large for that is refused
        here, before ZooKeeper drops the connection over it (:data:`MAX_STATE`)."""
        path = self._state_path(key)
        data = ("" if ttl is None else repr(float(ttl))).encode() + b"\n" + value.encode()
        if len(data) + len(path.encode()) > MAX_STATE:
            raise BackendError(
                f"zookeeper {self._where}: put {key!r}: {len(value.encode())} bytes is more"
                f" than a znode takes (jute.maxbuffer, about {MAX_STATE} bytes with its path)"
            )
        self._ensure_connected()
        for _ in range(CAS_TRIES):
            try:
                self._wait(self._client.set_async(path, data), "put")
                return
            except NoNodeError:
                pass
            try:
                self._wait(self._client.create_async(path, data, makepath=True), "put")
                return
            except NodeExistsError:
                continue  # created meanwhile by another replica: overwrite it
        raise BackendError(f"zookeeper {self._where}: put {key!r}: the node kept changing")

    def scan(self, prefix: str) -> dict[str, str]:
        """The nodes of the namespace that ``prefix`` names (or, for a prefix without ``/``,
        of every namespace starting with it), read in one pipelined round trip.

        Expiry is on the leader's clock: a node's ``mtime`` plus its TTL, against the
        ``mtime`` the leader stamps on the state folder as this scan first touches it. That
        write also has this session's server catch up with every write before it, so the scan
        sees every put that returned before it began. Expired nodes found are deleted, each
        only if no put has rewritten it since (its version), and only as far as ZooKeeper
        can be reached now: what is left goes at a later scan."""
        folder = f"{self._target.prefix}/state"
        namespace, slash, _ = prefix.partition("/")
        now = self._leader_clock()
        if slash:
            namespaces = [namespace]
        else:
            listed = map(_state_part, self._children(folder, "scan"))
            namespaces = [found for found in listed if found.startswith(namespace)]
        reads = []
        for space in namespaces:
            space_dir = f"{folder}/{_state_node(space)}"
            for node in self._children(space_dir, "scan"):
                key = f"{space}/{_state_part(node)}"
                if key.startswith(prefix):
                    path = f"{space_dir}/{node}"
                    reads.append((key, path, self._client.get_async(path)))
        found: dict[str, str] = {}
        expired = []
        for key, path, pending in reads:
            got = self._gather(pending, None)
            if got is None:
                continue  # deleted since it was listed
            data, stat = got
            header, _, value = bytes(data).partition(b"\n")
            if header and stat.mtime + float(header) * 1000 <= now:
                expired.append(self._client.delete_async(path, stat.version))
            else:
                found[key] = value.decode()
        for pending in expired:
            with contextlib.suppress(NoNodeError, BadVersionError, BackendError):
                self._wait(pending, "delete expired shared state")
        return found

    def delete(self, key: str) -> None:
        path = self._state_path(key)
        self._ensure_connected()
        self._delete(path, "delete")

    def server_time(self) -> datetime | None:
        """The leader's wall clock (:meth:`_leader_clock`): a quorum write, which the skew
        check makes once a minute. Sessions expire on the servers' tick timers, never on
        wall time, so skew cannot break a lease; but fire times come from each replica's
        clock, and one that runs ahead would start firings early."""
        return datetime.fromtimestamp(self._leader_clock() / 1000, UTC)

    def _leader_clock(self) -> int:
        """Milliseconds on the leader's wall clock: the ``mtime`` it stamps on a write to
        the state folder (which always exists). ZooKeeper has no other clock to ask; its
        time is whichever server leads now, accurate to one round trip."""
        self._ensure_connected()
        written = self._client.set_async(f"{self._target.prefix}/state", b"")
        stamp: int = self._wait(written, "read the leader's clock").mtime
        return stamp

    def close(self) -> None:
        """Close the session: its ephemeral nodes (locks still held, places in line) go
        with it, so a ``lock_at_least_for`` does not outlive the process."""
        with self._mutex:
            if self._closed:
                return
            self._closed = True
            self._changed.notify_all()
        self._housekeeper.join()
        self._client.stop()
        self._client.close()
