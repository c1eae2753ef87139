-- migrate:up

-- A hot event's bucket rows are updated by every hold. Packed 100 to a page, its 64 rows share a
-- page or two that every concurrent hold pins, so pruning, which needs the page to itself, rarely
-- gets it: each row's chain of dead versions grew by thousands and every hold walked them
-- (PostgreSQL's CPU per hold rose several times over within seconds of load). At most a tenth of
-- a page filled by inserts spreads an event's buckets over several pages and leaves each room
-- for its updates on its own page (HOT). Rows written from now on; a bucket row is small.
ALTER TABLE inventory_buckets SET (fillfactor = 10);

-- migrate:down

ALTER TABLE inventory_buckets RESET (fillfactor);
