-- migrate:up

-- A source map may name its Debug ID (``debug_id``, also in the bundle's ``//# debugId=``); an
-- event's ``debug_meta.images`` then finds it whatever the file's URL or release.
ALTER TABLE source_maps ADD COLUMN debug_id uuid;
CREATE INDEX source_maps_debug_id ON source_maps (debug_id) WHERE debug_id IS NOT NULL;
GRANT UPDATE (debug_id) ON source_maps TO boxoffice_error_sink;

-- migrate:down

REVOKE UPDATE (debug_id) ON source_maps FROM boxoffice_error_sink;
DROP INDEX source_maps_debug_id;
ALTER TABLE source_maps DROP COLUMN debug_id;
