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

-- The common case of a batch, applied set-based (a few statements for all its events instead
-- of a dozen an event): payment_intent.succeeded events that complete an active hold. Takes an
-- event only where applying it with apply_stripe_event, in its turn, would do the same:
-- - seen for the first time (no row in webhook_events_log);
-- - its payment moves forward to succeeded (its row absent, or below succeeded) and names no
--   hold but this one, and its hold is active: it is completed;
-- - nothing else in the batch touches it: its event id, PaymentIntent and hold are named by no
--   other event of the batch, nor is its hold that of another event's payment. So it commutes
--   with its neighbours (completing an active hold moves tickets from held to sold: what is left
--   to sell does not change) and may be applied before them.
-- Its effects are apply_stripe_event's: the log row, the payment, its outbox event, the buckets,
-- the hold completed, its outbox event. Returns one row an event applied: its index in the
-- arrays and apply_stripe_event's result (outcome 'completed'). The payments, then the holds are
-- locked (apply_stripe_event's order). The caller runs it in a subtransaction: if anything
-- raises (a delivery of one of these events, or a checkout of one of these payments, committed
-- meanwhile; a deadlock), it is rolled back whole and every event goes one at a time.
CREATE OR REPLACE FUNCTION apply_succeeded_events(
    p_event_ids text[], p_types text[], p_created timestamptz[], p_payloads text[],
    p_payment_intent_ids text[], p_reservation_ids uuid[], p_amounts bigint[],
    p_currencies text[])
RETURNS TABLE (i integer, reservation_id uuid, amount bigint, currency text)
LANGUAGE plpgsql AS $$
DECLARE
    kinds     CONSTANT text[] := ARRAY['payment_intent.succeeded', 'payment_intent.payment_failed',
                                       'payment_intent.processing', 'payment_intent.canceled',
                                       'charge.refunded', 'charge.dispute.created'];
    candidate integer[];
    chosen    integer[];
    fresh     integer[];  -- those whose payment has no row yet
BEGIN
    WITH ev AS (
        SELECT e.n::integer AS n, e.id, e.type, e.pi, e.hold,
               count(*) OVER (PARTITION BY e.id) AS ids, count(*) OVER (PARTITION BY e.pi) AS pis,
               count(*) OVER (PARTITION BY e.hold) AS holds
        FROM unnest(p_event_ids, p_types, p_payment_intent_ids, p_reservation_ids)
             WITH ORDINALITY AS e(id, type, pi, hold, n)),
    touched AS (  -- the holds each event with effects may touch: named, or its payment's
        SELECT e.n, e.hold AS hold FROM ev e WHERE e.type = ANY (kinds) AND e.hold IS NOT NULL
        UNION ALL
        SELECT e.n, p.reservation_id FROM ev e
        CROSS JOIN LATERAL (SELECT p.reservation_id FROM payments p
                            WHERE p.payment_intent_id = e.pi OFFSET 0) p
        WHERE e.type = ANY (kinds) AND p.reservation_id IS NOT NULL)
    SELECT array_agg(e.n) INTO candidate FROM ev e
    WHERE e.type = 'payment_intent.succeeded' AND e.pi IS NOT NULL AND e.hold IS NOT NULL
      AND e.ids = 1 AND e.pis = 1 AND e.holds = 1
      AND NOT EXISTS (SELECT 1 FROM touched t WHERE t.hold = e.hold AND t.n <> e.n)
      AND NOT EXISTS (SELECT 1 FROM touched t WHERE t.n = e.n AND t.hold <> e.hold);
    IF candidate IS NULL THEN
        RETURN;
    END IF;
    -- Every row below is looked up by its key, one at a time (a LATERAL subquery, fenced with
    -- OFFSET 0): a plan cached while the tables were small would otherwise scan them whole
    -- once they have grown (or scan every active hold through reservations_due).
    PERFORM 1 FROM (SELECT p_payment_intent_ids[c] AS pi FROM unnest(candidate) c ORDER BY 1) k
    CROSS JOIN LATERAL (SELECT 1 FROM payments p WHERE p.payment_intent_id = k.pi FOR UPDATE) l;
    PERFORM 1 FROM (SELECT p_reservation_ids[c] AS id FROM unnest(candidate) c ORDER BY 1) k
    CROSS JOIN LATERAL (SELECT 1 FROM reservations r WHERE r.id = k.id FOR UPDATE) l;
    SELECT array_agg(f.c ORDER BY f.c), array_agg(f.c ORDER BY f.c) FILTER (WHERE f.pay IS NULL)
    INTO chosen, fresh
    FROM (SELECT c, (SELECT r.status FROM reservations r WHERE r.id = p_reservation_ids[c])
                    AS hold_status,
                 (SELECT p FROM payments p WHERE p.payment_intent_id = p_payment_intent_ids[c])
                    AS pay,
                 w.seen
          FROM unnest(candidate) c
          -- by its key too: an EXISTS here was planned as a hashed subplan, which read the
          -- whole log (every event kept, 30 days of them) on each batch
          LEFT JOIN LATERAL (SELECT true AS seen FROM webhook_events_log w
                             WHERE w.event_id = p_event_ids[c] OFFSET 0) w ON true
          OFFSET 0) f
    WHERE f.hold_status = 'active' AND f.seen IS NULL
      AND (f.pay IS NULL
           OR (payment_status_rank((f.pay).status) < payment_status_rank('succeeded')
               AND coalesce((f.pay).reservation_id, p_reservation_ids[f.c])
                   = p_reservation_ids[f.c]));
    IF chosen IS NULL THEN
        RETURN;
    END IF;
    PERFORM set_config('boxoffice.outbox_quiet', 'on', true);
    INSERT INTO webhook_events_log (event_id, event_type, event_created, payload,
                                    processing_status, attempts, processed_at)
    SELECT p_event_ids[c], p_types[c], p_created[c], p_payloads[c]::jsonb, 'processed', 1,
           clock_timestamp()
    FROM unnest(chosen) c ORDER BY c;
    IF cardinality(chosen) > coalesce(cardinality(fresh), 0) THEN
        UPDATE payments p
        SET status = 'succeeded', status_event_created = p_created[c],
            updated_at = clock_timestamp(),
            reservation_id = coalesce(p.reservation_id, p_reservation_ids[c])
        FROM unnest(chosen) c WHERE p.payment_intent_id = p_payment_intent_ids[c]
                                AND c <> ALL (coalesce(fresh, '{}'));
    END IF;
    INSERT INTO payments (payment_intent_id, reservation_id, amount, currency, status,
                          status_event_created)
    SELECT p_payment_intent_ids[c], p_reservation_ids[c], coalesce(p_amounts[c], 0),
           lower(coalesce(p_currencies[c], '')), 'succeeded', p_created[c]
    FROM unnest(fresh) c ORDER BY c;
    UPDATE inventory_buckets b SET held = b.held - s.quantity, sold = b.sold + s.quantity
    FROM (SELECT a.event_id, a.bucket, sum(a.quantity)::integer AS quantity
          FROM unnest(chosen) c
          CROSS JOIN LATERAL (SELECT a.event_id, a.bucket, a.quantity
                              FROM reservation_allocations a
                              WHERE a.reservation_id = p_reservation_ids[c] OFFSET 0) a
          GROUP BY a.event_id, a.bucket) s
    WHERE b.event_id = s.event_id AND b.bucket = s.bucket;
    UPDATE reservations r SET status = 'completed', completed_at = clock_timestamp(),
           released_at = NULL, updated_at = clock_timestamp(),
           payment_intent_id = p_payment_intent_ids[c]
    FROM unnest(chosen) c WHERE r.id = p_reservation_ids[c];
    RETURN QUERY
    WITH done AS (
        SELECT c, p.reservation_id AS hold, p.amount, p.currency, r.event_id, r.quantity
        FROM unnest(chosen) c
        CROSS JOIN LATERAL (SELECT p.reservation_id, p.amount, p.currency FROM payments p
                            WHERE p.payment_intent_id = p_payment_intent_ids[c] OFFSET 0) p
        CROSS JOIN LATERAL (SELECT r.event_id, r.quantity FROM reservations r
                            WHERE r.id = p.reservation_id OFFSET 0) r),
    emitted AS (
        INSERT INTO outbox (subject, payload)
        SELECT o.subject, o.payload FROM (
            SELECT d.c, 1 AS k, 'payments.events.succeeded' AS subject,
                   jsonb_build_object('payment_intent_id', p_payment_intent_ids[d.c],
                                      'reservation_id', d.hold, 'amount', d.amount,
                                      'currency', d.currency, 'occurred_at', p_created[d.c],
                                      'reason', NULL) AS payload
            FROM done d
            UNION ALL
            SELECT d.c, 2, 'reservations.events.completed' AS subject,
                   jsonb_build_object('reservation_id', d.hold, 'event_id', d.event_id,
                                      'quantity', d.quantity,
                                      'payment_intent_id', p_payment_intent_ids[d.c],
                                      'occurred_at', clock_timestamp())
            FROM done d) o
        ORDER BY o.c, o.k)
    SELECT d.c, d.hold, d.amount, d.currency FROM done d ORDER BY d.c;
END $$;
GRANT EXECUTE ON FUNCTION apply_succeeded_events TO boxoffice_webhook;

-- Apply Stripe events in order, in one statement of the caller's transaction. First the buckets
-- of the holds named are locked, in bucket order, so that two batches wait for each other
-- instead of deadlocking. Then the events apply_succeeded_events can take are applied together
-- (the common case, set-based), in a subtransaction: if it raises, it is rolled back whole and
-- they go one at a time with the rest. Every other event is applied in order, each in a
-- subtransaction of its own (a savepoint): an event that raises is rolled back alone and its
-- SQLSTATE and message returned in its row (the caller counts the failed attempt in the same
-- transaction), and its neighbours stay applied. A deadlock or serialization failure is run
-- again, twice at most, before it is returned as the event's failure. The arrays are
-- apply_stripe_event's arguments, one element an event; one row an event, in order: i
-- (1-based), and either apply_stripe_event's result or the error.
CREATE OR REPLACE FUNCTION apply_stripe_events(
    p_event_ids text[], p_types text[], p_created timestamptz[], p_payloads text[],
    p_payment_intent_ids text[], p_reservation_ids uuid[], p_amounts bigint[],
    p_currencies text[], p_reasons text[], p_refund_ids text[], p_refunded boolean[])
RETURNS TABLE (i integer, outcome text, reservation_id uuid, amount bigint, currency text,
               error_state text, error text)
LANGUAGE plpgsql AS $$
DECLARE
    total   integer := coalesce(cardinality(p_event_ids), 0);
    r       record;
    applied boolean[] := array_fill(false, ARRAY[total]);
    holds   uuid[] := array_fill(NULL::uuid, ARRAY[total]);
    amounts bigint[] := array_fill(NULL::bigint, ARRAY[total]);
    moneys  text[] := array_fill(NULL::text, ARRAY[total]);
BEGIN
    BEGIN
        PERFORM lock_hold_buckets(p_reservation_ids);
    EXCEPTION WHEN deadlock_detected THEN
        NULL;  -- with a transaction that took buckets out of order: each event retries its own
    END;
    BEGIN
        FOR r IN SELECT * FROM apply_succeeded_events(p_event_ids, p_types, p_created,
                     p_payloads, p_payment_intent_ids, p_reservation_ids, p_amounts,
                     p_currencies) LOOP
            applied[r.i] := true;
            holds[r.i] := r.reservation_id;
            amounts[r.i] := r.amount;
            moneys[r.i] := r.currency;
        END LOOP;
    EXCEPTION WHEN OTHERS THEN  -- rolled back whole: each event on its own, below
        applied := array_fill(false, ARRAY[total]);
    END;
    FOR n IN 1 .. total LOOP
        i := n;
        IF applied[n] THEN
            outcome := 'completed';
            reservation_id := holds[n];
            amount := amounts[n];
            currency := moneys[n];
            error_state := NULL;
            error := NULL;
            RETURN NEXT;
            CONTINUE;
        END IF;
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
