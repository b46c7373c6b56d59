"""Randomized staleness of refreshed entries (docs/rules.md "Refresh").

walbust writes each product row into product:{id} (a "refresh" rule: JSON,
fenced by the commit LSN) while readers fill the same keys cache-aside: 3 %
of the reads first evict the key (as LRU eviction would), a miss loads the
row and stores it after a pause of up to 20 ms. Writers
update prices and names and delete and re-insert rows concurrently. Once
naive (GET, query, SET) and once through the lease protocol
(walbust_get/walbust_fill: a refresh overwrites the lease marker, so a fill
that read an older row is refused). The run is cut into epochs: writers
pause, a barrier waits until walbust applied every commit, and every cached
entry is compared with its row. Naive must show stale entries (the checker
has teeth); lease fills must show none. 50,000 reads per mode (--long:
500,000).
"""
import json
import random
import threading
import time

import fresh
from fresh import LONG, harness, is_lease_marker

RDB = 12
ROWS = 60
READERS = 10
WRITERS = 4
READS = 500_000 if LONG else 50_000
EPOCH_S = 0.3

SCHEMA = """
CREATE TABLE product(id int PRIMARY KEY, name text NOT NULL, price int NOT NULL);
""" + fresh.BARRIER_SQL + """;
CREATE PUBLICATION walbust FOR TABLE product, walbust_barrier;
"""

RULES = {"rules": [
    {"table": "product", "refresh": [{"key": "product:{id}", "value": "row", "ttl": 600}]},
    fresh.BARRIER_RULE,
]}

ROW_SQL = ("SELECT coalesce((SELECT json_build_object('id', id::text, 'name', name, "
           "'price', price::text)::text FROM product WHERE id = %s), 'null')")


class RefreshEnv(fresh.Env):
    """fresh.Env with the product table and the refresh rule."""

    def __init__(self, db, rdb):  # noqa: D107 - replaces fresh.Env's schema
        self.db = fresh.fresh_db(db)
        self.rdb = rdb
        self.slot = db
        self.r = harness.redis_client(rdb)
        self.r.flushdb()
        self.rb = harness.redis.Redis(host="127.0.0.1", port=harness.REDIS_PORT, db=rdb)
        fresh.load_functions(self.r)
        fresh.sql(self.db, SCHEMA)
        fresh.sql(self.db, "INSERT INTO product SELECT g, 'p' || g, 0 FROM generate_series(1, %s) g",
                  (ROWS,))
        self.rules = fresh.write_rules(RULES)
        self.wb = None


env = None


class Run:
    def __init__(self, mode):
        self.mode = mode
        self.reads = self.db_reads = self.writes = 0
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.writing = threading.Event()
        self.wlock = [threading.Lock() for _ in range(WRITERS)]
        self.errors = []
        self.stale = self.stale_epochs = self.epochs = self.markers = 0
        self.refused = self.leases = 0


def reader(run, seed):
    rnd = random.Random(seed)
    r = harness.redis_client(RDB)
    conn = env.conn()
    cur = conn.cursor()
    cache = env.cache(lease_ms=2000) if run.mode == fresh.LEASE else None
    n = dbr = 0

    def load(i):
        nonlocal dbr
        cur.execute(ROW_SQL, (i,))
        v = cur.fetchone()[0]
        dbr += 1
        time.sleep(rnd.random() * 0.02)  # the application's work before storing
        return v

    try:
        while not run.done.is_set():
            i = rnd.randint(1, ROWS)
            key = f"product:{i}"
            if rnd.random() < 0.03:
                r.delete(key)  # evicted
            if cache is None:
                v = r.get(key)
                if v is None or is_lease_marker(v):
                    r.set(key, load(i), ex=600)
            else:
                cache.get_or_fill(key, lambda: load(i), 600)
            n += 1
            if n % 200 == 0:
                with run.lock:
                    run.reads += 200
                    if run.reads >= READS:
                        run.done.set()
    except Exception as e:  # noqa: BLE001 - reported by the main thread
        run.errors.append(repr(e))
        run.done.set()
    with run.lock:
        run.reads += n % 200
        run.db_reads += dbr
        if cache is not None:
            run.refused += cache.stats["refused"]
            run.leases += cache.stats["lease"]
    conn.close()


def write_one(cur, rnd, seq):
    i = rnd.randint(1, ROWS)
    k = rnd.random()
    if k < 0.8:
        cur.execute("UPDATE product SET price = %s, name = %s WHERE id = %s",
                    (seq % 100000, f"p{i}-{seq}", i))
    else:  # deleted, then back (two commits)
        cur.execute("DELETE FROM product WHERE id = %s", (i,))
        cur.execute("INSERT INTO product VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
                    (i, f"p{i}-{seq}", seq % 100000))


def writer(run, w, seed):
    rnd = random.Random(seed)
    conn = env.conn()
    cur = conn.cursor()
    writes = 0
    try:
        while not run.done.is_set():
            with run.wlock[w]:
                wrote = run.writing.is_set()
                if wrote:
                    write_one(cur, rnd, seed * 1_000_000 + writes)
            if wrote:
                writes += 1
                time.sleep(rnd.random() * 0.002)
            else:
                run.writing.wait(0.05)
    except Exception as e:  # noqa: BLE001
        run.errors.append(repr(e))
        run.done.set()
    with run.lock:
        run.writes += writes
    conn.close()


def truth():
    rows = fresh.sql(env.db, "SELECT id, name, price::text FROM product", fetch=True)
    return {i: {"id": str(i), "name": n, "price": p} for i, n, p in rows}


def check(run):
    """Cached rows vs the table, with writers paused and walbust caught up."""
    want = truth()
    keys = [f"product:{i}" for i in range(1, ROWS + 1)]
    stale = 0
    for i, v in zip(range(1, ROWS + 1), env.r.mget(keys)):
        if v is None:
            continue
        if is_lease_marker(v):
            run.markers += 1
        elif json.loads(v) != want.get(i):
            stale += 1
    assert truth() == want, "the database moved during the check"
    run.stale += stale
    run.stale_epochs += 1 if stale else 0
    run.epochs += 1


def run_mode(mode, seed):
    env.r.flushdb()
    run = Run(mode)
    threads = [threading.Thread(target=reader, args=(run, seed * 1000 + k)) for k in range(READERS)]
    threads += [threading.Thread(target=writer, args=(run, w, seed * 2000 + w))
                for w in range(WRITERS)]
    for t in threads:
        t.start()
    t0 = time.monotonic()
    deadline = t0 + (900 if LONG else 180)
    while not run.done.is_set():
        run.writing.set()
        run.done.wait(EPOCH_S)
        run.writing.clear()
        for lock in run.wlock:
            with lock:
                pass
        env.barrier()
        check(run)
        assert time.monotonic() < deadline, f"{mode}: too slow ({run.reads} reads)"
    for t in threads:
        t.join(30)
        assert not t.is_alive()
    env.barrier()
    check(run)
    assert not run.errors, run.errors
    secs = time.monotonic() - t0
    print(f"# {mode}: {run.reads} reads ({run.reads / secs:.0f}/s), {run.db_reads} database "
          f"reads, {run.writes} writes, {run.epochs} checks: {run.stale} stale entries (in "
          f"{run.stale_epochs} checks); leases {run.leases}, fills refused {run.refused}, "
          f"markers seen {run.markers}", flush=True)
    assert run.reads >= READS and run.writes > 100 and run.epochs >= 2
    return run


def test_naive_fills_over_refresh_go_stale():
    # The naive race is rare (a few stale entries per run): a run that
    # happens to see none is repeated with other seeds, at most twice, so
    # the test keeps its teeth without failing on a quiet machine.
    for attempt in range(3):
        run = run_mode(fresh.NAIVE, 1 + 10 * attempt)
        if run.stale > 0:
            break
    assert run.stale > 0, "the checker saw no stale entry for naive cache-aside in 3 runs"


def test_lease_fenced_fills_over_refresh_never_stale():
    run = run_mode(fresh.LEASE, 2)
    assert run.refused > 0, "no fill was refused: the race was not exercised"
    assert run.stale == 0, f"{run.stale} stale entries with lease-fenced fills and refresh"


def main():
    global env
    env = RefreshEnv("freshness_refresh", RDB).start()
    try:
        fresh.run_module("freshness refresh (write-through)", [
            test_naive_fills_over_refresh_go_stale,
            test_lease_fenced_fills_over_refresh_never_stale,
        ])
    finally:
        env.close()


if __name__ == "__main__":
    main()
