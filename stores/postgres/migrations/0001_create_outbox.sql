-- The outbox, its dead letters, the leases by which relays hold sequences, and the strict-order
-- trigger. Names in braces are filled in, quoted, for the configured schema and table.

-- Outbox ids: one sequence, never reset, so an id is never reused (consumers dedupe on it).
CREATE SEQUENCE {message_ids};

-- One row per message not yet published. A sequence is (topic, ordering_key); '' is the
-- topic-wide sequence of messages without an ordering key. Relays take each sequence's messages
-- in position order: the id, or for strict-sequence topics a number drawn at commit.
CREATE TABLE {outbox} (
    id            bigint      PRIMARY KEY,
    topic         text        NOT NULL,
    ordering_key  text        NOT NULL DEFAULT '',
    position      bigint,                               -- NULL until a strict row commits
    data          bytea       NOT NULL,                 -- the codec's bytes, untouched
    attributes    jsonb,                                -- NULL when there are none
    created_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
    available_at  timestamptz,                          -- due from; NULL: blocked (poison)
    attempts      integer     NOT NULL DEFAULT 0,       -- failed publish attempts
    last_error    text,
    failed_at     timestamptz,
    strict        boolean     NOT NULL DEFAULT false    -- position drawn at commit
);

-- Walks the sequences and each one's messages in order.
CREATE INDEX {outbox_sequence_index} ON {outbox} (topic, ordering_key, position)
    INCLUDE (available_at, attempts);

-- Finds the message a sequence waits on (failed: due again later, or blocked) at once.
CREATE INDEX {outbox_waiting_index} ON {outbox} (topic, ordering_key, position)
    WHERE attempts > 0;

-- Finds a committing transaction's own strict rows (the only rows without a position) at once.
CREATE INDEX {outbox_unpositioned_index} ON {outbox} (id) WHERE position IS NULL;

-- Messages parked by the poison policy 'park'; replay moves them back with the same id.
CREATE TABLE {dead_letters} (
    id            bigint      PRIMARY KEY,
    topic         text        NOT NULL,
    ordering_key  text        NOT NULL,
    position      bigint      NOT NULL,
    data          bytea       NOT NULL,
    attributes    jsonb,
    created_at    timestamptz NOT NULL,
    attempts      integer     NOT NULL,
    last_error    text        NOT NULL,
    failed_at     timestamptz NOT NULL
);

-- A relay's hold on a sequence. Tokens come from one sequence, so they only grow: a relay whose
-- lease expired and was taken over can no longer match its token, and so changes nothing.
CREATE TABLE {leases} (
    topic         text        NOT NULL,
    ordering_key  text        NOT NULL,
    token         bigint      NOT NULL,
    owner         text        NOT NULL,
    expires_at    timestamptz NOT NULL,
    PRIMARY KEY (topic, ordering_key)
);

CREATE SEQUENCE {lease_tokens};

-- Strict sequence: at commit, take the advisory locks of every sequence this transaction wrote
-- strict messages to (once, in one sorted order, so two committing transactions cannot
-- deadlock), then draw each row's position. The locks are held until the commit completes, so
-- within a sequence positions follow commit order.
CREATE FUNCTION {draw_position}() RETURNS trigger LANGUAGE plpgsql AS $body$
DECLARE
    sequence_lock bigint;
    flag text := 'outboxbind.strict_locks_' || TG_TABLE_SCHEMA || '_' || TG_TABLE_NAME;
BEGIN
    IF current_setting(flag, true) IS DISTINCT FROM 'taken' THEN
        FOR sequence_lock IN
            SELECT DISTINCT hashtextextended(
                {outbox_literal} || chr(31) || o.topic || chr(31) || o.ordering_key, 0)
            FROM {outbox} o
            WHERE o.strict AND o.position IS NULL  -- this transaction's own rows: no one else's
            ORDER BY 1                            -- are visible before they commit
        LOOP
            PERFORM pg_advisory_xact_lock(sequence_lock);
        END LOOP;
        PERFORM set_config(flag, 'taken', true);  -- until the end of this transaction
    END IF;
    UPDATE {outbox} SET position = nextval({message_ids_literal}) WHERE id = NEW.id;
    RETURN NULL;
END
$body$;

CREATE CONSTRAINT TRIGGER {draw_position_trigger}
    AFTER INSERT ON {outbox}
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW WHEN (NEW.strict)
    EXECUTE FUNCTION {draw_position}();
