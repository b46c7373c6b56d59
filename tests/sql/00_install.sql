-- tests/sql/00_install.sql — pgTAP: sql/walbust.sql installs (twice, from
-- scratch) and defines the explicit-invalidation API with the promised
-- signatures, attributes, comments and privileges.
--
-- Runs inside one transaction that is rolled back: the schema is dropped and
-- reinstalled twice within it, so whatever was installed before the test is
-- back afterwards. Run with:
--   pg_prove -d postgres -h 127.0.0.1 -p $PGPORT -U postgres tests/sql/*.sql

SET client_min_messages = warning;
CREATE EXTENSION IF NOT EXISTS pgtap;

BEGIN;
SELECT plan(42);

-- From nothing, install twice: the second run must succeed and leave the
-- same single set of objects (CREATE ... IF NOT EXISTS / OR REPLACE).
DROP SCHEMA IF EXISTS walbust CASCADE;
\ir ../../sql/walbust.sql
SELECT has_schema('walbust', 'first install creates schema walbust');
\ir ../../sql/walbust.sql
SELECT pass('second install of sql/walbust.sql succeeds');

SELECT is(
    (SELECT array_agg(p.proname::text ORDER BY p.proname)
       FROM pg_proc p WHERE p.pronamespace = 'walbust'::regnamespace),
    ARRAY['ddl_message', 'invalidate', 'invalidate_pattern', 'invalidate_tag', 'on_ddl_end',
          'on_sql_drop', 'version'],
    'schema walbust holds exactly the seven functions, no duplicates after reinstall');

-- Signatures.
SELECT has_function('walbust', 'invalidate', ARRAY['text[]'],
    'walbust.invalidate(VARIADIC text[]) exists');
SELECT has_function('walbust', 'invalidate_pattern', ARRAY['text[]'],
    'walbust.invalidate_pattern(VARIADIC text[]) exists');
SELECT has_function('walbust', 'invalidate_tag', ARRAY['text[]'],
    'walbust.invalidate_tag(VARIADIC text[]) exists');
SELECT has_function('walbust', 'version', ARRAY[]::name[],
    'walbust.version() exists');

SELECT function_returns('walbust', 'invalidate', ARRAY['text[]'], 'void',
    'invalidate returns void');
SELECT function_returns('walbust', 'invalidate_pattern', ARRAY['text[]'], 'void',
    'invalidate_pattern returns void');
SELECT function_returns('walbust', 'invalidate_tag', ARRAY['text[]'], 'void',
    'invalidate_tag returns void');
SELECT function_returns('walbust', 'version', ARRAY[]::name[], 'text',
    'version returns text');

SELECT is(
    (SELECT array_agg(p.proname || ':' || pg_get_function_identity_arguments(p.oid)
                      ORDER BY p.proname)
       FROM pg_proc p
      WHERE p.pronamespace = 'walbust'::regnamespace AND p.proname LIKE 'invalidate%'),
    ARRAY['invalidate:VARIADIC keys text[]',
          'invalidate_pattern:VARIADIC patterns text[]',
          'invalidate_tag:VARIADIC tags text[]'],
    'the invalidate functions take one VARIADIC text[] named keys/patterns/tags');

-- Attributes: volatile, parallel unsafe, security invoker, not strict.
SELECT volatility_is('walbust', 'invalidate', ARRAY['text[]'], 'volatile',
    'invalidate is VOLATILE');
SELECT volatility_is('walbust', 'invalidate_pattern', ARRAY['text[]'], 'volatile',
    'invalidate_pattern is VOLATILE');
SELECT volatility_is('walbust', 'invalidate_tag', ARRAY['text[]'], 'volatile',
    'invalidate_tag is VOLATILE');
SELECT volatility_is('walbust', 'version', ARRAY[]::name[], 'immutable',
    'version is IMMUTABLE');

SELECT is(
    (SELECT array_agg(p.proname::text || '=' || p.proparallel::text ORDER BY p.proname)
       FROM pg_proc p
      WHERE p.pronamespace = 'walbust'::regnamespace AND p.proname LIKE 'invalidate%'),
    ARRAY['invalidate=u', 'invalidate_pattern=u', 'invalidate_tag=u'],
    'the invalidate functions are PARALLEL UNSAFE');

SELECT isnt_definer('walbust', 'invalidate', ARRAY['text[]'],
    'invalidate is SECURITY INVOKER');
SELECT isnt_definer('walbust', 'invalidate_pattern', ARRAY['text[]'],
    'invalidate_pattern is SECURITY INVOKER');
SELECT isnt_definer('walbust', 'invalidate_tag', ARRAY['text[]'],
    'invalidate_tag is SECURITY INVOKER');
SELECT isnt_definer('walbust', 'version', ARRAY[]::name[],
    'version is SECURITY INVOKER');

SELECT isnt_strict('walbust', 'invalidate', ARRAY['text[]'],
    'invalidate is not STRICT (a NULL array is a no-op, handled in the body)');

-- Documentation and privileges.
SELECT is(
    (SELECT count(*)::int FROM pg_proc p
      WHERE p.pronamespace = 'walbust'::regnamespace
        AND coalesce(obj_description(p.oid, 'pg_proc'), '') <> ''),
    7,
    'every walbust function has a COMMENT');
SELECT ok(obj_description('walbust'::regnamespace, 'pg_namespace') IS NOT NULL,
    'schema walbust has a COMMENT');

SELECT is(
    (SELECT count(*)::int FROM pg_proc p, aclexplode(p.proacl) a
      WHERE p.pronamespace = 'walbust'::regnamespace
        AND a.grantee = 0 AND a.privilege_type = 'EXECUTE'),
    7,
    'EXECUTE on every walbust function is granted explicitly to PUBLIC');
SELECT is(
    (SELECT count(*)::int FROM pg_namespace n, aclexplode(n.nspacl) a
      WHERE n.oid = 'walbust'::regnamespace
        AND a.grantee = 0 AND a.privilege_type = 'USAGE'),
    1,
    'USAGE on schema walbust is granted to PUBLIC');

SELECT is(walbust.version(), '1', 'walbust.version() is ''1''');

-- Calling conventions (message content is checked in 10_messages.sql; the
-- messages emitted here are discarded by the final ROLLBACK).
SELECT lives_ok($$SELECT walbust.invalidate('user:1')$$,
    'invalidate accepts one key');
SELECT lives_ok($$SELECT walbust.invalidate('user:1', 'user:1:profile', NULL)$$,
    'invalidate accepts several keys and NULLs');
SELECT lives_ok($$SELECT walbust.invalidate(VARIADIC ARRAY['a', 'b'])$$,
    'invalidate accepts the array form VARIADIC ARRAY[...]');
SELECT lives_ok($$SELECT walbust.invalidate(VARIADIC NULL::text[])$$,
    'invalidate accepts a NULL array');
SELECT lives_ok($$SELECT walbust.invalidate(VARIADIC '{}'::text[])$$,
    'invalidate accepts an empty array');
SELECT lives_ok($$SELECT walbust.invalidate_pattern('team:7:*')$$,
    'invalidate_pattern accepts a pattern');
SELECT lives_ok($$SELECT walbust.invalidate_tag(VARIADIC ARRAY['user:1', NULL])$$,
    'invalidate_tag accepts the array form');
SELECT throws_ok($$SELECT walbust.invalidate()$$, '42883', NULL,
    'invalidate with no argument at all is a call error');
SELECT lives_ok(
    $$SELECT k.f FROM (SELECT walbust.invalidate(x) AS f
                         FROM generate_series(1, 3) g, LATERAL (SELECT 'row:' || g) s(x)) k$$,
    'invalidate can be called once per row of a query');

-- An ordinary application role (no superuser, no REPLICATION) can call them.
CREATE ROLE walbust_pgtap_app NOLOGIN NOSUPERUSER NOREPLICATION;
SET LOCAL ROLE walbust_pgtap_app;
SELECT lives_ok($$SELECT walbust.invalidate('user:2')$$,
    'a plain role can call invalidate');
SELECT lives_ok($$SELECT walbust.invalidate_pattern('team:2:*')$$,
    'a plain role can call invalidate_pattern');
SELECT lives_ok($$SELECT walbust.invalidate_tag('user:2')$$,
    'a plain role can call invalidate_tag');
SELECT lives_ok($$SELECT walbust.version()$$,
    'a plain role can call version');
RESET ROLE;

-- search_path hygiene: the bodies do not depend on the caller's search_path.
-- (An error here stops the file, which pg_prove reports as a failure.)
SET LOCAL search_path = '';
DO $$BEGIN PERFORM walbust.invalidate('k'); END$$;
RESET search_path;
SELECT pass('invalidate runs with an empty search_path');
SELECT is(
    (SELECT array_agg(c ORDER BY c) FROM unnest(
        (SELECT p.proconfig FROM pg_proc p
          WHERE p.oid = 'walbust.invalidate(text[])'::regprocedure)) c),
    ARRAY['search_path=pg_catalog, pg_temp'],
    'invalidate pins search_path to pg_catalog, pg_temp');

SELECT * FROM finish();
ROLLBACK;
