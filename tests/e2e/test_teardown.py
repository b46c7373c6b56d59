"""walbust teardown removes what setup made (docs/cli.md, walbust teardown):
after setup + run + teardown no slot, publication, schema walbust or event
trigger is left; it refuses without --yes when it cannot ask, refuses while
the slot is in use unless --force (which terminates the walsender), asks on
a terminal, and a second teardown finds nothing to drop."""
import os
import pty
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (BARRIER_RULE, BARRIER_SQL, BIN, Runner, Walbust, barrier, dsn, fresh_db,
                     redis_client, sql, wait_until, write_rules)

DB = "teardown"
SLOT = "td_slot"
PUB = "td_pub"
RDB = 15


def walbust(*args, stdin=subprocess.DEVNULL):
    p = subprocess.run([BIN, *args, "--pg", dsn(DB)], capture_output=True, text=True,
                       timeout=60, stdin=stdin)
    return p.returncode, p.stdout + p.stderr


def leftovers():
    """What setup made that is still there, by kind."""
    slots = sql(DB, "SELECT slot_name FROM pg_replication_slots WHERE slot_name = %s", (SLOT,),
                fetch=True)
    pubs = sql(DB, "SELECT pubname FROM pg_publication ORDER BY 1", fetch=True)
    schema = sql(DB, "SELECT nspname FROM pg_namespace WHERE nspname = 'walbust'", fetch=True)
    trig = sql(DB, "SELECT evtname FROM pg_event_trigger ORDER BY 1", fetch=True)
    return {"slot": [r[0] for r in slots], "publication": [r[0] for r in pubs],
            "schema": [r[0] for r in schema], "event trigger": [r[0] for r in trig]}


def nothing_left():
    return all(not v for v in leftovers().values())


def prepare():
    """A database set up by walbust setup, plus what other setups may add:
    the insert-only companion publication and an event trigger whose
    function lives in schema walbust."""
    fresh_db(DB)
    sql(DB, "CREATE TABLE items(id bigint PRIMARY KEY, v int)")
    sql(DB, BARRIER_SQL)
    rules = write_rules({"rules": [{"table": "items", "keys": ["td:item:{id}"]},
                                   BARRIER_RULE]})
    rc, out = walbust("setup", "--rules", rules, "--slot", SLOT, "--publication", PUB)
    assert rc == 0, out
    # setup creates the insert-only companion itself (empty here: items has
    # a key); it must exist for teardown to drop it.
    assert sql(DB, "SELECT count(*) FROM pg_publication WHERE pubname = %s",
               (f"{PUB}_insert_only",), fetch=True)[0][0] == 1, "setup created no companion"
    sql(DB, "CREATE FUNCTION walbust.td_ddl() RETURNS event_trigger LANGUAGE plpgsql "
            "AS $$BEGIN END$$")
    sql(DB, "CREATE EVENT TRIGGER walbust_td_ddl ON ddl_command_end "
            "EXECUTE FUNCTION walbust.td_ddl()")
    left = leftovers()
    assert left == {"slot": [SLOT], "publication": [PUB, f"{PUB}_insert_only"],
                    "schema": ["walbust"],
                    # walbust_ddl_*: the DDL event triggers sql/walbust.sql installs
                    "event trigger": ["walbust_ddl_drop", "walbust_ddl_end", "walbust_td_ddl"]}, left
    return rules


def start(rules):
    r = redis_client(RDB)
    r.flushdb()
    url = f"redis://127.0.0.1:{os.environ.get('REDIS_PORT')}/{RDB}"
    wb = Walbust(DB, rules, slot=SLOT, publication=PUB, redis_urls=[url],
                 create_slot=False).start().wait_streaming()
    r.set("td:item:1", "cached")
    sql(DB, "INSERT INTO items VALUES (1, 1)")
    barrier(DB, r)
    assert not r.exists("td:item:1")
    return wb


def test_teardown_after_run_leaves_nothing():
    rules = prepare()
    wb = start(rules)
    assert wb.stop() == 0
    rc, out = walbust("teardown", "--slot", SLOT, "--publication", PUB, "--yes")
    assert rc == 0, out
    for line in (f"dropped publication {PUB}\n", f"dropped publication {PUB}_insert_only\n",
                 f"dropped replication slot {SLOT}\n", "dropped event trigger walbust_td_ddl\n",
                 "dropped schema walbust\n", f"walbust:confirmed:{SLOT}"):
        assert line in out, (line, out)
    assert nothing_left(), leftovers()
    # The tables and their data are the application's: untouched.
    assert sql(DB, "SELECT count(*) FROM items", fetch=True)[0][0] == 1
    rc, out = walbust("teardown", "--slot", SLOT, "--publication", PUB, "--yes")
    assert rc == 0 and "nothing to drop" in out, (rc, out)


def test_refuses_without_yes_and_while_active_unless_force():
    rules = prepare()
    before = leftovers()
    rc, out = walbust("teardown", "--slot", SLOT, "--publication", PUB)
    assert rc == 2, (rc, out)
    assert "without --yes" in out and "nothing was changed" in out, out
    assert f"publication {PUB}" in out and f"replication slot {SLOT}" in out, out
    assert leftovers() == before

    wb = start(rules)
    try:
        rc, out = walbust("teardown", "--slot", SLOT, "--publication", PUB, "--yes")
        assert rc == 1, (rc, out)
        assert "in use by process" in out and "--force" in out, out
        assert "nothing was changed" in out, out
        assert leftovers() == before
        assert wb.alive(), wb.read_log()

        t0 = time.time()
        rc, out = walbust("teardown", "--slot", SLOT, "--publication", PUB, "--yes", "--force")
        assert rc == 0, (rc, out)
        print(f"# --force dropped an active slot in {time.time() - t0:.2f}s")
        assert nothing_left(), leftovers()
        # The terminated walbust does not bring the slot back (no --create-slot).
        wait_until(lambda: not wb.alive(), 30, "the terminated walbust to give up")
        assert nothing_left(), leftovers()
    finally:
        if wb.alive():
            wb.kill9()


def test_asks_on_a_terminal():
    prepare()
    before = leftovers()
    for answer, want_rc in ((b"no\n", 1), (b"yes\n", 0)):
        pid, fd = pty.fork()
        if pid == 0:
            os.execv(BIN, [BIN, "teardown", "--pg", dsn(DB), "--slot", SLOT, "--publication", PUB])
        out = b""
        deadline = time.time() + 30
        while b"Type yes" not in out and time.time() < deadline:
            out += os.read(fd, 4096)
        os.write(fd, answer)
        while True:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
        _, status = os.waitpid(pid, 0)
        os.close(fd)
        assert os.WEXITSTATUS(status) == want_rc, (answer, out)
        if want_rc == 1:
            assert b"not confirmed" in out, out
            assert leftovers() == before
    assert nothing_left(), leftovers()


def main():
    runner = Runner("test_teardown")
    for t in (test_teardown_after_run_leaves_nothing,
              test_refuses_without_yes_and_while_active_unless_force, test_asks_on_a_terminal):
        runner.run(t)
    fresh_db(DB)
    runner.done()


if __name__ == "__main__":
    sys.exit(main())
