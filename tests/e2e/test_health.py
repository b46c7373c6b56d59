"""Health that tells the truth: /readyz and walbust_redis_up against a real
Redis that answers but refuses every batch (OOM under noeviction, READONLY
as a replica, NOPERM from an ACL, WRONGPASS after a password change), and
back to ready once it is fixed, with nothing lost; and a standby that
reports its role instead of pretending Redis is down."""
import os
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (BARRIER_RULE, BARRIER_SQL, STACK_DIR, Runner, Walbust, free_port, fresh_db,
                     readyz, scrape, sql, wait_until, write_rules)

import redis

DB = "health_e2e"
SLOT = "health_e2e"
USER, PASSWORD = "walbust-user", "s3cret-pw"








class PrivateRedis:
    """A Redis of this test's own, so it can be broken on purpose."""

    def __init__(self, name):
        self.port = free_port()
        self.dir = os.path.join(STACK_DIR, name)
        os.makedirs(self.dir, exist_ok=True)

    def start(self):
        subprocess.run(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                        "--save", "", "--appendonly", "no", "--daemonize", "yes",
                        "--dir", self.dir, "--pidfile", os.path.join(self.dir, "r.pid")],
                       check=True, stdout=subprocess.DEVNULL)
        wait_until(self.ping, 10, "redis to start")
        self.admin = redis.Redis(port=self.port, decode_responses=True)
        return self

    def ping(self):
        try:
            return redis.Redis(port=self.port, socket_timeout=1).ping()
        except redis.RedisError:
            return False

    def stop(self):
        subprocess.run(["redis-cli", "-p", str(self.port), "shutdown", "nosave"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def setup_db():
    fresh_db(DB)
    sql(DB, "CREATE TABLE items(id bigint PRIMARY KEY, v int)")
    sql(DB, BARRIER_SQL)
    sql(DB, "CREATE PUBLICATION walbust FOR TABLE items, walbust_barrier")
    # versions (INCR) need memory and are writes: refused under OOM, on a
    # replica and without the permission; keys (UNLINK) are not refused
    # under OOM, so both are used.
    return write_rules({"rules": [{"table": "items", "keys": ["h:{id}"],
                                   "versions": ["hv:{id}"]}, BARRIER_RULE]})


def start_walbust(rules, rport, url=None, slot=SLOT):
    mport = free_port()
    wb = Walbust(DB, rules, slot=slot, redis_urls=[url or f"redis://127.0.0.1:{rport}"])
    wb.args[wb.args.index("--metrics") + 1] = f"127.0.0.1:{mport}"
    return wb.start(), mport


def wait_ready(mport, what, timeout=30):
    wait_until(lambda: readyz(mport)[0] == 200, timeout, f"/readyz 200 {what}")
    m = scrape(mport)
    assert m["walbust_redis_up"] == 1 and m["walbust_ready"] == 1, m
    assert m['walbust_role{role="active"}'] == 1, m


def refused(mport, r, item, reason):
    """Commit a change to `item` and see Redis refuse its batch: /readyz 503
    naming the reply, walbust_redis_up 0; the version is not bumped."""
    before = r.get(f"hv:{item}")
    sql(DB, "UPDATE items SET v = v + 1 WHERE id = %s", (item,))
    status, body = wait_until(lambda: (lambda s: s if s[0] == 503 and reason in s[1] else None)(
        readyz(mport)), 30, f"/readyz 503 naming {reason}")
    assert "redis target 127.0.0.1:" in body and " is down: " in body, body
    m = scrape(mport)
    assert m["walbust_redis_up"] == 0 and m["walbust_ready"] == 0, m
    assert m["walbust_postgres_up"] == 1, m  # streaming: only Redis refuses
    assert [v for k, v in m.items() if k.startswith("walbust_redis_target_up")] == [0], m
    assert r.get(f"hv:{item}") == before
    return before


def recovered(mport, r, item, before, what):
    """After the fix: ready again, and the refused change was applied."""
    wait_ready(mport, what)
    wait_until(lambda: r.get(f"hv:{item}") != before, 20, f"hv:{item} bumped after {what}")


def test_refusing_redis_is_down():
    rules = setup_db()
    rd = PrivateRedis("health-redis").start()
    r = rd.admin
    r.execute_command("ACL", "SETUSER", USER, "on", f">{PASSWORD}", "~*", "&*", "+@all")
    url = f"redis://{USER}:{PASSWORD}@127.0.0.1:{rd.port}"
    sql(DB, "INSERT INTO items SELECT g, 0 FROM generate_series(1, 10) g")
    wb, mport = start_walbust(rules, rd.port, url)
    try:
        wb.wait_streaming()
        wait_ready(mport, "while streaming")

        # OOM: noeviction with no memory to spare refuses INCR (and SET).
        r.config_set("maxmemory-policy", "noeviction")
        r.config_set("maxmemory", "1")
        before = refused(mport, r, 1, "OOM")
        r.config_set("maxmemory", "0")
        recovered(mport, r, 1, before, "OOM is lifted")

        # READONLY: a replica (of a master that is not there) refuses writes.
        dead = free_port()
        r.execute_command("REPLICAOF", "127.0.0.1", str(dead))
        before = refused(mport, r, 2, "READONLY")
        r.execute_command("REPLICAOF", "NO", "ONE")
        recovered(mport, r, 2, before, "REPLICAOF NO ONE")

        # NOPERM: the ACL user loses a command walbust needs.
        r.execute_command("ACL", "SETUSER", USER, "-incr")
        before = refused(mport, r, 3, "NOPERM")
        r.execute_command("ACL", "SETUSER", USER, "+incr")
        recovered(mport, r, 3, before, "the permission is back")

        # WRONGPASS: the password changes and the connection is dropped.
        r.execute_command("ACL", "SETUSER", USER, "resetpass", ">another-pw")
        r.execute_command("CLIENT", "KILL", "USER", USER)
        before = refused(mport, r, 4, "WRONGPASS")
        r.execute_command("ACL", "SETUSER", USER, "resetpass", f">{PASSWORD}")
        recovered(mport, r, 4, before, "the password is restored")

        m = scrape(mport)
        assert m["walbust_redis_errors_total"] >= 4, m
        log = wb.read_log()
        for reply in ("OOM", "READONLY", "NOPERM", "WRONGPASS"):
            assert reply in log, reply
        assert wb.stop() == 0
    finally:
        if wb.alive():
            wb.proc.send_signal(signal.SIGKILL)
        rd.stop()
        sql("postgres", "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
            "WHERE slot_name = %s AND NOT active", (SLOT,))


def test_standby_reports_its_role():
    rules = setup_db()
    rd = PrivateRedis("health-redis-standby").start()
    r = rd.admin
    a, aport = start_walbust(rules, rd.port)
    b = None
    try:
        a.wait_streaming()
        wait_ready(aport, "on the active instance")
        b, bport = start_walbust(rules, rd.port)
        wait_until(lambda: "standing by" in b.read_log(), 20, "the second instance to stand by")

        def standby_gauges():
            m = scrape(bport)
            return m if m['walbust_role{role="standby"}'] == 1 else None
        m = wait_until(standby_gauges, 10, "walbust_role standby")
        assert m['walbust_role{role="active"}'] == 0, m
        assert m["walbust_postgres_up"] == 0 and m["walbust_ready"] == 0, m
        assert m["walbust_redis_up"] == 1, m  # connected to Redis: not "down"
        status, body = readyz(bport)
        assert status == 503 and "standing by" in body and "is active for PID" in body, body
        assert "redis" not in body, body
        # A standby whose Redis goes away does show it down.
        rd.stop()
        wait_until(lambda: scrape(bport)["walbust_redis_up"] == 0, 20, "standby redis_up 0")
        rd.start()
        wait_until(lambda: scrape(bport)["walbust_redis_up"] == 1, 20, "standby redis_up 1")

        # The active one stops: the standby takes over and becomes ready.
        assert a.stop() == 0
        b.wait_streaming(30)
        wait_ready(bport, "after taking over")
        r.set("h:7", "cached")
        sql(DB, "INSERT INTO items VALUES (7, 0)")
        wait_until(lambda: not r.exists("h:7"), 20, "the new active one to invalidate")
        assert b.stop() == 0
    finally:
        for wb in (a, b):
            if wb is not None and wb.alive():
                wb.proc.send_signal(signal.SIGKILL)
        rd.stop()
        sql("postgres", "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
            "WHERE slot_name = %s AND NOT active", (SLOT,))


def test_failing_lookup_is_not_ready():
    """A lookup whose query fails holds its batch: not ready, naming the
    query's error, until the table is back."""
    db = fresh_db("health_lookup")
    sql(db, "CREATE TABLE users(id int PRIMARY KEY, name text)")
    sql(db, "CREATE TABLE team_members(team_id int, user_id int, PRIMARY KEY (team_id, user_id))")
    sql(db, "ALTER TABLE users REPLICA IDENTITY FULL")
    sql(db, "CREATE PUBLICATION walbust FOR TABLE users, team_members")
    sql(db, "INSERT INTO users VALUES (1, 'a'); INSERT INTO team_members VALUES (10, 1)")
    rules = write_rules({"rules": [
        {"table": "public.users", "changed": ["name"],
         "lookup": {"sql": "SELECT team_id FROM public.team_members WHERE user_id = $1",
                    "args": ["{id}"]},
         "keys": ["hteam:{team_id}"]},
        {"table": "public.team_members", "keys": ["hteam:{team_id}"]}]})
    rd = PrivateRedis("health-redis-lookup").start()
    r = rd.admin
    mport = free_port()
    wb = Walbust(db, rules, slot="health_lookup", redis_urls=[f"redis://127.0.0.1:{rd.port}"])
    wb.args[wb.args.index("--metrics") + 1] = f"127.0.0.1:{mport}"
    try:
        wb.start().wait_streaming()
        wait_ready(mport, "while streaming")
        r.set("hteam:10", "cached")
        sql(db, "ALTER TABLE team_members RENAME TO team_members_away")
        sql(db, "UPDATE users SET name = 'b' WHERE id = 1")
        status, body = wait_until(
            lambda: (lambda s: s if s[0] == 503 and "lookups:" in s[1] else None)(readyz(mport)),
            30, "/readyz 503 naming the failing lookup")
        assert "team_members" in body and "does not exist" in body, body
        m = scrape(mport)
        assert m['walbust_condition{condition="lookups"}'] == 0 and m["walbust_ready"] == 0, m
        assert m["walbust_redis_up"] == 1, m  # Redis is fine: only the lookup fails
        assert r.exists("hteam:10")
        sql(db, "ALTER TABLE team_members_away RENAME TO team_members")
        wait_ready(mport, "once the lookup runs again")
        wait_until(lambda: not r.exists("hteam:10"), 20, "the held invalidation")
        assert scrape(mport)['walbust_condition{condition="lookups"}'] == 1
        assert wb.stop() == 0
    finally:
        if wb.alive():
            wb.proc.send_signal(signal.SIGKILL)
        rd.stop()
        sql("postgres", "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
            "WHERE slot_name = 'health_lookup' AND NOT active")


def test_rules_invalid_against_live_schema_is_not_ready():
    """A migration renames a column named in "changed": walbust fires
    (never skips) but is not ready until the rules match the schema again."""
    db = fresh_db("health_schema")
    sql(db, "CREATE TABLE users(id int PRIMARY KEY, name text, email text)")
    sql(db, "ALTER TABLE users REPLICA IDENTITY FULL")
    sql(db, "CREATE PUBLICATION walbust FOR TABLE users")
    sql(db, "INSERT INTO users VALUES (1, 'ann', 'a@x')")
    rules = write_rules({"rules": [{"table": "public.users", "on": ["update"],
                                    "changed": ["name"], "keys": ["huser:{id}"]}]})
    rd = PrivateRedis("health-redis-schema").start()
    mport = free_port()
    wb = Walbust(db, rules, slot="health_schema", redis_urls=[f"redis://127.0.0.1:{rd.port}"],
                 extra=["--schema-recheck", "2"])
    wb.args[wb.args.index("--metrics") + 1] = f"127.0.0.1:{mport}"
    try:
        wb.start().wait_streaming()
        wait_ready(mport, "while streaming")
        sql(db, "ALTER TABLE users RENAME COLUMN name TO full_name")
        sql(db, "UPDATE users SET email = 'b@x' WHERE id = 1")  # its Relation message tells
        status, body = wait_until(
            lambda: (lambda s: s if s[0] == 503 and "rules_valid:" in s[1] else None)(
                readyz(mport)), 60, "/readyz 503 naming rules_valid")
        assert "column \"name\"" in body and "does not exist" in body, body
        m = scrape(mport)
        assert m['walbust_condition{condition="rules_valid"}'] == 0, m
        assert m["walbust_redis_up"] == 1 and m["walbust_postgres_up"] == 1, m
        sql(db, "ALTER TABLE users RENAME COLUMN full_name TO name")
        sql(db, "UPDATE users SET email = 'c@x' WHERE id = 1")
        wait_ready(mport, "once the rules match the schema again", timeout=60)
        assert wb.stop() == 0
    finally:
        if wb.alive():
            wb.proc.send_signal(signal.SIGKILL)
        rd.stop()
        sql("postgres", "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
            "WHERE slot_name = 'health_schema' AND NOT active")


if __name__ == "__main__":
    t = Runner("test_health")
    t.run(test_refusing_redis_is_down)
    t.run(test_standby_reports_its_role)
    t.run(test_failing_lookup_is_not_ready)
    t.run(test_rules_invalid_against_live_schema_is_not_ready)
    t.done()
