-- The outbox, its dead letters, and the leases by which relays hold sequences.

-- One row per message not yet published. A sequence is (topic, ordering_key); '' is the
-- topic-wide sequence of messages without an ordering key.
CREATE TABLE {outbox} (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,  -- a committed id is never reused
    topic         TEXT    NOT NULL,
    ordering_key  TEXT    NOT NULL DEFAULT '',
    data          BLOB    NOT NULL,                   -- the codec's bytes, untouched
    attributes    TEXT,                               -- JSON object; NULL when there are none
    created_at    REAL    NOT NULL,                   -- unix seconds
    available_at  REAL,                               -- due from; NULL: blocked by poison policy
    attempts      INTEGER NOT NULL DEFAULT 0,         -- failed publish attempts
    last_error    TEXT,
    failed_at     REAL
);

-- Walks the sequences and each one's messages in order; covers the checkout's filters.
CREATE INDEX {outbox_sequence_index} ON {outbox} (topic, ordering_key, id, available_at, attempts);

-- Finds the message a sequence waits on (failed: due again later, or blocked) at once.
CREATE INDEX {outbox_waiting_index} ON {outbox} (topic, ordering_key, id) WHERE attempts > 0;

-- Messages parked by the poison policy 'park'; replay moves them back with the same id.
CREATE TABLE {dead_letters} (
    id            INTEGER PRIMARY KEY,
    topic         TEXT    NOT NULL,
    ordering_key  TEXT    NOT NULL,
    data          BLOB    NOT NULL,
    attributes    TEXT,
    created_at    REAL    NOT NULL,
    attempts      INTEGER NOT NULL,
    last_error    TEXT    NOT NULL,
    failed_at     REAL    NOT NULL
);

-- A relay's hold on a sequence. The token fences: only the batch that took the lease may
-- apply its acks and failures, and only while the lease row still carries its token.
CREATE TABLE {leases} (
    topic         TEXT    NOT NULL,
    ordering_key  TEXT    NOT NULL,
    token         TEXT    NOT NULL,
    owner         TEXT    NOT NULL,
    expires_at    REAL    NOT NULL,
    PRIMARY KEY (topic, ordering_key)
) WITHOUT ROWID;
