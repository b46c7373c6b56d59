"""Randomized staleness: many concurrent cache-aside readers and writers with
walbust running, once with naive cache-aside (GET, read the row, SET) and once
with lease-fenced fills (walbust_get/walbust_fill through the Python client).

Readers pick random rows; on a miss they read the row and, half of the time,
pause up to 3 ms before storing it (an application doing some work, a GC
pause) -- the same for both modes. Writers increment random rows. The run is
cut into epochs: at the end of each, writers pause, a barrier waits until
walbust applied every commit, and every cached entry is compared with its row
(the database does not change during the check). Stale entries are counted
per epoch and summed. Naive cache-aside must show stale entries (proving the
checker sees staleness); lease-fenced fills must show none. At least 100,000
reads per mode (--long: 500,000).
"""
import random
import threading
import time

import fresh
from fresh import LONG, Env, harness, is_lease_marker

RDB = 12
ROWS = 200
READERS = 16
WRITERS = 4
READS = 500_000 if LONG else 100_000
EPOCH_S = 0.3
env = None


class Run:
    def __init__(self, mode):
        self.mode = mode
        self.reads = 0
        self.db_reads = 0
        self.writes = 0
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.writing = threading.Event()
        self.wlock = [threading.Lock() for _ in range(WRITERS)]
        self.errors = []
        self.stale = 0
        self.stale_epochs = 0
        self.epochs = 0
        self.markers = 0
        self.refused = 0
        self.leases = 0


def reader(run, seed):
    rnd = random.Random(seed)
    r = harness.redis_client(RDB)
    conn = env.conn()
    cur = conn.cursor()
    cache = env.cache(lease_ms=2000) if run.mode == fresh.LEASE else None
    n = dbr = 0

    def load(i):
        nonlocal dbr
        cur.execute("SELECT v FROM items WHERE id = %s", (i,))
        v = str(cur.fetchone()[0])
        dbr += 1
        if rnd.random() < 0.5:
            time.sleep(rnd.random() * 0.003)
        return v

    try:
        while not run.done.is_set():
            i = rnd.randint(1, ROWS)
            key = f"item:{i}"
            if cache is None:
                v = r.get(key)
                if v is None:
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


def writer(run, w, seed):
    rnd = random.Random(seed)
    conn = env.conn()
    cur = conn.cursor()
    n = 0
    try:
        while not run.done.is_set():
            # The main thread clears `writing`, then takes every writer's
            # lock: after that no write is in flight or starts.
            with run.wlock[w]:
                if run.writing.is_set():
                    cur.execute("UPDATE items SET v = v + 1 WHERE id = %s", (rnd.randint(1, ROWS),))
                    n += 1
                    wrote = True
                else:
                    wrote = False
            if wrote:
                time.sleep(rnd.random() * 0.002)
            else:
                run.writing.wait(0.05)
    except Exception as e:  # noqa: BLE001
        run.errors.append(repr(e))
        run.done.set()
    with run.lock:
        run.writes += n
    conn.close()


def check(run):
    """Cache vs database with writers paused and walbust caught up."""
    rows = dict(fresh.sql(env.db, "SELECT id, v FROM items", fetch=True))
    keys = [f"item:{i}" for i in range(1, ROWS + 1)]
    stale = 0
    for i, v in zip(range(1, ROWS + 1), env.r.mget(keys)):
        if v is None:
            continue
        if is_lease_marker(v):
            run.markers += 1
        elif v != str(rows[i]):
            stale += 1
    # The database must not have moved during the check.
    assert dict(fresh.sql(env.db, "SELECT id, v FROM items", fetch=True)) == rows
    run.stale += stale
    run.stale_epochs += 1 if stale else 0
    run.epochs += 1


def run_mode(mode, seed):
    env.r.flushdb()
    run = Run(mode)
    threads = [threading.Thread(target=reader, args=(run, seed * 1000 + k)) for k in range(READERS)]
    threads += [threading.Thread(target=writer, args=(run, w, seed * 2000 + w)) for w in range(WRITERS)]
    for t in threads:
        t.start()
    t0 = time.monotonic()
    deadline = t0 + (900 if LONG else 120)
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
    print(f"# {mode}: {run.reads} reads ({run.reads / secs:.0f}/s), {run.db_reads} database reads, "
          f"{run.writes} writes, {run.epochs} checks: {run.stale} stale entries "
          f"(in {run.stale_epochs} checks); leases {run.leases}, fills refused {run.refused}, "
          f"markers seen {run.markers}", flush=True)
    assert run.reads >= READS and run.writes > 100 and run.epochs >= 2
    return run


def test_naive_cache_aside_goes_stale():
    run = run_mode(fresh.NAIVE, 1)
    assert run.stale > 0, "the checker saw no stale entry for naive cache-aside"


def test_lease_fenced_fills_never_stale():
    run = run_mode(fresh.LEASE, 2)
    assert run.refused > 0, "no fill was refused: the race was not exercised"
    assert run.stale == 0, f"{run.stale} stale entries with lease-fenced fills"


def main():
    global env
    env = Env("freshness_staleness", RDB, rows=ROWS).start()
    try:
        fresh.run_module("freshness staleness", [
            test_naive_cache_aside_goes_stale,
            test_lease_fenced_fills_never_stale,
        ])
    finally:
        env.close()


if __name__ == "__main__":
    main()
