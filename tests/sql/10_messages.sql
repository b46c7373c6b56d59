-- tests/sql/10_messages.sql — pgTAP: the exact logical decoding messages that
-- walbust.invalidate*() write to the WAL, read back through a temporary
-- test_decoding slot.
--
-- Transactional messages are only decoded once their transaction commits, so
-- this file cannot run inside one BEGIN ... ROLLBACK: it runs at top level
-- (each statement in autocommit, plan() and finish() included) and uses
-- explicit BEGIN/COMMIT/ROLLBACK per scenario. Side effects on the target
-- database: sql/walbust.sql is (re)installed, which is idempotent; the table
-- public.walbust_pgtap_rows is created and dropped; the slot is TEMPORARY,
-- named after this backend's pid, so it disappears with the session even if
-- the file stops half way. Needs wal_level=logical, a free replication slot,
-- contrib's test_decoding, and a UTF8 database. Another session emitting
-- 'walbust' messages into the same database while this runs would show up in
-- the counts. Run with:
--   pg_prove -d postgres -h 127.0.0.1 -p $PGPORT -U postgres tests/sql/*.sql

SET client_min_messages = warning;
CREATE EXTENSION IF NOT EXISTS pgtap;
SET client_encoding = 'UTF8';

-- Install (again: the runner installs first, so this also exercises a
-- reinstall over a live schema).
\ir ../../sql/walbust.sql

DROP TABLE IF EXISTS public.walbust_pgtap_rows;
CREATE TABLE public.walbust_pgtap_rows (id integer PRIMARY KEY);

-- The slot must be created in a transaction that has not written anything.
DO $$
BEGIN
    PERFORM pg_create_logical_replication_slot(
        'walbust_pgtap_' || pg_backend_pid(), 'test_decoding', true);
END
$$;

-- Decoded lines of the last drain(): n orders them, xid groups them.
CREATE TEMP TABLE walbust_pgtap_got (n bigint, xid xid, data text);

-- Consume everything decoded so far into walbust_pgtap_got and return the
-- number of 'walbust' messages among it.
CREATE FUNCTION pg_temp.drain() RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    got integer;
BEGIN
    DELETE FROM pg_temp.walbust_pgtap_got;
    INSERT INTO pg_temp.walbust_pgtap_got
    SELECT c.n, c.xid, c.data
      FROM pg_logical_slot_get_changes('walbust_pgtap_' || pg_backend_pid(), NULL, NULL,
                                       'include-xids', '0')
           WITH ORDINALITY AS c(lsn, xid, data, n);
    SELECT count(*) INTO got FROM pg_temp.walbust_pgtap_got
     WHERE data LIKE 'message: % prefix: walbust, %';
    RETURN got;
END
$$;

-- The 'walbust' message lines of the last drain(), in WAL order.
CREATE FUNCTION pg_temp.msgs() RETURNS text[] LANGUAGE sql AS $$
    SELECT coalesce(array_agg(data ORDER BY n), '{}')
      FROM pg_temp.walbust_pgtap_got
     WHERE data LIKE 'message: % prefix: walbust, %'
$$;

-- Their JSON contents, parsed.
CREATE FUNCTION pg_temp.contents() RETURNS jsonb[] LANGUAGE sql AS $$
    SELECT coalesce(array_agg(substr(data, strpos(data, 'content:') + 8)::jsonb
                              ORDER BY n), '{}')
      FROM pg_temp.walbust_pgtap_got
     WHERE data LIKE 'message: % prefix: walbust, %'
$$;

-- The lines test_decoding prints for transactional 'walbust' messages with
-- these exact contents (sz is the content's length in bytes).
CREATE FUNCTION pg_temp.expected(VARIADIC contents text[]) RETURNS text[]
LANGUAGE sql AS $$
    SELECT coalesce(array_agg(
               format('message: transactional: 1 prefix: walbust, sz: %s content:%s',
                      octet_length(c), c) ORDER BY i), '{}')
      FROM unnest(contents) WITH ORDINALITY AS u(c, i)
$$;

-- All decoded lines of the transaction that wrote the first walbust message.
CREATE FUNCTION pg_temp.txn_of_first_msg() RETURNS text[] LANGUAGE sql AS $$
    SELECT array_agg(g.data ORDER BY g.n)
      FROM pg_temp.walbust_pgtap_got g
     WHERE g.xid = (SELECT m.xid FROM pg_temp.walbust_pgtap_got m
                     WHERE m.data LIKE 'message: % prefix: walbust, %'
                     ORDER BY m.n LIMIT 1)
$$;

DO $$BEGIN PERFORM pg_temp.drain(); END$$;

SELECT plan(40);

-- 1. invalidate: one message, keys in call order, "v" first.
DO $$BEGIN PERFORM walbust.invalidate('user:1', 'user:1:profile'); END$$;
SELECT is(pg_temp.drain(), 1, 'invalidate: one committed call emits one message');
SELECT is(pg_temp.msgs(),
    pg_temp.expected('{"v": 1, "op": "invalidate", "keys": ["user:1", "user:1:profile"]}'),
    'invalidate: transactional message, prefix walbust, exact JSON');
SELECT is((pg_temp.contents())[1] -> 'v', to_jsonb(walbust.version()::integer),
    'message "v" equals walbust.version()');

-- 2. invalidate_pattern.
DO $$BEGIN PERFORM walbust.invalidate_pattern('team:7:*', 'org:?:x'); END$$;
SELECT is(pg_temp.drain(), 1, 'invalidate_pattern: one message');
SELECT is(pg_temp.msgs(),
    pg_temp.expected('{"v": 1, "op": "invalidate_pattern", "patterns": ["team:7:*", "org:?:x"]}'),
    'invalidate_pattern: exact JSON');

-- 3. invalidate_tag.
DO $$BEGIN PERFORM walbust.invalidate_tag('user:1', 'team:7'); END$$;
SELECT is(pg_temp.drain(), 1, 'invalidate_tag: one message');
SELECT is(pg_temp.msgs(),
    pg_temp.expected('{"v": 1, "op": "invalidate_tag", "tags": ["user:1", "team:7"]}'),
    'invalidate_tag: exact JSON');

-- 4. The array form.
DO $$BEGIN PERFORM walbust.invalidate(VARIADIC ARRAY['a', 'b', 'c']); END$$;
DO $$BEGIN PERFORM walbust.invalidate_tag(VARIADIC ARRAY['t']); END$$;
SELECT is(pg_temp.drain(), 2, 'array form: one message per call');
SELECT is(pg_temp.msgs(),
    pg_temp.expected('{"v": 1, "op": "invalidate", "keys": ["a", "b", "c"]}',
                     '{"v": 1, "op": "invalidate_tag", "tags": ["t"]}'),
    'array form: same JSON as the variadic form');

-- 5. NULL elements are dropped, order of the rest kept.
DO $$BEGIN PERFORM walbust.invalidate('a', NULL, 'b'); END$$;
DO $$BEGIN PERFORM walbust.invalidate_pattern(NULL, 'p:*'); END$$;
DO $$BEGIN PERFORM walbust.invalidate_tag('t', NULL, NULL); END$$;
SELECT is(pg_temp.drain(), 3, 'NULL elements: calls with a non-NULL element still emit');
SELECT is(pg_temp.msgs(),
    pg_temp.expected('{"v": 1, "op": "invalidate", "keys": ["a", "b"]}',
                     '{"v": 1, "op": "invalidate_pattern", "patterns": ["p:*"]}',
                     '{"v": 1, "op": "invalidate_tag", "tags": ["t"]}'),
    'NULL elements are dropped from keys, patterns and tags');

-- 6. Empty, all-NULL and NULL arrays emit nothing.
DO $$BEGIN PERFORM walbust.invalidate(NULL); END$$;
DO $$BEGIN PERFORM walbust.invalidate(NULL, NULL); END$$;
DO $$BEGIN PERFORM walbust.invalidate(VARIADIC NULL::text[]); END$$;
DO $$BEGIN PERFORM walbust.invalidate(VARIADIC '{}'::text[]); END$$;
DO $$BEGIN PERFORM walbust.invalidate(VARIADIC ARRAY[NULL, NULL]::text[]); END$$;
DO $$BEGIN PERFORM walbust.invalidate_pattern(NULL); END$$;
DO $$BEGIN PERFORM walbust.invalidate_pattern(VARIADIC '{}'::text[]); END$$;
DO $$BEGIN PERFORM walbust.invalidate_pattern(VARIADIC NULL::text[]); END$$;
DO $$BEGIN PERFORM walbust.invalidate_tag(NULL, NULL); END$$;
DO $$BEGIN PERFORM walbust.invalidate_tag(VARIADIC '{}'::text[]); END$$;
DO $$BEGIN PERFORM walbust.invalidate_tag(VARIADIC NULL::text[]); END$$;
SELECT is(pg_temp.drain(), 0, 'empty, all-NULL and NULL arrays emit no message');

-- 7. Escaping: quotes, backslashes, control characters, non-ASCII, JSON-looking
--    text and the empty string survive byte for byte.
DO $$BEGIN PERFORM walbust.invalidate(
    'quote"d', 'back\slash', 'é✓😀', E'line\nbreak\ttab', E'\x01bell',
    '{"op": "invalidate_tag", "tags": ["*"]}', '', 'a\"b'); END$$;
SELECT is(pg_temp.drain(), 1, 'escaping: one message');
SELECT is(pg_temp.msgs(),
    pg_temp.expected('{"v": 1, "op": "invalidate", "keys": ["quote\"d", "back\\slash", "é✓😀", "line\nbreak\ttab", "\u0001bell", "{\"op\": \"invalidate_tag\", \"tags\": [\"*\"]}", "", "a\\\"b"]}'),
    'escaping: exact JSON, quotes/backslashes/control characters escaped, UTF-8 kept');
SELECT is(
    ARRAY(SELECT jsonb_array_elements_text((pg_temp.contents())[1] -> 'keys')),
    ARRAY['quote"d', 'back\slash', 'é✓😀', E'line\nbreak\ttab', E'\x01bell',
          '{"op": "invalidate_tag", "tags": ["*"]}', '', 'a\"b'],
    'escaping: the JSON decodes back to the exact arguments');

DO $$BEGIN PERFORM walbust.invalidate_pattern('a\*b', 'ü?'); END$$;
DO $$BEGIN PERFORM walbust.invalidate_tag('tag "x"', E'tab\there'); END$$;
SELECT is(pg_temp.drain(), 2, 'escaping in patterns and tags: two messages');
SELECT is(pg_temp.msgs(),
    pg_temp.expected('{"v": 1, "op": "invalidate_pattern", "patterns": ["a\\*b", "ü?"]}',
                     '{"v": 1, "op": "invalidate_tag", "tags": ["tag \"x\"", "tab\there"]}'),
    'escaping in patterns and tags: exact JSON');

-- 8. Several calls in one transaction: one message each, call order, same xid.
BEGIN;
DO $$BEGIN PERFORM walbust.invalidate('first'); END$$;
DO $$BEGIN PERFORM walbust.invalidate_tag('second'); END$$;
DO $$BEGIN PERFORM walbust.invalidate_pattern('third:*'); END$$;
COMMIT;
SELECT is(pg_temp.drain(), 3, 'one transaction, three calls: three messages');
SELECT is(pg_temp.msgs(),
    pg_temp.expected('{"v": 1, "op": "invalidate", "keys": ["first"]}',
                     '{"v": 1, "op": "invalidate_tag", "tags": ["second"]}',
                     '{"v": 1, "op": "invalidate_pattern", "patterns": ["third:*"]}'),
    'one transaction, three calls: messages in call order');
SELECT is(
    (SELECT count(DISTINCT xid::text)::integer FROM pg_temp.walbust_pgtap_got
      WHERE data LIKE 'message: % prefix: walbust, %'),
    1, 'one transaction, three calls: all decoded in the same transaction');

-- 9. A rolled-back transaction emits nothing.
BEGIN;
DO $$BEGIN PERFORM walbust.invalidate('rolled:back'); END$$;
DO $$BEGIN PERFORM walbust.invalidate_pattern('rolled:*'); END$$;
DO $$BEGIN PERFORM walbust.invalidate_tag('rolled'); END$$;
ROLLBACK;
-- A committed marker flushes the WAL, so a (wrongly) non-transactional
-- message from the rolled-back transaction would be decoded too.
DO $$BEGIN PERFORM walbust.invalidate('marker'); END$$;
SELECT is(pg_temp.drain(), 1, 'ROLLBACK, then a committed call: one message');
SELECT is(pg_temp.msgs(),
    pg_temp.expected('{"v": 1, "op": "invalidate", "keys": ["marker"]}'),
    'ROLLBACK discards the transactional messages');

-- 10. A rolled-back savepoint discards only the calls made after it.
BEGIN;
DO $$BEGIN PERFORM walbust.invalidate('kept'); END$$;
SAVEPOINT s1;
DO $$BEGIN PERFORM walbust.invalidate('discarded'); END$$;
ROLLBACK TO SAVEPOINT s1;
DO $$BEGIN PERFORM walbust.invalidate_tag('after'); END$$;
COMMIT;
SELECT is(pg_temp.drain(), 2, 'ROLLBACK TO SAVEPOINT: two messages survive');
SELECT is(pg_temp.msgs(),
    pg_temp.expected('{"v": 1, "op": "invalidate", "keys": ["kept"]}',
                     '{"v": 1, "op": "invalidate_tag", "tags": ["after"]}'),
    'ROLLBACK TO SAVEPOINT discards the messages emitted after the savepoint');

-- 11. A PL/pgSQL exception block that fails discards its calls; the
--     transaction goes on and commits the rest.
DO $$
BEGIN
    BEGIN
        PERFORM walbust.invalidate('in:failed:block');
        RAISE EXCEPTION 'boom';
    EXCEPTION WHEN raise_exception THEN
        NULL;
    END;
    PERFORM walbust.invalidate('after:failed:block');
END
$$;
SELECT is(pg_temp.drain(), 1, 'failed exception block: one message survives');
SELECT is(pg_temp.msgs(),
    pg_temp.expected('{"v": 1, "op": "invalidate", "keys": ["after:failed:block"]}'),
    'failed exception block: its message is discarded');

-- 12. Messages sit inside the writing transaction, at their WAL position
--     between its row changes.
BEGIN;
DO $$BEGIN PERFORM walbust.invalidate('row:1'); END$$;
INSERT INTO public.walbust_pgtap_rows VALUES (1);
DO $$BEGIN PERFORM walbust.invalidate_tag('rows'); END$$;
COMMIT;
SELECT is(pg_temp.drain(), 2, 'with row changes: two messages');
SELECT is(pg_temp.txn_of_first_msg(),
    ARRAY['BEGIN']
    || pg_temp.expected('{"v": 1, "op": "invalidate", "keys": ["row:1"]}')
    || 'table public.walbust_pgtap_rows: INSERT: id[integer]:1'::text
    || pg_temp.expected('{"v": 1, "op": "invalidate_tag", "tags": ["rows"]}')
    || 'COMMIT'::text,
    'with row changes: messages decoded in the same transaction, in statement order');

-- 13. Committed transactions are decoded in commit order.
DO $$BEGIN PERFORM walbust.invalidate('tx:1'); END$$;
INSERT INTO public.walbust_pgtap_rows VALUES (2);
DO $$BEGIN PERFORM walbust.invalidate('tx:3'); END$$;
SELECT is(pg_temp.drain(), 2, 'consecutive transactions: two messages');
SELECT is(pg_temp.msgs(),
    pg_temp.expected('{"v": 1, "op": "invalidate", "keys": ["tx:1"]}',
                     '{"v": 1, "op": "invalidate", "keys": ["tx:3"]}'),
    'consecutive transactions: messages in commit order');
SELECT isnt(
    (SELECT xid FROM pg_temp.walbust_pgtap_got
      WHERE data LIKE 'message: % prefix: walbust, %' ORDER BY n LIMIT 1)::text,
    (SELECT xid FROM pg_temp.walbust_pgtap_got
      WHERE data LIKE 'message: % prefix: walbust, %' ORDER BY n DESC LIMIT 1)::text,
    'consecutive transactions: separate transactions');

-- 14. Many keys in one call: one message, all keys, order kept.
DO $$BEGIN
    PERFORM walbust.invalidate(VARIADIC ARRAY(
        SELECT 'k:' || g FROM generate_series(1, 1000) AS g ORDER BY g));
END$$;
SELECT is(pg_temp.drain(), 1, '1000 keys: one message');
SELECT is(jsonb_array_length((pg_temp.contents())[1] -> 'keys'), 1000,
    '1000 keys: all present');
SELECT is(
    ARRAY(SELECT jsonb_array_elements_text((pg_temp.contents())[1] -> 'keys')),
    ARRAY(SELECT 'k:' || g FROM generate_series(1, 1000) AS g ORDER BY g),
    '1000 keys: in call order');

-- 15. One call per row of a query: one message per row.
DO $$BEGIN
    PERFORM walbust.invalidate('row:' || id) FROM public.walbust_pgtap_rows ORDER BY id;
END$$;
SELECT is(pg_temp.drain(), 2, 'per-row calls: one message per row');
SELECT is(pg_temp.msgs(),
    pg_temp.expected('{"v": 1, "op": "invalidate", "keys": ["row:1"]}',
                     '{"v": 1, "op": "invalidate", "keys": ["row:2"]}'),
    'per-row calls: exact JSON');

-- 16. Every message decodes to exactly {v, op, <array>} with a matching array name.
DO $$BEGIN
    PERFORM walbust.invalidate('x');
    PERFORM walbust.invalidate_pattern('x*');
    PERFORM walbust.invalidate_tag('x');
END$$;
SELECT is(pg_temp.drain(), 3, 'shape: three messages');
SELECT is(
    ARRAY(SELECT array_to_string(ARRAY(SELECT jsonb_object_keys(c) ORDER BY 1), ',')
            || '/' || (c ->> 'op')
            || '/' || jsonb_typeof(c -> CASE c ->> 'op'
                                            WHEN 'invalidate' THEN 'keys'
                                            WHEN 'invalidate_pattern' THEN 'patterns'
                                            ELSE 'tags' END)
            FROM unnest(pg_temp.contents()) AS c),
    ARRAY['keys,op,v/invalidate/array',
          'op,patterns,v/invalidate_pattern/array',
          'op,tags,v/invalidate_tag/array'],
    'shape: each message has exactly v, op and the array for its op');
SELECT is(
    ARRAY(SELECT c -> 'v' FROM unnest(pg_temp.contents()) AS c),
    ARRAY['1'::jsonb, '1'::jsonb, '1'::jsonb],
    'shape: "v" is the number 1 in every message');

-- Clean up (the temporary slot would also go away with the session).
DROP TABLE public.walbust_pgtap_rows;
DO $$BEGIN PERFORM pg_drop_replication_slot('walbust_pgtap_' || pg_backend_pid()); END$$;
SELECT is(
    (SELECT count(*)::integer FROM pg_replication_slots
      WHERE slot_name = 'walbust_pgtap_' || pg_backend_pid()),
    0, 'test slot dropped');

SELECT * FROM finish();
