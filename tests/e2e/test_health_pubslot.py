"""Health tells the truth about the publication and the slot: /readyz is 503
with the reason, and walbust_condition{condition="publication"|"slot"} is 0,
while the publication is dropped under a running walbust, or while the slot
is missing and walbust waits (Redis cannot tell a first use from a lost
slot); both clear once the publication or the slot is back, and
invalidations flow again."""
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (BARRIER_RULE, BARRIER_SQL, Runner, Walbust, barrier, free_port, fresh_db,
                     readyz, scrape, slot_confirmed, sql, wait_until, write_rules)
from test_health import PrivateRedis

DB = "health_pubslot"


def setup_db():
    fresh_db(DB)
    sql(DB, "CREATE TABLE items(id bigint PRIMARY KEY, v int)")
    sql(DB, BARRIER_SQL)
    sql(DB, "CREATE PUBLICATION walbust FOR TABLE items, walbust_barrier")
    sql(DB, "INSERT INTO items SELECT g, 0 FROM generate_series(1, 5) g")
    return write_rules({"rules": [{"table": "items", "keys": ["ps:{id}"]}, BARRIER_RULE]})


def start(rules, rport, slot):
    mport = free_port()
    wb = Walbust(DB, rules, slot=slot, redis_urls=[f"redis://127.0.0.1:{rport}"],
                 extra=["--schema-recheck", "1"])
    wb.args[wb.args.index("--metrics") + 1] = f"127.0.0.1:{mport}"
    return wb.start(), mport


def readyz_soon(mport):
    """readyz(), or (0, "") before the metrics server listens."""
    try:
        return readyz(mport)
    except OSError:
        return 0, ""


def not_ready(mport, line, timeout=30):
    """Wait for /readyz 503 with a line starting with `line`; returns the body."""
    status, body = wait_until(
        lambda: (lambda s: s if s[0] == 503 and any(ln.startswith(line) for ln in
                                                    s[1].splitlines()) else None)(
            readyz_soon(mport)), timeout, f"/readyz 503 with a line {line!r}")
    return body


def ready(mport, what, timeout=30):
    wait_until(lambda: readyz(mport)[0] == 200, timeout, f"/readyz 200 {what}")
    m = scrape(mport)
    assert m["walbust_ready"] == 1, m
    assert m['walbust_condition{condition="publication"}'] == 1, m
    assert m['walbust_condition{condition="slot"}'] == 1, m


def cleanup(wb, rd, slot):
    if wb.alive():
        wb.proc.send_signal(signal.SIGKILL)
        wb.proc.wait(10)
    rd.stop()
    sql("postgres", "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
        "WHERE slot_name = %s AND NOT active", (slot,))


def test_publication_dropped_is_not_ready():
    """DROP PUBLICATION under a running, idle walbust: not ready (naming the
    publication) while it is missing; re-created before anything was
    written, ready again and invalidating."""
    slot = "health_pub"
    rules = setup_db()
    rd = PrivateRedis("health-redis-pub").start()
    r = rd.admin
    wb, mport = start(rules, rd.port, slot)
    try:
        wb.wait_streaming()
        ready(mport, "while streaming")
        sql(DB, "DROP PUBLICATION walbust")
        body = not_ready(mport, "publication: ")
        assert 'publication "walbust" does not exist' in body, body
        assert "walbust setup" in body, body
        m = scrape(mport)
        assert m['walbust_condition{condition="publication"}'] == 0, m
        assert m["walbust_ready"] == 0 and m["walbust_postgres_up"] == 1, m
        assert wb.alive(), wb.read_log()

        sql(DB, "CREATE PUBLICATION walbust FOR TABLE items, walbust_barrier")
        ready(mport, "once the publication is back")
        r.set("ps:3", "cached")
        sql(DB, "UPDATE items SET v = 1 WHERE id = 3")
        wait_until(lambda: not r.exists("ps:3"), 20, "ps:3 invalidated after the publication is back")
        barrier(DB, r)
        assert 'publication "walbust" does not exist' in wb.read_log(), wb.read_log()
        assert wb.stop() == 0, wb.read_log()
    finally:
        cleanup(wb, rd, slot)


def test_slot_missing_while_waiting_is_not_ready():
    """No slot yet and Redis unreachable, so walbust cannot tell a first use
    from a lost slot and waits (even with --create-slot): not ready, naming
    the slot; once Redis is up the slot is created and walbust is ready."""
    slot = "health_slot"
    rules = setup_db()
    rd = PrivateRedis("health-redis-slot")  # not started yet
    wb, mport = start(rules, rd.port, slot)
    try:
        body = not_ready(mport, "slot: ")
        assert f'replication slot "{slot}" does not exist' in body, body
        assert "waiting for redis" in body, body
        m = scrape(mport)
        assert m['walbust_condition{condition="slot"}'] == 0, m
        assert m["walbust_ready"] == 0, m
        assert slot_confirmed(DB, slot) is None, "the slot was created without the evidence"

        rd.start()
        ready(mport, "once redis answers and the slot is created", timeout=60)
        assert slot_confirmed(DB, slot) is not None
        r = rd.admin
        r.set("ps:2", "cached")
        sql(DB, "UPDATE items SET v = 2 WHERE id = 2")
        wait_until(lambda: not r.exists("ps:2"), 20, "ps:2 invalidated")
        assert wb.stop() == 0, wb.read_log()
    finally:
        cleanup(wb, rd, slot)


if __name__ == "__main__":
    t = Runner("test_health_pubslot")
    t.run(test_publication_dropped_is_not_ready)
    t.run(test_slot_missing_while_waiting_is_not_ready)
    t.done()
