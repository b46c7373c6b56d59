"""Keys do not depend on walbust's environment: the replication session's
output settings are pinned (DateStyle ISO, IntervalStyle postgres,
extra_float_digits 3, client_encoding UTF8, the server's own TimeZone), so
the same row renders the same key whether or not walbust runs with PGTZ,
PGDATESTYLE or PGOPTIONS set."""
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (BARRIER_RULE, BARRIER_SQL, BIN, REDIS_PORT, Runner, Walbust, barrier, dsn,
                     fresh_db, sql, write_rules)

import redis

DB = "session_settings"
SLOT = "session_settings"
RDB = 13
TEMPLATE = "ev:{at}|{d}|{iv}|{f}|{ts}"
ODD_ENV = {"PGTZ": "America/New_York", "PGDATESTYLE": "German, DMY",
           "PGOPTIONS": "-c IntervalStyle=iso_8601 -c extra_float_digits=-3"}
ROW = ("'2024-03-01 10:00:00.5+00', '2024-03-01', '1 day 02:03:04.5', 1.0 / 3, "
       "'2024-03-01 10:00:00.25'")


def clean_env(extra=None):
    env = {k: v for k, v in os.environ.items() if k not in ODD_ENV}
    env.update(extra or {})
    return env


def setup():
    fresh_db(DB)
    sql(DB, "CREATE TABLE ev(id int PRIMARY KEY, at timestamptz, d date, iv interval, "
            "f float8, ts timestamp)")
    sql(DB, BARRIER_SQL)
    sql(DB, "CREATE PUBLICATION walbust FOR TABLE ev, walbust_barrier")
    return write_rules({"rules": [{"table": "ev", "on": ["insert"], "keys": [TEMPLATE]},
                                  BARRIER_RULE]})


def expected_key():
    """The key as the server renders the row in its own time zone, ISO."""
    rows = sql(DB, "SELECT format('ev:%s|%s|%s|%s|%s', at, d, iv, f, ts) FROM ev WHERE id = 1",
               fetch=True)
    return rows[0][0]


def decode(rules, until, env):
    out = subprocess.run([BIN, "decode", "--pg", dsn(DB), "--rules", rules, "--slot", SLOT,
                          "--until", until], capture_output=True, text=True, timeout=60,
                         env=env)
    assert out.returncode == 0, out.stderr
    lines = [json.loads(l) for l in out.stdout.splitlines() if l.strip()]
    inserts = [l for l in lines if l.get("op") == "insert" and l["table"] == "public.ev"]
    assert len(inserts) == 1, lines
    return inserts[0]


def test_same_key_under_any_environment():
    rules = setup()
    sql(DB, f"SELECT pg_create_logical_replication_slot('{SLOT}', 'pgoutput')")
    # The test's own session sees the server's zone: no PGTZ here either.
    sql(DB, f"INSERT INTO ev VALUES (1, {ROW})")
    until = sql(DB, "SELECT pg_current_wal_lsn()::text", fetch=True)[0][0]
    want = expected_key()
    assert "2024-03-01 10:00:00.5" in want and "1 day 02:03:04.5" in want, want
    plain = decode(rules, until, clean_env())
    odd = decode(rules, until, clean_env(ODD_ENV))
    assert plain["invalidations"]["keys"] == [want], (plain, want)
    assert odd["invalidations"]["keys"] == [want], (odd, want)
    assert plain["new"] == odd["new"], (plain["new"], odd["new"])
    print(f"# key under both environments: {want}")
    sql("postgres", "SELECT pg_drop_replication_slot(%s)", (SLOT,))

    # The daemon too: under the odd environment it deletes the key the
    # server's rendering names.
    r = redis.Redis(port=REDIS_PORT, db=RDB, decode_responses=True)
    r.flushdb()
    w = Walbust(DB, rules, slot=SLOT, redis_urls=[f"redis://127.0.0.1:{REDIS_PORT}/{RDB}"],
                env=ODD_ENV)
    w.env = clean_env(ODD_ENV)
    try:
        w.start().wait_streaming()
        r.set(want, "cached")
        sql(DB, f"INSERT INTO ev VALUES (2, {ROW})")  # same values: same key
        barrier(DB, r)
        assert not r.exists(want), f"{want} survived under {ODD_ENV}:\n{w.read_log()}"
        assert w.stop() == 0
    finally:
        if w.alive():
            w.proc.kill()
        sql("postgres", "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
            "WHERE slot_name = %s AND NOT active", (SLOT,))


if __name__ == "__main__":
    t = Runner("test_session_settings")
    t.run(test_same_key_under_any_environment)
    t.done()
