-- migrate:up

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

-- migrate:down

DROP TABLE error_discards;
DROP TABLE error_attachments;
DROP TABLE error_feedback;
