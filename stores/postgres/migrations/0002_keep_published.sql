-- Published messages, kept when the store runs with keep_published=True (for audit and for
-- answering "was it sent, and as what?"), until purge_published() removes the old ones.
CREATE TABLE {published} (
    id            bigint      PRIMARY KEY,
    topic         text        NOT NULL,
    ordering_key  text        NOT NULL,
    data          bytea       NOT NULL,
    attributes    jsonb,
    created_at    timestamptz NOT NULL,
    attempts      integer     NOT NULL,
    publish_id    text,                                 -- the destination's id
    published_at  timestamptz NOT NULL
);

CREATE INDEX {published_at_index} ON {published} (published_at);
