"""Helpers for the fault, error and big-transaction e2e tests.

Private servers (a redis-server the test may kill, stop or restart; a
throwaway PostgreSQL cluster with settings the stack does not have), a free
loopback port, a background writer that records what it committed, and
small readers for walbust's log and /proc. Everything a test starts it
stops again in a finally block.
"""
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time

import psycopg2
import redis

from harness import STACK_DIR, connect, wait_until

PGBIN = os.environ.get("PGBIN", "/usr/lib/postgresql/15/bin")


def free_port():
    """A loopback TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_closed(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return False
    except OSError:
        return True


class RedisServer:
    """A redis-server owned by one test: its own port and --dir, no RDB
    snapshots, AOF only when asked. kill9/terminate/sigstop are real signals
    to the real process."""

    def __init__(self, aof=False, port=None, extra=()):
        self.port = port or free_port()
        self.dir = tempfile.mkdtemp(prefix="redis-", dir=STACK_DIR)
        self.aof = aof
        self.extra = list(extra)  # more redis-server arguments, e.g. --replicaof
        self.proc = None

    def start(self):
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                "--dir", self.dir, "--save", "", "--appendonly", "yes" if self.aof else "no",
                "--logfile", os.path.join(self.dir, "redis.log"), "--daemonize", "no",
                *self.extra]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: self.ping() or self.proc.poll() is not None, 10, "redis-server to start")
        assert self.proc.poll() is None, f"redis-server exited with {self.proc.returncode}"
        return self

    def url(self, db=0):
        return f"redis://127.0.0.1:{self.port}/{db}"

    def client(self, timeout=None):
        return redis.Redis(host="127.0.0.1", port=self.port, decode_responses=True,
                           socket_timeout=timeout, socket_connect_timeout=timeout)

    def ping(self, timeout=0.5):
        try:
            return self.client(timeout).ping()
        except (redis.ConnectionError, redis.TimeoutError, OSError):
            return False

    def _signal(self, sig, expect_rc):
        self.proc.send_signal(sig)
        self.proc.wait(15)
        assert self.proc.returncode == expect_rc, (sig, self.proc.returncode)
        assert not self.ping(), "redis still answers after it was killed"

    def kill9(self):
        self._signal(signal.SIGKILL, -signal.SIGKILL)

    def terminate(self):
        """SIGTERM: redis shuts down cleanly (no snapshot: --save '')."""
        self._signal(signal.SIGTERM, 0)

    def sigstop(self):
        self.proc.send_signal(signal.SIGSTOP)

    def sigcont(self):
        self.proc.send_signal(signal.SIGCONT)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(15)
        shutil.rmtree(self.dir, ignore_errors=True)


def as_pg(args):
    """Run a PostgreSQL server binary as the postgres OS user when root
    (initdb and postgres refuse to run as root), like scripts/stack."""
    if os.getuid() == 0:
        return ["runuser", "-u", "postgres", "--"] + args
    return args


class PgCluster:
    """A throwaway PostgreSQL cluster (initdb + pg_ctl) on a free port, with
    extra postgresql.conf settings, e.g. {"wal_level": "replica"}."""

    def __init__(self, settings):
        self.dir = tempfile.mkdtemp(prefix="pgcluster-", dir=STACK_DIR)
        self.data = os.path.join(self.dir, "data")
        self.port = free_port()
        self.settings = settings
        if os.getuid() == 0:
            shutil.chown(self.dir, "postgres")

    def start(self):
        subprocess.run(as_pg([f"{PGBIN}/initdb", "-D", self.data, "-U", "postgres", "--auth=trust",
                              "--no-sync", "-E", "UTF8", "--locale=C.UTF-8"]),
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        conf = {"listen_addresses": "'127.0.0.1'", "port": str(self.port),
                "unix_socket_directories": f"'{self.dir}'", "fsync": "off",
                "max_wal_senders": "4", "max_replication_slots": "4"}
        conf.update(self.settings)
        with open(os.path.join(self.data, "postgresql.auto.conf"), "w") as f:
            for k, v in conf.items():
                f.write(f"{k} = {v}\n")
        subprocess.run(as_pg([f"{PGBIN}/pg_ctl", "-D", self.data, "-l",
                              os.path.join(self.dir, "postgres.log"), "-w", "-t", "60", "start"]),
                       check=True, stdout=subprocess.DEVNULL)
        return self

    def dsn(self, db="postgres"):
        return f"host=127.0.0.1 port={self.port} user=postgres dbname={db}"

    def stop(self):
        if os.path.exists(os.path.join(self.data, "postmaster.pid")):
            subprocess.run(as_pg([f"{PGBIN}/pg_ctl", "-D", self.data, "-m", "immediate", "-w",
                                  "stop"]), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        shutil.rmtree(self.dir, ignore_errors=True)


class Writer(threading.Thread):
    """Small transactions updating random rows of `table` (ids drawn from
    pool, default 1..nrows), one at a time, as fast as PostgreSQL takes them. Each committed
    transaction is recorded as (lsn, ids, commit_wallclock) where lsn is the
    WAL insert position taken inside the transaction just before COMMIT: the
    commit's end LSN is strictly greater."""

    def __init__(self, db, nrows, table="items", seed=None, pool=None):
        super().__init__(daemon=True)
        self.db, self.nrows, self.table = db, nrows, table
        self.rnd = random.Random(seed)
        self.set_pool(pool if pool is not None else range(1, nrows + 1))
        self.txns = []
        self.error = None
        self._halt = threading.Event()

    def set_pool(self, pool, fresh=False):
        """Draw the ids of the next transactions from pool. fresh: take
        each id once (in random order) while any is left, so that an
        invalidation lost in this phase is not repaired by a later write of
        the same row; then draw at random."""
        pool = sorted(pool)
        queue = list(pool) if fresh else []
        self.rnd.shuffle(queue)
        self._draw = (pool, queue)  # one assignment: the thread sees old or new

    def _ids(self):
        pool, queue = self._draw
        n = self.rnd.randint(1, 2)
        if len(queue) >= n:
            return sorted(queue.pop() for _ in range(n))
        return sorted(self.rnd.sample(pool, n))

    def run(self):
        conn = connect(self.db, autocommit=False)
        try:
            with conn.cursor() as cur:
                while not self._halt.is_set():
                    ids = self._ids()
                    cur.execute(f"UPDATE {self.table} SET v = v + 1 WHERE id = ANY(%s)", (ids,))
                    cur.execute("SELECT pg_current_wal_insert_lsn() - '0/0'::pg_lsn")
                    lsn = int(cur.fetchone()[0])
                    conn.commit()
                    self.txns.append((lsn, ids, time.time()))
        except psycopg2.Error as e:
            self.error = e
        finally:
            conn.close()

    def count(self):
        return len(self.txns)

    def wait_more(self, n, timeout=30):
        """Wait until n more transactions committed than now."""
        target = self.count() + n
        wait_until(lambda: self.count() >= target or self.error is not None, timeout,
                   f"writer to commit {n} more transactions")
        assert self.error is None, f"writer failed: {self.error}"

    def finish(self):
        self._halt.set()
        self.join(30)
        assert not self.is_alive(), "writer did not stop"
        assert self.error is None, f"writer failed: {self.error}"
        return self.txns

    def written(self, since_lsn=None):
        """Ids written by transactions whose commit ends after since_lsn."""
        out = set()
        for lsn, ids, _ in self.txns:
            if since_lsn is None or lsn >= since_lsn:
                out.update(ids)
        return out


def lsn_int(text):
    hi, lo = text.split("/")
    return (int(hi, 16) << 32) | int(lo, 16)


def current_lsn(db):
    conn = connect(db)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn")
            return int(cur.fetchone()[0])
    finally:
        conn.close()


def proc_status(pid, field):
    """A kB field of /proc/<pid>/status (VmHWM, VmRSS)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"{field} not in /proc/{pid}/status")


def log_matches(walbust, pattern):
    return re.findall(pattern, walbust.read_log())
