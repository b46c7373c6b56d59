"""End-to-end tests of the rules engine through `walbust run` (and
`walbust decode --rules`) against real PostgreSQL and Redis.

Every test creates its own database (fresh_db, named rules_e2e_<test>), its
schema, a publication for the tables its rules name, and works in a Redis db
number of its own while it runs (redis://127.0.0.1:PORT/N, N in 1..15, flushed
at the start of the test; tests run one after another), so no test sees
another's data and other modules' keys in db 0 are never touched. "Not invalidated" is only asserted
after a barrier: a later commit whose invalidation was observed, which
proves (commit order) that walbust got past the write in question.

Run by hand:
  make && scripts/stack start /tmp/me-stack && . /tmp/me-stack/env &&
  WALBUST_BIN=$PWD/build/walbust /usr/bin/python3 tests/e2e/test_rules_e2e.py
"""
import datetime
import json
import os
import re
import signal
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import (BARRIER_RULE, BARRIER_SQL, BIN, REDIS_PORT, SRC, Runner, Walbust,  # noqa: E402
                     barrier, connect, dsn, fresh_db, redis_client, slot_confirmed, sql,
                     wait_until, write_rules)

LSN_RE = re.compile(r"^[0-9A-F]{1,8}/[0-9A-F]{1,8}$")
TIME_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,6})?Z$")

USERS_SQL = """
CREATE TABLE users(id int PRIMARY KEY, name text, email text, team_id int);
"""


def lsn_ge(db, a, b):
    """a >= b, both LSN texts, compared by PostgreSQL as pg_lsn."""
    return sql(db, "SELECT %s::pg_lsn >= %s::pg_lsn", (a, b), fetch=True)[0][0]


def current_lsn(db):
    return sql(db, "SELECT pg_current_wal_lsn()::text", fetch=True)[0][0]


class Env:
    """One test's world: database + schema + publication, rules file (with
    the barrier rule), a flushed Redis db and a running walbust."""

    def __init__(self, name, rdb, schema, rules, defaults=None, replica_full=(),
                 pub_tables=None, start=True):
        self.db = fresh_db(f"rules_e2e_{name}")
        self.rdb = rdb
        self.url = f"redis://127.0.0.1:{REDIS_PORT}/{rdb}"
        sql(self.db, schema)
        sql(self.db, BARRIER_SQL)
        for t in replica_full:
            sql(self.db, f"ALTER TABLE {t} REPLICA IDENTITY FULL")
        tables = pub_tables or sorted({rule["table"] for rule in rules})
        tables = list(tables) + ["walbust_barrier"]
        sql(self.db, f"CREATE PUBLICATION walbust FOR TABLE {', '.join(tables)}")
        self.rules_obj = {"rules": list(rules) + [BARRIER_RULE]}
        if defaults is not None:
            self.rules_obj["defaults"] = defaults
        self.rules = write_rules(self.rules_obj)
        self.r = redis_client(rdb)
        self.r.flushdb()
        self.wb = None
        if start:
            self.start()

    def start(self, rules=None):
        self.wb = Walbust(self.db, rules or self.rules, redis_urls=[self.url]).start()
        self.wb.wait_streaming()
        return self.wb

    def q(self, query, args=None, fetch=False):
        return sql(self.db, query, args, fetch)

    def barrier(self):
        barrier(self.db, self.r)

    def gone(self, *keys, timeout=20):
        wait_until(lambda: not any(self.r.exists(k) for k in keys), timeout,
                   f"keys {keys} to be invalidated")

    def keys(self):
        return sorted(self.r.keys("*"))

    def close(self):
        if self.wb is not None:
            # A walbust that died on its own (crash after the last assertion)
            # fails the test too.
            rc = self.wb.stop()
            assert rc == 0, f"walbust exited {rc}:\n{self.wb.read_log()[-3000:]}"
        # Do not let a finished test's slot pin WAL (or, as "walbust", stand
        # in the next test's way). The walsender may hold the slot for a
        # moment after walbust exited: wait until it is released.
        wait_until(lambda: not sql("postgres", "SELECT 1 FROM pg_replication_slots WHERE "
                                   "database = %s AND active_pid IS NOT NULL", (self.db,),
                                   fetch=True), 20, "the slot to be released")
        sql("postgres", "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                        "WHERE database = %s AND active_pid IS NULL", (self.db,))


def setkeys(r, *keys, value="v"):
    for k in keys:
        r.set(k, value)


# ---------------------------------------------------------------------------
# keys and both row images


def test_keys_insert_update_delete():
    e = Env("keys", 1, USERS_SQL, [
        {"table": "public.users", "on": ["insert", "update", "delete"],
         "keys": ["user:{id}", "user:{id}:profile"]},
    ])
    try:
        r = e.r
        setkeys(r, "user:1", "user:1:profile", "user:2", "user:2:profile", "unrelated")
        e.q("INSERT INTO users VALUES (1, 'ann', 'a@x', 5)")
        e.gone("user:1", "user:1:profile")
        e.barrier()
        assert r.exists("user:2") and r.exists("user:2:profile") and r.get("unrelated") == "v"

        setkeys(r, "user:1", "user:1:profile")
        e.q("INSERT INTO users VALUES (2, 'bob', 'b@x', 5)")
        e.gone("user:2", "user:2:profile")
        e.barrier()
        assert r.exists("user:1") and r.exists("user:1:profile"), "insert of 2 touched user 1"

        e.q("UPDATE users SET name = 'anne' WHERE id = 1")
        e.gone("user:1", "user:1:profile")

        setkeys(r, "user:1", "user:2")
        e.q("DELETE FROM users WHERE id = 2")
        e.gone("user:2")
        e.barrier()
        assert r.exists("user:1") and r.get("unrelated") == "v"
    finally:
        e.close()


def test_several_rules_braces_on_and_text_values():
    schema = USERS_SQL + """
        CREATE TABLE things(id uuid PRIMARY KEY, price numeric, active bool,
                            at timestamptz, label text);"""
    e = Env("several", 3, schema, [
        {"table": "public.users", "keys": ["user:{id}"]},
        {"table": "users", "keys": ["{{u}}:{id}"]},  # bare name = public.users
        {"table": "public.users", "on": ["delete"], "keys": ["deleted:{id}"]},
        {"table": "public.things", "on": ["insert"],
         "keys": ["thing:{id}:{price}:{active}:{at}:{label}"]},
    ])
    try:
        r = e.r
        setkeys(r, "user:1", "{u}:1", "deleted:1", "{{u}}:1")
        e.q("INSERT INTO users VALUES (1, 'ann', 'a@x', 5)")
        e.gone("user:1", "{u}:1")
        setkeys(r, "user:1", "{u}:1")
        e.q("UPDATE users SET name = 'anne' WHERE id = 1")
        e.gone("user:1", "{u}:1")
        e.barrier()
        assert r.exists("deleted:1"), "an on:[delete] rule fired on insert/update"
        assert r.exists("{{u}}:1"), "{{ and }} must render as single braces"
        e.q("DELETE FROM users WHERE id = 1")
        e.gone("deleted:1")

        # Values are PostgreSQL's text output, byte for byte (timestamptz as
        # a session with the server's default TimeZone prints it).
        uid = "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"
        label = "Z\u00fcrich \u2603 {x}"
        at_text = e.q("SELECT '2026-01-02 03:04:05.5+00'::timestamptz::text", fetch=True)[0][0]
        key = f"thing:{uid}:1.50:t:{at_text}:{label}"
        near = f"thing:{uid}:1.5:t:{at_text}:{label}"
        setkeys(r, key, near)
        e.q("INSERT INTO things VALUES (%s, 1.50, true, '2026-01-02 03:04:05.5+00', %s)",
            (uid, label))
        e.gone(key)
        e.barrier()
        assert r.exists(near), "numeric 1.50 must render as PostgreSQL prints it"
    finally:
        e.close()


def test_both_images_on_key_column_update():
    schema = USERS_SQL + "CREATE TABLE accounts(id int PRIMARY KEY, name text);"
    e = Env("images", 2, schema, [
        {"table": "public.users", "on": ["insert", "update", "delete"],
         "patterns": ["team:{team_id}:*"]},
        {"table": "public.accounts", "keys": ["acct:{id}"]},
    ], replica_full=["users"])
    try:
        r = e.r
        e.q("INSERT INTO users VALUES (1, 'ann', 'a@x', 5)")
        e.q("INSERT INTO accounts VALUES (1, 'a'), (2, 'b')")
        e.barrier()
        setkeys(r, "team:5:members", "team:5:page:1", "team:7:members", "team:9:members",
                "acct:1", "acct:2", "acct:101")
        e.q("UPDATE users SET team_id = 7 WHERE id = 1")
        e.gone("team:5:members", "team:5:page:1", "team:7:members")
        e.barrier()
        assert r.exists("team:9:members"), "team 9 was not involved"

        # Primary key change under REPLICA IDENTITY DEFAULT: the old key
        # image carries id, so both user keys go.
        rid = e.q("SELECT relreplident FROM pg_class WHERE oid = 'accounts'::regclass",
                  fetch=True)[0][0]
        assert rid == "d", rid
        e.q("UPDATE accounts SET id = 101 WHERE id = 1")
        e.gone("acct:1", "acct:101")
        e.barrier()
        assert r.exists("acct:2") and r.exists("team:9:members")
    finally:
        e.close()


def test_changed_filter():
    schema = USERS_SQL + "CREATE TABLE people(id int PRIMARY KEY, name text, email text);"
    e = Env("changed", 3, schema, [
        {"table": "public.users", "on": ["update"], "changed": ["name", "team_id"],
         "keys": ["user:{id}"]},
        {"table": "public.people", "on": ["update"], "changed": ["name"], "keys": ["person:{id}"]},
    ], replica_full=["users"])
    try:
        r = e.r
        e.q("INSERT INTO users VALUES (1, 'ann', 'a@x', 5)")
        setkeys(r, "user:1")
        e.q("UPDATE users SET email = 'new@x' WHERE id = 1")
        e.barrier()
        assert r.exists("user:1"), "update of a column not in `changed` invalidated"
        # Same value written again: nothing changed either.
        e.q("UPDATE users SET name = 'ann' WHERE id = 1")
        e.barrier()
        assert r.exists("user:1"), "update with an unchanged `changed` column invalidated"
        e.q("UPDATE users SET name = 'anne' WHERE id = 1")
        e.gone("user:1")
        setkeys(r, "user:1")
        e.q("UPDATE users SET team_id = 6, email = 'x@x' WHERE id = 1")
        e.gone("user:1")

        # REPLICA IDENTITY DEFAULT: the old name is unknown, which counts as
        # changed (docs/rules.md), so even an email-only update fires.
        e.q("INSERT INTO people VALUES (1, 'pat', 'p@x')")
        setkeys(r, "person:1")
        e.q("UPDATE people SET email = 'q@x' WHERE id = 1")
        e.gone("person:1")
    finally:
        e.close()


def test_null_suppression():
    e = Env("null", 4, USERS_SQL, [
        {"table": "public.users", "keys": ["user:{id}", "team:{team_id}:members"],
         "patterns": ["team:{team_id}:*"]},
    ], replica_full=["users"])
    try:
        r = e.r
        survivors = ["team::members", "team::x", "team:5:x", "team:null:x", "team:*:x", "other"]
        setkeys(r, "user:1", *survivors)
        e.q("INSERT INTO users VALUES (1, 'ann', 'a@x', NULL)")
        e.gone("user:1")
        e.barrier()
        assert all(r.exists(k) for k in survivors), e.keys()

        setkeys(r, "user:1")
        e.q("UPDATE users SET name = 'anne' WHERE id = 1")
        e.gone("user:1")
        e.barrier()
        assert all(r.exists(k) for k in survivors), e.keys()

        # NULL -> 5: the new image renders team 5, the old NULL nothing.
        setkeys(r, "user:1", "team:5:members")
        e.q("UPDATE users SET team_id = 5 WHERE id = 1")
        e.gone("user:1", "team:5:members", "team:5:x")
        e.barrier()
        assert all(r.exists(k) for k in survivors if not k.startswith("team:5:")), e.keys()

        setkeys(r, "user:1", "team:5:x")
        e.q("UPDATE users SET team_id = NULL WHERE id = 1")
        e.gone("user:1", "team:5:x")
        e.q("DELETE FROM users WHERE id = 1")
        e.barrier()
        assert all(r.exists(k) for k in survivors if not k.startswith("team:5:")), e.keys()
    finally:
        e.close()


# ---------------------------------------------------------------------------
# replica identity: refusal at start-up, widening at run time


def test_refuses_old_value_under_replica_identity_default():
    e = Env("refuse", 5, USERS_SQL, [], pub_tables=["users"], start=False)
    try:
        setkeys(e.r, "team:5:members", "team:7:members")
        for on in (["update"], ["delete"]):
            tpl = "team:{team_id}:members"
            path = write_rules({"rules": [{"table": "public.users", "on": on, "keys": [tpl]},
                                          BARRIER_RULE]})
            wb = Walbust(e.db, path, redis_urls=[e.url]).start()
            try:
                wb.proc.wait(20)
            except subprocess.TimeoutExpired:
                wb.proc.kill()
                wb.proc.wait()
                raise AssertionError(f"walbust started with an unsatisfiable rule on {on}:\n"
                                     f"{wb.read_log()}")
            wb.log.close()
            log = wb.read_log()
            assert wb.proc.returncode == 1, (wb.proc.returncode, log)
            assert "users" in log and tpl in log and "REPLICA IDENTITY FULL" in log, log
            assert "streaming from" not in log, log

        # {new.team_id} says only the new value matters; {team_id} on insert
        # needs no old value. Both start, and new.* really renders the new row.
        path = write_rules({"rules": [
            {"table": "public.users", "on": ["update"], "keys": ["team:{new.team_id}:members"]},
            {"table": "public.users", "on": ["insert"], "keys": ["ins:{team_id}"]},
            BARRIER_RULE]})
        e.start(path)
        e.q("INSERT INTO users VALUES (1, 'ann', 'a@x', 5)")
        setkeys(e.r, "ins:5")
        e.barrier()
        e.q("INSERT INTO users VALUES (2, 'bob', 'b@x', 5)")
        e.gone("ins:5")
        e.q("UPDATE users SET team_id = 7 WHERE id = 1")
        e.gone("team:7:members")
        e.barrier()
        assert e.r.exists("team:5:members"), "{new.team_id} invalidated the old team"
    finally:
        e.close()


def widened_lines(wb):
    """Log lines reporting a widening (not the periodic "widened=N" stats)."""
    return [ln for ln in wb.read_log().splitlines() if re.search(r"widened(?!=)", ln)]


def test_widening_when_identity_changes_at_run_time():
    schema = USERS_SQL + """
        CREATE TABLE codes(code text PRIMARY KEY, grp int, note text);
        CREATE TABLE docs(id int PRIMARY KEY, slug text, body text);
        ALTER TABLE docs ALTER COLUMN body SET STORAGE EXTERNAL;"""
    e = Env("widen", 6, schema, [
        {"table": "public.users", "on": ["update", "delete"], "keys": ["user:{id}:team:{team_id}"]},
        {"table": "public.codes", "on": ["update"], "keys": ["code:{code}:grp:{grp}"]},
        {"table": "public.docs", "on": ["update"], "keys": ["doc:{id}:{new.body}"]},
    ], replica_full=["users", "codes"])
    try:
        r = e.r
        e.q("INSERT INTO users VALUES (1, 'ann', 'a@x', 5), (2, 'bob', 'b@x', 5)")
        e.barrier()
        # Under FULL the old value is known: exactly the two keys go.
        setkeys(r, "user:1:team:5", "user:1:team:6", "user:1:team:7")
        e.q("UPDATE users SET team_id = 6 WHERE id = 1")
        e.gone("user:1:team:5", "user:1:team:6")
        e.barrier()
        assert r.exists("user:1:team:7"), "a known old value must not widen"
        assert not widened_lines(e.wb), "a known old value must not be logged as widened"

        e.q("ALTER TABLE users REPLICA IDENTITY DEFAULT")
        doomed = ["user:1:team:6", "user:1:team:5", "user:1:team:abc", "user:1:team:"]
        survivors = ["user:2:team:6", "user:11:team:6", "user:1:teams", "user:1", "other"]
        setkeys(r, *doomed, *survivors)
        e.q("UPDATE users SET name = 'anne' WHERE id = 1")
        e.gone(*doomed)
        e.barrier()
        assert all(r.exists(k) for k in survivors), e.keys()
        line = wait_until(lambda: widened_lines(e.wb), 5, "the log to say 'widened'")[0]
        assert "users" in line, line

        # The known values in a widened key are glob-escaped: a key value of
        # `*` widens to code:\*:grp:* and must not match other codes.
        e.q("INSERT INTO codes VALUES ('*', 1, 'n'), ('x', 1, 'n')")
        e.q("ALTER TABLE codes REPLICA IDENTITY DEFAULT")
        e.barrier()
        doomed = ["code:*:grp:1", "code:*:grp:2"]
        survivors = ["code:x:grp:1", "code:yy:grp:1", "code::grp:1"]
        setkeys(r, *doomed, *survivors)
        e.q("UPDATE codes SET note = 'm' WHERE code = '*'")
        e.gone(*doomed)
        e.barrier()
        left = [k for k in survivors if not r.exists(k)]
        assert not left, f"widened key with value '*' wiped {left}"
        assert any("codes" in ln for ln in widened_lines(e.wb)), e.wb.read_log()

        # An unchanged TOASTed value without an old image (docs keeps
        # REPLICA IDENTITY DEFAULT; {new.body} passes the start-up check):
        # the update does not carry body, so doc:1:* is invalidated.
        body = "".join(f"{i:05d}" for i in range(1000))  # 5000 bytes, stored out of line
        e.q("INSERT INTO docs VALUES (1, 's', %s), (2, 's', %s)", (body, body))
        e.barrier()
        doomed = [f"doc:1:{body}", "doc:1:other"]
        survivors = [f"doc:2:{body}", "doc:11:x", "doc:1"]
        setkeys(r, *doomed, *survivors)
        e.q("UPDATE docs SET slug = 't' WHERE id = 1")
        e.gone(*doomed)
        e.barrier()
        left = [k[:20] for k in survivors if not r.exists(k)]
        assert not left, f"TOAST widening wiped {left}"
        assert any("docs" in ln for ln in widened_lines(e.wb)), e.wb.read_log()
    finally:
        e.close()


# ---------------------------------------------------------------------------
# glob escaping


def test_glob_characters_in_values_never_wipe_other_keys():
    e = Env("glob", 7, USERS_SQL, [
        {"table": "public.users", "on": ["insert"], "patterns": ["name:{name}:*"],
         "keys": ["kname:{name}"]},
    ])
    try:
        r = e.r
        cases = [  # (row value, keys that must go, keys that must stay)
            ("*", ["name:*:a", "name:*:b", "kname:*"],
             ["name:bob:a", "name:x:y", "kname:bob", "name:**:a"]),
            ("?", ["name:?:a"], ["name:b:a", "name:??:a"]),
            ("[a]", ["name:[a]:x"], ["name:a:x", "name:[b]:x"]),
            ("\\", ["name:\\:x"], ["name::x", "name:\\\\:x", "name:a:x"]),
            ("a*b", ["name:a*b:1"], ["name:ab:1", "name:axxb:1"]),
        ]
        for i, (value, doomed, survivors) in enumerate(cases):
            r.flushdb()
            setkeys(r, *doomed, *survivors)
            e.q("INSERT INTO users VALUES (%s, %s, 'x', 1)", (i, value))
            e.gone(*doomed)
            e.barrier()
            left = [k for k in survivors if not r.exists(k)]
            assert not left, f"value {value!r} wiped {left}"
    finally:
        e.close()


# ---------------------------------------------------------------------------
# patterns, tags, versions, publish


def test_patterns_tags_versions():
    e = Env("actions", 8, USERS_SQL, [
        {"table": "public.users", "patterns": ["team:{team_id}:*"], "tags": ["user:{id}"],
         "versions": ["ver:user:{id}"]},
    ], defaults={"tag_prefix": "tg:"}, replica_full=["users"])
    try:
        r = e.r
        e.q("INSERT INTO users VALUES (1, 'ann', 'a@x', 5), (2, 'bob', 'b@x', 6)")
        e.barrier()
        r.flushdb()
        setkeys(r, "team:5:a", "team:5:b:c", "team:6:a", "team:55:a", "m1", "m2", "m3", "m4")
        r.sadd("tg:user:1", "m1", "m2")
        r.sadd("tg:user:2", "m3")
        r.sadd("tag:user:1", "m4")  # default prefix: not ours here
        r.set("ver:user:1", 10)
        r.set("ver:user:2", 20)
        e.q("UPDATE users SET name = 'anne' WHERE id = 1")
        e.gone("team:5:a", "team:5:b:c", "tg:user:1", "m1", "m2")
        wait_until(lambda: int(r.get("ver:user:1") or 0) >= 11, 10, "ver:user:1 INCR")
        e.barrier()
        for k in ("team:6:a", "team:55:a", "m3", "m4", "tag:user:1"):
            assert r.exists(k), (k, e.keys())
        assert r.smembers("tg:user:2") == {"m3"}
        assert r.get("ver:user:2") == "20"

        v1 = int(r.get("ver:user:1"))
        e.q("INSERT INTO users VALUES (3, 'cy', 'c@x', 6)")
        wait_until(lambda: r.get("ver:user:3") is not None, 10, "ver:user:3 created")
        assert int(r.get("ver:user:3")) >= 1
        e.gone("team:6:a")
        e.barrier()
        assert int(r.get("ver:user:1")) == v1, "insert of 3 moved user 1's version"
        assert r.exists("team:55:a") and r.exists("m3")
    finally:
        e.close()


def subscribe(r, channel):
    p = r.pubsub()
    p.subscribe(channel)
    wait_until(lambda: (p.get_message(timeout=0.2) or {}).get("type") == "subscribe", 10,
               "SUBSCRIBE confirmation")
    return p


def next_message(p, timeout=10):
    m = wait_until(lambda: (lambda x: x if x and x["type"] == "message" else None)(
        p.get_message(timeout=0.2)), timeout, "a published message")
    return json.loads(m["data"])


def no_message(p):
    m = p.get_message(timeout=0.3)
    while m is not None:
        assert m["type"] != "message", f"unexpected message {m}"
        m = p.get_message(timeout=0.3)


def test_publish_payload():
    e = Env("publish", 9, USERS_SQL, [
        {"table": "public.users", "keys": ["user:{id}"], "patterns": ["team:{team_id}:*"],
         "tags": ["user:{id}"], "publish": ["rules_e2e_chan"]},
        # A second rule on the same channel: still one message per change.
        {"table": "public.users", "on": ["update", "delete"], "keys": ["u2:{id}"],
         "publish": ["rules_e2e_chan"]},
    ], replica_full=["users"])
    try:
        e.q("INSERT INTO users VALUES (1, 'ann', 'a@x', 5)")
        e.barrier()
        p = subscribe(redis_client(e.rdb), "rules_e2e_chan")
        no_message(p)  # the insert's message was before SUBSCRIBE
        before = current_lsn(e.db)
        conn = connect(e.db, autocommit=False)
        with conn.cursor() as cur:
            cur.execute("SELECT txid_current()")
            xid = cur.fetchone()[0]
            cur.execute("UPDATE users SET team_id = 7 WHERE id = 1")
        conn.commit()
        conn.close()
        after = current_lsn(e.db)
        msg = next_message(p)
        assert msg["table"] == "public.users" and msg["op"] == "update", msg
        assert sorted(msg["keys"]) == ["u2:1", "user:1"], msg
        assert sorted(msg["patterns"]) == ["team:5:*", "team:7:*"], msg
        assert msg["tags"] == ["user:1"], msg  # tag names, as rendered (no prefix)
        assert LSN_RE.match(msg["lsn"]), msg
        assert lsn_ge(e.db, msg["lsn"], before) and lsn_ge(e.db, after, msg["lsn"]), \
            (before, msg["lsn"], after)
        assert isinstance(msg["xid"], int) and msg["xid"] == xid % (1 << 32), (msg, xid)
        assert TIME_RE.match(msg["commit_time"]), msg
        t = datetime.datetime.strptime(msg["commit_time"].rstrip("Z").split(".")[0],
                                       "%Y-%m-%dT%H:%M:%S").replace(tzinfo=datetime.timezone.utc)
        now = e.q("SELECT now()", fetch=True)[0][0]
        assert abs((now - t).total_seconds()) < 60, (now, t)

        e.q("DELETE FROM users WHERE id = 1")
        msg = next_message(p)
        assert msg["op"] == "delete" and sorted(msg["keys"]) == ["u2:1", "user:1"], msg
        assert msg["patterns"] == ["team:7:*"], msg
        e.barrier()
        no_message(p)  # exactly one message per change per channel
        p.close()
    finally:
        e.close()


# ---------------------------------------------------------------------------
# truncate


def test_truncate_widens_everything_of_the_table():
    schema = USERS_SQL + "CREATE TABLE teams(id int PRIMARY KEY, name text);"
    e = Env("truncate", 10, schema, [
        {"table": "public.users", "keys": ["user:{id}"], "patterns": ["team:{team_id}:*"],
         "tags": ["user:{id}"], "versions": ["ver:user:{id}"], "publish": ["rules_e2e_trunc"]},
        {"table": "public.teams", "keys": ["teamname:{id}"]},
    ], defaults={"tag_prefix": "tg:"}, replica_full=["users"])
    try:
        r = e.r
        e.q("INSERT INTO users VALUES (1, 'ann', 'a@x', 5), (2, 'bob', 'b@x', 6)")
        e.q("INSERT INTO teams VALUES (1, 'red')")
        e.barrier()
        r.flushdb()
        doomed = ["user:1", "user:2", "user:xyz", "team:5:a", "team:6:b:c", "m1", "m2", "m3",
                  "tg:user:1", "tg:user:2"]
        survivors = ["teamname:1", "misc", "users:1", "team:5", "m9", "tg:team:1"]
        setkeys(r, *[k for k in doomed + survivors if not k.startswith("tg:")])
        r.sadd("tg:user:1", "m1", "m2")
        r.sadd("tg:user:2", "m3")
        r.sadd("tg:team:1", "m9")
        r.set("ver:user:1", 3)
        r.set("ver:user:2", 7)
        p = subscribe(redis_client(e.rdb), "rules_e2e_trunc")
        e.q("TRUNCATE users")
        msg = next_message(p)
        assert msg["table"] == "public.users" and msg["op"] == "truncate", msg
        assert msg["keys"] == [] and sorted(msg["patterns"]) == ["team:*:*", "user:*"], msg
        assert LSN_RE.match(msg["lsn"]) and TIME_RE.match(msg["commit_time"]), msg
        e.gone(*doomed)
        wait_until(lambda: r.get("ver:user:1") == "4" and r.get("ver:user:2") == "8", 10,
                   "versions of existing matches incremented")
        e.barrier()
        left = [k for k in survivors if not r.exists(k)]
        assert not left, f"truncate of users wiped {left}"
        assert sorted(r.keys("ver:*")) == ["ver:user:1", "ver:user:2"], r.keys("ver:*")
        assert r.get("ver:user:1") == "4" and r.get("ver:user:2") == "8"
        no_message(p)
        p.close()
    finally:
        e.close()


# ---------------------------------------------------------------------------
# explicit invalidation from SQL


def test_explicit_sql_invalidation():
    e = Env("explicit", 11, USERS_SQL, [{"table": "public.users", "keys": ["user:{id}"]}])
    try:
        r = e.r
        with open(os.path.join(SRC, "sql", "walbust.sql")) as f:
            e.q(f.read())
        setkeys(r, "k1", "k2", "k3", "p:1", "p:2:x", "q:1", "m1", "m2", "m3")
        r.sadd("tag:t", "m1", "m2")
        r.sadd("tag:u", "m3")
        e.q("SELECT walbust.invalidate('k1', 'k2')")
        e.gone("k1", "k2")
        e.q("SELECT walbust.invalidate_pattern('p:*')")
        e.gone("p:1", "p:2:x")
        e.q("SELECT walbust.invalidate_tag('t')")
        e.gone("tag:t", "m1", "m2")
        e.barrier()
        for k in ("k3", "q:1", "m3", "tag:u"):
            assert r.exists(k), (k, e.keys())

        # Rolled back: nothing applied (the barrier commits after it).
        conn = connect(e.db, autocommit=False)
        with conn.cursor() as cur:
            cur.execute("SELECT walbust.invalidate('k3')")
            cur.execute("SELECT walbust.invalidate_pattern('q:*')")
            cur.execute("SELECT walbust.invalidate_tag('u')")
        conn.rollback()
        # A savepoint rolled back inside a committed transaction, too.
        with conn.cursor() as cur:
            cur.execute("SAVEPOINT s")
            cur.execute("SELECT walbust.invalidate('k3')")
            cur.execute("ROLLBACK TO SAVEPOINT s")
            cur.execute("INSERT INTO users VALUES (1, 'ann', 'a@x', 1)")
        setkeys(r, "user:1")
        conn.commit()
        conn.close()
        e.gone("user:1")
        e.barrier()
        for k in ("k3", "q:1", "m3", "tag:u"):
            assert r.exists(k), (k, e.keys())

        # Committed together with a row change: both applied.
        setkeys(r, "user:1")
        conn = connect(e.db, autocommit=False)
        with conn.cursor() as cur:
            cur.execute("UPDATE users SET name = 'x' WHERE id = 1")
            cur.execute("SELECT walbust.invalidate('k3')")
        conn.commit()
        conn.close()
        e.gone("user:1", "k3")
    finally:
        e.close()


# ---------------------------------------------------------------------------
# defaults.delete "del"


def cmdstat(r, name):
    info = r.info("commandstats")
    return info.get(f"cmdstat_{name}", {}).get("calls", 0)


def test_defaults_delete_del():
    e = Env("del", 12, USERS_SQL, [{"table": "public.users", "keys": ["user:{id}", "user:{id}:p"]}],
            defaults={"delete": "del"})
    try:
        r = e.r
        dels, unlinks = cmdstat(r, "del"), cmdstat(r, "unlink")
        setkeys(r, "user:1", "user:1:p", "user:2")
        e.q("INSERT INTO users VALUES (1, 'ann', 'a@x', 1)")
        e.gone("user:1", "user:1:p")
        e.barrier()
        assert r.exists("user:2")
        assert cmdstat(r, "del") > dels, "no DEL was issued"
        assert cmdstat(r, "unlink") == unlinks, "UNLINK used although defaults.delete is del"
    finally:
        e.close()


# ---------------------------------------------------------------------------
# SIGHUP reload


def test_sighup_reload():
    e = Env("hup", 13, USERS_SQL, [{"table": "public.users", "keys": ["user:{id}"]}])
    try:
        r = e.r
        e.q("INSERT INTO users VALUES (1, 'ann', 'a@x', 1), (2, 'bob', 'b@x', 1)")
        e.barrier()
        setkeys(r, "user:1", "user:1:profile")
        e.q("UPDATE users SET name = 'a1' WHERE id = 1")
        e.gone("user:1")
        e.barrier()
        assert r.exists("user:1:profile"), "the profile key is not in the first rules"

        with open(e.rules, "w") as f:
            json.dump({"rules": [{"table": "public.users",
                                  "keys": ["user:{id}", "user:{id}:profile"]}, BARRIER_RULE]}, f)
        e.wb.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "rules reloaded" in e.wb.read_log(), 10, "rules reloaded")
        setkeys(r, "user:1", "user:1:profile")
        e.q("UPDATE users SET name = 'a2' WHERE id = 1")
        e.gone("user:1", "user:1:profile")

        with open(e.rules, "w") as f:
            f.write('{"rules": [ {"table": "public.users", "keys": ["user:{id}"] ')  # broken
        n_before = e.wb.read_log().count("keeping the previous rules")
        e.wb.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: e.wb.read_log().count("keeping the previous rules") > n_before, 10,
                   "the reload failure to be logged")
        assert e.wb.alive(), "walbust died on a broken rules file"
        setkeys(r, "user:2", "user:2:profile")
        e.q("UPDATE users SET name = 'b2' WHERE id = 2")
        e.gone("user:2", "user:2:profile")  # the previous (second) rules still apply
        assert e.wb.alive()

        # Valid JSON, but refused against the catalog: {name} on update under
        # REPLICA IDENTITY DEFAULT. The previous rules stay.
        with open(e.rules, "w") as f:
            json.dump({"rules": [{"table": "public.users", "keys": ["name:{name}"]},
                                 BARRIER_RULE]}, f)
        n_before = e.wb.read_log().count("keeping the previous rules")
        e.wb.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: e.wb.read_log().count("keeping the previous rules") > n_before, 10,
                   "the refused reload to be logged")
        assert "REPLICA IDENTITY FULL" in e.wb.read_log().split("SIGHUP")[-1], e.wb.read_log()
        setkeys(r, "user:1:profile", "name:a3")
        e.q("UPDATE users SET name = 'a3' WHERE id = 1")
        e.gone("user:1:profile")
        e.barrier()
        assert r.exists("name:a3"), "a refused reload was applied"
        assert e.wb.alive()
    finally:
        e.close()


# ---------------------------------------------------------------------------
# confirmation: SIGTERM, idle slot, watermark


def test_sigterm_confirms_last_commit():
    e = Env("sigterm", 14, USERS_SQL, [{"table": "public.users", "keys": ["user:{id}"]}])
    try:
        r = e.r
        for i in range(1, 4):
            setkeys(r, f"user:{i}")
            e.q("INSERT INTO users VALUES (%s, 'n', 'e', 1)", (i,))
        last = current_lsn(e.db)
        e.gone("user:1", "user:2", "user:3")
        rc = e.wb.stop()
        assert rc == 0, (rc, e.wb.read_log()[-2000:])
        assert "stopped" in e.wb.read_log()
        confirmed = slot_confirmed(e.db)
        assert confirmed and lsn_ge(e.db, confirmed, last), (confirmed, last)
    finally:
        e.close()


def test_idle_unpublished_writes_advance_slot():
    schema = USERS_SQL + "CREATE TABLE audit(id bigserial PRIMARY KEY, note text);"
    e = Env("idle", 15, schema, [{"table": "public.users", "keys": ["user:{id}"]}])
    try:
        e.barrier()
        start = slot_confirmed(e.db)
        for _ in range(5):
            e.q("INSERT INTO audit(note) VALUES (repeat('x', 1000))")
        target = current_lsn(e.db)
        assert not lsn_ge(e.db, start, target), (start, target)
        wait_until(lambda: lsn_ge(e.db, slot_confirmed(e.db), target), 15,
                   f"confirmed_flush_lsn to reach {target} on an unpublished workload")
    finally:
        e.close()


def test_watermark_key():
    e = Env("watermark", 1, USERS_SQL, [{"table": "public.users", "keys": ["user:{id}"]}])
    try:
        r = e.r
        setkeys(r, "user:1")
        e.q("INSERT INTO users VALUES (1, 'ann', 'a@x', 1)")
        last = current_lsn(e.db)
        e.gone("user:1")
        e.barrier()
        key = "walbust:confirmed:walbust"

        def caught_up():
            v = r.get(key)
            return v is not None and LSN_RE.match(v) and lsn_ge(e.db, v, last)
        wait_until(caught_up, 10, f"{key} to reach {last}")
        v = r.get(key)
        # The slot's confirmed position follows within the status-update
        # coalescing delay (10 ms), possibly after the watermark.
        wait_until(lambda: lsn_ge(e.db, slot_confirmed(e.db), last), 10,
                   f"the slot to confirm {last}")
        # The watermark never claims more than PostgreSQL has.
        assert lsn_ge(e.db, current_lsn(e.db), v), v
    finally:
        e.close()


# ---------------------------------------------------------------------------
# decode dry run


def run_decode(e, rules, until):
    args = [BIN, "decode", "--pg", dsn(e.db), "--rules", rules, "--slot", "dec",
            "--publication", "walbust", "--until", until]
    env = dict(os.environ, WALBUST_REDIS=e.url)
    p = subprocess.run(args, capture_output=True, text=True, timeout=60, env=env)
    assert p.returncode == 0, (p.returncode, p.stderr)
    return [json.loads(ln) for ln in p.stdout.splitlines() if ln.strip()]


def test_decode_dry_run():
    e = Env("decode", 2, USERS_SQL, [
        {"table": "public.users", "keys": ["user:{id}"], "patterns": ["team:{team_id}:*"]},
    ], replica_full=["users"], start=False)
    try:
        r = e.r
        with open(os.path.join(SRC, "sql", "walbust.sql")) as f:
            e.q(f.read())
        e.q("SELECT pg_create_logical_replication_slot('dec', 'pgoutput')")
        setkeys(r, "user:1", "team:5:a", "team:7:a", "k9")
        e.q("INSERT INTO users VALUES (1, 'ann', 'a@x', 5)")
        e.q("UPDATE users SET team_id = 7 WHERE id = 1")
        e.q("SELECT walbust.invalidate('k9')")
        until = current_lsn(e.db)
        slot_before = slot_confirmed(e.db, "dec")

        lines = run_decode(e, e.rules, until)
        ops = [ln["op"] for ln in lines]
        assert ops == ["insert", "update", "message"], lines
        ins, upd, msg = lines
        assert ins["table"] == "public.users" and ins["new"]["id"] == "1", ins
        assert ins["invalidations"]["keys"] == ["user:1"], ins
        assert ins["invalidations"]["patterns"] == ["team:5:*"], ins
        assert upd["invalidations"]["keys"] == ["user:1"], upd
        assert sorted(upd["invalidations"]["patterns"]) == ["team:5:*", "team:7:*"], upd
        assert msg["invalidations"]["keys"] == ["k9"], msg
        for ln in lines:
            assert LSN_RE.match(ln["lsn"]) and TIME_RE.match(ln["commit_time"]), ln
        for k in ("user:1", "team:5:a", "team:7:a", "k9"):
            assert r.exists(k), f"decode touched Redis: {k} gone"
        assert slot_confirmed(e.db, "dec") == slot_before

        again = run_decode(e, e.rules, until)
        assert again == lines, (lines, again)
        assert slot_confirmed(e.db, "dec") == slot_before, "decode advanced the slot"
        assert all(r.exists(k) for k in ("user:1", "team:5:a", "team:7:a", "k9"))
    finally:
        e.close()
        sql("postgres", "SELECT pg_drop_replication_slot('dec') FROM pg_replication_slots "
                        "WHERE slot_name = 'dec' AND database = %s", (e.db,))


def main():
    if not BIN or not os.access(BIN, os.X_OK):
        print(f"WALBUST_BIN is not an executable walbust ({BIN!r}); run make first")
        sys.exit(1)
    t = Runner("test_rules_e2e")
    for fn in (test_keys_insert_update_delete, test_several_rules_braces_on_and_text_values,
               test_both_images_on_key_column_update,
               test_changed_filter, test_null_suppression,
               test_refuses_old_value_under_replica_identity_default,
               test_widening_when_identity_changes_at_run_time,
               test_glob_characters_in_values_never_wipe_other_keys,
               test_patterns_tags_versions, test_publish_payload,
               test_truncate_widens_everything_of_the_table, test_explicit_sql_invalidation,
               test_defaults_delete_del, test_sighup_reload, test_sigterm_confirms_last_commit,
               test_idle_unpublished_writes_advance_slot, test_watermark_key,
               test_decode_dry_run):
        if not sys.argv[1:] or any(a in fn.__name__ for a in sys.argv[1:]):
            t.run(fn)
    t.done()


if __name__ == "__main__":
    main()
