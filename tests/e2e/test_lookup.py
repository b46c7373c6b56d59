"""End-to-end tests of lookups (rules with a "lookup": keys derived through
a join) through `walbust run` and `walbust check --pg`, against real
PostgreSQL and Redis.

Schema: users, teams and the join table team_members. The lookup rule on
users renders team:{team_id}:members for every team the changed user is in;
team_members has its own rule for the same keys (docs/rules.md explains why
it must). "Not invalidated" is only asserted after a barrier.

Run by hand:
  make && scripts/stack start /tmp/me-stack && . /tmp/me-stack/env &&
  WALBUST_BIN=$PWD/build/walbust /usr/bin/python3 tests/e2e/test_lookup.py
"""
import json
import os
import re
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import (BARRIER_RULE, BARRIER_SQL, BIN, REDIS_PORT, Runner, Walbust,  # noqa: E402
                     barrier, dsn, free_port, fresh_db, redis_client, scrape, slot_confirmed,
                     sql, wait_until, write_rules)

SCHEMA = """
CREATE TABLE users(id int PRIMARY KEY, name text, email text);
CREATE TABLE teams(id int PRIMARY KEY, name text);
CREATE TABLE team_members(team_id int REFERENCES teams, user_id int REFERENCES users,
                          PRIMARY KEY (team_id, user_id));
-- the `changed` filter needs the old name (otherwise it counts as changed)
ALTER TABLE users REPLICA IDENTITY FULL;
"""

LOOKUP_SQL = "SELECT team_id FROM public.team_members WHERE user_id = $1"


def user_rule(limit=None):
    lookup = {"sql": LOOKUP_SQL, "args": ["{id}"]}
    if limit is not None:
        lookup["limit"] = limit
    return {"table": "public.users", "changed": ["name"], "lookup": lookup,
            "keys": ["team:{team_id}:members"]}


MEMBER_RULE = {"table": "public.team_members", "keys": ["team:{team_id}:members"]}
USER_KEY_RULE = {"table": "public.users", "keys": ["user:{id}"]}


class Env:
    def __init__(self, name, rdb, rules):
        self.db = fresh_db(f"lookup_e2e_{name}")
        self.url = f"redis://127.0.0.1:{REDIS_PORT}/{rdb}"
        sql(self.db, SCHEMA)
        sql(self.db, BARRIER_SQL)
        sql(self.db, "CREATE PUBLICATION walbust FOR TABLE users, teams, team_members, "
                     "walbust_barrier")
        self.rules = write_rules({"rules": list(rules) + [BARRIER_RULE]})
        self.r = redis_client(rdb)
        self.r.flushdb()
        self.wb = None

    def start(self, metrics_port=None):
        self.wb = Walbust(self.db, self.rules, redis_urls=[self.url])
        if metrics_port is not None:
            self.wb.args[self.wb.args.index("--metrics") + 1] = f"127.0.0.1:{metrics_port}"
        self.wb.start()
        self.wb.wait_streaming()
        return self

    def q(self, query, args=None, fetch=False):
        return sql(self.db, query, args, fetch)

    def seed(self, users, teams, members):
        for u in users:
            self.q("INSERT INTO users VALUES (%s, %s, %s)", (u, f"user{u}", f"u{u}@x"))
        for t in teams:
            self.q("INSERT INTO teams VALUES (%s, %s)", (t, f"team{t}"))
        for t, u in members:
            self.q("INSERT INTO team_members VALUES (%s, %s)", (t, u))

    def setkeys(self, *keys):
        for k in keys:
            self.r.set(k, "v")

    def existing(self, keys):
        return [k for k in keys if self.r.exists(k)]

    def close(self):
        if self.wb is not None:
            rc = self.wb.stop()
            assert rc == 0, f"walbust exited {rc}:\n{self.wb.read_log()[-3000:]}"
        wait_until(lambda: not sql("postgres", "SELECT 1 FROM pg_replication_slots WHERE "
                                   "database = %s AND active_pid IS NOT NULL", (self.db,),
                                   fetch=True), 20, "the slot to be released")
        sql("postgres", "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                        "WHERE database = %s AND active_pid IS NULL", (self.db,))




def metric(port, name):
    return scrape(port).get(name, 0.0)


def lsn_le(db, a, b):
    return sql(db, "SELECT %s::pg_lsn <= %s::pg_lsn", (a, b), fetch=True)[0][0]


TEAM_KEYS = [f"team:{t}:members" for t in (10, 11, 12, 13)]


def test_fan_out_exactly_the_users_teams():
    """One user in 3 teams: a rename invalidates exactly those 3 member
    lists; the fourth team's list and an update of another column stay."""
    e = Env("fanout", 1, [user_rule(), MEMBER_RULE, USER_KEY_RULE])
    try:
        e.seed([1, 2], [10, 11, 12, 13], [(10, 1), (11, 1), (12, 1), (13, 2), (10, 2)])
        e.start()
        e.barrier = lambda: barrier(e.db, e.r)
        e.setkeys(*TEAM_KEYS, "user:1", "user:2")
        e.q("UPDATE users SET name = 'Ada' WHERE id = 1")
        wait_until(lambda: not e.existing(TEAM_KEYS[:3] + ["user:1"]), 20,
                   "the 3 member lists and user:1 to be invalidated")
        barrier(e.db, e.r)
        assert e.existing(TEAM_KEYS) == ["team:13:members"], e.existing(TEAM_KEYS)
        assert e.r.exists("user:2")

        # `changed: ["name"]`: an email change runs no lookup.
        e.setkeys(*TEAM_KEYS)
        e.q("UPDATE users SET email = 'new@x' WHERE id = 1")
        wait_until(lambda: not e.r.exists("user:1"), 20, "user:1 (direct rule) invalidated")
        barrier(e.db, e.r)
        assert e.existing(TEAM_KEYS) == TEAM_KEYS, e.existing(TEAM_KEYS)

        # Many renames in one transaction: every user's teams, from one batch.
        e.setkeys(*TEAM_KEYS)
        e.q("UPDATE users SET name = name || '!'")
        wait_until(lambda: not e.existing(TEAM_KEYS), 20, "all 4 member lists invalidated")

        # A membership change goes through the join table's own rule.
        e.setkeys(*TEAM_KEYS)
        e.q("DELETE FROM team_members WHERE team_id = 13 AND user_id = 2")
        wait_until(lambda: not e.r.exists("team:13:members"), 20, "team 13 invalidated")
        barrier(e.db, e.r)
        assert e.existing(TEAM_KEYS) == TEAM_KEYS[:3]
        log = e.wb.read_log()
        assert "lookup" not in log.lower() or "failed" not in log.lower(), log[-2000:]
    finally:
        e.close()


def test_many_distinct_lookups_in_one_batch():
    """One transaction renaming 300 users: 300 distinct lookups, sent in
    pipelines of 128 and rendered chunk by chunk; every team's list goes."""
    e = Env("many", 6, [user_rule(), MEMBER_RULE])
    try:
        e.q("INSERT INTO users SELECT g, 'u' || g, NULL FROM generate_series(1, 300) g")
        e.q("INSERT INTO teams SELECT g, 't' || g FROM generate_series(1, 150) g")
        e.q("INSERT INTO team_members SELECT 1 + g % 150, g FROM generate_series(1, 300) g")
        port = free_port()
        e.start(metrics_port=port)
        keys = [f"team:{t}:members" for t in range(1, 151)]
        e.setkeys(*keys, "team:151:members")
        e.q("UPDATE users SET name = name || '!'")
        wait_until(lambda: not e.existing(keys), 30, "all 150 member lists invalidated")
        barrier(e.db, e.r)
        assert e.r.exists("team:151:members")
        assert metric(port, "walbust_lookup_queries_total") == 300
        assert metric(port, "walbust_lookup_errors_total") == 0
    finally:
        e.close()


def test_over_limit_widens_to_pattern():
    """More result rows than the limit: the lookup's placeholder becomes *
    and the key a pattern (every team's member list), counted as widened."""
    e = Env("limit", 2, [user_rule(limit=2), MEMBER_RULE])
    try:
        e.seed([1, 2], [10, 11, 12, 13], [(10, 1), (11, 1), (12, 1), (13, 2)])
        port = free_port()
        e.start(metrics_port=port)
        widened = 'walbust_widened_total{table="public.users"}'
        e.setkeys(*TEAM_KEYS, "unrelated:1", "team:10:other")
        # Within the limit (user 2: one team): exact.
        e.q("UPDATE users SET name = 'Bo' WHERE id = 2")
        wait_until(lambda: not e.r.exists("team:13:members"), 20, "team 13 invalidated")
        barrier(e.db, e.r)
        assert e.existing(TEAM_KEYS) == TEAM_KEYS[:3]
        assert "widened" not in e.wb.read_log()
        assert metric(port, widened) == 0
        # Over the limit (user 1: three teams > 2): widened to team:*:members.
        e.setkeys(*TEAM_KEYS)
        e.q("UPDATE users SET name = 'Ada' WHERE id = 1")
        wait_until(lambda: not e.existing(TEAM_KEYS), 20, "every member list (widened)")
        barrier(e.db, e.r)
        assert e.r.exists("unrelated:1") and e.r.exists("team:10:other")
        log = e.wb.read_log()
        assert re.search(r"1 lookup\(s\) returned more rows than their rule's limit", log), \
            log[-2000:]
        wait_until(lambda: metric(port, widened) == 1, 10, "walbust_widened_total to count it")
        assert metric(port, "walbust_lookup_queries_total") == 2
        assert metric(port, "walbust_lookup_errors_total") == 0
    finally:
        e.close()


def test_failing_lookup_is_retried_and_never_confirmed_past():
    """The join table is renamed away: the lookup fails, is retried with
    backoff, nothing of the batch is applied and the slot's confirmed
    position does not pass the change; after the table is renamed back the
    invalidations are applied without loss and the slot moves on."""
    e = Env("retry", 3, [user_rule(), MEMBER_RULE, USER_KEY_RULE])
    try:
        e.seed([1], [10, 11, 12], [(10, 1), (11, 1), (12, 1)])
        port = free_port()
        e.start(metrics_port=port)
        barrier(e.db, e.r)
        e.setkeys(*TEAM_KEYS, "user:1")
        e.q("ALTER TABLE team_members RENAME TO team_members_away")
        before = sql(e.db, "SELECT pg_current_wal_lsn()::text", fetch=True)[0][0]
        e.q("UPDATE users SET name = 'Ada' WHERE id = 1")
        wait_until(lambda: e.wb.read_log().count("retrying in") >= 3, 30,
                   "the failing lookup to be retried 3 times")
        log = e.wb.read_log()
        assert "team_members" in log and "does not exist" in log, log[-2000:]
        assert metric(port, "walbust_lookup_errors_total") >= 3
        # Held: nothing of the batch applied, nothing confirmed past it.
        deadline = time.time() + 2
        while time.time() < deadline:
            assert e.existing(TEAM_KEYS[:3] + ["user:1"]) == TEAM_KEYS[:3] + ["user:1"]
            conf = slot_confirmed(e.db)
            assert lsn_le(e.db, conf, before), f"confirmed {conf} passed {before}"
            time.sleep(0.1)
        after = sql(e.db, "SELECT pg_current_wal_lsn()::text", fetch=True)[0][0]
        e.q("ALTER TABLE team_members_away RENAME TO team_members")
        wait_until(lambda: not e.existing(TEAM_KEYS[:3] + ["user:1"]), 40,
                   "the held invalidations after the fix")
        assert e.r.exists("team:13:members")
        wait_until(lambda: lsn_le(e.db, after, slot_confirmed(e.db)), 20,
                   "the slot to confirm past the change")
        assert "lookups succeeded after" in e.wb.read_log()
    finally:
        e.close()


def test_sighup_adds_a_lookup_rule():
    """Rules without lookups, then SIGHUP with a lookup rule: the reloaded
    rules run it (the executor is created on reload)."""
    e = Env("reload", 5, [MEMBER_RULE, USER_KEY_RULE])
    try:
        e.seed([1], [10, 11, 12], [(10, 1), (11, 1)])
        e.start()
        e.setkeys(*TEAM_KEYS, "user:1")
        e.q("UPDATE users SET name = 'Ada' WHERE id = 1")
        wait_until(lambda: not e.r.exists("user:1"), 20, "user:1 invalidated")
        barrier(e.db, e.r)
        assert e.existing(TEAM_KEYS) == TEAM_KEYS
        with open(e.rules, "w") as f:
            json.dump({"rules": [user_rule(), MEMBER_RULE, USER_KEY_RULE, BARRIER_RULE]}, f)
        e.wb.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "rules reloaded" in e.wb.read_log(), 20, "the reload")
        e.q("UPDATE users SET name = 'Bea' WHERE id = 1")
        wait_until(lambda: not e.existing(TEAM_KEYS[:2]), 20, "teams 10 and 11 invalidated")
        barrier(e.db, e.r)
        assert e.existing(TEAM_KEYS) == TEAM_KEYS[2:]
    finally:
        e.close()


def test_decode_dry_run_runs_lookups():
    """decode --rules lists lookup-derived keys beside the direct ones, with
    the lookup run against the database as it is now; nothing touches
    Redis; a failing lookup is reported on the line."""
    e = Env("decode", 4, [user_rule(), MEMBER_RULE, USER_KEY_RULE])
    try:
        e.seed([1], [10, 11], [(10, 1), (11, 1)])
        e.q("SELECT pg_create_logical_replication_slot('dec', 'pgoutput')")
        e.setkeys(*TEAM_KEYS)
        e.q("UPDATE users SET name = 'Ada' WHERE id = 1")
        until = sql(e.db, "SELECT pg_current_wal_lsn()::text", fetch=True)[0][0]

        def decode():
            p = subprocess.run([BIN, "decode", "--pg", dsn(e.db), "--rules", e.rules, "--slot",
                                "dec", "--publication", "walbust", "--until", until],
                               capture_output=True, text=True, timeout=60)
            assert p.returncode == 0, (p.returncode, p.stderr)
            return [json.loads(ln) for ln in p.stdout.splitlines() if ln.strip()]

        lines = decode()
        assert [ln["op"] for ln in lines] == ["update"], lines
        inv = lines[0]["invalidations"]
        assert inv["keys"] == ["user:1", "team:10:members", "team:11:members"], inv
        assert "lookup_error" not in inv, inv
        assert e.existing(TEAM_KEYS) == TEAM_KEYS, "decode touched Redis"
        e.q("ALTER TABLE team_members RENAME TO team_members_away")
        inv = decode()[0]["invalidations"]
        assert inv["keys"] == ["user:1"], inv
        assert "team_members" in inv["lookup_error"], inv
    finally:
        e.close()
        sql("postgres", "SELECT pg_drop_replication_slot('dec') FROM pg_replication_slots "
                        "WHERE slot_name = 'dec' AND database = %s", (e.db,))


def check(db, rules):
    path = write_rules({"rules": rules})
    p = subprocess.run([BIN, "check", "--rules", path, "--pg", dsn(db)], capture_output=True,
                       text=True, timeout=60)
    return p.returncode, p.stdout + p.stderr, path


def test_check_pg_prepares_lookups():
    """check --pg prepares each lookup: bad SQL, parameter count, unknown
    and ambiguous placeholders are problems with file:line:column; a lookup
    over a table without a rule of its own is a warning."""
    db = fresh_db("lookup_e2e_check")
    sql(db, SCHEMA)
    sql(db, "CREATE PUBLICATION walbust FOR TABLE users, teams, team_members")
    try:
        rc, out, path = check(db, [user_rule(), MEMBER_RULE])
        assert rc == 0, out
        assert "ok (2 rules" in out and "warning" not in out, out

        rc, out, path = check(db, [user_rule()])
        assert rc == 0, out
        assert re.search(re.escape(path) + r":\d+:\d+: warning: .*reads public\.team_members, "
                         r"which has no rule of its own", out), out

        # A partitioned join table: the plan scans partitions, the rule
        # names the partitioned table; no warning.
        sql(db, "CREATE TABLE tm_part(team_id int, user_id int, PRIMARY KEY (team_id, user_id)) "
                "PARTITION BY HASH (user_id); "
                "CREATE TABLE tm_part_0 PARTITION OF tm_part FOR VALUES WITH (MODULUS 2, "
                "REMAINDER 0); CREATE TABLE tm_part_1 PARTITION OF tm_part FOR VALUES WITH "
                "(MODULUS 2, REMAINDER 1); ALTER PUBLICATION walbust ADD TABLE tm_part")
        part = user_rule()
        part["lookup"]["sql"] = "SELECT team_id FROM public.tm_part WHERE user_id = $1"
        rc, out, path = check(db, [part, {"table": "public.tm_part",
                                          "keys": ["team:{team_id}:members"]}])
        assert rc == 0 and "warning" not in out, out
        rc, out, path = check(db, [part])
        assert rc == 0 and "reads public.tm_part_0, which has no rule" in out, out

        bad = user_rule()
        bad["lookup"]["sql"] = "SELECT team_id FROM public.team_membrs WHERE user_id = $1"
        rc, out, path = check(db, [bad, MEMBER_RULE])
        assert rc == 1, out
        assert re.search(re.escape(path) + r":\d+:\d+: rule for public.users: the lookup's SQL "
                         r"does not prepare: .*team_membrs.* does not exist", out), out

        bad = user_rule()
        bad["lookup"]["sql"] = "SELECT team_id FROM public.team_members WHERE user_id = $1::int + 0*length($1)"
        rc, out, path = check(db, [bad, MEMBER_RULE])
        assert rc == 1 or "ok" in out, out  # type errors are PostgreSQL's to report

        bad = user_rule()
        bad["keys"] = ["team:{teamid}:members"]
        rc, out, path = check(db, [bad, MEMBER_RULE])
        assert rc == 1 and "{teamid}" in out and "neither a column of the lookup's result " \
            "(team_id) nor of public.users" in out, out

        bad = user_rule()
        bad["lookup"]["sql"] = "SELECT team_id AS id FROM public.team_members WHERE user_id = $1"
        bad["keys"] = ["team:{id}:members"]
        rc, out, path = check(db, [bad, MEMBER_RULE])
        assert rc == 1 and "is ambiguous" in out, out
    finally:
        pass


def main():
    if not BIN or not os.access(BIN, os.X_OK):
        print(f"WALBUST_BIN is not an executable walbust ({BIN!r}); run make first")
        sys.exit(1)
    t = Runner("test_lookup")
    for fn in (test_fan_out_exactly_the_users_teams, test_many_distinct_lookups_in_one_batch,
               test_over_limit_widens_to_pattern,
               test_failing_lookup_is_retried_and_never_confirmed_past,
               test_sighup_adds_a_lookup_rule, test_decode_dry_run_runs_lookups,
               test_check_pg_prepares_lookups):
        if not sys.argv[1:] or any(a in fn.__name__ for a in sys.argv[1:]):
            t.run(fn)
    t.done()


if __name__ == "__main__":
    main()
