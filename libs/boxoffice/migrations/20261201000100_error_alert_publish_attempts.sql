-- migrate:up

-- An alert's failures to publish to ALERTS and to reach ALERT_WEBHOOK_URL are counted apart: a
-- bus outage must not use up the webhook's attempts, nor stop the publishing, which never gives
-- up (ALERTS is the record other systems read).
ALTER TABLE error_alerts ADD COLUMN publish_attempts integer NOT NULL DEFAULT 0;
COMMENT ON COLUMN error_alerts.attempts IS 'failed posts to ALERT_WEBHOOK_URL (at most MAX_ATTEMPTS)';
COMMENT ON COLUMN error_alerts.publish_attempts IS 'failed publishes to ALERTS (retried without end)';

-- migrate:down

COMMENT ON COLUMN error_alerts.attempts IS NULL;
ALTER TABLE error_alerts DROP COLUMN publish_attempts;
