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

-- ---------------------------------------------------------------------------
-- Schema changes in WAL order: the DDL event trigger.
--
-- walbust must learn about a migration on the tables its rules name (a table
-- dropped and re-created, renamed away and replaced, a column renamed) at the
-- migration's commit, in order with the row changes around it. The event
-- triggers below emit one *transactional* logical message per DDL command,
-- with the distinct prefix 'walbust.ddl' (so walbust's explicit-invalidation
-- handling, prefix 'walbust', never sees it):
--
--   pg_logical_emit_message(true, 'walbust.ddl',
--     '{"v": 1, "op": "ddl", "event": "ddl_command_end", "tag": "CREATE TABLE",
--       "objects": [{"type": "table", "identity": "public.t", "oid": 16385}]}')
--
-- "event" is ddl_command_end or sql_drop, "tag" the command tag, "objects"
-- the objects the command created, altered or dropped, as
-- pg_event_trigger_ddl_commands() / pg_event_trigger_dropped_objects() name
-- them (object_type, object_identity, objid). Only the object types that can
-- change what walbust decodes are described: table, table column, index,
-- schema, publication, publication relation and publication namespace;
-- objects in temporary schemas are left out; a command with nothing left
-- (CREATE FUNCTION, GRANT, CREATE TEMP TABLE, ...) emits nothing. A rolled-back
-- migration emits nothing (the message is transactional).
--
-- The trigger never makes the application's DDL fail: the body catches every
-- error and turns it into a WARNING (walbust's periodic catalog re-check then
-- still finds the change, later). With wal_level below logical it does
-- nothing. Creating event triggers needs a superuser: when this script runs
-- as another role, the triggers are skipped with a NOTICE, everything else
-- is installed, and walbust relies on pgoutput's Relation messages and its
-- periodic catalog re-check alone (see docs/sql.md).
-- ---------------------------------------------------------------------------

CREATE OR REPLACE FUNCTION walbust.ddl_message(event text, tag text, objects jsonb)
RETURNS void
LANGUAGE plpgsql
VOLATILE
PARALLEL UNSAFE
SECURITY INVOKER
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    IF objects IS NULL OR jsonb_array_length(objects) = 0
       OR current_setting('wal_level') <> 'logical' THEN
        RETURN;
    END IF;
    PERFORM pg_logical_emit_message(true, 'walbust.ddl',
        jsonb_build_object('v', 1, 'op', 'ddl', 'event', event, 'tag', tag,
                           'objects', objects)::text);
END;
$fn$;

COMMENT ON FUNCTION walbust.ddl_message(text, text, jsonb) IS
    'Emit the transactional logical message {"v":1,"op":"ddl","event":...,"tag":...,"objects":[...]} with prefix walbust.ddl (nothing for an empty object list or below wal_level logical). Called by the walbust_ddl_end and walbust_ddl_drop event triggers.';

CREATE OR REPLACE FUNCTION walbust.on_ddl_end()
RETURNS event_trigger
LANGUAGE plpgsql
SECURITY INVOKER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    objs jsonb;
BEGIN
    SELECT jsonb_agg(jsonb_build_object('type', c.object_type,
                                        'identity', c.object_identity,
                                        'oid', c.objid::bigint))
      INTO objs
      FROM pg_event_trigger_ddl_commands() AS c
     WHERE c.object_type IN ('table', 'table column', 'index', 'schema',
                             'publication', 'publication relation',
                             'publication namespace')
       AND (c.schema_name IS NULL
            OR (c.schema_name NOT LIKE 'pg\_temp%' AND c.schema_name NOT LIKE 'pg\_toast%'));
    PERFORM walbust.ddl_message('ddl_command_end', tg_tag, objs);
EXCEPTION WHEN OTHERS THEN
    RAISE WARNING 'walbust: could not describe % to walbust (% %); the DDL goes ahead, walbust''s periodic catalog re-check will see it',
        tg_tag, SQLSTATE, SQLERRM;
END;
$fn$;

COMMENT ON FUNCTION walbust.on_ddl_end() IS
    'Event trigger function (ddl_command_end): describes each DDL command to walbust with walbust.ddl_message(). Never fails the DDL: errors become a WARNING.';

CREATE OR REPLACE FUNCTION walbust.on_sql_drop()
RETURNS event_trigger
LANGUAGE plpgsql
SECURITY INVOKER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    objs jsonb;
BEGIN
    SELECT jsonb_agg(jsonb_build_object('type', d.object_type,
                                        'identity', d.object_identity,
                                        'oid', d.objid::bigint))
      INTO objs
      FROM pg_event_trigger_dropped_objects() AS d
     WHERE d.object_type IN ('table', 'table column', 'index', 'schema',
                             'publication', 'publication relation',
                             'publication namespace')
       AND NOT d.is_temporary AND d.original
       AND (d.schema_name IS NULL OR d.schema_name NOT LIKE 'pg\_toast%');
    PERFORM walbust.ddl_message('sql_drop', tg_tag, objs);
EXCEPTION WHEN OTHERS THEN
    RAISE WARNING 'walbust: could not describe % to walbust (% %); the DDL goes ahead, walbust''s periodic catalog re-check will see it',
        tg_tag, SQLSTATE, SQLERRM;
END;
$fn$;

COMMENT ON FUNCTION walbust.on_sql_drop() IS
    'Event trigger function (sql_drop): describes each dropped object to walbust with walbust.ddl_message(). Never fails the DDL: errors become a WARNING.';

-- Event triggers need a superuser; CREATE EVENT TRIGGER has no IF NOT
-- EXISTS, so create each one only when missing (a re-run keeps them, and
-- CREATE OR REPLACE above already updated their functions).
DO $do$
BEGIN
    IF NOT (SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user) THEN
        RAISE NOTICE 'walbust: not a superuser, so the DDL event triggers are not installed; walbust sees schema changes through pgoutput and its periodic catalog re-check only (docs/sql.md)';
        RETURN;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_event_trigger WHERE evtname = 'walbust_ddl_end') THEN
        CREATE EVENT TRIGGER walbust_ddl_end ON ddl_command_end
            EXECUTE FUNCTION walbust.on_ddl_end();
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_event_trigger WHERE evtname = 'walbust_ddl_drop') THEN
        CREATE EVENT TRIGGER walbust_ddl_drop ON sql_drop
            EXECUTE FUNCTION walbust.on_sql_drop();
    END IF;
    COMMENT ON EVENT TRIGGER walbust_ddl_end IS
        'walbust: tells walbust about DDL at its commit, in WAL order (logical message prefix walbust.ddl)';
    COMMENT ON EVENT TRIGGER walbust_ddl_drop IS
        'walbust: tells walbust about dropped objects at the commit, in WAL order (logical message prefix walbust.ddl)';
END
$do$;

GRANT EXECUTE ON FUNCTION walbust.ddl_message(text, text, jsonb) TO PUBLIC;
GRANT EXECUTE ON FUNCTION walbust.on_ddl_end() TO PUBLIC;
GRANT EXECUTE ON FUNCTION walbust.on_sql_drop() TO PUBLIC;
