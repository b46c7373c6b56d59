-- tests/sql/20_ddl.sql — pgTAP: the DDL event triggers of sql/walbust.sql
-- (walbust_ddl_end, walbust_ddl_drop) and the 'walbust.ddl' logical messages
-- they write, read back through a temporary test_decoding slot.
--
-- Like 10_messages.sql this runs at top level (transactional messages are
-- decoded only after their commit) and changes the target database only by
-- reinstalling sql/walbust.sql and creating/dropping tables named
-- walbust_pgtap_ddl*; the slot is TEMPORARY. Must run as a superuser (event
-- triggers). Run with:
--   pg_prove -d postgres -h 127.0.0.1 -p $PGPORT -U postgres tests/sql/*.sql

SET client_min_messages = warning;
CREATE EXTENSION IF NOT EXISTS pgtap;

\ir ../../sql/walbust.sql

DROP TABLE IF EXISTS public.walbust_pgtap_ddl, public.walbust_pgtap_ddl_old,
    public.walbust_pgtap_ddl_new;
DROP PUBLICATION IF EXISTS walbust_pgtap_ddl_pub;
DROP ROLE IF EXISTS walbust_pgtap_ddl_app;

DO $$
BEGIN
    PERFORM pg_create_logical_replication_slot(
        'walbust_pgtap_ddl_' || pg_backend_pid(), 'test_decoding', true);
END
$$;

CREATE TEMP TABLE walbust_pgtap_ddl_got (n bigint, xid xid, data text);

-- Consume everything decoded so far; return the number of 'walbust.ddl'
-- messages among it.
CREATE FUNCTION pg_temp.drain() RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    got integer;
BEGIN
    DELETE FROM pg_temp.walbust_pgtap_ddl_got;
    INSERT INTO pg_temp.walbust_pgtap_ddl_got
    SELECT c.n, c.xid, c.data
      FROM pg_logical_slot_get_changes('walbust_pgtap_ddl_' || pg_backend_pid(), NULL, NULL,
                                       'include-xids', '0')
           WITH ORDINALITY AS c(lsn, xid, data, n);
    SELECT count(*) INTO got FROM pg_temp.walbust_pgtap_ddl_got
     WHERE data LIKE 'message: transactional: 1 prefix: walbust.ddl, %';
    RETURN got;
END
$$;

-- The JSON contents of the 'walbust.ddl' messages of the last drain().
CREATE FUNCTION pg_temp.ddl() RETURNS jsonb[] LANGUAGE sql AS $$
    SELECT coalesce(array_agg(substr(data, strpos(data, 'content:') + 8)::jsonb
                              ORDER BY n), '{}')
      FROM pg_temp.walbust_pgtap_ddl_got
     WHERE data LIKE 'message: % prefix: walbust.ddl, %'
$$;

-- Messages with any other prefix of the last drain() (must be none).
CREATE FUNCTION pg_temp.other_msgs() RETURNS integer LANGUAGE sql AS $$
    SELECT count(*)::integer FROM pg_temp.walbust_pgtap_ddl_got
     WHERE data LIKE 'message: %' AND data NOT LIKE 'message: % prefix: walbust.ddl, %'
$$;

-- One expected message.
CREATE FUNCTION pg_temp.msg(event text, tag text, VARIADIC objs jsonb[]) RETURNS jsonb
LANGUAGE sql AS $$
    SELECT jsonb_build_object('v', 1, 'op', 'ddl', 'event', event, 'tag', tag,
                              'objects', to_jsonb(objs))
$$;
CREATE FUNCTION pg_temp.obj(type text, identity text, relid oid) RETURNS jsonb
LANGUAGE sql AS $$
    SELECT jsonb_build_object('type', type, 'identity', identity, 'oid', relid::bigint)
$$;

DO $$BEGIN PERFORM pg_temp.drain(); END$$;

SELECT plan(25);

-- 1. Installed, enabled, idempotent.
SELECT is(
    (SELECT array_agg(evtname || ':' || evtevent || ':' || evtfoid::regproc::text || ':'
                      || evtenabled::text ORDER BY evtname)
       FROM pg_event_trigger WHERE evtname LIKE 'walbust%'),
    ARRAY['walbust_ddl_drop:sql_drop:walbust.on_sql_drop:O',
          'walbust_ddl_end:ddl_command_end:walbust.on_ddl_end:O'],
    'both event triggers are installed once, enabled, on their functions');
\ir ../../sql/walbust.sql
SELECT is((SELECT count(*)::integer FROM pg_event_trigger WHERE evtname LIKE 'walbust%'), 2,
    'reinstalling keeps exactly two event triggers');
SELECT ok((SELECT bool_and(obj_description(oid, 'pg_event_trigger') LIKE 'walbust:%')
             FROM pg_event_trigger WHERE evtname LIKE 'walbust%'),
    'both event triggers have a COMMENT');
DO $$BEGIN PERFORM pg_temp.drain(); END$$;

-- 2. CREATE TABLE: the table (and its primary key index).
CREATE TABLE public.walbust_pgtap_ddl (id integer PRIMARY KEY, name text);
SELECT is(pg_temp.drain(), 1, 'CREATE TABLE: one message');
SELECT is(pg_temp.ddl(), ARRAY[pg_temp.msg('ddl_command_end', 'CREATE TABLE',
    pg_temp.obj('table', 'public.walbust_pgtap_ddl', 'public.walbust_pgtap_ddl'::regclass::oid),
    pg_temp.obj('index', 'public.walbust_pgtap_ddl_pkey',
                'public.walbust_pgtap_ddl_pkey'::regclass::oid))],
    'CREATE TABLE: exact JSON with table and index identities and oids');
SELECT is(pg_temp.other_msgs(), 0, 'no message with the explicit-invalidation prefix');

-- 3. Rename a column: the column under its new name, the table's oid.
ALTER TABLE public.walbust_pgtap_ddl RENAME COLUMN name TO full_name;
SELECT is(pg_temp.drain(), 1, 'RENAME COLUMN: one message');
SELECT is(pg_temp.ddl(), ARRAY[pg_temp.msg('ddl_command_end', 'ALTER TABLE',
    pg_temp.obj('table column', 'public.walbust_pgtap_ddl.full_name',
                'public.walbust_pgtap_ddl'::regclass::oid))],
    'RENAME COLUMN: the column by its new identity');

-- 4. Drop a column: sql_drop, then ddl_command_end, in one transaction.
ALTER TABLE public.walbust_pgtap_ddl ADD COLUMN extra text;
DO $$BEGIN PERFORM pg_temp.drain(); END$$;
ALTER TABLE public.walbust_pgtap_ddl DROP COLUMN extra;
SELECT is(pg_temp.drain(), 2, 'DROP COLUMN: two messages');
SELECT is(pg_temp.ddl(), ARRAY[
    pg_temp.msg('sql_drop', 'ALTER TABLE',
        pg_temp.obj('table column', 'public.walbust_pgtap_ddl.extra',
                    'public.walbust_pgtap_ddl'::regclass::oid)),
    pg_temp.msg('ddl_command_end', 'ALTER TABLE',
        pg_temp.obj('table', 'public.walbust_pgtap_ddl',
                    'public.walbust_pgtap_ddl'::regclass::oid))],
    'DROP COLUMN: the dropped column, then the altered table');

-- 5. Rename swap in one transaction: three messages, same transaction, in order.
BEGIN;
CREATE TABLE public.walbust_pgtap_ddl_new (id integer PRIMARY KEY, full_name text);
ALTER TABLE public.walbust_pgtap_ddl RENAME TO walbust_pgtap_ddl_old;
ALTER TABLE public.walbust_pgtap_ddl_new RENAME TO walbust_pgtap_ddl;
COMMIT;
SELECT is(pg_temp.drain(), 3, 'rename swap: three messages');
SELECT is(
    ARRAY(SELECT (c ->> 'tag') || ' ' || (c -> 'objects' -> 0 ->> 'identity') || ' '
                 || CASE (c -> 'objects' -> 0 ->> 'oid')::bigint
                    WHEN 'public.walbust_pgtap_ddl'::regclass::oid THEN 'new'
                    WHEN 'public.walbust_pgtap_ddl_old'::regclass::oid THEN 'old' END
            FROM unnest(pg_temp.ddl()) AS c),
    ARRAY['CREATE TABLE public.walbust_pgtap_ddl_new new',
          'ALTER TABLE public.walbust_pgtap_ddl_old old',
          'ALTER TABLE public.walbust_pgtap_ddl new'],
    'rename swap: each object by its name after the command, with its oid');
SELECT is((SELECT count(DISTINCT xid::text)::integer FROM pg_temp.walbust_pgtap_ddl_got
            WHERE data LIKE 'message: % prefix: walbust.ddl, %'), 1,
    'rename swap: all in the migration''s transaction');

-- 6. DROP TABLE: sql_drop names the table (not its index, column or type).
DO $$BEGIN PERFORM pg_temp.drain(); END$$;
CREATE TEMP TABLE walbust_pgtap_ddl_oid AS
    SELECT 'public.walbust_pgtap_ddl_old'::regclass::oid AS oid;
DROP TABLE public.walbust_pgtap_ddl_old;
SELECT is(pg_temp.drain(), 1, 'DROP TABLE: one message');
SELECT is(pg_temp.ddl(), ARRAY[pg_temp.msg('sql_drop', 'DROP TABLE',
    pg_temp.obj('table', 'public.walbust_pgtap_ddl_old',
                (SELECT oid FROM pg_temp.walbust_pgtap_ddl_oid)))],
    'DROP TABLE: the original object only');

-- 7. Publication membership changes are described too.
CREATE PUBLICATION walbust_pgtap_ddl_pub FOR TABLE public.walbust_pgtap_ddl;
ALTER PUBLICATION walbust_pgtap_ddl_pub DROP TABLE public.walbust_pgtap_ddl;
SELECT is(pg_temp.drain(), 2, 'CREATE PUBLICATION, ALTER PUBLICATION DROP TABLE: two messages');
SELECT is(
    ARRAY(SELECT (c ->> 'tag') || ': ' || (c -> 'objects' -> 0 ->> 'type') || ' '
                 || (c -> 'objects' -> 0 ->> 'identity')
            FROM unnest(pg_temp.ddl()) AS c),
    ARRAY['CREATE PUBLICATION: publication walbust_pgtap_ddl_pub',
          'ALTER PUBLICATION: publication relation public.walbust_pgtap_ddl in publication walbust_pgtap_ddl_pub'],
    'publication changes: the publication and the dropped membership');
DROP PUBLICATION walbust_pgtap_ddl_pub;

-- 8. Nothing for unrelated DDL, temporary objects or rolled-back DDL.
DO $$BEGIN PERFORM pg_temp.drain(); END$$;
CREATE TEMP TABLE walbust_pgtap_ddl_tmp (x integer);
CREATE FUNCTION pg_temp.walbust_pgtap_f() RETURNS integer LANGUAGE sql AS 'SELECT 1';
CREATE ROLE walbust_pgtap_ddl_app NOLOGIN;
BEGIN;
CREATE TABLE public.walbust_pgtap_ddl_new (x integer);
ROLLBACK;
SELECT walbust.invalidate('marker');  -- a committed marker flushes the WAL
SELECT is(pg_temp.drain(), 0,
    'temp table, function, role and rolled-back CREATE TABLE: no message');
SELECT is(pg_temp.other_msgs(), 1, 'the committed marker was decoded after them');

-- 9. The trigger never fails the application's DDL: with walbust.ddl_message
--    out of reach for the role, the DDL succeeds with a WARNING and no message.
GRANT CREATE ON SCHEMA public TO walbust_pgtap_ddl_app;
SET client_min_messages = error;  -- the two expected WARNINGs
REVOKE EXECUTE ON FUNCTION walbust.ddl_message(text, text, jsonb) FROM PUBLIC;
SET ROLE walbust_pgtap_ddl_app;
SELECT lives_ok($$CREATE TABLE public.walbust_pgtap_ddl_new (x integer)$$,
    'CREATE TABLE succeeds although the trigger cannot emit');
SELECT lives_ok($$DROP TABLE public.walbust_pgtap_ddl_new$$,
    'DROP TABLE succeeds although the trigger cannot emit');
RESET ROLE;
SET client_min_messages = warning;
GRANT EXECUTE ON FUNCTION walbust.ddl_message(text, text, jsonb) TO PUBLIC;
SELECT is(pg_temp.drain(), 0, 'a trigger that failed emitted nothing');
SET ROLE walbust_pgtap_ddl_app;
CREATE TABLE public.walbust_pgtap_ddl_new (x integer);
RESET ROLE;
SELECT is(pg_temp.drain(), 1, 'a plain role''s DDL is described (EXECUTE granted again)');

-- 10. DDL between row changes: the message is decoded inside the same
--     transaction, before its COMMIT. (Not necessarily between the two rows:
--     the trigger emits from a subtransaction, its exception block, and
--     PostgreSQL decodes such a message after the top transaction's later
--     changes. walbust acts on DDL messages at the COMMIT, so the position
--     inside the transaction does not matter.)
BEGIN;
INSERT INTO public.walbust_pgtap_ddl VALUES (1, 'a');
ALTER TABLE public.walbust_pgtap_ddl ADD COLUMN later integer;
INSERT INTO public.walbust_pgtap_ddl VALUES (2, 'b', 2);
COMMIT;
SELECT is(pg_temp.drain(), 1, 'DDL between row changes: one message');
SELECT is(
    ARRAY(SELECT CASE WHEN data LIKE 'message:%' THEN 'message' ELSE split_part(data, ':', 1)
                 || ':' || split_part(data, ':', 2) END
            FROM pg_temp.walbust_pgtap_ddl_got ORDER BY n),
    ARRAY['BEGIN:', 'table public.walbust_pgtap_ddl: INSERT',
          'table public.walbust_pgtap_ddl: INSERT', 'message', 'COMMIT:'],
    'DDL between row changes: decoded in the same transaction, before its COMMIT');

DROP TABLE public.walbust_pgtap_ddl, public.walbust_pgtap_ddl_new;
REVOKE CREATE ON SCHEMA public FROM walbust_pgtap_ddl_app;
DROP ROLE walbust_pgtap_ddl_app;
DO $$BEGIN PERFORM pg_drop_replication_slot('walbust_pgtap_ddl_' || pg_backend_pid()); END$$;

SELECT * FROM finish();
