-- Stripe side effects (refunds, cancels) decided durably before they are made, claimed by
-- a worker under a lease and finished once.
--
-- The current body of each function; applied after the migrations on every `boxoffice migrate`
-- (idempotent). Grants beside the function: each service role gets EXECUTE on what it calls.

CREATE OR REPLACE FUNCTION stripe_actions_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('boxoffice_stripe_actions', '');
    RETURN NULL;
END $$;

CREATE OR REPLACE TRIGGER stripe_actions_notify AFTER INSERT ON stripe_actions
    FOR EACH STATEMENT EXECUTE FUNCTION stripe_actions_notify();

-- Decide a Stripe side effect: once per kind and PaymentIntent, whoever asks and however often.
-- Returns the action's id (the existing one when it was decided before).
CREATE OR REPLACE FUNCTION request_stripe_action(
    p_kind text, p_payment_intent_id text, p_reservation_id uuid, p_reason text, p_amount bigint)
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
GRANT EXECUTE ON FUNCTION request_stripe_action
    TO boxoffice_payment, boxoffice_webhook, boxoffice_reaper;

-- Lease up to p_limit due actions to the caller for p_lease_seconds: each attempt is counted
-- before it is made, and an action whose worker died is due again when its lease lapses.
CREATE OR REPLACE FUNCTION claim_stripe_actions(p_limit integer, p_lease_seconds double precision)
RETURNS SETOF stripe_actions LANGUAGE sql AS $$
    UPDATE stripe_actions a
    SET attempts = a.attempts + 1, updated_at = clock_timestamp(),
        next_attempt_at = clock_timestamp() + make_interval(secs => p_lease_seconds)
    WHERE a.id IN (SELECT d.id FROM stripe_actions d
                   -- the clock read once (an InitPlan): a bound of the index scan, where
                   -- clock_timestamp() itself would filter every pending action's entry
                   WHERE d.status = 'pending' AND d.next_attempt_at <= (SELECT clock_timestamp())
                   ORDER BY d.next_attempt_at LIMIT p_limit FOR UPDATE SKIP LOCKED)
    RETURNING a.*
$$;
GRANT EXECUTE ON FUNCTION claim_stripe_actions TO boxoffice_webhook;

-- Confirm an attempt at an action. p_outcome:
--   done   Stripe made it (p_result_id: the refund's or PaymentIntent's id): a refund moves the
--          payment to refunded (payments.events.refunded, with the reason it was decided for),
--          a cancel to canceled (payments.events.failed, reason canceled)
--   moot   nothing to do (p_detail: why, e.g. the PaymentIntent already succeeded: its
--          succeeded event sells or refunds it)
--   failed Stripe refused for good (p_detail): an operator must look
--   retry  a transient failure (p_detail): due again in p_retry_seconds
-- Returns the action's status after (NULL if there is no such pending action: done already).
CREATE OR REPLACE FUNCTION finish_stripe_action(
    p_id bigint, p_outcome text, p_result_id text, p_detail text,
    p_retry_seconds double precision DEFAULT 0)
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
GRANT EXECUTE ON FUNCTION finish_stripe_action TO boxoffice_webhook;

-- A hold that ends (expires, is cancelled, or is sold through another PaymentIntent) has its
-- other live PaymentIntents cancelled at Stripe, so a late payment becomes impossible in the
-- common case (the refund stays the fallback for the race). One trigger, so every path that
-- ends a hold (reaper, cancel, Stripe events, SQL by hand) does it.
CREATE OR REPLACE FUNCTION reservation_ended_cancel_intents() RETURNS trigger LANGUAGE plpgsql AS $$
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

CREATE OR REPLACE TRIGGER reservation_ended_cancel_intents AFTER UPDATE OF status ON reservations
    FOR EACH ROW
    WHEN (OLD.status = 'active' AND NEW.status <> 'active'
          AND (NEW.payment_intent_id IS NOT NULL OR NEW.payment_idempotency_key IS NOT NULL))
    EXECUTE FUNCTION reservation_ended_cancel_intents();
