"""walbust against a real Redis Cluster, and with several targets (docs/guarantees.md,
issue 8).

The module starts its own cluster with scripts/cluster (3 masters, 1
replica each, cluster-node-timeout 1000 ms) in a directory under STACK_DIR
and stops it at the end. Every test works in database walbust_cluster
(recreated per test, slot "cluster"), flushes every master first and uses
keys under "clu:". "Gone" is asserted after a barrier (a later commit whose
invalidation was observed on every target), "kept" for rows that were never
written, so lost and excess invalidations are both caught. Every fault is
verified: the resharding moved slots (CLUSTER SLOTS shows the new owner and
written keys lived in them), the killed master is dead and its replica
promoted, the paused target does not answer PING.

Run by hand:
  make && scripts/stack start /tmp/me-stack && . /tmp/me-stack/env &&
  WALBUST_BIN=$PWD/build/walbust /usr/bin/python3 tests/e2e/test_cluster.py
"""
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import redis  # noqa: E402
from redis.cluster import ClusterNode, RedisCluster  # noqa: E402

from harness import (BARRIER_RULE, BARRIER_SQL, SRC, STACK_DIR, Runner, Walbust,  # noqa: E402
                     connect, free_port, fresh_db, scrape, slot_confirmed, sql, wait_until,
                     write_rules)

DB = "walbust_cluster"
SLOT = "cluster"
NROWS = 3000
WRITTEN_POOL = list(range(1, 2001))  # rows 2001..3000 are never written


def key(i):
    return f"clu:item:{i}"


def keyslot(k):
    """CLUSTER KEYSLOT computed in Python (CRC16/XMODEM, hash tags)."""
    b = k.encode()
    s = b.find(b"{")
    if s >= 0:
        e = b.find(b"}", s + 1)
        if e > s + 1:
            b = b[s + 1:e]
    crc = 0
    for x in b:
        crc ^= x << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) & 0xFFFF if crc & 0x8000 else (crc << 1) & 0xFFFF
    return crc & 16383


# ---- the cluster --------------------------------------------------------


class Cluster:
    """Six redis-servers started by scripts/cluster in a private directory."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="cluster-", dir=STACK_DIR)
        out = subprocess.run([os.path.join(SRC, "scripts/cluster"), "start", self.dir],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        env = dict(line.replace("export ", "", 1).split("=", 1)
                   for line in out.stdout.splitlines() if line.startswith("export "))
        self.ports = [int(p) for p in env["CLUSTER_PORTS"].strip("'").split()]
        self.url = env["CLUSTER_URL"].strip("'")
        self.dead = set()

    def stop(self):
        subprocess.run([os.path.join(SRC, "scripts/cluster"), "stop", self.dir], timeout=60)
        shutil.rmtree(self.dir, ignore_errors=True)

    def node(self, port, timeout=2.0):
        return redis.Redis(host="127.0.0.1", port=port, decode_responses=True,
                           socket_timeout=timeout, socket_connect_timeout=timeout)

    def live(self):
        return [p for p in self.ports if p not in self.dead]

    def client(self):
        return RedisCluster(startup_nodes=[ClusterNode("127.0.0.1", p) for p in self.live()],
                            decode_responses=True)

    def nodes(self):
        """CLUSTER NODES as {port: (id, flags, master_id, slot ranges)}."""
        out = {}
        for line in self.node(self.live()[0]).execute_command("CLUSTER", "NODES").splitlines():
            f = line.split()
            port = int(f[1].split("@")[0].rsplit(":", 1)[1])
            out[port] = (f[0], f[2].split(","), f[3], f[8:])
        return out

    def masters(self):
        return sorted(p for p, (_, flags, _, _) in self.nodes().items()
                      if "master" in flags and "fail" not in flags and p not in self.dead)

    def owner(self, slot):
        for first, last, master, *_ in self.node(self.live()[0]).execute_command("CLUSTER", "SLOTS"):
            if first <= slot <= last:
                return int(master[1])
        return None

    def state_ok(self):
        try:
            return all(self.node(p).execute_command("CLUSTER INFO")["cluster_state"] == "ok"
                       for p in self.live())
        except redis.RedisError:
            return False

    def pid(self, port):
        with open(os.path.join(self.dir, str(port), "redis.pid")) as f:
            return int(f.read())

    def flush(self):
        for p in self.masters():
            self.node(p).flushall()

    def replicate(self):
        """Wait until every master's replica has its writes."""
        for p in self.masters():
            self.node(p, 10).execute_command("WAIT", 1, 5000)


def ping(port, timeout=0.5):
    try:
        return redis.Redis(host="127.0.0.1", port=port, socket_timeout=timeout,
                           socket_connect_timeout=timeout).ping()
    except (redis.RedisError, OSError):
        return False


class PrivateRedis:
    """A single redis-server this module owns (the one it pauses)."""

    def __init__(self):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.dir = tempfile.mkdtemp(prefix="redis-", dir=STACK_DIR)
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.dir, "--logfile",
             os.path.join(self.dir, "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: ping(self.port), 10, "private redis-server to start")
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def client(self):
        return redis.Redis(host="127.0.0.1", port=self.port, decode_responses=True)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


# ---- the workload -------------------------------------------------------


class Writer(threading.Thread):
    """Commits one-row UPDATEs of random rows from a pool until halted.
    `attempted` holds every id it started to write (some may not have
    committed), `committed` every id whose commit returned."""

    def __init__(self, pool, seed):
        super().__init__(daemon=True)
        self.pool = list(pool)
        self.rng = random.Random(seed)
        self.attempted, self.committed = set(), set()
        self.count = 0  # commits
        self.halt = threading.Event()
        self.error = None

    def run(self):
        try:
            conn = connect(DB)
            with conn.cursor() as cur:
                while not self.halt.is_set():
                    i = self.rng.choice(self.pool)
                    self.attempted.add(i)
                    cur.execute("UPDATE items SET v = v + 1 WHERE id = %s", (i,))
                    self.committed.add(i)
                    self.count += 1
            conn.close()
        except Exception as e:  # reported by stop()
            self.error = e

    def wait_more(self, n, timeout=30):
        base = self.count
        wait_until(lambda: self.count >= base + n or self.error, timeout,
                   f"{n} more writes")
        assert self.error is None, self.error

    def stop(self):
        self.halt.set()
        self.join(30)
        assert not self.is_alive(), "writer did not stop"
        assert self.error is None, self.error


def setup(rules_extra=None):
    fresh_db(DB)
    sql(DB, "CREATE TABLE items(id int PRIMARY KEY, team int NOT NULL, v int NOT NULL DEFAULT 0)")
    sql(DB, "ALTER TABLE items REPLICA IDENTITY FULL")
    sql(DB, "INSERT INTO items(id, team) SELECT g, g %% 10 FROM generate_series(1, %s) g", (NROWS,))
    sql(DB, BARRIER_SQL)
    sql(DB, "CREATE PUBLICATION walbust FOR TABLE items, walbust_barrier")
    rule = {"table": "items", "keys": ["clu:item:{id}"]}
    rule.update(rules_extra or {})
    return write_rules({"defaults": {"tag_prefix": "clu:tag:"}, "rules": [rule, BARRIER_RULE]})


def seed(rc, ids):
    pipe = rc.pipeline()
    for i in ids:
        pipe.set(key(i), "cached")
    pipe.execute()


def present(rc, ids):
    ids = sorted(ids)
    pipe = rc.pipeline()
    for i in ids:
        pipe.exists(key(i))
    return {i for i, e in zip(ids, pipe.execute()) if e}


def lsn_eq(a, b):
    return a is not None and b is not None and sql(
        DB, "SELECT %s::pg_lsn = %s::pg_lsn", (a, b), fetch=True)[0][0]


def barrier_all(clients, timeout=60):
    """Commit a barrier row; wait until its key is gone from every target."""
    token = str(time.time_ns())
    for c in clients:
        c.set(f"barrier:{token}", "1")
    sql(DB, "INSERT INTO walbust_barrier(token) VALUES (%s)", (token,))
    for c in clients:
        wait_until(lambda: not c.exists(f"barrier:{token}"), timeout, "barrier invalidation")


def assert_storm(rc, wr):
    assert wr.committed, "the writer wrote nothing"
    left = present(rc, wr.committed)
    assert not left, (f"{len(left)} of {len(wr.committed)} written rows still cached "
                      f"(lost invalidations), e.g. {sorted(left)[:10]}")
    never = set(range(1, NROWS + 1)) - wr.attempted
    lost = never - present(rc, never)
    assert not lost, f"{len(lost)} never-written rows lost their key, e.g. {sorted(lost)[:10]}"


class Scene:
    """Everything a test started, torn down in reverse order."""

    def __init__(self):
        self.items = []

    def add(self, obj):
        self.items.append(obj)
        return obj

    def close(self):
        for obj in reversed(self.items):
            try:
                if isinstance(obj, Writer):
                    obj.halt.set()
                    obj.join(10)
                elif isinstance(obj, Walbust):
                    if obj.alive():
                        rc = obj.stop()  # SIGTERM: drain, confirm, exit 0
                        assert rc == 0, f"walbust exited with {rc} on SIGTERM"
                else:
                    obj.stop()
            except Exception as e:  # teardown goes on
                print(f"# teardown: {e!r}")


CL = None


def start_walbust(scene, rules, urls):
    w = scene.add(Walbust(DB, rules, slot=SLOT, redis_urls=urls))
    return w.start().wait_streaming()


# ---- tests --------------------------------------------------------------


def test_keys_land_on_owning_masters():
    """Keys, versions and publishes are routed by slot: every master held
    some of the keys, each written key is gone from the master that owns
    its slot, the others are still there; a hash-tagged version key lands
    on its tag's node."""
    CL.flush()
    rules = setup({"versions": ["clu:ver:{{grp{team}}}:{id}"], "publish": ["clu:chan"]})
    rc = CL.client()
    seed(rc, range(1, NROWS + 1))
    masters = CL.masters()
    assert len(masters) == 3, masters
    per_node = {p: len(CL.node(p).keys("clu:item:*")) for p in masters}
    assert all(n > 300 for n in per_node.values()), per_node
    scene = Scene()
    try:
        start_walbust(scene, rules, [CL.url])
        sub = rc.pubsub(node=rc.get_node("127.0.0.1", masters[-1]))
        sub.subscribe("clu:chan")
        wait_until(lambda: sub.get_message(timeout=0.1) is not None, 10, "subscription")
        sql(DB, "UPDATE items SET v = v + 1 WHERE id <= 600")
        barrier_all([rc])
        for i in (1, 250, 600, 601, 2999):
            owner = CL.owner(keyslot(key(i)))
            assert CL.node(owner).exists(key(i)) == (0 if i <= 600 else 1), (i, owner)
        assert not present(rc, range(1, 601)), "written keys survived"
        assert present(rc, range(601, NROWS + 1)) == set(range(601, NROWS + 1))
        for p in masters:
            assert len(CL.node(p).keys("clu:item:*")) < per_node[p], (
                f"no invalidation reached master {p}")
        # versions: clu:ver:{grp3}:13 lives on the slot of "grp3"
        vkey = "clu:ver:{grp3}:13"
        assert CL.node(CL.owner(keyslot("grp3"))).get(vkey) == "1"
        # publishes reach a subscriber on any node (cluster-wide PUBLISH)
        got = wait_until(lambda: sub.get_message(timeout=0.2), 10, "a publish")
        assert got["channel"] == "clu:chan" and '"table":"public.items"' in got["data"], got
        sub.close()
    finally:
        scene.close()


def test_patterns_scan_every_master():
    """A pattern runs SCAN + UNLINK on every master: a team's keys spread
    over all three masters all go; another team's stay."""
    CL.flush()
    rules = setup({"patterns": ["clu:team:{team}:*"]})
    rc = CL.client()
    for t in (3, 4):
        seed_pipe = rc.pipeline()
        for m in range(300):
            seed_pipe.set(f"clu:team:{t}:m{m}", "x")
        seed_pipe.execute()
    holders = {CL.owner(keyslot(f"clu:team:3:m{m}")) for m in range(300)}
    assert len(holders) == 3, f"team 3 keys live on {holders} only"
    scene = Scene()
    try:
        start_walbust(scene, rules, [CL.url])
        sql(DB, "UPDATE items SET v = v + 1 WHERE id = 3")  # team 3
        barrier_all([rc])
        for p in CL.masters():
            assert not CL.node(p).keys("clu:team:3:*"), f"team 3 keys left on {p}"
        left4 = sum(len(CL.node(p).keys("clu:team:4:*")) for p in CL.masters())
        assert left4 == 300, f"team 4 lost keys: {left4}"
    finally:
        scene.close()


def test_refresh_fenced_across_masters():
    """Refresh on a cluster: each row is stored on the master owning its key
    (the fence key shares the slot), a fence holding a newer commit refuses
    the store, and walbust_refresh_fenced_total counts exactly those refusals
    although patterns in the same batch make walbust send the refreshes in
    several rounds."""
    CL.flush()
    rules = setup({"patterns": ["clu:team:{team}:*"],
                   "refresh": [{"key": "clu:rf:{id}", "value": "row", "ttl": 600}]})
    rc = CL.client()
    fenced = (5, 150, 300)  # 300: likely the last change, in the final round
    for i in fenced:
        rc.set(f"walbust:fence:{{clu:rf:{i}}}", "FFFFFFFF/0")
    port = free_port()
    scene = Scene()
    try:
        w = scene.add(Walbust(DB, rules, slot=SLOT, redis_urls=[CL.url]))
        w.args[w.args.index("--metrics") + 1] = f"127.0.0.1:{port}"
        w.start().wait_streaming()
        sql(DB, "UPDATE items SET v = 7 WHERE id <= 300")
        barrier_all([rc])
        stored = {i for i in range(1, 301) if rc.get(f"clu:rf:{i}") is not None}
        assert stored == set(range(1, 301)) - set(fenced), sorted(set(range(1, 301)) - stored)
        assert rc.get("clu:rf:1") == '{"id":"1","team":"1","v":"7"}', rc.get("clu:rf:1")
        owners = {CL.owner(keyslot(f"clu:rf:{i}")) for i in stored}
        assert len(owners) == 3, owners
        m = wait_until(lambda: (lambda v: v if v.get("walbust_refresh_fenced_total") == 3
                                else None)(scrape(port)), 10, "walbust_refresh_fenced_total 3")
        assert m['walbust_refresh_writes_total{table="public.items"}'] == 300, m
    finally:
        scene.close()


def test_tags_across_slots():
    """A tag set whose members live in other slots (on other masters): the
    members go first (routed by slot), then the set; other tags stay."""
    CL.flush()
    rules = setup({"tags": ["post:{id}"]})
    rc = CL.client()
    members = [f"clu:page:{n}" for n in range(200)]
    other = [f"clu:other:{n}" for n in range(50)]
    for m in members:
        rc.set(m, "x")
        rc.sadd("clu:tag:post:5", m)
    for m in other:
        rc.set(m, "x")
        rc.sadd("clu:tag:post:6", m)
    rc.set("clu:tag:post:7", "not a set")  # another type in the tag namespace
    set_owner = CL.owner(keyslot("clu:tag:post:5"))
    elsewhere = [m for m in members if CL.owner(keyslot(m)) != set_owner]
    assert len(elsewhere) > 50, "members should live on other masters than the set"
    scene = Scene()
    try:
        start_walbust(scene, rules, [CL.url])
        sql(DB, "UPDATE items SET v = v + 1 WHERE id IN (5, 7)")
        barrier_all([rc])
        assert not rc.exists("clu:tag:post:5"), "tag set survived"
        assert sum(rc.exists(m) for m in members) == 0, "tag members survived"
        assert not rc.exists("clu:tag:post:7"), "non-set value at a tag name survived"
        assert rc.scard("clu:tag:post:6") == 50
        assert sum(rc.exists(m) for m in other) == 50, "another tag's members were deleted"
    finally:
        scene.close()


def test_two_targets_one_paused():
    """Targets: the cluster and a single node. The single node is frozen
    (SIGSTOP) while walbust is idle: the next commit still reaches the
    cluster, and the flush LSN does not pass it; writes go on and later
    commits keep reaching the cluster (the frozen target keeps its batch and
    is retried on its own backoff); after SIGCONT both targets catch up and
    neither lost anything."""
    CL.flush()
    rules = setup()
    rc = CL.client()
    scene = Scene()
    single = scene.add(PrivateRedis())
    rs = single.client()
    try:
        seed(rc, range(1, NROWS + 1))
        seed(rs, range(1, NROWS + 1))
        start_walbust(scene, rules, [CL.url, single.url])
        barrier_all([rc, rs])
        # Freeze the single node while walbust is idle: the watermark it
        # writes after each confirmation has reached both targets.
        wm = f"walbust:confirmed:{SLOT}"
        wait_until(lambda: lsn_eq(rs.get(wm), slot_confirmed(DB, SLOT)) and
                   lsn_eq(rc.get(wm), slot_confirmed(DB, SLOT)), 20, "the watermark on both targets")
        single.proc.send_signal(signal.SIGSTOP)
        assert not ping(single.port), "the paused redis still answers PING"
        before = sql(DB, "SELECT pg_current_wal_insert_lsn()::text", fetch=True)[0][0]
        sql(DB, "UPDATE items SET v = v + 1 WHERE id = 2500")
        wait_until(lambda: not rc.exists(key(2500)), 20, "the cluster to apply while paused")
        time.sleep(0.5)  # give a wrong confirmation time to happen
        conf = slot_confirmed(DB, SLOT)
        assert sql(DB, "SELECT %s::pg_lsn <= %s::pg_lsn", (conf, before), fetch=True)[0][0], (
            f"confirmed {conf} past a commit the paused target has not applied (before {before})")
        wr = scene.add(Writer(WRITTEN_POOL, 11))
        wr.start()
        wr.wait_more(300)
        # A commit made long after the freeze still reaches the healthy
        # target, while confirmation stays behind the frozen one.
        sql(DB, "UPDATE items SET v = v + 1 WHERE id = 2600")
        wait_until(lambda: not rc.exists(key(2600)), 30,
                   "the cluster to keep applying later commits while the other target is frozen")
        assert not ping(single.port), "the paused redis answered during the test"
        conf = slot_confirmed(DB, SLOT)
        assert sql(DB, "SELECT %s::pg_lsn <= %s::pg_lsn", (conf, before), fetch=True)[0][0], (
            f"confirmed {conf} past a commit the paused target has not applied (before {before})")
        single.proc.send_signal(signal.SIGCONT)
        assert ping(single.port, 5), "redis did not come back after SIGCONT"
        wr.wait_more(300)
        wr.stop()
        wr.committed.update((2500, 2600))
        wr.attempted.update((2500, 2600))
        barrier_all([rc, rs])
        assert_storm(rc, wr)
        assert_storm(rs, wr)
    finally:
        scene.close()


def test_reshard_during_write_storm():
    """redis-cli --cluster reshard moves 1500 slots (MIGRATING/IMPORTING +
    MIGRATE of their keys) while the writer runs: nothing is lost."""
    CL.flush()
    rules = setup()
    rc = CL.client()
    scene = Scene()
    try:
        seed(rc, range(1, NROWS + 1))
        start_walbust(scene, rules, [CL.url])
        nodes = CL.nodes()
        src, dst = CL.masters()[0], CL.masters()[1]
        wr = scene.add(Writer(WRITTEN_POOL, 21))
        wr.start()
        wr.wait_more(200)
        slots_before = {k: CL.owner(keyslot(key(k))) for k in WRITTEN_POOL}
        out = subprocess.run(
            ["redis-cli", "--cluster", "reshard", f"127.0.0.1:{src}", "--cluster-from",
             nodes[src][0], "--cluster-to", nodes[dst][0], "--cluster-slots", "1500",
             "--cluster-yes", "--cluster-pipeline", "50"],
            capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr
        wr.wait_more(200)
        wr.stop()
        wait_until(CL.state_ok, 20, "cluster_state:ok after resharding")
        rc = CL.client()
        barrier_all([rc])
        moved_keys = [k for k in wr.committed
                      if slots_before[k] == src and CL.owner(keyslot(key(k))) == dst]
        assert len(moved_keys) > 20, f"only {len(moved_keys)} written keys changed owner"
        assert_storm(rc, wr)
    finally:
        scene.close()


def test_master_failover_during_write_storm():
    """A master is killed (SIGKILL) while the writer runs; its replica is
    promoted; walbust follows the new map and loses nothing."""
    CL.flush()
    rules = setup()
    rc = CL.client()
    scene = Scene()
    try:
        seed(rc, range(1, NROWS + 1))
        CL.replicate()
        w = start_walbust(scene, rules, [CL.url])
        nodes = CL.nodes()
        victim = CL.masters()[2]
        replica = [p for p, (_, _, master, _) in nodes.items() if master == nodes[victim][0]][0]
        wr = scene.add(Writer(WRITTEN_POOL, 31))
        wr.start()
        wr.wait_more(300)
        os.kill(CL.pid(victim), signal.SIGKILL)
        CL.dead.add(victim)
        wait_until(lambda: not ping(victim), 10, "the killed master to stop answering")
        wait_until(lambda: "master" in CL.nodes()[replica][1] and CL.state_ok(), 30,
                   f"replica {replica} promoted and cluster_state:ok")
        wr.wait_more(300, timeout=60)  # writes after the promotion
        wr.stop()
        rc = CL.client()
        barrier_all([rc])
        assert_storm(rc, wr)
        log = w.read_log()
        assert f"127.0.0.1:{victim}" in log, "walbust never saw the dead master fail"
    finally:
        scene.close()


def test_full_masters_keep_deleting():
    """Every master at maxmemory under noeviction: Redis refuses the
    version INCRs and the watermark SET with -OOM; the deletes (UNLINK on
    every master, a pattern's SCAN + UNLINK) are still applied, the slot is
    not confirmed past the refused writes, and once memory is back the
    INCRs land and the slot moves on."""
    CL.flush()
    rules = setup({"versions": ["clu:ver:{id}"], "patterns": ["clu:team:{team}:*"]})
    rc = CL.client()
    seed(rc, range(1, 301))
    rc.set("clu:team:3:a", "1")
    masters = CL.masters()
    scene = Scene()
    try:
        w = start_walbust(scene, rules, [CL.url])
        barrier_all([rc])
        confirmed = slot_confirmed(DB, SLOT)
        for p in masters:
            CL.node(p).config_set("maxmemory-policy", "noeviction")
            CL.node(p).config_set("maxmemory", "1")
        sql(DB, "UPDATE items SET v = v + 1 WHERE id <= 300")
        wait_until(lambda: not present(rc, range(1, 301)) and not rc.exists("clu:team:3:a"), 30,
                   "deletes applied on full masters")
        wait_until(lambda: "out of memory" in w.read_log(), 20, "an out-of-memory error")
        assert not any(rc.exists(f"clu:ver:{i}") for i in (1, 150, 300)), "INCR despite OOM"
        assert lsn_eq(slot_confirmed(DB, SLOT), confirmed), "confirmed past refused writes"
        print("# " + [ln for ln in w.read_log().splitlines() if "out of memory" in ln][0][:300])
        for p in masters:
            CL.node(p).config_set("maxmemory", "0")
        wait_until(lambda: all(rc.exists(f"clu:ver:{i}") for i in (1, 150, 300)), 30,
                   "the held INCRs applied once memory is back")
        barrier_all([rc])
        # The barrier's key goes when Redis acknowledged; PostgreSQL hears
        # of it a few ms later (a status update): wait for it, bounded.
        wait_until(lambda: not lsn_eq(slot_confirmed(DB, SLOT), confirmed), 10,
                   "the slot to move on once memory is back")
    finally:
        for p in CL.masters():
            CL.node(p).config_set("maxmemory", "0")
        scene.close()


def test_lone_watermark_first():
    """The first command a Cluster target ever builds can be the watermark
    alone: WAL nobody publishes (here a table outside the publication)
    moves the position walbust confirms from a keepalive. Building its
    arguments grows the sink's argument array; it was read before it was
    grown (C leaves the order of a call's arguments open), and walbust died
    of a segfault (seen in CI). The watermark must land on the master that
    owns its key and walbust must go on."""
    CL.flush()
    rules = setup()
    sql(DB, "CREATE TABLE unpublished(id int PRIMARY KEY)")
    scene = Scene()
    try:
        w = start_walbust(scene, rules, [CL.url])
        rc = CL.client()
        sql(DB, "INSERT INTO unpublished SELECT generate_series(1, 100)")
        lsn = sql(DB, "SELECT pg_current_wal_insert_lsn()::text", fetch=True)[0][0]
        wm = f"walbust:confirmed:{SLOT}"
        wait_until(lambda: not w.alive() or (rc.get(wm) is not None and sql(
            DB, "SELECT %s::pg_lsn >= %s::pg_lsn", (rc.get(wm), lsn), fetch=True)[0][0]),
            20, f"the watermark to reach {lsn}")
        assert w.alive(), f"walbust exited with {w.proc.returncode}:\n{w.read_log()[-2000:]}"
        assert CL.node(CL.owner(keyslot(wm))).get(wm) == rc.get(wm)
        sql(DB, "UPDATE items SET v = v + 1 WHERE id = 1")
        barrier_all([rc])
    finally:
        scene.close()


def main():
    global CL
    runner = Runner("cluster")
    CL = Cluster()
    try:
        for t in (test_keys_land_on_owning_masters, test_patterns_scan_every_master,
                  test_refresh_fenced_across_masters, test_tags_across_slots, test_two_targets_one_paused,
                  test_reshard_during_write_storm, test_master_failover_during_write_storm,
                  test_full_masters_keep_deleting, test_lone_watermark_first):
            runner.run(t)
    finally:
        CL.stop()
    runner.done()


if __name__ == "__main__":
    main()
