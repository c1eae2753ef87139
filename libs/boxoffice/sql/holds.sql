-- Ticketed events, holds and their buckets: a hold takes tickets in one round trip,
-- locking buckets in one order; a hold ends by completing or by giving its tickets back.
--
-- The current body of each function; applied after the migrations on every `boxoffice migrate`
-- (idempotent). Grants beside the function: each service role gets EXECUTE on what it calls.

-- Create an event and spread its capacity over its buckets, in one statement.
CREATE OR REPLACE FUNCTION create_ticketed_event(
    p_id uuid, p_name text, p_capacity integer, p_price bigint, p_currency text,
    p_buckets integer DEFAULT 1)
RETURNS uuid LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO ticketed_events (id, name, capacity, price, currency, buckets)
    VALUES (p_id, p_name, p_capacity, p_price, p_currency, p_buckets);
    INSERT INTO inventory_buckets (event_id, bucket, capacity)
    SELECT p_id, b, p_capacity / p_buckets + CASE WHEN b < p_capacity % p_buckets THEN 1 ELSE 0 END
    FROM generate_series(0, p_buckets - 1) AS b;
    RETURN p_id;
END $$;
GRANT EXECUTE ON FUNCTION create_ticketed_event TO boxoffice_payment;

-- The one lock of a keyed hold (client and Idempotency-Key), for the transaction: true when
-- taken, false when another transaction holds it. Both hold paths (hold_tickets_batch, and the
-- payment service's full path) take it here, so they exclude each other.
CREATE OR REPLACE FUNCTION try_lock_hold_key(p_client_id text, p_key text)
RETURNS boolean LANGUAGE sql AS $$
    SELECT pg_try_advisory_xact_lock(hashtextextended('hold:' || p_client_id || ':' || p_key, 3))
$$;
GRANT EXECUTE ON FUNCTION try_lock_hold_key TO boxoffice_payment;

-- One bucket of the event with at least p_quantity tickets that no other transaction holds,
-- locked; from p_start upwards, then wrapping round (two short index scans, no sort).
CREATE OR REPLACE FUNCTION hold_probe(p_event_id uuid, p_quantity integer, p_start integer)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    got integer;
BEGIN
    SELECT ib.bucket INTO got FROM inventory_buckets ib
    WHERE ib.event_id = p_event_id AND ib.bucket >= p_start
      AND ib.capacity - ib.held - ib.sold >= p_quantity
    ORDER BY ib.bucket LIMIT 1 FOR NO KEY UPDATE SKIP LOCKED;
    IF got IS NULL AND p_start > 0 THEN
        SELECT ib.bucket INTO got FROM inventory_buckets ib
        WHERE ib.event_id = p_event_id AND ib.bucket < p_start
          AND ib.capacity - ib.held - ib.sold >= p_quantity
        ORDER BY ib.bucket LIMIT 1 FOR NO KEY UPDATE SKIP LOCKED;
    END IF;
    RETURN got;
END $$;
GRANT EXECUTE ON FUNCTION hold_probe TO boxoffice_payment, boxoffice_webhook;

-- Write a new hold of tickets already taken from the event's buckets (p_buckets, p_amounts: the
-- caller has locked those buckets and counts the tickets in their held): the reservation, with
-- a keyed hold's fingerprint, its allocations and its 'held' outbox row, in one statement (one
-- executor start instead of three).
CREATE OR REPLACE FUNCTION hold_record(
    ev ticketed_events, p_quantity integer, p_client_id text, p_ttl_seconds integer,
    p_customer_ref text, p_idempotency_key text, p_fingerprint text, p_buckets integer[],
    p_amounts integer[])
RETURNS reservations LANGUAGE plpgsql AS $$
DECLARE
    r     reservations;
    quiet text;
    done  text;
BEGIN
    -- Written without the outbox NOTIFY (boxoffice.outbox_quiet, for this one statement; the
    -- caller's setting is put back): notifying transactions cannot group-commit (PostgreSQL
    -- serialises them through the WAL flush), which capped holds at the rate of one row's
    -- UPDATE. 'held' rows are the payment service's to relay, and it wakes its own relay after
    -- each hold's commit; for any other caller the relay's sweep publishes them within a second.
    -- The statement's AFTER triggers (the outbox's NOTIFY, the reaper's due NOTIFY, the foreign
    -- keys' checks) fire at its end, before the setting is put back.
    quiet := current_setting('boxoffice.outbox_quiet', true);
    done := set_config('boxoffice.outbox_quiet', 'on', true);  -- an expression: no SELECT
    WITH n AS (
        INSERT INTO reservations (event_id, client_id, customer_ref, quantity, amount, currency,
                                  expires_at, idempotency_key, request_fingerprint)
        VALUES (ev.id, p_client_id, p_customer_ref, p_quantity, ev.price * p_quantity,
                ev.currency, clock_timestamp() + make_interval(secs => p_ttl_seconds),
                p_idempotency_key, p_fingerprint)
        RETURNING *
    ), a AS (
        INSERT INTO reservation_allocations (reservation_id, event_id, bucket, quantity)
        SELECT n.id, n.event_id, t.bucket, t.quantity
        FROM n, unnest(p_buckets, p_amounts) AS t(bucket, quantity)
    ), o AS (
        INSERT INTO outbox (subject, payload)
        SELECT 'reservations.events.held',
               jsonb_build_object('reservation_id', n.id, 'event_id', n.event_id,
                                  'quantity', n.quantity, 'expires_at', n.expires_at,
                                  'occurred_at', n.created_at)
        FROM n
    )
    SELECT * INTO r FROM n;
    done := set_config('boxoffice.outbox_quiet', coalesce(quiet, ''), true);
    RETURN r;
END $$;
GRANT EXECUTE ON FUNCTION hold_record TO boxoffice_payment, boxoffice_webhook;

-- Take p_quantity tickets of an event for a new hold (the work of hold_tickets), deadlock-free: a SKIP LOCKED probe can keep locks on rows it locked and
-- then skipped (a row that fails the re-check after a concurrent update stays locked), so a pass
-- that does not take its bucket runs in a subtransaction that is rolled back, which releases
-- whatever it locked; a hold waits only while holding nothing, or while holding buckets in
-- bucket order. The passes:
--  1. one bucket with enough tickets, from a random start, skipping rows others hold (the
--     common case on a hot event: holds spread over the rows instead of queueing on one);
--     with p_fast_only this is the only pass, and a miss returns NULL (for a caller that never
--     waits for a lock and carries on; what the probe locked is released at its commit;
--     hold_tickets_batch probes the same way, through hold_probe itself);
--  2. the first bucket with enough tickets in bucket order, waiting for it;
--  3. every bucket of the event, locked in bucket order; overdue holds of the event are expired
--     (they never count), then the tickets are taken from one bucket or gathered across several.
CREATE OR REPLACE FUNCTION hold_tickets_in(
    p_event_id uuid, p_quantity integer, p_client_id text, p_ttl_seconds integer,
    p_customer_ref text, p_idempotency_key text, p_fast_only boolean)
RETURNS reservations LANGUAGE plpgsql AS $$
DECLARE
    ev         ticketed_events;
    r          reservations;
    start_at   integer;
    got        integer;
    free_total bigint;
    need       integer;
    take       integer;
    b          record;
    taken      integer[] := '{}';
    amounts    integer[] := '{}';
    n          integer;
    expired    integer := 0;
BEGIN
    SELECT * INTO ev FROM ticketed_events WHERE id = p_event_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'event_not_found' USING ERRCODE = 'BX404';
    END IF;
    IF p_quantity IS NULL OR p_quantity < 1 THEN
        RAISE EXCEPTION 'quantity must be positive' USING ERRCODE = '22023';
    END IF;
    start_at := floor(random() * ev.buckets)::integer;
    IF p_fast_only THEN
        -- no subtransaction: a batch never waits, so locks left by a miss harm no one
        got := hold_probe(p_event_id, p_quantity, start_at);
        IF got IS NULL THEN
            RETURN NULL;
        END IF;
    END IF;
    FOR pass IN 1..2 LOOP
        EXIT WHEN got IS NOT NULL;
        BEGIN
            IF pass = 1 THEN
                -- hold_probe's two scans in one statement (the second runs only if the first
                -- finds nothing): no function call on the common path
                SELECT p.bucket INTO got FROM (
                    SELECT * FROM (SELECT ib.bucket FROM inventory_buckets ib
                                   WHERE ib.event_id = p_event_id AND ib.bucket >= start_at
                                     AND ib.capacity - ib.held - ib.sold >= p_quantity
                                   ORDER BY ib.bucket LIMIT 1
                                   FOR NO KEY UPDATE SKIP LOCKED) AS onwards
                    UNION ALL
                    SELECT * FROM (SELECT ib.bucket FROM inventory_buckets ib
                                   WHERE ib.event_id = p_event_id AND ib.bucket < start_at
                                     AND ib.capacity - ib.held - ib.sold >= p_quantity
                                   ORDER BY ib.bucket LIMIT 1
                                   FOR NO KEY UPDATE SKIP LOCKED) AS wrapped) AS p
                LIMIT 1;
            ELSE
                SELECT ib.bucket INTO got FROM inventory_buckets ib
                WHERE ib.event_id = p_event_id AND ib.capacity - ib.held - ib.sold >= p_quantity
                ORDER BY ib.bucket LIMIT 1
                FOR NO KEY UPDATE;
            END IF;
            IF got IS NULL THEN
                RAISE EXCEPTION 'no bucket' USING ERRCODE = 'BX001';  -- roll back: unlock
            END IF;
            -- one bucket, by its key (the UPDATE ... FROM unnest below reads every bucket of
            -- the event), and in the subtransaction that locked it: a row locked by a
            -- subtransaction and then updated by its parent gets a MultiXact for its xmax
            -- (two transaction ids of ours on it), which cost a MultiXact, its members and
            -- their WAL on every hold
            UPDATE inventory_buckets SET held = held + p_quantity
            WHERE event_id = p_event_id AND bucket = got;
        EXCEPTION WHEN SQLSTATE 'BX001' THEN
            got := NULL;
        END;
    END LOOP;
    IF got IS NOT NULL THEN
        RETURN hold_record(ev, p_quantity, p_client_id, p_ttl_seconds, p_customer_ref,
                           p_idempotency_key, NULL, ARRAY[got], ARRAY[p_quantity]);
    END IF;
    IF got IS NULL THEN
        PERFORM 1 FROM inventory_buckets WHERE event_id = p_event_id ORDER BY bucket
        FOR NO KEY UPDATE;
        SELECT coalesce(sum(capacity - held - sold), 0) INTO free_total
        FROM inventory_buckets WHERE event_id = p_event_id;
        IF free_total < p_quantity THEN
            LOOP
                n := expire_due_reservations(1000, p_event_id);
                expired := expired + n;
                EXIT WHEN n < 1000;
            END LOOP;
            IF expired > 0 THEN
                -- the 'expired' rows are the reaper's to relay: wake it even if this
                -- transaction is quiet (the webhook's are)
                PERFORM pg_notify('boxoffice_outbox', '');
            END IF;
        END IF;
        SELECT ib.bucket INTO got FROM inventory_buckets ib
        WHERE ib.event_id = p_event_id AND ib.capacity - ib.held - ib.sold >= p_quantity
        ORDER BY ib.bucket LIMIT 1;
    END IF;
    IF got IS NOT NULL THEN
        taken := ARRAY[got];
        amounts := ARRAY[p_quantity];
    ELSE
        need := p_quantity;
        FOR b IN SELECT ib.bucket, ib.capacity - ib.held - ib.sold AS free
                 FROM inventory_buckets ib WHERE ib.event_id = p_event_id
                 ORDER BY ib.bucket LOOP
            EXIT WHEN need = 0;
            IF b.free > 0 THEN
                take := least(b.free, need);
                taken := taken || b.bucket;
                amounts := amounts || take;
                need := need - take;
            END IF;
        END LOOP;
        IF need > 0 THEN
            RAISE EXCEPTION 'sold_out' USING ERRCODE = 'BX409';
        END IF;
    END IF;
    UPDATE inventory_buckets ib SET held = ib.held + t.quantity
    FROM unnest(taken, amounts) AS t(bucket, quantity)
    WHERE ib.event_id = p_event_id AND ib.bucket = t.bucket;
    RETURN hold_record(ev, p_quantity, p_client_id, p_ttl_seconds, p_customer_ref,
                       p_idempotency_key, NULL, taken, amounts);
END $$;
GRANT EXECUTE ON FUNCTION hold_tickets_in TO boxoffice_payment, boxoffice_webhook;

-- One hold: hold_tickets_in with every pass.
CREATE OR REPLACE FUNCTION hold_tickets(
    p_event_id uuid, p_quantity integer, p_client_id text, p_ttl_seconds integer,
    p_customer_ref text DEFAULT NULL, p_idempotency_key text DEFAULT NULL)
RETURNS SETOF reservations LANGUAGE sql AS $$
    SELECT * FROM hold_tickets_in(p_event_id, p_quantity, p_client_id, p_ttl_seconds,
                                  p_customer_ref, p_idempotency_key, false)
$$;
GRANT EXECUTE ON FUNCTION hold_tickets TO boxoffice_payment, boxoffice_webhook;

-- Many holds of one event in one transaction (the payment service batches concurrent holds:
-- one commit and one round trip for the lot). The batch never waits for a lock (batches cannot
-- deadlock) and needs no subtransactions: it takes a bucket that no one else holds with enough
-- tickets for the next item (hold_probe, from a random start) and serves the following items
-- from the same bucket while it has enough, counting their tickets in its held with one UPDATE
-- per bucket, not one per hold (a hot event's bucket rows are updated by every batch: fewer
-- row versions are fewer to walk and prune). The holds are written together at the end: their
-- reservations, allocations and 'held' outbox rows in one statement for the batch (one
-- executor start and one run of the inserts' statement triggers, not one per hold), quietly as
-- hold_record writes them, their 'held' rows in idx order; a batch that holds nothing writes
-- nothing.
-- Outcomes per item (idx from 0), in idx order: held; retry (no unlocked bucket had enough, or
-- no such event, or a quantity the full path must refuse: the caller runs the full hold_tickets
-- for it); and for keyed items in_use (the key is locked by another transaction), replay or
-- mismatch (the key already made a hold: its fingerprint decides; response_body is the stored
-- answer, NULL when the hold is made by an earlier item of this same batch). A keyed hold is
-- written with its fingerprint; the caller stores its response body in the same transaction.
CREATE OR REPLACE FUNCTION hold_tickets_batch(
    p_event_id uuid, p_ttl_seconds integer, p_quantities integer[], p_client_ids text[],
    p_customer_refs text[], p_keys text[], p_fingerprints text[])
RETURNS TABLE (idx integer, outcome text, id uuid, expires_at timestamptz,
               created_at timestamptz, amount bigint, currency text, response_body text)
LANGUAGE plpgsql AS $$
DECLARE
    ev      ticketed_events;
    prior   record;
    q       integer;
    k       text;
    cur     integer;         -- the bucket being served from (locked by this transaction)
    free    integer := 0;    -- its free tickets when locked
    taken   integer := 0;    -- tickets taken from it since, not yet counted in its held
    made    jsonb := '{}';   -- the keys of this batch's holds: [client, key] -> fingerprint
    o_idx   integer[] := '{}';  -- the items not held: their outcomes
    o_what  text[] := '{}';
    o_body  text[] := '{}';
    h_idx   integer[] := '{}';  -- the items held: their buckets, written at the end
    h_where integer[] := '{}';
    quiet   text;
    done    text;
BEGIN
    SELECT * INTO ev FROM ticketed_events e WHERE e.id = p_event_id;
    IF NOT FOUND THEN
        RETURN QUERY SELECT g.i - 1, 'retry', NULL::uuid, NULL::timestamptz,
                            NULL::timestamptz, NULL::bigint, NULL::text, NULL::text
                     FROM generate_series(1, coalesce(array_length(p_quantities, 1), 0)) g(i);
        RETURN;
    END IF;
    FOR i IN 1..coalesce(array_length(p_quantities, 1), 0) LOOP
        q := p_quantities[i];
        IF p_keys[i] IS NOT NULL THEN
            IF NOT try_lock_hold_key(p_client_ids[i], p_keys[i]) THEN
                o_idx := o_idx || i; o_what := o_what || 'in_use'::text;
                o_body := o_body || NULL::text;
                CONTINUE;
            END IF;
            k := json_build_array(p_client_ids[i], p_keys[i])::text;
            IF made ? k THEN  -- an earlier item of this batch holds with this key
                o_idx := o_idx || i;
                o_what := o_what || CASE WHEN made ->> k = p_fingerprints[i]
                                         THEN 'replay' ELSE 'mismatch' END;
                o_body := o_body || NULL::text;
                CONTINUE;
            END IF;
            SELECT x.request_fingerprint, x.response_body AS body INTO prior FROM reservations x
            WHERE x.client_id = p_client_ids[i] AND x.idempotency_key = p_keys[i];
            IF FOUND THEN
                o_idx := o_idx || i;
                o_what := o_what || CASE WHEN prior.request_fingerprint = p_fingerprints[i]
                                         THEN 'replay' ELSE 'mismatch' END;
                o_body := o_body || prior.body;
                CONTINUE;
            END IF;
        END IF;
        IF q IS NULL OR q < 1 THEN
            -- the full path says what is wrong with it
            o_idx := o_idx || i; o_what := o_what || 'retry'::text; o_body := o_body || NULL::text;
            CONTINUE;
        END IF;
        IF cur IS NULL OR free - taken < q THEN
            IF taken > 0 THEN
                UPDATE inventory_buckets b SET held = b.held + taken
                WHERE b.event_id = p_event_id AND b.bucket = cur;
            END IF;
            taken := 0;
            cur := hold_probe(p_event_id, q, floor(random() * ev.buckets)::integer);
            IF cur IS NOT NULL THEN
                SELECT b.capacity - b.held - b.sold INTO free FROM inventory_buckets b
                WHERE b.event_id = p_event_id AND b.bucket = cur;
            END IF;
        END IF;
        IF cur IS NULL THEN
            o_idx := o_idx || i; o_what := o_what || 'retry'::text; o_body := o_body || NULL::text;
            CONTINUE;
        END IF;
        taken := taken + q;
        h_idx := h_idx || i;
        h_where := h_where || cur;
        IF p_keys[i] IS NOT NULL THEN
            made := made || jsonb_build_object(k, p_fingerprints[i]);
        END IF;
    END LOOP;
    IF taken > 0 THEN
        UPDATE inventory_buckets b SET held = b.held + taken
        WHERE b.event_id = p_event_id AND b.bucket = cur;
    END IF;
    IF cardinality(h_idx) = 0 THEN  -- nothing held (near sell-out, keys replayed): no writes
        RETURN QUERY SELECT t.i - 1, t.what, NULL::uuid, NULL::timestamptz, NULL::timestamptz,
                            NULL::bigint, NULL::text, t.body
                     FROM unnest(o_idx, o_what, o_body) AS t(i, what, body) ORDER BY t.i;
        RETURN;
    END IF;
    -- quiet, as in hold_record: the statement's AFTER triggers fire at its end, before the
    -- caller's setting is put back
    quiet := current_setting('boxoffice.outbox_quiet', true);
    done := set_config('boxoffice.outbox_quiet', 'on', true);
    RETURN QUERY
    WITH h AS MATERIALIZED (  -- each hold's ids drawn once, in idx order, to find its item again
        SELECT gen_random_uuid() AS id, t.i, t.bucket,
               nextval('outbox_id_seq') AS announced  -- the outbox's id, as its default
        FROM unnest(h_idx, h_where) AS t(i, bucket)
    ), n AS (
        INSERT INTO reservations (id, event_id, client_id, customer_ref, quantity, amount,
                                  currency, expires_at, idempotency_key, request_fingerprint)
        SELECT h.id, ev.id, p_client_ids[h.i], p_customer_refs[h.i], p_quantities[h.i],
               ev.price * p_quantities[h.i], ev.currency,
               clock_timestamp() + make_interval(secs => p_ttl_seconds), p_keys[h.i],
               CASE WHEN p_keys[h.i] IS NOT NULL THEN p_fingerprints[h.i] END
        FROM h
        RETURNING *
    ), a AS (
        INSERT INTO reservation_allocations (reservation_id, event_id, bucket, quantity)
        SELECT n.id, n.event_id, h.bucket, n.quantity FROM n JOIN h ON h.id = n.id
    ), o AS (  -- announced in idx order: the outbox's ids drawn in h, not in the join's order
        INSERT INTO outbox (id, subject, payload)
        SELECT h.announced, 'reservations.events.held',
               jsonb_build_object('reservation_id', n.id, 'event_id', n.event_id,
                                  'quantity', n.quantity, 'expires_at', n.expires_at,
                                  'occurred_at', n.created_at)
        FROM n JOIN h ON h.id = n.id
    )
    SELECT r.i - 1, r.what, r.id, r.expires_at, r.created_at, r.amount, r.currency, r.body
    FROM (SELECT h.i, 'held'::text AS what, n.id, n.expires_at, n.created_at, n.amount,
                 n.currency, NULL::text AS body
          FROM n JOIN h ON h.id = n.id
          UNION ALL
          SELECT t.i, t.what, NULL, NULL, NULL, NULL, NULL, t.body
          FROM unnest(o_idx, o_what, o_body) AS t(i, what, body)) AS r
    ORDER BY r.i;
    done := set_config('boxoffice.outbox_quiet', coalesce(quiet, ''), true);
END $$;
GRANT EXECUTE ON FUNCTION hold_tickets_batch TO boxoffice_payment;

-- Release an active hold's tickets (cancel): returns true if this call released it.
CREATE OR REPLACE FUNCTION release_reservation(
    p_reservation_id uuid, p_status text DEFAULT 'cancelled')
RETURNS boolean LANGUAGE plpgsql AS $$
DECLARE
    r reservations;
BEGIN
    UPDATE reservations SET status = p_status, released_at = clock_timestamp(),
                            updated_at = clock_timestamp()
    WHERE id = p_reservation_id AND status = 'active'
    RETURNING * INTO r;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    UPDATE inventory_buckets b SET held = b.held - a.quantity
    FROM reservation_allocations a
    WHERE a.reservation_id = r.id AND b.event_id = a.event_id AND b.bucket = a.bucket;
    INSERT INTO outbox (subject, payload) VALUES ('reservations.events.' || p_status,
        jsonb_build_object('reservation_id', r.id, 'event_id', r.event_id, 'quantity', r.quantity,
                           'expires_at', r.expires_at, 'occurred_at', clock_timestamp()));
    RETURN true;
END $$;
GRANT EXECUTE ON FUNCTION release_reservation TO boxoffice_payment, boxoffice_webhook;

-- Lock the buckets of the given holds, in bucket order, until the end of the transaction. A
-- transaction that is to complete or release several holds (the webhook service applies Stripe
-- events in batches) takes them all first: two such transactions then wait for each other
-- instead of deadlocking on buckets taken in the order their events came.
CREATE OR REPLACE FUNCTION lock_hold_buckets(p_reservation_ids uuid[])
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM inventory_buckets b
    WHERE (b.event_id, b.bucket) IN (SELECT a.event_id, a.bucket FROM reservation_allocations a
                                     WHERE a.reservation_id = ANY (p_reservation_ids))
    ORDER BY b.event_id, b.bucket
    FOR NO KEY UPDATE OF b;
END $$;
GRANT EXECUTE ON FUNCTION lock_hold_buckets TO boxoffice_webhook;

-- A payment succeeded: sell the hold's tickets, decided once inside the database.
-- Returns 'completed' (sold now), 'already_completed', or 'unavailable' when the hold had
-- ended and its tickets could not be taken again (the caller refunds). An active hold is
-- completed even if its expires_at has just passed and the reaper has not taken it: the
-- row lock makes the reaper and this function exclude each other, so it is one or the other.
CREATE OR REPLACE FUNCTION complete_reservation(p_reservation_id uuid, p_payment_intent_id text)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    r     reservations;
    fresh reservations;
BEGIN
    SELECT * INTO r FROM reservations WHERE id = p_reservation_id FOR UPDATE;
    IF NOT FOUND THEN
        RETURN 'unknown';
    END IF;
    IF r.status = 'completed' THEN
        RETURN 'already_completed';
    END IF;
    IF r.status = 'active' THEN
        UPDATE inventory_buckets b SET held = b.held - a.quantity, sold = b.sold + a.quantity
        FROM reservation_allocations a
        WHERE a.reservation_id = r.id AND b.event_id = a.event_id AND b.bucket = a.bucket;
    ELSE
        -- the hold ended (expired or cancelled): take the tickets again if any are left
        BEGIN
            SELECT * INTO fresh FROM hold_tickets(r.event_id, r.quantity, r.client_id, 0);
        EXCEPTION WHEN SQLSTATE 'BX409' THEN
            RETURN 'unavailable';
        END;
        -- move the new allocation onto this reservation and sell it
        UPDATE inventory_buckets b SET held = b.held - a.quantity, sold = b.sold + a.quantity
        FROM reservation_allocations a
        WHERE a.reservation_id = fresh.id AND b.event_id = a.event_id AND b.bucket = a.bucket;
        DELETE FROM reservation_allocations WHERE reservation_id = r.id;
        UPDATE reservation_allocations SET reservation_id = r.id WHERE reservation_id = fresh.id;
        DELETE FROM outbox WHERE subject = 'reservations.events.held'
                             AND payload->>'reservation_id' = fresh.id::text;
        DELETE FROM reservations WHERE id = fresh.id;
    END IF;
    UPDATE reservations SET status = 'completed', completed_at = clock_timestamp(),
           released_at = NULL, updated_at = clock_timestamp(),
           payment_intent_id = coalesce(p_payment_intent_id, payment_intent_id)
    WHERE id = r.id;
    INSERT INTO outbox (subject, payload) VALUES ('reservations.events.completed',
        jsonb_build_object('reservation_id', r.id, 'event_id', r.event_id, 'quantity', r.quantity,
                           'payment_intent_id', p_payment_intent_id, 'occurred_at', clock_timestamp()));
    RETURN 'completed';
END $$;
GRANT EXECUTE ON FUNCTION complete_reservation TO boxoffice_webhook;

-- Tickets go back only on the refund or cancel of the payment that holds them: a sold hold
-- whose PaymentIntent this is becomes cancelled and its tickets available; an active hold whose
-- PaymentIntent this is is released. Returns 'returned', 'released', 'not_holder' (the hold is
-- held or sold by another PaymentIntent, or by none), 'not_held' (ended already) or 'unknown'.
CREATE OR REPLACE FUNCTION return_reservation_tickets(
    p_reservation_id uuid, p_payment_intent_id text)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    r reservations;
BEGIN
    SELECT * INTO r FROM reservations WHERE id = p_reservation_id FOR UPDATE;
    IF NOT FOUND THEN
        RETURN 'unknown';
    END IF;
    IF r.status NOT IN ('active', 'completed') THEN
        RETURN 'not_held';
    END IF;
    IF r.payment_intent_id IS DISTINCT FROM p_payment_intent_id THEN
        RETURN 'not_holder';
    END IF;
    IF r.status = 'active' THEN
        PERFORM release_reservation(r.id, 'cancelled');
        RETURN 'released';
    END IF;
    UPDATE inventory_buckets b SET sold = b.sold - a.quantity
    FROM reservation_allocations a
    WHERE a.reservation_id = r.id AND b.event_id = a.event_id AND b.bucket = a.bucket;
    UPDATE reservations SET status = 'cancelled', completed_at = NULL,
           released_at = clock_timestamp(), updated_at = clock_timestamp()
    WHERE id = r.id;
    INSERT INTO outbox (subject, payload) VALUES ('reservations.events.cancelled',
        jsonb_build_object('reservation_id', r.id, 'event_id', r.event_id, 'quantity', r.quantity,
                           'payment_intent_id', p_payment_intent_id, 'reason', 'refunded',
                           'occurred_at', clock_timestamp()));
    RETURN 'returned';
END $$;
GRANT EXECUTE ON FUNCTION return_reservation_tickets TO boxoffice_webhook;

CREATE OR REPLACE FUNCTION get_reservation_stats()
RETURNS TABLE (active_count bigint, expired_count bigint, completed_count bigint,
               cancelled_count bigint, oldest_active_hold timestamptz, next_expiry timestamptz)
LANGUAGE sql STABLE AS $$
    SELECT count(*) FILTER (WHERE status = 'active'),
           count(*) FILTER (WHERE status = 'expired'),
           count(*) FILTER (WHERE status = 'completed'),
           count(*) FILTER (WHERE status = 'cancelled'),
           min(created_at) FILTER (WHERE status = 'active'),
           (SELECT min(expires_at) FROM reservations WHERE status = 'active')
    FROM reservations
$$;
GRANT EXECUTE ON FUNCTION get_reservation_stats TO boxoffice_reaper;
