-- sql/walbust.sql — explicit cache invalidation from SQL (PostgreSQL 14+).
--
-- Installs schema `walbust` with functions that applications call inside
-- their own transactions to ask walbust to invalidate Redis keys, key
-- patterns or tag sets:
--
--   SELECT walbust.invalidate('user:42', 'user:42:profile');
--   SELECT walbust.invalidate_pattern('team:7:*');
--   SELECT walbust.invalidate_tag('user:42');
--   SELECT walbust.invalidate(VARIADIC ARRAY['a', 'b']);   -- array form
--
-- Each call writes one *transactional* logical decoding message to the WAL:
--
--   pg_logical_emit_message(true, 'walbust', '{"v": 1, "op": "invalidate", "keys": [...]}')
--
-- The JSON is built with jsonb functions, never by string concatenation, so
-- any key text is escaped correctly. Members: "v" (message format version,
-- the number 1; see walbust.version()), "op" ("invalidate",
-- "invalidate_pattern" or "invalidate_tag") and one array, "keys",
-- "patterns" or "tags", holding the arguments in call order. NULL elements
-- are dropped; a call whose array is NULL, empty or all NULL emits nothing.
--
-- Because the message is transactional, logical decoding delivers it only
-- when the calling transaction commits, at the transaction's commit position;
-- a rollback (or ROLLBACK TO SAVEPOINT past the call) discards it. walbust
-- therefore applies explicit invalidations in commit order together with the
-- row-change invalidations of the same transaction, and never for aborted work.
--
-- Privileges: the functions are SECURITY INVOKER and EXECUTE is granted to
-- PUBLIC, as is USAGE on the schema. This grants nothing new: any role may
-- already call pg_logical_emit_message() directly. To restrict who can request
-- invalidations, REVOKE EXECUTE ... FROM PUBLIC after installing (re-running
-- this script grants it again).
--
-- The script is idempotent (safe to run again to upgrade or repair) and is
-- plain SQL without psql meta-commands, so it can be run with
-- `psql -f sql/walbust.sql` or sent as one multi-statement query (as
-- `walbust setup` does). Use `psql -1 -f` to install it atomically.

CREATE SCHEMA IF NOT EXISTS walbust;

COMMENT ON SCHEMA walbust IS
    'walbust: explicit, transactional Redis cache invalidation (see docs/sql.md)';

GRANT USAGE ON SCHEMA walbust TO PUBLIC;

CREATE OR REPLACE FUNCTION walbust.version()
RETURNS text
LANGUAGE sql
IMMUTABLE
PARALLEL SAFE
SECURITY INVOKER
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT '1'::text
$fn$;

COMMENT ON FUNCTION walbust.version() IS
    'Version of the walbust message format emitted by this schema (the "v" member of every message): ''1''.';

CREATE OR REPLACE FUNCTION walbust.invalidate(VARIADIC keys text[])
RETURNS void
LANGUAGE plpgsql
VOLATILE
PARALLEL UNSAFE
SECURITY INVOKER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    items jsonb;
BEGIN
    SELECT jsonb_agg(u.item ORDER BY u.ord) INTO items
      FROM unnest(keys) WITH ORDINALITY AS u(item, ord)
     WHERE u.item IS NOT NULL;
    IF items IS NOT NULL THEN
        PERFORM pg_logical_emit_message(true, 'walbust',
            jsonb_build_object('v', 1, 'op', 'invalidate', 'keys', items)::text);
    END IF;
END;
$fn$;

COMMENT ON FUNCTION walbust.invalidate(VARIADIC text[]) IS
    'Ask walbust to delete (UNLINK, or DEL per defaults.delete) these Redis keys when the calling transaction commits. Emits the transactional logical message {"v":1,"op":"invalidate","keys":[...]} with prefix walbust; NULL elements are dropped, an empty or all-NULL call emits nothing. Nothing happens if the transaction rolls back.';

CREATE OR REPLACE FUNCTION walbust.invalidate_pattern(VARIADIC patterns text[])
RETURNS void
LANGUAGE plpgsql
VOLATILE
PARALLEL UNSAFE
SECURITY INVOKER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    items jsonb;
BEGIN
    SELECT jsonb_agg(u.item ORDER BY u.ord) INTO items
      FROM unnest(patterns) WITH ORDINALITY AS u(item, ord)
     WHERE u.item IS NOT NULL;
    IF items IS NOT NULL THEN
        PERFORM pg_logical_emit_message(true, 'walbust',
            jsonb_build_object('v', 1, 'op', 'invalidate_pattern', 'patterns', items)::text);
    END IF;
END;
$fn$;

COMMENT ON FUNCTION walbust.invalidate_pattern(VARIADIC text[]) IS
    'Ask walbust to delete every Redis key matching these glob patterns (SCAN MATCH + UNLINK on every master) when the calling transaction commits. Patterns are used verbatim: escape *, ?, [, ] and backslash in values yourself. Emits {"v":1,"op":"invalidate_pattern","patterns":[...]}; NULL elements are dropped, an empty or all-NULL call emits nothing.';

CREATE OR REPLACE FUNCTION walbust.invalidate_tag(VARIADIC tags text[])
RETURNS void
LANGUAGE plpgsql
VOLATILE
PARALLEL UNSAFE
SECURITY INVOKER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    items jsonb;
BEGIN
    SELECT jsonb_agg(u.item ORDER BY u.ord) INTO items
      FROM unnest(tags) WITH ORDINALITY AS u(item, ord)
     WHERE u.item IS NOT NULL;
    IF items IS NOT NULL THEN
        PERFORM pg_logical_emit_message(true, 'walbust',
            jsonb_build_object('v', 1, 'op', 'invalidate_tag', 'tags', items)::text);
    END IF;
END;
$fn$;

COMMENT ON FUNCTION walbust.invalidate_tag(VARIADIC text[]) IS
    'Ask walbust to delete every member of the Redis set <tag_prefix><tag>, and the set itself, for each tag when the calling transaction commits. Emits {"v":1,"op":"invalidate_tag","tags":[...]}; NULL elements are dropped, an empty or all-NULL call emits nothing.';

GRANT EXECUTE ON FUNCTION walbust.version() TO PUBLIC;
GRANT EXECUTE ON FUNCTION walbust.invalidate(VARIADIC text[]) TO PUBLIC;
GRANT EXECUTE ON FUNCTION walbust.invalidate_pattern(VARIADIC text[]) TO PUBLIC;
GRANT EXECUTE ON FUNCTION walbust.invalidate_tag(VARIADIC text[]) TO PUBLIC;
