-- migrate:up

-- Rate alerts: each group counts its reports in a fixed window that restarts when it is over,
-- so "passes N reports a minute" is decided in the same statement that counts them (replicas
-- of the error-sink agree). regressed_at: when a new report reopened a resolved group.
ALTER TABLE error_groups
    ADD COLUMN rate_window_start timestamptz,
    ADD COLUMN rate_window_count bigint NOT NULL DEFAULT 0,
    ADD COLUMN regressed_at      timestamptz;
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
    last_error    text
);
CREATE INDEX error_alerts_pending ON error_alerts (next_attempt)
    WHERE published_at IS NULL OR notified_at IS NULL;
CREATE INDEX error_alerts_group ON error_alerts (group_id, created_at DESC);

-- migrate:down

DROP TABLE error_alerts;
DROP INDEX error_groups_service;
ALTER TABLE error_groups
    DROP COLUMN regressed_at,
    DROP COLUMN rate_window_count,
    DROP COLUMN rate_window_start;
