"""End-to-end tests of refresh (write-through re-warming, fenced) and stale
(stale-while-revalidate) rules through `walbust run`, against real
PostgreSQL and Redis (docs/rules.md "Refresh" and "Stale while
revalidate", docs/freshness.md).

Run by hand:
  make && scripts/stack start /tmp/me-stack && . /tmp/me-stack/env &&
  WALBUST_BIN=$PWD/build/walbust /usr/bin/python3 tests/e2e/test_refresh.py
"""
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import (BARRIER_RULE, BARRIER_SQL, BIN, REDIS_PORT, SRC, Runner, Walbust,  # noqa: E402
                     barrier, dsn, free_port, fresh_db, redis_client, scrape, sql, wait_until,
                     write_rules)

LEASE_PREFIX = "\0walbust-lease:"

SCHEMA = """
CREATE TABLE product(id int PRIMARY KEY, name text, price numeric, body text);
ALTER TABLE product ALTER COLUMN body SET STORAGE EXTERNAL;
CREATE TABLE page(slug text PRIMARY KEY, title text);
"""

RULES = [
    {"table": "public.product",
     "refresh": [{"key": "product:{id}", "value": "row", "ttl": 3600},
                 {"key": "ph:{id}", "value": "row", "format": "hash"}]},
    {"table": "public.page", "stale": ["page:{slug}"], "stale_grace": 3},
]


def load_functions(r):
    """Load the walbust Function library (redis/walbust.lua) into Redis."""
    with open(os.path.join(SRC, "redis", "walbust.lua")) as f:
        r.function_load(f.read(), replace=True)


class Env:
    def __init__(self, name, rdb):
        self.db = fresh_db(f"refresh_e2e_{name}")
        self.slot = f"refresh_{name}"
        self.url = f"redis://127.0.0.1:{REDIS_PORT}/{rdb}"
        sql(self.db, SCHEMA)
        sql(self.db, BARRIER_SQL)
        sql(self.db, "CREATE PUBLICATION walbust FOR TABLE product, page, walbust_barrier")
        self.rules = write_rules({"rules": RULES + [BARRIER_RULE]})
        self.r = redis_client(rdb)
        self.r.flushdb()
        self.wb = None

    def start(self, metrics_port=None):
        self.wb = Walbust(self.db, self.rules, slot=self.slot, redis_urls=[self.url])
        if metrics_port is not None:
            self.wb.args[self.wb.args.index("--metrics") + 1] = f"127.0.0.1:{metrics_port}"
        self.wb.start()
        self.wb.wait_streaming()
        return self

    def q(self, query, args=None, fetch=False):
        return sql(self.db, query, args, fetch)

    def barrier(self):
        barrier(self.db, self.r)

    def close(self):
        if self.wb is not None:
            self.wb.stop()
        sql(self.db, "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                     "WHERE slot_name = %s AND NOT active", (self.slot,))


def product_json(e, pid):
    v = e.r.get(f"product:{pid}")
    return json.loads(v) if v is not None and not v.startswith(LEASE_PREFIX) else None


def test_refresh_stores_rows():
    e = Env("store", 10).start()
    try:
        e.q("INSERT INTO product VALUES (1, 'hat', 9.50, 'x'), (2, 'cap', NULL, 'y')")
        wait_until(lambda: product_json(e, 2), 20, "product:2 stored")
        assert product_json(e, 1) == {"id": "1", "name": "hat", "price": "9.50", "body": "x"}
        assert product_json(e, 2) == {"id": "2", "name": "cap", "price": None, "body": "y"}
        ttl = e.r.ttl("product:1")
        assert 3500 < ttl <= 3600, ttl
        # hash format: NULL columns are left out, no expiry
        assert e.r.hgetall("ph:1") == {"id": "1", "name": "hat", "price": "9.50", "body": "x"}
        assert e.r.hgetall("ph:2") == {"id": "2", "name": "cap", "body": "y"}
        assert e.r.ttl("ph:1") == -1
        # the fence holds the commit LSN beside the value
        fence = e.r.get("walbust:fence:{product:1}")
        assert fence is not None and "/" in fence, fence
        # a bulk update re-warms instead of emptying
        e.q("UPDATE product SET price = 10 WHERE id IN (1, 2)")
        wait_until(lambda: (product_json(e, 2) or {}).get("price") == "10", 20, "re-warmed")
        assert product_json(e, 1)["price"] == "10"
        assert e.r.hget("ph:2", "price") == "10"
        # a key that moves: the old key is deleted, the new one stored
        e.q("UPDATE product SET id = 3 WHERE id = 2")
        wait_until(lambda: product_json(e, 3), 20, "product:3 stored")
        assert e.r.get("product:2") is None and not e.r.exists("ph:2")
        # delete removes
        e.q("DELETE FROM product WHERE id = 1")
        wait_until(lambda: not e.r.exists("product:1") and not e.r.exists("ph:1"), 20,
                   "product:1 deleted")
        # truncate removes every refreshed key (widened as keys are)
        e.q("TRUNCATE product")
        wait_until(lambda: not e.r.exists("product:3") and not e.r.exists("ph:3"), 20,
                   "truncate deletes")
    finally:
        e.close()


def test_toast_unchanged_deletes():
    e = Env("toast", 11).start()
    try:
        big = "".join(chr(65 + (i * 7919) % 26) for i in range(200000))  # not compressible
        e.q("INSERT INTO product VALUES (5, 'book', 20, %s)", (big,))
        wait_until(lambda: product_json(e, 5), 20, "product:5 stored")
        assert product_json(e, 5)["body"] == big
        # body is not in the change (unchanged TOAST): never a partial row
        e.q("UPDATE product SET price = 21 WHERE id = 5")
        wait_until(lambda: not e.r.exists("product:5") and not e.r.exists("ph:5"), 20,
                   "product:5 deleted instead of stored partially")
        e.barrier()
        assert not e.r.exists("product:5")
        # an update that carries every column stores again
        e.q("UPDATE product SET price = 22, body = 'short' WHERE id = 5")
        wait_until(lambda: (product_json(e, 5) or {}).get("price") == "22", 20, "stored again")
    finally:
        e.close()


def test_fence_refuses_older_commit():
    e = Env("fence", 12).start()
    try:
        e.q("INSERT INTO product VALUES (7, 'old', 1, 'b')")
        wait_until(lambda: product_json(e, 7), 20, "product:7 stored")
        e.wb.stop()
        # A value from a newer commit is already there (another walbust on
        # the same target, a standby that took over and got ahead, or the
        # first run of a batch this walbust now replays): the fence holds
        # that commit's LSN, and the older commit must not overwrite it.
        e.r.set("product:7", json.dumps({"id": "7", "name": "newer"}))
        e.r.set("walbust:fence:{product:7}", "FFFFFFFF/0")
        e.q("UPDATE product SET name = 'replayed' WHERE id = 7")
        e.wb = Walbust(e.db, e.rules, slot=e.slot, redis_urls=[e.url], create_slot=False).start()
        e.wb.wait_streaming()
        e.barrier()
        assert product_json(e, 7) == {"id": "7", "name": "newer"}, e.r.get("product:7")
        # an equal or older fence lets the store through
        e.r.set("walbust:fence:{product:7}", "0/1")
        e.q("UPDATE product SET name = 'current' WHERE id = 7")
        wait_until(lambda: (product_json(e, 7) or {}).get("name") == "current", 20,
                   "stored over an older fence")
        assert e.r.get("walbust:fence:{product:7}") != "0/1"
    finally:
        e.close()


def test_refresh_revokes_lease():
    e = Env("lease", 13)
    load_functions(e.r)
    e.start()
    try:
        e.q("INSERT INTO product VALUES (9, 'a', 1, 'b')")
        wait_until(lambda: product_json(e, 9), 20, "product:9 stored")
        e.r.delete("product:9")  # evicted: a cache-aside reader misses
        kind, token = e.r.fcall("walbust_get", 1, "product:9", "5000")
        assert kind == "lease", kind
        old = e.r.get("product:9")
        assert old.startswith(LEASE_PREFIX), repr(old)
        # the reader reads the row (the old one), then the row changes
        e.q("UPDATE product SET name = 'new' WHERE id = 9")
        wait_until(lambda: (product_json(e, 9) or {}).get("name") == "new", 20, "refreshed")
        # the slow filler's old value is refused
        stored = e.r.fcall("walbust_fill", 1, "product:9", token,
                           json.dumps({"id": "9", "name": "a"}), "60")
        assert stored == 0, stored
        assert product_json(e, 9)["name"] == "new"
        # a plain GET reader sees an ordinary value
        assert not e.r.get("product:9").startswith(LEASE_PREFIX)
    finally:
        e.close()


def test_stale_while_revalidate():
    e = Env("stale", 14)
    load_functions(e.r)
    e.start()
    try:
        e.q("INSERT INTO page VALUES ('home', 'Home v1')")
        e.barrier()
        e.r.set("page:home", "<h1>Home v1</h1>")
        e.q("UPDATE page SET title = 'Home v2' WHERE slug = 'home'")
        wait_until(lambda: (e.r.get("page:home") or "").startswith(LEASE_PREFIX), 20,
                   "page:home marked stale")
        # plain GET readers see a lease marker: a miss
        assert e.r.get("page:home").startswith(LEASE_PREFIX)
        pttl = e.r.pttl("page:home")
        assert 0 < pttl <= 3000, pttl
        first = e.r.fcall("walbust_get", 1, "page:home", "5000")
        assert first[:2] == ["stale", "<h1>Home v1</h1>"] and len(first) == 3, first
        token = first[2]
        second = e.r.fcall("walbust_get", 1, "page:home", "5000")
        assert second == ["stale", "<h1>Home v1</h1>"], second
        # the rebuild lands; everyone gets the hit
        assert e.r.fcall("walbust_fill", 1, "page:home", token, "<h1>Home v2</h1>", "60") == 1
        assert e.r.fcall("walbust_get", 1, "page:home", "5000") == ["hit", "<h1>Home v2</h1>"]
        # a change while a rebuild is in flight revokes that rebuild's lease
        e.q("UPDATE page SET title = 'Home v3' WHERE slug = 'home'")
        wait_until(lambda: (e.r.get("page:home") or "").startswith(LEASE_PREFIX), 20,
                   "marked stale again")
        kind, value, token = e.r.fcall("walbust_get", 1, "page:home", "5000")
        assert (kind, value) == ("stale", "<h1>Home v2</h1>")
        e.q("UPDATE page SET title = 'Home v4' WHERE slug = 'home'")
        e.barrier()
        assert e.r.fcall("walbust_fill", 1, "page:home", token, "<h1>Home v3</h1>", "60") == 0
        again = e.r.fcall("walbust_get", 1, "page:home", "5000")
        assert again[:2] == ["stale", "<h1>Home v2</h1>"] and len(again) == 3, again
        # nobody fills: after the grace the key is gone
        wait_until(lambda: not e.r.exists("page:home"), 10, "stale value expired after grace")
        assert e.r.fcall("walbust_get", 1, "page:home", "5000")[0] == "lease"
        # a key nobody cached stays absent
        e.q("UPDATE page SET title = 'x' WHERE slug = 'nothing'")
        e.q("INSERT INTO page VALUES ('other', 'o')")
        e.barrier()
        assert not e.r.exists("page:other")
    finally:
        e.close()


def test_metrics():
    """walbust_refresh_writes_total{table}, walbust_refresh_fallback_deletes_total{table},
    walbust_refresh_fenced_total and walbust_stale_marked_total{table} count
    what the refresh and stale rules did (docs/operations.md, Metrics)."""
    port = free_port()
    e = Env("metrics", 10).start(metrics_port=port)
    prod = '{table="public.product"}'

    def metric(name, labels=""):
        return scrape(port).get(name + labels, 0.0)

    def wait_metric(name, labels, want):
        wait_until(lambda: metric(name, labels) == want, 20, f"{name}{labels} == {want}")

    try:
        m = scrape(port)
        assert m["walbust_refresh_fenced_total"] == 0, m
        assert not any(k.startswith(("walbust_refresh_writes_total{", "walbust_stale_marked_total{"))
                       for k in m), m
        # two rows, two refresh entries each: 4 writes
        e.q("INSERT INTO product VALUES (1, 'hat', 9.50, 'x'), (2, 'cap', 1, 'y')")
        wait_until(lambda: product_json(e, 2), 20, "product:2 stored")
        wait_metric("walbust_refresh_writes_total", prod, 4)
        assert metric("walbust_refresh_fallback_deletes_total", prod) == 0
        # an unchanged TOASTed column: both entries delete instead of storing
        big = "".join(chr(65 + (i * 7919) % 26) for i in range(200000))
        e.q("INSERT INTO product VALUES (5, 'book', 20, %s)", (big,))
        wait_until(lambda: product_json(e, 5), 20, "product:5 stored")
        e.q("UPDATE product SET price = 21 WHERE id = 5")
        wait_until(lambda: not e.r.exists("product:5"), 20, "product:5 deleted")
        wait_metric("walbust_refresh_fallback_deletes_total", prod, 2)
        assert metric("walbust_refresh_writes_total", prod) == 6  # the insert's two
        # a newer commit's row is in product:1 (its fence says so): refused
        e.r.set("walbust:fence:{product:1}", "FFFFFFFF/0")
        e.q("UPDATE product SET name = 'older' WHERE id = 1")
        e.barrier()
        wait_metric("walbust_refresh_fenced_total", "", 1)  # ph:1 has its own fence: stored
        assert e.r.hget("ph:1", "name") == "older"
        assert metric("walbust_refresh_writes_total", prod) == 8
        # stale marks, counted whether or not the key exists
        e.q("INSERT INTO page VALUES ('home', 'v1')")
        e.barrier()
        e.r.set("page:home", "<h1>v1</h1>")
        e.q("UPDATE page SET title = 'v2' WHERE slug = 'home'")
        wait_until(lambda: (e.r.get("page:home") or "").startswith(LEASE_PREFIX), 20,
                   "page:home marked stale")
        wait_metric("walbust_stale_marked_total", '{table="public.page"}', 2)
        assert metric("walbust_refresh_fenced_total") == 1
        assert metric("walbust_stale_marked_total", prod) == 0  # product has no stale rule
    finally:
        e.close()


def test_decode_dry_run():
    """decode --rules lists refresh and stale keys and touches no Redis."""
    e = Env("decode", 15)
    try:
        e.q("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (e.slot,))
        e.q("INSERT INTO product VALUES (4, 'd', 2, 'b')")
        e.q("UPDATE page SET title = 't' WHERE slug = 'x'")
        e.q("INSERT INTO page VALUES ('y', 'y')")
        until = sql(e.db, "SELECT pg_current_wal_lsn()::text", fetch=True)[0][0]
        p = subprocess.run([BIN, "decode", "--pg", dsn(e.db), "--rules", e.rules, "--slot",
                            e.slot, "--publication", "walbust", "--until", until],
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, (p.returncode, p.stderr)
        lines = [json.loads(ln) for ln in p.stdout.splitlines() if ln.strip()]
        inv = lines[0]["invalidations"]
        assert inv["refresh"] == ["product:4", "ph:4"], inv
        assert lines[-1]["invalidations"]["stale"] == ["page:y"], lines[-1]
        assert not e.r.exists("product:4")
    finally:
        e.close()


if __name__ == "__main__":
    run = Runner("test_refresh")
    run.run(test_refresh_stores_rows)
    run.run(test_toast_unchanged_deletes)
    run.run(test_fence_refuses_older_commit)
    run.run(test_refresh_revokes_lease)
    run.run(test_stale_while_revalidate)
    run.run(test_decode_dry_run)
    run.run(test_metrics)
    run.done()
