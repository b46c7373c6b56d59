"""Schema changes while walbust runs (migrations): walbust must keep
invalidating after each of them, or stop with a message, and never confirm
past a change whose invalidations it did not apply.

Each test has its own database (schema_<test>), Redis db and slot. "Managed"
tests prepare the database with `walbust setup` (which installs the DDL event
triggers of sql/walbust.sql and marks the publication it creates as
walbust's); the others create the publication by hand and install
sql/walbust.sql with psql. Every assertion on Redis is made after a barrier
(a later commit whose invalidation was observed) or with a bounded wait, and
every test checks the slot's confirmed position.

Run by hand:
  make && scripts/stack start /tmp/me-stack && . /tmp/me-stack/env &&
  WALBUST_BIN=$PWD/build/walbust /usr/bin/python3 tests/e2e/test_schema_changes.py
"""
import json
import os
import re
import signal
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import (BARRIER_RULE, BARRIER_SQL, BIN, REDIS_PORT, SRC, Runner, Walbust,  # noqa: E402
                     barrier, dsn, free_port, fresh_db, readyz, redis_client, scrape,
                     slot_confirmed, sql, wait_until, write_rules)

def lsn_ge(db, a, b):
    return sql(db, "SELECT %s::pg_lsn >= %s::pg_lsn", (a, b), fetch=True)[0][0]


def current_lsn(db):
    return sql(db, "SELECT pg_current_wal_lsn()::text", fetch=True)[0][0]


def in_publication(db, table, pub="walbust"):
    return bool(sql(db, "SELECT 1 FROM pg_publication_tables WHERE pubname = %s AND "
                        "schemaname || '.' || tablename = %s", (pub, table), fetch=True))




def metric(port, name, labels):
    return next((v for k, v in scrape(port).items() if k.startswith(name + "{") and labels in k),
                0.0)




class Env:
    """A database with its schema, a rules file (plus the barrier rule), a
    flushed Redis db and a running walbust."""

    def __init__(self, name, rdb, schema, rules, managed=True, trigger=True, extra=None):
        self.db = fresh_db(f"schema_{name}")
        self.slot = f"schema_{name}"  # slots are cluster-wide: one per test
        self.r = redis_client(rdb)
        self.r.flushdb()
        self.url = f"redis://127.0.0.1:{REDIS_PORT}/{rdb}"
        sql(self.db, schema)
        sql(self.db, BARRIER_SQL)
        self.rules = write_rules({"rules": list(rules) + [BARRIER_RULE]})
        self.extra = extra or []
        if managed:
            p = subprocess.run([BIN, "setup", "--rules", self.rules, "--pg", dsn(self.db),
                                "--slot", self.slot], capture_output=True, text=True, timeout=60)
            assert p.returncode == 0, p.stdout + p.stderr
            assert "created publication walbust" in p.stdout, p.stdout
        else:
            tables = sorted({rule["table"] for rule in rules}) + ["walbust_barrier"]
            sql(self.db, f"CREATE PUBLICATION walbust FOR TABLE {', '.join(tables)}")
            with open(os.path.join(SRC, "sql", "walbust.sql")) as f:
                sql(self.db, f.read())
        if not trigger:
            sql(self.db, "DROP EVENT TRIGGER walbust_ddl_end")
            sql(self.db, "DROP EVENT TRIGGER walbust_ddl_drop")
        self.wb = None
        self.start()

    def start(self):
        self.wb = Walbust(self.db, self.rules, slot=self.slot, redis_urls=[self.url],
                          extra=self.extra)
        self.wb.start().wait_streaming()
        return self.wb

    def q(self, query, args=None, fetch=False):
        return sql(self.db, query, args, fetch)

    def barrier(self):
        barrier(self.db, self.r)

    def set(self, *keys):
        for k in keys:
            self.r.set(k, "cached")

    def gone(self, *keys, timeout=20):
        wait_until(lambda: not any(self.r.exists(k) for k in keys), timeout,
                   f"keys {keys} to be invalidated")

    def confirmed_past(self, lsn, timeout=20):
        """The slot's confirmed position reaches lsn (a commit walbust applied)."""
        wait_until(lambda: lsn_ge(self.db, slot_confirmed(self.db, self.slot) or "0/0", lsn), timeout,
                   f"the slot to confirm {lsn}")

    def log_has(self, pattern, timeout=20):
        return wait_until(lambda: re.search(pattern, self.wb.read_log()), timeout,
                          f"the log to match {pattern!r}")

    def close(self, expect_rc=0):
        if self.wb is not None and self.wb.proc is not None:
            rc = self.wb.stop() if self.wb.alive() else self.wb.proc.returncode
            assert rc == expect_rc, f"walbust exited {rc}:\n{self.wb.read_log()[-4000:]}"
        wait_until(lambda: not sql("postgres", "SELECT 1 FROM pg_replication_slots WHERE "
                                   "database = %s AND active_pid IS NOT NULL", (self.db,),
                                   fetch=True), 20, "the slot to be released")
        sql("postgres", "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                        "WHERE database = %s AND active_pid IS NULL", (self.db,))


ITEMS_SQL = "CREATE TABLE items(id int PRIMARY KEY, name text, price int)"
ITEMS_RULES = [{"table": "public.items", "keys": ["item:{id}"]}]


def check_new_table_invalidates(e, ids):
    """Rows of the (new) items table are invalidated, and the slot confirms
    past them."""
    keys = [f"item:{i}" for i in ids]
    e.set(*keys)
    for i in ids:
        e.q("INSERT INTO items VALUES (%s, 'new', 1) ON CONFLICT (id) DO UPDATE SET price = 2", (i,))
    e.gone(*keys)
    e.barrier()
    e.confirmed_past(current_lsn(e.db))


def test_drop_and_recreate_managed():
    e = Env("recreate", 3, ITEMS_SQL, ITEMS_RULES)
    try:
        e.q("INSERT INTO items VALUES (1, 'a', 1), (2, 'b', 2)")
        e.barrier()
        e.set("item:1", "item:2", "item:3", "item:42", "other:1")
        # The migration, then writes before walbust could put the table back:
        # those are not published, only the widened invalidation covers them.
        e.q("DROP TABLE items")
        e.q(ITEMS_SQL)
        e.q("INSERT INTO items VALUES (3, 'gap', 3)")
        e.log_has(r"table public\.items was (created again|replaced).*added it back to "
                  r"publication \"walbust\"")
        e.gone("item:1", "item:2", "item:3", "item:42")
        assert in_publication(e.db, "public.items")
        e.log_has(r"invalidated everything its rules cover \(\d+ widened invalidations\)")
        check_new_table_invalidates(e, [3, 4, 5])
        e.barrier()
        assert e.r.get("other:1") == "cached", "only what the rules cover is invalidated"
        assert e.wb.alive()
    finally:
        e.close()


def test_rename_swap_managed():
    e = Env("swap", 4, ITEMS_SQL, ITEMS_RULES)
    try:
        e.q("INSERT INTO items VALUES (1, 'a', 1)")
        e.barrier()
        e.set("item:1", "item:7", "other:1")
        # One migration transaction: build the new table, swap the names.
        e.q("""BEGIN;
               CREATE TABLE items_new(id int PRIMARY KEY, name text, price int);
               INSERT INTO items_new SELECT * FROM items;
               INSERT INTO items_new VALUES (7, 'copied', 7);
               ALTER TABLE items RENAME TO items_old;
               ALTER TABLE items_new RENAME TO items;
               COMMIT""")
        e.log_has(r"table public\.items was replaced by another table of the same name.*added "
                  r"it back")
        e.gone("item:1", "item:7")
        assert in_publication(e.db, "public.items")
        # The old table is still published under its new name, but no rule names it.
        check_new_table_invalidates(e, [1, 7, 8])
        assert e.r.get("other:1") == "cached"
        assert e.wb.alive()
    finally:
        e.close()


def test_rename_swap_without_trigger_backstop():
    """Without the event triggers (not installed, e.g. setup ran as a
    non-superuser), the periodic catalog re-check finds the swap."""
    e = Env("backstop", 5, ITEMS_SQL, ITEMS_RULES, trigger=False,
            extra=["--schema-recheck", "1"])
    try:
        e.q("INSERT INTO items VALUES (1, 'a', 1)")
        e.barrier()
        e.set("item:1", "item:2")
        e.q("""BEGIN;
               CREATE TABLE items_new(id int PRIMARY KEY, name text, price int);
               ALTER TABLE items RENAME TO items_old;
               ALTER TABLE items_new RENAME TO items;
               COMMIT""")
        e.q("INSERT INTO items VALUES (2, 'gap', 2)")
        e.log_has(r"table public\.items was replaced.*added it back", timeout=30)
        # The backstop read the catalog off the streaming thread.
        e.log_has(r"periodic catalog check of 2 rules tables read in the background")
        e.gone("item:1", "item:2")
        assert in_publication(e.db, "public.items")
        check_new_table_invalidates(e, [2, 3])
    finally:
        e.close()


def test_rename_changed_column_still_fires():
    schema = """CREATE TABLE users(id int PRIMARY KEY, name text, email text);
                ALTER TABLE users REPLICA IDENTITY FULL"""
    e = Env("changedcol", 6, schema, [
        {"table": "public.users", "on": ["update"], "changed": ["name"], "keys": ["user:{id}"]}])
    try:
        e.q("INSERT INTO users VALUES (1, 'ann', 'a@x'), (2, 'bob', 'b@x')")
        e.set("user:1", "user:2")
        e.q("UPDATE users SET email = 'new@x' WHERE id = 1")  # name did not change: no fire
        e.q("UPDATE users SET name = 'bobby' WHERE id = 2")
        e.gone("user:2")
        e.barrier()
        assert e.r.exists("user:1"), "the changed filter works before the migration"

        e.q("ALTER TABLE users RENAME COLUMN name TO full_name")
        e.set("user:2")
        e.q("UPDATE users SET email = 'other@x' WHERE id = 1")
        e.q("UPDATE users SET email = 'more@x' WHERE id = 2")
        e.gone("user:1", "user:2")  # never skipped silently
        e.barrier()
        e.confirmed_past(current_lsn(e.db))
        e.log_has(r'a column named in "changed" of a rule for public\.users is not in the table')
        e.log_has(r'the rules no longer match the schema: .*column "name" in "changed" does '
                  r'not exist in public\.users')
        e.set("user:1")
        e.q("UPDATE users SET email = 'again@x' WHERE id = 1")
        e.gone("user:1")
        log = e.wb.read_log()
        assert log.count('a column named in "changed"') == 1, "warned once per table"
    finally:
        e.close()


def test_template_columns_dropped_and_added_widen():
    schema = """CREATE TABLE docs(id int PRIMARY KEY, slug text, body text);
                ALTER TABLE docs REPLICA IDENTITY FULL"""
    mport = free_port()
    e = Env("tplcols", 7, schema, [
        {"table": "public.docs", "keys": ["doc:{id}:{slug}"]}],
        extra=["--metrics", f"127.0.0.1:{mport}"])
    try:
        e.q("INSERT INTO docs VALUES (1, 's1', 'b'), (2, 's2', 'b')")
        e.barrier()
        assert metric(mport, "walbust_widened_total", 'table="public.docs"') == 0

        e.q("ALTER TABLE docs DROP COLUMN slug")
        doomed = ["doc:1:s1", "doc:1:other", "doc:1:"]
        survivors = ["doc:2:s2", "doc:11:s1", "doc:1"]
        e.set(*doomed, *survivors)
        e.q("UPDATE docs SET body = 'c' WHERE id = 1")
        e.gone(*doomed)
        e.barrier()
        assert all(e.r.exists(k) for k in survivors), sorted(e.r.keys("*"))
        wait_until(lambda: metric(mport, "walbust_widened_total", 'table="public.docs"') >= 1, 10,
                   "walbust_widened_total to count the widening")
        e.log_has(r'column "slug" in template "doc:\{id\}:\{slug\}" does not exist in public\.docs')
        code, body = wait_until(lambda: (lambda c: c if c[0] == 503 else None)(readyz(mport)), 10,
                                "/readyz to report the rules problem")
        assert "rules_valid" in body and "slug" in body, body

        # The column comes back: exact keys again, no more widening.
        e.q("ALTER TABLE docs ADD COLUMN slug text")
        e.barrier()
        before = metric(mport, "walbust_widened_total", 'table="public.docs"')
        e.set("doc:1:fresh", "doc:1:other2")
        e.q("UPDATE docs SET slug = 'fresh' WHERE id = 1")
        e.gone("doc:1:fresh")
        e.barrier()
        assert e.r.exists("doc:1:other2"), "an exact key again, not a pattern"
        assert metric(mport, "walbust_widened_total", 'table="public.docs"') == before
        e.log_has(r"the rules match the schema again")
        wait_until(lambda: readyz(mport)[0] == 200, 10, "/readyz to be ready again")
        e.confirmed_past(current_lsn(e.db))
    finally:
        e.close()


def test_unmanaged_publication_stops_without_confirming():
    e = Env("unmanaged", 8, ITEMS_SQL, ITEMS_RULES, managed=False)
    try:
        e.q("INSERT INTO items VALUES (1, 'a', 1)")
        e.barrier()
        before = current_lsn(e.db)
        e.confirmed_past(before)
        e.set("item:1", "item:2")
        e.q("BEGIN; DROP TABLE items; " + ITEMS_SQL + "; COMMIT")
        e.q("INSERT INTO items VALUES (2, 'gap', 2)")
        wait_until(lambda: not e.wb.alive(), 30, "walbust to stop")
        assert e.wb.proc.returncode == 1, e.wb.proc.returncode
        log = e.wb.read_log()
        assert re.search(r"table public\.items was (created again|replaced).*not in publication "
                         r"\"walbust\", which walbust does not manage", log), log[-3000:]
        assert "ALTER PUBLICATION walbust ADD TABLE public.items" in log, log[-3000:]
        # The message names the migration's commit; the slot must not have
        # confirmed it (an idle walbust may confirm WAL before it, which
        # is harmless: the migration is replayed in full).
        commit = re.search(r"stops without confirming ([0-9A-F]+/[0-9A-F]+)", log).group(1)
        assert lsn_ge(e.db, commit, before), (commit, before)
        confirmed = slot_confirmed(e.db, e.slot)
        assert lsn_ge(e.db, commit, confirmed), f"confirmed {confirmed} past the DDL commit {commit}"
        assert not in_publication(e.db, "public.items"), "walbust must not touch it"

        # The runbook: add the table, restart. The replay invalidates the table's
        # whole coverage (the gap write included) and goes past the change.
        e.wb.log.close()
        e.q("ALTER PUBLICATION walbust ADD TABLE public.items")
        e.start()
        e.gone("item:1", "item:2")
        check_new_table_invalidates(e, [2, 3])
    finally:
        e.close()


def test_reload_learns_new_tables_without_a_check():
    """A SIGHUP reload that adds a rules table learns the table off the
    streaming thread: no catalog check runs after the swap (with thousands
    of tables it paused streaming), and the table's identity is known, so a
    later rename swap into its name is found."""
    schema = """CREATE TABLE users(id int PRIMARY KEY, name text);
                CREATE TABLE items(id int PRIMARY KEY, name text, price int);
                CREATE TABLE items_new(id int PRIMARY KEY, name text, price int)"""
    users = {"table": "public.users", "keys": ["user:{id}"]}
    e = Env("reloadnew", 9, schema, [users], extra=["--schema-recheck", "3600"])
    try:
        # Both in the publication: the swap below leaves a published table
        # under the name, which only a learnt relid tells apart.
        e.q("ALTER PUBLICATION walbust ADD TABLE items, items_new")
        e.q("INSERT INTO items VALUES (1, 'a', 1)")
        e.barrier()
        checks = "schema: catalog check of"
        n_checks = e.wb.read_log().count(checks)
        assert n_checks >= 1, "the start-up check logs at debug level"
        with open(e.rules, "w") as f:
            json.dump({"rules": [users, ITEMS_RULES[0], BARRIER_RULE]}, f)
        e.wb.proc.send_signal(signal.SIGHUP)
        e.log_has(r"rules reloaded: 3 tables")
        e.set("item:1")
        e.q("UPDATE items SET price = 2 WHERE id = 1")
        e.gone("item:1")
        e.barrier()
        assert e.wb.read_log().count(checks) == n_checks, \
            "a catalog check ran on the streaming thread after the reload:\n" + e.wb.read_log()[-3000:]

        e.set("item:1", "item:5", "user:1")
        e.q("""BEGIN;
               ALTER TABLE items RENAME TO items_old;
               ALTER TABLE items_new RENAME TO items;
               COMMIT""")
        e.log_has(r"table public\.items was replaced by another table of the same name")
        e.gone("item:1", "item:5")
        assert e.r.get("user:1") == "cached", "the widening covers only the items rules"
        check_new_table_invalidates(e, [1, 5])
        assert e.wb.read_log().count(checks) > n_checks, "the DDL was checked"
    finally:
        e.close()


def main():
    run = Runner("test_schema_changes")
    run.run(test_drop_and_recreate_managed)
    run.run(test_rename_swap_managed)
    run.run(test_rename_swap_without_trigger_backstop)
    run.run(test_rename_changed_column_still_fires)
    run.run(test_template_columns_dropped_and_added_widen)
    run.run(test_unmanaged_publication_stops_without_confirming)
    run.run(test_reload_learns_new_tables_without_a_check)
    run.done()


if __name__ == "__main__":
    main()
