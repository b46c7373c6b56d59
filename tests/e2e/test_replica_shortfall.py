"""?replicas=N when the replica is away: a batch fewer replicas acknowledged
is never confirmed, and is sent again at least every 500 ms however long
the outage lasts (not after a backoff that grows to 30 s), so confirmation
resumes within about a second of the replica being back; meanwhile reading
goes on and new deletes reach the master with each retry (they are not held
until the replica is back).

Real servers: a Redis master and its replica (redis-server --replicaof),
walbust on redis://master/0?replicas=1. The replica is frozen with SIGSTOP
for 12 s; a row is updated at once (its batch is applied on the master,
then retried), and 3 s later another: its key too is gone from the master
within 6 s, every retry in the log is scheduled at most 500 ms ahead (at debug
level: the error line repeats at most every 10 s), the slot does
not confirm the update meanwhile, and after SIGCONT it does within 5 s,
with the key gone on master and replica.

Database walbust_replica_shortfall, slot replica_shortfall.
"""
import re
import time

from faultkit import RedisServer
from harness import (BARRIER_RULE, BARRIER_SQL, Runner, Walbust, fresh_db, slot_confirmed, sql,
                     wait_until, write_rules)

DB = "walbust_replica_shortfall"
SLOT = "replica_shortfall"
RULES = {"rules": [{"table": "items", "keys": ["rs:item:{id}"]}, BARRIER_RULE]}
OUTAGE_S = 12


def lsn_ge(a, b):
    return sql(DB, "SELECT %s::pg_lsn >= %s::pg_lsn", (a, b), fetch=True)[0][0]


def test_shortfall_retried_soon_and_confirmed_after():
    master = RedisServer().start()
    replica = RedisServer(extra=["--replicaof", "127.0.0.1", str(master.port)]).start()
    wb = None
    try:
        wait_until(lambda: replica.client(1).info("replication").get("master_link_status") == "up",
                   20, "the replica to sync")
        fresh_db(DB)
        sql(DB, "CREATE TABLE items(id int PRIMARY KEY, v int)")
        sql(DB, "INSERT INTO items SELECT g, 0 FROM generate_series(1, 10) g")
        sql(DB, BARRIER_SQL)
        sql(DB, "CREATE PUBLICATION walbust FOR TABLE items, walbust_barrier")
        wb = Walbust(DB, write_rules(RULES), slot=SLOT,
                     redis_urls=[f"redis://127.0.0.1:{master.port}/0?replicas=1"])
        wb.start().wait_streaming()
        m = master.client(2)

        m.set("rs:item:1", "cached")
        sql(DB, "UPDATE items SET v = 1 WHERE id = 1")
        wait_until(lambda: not m.exists("rs:item:1"), 20, "the first update to apply")

        replica.sigstop()
        stopped = time.time()
        m.set("rs:item:3", "cached")
        sql(DB, "UPDATE items SET v = 1 WHERE id = 3")  # its batch is retried from now on
        wait_until(lambda: not m.exists("rs:item:3"), 6, "the first delete to reach the master")
        time.sleep(3)
        m.set("rs:item:2", "cached")
        sql(DB, "UPDATE items SET v = 1 WHERE id = 2")
        lsn = sql(DB, "SELECT pg_current_wal_lsn()::text", fetch=True)[0][0]
        # Reading goes on while a batch is short of replicas: the delete
        # reaches the master with the next retry, long before the replica.
        wait_until(lambda: not m.exists("rs:item:2"), 6, "the delete to reach the master")
        time.sleep(max(0.0, stopped + OUTAGE_S - time.time()))
        confirmed = slot_confirmed(DB, SLOT) or "0/0"
        assert not lsn_ge(confirmed, lsn), f"confirmed {confirmed} past {lsn} without the replica"
        delays = [int(x) for x in re.findall(
            r"only 0 of the 1 replicas asked for \(replicas=1\) acknowledged the batch within "
            r"\d+ ms; it is not confirmed and will be sent again; retrying in (\d+) ms",
            wb.read_log())]
        assert len(delays) >= 4, f"retries during {OUTAGE_S} s: {delays}\n{wb.read_log()[-3000:]}"
        assert max(delays) <= 500, f"a retry was scheduled {max(delays)} ms ahead: {delays}"
        errors = [ln for ln in wb.read_log().splitlines()
                  if " error: " in ln and "replicas asked for" in ln]
        assert 1 <= len(errors) <= 2, f"{len(errors)} error lines in {OUTAGE_S} s (at most one " \
            f"per 10 s):\n" + "\n".join(errors)

        replica.sigcont()
        t0 = time.time()
        wait_until(lambda: lsn_ge(slot_confirmed(DB, SLOT) or "0/0", lsn), 5,
                   "the update to be confirmed once the replica is back")
        print(f"# {len(delays)} retries in {OUTAGE_S} s, confirmed {time.time() - t0:.2f} s after "
              f"SIGCONT", flush=True)
        assert not replica.client(2).exists("rs:item:2")
        assert wb.alive()
    finally:
        replica.sigcont()
        if wb is not None and wb.alive():
            wb.stop()
        replica.stop()
        master.stop()


def main():
    run = Runner("test_replica_shortfall")
    run.run(test_shortfall_retried_soon_and_confirmed_after)
    run.done()


if __name__ == "__main__":
    main()
