-- migrate:up

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

-- migrate:down

DROP TABLE admin_actions;
