-- The transactional outbox: a NOTIFY wakes the relays that publish its rows.
--
-- The current body of each function; applied after the migrations on every `boxoffice migrate`
-- (idempotent). Grants beside the function: each service role gets EXECUTE on what it calls.

-- The outbox's NOTIFY, skipped in a transaction that sets boxoffice.outbox_quiet: PostgreSQL
-- serialises the commits of notifying transactions (a global lock held through the WAL flush),
-- which halves the rate of the webhook service's one-transaction-per-event. Its transactions
-- set the flag and wake their own process's relay instead; everyone else still notifies.
CREATE OR REPLACE FUNCTION outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('boxoffice.outbox_quiet', true) IS DISTINCT FROM 'on' THEN
        PERFORM pg_notify('boxoffice_outbox', '');
    END IF;
    RETURN NULL;
END $$;

CREATE OR REPLACE TRIGGER outbox_notify AFTER INSERT ON outbox
    FOR EACH STATEMENT EXECUTE FUNCTION outbox_notify();
