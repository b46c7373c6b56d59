#!/usr/bin/python3
"""Randomized fault campaign: walbust loses no invalidation (docs/guarantees.md, guarantees 2-3).

    tests/faults/campaign.py [--rounds 20] [--txns 2600] [--seed N] [--broken]
                             [--kinds k1,k2] [--faults-per-round 2] [--targets 1]
                             [--cluster | --sentinel] [--tls] [--bin PATH]

Starts its own stack (scripts/stack start in a temp dir: PostgreSQL 15 and,
owned by the campaign, one redis-server with AOF on /dev/shm per Redis
target), TCP proxies (tests/faults/proxy.py) between walbust and every
server, and walbust itself. With --targets N walbust writes to N Redis
servers (--redis repeated); each is filled and checked on its own, and each
Redis fault hits one of them at random.
With --cluster walbust's target is a 3-master Redis Cluster (scripts/cluster,
one replica per master, reached directly: no proxy) instead; the fault kinds
are then walbust_kill9, pg_restart, walsender_kill and cluster_master_kill
(SIGKILL one master, wait for its replica's promotion and cluster_state:ok,
restart the old node and wait until it has rejoined as a replica), and the
checker reads the keys through redis-py's RedisCluster.
With --sentinel walbust's target is a Sentinel deployment (scripts/sentinel:
a master, a replica and three Sentinels; no proxy) reached with
redis+sentinel://...?replicas=1; the fault kinds are walbust_kill9,
pg_restart, walsender_kill, sentinel_failover (SENTINEL FAILOVER),
sentinel_master_kill (SIGKILL the master, wait for the promotion, restart
the killed node empty as the new master's replica) and sentinel_master_held
(SIGSTOP the master while invalidations of walbust's wait unread in its
socket, SIGKILL walbust and then the master, restart both), each verified by a barrier key that walbust must
invalidate on the new master; the checker reads the master the Sentinels
name.
With --tls every Redis target also listens on a TLS port that requires a
client certificate (certificates made with the openssl CLI in the
campaign's directory) and walbust reaches it with rediss://...?cacert=&cert=
&key= through the proxy (which then carries TLS records: a cut connection
is cut mid-record); the checker uses the plain port.
Then, per round:

1. fill     with no writes running and walbust caught up, cache a value for
            every key the rules can produce: c:item:<id> for every id of the
            id space (rows that exist and rows that do not: an insert must
            invalidate a cached "no such row"), c:ver:<id> = 0, the members
            c:gm:<g>:0/1 of every tag set t:grp:<g>, c:side:<id>;
2. storm    several writer connections, each owning the ids = k mod W (so
            writers never wait on each other's row locks), run mixed
            transactions: single and multi-row inserts, updates (also of the
            group column, and of the primary key), deletes,
            walbust.invalidate / invalidate_tag calls, rolled-back
            transactions, savepoints rolled back past an invalidate call, and
            (writer 0) inserts into and TRUNCATE of a side table. Meanwhile
            a fault thread injects faults at random moments and verifies each
            really happened; a subscriber listens on the publish channel;
3. quiesce  writers stopped, faults healed: wait until the slot's
            confirmed_flush_lsn is at or past pg_current_wal_lsn() taken after
            the last commit. By docs/guarantees.md guarantee 2 every invalidation of every commit
            before it is now in Redis;
4. check    from the exact record of what each committed transaction touched
            (old and new ids of key changes, old and new groups): every key
            of a touched row is gone, every version counter of a changed row
            moved, every tag set of a touched group and its members are gone,
            side keys are gone after a TRUNCATE; every key of a row no
            committed transaction touched is still cached and its counter is
            still 0 (no over-invalidation), and every publish of a commit made
            while the current subscriber was subscribed was received, matched
            by (xid, key); no publish carries the xid of a rolled-back
            transaction. Then a barrier (a committed row whose key must go)
            tells "missed at the confirmed position" from "lost for good".

A Redis restart that loses its data is followed by a re-seed of every key,
as an application refilling its cache would; the checker then demands only
that keys of rows written after the re-seed finished (taken as a WAL
position before each transaction's COMMIT) are gone. A restart from the AOF
(appendfsync always) must bring back every key that was not invalidated, and
walbust must still invalidate the ones written since. A restart from an older
copy of the AOF (Redis lost writes it had acknowledged) starts a new epoch
at the slot's confirmed position once walbust saw the failure.

Migrations are fault kinds too: ddl_add_drop_column (a column of items added
and dropped under the storm) and ddl_swap_table (the rename-swap of the side
rules table under writes to it; walbust must put the new table back into the
managed publication and invalidate its whole coverage, checked like a
TRUNCATE of side).

--broken runs build/broken/walbust (`make broken`: confirms the LSN when the
COMMIT is decoded, before Redis acknowledged, past the watermark gate and
the slot-ahead-of-watermark check that would otherwise hold it back) through
kill -9 faults (with --sentinel: sentinel_master_held and walbust_kill9) and
must report missed invalidations: exit status 0 only when it did (proof that
the checker sees a loss). Otherwise the exit status is 0 only when every round
had no missed and no over-invalidation and every fault was verified.
"""
import argparse
import hashlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter

import psycopg2
import redis
import redis.cluster

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
import proxy as proxyctl  # noqa: E402

PGBIN = os.environ.get("PGBIN", "/usr/lib/postgresql/15/bin")
DB = "campaign"
SLOT = "campaign"
PUB = "campaign"
CHAN = "c:chan"
NSIDE = 300
GROUP_MEMBERS = 2

KINDS = ["walbust_kill9", "kill9_redis_slow", "kill9_redis_held", "walbust_sigterm",
         "redis_sigstop", "redis_restart_empty", "redis_restart_aof", "redis_restart_lagging", "pg_restart",
         "pg_crash",
         "walsender_kill", "pg_proxy_cut", "pg_proxy_slow", "pg_proxy_blackhole",
         "redis_proxy_cut", "redis_proxy_slow", "redis_proxy_blackhole",
         "ddl_add_drop_column", "ddl_swap_table"]

CLUSTER_KINDS = ["walbust_kill9", "pg_restart", "walsender_kill", "cluster_master_kill"]

SENTINEL_KINDS = ["walbust_kill9", "pg_restart", "walsender_kill", "sentinel_failover",
                  "sentinel_master_kill", "sentinel_master_held"]

RULES = {
    "defaults": {"tag_prefix": "t:"},
    "rules": [
        {"table": "public.items", "keys": ["c:item:{id}"], "tags": ["grp:{grp}"],
         "versions": ["c:ver:{id}"], "publish": [CHAN]},
        {"table": "public.side", "keys": ["c:side:{id}"]},
        {"table": "public.cbarrier", "on": ["insert"], "keys": ["c:barrier:{token}"]},
    ],
}


def log(msg):
    print(f"# {time.strftime('%H:%M:%S')} {msg}", flush=True)


def wait_until(fn, timeout, what, interval=0.05):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def as_pg(args):
    return (["runuser", "-u", "postgres", "--"] + args) if os.getuid() == 0 else args


def lsn_text(n):
    return f"{n >> 32:X}/{n & 0xFFFFFFFF:X}"


# ---- servers -------------------------------------------------------------


class Postgres:
    """The stack's PostgreSQL: queries on fresh connections that ride out a
    restart (retried for up to `timeout` seconds)."""

    def __init__(self, stack):
        self.stack = stack
        self.port = int(stack.env["PG_PORT"])
        self.data = os.path.join(stack.dir, "pgdata")

    def dsn(self, db=DB, port=None):
        return f"host=127.0.0.1 port={port or self.port} user=postgres dbname={db}"

    def connect(self, db=DB, autocommit=True):
        conn = psycopg2.connect(self.dsn(db), connect_timeout=5)
        conn.autocommit = autocommit
        return conn

    def q(self, query, args=None, db=DB, timeout=90):
        deadline = time.time() + timeout
        while True:
            try:
                conn = self.connect(db)
                try:
                    with conn.cursor() as cur:
                        cur.execute(query, args)
                        return cur.fetchall() if cur.description else None
                finally:
                    conn.close()
            except psycopg2.OperationalError:
                if time.time() > deadline:
                    raise
                time.sleep(0.2)

    def wal_lsn(self):
        return int(self.q("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn")[0][0])

    def insert_lsn(self):
        return int(self.q("SELECT pg_current_wal_insert_lsn() - '0/0'::pg_lsn")[0][0])

    def slot(self):
        rows = self.q("SELECT active_pid, confirmed_flush_lsn - '0/0'::pg_lsn FROM "
                      "pg_replication_slots WHERE slot_name = %s", (SLOT,))
        return (rows[0][0], int(rows[0][1] or 0)) if rows else (None, 0)

    def postmaster_pid(self):
        with open(os.path.join(self.data, "postmaster.pid")) as f:
            return int(f.readline())

    def ctl(self, *args):
        subprocess.run(as_pg([f"{PGBIN}/pg_ctl", "-D", self.data, "-l",
                              os.path.join(self.stack.dir, "postgres.log"), "-w", "-t", "120"]
                             + list(args)),
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)

    def restart(self):
        self.ctl("restart", "-m", "fast")

    def control_state(self):
        out = subprocess.run(as_pg([f"{PGBIN}/pg_controldata", "-D", self.data]), check=True,
                             capture_output=True, text=True).stdout
        return re.search(r"^Database cluster state:\s*(.*)$", out, re.M).group(1).strip()


class Stack:
    """scripts/stack in a private directory (its Redis is left idle)."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="walbust-campaign-")
        subprocess.run([os.path.join(SRC, "scripts/stack"), "start", self.dir], check=True,
                       stdout=subprocess.DEVNULL)
        self.env = {}
        with open(os.path.join(self.dir, "env")) as f:
            for line in f:
                m = re.match(r"export (\w+)='?([^']*)'?$", line.strip())
                if m:
                    self.env[m.group(1)] = m.group(2)

    def stop(self, keep):
        subprocess.run([os.path.join(SRC, "scripts/stack"), "stop", self.dir],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if keep:
            shutil.rmtree(os.path.join(self.dir, "pgdata"), ignore_errors=True)
        else:
            shutil.rmtree(self.dir, ignore_errors=True)


TLS_DIR = None  # --tls: where make_certs() put ca.crt, server.* and client.*


def make_certs(workdir):
    """A CA, a server certificate for 127.0.0.1 and a client certificate."""
    global TLS_DIR
    TLS_DIR = os.path.join(workdir, "tls")
    os.makedirs(TLS_DIR, exist_ok=True)

    def ossl(*a):
        subprocess.run(["openssl", *a], check=True, cwd=TLS_DIR, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    ossl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-subj", "/CN=ca", "-days", "2")
    with open(os.path.join(TLS_DIR, "san.ext"), "w") as f:
        f.write("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name, ext in (("server", ["-extfile", "san.ext"]), ("client", [])):
        ossl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
        ossl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", *ext)


class RedisServer:
    """The campaign's redis-server: AOF with appendfsync always (every
    acknowledged write survives kill -9) in a /dev/shm directory, no RDB, no
    output limit for subscribers; with --tls also a TLS port requiring a
    client certificate."""

    def __init__(self):
        self.port = free_port()
        self.tls_port = free_port() if TLS_DIR else None
        base = "/dev/shm" if os.path.isdir("/dev/shm") else None
        self.dir = tempfile.mkdtemp(prefix="walbust-campaign-redis-", dir=base)
        self.proc = None

    def start(self):
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir,
                "--save", "", "--appendonly", "yes", "--appendfsync", "always",
                "--auto-aof-rewrite-percentage", "0",
                "--client-output-buffer-limit", "pubsub 0 0 0",
                "--logfile", os.path.join(self.dir, "redis.log"), "--daemonize", "no"]
        if self.tls_port:
            t = lambda name: os.path.join(TLS_DIR, name)  # noqa: E731
            args += ["--tls-port", str(self.tls_port), "--tls-cert-file", t("server.crt"),
                     "--tls-key-file", t("server.key"), "--tls-ca-cert-file", t("ca.crt"),
                     "--tls-auth-clients", "yes"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: self.ping() or self.proc.poll() is not None, 30, "redis-server to start")
        assert self.proc.poll() is None, f"redis-server exited with {self.proc.returncode}"
        return self

    def client(self, timeout=10):
        return redis.Redis(host="127.0.0.1", port=self.port, decode_responses=True,
                           socket_timeout=timeout, socket_connect_timeout=timeout)

    def ping(self, timeout=0.5):
        try:
            return self.client(timeout).ping()
        except (redis.RedisError, OSError):
            return False

    def run_id(self):
        return self.client().info("server")["run_id"]

    def node_client(self, timeout=10):
        """A connection for SUBSCRIBE (the server itself)."""
        return self.client(timeout)

    def publish(self, chan, msg):
        """PUBLISH; the number of subscribers that received it."""
        return self.client().publish(chan, msg)

    def kill9(self):
        self.proc.send_signal(signal.SIGCONT)
        self.proc.kill()
        self.proc.wait(15)
        assert self.proc.returncode == -signal.SIGKILL, self.proc.returncode
        assert not self.ping(), "redis answers after kill -9"

    def compact(self):
        """Rewrite the AOF (between rounds, so restarts stay quick)."""
        r = self.client(timeout=60)
        r.bgrewriteaof()
        wait_until(lambda: (lambda i: not i["aof_rewrite_in_progress"]
                            and not i["aof_rewrite_scheduled"])(r.info("persistence")), 120,
                   "the AOF rewrite")

    def snapshot(self):
        """Copy the AOF as it is now (a command cut at the end is dropped on
        load: aof-load-truncated)."""
        snap = self.dir + ".snap"
        shutil.rmtree(snap, ignore_errors=True)
        shutil.copytree(os.path.join(self.dir, "appendonlydir"), snap)
        return snap

    def restore(self, snap):
        """Put a snapshot back (the server must be down)."""
        shutil.rmtree(os.path.join(self.dir, "appendonlydir"))
        shutil.move(snap, os.path.join(self.dir, "appendonlydir"))

    def wipe(self):
        for name in os.listdir(self.dir):
            if name != "redis.log":
                path = os.path.join(self.dir, name)
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(15)
        shutil.rmtree(self.dir, ignore_errors=True)
        shutil.rmtree(self.dir + ".snap", ignore_errors=True)


class Proxy:
    """A tests/faults/proxy.py process in front of one server."""

    def __init__(self, name, upstream_port, workdir):
        self.name = name
        self.port, self.control = free_port(), free_port()
        self.log = open(os.path.join(workdir, f"proxy-{name}.log"), "w")
        self.proc = subprocess.Popen([sys.executable, os.path.join(HERE, "proxy.py"),
                                      str(self.port), str(upstream_port), str(self.control)],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        wait_until(lambda: self._try_stats(), 20, f"proxy {name} to start")

    def _try_stats(self):
        try:
            return self.cmd("stats")
        except OSError:
            return None

    def cmd(self, text):
        return proxyctl.command(self.control, text)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


class Target:
    """One Redis target: its server, the proxy walbust reaches it through,
    the epoch of its last re-seed and its subscriber."""

    def __init__(self, index, workdir):
        self.index = index
        self.redis = RedisServer().start()
        self.proxy = Proxy(f"redis{index}", self.redis.tls_port or self.redis.port, workdir)
        self.epoch = 0
        self.sub = None

    def url(self):
        if TLS_DIR:
            t = lambda name: os.path.join(TLS_DIR, name)  # noqa: E731
            return (f"rediss://127.0.0.1:{self.proxy.port}/0?cacert={t('ca.crt')}"
                    f"&cert={t('client.crt')}&key={t('client.key')}")
        return f"redis://127.0.0.1:{self.proxy.port}/0"

    def stop(self):
        for obj in (self.proxy, self.redis):
            try:
                obj.stop()
            except Exception as e:
                log(f"teardown: {e!r}")


class LoopbackNodes:
    """Clients of the loopback redis-servers a scripts/* helper started."""

    def node(self, port, timeout=2):
        return redis.Redis(host="127.0.0.1", port=port, decode_responses=True,
                           socket_timeout=timeout, socket_connect_timeout=timeout)

    def node_up(self, port):
        try:
            return self.node(port, 0.5).ping()
        except (redis.RedisError, OSError):
            return False


class ClusterNodes(LoopbackNodes):
    """A 3-master + 3-replica cluster started with scripts/cluster in the
    campaign's directory. client() is a cluster-aware redis-py client;
    node_client() and publish() talk to single nodes (a PUBLISH reaches
    subscribers on every node, but its reply counts only the local ones)."""

    def __init__(self, workdir):
        self.dir = os.path.join(workdir, "cluster")
        script = os.path.join(SRC, "scripts", "cluster")
        for _ in range(3):  # a free port can be taken before a node binds it
            p = subprocess.run([script, "start", self.dir], capture_output=True, text=True)
            if p.returncode == 0:
                break
            subprocess.run([script, "stop", self.dir], capture_output=True)
        if p.returncode != 0:
            raise AssertionError(f"scripts/cluster start failed:\n{p.stderr}")
        env = dict(re.findall(r"export (\w+)='?([^'\n]*)'?", p.stdout))
        self.url = env["CLUSTER_URL"]
        self.ports = [int(x) for x in env["CLUSTER_PORTS"].split()]

    def live(self):
        return [p for p in self.ports if self.node_up(p)]

    def client(self, timeout=10):
        nodes = [redis.cluster.ClusterNode("127.0.0.1", p) for p in self.live()]
        return redis.cluster.RedisCluster(startup_nodes=nodes, decode_responses=True,
                                          socket_timeout=timeout,
                                          socket_connect_timeout=timeout or 10)

    def node_client(self, timeout=10):
        live = self.live()
        if not live:
            raise redis.ConnectionError("no cluster node answers")
        return self.node(live[0], timeout)

    def publish(self, chan, msg):
        return sum(self.node(p).publish(chan, msg) for p in self.live())

    def ping(self, timeout=0.5):
        return bool(self.live())

    def compact(self):
        pass  # no AOF: the cluster's nodes keep their data in memory only

    def role(self, port):
        return self.node(port).info("replication")["role"]

    def state_ok(self):
        """cluster_state:ok on every node that answers."""
        live = self.live()
        return bool(live) and all("cluster_state:ok" in self.node(p).execute_command(
            "CLUSTER", "INFO") for p in live)

    def pid(self, port):
        with open(os.path.join(self.dir, str(port), "redis.pid")) as f:
            return int(f.read())

    def start_node(self, port):
        d = os.path.join(self.dir, str(port))
        subprocess.run(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                        "--cluster-enabled", "yes", "--cluster-config-file",
                        os.path.join(d, "nodes.conf"), "--cluster-node-timeout", "1000",
                        "--save", "", "--appendonly", "no", "--daemonize", "yes", "--dir", d,
                        "--pidfile", os.path.join(d, "redis.pid"),
                        "--logfile", os.path.join(d, "redis.log")],
                       check=True, stdout=subprocess.DEVNULL)
        wait_until(lambda: self.node_up(port), 30, f"cluster node {port} to start")

    def stop(self):
        subprocess.run([os.path.join(SRC, "scripts", "cluster"), "stop", self.dir],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


class ClusterTarget:
    """The cluster as walbust's one target (no proxy)."""

    def __init__(self, workdir):
        self.index = 0
        self.redis = ClusterNodes(workdir)
        self.proxy = None
        self.epoch = 0
        self.sub = None

    def url(self):
        return self.redis.url

    def stop(self):
        try:
            self.redis.stop()
        except Exception as e:
            log(f"teardown: {e!r}")


class SentinelNodes(LoopbackNodes):
    """A Sentinel deployment started with scripts/sentinel in the campaign's
    directory: a master, a replica and three Sentinels. client(),
    node_client() and publish() talk to the current master (as the
    Sentinels name it, confirmed by ROLE); nothing persists, so a killed
    node comes back empty as a replica and resyncs."""

    def __init__(self, workdir):
        self.dir = os.path.join(workdir, "sentinel")
        self.script = os.path.join(SRC, "scripts", "sentinel")
        p = subprocess.run([self.script, "start", self.dir], capture_output=True, text=True)
        if p.returncode != 0:
            raise AssertionError(f"scripts/sentinel start failed:\n{p.stderr}")
        env = dict(re.findall(r"export (\w+)='?([^'\n]*)'?", p.stdout))
        self.url = env["SENTINEL_URL"] + "?replicas=1"
        self.name = env["SENTINEL_NAME"]
        self.sentinels = [int(x) for x in env["SENTINEL_PORTS"].split()]
        self.nodes = [int(x) for x in env["SENTINEL_NODES"].split()]

    def named(self):
        """The master port each Sentinel names (None: no answer)."""
        out = []
        for s in self.sentinels:
            try:
                out.append(int(self.node(s, 1).execute_command(
                    "SENTINEL", "get-master-addr-by-name", self.name)[1]))
            except (redis.RedisError, OSError, TypeError):
                out.append(None)
        return out

    def role(self, port):
        try:
            return self.node(port, 1).execute_command("ROLE")[0]
        except (redis.RedisError, OSError):
            return None

    def master(self):
        """The port every answering Sentinel names and that says it is the
        master, or None."""
        named = {p for p in self.named() if p is not None}
        if len(named) != 1:
            return None
        port = named.pop()
        return port if self.role(port) == "master" else None

    def replica_of(self, master):
        return next(p for p in self.nodes if p != master)

    def link_up(self, port):
        try:
            return self.node(port, 1).info("replication").get("master_link_status") == "up"
        except (redis.RedisError, OSError):
            return False

    def settled(self):
        """One master agreed on, its replica in sync, and every Sentinel
        sees the other two and the replica as up (a failover can start)."""
        m = self.master()
        if m is None or not self.link_up(self.replica_of(m)):
            return False
        for s in self.sentinels:
            try:
                c = self.node(s, 1)
                if len(c.execute_command("SENTINEL", "sentinels", self.name)) < 2:
                    return False
                reps = c.execute_command("SENTINEL", "replicas", self.name)
                ok = [r for r in reps if "s_down" not in str(r) and "disconnected" not in str(r)
                      and f"'port', '{self.replica_of(m)}'" in str(r)]
                if not ok:
                    return False
            except (redis.RedisError, OSError):
                return False
        return m

    def client(self, timeout=10):
        m = wait_until(self.master, 60, "the sentinels to name a master")
        return self.node(m, timeout)

    def node_client(self, timeout=10):
        m = self.master()
        if m is None:
            raise redis.ConnectionError("no master named by the sentinels")
        return self.node(m, timeout)

    def publish(self, chan, msg):
        return self.client().publish(chan, msg)

    def ping(self, timeout=0.5):
        return self.master() is not None

    def compact(self):
        """No AOF; instead make sure the replica has the fill (a failover
        must not hand the checker a replica without it)."""
        n = self.client(timeout=60).execute_command("WAIT", 1, 30000)
        assert n >= 1, "the replica did not acknowledge the fill within 30 s"

    def pid(self, port):
        with open(os.path.join(self.dir, str(port), "redis.pid")) as f:
            return int(f.read())

    def start_node(self, port, master_port):
        subprocess.run([self.script, "node", self.dir, str(port), str(master_port)], check=True,
                       stdout=subprocess.DEVNULL)

    def stop(self):
        subprocess.run([self.script, "stop", self.dir], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)


class SentinelTarget(ClusterTarget):
    """The Sentinel deployment as walbust's one target (redis+sentinel://
    with ?replicas=1; no proxy: walbust learns the master's address from
    the Sentinels)."""

    def __init__(self, workdir):
        self.index = 0
        self.redis = SentinelNodes(workdir)
        self.proxy = None
        self.epoch = 0
        self.sub = None


class Walbust:
    """walbust run through the proxies; every start gets its own log."""

    def __init__(self, binary, workdir, pg_dsn, redis_urls, rules):
        self.binary, self.workdir = binary, workdir
        self.args = [binary, "run", "--pg", pg_dsn, "--rules", rules]
        for url in redis_urls:
            self.args += ["--redis", url]
        self.args += ["--slot", SLOT, "--publication", PUB, "--metrics", "off", "--create-slot",
                     "--log-level", "info"]
        self.proc = None
        self.starts = 0
        self.log_path = None

    def start(self):
        self.starts += 1
        self.log_path = os.path.join(self.workdir, f"walbust-{self.starts:03d}.log")
        self.logf = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.args, stdout=self.logf, stderr=subprocess.STDOUT)
        return self

    def read_log(self):
        with open(self.log_path, "r", errors="replace") as f:
            return f.read()

    def count(self, pattern):
        return len(re.findall(pattern, self.read_log()))

    def wait_streaming(self, timeout=90, seen=0):
        """Wait for the (seen+1)-th "streaming from" line of this process."""
        wait_until(lambda: self.count("streaming from") > seen or self.proc.poll() is not None,
                   timeout, "walbust to stream")
        if self.proc.poll() is not None:
            raise AssertionError(f"walbust exited with {self.proc.returncode}; log "
                                 f"{self.log_path}:\n{self.read_log()[-3000:]}")

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def kill9(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(15)
        self.logf.close()
        assert self.proc.returncode == -signal.SIGKILL, self.proc.returncode

    def stop(self):
        if not self.alive():
            return None
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.logf.close()
        return self.proc.returncode


def held_bytes(pid, port):
    """Bytes the process pid sent on its TCP connections to 127.0.0.1:port
    that the server has not read yet (the receive queues of the server's
    ends, from /proc/net/tcp)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    socks = []
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(name) as f:
            for line in f.readlines()[1:]:
                x = line.split()
                socks.append((int(x[1].rsplit(":", 1)[1], 16), int(x[2].rsplit(":", 1)[1], 16),
                              int(x[4].split(":")[1], 16), x[9]))
    mine = {lp for lp, rp, _, ino in socks if ino in inodes and rp == port}
    return sum(rx for lp, rp, rx, _ in socks if lp == port and rp in mine)


# ---- the workload --------------------------------------------------------


class IdSet:
    """A set with O(1) add, remove and random choice."""

    def __init__(self, items=()):
        self.items, self.pos = [], {}
        for x in items:
            self.add(x)

    def __len__(self):
        return len(self.items)

    def __contains__(self, x):
        return x in self.pos

    def add(self, x):
        if x not in self.pos:
            self.pos[x] = len(self.items)
            self.items.append(x)

    def remove(self, x):
        i = self.pos.pop(x)
        last = self.items.pop()
        if i < len(self.items):
            self.items[i] = last
            self.pos[last] = i

    def sample(self, rnd, n):
        return rnd.sample(self.items, min(n, len(self.items)))


class Txn:
    """What one committed transaction touched."""
    __slots__ = ("xid", "lsn", "kind", "row_ids", "inv_ids", "groups", "side_ids", "truncated")

    def __init__(self, kind):
        self.kind = kind
        self.xid = self.lsn = None
        self.row_ids, self.inv_ids, self.groups = set(), set(), set()
        self.side_ids = set()
        self.truncated = False


class Writer(threading.Thread):
    """One writer connection over the ids = k mod nwriters. Its picture of
    the rows (self.rows: id -> grp) changes only when a COMMIT is known to
    have succeeded (after a lost connection: txid_status)."""

    WEIGHTS = [("upd", 30), ("upd_grp", 8), ("ins", 12), ("mins", 8), ("keychg", 8), ("del", 10),
               ("inv", 8), ("mixed", 6), ("rollback", 5), ("savepoint", 3), ("side", 2),
               ("truncate", 0.12)]

    def __init__(self, camp, k, rows, side_rows):
        super().__init__(daemon=True)
        self.camp, self.k = camp, k
        self.rnd = random.Random(camp.rnd.random())
        self.rows = rows  # id -> grp, own partition
        self.absent = IdSet(i for i in range(1, camp.nids + 1)
                            if i % camp.nwriters == k and i not in rows)
        self.present = IdSet(rows)
        self.side = side_rows  # writer 0 only: set of side ids
        self.committed, self.aborted = [], []
        self.errors = 0
        self.halt = threading.Event()
        self.fatal = None
        self.conn = None
        kinds = [(n, w) for n, w in self.WEIGHTS if k == 0 or n not in ("side", "truncate")]
        self.kind_names = [n for n, _ in kinds]
        self.kind_weights = [w for _, w in kinds]

    # Each plan returns (statements, txn, apply) where apply(self) updates
    # self.rows after a successful commit.

    def _grp(self):
        return self.rnd.randrange(self.camp.ngroups)

    def _own_any(self):
        while True:
            i = self.rnd.randrange(1, self.camp.nids + 1)
            if i % self.camp.nwriters == self.k:
                return i

    def plan(self, kind):
        t = Txn(kind)
        st = []
        rows = self.rows
        if kind in ("upd", "rollback") and len(self.present) > 0:
            ids = self.present.sample(self.rnd, self.rnd.randint(1, 3))
            st.append(("UPDATE items SET v = v + 1 WHERE id = ANY(%s)", (ids,)))
            t.row_ids.update(ids)
            t.groups.update(rows[i] for i in ids)
            return st, t, None
        if kind == "upd_grp" and len(self.present) > 0:
            i, g = self.present.sample(self.rnd, 1)[0], self._grp()
            st.append(("UPDATE items SET grp = %s, v = v + 1 WHERE id = %s", (g, i)))
            t.row_ids.add(i)
            t.groups.update((rows[i], g))
            return st, t, lambda: rows.__setitem__(i, g)
        if kind in ("ins", "mins") and len(self.absent) > 5:
            ids = self.absent.sample(self.rnd, 1 if kind == "ins" else self.rnd.randint(2, 5))
            gs = [self._grp() for _ in ids]
            st.append(("INSERT INTO items(id, grp) SELECT * FROM unnest(%s::bigint[], %s::int[])",
                       (ids, gs)))
            t.row_ids.update(ids)
            t.groups.update(gs)

            def apply():
                for i, g in zip(ids, gs):
                    rows[i] = g
                    self.absent.remove(i)
                    self.present.add(i)
            return st, t, apply
        if kind == "keychg" and len(self.present) > 0 and len(self.absent) > 5:
            old, new = self.present.sample(self.rnd, 1)[0], self.absent.sample(self.rnd, 1)[0]
            st.append(("UPDATE items SET id = %s WHERE id = %s", (new, old)))
            t.row_ids.update((old, new))
            t.groups.add(rows[old])

            def apply():
                rows[new] = rows.pop(old)
                self.present.remove(old)
                self.absent.add(old)
                self.absent.remove(new)
                self.present.add(new)
            return st, t, apply
        if kind == "del" and len(self.present) > 5:
            ids = self.present.sample(self.rnd, self.rnd.randint(1, 2))
            st.append(("DELETE FROM items WHERE id = ANY(%s)", (ids,)))
            t.row_ids.update(ids)
            t.groups.update(rows[i] for i in ids)

            def apply():
                for i in ids:
                    del rows[i]
                    self.present.remove(i)
                    self.absent.add(i)
            return st, t, apply
        if kind == "inv":
            ids = [self._own_any() for _ in range(self.rnd.randint(1, 3))]
            st.append(("SELECT walbust.invalidate(VARIADIC %s::text[])",
                       ([f"c:item:{i}" for i in ids],)))
            t.inv_ids.update(ids)
            if self.rnd.random() < 0.25:
                g = self._grp()
                st.append(("SELECT walbust.invalidate_tag(%s)", (f"grp:{g}",)))
                t.groups.add(g)
            return st, t, None
        if kind == "mixed" and len(self.present) > 0 and len(self.absent) > 5:
            st1, t1, _ = self.plan("upd")
            st2, t2, apply2 = self.plan("ins")
            st3, t3, _ = self.plan("inv")
            for o in (t1, t2, t3):
                t.row_ids |= o.row_ids
                t.inv_ids |= o.inv_ids
                t.groups |= o.groups
            return st1 + st2 + st3, t, apply2
        if kind == "savepoint" and len(self.present) > 2:
            a, b, c = self.present.sample(self.rnd, 3)
            st += [("SAVEPOINT s", None),
                   ("SELECT walbust.invalidate(%s)", (f"c:item:{a}",)),
                   ("UPDATE items SET v = v + 1 WHERE id = %s", (b,)),
                   ("ROLLBACK TO SAVEPOINT s", None),
                   ("UPDATE items SET v = v + 1 WHERE id = %s", (c,))]
            t.row_ids.add(c)
            t.groups.add(rows[c])
            return st, t, None
        if kind == "side" and self.side is not None:
            free = [i for i in range(1, NSIDE + 1) if i not in self.side]
            if free:
                ids = self.rnd.sample(free, min(len(free), self.rnd.randint(1, 3)))
                st.append(("INSERT INTO side(id) SELECT unnest(%s::bigint[])", (ids,)))
                t.side_ids.update(ids)
                return st, t, lambda: self.side.update(ids)
        if kind == "truncate" and self.side is not None and self.camp.truncates_left > 0:
            self.camp.truncates_left -= 1
            st.append(("TRUNCATE side", None))
            t.truncated = True
            return st, t, self.side.clear
        return self.plan("upd") if kind != "upd" else ([], None, None)

    def connect(self):
        deadline = time.time() + 120
        while not self.halt.is_set():
            try:
                self.conn = self.camp.pg.connect(autocommit=False)
                return True
            except psycopg2.OperationalError:
                if time.time() > deadline:
                    raise
                time.sleep(0.2)
        return False

    def drop(self):
        try:
            self.conn.close()
        except psycopg2.Error:
            pass
        self.conn = None

    def one(self):
        kind = self.rnd.choices(self.kind_names, self.kind_weights)[0]
        st, t, apply = self.plan(kind)
        if t is None:
            return
        try:
            with self.conn.cursor() as cur:
                for q, a in st:
                    cur.execute(q, a)
                token = self.camp.next_token()
                cur.execute("INSERT INTO txlog(token) VALUES (%s) RETURNING txid_current(), "
                            "pg_current_wal_insert_lsn() - '0/0'::pg_lsn", (token,))
                t.xid, lsn = cur.fetchone()
                t.lsn = int(lsn)
        except psycopg2.Error:
            self.errors += 1  # nothing was committed
            self.drop() if self.conn.closed else self._rollback()
            return
        if kind == "rollback":
            self._rollback()
            self.aborted.append(t.xid)
            return
        try:
            self.conn.commit()
            ok = True
        except psycopg2.Error:
            self.errors += 1
            self.drop()
            ok = self.resolve(token)
        if ok:
            if apply is not None:
                apply()
            self.committed.append(t)
        # A COMMIT lost in a crash leaves no trace in the WAL, so its xid
        # may be given again: it is not recorded as rolled back.

    def _rollback(self):
        try:
            self.conn.rollback()
        except psycopg2.Error:
            self.drop()

    def resolve(self, token):
        """Did the transaction that wrote txlog row `token` commit? (the
        reply to its COMMIT was lost: PostgreSQL restarted or crashed, so
        its backend is gone once a new connection is accepted). Not
        txid_status(): after a crash that lost the transaction's WAL, its
        xid is handed out again."""
        return self.camp.pg.q("SELECT count(*) FROM txlog WHERE token = %s", (token,))[0][0] == 1

    def run(self):
        """Transactions at the writer's share of --rate until halted (a
        bounded rate keeps most ids touched once or never, so one lost
        invalidation shows and over-invalidation has rows to show on)."""
        gap = self.camp.nwriters / self.camp.args.rate
        due = time.monotonic()
        try:
            while not self.halt.is_set():
                if self.conn is None and not self.connect():
                    break
                self.one()
                due = max(due + gap, time.monotonic() - 0.5)
                wait = due - time.monotonic()
                if wait > 0:
                    self.halt.wait(wait)
        except Exception as e:  # reported by the round
            self.fatal = e
        finally:
            if self.conn is not None:
                self.drop()


class Subscriber(threading.Thread):
    """Listens on the publish channel, reconnecting when Redis goes away.
    since_lsn: a WAL position taken after the current subscription was
    confirmed; every commit after it must be received."""

    def __init__(self, camp, target):
        super().__init__(daemon=True)
        self.camp, self.target = camp, target
        self.received = set()  # (xid, key)
        self.xids = set()
        self.lock = threading.Lock()
        self.markers = set()
        self.since_lsn = None  # None while not subscribed
        self.reconnects = -1
        self.halt = threading.Event()
        self.ready = threading.Event()

    def run(self):
        while not self.halt.is_set():
            try:
                ps = self.target.redis.node_client(timeout=None).pubsub()
                ps.subscribe(CHAN)
                while not self.halt.is_set():
                    m = ps.get_message(timeout=0.2)
                    if m is None:
                        continue
                    if m["type"] == "subscribe":
                        self.since_lsn = self.camp.pg.insert_lsn()
                        self.reconnects += 1
                        self.ready.set()
                    elif m["type"] == "message":
                        p = json.loads(m["data"])
                        if "marker" in p:
                            self.markers.add(p["marker"])
                            continue
                        with self.lock:
                            self.xids.add(p["xid"])
                            for k in p["keys"]:
                                self.received.add((p["xid"], k))
            except (redis.RedisError, OSError):
                self.since_lsn = None  # publishes may be missed until resubscribed
                time.sleep(0.1)

    def sync(self, timeout=60):
        """Publish a marker and wait for it: Redis delivers a subscriber's
        messages in the order they were published, so everything walbust
        published (and Redis acknowledged) before has been read too."""
        token = f"{time.time_ns()}"
        pub = self.target.redis.publish
        wait_until(lambda: pub(CHAN, json.dumps({"marker": token})) > 0 or None, timeout,
                   "the subscriber to be subscribed")
        wait_until(lambda: token in self.markers, timeout, "the marker publish")

    def heard(self):
        with self.lock:
            return set(self.received), set(self.xids), self.since_lsn


# ---- faults --------------------------------------------------------------


class Faults:
    """Each fault injects, verifies that it happened, and heals. A fault
    returns a short evidence string; an unverifiable fault raises."""

    def __init__(self, camp):
        self.camp = camp
        self.rnd = random.Random(camp.rnd.random())
        self.t = camp.targets[0]  # the Redis target of the current fault

    def pick(self):
        """Choose the Redis target the next fault hits."""
        self.t = self.rnd.choice(self.camp.targets)
        return self.t

    def pause(self, lo, hi):
        time.sleep(self.rnd.uniform(lo, hi))

    def restart_walbust(self):
        c = self.camp
        c.walbust.start().wait_streaming()
        return wait_until(lambda: c.pg.slot()[0], 60, "a walsender on the slot")

    def walbust_kill9(self):
        c = self.camp
        pid1 = wait_until(lambda: c.pg.slot()[0], 60, "a walsender on the slot")
        c.walbust.kill9()
        wait_until(lambda: c.pg.slot()[0] != pid1, 60, "the old walsender to go")
        self.pause(0.2, 1.5)  # commits go on while walbust is dead
        pid2 = self.restart_walbust()
        return f"SIGKILL (rc -9), walsender {pid1}->{pid2}"

    def walbust_sigterm(self):
        """A graceful restart (a deploy): SIGTERM drains, exits 0; a new
        process takes over."""
        c = self.camp
        rc = c.walbust.stop()
        assert rc == 0, f"walbust exited {rc} on SIGTERM"
        assert "stopped" in c.walbust.read_log().splitlines()[-1]
        self.pause(0.2, 1.0)
        pid = self.restart_walbust()
        return f"drained and exited 0, walsender {pid}"

    def kill9_redis_slow(self):
        c = self.camp
        before = self.t.proxy.cmd("stats")["delayed_chunks"]
        self.t.proxy.cmd(f"slow {self.rnd.randint(100, 300)}")
        try:
            self.pause(0.5, 1.5)
            delayed = self.t.proxy.cmd("stats")["delayed_chunks"] - before
            assert delayed > 0, "no redis traffic was delayed before the kill"
            c.walbust.kill9()
            self.pause(0.2, 1.0)
            self.restart_walbust()
            self.pause(0.5, 1.5)
        finally:
            self.t.proxy.cmd("pass")
        return f"SIGKILL while {delayed} redis chunks were delayed"

    def kill9_redis_held(self):
        """Blackhole the redis path until walbust has sent a batch that
        redis never reads, kill -9 walbust, then cut the path (the held
        bytes are dropped: they never reach redis), start a new walbust
        while the path is still cut, and heal. Whatever the first process
        had not applied must be replayed from the slot."""
        c = self.camp
        self.t.proxy.cmd("blackhole")
        try:
            lsn0 = c.pg.insert_lsn()
            wait_until(lambda: self.t.proxy.cmd("stats")["held_bytes"], 30,
                       "walbust to send redis a batch that is held")
            wait_until(lambda: c.pg.insert_lsn() > lsn0, 30, "a commit during the blackhole")
            self.pause(0.3, 1.5)
            held = self.t.proxy.cmd("stats")["held_bytes"]
            c.walbust.kill9()
            n = self._cut_start(self.t.proxy) if self.t.proxy.cmd("stats")["active"] else 0
            self.pause(0.2, 1.0)
            self.restart_walbust()
            self.pause(0.3, 1.5)
        finally:
            self.t.proxy.cmd("pass")
        return f"SIGKILL with {held} bytes held for redis, {n} held connection(s) reset"

    def redis_sigstop(self):
        c = self.camp
        n0 = c.walbust.count(r"\(command timeout\)")
        self.t.redis.proc.send_signal(signal.SIGSTOP)
        t0 = time.time()
        try:
            assert not self.t.redis.ping(0.3), "a stopped redis answered"
            wait_until(lambda: c.walbust.count(r"\(command timeout\)") > n0, 30,
                       "walbust's redis command timeout")
            self.pause(0.0, 1.5)
        finally:
            self.t.redis.proc.send_signal(signal.SIGCONT)
        frozen = time.time() - t0
        assert frozen > 5.0, f"redis was frozen only {frozen:.1f}s"
        assert self.t.redis.ping(5), "redis does not answer after SIGCONT"
        return f"frozen {frozen:.1f}s, command timeout logged"

    def _redis_down(self):
        """kill -9 redis; a sentinel key written just before tells whether
        the data came back."""
        r = self.t.redis.client()
        run1 = self.t.redis.run_id()
        r.set("c:sentinel", "1")
        keys = r.dbsize()
        self.t.redis.kill9()
        self.pause(0.3, 1.5)
        return run1, keys

    def redis_restart_empty(self):
        c = self.camp
        run1, _ = self._redis_down()
        self.t.redis.wipe()
        self.t.redis.start()
        assert self.t.redis.run_id() != run1
        assert not self.t.redis.client().exists("c:sentinel"), "redis came back with its data"
        c.fill(self.t, epoch=True)  # the application refills its cache
        return f"run_id changed, came back empty, re-seeded (epoch {lsn_text(self.t.epoch)})"

    def redis_restart_aof(self):
        run1, keys = self._redis_down()
        self.t.redis.start()
        assert self.t.redis.run_id() != run1
        r = self.t.redis.client()
        assert r.exists("c:sentinel"), "redis came back from its AOF without the sentinel key"
        n = r.dbsize()
        return f"run_id changed, {n} of {keys} keys back from the AOF"

    def redis_restart_lagging(self):
        """Redis comes back without writes it had acknowledged (like a
        failover to a replica that lagged): snapshot the AOF, let walbust
        apply and confirm more, kill -9, restore the snapshot. Nothing
        walbust had not confirmed when it saw the failure may be missing;
        what it confirmed before may legitimately be stale (the new epoch
        is the slot's position after the failure)."""
        c = self.camp
        r = self.t.redis.client()
        r.set("c:sentinel", "1")
        snap = self.t.redis.snapshot()
        r.set("c:lostwrite", "1")  # acknowledged, and about to be lost
        self.pause(0.5, 2.0)
        run1 = self.t.redis.run_id()
        e0 = c.walbust.count("redis target")
        self.t.redis.kill9()
        wait_until(lambda: c.walbust.count("redis target") > e0, 30,
                   "walbust to see the redis failure")
        conf = self.stable_confirmed()
        self.t.redis.restore(snap)
        self.t.redis.start()
        assert self.t.redis.run_id() != run1
        r = self.t.redis.client()
        assert r.exists("c:sentinel"), "the snapshot did not come back"
        assert not r.exists("c:lostwrite"), "redis kept the writes after the snapshot"
        self.t.epoch = max(self.t.epoch, conf)
        return f"back without its acknowledged writes since the snapshot, epoch {lsn_text(conf)}"

    def cluster_master_kill(self):
        """SIGKILL one master of the cluster, wait for its replica's
        promotion and cluster_state:ok, then restart the old node and wait
        until it has rejoined as a replica."""
        cl = self.camp.targets[0].redis
        masters = [p for p in cl.live() if cl.role(p) == "master"]
        port = self.rnd.choice(masters)
        reps = [p for p in cl.live() if p != port and cl.role(p) == "slave"
                and cl.node(p).info("replication")["master_port"] == port]
        assert reps, f"master {port} has no replica"
        # A replica can only take over once it has synced; and a campaign
        # tests walbust under failover, not Redis's staleness policy, so the
        # replica may be promoted however long its link was down.
        for p in reps:
            wait_until(lambda: cl.node(p).info("replication").get("master_link_status") == "up",
                       60, f"replica {p} of {port} to be in sync")
            cl.node(p).config_set("cluster-replica-validity-factor", 0)
        pid = cl.pid(port)
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not os.path.exists(f"/proc/{pid}"), 15, f"master {port} to die")
        assert not cl.node_up(port), f"master {port} answers after SIGKILL"
        t0 = time.time()
        promoted = wait_until(lambda: [p for p in reps if cl.role(p) == "master"], 60,
                              f"a replica of {port} to be promoted")[0]
        wait_until(cl.state_ok, 60, "cluster_state:ok after the failover")
        took = time.time() - t0
        self.pause(0.2, 1.0)  # commits go on against the new master
        os.remove(os.path.join(cl.dir, str(port), "redis.pid"))
        cl.start_node(port)
        wait_until(lambda: cl.role(port) == "slave" and
                   cl.node(port).info("replication").get("master_link_status") == "up", 60,
                   f"node {port} to rejoin as a replica")
        wait_until(cl.state_ok, 60, "cluster_state:ok after the rejoin")
        return (f"master {port} SIGKILLed, replica {promoted} promoted in {took:.1f}s, "
                f"{port} rejoined as its replica")

    # Sentinel (--sentinel): failovers of walbust's redis+sentinel:// target.

    def _sentinel_settled(self):
        sn = self.camp.targets[0].redis
        return wait_until(sn.settled, 90, "the sentinel deployment to settle (a master agreed "
                          "on, its replica in sync and seen by every sentinel)", interval=0.2)

    def _sentinel_probe(self, port):
        """walbust applies on the node at port: a barrier row's key set
        there must go (with ?replicas=1 walbust confirms nothing until the
        master's replica has it too)."""
        sn = self.camp.targets[0].redis
        token = f"probe{time.time_ns()}"
        sn.node(port).set(f"c:barrier:{token}", "1")
        self.camp.pg.q("INSERT INTO cbarrier(token) VALUES (%s)", (token,))
        t0 = time.time()
        wait_until(lambda: not sn.node(port).exists(f"c:barrier:{token}"), 90,
                   f"walbust to invalidate on the new master {port}", interval=0.1)
        return time.time() - t0

    def sentinel_failover(self):
        """SENTINEL FAILOVER under the storm: the replica is promoted, the
        old master is turned into its replica (the Sentinels kill its
        clients; a write that still reaches it gets READONLY). walbust must
        follow and apply on the new master."""
        c = self.camp
        sn = c.targets[0].redis
        old = self._sentinel_settled()
        new = sn.replica_of(old)
        e0 = c.walbust.count("replicas asked for")
        t0 = time.time()

        def ask():
            try:
                return sn.node(self.rnd.choice(sn.sentinels), 2).execute_command(
                    "SENTINEL", "FAILOVER", sn.name)
            except redis.ResponseError as e:  # INPROG, NOGOODSLAVE: settling still
                log(f"  SENTINEL FAILOVER: {e}; asking again")
                time.sleep(0.5)
                return None
        wait_until(ask, 30, "a sentinel to accept SENTINEL FAILOVER")
        wait_until(lambda: sn.master() == new, 60, f"the sentinels to promote {new}")
        took = time.time() - t0
        wait_until(lambda: sn.role(old) == "slave" and sn.link_up(old), 60,
                   f"the old master {old} to become the new master's replica")
        probe = self._sentinel_probe(new)
        return (f"master {old}->{new} in {took:.1f}s, {old} in sync as its replica, walbust "
                f"applied on {new} {probe:.1f}s after; "
                f"{c.walbust.count('replicas asked for') - e0} replica shortfalls logged")

    def sentinel_master_kill(self):
        """kill -9 the current master under the storm: the Sentinels
        promote its replica (which, with ?replicas=1, has everything walbust
        confirmed); walbust cannot confirm anything until a replica is back,
        so the killed node is restarted (empty) as the new master's
        replica, as an operator would."""
        c = self.camp
        sn = c.targets[0].redis
        old = self._sentinel_settled()
        new = sn.replica_of(old)
        e0 = c.walbust.count("replicas asked for")
        pid = sn.pid(old)
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not os.path.exists(f"/proc/{pid}"), 15, f"master {old} to die")
        assert not sn.node_up(old), f"master {old} answers after SIGKILL"
        t0 = time.time()
        wait_until(lambda: sn.master() == new, 60, f"the sentinels to promote {new}")
        took = time.time() - t0
        self.pause(0.2, 1.0)  # commits go on against a master without a replica
        sn.start_node(old, new)
        wait_until(lambda: sn.role(old) == "slave" and sn.link_up(old), 60,
                   f"the killed master {old} back as a replica")
        probe = self._sentinel_probe(new)
        return (f"master {old} SIGKILLed (pid {pid}), {new} promoted in {took:.1f}s, {old} "
                f"back empty as its replica, walbust applied on {new} {probe:.1f}s after; "
                f"{c.walbust.count('replicas asked for') - e0} replica shortfalls logged")

    def _freeze_master_with_batch(self):
        """SIGSTOP the master the Sentinels name until the freeze catches
        invalidations of walbust's unread in the master's socket: more
        bytes than a lone watermark update takes (its script and a WAIT).
        A freeze that finds walbust waiting for a batch the master had
        already read (and so had passed to its replica: nothing to lose,
        even for a walbust that confirms early) or for a lone watermark is
        thawed within 0.5 s, under the Sentinels' down-after-milliseconds,
        and tried again. Returns (old master, its replica, pid, attempts,
        the slot's position during the freeze, unread bytes)."""
        c = self.camp
        sn = c.targets[0].redis
        lone = os.path.getsize(os.path.join(SRC, "redis", "watermark.lua")) + 150
        for attempt in range(1, 11):
            old = self._sentinel_settled()
            new, pid = sn.replica_of(old), sn.pid(old)
            lsn0 = c.pg.insert_lsn()
            os.kill(pid, signal.SIGSTOP)
            try:
                wait_until(lambda: c.pg.insert_lsn() > lsn0, 3,
                           "a commit while the master is frozen")
                conf1 = c.pg.slot()[1]
                deadline = time.time() + 0.4
                while (held := held_bytes(c.walbust.proc.pid, old)) <= lone and \
                        time.time() < deadline:
                    time.sleep(0.02)
            except BaseException:
                os.kill(pid, signal.SIGCONT)
                raise
            if held > lone:
                return old, new, pid, attempt, conf1, held
            os.kill(pid, signal.SIGCONT)
            self.pause(0.2, 0.8)
        raise AssertionError(f"10 freezes of the master caught no invalidation of walbust's "
                             f"unread (at most {lone} bytes held each time)")

    def sentinel_master_held(self):
        """SIGSTOP the master while walbust's invalidations wait unread in
        its socket (_freeze_master_with_batch), verify that commits go on
        and the slot stands still, kill -9 walbust, kill -9 the master (what
        it held dies with it), wait for the Sentinels to promote the
        replica, restart the killed node as its replica and start a new
        walbust. Whatever the first process had not confirmed must be
        replayed onto the new master; a walbust that confirms before Redis
        acknowledged (make broken) loses the held batch."""
        c = self.camp
        sn = c.targets[0].redis
        old, new, pid, attempts, conf1, held = self._freeze_master_with_batch()
        try:
            # Killed well inside walbust's 5 s command timeout: it is still
            # waiting for the frozen master's answer then.
            self.pause(0.2, 0.6)
            held = max(held, held_bytes(c.walbust.proc.pid, old))
            conf2 = c.pg.slot()[1]
            c.walbust.kill9()
        except BaseException:
            os.kill(pid, signal.SIGCONT)
            raise
        # The slot moving while the master was frozen is confirmation before
        # Redis acknowledged: a failure of the real build (raised once the
        # deployment is healed, so the next fault finds it whole), and the
        # expected symptom of the broken one (its loss is for the checker).
        advanced = conf2 != conf1
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not os.path.exists(f"/proc/{pid}"), 15, f"master {old} to die")
        t0 = time.time()
        wait_until(lambda: sn.master() == new, 60, f"the sentinels to promote {new}")
        took = time.time() - t0
        sn.start_node(old, new)
        wait_until(lambda: sn.role(old) == "slave" and sn.link_up(old), 60,
                   f"the killed master {old} back as a replica")
        ws = self.restart_walbust()
        probe = self._sentinel_probe(new)
        slot = (f"slot ADVANCED {lsn_text(conf1)}->{lsn_text(conf2)} during the freeze"
                if advanced else f"slot frozen at {lsn_text(conf2)}")
        assert not advanced or c.args.broken, \
            f"the slot advanced while walbust's master was frozen ({slot})"
        return (f"master {old} frozen (attempt {attempts}), {held} bytes of walbust's unread, "
                f"{slot}; walbust and "
                f"master SIGKILLed, {new} promoted {took:.1f}s later, {old} back as its replica, "
                f"new walsender {ws}, walbust applied on {new} {probe:.1f}s after")

    def stable_confirmed(self):
        """The slot's confirmed position once it stopped moving."""
        last = None
        for _ in range(100):
            now = self.camp.pg.slot()[1]
            if now == last:
                return now
            last = now
            time.sleep(0.3)
        raise AssertionError("the slot kept advancing while redis was down")

    def pg_restart(self):
        c = self.camp
        pm1, (ws1, _) = c.pg.postmaster_pid(), c.pg.slot()
        seen = c.walbust.count("streaming from")
        c.pg.restart()
        pm2 = c.pg.postmaster_pid()
        assert pm2 != pm1, "the postmaster pid did not change"
        c.walbust.wait_streaming(seen=seen)
        ws2 = wait_until(lambda: c.pg.slot()[0], 60, "a walsender on the slot")
        return f"postmaster {pm1}->{pm2}, walsender {ws1}->{ws2}"

    def pg_crash(self):
        """pg_ctl -m immediate restart: PostgreSQL crashes and recovers from
        WAL; the slot's confirmed position goes back to its last checkpoint."""
        c = self.camp
        pm1 = c.pg.postmaster_pid()
        seen = c.walbust.count("streaming from")
        c.pg.ctl("stop", "-m", "immediate")
        state = c.pg.control_state()
        assert state == "in production", f"cluster state after the crash: {state!r}"
        self.pause(0.0, 1.0)
        c.pg.ctl("start")
        pm2 = c.pg.postmaster_pid()
        assert pm2 != pm1, "the postmaster pid did not change"
        c.walbust.wait_streaming(seen=seen)
        ws = wait_until(lambda: c.pg.slot()[0], 60, "a walsender on the slot")
        return f"crashed ({state!r}), postmaster {pm1}->{pm2}, walsender {ws}"

    # Migrations: routine schema changes under the write storm. walbust must
    # follow them (docs/design.md, "Schema changes") without missing anything.

    def ddl_add_drop_column(self):
        """ALTER TABLE items ADD COLUMN, then DROP COLUMN, while writers
        write: the rules' columns are untouched, so nothing may be missed or
        over-invalidated, and walbust must keep streaming."""
        c = self.camp
        c.pg.q("ALTER TABLE items ADD COLUMN mig_extra text DEFAULT 'm'")
        self.pause(0.2, 1.5)
        c.pg.q("ALTER TABLE items DROP COLUMN mig_extra")
        left = c.pg.q("SELECT count(*) FROM pg_attribute WHERE attrelid = 'items'::regclass "
                      "AND attname = 'mig_extra' AND NOT attisdropped")[0][0]
        assert left == 0, "the migration's column is still there"
        return "items: column added and dropped"

    def ddl_swap_table(self):
        """The rename-swap migration on a rules table, under writes to it:
        CREATE side_new (LIKE side), copy, RENAME side TO side_old, RENAME
        side_new TO side, DROP side_old, in one transaction. The new table is
        not in the publication until walbust puts it back, so walbust must
        invalidate the table's whole coverage once it has (recorded like a
        TRUNCATE of side: every c:side key must be gone), and rows written to
        the new table afterwards must be invalidated as usual."""
        c = self.camp
        oid1 = c.pg.q("SELECT 'side'::regclass::oid")[0][0]
        c.pg.q("BEGIN; LOCK TABLE side IN ACCESS EXCLUSIVE MODE;"
               "CREATE TABLE side_new (LIKE side INCLUDING ALL);"
               "INSERT INTO side_new SELECT * FROM side;"
               "ALTER TABLE side RENAME TO side_old; ALTER TABLE side_new RENAME TO side;"
               "DROP TABLE side_old; COMMIT")
        t = Txn("ddl_swap_table")
        t.truncated = True
        t.lsn = c.pg.wal_lsn()
        t.xid = -1
        c.migrations.append(t)
        oid2 = c.pg.q("SELECT 'side'::regclass::oid")[0][0]
        assert oid1 != oid2, "side was not swapped"

        def back():
            return c.pg.q("SELECT count(*) FROM pg_publication_tables WHERE pubname = %s "
                          "AND schemaname = 'public' AND tablename = 'side'", (PUB,))[0][0] == 1
        t0 = time.time()
        wait_until(back, 60, "walbust to put the swapped side table back into the publication")
        return f"side {oid1}->{oid2}, back in the publication after {time.time() - t0:.1f}s"

    def walsender_kill(self):
        c = self.camp
        pid1 = wait_until(lambda: c.pg.slot()[0], 30, "a walsender on the slot")
        assert c.pg.q("SELECT pg_terminate_backend(%s)", (pid1,))[0][0] is True
        pid2 = wait_until(lambda: (lambda p: p if p not in (None, pid1) else None)(c.pg.slot()[0]),
                          90, "a new walsender")
        return f"walsender {pid1}->{pid2}"

    def _cut_start(self, px):
        before = px.cmd("stats")
        assert before["active"] > 0, f"no connection through the {px.name} proxy to cut"
        after = px.cmd("cut")
        n = after["closed_by_cut"] - before["closed_by_cut"]
        assert n > 0, f"the {px.name} cut reset no connection"
        return n

    def _cut(self, px, hold):
        n = self._cut_start(px)
        try:
            time.sleep(hold)
        finally:
            px.cmd("pass")
        return n

    def pg_proxy_cut(self):
        c = self.camp
        seen = c.walbust.count("streaming from")
        n = self._cut(c.pproxy, self.rnd.uniform(0.3, 3.0))
        assert n > 0
        c.walbust.wait_streaming(seen=seen)
        return f"{n} connection(s) reset, walbust streamed again"

    def redis_proxy_cut(self):
        c = self.camp
        e0 = c.walbust.count("redis target")
        n = self._cut(self.t.proxy, self.rnd.uniform(0.3, 3.0))
        assert n > 0
        wait_until(lambda: c.walbust.count("redis target") > e0, 30,
                   "walbust to report the failed redis target")
        return f"{n} connection(s) reset, redis failure logged"

    def _slow(self, px, lo, hi):
        before = px.cmd("stats")["delayed_chunks"]
        ms = self.rnd.randint(lo, hi)
        px.cmd(f"slow {ms}")
        try:
            self.pause(1.5, 4.0)
        finally:
            after = px.cmd("pass")["delayed_chunks"]
        assert after > before, f"nothing went through the slow {px.name} proxy"
        return f"{after - before} chunks delayed {ms} ms"

    def pg_proxy_slow(self):
        return self._slow(self.camp.pproxy, 20, 150)

    def redis_proxy_slow(self):
        return self._slow(self.t.proxy, 20, 250)

    def pg_proxy_blackhole(self):
        c = self.camp
        c.pproxy.cmd("blackhole")
        try:
            time.sleep(0.5)
            conf1 = c.pg.slot()[1]
            self.pause(1.5, 5.0)
            conf2 = c.pg.slot()[1]
            held = c.pproxy.cmd("stats")["held_bytes"]
        finally:
            c.pproxy.cmd("pass")
        assert held > 0, "nothing was held by the blackholed postgresql path"
        assert conf1 == conf2, "the slot advanced through a blackhole"
        return f"{held} bytes held, slot frozen at {lsn_text(conf2)}"

    def redis_proxy_blackhole(self):
        c = self.camp
        n0 = c.walbust.count(r"\(command timeout\)")
        self.t.proxy.cmd("blackhole")
        t0 = time.time()
        try:
            wait_until(lambda: c.walbust.count(r"\(command timeout\)") > n0, 30,
                       "walbust's redis command timeout")
            self.pause(0.0, 1.5)
            held = self.t.proxy.cmd("stats")["held_bytes"]
        finally:
            self.t.proxy.cmd("pass")
        assert held > 0, "nothing was held by the blackholed redis path"
        return f"{held} bytes held for {time.time() - t0:.1f}s, command timeout logged"


# ---- the campaign --------------------------------------------------------


class Campaign:
    def __init__(self, args):
        self.args = args
        self.rnd = random.Random(args.seed)
        self.nids, self.nwriters = args.ids, args.writers
        self.ngroups = max(50, args.ids // 5)
        self.stack = self.pproxy = self.walbust = None
        self.targets = []
        self.truncates_left = 0
        self.migrations = []  # Txn records of migrations that count as a TRUNCATE
        self.results = []
        self._token = 0
        self._token_lock = threading.Lock()

    def next_token(self):
        with self._token_lock:
            self._token += 1
            return self._token

    # setup

    def start(self):
        self.stack = Stack()
        self.workdir = self.stack.dir
        log(f"stack in {self.workdir}")
        self.pg = Postgres(self.stack)
        self.pproxy = Proxy("pg", self.pg.port, self.workdir)
        if self.args.tls:
            make_certs(self.workdir)
        if self.args.cluster:
            self.targets = [ClusterTarget(self.workdir)]
        elif self.args.sentinel:
            self.targets = [SentinelTarget(self.workdir)]
        else:
            self.targets = [Target(i, self.workdir) for i in range(self.args.targets)]
        self.setup_db()
        rules = os.path.join(self.workdir, "rules.json")
        with open(rules, "w") as f:
            json.dump(RULES, f, indent=2)
        # Run a private copy: a rebuild of the original during the campaign
        # must not change the binary under test half-way.
        binary = os.path.join(self.workdir, "walbust")
        shutil.copy2(self.args.bin, binary)
        with open(binary, "rb") as f:
            log(f"testing {self.args.bin} (sha256 {hashlib.sha256(f.read()).hexdigest()[:16]})")
        self.walbust = Walbust(binary, self.workdir, self.pg.dsn(port=self.pproxy.port),
                               [t.url() for t in self.targets], rules)
        self.walbust.start().wait_streaming()

    def setup_db(self):
        self.pg.q(f"CREATE DATABASE {DB}", db="postgres")
        with open(os.path.join(SRC, "sql/walbust.sql")) as f:
            self.pg.q(f.read())
        self.pg.q("CREATE TABLE items(id bigint PRIMARY KEY, grp int NOT NULL, "
                  "v bigint NOT NULL DEFAULT 0, note text DEFAULT 'x');"
                  "ALTER TABLE items REPLICA IDENTITY FULL;"
                  "CREATE TABLE side(id bigint PRIMARY KEY);"
                  "CREATE TABLE cbarrier(id bigserial PRIMARY KEY, token text);"
                  "CREATE TABLE txlog(token bigint PRIMARY KEY);"
                  f"CREATE PUBLICATION {PUB} FOR TABLE items, side, cbarrier;"
                  # As walbust setup marks it: walbust may put a swapped
                  # rules table back (the ddl_swap_table migration).
                  f"COMMENT ON PUBLICATION {PUB} IS 'walbust: managed (fault campaign)'")
        self.pg.q("INSERT INTO items(id, grp) SELECT i, (i * 7919) %% %s FROM "
                  "generate_series(1, %s) i WHERE i %% 3 <> 0", (self.ngroups, self.nids))

    def stop(self, keep):
        for obj in [self.walbust, self.pproxy] + self.targets:
            if obj is not None:
                try:
                    obj.stop()
                except Exception as e:
                    log(f"teardown: {e!r}")
        if self.stack is not None:
            self.stack.stop(keep)

    # fill and check

    def keys(self):
        """Every cached key, with its fill value."""
        out = {}
        for i in range(1, self.nids + 1):
            out[f"c:item:{i}"] = "f"
            out[f"c:ver:{i}"] = "0"
        for g in range(self.ngroups):
            for m in range(GROUP_MEMBERS):
                out[f"c:gm:{g}:{m}"] = "f"
        for i in range(1, NSIDE + 1):
            out[f"c:side:{i}"] = "f"
        return out

    def fill(self, target, epoch=False):
        r = target.redis.client(timeout=60)
        items = list(self.keys().items())
        pipe = r.pipeline(transaction=False)
        if isinstance(r, redis.cluster.RedisCluster):
            for k, v in items:
                pipe.set(k, v)
        else:
            for n in range(0, len(items), 5000):
                pipe.mset(dict(items[n:n + 5000]))
        for g in range(self.ngroups):
            pipe.sadd(f"t:grp:{g}", *[f"c:gm:{g}:{m}" for m in range(GROUP_MEMBERS)])
        pipe.execute()
        if epoch:
            # Commits whose COMMIT began after this point came after the
            # re-seed, so their invalidations must find the new keys.
            target.epoch = self.pg.insert_lsn()

    def snapshot(self, target):
        r = target.redis.client(timeout=60)
        names = list(self.keys()) + [f"t:grp:{g}" for g in range(self.ngroups)]
        vals = {}
        for n in range(0, len(names), 5000):
            part = names[n:n + 5000]
            pipe = r.pipeline(transaction=False)
            for k in part:
                if k.startswith("t:"):
                    pipe.exists(k)
                else:
                    pipe.get(k)
            for k, v in zip(part, pipe.execute()):
                vals[k] = v if not k.startswith("t:") else (v or None)
        return vals

    def expectations(self, txns, epoch):
        """(must_gone, must_stay, must_move, must_zero) key sets."""
        after = [t for t in txns if t.lsn >= epoch]
        gone, moved = set(), set()
        for t in after:
            gone.update(f"c:item:{i}" for i in t.row_ids | t.inv_ids)
            moved.update(f"c:ver:{i}" for i in t.row_ids)
            for g in t.groups:
                gone.add(f"t:grp:{g}")
                gone.update(f"c:gm:{g}:{m}" for m in range(GROUP_MEMBERS))
            gone.update(f"c:side:{i}" for i in t.side_ids)
        if any(t.truncated for t in after):
            gone.update(f"c:side:{i}" for i in range(1, NSIDE + 1))
        touched_ids, touched_rows, touched_groups, touched_side = set(), set(), set(), set()
        truncated = False
        for t in txns:
            touched_ids |= t.row_ids | t.inv_ids
            touched_rows |= t.row_ids
            touched_groups |= t.groups
            touched_side |= t.side_ids
            truncated |= t.truncated
        stay = {f"c:item:{i}" for i in range(1, self.nids + 1) if i not in touched_ids}
        zero = {f"c:ver:{i}" for i in range(1, self.nids + 1) if i not in touched_rows}
        for g in range(self.ngroups):
            if g not in touched_groups:
                stay.add(f"t:grp:{g}")
                stay.update(f"c:gm:{g}:{m}" for m in range(GROUP_MEMBERS))
        if not truncated:
            stay.update(f"c:side:{i}" for i in range(1, NSIDE + 1) if i not in touched_side)
        return gone, stay, moved, zero

    def check(self, txns, aborted):
        """Check every target; the lists name the target (r<i>) when there
        are several."""
        out = {}
        for target in self.targets:
            tag = f"r{target.index}:" if len(self.targets) > 1 else ""
            for name, v in self.check_target(target, txns, aborted).items():
                if isinstance(v, list):
                    out.setdefault(name, []).extend(f"{tag}{x}" for x in v)
                else:
                    out[name] = out.get(name, 0) + v
        return out

    def check_target(self, target, txns, aborted):
        sub = target.sub
        vals = self.snapshot(target)
        gone, stay, moved, zero = self.expectations(txns, target.epoch)
        missed = sorted(k for k in gone if vals.get(k) is not None)
        missed += sorted(k for k in moved if not (vals.get(k) or "0").lstrip("-").isdigit()
                         or int(vals.get(k) or "0") < 1)
        over = sorted(k for k in stay if vals.get(k) is None)
        over += sorted(k for k in zero if vals.get(k) != "0")
        # Publishes: every commit made while this subscriber was subscribed.
        received, xids, since = sub.heard()
        need = {(t.xid, f"c:item:{i}") for t in txns
                if since is not None and t.lsn >= since for i in t.row_ids}
        unheard = sorted(need - received)
        # A rolled-back transaction whose WAL a crash lost may see its xid
        # given to a later committed one.
        phantom = sorted((set(aborted) - {t.xid for t in txns}) & xids)
        return {"missed": missed, "over": over, "unheard": unheard, "phantom": phantom,
                "published_needed": len(need), "gone": len(gone) + len(moved),
                "stay": len(stay) + len(zero)}

    def barrier(self):
        token = f"{time.time_ns()}"
        rs = [t.redis.client() for t in self.targets]
        for r in rs:
            r.set(f"c:barrier:{token}", "1")
        self.pg.q("INSERT INTO cbarrier(token) VALUES (%s)", (token,))
        for r in rs:
            wait_until(lambda: not r.exists(f"c:barrier:{token}"), 120,
                       "the barrier invalidation")

    def quiesce(self):
        """Wait until the slot confirmed everything committed so far."""
        target = self.pg.wal_lsn()
        t0 = time.time()
        wait_until(lambda: self.pg.slot()[1] >= target, 240,
                   f"confirmed_flush_lsn to reach {lsn_text(target)}", interval=0.1)
        return time.time() - t0

    # rounds

    def load_rows(self):
        rows = [dict() for _ in range(self.nwriters)]
        for i, g in self.pg.q("SELECT id, grp FROM items"):
            rows[i % self.nwriters][i] = g
        side = {i for (i,) in self.pg.q("SELECT id FROM side")}
        return rows, side

    def round(self, n, kinds):
        res = {"round": n, "faults": Counter(), "evidence": [], "error": None}
        self.quiesce()
        for t in self.targets:
            t.redis.client().flushall()
            t.epoch = 0
            self.fill(t)
            t.redis.compact()
            t.sub = Subscriber(self, t)
            t.sub.start()
        self.truncates_left = self.rnd.randint(0, 2)
        self.migrations = []
        rows, side = self.load_rows()
        for t in self.targets:
            if not t.sub.ready.wait(30):
                raise AssertionError("the subscriber did not subscribe")
        writers = [Writer(self, k, rows[k], side if k == 0 else None)
                   for k in range(self.nwriters)]
        faults = Faults(self)
        fault_err = []

        def inject():
            try:
                for kind in kinds:
                    faults.pause(0.3, 2.0)
                    where = f" (redis target {faults.pick().index})" if len(self.targets) > 1 \
                        and ("redis" in kind) else ""
                    t0 = time.time()
                    ev = getattr(faults, kind)()
                    res["faults"][kind] += 1
                    res["evidence"].append(f"{kind}{where}: {ev} ({time.time() - t0:.1f}s)")
            except Exception as e:
                fault_err.append(e)
                import traceback
                traceback.print_exc()
        t0 = time.time()
        for w in writers:
            w.start()
        ft = threading.Thread(target=inject, daemon=True)
        ft.start()
        ft.join()
        while sum(len(w.committed) for w in writers) < self.args.txns and \
                time.time() - t0 < self.args.max_storm and \
                not any(w.fatal for w in writers):
            time.sleep(0.1)
        time.sleep(faults.rnd.uniform(0.2, 1.0))
        for w in writers:
            w.halt.set()
        for w in writers:
            w.join(60)
        storm = time.time() - t0
        for w in writers:
            if w.fatal:
                raise AssertionError(f"writer {w.k} failed: {w.fatal!r}")
        if not self.walbust.alive():
            raise AssertionError(f"walbust exited ({self.walbust.proc.returncode}); log "
                                 f"{self.walbust.log_path}")
        txns = [t for w in writers for t in w.committed] + self.migrations
        self.migrations = []
        aborted = [x for w in writers for x in w.aborted]
        qtime = self.quiesce()
        for t in self.targets:
            t.sub.sync()
        out = self.check(txns, aborted)
        self.barrier()
        late = self.check(txns, aborted)
        for t in self.targets:
            t.sub.halt.set()
            t.sub.join(5)
        res.update(txns=len(txns), rolled_back=len(aborted), storm=storm, quiesce=qtime,
                   missed=len(out["missed"]) + len(out["unheard"]),
                   over=len(out["over"]) + len(out["phantom"]),
                   lost=len(late["missed"]) + len(late["unheard"]), detail=out,
                   sub_reconnects=sum(t.sub.reconnects for t in self.targets), writer_errors=sum(w.errors for w in writers))
        if fault_err:
            res["error"] = f"fault not verified: {fault_err[0]!r}"
        return res

    def schedule(self):
        kinds = self.args.kinds
        per = self.args.faults_per_round
        seq = []
        while len(seq) < self.args.rounds * per:
            cycle = list(kinds)
            self.rnd.shuffle(cycle)
            seq += cycle
        return [seq[i * per:(i + 1) * per] for i in range(self.args.rounds)]

    def run(self):
        for n, kinds in enumerate(self.schedule(), 1):
            log(f"round {n}: faults {', '.join(kinds)}")
            res = self.round(n, kinds)
            self.results.append(res)
            for e in res["evidence"]:
                log(f"  {e}")
            d = res["detail"]
            log(f"  {res['txns']} txns ({res['rolled_back']} rolled back) in {res['storm']:.1f}s, "
                f"quiesced in {res['quiesce']:.1f}s; missed {res['missed']}, over {res['over']}, "
                f"lost after barrier {res['lost']}; keys that had to go {d['gone']}, to stay "
                f"{d['stay']}, publishes {d['published_needed']}, "
                f"subscriber reconnects {res['sub_reconnects']}, writer errors "
                f"{res['writer_errors']}")
            for name in ("missed", "unheard", "over", "phantom"):
                if d[name]:
                    log(f"  {name}: {len(d[name])}, e.g. {d[name][:8]}")
            if res["error"]:
                log(f"  ERROR {res['error']}")


def table(results, kinds):
    short = {k: k.replace("redis_", "r_").replace("proxy_", "px_").replace("walbust_", "wb_")
             for k in kinds}
    lines = ["| round | txns | faults | missed | over | lost |", "|---:|---:|---|---:|---:|---:|"]
    tot = Counter()
    for r in results:
        f = ", ".join(f"{short.get(k, k)}" + (f"×{n}" if n > 1 else "")
                      for k, n in sorted(r["faults"].items()))
        lines.append(f"| {r['round']} | {r['txns']} | {f} | {r['missed']} | {r['over']} | "
                     f"{r['lost']} |")
        tot.update(r["faults"])
    lines.append(f"| **total** | **{sum(r['txns'] for r in results)}** | "
                 f"{sum(tot.values())} faults | **{sum(r['missed'] for r in results)}** | "
                 f"**{sum(r['over'] for r in results)}** | "
                 f"**{sum(r['lost'] for r in results)}** |")
    lines.append("")
    lines.append("| fault kind | injected and verified |")
    lines.append("|---|---:|")
    for k in kinds:
        lines.append(f"| {k} | {tot.get(k, 0)} |")
    return "\n".join(lines)


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=int(os.environ.get("FAULT_ROUNDS", 20)))
    ap.add_argument("--txns", type=int, default=2600, help="committed transactions per round")
    ap.add_argument("--max-storm", type=float, default=120.0, help="seconds; the storm ends then")
    ap.add_argument("--rate", type=float, default=300.0,
                    help="transactions per second, all writers together")
    ap.add_argument("--ids", type=int, default=30000, help="size of the id space")
    ap.add_argument("--writers", type=int, default=4)
    ap.add_argument("--targets", type=int, default=1,
                    help="Redis targets (walbust --redis repeated); faults hit one at random")
    ap.add_argument("--faults-per-round", type=int, default=2)
    ap.add_argument("--kinds", default=None)
    ap.add_argument("--cluster", action="store_true",
                    help="walbust's target is a 3-master Redis Cluster (scripts/cluster)")
    ap.add_argument("--sentinel", action="store_true",
                    help="walbust's target is a Sentinel deployment (scripts/sentinel: master, "
                    "replica, three Sentinels), reached with redis+sentinel://...?replicas=1")
    ap.add_argument("--tls", action="store_true",
                    help="walbust reaches every Redis target over mutual TLS (rediss://)")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--bin", default=os.environ.get("WALBUST_BIN",
                                                    os.path.join(SRC, "build/walbust")))
    ap.add_argument("--broken", action="store_true",
                    help="run build/broken/walbust; succeed only if a loss is found")
    ap.add_argument("--table", help="also write the markdown table to this file")
    ap.add_argument("--keep", action="store_true", help="keep logs even when all went well")
    a = ap.parse_args(argv)
    if a.seed is None:
        a.seed = random.randrange(1 << 30)
    if a.cluster and a.sentinel:
        ap.error("--cluster and --sentinel exclude each other")
    known = CLUSTER_KINDS if a.cluster else SENTINEL_KINDS if a.sentinel else KINDS
    a.kinds = [k for k in (a.kinds or ",".join(known)).split(",") if k]
    for k in a.kinds:
        if k not in known:
            ap.error(f"unknown fault kind {k!r} (known: {', '.join(known)})")
    if a.broken:
        a.bin = os.path.join(SRC, "build/broken/walbust")
        if "--kinds" not in " ".join(argv):
            a.kinds = ["sentinel_master_held", "walbust_kill9"] if a.sentinel else \
                ["walbust_kill9"] if a.cluster else ["kill9_redis_held", "walbust_kill9"]
        if "--rounds" not in " ".join(argv):
            a.rounds = 3
        if "--faults-per-round" not in " ".join(argv):
            a.faults_per_round = 3
    return a


def main(argv):
    args = parse(argv)
    if not os.access(args.bin, os.X_OK):
        print(f"campaign: {args.bin} is not an executable (make{' broken' if args.broken else ''})",
              file=sys.stderr)
        return 2
    log(f"seed {args.seed}; {args.rounds} rounds, {args.txns} transactions each, "
        f"{args.faults_per_round} faults per round from {len(args.kinds)} kinds; {args.bin}")
    camp = Campaign(args)
    ok = False
    crashed = None
    try:
        camp.start()
        camp.run()
    except Exception as e:
        crashed = e
        import traceback
        traceback.print_exc()
    finally:
        results = camp.results
        missed = sum(r["missed"] for r in results)
        over = sum(r["over"] for r in results)
        errors = [r for r in results if r["error"]]
        txt = table(results, args.kinds)
        print(txt, flush=True)
        if args.table:
            with open(args.table, "w") as f:
                f.write(txt + "\n")
        if args.broken:
            ok = missed > 0
            print(f"# broken build: {missed} missed invalidations "
                  f"({'the checker sees the loss' if ok else 'NOT DETECTED'})")
        else:
            ok = crashed is None and missed == 0 and over == 0 and not errors
            print(f"# seed {args.seed}: {'PASS' if ok else 'FAIL'} "
                  f"({sum(r['txns'] for r in results)} transactions, {missed} missed, "
                  f"{over} over-invalidated, {len(errors)} rounds with unverified faults)")
        keep = args.keep or not ok or args.broken
        if keep:
            print(f"# logs kept in {camp.workdir if camp.stack else '(no stack)'}")
        camp.stop(keep)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
