"""A really lost slot (max_slot_wal_keep_size exceeded): walbust run refuses
with a runbook message by default, and with --on-slot-lost=flush-rules it
recreates the slot, invalidates everything the rules cover (widened), and
streams again. The loss is real: the test shrinks max_slot_wal_keep_size,
writes WAL past it, and waits until PostgreSQL reports wal_status=lost."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (BARRIER_RULE, BARRIER_SQL, Runner, Walbust, barrier, fresh_db, redis_client,
                     sql, wait_until, write_rules)

DB = "slot_lost"
SLOT = "lostslot"
RDB = 12


def lose_slot(db):
    sql("postgres", "ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'")
    sql("postgres", "SELECT pg_reload_conf()")
    try:
        sql(db, "CREATE TABLE IF NOT EXISTS junk(id serial, pad text)")
        for _ in range(40):
            status = sql("postgres", "SELECT wal_status FROM pg_replication_slots WHERE slot_name=%s",
                         (SLOT,), fetch=True)[0][0]
            if status == "lost":
                return
            sql(db, "INSERT INTO junk(pad) SELECT repeat('x', 1000) FROM generate_series(1, 3000)")
            sql(db, "SELECT pg_switch_wal()")
            sql(db, "CHECKPOINT")
        raise AssertionError(f"slot never became lost (wal_status={status})")
    finally:
        sql("postgres", "ALTER SYSTEM RESET max_slot_wal_keep_size")
        sql("postgres", "SELECT pg_reload_conf()")


def test_lost_slot_fail_then_flush_rules():
    fresh_db(DB)
    sql(DB, "CREATE TABLE items(id bigint PRIMARY KEY, v int)")
    sql(DB, BARRIER_SQL)
    sql(DB, "CREATE PUBLICATION walbust FOR TABLE items, walbust_barrier")
    rules = write_rules({"rules": [{"table": "items", "keys": ["item:{id}"]}, BARRIER_RULE]})
    url = f"redis://127.0.0.1:{os.environ.get('REDIS_PORT')}/{RDB}"
    r = redis_client(RDB)
    r.flushdb()

    wb = Walbust(DB, rules, slot=SLOT, redis_urls=[url]).start().wait_streaming()
    sql(DB, "INSERT INTO items VALUES (1, 1)")
    barrier(DB, r)
    assert wb.stop() == 0

    lose_slot(DB)
    lost = sql("postgres", "SELECT wal_status FROM pg_replication_slots WHERE slot_name=%s",
               (SLOT,), fetch=True)[0][0]
    assert lost == "lost", lost

    # Default: refuse, and say what happened and what to do.
    wb = Walbust(DB, rules, slot=SLOT, redis_urls=[url]).start()
    wait_until(lambda: wb.proc.poll() is not None, 20, "walbust to exit on a lost slot")
    assert wb.proc.returncode == 1, wb.proc.returncode
    log = wb.read_log()
    assert "is lost" in log and "pg_drop_replication_slot" in log, log
    wb.log.close()

    # Cached entries written while walbust was away may be stale.
    for i in range(1, 51):
        r.set(f"item:{i}", "stale")
    r.set("other:1", "keep")

    wb = Walbust(DB, rules, slot=SLOT, redis_urls=[url],
                 extra=["--on-slot-lost", "flush-rules"]).start().wait_streaming()
    wait_until(lambda: not any(r.exists(f"item:{i}") for i in range(1, 51)), 20,
               "every item key to be flushed")
    assert r.get("other:1") == "keep", "flush-rules must only touch what the rules cover"
    log = wb.read_log()
    assert "recreated lost slot" in log, log
    status = sql("postgres", "SELECT wal_status FROM pg_replication_slots WHERE slot_name=%s",
                 (SLOT,), fetch=True)[0][0]
    assert status != "lost", status

    # Streaming works again on the new slot.
    r.set("item:7", "cached")
    sql(DB, "UPDATE items SET v = 2 WHERE id = 1")
    sql(DB, "INSERT INTO items VALUES (7, 7)")
    wait_until(lambda: not r.exists("item:7"), 20, "item:7 invalidated on the new slot")
    assert wb.stop() == 0
    sql("postgres", "SELECT pg_drop_replication_slot(%s)", (SLOT,))


if __name__ == "__main__":
    t = Runner("test_slot_lost")
    t.run(test_lost_slot_fail_then_flush_rules)
    t.done()
