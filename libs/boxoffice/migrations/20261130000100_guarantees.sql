-- migrate:up

-- Guarantees under combined faults.
--
-- 1. Every Stripe side effect (a refund, a cancel) is decided durably, in the transaction that
--    decides it, before it is made: a row in stripe_actions with what, why and the idempotency
--    key. A worker then performs it and confirms it; a crash anywhere resumes from the row.
-- 2. Tickets go back only on the refund or cancel of the payment that holds them
--    (reservations.payment_intent_id), never on those of another PaymentIntent naming the hold.
-- 3. A PaymentIntent claim is durable before Stripe is called, leased with a token of its own,
--    and recorded only against the very row that was claimed.
-- 4. One live PaymentIntent per hold rests on the reservation row itself (never purged):
--    reservations.payment_idempotency_key names the one key that may create it.

CREATE TABLE stripe_actions (
    id                 bigserial PRIMARY KEY,
    kind               text NOT NULL CHECK (kind IN ('refund', 'cancel')),
    payment_intent_id  text NOT NULL,
    reservation_id     uuid,
    amount             bigint,
    reason             text NOT NULL,
    idempotency_key    text NOT NULL UNIQUE,
    status             text NOT NULL DEFAULT 'pending'
                       CHECK (status IN ('pending', 'done', 'moot', 'failed')),
    attempts           integer NOT NULL DEFAULT 0,
    next_attempt_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
    result_id          text,
    detail             text,
    last_error         text,
    created_at         timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at         timestamptz NOT NULL DEFAULT clock_timestamp(),
    done_at            timestamptz,
    CONSTRAINT stripe_actions_once UNIQUE (kind, payment_intent_id),
    CONSTRAINT stripe_actions_done_at CHECK ((status = 'pending') = (done_at IS NULL))
);
CREATE INDEX stripe_actions_due ON stripe_actions (next_attempt_at) WHERE status = 'pending';

CREATE FUNCTION stripe_actions_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('boxoffice_stripe_actions', '');
    RETURN NULL;
END $$;
CREATE TRIGGER stripe_actions_notify AFTER INSERT ON stripe_actions
    FOR EACH STATEMENT EXECUTE FUNCTION stripe_actions_notify();

ALTER TABLE payment_intents_log ADD COLUMN lease_token uuid;
ALTER TABLE reservations ADD COLUMN payment_idempotency_key text;
-- retention forgets holds' idempotency keys after IDEMPOTENCY_KEY_TTL_HOURS, oldest first
CREATE INDEX reservations_keyed_created ON reservations (created_at)
    WHERE idempotency_key IS NOT NULL;
-- existing holds: the key of their live (or in-progress) PaymentIntent, if any
UPDATE reservations r SET payment_idempotency_key = l.idempotency_key
FROM payment_intents_log l
WHERE l.reservation_id = r.id
  AND (l.recovery_point <> 'finished' OR l.response_status BETWEEN 200 AND 299);

-- Decide a Stripe side effect: once per kind and PaymentIntent, whoever asks and however often.
-- Returns the action's id (the existing one when it was decided before).
CREATE FUNCTION request_stripe_action(p_kind text, p_payment_intent_id text,
                                      p_reservation_id uuid, p_reason text, p_amount bigint)
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    got bigint;
BEGIN
    INSERT INTO stripe_actions (kind, payment_intent_id, reservation_id, reason, amount,
                                idempotency_key)
    VALUES (p_kind, p_payment_intent_id, p_reservation_id, p_reason, p_amount,
            p_kind || '-' || p_payment_intent_id)
    ON CONFLICT ON CONSTRAINT stripe_actions_once DO NOTHING
    RETURNING id INTO got;
    IF got IS NULL THEN
        SELECT a.id INTO got FROM stripe_actions a
        WHERE a.kind = p_kind AND a.payment_intent_id = p_payment_intent_id;
    END IF;
    RETURN got;
END $$;

-- Lease up to p_limit due actions to the caller for p_lease_seconds: each attempt is counted
-- before it is made, and an action whose worker died is due again when its lease lapses.
CREATE FUNCTION claim_stripe_actions(p_limit integer, p_lease_seconds double precision)
RETURNS SETOF stripe_actions LANGUAGE sql AS $$
    UPDATE stripe_actions a
    SET attempts = a.attempts + 1, updated_at = clock_timestamp(),
        next_attempt_at = clock_timestamp() + make_interval(secs => p_lease_seconds)
    WHERE a.id IN (SELECT d.id FROM stripe_actions d
                   WHERE d.status = 'pending' AND d.next_attempt_at <= clock_timestamp()
                   ORDER BY d.next_attempt_at LIMIT p_limit FOR UPDATE SKIP LOCKED)
    RETURNING a.*
$$;

-- Confirm an attempt at an action. p_outcome:
--   done   Stripe made it (p_result_id: the refund's or PaymentIntent's id): a refund moves the
--          payment to refunded (payments.events.refunded, with the reason it was decided for),
--          a cancel to canceled (payments.events.failed, reason canceled)
--   moot   nothing to do (p_detail: why, e.g. the PaymentIntent already succeeded: its
--          succeeded event sells or refunds it)
--   failed Stripe refused for good (p_detail): an operator must look
--   retry  a transient failure (p_detail): due again in p_retry_seconds
-- Returns the action's status after (NULL if there is no such pending action: done already).
CREATE FUNCTION finish_stripe_action(p_id bigint, p_outcome text, p_result_id text,
                                     p_detail text, p_retry_seconds double precision DEFAULT 0)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    act stripe_actions;
    pay record;
BEGIN
    SELECT * INTO act FROM stripe_actions WHERE id = p_id FOR UPDATE;
    IF NOT FOUND OR act.status <> 'pending' THEN
        RETURN NULL;
    END IF;
    IF p_outcome = 'retry' THEN
        UPDATE stripe_actions SET last_error = left(p_detail, 2000), updated_at = clock_timestamp(),
               next_attempt_at = clock_timestamp() + make_interval(secs => p_retry_seconds)
        WHERE id = p_id;
        RETURN 'pending';
    END IF;
    IF p_outcome NOT IN ('done', 'moot', 'failed') THEN
        RAISE EXCEPTION 'unknown outcome %', p_outcome USING ERRCODE = '22023';
    END IF;
    UPDATE stripe_actions SET status = p_outcome, result_id = p_result_id, detail = p_detail,
           last_error = CASE WHEN p_outcome = 'failed' THEN left(p_detail, 2000) END,
           done_at = clock_timestamp(), updated_at = clock_timestamp()
    WHERE id = p_id;
    IF p_outcome = 'done' THEN
        SELECT * INTO pay FROM advance_payment(act.payment_intent_id, act.reservation_id,
            act.amount, NULL, CASE act.kind WHEN 'refund' THEN 'refunded' ELSE 'canceled' END,
            clock_timestamp());
        IF act.kind = 'refund' THEN
            UPDATE payments p SET refund_id = coalesce(p.refund_id, p_result_id),
                   refund_reason = act.reason
            WHERE p.payment_intent_id = act.payment_intent_id;
        END IF;
        IF pay.moved THEN
            PERFORM emit_payment_event(CASE act.kind WHEN 'refund' THEN 'refunded' ELSE 'failed' END,
                                       act.payment_intent_id, pay.reservation_id, pay.amount,
                                       pay.currency, clock_timestamp(),
                                       CASE act.kind WHEN 'refund' THEN act.reason ELSE 'canceled' END);
            IF pay.reservation_id IS NOT NULL THEN
                PERFORM return_reservation_tickets(pay.reservation_id, act.payment_intent_id);
            END IF;
        END IF;
    END IF;
    RETURN p_outcome;
END $$;

-- A hold that ends (expires, is cancelled, or is sold through another PaymentIntent) has its
-- other live PaymentIntents cancelled at Stripe, so a late payment becomes impossible in the
-- common case (the refund stays the fallback for the race). One trigger, so every path that
-- ends a hold (reaper, cancel, Stripe events, SQL by hand) does it.
CREATE FUNCTION reservation_ended_cancel_intents() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM request_stripe_action('cancel', live.payment_intent_id, NEW.id,
                                  'hold_' || NEW.status, live.amount)
    FROM (SELECT p.payment_intent_id, p.amount FROM payments p
          WHERE p.reservation_id = NEW.id AND p.status IN ('created', 'failed')
          UNION
          SELECT NEW.payment_intent_id, NEW.amount
          WHERE NEW.payment_intent_id IS NOT NULL
            AND NOT EXISTS (SELECT 1 FROM payments p
                            WHERE p.payment_intent_id = NEW.payment_intent_id)) live
    WHERE NEW.status <> 'completed' OR live.payment_intent_id <> NEW.payment_intent_id;
    RETURN NULL;
END $$;
CREATE TRIGGER reservation_ended_cancel_intents AFTER UPDATE OF status ON reservations
    FOR EACH ROW
    WHEN (OLD.status = 'active' AND NEW.status <> 'active'
          AND (NEW.payment_intent_id IS NOT NULL OR NEW.payment_idempotency_key IS NOT NULL))
    EXECUTE FUNCTION reservation_ended_cancel_intents();

-- Tickets go back only on the refund or cancel of the payment that holds them: a sold hold
-- whose PaymentIntent this is becomes cancelled and its tickets available; an active hold whose
-- PaymentIntent this is is released. Returns 'returned', 'released', 'not_holder' (the hold is
-- held or sold by another PaymentIntent, or by none), 'not_held' (ended already) or 'unknown'.
CREATE OR REPLACE FUNCTION return_reservation_tickets(p_reservation_id uuid,
                                                      p_payment_intent_id text)
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

-- Apply one Stripe event, exactly once, in one transaction (one round trip: the caller runs it
-- as a statement of its own). The caller has read the event's object into the typed arguments.
--
-- 1. Claim: insert the event's row already marked done, or lock the row of an event seen before
--    and not yet done. A row already done means the effects were committed: 'duplicate'. A
--    concurrent delivery of the same event waits on the row, then finds it done.
-- 2. Effects, only when the event moves its payment forward (advance_payment); else 'stale'.
--
-- Money that must go back (the buyer paid for tickets that are gone, or paid twice for one hold)
-- is decided here, durably, as a 'refund' stripe_action in this same transaction; the webhook
-- service's action worker makes the refund and confirms it (finish_stripe_action). No Stripe call
-- happens while an event is applied. p_refund_id is the refund named by a charge.refunded event.
CREATE OR REPLACE FUNCTION apply_stripe_event(p_event_id text, p_type text, p_created timestamptz,
                                   p_payload text, p_payment_intent_id text DEFAULT NULL,
                                   p_reservation_id uuid DEFAULT NULL, p_amount bigint DEFAULT NULL,
                                   p_currency text DEFAULT NULL, p_reason text DEFAULT NULL,
                                   p_refund_id text DEFAULT NULL, p_refunded boolean DEFAULT NULL,
                                   OUT outcome text, OUT reservation_id uuid, OUT amount bigint,
                                   OUT currency text)
LANGUAGE plpgsql AS $$
DECLARE
    kinds   CONSTANT text[] := ARRAY['payment_intent.succeeded', 'payment_intent.payment_failed',
                                     'payment_intent.processing', 'payment_intent.canceled',
                                     'charge.refunded', 'charge.dispute.created'];
    handled boolean := p_type = ANY (kinds);
    pay     record;
    done    text;
    holder  text;
    act     stripe_actions;
BEGIN
    -- this transaction's outbox rows are relayed by the caller's process, woken directly
    PERFORM set_config('boxoffice.outbox_quiet', 'on', true);
    INSERT INTO webhook_events_log AS w (event_id, event_type, event_created, payload,
                                         processing_status, attempts, processed_at)
    VALUES (p_event_id, p_type, p_created, p_payload::jsonb,
            CASE WHEN handled THEN 'processed' ELSE 'ignored' END, 1, clock_timestamp())
    ON CONFLICT (event_id) DO UPDATE
    SET processing_status = EXCLUDED.processing_status, attempts = w.attempts + 1,
        processed_at = EXCLUDED.processed_at
    WHERE w.processing_status NOT IN ('processed', 'ignored');
    IF NOT FOUND THEN
        outcome := 'duplicate';
        RETURN;
    END IF;
    IF NOT handled THEN
        outcome := 'ignored';
        RETURN;
    END IF;
    IF p_payment_intent_id IS NULL THEN  -- a refund or dispute of a charge without a PaymentIntent
        outcome := 'no_payment_intent';
        RETURN;
    END IF;
    IF p_type = 'charge.refunded' AND NOT coalesce(p_refunded, false) THEN
        outcome := 'partial_refund';  -- a partial refund: the sale stands
        RETURN;
    END IF;

    SELECT * INTO pay FROM advance_payment(p_payment_intent_id, p_reservation_id, p_amount,
        p_currency, CASE p_type
            WHEN 'payment_intent.succeeded' THEN 'succeeded'
            WHEN 'payment_intent.payment_failed' THEN 'failed'
            WHEN 'payment_intent.processing' THEN 'processing'
            WHEN 'payment_intent.canceled' THEN 'canceled'
            WHEN 'charge.refunded' THEN 'refunded'
            ELSE 'disputed' END, p_created);
    reservation_id := pay.reservation_id;
    amount := pay.amount;
    currency := pay.currency;
    IF p_type = 'charge.dispute.created' THEN  -- reported whether or not it moved the payment
        -- A dispute means the charge succeeded. If it arrives before the succeeded event (which
        -- it then makes stale), the hold is sold here, or it would expire while paid for.
        IF pay.moved AND pay.reservation_id IS NOT NULL
           AND payment_status_rank(coalesce(pay.previous, 'created')) < payment_status_rank('succeeded') THEN
            PERFORM complete_reservation(pay.reservation_id, p_payment_intent_id);
        END IF;
        outcome := 'disputed';
        RETURN;
    END IF;
    IF NOT pay.moved THEN
        outcome := 'stale';
        RETURN;
    END IF;

    IF p_type = 'payment_intent.succeeded' THEN
        PERFORM emit_payment_event('succeeded', p_payment_intent_id, pay.reservation_id,
                                   pay.amount, pay.currency, p_created);
        IF pay.reservation_id IS NULL THEN
            done := 'no_reservation';
        ELSE
            done := complete_reservation(pay.reservation_id, p_payment_intent_id);
            IF done = 'already_completed' THEN
                SELECT r.payment_intent_id INTO holder FROM reservations r
                WHERE r.id = pay.reservation_id;
                IF holder IS DISTINCT FROM p_payment_intent_id THEN
                    PERFORM request_stripe_action('refund', p_payment_intent_id,
                        pay.reservation_id, 'duplicate_payment', pay.amount);
                    UPDATE payments p SET refund_reason = 'duplicate_payment'
                    WHERE p.payment_intent_id = p_payment_intent_id;
                    done := 'refund_duplicate_payment';
                END IF;
            ELSIF done = 'unavailable' THEN  -- the hold ended and its tickets are gone
                PERFORM request_stripe_action('refund', p_payment_intent_id, pay.reservation_id,
                                              'oversold', pay.amount);
                UPDATE payments p SET refund_reason = 'oversold'
                WHERE p.payment_intent_id = p_payment_intent_id;
                done := 'refund_oversold';
            END IF;
        END IF;
    ELSIF p_type = 'payment_intent.payment_failed' THEN
        PERFORM emit_payment_event('failed', p_payment_intent_id, pay.reservation_id, pay.amount,
                                   pay.currency, p_created, p_reason);
        done := 'recorded';  -- the hold stays until it expires: the buyer may try again
    ELSIF p_type = 'payment_intent.processing' THEN
        done := 'recorded';
    ELSIF p_type = 'payment_intent.canceled' THEN
        PERFORM emit_payment_event('failed', p_payment_intent_id, pay.reservation_id, pay.amount,
                                   pay.currency, p_created, 'canceled');
        done := CASE WHEN pay.reservation_id IS NOT NULL
                          AND return_reservation_tickets(pay.reservation_id, p_payment_intent_id)
                              = 'released'
                     THEN 'released' ELSE 'recorded' END;
    ELSE  -- charge.refunded, in full: ours (an action we decided) or made in Stripe's dashboard
        SELECT * INTO act FROM stripe_actions a
        WHERE a.kind = 'refund' AND a.payment_intent_id = p_payment_intent_id FOR UPDATE;
        IF FOUND AND act.status = 'pending' THEN  -- made, and its confirmation not yet recorded
            UPDATE stripe_actions a SET status = 'done', result_id = coalesce(a.result_id, p_refund_id),
                   detail = 'confirmed by ' || p_event_id, done_at = clock_timestamp(),
                   updated_at = clock_timestamp()
            WHERE a.id = act.id;
        END IF;
        UPDATE payments p SET refund_id = coalesce(p.refund_id, p_refund_id),
               refund_reason = coalesce(act.reason, p.refund_reason, 'refunded_in_stripe')
        WHERE p.payment_intent_id = p_payment_intent_id;
        PERFORM emit_payment_event('refunded', p_payment_intent_id, pay.reservation_id,
                                   pay.amount, pay.currency, p_created,
                                   coalesce(act.reason, 'refunded_in_stripe'));
        done := CASE WHEN pay.reservation_id IS NOT NULL
                          AND return_reservation_tickets(pay.reservation_id, p_payment_intent_id)
                              IN ('returned', 'released')
                     THEN 'tickets_returned' ELSE 'recorded' END;
    END IF;
    outcome := done;
END $$;

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
DROP FUNCTION claim_payment_intent(text, text, text, uuid, text, text, double precision);
CREATE FUNCTION claim_payment_intent(p_client_id text, p_key text, p_fingerprint text,
                                        p_reservation_id uuid, p_stripe_key text, p_path text,
                                        p_lease_seconds double precision)
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
DROP FUNCTION record_payment_intent(bigint, integer, text, text, jsonb);
CREATE FUNCTION record_payment_intent(p_log_id bigint, p_client_id text, p_key text,
                                         p_stripe_key text, p_status integer, p_body text,
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

-- migrate:down

DROP FUNCTION record_payment_intent(bigint, text, text, text, integer, text, text, jsonb);
DROP FUNCTION claim_payment_intent(text, text, text, uuid, text, text, double precision);
DROP TRIGGER reservation_ended_cancel_intents ON reservations;
DROP FUNCTION reservation_ended_cancel_intents();

-- the bodies before this migration
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

CREATE OR REPLACE FUNCTION return_reservation_tickets(p_reservation_id uuid, p_payment_intent_id text)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    r reservations;
BEGIN
    SELECT * INTO r FROM reservations WHERE id = p_reservation_id FOR UPDATE;
    IF NOT FOUND THEN
        RETURN 'unknown';
    END IF;
    IF r.status = 'active' THEN
        PERFORM release_reservation(r.id, 'cancelled');
        RETURN 'released';
    END IF;
    IF r.status <> 'completed' THEN
        RETURN 'not_held';
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

CREATE OR REPLACE FUNCTION apply_stripe_event(p_event_id text, p_type text, p_created timestamptz,
                                   p_payload text, p_payment_intent_id text DEFAULT NULL,
                                   p_reservation_id uuid DEFAULT NULL, p_amount bigint DEFAULT NULL,
                                   p_currency text DEFAULT NULL, p_reason text DEFAULT NULL,
                                   p_refund_id text DEFAULT NULL, p_refunded boolean DEFAULT NULL,
                                   OUT outcome text, OUT reservation_id uuid, OUT amount bigint,
                                   OUT currency text)
LANGUAGE plpgsql AS $$
DECLARE
    kinds   CONSTANT text[] := ARRAY['payment_intent.succeeded', 'payment_intent.payment_failed',
                                     'payment_intent.processing', 'payment_intent.canceled',
                                     'charge.refunded', 'charge.dispute.created'];
    handled boolean := p_type = ANY (kinds);
    pay     record;
    done    text;
    paid_by text;
BEGIN
    -- this transaction's outbox rows are relayed by the caller's process, woken directly
    PERFORM set_config('boxoffice.outbox_quiet', 'on', true);
    INSERT INTO webhook_events_log AS w (event_id, event_type, event_created, payload,
                                         processing_status, attempts, processed_at)
    VALUES (p_event_id, p_type, p_created, p_payload::jsonb,
            CASE WHEN handled THEN 'processed' ELSE 'ignored' END, 1, clock_timestamp())
    ON CONFLICT (event_id) DO UPDATE
    SET processing_status = EXCLUDED.processing_status, attempts = w.attempts + 1,
        processed_at = EXCLUDED.processed_at
    WHERE w.processing_status NOT IN ('processed', 'ignored');
    IF NOT FOUND THEN
        outcome := 'duplicate';
        RETURN;
    END IF;
    IF NOT handled THEN
        outcome := 'ignored';
        RETURN;
    END IF;
    IF p_payment_intent_id IS NULL THEN  -- a refund or dispute of a charge without a PaymentIntent
        outcome := 'no_payment_intent';
        RETURN;
    END IF;
    IF p_type = 'charge.refunded' AND NOT coalesce(p_refunded, false) THEN
        outcome := 'partial_refund';  -- a partial refund: the sale stands
        RETURN;
    END IF;

    SELECT * INTO pay FROM advance_payment(p_payment_intent_id, p_reservation_id, p_amount,
        p_currency, CASE p_type
            WHEN 'payment_intent.succeeded' THEN 'succeeded'
            WHEN 'payment_intent.payment_failed' THEN 'failed'
            WHEN 'payment_intent.processing' THEN 'processing'
            WHEN 'payment_intent.canceled' THEN 'canceled'
            WHEN 'charge.refunded' THEN 'refunded'
            ELSE 'disputed' END, p_created);
    reservation_id := pay.reservation_id;
    amount := pay.amount;
    currency := pay.currency;
    IF p_type = 'charge.dispute.created' THEN  -- reported whether or not it moved the payment
        outcome := 'disputed';
        RETURN;
    END IF;
    IF NOT pay.moved THEN
        outcome := 'stale';
        RETURN;
    END IF;

    IF p_type = 'payment_intent.succeeded' THEN
        PERFORM emit_payment_event('succeeded', p_payment_intent_id, pay.reservation_id,
                                   pay.amount, pay.currency, p_created);
        IF pay.reservation_id IS NULL THEN
            done := 'no_reservation';
        ELSIF p_refund_id IS NOT NULL THEN
            -- the caller refunded at Stripe after our BX402: record it, do not sell
            UPDATE payments p SET status = 'refunded', refund_id = p_refund_id,
                   refund_reason = p_reason, updated_at = clock_timestamp()
            WHERE p.payment_intent_id = p_payment_intent_id;
            PERFORM emit_payment_event('refunded', p_payment_intent_id, pay.reservation_id,
                                       pay.amount, pay.currency, p_created, p_reason);
            done := 'refunded_' || p_reason;
        ELSE
            done := complete_reservation(pay.reservation_id, p_payment_intent_id);
            IF done = 'already_completed' THEN
                SELECT r.payment_intent_id INTO paid_by FROM reservations r
                WHERE r.id = pay.reservation_id;
                IF paid_by IS NOT NULL AND paid_by <> p_payment_intent_id THEN
                    RAISE EXCEPTION 'refund needed' USING ERRCODE = 'BX402',
                        DETAIL = 'duplicate_payment';
                END IF;
            ELSIF done <> 'completed' THEN  -- 'unavailable': the tickets are gone
                RAISE EXCEPTION 'refund needed' USING ERRCODE = 'BX402', DETAIL = 'oversold';
            END IF;
        END IF;
    ELSIF p_type = 'payment_intent.payment_failed' THEN
        PERFORM emit_payment_event('failed', p_payment_intent_id, pay.reservation_id, pay.amount,
                                   pay.currency, p_created, p_reason);
        done := 'recorded';  -- the hold stays until it expires: the buyer may try again
    ELSIF p_type = 'payment_intent.processing' THEN
        done := 'recorded';
    ELSIF p_type = 'payment_intent.canceled' THEN
        PERFORM emit_payment_event('failed', p_payment_intent_id, pay.reservation_id, pay.amount,
                                   pay.currency, p_created, 'canceled');
        done := CASE WHEN pay.reservation_id IS NOT NULL
                          AND release_reservation(pay.reservation_id, 'cancelled')
                     THEN 'released' ELSE 'recorded' END;
    ELSE  -- charge.refunded, in full
        UPDATE payments p SET refund_id = coalesce(p.refund_id, p_refund_id),
               refund_reason = coalesce(p.refund_reason, 'refunded_in_stripe')
        WHERE p.payment_intent_id = p_payment_intent_id;
        PERFORM emit_payment_event('refunded', p_payment_intent_id, pay.reservation_id,
                                   pay.amount, pay.currency, p_created, 'refunded_in_stripe');
        done := CASE WHEN pay.reservation_id IS NOT NULL
                          AND return_reservation_tickets(pay.reservation_id, p_payment_intent_id)
                              IN ('returned', 'released')
                     THEN 'tickets_returned' ELSE 'recorded' END;
    END IF;
    outcome := done;
END $$;

DROP FUNCTION finish_stripe_action(bigint, text, text, text, double precision);
DROP FUNCTION claim_stripe_actions(integer, double precision);
DROP FUNCTION request_stripe_action(text, text, uuid, text, bigint);
DROP INDEX reservations_keyed_created;
ALTER TABLE reservations DROP COLUMN payment_idempotency_key;
ALTER TABLE payment_intents_log DROP COLUMN lease_token;
DROP TRIGGER stripe_actions_notify ON stripe_actions;
DROP FUNCTION stripe_actions_notify();
DROP TABLE stripe_actions;
