-- migrate:up

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

-- migrate:down

DROP INDEX stripe_actions_updated;
DROP INDEX payments_updated;
DROP TABLE audit_bucket_marks;
DROP TABLE audit_findings;
DROP TABLE audit_checks;
