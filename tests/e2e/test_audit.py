"""End-to-end tests of the cache audit (docs/audit.md) against real
PostgreSQL and Redis: `walbust check --pg` on audit declarations, the
on-demand `walbust audit`, and the audit walbust runs while streaming
(sampled invalidations and the background scan).

Schema: products (an entity cached as JSON under product:{id}), teams and
users (a team page team:{id}:page built from the team and its members'
names). The rules deliberately have no rule on users for the team page:
the audit of the team page must find what that forgotten rule leaves stale.
One test adds product:{id}:detail, a key the audit key product:{id} also
matches, whose values the audit's SQL refuses.

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

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "clients",
                                "python"))
from walbust_cache import WalbustCache  # noqa: E402

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


def stale_logs(log):
    """(key, rest of the line) of every stale finding walbust logged."""
    return re.findall(r'audit: stale cache entry "([^"]+)" (.*)$', log, re.M)


def audit_counts(port, table="public.products"):
    m = scrape(port)
    return (m.get(f'walbust_audit_checked_total{{table="{table}"}}', 0),
            m.get(f'walbust_audit_stale_total{{table="{table}"}}', 0))


def test_legacy_reader_detected():
    """A legacy reader that stores an old value with plain SET after
    walbust invalidated the key is reported, once, with the key, the table
    and the invalidating change (its xid and LSN); lease-protocol readers
    racing the same kind of update are not; the status shows the counts."""
    port = free_port()
    env = Env("legacy", 4).start(extra=["--audit-rate", "100", "--audit-delay", "300",
                                        "--audit-no-scan"], metrics_port=port)
    try:
        cache = WalbustCache(redis.Redis(host="127.0.0.1", port=REDIS_PORT, db=env.rdb),
                             slot=env.slot, mode="eval")
        # Legacy reader on product 5: reads, the row changes, walbust
        # invalidates, then the reader stores what it read.
        old = env.product_json(5)
        env.r.set("product:5", old)
        conn = connect(env.db, autocommit=False)
        with conn.cursor() as cur:
            cur.execute("UPDATE products SET name = 'new 5' WHERE id = 5")
            cur.execute("SELECT txid_current()")
            xid = cur.fetchone()[0]
        conn.commit()
        commit_lsn = sql(env.db, "SELECT pg_current_wal_insert_lsn()::text", fetch=True)[0][0]
        conn.close()
        wait_until(lambda: not env.r.exists("product:5"), 20, "product:5 invalidated")
        env.r.set("product:5", old)
        # Lease readers on products 6..9: the same race, through the protocol.
        for pid in range(6, 10):
            kind, token = cache.get(f"product:{pid}")[:2]
            assert kind == "lease", kind
            value = env.product_json(pid)
            env.q("UPDATE products SET name = %s WHERE id = %s", (f"new {pid}", pid))
            wait_until(lambda: not env.r.exists(f"product:{pid}"), 20, f"product:{pid} invalidated")
            assert cache.fill(f"product:{pid}", token, value, 300) == 0
            env.r.set(f"product:{pid}:x", "1")  # unrelated key
            assert cache.get_or_fill(f"product:{pid}", lambda: env.product_json(pid), 300) == \
                env.product_json(pid)
            env.q("UPDATE products SET price = price + 1 WHERE id = %s", (pid,))
            wait_until(lambda: not env.r.exists(f"product:{pid}"), 20, f"product:{pid} invalidated")
            assert cache.get_or_fill(f"product:{pid}", lambda: env.product_json(pid), 300) == \
                env.product_json(pid)
        found = wait_until(lambda: stale_logs(env.wb.read_log()), 30, "the stale finding")
        time.sleep(2)  # the lease readers' checks (300 ms after each invalidation)
        found = stale_logs(env.wb.read_log())
        assert [k for k, _ in found] == ["product:5"], found
        line = found[0][1]
        assert f"xid {xid}," in line and "invalidated by the change to public.products at LSN" in line, line
        change_lsn = re.search(r"at LSN ([0-9A-F]+/[0-9A-F]+)", line).group(1)
        hi, lo = (int(x, 16) for x in change_lsn.split("/"))
        chi, clo = (int(x, 16) for x in commit_lsn.split("/"))
        assert (hi << 32 | lo) <= (chi << 32 | clo), (change_lsn, commit_lsn)
        assert '"name\\":\\"product 5\\"' in line and 'database "{\\"id\\":5,\\"name\\":\\"new 5\\"' in line, line
        # Only checks of keys holding a value count (a sampled key refilled
        # before its check); product:5 and the lease readers' refills.
        wait_until(lambda: audit_counts(port)[0] >= 2, 20, "checks of the sampled keys")
        checked, stale = audit_counts(port)
        assert stale == 1, (checked, stale)
        p = subprocess.run([BIN, "status", "--pg", dsn(env.db), "--slot", env.slot, "--rules",
                            env.rules, "--redis", env.url, "--json"], capture_output=True, text=True,
                           timeout=30)
        st = json.loads(p.stdout)
        assert st["audit_stale"] == 1 and st["audit_checked"] >= 2, st
        assert "1 stale in" in st["audit_consistency"], st
    finally:
        env.close()


def test_forgotten_derived_key():
    """Team pages are built from users too, but no rule on users invalidates
    them: after a rename, the background scan reports exactly the page of
    the renamed user's team; --audit-heal deletes it."""
    env = Env("derived", 5).start(extra=["--audit-rate", "0", "--audit-scan-interval", "1",
                                         "--audit-heal"])
    try:
        for tid in range(1, 6):
            env.r.set(f"team:{tid}:page", env.team_page(tid))
        team = env.q("SELECT team_id FROM users WHERE id = 7", fetch=True)[0][0]
        env.q("UPDATE users SET name = 'Ada' WHERE id = 7")
        found = wait_until(lambda: stale_logs(env.wb.read_log()), 30, "the stale team page")
        assert [k for k, _ in found] == [f"team:{team}:page"], found
        assert "found by the background scan" in found[0][1] and "deleted (--audit-heal)" in found[0][1], found
        assert not env.r.exists(f"team:{team}:page")
        for tid in range(1, 6):
            if tid != team:
                assert env.r.get(f"team:{tid}:page") is not None
        time.sleep(3)  # more scans: nothing else
        assert [k for k, _ in stale_logs(env.wb.read_log())] == [f"team:{team}:page"]
    finally:
        env.close()


# product:{id} is audited; product:{id}:detail is another key of the same
# rule, which the audit key matches too (id = "5:detail").
DETAIL_RULE = {"table": "public.products", "keys": ["product:{id}", "product:{id}:detail"],
               "audit": {"key": "product:{id}", "sql": PRODUCT_SQL, "args": ["{id}"],
                         "compare": "json"}}


def check_failures(log):
    return re.findall(r"audit: a check on .* failed: .*$", log, re.M)


def test_other_template_keys_skipped():
    """An audit key product:{id} also matches product:5:detail (id =
    "5:detail"), which the audit's SQL refuses (SQLSTATE 22P02 for an int):
    such keys are skipped with a note, never an error and never stale.
    `walbust audit` still finds a planted stale product and exits 1, then 0
    once it is gone; the daemon auditing every invalidation (and its scan)
    logs no failed check, only the note, and finds no detail key stale."""
    port = free_port()
    env = Env("detail", 7, rules=[DETAIL_RULE]).start(
        extra=["--audit-rate", "100", "--audit-delay", "200", "--audit-scan-interval", "1"],
        metrics_port=port)
    try:
        pids = range(1, 11)
        for pid in pids:
            env.r.set(f"product:{pid}", env.product_json(pid))
            env.r.set(f"product:{pid}:detail", f"<p>detail of product {pid}</p>")
        env.r.set("product:11", json.dumps({"id": 11, "name": "old name", "price": 1}))
        rc, out, err = env.audit()
        assert rc == 1, (rc, out, err)
        assert stale_keys(out) == ["product:11"], out
        m = re.search(r"audited (\d+) keys: (\d+) clean, (\d+) stale, 0 unverified; (\d+) skipped",
                      out)
        assert m and m.groups() == ("11", "10", "1", "10"), out
        assert re.search(r'walbust audit: 10 keys skipped: the audit\'s SQL refused the values read '
                         r'from them, e\.g\. "product:\d+:detail" \(audit key "product:\{id\}" '
                         r'of the rule for public\.products, .* line \d+: ERROR: +invalid input '
                         r'syntax for type integer: "\d+:detail"\)', err), err
        env.r.delete("product:11")
        rc, out, err = env.audit()
        assert rc == 0 and stale_keys(out) == [], (rc, out, err)
        assert "audited 10 keys: 10 clean, 0 stale, 0 unverified; 10 skipped" in out, out
        # The daemon: every invalidated key is sampled, both are refilled
        # before their check (200 ms later), and the scan runs each second.
        for pid in pids:
            env.q("UPDATE products SET price = price + 1 WHERE id = %s", (pid,))
            wait_until(lambda: not env.r.exists(f"product:{pid}:detail"), 20,
                       f"product:{pid} invalidated")
            env.r.set(f"product:{pid}", env.product_json(pid))
            env.r.set(f"product:{pid}:detail", f"<p>detail of product {pid}, again</p>")
        wait_until(lambda: audit_counts(port)[0] >= len(pids), 30, "checks of the products")
        note = wait_until(lambda: re.findall(r'audit: "product:\d+:detail" is not checked: the '
                                             r"audit's SQL refused the values read from it "
                                             r"\(ERROR: +invalid input syntax .*$",
                                             env.wb.read_log(), re.M), 30, "the note")
        time.sleep(2)  # more scans over the detail keys
        log = env.wb.read_log()
        assert check_failures(log) == [], check_failures(log)
        assert len(re.findall(r"is not checked: the audit's SQL refused", log)) == 1, note
        # The scan may have found the planted product:11 before it was deleted.
        assert {k for k, _ in stale_logs(log)} <= {"product:11"}, stale_logs(log)
        assert env.wb.alive()
    finally:
        env.close()


# Refuses every second read on its connection (22012, a data exception): a
# session setting counts the reads (set_config is allowed read-only).
FLAKY_SQL = ("SELECT CASE WHEN set_config('walbust_test.reads', (coalesce(nullif(current_setting("
             "'walbust_test.reads', true), ''), '0')::int + 1)::text, false)::int % 2 = 1 "
             "THEN row_to_json(p)::text ELSE (1 / (p.id - p.id))::text END "
             "FROM public.products p WHERE id = $1")


def test_refused_second_read_not_stale():
    """A key that differs from its first database read is read again after
    walbust confirmed past it; when the audit's SQL refuses the values that
    second time, the read has no row, which must not pass for "the row is
    gone": the key is skipped, not reported stale."""
    rule = dict(PRODUCT_RULE, audit=dict(PRODUCT_RULE["audit"], sql=FLAKY_SQL))
    env = Env("refused2", 8, rules=[rule]).start(extra=["--audit-rate", "0", "--audit-no-scan"])
    try:
        env.r.set("product:1", json.dumps({"id": 1, "name": "old name", "price": 1}))
        rc, out, err = env.audit()
        assert rc == 0 and stale_keys(out) == [], (rc, out, err)
        assert "audited 0 keys: 0 clean, 0 stale, 0 unverified; 1 skipped" in out, out
        assert re.search(r'1 key skipped: .* e\.g\. "product:1" .*: ERROR: +division by zero\)',
                         err), err
    finally:
        env.close()


LOAD_SECONDS = float(os.environ.get("AUDIT_LOAD_SECONDS", "60"))


def test_no_false_positive_under_load():
    """Writers update 30 products for LOAD_SECONDS while lease-protocol
    readers fill them, with every invalidated key audited (100 %) and a
    scan every second: not one finding, though thousands of checks ran
    (over 10 a second).
    Products 31..35 get stale values planted by a legacy writer meanwhile:
    each finding is re-verified against the database, and those are the
    only keys reported."""
    port = free_port()
    env = Env("load", 6).start(extra=["--audit-rate", "100", "--audit-delay", "100",
                                      "--audit-max-checks", "500", "--audit-scan-interval", "1"],
                               metrics_port=port)
    stop = threading.Event()
    errors = []
    planted = set()

    def writer(seed):
        rnd = random.Random(seed)
        conn = connect(env.db)
        try:
            while not stop.is_set():
                pid = rnd.randint(1, 30)
                with conn.cursor() as cur:
                    cur.execute("UPDATE products SET price = %s, name = %s WHERE id = %s",
                                (rnd.randint(1, 10**6) / 100, f"n{rnd.randint(1, 9)}", pid))
                time.sleep(rnd.random() * 0.01)
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))
        finally:
            conn.close()

    def reader(seed):
        rnd = random.Random(seed)
        conn = connect(env.db)
        cache = WalbustCache(redis.Redis(host="127.0.0.1", port=REDIS_PORT, db=env.rdb),
                             slot=env.slot, mode="eval")

        def load(pid):
            with conn.cursor() as cur:
                cur.execute("SELECT row_to_json(p)::text FROM products p WHERE id = %s", (pid,))
                v = cur.fetchone()[0]
            time.sleep(rnd.random() * 0.005)  # a slow loader widens the race
            return v
        try:
            while not stop.is_set():
                pid = rnd.randint(1, 30)
                cache.get_or_fill(f"product:{pid}", lambda: load(pid), 300)
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))
        finally:
            conn.close()

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(3)]
    threads += [threading.Thread(target=reader, args=(100 + i,)) for i in range(4)]
    try:
        for t in threads:
            t.start()
        t0 = time.time()
        while time.time() - t0 < LOAD_SECONDS:
            time.sleep(LOAD_SECONDS / 6)
            pid = 31 + len(planted) % 5
            if len(planted) < 5:
                env.r.set(f"product:{pid}", json.dumps({"id": pid, "name": "planted", "price": 0}))
                planted.add(f"product:{pid}")
        stop.set()
        for t in threads:
            t.join(30)
        assert not errors, errors
        barrier(env.db, env.r)
        try:
            wait_until(lambda: {k for k, _ in stale_logs(env.wb.read_log())} >= planted, 30,
                       "the planted keys reported")
        except AssertionError:
            print("# planted:", sorted(planted), "walbust log (last 40 lines):\n" +
                  "\n".join(env.wb.read_log().splitlines()[-40:]), flush=True)
            raise
        time.sleep(2)
        found = {k for k, _ in stale_logs(env.wb.read_log())}
        for key in found:  # re-verify each finding against the database
            pid = int(key.split(":")[1])
            v = env.r.get(key)
            assert v is not None and json.loads(v) != json.loads(env.product_json(pid) or "null"), \
                (key, v)
        assert found == planted, (found, planted)
        checked, stale = audit_counts(port)
        print(f"# {LOAD_SECONDS:.0f} s of load: {checked:.0f} checks, {stale:.0f} stale "
              f"(planted keys re-found by each scan)", flush=True)
        assert checked > 10 * LOAD_SECONDS, checked  # thousands at 60 s, even under ASan
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        env.close()


def main():
    t = Runner("test_audit.py")
    t.run(test_check_pg)
    t.run(test_on_demand_finds_planted)
    t.run(test_on_demand_unverified_without_walbust)
    t.run(test_legacy_reader_detected)
    t.run(test_forgotten_derived_key)
    t.run(test_other_template_keys_skipped)
    t.run(test_refused_second_read_not_stale)
    t.run(test_no_false_positive_under_load)
    t.done()


if __name__ == "__main__":
    main()
