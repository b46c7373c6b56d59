"""The confirmed-position watermark walbust:confirmed:<slot> only moves
forward (redis/watermark.lua): a walbust at an older position than the
watermark (an HA standby catching up, a replay, an older instance) applies
and confirms as usual but never lowers it, so the lost-slot check and
walbust_caught_up readers never see it go back."""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (BARRIER_RULE, BARRIER_SQL, Runner, Walbust, barrier, fresh_db, redis_client,
                     slot_confirmed, sql, wait_until, write_rules)

DB = "watermark_e2e"
SLOT = "watermark_e2e"
WM = f"walbust:confirmed:{SLOT}"
MARK = f"walbust:slot:{SLOT}"


def lsn_int(text):
    hi, lo = text.split("/")
    return (int(hi, 16) << 32) | int(lo, 16)


def test_older_position_does_not_lower_the_watermark():
    fresh_db(DB)
    sql(DB, "CREATE TABLE items(id bigint PRIMARY KEY, v int)")
    sql(DB, BARRIER_SQL)
    sql(DB, "CREATE PUBLICATION walbust FOR TABLE items, walbust_barrier")
    sql(DB, "INSERT INTO items SELECT g, 0 FROM generate_series(1, 5) g")
    rules = write_rules({"rules": [{"table": "items", "keys": ["wm:{id}"]}, BARRIER_RULE]})
    r = redis_client()
    r.delete(WM, MARK)

    # A first run writes the watermark and the mark as usual.
    wb = Walbust(DB, rules, slot=SLOT).start().wait_streaming()
    barrier(DB, r)
    assert wb.stop() == 0, wb.read_log()
    first = r.get(WM)
    assert first is not None and lsn_int(first) > 0, first

    # A newer instance (by hand) moved the watermark far ahead.
    ahead = "FF/10"
    r.set(WM, ahead)
    wb = Walbust(DB, rules, slot=SLOT).start().wait_streaming()
    try:
        before = slot_confirmed(DB, SLOT)
        for i in range(1, 4):
            r.set(f"wm:{i}", "cached")
            sql(DB, "UPDATE items SET v = v + 1 WHERE id = %s", (i,))
        barrier(DB, r)
        for i in range(1, 4):
            assert not r.exists(f"wm:{i}"), f"wm:{i} survived"
        # It applies and confirms as usual (the slot moves on) ...
        wait_until(lambda: lsn_int(slot_confirmed(DB, SLOT)) > lsn_int(before), 20,
                   "the slot to advance")
        time.sleep(0.5)  # several watermark writes would have happened by now
        assert r.get(WM) == ahead, r.get(WM)
        assert wb.stop() == 0, wb.read_log()
        # ... and neither the batches nor the clean stop lowered the watermark.
        assert r.get(WM) == ahead, r.get(WM)
        log = wb.read_log()
        assert "refused" not in log and "failed" not in log, log
    finally:
        if wb.alive():
            wb.stop()
        r.delete(WM, MARK)
        sql("postgres", "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
            "WHERE slot_name = %s AND NOT active", (SLOT,))


if __name__ == "__main__":
    t = Runner("test_watermark")
    t.run(test_older_position_does_not_lower_the_watermark)
    t.done()
