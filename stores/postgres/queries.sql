-- The PostgreSQL store's statements. {placeholders} are quoted (schema-qualified) names;
-- %(names)s are parameters. %(now)s is NULL in production (the database clock decides) and a
-- fixed instant in tests; every statement reads the time as coalesce(%(now)s::timestamptz, now()).

-- name: insert_message
-- Write one message in the caller's transaction and wake listening relays at its commit
-- (PostgreSQL delivers one notification per transaction, channel and payload, never on rollback).
-- Persisters write with it, and so does a relay's close: the follow-ups of its marks.
-- One plain INSERT, the notification sent from its RETURNING list: a CTE around it measured
-- ~45 us more per transaction.
INSERT INTO {outbox} (id, position, topic, ordering_key, data, attributes, available_at, strict)
SELECT n, CASE WHEN %(strict)s THEN NULL ELSE n END, %(topic)s, %(ordering_key)s, %(data)s,
       %(attributes)s, greatest(clock_timestamp(), %(deliver_after)s), %(strict)s
FROM nextval({message_ids_literal}) AS n
RETURNING id, pg_notify(%(channel)s, %(topic)s)

-- name: claim_sequences
-- Lease the sequences that have a due message, in walk order, until they can fill the batch of
-- %(limit)s: each counts for its due messages up to %(most_per_sequence)s (a quarter of the
-- batch), so a batch spans at least four sequences when that many are due, and leaves the rest
-- to other relays. The walk visits the topics from just after the one this relay leased last
-- (%(topics)s comes rotated), and each topic's ordering keys downwards from just below where
-- this relay stopped last, round (from the top) to it. A sequence another relay's transaction is
-- leasing, taking over, or closing right now is skipped (SKIP LOCKED, or its advisory lock tried
-- without waiting), never waited for: a relay stalled before its COMMIT stalls no other relay.
-- Leases run from when they are granted (clock_timestamp(), not the transaction's start).
-- Each lease is written with this claim's own name (%(claim)s), by which the next statement
-- finds them. Committed with it before anything is published; the messages are read by the
-- next statement, in the same transaction with a fresh snapshot (READ COMMITTED: this one's may
-- predate another relay's ack of the same sequence).
-- A read-ahead (a batch still publishing asks for the next) also names the sequences it may
-- continue (%(continue_topics)s, ..., with its lease tokens): when the free sequences cannot
-- fill the batch, those leases are extended and renamed to this claim, so the read finds them
-- too (the read decides whether it may go on after the batch's last position). The fourth
-- column says which leases were continued; the fifth is how many due messages the claim
-- counted in the free sequences it took; the last two are this statement's snapshot and its
-- transaction's id, with which the next read-ahead tells whether a row may have committed
-- late below this batch.
WITH RECURSIVE wanted (topic, after, place) AS (
    SELECT * FROM unnest(%(topics)s::text[], %(after)s::text[]) WITH ORDINALITY
),
-- each topic's ordering keys are walked downwards: each step lands on the newest entry of the
-- next key down, which is live, never on its oldest, where the entries of published (deleted)
-- rows pile up until VACUUM
below_cursor (topic, ordering_key, place, depth) AS (
    SELECT start.topic, start.ordering_key, wanted.place, 0
    FROM wanted
    CROSS JOIN LATERAL (
        SELECT o.topic, o.ordering_key FROM {outbox} o
        WHERE o.topic = wanted.topic AND o.ordering_key < wanted.after
        ORDER BY o.ordering_key DESC LIMIT 1
    ) AS start
    UNION ALL
    SELECT step.topic, step.ordering_key, s.place, s.depth + 1
    FROM below_cursor s
    CROSS JOIN LATERAL (
        SELECT o.topic, o.ordering_key FROM {outbox} o
        WHERE o.topic = s.topic AND o.ordering_key < s.ordering_key
        ORDER BY o.ordering_key DESC LIMIT 1
    ) AS step
),
from_the_top (topic, ordering_key, after, place, depth) AS (
    SELECT start.topic, start.ordering_key, wanted.after, wanted.place, 0
    FROM wanted
    CROSS JOIN LATERAL (
        SELECT o.topic, o.ordering_key FROM {outbox} o
        WHERE o.topic = wanted.topic AND o.ordering_key >= wanted.after
        ORDER BY o.ordering_key DESC LIMIT 1
    ) AS start
    UNION ALL
    SELECT step.topic, step.ordering_key, s.after, s.place, s.depth + 1
    FROM from_the_top s
    CROSS JOIN LATERAL (
        SELECT o.topic, o.ordering_key FROM {outbox} o
        WHERE o.topic = s.topic AND o.ordering_key < s.ordering_key
          AND o.ordering_key >= s.after
        ORDER BY o.ordering_key DESC LIMIT 1
    ) AS step
),
sequences (topic, ordering_key, lap, depth, place) AS (
    SELECT topic, ordering_key, 0, depth, place FROM below_cursor
    UNION ALL
    SELECT topic, ordering_key, 1, depth, place FROM from_the_top
),
-- free sequences with a due message, in walk order; the walk stops after %(most_sequences)s of
-- them (the store widens it while claims find too few to fill the batch)
eligible AS MATERIALIZED (
    SELECT s.topic, s.ordering_key, s.lap, s.depth, s.place FROM sequences s
    WHERE NOT EXISTS (
        SELECT 1 FROM {leases} l
        WHERE l.topic = s.topic AND l.ordering_key = s.ordering_key
          AND l.expires_at > coalesce(%(now)s::timestamptz, now())
    )
    AND (  -- a due message before the first that waits for a retry, looked up on the
           -- sequence's index from its newest end (an EXISTS here can be planned as a join
           -- that walks the whole index; the oldest end is where deleted rows' entries are)
        SELECT o.position FROM {outbox} o
        WHERE o.topic = s.topic AND o.ordering_key = s.ordering_key
          AND o.position IS NOT NULL
          AND o.available_at <= coalesce(%(now)s::timestamptz, now())
          AND o.position < coalesce((
              SELECT min(w.position) FROM {outbox} w
              WHERE w.topic = s.topic AND w.ordering_key = s.ordering_key AND w.attempts > 0
                AND (w.available_at IS NULL OR w.available_at > coalesce(%(now)s::timestamptz, now()))
          ), 9223372036854775807)
        ORDER BY o.position DESC LIMIT 1
    ) IS NOT NULL
    LIMIT %(most_sequences)s
),
-- the eligible sequences in walk order, as arrays the next step indexes into
walk_order (topics, ordering_keys, n) AS MATERIALIZED (  -- once, not per step below
    SELECT array_agg(topic ORDER BY lap, depth, place),
           array_agg(ordering_key ORDER BY lap, depth, place), count(*)
    FROM eligible
),
-- take them one by one, counting each one's due messages (at most a quarter of the batch;
-- a lone one needs no count), until they can fill the batch: only the sequences taken are
-- counted
taking (i, topic, ordering_key, total) AS (
    SELECT 0, NULL::text, NULL::text, 0::bigint
    UNION ALL
    SELECT t.i + 1, w.topics[t.i + 1], w.ordering_keys[t.i + 1], t.total + CASE
      WHEN w.n = 1 THEN 1
      ELSE (
        SELECT count(*) FROM (
            SELECT FROM {outbox} o
            WHERE o.topic = w.topics[t.i + 1] AND o.ordering_key = w.ordering_keys[t.i + 1]
              AND o.position IS NOT NULL
              AND o.available_at <= coalesce(%(now)s::timestamptz, now())
              AND o.position < coalesce((
                  SELECT min(x.position) FROM {outbox} x
                  WHERE x.topic = w.topics[t.i + 1] AND x.ordering_key = w.ordering_keys[t.i + 1]
                    AND x.attempts > 0
                    AND (x.available_at IS NULL OR x.available_at > coalesce(%(now)s::timestamptz, now()))
              ), 9223372036854775807)
            ORDER BY o.position DESC  -- the sequence's index from its newest end
            LIMIT %(most_per_sequence)s
        ) AS due
      )
    END
    FROM taking t CROSS JOIN walk_order w
    WHERE t.i < w.n AND t.total < %(limit)s
),
chosen AS (
    SELECT topic, ordering_key FROM taking WHERE i > 0
),
-- leases that expired: taken over, skipping any row another relay is claiming or releasing
expired AS (
    SELECT l.topic, l.ordering_key
    FROM {leases} l JOIN chosen e USING (topic, ordering_key)
    WHERE l.expires_at <= coalesce(%(now)s::timestamptz, now())
    ORDER BY l.topic, l.ordering_key
    FOR UPDATE OF l SKIP LOCKED
),
taken_over AS (
    UPDATE {leases} l
    SET token = nextval({lease_tokens_literal}), owner = %(claim)s,
        expires_at = coalesce(%(now)s::timestamptz, clock_timestamp())
                     + %(lease_seconds)s * interval '1 second'
    FROM expired x
    WHERE l.topic = x.topic AND l.ordering_key = x.ordering_key
    RETURNING l.topic, l.ordering_key, l.token
),
-- sequences nobody holds: a new lease row. Another claim may be inserting the same one, not yet
-- committed (its relay may be stalled anywhere before its COMMIT): ON CONFLICT would wait for
-- that transaction to end, so each claim first takes the sequence's transaction-level advisory
-- lock without waiting, and skips the sequence when another claim holds it.
fresh AS (
    INSERT INTO {leases} (topic, ordering_key, token, owner, expires_at)
    SELECT e.topic, e.ordering_key, nextval({lease_tokens_literal}), %(claim)s,
           coalesce(%(now)s::timestamptz, clock_timestamp())
           + %(lease_seconds)s * interval '1 second'
    FROM chosen e
    WHERE CASE  -- in this order: the lock only for a sequence that has no lease row
        WHEN EXISTS (
            SELECT 1 FROM {leases} l WHERE l.topic = e.topic AND l.ordering_key = e.ordering_key
        ) THEN false
        ELSE pg_try_advisory_xact_lock(hashtextextended(
            {leases_literal} || chr(31) || e.topic || chr(31) || e.ordering_key, 0))
    END
    ORDER BY e.topic, e.ordering_key
    ON CONFLICT (topic, ordering_key) DO NOTHING  -- one committed since this claim's snapshot
    RETURNING topic, ordering_key, token
),
-- the read-ahead's own sequences, when the free ones cannot fill the batch; a lease row another
-- claim has locked is being taken over (this one expired): skipped, never waited for
continuing AS (  -- locked only if it is to be continued: a row lock is a write
    SELECT c.topic, c.ordering_key, c.token
    FROM {leases} l
    JOIN unnest(%(continue_topics)s::text[], %(continue_keys)s::text[],
                %(continue_tokens)s::bigint[], %(continue_after)s::bigint[])
         AS c (topic, ordering_key, token, after)
      ON l.topic = c.topic AND l.ordering_key = c.ordering_key AND l.token = c.token
    WHERE (SELECT max(total) FROM taking) < %(limit)s
      AND (  -- it has a due message after the batch's last one
          SELECT o.position FROM {outbox} o
          WHERE o.topic = c.topic AND o.ordering_key = c.ordering_key AND o.position > c.after
            AND o.available_at <= coalesce(%(now)s::timestamptz, now())
            AND o.position < coalesce((
                SELECT min(w.position) FROM {outbox} w
                WHERE w.topic = c.topic AND w.ordering_key = c.ordering_key AND w.attempts > 0
                  AND (w.available_at IS NULL OR w.available_at > coalesce(%(now)s::timestamptz, now()))
            ), 9223372036854775807)
          ORDER BY o.position LIMIT 1
      ) IS NOT NULL
    ORDER BY l.topic, l.ordering_key
    FOR UPDATE OF l SKIP LOCKED
),
continued AS (
    UPDATE {leases} l
    SET owner = %(claim)s,
        expires_at = coalesce(%(now)s::timestamptz, clock_timestamp())
                     + %(lease_seconds)s * interval '1 second'
    FROM continuing c
    WHERE l.topic = c.topic AND l.ordering_key = c.ordering_key AND l.token = c.token
    RETURNING l.topic, l.ordering_key, l.token
)
SELECT leased.*, pg_current_snapshot()::text, pg_current_xact_id()::text
FROM (
    SELECT topic, ordering_key, token, false, (SELECT max(total) FROM taking) FROM taken_over
    UNION ALL
    SELECT topic, ordering_key, token, false, (SELECT max(total) FROM taking) FROM fresh
    UNION ALL
    SELECT topic, ordering_key, token, true, NULL FROM continued
) AS leased

-- name: claimed_messages
-- The due messages of the sequences the claim just leased (found by its name, %(claim)s), in
-- order: each sequence's even share of the batch, up to the first message that waits for a
-- retry. A continued sequence starts after the position its batch ended at (%(continue_after)s),
-- unless a row of it may have committed late below that position: then its due rows up to
-- there are counted first, on the sequence's index from its oldest end (one past the
-- %(continue_in_flight)s rows of the two batches in flight at most). One more, and the sequence
-- is left out: its lease ends with this batch, and a later claim reads it from its head, late
-- row first, before any message written after that row committed (guarantee 3).
-- A row can have committed late only if a transaction that was running when the batch's claim
-- took its snapshot (%(previous_snapshot)s) has committed since; the batch's own transaction
-- (%(previous_xid)s) and this one do not count. The rows are also counted when the store asks
-- (%(continue_look)s: now and then, for a delayed message fallen due below the position).
-- The caller interleaves the sequences and cuts at the batch size (at most one message short
-- of a share per sequence too many is read).
WITH late (possible) AS (
    SELECT EXISTS (
        SELECT FROM (
            SELECT pg_snapshot_xip(%(previous_snapshot)s::pg_snapshot)  -- running then
            UNION ALL  -- and every transaction id taken since
            SELECT n::text::xid8 FROM generate_series(
                pg_snapshot_xmax(%(previous_snapshot)s::pg_snapshot)::text::bigint,
                pg_snapshot_xmax(pg_current_snapshot())::text::bigint - 1
            ) AS n
        ) AS since (xid)
        WHERE since.xid <> %(previous_xid)s::xid8
          AND since.xid IS DISTINCT FROM pg_current_xact_id_if_assigned()
          AND pg_visible_in_snapshot(since.xid, pg_current_snapshot())  -- it has ended
    )
),
claimed AS (
    SELECT l.topic, l.ordering_key, coalesce(a.position, -9223372036854775808) AS after
    FROM {leases} l
    LEFT JOIN unnest(%(continue_topics)s::text[], %(continue_keys)s::text[],
                     %(continue_after)s::bigint[], %(continue_in_flight)s::bigint[],
                     %(continue_look)s::boolean[])
           AS a (topic, ordering_key, position, in_flight, look)
      ON a.topic = l.topic AND a.ordering_key = l.ordering_key
    WHERE l.owner = %(claim)s
      AND (a.position IS NULL  -- a sequence read from its head
           OR NOT (a.look OR (SELECT possible FROM late))
           OR a.in_flight = (
               SELECT count(*) FROM (
                   SELECT FROM {outbox} o
                   WHERE o.topic = a.topic AND o.ordering_key = a.ordering_key
                     AND o.position <= a.position
                     AND o.available_at <= coalesce(%(now)s::timestamptz, now())
                   ORDER BY o.position
                   LIMIT a.in_flight + 1
               ) AS below
           ))
),
share (n) AS (
    SELECT ceil(%(limit)s::float8 / greatest(count(*), 1))::bigint FROM claimed
)
SELECT m.topic, m.ordering_key, m.id, m.position, m.data, m.attributes, m.created_at, m.attempts,
       m.progress
FROM claimed c
CROSS JOIN LATERAL (
    SELECT o.topic, o.ordering_key, o.id, o.position, o.data, o.attributes, o.created_at,
           o.attempts, o.progress
    FROM {outbox} o
    WHERE o.topic = c.topic AND o.ordering_key = c.ordering_key
      AND o.position > c.after
      AND o.available_at <= coalesce(%(now)s::timestamptz, now())
      AND o.position < coalesce((
          SELECT min(w.position) FROM {outbox} w
          WHERE w.topic = c.topic AND w.ordering_key = c.ordering_key AND w.attempts > 0
            AND (w.available_at IS NULL OR w.available_at > coalesce(%(now)s::timestamptz, now()))
      ), 9223372036854775807)
    ORDER BY o.position
    LIMIT (SELECT n FROM share)
) AS m

-- name: close_batch
-- Apply a batch's outcomes for the sequences whose lease still carries its token, and end those
-- leases, in one statement; a lease passed on to the batch read ahead (%(lease_kept)s) is kept.
-- Returns the sequences it held; any other lease was taken over.
-- Each change is driven by the messages' primary keys; the held sequences are only a filter
-- (an array computed once), so the plan never walks a whole sequence, whatever the statistics.
-- A lease row another claim has locked is being taken over (this batch's lease expired): it
-- counts as lost at once, never waited for.
-- What the relay saves with some marks (MarkDetails) rides on the marks' own arrays: the
-- progress of each failed and dead message (%(failed_progress)s, %(dead_progress)s: NULL keeps
-- the saved one; empty when the batch has none), and the published messages to keep
-- (%(kept)s, all of them with keep_published; %(keeping)s is false when there are none, so the
-- common batch pays nothing for it). The follow-ups are written by the caller, in the same
-- transaction, for the sequences this returns.
WITH batch_leases AS (
    SELECT * FROM unnest(%(lease_topics)s::text[], %(lease_keys)s::text[],
                         %(lease_tokens)s::bigint[], %(lease_kept)s::boolean[])
           AS h (topic, ordering_key, token, kept)
),
ending AS (
    SELECT l.topic, l.ordering_key
    FROM {leases} l JOIN batch_leases h
      ON l.topic = h.topic AND l.ordering_key = h.ordering_key AND l.token = h.token
    WHERE NOT h.kept
    ORDER BY l.topic, l.ordering_key
    FOR UPDATE OF l SKIP LOCKED
),
ended AS (
    DELETE FROM {leases} l
    USING ending e
    WHERE l.topic = e.topic AND l.ordering_key = e.ordering_key
    RETURNING l.topic, l.ordering_key
),
passed_on AS (  -- only read: no lock taken, none waited for
    SELECT l.topic, l.ordering_key
    FROM {leases} l JOIN batch_leases h
      ON l.topic = h.topic AND l.ordering_key = h.ordering_key AND l.token = h.token
    WHERE h.kept
),
held AS (
    SELECT topic, ordering_key FROM ended
    UNION ALL
    SELECT topic, ordering_key FROM passed_on
),
acked AS (
    DELETE FROM {outbox} o
    WHERE o.id = ANY(%(published)s::bigint[])
      AND o.topic || chr(31) || o.ordering_key = ANY(ARRAY(SELECT topic || chr(31) || ordering_key FROM held))
    RETURNING o.id
),
kept AS (  -- reads the acked rows as they were before this statement (one snapshot for all)
    INSERT INTO {published}
        (id, topic, ordering_key, data, attributes, created_at, attempts, publish_id,
         published_at, progress)
    SELECT o.id, o.topic, o.ordering_key, o.data, o.attributes, o.created_at, o.attempts,
           k.publish_id, coalesce(%(now)s::timestamptz, now()), coalesce(k.progress, o.progress)
    FROM acked a
    JOIN {outbox} o USING (id)
    JOIN unnest(%(kept)s::bigint[], %(kept_publish_ids)s::text[], %(kept_progress)s::text[])
         AS k (id, publish_id, progress)
      USING (id)
    WHERE %(keeping)s
    RETURNING id
),
failed AS (
    UPDATE {outbox} o
    SET attempts = o.attempts + 1, last_error = f.error,
        failed_at = coalesce(%(now)s::timestamptz, now()),
        available_at = coalesce(%(now)s::timestamptz, now()) + f.retry_seconds * interval '1 second',
        progress = coalesce(f.progress, o.progress)
    FROM unnest(%(failed)s::bigint[], %(failed_errors)s::text[], %(retry_seconds)s::float8[],
                %(failed_progress)s::text[])
         AS f (id, error, retry_seconds, progress)
    WHERE o.id = f.id
      AND o.topic || chr(31) || o.ordering_key = ANY(ARRAY(SELECT topic || chr(31) || ordering_key FROM held))
    RETURNING o.id
),
parked AS (
    DELETE FROM {outbox} o
    USING unnest(%(dead)s::bigint[], %(dead_errors)s::text[], %(dead_progress)s::text[])
          AS d (id, error, progress)
    WHERE o.id = d.id
      AND o.topic || chr(31) || o.ordering_key = ANY(ARRAY(SELECT topic || chr(31) || ordering_key FROM held))
    RETURNING o.id, o.topic, o.ordering_key, o.position, o.data, o.attributes, o.created_at,
              o.attempts, d.error, coalesce(d.progress, o.progress) AS progress
),
moved AS (
    INSERT INTO {dead_letters}
        (id, topic, ordering_key, position, data, attributes, created_at, attempts, last_error,
         failed_at, progress)
    SELECT id, topic, ordering_key, position, data, attributes, created_at, attempts + 1, error,
           coalesce(%(now)s::timestamptz, now()), progress
    FROM parked
    RETURNING id
)
SELECT topic, ordering_key FROM held

-- name: park_unreadable
-- Move rows that cannot be read as messages to the dead letters, as they are, with the reason.
WITH moved AS (
    DELETE FROM {outbox} WHERE id = ANY(%(ids)s::bigint[])
    RETURNING id, topic, ordering_key, position, data, attributes, created_at, attempts, progress
)
INSERT INTO {dead_letters}
    (id, topic, ordering_key, position, data, attributes, created_at, attempts, last_error,
     failed_at, progress)
SELECT m.id, m.topic, m.ordering_key, coalesce(m.position, m.id), m.data, m.attributes,
       m.created_at, m.attempts, e.error, coalesce(%(now)s::timestamptz, now()), m.progress
FROM moved m JOIN unnest(%(ids)s::bigint[], %(errors)s::text[]) AS e (id, error) USING (id)

-- name: list_dead_letters
-- Parked and blocked messages, oldest first, of one topic (or all when %(topic)s is NULL).
SELECT id, topic, ordering_key, data, attributes, created_at, attempts, progress, last_error,
       failed_at, state
FROM (
    SELECT id, topic, ordering_key, data, attributes, created_at, attempts, progress, last_error,
           failed_at, 'parked' AS state
    FROM {dead_letters} WHERE %(topic)s::text IS NULL OR topic = %(topic)s
    UNION ALL
    SELECT id, topic, ordering_key, data, attributes, created_at, attempts, progress, last_error,
           failed_at, 'blocked' AS state
    FROM {outbox}
    WHERE available_at IS NULL AND (%(topic)s::text IS NULL OR topic = %(topic)s)
) AS dead
ORDER BY id LIMIT %(limit)s

-- name: replay_dead_letters
-- Replay: parked messages go back with their ids and places, blocked ones are due again; both
-- with zero attempts, and with the progress saved with them. Returns how many.
WITH unparked AS (
    DELETE FROM {dead_letters} WHERE id = ANY(%(ids)s::bigint[])
    RETURNING id, topic, ordering_key, position, data, attributes, created_at, progress
),
restored AS (
    INSERT INTO {outbox}
        (id, topic, ordering_key, position, data, attributes, created_at, available_at, progress)
    SELECT id, topic, ordering_key, position, data, attributes, created_at,
           coalesce(%(now)s::timestamptz, now()), progress
    FROM unparked
    RETURNING id
),
unblocked AS (
    UPDATE {outbox}
    SET attempts = 0, available_at = coalesce(%(now)s::timestamptz, now()), last_error = NULL, failed_at = NULL
    WHERE available_at IS NULL AND id = ANY(%(ids)s::bigint[])
    RETURNING id
)
SELECT (SELECT count(*) FROM restored) + (SELECT count(*) FROM unblocked)

-- name: purge_dead_letters
-- Delete parked and blocked messages for good. Returns how many.
WITH parked AS (
    DELETE FROM {dead_letters} WHERE id = ANY(%(ids)s::bigint[]) RETURNING id
),
blocked AS (
    DELETE FROM {outbox} WHERE available_at IS NULL AND id = ANY(%(ids)s::bigint[]) RETURNING id
)
SELECT (SELECT count(*) FROM parked) + (SELECT count(*) FROM blocked)

-- name: backlog
-- Per topic: pending messages, the age in seconds of the oldest that is due (delayed ones are
-- not late), blocked and parked counts.
SELECT topic, sum(pending)::bigint, coalesce(max(oldest_age), 0)::float8, sum(dead)::bigint
FROM (
    SELECT topic, count(*) AS pending,
           extract(epoch FROM coalesce(%(now)s::timestamptz, now()) - min(created_at) FILTER (
               WHERE available_at IS NULL OR available_at <= coalesce(%(now)s::timestamptz, now())
           )) AS oldest_age,
           count(*) FILTER (WHERE available_at IS NULL) AS dead
    FROM {outbox} GROUP BY topic
    UNION ALL
    SELECT topic, 0, NULL, count(*) FROM {dead_letters} GROUP BY topic
) AS counts
GROUP BY topic ORDER BY topic

-- name: purge_published
-- Retention for keep_published: delete kept messages published before a cutoff. Returns how many.
WITH purged AS (
    DELETE FROM {published}
    WHERE published_at < coalesce(%(now)s::timestamptz, now()) - %(older_than)s * interval '1 second'
    RETURNING id
)
SELECT count(*) FROM purged

-- name: find_message
-- The message of outbox id %(id)s wherever it is: pending or blocked (the outbox), parked (the
-- dead letters) or settled and kept (the published table); no row when there is none.
SELECT state, id, topic, ordering_key, data, attributes, created_at, attempts, progress,
       last_error, since, publish_id
FROM (
    SELECT CASE WHEN available_at IS NULL THEN 'blocked' ELSE 'pending' END AS state,
           id, topic, ordering_key, data, attributes, created_at, attempts, progress,
           last_error, failed_at AS since, NULL::text AS publish_id
    FROM {outbox} WHERE id = %(id)s
    UNION ALL
    SELECT 'parked', id, topic, ordering_key, data, attributes, created_at, attempts, progress,
           last_error, failed_at, NULL
    FROM {dead_letters} WHERE id = %(id)s
    UNION ALL
    SELECT 'settled', id, topic, ordering_key, data, attributes, created_at, attempts, progress,
           NULL, published_at, publish_id
    FROM {published} WHERE id = %(id)s
) AS found
LIMIT 1

-- name: purge_settled
-- Retention for kept messages of one topic: delete those settled before a cutoff. Returns how
-- many.
WITH purged AS (
    DELETE FROM {published}
    WHERE topic = %(topic)s
      AND published_at < coalesce(%(now)s::timestamptz, now()) - %(older_than)s * interval '1 second'
    RETURNING id
)
SELECT count(*) FROM purged

-- name: create_migrations_table
-- The table that records applied schema versions.
CREATE TABLE IF NOT EXISTS {migrations} (
    version     integer     PRIMARY KEY,
    name        text        NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
)

-- name: lock_migrations
-- Serialize concurrent migrations of this outbox (released at commit).
SELECT pg_advisory_xact_lock(hashtextextended({migrations_literal}, 0))

-- name: migrations_table_exists
-- Whether this outbox was ever migrated (its migrations table exists).
SELECT to_regclass({migrations_literal}) IS NOT NULL

-- name: schema_version
-- The newest schema version applied (NULL: none).
SELECT max(version) FROM {migrations}

-- name: applied_migrations
-- The schema versions already applied.
SELECT version FROM {migrations}

-- name: record_migration
-- Note a schema version as applied.
INSERT INTO {migrations} (version, name) VALUES (%(version)s, %(name)s)
