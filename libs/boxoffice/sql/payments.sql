-- PaymentIntents: the idempotency-key claim of POST /v1/payment_intents and its record,
-- and payments as Stripe reports them (a state machine that never moves back).
--
-- The current body of each function; applied after the migrations on every `boxoffice migrate`
-- (idempotent). Grants beside the function: each service role gets EXECUTE on what it calls.

-- POST /v1/payment_intents, phase 1 ("claim"), in one round trip. Outcomes:
--   replay     the key is finished: its stored status and body
--   mismatch   the key was used with another request (fingerprint)
--   in_use     a live worker holds the key's lease (retry_after seconds left)
--   not_found  no such reservation for this client;  not_active  (detail = its status)
--   exists     the reservation's PaymentIntent belongs to another key
--   claimed    a new key, leased to the caller;  resumed  an abandoned key, leased to the caller
-- A finished key is immutable, so replays read it without taking any lock. Everything else
-- locks the reservation row first (claims on one reservation take turns; the same lock order
-- as record_payment_intent). A rejected request writes nothing. The claim is durable when this
-- returns (ordinary synchronous commit): Stripe is called only after it, so no PaymentIntent is
-- ever created for a claim a crash could erase. The lease carries a token: only its holder
-- renews or releases it.
-- One live PaymentIntent per hold: reservations.payment_idempotency_key names the one key that
-- may create it, set by the claim that first gets the hold and cleared only when that key ends
-- without a PaymentIntent (a definitive refusal by Stripe). It lives on the reservation, which
-- retention never deletes, not on payment_intents_log, which it does.
CREATE OR REPLACE FUNCTION claim_payment_intent(
    p_client_id text, p_key text, p_fingerprint text, p_reservation_id uuid, p_stripe_key text,
    p_path text, p_lease_seconds double precision)
RETURNS TABLE (outcome text, log_id bigint, stripe_key text, amount bigint, currency text,
               response_status integer, response_body text, retry_after double precision,
               detail text, lease_token uuid)
LANGUAGE plpgsql AS $$
DECLARE
    k      payment_intents_log;
    res    reservations;
    left_s double precision;
    token  uuid := gen_random_uuid();
BEGIN
    SELECT * INTO k FROM payment_intents_log l
    WHERE l.client_id = p_client_id AND l.idempotency_key = p_key;
    IF FOUND THEN
        IF k.request_fingerprint <> p_fingerprint THEN
            RETURN QUERY SELECT 'mismatch', k.id, NULL, NULL::bigint, NULL, NULL::integer, NULL,
                                NULL::double precision, NULL, NULL::uuid;
            RETURN;
        END IF;
        IF k.recovery_point = 'finished' THEN
            RETURN QUERY SELECT 'replay', k.id, NULL, k.amount, k.currency, k.response_status,
                                k.response_body, NULL::double precision, NULL, NULL::uuid;
            RETURN;
        END IF;
    END IF;
    SELECT * INTO res FROM reservations r WHERE r.id = p_reservation_id FOR NO KEY UPDATE;
    IF NOT FOUND OR res.client_id <> p_client_id THEN
        RETURN QUERY SELECT 'not_found', NULL::bigint, NULL, NULL::bigint, NULL, NULL::integer,
                            NULL, NULL::double precision, NULL, NULL::uuid;
        RETURN;
    END IF;
    SELECT * INTO k FROM payment_intents_log l
    WHERE l.client_id = p_client_id AND l.idempotency_key = p_key FOR UPDATE;
    IF FOUND THEN
        IF k.request_fingerprint <> p_fingerprint THEN
            RETURN QUERY SELECT 'mismatch', k.id, NULL, NULL::bigint, NULL, NULL::integer, NULL,
                                NULL::double precision, NULL, NULL::uuid;
        ELSIF k.recovery_point = 'finished' THEN
            RETURN QUERY SELECT 'replay', k.id, NULL, k.amount, k.currency, k.response_status,
                                k.response_body, NULL::double precision, NULL, NULL::uuid;
        ELSE
            left_s := extract(epoch FROM k.locked_at - clock_timestamp()) + p_lease_seconds;
            IF left_s > 0 THEN
                RETURN QUERY SELECT 'in_use', k.id, NULL, NULL::bigint, NULL, NULL::integer,
                                    NULL, left_s, NULL, NULL::uuid;
            ELSE
                -- the last attempt crashed or failed transiently: take it over, same amount
                UPDATE payment_intents_log SET locked_at = clock_timestamp(), lease_token = token,
                       attempts = attempts + 1, updated_at = clock_timestamp()
                WHERE id = k.id;
                RETURN QUERY SELECT 'resumed', k.id, k.stripe_idempotency_key, k.amount,
                                    k.currency, NULL::integer, NULL, NULL::double precision, NULL,
                                    token;
            END IF;
        END IF;
        RETURN;
    END IF;
    IF res.status <> 'active' OR res.expires_at <= clock_timestamp() THEN
        RETURN QUERY SELECT 'not_active', NULL::bigint, NULL, NULL::bigint, NULL,
                            NULL::integer, NULL, NULL::double precision,
                            CASE WHEN res.status = 'active' THEN 'expired' ELSE res.status END,
                            NULL::uuid;
        RETURN;
    END IF;
    IF res.payment_idempotency_key IS NOT NULL AND res.payment_idempotency_key <> p_key THEN
        RETURN QUERY SELECT 'exists', NULL::bigint, NULL, NULL::bigint, NULL, NULL::integer,
                            NULL, NULL::double precision, NULL, NULL::uuid;
        RETURN;
    END IF;
    INSERT INTO payment_intents_log AS l (client_id, idempotency_key, request_path,
        request_fingerprint, reservation_id, stripe_idempotency_key, amount, currency,
        locked_at, lease_token, attempts)
    VALUES (p_client_id, p_key, p_path, p_fingerprint, p_reservation_id, p_stripe_key,
            res.amount, res.currency, clock_timestamp(), token, 1)
    ON CONFLICT ON CONSTRAINT payment_intents_log_key DO NOTHING
    RETURNING * INTO k;
    IF NOT FOUND THEN  -- the same key, sent for another reservation at the same moment
        RETURN QUERY SELECT 'in_use', NULL::bigint, NULL, NULL::bigint, NULL, NULL::integer,
                            NULL, 1::double precision, NULL, NULL::uuid;
        RETURN;
    END IF;
    UPDATE reservations r SET payment_idempotency_key = p_key WHERE r.id = res.id;
    RETURN QUERY SELECT 'claimed', k.id, k.stripe_idempotency_key, k.amount, k.currency,
                        NULL::integer, NULL, NULL::double precision, NULL, token;
END $$;
GRANT EXECUTE ON FUNCTION claim_payment_intent TO boxoffice_payment;

-- Phase 3 ("record"): Stripe's answer and all its local effects in one transaction, once per
-- key, and only on the row that was claimed: the row of p_log_id must still be this client's
-- key with this Stripe key, or the claim was lost (outcome 'lost': nothing is written, the
-- caller answers 503 and the client's retry claims again; Stripe replays the same PaymentIntent
-- for the same Stripe key, and reconciliation finds it if the client never comes back).
-- Outcomes: 'recorded'; 'replayed' (another worker finished the key first: its stored answer);
-- 'lost'. With a PaymentIntent: a 'created' payments row, the reservation's payment_intent_id
-- and the payments.events.created outbox row (p_event); if the hold ended while Stripe was being
-- called, the PaymentIntent's cancel is decided at once. A definitive refusal frees the hold for
-- another key.
-- The outbox row is written quiet (boxoffice.outbox_quiet, no NOTIFY): a notifying commit takes
-- PostgreSQL's global notify lock through its WAL flush, so records (and every other notifying
-- writer) would queue behind each other's fsync, and each NOTIFY wakes every replica's relay for
-- one row. The caller wakes its own process's relay after the commit instead; the other relays'
-- sweep publishes the row if that process dies first. The commit itself stays synchronous: the
-- client acts on this answer (it confirms the PaymentIntent with its client secret), so the
-- record must not be lost once answered (see intents.py).
CREATE OR REPLACE FUNCTION record_payment_intent(
    p_log_id bigint, p_client_id text, p_key text, p_stripe_key text, p_status integer, p_body text,
    p_payment_intent_id text, p_event jsonb)
RETURNS TABLE (outcome text, response_status integer, response_body text)
LANGUAGE plpgsql AS $$
DECLARE
    k   payment_intents_log;
    res reservations;
BEGIN
    SELECT * INTO k FROM payment_intents_log l WHERE l.id = p_log_id;
    IF NOT FOUND OR k.client_id <> p_client_id OR k.idempotency_key <> p_key
       OR k.stripe_idempotency_key <> p_stripe_key THEN
        RETURN QUERY SELECT 'lost', NULL::integer, NULL::text;
        RETURN;
    END IF;
    SELECT * INTO res FROM reservations r WHERE r.id = k.reservation_id FOR NO KEY UPDATE;
    UPDATE payment_intents_log l
    SET recovery_point = 'finished', locked_at = NULL, lease_token = NULL,
        response_status = p_status, response_body = p_body,
        stripe_payment_intent_id = p_payment_intent_id, last_error = NULL,
        updated_at = clock_timestamp()
    WHERE l.id = p_log_id AND l.recovery_point <> 'finished';
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'replayed', l.response_status, l.response_body
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
        PERFORM set_config('boxoffice.outbox_quiet', 'on', true);
        INSERT INTO outbox (subject, payload) VALUES ('payments.events.created', p_event);
        IF res.status IS DISTINCT FROM 'active' THEN
            PERFORM request_stripe_action('cancel', p_payment_intent_id, k.reservation_id,
                                          'hold_' || coalesce(res.status, 'gone'), k.amount);
        END IF;
    ELSE
        UPDATE reservations r SET payment_idempotency_key = NULL
        WHERE r.id = k.reservation_id AND r.payment_idempotency_key = p_key;
    END IF;
    RETURN QUERY SELECT 'recorded', p_status, p_body;
END $$;
GRANT EXECUTE ON FUNCTION record_payment_intent TO boxoffice_payment;

-- The order of a payment's states: a Stripe event moves a payment only forward. States of one
-- rank (processing and failed: a buyer may retry) are ordered by the event's `created` instead.
CREATE OR REPLACE FUNCTION payment_status_rank(p_status text) RETURNS integer
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT CASE p_status
        WHEN 'created' THEN 0
        WHEN 'processing' THEN 1
        WHEN 'failed' THEN 1
        WHEN 'canceled' THEN 2
        WHEN 'succeeded' THEN 3
        WHEN 'refunded' THEN 4
        WHEN 'disputed' THEN 5
    END
$$;
GRANT EXECUTE ON FUNCTION payment_status_rank TO boxoffice_webhook;

-- Move a payment to p_status if that is forward (creating its row if the event came before the
-- checkout wrote it). Returns one row: whether it moved, the state before, and the payment's
-- reservation. The row stays locked for the caller's transaction, so two events of one payment
-- are applied one after the other, whatever order they arrive in.
CREATE OR REPLACE FUNCTION advance_payment(
    p_payment_intent_id text, p_reservation_id uuid, p_amount bigint, p_currency text,
    p_status text, p_event_created timestamptz, OUT moved boolean, OUT previous text,
    OUT reservation_id uuid, OUT amount bigint, OUT currency text)
LANGUAGE plpgsql AS $$
DECLARE
    cur payments;
BEGIN
    IF p_reservation_id IS NOT NULL
       AND NOT EXISTS (SELECT 1 FROM reservations r WHERE r.id = p_reservation_id) THEN
        p_reservation_id := NULL;  -- metadata naming no reservation of ours
    END IF;
    LOOP
        SELECT * INTO cur FROM payments p WHERE p.payment_intent_id = p_payment_intent_id FOR UPDATE;
        EXIT WHEN FOUND;
        INSERT INTO payments (payment_intent_id, reservation_id, amount, currency, status,
                              status_event_created)
        VALUES (p_payment_intent_id, p_reservation_id, coalesce(p_amount, 0),
                lower(coalesce(p_currency, '')), p_status, p_event_created)
        ON CONFLICT ON CONSTRAINT payments_pkey DO NOTHING;
        IF FOUND THEN
            moved := true;
            reservation_id := p_reservation_id;
            amount := coalesce(p_amount, 0);
            currency := lower(coalesce(p_currency, ''));
            RETURN;
        END IF;
        -- written concurrently (the checkout, or another event): lock it and decide on it
    END LOOP;
    IF payment_status_rank(p_status) > payment_status_rank(cur.status)
       OR (payment_status_rank(p_status) = payment_status_rank(cur.status)
           AND p_status <> cur.status
           AND p_event_created > coalesce(cur.status_event_created, '-infinity'::timestamptz)) THEN
        UPDATE payments p
        SET status = p_status, status_event_created = p_event_created, updated_at = clock_timestamp(),
            reservation_id = coalesce(p.reservation_id, p_reservation_id)
        WHERE p.payment_intent_id = p_payment_intent_id;
        moved := true;
        reservation_id := coalesce(cur.reservation_id, p_reservation_id);
    ELSE
        moved := false;
        reservation_id := cur.reservation_id;
    END IF;
    previous := cur.status;
    amount := cur.amount;
    currency := cur.currency;
END $$;
GRANT EXECUTE ON FUNCTION advance_payment TO boxoffice_webhook;

-- A payment event on the outbox (payments.events.<kind>), in the caller's transaction.
CREATE OR REPLACE FUNCTION emit_payment_event(
    p_kind text, p_payment_intent_id text, p_reservation_id uuid, p_amount bigint, p_currency text,
    p_occurred_at timestamptz, p_reason text DEFAULT NULL)
RETURNS void LANGUAGE sql AS $$
    INSERT INTO outbox (subject, payload) VALUES ('payments.events.' || p_kind,
        jsonb_build_object('payment_intent_id', p_payment_intent_id,
                           'reservation_id', p_reservation_id, 'amount', p_amount,
                           'currency', p_currency, 'occurred_at', p_occurred_at,
                           'reason', p_reason))
$$;
GRANT EXECUTE ON FUNCTION emit_payment_event TO boxoffice_webhook;
