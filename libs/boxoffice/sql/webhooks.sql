-- A Stripe event applied to payments and holds in one transaction.
--
-- The current body of each function; applied after the migrations on every `boxoffice migrate`
-- (idempotent). Grants beside the function: each service role gets EXECUTE on what it calls.

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
CREATE OR REPLACE FUNCTION apply_stripe_event(
    p_event_id text, p_type text, p_created timestamptz, p_payload text,
    p_payment_intent_id text DEFAULT NULL, p_reservation_id uuid DEFAULT NULL,
    p_amount bigint DEFAULT NULL, p_currency text DEFAULT NULL, p_reason text DEFAULT NULL,
    p_refund_id text DEFAULT NULL, p_refunded boolean DEFAULT NULL, OUT outcome text,
    OUT reservation_id uuid, OUT amount bigint, OUT currency text)
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
GRANT EXECUTE ON FUNCTION apply_stripe_event TO boxoffice_webhook;

-- Apply Stripe events in order, in one statement of the caller's transaction, each in a
-- subtransaction of its own (a savepoint): an event that raises is rolled back alone and its
-- SQLSTATE and message returned in its row (the caller counts the failed attempt in the same
-- transaction), and its neighbours stay applied. A deadlock or serialization failure is run
-- again, twice at most, before it is returned as the event's failure. The buckets of the holds
-- named are locked first, in bucket order, so that two batches wait for each other instead of
-- deadlocking. The arrays are apply_stripe_event's arguments, one element an event; one row an
-- event, in order: i (1-based), and either apply_stripe_event's result or the error.
CREATE OR REPLACE FUNCTION apply_stripe_events(
    p_event_ids text[], p_types text[], p_created timestamptz[], p_payloads text[],
    p_payment_intent_ids text[], p_reservation_ids uuid[], p_amounts bigint[],
    p_currencies text[], p_reasons text[], p_refund_ids text[], p_refunded boolean[])
RETURNS TABLE (i integer, outcome text, reservation_id uuid, amount bigint, currency text,
               error_state text, error text)
LANGUAGE plpgsql AS $$
DECLARE
    r record;
BEGIN
    BEGIN
        PERFORM lock_hold_buckets(p_reservation_ids);
    EXCEPTION WHEN deadlock_detected THEN
        NULL;  -- with a transaction that took buckets out of order: each event retries its own
    END;
    FOR n IN 1 .. coalesce(cardinality(p_event_ids), 0) LOOP
        i := n;
        FOR attempt IN 1 .. 3 LOOP
            BEGIN
                SELECT * INTO r FROM apply_stripe_event(p_event_ids[n], p_types[n], p_created[n],
                    p_payloads[n], p_payment_intent_ids[n], p_reservation_ids[n], p_amounts[n],
                    p_currencies[n], p_reasons[n], p_refund_ids[n], p_refunded[n]);
                outcome := r.outcome;
                reservation_id := r.reservation_id;
                amount := r.amount;
                currency := r.currency;
                error_state := NULL;
                error := NULL;
                EXIT;
            EXCEPTION WHEN OTHERS THEN
                outcome := NULL;
                reservation_id := NULL;
                amount := NULL;
                currency := NULL;
                GET STACKED DIAGNOSTICS error_state = RETURNED_SQLSTATE, error = MESSAGE_TEXT;
                EXIT WHEN error_state NOT IN ('40P01', '40001');  -- not a conflict: no retry
            END;
        END LOOP;
        RETURN NEXT;
    END LOOP;
END $$;
GRANT EXECUTE ON FUNCTION apply_stripe_events TO boxoffice_webhook;
