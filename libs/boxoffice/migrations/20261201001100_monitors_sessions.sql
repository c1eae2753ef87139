-- migrate:up

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

-- migrate:down

DROP TABLE release_session_buckets;
DROP TABLE release_sessions;
DROP TABLE monitor_checkins;
DROP TABLE monitors;
