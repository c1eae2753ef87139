-- migrate:up

-- The baseline: every table, index, constraint, role and grant on tables. The functions and
-- their triggers are not here: the current body of each is in libs/boxoffice/sql (one file per
-- domain), applied after the migrations by `boxoffice migrate` (boxoffice.migrate), which records
-- the digest of those files in schema_functions.

-- The digest of the function files last applied (boxoffice.migrate.functions_digest): a service
-- refuses to start on a database whose functions are not the ones it ships.
CREATE TABLE schema_functions (
    singleton   boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    digest      text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- Ticketed events and their inventory. Inventory is split into buckets so that holds on one
-- hot event do not all queue on one row; held + sold never exceeds capacity in any bucket.
CREATE TABLE ticketed_events (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name        text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    capacity    integer NOT NULL CHECK (capacity >= 0),
    price       bigint NOT NULL CHECK (price >= 0),
    currency    text NOT NULL CHECK (currency ~ '^[a-z]{3}$'),
    buckets     integer NOT NULL DEFAULT 1 CHECK (buckets BETWEEN 1 AND 256),
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE inventory_buckets (
    event_id  uuid NOT NULL REFERENCES ticketed_events (id) ON DELETE CASCADE,
    bucket    integer NOT NULL,
    capacity  integer NOT NULL CHECK (capacity >= 0),
    held      integer NOT NULL DEFAULT 0 CHECK (held >= 0),
    sold      integer NOT NULL DEFAULT 0 CHECK (sold >= 0),
    PRIMARY KEY (event_id, bucket),
    CONSTRAINT never_oversold CHECK (held + sold <= capacity)
);


-- Holds. A hold counts against availability only while status = 'active' and expires_at is in
-- the future; the reaper (or the hold path itself) turns an overdue one into 'expired'.
CREATE TABLE reservations (
    id                 uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    event_id           uuid NOT NULL REFERENCES ticketed_events (id),
    client_id          text NOT NULL,
    customer_ref       text,
    quantity           integer NOT NULL CHECK (quantity > 0),
    amount             bigint NOT NULL CHECK (amount >= 0),
    currency           text NOT NULL,
    status             text NOT NULL DEFAULT 'active'
                       CHECK (status IN ('active', 'expired', 'completed', 'cancelled')),
    expires_at         timestamptz NOT NULL,
    payment_intent_id  text,
    idempotency_key    text,
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now(),
    completed_at       timestamptz,
    released_at        timestamptz,
    -- idempotent holds (POST /v1/reservations with an Idempotency-Key): the fingerprint of the
    -- request that created the hold, and the exact body answered, replayed byte for byte
    request_fingerprint text,
    response_body      text,
    -- one live PaymentIntent per hold: the one key that may create it
    payment_idempotency_key text,
    CONSTRAINT released_when_ended CHECK ((status IN ('expired', 'cancelled')) = (released_at IS NOT NULL)),
    CONSTRAINT completed_when_sold CHECK ((status = 'completed') = (completed_at IS NOT NULL))
);
CREATE INDEX reservations_due ON reservations (expires_at) WHERE status = 'active';
CREATE INDEX reservations_event ON reservations (event_id, status);
CREATE UNIQUE INDEX reservations_client_key ON reservations (client_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;

-- Which buckets a hold took its tickets from (released to the same buckets).
CREATE TABLE reservation_allocations (
    reservation_id  uuid NOT NULL REFERENCES reservations (id) ON DELETE CASCADE,
    event_id        uuid NOT NULL,
    bucket          integer NOT NULL,
    quantity        integer NOT NULL CHECK (quantity > 0),
    PRIMARY KEY (reservation_id, bucket),
    FOREIGN KEY (event_id, bucket) REFERENCES inventory_buckets (event_id, bucket)
);

-- Idempotency keys of POST /v1/payment_intents: the audit trail and the recovery state
-- (Stripe-like: a key locked while in flight, a recovery point after each foreign call).
CREATE TABLE payment_intents_log (
    id                        bigserial PRIMARY KEY,
    client_id                 text NOT NULL,
    idempotency_key           text NOT NULL CHECK (length(idempotency_key) BETWEEN 1 AND 255),
    request_path              text NOT NULL,
    request_fingerprint       text NOT NULL,
    reservation_id            uuid,
    recovery_point            text NOT NULL DEFAULT 'started'
                              -- no state between: Stripe's answer and its effects commit together
                              CHECK (recovery_point IN ('started', 'finished')),
    locked_at                 timestamptz,
    stripe_idempotency_key    text NOT NULL,
    stripe_payment_intent_id  text,
    amount                    bigint,
    currency                  text,
    response_status           integer,
    response_body             text,
    attempts                  integer NOT NULL DEFAULT 0,
    last_error                text,
    created_at                timestamptz NOT NULL DEFAULT now(),
    updated_at                timestamptz NOT NULL DEFAULT now(),
    lease_token               uuid,  -- the claim's own: only the claimed row is recorded
    CONSTRAINT payment_intents_log_key UNIQUE (client_id, idempotency_key),
    CONSTRAINT finished_has_response CHECK (recovery_point <> 'finished' OR response_status IS NOT NULL)
);
CREATE INDEX payment_intents_log_reservation ON payment_intents_log (reservation_id);
CREATE INDEX payment_intents_log_created ON payment_intents_log (created_at);

-- Payments as Stripe reports them through webhooks; a state machine that never moves back.
CREATE TABLE payments (
    payment_intent_id   text PRIMARY KEY,
    reservation_id      uuid REFERENCES reservations (id),
    amount              bigint NOT NULL,
    currency            text NOT NULL,
    status              text NOT NULL CHECK (status IN ('created', 'processing', 'failed', 'canceled',
                                                        'succeeded', 'refunded', 'disputed')),
    status_event_created timestamptz,
    refund_id           text,
    refund_reason       text,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX payments_reservation ON payments (reservation_id);

-- Every Stripe event received, once (the event id is the key), with its processing state.
CREATE TABLE webhook_events_log (
    event_id           text PRIMARY KEY,
    event_type         text NOT NULL,
    event_created      timestamptz NOT NULL,
    payload            jsonb NOT NULL,
    processing_status  text NOT NULL DEFAULT 'received'
                       CHECK (processing_status IN ('received', 'processed', 'failed', 'ignored')),
    attempts           integer NOT NULL DEFAULT 0,
    last_error         text,
    received_at        timestamptz NOT NULL DEFAULT now(),
    processed_at       timestamptz
);
CREATE INDEX webhook_events_log_status ON webhook_events_log (processing_status, received_at);
CREATE INDEX webhook_events_log_processed ON webhook_events_log (processed_at);

-- Error groups (issues) and every error report (no sampling).
CREATE TABLE error_groups (
    id               uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    fingerprint_hash text NOT NULL UNIQUE,
    fingerprint      text[] NOT NULL,
    title            text NOT NULL,
    service          text NOT NULL,
    level            text NOT NULL,
    status           text NOT NULL DEFAULT 'unresolved'
                     CHECK (status IN ('unresolved', 'resolved', 'ignored')),
    first_seen       timestamptz NOT NULL,
    last_seen        timestamptz NOT NULL,
    count            bigint NOT NULL DEFAULT 0,
    resolved_at      timestamptz,
    last_alerted_at  timestamptz,
    -- rate alerts: each group counts its reports in a fixed window that restarts when it is
    -- over, so "passes N reports a minute" is decided in the same statement that counts them
    -- (replicas of the error-sink agree)
    rate_window_start timestamptz,
    rate_window_count bigint NOT NULL DEFAULT 0,
    regressed_at     timestamptz  -- when a new report reopened a resolved group
);
CREATE INDEX error_groups_last_seen ON error_groups (status, last_seen DESC);

-- Column names of the original deployment kept (severity, function_name, error_message,
-- timestamp, resolved) so its runbook queries run unchanged.
CREATE TABLE error_logs (
    id             uuid PRIMARY KEY,
    "timestamp"    timestamptz NOT NULL,
    received_at    timestamptz NOT NULL DEFAULT now(),
    service        text NOT NULL,
    function_name  text,
    severity       text NOT NULL CHECK (severity IN ('debug', 'info', 'warning', 'error', 'critical', 'fatal')),
    error_message  text NOT NULL,
    error_type     text,
    stacktrace     text,
    context        jsonb,
    fingerprint    text[],
    environment    text,
    release        text,
    request_id     text,
    occurrences    integer NOT NULL DEFAULT 1,
    group_id       uuid,
    resolved       boolean NOT NULL DEFAULT false
);
CREATE INDEX error_logs_unresolved ON error_logs ("timestamp" DESC) WHERE NOT resolved;
CREATE INDEX error_logs_group ON error_logs (group_id, "timestamp" DESC);
CREATE INDEX error_logs_received ON error_logs (received_at);

-- Transactional outbox: domain events written with the state change, published after commit.
CREATE TABLE outbox (
    id          bigserial PRIMARY KEY,
    subject     text NOT NULL,
    payload     jsonb NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);


-- Each reaper run (like pg_cron's job_run_details).
CREATE TABLE reaper_runs (
    id           bigserial PRIMARY KEY,
    kind         text NOT NULL DEFAULT 'expiry' CHECK (kind IN ('expiry', 'retention', 'manual')),
    replica      text,
    started_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    finished_at  timestamptz,
    expired      integer NOT NULL DEFAULT 0,
    purged       jsonb,
    error        text
);
CREATE INDEX reaper_runs_started ON reaper_runs (started_at DESC);

CREATE INDEX error_groups_service ON error_groups (service, last_seen DESC);

-- Alerts decided in the same transaction as the reports that caused them, then published to
-- ALERTS (Nats-Msg-Id = id, the group id plus its window) and posted to ALERT_WEBHOOK_URL by the
-- error-sink's alert relay; a crash between the commit and the publish loses nothing.
CREATE TABLE error_alerts (
    id            text PRIMARY KEY,
    group_id      uuid NOT NULL,
    level         text NOT NULL,
    reason        text NOT NULL CHECK (reason IN ('level', 'rate')),
    payload       jsonb NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    published_at  timestamptz,
    notified_at   timestamptz,
    attempts      integer NOT NULL DEFAULT 0,
    next_attempt  timestamptz NOT NULL DEFAULT now(),
    last_error    text,
    -- failures to publish to ALERTS and to reach ALERT_WEBHOOK_URL are counted apart: a bus
    -- outage must not use up the webhook's attempts, nor stop the publishing, which never
    -- gives up (ALERTS is the record other systems read)
    publish_attempts integer NOT NULL DEFAULT 0
);
CREATE INDEX error_alerts_pending ON error_alerts (next_attempt)
    WHERE published_at IS NULL OR notified_at IS NULL;
CREATE INDEX error_alerts_group ON error_alerts (group_id, created_at DESC);

-- Stripe side effects (a refund, a cancel), each decided durably in the transaction that
-- decides it, before it is made: what, why and the idempotency key. A worker then performs it and
-- confirms it; a crash anywhere resumes from the row (libs/boxoffice/sql/stripe_actions.sql).
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

-- retention forgets holds' idempotency keys after IDEMPOTENCY_KEY_TTL_HOURS, oldest first
CREATE INDEX reservations_keyed_created ON reservations (created_at)
    WHERE idempotency_key IS NOT NULL;

COMMENT ON COLUMN error_alerts.attempts IS 'failed posts to ALERT_WEBHOOK_URL (at most MAX_ATTEMPTS)';
COMMENT ON COLUMN error_alerts.publish_attempts IS 'failed publishes to ALERTS (retried without end)';

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

-- Every action an operate-scoped admin token takes through ingress, kept by the reaper from the
-- AUDIT stream: ingress publishes it (acknowledged) before carrying it out, and its HTTP status
-- after. The actor is the token's id (a digest), never the token. A row whose begun message is
-- still on its way has no actor yet (the two messages may be applied in either order).
CREATE TABLE admin_actions (
    id           uuid PRIMARY KEY,
    at           timestamptz,
    actor        text,
    action       text,
    target       text,
    request_id   text NOT NULL DEFAULT '',
    status       integer,
    finished_at  timestamptz,
    CONSTRAINT admin_actions_finished CHECK ((status IS NULL) = (finished_at IS NULL)),
    CONSTRAINT admin_actions_begun CHECK ((at IS NULL) = (actor IS NULL))
);
CREATE INDEX admin_actions_at ON admin_actions (at DESC);
CREATE INDEX admin_actions_actor ON admin_actions (actor, at DESC);

-- The self-audit: every AUDIT_INTERVAL_SECONDS the reaper checks inventory, money against
-- tickets, timeliness and the error pipeline, and the webhook service checks our books against
-- Stripe's. Each check resumes from its own checkpoint, so a run costs what changed since the
-- last one; a full pass (on demand, and once a day) looks at everything.

-- One row per check: where its next incremental run starts and what its last run did.
CREATE TABLE audit_checks (
    check_name      text PRIMARY KEY
                    CHECK (check_name IN ('inventory', 'money', 'stripe', 'timeliness', 'errors')),
    checkpoint      jsonb,
    started_at      timestamptz,
    finished_at     timestamptz,
    mode            text CHECK (mode IN ('incremental', 'full')),
    examined        bigint NOT NULL DEFAULT 0,
    in_flight       integer NOT NULL DEFAULT 0,
    violations      integer NOT NULL DEFAULT 0,
    new_violations  integer NOT NULL DEFAULT 0,
    resolved        integer NOT NULL DEFAULT 0,
    seconds         double precision,
    error           text,
    replica         text,
    last_full_at    timestamptz
);
INSERT INTO audit_checks (check_name)
VALUES ('inventory'), ('money'), ('stripe'), ('timeliness'), ('errors');

-- Each violation found, once while it lasts: what does not hold (kind), about what (subject,
-- and its ids), what was expected and what was found. Resolved when a later run no longer finds
-- it; if it comes back, it is a new finding.
CREATE TABLE audit_findings (
    id           bigserial PRIMARY KEY,
    check_name   text NOT NULL REFERENCES audit_checks (check_name),
    kind         text NOT NULL,
    subject      text NOT NULL,
    subject_ids  jsonb NOT NULL,
    expected     text NOT NULL,
    found        text NOT NULL,
    first_seen   timestamptz NOT NULL DEFAULT clock_timestamp(),
    last_seen    timestamptz NOT NULL DEFAULT clock_timestamp(),
    seen         integer NOT NULL DEFAULT 1,
    resolved_at  timestamptz,
    CONSTRAINT audit_findings_resolved_after
        CHECK (resolved_at IS NULL OR resolved_at >= first_seen)
);
CREATE UNIQUE INDEX audit_findings_open ON audit_findings (check_name, kind, subject)
    WHERE resolved_at IS NULL;
CREATE INDEX audit_findings_seen ON audit_findings (last_seen DESC);

-- The inventory check's checkpoint: each bucket's held and sold as last verified. A bucket
-- whose numbers moved since (by any path, SQL by hand included) is verified again.
CREATE TABLE audit_bucket_marks (
    event_id  uuid NOT NULL,
    bucket    integer NOT NULL,
    held      integer NOT NULL,
    sold      integer NOT NULL,
    PRIMARY KEY (event_id, bucket)
);

-- What the money and Stripe checks read to find what changed since their checkpoint.
CREATE INDEX payments_updated ON payments (updated_at);
CREATE INDEX stripe_actions_updated ON stripe_actions (updated_at);

-- A role per service: each service logs in with its own role, granted exactly the tables,
-- columns, sequences and functions it uses; the role that runs the migrations owns every object
-- and is the only one that can change the schema. Ingress has no database access at all.
--
-- The roles are created here without LOGIN when they do not exist (roles belong to the whole
-- PostgreSQL cluster, so they may exist already: created by hand, or by another database of the
-- cluster); whoever deploys gives them LOGIN and a password (`boxoffice up`, and `boxoffice
-- migrate` from PG_<SERVICE>_PASSWORD). The grants converge: every privilege of these roles on
-- this schema is revoked first, then exactly those below are granted, so running this again, or
-- on roles that had more, ends in the same state.
--
-- Functions run with the caller's privileges (SECURITY INVOKER), triggers included, so a role is
-- granted what every function it calls touches, directly or through a trigger (a hold that ends
-- writes a stripe_actions cancel through reservation_ended_cancel_intents). A row lock (FOR
-- UPDATE, FOR NO KEY UPDATE) needs UPDATE on one column of the table: where a role locks rows it
-- never updates (the outbox relay and retention lock rows to delete them), it gets UPDATE on one
-- timestamp column only. No SECURITY DEFINER function was needed: grants express all of it.
--
-- A table, sequence or function added later is granted to nobody (functions are no longer
-- executable by PUBLIC by default): its migration grants what each service needs (a function's
-- file in libs/boxoffice/sql, beside the function), and tests/db_grants.py, which
-- tests/test_db_roles.py compares with the catalog, says the same.

DO $$
DECLARE
    r text;
    bad text;
BEGIN
    FOREACH r IN ARRAY ARRAY['boxoffice_payment', 'boxoffice_webhook', 'boxoffice_error_sink',
                             'boxoffice_reaper'] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r) THEN
            BEGIN
                EXECUTE format('CREATE ROLE %I NOLOGIN', r);
            EXCEPTION WHEN duplicate_object OR unique_violation THEN
                NULL;  -- created meanwhile by the migration of another database of this cluster
            END;
        END IF;
        -- a role that existed already must not hold more than its grants
        SELECT string_agg(what, ', ') INTO bad FROM (
            SELECT 'SUPERUSER' AS what FROM pg_roles WHERE rolname = r AND rolsuper
            UNION ALL SELECT 'CREATEROLE' FROM pg_roles WHERE rolname = r AND rolcreaterole
            UNION ALL SELECT 'REPLICATION' FROM pg_roles WHERE rolname = r AND rolreplication
            UNION ALL SELECT 'BYPASSRLS' FROM pg_roles WHERE rolname = r AND rolbypassrls
            UNION ALL SELECT 'member of ' || current_user WHERE pg_has_role(r, current_user, 'MEMBER')
        ) x;
        IF bad IS NOT NULL THEN
            RAISE EXCEPTION 'role % exists with %: a service role must not have them', r, bad
                USING HINT = format('ALTER ROLE %I NOSUPERUSER NOCREATEROLE NOREPLICATION NOBYPASSRLS, '
                                    'or REVOKE %I FROM %I, then migrate again', r, current_user, r);
        END IF;
    END LOOP;
END $$;

-- Nobody but the owner may create objects here, nor see the schema unless granted below.
REVOKE ALL ON SCHEMA public FROM PUBLIC;
REVOKE ALL ON ALL TABLES IN SCHEMA public FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA public FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA public FROM PUBLIC;
-- functions the owner creates later are executable by nobody until a migration grants them
ALTER DEFAULT PRIVILEGES REVOKE EXECUTE ON FUNCTIONS FROM PUBLIC;

REVOKE ALL ON SCHEMA public
    FROM boxoffice_payment, boxoffice_webhook, boxoffice_error_sink, boxoffice_reaper;
REVOKE ALL ON ALL TABLES IN SCHEMA public
    FROM boxoffice_payment, boxoffice_webhook, boxoffice_error_sink, boxoffice_reaper;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA public
    FROM boxoffice_payment, boxoffice_webhook, boxoffice_error_sink, boxoffice_reaper;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA public
    FROM boxoffice_payment, boxoffice_webhook, boxoffice_error_sink, boxoffice_reaper;

GRANT USAGE ON SCHEMA public
    TO boxoffice_payment, boxoffice_webhook, boxoffice_error_sink, boxoffice_reaper;
-- every service checks the schema version before it starts (boxoffice.db.pool)
GRANT SELECT ON schema_migrations, schema_functions
    TO boxoffice_payment, boxoffice_webhook, boxoffice_error_sink, boxoffice_reaper;

-- Every service that writes domain events relays the outbox: it reads, locks and deletes rows.
GRANT SELECT, INSERT, DELETE, UPDATE (created_at) ON outbox
    TO boxoffice_payment, boxoffice_webhook, boxoffice_reaper;
GRANT USAGE ON SEQUENCE outbox_id_seq TO boxoffice_payment, boxoffice_webhook, boxoffice_reaper;

-- A hold that ends decides the cancel of its other PaymentIntents (request_stripe_action, from
-- the trigger reservation_ended_cancel_intents): whoever ends holds writes those rows.
GRANT SELECT (id, kind, payment_intent_id), INSERT ON stripe_actions
    TO boxoffice_payment, boxoffice_reaper;
GRANT USAGE ON SEQUENCE stripe_actions_id_seq
    TO boxoffice_payment, boxoffice_webhook, boxoffice_reaper;

-- payment: ticketed events and inventory, holds, PaymentIntents ------------------------------
GRANT SELECT, INSERT ON ticketed_events TO boxoffice_payment;
GRANT SELECT, INSERT, UPDATE (held) ON inventory_buckets TO boxoffice_payment;
GRANT SELECT, INSERT,
      UPDATE (status, released_at, updated_at, request_fingerprint, response_body,
              payment_intent_id, payment_idempotency_key)
    ON reservations TO boxoffice_payment;
GRANT SELECT, INSERT ON reservation_allocations TO boxoffice_payment;
GRANT SELECT, INSERT,
      UPDATE (recovery_point, locked_at, lease_token, attempts, response_status, response_body,
              stripe_payment_intent_id, last_error, updated_at)
    ON payment_intents_log TO boxoffice_payment;
GRANT USAGE ON SEQUENCE payment_intents_log_id_seq TO boxoffice_payment;
-- a PaymentIntent's first row (record_payment_intent); its status for the audit trail
GRANT SELECT (payment_intent_id, reservation_id, amount, status), INSERT ON payments
    TO boxoffice_payment;

-- webhook: Stripe events applied to payments and holds, Stripe actions, reconciliation -------
GRANT SELECT, INSERT, UPDATE (processing_status, attempts, last_error, processed_at)
    ON webhook_events_log TO boxoffice_webhook;
GRANT SELECT, INSERT,
      UPDATE (status, status_event_created, reservation_id, refund_id, refund_reason, updated_at)
    ON payments TO boxoffice_webhook;
-- a payment for a hold that ended takes its tickets again (complete_reservation: a new hold
-- whose allocation moves to the paid one, then deleted) and a refund gives them back
GRANT SELECT ON ticketed_events TO boxoffice_webhook;
GRANT SELECT, UPDATE (held, sold) ON inventory_buckets TO boxoffice_webhook;
GRANT SELECT, INSERT, DELETE,
      UPDATE (status, completed_at, released_at, updated_at, payment_intent_id)
    ON reservations TO boxoffice_webhook;
GRANT SELECT, INSERT, DELETE, UPDATE (reservation_id) ON reservation_allocations
    TO boxoffice_webhook;
GRANT SELECT, INSERT,
      UPDATE (status, attempts, next_attempt_at, result_id, detail, last_error, done_at,
              updated_at)
    ON stripe_actions TO boxoffice_webhook;
-- reconciliation: a PaymentIntent recorded by a checkout is no orphan
GRANT SELECT (stripe_payment_intent_id) ON payment_intents_log TO boxoffice_webhook;
GRANT SELECT,
      UPDATE (events_until, intents_until, lease_token, lease_until, last_started_at)
    ON stripe_reconciliation TO boxoffice_webhook;
GRANT SELECT, INSERT, DELETE,
      UPDATE (finished_at, error, events_seen, events_recovered, intents_checked,
              intents_corrected, orphans_found)
    ON stripe_reconcile_runs TO boxoffice_webhook;
GRANT USAGE ON SEQUENCE stripe_reconcile_runs_id_seq TO boxoffice_webhook;
GRANT SELECT, INSERT ON stripe_orphans TO boxoffice_webhook;
GRANT SELECT, INSERT, DELETE, UPDATE (checked_at) ON stripe_reconcile_checks TO boxoffice_webhook;

-- error-sink: error reports, their groups and alerts; nothing else --------------------------
-- (its batches are staged in a temporary table: PostgreSQL's default TEMPORARY on the database)
GRANT SELECT, INSERT, UPDATE (resolved) ON error_logs TO boxoffice_error_sink;
GRANT SELECT, INSERT,
      UPDATE (status, level, first_seen, last_seen, count, resolved_at, regressed_at,
              rate_window_start, rate_window_count, last_alerted_at)
    ON error_groups TO boxoffice_error_sink;
GRANT SELECT, INSERT,
      UPDATE (published_at, notified_at, attempts, publish_attempts, next_attempt, last_error)
    ON error_alerts TO boxoffice_error_sink;

-- reaper: expiry of holds, retention, its runs, the operators' action log --------------------
GRANT SELECT, UPDATE (status, released_at, updated_at, idempotency_key, request_fingerprint,
                      response_body)
    ON reservations TO boxoffice_reaper;
GRANT SELECT ON reservation_allocations TO boxoffice_reaper;
GRANT SELECT, UPDATE (held) ON inventory_buckets TO boxoffice_reaper;
-- what the cancel trigger reads of a hold's PaymentIntents
GRANT SELECT (payment_intent_id, reservation_id, amount, status) ON payments TO boxoffice_reaper;
GRANT SELECT, INSERT ON reaper_runs TO boxoffice_reaper;
GRANT USAGE ON SEQUENCE reaper_runs_id_seq TO boxoffice_reaper;
-- retention deletes old rows, claimed with FOR UPDATE SKIP LOCKED (UPDATE of the age column
-- only for that lock)
GRANT SELECT (id, created_at), DELETE, UPDATE (created_at) ON payment_intents_log
    TO boxoffice_reaper;
GRANT SELECT (event_id, processed_at), DELETE, UPDATE (processed_at) ON webhook_events_log
    TO boxoffice_reaper;
GRANT SELECT (id, "timestamp", received_at), DELETE, UPDATE (received_at) ON error_logs
    TO boxoffice_reaper;
-- kept from the AUDIT stream: each record upserted by its action id (uuid)
GRANT SELECT, INSERT, UPDATE ON admin_actions TO boxoffice_reaper;

-- What the self-audit (20261201000550_audit.sql) needs of the service roles (20261201000600):
-- the reaper runs the inventory, money, timeliness and errors checks, the webhook service the
-- Stripe check; both record runs and findings. The checks read across the domains (an auditor
-- does); what is secret stays out of reach: a PaymentIntent's answer (its client secret) in
-- payment_intents_log, a Stripe event's payload, an error report's content.

GRANT SELECT,
      UPDATE (checkpoint, started_at, finished_at, mode, examined, in_flight, violations,
              new_violations, resolved, seconds, error, replica, last_full_at)
    ON audit_checks TO boxoffice_reaper, boxoffice_webhook;
GRANT SELECT, INSERT, UPDATE (subject_ids, expected, found, last_seen, seen, resolved_at)
    ON audit_findings TO boxoffice_reaper, boxoffice_webhook;
GRANT USAGE ON SEQUENCE audit_findings_id_seq TO boxoffice_reaper, boxoffice_webhook;
GRANT SELECT, INSERT, DELETE, UPDATE (held, sold) ON audit_bucket_marks TO boxoffice_reaper;

-- the reaper's checks: events' capacity, money against tickets, what waits too long
GRANT SELECT ON ticketed_events TO boxoffice_reaper;
REVOKE SELECT ON payments, stripe_actions FROM boxoffice_reaper;  -- column grants, now whole
GRANT SELECT ON payments, stripe_actions TO boxoffice_reaper;
GRANT SELECT (event_type, processing_status, attempts, last_error, received_at)
    ON webhook_events_log TO boxoffice_reaper;

-- What Sentry SDKs send besides errors (issue 12), kept by the error-sink from the SENTRY_ITEMS
-- stream. An item names the error it is about by the event's id (error_logs.id): no foreign
-- key, because the event and its items travel on two streams and either may be stored first.

CREATE TABLE error_feedback (
    id          uuid PRIMARY KEY,
    received_at timestamptz NOT NULL DEFAULT now(),
    occurred_at timestamptz NOT NULL,
    service     text NOT NULL,
    project_id  text NOT NULL,
    event_id    uuid,
    source      text NOT NULL CHECK (source IN ('feedback', 'user_report', 'endpoint')),
    name        text,
    email       text,
    message     text NOT NULL,
    url         text,
    environment text,
    release     text
);
CREATE INDEX error_feedback_event_id ON error_feedback (event_id);
CREATE INDEX error_feedback_received_at ON error_feedback (received_at);

CREATE TABLE error_attachments (
    id              uuid PRIMARY KEY,
    received_at     timestamptz NOT NULL DEFAULT now(),
    event_id        uuid,
    service         text NOT NULL,
    project_id      text NOT NULL,
    filename        text NOT NULL,
    content_type    text NOT NULL,
    attachment_type text NOT NULL,
    size            integer NOT NULL CHECK (size >= 0),
    data            bytea NOT NULL
);
CREATE INDEX error_attachments_event_id ON error_attachments (event_id);
CREATE INDEX error_attachments_received_at ON error_attachments (received_at);

-- What was dropped, by whom: the SDKs' client reports (origin client) and what ingress itself
-- left out of an envelope (origin server: an attachment over a limit, a refused category).
CREATE TABLE error_discards (
    report_id   uuid NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now(),
    service     text NOT NULL,
    project_id  text NOT NULL,
    origin      text NOT NULL CHECK (origin IN ('client', 'server')),
    reason      text NOT NULL,
    category    text NOT NULL,
    quantity    bigint NOT NULL CHECK (quantity >= 0),
    PRIMARY KEY (report_id, origin, reason, category)
);
CREATE INDEX error_discards_received_at ON error_discards (received_at);

GRANT SELECT, INSERT ON error_feedback, error_attachments, error_discards TO boxoffice_error_sink;

-- Cron monitors and their check-ins (issue 12): created or updated by a check-in's
-- monitor_config (the error-sink), watched by the reaper's timer, which reports a run that did
-- not check in by next_expected_at + checkin_margin (missed) or stayed in progress past
-- max_runtime (timeout) as a critical error of the monitor's service.
CREATE TABLE monitors (
    service          text NOT NULL,
    slug             text NOT NULL,
    project_id       text NOT NULL,
    schedule_type    text NOT NULL CHECK (schedule_type IN ('crontab', 'interval')),
    schedule_value   text NOT NULL,
    schedule_unit    text,
    checkin_margin   integer NOT NULL DEFAULT 1 CHECK (checkin_margin >= 0),  -- minutes
    max_runtime      integer NOT NULL DEFAULT 30 CHECK (max_runtime >= 1),    -- minutes
    timezone         text,
    status           text NOT NULL DEFAULT 'new',
    last_checkin_at  timestamptz,
    last_checkin_status text,
    last_duration    double precision,
    next_expected_at timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (service, slug)
);
CREATE INDEX monitors_due ON monitors (next_expected_at);

CREATE TABLE monitor_checkins (
    id           uuid PRIMARY KEY,
    service      text NOT NULL,
    slug         text NOT NULL,
    status       text NOT NULL CHECK (status IN ('in_progress', 'ok', 'error')),
    started_at   timestamptz NOT NULL,
    updated_at   timestamptz NOT NULL,
    duration     double precision,
    environment  text,
    timed_out_at timestamptz
);
CREATE INDEX monitor_checkins_running ON monitor_checkins (started_at) WHERE status = 'in_progress';

-- Release health: each session by its id in its latest state, and SDKs' aggregated buckets.
CREATE TABLE release_sessions (
    service     text NOT NULL,
    sid         text NOT NULL,
    release     text NOT NULL,
    environment text NOT NULL,
    did         text,
    started     timestamptz NOT NULL,
    status      text NOT NULL,
    errors      integer NOT NULL DEFAULT 0,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (service, sid)
);
CREATE INDEX release_sessions_started ON release_sessions (started);
CREATE TABLE release_session_buckets (
    message_id  uuid NOT NULL,
    idx         integer NOT NULL,
    service     text NOT NULL,
    release     text NOT NULL,
    environment text NOT NULL,
    started     timestamptz NOT NULL,
    exited      integer NOT NULL DEFAULT 0,
    errored     integer NOT NULL DEFAULT 0,
    abnormal    integer NOT NULL DEFAULT 0,
    crashed     integer NOT NULL DEFAULT 0,
    PRIMARY KEY (message_id, idx)
);
CREATE INDEX release_session_buckets_started ON release_session_buckets (started);

GRANT SELECT, INSERT, UPDATE (project_id, schedule_type, schedule_value, schedule_unit,
                              checkin_margin, max_runtime, timezone, status, last_checkin_at,
                              last_checkin_status, last_duration, next_expected_at)
    ON monitors TO boxoffice_error_sink;
GRANT SELECT, INSERT, UPDATE (status, updated_at, duration, environment)
    ON monitor_checkins TO boxoffice_error_sink;
GRANT SELECT, UPDATE (status, next_expected_at) ON monitors TO boxoffice_reaper;
GRANT SELECT, UPDATE (timed_out_at) ON monitor_checkins TO boxoffice_reaper;
GRANT SELECT, INSERT, UPDATE (status, errors, updated_at, did) ON release_sessions TO boxoffice_error_sink;
GRANT SELECT, INSERT ON release_session_buckets TO boxoffice_error_sink;

-- Retention (the reaper, ERROR_RETENTION_DAYS) of what Sentry SDKs send besides errors: it
-- reads each row's age, locks the rows of a batch (FOR UPDATE needs UPDATE on one column, never
-- written) and deletes them; never a row's content.
GRANT SELECT (id, received_at), UPDATE (received_at), DELETE
    ON error_attachments, error_feedback TO boxoffice_reaper;
GRANT SELECT (report_id, origin, reason, category, received_at), UPDATE (received_at), DELETE
    ON error_discards TO boxoffice_reaper;
GRANT DELETE ON monitor_checkins TO boxoffice_reaper;
GRANT SELECT (service, sid, updated_at), UPDATE (updated_at), DELETE
    ON release_sessions TO boxoffice_reaper;
GRANT SELECT (message_id, idx, started), UPDATE (started), DELETE
    ON release_session_buckets TO boxoffice_reaper;

-- Source maps uploaded by operators per release (issue 12): the error-sink resolves minified
-- JavaScript frames with them when an error group is shown. ``name`` is the minified file as
-- frames name it: its URL, or ``~/path`` (any origin).
CREATE TABLE source_maps (
    release     text NOT NULL,
    name        text NOT NULL,
    map         bytea NOT NULL,
    size        integer NOT NULL,
    uploaded_at timestamptz NOT NULL DEFAULT now(),
    -- a source map may name its Debug ID (also in the bundle's ``//# debugId=``); an event's
    -- ``debug_meta.images`` then finds it whatever the file's URL or release
    debug_id    uuid,
    PRIMARY KEY (release, name)
);
CREATE INDEX source_maps_debug_id ON source_maps (debug_id) WHERE debug_id IS NOT NULL;

GRANT SELECT, INSERT, UPDATE (map, size, uploaded_at, debug_id) ON source_maps
    TO boxoffice_error_sink;

-- migrate:down

-- The functions of libs/boxoffice/sql go with the tables they work on.
DO $$
DECLARE
    f regprocedure;
BEGIN
    FOR f IN SELECT oid::regprocedure FROM pg_proc WHERE pronamespace = 'public'::regnamespace LOOP
        EXECUTE format('DROP FUNCTION %s CASCADE', f);
    END LOOP;
END $$;

DROP TABLE ticketed_events, inventory_buckets, reservations, reservation_allocations,
    payment_intents_log, payments, webhook_events_log, error_groups, error_logs, outbox,
    reaper_runs, error_alerts, stripe_actions, stripe_reconciliation,
    stripe_reconcile_runs, stripe_orphans, stripe_reconcile_checks, admin_actions,
    audit_checks, audit_findings, audit_bucket_marks, error_feedback, error_attachments,
    error_discards, monitors, monitor_checkins, release_sessions,
    release_session_buckets, source_maps, schema_functions;

-- The roles stay: they belong to the cluster (other databases may use them). Their privileges
-- here go, and PUBLIC gets back what PostgreSQL gives it by default, except CREATE on the
-- schema (PostgreSQL 15 and later no longer give it either).
REVOKE ALL ON ALL SEQUENCES IN SCHEMA public
    FROM boxoffice_payment, boxoffice_webhook, boxoffice_error_sink, boxoffice_reaper;
REVOKE ALL ON ALL TABLES IN SCHEMA public
    FROM boxoffice_payment, boxoffice_webhook, boxoffice_error_sink, boxoffice_reaper;
REVOKE ALL ON SCHEMA public
    FROM boxoffice_payment, boxoffice_webhook, boxoffice_error_sink, boxoffice_reaper;
ALTER DEFAULT PRIVILEGES GRANT EXECUTE ON FUNCTIONS TO PUBLIC;
GRANT USAGE ON SCHEMA public TO PUBLIC;
