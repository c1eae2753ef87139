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
                                p_currency text, p_status text, p_event_created timestamptz)
RETURNS TABLE (moved boolean, previous text, reservation_id uuid, amount bigint, currency text)
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
            RETURN QUERY SELECT true, NULL::text, p_reservation_id, coalesce(p_amount, 0)::bigint,
                                lower(coalesce(p_currency, ''));
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
        RETURN QUERY SELECT true, cur.status, coalesce(cur.reservation_id, p_reservation_id),
                            cur.amount, cur.currency;
    ELSE
        RETURN QUERY SELECT false, cur.status, cur.reservation_id, cur.amount, cur.currency;
    END IF;
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

-- Operators list failed events newest first; retention purges by received time.
CREATE INDEX webhook_events_log_by_received ON webhook_events_log (received_at);

-- migrate:down

DROP INDEX webhook_events_log_by_received;
DROP FUNCTION return_reservation_tickets(uuid, text);
DROP FUNCTION advance_payment(text, uuid, bigint, text, text, timestamptz);
DROP FUNCTION payment_status_rank(text);
