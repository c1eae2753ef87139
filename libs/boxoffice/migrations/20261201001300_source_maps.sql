-- migrate:up

-- Source maps uploaded by operators per release (issue 12): the error-sink resolves minified
-- JavaScript frames with them when an error group is shown. ``name`` is the minified file as
-- frames name it: its URL, or ``~/path`` (any origin).
CREATE TABLE source_maps (
    release     text NOT NULL,
    name        text NOT NULL,
    map         bytea NOT NULL,
    size        integer NOT NULL,
    uploaded_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (release, name)
);

GRANT SELECT, INSERT, UPDATE (map, size, uploaded_at) ON source_maps TO boxoffice_error_sink;

-- migrate:down

DROP TABLE source_maps;
