-- migrate:up

-- Idempotent holds (POST /v1/reservations with an Idempotency-Key): the fingerprint of the
-- request that created the hold, and the exact body answered, replayed byte for byte.
ALTER TABLE reservations
    ADD COLUMN request_fingerprint text,
    ADD COLUMN response_body text;

-- hold_tickets, deadlock-free and with the same signature and meaning; the work is in
-- hold_tickets_in, which the batch entry point below shares.
-- The foundation version could deadlock under load (measured: 7 of 200 concurrent holds on an
-- 8-bucket event): a SKIP LOCKED probe from a random start can keep locks on rows it locked and
-- then skipped (a row that fails the re-check after a concurrent update stays locked), and the
-- waiting passes then queued for lower buckets while holding those. Here a pass that does not
-- take its bucket runs in a subtransaction that is rolled back, which releases whatever it
-- locked, so a hold waits only while holding nothing, or while holding buckets in bucket order.
--  1. one bucket with enough tickets, from a random start, skipping rows others hold (the
--     common case on a hot event: holds spread over the rows instead of queueing on one);
--     with p_fast_only this is the only pass, and a miss returns NULL (the caller, a batch
--     that never waits for a lock, carries on; what the probe locked is released at its commit);
--  2. the first bucket with enough tickets in bucket order, waiting for it;
--  3. every bucket of the event, locked in bucket order; overdue holds of the event are expired
--     (they never count), then the tickets are taken from one bucket or gathered across several.
-- One bucket of the event with at least p_quantity tickets that no other transaction holds,
-- locked; from p_start upwards, then wrapping round (two short index scans, no sort).
CREATE FUNCTION hold_probe(p_event_id uuid, p_quantity integer, p_start integer)
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

CREATE FUNCTION hold_tickets_in(p_event_id uuid, p_quantity integer, p_client_id text,
                                p_ttl_seconds integer, p_customer_ref text,
                                p_idempotency_key text, p_fast_only boolean)
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
                got := hold_probe(p_event_id, p_quantity, start_at);
            ELSE
                SELECT ib.bucket INTO got FROM inventory_buckets ib
                WHERE ib.event_id = p_event_id AND ib.capacity - ib.held - ib.sold >= p_quantity
                ORDER BY ib.bucket LIMIT 1
                FOR NO KEY UPDATE;
            END IF;
            IF got IS NULL THEN
                RAISE EXCEPTION 'no bucket' USING ERRCODE = 'BX001';  -- roll back: unlock
            END IF;
        EXCEPTION WHEN SQLSTATE 'BX001' THEN
            got := NULL;
        END;
    END LOOP;
    IF got IS NULL THEN
        PERFORM 1 FROM inventory_buckets WHERE event_id = p_event_id ORDER BY bucket
        FOR NO KEY UPDATE;
        SELECT coalesce(sum(capacity - held - sold), 0) INTO free_total
        FROM inventory_buckets WHERE event_id = p_event_id;
        IF free_total < p_quantity THEN
            LOOP
                EXIT WHEN expire_due_reservations(1000, p_event_id) < 1000;
            END LOOP;
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
    INSERT INTO reservations (event_id, client_id, customer_ref, quantity, amount, currency,
                              expires_at, idempotency_key)
    VALUES (p_event_id, p_client_id, p_customer_ref, p_quantity, ev.price * p_quantity,
            ev.currency, clock_timestamp() + make_interval(secs => p_ttl_seconds),
            p_idempotency_key)
    RETURNING * INTO r;
    INSERT INTO reservation_allocations (reservation_id, event_id, bucket, quantity)
    SELECT r.id, p_event_id, t.bucket, t.quantity
    FROM unnest(taken, amounts) AS t(bucket, quantity);
    INSERT INTO outbox (subject, payload) VALUES ('reservations.events.held',
        jsonb_build_object('reservation_id', r.id, 'event_id', r.event_id, 'quantity', r.quantity,
                           'expires_at', r.expires_at, 'occurred_at', r.created_at));
    RETURN r;
END $$;

CREATE OR REPLACE FUNCTION hold_tickets(p_event_id uuid, p_quantity integer, p_client_id text,
                                        p_ttl_seconds integer, p_customer_ref text DEFAULT NULL,
                                        p_idempotency_key text DEFAULT NULL)
RETURNS SETOF reservations LANGUAGE sql AS $$
    SELECT * FROM hold_tickets_in(p_event_id, p_quantity, p_client_id, p_ttl_seconds,
                                  p_customer_ref, p_idempotency_key, false)
$$;

-- Many holds of one event in one transaction (the payment service batches concurrent holds:
-- one commit and one round trip for the lot). Each item takes the fast path only, so the batch
-- never waits for a lock (batches cannot deadlock) and needs no subtransactions.
-- Outcomes per item (idx from 0): held; retry (no unlocked
-- bucket had enough, or no such event: the caller runs the full hold_tickets for it); and for
-- keyed items in_use (the key is locked by another transaction), replay or mismatch (the key
-- already made a hold: its fingerprint decides; response_body is the stored answer, NULL when
-- the hold was made earlier in this same batch). A keyed hold gets its fingerprint here; the
-- caller stores its response body in the same transaction.
CREATE FUNCTION hold_tickets_batch(p_event_id uuid, p_ttl_seconds integer,
                                   p_quantities integer[], p_client_ids text[],
                                   p_customer_refs text[], p_keys text[], p_fingerprints text[])
RETURNS TABLE (idx integer, outcome text, id uuid, expires_at timestamptz,
               created_at timestamptz, amount bigint, currency text, response_body text)
LANGUAGE plpgsql AS $$
DECLARE
    r     reservations;
    prior record;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM ticketed_events e WHERE e.id = p_event_id) THEN
        RETURN QUERY SELECT g.i - 1, 'retry', NULL::uuid, NULL::timestamptz,
                            NULL::timestamptz, NULL::bigint, NULL::text, NULL::text
                     FROM generate_series(1, coalesce(array_length(p_quantities, 1), 0)) g(i);
        RETURN;
    END IF;
    FOR i IN 1..coalesce(array_length(p_quantities, 1), 0) LOOP
        idx := i - 1;
        id := NULL; expires_at := NULL; created_at := NULL; amount := NULL; currency := NULL;
        response_body := NULL;
        IF p_keys[i] IS NOT NULL THEN
            IF NOT pg_try_advisory_xact_lock(
                    hashtextextended('hold:' || p_client_ids[i] || ':' || p_keys[i], 3)) THEN
                outcome := 'in_use';
                RETURN NEXT;
                CONTINUE;
            END IF;
            SELECT x.request_fingerprint, x.response_body AS body INTO prior FROM reservations x
            WHERE x.client_id = p_client_ids[i] AND x.idempotency_key = p_keys[i];
            IF FOUND THEN
                outcome := CASE WHEN prior.request_fingerprint = p_fingerprints[i]
                                THEN 'replay' ELSE 'mismatch' END;
                response_body := prior.body;
                RETURN NEXT;
                CONTINUE;
            END IF;
        END IF;
        r := hold_tickets_in(p_event_id, p_quantities[i], p_client_ids[i], p_ttl_seconds,
                             p_customer_refs[i], p_keys[i], true);
        IF r.id IS NULL THEN
            outcome := 'retry';
        ELSE
            IF p_keys[i] IS NOT NULL THEN
                UPDATE reservations x SET request_fingerprint = p_fingerprints[i]
                WHERE x.id = r.id;
            END IF;
            outcome := 'held';
            id := r.id; expires_at := r.expires_at; created_at := r.created_at;
            amount := r.amount; currency := r.currency;
        END IF;
        RETURN NEXT;
    END LOOP;
END $$;

-- POST /v1/payment_intents, phase 1 ("claim"), in one round trip. Outcomes:
--   replay     the key is finished: its stored status and body
--   mismatch   the key was used with another request (fingerprint)
--   in_use     a live worker holds the key's lease (retry_after seconds left)
--   not_found  no such reservation for this client;  not_active  (detail = its status)
--   exists     the reservation has a live PaymentIntent under another key
--   claimed    a new key, leased to the caller;  resumed  an abandoned key, leased to the caller
-- A finished key is immutable, so replays read it without taking any lock. Everything else
-- locks the reservation row first (claims on one reservation take turns; the same lock order
-- as record_payment_intent). A rejected request writes nothing. The claim commits without
-- waiting for its WAL flush: if PostgreSQL crashed and lost it, the retry claims again and
-- Stripe, asked with the same derived key, returns the same PaymentIntent.
CREATE FUNCTION claim_payment_intent(p_client_id text, p_key text, p_fingerprint text,
                                     p_reservation_id uuid, p_stripe_key text, p_path text,
                                     p_lease_seconds double precision)
RETURNS TABLE (outcome text, log_id bigint, stripe_key text, amount bigint, currency text,
               response_status integer, response_body text, retry_after double precision,
               detail text)
LANGUAGE plpgsql AS $$
DECLARE
    k    payment_intents_log;
    res  reservations;
    left_s double precision;
BEGIN
    SELECT * INTO k FROM payment_intents_log l
    WHERE l.client_id = p_client_id AND l.idempotency_key = p_key;
    IF FOUND THEN
        IF k.request_fingerprint <> p_fingerprint THEN
            RETURN QUERY SELECT 'mismatch', k.id, NULL, NULL::bigint, NULL, NULL::integer, NULL,
                                NULL::double precision, NULL;
            RETURN;
        END IF;
        IF k.recovery_point = 'finished' THEN
            RETURN QUERY SELECT 'replay', k.id, NULL, k.amount, k.currency, k.response_status,
                                k.response_body, NULL::double precision, NULL;
            RETURN;
        END IF;
    END IF;
    PERFORM set_config('synchronous_commit', 'off', true);
    SELECT * INTO res FROM reservations r WHERE r.id = p_reservation_id FOR NO KEY UPDATE;
    IF NOT FOUND OR res.client_id <> p_client_id THEN
        RETURN QUERY SELECT 'not_found', NULL::bigint, NULL, NULL::bigint, NULL, NULL::integer,
                            NULL, NULL::double precision, NULL;
        RETURN;
    END IF;
    SELECT * INTO k FROM payment_intents_log l
    WHERE l.client_id = p_client_id AND l.idempotency_key = p_key FOR UPDATE;
    IF FOUND THEN
        IF k.request_fingerprint <> p_fingerprint THEN
            RETURN QUERY SELECT 'mismatch', k.id, NULL, NULL::bigint, NULL, NULL::integer, NULL,
                                NULL::double precision, NULL;
        ELSIF k.recovery_point = 'finished' THEN
            RETURN QUERY SELECT 'replay', k.id, NULL, k.amount, k.currency, k.response_status,
                                k.response_body, NULL::double precision, NULL;
        ELSE
            left_s := extract(epoch FROM k.locked_at - clock_timestamp()) + p_lease_seconds;
            IF left_s > 0 THEN
                RETURN QUERY SELECT 'in_use', k.id, NULL, NULL::bigint, NULL, NULL::integer,
                                    NULL, left_s, NULL;
            ELSE
                -- the last attempt crashed or failed transiently: take it over, same amount
                UPDATE payment_intents_log SET locked_at = clock_timestamp(),
                       attempts = attempts + 1, updated_at = clock_timestamp()
                WHERE id = k.id;
                RETURN QUERY SELECT 'resumed', k.id, k.stripe_idempotency_key, k.amount,
                                    k.currency, NULL::integer, NULL, NULL::double precision, NULL;
            END IF;
        END IF;
        RETURN;
    END IF;
    IF res.status <> 'active' OR res.expires_at <= clock_timestamp() THEN
        RETURN QUERY SELECT 'not_active', NULL::bigint, NULL, NULL::bigint, NULL,
                            NULL::integer, NULL, NULL::double precision,
                            CASE WHEN res.status = 'active' THEN 'expired' ELSE res.status END;
        RETURN;
    END IF;
    IF EXISTS (SELECT 1 FROM payment_intents_log l WHERE l.reservation_id = p_reservation_id
               AND (l.recovery_point <> 'finished' OR l.response_status BETWEEN 200 AND 299)) THEN
        RETURN QUERY SELECT 'exists', NULL::bigint, NULL, NULL::bigint, NULL, NULL::integer,
                            NULL, NULL::double precision, NULL;
        RETURN;
    END IF;
    INSERT INTO payment_intents_log AS l (client_id, idempotency_key, request_path,
        request_fingerprint, reservation_id, stripe_idempotency_key, amount, currency,
        locked_at, attempts)
    VALUES (p_client_id, p_key, p_path, p_fingerprint, p_reservation_id, p_stripe_key,
            res.amount, res.currency, clock_timestamp(), 1)
    ON CONFLICT ON CONSTRAINT payment_intents_log_key DO NOTHING
    RETURNING * INTO k;
    IF NOT FOUND THEN  -- the same key, sent for another reservation at the same moment
        RETURN QUERY SELECT 'in_use', NULL::bigint, NULL, NULL::bigint, NULL, NULL::integer,
                            NULL, 1::double precision, NULL;
        RETURN;
    END IF;
    RETURN QUERY SELECT 'claimed', k.id, k.stripe_idempotency_key, k.amount, k.currency,
                        NULL::integer, NULL, NULL::double precision, NULL;
END $$;

-- Phase 3 ("record"): Stripe's answer and all its local effects in one transaction, once per
-- key. With a PaymentIntent: a 'created' payments row, the reservation's payment_intent_id and
-- the payments.events.created outbox row (p_event). If another worker finished the key first,
-- nothing is written and its stored answer is returned (replayed = true).
CREATE FUNCTION record_payment_intent(p_log_id bigint, p_status integer, p_body text,
                                      p_payment_intent_id text, p_event jsonb)
RETURNS TABLE (replayed boolean, response_status integer, response_body text)
LANGUAGE plpgsql AS $$
DECLARE
    k payment_intents_log;
BEGIN
    SELECT * INTO k FROM payment_intents_log l WHERE l.id = p_log_id;
    PERFORM 1 FROM reservations r WHERE r.id = k.reservation_id FOR NO KEY UPDATE;
    UPDATE payment_intents_log l
    SET recovery_point = 'finished', locked_at = NULL, response_status = p_status,
        response_body = p_body, stripe_payment_intent_id = p_payment_intent_id,
        last_error = NULL, updated_at = clock_timestamp()
    WHERE l.id = p_log_id AND l.recovery_point <> 'finished';
    IF NOT FOUND THEN
        RETURN QUERY SELECT true, l.response_status, l.response_body
                     FROM payment_intents_log l WHERE l.id = p_log_id;
        RETURN;
    END IF;
    IF p_payment_intent_id IS NOT NULL THEN
        INSERT INTO payments (payment_intent_id, reservation_id, amount, currency, status)
        VALUES (p_payment_intent_id, k.reservation_id, k.amount, k.currency, 'created')
        ON CONFLICT (payment_intent_id) DO NOTHING;
        UPDATE reservations r SET payment_intent_id = p_payment_intent_id,
               updated_at = clock_timestamp()
        WHERE r.id = k.reservation_id AND r.status <> 'completed';
        INSERT INTO outbox (subject, payload) VALUES ('payments.events.created', p_event);
    END IF;
    RETURN QUERY SELECT false, p_status, p_body;
END $$;

-- migrate:down

DROP FUNCTION hold_tickets_batch(uuid, integer, integer[], text[], text[], text[], text[]);

DROP FUNCTION record_payment_intent(bigint, integer, text, text, jsonb);
DROP FUNCTION claim_payment_intent(text, text, text, uuid, text, text, double precision);

-- the foundation's hold_tickets, as it was
CREATE OR REPLACE FUNCTION hold_tickets(p_event_id uuid, p_quantity integer, p_client_id text,
                             p_ttl_seconds integer, p_customer_ref text DEFAULT NULL,
                             p_idempotency_key text DEFAULT NULL)
RETURNS SETOF reservations LANGUAGE plpgsql AS $$
DECLARE
    ev         ticketed_events;
    r          reservations;
    nb         integer;
    start_at   integer;
    got        integer;
    need       integer;
    take       integer;
    b          record;
    taken      integer[] := '{}';
    amounts    integer[] := '{}';
BEGIN
    SELECT * INTO ev FROM ticketed_events WHERE id = p_event_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'event_not_found' USING ERRCODE = 'BX404';
    END IF;
    nb := ev.buckets;
    start_at := floor(random() * nb)::integer;
    FOR attempt IN 1..3 LOOP
        -- one bucket with enough tickets; attempt 1 skips locked rows, later ones wait
        IF attempt = 1 THEN
            SELECT ib.bucket INTO got FROM inventory_buckets ib
            WHERE ib.event_id = p_event_id AND ib.capacity - ib.held - ib.sold >= p_quantity
            ORDER BY (ib.bucket - start_at + nb) % nb LIMIT 1 FOR UPDATE SKIP LOCKED;
        ELSE
            SELECT ib.bucket INTO got FROM inventory_buckets ib
            WHERE ib.event_id = p_event_id AND ib.capacity - ib.held - ib.sold >= p_quantity
            ORDER BY ib.bucket LIMIT 1 FOR UPDATE;
        END IF;
        IF got IS NOT NULL THEN
            UPDATE inventory_buckets SET held = held + p_quantity
            WHERE event_id = p_event_id AND bucket = got;
            taken := ARRAY[got];
            amounts := ARRAY[p_quantity];
            EXIT;
        END IF;
        IF attempt = 2 THEN
            -- overdue holds never count: release this event's before saying sold out
            PERFORM expire_due_reservations(1000, p_event_id);
        END IF;
        IF attempt = 3 THEN
            -- gather across buckets, locking them in order
            need := p_quantity;
            FOR b IN SELECT ib.bucket, ib.capacity - ib.held - ib.sold AS free
                     FROM inventory_buckets ib WHERE ib.event_id = p_event_id
                     ORDER BY ib.bucket FOR UPDATE LOOP
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
            FOR i IN 1..array_length(taken, 1) LOOP
                UPDATE inventory_buckets SET held = held + amounts[i]
                WHERE event_id = p_event_id AND bucket = taken[i];
            END LOOP;
        END IF;
    END LOOP;
    INSERT INTO reservations (event_id, client_id, customer_ref, quantity, amount, currency,
                              expires_at, idempotency_key)
    VALUES (p_event_id, p_client_id, p_customer_ref, p_quantity, ev.price * p_quantity,
            ev.currency, clock_timestamp() + make_interval(secs => p_ttl_seconds),
            p_idempotency_key)
    RETURNING * INTO r;
    INSERT INTO reservation_allocations (reservation_id, event_id, bucket, quantity)
    SELECT r.id, p_event_id, t.bucket, t.quantity
    FROM unnest(taken, amounts) AS t(bucket, quantity);
    INSERT INTO outbox (subject, payload) VALUES ('reservations.events.held',
        jsonb_build_object('reservation_id', r.id, 'event_id', r.event_id, 'quantity', r.quantity,
                           'expires_at', r.expires_at, 'occurred_at', r.created_at));
    RETURN NEXT r;
END $$;

DROP FUNCTION hold_tickets_in(uuid, integer, text, integer, text, text, boolean);
DROP FUNCTION hold_probe(uuid, integer, integer);

ALTER TABLE reservations
    DROP COLUMN response_body,
    DROP COLUMN request_fingerprint;
