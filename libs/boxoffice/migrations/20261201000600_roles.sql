-- migrate:up

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
-- A table, sequence or function added by a later migration is granted to nobody (functions are
-- no longer executable by PUBLIC by default): that migration grants what each service needs, and
-- tests/db_grants.py, which tests/test_db_roles.py compares with the catalog, says the same.

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
GRANT SELECT ON schema_migrations
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
GRANT EXECUTE ON FUNCTION request_stripe_action
    TO boxoffice_payment, boxoffice_webhook, boxoffice_reaper;
-- expire a batch of overdue holds (the reaper; holds, and a payment for an ended hold, expire
-- an event's overdue holds before saying sold out)
GRANT EXECUTE ON FUNCTION expire_due_reservations, reap_due_reservations
    TO boxoffice_payment, boxoffice_webhook, boxoffice_reaper;
GRANT EXECUTE ON FUNCTION release_reservation TO boxoffice_payment, boxoffice_webhook;
GRANT EXECUTE ON FUNCTION hold_tickets, hold_tickets_in, hold_probe
    TO boxoffice_payment, boxoffice_webhook;

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
GRANT EXECUTE ON FUNCTION create_ticketed_event, hold_tickets_batch, claim_payment_intent,
                          record_payment_intent
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
GRANT EXECUTE ON FUNCTION apply_stripe_event, advance_payment, payment_status_rank,
                          emit_payment_event, complete_reservation, return_reservation_tickets,
                          claim_stripe_actions, finish_stripe_action
    TO boxoffice_webhook;

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
GRANT EXECUTE ON FUNCTION get_reservation_stats TO boxoffice_reaper;

-- migrate:down

-- The roles stay: they belong to the cluster (other databases may use them). Their privileges
-- here go, and PUBLIC gets back what PostgreSQL gives it by default, except CREATE on the
-- schema (PostgreSQL 15 and later no longer give it either).
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA public
    FROM boxoffice_payment, boxoffice_webhook, boxoffice_error_sink, boxoffice_reaper;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA public
    FROM boxoffice_payment, boxoffice_webhook, boxoffice_error_sink, boxoffice_reaper;
REVOKE ALL ON ALL TABLES IN SCHEMA public
    FROM boxoffice_payment, boxoffice_webhook, boxoffice_error_sink, boxoffice_reaper;
REVOKE ALL ON SCHEMA public
    FROM boxoffice_payment, boxoffice_webhook, boxoffice_error_sink, boxoffice_reaper;
ALTER DEFAULT PRIVILEGES GRANT EXECUTE ON FUNCTIONS TO PUBLIC;
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA public TO PUBLIC;
GRANT USAGE ON SCHEMA public TO PUBLIC;
