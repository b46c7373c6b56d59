"""End-to-end tests of the cache audit (docs/audit.md) against real
PostgreSQL and Redis: `walbust check --pg` on audit declarations, the
on-demand `walbust audit`, and the audit walbust runs while streaming
(sampled invalidations and the background scan).

Schema: products (an entity cached as JSON under product:{id}), teams and
users (a team page team:{id}:page built from the team and its members'
names). The rules deliberately have no rule on users for the team page:
the audit of the team page must find what that forgotten rule leaves stale.

Run by hand:
  make && scripts/stack start /tmp/me-stack && . /tmp/me-stack/env &&
  WALBUST_BIN=$PWD/build/walbust /usr/bin/python3 tests/e2e/test_audit.py
"""
import json
import os
import random
import re
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import (BARRIER_RULE, BARRIER_SQL, BIN, REDIS_PORT, Runner, Walbust,  # noqa: E402
                     barrier, connect, dsn, free_port, fresh_db, scrape, sql, wait_until,
                     write_rules)

import redis  # noqa: E402

SCHEMA = """
CREATE TABLE products(id int PRIMARY KEY, name text, price numeric);
CREATE TABLE teams(id int PRIMARY KEY, name text);
CREATE TABLE users(id int PRIMARY KEY, name text, team_id int REFERENCES teams);
INSERT INTO products SELECT g, 'product ' || g, g * 1.5 FROM generate_series(1, 40) g;
INSERT INTO teams SELECT g, 'team ' || g FROM generate_series(1, 5) g;
INSERT INTO users SELECT g, 'user ' || g, 1 + g % 5 FROM generate_series(1, 20) g;
"""

PRODUCT_SQL = "SELECT row_to_json(p)::text FROM public.products p WHERE id = $1"
TEAM_PAGE_SQL = ("SELECT json_build_object('team', t.name, 'members', "
                 "(SELECT coalesce(json_agg(u.name ORDER BY u.id), '[]') FROM public.users u "
                 "WHERE u.team_id = t.id))::text FROM public.teams t WHERE t.id = $1")

PRODUCT_RULE = {"table": "public.products", "keys": ["product:{id}"],
                "audit": {"key": "product:{id}", "sql": PRODUCT_SQL, "args": ["{id}"],
                          "compare": "json"}}
# The team page depends on users too, but only teams invalidate it: the
# forgotten derived key the audit must find.
TEAM_RULE = {"table": "public.teams", "keys": ["team:{id}:page"],
             "audit": {"key": "team:{id}:page", "sql": TEAM_PAGE_SQL, "args": ["{id}"],
                       "compare": "json"}}

LEASE_PREFIX = b"\x00walbust-lease:"


class Env:
    def __init__(self, name, rdb, rules=None):
        self.db = fresh_db(f"audit_e2e_{name}")
        self.slot = f"audit_e2e_{name}"  # slots are per cluster: one per test
        self.rdb = rdb
        self.url = f"redis://127.0.0.1:{REDIS_PORT}/{rdb}"
        sql(self.db, SCHEMA)
        sql(self.db, BARRIER_SQL)
        sql(self.db, "CREATE PUBLICATION walbust FOR TABLE products, teams, users, walbust_barrier")
        self.rules = write_rules({"rules": list(rules or [PRODUCT_RULE, TEAM_RULE]) + [BARRIER_RULE]})
        self.r = redis.Redis(host="127.0.0.1", port=REDIS_PORT, db=rdb)
        self.r.flushdb()
        self.wb = None

    def start(self, extra=None, metrics_port=None):
        self.wb = Walbust(self.db, self.rules, slot=self.slot, redis_urls=[self.url], extra=extra)
        if metrics_port is not None:
            self.wb.args[self.wb.args.index("--metrics") + 1] = f"127.0.0.1:{metrics_port}"
        self.wb.start()
        self.wb.wait_streaming()
        return self

    def q(self, query, args=None, fetch=False):
        return sql(self.db, query, args, fetch)

    def product_json(self, pid):
        return self.q("SELECT row_to_json(p)::text FROM products p WHERE id = %s", (pid,),
                      fetch=True)[0][0]

    def team_page(self, tid):
        return self.q(TEAM_PAGE_SQL.replace("$1", "%s"), (tid,), fetch=True)[0][0]

    def audit(self, *extra, timeout=60):
        p = subprocess.run([BIN, "audit", "--rules", self.rules, "--pg", dsn(self.db), "--redis",
                            self.url, "--slot", self.slot, *extra], capture_output=True, text=True, timeout=timeout)
        return p.returncode, p.stdout, p.stderr

    def close(self):
        if self.wb is not None and self.wb.alive():
            self.wb.stop()
        self.r.close()


def stale_keys(out):
    return sorted(re.findall(r'^stale: "([^"]+)"', out, re.M))


def test_check_pg():
    """check --pg prepares each audit's SQL: a missing table and a query
    with two columns are reported with file, line and column; a good file
    passes."""
    env = Env("check", 1)
    bad = write_rules({"rules": [
        {"table": "public.products", "keys": ["product:{id}"],
         "audit": {"key": "product:{id}", "sql": PRODUCT_SQL.replace("products p", "productz p"),
                   "args": ["{id}"]}},
        {"table": "public.teams", "keys": ["team:{id}"],
         "audit": {"key": "team:{id}", "sql": "SELECT id, name FROM public.teams WHERE id = $1",
                   "args": ["{id}"]}}]})
    p = subprocess.run([BIN, "check", "--rules", bad, "--pg", dsn(env.db)], capture_output=True,
                       text=True, timeout=30)
    assert p.returncode == 1, (p.returncode, p.stdout, p.stderr)
    assert re.search(r':\d+:\d+: rule for public.products: the audit\'s SQL does not prepare: '
                     r'relation "public.productz" does not exist', p.stdout), p.stdout
    assert re.search(r":\d+:\d+: rule for public.teams: the audit's SQL returns 2 columns; it "
                     r"must return exactly one", p.stdout), p.stdout
    p = subprocess.run([BIN, "check", "--rules", env.rules, "--pg", dsn(env.db), "--slot", env.slot],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, (p.returncode, p.stdout, p.stderr)
    env.close()


def test_on_demand_finds_planted():
    """`walbust audit` with walbust running reports exactly the keys planted
    stale (an old row, a deleted row, a team page missing a rename) and none
    of the fresh ones, skips lease markers, exits 1; once the stale keys are
    gone it exits 0. --sample caps the keys checked."""
    env = Env("ondemand", 2).start()
    try:
        fresh = {}
        for pid in range(1, 31):
            fresh[f"product:{pid}"] = env.product_json(pid)
        for tid in range(1, 6):
            fresh[f"team:{tid}:page"] = env.team_page(tid)
        for k, v in fresh.items():
            env.r.set(k, v)
        # Planted: an old value, a row that no longer exists, a page from
        # before a rename that no rule invalidates.
        env.r.set("product:31", json.dumps({"id": 31, "name": "old name", "price": 1}))
        env.q("DELETE FROM products WHERE id = 40")
        barrier(env.db, env.r)
        env.r.set("product:40", json.dumps({"id": 40, "name": "product 40", "price": 60.0}))
        env.q("UPDATE users SET name = 'renamed' WHERE id = 3")  # team 4's page
        barrier(env.db, env.r)
        # Lease markers and absent rows are not values: never reported.
        env.r.set("product:32", LEASE_PREFIX + b"123.456.1.99", px=60000)
        env.r.set("product:33", LEASE_PREFIX + b"stale:0::old value", ex=60)
        rc, out, err = env.audit()
        assert rc == 1, (rc, out, err)
        assert stale_keys(out) == ["product:31", "product:40", "team:4:page"], out
        assert "(no row: the key must not exist)" in out, out
        m = re.search(r"audited (\d+) keys: (\d+) clean, (\d+) stale, 0 unverified; (\d+) skipped",
                      out)
        assert m and m.groups() == ("37", "34", "3", "2"), out
        rc, out, err = env.audit("--sample", "5")
        assert re.search(r"audited 5 keys", out), out
        for k in ("product:31", "product:40", "team:4:page"):
            env.r.delete(k)
        rc, out, err = env.audit()
        assert rc == 0 and stale_keys(out) == [], (rc, out, err)
    finally:
        env.close()


def test_on_demand_unverified_without_walbust():
    """Without a running walbust (no watermark) a difference cannot be
    verified: `walbust audit` exits 2 and says why, reporting nothing as
    stale."""
    env = Env("unverified", 3)
    try:
        env.r.set("product:1", json.dumps({"id": 1, "name": "old", "price": 0}))
        env.r.set("product:2", env.product_json(2))
        rc, out, err = env.audit(timeout=90)
        assert rc == 2, (rc, out, err)
        assert stale_keys(out) == [], out
        assert "1 unverified" in out and "is walbust running with --slot audit_e2e_unverified" in err, (out, err)
    finally:
        env.close()


def main():
    t = Runner("test_audit.py")
    t.run(test_check_pg)
    t.run(test_on_demand_finds_planted)
    t.run(test_on_demand_unverified_without_walbust)
    t.done()


if __name__ == "__main__":
    main()
