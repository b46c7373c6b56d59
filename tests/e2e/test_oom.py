"""A full Redis: maxmemory reached under noeviction (a real redis-server).

Redis then refuses SET and INCR with -OOM but still runs UNLINK, which is
what frees memory. walbust must keep applying deletes, retry the refused
writes (the watermark SET, version INCRs) until they land, never confirm
the slot past a refused write, and say in the log and the metrics that
Redis is out of memory. Once memory is back, everything held is applied and
the slot moves on. Database walbust_oom, slot oom.
"""
import re
import urllib.request

from harness import (BARRIER_RULE, BARRIER_SQL, Runner, Walbust, barrier, fresh_db,
                     slot_confirmed, sql, wait_until, write_rules)
from faultkit import RedisServer, free_port, lsn_int

DB = "walbust_oom"
SLOT = "oom"
RULES = {"rules": [{"table": "items", "keys": ["oom:item:{id}"], "versions": ["oom:ver:{id}"]},
                   BARRIER_RULE]}


def current_lsn():
    return lsn_int(sql(DB, "SELECT pg_current_wal_lsn()::text", fetch=True)[0][0])


def metric(port, name):
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    m = re.search(rf"^{name} (\d+)", text, re.M)
    return int(m.group(1)) if m else None


def test_deletes_flow_while_redis_is_full():
    fresh_db(DB)
    sql(DB, "CREATE TABLE items(id bigint PRIMARY KEY, v int)")
    sql(DB, BARRIER_SQL)
    sql(DB, "CREATE PUBLICATION walbust FOR TABLE items, walbust_barrier")
    rules = write_rules(RULES)
    srv = RedisServer().start()
    mport = free_port()
    w = Walbust(DB, rules, slot=SLOT, redis_urls=[srv.url()], extra=["--metrics", f"127.0.0.1:{mport}"])
    r = srv.client()
    try:
        w.start().wait_streaming()
        barrier(DB, r)
        for i in range(1, 4):
            r.set(f"oom:item:{i}", "cached")
        r.config_set("maxmemory-policy", "noeviction")
        r.config_set("maxmemory", "1")
        try:
            r.set("probe", "1")
            raise AssertionError("redis accepted a SET above maxmemory")
        except Exception as e:  # redis.exceptions.OutOfMemoryError / ResponseError
            assert "OOM" in str(e), e

        sql(DB, "INSERT INTO items VALUES (1, 0)")
        first = current_lsn()
        wait_until(lambda: not r.exists("oom:item:1"), 20, "the delete applied while Redis is full")
        wait_until(lambda: "out of memory" in w.read_log(), 20, "an out-of-memory error in the log")
        assert not r.exists("oom:ver:1"), "INCR applied although Redis refused it"

        # Later transactions' deletes keep flowing; nothing is confirmed.
        sql(DB, "INSERT INTO items VALUES (2, 0)")
        sql(DB, "INSERT INTO items VALUES (3, 0)")
        second = current_lsn()
        wait_until(lambda: not r.exists("oom:item:2") and not r.exists("oom:item:3"), 20,
                   "later deletes applied while Redis is full")
        wait_until(lambda: (metric(mport, "walbust_redis_oom_refusals_total") or 0) > 0, 20,
                   "walbust_redis_oom_refusals_total to count")
        confirmed = lsn_int(slot_confirmed(DB, SLOT))
        assert confirmed < first, f"slot confirmed {confirmed} past the refused INCR at {first}"
        assert w.alive(), w.read_log()
        line = [ln for ln in w.read_log().splitlines() if "out of memory" in ln][0]
        print(f"# {line}")
        assert "maxmemory" in line and "deletes" in line, line
        lines = w.read_log().count("out of memory")
        assert lines <= 3, f"{lines} out-of-memory lines: the log should be rate-limited"

        # Memory back: the refused writes land and the slot moves on.
        r.config_set("maxmemory", "0")
        wait_until(lambda: all(r.exists(f"oom:ver:{i}") for i in (1, 2, 3)), 20,
                   "the held INCRs applied once memory is back")
        wait_until(lambda: lsn_int(slot_confirmed(DB, SLOT)) >= second, 20,
                   "the slot confirmed past the inserts")
        barrier(DB, r)
        assert r.get(f"walbust:confirmed:{SLOT}") is not None
    finally:
        assert w.stop() == 0, w.read_log()
        srv.stop()
        sql(DB, "SELECT pg_drop_replication_slot(%s) FROM pg_replication_slots WHERE slot_name = %s",
            (SLOT, SLOT))


def main():
    runner = Runner("test_oom")
    runner.run(test_deletes_flow_while_redis_is_full)
    runner.done()


if __name__ == "__main__":
    main()
