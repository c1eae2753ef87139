-- migrate:up

-- Every action an operate-scoped admin token takes through ingress: recorded before it is carried
-- out (an action that cannot be recorded is refused), its HTTP status after. The actor is the
-- token's id (a digest), never the token.
CREATE TABLE admin_actions (
    id           bigserial PRIMARY KEY,
    at           timestamptz NOT NULL DEFAULT clock_timestamp(),
    actor        text NOT NULL,
    action       text NOT NULL,
    target       text NOT NULL,
    request_id   text NOT NULL DEFAULT '',
    status       integer,
    finished_at  timestamptz,
    CONSTRAINT admin_actions_finished CHECK ((status IS NULL) = (finished_at IS NULL))
);
CREATE INDEX admin_actions_actor ON admin_actions (actor, id DESC);

-- migrate:down

DROP TABLE admin_actions;
