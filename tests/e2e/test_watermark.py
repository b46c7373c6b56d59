"""The confirmed-position watermark walbust:confirmed:<slot> only moves
forward (redis/watermark.lua): a walbust at an older position than the
watermark (an HA standby catching up, a replay, an older instance) applies
and confirms as usual but never lowers it, so the lost-slot check and
walbust_caught_up readers never see it go back."""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (BARRIER_RULE, BARRIER_SQL, Runner, Walbust, barrier, connect, fresh_db,
                     redis_client, slot_confirmed, sql, wait_until, write_rules)

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


def pg_wal_layout(db):
    row = sql(db, "SELECT current_setting('wal_block_size')::bigint, "
              "pg_size_bytes(current_setting('wal_segment_size'))", fetch=True)[0]
    return int(row[0]), int(row[1])


def wait_caught_up(r, lsn, timeout, what):
    """Wait as walbust_caught_up readers do: the watermark at or past lsn."""
    wait_until(lambda: r.get(WM) is not None and lsn_int(r.get(WM)) >= lsn_int(lsn), timeout,
               f"the watermark to reach {lsn} ({what}; watermark {r.get(WM)})")


def test_watermark_reaches_insert_lsn_at_page_starts():
    """A reader waits for pg_current_wal_insert_lsn() taken after its COMMIT
    (docs/freshness.md). When the commit record ends exactly at a WAL page
    or segment boundary, that position is just past the next page's header,
    where no record ends: the walsender never sends it, and on an otherwise
    idle database the reader waited until some later WAL came along. The
    watermark must cover the header."""
    fresh_db(DB)
    sql(DB, "CREATE TABLE items(id bigint PRIMARY KEY, v int)")
    sql(DB, "CREATE PUBLICATION walbust FOR TABLE items")
    sql(DB, "INSERT INTO items SELECT g, 0 FROM generate_series(1, 5) g")
    rules = write_rules({"rules": [{"table": "items", "keys": ["wm:{id}"]}]})
    r = redis_client()
    r.delete(WM, MARK)
    block, segment = pg_wal_layout(DB)
    wb = Walbust(DB, rules, slot=SLOT).start().wait_streaming()
    try:
        # A segment switch: the next record starts after a long page header.
        sql(DB, "UPDATE items SET v = v + 1 WHERE id = 1")
        sql(DB, "SELECT pg_switch_wal()")
        lsn = sql(DB, "SELECT pg_current_wal_insert_lsn()::text", fetch=True)[0][0]
        assert lsn_int(lsn) % segment == 40, f"{lsn} is not just past a segment's header"
        wait_caught_up(r, lsn, 8, "after pg_switch_wal()")

        # A commit that ends exactly at a page boundary (about one in a
        # thousand): commit one-row updates until one does.
        conn = connect(DB)
        hit = None
        with conn.cursor() as cur:
            for n in range(50000):
                cur.execute("UPDATE items SET v = v + 1 WHERE id = 2")
                cur.execute("SELECT pg_current_wal_insert_lsn()::text")
                lsn = cur.fetchone()[0]
                if lsn_int(lsn) % block == 24:
                    hit = lsn
                    break
        conn.close()
        assert hit is not None, "no commit ended at a page boundary in 50,000"
        wait_caught_up(r, hit, 8, f"a commit ending at a page boundary, after {n + 1} commits")
        assert "refused" not in wb.read_log()
    finally:
        wb.stop()
        r.delete(WM, MARK)
        sql("postgres", "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
            "WHERE slot_name = %s AND NOT active", (SLOT,))


if __name__ == "__main__":
    t = Runner("test_watermark")
    t.run(test_older_position_does_not_lower_the_watermark)
    t.run(test_watermark_reaches_insert_lsn_at_page_starts)
    t.done()
