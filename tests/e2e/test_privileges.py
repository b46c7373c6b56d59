"""Least privilege and secrets (docs/security.md).

walbust runs end to end as a PostgreSQL role that has LOGIN REPLICATION and
nothing else (no grant on any table, no CREATE anywhere), authenticated with
a real SCRAM password, and as a Redis ACL user allowed exactly the commands
walbust sends, on exactly its key patterns and its channel. A missing
permission gives a clear error: a Redis user without UNLINK gets NOPERM
naming the command, walbust keeps retrying without confirming, and resumes
(losing nothing) once the permission is granted; a role without
REPLICATION is refused at once; `walbust setup` as that role says which
privilege it lacks, and works for a role with CREATE on the database that
owns the tables. Passwords never appear in logs, errors or /metrics; the
metrics listener binds to loopback by default.

PostgreSQL: database walbust_priv, roles walbust_priv_*, which get
scram-sha-256 lines at the top of the stack's pg_hba.conf (restored at the
end). Redis: db 9, keys priv:*, ACL users walbust_priv_* (deleted at the end).
"""
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request

import redis

from harness import (BIN, PGHOST, PGPORT, REDIS_PORT, SRC, STACK_DIR, Runner, Walbust, connect,
                     fresh_db, redis_client, slot_confirmed, sql, wait_until, write_rules)
from faultkit import free_port, lsn_int

DB = "walbust_priv"
RDB = 9
SLOT = "priv"
PUB = "priv"
ROLE = "walbust_priv_run"        # LOGIN REPLICATION, nothing else
SETUP_ROLE = "walbust_priv_setup"  # + CREATE on the database, owns the tables
NOREPL = "walbust_priv_norepl"   # LOGIN only
PG_SECRET = "pg-Secr3t-7d1f"
REDIS_USER = "walbust_priv_redis"
REDIS_SECRET = "redis-Secr3t-9c2e"
CHANNEL = "priv:chan"
RULES = {
    "defaults": {"tag_prefix": "priv:tag:"},
    "rules": [
        {"table": "items", "keys": ["priv:item:{id}"], "patterns": ["priv:page:{id}:*"],
         "tags": ["item:{id}"], "versions": ["priv:ver:{id}"], "publish": [CHANNEL]},
        {"table": "priv_barrier", "on": ["insert"], "keys": ["priv:barrier:{token}"]},
    ],
}
# Exactly what walbust sends to a single Redis (cdc/sink.c; docs/security.md):
# the tag script runs TYPE, SSCAN and UNLINK as the calling user.
ACL_COMMANDS = ["+ping", "+select", "+unlink", "+scan", "+evalsha", "+script|load", "+type",
                "+sscan", "+incr", "+publish"]
ACL_KEYS = ["~priv:*"]
# The watermark and the slot's mark: read at start, written while running
# (docs/operations.md, runbook: lost slot); EVAL: the watermark moves forward only
# (redis/watermark.lua), WATCH/UNWATCH/MULTI/EXEC: the plain SET that replaces the
# script while the key holds walbust's own last value (without them walbust logs
# NOPERM once and keeps to the script: tests/e2e/sink_test.c).
ACL_WATERMARK = (f"(+get +set +eval +watch +unwatch +multi +exec ~walbust:confirmed:{SLOT} "
                 f"~walbust:slot:{SLOT})")


def pg_conninfo(role, password=PG_SECRET):
    return f"host={PGHOST} port={PGPORT} user={role} password={password} dbname={DB}"


def redis_url(password=REDIS_SECRET):
    return f"redis://{REDIS_USER}:{password}@127.0.0.1:{REDIS_PORT}/{RDB}"


def acl_setuser(r, commands=ACL_COMMANDS):
    r.execute_command("ACL", "SETUSER", REDIS_USER, "reset", "on", f">{REDIS_SECRET}",
                      *ACL_KEYS, f"&{CHANNEL}", "-@all", *commands, ACL_WATERMARK)


class HbaLines:
    """scram-sha-256 for the test's roles, ahead of the stack's trust lines."""

    def __init__(self):
        self.path = os.path.join(STACK_DIR, "pgdata", "pg_hba.conf")
        with open(self.path) as f:
            self.saved = f.read()

    def install(self):
        lines = "".join(f"host all {role} 127.0.0.1/32 scram-sha-256\n"
                        for role in (ROLE, SETUP_ROLE, NOREPL))
        with open(self.path, "w") as f:
            f.write(lines + self.saved)
        sql("postgres", "SELECT pg_reload_conf()")

    def restore(self):
        with open(self.path, "w") as f:
            f.write(self.saved)
        sql("postgres", "SELECT pg_reload_conf()")


def setup_db():
    fresh_db(DB)
    for role in (ROLE, SETUP_ROLE, NOREPL):
        sql("postgres", f"DROP ROLE IF EXISTS {role}")
    sql("postgres", "SET password_encryption = 'scram-sha-256'; "
                    f"CREATE ROLE {ROLE} LOGIN REPLICATION PASSWORD '{PG_SECRET}'; "
                    f"CREATE ROLE {SETUP_ROLE} LOGIN REPLICATION PASSWORD '{PG_SECRET}'; "
                    f"CREATE ROLE {NOREPL} LOGIN PASSWORD '{PG_SECRET}'")
    sql(DB, "CREATE TABLE items(id bigint PRIMARY KEY, v int NOT NULL DEFAULT 0)")
    sql(DB, "CREATE TABLE priv_barrier(id bigserial PRIMARY KEY, token text)")
    sql(DB, "REVOKE ALL ON ALL TABLES IN SCHEMA public FROM PUBLIC")
    sql(DB, f"REVOKE CREATE ON SCHEMA public FROM PUBLIC; REVOKE ALL ON DATABASE {DB} FROM PUBLIC; "
            f"GRANT CONNECT ON DATABASE {DB} TO {ROLE}, {SETUP_ROLE}, {NOREPL}")
    with open(os.path.join(SRC, "sql/walbust.sql")) as f:
        sql(DB, f.read())
    return write_rules(RULES)


def privileges_of(role):
    rows = sql(DB, "SELECT rolsuper, rolreplication, rolcreatedb, rolcreaterole, "
                   "has_database_privilege(%s, current_database(), 'CREATE'), "
                   "has_table_privilege(%s, 'items', 'SELECT'), "
                   "has_schema_privilege(%s, 'public', 'CREATE') FROM pg_roles WHERE rolname = %s",
               (role, role, role, role), fetch=True)
    return rows[0]


def walbust(rules, role=ROLE, url=None, extra=None, create_slot=True, env=None):
    w = Walbust(DB, rules, slot=SLOT, publication=PUB, redis_urls=[url or redis_url()],
                extra=extra, create_slot=create_slot, env=env)
    w.args[w.args.index("--pg") + 1] = pg_conninfo(role)
    return w


def assert_no_secret(where, text):
    for secret in (PG_SECRET, REDIS_SECRET):
        assert secret not in text, f"a password leaked into {where}:\n{text}"


def seed(r, ids):
    pipe = r.pipeline(transaction=False)
    for i in ids:
        pipe.set(f"priv:item:{i}", "cached")
        pipe.set(f"priv:page:{i}:1", "cached")
        pipe.sadd(f"priv:tag:item:{i}", f"priv:member:{i}")
        pipe.set(f"priv:member:{i}", "cached")
        pipe.set(f"priv:ver:{i}", 0)
    pipe.execute()


def barrier(r):
    token = f"{time.time_ns()}"
    r.set(f"priv:barrier:{token}", "1")
    sql(DB, "INSERT INTO priv_barrier(token) VALUES (%s)", (token,))
    wait_until(lambda: not r.exists(f"priv:barrier:{token}"), 30, "barrier key invalidation")


def scrape(port, path="/metrics"):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
        return resp.status, resp.read().decode()


def listening(port):
    """Local addresses listening on TCP `port` (from /proc/net/tcp{,6})."""
    out = set()
    for name, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        try:
            with open(name) as f:
                lines = f.readlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            addr, p = local.split(":")
            if state != "0A" or int(p, 16) != port:
                continue
            raw = bytes.fromhex(addr)
            if v6:
                words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
                out.add(socket.inet_ntop(socket.AF_INET6, words))
            else:
                out.add(socket.inet_ntop(socket.AF_INET, raw[::-1]))
    return out


def test_minimal_role_and_acl_user_end_to_end():
    """LOGIN REPLICATION + an ACL user with exactly walbust's commands: keys,
    patterns, tags, versions, publish, SQL invalidation and the watermark
    all work; check and status work as that role; nothing leaks."""
    rules = setup_db()
    assert privileges_of(ROLE) == (False, True, False, False, False, False, False), \
        privileges_of(ROLE)
    sql(DB, f"CREATE PUBLICATION {PUB} FOR TABLE items, priv_barrier")
    sql(DB, "INSERT INTO items(id) SELECT generate_series(1, 10)")
    r = redis_client(RDB)
    r.flushdb()
    acl_setuser(r)
    port = free_port()
    w = walbust(rules)
    w.args[w.args.index("--metrics") + 1] = f"127.0.0.1:{port}"
    try:
        w.start().wait_streaming()
        seed(r, range(1, 11))
        ps = r.pubsub()
        ps.subscribe(CHANNEL)
        wait_until(lambda: ps.get_message(timeout=0.1), 5, "subscription")
        sql(DB, "UPDATE items SET v = v + 1 WHERE id IN (1, 2)")
        sql(DB, "DELETE FROM items WHERE id = 3")
        sql(DB, "INSERT INTO items(id) VALUES (11)")
        sql(DB, "SELECT walbust.invalidate('priv:item:4'), walbust.invalidate_tag('item:5')")
        barrier(r)
        for i in (1, 2, 3):
            for k in (f"priv:item:{i}", f"priv:page:{i}:1", f"priv:tag:item:{i}",
                      f"priv:member:{i}"):
                assert not r.exists(k), f"{k} survived"
            assert r.get(f"priv:ver:{i}") == "1", (i, r.get(f"priv:ver:{i}"))
        assert not r.exists("priv:item:4") and not r.exists("priv:member:5")
        for i in range(6, 11):
            assert r.exists(f"priv:item:{i}") and r.get(f"priv:ver:{i}") == "0", i
        got = []
        wait_until(lambda: got.extend(m for m in iter(lambda: ps.get_message(timeout=0.05), None)
                                      if m["type"] == "message") or len(got) >= 4, 10,
                   "four publishes")
        assert {json.loads(m["data"])["op"] for m in got} == {"update", "delete", "insert"}
        ps.close()
        # The watermark follows the last acknowledged batch within moments.
        wm = wait_until(lambda: redis_client(RDB).get(f"walbust:confirmed:{SLOT}"), 10,
                        "the watermark")
        assert lsn_int(wm) > 0, wm
        status, metrics = scrape(port)
        assert status == 200 and "walbust_transactions_total" in metrics
        assert_no_secret("/metrics", metrics)
        assert listening(port) == {"127.0.0.1"}, listening(port)
        assert "NOPERM" not in w.read_log(), w.read_log()
        # The user really is restricted: nothing beyond walbust's commands.
        mine = redis.Redis(host="127.0.0.1", port=REDIS_PORT, db=RDB, username=REDIS_USER,
                           password=REDIS_SECRET, decode_responses=True)
        for cmd in (["GET", "priv:item:6"], ["SET", "priv:item:6", "x"], ["FLUSHDB"],
                    ["KEYS", "*"], ["CONFIG", "GET", "dir"], ["UNLINK", "other:key"],
                    ["SET", "walbust:confirmed:other", "1"], ["GET", "walbust:slot:other"],
                    ["PUBLISH", "other", "x"]):
            try:
                mine.execute_command(*cmd)
                raise AssertionError(f"the ACL user may run {cmd}")
            except redis.exceptions.NoPermissionError:
                pass
        mine.close()
        for cmd in (["check", "--rules", rules, "--slot", SLOT], ["status", "--slot", SLOT]):
            p = subprocess.run([BIN] + cmd + ["--pg", pg_conninfo(ROLE), "--publication", PUB],
                               capture_output=True, text=True, timeout=30)
            out = p.stdout + p.stderr
            assert p.returncode == 0, f"walbust {cmd[0]} as {ROLE}: exit {p.returncode}:\n{out}"
            assert_no_secret(f"walbust {cmd[0]}", out)
        assert w.stop() == 0
        assert_no_secret("the log", w.read_log())
        print(f"# minimal role: {len(got)} publishes, watermark {wm}, /metrics "
              f"{len(metrics)} bytes on 127.0.0.1:{port}")
    finally:
        if w.alive():
            w.proc.kill()
        r.execute_command("ACL", "DELUSER", REDIS_USER)


def test_acl_without_unlink_retries_then_recovers():
    """Take UNLINK away: NOPERM naming UNLINK is logged, walbust keeps
    retrying and confirms nothing past the commit; give it back: the key
    goes and the slot moves on."""
    rules = setup_db()
    sql(DB, f"CREATE PUBLICATION {PUB} FOR TABLE items, priv_barrier")
    sql(DB, "INSERT INTO items(id) VALUES (1), (2)")
    r = redis_client(RDB)
    r.flushdb()
    acl_setuser(r, [c for c in ACL_COMMANDS if c != "+unlink"])
    w = walbust(rules)
    try:
        w.start().wait_streaming()
        seed(r, [1, 2])
        before = slot_confirmed(DB, SLOT)
        conn = connect(DB)
        with conn.cursor() as cur:
            cur.execute("UPDATE items SET v = v + 1 WHERE id = 1")
            cur.execute("SELECT pg_current_wal_lsn()::text")
            after_commit = cur.fetchone()[0]
        conn.close()
        wait_until(lambda: len(re.findall(r"NOPERM.*retrying|retrying.*NOPERM|NOPERM", w.read_log()))
                   >= 2, 30, "two refused attempts")
        log = w.read_log()
        line = next(ln for ln in log.splitlines() if "NOPERM" in ln)
        assert "UNLINK" in line and "priv:item:1" in line, line
        print(f"# {line}")
        assert w.alive(), "walbust gave up on a permission error"
        assert r.exists("priv:item:1")
        confirmed = slot_confirmed(DB, SLOT)
        assert lsn_int(confirmed) < lsn_int(after_commit), (
            f"confirmed {confirmed} past the refused commit (WAL {after_commit}, was {before})")
        acl_setuser(r)
        wait_until(lambda: not r.exists("priv:item:1"), 60, "the retry to succeed")
        barrier(r)
        # After the recovery walbust replays from the confirmed position;
        # the slot confirms past the commit within moments of the barrier.
        wait_until(lambda: lsn_int(slot_confirmed(DB, SLOT)) >= lsn_int(after_commit), 20,
                   "the slot to confirm past the refused commit")
        assert r.exists("priv:item:2")
        assert w.stop() == 0
        assert_no_secret("the log", w.read_log())
    finally:
        if w.alive():
            w.proc.kill()
        r.execute_command("ACL", "DELUSER", REDIS_USER)


def test_role_without_replication_and_wrong_passwords():
    """LOGIN without REPLICATION: refused at once with the fix; a wrong
    PostgreSQL or Redis password: a clear error without the password."""
    rules = setup_db()
    sql(DB, f"CREATE PUBLICATION {PUB} FOR TABLE items, priv_barrier")
    w = walbust(rules, role=NOREPL).start()
    try:
        w.proc.wait(30)
    finally:
        if w.alive():
            w.proc.kill()
        w.log.close()
    log = w.read_log()
    assert w.proc.returncode == 1, f"exit {w.proc.returncode}:\n{log}"
    assert "replication" in log and f"ALTER ROLE {NOREPL} REPLICATION" in log, log
    assert_no_secret("the log", log)

    w = walbust(rules)
    w.args[w.args.index("--pg") + 1] = pg_conninfo(ROLE, password="not-" + PG_SECRET)
    w.start()
    try:
        w.proc.wait(30)
    finally:
        if w.alive():
            w.proc.kill()
        w.log.close()
    log = w.read_log()
    assert w.proc.returncode == 1 and "password authentication failed" in log, log
    assert "not-" + PG_SECRET not in log and PG_SECRET not in log, log

    r = redis_client(RDB)
    acl_setuser(r)
    w = walbust(rules, url=redis_url("not-" + REDIS_SECRET))
    try:
        w.start()
        wait_until(lambda: "AUTH failed" in w.read_log(), 20, "the AUTH failure")
        log = w.read_log()
        assert REDIS_USER in log, log
        assert REDIS_SECRET not in log, log
    finally:
        w.stop()
        r.execute_command("ACL", "DELUSER", REDIS_USER)


def test_setup_privileges():
    """setup as LOGIN REPLICATION alone fails naming the missing privilege
    and changes nothing; with CREATE on the database and ownership of the
    tables it creates the publication, the schema and the slot."""
    rules = setup_db()
    sql("postgres", f"DROP DATABASE IF EXISTS {DB}_setup WITH (FORCE)")
    p = subprocess.run([BIN, "setup", "--rules", rules, "--pg", pg_conninfo(ROLE),
                        "--slot", SLOT, "--publication", PUB],
                       capture_output=True, text=True, timeout=60)
    out = p.stdout + p.stderr
    assert p.returncode == 1, f"setup as {ROLE}: exit {p.returncode}:\n{out}"
    assert "permission denied" in out or "must be owner" in out, out
    assert_no_secret("setup's output", out)
    assert not sql(DB, "SELECT 1 FROM pg_publication WHERE pubname = %s", (PUB,), fetch=True)
    assert not sql(DB, "SELECT 1 FROM pg_replication_slots WHERE slot_name = %s", (SLOT,),
                   fetch=True)
    print(f"# setup as {ROLE}: {[ln for ln in out.splitlines() if ln.strip()][-1]}")

    sql(DB, f"GRANT CREATE ON DATABASE {DB} TO {SETUP_ROLE}; "
            f"ALTER TABLE items OWNER TO {SETUP_ROLE}; "
            f"ALTER TABLE priv_barrier OWNER TO {SETUP_ROLE}; "
            "DROP SCHEMA walbust CASCADE")
    p = subprocess.run([BIN, "setup", "--rules", rules, "--pg", pg_conninfo(SETUP_ROLE),
                        "--slot", SLOT, "--publication", PUB],
                       capture_output=True, text=True, timeout=60)
    out = p.stdout + p.stderr
    assert p.returncode == 0, f"setup as {SETUP_ROLE}: exit {p.returncode}:\n{out}"
    assert_no_secret("setup's output", out)
    assert privileges_of(SETUP_ROLE)[0] is False
    assert sql(DB, "SELECT count(*) FROM pg_publication_tables WHERE pubname = %s", (PUB,),
               fetch=True)[0][0] == 2
    assert sql(DB, "SELECT 1 FROM pg_replication_slots WHERE slot_name = %s", (SLOT,), fetch=True)
    assert sql(DB, "SELECT walbust.version()", fetch=True)[0][0] == "1"


def test_metrics_bind_loopback_by_default():
    """The documented default is 127.0.0.1:9187; WALBUST_METRICS picks
    another loopback port; a run without any metrics setting binds
    127.0.0.1:9187 only (when that port is free here)."""
    help_text = subprocess.run([BIN, "run", "--help"], capture_output=True, text=True,
                               timeout=10)
    text = " ".join((help_text.stdout + help_text.stderr).split())  # --help wraps lines
    assert re.search(r"--metrics ADDR.*default: 127\.0\.0\.1:9187", text), text
    rules = setup_db()
    sql(DB, f"CREATE PUBLICATION {PUB} FOR TABLE items, priv_barrier")
    r = redis_client(RDB)
    acl_setuser(r)
    port = free_port()
    cases = [("WALBUST_METRICS", port)]
    if not listening(9187):
        cases.append(("default", 9187))
    else:
        print("# 127.0.0.1:9187 is taken here: the default-address run is skipped")
    try:
        for how, p in cases:
            w = walbust(rules, env={"WALBUST_METRICS": f"127.0.0.1:{p}"} if how != "default"
                        else None)
            i = w.args.index("--metrics")
            del w.args[i:i + 2]
            if how == "default":
                w.env.pop("WALBUST_METRICS", None)
            skipped = False
            try:
                w.start()
                wait_until(lambda: "streaming from" in w.read_log() or not w.alive(), 20,
                           "walbust to stream")
                if how == "default" and not w.alive() and "9187" in w.read_log():
                    print(f"# port 9187 was taken meanwhile: {w.read_log().strip()[-200:]}")
                    skipped = True
                    continue
                w.wait_streaming()
                wait_until(lambda: listening(p), 10, f"a listener on port {p}")
                assert listening(p) == {"127.0.0.1"}, (how, listening(p))
                status, body = scrape(p, "/healthz")
                assert status == 200, (status, body)
                _, metrics = scrape(p)
                assert_no_secret("/metrics", metrics)
                print(f"# metrics ({how}): listening on {sorted(listening(p))} port {p}")
            finally:
                rc = w.stop()
                assert skipped or rc == 0, rc
    finally:
        r.execute_command("ACL", "DELUSER", REDIS_USER)


def main():
    runner = Runner("test_privileges")
    hba = HbaLines()
    hba.install()
    try:
        for t in (test_minimal_role_and_acl_user_end_to_end,
                  test_acl_without_unlink_retries_then_recovers,
                  test_role_without_replication_and_wrong_passwords, test_setup_privileges,
                  test_metrics_bind_loopback_by_default):
            runner.run(t)
    finally:
        hba.restore()
        fresh_db(DB)
        for role in (ROLE, SETUP_ROLE, NOREPL):
            sql("postgres", f"DROP ROLE IF EXISTS {role}")
    runner.done()


if __name__ == "__main__":
    sys.exit(main())
