-- migrate:up

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

-- migrate:down

REVOKE SELECT (event_type, processing_status, attempts, last_error, received_at)
    ON webhook_events_log FROM boxoffice_reaper;
REVOKE SELECT ON payments, stripe_actions FROM boxoffice_reaper;
GRANT SELECT (payment_intent_id, reservation_id, amount, status) ON payments TO boxoffice_reaper;
GRANT SELECT (id, kind, payment_intent_id) ON stripe_actions TO boxoffice_reaper;
REVOKE SELECT ON ticketed_events FROM boxoffice_reaper;
REVOKE ALL ON audit_bucket_marks FROM boxoffice_reaper;
REVOKE ALL ON SEQUENCE audit_findings_id_seq FROM boxoffice_reaper, boxoffice_webhook;
REVOKE ALL ON audit_findings, audit_checks FROM boxoffice_reaper, boxoffice_webhook;
