"""A silent network partition between walbust and PostgreSQL (TCP stays
up, no byte moves): walbust must notice on its own — it asks the server for
a reply after half of wal_sender_timeout of silence and reconnects when none
comes — instead of waiting on a dead connection until TCP gives up. The
partition is real: a loopback proxy (tests/faults/proxy.py) blackholes the
path and reports the bytes it held."""
import os
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "faults"))
from harness import (BARRIER_RULE, BARRIER_SQL, PGPORT, REDIS_PORT, Runner, Walbust, fresh_db,
                     redis_client, sql, wait_until, write_rules)
import proxy  # noqa: E402

DB = "partition"
SLOT = "partition"
RDB = 13


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_blackholed_postgres_is_detected_and_reconnected():
    fresh_db(DB)
    sql(DB, "CREATE TABLE items(id bigint PRIMARY KEY, v int)")
    sql(DB, BARRIER_SQL)
    sql(DB, "CREATE PUBLICATION walbust FOR TABLE items, walbust_barrier")
    rules = write_rules({"rules": [{"table": "items", "keys": ["part:{id}"]}, BARRIER_RULE]})
    r = redis_client(RDB)
    r.flushdb()
    listen, control = free_port(), free_port()
    px = subprocess.Popen([sys.executable, os.path.join(os.path.dirname(HERE), "faults", "proxy.py"),
                           str(listen), str(PGPORT), str(control)])
    sql("postgres", "ALTER SYSTEM SET wal_sender_timeout = '4s'")
    sql("postgres", "SELECT pg_reload_conf()")
    wb = None
    try:
        wait_until(lambda: _answers(control), 10, "the proxy to listen")
        wb = Walbust(DB, rules, slot=SLOT, redis_urls=[f"redis://127.0.0.1:{REDIS_PORT}/{RDB}"])
        wb.args[wb.args.index("--pg") + 1] = (f"host=127.0.0.1 port={listen} user=postgres "
                                              f"dbname={DB}")
        wb.start().wait_streaming()
        r.set("part:1", "cached")
        sql(DB, "INSERT INTO items VALUES (1, 1)")
        wait_until(lambda: not r.exists("part:1"), 20, "an invalidation through the proxy")

        proxy.command(control, "blackhole")
        t0 = time.time()
        wait_until(lambda: "not even an answer to a keepalive request" in wb.read_log(), 20,
                   "walbust to detect the silent connection")
        detected = time.time() - t0
        stats = proxy.command(control, "stats")
        assert stats["mode"] == "blackhole", stats
        proxy.command(control, "pass")
        # It reconnects by itself and streams again.
        wait_until(lambda: wb.read_log().count("streaming from") >= 2, 30, "a reconnect")
        r.set("part:2", "cached")
        sql(DB, "INSERT INTO items VALUES (2, 2)")
        wait_until(lambda: not r.exists("part:2"), 30, "an invalidation after the partition")
        assert wb.alive()
        print(f"# partition detected after {detected:.1f} s (wal_sender_timeout 4 s)")
        assert detected < 12, detected
        assert wb.stop() == 0
    finally:
        if wb is not None and wb.alive():
            wb.stop()
        px.terminate()
        px.wait(5)
        sql("postgres", "ALTER SYSTEM RESET wal_sender_timeout")
        sql("postgres", "SELECT pg_reload_conf()")
        for (slot,) in sql("postgres", "SELECT slot_name FROM pg_replication_slots WHERE "
                           "slot_name = %s AND NOT active", (SLOT,), fetch=True):
            sql("postgres", "SELECT pg_drop_replication_slot(%s)", (slot,))


def _answers(control):
    try:
        proxy.command(control, "stats", timeout=1)
        return True
    except OSError:
        return False


if __name__ == "__main__":
    t = Runner("test_partition")
    t.run(test_blackholed_postgres_is_detected_and_reconnected)
    t.done()
