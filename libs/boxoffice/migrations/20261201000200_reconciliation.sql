-- migrate:up

-- Reconciliation with Stripe (the webhook service, every STRIPE_RECONCILE_INTERVAL_SECONDS).
-- Stripe stops redelivering an event after three days; what webhooks missed is recovered from
-- Stripe's own records: events missing from webhook_events_log are fed to STRIPE_EVENTS,
-- payments left in a non-final state are compared with their PaymentIntents, and PaymentIntents
-- naming one of our holds that we never recorded (orphans) are applied or cancelled.

-- One row: how far reconciliation got, and the lease of the one replica running it.
CREATE TABLE stripe_reconciliation (
    singleton        boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    -- every Stripe event created before this instant is in webhook_events_log or was fed
    events_until     timestamptz,
    -- every PaymentIntent created before this instant was looked at for orphans
    intents_until    timestamptz,
    lease_token      uuid,
    lease_until      timestamptz,
    last_started_at  timestamptz
);
INSERT INTO stripe_reconciliation DEFAULT VALUES;

-- One row per run: what it saw and did, and why it stopped if it failed.
CREATE TABLE stripe_reconcile_runs (
    id                 bigserial PRIMARY KEY,
    replica            text NOT NULL,
    started_at         timestamptz NOT NULL DEFAULT clock_timestamp(),
    finished_at        timestamptz,
    error              text,
    events_seen        integer NOT NULL DEFAULT 0,
    events_recovered   integer NOT NULL DEFAULT 0,
    intents_checked    integer NOT NULL DEFAULT 0,
    intents_corrected  integer NOT NULL DEFAULT 0,
    orphans_found      integer NOT NULL DEFAULT 0
);
CREATE INDEX stripe_reconcile_runs_started ON stripe_reconcile_runs (started_at);

-- Each orphan once: what Stripe said of it and what was done (a cancel is a stripe_actions row
-- with reason 'orphan'; a success or processing is fed as a payment_intent.* event).
CREATE TABLE stripe_orphans (
    payment_intent_id  text PRIMARY KEY,
    reservation_id     uuid NOT NULL,
    amount             bigint,
    currency           text,
    stripe_status      text NOT NULL,
    action             text NOT NULL
                       CHECK (action IN ('fed_succeeded', 'fed_processing', 'cancel_requested')),
    run_id             bigint REFERENCES stripe_reconcile_runs (id) ON DELETE SET NULL,
    found_at           timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX stripe_orphans_run ON stripe_orphans (run_id);

-- When each payment in a non-final state was last compared with Stripe, so that every run
-- takes the ones compared longest ago (a bounded batch per run, round robin).
CREATE TABLE stripe_reconcile_checks (
    payment_intent_id  text PRIMARY KEY,
    checked_at         timestamptz NOT NULL
);

-- What reconciliation looks up on every run.
CREATE INDEX payments_not_final ON payments (updated_at)
    WHERE status IN ('created', 'processing', 'failed');
CREATE INDEX payment_intents_log_stripe_pi ON payment_intents_log (stripe_payment_intent_id)
    WHERE stripe_payment_intent_id IS NOT NULL;

-- migrate:down

DROP INDEX payment_intents_log_stripe_pi;
DROP INDEX payments_not_final;
DROP TABLE stripe_reconcile_checks;
DROP TABLE stripe_orphans;
DROP TABLE stripe_reconcile_runs;
DROP TABLE stripe_reconciliation;
