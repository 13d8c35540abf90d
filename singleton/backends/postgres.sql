-- Every statement the PostgreSQL backend runs, in one file, so whoever looks after the
-- database can read what singleton does to it. singleton/backends/postgres.py loads each
-- section by the name after "-- name:".
--
-- Placeholders: {schema} is the backend's schema (the `schema` option, default singleton),
-- {version} the schema version, {lock_key} the advisory lock that serialises schema
-- creation. Parameters are psycopg's %(name)s.
--
-- Why the statements look the way they do:
--
-- * Each operation is ONE statement, run in autocommit: its transaction begins and ends on
--   the server, so the server never waits on a client in the middle of one. A replica that
--   is partitioned or paused mid-operation cannot leave a row lock behind.
-- * Lease expiry is on the database's clock, with clock_timestamp(): now() is the start of
--   the transaction, which would be stale for a statement that waited on a row lock.
-- * Statements that touch both tables lock the lock row first, then attempt rows, so they
--   cannot deadlock with each other. A ledger write made under a lease locks that lease's
--   row in the same statement: no acquisition can slip between the check and the write.
-- * A lock row is never deleted: its token column is the fencing counter, and it must
--   survive release and expiry.
-- * A release wakes ONE standby, the oldest live one in the waiters table, by a NOTIFY on
--   that standby's own channel (wake_next below); never a broadcast to every standby.

-- name: schema_version
SELECT max(version) FROM {schema}.schema_version

-- name: create_schema
-- Run inside one transaction. Replicas starting together would race on CREATE ... IF NOT
-- EXISTS (two creators of one table can both pass the check and one then fails on the
-- catalog's unique index), so they take turns on a transaction-level advisory lock.
SELECT pg_advisory_xact_lock(hashtextextended({lock_key}, 0));

CREATE SCHEMA IF NOT EXISTS {schema};

CREATE TABLE IF NOT EXISTS {schema}.schema_version (
    version    integer PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- One row per lock name, kept forever (the counter lives in it).
CREATE TABLE IF NOT EXISTS {schema}.locks (
    name       text PRIMARY KEY,
    owner      text,                      -- NULL when free; unique per acquisition
    token      bigint NOT NULL DEFAULT 0, -- the fencing token last issued; never goes down
    expires_at timestamptz                -- on the database's clock
);

-- The ledger: one row per attempt of a run (a firing).
CREATE TABLE IF NOT EXISTS {schema}.attempts (
    run_id       text        NOT NULL,
    attempt      integer     NOT NULL,
    seq          bigint      GENERATED ALWAYS AS IDENTITY UNIQUE, -- insertion order
    job          text        NOT NULL,
    state        text        NOT NULL,
    reason       text,
    token        bigint,
    replica      text        NOT NULL,
    scheduled_at timestamptz NOT NULL,
    started_at   timestamptz,
    finished_at  timestamptz,
    error        text,
    PRIMARY KEY (run_id, attempt)
);
CREATE INDEX IF NOT EXISTS attempts_by_job ON {schema}.attempts (job, seq);
CREATE INDEX IF NOT EXISTS attempts_by_job_token ON {schema}.attempts (job, token);
CREATE INDEX IF NOT EXISTS attempts_by_schedule ON {schema}.attempts (scheduled_at);

-- Shared state (version 2): small records every replica reads, such as fleet fingerprints
-- and operator switches. The key is in the C collation, so that its primary key index is in
-- byte order and a prefix is one range of it (state_scan).
CREATE TABLE IF NOT EXISTS {schema}.state (
    key        text COLLATE "C" PRIMARY KEY,
    value      text NOT NULL,
    expires_at timestamptz                -- on the database's clock; NULL: until deleted
);

-- Standbys in line for a lock (version 3): one row per wait() in progress, in the order they
-- came (seq). A release wakes only the oldest live one, by a NOTIFY on the channel its
-- process LISTENs on, with its waiter id as the payload. A row's expires_at is the end of
-- its wait on the database's clock: a standby whose process died is skipped once that
-- passes, without anybody deleting its row (prune does, later).
CREATE TABLE IF NOT EXISTS {schema}.waiters (
    seq        bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY, -- place in line
    name       text        NOT NULL,                                 -- the lock waited for
    channel    text        NOT NULL, -- the NOTIFY channel of the waiting process's listener
    waiter     text        NOT NULL, -- the wait, within that process: the NOTIFY payload
    expires_at timestamptz NOT NULL  -- on the database's clock
);
CREATE INDEX IF NOT EXISTS waiters_by_name ON {schema}.waiters (name, seq);

-- Wake the oldest live standby of a lock: delete its row and NOTIFY its channel. Called by
-- the statements that set a lock free, once the lock row is updated. A function, VOLATILE,
-- because each query in it takes a fresh snapshot: it sees a standby that enrolled while the
-- caller's statement waited for the lock row (wait_enqueue holds it FOR SHARE), which the
-- caller's own snapshot, taken before that wait, would miss — a lost wake-up. SKIP LOCKED:
-- a standby deleting its own row is leaving; the next one is woken instead. A NOTIFY to a
-- standby that died is lost; the next standby's wait is bounded, and covers it.
CREATE OR REPLACE FUNCTION {schema}.wake_next(lock_name text) RETURNS bigint
LANGUAGE sql VOLATILE AS $$
    WITH head AS (
        SELECT seq FROM {schema}.waiters
         WHERE name = lock_name AND expires_at > clock_timestamp()
         ORDER BY seq
         LIMIT 1
           FOR UPDATE SKIP LOCKED
    ), woken AS (
        DELETE FROM {schema}.waiters AS w USING head
         WHERE w.seq = head.seq
        RETURNING w.channel, w.waiter
    )
    SELECT count(pg_notify(channel, waiter)) FROM woken
$$;

INSERT INTO {schema}.schema_version (version) VALUES ({version}) ON CONFLICT DO NOTHING;

-- name: acquire
-- Take the lock if it is free or its lease has expired. One statement, so two replicas can
-- never both see it free; the token is the previous one plus one.
INSERT INTO {schema}.locks AS l (name, owner, token, expires_at)
VALUES (%(name)s, %(owner)s, 1, clock_timestamp() + make_interval(secs => %(ttl)s))
ON CONFLICT (name) DO UPDATE
   SET owner = excluded.owner,
       token = l.token + 1,
       expires_at = clock_timestamp() + make_interval(secs => %(ttl)s)
 WHERE l.owner IS NULL OR l.expires_at <= clock_timestamp()
RETURNING token

-- name: acquire_and_claim
-- The fast path of a new firing: acquire, and if granted write attempt 1 unless the run has
-- an attempt already. Returns the token (NULL when busy), the run's latest attempt as it was
-- found, the attempt written, and the highest token the ledger holds for the job.
WITH acquired AS (
    INSERT INTO {schema}.locks AS l (name, owner, token, expires_at)
    VALUES (%(name)s, %(owner)s, 1, clock_timestamp() + make_interval(secs => %(ttl)s))
    ON CONFLICT (name) DO UPDATE
       SET owner = excluded.owner,
           token = l.token + 1,
           expires_at = clock_timestamp() + make_interval(secs => %(ttl)s)
     WHERE l.owner IS NULL OR l.expires_at <= clock_timestamp()
    RETURNING token
), latest AS (
    SELECT a FROM {schema}.attempts AS a
     WHERE a.run_id = %(run_id)s
     ORDER BY a.attempt DESC LIMIT 1
), started AS (
    INSERT INTO {schema}.attempts AS a
           (run_id, attempt, job, state, token, replica, scheduled_at, started_at)
    SELECT %(run_id)s, 1, %(job)s, 'running', acquired.token, %(replica)s, %(scheduled_at)s,
           %(now)s
      FROM acquired
     WHERE NOT EXISTS (SELECT FROM latest)
    ON CONFLICT (run_id, attempt) DO NOTHING
    RETURNING a
)
SELECT (SELECT token FROM acquired),
       (SELECT to_jsonb(a) FROM latest),
       (SELECT to_jsonb(a) FROM started),
       (SELECT coalesce(max(token), 0) FROM {schema}.attempts WHERE job = %(job)s)

-- name: renew
UPDATE {schema}.locks
   SET expires_at = clock_timestamp() + make_interval(secs => %(ttl)s)
 WHERE name = %(name)s AND owner = %(owner)s AND token = %(token)s
   AND expires_at > clock_timestamp()

-- name: release
-- Let go (or, with keep_for, only shorten the lease), comparing owner and token: never
-- another owner's lease. A lock set free wakes its oldest standby.
WITH released AS (
    UPDATE {schema}.locks
       SET owner = CASE WHEN %(keep_for)s > 0 THEN owner END,
           expires_at = CASE WHEN %(keep_for)s > 0
                        THEN least(expires_at, clock_timestamp()
                                               + make_interval(secs => %(keep_for)s))
                        END
     WHERE name = %(name)s AND owner = %(owner)s AND token = %(token)s
    RETURNING owner IS NULL AS freed
)
SELECT {schema}.wake_next(%(name)s) FROM released WHERE freed

-- name: holder
SELECT owner, token, extract(epoch FROM expires_at - clock_timestamp())::float8
  FROM {schema}.locks
 WHERE name = %(name)s AND owner IS NOT NULL AND expires_at > clock_timestamp()

-- name: wait_enqueue
-- A standby gets in line, if the lock is held: returns its place (NULL: the lock is free),
-- the lease's seconds left, and whether a live standby was in line before it. FOR SHARE on the lock row: a
-- release that has updated it already makes this wait for its commit and then see the lock
-- free (nothing to wait for); a release that comes later waits for this commit, and its
-- wake_next sees this row. Either way no release slips between the check and the line.
WITH lock_row AS (
    SELECT owner, expires_at FROM {schema}.locks WHERE name = %(name)s FOR SHARE
), enqueued AS (
    INSERT INTO {schema}.waiters (name, channel, waiter, expires_at)
    SELECT %(name)s, %(channel)s, %(waiter)s,
           clock_timestamp() + make_interval(secs => %(timeout)s)
      FROM lock_row
     WHERE owner IS NOT NULL AND expires_at > clock_timestamp()
    RETURNING seq
)
SELECT (SELECT seq FROM enqueued),
       (SELECT extract(epoch FROM expires_at - clock_timestamp())::float8 FROM lock_row),
       EXISTS (SELECT FROM {schema}.waiters
                WHERE name = %(name)s AND expires_at > clock_timestamp())

-- name: wait_leave
-- A standby's wait ended without its NOTIFY (timeout, lease expiry, lost listener): out of
-- line, so that no release wakes a standby that is not waiting any more.
DELETE FROM {schema}.waiters WHERE seq = %(seq)s

-- name: evict
-- Free the lock whoever holds it and raise its counter to at least token_above, never lower.
WITH evicted AS (
    INSERT INTO {schema}.locks AS l (name, token) VALUES (%(name)s, %(token_above)s)
    ON CONFLICT (name) DO UPDATE
       SET owner = NULL, expires_at = NULL, token = greatest(l.token, excluded.token)
    RETURNING token
)
SELECT token, {schema}.wake_next(%(name)s) FROM evicted

-- name: claim
-- A compare-and-set on the run's attempt number, only while the lease is current: if the
-- latest attempt is number seen (0: none) and has not succeeded, abandon it if still
-- running, and if start, write attempt seen + 1. The lock row is locked first (FOR UPDATE),
-- so the lease cannot change hands before this statement commits. Then the latest attempt
-- row is locked (FOR UPDATE; its EXISTS on lease is a one-time filter, run before the scan,
-- which keeps the lock-row-first order): a stale owner's finish (fenced by that row alone)
-- that committed after this statement's snapshot is seen here, as the row version the lock
-- returns, and one that comes later waits for this statement and then finds the row
-- abandoned. A succeeded attempt is never followed by another.
WITH lease AS (
    SELECT FROM {schema}.locks
     WHERE name = %(name)s AND owner = %(owner)s AND token = %(token)s
       AND expires_at > clock_timestamp()
       FOR UPDATE
), latest AS (
    SELECT a FROM {schema}.attempts AS a
     WHERE a.run_id = %(run_id)s AND EXISTS (SELECT FROM lease)
     ORDER BY a.attempt DESC LIMIT 1
       FOR UPDATE
), agreed AS (
    SELECT FROM lease
     WHERE coalesce((SELECT (a).attempt FROM latest), 0) = %(seen)s
       AND coalesce((SELECT (a).state FROM latest), '') <> 'succeeded'
), abandoned AS (
    UPDATE {schema}.attempts
       SET state = 'abandoned', finished_at = %(now)s
     WHERE run_id = %(run_id)s AND attempt = %(seen)s AND state = 'running'
       AND EXISTS (SELECT FROM agreed)
), started AS (
    INSERT INTO {schema}.attempts AS a
           (run_id, attempt, job, state, token, replica, scheduled_at, started_at)
    SELECT %(run_id)s, %(seen)s + 1, %(job)s, 'running', %(token)s, %(replica)s,
           %(scheduled_at)s, %(now)s
      FROM agreed
     WHERE %(start)s
    ON CONFLICT (run_id, attempt) DO NOTHING
    RETURNING a
)
SELECT EXISTS (SELECT FROM lease),
       (SELECT to_jsonb(a) FROM latest),
       (SELECT to_jsonb(a) FROM started),
       (SELECT coalesce(max(token), 0) FROM {schema}.attempts WHERE job = %(job)s)

-- name: finish
-- Fenced by the attempt row alone (its token, and its state still running: a takeover marks
-- it abandoned), not by the lock: an overlap: allow job lets go of its lock right after the
-- claim and must still record how its attempt ended.
UPDATE {schema}.attempts
   SET state = %(state)s, error = %(error)s, reason = %(reason)s, finished_at = %(now)s
 WHERE run_id = %(run_id)s AND attempt = %(attempt)s AND token = %(token)s
   AND state = 'running'

-- name: finish_and_release
-- finish, then release: one statement. The lock row is locked first, as in claim; the
-- release happens even when the finish is refused (a stale owner still lets go).
WITH lock_row AS (
    SELECT name FROM {schema}.locks WHERE name = %(name)s FOR UPDATE
), finished AS (
    UPDATE {schema}.attempts
       SET state = %(state)s, error = %(error)s, reason = %(reason)s, finished_at = %(now)s
     WHERE run_id = %(run_id)s AND attempt = %(attempt)s AND token = %(token)s
       AND state = 'running'
       AND EXISTS (SELECT FROM lock_row)
    RETURNING 1
), released AS (
    UPDATE {schema}.locks AS l
       SET owner = CASE WHEN %(keep_for)s > 0 THEN l.owner END,
           expires_at = CASE WHEN %(keep_for)s > 0
                        THEN least(l.expires_at, clock_timestamp()
                                                 + make_interval(secs => %(keep_for)s))
                        END
      FROM lock_row
     WHERE l.name = lock_row.name AND l.owner = %(owner)s AND l.token = %(token)s
    RETURNING l.owner IS NULL AS freed
), notified AS (
    SELECT {schema}.wake_next(%(name)s) FROM released WHERE freed
)
SELECT EXISTS (SELECT FROM finished), (SELECT count(*) FROM notified)

-- name: skip
-- A firing that never ran: attempt 1, only if the run has no attempt. ON CONFLICT covers a
-- claim that writes attempt 1 at the same moment.
INSERT INTO {schema}.attempts
       (run_id, attempt, job, state, reason, replica, scheduled_at, finished_at)
SELECT %(run_id)s, 1, %(job)s, 'skipped', %(reason)s, %(replica)s, %(scheduled_at)s, %(now)s
 WHERE NOT EXISTS (SELECT FROM {schema}.attempts WHERE run_id = %(run_id)s)
ON CONFLICT (run_id, attempt) DO NOTHING

-- name: attempts
SELECT to_jsonb(a) FROM {schema}.attempts AS a
 WHERE a.run_id = %(run_id)s
 ORDER BY a.attempt DESC

-- name: history
SELECT to_jsonb(a) FROM {schema}.attempts AS a
 WHERE %(job)s::text IS NULL OR a.job = %(job)s
 ORDER BY a.seq DESC
 LIMIT %(limit)s

-- name: prune
-- Retention: attempts of firings scheduled before the cut-off, and beyond the newest keep per
-- job. A running attempt is never deleted (its owner will finish it). Expired shared state
-- goes too, and so do the lines of standbys whose process died before its wait ended
-- (wake_next skips them already); the row count is the attempts'.
WITH expired AS (
    DELETE FROM {schema}.state WHERE expires_at <= clock_timestamp()
), gone AS (
    DELETE FROM {schema}.waiters WHERE expires_at <= clock_timestamp()
)
DELETE FROM {schema}.attempts
 WHERE state <> 'running'
   AND (scheduled_at < %(before)s
        OR seq IN (SELECT seq
                     FROM (SELECT seq, row_number() OVER (PARTITION BY job ORDER BY seq DESC) AS n
                             FROM {schema}.attempts) AS ranked
                    WHERE n > %(keep)s))

-- name: state_put
-- Last write wins. A TTL counts on the database's clock; without one (NULL) the value stays
-- until deleted.
INSERT INTO {schema}.state (key, value, expires_at)
VALUES (%(key)s, %(value)s, clock_timestamp() + make_interval(secs => %(ttl)s::float8))
ON CONFLICT (key) DO UPDATE
   SET value = excluded.value, expires_at = excluded.expires_at

-- name: state_scan
-- Every live key starting with the prefix, as one range of the primary key: keys are ASCII
-- and compared byte by byte (C collation), so the keys starting with P are exactly those
-- from P up to P followed by chr(127), which is above every character a key may hold.
-- Expired rows are skipped here and deleted by prune.
SELECT key, value FROM {schema}.state
 WHERE key >= %(prefix)s AND key < %(prefix)s || chr(127)
   AND (expires_at IS NULL OR expires_at > clock_timestamp())

-- name: state_delete
DELETE FROM {schema}.state WHERE key = %(key)s

-- name: server_time
SELECT clock_timestamp()
