-- Finds one topic's kept messages settled before a cutoff, for purge_settled(topic, older_than).
-- Built first: it holds the published table (so the relays' closes, which write there) for as
-- long as it takes, while writers go on; the ALTERs below lock their tables only briefly, until
-- the migration commits.
CREATE INDEX {settled_index} ON {published} (topic, published_at);

-- What the relay saves with a message (MarkDetails.progress: a handler topic's per-handler
-- results, as JSON text): on the outbox row, and carried along when the message is parked (the
-- dead letters), replayed, or settled and kept (the published table). NULL: nothing saved.
-- The store keeps it as given, byte for byte: text, not jsonb, which would reorder and reformat
-- it, and refuse text it cannot parse (a close that fails on one message's progress would fail
-- its whole batch, at every retry). Operators can still query it as progress::jsonb.
-- A nullable column without a default is added without rewriting the table.
ALTER TABLE {outbox} ADD COLUMN progress text;
ALTER TABLE {dead_letters} ADD COLUMN progress text;
ALTER TABLE {published} ADD COLUMN progress text;
