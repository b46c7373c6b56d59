"""Shared setup for the freshness tests (tests/freshness/test_*.py).

Builds on tests/e2e/harness.py: a fresh database with an `items` table
(rules: key item:{id}, tag item:{id}), a tag-only `docs` table (rule: tag
doc:{id}), the barrier table, a publication, and a running walbust writing
into its own Redis db. Also loads the Redis function library and exposes the
Python client from clients/python.
"""
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "tests", "e2e"))
sys.path.insert(0, os.path.join(ROOT, "clients", "python"))

import harness  # noqa: E402
from harness import BARRIER_RULE, BARRIER_SQL, Walbust, fresh_db, sql, write_rules  # noqa: E402,F401
from walbust_cache import LEASE_PREFIX, WalbustCache, is_lease_marker  # noqa: E402,F401

LONG = "--long" in sys.argv or os.environ.get("FRESHNESS_LONG") == "1"
NAIVE = "naive"
LEASE = "lease"

SCHEMA = """
CREATE TABLE items(id int PRIMARY KEY, v bigint NOT NULL DEFAULT 0, name text);
CREATE TABLE docs(id int PRIMARY KEY, body text);
""" + BARRIER_SQL + """;
CREATE SEQUENCE db_reads;
CREATE PUBLICATION walbust FOR TABLE items, docs, walbust_barrier;
"""

RULES = {
    "defaults": {"tag_prefix": "tag:"},
    "rules": [
        {"table": "items", "keys": ["item:{id}"], "tags": ["item:{id}"]},
        {"table": "docs", "tags": ["doc:{id}"]},
        BARRIER_RULE,
    ],
}


def load_functions(r):
    """FUNCTION LOAD REPLACE redis/walbust.lua through the helper script."""
    out = subprocess.run([os.path.join(ROOT, "scripts", "load-redis-functions"),
                          "-p", str(harness.REDIS_PORT)],
                         capture_output=True, text=True, check=False)
    assert out.returncode == 0 and out.stdout.strip() == "walbust", (out.stdout, out.stderr)
    assert r.execute_command("FUNCTION", "LIST", "LIBRARYNAME", "walbust")


class Env:
    """A database named `db` with the schema above and walbust running
    against Redis db number `rdb` (slot named like the database: slots are
    cluster-wide)."""

    def __init__(self, db, rdb, rows=10):
        self.db = fresh_db(db)
        self.rdb = rdb
        self.slot = db
        self.r = harness.redis_client(rdb)
        self.r.flushdb()
        self.rb = harness.redis.Redis(host="127.0.0.1", port=harness.REDIS_PORT, db=rdb)
        load_functions(self.r)
        sql(self.db, SCHEMA)
        sql(self.db, "INSERT INTO items(id, v, name) SELECT g, 0, 'n' || g FROM generate_series(1, %s) g",
            (rows,))
        self.rules = write_rules(RULES)
        self.wb = None

    def start(self):
        self.wb = Walbust(self.db, self.rules, slot=self.slot,
                          redis_urls=[f"redis://127.0.0.1:{harness.REDIS_PORT}/{self.rdb}"])
        self.wb.start().wait_streaming()
        return self

    def stop(self):
        if self.wb is not None and self.wb.alive():
            rc = self.wb.stop()
            assert rc == 0, f"walbust exited {rc}:\n{self.wb.read_log()[-3000:]}"

    def close(self):
        """Stop walbust and drop the slot, so it pins no WAL."""
        self.stop()
        sql(self.db, "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                     "WHERE slot_name = %s AND NOT active", (self.slot,))

    def conn(self, autocommit=True):
        return harness.connect(self.db, autocommit)

    def barrier(self):
        harness.barrier(self.db, self.r)

    def cache(self, **kw):
        return WalbustCache(self.r, slot=self.slot, **kw)

    def db_reads(self):
        """Database reads counted by loaders (nextval in their query)."""
        rows = sql(self.db, "SELECT last_value, is_called FROM db_reads", fetch=True)
        return rows[0][0] if rows[0][1] else 0


def run_module(name, tests):
    """Run tests (functions) with harness.Runner; exit non-zero on failure."""
    runner = harness.Runner(name)
    for t in tests:
        runner.run(t)
    runner.done()
