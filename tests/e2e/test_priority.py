"""A priority granted at start is yielded while catching up (cdc/prio.h,
docs/operations.md "A CPU-bound database host").

Each test stops walbust, writes a backlog of BACKLOG one-row commits, and
starts walbust again on it under a given nice value, sampling the nice
value of its streaming thread (the main thread: /proc/<pid>/stat, field
19) until the slot has confirmed the backlog, and then after one live
commit:

- started at nice -5 as root (CAP_SYS_NICE lets the thread return to -5),
  the thread is seen at nice 0 while it catches up and at -5 again once the
  live commit is applied; the log says so;
- started at nice 5 (nothing granted), the value never changes;
- started at nice -5 without CAP_SYS_NICE and with RLIMIT_NICE 0
  (`setpriv` drops the capability, `prlimit` sets the limit), the thread
  could not return to -5, so it keeps -5 throughout, and the log says how
  to let it yield (LimitNICE).

Every key of the backlog must be gone in each case. The tests need root
(CI runs them as root), which the first one checks and says.

Database walbust_prio, Redis db 7, slot prio.
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (BARRIER_RULE, BARRIER_SQL, REDIS_PORT, Runner, Walbust, barrier, connect,
                     fresh_db, redis_client, sql, wait_until, write_rules)

DB = "walbust_prio"
RDB = 7
SLOT = "prio"
BACKLOG = 40_000
RULES = {"rules": [{"table": "items", "keys": ["prio:{id}"]}, BARRIER_RULE]}


def setup():
    fresh_db(DB)
    sql(DB, "CREATE TABLE items(id int PRIMARY KEY, v int NOT NULL DEFAULT 0)")
    sql(DB, "INSERT INTO items SELECT g FROM generate_series(1, %s) g", (BACKLOG,))
    sql(DB, BARRIER_SQL)
    sql(DB, "CREATE PUBLICATION walbust FOR TABLE items, walbust_barrier")
    sql(DB, """CREATE PROCEDURE backlog(n int) LANGUAGE plpgsql AS $$
               BEGIN
                 FOR i IN 1..n LOOP
                   UPDATE items SET v = v + 1 WHERE id = i;
                   COMMIT;
                 END LOOP;
               END $$""")
    r = redis_client(RDB)
    r.flushdb()
    # Create the slot and let walbust confirm everything so far.
    w = walbust([]).start().wait_streaming()
    try:
        barrier(DB, r)
    finally:
        assert w.stop() == 0
    return r


def walbust(prefix):
    w = Walbust(DB, RULES_PATH, slot=SLOT, redis_urls=[f"redis://127.0.0.1:{REDIS_PORT}/{RDB}"])
    w.args = prefix + w.args
    return w


def nice_of(pid):
    """The nice value of pid's main thread (None once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    # the fields after the command name, which is in parentheses
    return int(text[text.rindex(")") + 2:].split()[16])


def drain_under(prefix):
    """Write a backlog, start walbust under `prefix` (a command that execs
    it at some nice value) and sample its streaming thread's nice value
    until the backlog is confirmed; then apply one live commit. Returns
    (the walbust, the values seen while catching up, the value after the
    live commit)."""
    r = redis_client(RDB)
    pipe = r.pipeline(transaction=False)
    for i in range(1, BACKLOG + 1):
        pipe.set(f"prio:{i}", "cached")
    pipe.execute()
    sql(DB, "CALL backlog(%s)", (BACKLOG,))
    end = sql(DB, "SELECT pg_current_wal_lsn()::text", fetch=True)[0][0]
    w = walbust(prefix).start()
    seen = []
    deadline = time.time() + 120
    conn = connect(DB)
    try:
        with conn.cursor() as cur:
            while time.time() < deadline:
                v = nice_of(w.proc.pid)
                assert v is not None, f"walbust exited:\n{w.read_log()}"
                seen.append(v)
                cur.execute("SELECT confirmed_flush_lsn >= %s::pg_lsn FROM pg_replication_slots "
                            "WHERE slot_name = %s", (end, SLOT))
                if cur.fetchone()[0]:
                    break
                time.sleep(0.002)
            else:
                raise AssertionError(f"the backlog was not confirmed in time:\n{w.read_log()}")
        left = [i for i in range(1, BACKLOG + 1, 97) if r.exists(f"prio:{i}")]
        assert left == [], f"keys of the backlog not invalidated: {left[:10]}"
        # A live commit: walbust follows live writes again.
        barrier(DB, r)
        time.sleep(0.1)
        barrier(DB, r)
        after = nice_of(w.proc.pid)
    except BaseException:
        w.stop()
        raise
    finally:
        conn.close()
    return w, seen, after


def test_granted_priority_is_yielded_while_catching_up():
    assert os.geteuid() == 0, ("this test starts walbust at nice -5 and needs root (CI runs the "
                               "tests as root); run it as root")
    w, seen, after = drain_under(["nice", "-n", "-5"])
    try:
        print(f"# nice values while catching up: {sorted(set(seen))} in {len(seen)} samples; "
              f"after a live commit: {after}", flush=True)
        assert 0 in seen, f"the streaming thread never yielded its priority: {sorted(set(seen))}"
        assert set(seen) <= {-5, 0}, f"unexpected nice values: {sorted(set(seen))}"
        wait_until(lambda: nice_of(w.proc.pid) == -5, 10,
                   "the streaming thread back at nice -5 once live")
        log = w.read_log()
        assert "the streaming thread goes to nice 0 while catching up" in log, log[-2000:]
    finally:
        assert w.stop() == 0


def test_positive_nice_is_left_alone():
    w, seen, after = drain_under(["nice", "-n", "5"])
    try:
        assert set(seen) == {5}, f"nice values seen at nice 5: {sorted(set(seen))}"
        assert after == 5, after
        assert "nice 0 while catching up" not in w.read_log()
    finally:
        assert w.stop() == 0


def test_priority_kept_when_it_could_not_be_taken_back():
    # nice first (root may lower it), then drop CAP_SYS_NICE from every set
    # and RLIMIT_NICE to 0: walbust could not return to -5 after yielding.
    w, seen, after = drain_under(["nice", "-n", "-5", "setpriv", "--inh-caps=-sys_nice",
                                  "--ambient-caps=-sys_nice", "--bounding-set=-sys_nice", "--",
                                  "prlimit", "--nice=0:0", "--"])
    try:
        assert set(seen) == {-5}, f"nice values seen: {sorted(set(seen))}"
        assert after == -5, after
        log = w.read_log()
        assert "also while catching up on a backlog" in log and "LimitNICE=25" in log, log[-2000:]
    finally:
        assert w.stop() == 0


RULES_PATH = None

if __name__ == "__main__":
    t = Runner("test_priority")
    RULES_PATH = write_rules(RULES)
    setup()
    t.run(test_granted_priority_is_yielded_while_catching_up)
    t.run(test_positive_nice_is_left_alone)
    t.run(test_priority_kept_when_it_could_not_be_taken_back)
    fresh_db(DB)
    t.done()
