"""Several walbust instances, one per publication and slot, tables
partitioned between them (docs/scaling.md): each instance has its own
walsender, streams only its tables, and confirms its own slot; stopping one
holds back only its own tables, and it catches up on restart.

Database walbust_partitioned; slots part_a and part_b with publications
part_a (orders + barrier_a) and part_b (events + barrier_b); Redis db 14 of
the stack's server, keys under "part:".

Run by hand:
  make && scripts/stack start /tmp/me-stack && . /tmp/me-stack/env &&
  WALBUST_BIN=$PWD/build/walbust /usr/bin/python3 tests/e2e/test_partitioned.py
"""
import os
import random
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import (REDIS_PORT, Runner, Walbust, connect, fresh_db, redis_client,  # noqa: E402
                     slot_confirmed, sql, wait_until, write_rules)

DB = "walbust_partitioned"
RDB = 14
NROWS = 2000
URL = f"redis://127.0.0.1:{REDIS_PORT}/{RDB}"
PARTS = {  # instance -> (slot/publication, table, key prefix, barrier table)
    "a": ("part_a", "orders", "part:order:", "barrier_a"),
    "b": ("part_b", "events", "part:event:", "barrier_b"),
}


def setup():
    fresh_db(DB)
    rules = {}
    for name, (pub, table, prefix, barrier) in PARTS.items():
        sql(DB, f"CREATE TABLE {table}(id int PRIMARY KEY, v int NOT NULL DEFAULT 0)")
        sql(DB, f"INSERT INTO {table}(id) SELECT generate_series(1, %s)", (NROWS,))
        sql(DB, f"CREATE TABLE {barrier}(id bigserial PRIMARY KEY, token text)")
        sql(DB, f"CREATE PUBLICATION {pub} FOR TABLE {table}, {barrier}")
        rules[name] = write_rules({"rules": [
            {"table": table, "keys": [prefix + "{id}"]},
            {"table": barrier, "on": ["insert"], "keys": [f"part:barrier:{name}:{{token}}"]},
        ]})
    return rules


def instance(name, rules):
    pub = PARTS[name][0]
    return Walbust(DB, rules[name], slot=pub, publication=pub, redis_urls=[URL])


def seed(r):
    pipe = r.pipeline(transaction=False)
    for _, _, prefix, _ in PARTS.values():
        for i in range(1, NROWS + 1):
            pipe.set(f"{prefix}{i}", "cached")
    pipe.execute()


def present(r, prefix, ids):
    ids = sorted(ids)
    pipe = r.pipeline(transaction=False)
    for i in ids:
        pipe.exists(f"{prefix}{i}")
    return {i for i, e in zip(ids, pipe.execute()) if e}


def barrier(r, name, timeout=30):
    """A commit on instance `name`'s barrier table, waited for."""
    token = str(random.getrandbits(48))
    k = f"part:barrier:{name}:{token}"
    r.set(k, "1")
    sql(DB, f"INSERT INTO {PARTS[name][3]}(token) VALUES (%s)", (token,))
    wait_until(lambda: not r.exists(k), timeout, f"barrier of instance {name}")


def write(table, ids, seed_):
    """Commit one UPDATE per id (in a random order) from a thread."""
    ids = list(ids)
    random.Random(seed_).shuffle(ids)

    def run():
        conn = connect(DB)
        with conn.cursor() as cur:
            for i in ids:
                cur.execute(f"UPDATE {table} SET v = v + 1 WHERE id = %s", (i,))
        conn.close()
    t = threading.Thread(target=run)
    t.start()
    return t


def active_pids():
    rows = sql(DB, "SELECT slot_name, active_pid FROM pg_replication_slots "
                   "WHERE slot_name IN ('part_a', 'part_b')", fetch=True)
    return dict(rows)


def lsn_ge(a, b):
    return sql(DB, "SELECT %s::pg_lsn >= %s::pg_lsn", (a, b), fetch=True)[0][0]


def test_two_instances_stream_their_own_tables():
    """Two instances, two walsenders, concurrent writes to both partitions:
    every written row's key is gone, every other key stays, and both slots
    confirm past the writes."""
    rules = setup()
    r = redis_client(RDB)
    r.flushdb()
    seed(r)
    ws = {n: instance(n, rules) for n in PARTS}
    try:
        for w in ws.values():
            w.start()
        for w in ws.values():
            w.wait_streaming()
        pids = wait_until(lambda: all(active_pids().values()) and active_pids(), 10,
                          "both slots active")
        assert len(set(pids.values())) == 2, f"one walsender serves both slots: {pids}"
        threads = [write("orders", range(1, 1001), 1), write("events", range(1, 1001), 2)]
        for t in threads:
            t.join(60)
        end = sql(DB, "SELECT pg_current_wal_lsn()::text", fetch=True)[0][0]
        for n in PARTS:
            barrier(r, n)
        for _, _, prefix, _ in PARTS.values():
            assert not present(r, prefix, range(1, 1001)), f"{prefix}* written keys survived"
            assert present(r, prefix, range(1001, NROWS + 1)) == set(range(1001, NROWS + 1))
        for pub, *_ in PARTS.values():
            wait_until(lambda: lsn_ge(slot_confirmed(DB, pub), end), 20,
                       f"slot {pub} to confirm past the writes")
    finally:
        for w in ws.values():
            assert w.stop() == 0


def test_stopped_instance_holds_back_only_its_tables():
    """Instance a is stopped: b keeps invalidating events, orders stay
    cached and slot part_a does not advance; a restarts and catches up."""
    rules = setup()
    r = redis_client(RDB)
    r.flushdb()
    seed(r)
    a, b = instance("a", rules), instance("b", rules)
    try:
        a.start().wait_streaming()
        b.start().wait_streaming()
        barrier(r, "a")
        assert a.stop() == 0
        held = slot_confirmed(DB, "part_a")
        for t in (write("orders", range(1, 501), 3), write("events", range(1, 501), 4)):
            t.join(60)
        barrier(r, "b")
        assert not present(r, "part:event:", range(1, 501)), "instance b missed events"
        assert present(r, "part:order:", range(1, 501)) == set(range(1, 501)), (
            "orders were invalidated while their instance was stopped")
        assert slot_confirmed(DB, "part_a") == held, "slot part_a advanced while stopped"
        a = instance("a", rules)
        a.start().wait_streaming()
        barrier(r, "a")
        assert not present(r, "part:order:", range(1, 501)), "instance a did not catch up"
        assert present(r, "part:order:", range(501, NROWS + 1)) == set(range(501, NROWS + 1))
    finally:
        for w in (a, b):
            if w.alive():
                assert w.stop() == 0


def main():
    runner = Runner("partitioned")
    runner.run(test_two_instances_stream_their_own_tables)
    runner.run(test_stopped_instance_holds_back_only_its_tables)
    runner.done()


if __name__ == "__main__":
    main()
