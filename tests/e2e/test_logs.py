"""Logs an operator and a log shipper can use.

- with --log-format json, rules-file problems at start-up and on SIGHUP are
  JSON events carrying the problem text (every stderr line is JSON);
- a refused reload says it keeps the previous rules, never "refusing to
  start ... then restart";
- start-up logs the slot's real position, and a stop before Redis
  acknowledged names the position it will replay from, never 0/0;
- `decode` prints logical messages of any prefix.
"""
import base64
import json
import os
import re
import signal
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (BARRIER_RULE, BARRIER_SQL, BIN, REDIS_PORT, Runner, Walbust, barrier, dsn,
                     fresh_db, redis_client, sql, wait_until, write_rules)
from faultkit import free_port

DB = "walbust_logs"
SLOT = "logs"
GOOD = {"rules": [{"table": "items", "keys": ["log:{id}"]}, BARRIER_RULE]}
MALFORMED = '{\n  "rules": [\n    {"table": "items", "keys": ["a:{id}"],,}\n  ]\n}\n'
BAD_COLUMN = {"rules": [{"table": "items", "keys": ["log:{nosuchcol}"]}, BARRIER_RULE]}


def setup():
    fresh_db(DB)
    sql(DB, "CREATE TABLE items(id bigint PRIMARY KEY, v int)")
    sql(DB, BARRIER_SQL)
    sql(DB, "CREATE PUBLICATION walbust FOR TABLE items, walbust_barrier")


def json_lines(text):
    """Every non-empty line parsed as JSON (fails on a plain-text line)."""
    out = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"not a JSON log line: {line!r}\nin:\n{text}")
    return out


def msgs(events, level=None):
    return [e["msg"] for e in events if level is None or e["level"] == level]


def run_json(rules, extra=None):
    w = Walbust(DB, rules, slot=SLOT, extra=["--log-format", "json"] + (extra or []))
    return w


def test_json_startup_problems():
    setup()
    path = write_rules({})
    with open(path, "w") as f:
        f.write(MALFORMED)
    p = subprocess.run([BIN, "run", "--log-format", "json", "--metrics", "off", "--rules", path,
                        "--pg", dsn(DB), "--slot", SLOT], capture_output=True, text=True,
                       timeout=30)
    assert p.returncode == 1, p.stderr
    errors = msgs(json_lines(p.stderr), "error")
    assert any(re.match(rf"{re.escape(path)}:3:\d+: .*JSON", m) for m in errors), errors
    assert not any("problems above" in m for m in errors), errors

    # A catalog problem (a column that does not exist) at start-up.
    path = write_rules(BAD_COLUMN)
    p = subprocess.run([BIN, "run", "--log-format", "json", "--metrics", "off", "--rules", path,
                        "--pg", dsn(DB), "--slot", SLOT, "--create-slot",
                        "--redis", f"redis://127.0.0.1:{REDIS_PORT}"],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 1, p.stderr
    errors = msgs(json_lines(p.stderr), "error")
    assert any(m.startswith(f"{path}:") and "nosuchcol" in m for m in errors), errors
    assert any(m.startswith("refusing to start") for m in errors), errors
    sql("postgres", "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
        "WHERE slot_name = %s AND NOT active", (SLOT,))


def test_json_reload_problems():
    setup()
    path = write_rules(GOOD)
    w = run_json(path).start()
    r = redis_client()
    try:
        w.wait_streaming()
        # A file that does not parse.
        with open(path, "w") as f:
            f.write(MALFORMED)
        w.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "rules reload failed" in w.read_log(), 20, "the reload to fail")
        # Rules that parse but name a column the table lacks.
        with open(path, "w") as f:
            json.dump(BAD_COLUMN, f)
        w.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "rules reload refused" in w.read_log(), 20, "the reload refusal")
        # Still running on the previous rules.
        r.set("log:5", "cached")
        sql(DB, "INSERT INTO items VALUES (5, 0)")
        barrier(DB, r)
        assert not r.exists("log:5")
        assert w.stop() == 0
        events = json_lines(w.read_log())
        errors = msgs(events, "error")
        assert any(re.match(rf"{re.escape(path)}:3:\d+: .*JSON", m) for m in errors), errors
        assert any(m.startswith(f"{path}:") and "nosuchcol" in m for m in errors), errors
        failed = [m for m in errors if m.startswith("rules reload failed")]
        refused = [m for m in errors if m.startswith("rules reload refused")]
        assert len(failed) == 1 and "keeping the previous rules" in failed[0], failed
        assert len(refused) == 1 and "keeping the previous rules" in refused[0], refused
        for m in errors:
            assert "refusing to start" not in m and "then restart" not in m, m
            assert "problems above" not in m, m
    finally:
        if w.alive():
            w.proc.kill()
        sql("postgres", "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
            "WHERE slot_name = %s AND NOT active", (SLOT,))


def slot_lsn():
    rows = sql(DB, "SELECT confirmed_flush_lsn::text FROM pg_replication_slots "
                   "WHERE slot_name = %s", (SLOT,), fetch=True)
    return rows[0][0]


def test_real_slot_position():
    setup()
    path = write_rules(GOOD)
    sql(DB, f"SELECT pg_create_logical_replication_slot('{SLOT}', 'pgoutput')")
    sql(DB, "INSERT INTO items SELECT g, 0 FROM generate_series(1, 100) g")
    pos = slot_lsn()
    assert pos != "0/0"
    # Redis is not there: the batch cannot be acknowledged before the stop.
    dead = free_port()
    w = Walbust(DB, path, slot=SLOT, redis_urls=[f"redis://127.0.0.1:{dead}"],
                create_slot=False).start()
    try:
        w.wait_streaming()
        log = w.read_log()
        assert f"(slot position {pos})" in log, (pos, log)
        wait_until(lambda: "redis target" in w.read_log() and "failed" in w.read_log(), 20,
                   "the batch to fail")
        assert w.stop() == 0
        log = w.read_log()
        m = re.search(r"it will be replayed from (\S+) on restart", log)
        assert m, log
        assert m.group(1) == pos, (m.group(1), pos)
        assert "0/0" not in m.group(0), m.group(0)
        assert slot_lsn() == pos  # nothing was confirmed past it
    finally:
        if w.alive():
            w.proc.kill()
        sql("postgres", "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
            "WHERE slot_name = %s AND NOT active", (SLOT,))


def test_decode_prints_every_message_prefix():
    setup()
    path = write_rules(GOOD)
    sql(DB, f"SELECT pg_create_logical_replication_slot('{SLOT}', 'pgoutput')")
    sql(DB, "SELECT pg_logical_emit_message(true, 'app', '{\"order\": 7}')")
    sql(DB, "SELECT pg_logical_emit_message(false, 'audit', 'plain text')")
    sql(DB, "SELECT pg_logical_emit_message(true, 'bin', '\\x00ff10'::bytea)")
    sql(DB, "SELECT pg_logical_emit_message(true, 'walbust', "
            "'{\"tags\": [\"t1\"]}')")
    until = sql(DB, "SELECT pg_current_wal_lsn()::text", fetch=True)[0][0]
    p = subprocess.run([BIN, "decode", "--pg", dsn(DB), "--slot", SLOT, "--rules", path,
                        "--until", until], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    lines = [json.loads(l) for l in p.stdout.splitlines() if l.strip()]
    by_prefix = {l["prefix"]: l for l in lines if l.get("op") == "message"}
    assert set(by_prefix) >= {"app", "audit", "bin", "walbust"}, lines
    assert by_prefix["app"]["content"] == {"order": 7}
    assert by_prefix["app"]["transactional"] is True and "xid" in by_prefix["app"]
    assert "invalidations" not in by_prefix["app"]  # the rules act on walbust's only
    assert by_prefix["audit"]["content"] == "plain text"
    assert by_prefix["audit"]["transactional"] is False and "xid" not in by_prefix["audit"]
    assert base64.b64decode(by_prefix["bin"]["content_base64"]) == b"\x00\xff\x10"
    assert "invalidations" in by_prefix["walbust"], by_prefix["walbust"]
    sql("postgres", "SELECT pg_drop_replication_slot(%s)", (SLOT,))


if __name__ == "__main__":
    t = Runner("test_logs")
    t.run(test_json_startup_problems)
    t.run(test_json_reload_problems)
    t.run(test_real_slot_position)
    t.run(test_decode_prints_every_message_prefix)
    t.done()
