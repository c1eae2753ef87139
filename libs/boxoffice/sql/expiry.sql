-- Expiry of overdue holds: the reaper is woken when a hold is due, and expires a batch
-- of them in one statement (holds and payments do the same before saying sold out).
--
-- The current body of each function; applied after the migrations on every `boxoffice migrate`
-- (idempotent). Grants beside the function: each service role gets EXECUTE on what it calls.

-- Wake the reaper when a hold appears that is due soon (or is shortened): NOTIFY carries the
-- soonest such expires_at as epoch seconds, so a reaper sleeping until a later expiry wakes for
-- this one. Only for a hold due within 2 seconds: the reaper re-reads its next due time at least
-- every second (services/reaper/expiry.py, ARM_SECONDS), so a hold due later is armed before it
-- is due without any NOTIFY; and notifying transactions cannot group-commit (PostgreSQL
-- serialises them through the WAL flush), which capped holds on a hot event at the rate of one
-- row's UPDATE. One notification per statement; NOTIFY is delivered on commit only, so the
-- reaper never wakes for a hold that was rolled back, and a periodic sweep covers wake-ups lost
-- while not listening.
CREATE OR REPLACE FUNCTION reservations_due_notify() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    due timestamptz;
BEGIN
    SELECT min(n.expires_at) INTO due FROM new_reservations n WHERE n.status = 'active';
    IF due < clock_timestamp() + interval '2 seconds' THEN
        PERFORM pg_notify('boxoffice_reservations_due', extract(epoch FROM due)::text);
    END IF;
    RETURN NULL;
END $$;

CREATE OR REPLACE TRIGGER reservations_due_on_insert AFTER INSERT ON reservations
    REFERENCING NEW TABLE AS new_reservations
    FOR EACH STATEMENT EXECUTE FUNCTION reservations_due_notify();

CREATE OR REPLACE FUNCTION reservation_shortened_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('boxoffice_reservations_due', extract(epoch FROM NEW.expires_at)::text);
    RETURN NULL;
END $$;

CREATE OR REPLACE TRIGGER reservations_due_on_shorten AFTER UPDATE OF expires_at ON reservations
    FOR EACH ROW WHEN (NEW.status = 'active' AND NEW.expires_at < OLD.expires_at)
    EXECUTE FUNCTION reservation_shortened_notify();

-- Expire at most p_limit overdue active holds (optionally of one event) in the caller's
-- transaction and return each one with how late it was released (seconds past expires_at).
-- Holds are claimed with SKIP LOCKED (replicas and completions never wait on each other's holds;
-- a hold being completed is skipped, so the race is decided once, by the row lock), marked
-- expired with one 'reservations.events.expired' outbox row each, and only then are their
-- tickets returned: the inventory rows, which every new hold on the event needs, are locked
-- last (held only until commit) and in one fixed order (event, bucket), as hold_tickets
-- gathers them, so replicas expiring overlapping buckets queue instead of deadlocking
-- (NO KEY UPDATE, the lock the UPDATE takes anyway: foreign-key checks are not blocked).
CREATE OR REPLACE FUNCTION reap_due_reservations(
    p_limit integer DEFAULT 1000, p_event_id uuid DEFAULT NULL)
RETURNS TABLE (reservation_id uuid, lag_seconds double precision)
LANGUAGE plpgsql AS $$
DECLARE
    ids     uuid[];
    tids    tid[];
    lags    double precision[];
    events  uuid[];
    buckets integer[];
    amounts integer[];
    -- read once: a volatile clock_timestamp() in the WHERE below would be a filter run on every
    -- active hold's index entry, not a bound of the index scan, so that a claim with few holds
    -- due read the whole index of active holds (each sweep's cost grew with the holds not due)
    due_by  timestamptz := clock_timestamp();
BEGIN
    -- claimed by their row versions (ctid): a version locked here stays the current one until
    -- this transaction ends, so the UPDATE below finds each row by a TID scan, without a second
    -- primary-key lookup per row; from here on the cost of a batch follows its size, not the
    -- table's
    SELECT array_agg(d.id), array_agg(d.ctid) INTO ids, tids FROM (
        SELECT r.id, r.ctid FROM reservations r
        WHERE r.status = 'active' AND r.expires_at <= due_by
          AND (p_event_id IS NULL OR r.event_id = p_event_id)
        ORDER BY r.expires_at
        LIMIT p_limit
        FOR UPDATE SKIP LOCKED) d;
    IF ids IS NULL THEN
        RETURN;
    END IF;
    WITH expired AS (
        UPDATE reservations r
        SET status = 'expired', released_at = clock_timestamp(), updated_at = clock_timestamp()
        WHERE r.ctid = ANY (tids) AND r.status = 'active'
        RETURNING r.id, r.event_id, r.quantity, r.expires_at, r.released_at
    ), announced AS (
        INSERT INTO outbox (subject, payload)
        SELECT 'reservations.events.expired',
               jsonb_build_object('reservation_id', e.id, 'event_id', e.event_id,
                                  'quantity', e.quantity, 'expires_at', e.expires_at,
                                  'occurred_at', e.released_at)
        FROM expired e ORDER BY e.expires_at
        RETURNING 1
    )
    SELECT array_agg(e.id ORDER BY e.id),
           array_agg(extract(epoch FROM e.released_at - e.expires_at)::float8 ORDER BY e.id)
    INTO ids, lags FROM expired e;
    IF ids IS NULL THEN
        RETURN;
    END IF;
    -- the tickets of exactly the holds expired above, by primary key
    SELECT array_agg(x.event_id ORDER BY x.event_id, x.bucket),
           array_agg(x.bucket ORDER BY x.event_id, x.bucket),
           array_agg(x.quantity ORDER BY x.event_id, x.bucket)
    INTO events, buckets, amounts
    FROM (SELECT a.event_id, a.bucket, sum(a.quantity)::integer AS quantity
          FROM reservation_allocations a WHERE a.reservation_id = ANY (ids)
          GROUP BY a.event_id, a.bucket) x;
    IF events IS NOT NULL THEN
        PERFORM 1 FROM inventory_buckets b
        JOIN unnest(events, buckets) AS u(event_id, bucket)
          ON b.event_id = u.event_id AND b.bucket = u.bucket
        ORDER BY b.event_id, b.bucket
        FOR NO KEY UPDATE OF b;
        UPDATE inventory_buckets b SET held = b.held - u.quantity
        FROM unnest(events, buckets, amounts) AS u(event_id, bucket, quantity)
        WHERE b.event_id = u.event_id AND b.bucket = u.bucket;
    END IF;
    RETURN QUERY SELECT u.id, u.lag FROM unnest(ids, lags) AS u(id, lag);
END $$;
GRANT EXECUTE ON FUNCTION reap_due_reservations
    TO boxoffice_payment, boxoffice_webhook, boxoffice_reaper;

-- How many reap_due_reservations expired (for callers that need only the count).
CREATE OR REPLACE FUNCTION expire_due_reservations(
    p_limit integer DEFAULT 1000, p_event_id uuid DEFAULT NULL)
RETURNS integer LANGUAGE sql AS $$
    SELECT count(*)::integer FROM reap_due_reservations(p_limit, p_event_id)
$$;
GRANT EXECUTE ON FUNCTION expire_due_reservations
    TO boxoffice_payment, boxoffice_webhook, boxoffice_reaper;

-- The operators' function: expire every overdue hold now and return how many, leaving a
-- 'manual' row in reaper_runs like every other run.
CREATE OR REPLACE FUNCTION cleanup_expired_reservations() RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    total   integer := 0;
    n       integer;
    started timestamptz := clock_timestamp();
BEGIN
    LOOP
        n := expire_due_reservations(5000);
        total := total + n;
        EXIT WHEN n = 0;
    END LOOP;
    INSERT INTO reaper_runs (kind, replica, started_at, finished_at, expired)
    VALUES ('manual', 'sql:' || current_user, started, clock_timestamp(), total);
    RETURN total;
END $$;
