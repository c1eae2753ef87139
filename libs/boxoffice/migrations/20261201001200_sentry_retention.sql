-- migrate:up

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

-- migrate:down

REVOKE SELECT (message_id, idx, started), UPDATE (started), DELETE
    ON release_session_buckets FROM boxoffice_reaper;
REVOKE SELECT (service, sid, updated_at), UPDATE (updated_at), DELETE
    ON release_sessions FROM boxoffice_reaper;
REVOKE DELETE ON monitor_checkins FROM boxoffice_reaper;
REVOKE SELECT (report_id, origin, reason, category, received_at), UPDATE (received_at), DELETE
    ON error_discards FROM boxoffice_reaper;
REVOKE SELECT (id, received_at), UPDATE (received_at), DELETE
    ON error_attachments, error_feedback FROM boxoffice_reaper;
