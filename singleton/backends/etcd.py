"""``etcd://h1:2379,h2:2379,h3:2379/prefix``: etcd leases, revision fencing, the ledger in keys.

How the lock maps onto etcd (compare etcd's ``concurrency.Mutex``):

* Each acquisition grants its own etcd lease and, in one transaction, creates
  ``{prefix}/locks/{job}/{owner}`` with it, only while nothing exists under
  ``{prefix}/locks/{job}/``. The owner string is unique per acquisition, so that key *is* the
  acquisition: every later write of the owner compares the key in its own transaction, and
  a comparison on the value of a missing key always fails — an expired, released or evicted
  owner cannot write.
* The fencing token is the key's create revision (plus a per-lock offset, see :meth:`evict`).
  The revision is one counter for the whole keyspace, raised by every write and never reused,
  so a key created later always has a higher one, across leader changes and restarts.
* Standbys queue like Mutex waiters, under ``{prefix}/waiters/{job}/``, each watching only the
  waiter just before it (the first one watches the lock key): a release wakes one standby,
  not the herd. The queue is kept apart from the lock keys because ``try_acquire`` must not
  block: a Mutex waiter at the head of the queue *is* the owner, so a standby that gave up
  would hold the lock; here it only delays its successor's wake-up until its short lease ends.

Shared state (fleet fingerprints, operator switches) is ``{prefix}/state/{key}``, one etcd key
per entry, so a scan is one range read of the keys under its prefix. A value with a TTL is put
with an etcd lease of its own: it disappears on the leader's clock, with nothing to sweep here.

Time: etcd grants TTLs in whole seconds, at least 1.5 x its election timeout (2 s with the
defaults), measured by the leader's monotonic clock; a new leader restarts every lease's
countdown, and expired leases are swept every 500 ms. So a server lease only ever outlives the
local deadline, which is computed from the TTL the caller asked for (never the rounded-up or
raised one) and from when the request was sent: the holder stops first, the token does the
rest.

The client is the v3 JSON gateway over one kept ``httpx.Client`` (see docs/backends/etcd.md
for why not ``etcd3``, ``etcd3gw`` or ``aetcd``): failover across the listed members and
authentication are built here.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import math
import secrets
import ssl
import threading
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import httpx

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
from singleton.errors import (
    BackendError,
    BackendUnavailable,
    ConfigError,
    LeaseLost,
    SingletonError,
)
from singleton.urls import redact

log = logging.getLogger("singleton.backends.etcd")

Json = dict[str, Any]

DEFAULT_PORT = 2379
DEFAULT_PREFIX = "/singleton"
#: etcd's shortest lease with its default election timeout (1.5 x 1 s, in whole seconds).
MIN_TTL = 2
#: A standby's place in the queue lives this long after it stops waiting (etcd's minimum).
WAITER_TTL = 2
#: How often a waiting standby refreshes its place, and so the longest single watch.
WAITER_KEEP = 0.5
#: Compare-and-set rounds before a ledger write gives up on a run that keeps changing.
CAS_ROUNDS = 5
#: Deletes per transaction when pruning; etcd refuses more than --max-txn-ops (128).
PRUNE_BATCH = 100
#: Ledger tokens are kept zero-padded so that etcd's byte-wise value comparison is numeric.
TOKEN_DIGITS = 20
_QUERY_OPTIONS = frozenset({"tls", "ca_file", "cert_file", "key_file"})

# gRPC status codes the gateway passes on.
_INVALID_ARGUMENT = 3
_DEADLINE_EXCEEDED = 4
_NOT_FOUND = 5
_PERMISSION_DENIED = 7
_UNAVAILABLE = 14
_UNAUTHENTICATED = 16


# -- configuration ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """What an ``etcd://`` URL says."""

    endpoints: tuple[str, ...]
    prefix: str
    user: str | None = None
    password: str | None = None
    tls: bool = False
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None


def _endpoint(text: str, url: str) -> str:
    """``host:port`` (default port 2379; IPv6 in brackets)."""
    host, port = text, str(DEFAULT_PORT)
    if text.startswith("["):
        close = text.find("]")
        host, rest = text[: close + 1], text[close + 1 :]
        if close < 0 or (rest and not rest.startswith(":")):
            raise ConfigError(f"backend.url {redact(url)!r}: bad member address {text!r}")
        port = rest[1:] or port
    elif ":" in text:
        host, port = text.rsplit(":", 1)
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"backend.url {redact(url)!r}: bad member address {text!r}")
    return f"{host}:{port}"


def _options(url: str, query: str) -> dict[str, str]:
    options = dict(parse_qsl(query, keep_blank_values=True))
    unknown = sorted(set(options) - _QUERY_OPTIONS)
    if unknown:
        raise ConfigError(
            f"backend.url {redact(url)!r}: unknown option {unknown[0]!r}"
            f" (allowed: {', '.join(sorted(_QUERY_OPTIONS))})"
        )
    for name in ("ca_file", "cert_file", "key_file"):
        if name in options and not Path(options[name]).is_file():
            raise ConfigError(f"backend.url: {name} {options[name]!r} is not a readable file")
    if options.get("tls", "true").lower() not in ("1", "true", "yes", "0", "false", "no"):
        raise ConfigError(f"backend.url: tls={options['tls']!r}: want true or false")
    return options


def parse_url(url: str) -> Settings:
    """Read ``etcd://[user:password@]h1[:port],h2[:port]/prefix[?tls=true&ca_file=…]``.

    TLS lives in the URL, not in separate options, because the URL is the one thing every
    entry point takes: the config file, ``SINGLETON_BACKEND__URL`` and ``singleton.lock``.
    """
    parts = urlsplit(url)
    if parts.scheme.lower() != "etcd":
        raise ConfigError(f"backend.url {redact(url)!r}: scheme must be etcd://")
    userinfo, _, hosts = parts.netloc.rpartition("@")
    if not hosts:
        raise ConfigError(f"backend.url {redact(url)!r}: no etcd member given")
    endpoints = tuple(_endpoint(host.strip(), url) for host in hosts.split(","))
    user = password = None
    if userinfo:
        name, _, secret = userinfo.partition(":")
        user, password = unquote(name), unquote(secret)
        if not user:
            raise ConfigError(f"backend.url {redact(url)!r}: a password needs a user name")
    options = _options(url, parts.query)
    tls = options.get("tls", "").lower() in ("1", "true", "yes") or any(
        name in options for name in ("ca_file", "cert_file", "key_file")
    )
    if options.get("tls", "").lower() in ("0", "false", "no") and tls:
        raise ConfigError(f"backend.url {redact(url)!r}: certificate files given with tls=false")
    if "key_file" in options and "cert_file" not in options:
        raise ConfigError(f"backend.url {redact(url)!r}: key_file needs cert_file")
    return Settings(
        endpoints=endpoints,
        prefix="/" + parts.path.strip("/") if parts.path.strip("/") else DEFAULT_PREFIX,
        user=user,
        password=password,
        tls=tls,
        ca_file=options.get("ca_file"),
        cert_file=options.get("cert_file"),
        key_file=options.get("key_file"),
    )


# -- the wire format: base64 keys and values, 64-bit numbers as strings --------------------------


def _b64(data: str | bytes) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return base64.b64encode(raw).decode("ascii")


def _text(data: str) -> str:
    return base64.b64decode(data).decode()


def _prefix_end(prefix: str) -> bytes:
    """The ``range_end`` that makes a range cover every key starting with ``prefix``."""
    raw = prefix.encode()
    # Our prefixes end with "/" or a shared-state key character (ASCII), never 0xff.
    return raw[:-1] + bytes([raw[-1] + 1])


def _padded(token: int) -> str:
    return str(token).zfill(TOKEN_DIGITS)


def _get(
    key: str,
    end: bytes | None = None,
    *,
    limit: int = 0,
    by: str | None = None,
    newest_first: bool = False,
    created_before: int = 0,
    keys_only: bool = False,
) -> Json:
    """A range request; ``by`` is ``"CREATE"`` or ``"KEY"``; ``keys_only`` leaves the values
    out (a key's lease is still there)."""
    request: Json = {"key": _b64(key)}
    if keys_only:
        request["keys_only"] = True
    if end is not None:
        request["range_end"] = _b64(end)
    if limit:
        request["limit"] = str(limit)
    if by is not None:
        request["sort_target"] = by
        request["sort_order"] = "DESCEND" if newest_first else "ASCEND"
    if created_before:
        request["max_create_revision"] = str(created_before - 1)
    return {"request_range": request}


def _get_prefix(prefix: str, **kwargs: Any) -> Json:
    return _get(prefix, _prefix_end(prefix), **kwargs)


def _put(key: str, value: str, lease: int = 0) -> Json:
    request: Json = {"key": _b64(key), "value": _b64(value)}
    if lease:
        request["lease"] = str(lease)
    return {"request_put": request}


def _delete(key: str, end: bytes | None = None, *, prev_kv: bool = True) -> Json:
    request: Json = {"key": _b64(key), "prev_kv": prev_kv}
    if end is not None:
        request["range_end"] = _b64(end)
    return {"request_delete_range": request}


def _is(key: str, value: str) -> Json:
    """``key`` exists and holds ``value`` (a missing key's value never compares equal)."""
    return {"key": _b64(key), "target": "VALUE", "result": "EQUAL", "value": _b64(value)}


def _nothing_under(prefix: str, end: bytes | None = None) -> Json:
    """No key in [prefix, end): every key there would have a create revision above 0."""
    return {
        "key": _b64(prefix),
        "range_end": _b64(end if end is not None else _prefix_end(prefix)),
        "target": "CREATE",
        "result": "EQUAL",
        "create_revision": "0",
    }


def _unchanged(key: str, mod_revision: int) -> Json:
    """``key`` was last written at ``mod_revision`` (0: it still does not exist)."""
    return {"key": _b64(key), "target": "MOD", "result": "EQUAL", "mod_revision": str(mod_revision)}


def _raise_to(key: str, token: int) -> Json:
    """A nested transaction: store ``token`` in ``key`` unless it already holds one as high.
    etcd has no "greater or equal", and comparing a missing key fails, which here means
    "write it": so the test is "already above token - 1"."""
    return {
        "request_txn": {
            "compare": [
                {
                    "key": _b64(key),
                    "target": "VALUE",
                    "result": "GREATER",
                    "value": _b64(_padded(token - 1)),
                }
            ],
            "success": [],
            "failure": [_put(key, _padded(token))],
        }
    }


@dataclass(frozen=True)
class _KV:
    key: str
    value: str
    create: int
    mod: int
    lease: int


def _kvs(result: Json) -> list[_KV]:
    """The key-values of a range or delete result (proto3 JSON leaves out empty fields)."""
    rows: list[Json] = result.get("kvs") or result.get("prev_kvs") or []
    return [
        _KV(
            key=_text(kv["key"]),
            value=_text(kv.get("value", "")),
            create=int(kv.get("create_revision", 0)),
            mod=int(kv.get("mod_revision", 0)),
            lease=int(kv.get("lease", 0)),
        )
        for kv in rows
    ]


def _results(reply: Json) -> list[Json]:
    """The results of a transaction's operations, in order."""
    return [next(iter(item.values())) for item in reply.get("responses", [])]


def _first(result: Json) -> _KV | None:
    found = _kvs(result)
    return found[0] if found else None


def _revision(reply: Json) -> int:
    return int(reply["header"]["revision"])


def _stored(value: str, ttl: float | None = None, granted: int = 0) -> str:
    """A shared-state value as kept in etcd: a header line, then the value. The header is
    empty without a TTL, else the TTL asked for and the one etcd granted (``1.0 2``), which
    :meth:`EtcdBackend.scan` compares: etcd rounds a lease up to whole seconds and its minimum.
    A header line rather than JSON, so that a 1 MiB value is not inflated by escaping past
    etcd's request limit (1.5 MiB by default)."""
    return (f"{ttl!r} {granted}" if ttl is not None else "") + "\n" + value


def _overshoot(header: str) -> float:
    """How much longer than asked the lease of a stored value was granted (0: no TTL)."""
    if not header:
        return 0.0
    ttl, granted = header.split()
    return int(granted) - float(ttl)


def _encode(attempt: Attempt) -> str:
    return json.dumps(attempt.to_record(), separators=(",", ":"))


def _decode(text: str) -> Attempt:
    return Attempt.from_record(json.loads(text))


# -- the gateway ---------------------------------------------------------------------------------


class Refused(BackendError):
    """etcd answered with an error; ``code`` is its gRPC status code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def _ssl_context(settings: Settings) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=settings.ca_file)
    if settings.cert_file:
        context.load_cert_chain(settings.cert_file, settings.key_file)
    return context


def _error_of(body: Json) -> tuple[int, str] | None:
    """The gRPC error in a reply: unary replies carry ``{"error": msg, "code": n}``, streamed
    ones ``{"error": {"grpc_code": n, "message": msg}}``."""
    error = body.get("error")
    if error is None:
        return None
    if isinstance(error, dict):
        return int(error.get("grpc_code", 2)), str(error.get("message", error))
    return int(body.get("code", 2)), str(body.get("message", error))


class Gateway:
    """The v3 JSON gateway of every listed member, through one kept HTTP client.

    Requests go to the member that answered last. A member that cannot be connected to is
    skipped for the next one at once. A request that was sent but got no answer may have
    been applied: reads, lease grants (an unused lease just expires), keep-alives and revokes
    are sent to the next member; a write transaction is not sent again — it could apply
    twice — the caller gets :class:`BackendUnavailable` and the next call goes elsewhere.
    """

    def __init__(self, url: str, settings: Settings, timeout: float) -> None:
        self._url = url
        self._settings = settings
        self._timeout = timeout
        scheme = "https" if settings.tls else "http"
        self._bases = [f"{scheme}://{host}" for host in settings.endpoints]
        self._current = 0
        self._token: str | None = None
        # Without TLS, a context that trusts nothing: httpx would otherwise load the whole CA
        # bundle (0.2 s) for connections that never use it.
        context = (
            _ssl_context(settings) if settings.tls else ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        )
        self._client = httpx.Client(timeout=timeout, verify=context)

    @property
    def endpoint(self) -> str:
        """The member the next request goes to first."""
        return self._settings.endpoints[self._current]

    def close(self) -> None:
        self._client.close()

    def _order(self) -> list[int]:
        start = self._current
        return [(start + step) % len(self._bases) for step in range(len(self._bases))]

    def _leave(self, index: int) -> None:
        if self._current == index:
            self._current = (index + 1) % len(self._bases)

    def _headers(self) -> dict[str, str]:
        return {"Authorization": self._token} if self._token else {}

    def authenticate(self) -> None:
        """Trade the URL's user and password for a token (replicated by Raft, so every member
        takes it). A wrong password is a configuration error, said once, without the secret."""
        settings = self._settings
        try:
            reply = self.call(
                "/v3/auth/authenticate",
                {"name": settings.user, "password": settings.password},
                replayable=True,
                login=True,
            )
        except Refused as exc:
            if "not enabled" in str(exc):
                return  # the credentials are not needed; requests work without a token
            raise
        self._token = reply.get("token")

    def _send(self, index: int, path: str, body: Json, headers: dict[str, str]) -> Json:
        response = self._client.post(self._bases[index] + path, json=body, headers=headers)
        try:
            reply: Json = response.json()
        except ValueError as exc:
            raise BackendError(
                f"etcd {self._settings.endpoints[index]}{path}: HTTP {response.status_code},"
                " not a JSON gateway answer"
            ) from exc
        if isinstance(reply.get("result"), dict):
            return dict(reply["result"])  # streamed calls (keep-alive) wrap their one answer
        return reply

    def _post(self, index: int, path: str, body: Json, login: bool) -> Json:
        reply = self._send(index, path, body, {} if login else self._headers())
        error = _error_of(reply)
        if error and error[0] == _UNAUTHENTICATED and not login and self._settings.user:
            # Simple tokens expire after five idle minutes (--auth-token-ttl): log in again.
            self.authenticate()
            reply = self._send(index, path, body, self._headers())
            error = _error_of(reply)
        if error:
            raise self._refused(index, *error)
        return reply

    def _refused(self, index: int, code: int, message: str) -> SingletonError:
        """Our error for etcd's: the ones an operator must fix are configuration errors."""
        url = redact(self._url)
        if code == _INVALID_ARGUMENT and "authentication failed" in message:
            return ConfigError(
                f"backend.url {url!r}: etcd refused user {self._settings.user!r}:"
                " wrong user name or password"
            )
        if code == _INVALID_ARGUMENT and "user name is empty" in message:
            return ConfigError(
                f"backend.url {url!r}: etcd requires authentication; put user:password@ in it"
            )
        if code == _PERMISSION_DENIED:
            return ConfigError(
                f"backend.url {url!r}: etcd user {self._settings.user!r} may not read and"
                f" write {self._settings.prefix}/: grant it a readwrite role there"
            )
        return Refused(f"etcd {self._settings.endpoints[index]}: {message}", code)

    def call(self, path: str, body: Json, *, replayable: bool = False, login: bool = False) -> Json:
        """POST ``body`` to ``path`` on the first member that answers; ``replayable`` says the
        request may be sent again after its answer was lost; ``login`` sends no token."""
        failures: list[str] = []
        last: Exception | None = None
        for index in self._order():
            host = self._settings.endpoints[index]
            try:
                reply = self._post(index, path, body, login)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                failures.append(f"{host}: {exc or type(exc).__name__}")
                last = exc
                self._leave(index)
                continue
            except httpx.TransportError as exc:
                self._leave(index)
                if not replayable:
                    raise BackendUnavailable(
                        f"etcd {host}: no answer to {path} ({type(exc).__name__});"
                        " it may or may not have been applied"
                    ) from exc
                failures.append(f"{host}: {type(exc).__name__}")
                last = exc
                continue
            except Refused as exc:
                if exc.code not in (_UNAVAILABLE, _DEADLINE_EXCEEDED):
                    raise
                self._leave(index)
                # "no leader" is refused before anything is proposed; a timeout is not.
                if not replayable and "no leader" not in str(exc):
                    raise BackendUnavailable(str(exc)) from exc
                failures.append(str(exc))
                last = exc
                continue
            self._current = index
            return reply
        raise BackendUnavailable(
            f"etcd unreachable ({'; '.join(failures)})"
            if failures
            else "etcd unreachable: no member listed"
        ) from last

    def watch_deletion(self, key: str, revision: int, timeout: float) -> bool:
        """Block until ``key`` is deleted at or after ``revision`` (True) or ``timeout``
        passes (False). A watch that broke also returns True: the caller looks again, on
        whichever member answers then."""
        body = {
            "create_request": {
                "key": _b64(key),
                "start_revision": str(revision),
                "filters": ["NOPUT"],
            }
        }
        limits = httpx.Timeout(self._timeout, read=max(timeout, 0.001))
        failures: list[str] = []
        for index in self._order():
            url = self._bases[index] + "/v3/watch"
            try:
                with self._client.stream(
                    "POST", url, json=body, headers=self._headers(), timeout=limits
                ) as response:
                    return self._first_event(response, self._settings.endpoints[index])
            except httpx.ReadTimeout:
                return False
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                failures.append(f"{self._settings.endpoints[index]}: {exc}")
                self._leave(index)
            except httpx.TransportError:
                self._leave(index)
                return True
        raise BackendUnavailable(f"etcd unreachable ({'; '.join(failures)})")

    def _first_event(self, response: httpx.Response, host: str) -> bool:
        for line in response.iter_lines():
            if not line.strip():
                continue
            message: Json = json.loads(line)
            result = message.get("result", {})
            if result.get("events") or result.get("compact_revision"):
                return True  # compacted past our revision: the caller looks again
            error = _error_of(message)
            if error or result.get("canceled"):
                reason = error[1] if error else result.get("cancel_reason", "cancelled")
                raise BackendError(f"etcd {host}: watch refused: {reason}")
        return True


# -- the backend ---------------------------------------------------------------------------------


@dataclass
class _Waiter:
    """This backend's place in a lock's standby queue."""

    key: str
    revision: int
    lease: int
    kept_at: float


@dataclass(frozen=True)
class _Found:
    """A run's latest attempt as a claim saw it, and the job's highest recorded token."""

    latest: Attempt | None
    mod: int
    highest: int

    @property
    def number(self) -> int:
        return self.latest.attempt if self.latest else 0


class EtcdBackend(Composed):
    """Locks, standby queue and ledger in an etcd cluster, reached through its JSON gateway."""

    capabilities = Capabilities(fencing=True, shared=True, notify=True, min_ttl=float(MIN_TTL))

    def __init__(self, url: str, clock: Clock = SYSTEM_CLOCK, timeout: float | str = 1.0) -> None:
        """``timeout`` (``backend.timeout``, default 1 s) bounds each request to one member;
        keep it under a third of the shortest lock TTL, so that a renewal can still try
        another member before the lease's deadline."""
        seconds = parse_duration(timeout)
        if seconds <= 0:
            raise ConfigError(f"backend.timeout must be positive, got {timeout!r}")
        self.url = url
        self._clock = clock
        self._settings = parse_url(url)
        self._prefix = self._settings.prefix
        self._gateway = Gateway(url, self._settings, seconds)
        self._mutex = threading.Lock()
        self._queue: dict[str, _Waiter] = {}
        self._timers: set[threading.Timer] = set()
        if self._settings.user:
            try:
                self._gateway.authenticate()  # a wrong password fails at start, not at 2 a.m.
            except SingletonError:
                self._gateway.close()
                raise

    @property
    def endpoint(self) -> str:
        """The etcd member this backend talks to now (``host:port``)."""
        return self._gateway.endpoint

    # -- keys -----------------------------------------------------------------------------------

    def _locks(self, name: str) -> str:
        return f"{self._prefix}/locks/{name}/"

    def _waiters(self, name: str) -> str:
        return f"{self._prefix}/waiters/{name}/"

    def _offset_key(self, name: str) -> str:
        return f"{self._prefix}/offsets/{name}"

    def _highest_key(self, job: str) -> str:
        return f"{self._prefix}/highest/{job}"

    def _runs(self, job: str | None = None) -> str:
        return f"{self._prefix}/runs/" + (f"{job}/" if job is not None else "")

    def _run_dir(self, run_id: str) -> str:
        # Job names cannot contain "@" or "/", so the job is the run ID up to its first "@".
        return f"{self._runs(run_id.partition('@')[0])}{run_id}/"

    def _attempt_key(self, run_id: str, attempt: int) -> str:
        return f"{self._run_dir(run_id)}{attempt:08d}"

    def _state(self, key: str = "") -> str:
        return f"{self._prefix}/state/{key}"

    # -- requests -------------------------------------------------------------------------------

    def _txn(self, compare: list[Json], success: list[Json], failure: list[Json]) -> Json:
        body = {"compare": compare, "success": success, "failure": failure}
        writes = any("request_range" not in op for op in success + failure)
        return self._gateway.call("/v3/kv/txn", body, replayable=not writes)

    def _read(self, *ops: Json) -> tuple[list[Json], int]:
        """Several ranges read at one revision (a transaction without comparisons)."""
        reply = self._txn([], list(ops), [])
        return _results(reply), _revision(reply)

    def _grant(self, ttl: float) -> tuple[int, int]:
        """A new etcd lease of at least ``ttl`` seconds: its id and the TTL etcd granted."""
        reply = self._gateway.call(
            "/v3/lease/grant", {"TTL": str(max(MIN_TTL, math.ceil(ttl)))}, replayable=True
        )
        return int(reply["ID"]), int(reply.get("TTL", 0))

    def _keepalive(self, lease: int) -> int:
        """Refresh an etcd lease; its TTL now, 0 or less when it is gone."""
        reply = self._gateway.call("/v3/lease/keepalive", {"ID": str(lease)}, replayable=True)
        return int(reply.get("TTL", 0))

    def _time_to_live(self, lease: int) -> int:
        """Whole seconds (rounded down) the lease has left on the leader's clock; -1 when it
        is gone. proto3 leaves a TTL of 0 out of the reply."""
        reply = self._gateway.call("/v3/lease/timetolive", {"ID": str(lease)}, replayable=True)
        return int(reply.get("TTL", 0))

    def _revoke(self, lease: int) -> None:
        """Drop an etcd lease we no longer use. Best effort: if it cannot be reached now, the
        lease ends by itself within its TTL, and its keys are gone already or go with it."""
        try:
            self._gateway.call("/v3/lease/revoke", {"ID": str(lease)}, replayable=True)
        except Refused as exc:
            if exc.code != _NOT_FOUND:
                raise
        except BackendUnavailable:
            pass

    # -- lock -----------------------------------------------------------------------------------

    def _holder_kv(self, name: str) -> tuple[_KV | None, int]:
        """The lock key of ``name`` (if any) and the lock's token offset, at one revision."""
        results, _ = self._read(
            _get_prefix(self._locks(name), limit=1, by="CREATE"), _get(self._offset_key(name))
        )
        offset = _first(results[1])
        return _first(results[0]), int(offset.value) if offset else 0

    def try_acquire(self, name: str, ttl: float, owner: str) -> Lease | None:
        sent = self._clock.monotonic()
        # Look before granting: a standby polls a busy lock, and a read costs no Raft write.
        if self._holder_kv(name)[0] is not None:
            return None
        lease, granted = self._grant(ttl)
        waiter = self._queue.get(name)
        success = [_put(self._locks(name) + owner, owner, lease), _get(self._offset_key(name))]
        if waiter is not None:
            success.append(_delete(waiter.key))  # our place in the queue is used up
        reply = self._txn([_nothing_under(self._locks(name))], success, [])
        if not reply.get("succeeded"):
            self._revoke(lease)
            return None
        with self._mutex:
            if self._queue.get(name) is waiter:
                self._queue.pop(name, None)
        offset = _first(_results(reply)[1])
        token = _revision(reply) + (int(offset.value) if offset else 0)
        # The deadline uses the TTL asked for, never the whole seconds etcd rounded it up to.
        return Lease(name, owner, token, ttl, lease_deadline(sent, min(ttl, granted)))

    def _lost(self, lease: Lease) -> LeaseLost:
        return LeaseLost(f"lock {lease.name!r}: lease with token {lease.token} is gone")

    def renew(self, lease: Lease) -> Lease:
        sent = self._clock.monotonic()
        results, _ = self._read(
            _get(self._locks(lease.name) + lease.owner), _get(self._offset_key(lease.name))
        )
        kv, offset = _first(results[0]), _first(results[1])
        token = kv.create + (int(offset.value) if offset else 0) if kv else None
        if kv is None or kv.value != lease.owner or token != lease.token:
            raise self._lost(lease)
        granted = self._keepalive(kv.lease)
        if granted <= 0:
            raise self._lost(lease)
        return lease.renewed(lease_deadline(sent, min(lease.ttl, granted)))

    def _release_now(self, lease: Lease) -> None:
        key = self._locks(lease.name) + lease.owner
        reply = self._txn([_is(key, lease.owner)], [_delete(key)], [])
        if reply.get("succeeded"):
            for kv in _kvs(_results(reply)[0]):
                self._revoke(kv.lease)

    def release(self, lease: Lease, keep_for: float = 0.0) -> None:
        """With ``keep_for`` the lock key is deleted that much later by a timer here: etcd
        cannot shorten a lease, and its whole-second TTLs and 500 ms expiry sweep could not
        end one on time anyway. If this process dies first, the lease ends at its TTL, which
        the keeper no longer renews: never sooner than ``keep_for`` asked, never later than
        the TTL would have ended it."""
        if keep_for <= 0:
            self._release_now(lease)
            return

        def later() -> None:
            try:
                self._release_now(lease)
            except Exception as exc:  # a timer thread has nobody to raise to (or a closed client)
                log.warning(
                    "delayed release of %r failed; its lease ends at its TTL: %s", lease.name, exc
                )
            finally:
                with self._mutex:
                    self._timers.discard(timer)

        timer = threading.Timer(keep_for, later)
        timer.daemon = True
        with self._mutex:
            self._timers.add(timer)
        timer.start()

    def holder(self, name: str) -> Holder | None:
        kv, offset = self._holder_kv(name)
        if kv is None:
            return None
        left = self._time_to_live(kv.lease)
        if left < 0:
            return None  # the lease ended between the two reads
        # etcd reports whole seconds, rounded down: under one second left reads as 0.
        return Holder(name, kv.value, kv.create + offset, float(left) if left > 0 else None)

    # -- the standby queue ----------------------------------------------------------------------

    def _enqueue(self, name: str) -> _Waiter:
        lease, _ = self._grant(WAITER_TTL)
        key = self._waiters(name) + secrets.token_hex(8)
        reply = self._gateway.call(
            "/v3/kv/put", {"key": _b64(key), "value": "", "lease": str(lease)}
        )
        waiter = _Waiter(key, _revision(reply), lease, self._clock.monotonic())
        with self._mutex:
            self._queue[name] = waiter
        return waiter

    def _keep_queued(self, name: str, waiter: _Waiter) -> None:
        now = self._clock.monotonic()
        if now - waiter.kept_at < WAITER_KEEP:
            return
        if self._keepalive(waiter.lease) > 0:
            waiter.kept_at = now
            return
        with self._mutex:
            if self._queue.get(name) is waiter:
                del self._queue[name]

    def _queue_view(
        self, name: str, waiter: _Waiter | None
    ) -> tuple[_KV | None, _KV | None, bool, int]:
        """At one revision: the lock key, the waiter just ahead of ours, whether our place
        in the queue still exists, and that revision."""
        ops = [_get_prefix(self._locks(name), limit=1, by="CREATE")]
        if waiter is not None:
            ops += [
                _get_prefix(
                    self._waiters(name),
                    limit=1,
                    by="CREATE",
                    newest_first=True,
                    created_before=waiter.revision,
                ),
                _get(waiter.key),
            ]
        results, revision = self._read(*ops)
        if waiter is None:
            return _first(results[0]), None, False, revision
        return _first(results[0]), _first(results[1]), _first(results[2]) is not None, revision

    def wait(self, name: str, timeout: float) -> None:
        """Queue up (once per standby, kept across calls) and watch the key just before ours:
        the waiter ahead, or the lock key when we are first. Returns when the lock key is
        deleted or the lock is free with nobody queued ahead, or after ``timeout``.

        A free lock with a waiter ahead is that waiter's to take: returning then would wake
        the whole queue on every release."""
        end = self._clock.monotonic() + timeout
        while True:
            waiter = self._queue.get(name)
            holder, ahead, queued, revision = self._queue_view(name, waiter)
            if holder is None and ahead is None:
                return
            if waiter is None or not queued:
                self._enqueue(name)
                continue
            left = end - self._clock.monotonic()
            if left <= 0:
                return
            self._keep_queued(name, waiter)
            target = ahead or holder
            assert target is not None
            deleted = self._gateway.watch_deletion(target.key, revision + 1, min(left, WAITER_KEEP))
            if deleted and ahead is None:
                return

    def evict(self, name: str, token_above: int = 0) -> int:
        """Delete the lock key and revoke its lease (the holder's keep-alive then fails), and
        raise the lock's token offset so that every later token is above ``token_above``.

        A create revision cannot be set, and after etcd is restored from an older snapshot its
        revisions start below tokens already handed out: the offset, added to every token of
        this lock from now on, is what moves the counter past them."""
        for _ in range(CAS_ROUNDS):
            results, revision = self._read(
                _get_prefix(self._locks(name)), _get(self._offset_key(name))
            )
            found = _first(results[1])
            offset = int(found.value) if found else 0
            # Later keys are created above this revision, so their tokens exceed this sum.
            raised = max(offset, token_above - revision)
            success = [_delete(self._locks(name), _prefix_end(self._locks(name)))]
            if raised != offset:
                success.append(_put(self._offset_key(name), str(raised)))
            reply = self._txn(
                [_unchanged(self._offset_key(name), found.mod if found else 0)], success, []
            )
            if reply.get("succeeded"):
                for kv in _kvs(_results(reply)[0]):
                    self._revoke(kv.lease)
                return _revision(reply) + raised
        raise BackendError(f"lock {name!r}: its token offset kept changing during evict")

    # -- ledger ---------------------------------------------------------------------------------

    def _found_ops(self, run: Run, lease: Lease) -> list[Json]:
        return [
            _get(self._locks(lease.name) + lease.owner),
            _get_prefix(self._run_dir(run.run_id), limit=1, by="KEY", newest_first=True),
            _get(self._highest_key(run.job)),
        ]

    def _found(self, results: list[Json], lease: Lease) -> _Found:
        held = _first(results[0])
        if held is None or held.value != lease.owner:
            raise self._lost(lease)
        latest, highest = _first(results[1]), _first(results[2])
        return _Found(
            latest=_decode(latest.value) if latest else None,
            mod=latest.mod if latest else 0,
            highest=int(highest.value) if highest else 0,
        )

    def _run_unchanged(self, run: Run, seen: int, found: _Found | None) -> list[Json]:
        """The run still has exactly the attempts the claim saw."""
        if seen == 0:
            return [_nothing_under(self._run_dir(run.run_id))]
        assert found is not None, "a claim past attempt 0 reads the run first"
        return [
            _unchanged(self._attempt_key(run.run_id, seen), found.mod),
            _nothing_under(
                self._attempt_key(run.run_id, seen + 1), _prefix_end(self._run_dir(run.run_id))
            ),
        ]

    def claim(self, run: Run, lease: Lease, *, seen: int = 0, start: bool = True) -> Claim:
        """One transaction that compares the lock key and the run's attempts: for a new
        firing (``seen`` 0) that is the only round trip; otherwise the run is read first."""
        found = None
        if seen:
            found = self._found(self._read(*self._found_ops(run, lease))[0], lease)
        for _ in range(CAS_ROUNDS):
            if found is not None and (
                found.number != seen or (found.latest and found.latest.state == SUCCEEDED)
            ):
                # Moved on, or done (a stale owner's finish can land between the caller's
                # read and this claim): write nothing. A finish that lands after this read
                # changes the attempt's mod revision, which the transaction below compares.
                return Claim(found.latest, None, found.highest)
            latest = found.latest if found else None
            now = self._clock.now()
            success = [_get(self._highest_key(run.job))]
            if latest is not None and latest.state == RUNNING:
                abandoned = replace(latest, state=ABANDONED, finished_at=now)
                success.append(_put(self._attempt_key(run.run_id, seen), _encode(abandoned)))
            new = None
            if start:
                new = Attempt(
                    run_id=run.run_id,
                    job=run.job,
                    attempt=seen + 1,
                    state=RUNNING,
                    token=lease.token,
                    replica=owner_replica(lease.owner),
                    scheduled_at=run.scheduled_at,
                    started_at=now,
                )
                success += [
                    _put(self._attempt_key(run.run_id, seen + 1), _encode(new)),
                    _raise_to(self._highest_key(run.job), lease.token),
                ]
            compare = [
                _is(self._locks(lease.name) + lease.owner, lease.owner),
                *self._run_unchanged(run, seen, found),
            ]
            reply = self._txn(compare, success, self._found_ops(run, lease))
            results = _results(reply)
            if reply.get("succeeded"):
                highest = _first(results[0])
                return Claim(
                    latest,
                    _decode(_encode(new)) if new else None,
                    int(highest.value) if highest else 0,
                )
            found = self._found(results, lease)
        raise BackendError(f"run {run.run_id}: its attempts kept changing during the claim")

    def acquire_and_claim(self, run: Run, ttl: float, owner: str) -> tuple[Lease, Claim] | None:
        lease = self.try_acquire(run.job, ttl, owner)
        if lease is None:
            return None
        try:
            return lease, self.claim(run, lease)
        except SingletonError:
            # Else standbys would wait out the TTL of a lock that nobody is using.
            with contextlib.suppress(SingletonError):
                self.release(lease)
            raise

    def finish(self, run: Run, lease: Lease, attempt: int, outcome: Outcome) -> bool:
        """Read the attempt, then write it back only if nothing changed it meanwhile (the
        only other writer of a running attempt is a takeover marking it abandoned).

        The transaction compares the attempt key's mod revision, not the lock key: the row's
        token and ``running`` state as read fence the write, and etcd checks that they still
        hold, atomically. The lease need not be held any more (``overlap: allow`` releases
        the lock right after the claim and must still record its outcome)."""
        key = self._attempt_key(run.run_id, attempt)
        for _ in range(CAS_ROUNDS):
            results, _ = self._read(_get(key))
            kv = _first(results[0])
            if kv is None:
                return False
            row = _decode(kv.value)
            if row.state != RUNNING or row.token != lease.token:
                return False
            done = replace(
                row,
                state=outcome.state,
                error=outcome.error,
                reason=outcome.reason,
                finished_at=self._clock.now(),
            )
            reply = self._txn([_unchanged(key, kv.mod)], [_put(key, _encode(done))], [])
            if reply.get("succeeded"):
                return True
        raise BackendError(f"run {run.run_id}: attempt {attempt} kept changing during finish")

    def skip(self, run: Run, reason: str, replica: str) -> bool:
        row = Attempt(
            run_id=run.run_id,
            job=run.job,
            attempt=1,
            state=SKIPPED,
            token=None,
            replica=replica,
            scheduled_at=run.scheduled_at,
            finished_at=self._clock.now(),
            reason=reason,
        )
        reply = self._txn(
            [_nothing_under(self._run_dir(run.run_id))],
            [_put(self._attempt_key(run.run_id, 1), _encode(row))],
            [],
        )
        return bool(reply.get("succeeded"))

    def attempts(self, run_id: str) -> list[Attempt]:
        results, _ = self._read(_get_prefix(self._run_dir(run_id), by="KEY", newest_first=True))
        return [_decode(kv.value) for kv in _kvs(results[0])]

    def history(self, job: str | None, limit: int) -> list[Attempt]:
        """Newest first by create revision: an attempt's key is created when it starts and only
        overwritten after, so this is the order in which attempts were written."""
        results, _ = self._read(
            _get_prefix(self._runs(job), limit=limit, by="CREATE", newest_first=True)
        )
        return [_decode(kv.value) for kv in _kvs(results[0])]

    def prune(self, before: datetime, keep: int) -> int:
        """Rows only ever leave ``running`` (never return to it), so a row seen finished here
        can be deleted without a comparison."""
        results, _ = self._read(_get_prefix(self._runs(), by="CREATE", newest_first=True))
        doomed: list[str] = []
        per_job: dict[str, int] = {}
        for kv in _kvs(results[0]):
            row = _decode(kv.value)
            per_job[row.job] = per_job.get(row.job, 0) + 1
            if row.state != RUNNING and (row.scheduled_at < before or per_job[row.job] > keep):
                doomed.append(kv.key)
        for start in range(0, len(doomed), PRUNE_BATCH):
            self._txn([], [_delete(key) for key in doomed[start : start + PRUNE_BATCH]], [])
        return len(doomed)

    # -- shared state ---------------------------------------------------------------------------

    def put(self, key: str, value: str, ttl: float | None = None) -> None:
        """With a TTL, the key is put with a new etcd lease of that TTL (whole seconds, at
        least etcd's minimum), and the lease of the value it replaced is revoked: a key
        rewritten every minute leaves no trail of live leases behind it. One transaction reads
        the old key's lease (not its value, which may be a MiB) and writes the new one."""
        if ttl is not None and ttl <= 0:
            self.delete(key)
            return
        lease = granted = 0
        if ttl is not None:
            lease, granted = self._grant(ttl)
        path = self._state(key)
        reply = self._txn(
            [], [_get(path, keys_only=True), _put(path, _stored(value, ttl, granted), lease)], []
        )
        self._revoke_leases(_results(reply)[0], keep=lease)

    def scan(self, prefix: str) -> dict[str, str]:
        """One range read of the keys under ``{prefix}/state/{prefix}``. Expired keys are
        gone with their leases, up to 500 ms after the TTL etcd granted (its expiry sweep).
        Where etcd granted a second or more beyond the TTL asked for (a TTL under its 2 s
        minimum), the lease is asked how long it has left — the leader's clock, in whole
        seconds rounded down — and the key is hidden once that is less than the excess."""
        results, _ = self._read(_get_prefix(self._state(prefix)))
        found: dict[str, str] = {}
        for kv in _kvs(results[0]):
            header, _, value = kv.value.partition("\n")
            if kv.lease and (excess := _overshoot(header)) >= 1:
                if self._time_to_live(kv.lease) + 1 <= excess:
                    continue
            found[kv.key.removeprefix(self._state())] = value
        return found

    def delete(self, key: str) -> None:
        path = self._state(key)
        # The lease from a keys-only read: prev_kv would bring back the value too.
        reply = self._txn([], [_get(path, keys_only=True), _delete(path, prev_kv=False)], [])
        self._revoke_leases(_results(reply)[0])

    def _revoke_leases(self, found: Json, keep: int = 0) -> None:
        """Revoke the leases of the shared-state keys in a range result: each one had a lease
        of its own, which nothing uses once the key is replaced or deleted."""
        for kv in _kvs(found):
            if kv.lease and kv.lease != keep:
                self._revoke(kv.lease)

    def server_time(self) -> datetime | None:
        """None: the v3 API carries no time at all (a reply's header holds cluster and member
        ids, the revision and the Raft term), and etcd measures leases on the leader's
        monotonic clock, so its wall clock is nobody's reference."""
        return None

    def close(self) -> None:
        """Cancel delayed releases (those leases end at their TTL), leave every standby
        queue, and drop the connections."""
        with self._mutex:
            timers, self._timers = self._timers, set()
            waiters, self._queue = list(self._queue.values()), {}
        for timer in timers:
            timer.cancel()
        for waiter in waiters:
            with contextlib.suppress(SingletonError):
                self._revoke(waiter.lease)
        self._gateway.close()
