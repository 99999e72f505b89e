-- Strict sequence: lock every sequence a transaction writes strict rows to, whatever the
-- constraint mode. Version 1 marked the transaction after the trigger's first run and took no
-- lock in later runs, so a row written after the trigger had fired early (SET CONSTRAINTS ...
-- IMMEDIATE, as Django's check_constraints() runs it) drew its position without its key's lock,
-- and a writer of that key could commit in between; and the mark was named by schema and table
-- joined with '_', which two outboxes could share ("a_b"."c" and "a"."b_c").
-- Now the first run in a transaction still takes the locks of all its strict rows in one sorted
-- order (no deadlock between two committing writers), the mark is named by the table's oid, and
-- every run also locks its own row's sequence: a lock this transaction holds already is granted
-- at once, so in the usual case (all deferred to the commit) this adds no wait.
CREATE OR REPLACE FUNCTION {draw_position}() RETURNS trigger LANGUAGE plpgsql AS $body$
DECLARE
    sequence_lock bigint;
    flag text := 'outboxbind.strict_locks_' || TG_RELID::text;
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
    PERFORM pg_advisory_xact_lock(hashtextextended(
        {outbox_literal} || chr(31) || NEW.topic || chr(31) || NEW.ordering_key, 0));
    UPDATE {outbox} SET position = nextval({message_ids_literal}) WHERE id = NEW.id;
    RETURN NULL;
END
$body$;
