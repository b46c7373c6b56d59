"""Nothing is lost under real faults (docs/guarantees.md, guarantees 2 and 3).

Every test caches a key for each row of items(id, v), runs a writer that
commits thousands of small transactions updating random rows, injects one
fault while the writer runs, and then checks, after a barrier, that every
key of a written row is gone (no lost invalidation) and every key of a row
that was never written is still cached (no over-invalidation). Each fault is
verified to have happened: walbust died of SIGKILL, redis stopped answering
pings, the walsender pid changed, the command timeout fired.

Redis: db 11 of the stack's server, or a private redis-server per test when
the test kills, restarts or freezes it. Database walbust_faults, slot faults.
"""
import random
import re
import sys
import time

from harness import (BARRIER_RULE, BARRIER_SQL, REDIS_PORT, Runner, Walbust, barrier, fresh_db,
                     redis_client, slot_confirmed, sql, wait_until, write_rules)
from faultkit import RedisServer, Writer, current_lsn, lsn_int

DB = "walbust_faults"
SLOT = "faults"
NROWS = 8000
RDB = 11
NBULK = 100_000
RULES = {"rules": [{"table": "items", "keys": ["flt:item:{id}"]},
                   {"table": "bulk", "keys": ["flt:bulk:{id}"]}, BARRIER_RULE]}
ALL = set(range(1, NROWS + 1))
# The writer draws ids from a different slice of the rows in each phase:
# before the fault each id is written once (so an invalidation lost around
# the fault is not repaired by a later write of the same row), during the
# fault at random, after recovery once again. A third of the rows is never
# written, so their keys must survive.
_SHUFFLED = random.Random(7).sample(sorted(ALL), NROWS)
BEFORE, DURING, AFTER = _SHUFFLED[:2000], _SHUFFLED[2000:4000], _SHUFFLED[4000:5300]


def writer(scene, seed):
    wr = scene.add(Writer(DB, NROWS, seed=seed))
    wr.set_pool(BEFORE, fresh=True)
    wr.start()
    return wr
RETRY_RE = r"retrying in (\d+) ms; reading from postgresql is paused"
ACKED = "redis acknowledged after"


def key(i):
    return f"flt:item:{i}"


def setup_db():
    fresh_db(DB)
    sql(DB, "CREATE TABLE items(id bigint PRIMARY KEY, v int NOT NULL DEFAULT 0)")
    sql(DB, "INSERT INTO items(id) SELECT generate_series(1, %s)", (NROWS,))
    sql(DB, "CREATE TABLE bulk(id bigint PRIMARY KEY, v int NOT NULL DEFAULT 0)")
    sql(DB, BARRIER_SQL)
    sql(DB, "CREATE PUBLICATION walbust FOR TABLE items, bulk, walbust_barrier")
    return write_rules(RULES)


def seed(r, ids):
    pipe = r.pipeline(transaction=False)
    for i in ids:
        pipe.set(key(i), "cached")
    pipe.execute()


def present(r, ids):
    ids = sorted(ids)
    pipe = r.pipeline(transaction=False)
    for i in ids:
        pipe.exists(key(i))
    return {i for i, e in zip(ids, pipe.execute()) if e}


def assert_invalidated(r, gone, kept):
    assert gone, "the writer wrote nothing"
    assert kept, "every row was written; the over-invalidation check would be empty"
    left = present(r, gone)
    assert not left, (f"{len(left)} of {len(gone)} written rows are still cached "
                      f"(lost invalidations), e.g. {sorted(left)[:10]}")
    lost = set(kept) - present(r, kept)
    assert not lost, (f"{len(lost)} of {len(kept)} rows never written lost their key "
                      f"(over-invalidation), e.g. {sorted(lost)[:10]}")


def active_pid():
    rows = sql(DB, "SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s", (SLOT,),
               fetch=True)
    return rows[0][0] if rows else None


class Scene:
    """What one test started; torn down in reverse order whatever happens."""

    def __init__(self):
        self.items = []

    def add(self, obj):
        self.items.append(obj)
        return obj

    def close(self):
        for obj in reversed(self.items):
            try:
                if isinstance(obj, Writer):
                    obj._halt.set()
                    obj.join(10)
                elif isinstance(obj, Walbust):
                    if obj.alive():
                        obj.proc.kill()
                        obj.proc.wait()
                elif isinstance(obj, RedisServer):
                    obj.stop()
            except Exception as e:  # teardown must go on
                print(f"# teardown: {e!r}")


def walbust(scene, rules, url):
    return scene.add(Walbust(DB, rules, slot=SLOT, redis_urls=[url]))


def wait_fresh_long_backoff(w, min_ms=1500, timeout=40):
    """Wait until walbust logs a new Redis retry whose sleep is at least
    min_ms, and return the sleep: Redis can be touched while it sleeps
    without walbust seeing it."""
    base = len(re.findall(RETRY_RE, w.read_log()))

    def fresh():
        found = [int(x) for x in re.findall(RETRY_RE, w.read_log())[base:]]
        return found and found[-1] >= min_ms and found[-1]
    return wait_until(fresh, timeout, f"a redis retry sleeping >= {min_ms} ms")


def bulk_present(r, ids):
    pipe = r.pipeline(transaction=False)
    for i in ids:
        pipe.exists(f"flt:bulk:{i}")
    return sum(pipe.execute())


def test_kill9_walbust_mid_stream():
    """(a) SIGKILL walbust while it is applying a 100,000-row transaction in
    chunks and small transactions stream, write on, restart."""
    rules = setup_db()
    sql(DB, "INSERT INTO bulk(id) SELECT generate_series(1, %s)", (NBULK,))
    r = redis_client(RDB)
    r.flushdb()
    url = f"redis://127.0.0.1:{REDIS_PORT}/{RDB}"
    scene = Scene()
    try:
        w = walbust(scene, rules, url).start().wait_streaming()
        seed(r, ALL)
        pipe = r.pipeline(transaction=False)
        for i in range(1, NBULK + 1):
            pipe.set(f"flt:bulk:{i}", "cached")
        pipe.execute()
        wr = writer(scene, 1)
        wr.wait_more(800)
        sql(DB, "UPDATE bulk SET v = v + 1")  # one transaction, applied in chunks
        probe = random.Random(9).sample(range(1, NBULK + 1), 300)
        wait_until(lambda: bulk_present(r, probe) < len(probe), 30,
                   "walbust to start applying the bulk transaction")
        lag = sql(DB, "SELECT pg_current_wal_lsn() - confirmed_flush_lsn FROM "
                      "pg_replication_slots WHERE slot_name = %s", (SLOT,), fetch=True)[0][0]
        w.kill9()  # asserts the process died of SIGKILL
        wr.set_pool(DURING)
        at_kill = wr.count()
        left = bulk_present(r, range(1, NBULK + 1))
        assert 0 < left < NBULK, f"{left} of {NBULK} bulk keys left: not killed mid-transaction"
        wr.wait_more(500)  # committed while walbust is dead
        w2 = walbust(scene, rules, url).start().wait_streaming()
        wr.set_pool(AFTER, fresh=True)
        wr.wait_more(500)
        txns = wr.finish()
        barrier(DB, r)
        written = wr.written()
        print(f"# kill9: {len(txns)} transactions ({len(txns) - at_kill} after the kill), "
              f"{len(written)} of {NROWS} rows written, killed with {left} of {NBULK} keys of "
              f"the bulk transaction still cached, slot lag {lag} bytes")
        assert_invalidated(r, written, ALL - written)
        left = bulk_present(r, range(1, NBULK + 1))
        assert left == 0, f"{left} keys of the bulk transaction survived the restart"
        assert w2.stop() == 0
    finally:
        scene.close()


def redis_outage(aof):
    """(b) Redis dies mid-storm (SIGTERM without persistence, or SIGKILL with
    AOF, where walbust is SIGKILLed and restarted too while redis is down),
    writes go on, Redis comes back while walbust is in backoff, with keys
    present again (re-seeded by the 'application', or from the AOF)."""
    rules = setup_db()
    scene = Scene()
    try:
        rs = scene.add(RedisServer(aof=aof).start())
        r = rs.client()
        w = walbust(scene, rules, rs.url()).start().wait_streaming()
        seed(r, ALL)
        wr = writer(scene, 2 if aof else 3)
        wr.wait_more(600)
        if aof:
            rs.kill9()
        else:
            rs.terminate()  # asserts exit and that ping fails
        wr.set_pool(DURING)
        at_kill = wr.count()
        lsn_kill = current_lsn(DB)
        wait_until(lambda: re.search(RETRY_RE, w.read_log()), 20, "walbust to retry redis")
        wr.wait_more(200)
        c1 = slot_confirmed(DB, SLOT)
        wr.wait_more(600)
        c2 = slot_confirmed(DB, SLOT)
        assert w.alive(), "walbust exited while redis was down"
        assert c1 == c2, f"confirmed_flush_lsn moved from {c1} to {c2} while redis was down"
        assert lsn_int(c2) <= lsn_kill, (f"confirmed_flush_lsn {c2} is past every commit redis "
                                         f"could have acknowledged (WAL at kill {lsn_kill:X})")
        assert "redis target" in w.read_log() and "failed" in w.read_log()
        if aof:
            # Crash walbust too while redis is down: the new process starts
            # from the slot's confirmed position, so anything confirmed but
            # never acknowledged by redis would now be lost for good.
            w.kill9()
            w = walbust(scene, rules, rs.url()).start().wait_streaming()
            wait_until(lambda: re.search(RETRY_RE, w.read_log()), 20, "the new walbust to retry")
            assert slot_confirmed(DB, SLOT) == c2, "the restarted walbust confirmed while redis was down"

        sleep_ms = wait_fresh_long_backoff(w)
        t_back = time.time()
        rs.start()
        if aof:
            # Keys of rows first written after the kill were never
            # invalidated, so the AOF must bring them back.
            first_after = set()
            seen = set()
            for i, (_, ids, _) in enumerate(wr.txns):
                for x in ids:
                    if i >= at_kill and x not in seen:
                        first_after.add(x)
                    seen.add(x)
            came_back = present(r, first_after)
            assert first_after and came_back == first_after, (
                f"AOF restored {len(came_back)} of {len(first_after)} keys")
        else:
            assert r.dbsize() == 0, "redis came back with data despite no persistence"
            seed(r, ALL)  # the application refills the cache, possibly stale
        assert ACKED not in w.read_log(), (
            f"walbust reconnected before the cache was refilled ({time.time() - t_back:.2f}s "
            f"into a {sleep_ms} ms backoff): the test's precondition did not hold")
        wait_until(lambda: ACKED in w.read_log(), 40, "walbust to resume after redis came back")
        wr.set_pool(AFTER, fresh=True)
        wr.wait_more(300)
        wr.finish()
        barrier(DB, r)
        confirmed_down = lsn_int(c2)
        must_go = wr.written(since_lsn=confirmed_down)
        after_kill = set()
        for _, ids, _ in wr.txns[at_kill:]:
            after_kill.update(ids)
        assert after_kill <= must_go
        written = wr.written()
        print(f"# redis {'kill9+aof' if aof else 'sigterm+refill'}: {len(wr.txns)} transactions, "
              f"{len(wr.txns) - at_kill} after redis died, {len(must_go)} rows committed past "
              f"the confirmed position {c2}, backoff window {sleep_ms} ms")
        # With AOF every acknowledged UNLINK was persisted, so every written
        # row must be gone; after a refill, rows confirmed before the outage
        # legitimately come back (stale data the application put there).
        assert_invalidated(r, written if aof else must_go, ALL - written)
        assert w.stop() == 0
    finally:
        scene.close()


def test_redis_outage_refilled():
    redis_outage(aof=False)


def test_redis_outage_aof_kill9():
    redis_outage(aof=True)


def test_walsender_terminated():
    """(c) pg_terminate_backend on walbust's walsender mid-stream."""
    rules = setup_db()
    r = redis_client(RDB)
    r.flushdb()
    url = f"redis://127.0.0.1:{REDIS_PORT}/{RDB}"
    scene = Scene()
    try:
        w = walbust(scene, rules, url).start().wait_streaming()
        seed(r, ALL)
        wr = writer(scene, 4)
        wr.wait_more(600)
        pid1 = active_pid()
        assert pid1, "no walsender holds the slot"
        assert sql(DB, "SELECT pg_terminate_backend(%s)", (pid1,), fetch=True)[0][0] is True
        wr.set_pool(DURING)
        pid2 = wait_until(lambda: (lambda p: p if p not in (None, pid1) else None)(active_pid()),
                          30, "a new walsender to hold the slot")
        assert re.search(r"replication stream from .* ended|lost connection to", w.read_log()), \
            "walbust did not notice the terminated walsender"
        wr.wait_more(300)
        wr.set_pool(AFTER, fresh=True)
        wr.wait_more(300)
        wr.finish()
        barrier(DB, r)
        written = wr.written()
        print(f"# walsender: pid {pid1} -> {pid2}, {len(wr.txns)} transactions")
        assert_invalidated(r, written, ALL - written)
        assert w.stop() == 0
    finally:
        scene.close()


def test_redis_frozen_past_command_timeout():
    """(d) SIGSTOP redis for longer than the 5 s command timeout, SIGCONT."""
    rules = setup_db()
    scene = Scene()
    try:
        rs = scene.add(RedisServer().start())
        r = rs.client()
        w = walbust(scene, rules, rs.url()).start().wait_streaming()
        seed(r, ALL)
        wr = writer(scene, 5)
        wr.wait_more(400)
        rs.sigstop()
        wr.set_pool(DURING)
        t0 = time.time()
        try:
            assert not rs.ping(0.3), "a stopped redis answered"
            wait_until(lambda: "(command timeout)" in w.read_log(), 20,
                       "walbust's redis command timeout")
            wr.wait_more(300)
            assert w.alive()
        finally:
            rs.sigcont()
        frozen = time.time() - t0
        assert frozen > 5.0, f"redis was frozen only {frozen:.1f}s"
        assert rs.ping(), "redis does not answer after SIGCONT"
        wait_until(lambda: ACKED in w.read_log(), 40, "walbust to resume after SIGCONT")
        wr.set_pool(AFTER, fresh=True)
        wr.wait_more(300)
        wr.finish()
        barrier(DB, r)
        written = wr.written()
        print(f"# sigstop: redis frozen {frozen:.1f}s, {len(wr.txns)} transactions")
        assert_invalidated(r, written, ALL - written)
        assert w.stop() == 0
    finally:
        scene.close()


def main():
    runner = Runner("test_faults")
    for t in (test_kill9_walbust_mid_stream, test_redis_outage_refilled,
              test_redis_outage_aof_kill9, test_walsender_terminated,
              test_redis_frozen_past_command_timeout):
        runner.run(t)
    fresh_db(DB)  # drops the slot so it does not pin WAL
    runner.done()


if __name__ == "__main__":
    sys.exit(main())
