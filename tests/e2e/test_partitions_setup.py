"""Partitioned tables, inheritance children, tables without a key, and
hints that paste, through `walbust setup`, `walbust check --pg` and
`walbust run` against the real stack.

- rules on a partitioned root and on one of its partitions both fire; an
  UPDATE that moves a row to another partition (published as a delete plus
  an insert) invalidates both sides, also for an update-only rule; a
  partition attached (or created) while walbust runs is covered; TRUNCATE of
  one partition reaches the root's rules; changes of a partition detached
  while walbust was stopped are widened, not lost;
- a rule on an inheritance parent covers its children: setup publishes
  them, a child created later is reported by check with an ALTER that
  pastes, and is covered once added;
- an insert-only rule on a table without a key: after setup the
  application's UPDATE and DELETE still succeed and the inserts are
  invalidated; a rule that needs updates on such a table makes setup refuse
  with the ALTER that fixes it; check flags an existing publication that
  breaks the application's writes, and setup repairs it;
- every hint printed by check is pasted into psql and check then passes
  (names that need quotes, a non-public schema);
- 2,000 rules tables: check and setup are timed and the figures printed.

Each scenario asserts the Redis state and the slot's confirmed position.
Database parts_*, Redis db 10.

Run by hand:
  make && scripts/stack start /tmp/me-stack && . /tmp/me-stack/env &&
  WALBUST_BIN=$PWD/build/walbust /usr/bin/python3 tests/e2e/test_partitions_setup.py
"""
import os
import re
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (BARRIER_RULE, BARRIER_SQL, BIN, REDIS_PORT, Runner, Walbust,  # noqa: E402
                     barrier, dsn, fresh_db, redis_client, slot_confirmed, sql, wait_until,
                     write_rules)

RDB = 10
URL = f"redis://127.0.0.1:{REDIS_PORT}/{RDB}"

SCHEMA = """
CREATE TABLE events (id int, day int, v int, PRIMARY KEY (id, day)) PARTITION BY RANGE (day);
CREATE TABLE events_a PARTITION OF events FOR VALUES FROM (0) TO (10);
CREATE TABLE events_b PARTITION OF events FOR VALUES FROM (10) TO (20);
CREATE TABLE docs (id int PRIMARY KEY, body text);
CREATE TABLE docs_old () INHERITS (docs);
ALTER TABLE docs_old ADD PRIMARY KEY (id);
CREATE TABLE audit (who text, what text);
CREATE SCHEMA "Billing";
CREATE TABLE "Billing".invoices (id int PRIMARY KEY, total int);
CREATE TABLE public."Order" (id int PRIMARY KEY, qty int);
"""

RULES = [
    {"table": "public.events", "keys": ["ev:{id}"]},
    {"table": "public.events", "on": ["update"], "keys": ["evday:{day}"]},
    {"table": "public.events_a", "keys": ["eva:{id}"]},
    {"table": "public.docs", "keys": ["doc:{id}"]},
    {"table": "public.audit", "on": ["insert"], "keys": ["audit:{who}"]},
    {"table": "Billing.invoices", "keys": ["inv:{id}"]},
    {"table": "public.Order", "keys": ["order:{id}"]},
    BARRIER_RULE,
]


def walbust(*args, db=None, check=None):
    """Run a walbust command; returns (exit code, stdout + stderr)."""
    cmd = [BIN, *args]
    if args[0] == "check" and "--slot" not in args:
        cmd += ["--slot", "parts_check"]  # never created: "setup will create it", no problem
    if db is not None:
        cmd += ["--pg", dsn(db)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    out = p.stdout + p.stderr
    if check is not None:
        assert p.returncode == check, f"{cmd} exited {p.returncode}, wanted {check}:\n{out}"
    return p.returncode, out


def psql(db, text):
    """Paste text into psql; fails the test when psql reports an error."""
    p = subprocess.run(["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", dsn(db)], input=text,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, f"psql refused the pasted hint:\n{text}\n{p.stderr}"


def lsn_ge(db, a, b):
    return sql(db, "SELECT %s::pg_lsn >= %s::pg_lsn", (a, b), fetch=True)[0][0]


def assert_confirmed_past(db, slot, lsn):
    """The slot's confirmed position reaches lsn (walbust confirmed only
    after Redis acknowledged, so what was asserted before is durable)."""
    wait_until(lambda: lsn_ge(db, slot_confirmed(db, slot) or "0/0", lsn), 20,
               f"slot {slot} to confirm past {lsn}")


def current_lsn(db):
    return sql(db, "SELECT pg_current_wal_lsn()::text", fetch=True)[0][0]


def gone(r, *keys):
    wait_until(lambda: not any(r.exists(k) for k in keys), 20, f"{keys} to be invalidated")


def pubs(db):
    rows = sql(db, "SELECT pubname, schemaname || '.' || tablename FROM pg_publication_tables "
                   "ORDER BY 1, 2", fetch=True)
    out = {}
    for pub, table in rows:
        out.setdefault(pub, []).append(table)
    return out


def test_setup_partitions_inheritance_keyless():
    db = fresh_db("parts_setup")
    sql(db, SCHEMA)
    sql(db, BARRIER_SQL)
    rules = write_rules({"rules": RULES})
    r = redis_client(RDB)
    r.flushdb()

    rc, out = walbust("setup", "--rules", rules, "--slot", "parts", db=db, check=0)
    assert "created publication walbust for" in out, out
    assert "created publication walbust_insert_only for 1 table" in out, out
    p = pubs(db)
    assert p.get("walbust_insert_only") == ["public.audit"], p
    for t in ("public.events_a", "public.events_b", "public.docs", "public.docs_old",
              "Billing.invoices", "public.Order", "public.walbust_barrier"):
        assert t in p["walbust"], (t, p)
    assert "public.audit" not in p["walbust"], p
    assert not sql(db, "SELECT pubviaroot FROM pg_publication WHERE pubname = 'walbust'",
                   fetch=True)[0][0]
    walbust("check", "--rules", rules, db=db, check=0)

    # The application's own writes on the keyless table still work.
    sql(db, "INSERT INTO audit VALUES ('bob', 'x')")
    sql(db, "UPDATE audit SET what = 'y' WHERE who = 'bob'")
    sql(db, "DELETE FROM audit WHERE who = 'bob'")

    wb = Walbust(db, rules, slot="parts", redis_urls=[URL]).start().wait_streaming()
    try:
        _stream_checks(db, r, wb)
    finally:
        wb.stop()
    sql("postgres", "SELECT pg_drop_replication_slot('parts')")


def _stream_checks(db, r, wb):
    # Root rule and partition rule.
    r.mset({"ev:1": "c", "eva:1": "c", "ev:2": "c", "eva:2": "c"})
    sql(db, "INSERT INTO events VALUES (1, 5, 0), (2, 15, 0)")
    gone(r, "ev:1", "eva:1", "ev:2")
    barrier(db, r)
    assert r.exists("eva:2"), "a rule on events_a must not fire for a row of events_b"

    # A row moving between partitions: both sides, also for update-only rules.
    r.mset({"ev:1": "c", "eva:1": "c", "evday:5": "c", "evday:15": "c"})
    sql(db, "UPDATE events SET day = 15 WHERE id = 1")
    gone(r, "ev:1", "eva:1", "evday:5", "evday:15")

    # Partitions attached or created while running are covered.
    sql(db, "CREATE TABLE events_c (LIKE events INCLUDING ALL)")
    sql(db, "ALTER TABLE events ATTACH PARTITION events_c FOR VALUES FROM (20) TO (30)")
    sql(db, "CREATE TABLE events_d PARTITION OF events FOR VALUES FROM (30) TO (40)")
    r.mset({"ev:3": "c", "ev:4": "c"})
    sql(db, "INSERT INTO events VALUES (3, 25, 0), (4, 35, 0)")
    gone(r, "ev:3", "ev:4")

    # TRUNCATE of one partition reaches the root's rules (widened).
    r.mset({"ev:99": "c", "eva:99": "c"})
    sql(db, "TRUNCATE events_b")
    gone(r, "ev:99")
    barrier(db, r)
    assert r.exists("eva:99"), "TRUNCATE events_b must not touch the rules of events_a"

    # Inheritance: a child's rows reach the parent's rule.
    r.set("doc:7", "c")
    sql(db, "INSERT INTO docs_old VALUES (7, 'x')")
    gone(r, "doc:7")

    # Keyless insert-only table: inserts invalidated, app writes succeed.
    r.set("audit:alice", "c")
    sql(db, "INSERT INTO audit VALUES ('alice', 'login')")
    gone(r, "audit:alice")
    sql(db, "UPDATE audit SET what = 'logout' WHERE who = 'alice'")
    sql(db, "DELETE FROM audit WHERE who = 'alice'")

    # Names that need quotes.
    r.mset({"inv:1": "c", "order:1": "c"})
    sql(db, 'INSERT INTO "Billing".invoices VALUES (1, 10)')
    sql(db, 'INSERT INTO public."Order" VALUES (1, 1)')
    gone(r, "inv:1", "order:1")

    # An inheritance child created later: check names it with an ALTER
    # that pastes; once added, its rows are covered (walbust kept running).
    sql(db, "CREATE TABLE docs_new (PRIMARY KEY (id)) INHERITS (docs)")
    rc, out = walbust("check", "--rules", wb.args[wb.args.index("--rules") + 1], db=db)
    assert rc == 1 and "docs_new" in out and "inheritance children" in out, out
    m = re.search(r"run (ALTER PUBLICATION .*?) \(or walbust setup\)", out)
    assert m, out
    psql(db, m.group(1) + ";")
    walbust("check", "--rules", wb.args[wb.args.index("--rules") + 1], db=db, check=0)
    r.set("doc:8", "c")
    sql(db, "INSERT INTO docs_new VALUES (8, 'y')")
    gone(r, "doc:8")

    lsn = current_lsn(db)
    barrier(db, r)
    assert_confirmed_past(db, "parts", lsn)
    assert wb.alive(), wb.read_log()


def test_detached_partition_replayed_is_widened():
    """Changes of a partition that was detached while walbust was stopped
    are replayed from WAL after the detach: walbust can no longer tell which
    root they belonged to, so it widens to the rules of every partitioned
    rules table instead of skipping them."""
    db = fresh_db("parts_detach")
    sql(db, SCHEMA)
    sql(db, BARRIER_SQL)
    rules = write_rules({"rules": RULES})
    r = redis_client(RDB)
    r.flushdb()
    walbust("setup", "--rules", rules, "--slot", "parts_detach", db=db, check=0)
    wb = Walbust(db, rules, slot="parts_detach", redis_urls=[URL]).start().wait_streaming()
    barrier(db, r)
    assert wb.stop() == 0

    sql(db, "INSERT INTO events VALUES (4, 12, 0)")
    sql(db, "ALTER TABLE events DETACH PARTITION events_b")
    r.mset({"ev:4": "c", "ev:77": "c", "inv:1": "c"})
    wb = Walbust(db, rules, slot="parts_detach", redis_urls=[URL]).start().wait_streaming()
    try:
        gone(r, "ev:4", "ev:77")
        lsn = current_lsn(db)
        barrier(db, r)
        assert r.exists("inv:1"), "only the rules of partitioned/parent tables are widened"
        assert "detached or dropped since" in wb.read_log(), wb.read_log()
        assert_confirmed_past(db, "parts_detach", lsn)
    finally:
        wb.stop()
    sql("postgres", "SELECT pg_drop_replication_slot('parts_detach')")


def test_decode_dry_run_routes_partitions():
    """`walbust decode --rules` shows what run would do: a change on a
    partition lists the invalidations of the partitioned table's rules."""
    db = fresh_db("parts_decode")
    sql(db, SCHEMA)
    sql(db, BARRIER_SQL)
    rules = write_rules({"rules": RULES})
    walbust("setup", "--rules", rules, "--slot", "parts_decode", db=db, check=0)
    sql("postgres", "SELECT pg_drop_replication_slot('parts_decode')")
    wb = Walbust(db, rules, cmd="decode", extra=["--max-changes", "1"])
    i = wb.args.index("--slot")
    del wb.args[i:i + 2]  # a temporary slot that starts now
    wb.start()
    try:
        wait_until(lambda: "streaming from" in wb.read_log() or wb.proc.poll() is not None, 20,
                   "decode to stream")
        sql(db, "INSERT INTO events VALUES (5, 12, 0)")
        wait_until(lambda: wb.proc.poll() is not None, 20, "decode to print one change and exit")
        out = wb.read_log()
        assert '"table":"public.events_b"' in out and '"ev:5"' in out, out
    finally:
        wb.stop()


def test_keyless_update_rule_refused_with_fix():
    db = fresh_db("parts_keyless")
    sql(db, "CREATE TABLE audit (who text, what text)")
    rules = write_rules({"rules": [{"table": "public.audit", "keys": ["audit:{new.who}"]}]})
    rc, out = walbust("setup", "--rules", rules, "--slot", "parts_keyless", db=db, check=1)
    assert "nothing was changed" in out, out
    assert not sql(db, "SELECT 1 FROM pg_publication", fetch=True), "a refused setup changed things"
    m = re.search(r"Run (ALTER TABLE \S+ REPLICA IDENTITY FULL)", out)
    assert m, out
    psql(db, m.group(1) + ";")
    walbust("setup", "--rules", rules, "--slot", "parts_keyless", db=db, check=0)
    sql(db, "INSERT INTO audit VALUES ('a', 'b')")
    sql(db, "UPDATE audit SET what = 'c'")
    sql(db, "DELETE FROM audit")
    walbust("check", "--rules", rules, db=db, check=0)
    sql("postgres", "SELECT pg_drop_replication_slot('parts_keyless')")


def test_hints_paste():
    """Every hint check prints works when pasted into psql, with names that
    need quotes and a non-public schema; after each, check passes that
    point."""
    db = fresh_db("parts_hints")
    sql(db, SCHEMA)
    rules_obj = {"rules": [rule for rule in RULES if rule is not BARRIER_RULE]}
    rules = write_rules(rules_obj)

    # 1. No publication yet (what setup will create, not a problem): the
    #    full CREATE PUBLICATION statements for doing it by hand.
    rc, out = walbust("check", "--rules", rules, db=db, check=0)
    m = re.search(r"by hand: (.*)$", out, re.M)
    assert m and '"Billing".invoices' in m.group(1) and 'public."Order"' in m.group(1), out
    assert "walbust_insert_only" in m.group(1) and "public.audit" in m.group(1), out
    psql(db, m.group(1))
    walbust("check", "--rules", rules, db=db, check=0)
    sql(db, "UPDATE audit SET what = 'x'")  # the hint did not break the application

    # 2. A table missing from the publication (quoted, non-public schema).
    sql(db, 'ALTER PUBLICATION walbust DROP TABLE "Billing".invoices')
    rc, out = walbust("check", "--rules", rules, db=db, check=1)
    m = re.search(r"run (ALTER PUBLICATION walbust ADD TABLE \S+) \(or walbust setup\)", out)
    assert m and '"Billing".invoices' in m.group(1), out
    psql(db, m.group(1))
    walbust("check", "--rules", rules, db=db, check=0)

    # 3. Old values the replica identity lacks, on a partitioned table: one
    #    ALTER per partition (the root's setting does not reach them).
    rules_obj["rules"].append({"table": "public.events", "keys": ["evv:{v}"]})
    rules2 = write_rules(rules_obj)
    rc, out = walbust("check", "--rules", rules2, db=db, check=1)
    m = re.search(r"; run ((?:ALTER TABLE \S+ REPLICA IDENTITY FULL(?:; )?)+); or write", out)
    assert m and "events_a" in m.group(1) and "events_b" in m.group(1), out
    psql(db, m.group(1) + ";")
    walbust("check", "--rules", rules2, db=db, check=0)

    # 4. publish_via_partition_root: refused with the ALTER that fixes it.
    sql(db, "ALTER PUBLICATION walbust SET (publish_via_partition_root = true)")
    rc, out = walbust("check", "--rules", rules, db=db, check=1)
    m = re.search(r"run (ALTER PUBLICATION walbust SET \(publish_via_partition_root = false\))",
                  out)
    assert m, out
    psql(db, m.group(1))
    walbust("check", "--rules", rules, db=db, check=0)

    # 5. Partitions listed one by one instead of the partitioned table:
    #    partitions attached later would be missed; the ADD TABLE pastes
    #    although the partitions are members already (not circular).
    sql(db, "CREATE PUBLICATION p_leaves FOR TABLE events_a, events_b")
    only_events = write_rules({"rules": [{"table": "public.events", "keys": ["ev:{id}"]}]})
    rc, out = walbust("check", "--rules", only_events, "--publication", "p_leaves", db=db,
                      check=1)
    m = re.search(r"run (ALTER PUBLICATION p_leaves ADD TABLE public.events) \(or walbust", out)
    assert m, out
    psql(db, m.group(1))
    walbust("check", "--rules", only_events, "--publication", "p_leaves", db=db, check=0)

    # 6. An existing publication that breaks the application's writes.
    sql(db, "CREATE PUBLICATION p_bad FOR TABLE audit")
    try:
        sql(db, "UPDATE audit SET what = 'z'")
        raise AssertionError("PostgreSQL accepted an UPDATE on a keyless published table")
    except Exception as e:  # noqa: BLE001
        assert "replica identity" in str(e), e
    rc, out = walbust("check", "--rules", rules, "--publication", "p_bad", db=db)
    assert rc == 1 and "refuses the application's UPDATE and DELETE" in out, out
    rc, out = walbust("setup", "--rules", rules, "--publication", "p_bad", "--slot", "parts_hints",
                      db=db, check=0)
    assert "moved public.audit from publication p_bad to p_bad_insert_only" in out, out
    sql(db, "UPDATE audit SET what = 'z'")
    walbust("check", "--rules", rules, "--publication", "p_bad", db=db, check=0)
    sql("postgres", "SELECT pg_drop_replication_slot('parts_hints')")

    # 7. Typos: "did you mean" for a table and a column.
    typo = write_rules({"rules": [{"table": "public.Orders", "keys": ["o:{id}"]},
                                  {"table": "public.docs", "keys": ["d:{bdy}"]}]})
    rc, out = walbust("check", "--rules", typo, db=db, check=1)
    assert 'did you mean public."Order"?' in out or "did you mean public.Order?" in out, out
    assert 'did you mean "body"?' in out, out


def test_reload_keeps_streaming():
    """A SIGHUP reload validates the new rules against the catalog in a
    thread of its own: while that validation is held up (the test holds a
    lock on pg_inherits, which the catalog query reads), changes keep being
    invalidated under the old rules; once it passes, the new rules apply."""
    db = fresh_db("parts_reload")
    sql(db, "CREATE TABLE items (id int PRIMARY KEY, v int)")
    sql(db, BARRIER_SQL)
    rules_path = write_rules({"rules": [{"table": "public.items", "keys": ["item:{id}"]},
                                        BARRIER_RULE]})
    r = redis_client(RDB)
    r.flushdb()
    walbust("setup", "--rules", rules_path, "--slot", "parts_reload", db=db, check=0)
    wb = Walbust(db, rules_path, slot="parts_reload", redis_urls=[URL]).start().wait_streaming()
    lock = None
    try:
        r.set("item:1", "c")
        sql(db, "INSERT INTO items VALUES (1, 1)")
        gone(r, "item:1")
        barrier(db, r)

        lock = psycopg2_conn(db)
        with lock.cursor() as cur:
            cur.execute("LOCK TABLE pg_catalog.pg_inherits IN ACCESS EXCLUSIVE MODE")
        with open(rules_path, "w") as f:
            f.write('{"rules": [{"table": "public.items", "keys": ["item2:{id}"]}, '
                    '{"table": "walbust_barrier", "on": ["insert"], '
                    '"keys": ["barrier:{token}"]}]}')
        wb.proc.send_signal(__import__("signal").SIGHUP)
        wait_until(lambda: "SIGHUP: reloading rules" in wb.read_log(), 20, "the reload to start")
        t0 = time.time()
        for i in range(2, 6):
            r.set(f"item:{i}", "c")
            sql(db, "INSERT INTO items VALUES (%s, 0)", (i,))
        gone(r, *[f"item:{i}" for i in range(2, 6)])
        print(f"# 4 invalidations applied {time.time() - t0:.2f}s into a held-up reload",
              flush=True)
        assert "rules reloaded" not in wb.read_log(), "the reload should still be held up"
        lock.rollback()
        wait_until(lambda: "rules reloaded: 2 tables" in wb.read_log(), 30, "the reload to finish")
        r.set("item2:6", "c")
        sql(db, "INSERT INTO items VALUES (6, 0)")
        gone(r, "item2:6")
        lsn = current_lsn(db)
        barrier(db, r)
        assert_confirmed_past(db, "parts_reload", lsn)
    finally:
        if lock is not None:
            lock.close()
        wb.stop()
    sql("postgres", "SELECT pg_drop_replication_slot('parts_reload')")


def psycopg2_conn(db):
    from harness import connect
    return connect(db, autocommit=False)


def test_2000_tables_timing():
    """2,000 rules tables: check and setup load the catalog with a constant
    number of queries. Prints the figures (not asserted: machines vary)."""
    db = fresh_db("parts_many")
    sql(db, "DO $$BEGIN FOR i IN 1..2000 LOOP EXECUTE format("
            "'CREATE TABLE t%s (id int PRIMARY KEY, name text)', i); END LOOP; END$$")
    rules = write_rules({"rules": [{"table": f"public.t{i}", "keys": [f"t{i}:{{id}}"]}
                                   for i in range(1, 2001)]})
    t0 = time.time()
    rc, out = walbust("check", "--rules", rules, db=db, check=0)
    t_check0 = time.time() - t0
    assert "CREATE PUBLICATION walbust FOR TABLE public.t1, " in out and "public.t2000;" in out, \
        "the hint must list every table"
    t0 = time.time()
    walbust("setup", "--rules", rules, "--slot", "parts_many", db=db, check=0)
    t_setup = time.time() - t0
    t0 = time.time()
    rc, out = walbust("check", "--rules", rules, db=db, check=0)
    t_check = time.time() - t0
    print(f"# 2,000 rules tables: check before setup {t_check0:.2f}s, setup {t_setup:.2f}s, "
          f"check after setup {t_check:.2f}s", flush=True)
    sql("postgres", "SELECT pg_drop_replication_slot('parts_many')")


if __name__ == "__main__":
    t = Runner("test_partitions_setup")
    t.run(test_setup_partitions_inheritance_keyless)
    t.run(test_detached_partition_replayed_is_widened)
    t.run(test_decode_dry_run_routes_partitions)
    t.run(test_keyless_update_rule_refused_with_fix)
    t.run(test_hints_paste)
    t.run(test_reload_keeps_streaming)
    t.run(test_2000_tables_timing)
    t.done()
