-- The SQLite store's statements. {placeholders} are quoted table names; :names are parameters.

-- name: insert_message
-- Write one message in the caller's transaction.
INSERT INTO {outbox} (topic, ordering_key, data, attributes, created_at, available_at)
VALUES (:topic, :ordering_key, :data, :attributes, :created_at, :available_at)

-- name: live_leases
-- The sequences of the given topics that some batch holds right now.
SELECT topic, ordering_key FROM {leases}
WHERE topic IN (SELECT value FROM json_each(:topics)) AND expires_at > :now

-- name: first_sequence
-- The first sequence of a topic ('' is the topic-wide one, and sorts first).
SELECT ordering_key FROM {outbox}
WHERE topic = :topic
ORDER BY ordering_key LIMIT 1

-- name: next_sequence
-- The first sequence of a topic after a given ordering key (a skip-scan step on the index).
SELECT ordering_key FROM {outbox}
WHERE topic = :topic AND ordering_key > :after
ORDER BY ordering_key LIMIT 1

-- name: due_ids
-- The due messages at the head of a sequence, in order, up to the first one that waits for a
-- retry (or is blocked); delayed messages not yet due are stepped over.
SELECT id FROM {outbox}
WHERE topic = :topic AND ordering_key = :ordering_key AND available_at <= :now
  AND id < coalesce((
      SELECT min(w.id) FROM {outbox} w
      WHERE w.topic = :topic AND w.ordering_key = :ordering_key AND w.attempts > 0
        AND (w.available_at IS NULL OR w.available_at > :now)
  ), 9223372036854775807)
ORDER BY id LIMIT :limit

-- name: messages_by_id
-- The chosen messages of a batch.
SELECT id, topic, ordering_key, data, attributes, created_at, attempts, progress FROM {outbox}
WHERE id IN (SELECT value FROM json_each(:ids))

-- name: park_unreadable
-- Move a row that cannot be read as a message to the dead letters, as it is.
INSERT INTO {dead_letters}
    (id, topic, ordering_key, data, attributes, created_at, attempts, progress, last_error,
     failed_at)
SELECT id, topic, ordering_key, data, attributes, coalesce(created_at, :now), attempts,
       progress, :error, :now
FROM {outbox} WHERE id = :id

-- name: take_lease
-- Lease a sequence for a batch (it was free or expired when checked, in this transaction).
INSERT INTO {leases} (topic, ordering_key, token, owner, expires_at)
VALUES (:topic, :ordering_key, :token, :owner, :expires_at)
ON CONFLICT (topic, ordering_key) DO UPDATE
SET token = excluded.token, owner = excluded.owner, expires_at = excluded.expires_at

-- name: end_lease
-- End a batch's lease; no row deleted means the lease was lost to another batch.
DELETE FROM {leases} WHERE topic = :topic AND ordering_key = :ordering_key AND token = :token

-- name: delete_published
-- Acknowledge published messages.
DELETE FROM {outbox} WHERE id IN (SELECT value FROM json_each(:ids))

-- name: record_failure
-- Count a failed attempt; the message is due again at :available_at (NULL: blocked). A
-- :progress replaces the one kept (NULL keeps it).
UPDATE {outbox}
SET attempts = attempts + 1, last_error = :error, failed_at = :now, available_at = :available_at,
    progress = coalesce(:progress, progress)
WHERE id = :id

-- name: park_message
-- Move a message to the dead letters (the outbox row is deleted next), with its progress: a
-- :progress replaces the one kept (NULL keeps it).
INSERT INTO {dead_letters}
    (id, topic, ordering_key, data, attributes, created_at, attempts, progress, last_error,
     failed_at)
SELECT id, topic, ordering_key, data, attributes, created_at, attempts + 1,
       coalesce(:progress, progress), :error, :now
FROM {outbox} WHERE id = :id

-- name: settle_message
-- Keep a published message as settled (the outbox row is deleted next), with its progress: a
-- :progress replaces the one kept (NULL keeps it).
INSERT INTO {settled}
    (id, topic, ordering_key, data, attributes, created_at, attempts, progress, publish_id,
     settled_at)
SELECT id, topic, ordering_key, data, attributes, created_at, attempts,
       coalesce(:progress, progress), :publish_id, :now
FROM {outbox} WHERE id = :id

-- name: delete_message
-- Remove one message from the outbox.
DELETE FROM {outbox} WHERE id = :id

-- name: list_dead_letters
-- Parked and blocked messages, oldest first, of one topic (or all when :topic is NULL).
SELECT id, topic, ordering_key, data, attributes, created_at, attempts, progress, last_error,
       failed_at, 'parked' AS state
FROM {dead_letters} WHERE :topic IS NULL OR topic = :topic
UNION ALL
SELECT id, topic, ordering_key, data, attributes, created_at, attempts, progress, last_error,
       failed_at, 'blocked' AS state
FROM {outbox} WHERE available_at IS NULL AND (:topic IS NULL OR topic = :topic)
ORDER BY id LIMIT :limit

-- name: unpark_dead_letters
-- Replay parked messages: back into the outbox with their own ids, their progress and zero
-- attempts.
INSERT INTO {outbox}
    (id, topic, ordering_key, data, attributes, created_at, available_at, progress)
SELECT id, topic, ordering_key, data, attributes, created_at, :now, progress
FROM {dead_letters} WHERE id IN (SELECT value FROM json_each(:ids))

-- name: delete_dead_letters
-- Remove parked messages.
DELETE FROM {dead_letters} WHERE id IN (SELECT value FROM json_each(:ids))

-- name: unblock_messages
-- Replay blocked messages: due now, with zero attempts.
UPDATE {outbox} SET attempts = 0, available_at = :now, last_error = NULL, failed_at = NULL
WHERE available_at IS NULL AND id IN (SELECT value FROM json_each(:ids))

-- name: delete_blocked
-- Purge blocked messages.
DELETE FROM {outbox} WHERE available_at IS NULL AND id IN (SELECT value FROM json_each(:ids))

-- name: backlog
-- Per topic: pending messages, the creation time of the oldest one that is due (delayed ones
-- are not late), blocked and parked counts.
SELECT topic, SUM(pending), MIN(oldest), SUM(dead) FROM (
    SELECT topic, COUNT(*) AS pending,
           MIN(CASE WHEN available_at IS NULL OR available_at <= :now THEN created_at END) AS oldest,
           SUM(available_at IS NULL) AS dead
    FROM {outbox} GROUP BY topic
    UNION ALL
    SELECT topic, 0, NULL, COUNT(*) FROM {dead_letters} GROUP BY topic
) GROUP BY topic ORDER BY topic

-- name: find_message
-- One message wherever it is: in the outbox (pending, or blocked), parked, or settled and kept.
-- The columns after the message's: state, last error, since (failed or settled), publish id.
SELECT id, topic, ordering_key, data, attributes, created_at, attempts, progress,
       CASE WHEN available_at IS NULL THEN 'blocked' ELSE 'pending' END AS state,
       last_error, failed_at, NULL AS publish_id
FROM {outbox} WHERE id = :id
UNION ALL
SELECT id, topic, ordering_key, data, attributes, created_at, attempts, progress, 'parked',
       last_error, failed_at, NULL
FROM {dead_letters} WHERE id = :id
UNION ALL
SELECT id, topic, ordering_key, data, attributes, created_at, attempts, progress, 'settled',
       NULL, settled_at, publish_id
FROM {settled} WHERE id = :id

-- name: purge_settled
-- Retention of settled messages: delete a topic's settled before :cutoff.
DELETE FROM {settled} WHERE topic = :topic AND settled_at < :cutoff

-- name: applied_migrations
-- The schema versions already applied.
SELECT version FROM {migrations}

-- name: record_migration
-- Note a schema version as applied.
INSERT INTO {migrations} (version, name, applied_at) VALUES (:version, :name, :now)

-- name: create_migrations_table
-- The table that records applied schema versions.
CREATE TABLE IF NOT EXISTS {migrations} (
    version     INTEGER PRIMARY KEY,
    name        TEXT NOT NULL,
    applied_at  REAL NOT NULL
)

-- name: has_table
-- Whether the database holds a table of this name (unquoted, as created).
SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = :name)

-- name: schema_version
-- The newest schema version applied (NULL when none is).
SELECT MAX(version) FROM {migrations}
