-- migrate:up

-- The order of a payment's states: a Stripe event moves a payment only forward. States of one
-- rank (processing and failed: a buyer may retry) are ordered by the event's `created` instead.
CREATE FUNCTION payment_status_rank(p_status text) RETURNS integer
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

-- Move a payment to p_status if that is forward (creating its row if the event came before the
-- checkout wrote it). Returns one row: whether it moved, the state before, and the payment's
-- reservation. The row stays locked for the caller's transaction, so two events of one payment
-- are applied one after the other, whatever order they arrive in.
CREATE FUNCTION advance_payment(p_payment_intent_id text, p_reservation_id uuid, p_amount bigint,
                                p_currency text, p_status text, p_event_created timestamptz,
                                OUT moved boolean, OUT previous text, OUT reservation_id uuid,
                                OUT amount bigint, OUT currency text)
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

-- A refunded payment gives its tickets back: a sold reservation becomes cancelled and its
-- tickets available again; a hold still active is released. Returns 'returned', 'released',
-- 'not_held' (expired or cancelled already: nothing to give back) or 'unknown'. Decided under
-- the reservation's row lock, so tickets are returned once.
CREATE FUNCTION return_reservation_tickets(p_reservation_id uuid, p_payment_intent_id text)
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

-- A payment event on the outbox (payments.events.<kind>), in the caller's transaction.
CREATE FUNCTION emit_payment_event(p_kind text, p_payment_intent_id text, p_reservation_id uuid,
                                   p_amount bigint, p_currency text, p_occurred_at timestamptz,
                                   p_reason text DEFAULT NULL)
RETURNS void LANGUAGE sql AS $$
    INSERT INTO outbox (subject, payload) VALUES ('payments.events.' || p_kind,
        jsonb_build_object('payment_intent_id', p_payment_intent_id,
                           'reservation_id', p_reservation_id, 'amount', p_amount,
                           'currency', p_currency, 'occurred_at', p_occurred_at,
                           'reason', p_reason))
$$;

-- Apply one Stripe event, exactly once, in one transaction (one round trip: the caller runs it
-- as a statement of its own). The caller has read the event's object into the typed arguments.
--
-- 1. Claim: insert the event's row already marked done, or lock the row of an event seen before
--    and not yet done. A row already done means the effects were committed: 'duplicate'. A
--    concurrent delivery of the same event waits on the row, then finds it done.
-- 2. Effects, only when the event moves its payment forward (advance_payment); else 'stale'.
--
-- When a buyer paid for tickets that are gone (the hold ended and the tickets were sold) or paid
-- twice for one hold, the money must go back through Stripe, which cannot happen inside a
-- statement: it raises SQLSTATE BX402 with the reason in DETAIL, everything rolls back, and the
-- caller refunds (idempotently) and applies the event again with p_refund_id set, which records
-- the refund instead of selling.
CREATE FUNCTION apply_stripe_event(p_event_id text, p_type text, p_created timestamptz,
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


-- migrate:down

CREATE OR REPLACE FUNCTION outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('boxoffice_outbox', '');
    RETURN NULL;
END $$;
DROP FUNCTION apply_stripe_event(text, text, timestamptz, text, text, uuid, bigint, text, text, text, boolean);
DROP FUNCTION emit_payment_event(text, text, uuid, bigint, text, timestamptz, text);
DROP FUNCTION return_reservation_tickets(uuid, text);
DROP FUNCTION advance_payment(text, uuid, bigint, text, text, timestamptz);
DROP FUNCTION payment_status_rank(text);
