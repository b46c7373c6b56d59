"""Slot and publication lifecycle (docs/guarantees.md): a slot that walbust streamed
from and that is now missing or re-created is a lost slot, whatever
--create-slot says; it follows --on-slot-lost, and the log names the WAL
range that was lost. A publication dropped and re-created while walbust runs
stops it with a true message instead of a reconnect loop.

Every case runs against the real stack and asserts the Redis state (stale
keys stay until walbust flushes them; the watermark) and the slot's
confirmed position. Database slot_life, Redis db 10 (and a redis-server of
its own for the Redis pause), slot lifeslot.
"""
import os
import re
import signal
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (BARRIER_RULE, BARRIER_SQL, REDIS_PORT, Runner, Walbust, barrier, fresh_db,
                     redis_client, slot_confirmed, sql, wait_until, write_rules)
from faultkit import RedisServer

DB = "slot_life"
SLOT = "lifeslot"
RDB = 10
URL = f"redis://127.0.0.1:{REDIS_PORT}/{RDB}"
WM = f"walbust:confirmed:{SLOT}"
MARK = f"walbust:slot:{SLOT}"
RULES = {"rules": [{"table": "items", "keys": ["item:{id}"]}, BARRIER_RULE]}


def lsn_int(text):
    hi, lo = text.split("/")
    return (int(hi, 16) << 32) | int(lo, 16)


def slot_exists():
    return bool(sql("postgres", "SELECT 1 FROM pg_replication_slots WHERE slot_name = %s",
                    (SLOT,), fetch=True))


def drop_slot():
    """Drop the slot, terminating a walsender that holds it first."""
    deadline = time.time() + 20
    while True:
        rows = sql("postgres", "SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s",
                   (SLOT,), fetch=True)
        if not rows:
            return
        if rows[0][0] is None:
            try:
                sql("postgres", "SELECT pg_drop_replication_slot(%s)", (SLOT,))
                return
            except Exception:
                if time.time() > deadline:
                    raise
        else:
            sql("postgres", "SELECT pg_terminate_backend(%s)", (rows[0][0],))
        time.sleep(0.05)


def create_slot_by_hand():
    return sql(DB, "SELECT lsn::text FROM pg_create_logical_replication_slot(%s, 'pgoutput')",
               (SLOT,), fetch=True)[0][0]


def setup():
    kill_leftovers()
    fresh_db(DB)
    sql(DB, "CREATE TABLE items(id bigint PRIMARY KEY, v int)")
    sql(DB, BARRIER_SQL)
    sql(DB, "CREATE PUBLICATION walbust FOR TABLE items, walbust_barrier")
    sql(DB, "INSERT INTO items SELECT g, 0 FROM generate_series(1, 20) g")
    r = redis_client(RDB)
    r.flushdb()
    return write_rules(RULES), r


STARTED = []


def walbust(rules, create_slot=True, on_lost=None, url=URL):
    extra = ["--on-slot-lost", on_lost] if on_lost else []
    wb = Walbust(DB, rules, slot=SLOT, redis_urls=[url], create_slot=create_slot, extra=extra)
    STARTED.append(wb)
    return wb


def kill_leftovers():
    """A failed test must not leave its walbust holding the slot."""
    for wb in STARTED:
        if wb.alive():
            wb.proc.send_signal(signal.SIGCONT)
            wb.proc.kill()
            wb.proc.wait(10)
    STARTED.clear()


def first_run(rules, r):
    """walbust streams from a fresh slot (first use: --create-slot creates
    it), applies a change, and stops. Returns the watermark it left."""
    wb = walbust(rules).start().wait_streaming()
    assert "created replication slot" in wb.read_log(), wb.read_log()
    r.set("item:1", "cached")
    sql(DB, "UPDATE items SET v = 1 WHERE id = 1")
    wait_until(lambda: not r.exists("item:1"), 20, "item:1 invalidated")
    barrier(DB, r)
    assert wb.stop() == 0
    wm = r.get(WM)
    assert wm is not None, "no watermark after a clean stop"
    assert r.get(MARK) and r.get(MARK).startswith("v1 system="), r.get(MARK)
    # The slot never holds a position the watermark does not.
    assert lsn_int(slot_confirmed(DB, SLOT)) <= lsn_int(wm), (slot_confirmed(DB, SLOT), wm)
    return wm


def run_to_exit(wb, timeout=30):
    wb.start()
    try:
        wb.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        wb.proc.kill()
        wb.proc.wait()
        raise AssertionError(f"walbust did not exit within {timeout}s:\n{wb.read_log()}")
    wb.log.close()
    return wb.proc.returncode, wb.read_log()


def assert_lost_message(log, wm, what):
    assert what in log, f"expected {what!r}:\n{log}"
    m = re.search(r"the WAL from ([0-9A-F]+/[0-9A-F]+) \(the last position walbust confirmed\) "
                  r"to ([0-9A-F]+/[0-9A-F]+)", log)
    assert m, f"no WAL range in the log:\n{log}"
    assert lsn_int(m.group(1)) == lsn_int(wm), (m.group(1), wm)
    assert lsn_int(m.group(2)) > lsn_int(wm), m.groups()
    assert "--on-slot-lost flush-rules" in log and "runbook: lost slot" in log, log
    return lsn_int(m.group(2))


def flush_rules_recovers(rules, r, stale_ids):
    """--on-slot-lost flush-rules: slot recreated, every key the rules
    cover flushed, the watermark moved to the new slot's start, streaming."""
    for i in stale_ids:
        r.set(f"item:{i}", "stale")
    r.set("other:1", "keep")
    wb = walbust(rules, on_lost="flush-rules").start().wait_streaming()
    wait_until(lambda: not any(r.exists(f"item:{i}") for i in stale_ids), 20,
               "stale keys to be flushed")
    assert r.get("other:1") == "keep", "flush-rules touched a key no rule covers"
    log = wb.read_log()
    assert "recreated lost slot" in log, log
    start = re.search(r'recreated lost slot "lifeslot" at ([0-9A-F]+/[0-9A-F]+)', log).group(1)
    assert lsn_int(r.get(WM)) >= lsn_int(start), (r.get(WM), start)
    assert slot_exists()
    r.set("item:7", "cached")
    sql(DB, "UPDATE items SET v = v + 1 WHERE id = 7")
    wait_until(lambda: not r.exists("item:7"), 20, "item:7 invalidated on the new slot")
    barrier(DB, r)
    assert wb.stop() == 0
    assert lsn_int(slot_confirmed(DB, SLOT)) <= lsn_int(r.get(WM))
    # And the next start accepts the recreated slot as walbust's own.
    wb = walbust(rules).start().wait_streaming()
    assert "is lost" not in wb.read_log() and "never applied" not in wb.read_log()
    assert wb.stop() == 0


def test_dropped_while_stopped():
    rules, r = setup()
    wm = first_run(rules, r)
    drop_slot()
    r.set("item:2", "cached")
    sql(DB, "UPDATE items SET v = 2 WHERE id = 2")  # lost: no slot sees it

    for create in (True, False):
        rc, log = run_to_exit(walbust(rules, create_slot=create))
        assert rc == 1, f"--create-slot={create}: exit {rc}:\n{log}"
        assert_lost_message(log, wm, 'replication slot "lifeslot" does not exist although '
                                     'walbust streamed from it before')
        assert not slot_exists(), f"--create-slot={create} created a slot over a lost one"
        assert r.get("item:2") == "cached", "nothing may be applied from a lost slot"
        assert r.get(WM) == wm, "the watermark moved although nothing was streamed"

    flush_rules_recovers(rules, r, [2, 3, 4])


def test_recreated_while_stopped():
    rules, r = setup()
    wm = first_run(rules, r)
    drop_slot()
    sql(DB, "UPDATE items SET v = 3 WHERE id = 3")
    start = create_slot_by_hand()  # e.g. `walbust setup`, or an operator
    rc, log = run_to_exit(walbust(rules))
    assert rc == 1, f"exit {rc}:\n{log}"
    to = assert_lost_message(log, wm, "starts past the last position walbust confirmed")
    assert to == lsn_int(start), (to, start)
    assert slot_confirmed(DB, SLOT) == start, "the re-created slot was used"
    flush_rules_recovers(rules, r, [3, 5])


def test_dropped_while_paused():
    """SIGSTOP walbust, drop its slot (terminating the walsender), write,
    SIGCONT: walbust finds the slot missing and does not recreate it,
    although it runs with --create-slot."""
    rules, r = setup()
    first_run(rules, r)
    wb = walbust(rules).start().wait_streaming()
    barrier(DB, r)
    wait_until(lambda: r.get(WM) and lsn_int(r.get(WM)) >= lsn_int(slot_confirmed(DB, SLOT)),
               20, "the watermark to cover the slot")
    wb.proc.send_signal(signal.SIGSTOP)
    try:
        wm = r.get(WM)
        drop_slot()
        r.set("item:4", "cached")
        sql(DB, "UPDATE items SET v = 4 WHERE id = 4")
    finally:
        wb.proc.send_signal(signal.SIGCONT)
    wait_until(lambda: wb.proc.poll() is not None, 30, "walbust to stop on the lost slot")
    assert wb.proc.returncode == 1, wb.proc.returncode
    wb.log.close()
    log = wb.read_log()
    assert_lost_message(log, r.get(WM), "does not exist although walbust streamed from it")
    assert lsn_int(r.get(WM)) >= lsn_int(wm)
    assert not slot_exists(), "--create-slot recreated a lost slot"
    assert r.get("item:4") == "cached"
    flush_rules_recovers(rules, r, [4])


def test_dropped_while_paused_on_redis():
    """walbust pauses because Redis stops answering (SIGSTOP of redis-server:
    the batch times out and is retried); meanwhile the slot is dropped.
    When Redis answers again, walbust applies the held batch, finds the slot
    gone and stops: it does not recreate it although it runs with
    --create-slot."""
    rules, _ = setup()
    rs = RedisServer().start()
    try:
        r = rs.client()
        wb = walbust(rules, url=rs.url()).start().wait_streaming()
        barrier(DB, r)
        wait_until(lambda: r.get(WM) and lsn_int(r.get(WM)) >= lsn_int(slot_confirmed(DB, SLOT)),
                   20, "the watermark to cover the slot")
        wm = r.get(WM)
        r.set("item:3", "cached")
        r.set("item:4", "cached")
        rs.sigstop()
        try:
            sql(DB, "UPDATE items SET v = 3 WHERE id = 3")  # held in walbust's batch
            wait_until(lambda: "redis target" in wb.read_log() and "failed" in wb.read_log(), 30,
                       "walbust to pause on redis")
            drop_slot()
            sql(DB, "UPDATE items SET v = 4 WHERE id = 4")  # no slot sees it
        finally:
            rs.sigcont()
        wait_until(lambda: wb.proc.poll() is not None, 60, "walbust to stop on the lost slot")
        wb.log.close()
        log = wb.read_log()
        assert wb.proc.returncode == 1, f"exit {wb.proc.returncode}:\n{log}"
        assert_lost_message(log, r.get(WM), "does not exist although walbust streamed from it")
        assert lsn_int(r.get(WM)) >= lsn_int(wm)
        assert not slot_exists(), "--create-slot recreated a lost slot"
        assert not r.exists("item:3"), "the batch held while redis was paused was not applied"
        assert r.get("item:4") == "cached", "a change no slot saw cannot have been applied"
    finally:
        kill_leftovers()
        rs.stop()


def test_evidence_not_readable_is_fatal():
    """A Redis ACL user without GET/SET on the watermark and the mark:
    walbust cannot tell its slot from a new one, so it exits 1 with the
    grant instead of streaming and never confirming."""
    rules, r = setup()
    user, secret = "walbust_life", "life-secret"
    r.execute_command("ACL", "SETUSER", user, "reset", "on", f">{secret}", "~item:*", "~barrier:*",
                      "-@all", "+ping", "+select", "+unlink", "+scan", "+incr", "+set")
    try:
        url = f"redis://{user}:{secret}@127.0.0.1:{REDIS_PORT}/{RDB}"
        rc, log = run_to_exit(walbust(rules, url=url))
        assert rc == 1, f"exit {rc}:\n{log}"
        assert "NOPERM" in log and f"(+get +set +eval +watch +unwatch +multi +exec ~{WM} ~{MARK})" in log, log
        assert "docs/security.md" in log, log
    finally:
        r.execute_command("ACL", "DELUSER", user)


def test_recreated_while_paused_flush_rules():
    """Paused (SIGSTOP) while the slot is dropped and re-created by someone
    else: with --on-slot-lost flush-rules walbust flushes and goes on."""
    rules, r = setup()
    first_run(rules, r)
    wb = walbust(rules, on_lost="flush-rules").start().wait_streaming()
    barrier(DB, r)
    for i in range(1, 11):
        r.set(f"item:{i}", "cached")
    wb.proc.send_signal(signal.SIGSTOP)
    try:
        drop_slot()
        sql(DB, "UPDATE items SET v = 5 WHERE id = 5")  # seen by no slot
        start = create_slot_by_hand()
    finally:
        wb.proc.send_signal(signal.SIGCONT)
    wait_until(lambda: not any(r.exists(f"item:{i}") for i in range(1, 11)), 30,
               "every item key to be flushed")
    log = wb.read_log()
    assert "starts past the last position walbust confirmed" in log, log
    assert "recreated lost slot" in log, log
    assert wb.alive()
    r.set("item:9", "cached")
    sql(DB, "UPDATE items SET v = 9 WHERE id = 9")
    wait_until(lambda: not r.exists("item:9"), 20, "item:9 invalidated on the new slot")
    barrier(DB, r)
    # confirmed to PostgreSQL a few ms after Redis acknowledged the barrier
    wait_until(lambda: lsn_int(slot_confirmed(DB, SLOT)) > lsn_int(start), 10,
               "the new slot to be confirmed past its start")
    assert wb.stop() == 0
    assert lsn_int(slot_confirmed(DB, SLOT)) <= lsn_int(r.get(WM))


def test_kill9_is_not_a_lost_slot():
    """The watermark is written before PostgreSQL hears of a position, so a
    walbust killed at any moment under load never finds its own slot ahead
    of the watermark."""
    rules, r = setup()
    first_run(rules, r)
    stop = threading.Event()

    def writer():
        i = 0
        while not stop.is_set():
            i += 1
            sql(DB, "UPDATE items SET v = v + 1 WHERE id = %s", (i % 20 + 1,))

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    try:
        for _ in range(6):
            wb = walbust(rules).start().wait_streaming()
            time.sleep(0.3 + 0.2 * (time.time() % 1))
            wb.kill9()
            c, wm = slot_confirmed(DB, SLOT), r.get(WM)
            assert lsn_int(c) <= lsn_int(wm), f"slot {c} ahead of the watermark {wm}"
    finally:
        stop.set()
        t.join(10)
    wb = walbust(rules).start().wait_streaming()
    barrier(DB, r)
    assert wb.stop() == 0
    assert "never applied" not in wb.read_log(), wb.read_log()


def test_publication_recreated_while_running():
    """DROP PUBLICATION, a change, CREATE PUBLICATION: the slot can never
    decode that change. walbust stops within seconds with the true reason
    (not a reconnect loop saying the publication does not exist), leaves
    the slot where it was, and --on-slot-lost flush-rules recovers."""
    rules, r = setup()
    first_run(rules, r)
    wb = walbust(rules).start().wait_streaming()
    barrier(DB, r)
    before = slot_confirmed(DB, SLOT)
    sql(DB, "DROP PUBLICATION walbust")
    sql(DB, "UPDATE items SET v = 6 WHERE id = 6")
    sql(DB, "CREATE PUBLICATION walbust FOR TABLE items, walbust_barrier")
    r.set("item:8", "cached")
    sql(DB, "UPDATE items SET v = 8 WHERE id = 8")
    t0 = time.time()
    wait_until(lambda: wb.proc.poll() is not None, 30, "walbust to stop")
    took = time.time() - t0
    wb.log.close()
    log = wb.read_log()
    assert wb.proc.returncode == 1, f"exit {wb.proc.returncode}:\n{log}"
    assert 'cannot decode the change at' in log and 'publication "walbust" did not exist' in log, log
    assert "--on-slot-lost flush-rules" in log, log
    ends = log.count("replication stream from")
    assert ends <= 3, f"{ends} stream failures before stopping (a reconnect loop?):\n{log}"
    print(f"# publication re-created: stopped after {took:.1f}s, {ends} stream failure(s)")
    assert r.get("item:8") == "cached", "a change after the gap was applied and confirmed"
    assert lsn_int(slot_confirmed(DB, SLOT)) <= lsn_int(before) or \
        lsn_int(slot_confirmed(DB, SLOT)) <= lsn_int(r.get(WM))
    flush_rules_recovers(rules, r, [6, 8])


if __name__ == "__main__":
    t = Runner("test_slot_lifecycle")
    for fn in (test_dropped_while_stopped, test_recreated_while_stopped, test_dropped_while_paused,
               test_dropped_while_paused_on_redis, test_recreated_while_paused_flush_rules,
               test_evidence_not_readable_is_fatal, test_kill9_is_not_a_lost_slot,
               test_publication_recreated_while_running):
        t.run(fn)
    kill_leftovers()
    t.done()
