"""Bad input gets a clear error (docs/cli.md: what failed, the value involved,
what to do; passwords never shown).

Each test provokes one misconfiguration against real servers and asserts
walbust's exit code and the text an operator would read. Database
walbust_errors, Redis db 12, slots errors_*; wal_level=replica needs its own
throwaway PostgreSQL cluster (initdb, like scripts/stack).
"""
import json
import re
import signal
import subprocess
import sys
import time

from harness import (BARRIER_RULE, BARRIER_SQL, BIN, PGHOST, PGPORT, REDIS_PORT, Runner, Walbust,
                     barrier, dsn, fresh_db, redis_client, sql, wait_until, write_rules)
from faultkit import PgCluster, free_port, port_closed

DB = "walbust_errors"
RDB = 12
REDIS_URL = f"redis://127.0.0.1:{REDIS_PORT}/{RDB}"
RULES = {"rules": [{"table": "items", "keys": ["err:item:{id}"]}, BARRIER_RULE]}


def setup_db(publication=True):
    fresh_db(DB)
    sql(DB, "CREATE TABLE items(id bigint PRIMARY KEY, v int)")
    sql(DB, BARRIER_SQL)
    if publication:
        sql(DB, "CREATE PUBLICATION walbust FOR TABLE items, walbust_barrier")
    return write_rules(RULES)


def walbust(rules, pg=None, slot="errors", redis_urls=None, **kw):
    """A Walbust whose --pg is `pg` (default: the test database)."""
    w = Walbust(DB, rules, slot=slot, redis_urls=redis_urls or [REDIS_URL], **kw)
    if pg is not None:
        w.args[w.args.index("--pg") + 1] = pg
    return w


def run_to_exit(w, timeout=30):
    """Start w, wait for it to exit by itself; return (returncode, log)."""
    w.start()
    try:
        w.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        w.proc.kill()
        w.proc.wait()
        raise AssertionError(f"walbust did not exit within {timeout}s:\n{w.read_log()}")
    w.log.close()
    return w.proc.returncode, w.read_log()


def assert_in(needle, log):
    assert needle in log, f"expected {needle!r} in walbust's output:\n{log}"


def test_postgres_unreachable_retries():
    rules = write_rules(RULES)
    port = free_port()
    assert port_closed(port)
    w = walbust(rules, pg=f"host=127.0.0.1 port={port} user=postgres dbname=nowhere").start()
    try:
        want = f"could not connect to postgresql at 127.0.0.1:{port}"
        wait_until(lambda: len(re.findall(re.escape(want) + r".*retrying in \d+ ms", w.read_log())) >= 3,
                   20, "three connection retries")
        assert w.alive(), f"walbust gave up:\n{w.read_log()}"
        print(f"# unreachable: {w.read_log().splitlines()[-1]}")
    finally:
        rc = w.stop()
    assert rc == 0, f"SIGTERM while retrying should exit 0, got {rc}"
    assert_in("stopped", w.read_log())


def test_wal_level_replica():
    rules = write_rules(RULES)
    pg = PgCluster({"wal_level": "replica"})
    try:
        pg.start()
        assert sql_on(pg.dsn(), "SHOW wal_level") == "replica"
        rc, log = run_to_exit(walbust(rules, pg=pg.dsn()))
        p = subprocess.run([BIN, "check", "--rules", rules, "--pg", pg.dsn()], capture_output=True,
                           text=True, timeout=60)
        rc_check, check = p.returncode, p.stdout + p.stderr
    finally:
        pg.stop()
    assert rc == 1, f"exit {rc}:\n{log}"
    assert_in('wal_level is "replica"', log)
    assert_in("wal_level=logical", log)
    assert_in("restart", log)
    # check --pg looks at it too, before anything else would fail.
    assert rc_check == 1, f"check exit {rc_check}:\n{check}"
    assert_in('wal_level is "replica"', check)
    assert_in("wal_level=logical", check)


def sql_on(conninfo, query):
    import psycopg2
    conn = psycopg2.connect(conninfo)
    try:
        with conn.cursor() as cur:
            cur.execute(query)
            return cur.fetchone()[0]
    finally:
        conn.close()


def test_missing_publication():
    rules = setup_db(publication=False)
    rc, log = run_to_exit(walbust(rules))
    assert rc == 1, f"exit {rc}:\n{log}"
    assert_in('publication "walbust" does not exist', log)
    assert_in("CREATE PUBLICATION walbust", log)
    assert_in("walbust setup", log)


def test_missing_slot_without_create_slot():
    rules = setup_db()
    rc, log = run_to_exit(walbust(rules, slot="errors_missing", create_slot=False))
    assert rc == 1, f"exit {rc}:\n{log}"
    assert_in('replication slot "errors_missing" does not exist', log)
    assert_in("--create-slot", log)
    assert not sql(DB, "SELECT 1 FROM pg_replication_slots WHERE slot_name = 'errors_missing'",
                   fetch=True), "the slot was created without --create-slot"


def test_role_without_replication():
    rules = setup_db()
    sql(DB, "DROP ROLE IF EXISTS norepl")
    sql(DB, "CREATE ROLE norepl LOGIN")
    try:
        pg = f"host={PGHOST} port={PGPORT} user=norepl dbname={DB}"
        rc, log = run_to_exit(walbust(rules, pg=pg))
    finally:
        sql(DB, "DROP ROLE norepl")
    assert rc == 1, f"exit {rc}:\n{log}"
    assert_in("replication role", log)
    assert_in("ALTER ROLE norepl REPLICATION", log)


def test_malformed_rules_file():
    path = write_rules({})
    text = '{\n  "rules": [\n    {"table": "items", "keys": ["a:{id}"],,}\n  ]\n}\n'
    with open(path, "w") as f:
        f.write(text)
    col = text.splitlines()[2].index(",,") + 2  # 1-based column of the second comma
    for cmd in (["run", "--metrics", "off"], ["check"]):
        p = subprocess.run([BIN] + cmd + ["--rules", path, "--pg", dsn(DB)],
                           capture_output=True, text=True, timeout=30)
        out = p.stdout + p.stderr
        assert p.returncode == 1, f"walbust {cmd[0]}: exit {p.returncode}:\n{out}"
        assert re.search(rf"^{re.escape(path)}:3:{col}: .*JSON", out, re.M), \
            f"walbust {cmd[0]}: no {path}:3:{col}: location in:\n{out}"


def test_password_never_logged():
    rules = write_rules(RULES)
    pgport, rport = free_port(), free_port()
    cases = [
        (f"host=127.0.0.1 port={pgport} user=postgres password=sekrit dbname=x",
         f"redis://:sekrit@127.0.0.1:{rport}", "text"),
        (f"postgresql://postgres:sekrit@127.0.0.1:{pgport}/x",
         f"redis://walbust:sekrit@127.0.0.1:{rport}/2", "json"),
    ]
    for pg, url, fmt in cases:
        w = walbust(rules, pg=pg, redis_urls=[url], extra=["--log-format", fmt]).start()
        try:
            wait_until(lambda: f"127.0.0.1:{pgport}" in w.read_log() and "retrying" in w.read_log()
                       and f"127.0.0.1:{rport}" in w.read_log(), 20,
                       "connection failures to be logged")
        finally:
            assert w.stop() == 0
        log = w.read_log()
        if fmt == "json":
            for line in log.splitlines():
                json.loads(line)
        assert "sekrit" not in log, f"password leaked into the log:\n{log}"
    for cmd in (["status"], ["check", "--rules", rules]):
        p = subprocess.run([BIN] + cmd + ["--pg", cases[0][0]], capture_output=True, text=True,
                           timeout=30)
        out = p.stdout + p.stderr
        assert p.returncode == 1, f"walbust {cmd[0]}: exit {p.returncode}:\n{out}"
        assert f"127.0.0.1:{pgport}" in out, out
        assert "sekrit" not in out, f"walbust {cmd[0]} leaked the password:\n{out}"


def test_slot_held_by_another_process():
    rules = setup_db()
    r = redis_client(RDB)
    first = walbust(rules, slot="errors_shared").start().wait_streaming()
    second = walbust(rules, slot="errors_shared")
    try:
        pid1 = wait_until(lambda: active_pid("errors_shared"), 10, "the slot to be active")
        second.start()
        wait_until(lambda: "standing by" in second.read_log() or not second.alive(), 20,
                   "the second walbust to stand by")
        assert second.alive(), f"second walbust exited:\n{second.read_log()}"
        assert active_pid("errors_shared") == pid1
        first.kill9()
        t0 = time.time()
        wait_until(lambda: "streaming from" in second.read_log(), 30, "the takeover")
        takeover = time.time() - t0
        print(f"# takeover: the standby streamed {takeover:.2f}s after the holder was SIGKILLed")
        pid2 = active_pid("errors_shared")
        assert pid2 and pid2 != pid1, (pid1, pid2)
        r.set("err:item:1", "cached")
        sql(DB, "INSERT INTO items VALUES (1, 1)")
        barrier(DB, r)
        assert not r.exists("err:item:1")
        assert takeover < 15, f"takeover took {takeover:.1f}s"
    finally:
        if first.alive():
            first.kill9()
        assert second.stop() == 0


def active_pid(slot):
    rows = sql(DB, "SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s", (slot,),
               fetch=True)
    return rows[0][0] if rows else None


def main():
    runner = Runner("test_errors")
    for t in (test_postgres_unreachable_retries, test_wal_level_replica, test_missing_publication,
              test_missing_slot_without_create_slot, test_role_without_replication,
              test_malformed_rules_file, test_password_never_logged,
              test_slot_held_by_another_process):
        runner.run(t)
    fresh_db(DB)
    runner.done()


if __name__ == "__main__":
    sys.exit(main())
