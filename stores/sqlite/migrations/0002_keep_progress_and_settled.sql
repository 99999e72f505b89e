-- What the relay saves with a message (a handler topic's per-handler results), and the
-- published messages a topic keeps as settled.

-- The progress saved with a message's last mark: JSON text the store keeps as given and hands
-- back at the next checkout; NULL when none was saved.
ALTER TABLE {outbox} ADD COLUMN progress TEXT;

-- A parked message keeps its progress, and takes it back into the outbox on replay.
ALTER TABLE {dead_letters} ADD COLUMN progress TEXT;

-- Published messages whose mark said keep, with their progress, until purge_settled() removes
-- the old ones of their topic.
CREATE TABLE {settled} (
    id            INTEGER PRIMARY KEY,                -- the outbox id it had
    topic         TEXT    NOT NULL,
    ordering_key  TEXT    NOT NULL,
    data          BLOB    NOT NULL,
    attributes    TEXT,
    created_at    REAL    NOT NULL,
    attempts      INTEGER NOT NULL,
    progress      TEXT,
    publish_id    TEXT    NOT NULL,                   -- the destination's id
    settled_at    REAL    NOT NULL                    -- unix seconds, when it was published
);

-- purge_settled(topic, older_than): a topic's settled messages, oldest first.
CREATE INDEX {settled_topic_index} ON {settled} (topic, settled_at);
