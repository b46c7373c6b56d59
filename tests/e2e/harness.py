"""Shared helpers for walbust end-to-end tests (real PostgreSQL and Redis).

The servers come from scripts/stack (tests/run starts them and exports
PGHOST/PGPORT/REDIS_PORT/...). Each test module works in its own database,
publication and slot so modules cannot disturb each other. Every wait is a
bounded loop that fails the test when its deadline passes.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.error
import urllib.request

import psycopg2
import redis

BIN = os.environ.get("WALBUST_BIN")
SRC = os.environ.get("WALBUST_SRC", os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
PGHOST = os.environ.get("PGHOST", "127.0.0.1")
PGPORT = int(os.environ.get("PGPORT", "5432"))
REDIS_PORT = int(os.environ.get("REDIS_PORT", "6379"))
STACK_DIR = os.environ.get("STACK_DIR", "/tmp")


def dsn(db):
    return f"host={PGHOST} port={PGPORT} user=postgres dbname={db}"


def connect(db, autocommit=True):
    conn = psycopg2.connect(dsn(db))
    conn.autocommit = autocommit
    return conn


def sql(db_or_conn, query, args=None, fetch=False):
    own = isinstance(db_or_conn, str)
    conn = connect(db_or_conn) if own else db_or_conn
    try:
        with conn.cursor() as cur:
            cur.execute(query, args)
            if fetch:
                return cur.fetchall()
    finally:
        if own:
            conn.close()


def forget_slots_of(name):
    """Delete what walbust keeps in Redis (every db of the stack's Redis)
    about slots on database `name`: its mark walbust:slot:<slot> names the
    database, and the watermark walbust:confirmed:<slot> goes with it. A
    dropped database is a new deployment; without this walbust would
    rightly call the next test's slot of the same name a lost slot."""
    for db in range(16):
        try:
            r = redis.Redis(host="127.0.0.1", port=REDIS_PORT, db=db, decode_responses=True)
            for mark in r.scan_iter("walbust:slot:*"):
                value = r.get(mark) or ""
                if value.endswith(f" database={name}"):
                    slot = mark[len("walbust:slot:"):]
                    r.delete(mark, f"walbust:confirmed:{slot}")
            r.close()
        except redis.RedisError:
            return  # no Redis here (a test with its own servers)


def fresh_db(name):
    """Drop and create database `name` (its slots are dropped first, and
    walbust's record of them in Redis)."""
    admin = connect("postgres")
    with admin.cursor() as cur:
        cur.execute("SELECT slot_name, active_pid FROM pg_replication_slots WHERE database = %s", (name,))
        for slot, pid in cur.fetchall():
            if pid:
                cur.execute("SELECT pg_terminate_backend(%s)", (pid,))
                time.sleep(0.2)
            cur.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
        cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        forget_slots_of(name)
        cur.execute(f'CREATE DATABASE "{name}"')
    admin.close()
    return name


def free_port():
    """A loopback TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port):
    """walbust's /metrics on port as {"name{labels}": value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    values = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, value = line.rsplit(" ", 1)
        values[name] = float(value)
    return values


def readyz(port):
    """(status, body) of GET /readyz on port."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def redis_client(db=0):
    return redis.Redis(host="127.0.0.1", port=REDIS_PORT, db=db, decode_responses=True)


def wait_until(fn, timeout=20.0, what="condition", interval=0.02):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def write_rules(obj):
    fd, path = tempfile.mkstemp(suffix=".json", prefix="walbust-rules-", dir=STACK_DIR)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2)
    return path


class Walbust:
    """A walbust process with its log in a file."""

    def __init__(self, db, rules, slot="walbust", publication="walbust", redis_urls=None,
                 extra=None, create_slot=True, cmd="run", env=None):
        self.db = db
        self.args = [BIN, cmd, "--pg", dsn(db), "--rules", rules, "--slot", slot,
                     "--publication", publication, "--log-level", "debug"]
        if cmd == "run":
            self.args += ["--metrics", "off"]
            for url in (redis_urls or [f"redis://127.0.0.1:{REDIS_PORT}"]):
                self.args += ["--redis", url]
            if create_slot:
                self.args.append("--create-slot")
        self.args += extra or []
        fd, self.log_path = tempfile.mkstemp(suffix=".log", prefix="walbust-", dir=STACK_DIR)
        os.close(fd)
        self.env = dict(os.environ, **(env or {}))
        self.proc = None

    def start(self):
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.args, stdout=self.log, stderr=subprocess.STDOUT, env=self.env)
        return self

    def wait_streaming(self, timeout=20):
        wait_until(lambda: "streaming from" in self.read_log() or self.proc.poll() is not None,
                   timeout, "walbust to start streaming")
        if self.proc.poll() is not None:
            raise AssertionError(f"walbust exited with {self.proc.returncode}:\n{self.read_log()}")
        return self

    def read_log(self):
        with open(self.log_path, "r", errors="replace") as f:
            return f.read()

    def stop(self, timeout=20):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError("walbust did not stop on SIGTERM")
        if self.proc:
            self.log.close()
        return self.proc.returncode if self.proc else None

    def kill9(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.log.close()
        assert self.proc.returncode == -signal.SIGKILL, self.proc.returncode

    def alive(self):
        return self.proc is not None and self.proc.poll() is None


def slot_confirmed(db, slot="walbust"):
    rows = sql(db, "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name=%s",
               (slot,), fetch=True)
    return rows[0][0] if rows else None


def barrier(db, r, table="walbust_barrier", timeout=30):
    """Commit a row into a barrier table whose rule invalidates barrier:<n>;
    once that key is gone, everything committed before it was applied
    (transactions are applied in commit order)."""
    token = f"{time.time_ns()}"
    r.set(f"barrier:{token}", "1")
    sql(db, f"INSERT INTO {table}(token) VALUES (%s)", (token,))
    wait_until(lambda: not r.exists(f"barrier:{token}"), timeout, "barrier key invalidation")


BARRIER_SQL = "CREATE TABLE IF NOT EXISTS walbust_barrier(id bigserial PRIMARY KEY, token text)"
BARRIER_RULE = {"table": "walbust_barrier", "on": ["insert"], "keys": ["barrier:{token}"]}


class Runner:
    """Tiny TAP-style runner: each test is a function; failures are counted.

    WALBUST_TEST="test_a,test_b" (set by `tests/run e2e FILE::test_a,test_b`)
    runs only the functions with those names; the file's set-up and
    clean-up still run. Naming a function the file does not run fails."""

    def __init__(self, name):
        self.name = name
        self.n = 0
        self.failed = 0
        self.only = {t for t in os.environ.get("WALBUST_TEST", "").split(",") if t}
        self.seen = set()

    def run(self, fn):
        self.seen.add(fn.__name__)
        if self.only and fn.__name__ not in self.only:
            return
        self.n += 1
        t0 = time.time()
        try:
            fn()
            print(f"ok {self.n} - {fn.__name__} ({time.time() - t0:.1f}s)", flush=True)
        except Exception:
            self.failed += 1
            print(f"not ok {self.n} - {fn.__name__}", flush=True)
            traceback.print_exc()
            sys.stdout.flush()

    def done(self):
        unknown = sorted(self.only - self.seen)
        if unknown:
            self.n += 1
            self.failed += 1
            print(f"not ok {self.n} - WALBUST_TEST names {', '.join(unknown)}, which "
                  f"{self.name} does not have; its tests: {', '.join(sorted(self.seen))}")
        print(f"1..{self.n}")
        if self.failed:
            print(f"# {self.name}: {self.failed} of {self.n} failed")
            sys.exit(1)
