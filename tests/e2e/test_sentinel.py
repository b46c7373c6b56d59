"""Redis Sentinel (redis+sentinel://) with real servers: a master, a
replica and three Sentinels (redis-server --sentinel), walbust with
?replicas=1.

- master, replica and Sentinels require passwords (the URL's userinfo is
  the master's, sentinel_password= the Sentinels'); none shows in the log;
- walbust finds the master through the Sentinels (SENTINEL
  get-master-addr-by-name, then ROLE) and invalidates there;
- under continuous writes (each cached row updated once, in random order),
  SENTINEL FAILOVER promotes the replica: walbust follows it (connection
  killed by the Sentinels, READONLY, rediscovery) and, once caught up, not
  one key of an updated row is left on the new master;
- then the new master is killed with SIGKILL under writes: the Sentinels
  promote the old master (now its replica) and, again, nothing is stale
  once the killed server is back (empty, as a replica of the new master,
  which replicas=1 waits for before confirming).

Database walbust_sentinel, slot sentinel.
"""
import os
import subprocess
import time

import redis

from harness import (BARRIER_RULE, BARRIER_SQL, STACK_DIR, Runner, Walbust, fresh_db, sql,
                     wait_until, write_rules)
from faultkit import RedisServer, Writer, free_port

DB = "walbust_sentinel"
SLOT = "sentinel"
NAME = "walmaster"
ROWS = 4000
MPW = "master-s3cret"    # requirepass of master and replica (masterauth too)
SPW = "sentinel-s3cret"  # the Sentinels' own requirepass
RULES = {"rules": [{"table": "items", "keys": ["sen:item:{id}"]}, BARRIER_RULE]}


class Node(RedisServer):
    """A redis-server with extra arguments (--replicaof)."""

    def __init__(self, extra=(), port=None):
        super().__init__(port=port)
        self.extra = list(extra)

    def client(self, timeout=None):
        return redis.Redis(host="127.0.0.1", port=self.port, password=MPW, decode_responses=True,
                           socket_timeout=timeout, socket_connect_timeout=timeout)

    def start(self):
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir,
                "--save", "", "--appendonly", "no", "--logfile",
                os.path.join(self.dir, "redis.log"), "--requirepass", MPW, "--masterauth", MPW,
                *self.extra]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: self.ping() or self.proc.poll() is not None, 10, "redis-server to start")
        assert self.proc.poll() is None, f"redis-server exited with {self.proc.returncode}"
        return self


class Sentinel(Node):
    def __init__(self, master_port):
        super().__init__()
        self.conf = os.path.join(self.dir, "sentinel.conf")
        with open(self.conf, "w") as f:
            f.write(f"port {self.port}\nbind 127.0.0.1\ndir {self.dir}\n"
                    f"sentinel monitor {NAME} 127.0.0.1 {master_port} 2\n"
                    f"sentinel auth-pass {NAME} {MPW}\n"
                    f"requirepass {SPW}\nsentinel sentinel-pass {SPW}\n"
                    f"sentinel down-after-milliseconds {NAME} 1000\n"
                    f"sentinel failover-timeout {NAME} 10000\n")

    def start(self):
        args = ["redis-server", self.conf, "--sentinel", "--logfile",
                os.path.join(self.dir, "sentinel.log")]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: self.ping() or self.proc.poll() is not None, 10, "sentinel to start")
        assert self.proc.poll() is None
        return self

    def client(self, timeout=None):
        return redis.Redis(host="127.0.0.1", port=self.port, password=SPW, decode_responses=True,
                           socket_timeout=timeout, socket_connect_timeout=timeout)


class Deployment:
    def __init__(self):
        self.master = Node().start()
        self.replica = Node(["--replicaof", "127.0.0.1", str(self.master.port)]).start()
        self.nodes = {self.master.port: self.master, self.replica.port: self.replica}
        self.sentinels = [Sentinel(self.master.port).start() for _ in range(3)]
        wait_until(self.settled, 30, "sentinels to see each other and the replica")

    def settled(self):
        for s in self.sentinels:
            c = s.client(1)
            try:
                if len(c.execute_command("SENTINEL", "sentinels", NAME)) < 2:
                    return False
                reps = c.execute_command("SENTINEL", "replicas", NAME)
                if not any("s_down" not in str(r) for r in reps):
                    return False
            except redis.RedisError:
                return False
        return link_up(self.replica)

    def url(self):
        addrs = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://:{MPW}@{addrs}/{NAME}?replicas=1&sentinel_password={SPW}"

    @staticmethod
    def named_by(sentinel):
        """The master port this Sentinel names, or None when it does not answer."""
        try:
            return int(sentinel.client(1).execute_command("SENTINEL", "get-master-addr-by-name",
                                                          NAME)[1])
        except (redis.RedisError, TypeError):
            return None

    def master_port(self):
        for s in self.sentinels:
            port = self.named_by(s)
            if port is not None:
                return port
        raise AssertionError("no sentinel answers")

    def agreed_master(self):
        """The master port every Sentinel names, or None while they differ
        (or one does not answer)."""
        ports = {self.named_by(s) for s in self.sentinels}
        return ports.pop() if len(ports) == 1 else None

    def healthy(self):
        """The Sentinels agree on a master that says it is one, and the other
        node is its replica with the link up."""
        m = self.agreed_master()
        if m is None or m not in self.nodes:
            return False
        try:
            if self.nodes[m].client(1).info("replication").get("role") != "master":
                return False
        except redis.RedisError:
            return False
        other = self.replica_of(self.nodes[m])
        try:
            info = other.client(1).info("replication")
        except redis.RedisError:
            return False
        return info.get("master_port") == m and info.get("master_link_status") == "up"

    def current(self):
        return self.nodes[self.master_port()]

    def replica_of(self, master):
        return next(n for p, n in self.nodes.items() if n is not master)

    def stop(self):
        for n in [*self.sentinels, *self.nodes.values()]:
            n.stop()


def link_up(node):
    """Is node a replica in sync with its master? (The Sentinels kill its
    clients while they reconfigure it.)"""
    try:
        return node.client(1).info("replication").get("master_link_status") == "up"
    except redis.RedisError:
        return False


def replication_report(d, node):
    """What the restarted node and the master it was pointed at say (printed
    when the link does not come up, so a failure can be diagnosed)."""
    lines = [f"# link of {node.port} did not come up"]
    for n in d.nodes.values():
        try:
            info = n.client(1).info("replication")
            lines.append(f"#   {n.port}: role={info.get('role')} master_port={info.get('master_port')} "
                         f"link={info.get('master_link_status')} slaves={info.get('connected_slaves')}")
        except redis.RedisError as e:
            lines.append(f"#   {n.port}: {e}")
    try:
        with open(os.path.join(node.dir, "redis.log")) as f:
            lines += ["#   " + ln.rstrip() for ln in f.readlines()[-15:]]
    except OSError:
        pass
    return "\n".join(lines)


def catch_up(d, timeout=60):
    """Barrier on the current master: once its key is gone, everything
    committed before was applied there; once the slot confirmed past it,
    nothing before it is applied again (walbust keeps applying while a batch
    is short of replicas, and replays what it applied to a master that
    failed over), so keys set from now on stay."""
    token = f"{time.time_ns()}"
    d.current().client().set(f"barrier:{token}", "1")
    sql(DB, "INSERT INTO walbust_barrier(token) VALUES (%s)", (token,))
    lsn = sql(DB, "SELECT pg_current_wal_lsn()::text", fetch=True)[0][0]

    def gone():
        try:
            return not d.current().client(1).exists(f"barrier:{token}")
        except redis.RedisError:
            return False
    wait_until(gone, timeout, "the barrier on the current master")
    wait_until(lambda: sql(DB, "SELECT confirmed_flush_lsn >= %s::pg_lsn FROM pg_replication_slots "
                               "WHERE slot_name = %s", (lsn, SLOT), fetch=True)[0][0],
               timeout, "the slot to confirm the barrier")


def populate(master):
    r = master.client()
    pipe = r.pipeline(transaction=False)
    for i in range(1, ROWS + 1):
        pipe.set(f"sen:item:{i}", "cached")
    pipe.set("sen:control", "no row invalidates this")
    pipe.execute()


def stale_after(d, writer):
    catch_up(d)
    r = d.current().client()
    written = writer.written()
    stale = [i for i in written if r.exists(f"sen:item:{i}")]
    left = sum(1 for i in range(1, ROWS + 1) if i not in written and r.exists(f"sen:item:{i}"))
    return written, stale, left + r.exists("sen:control")


def failover_round(d, w, how):
    old = d.current()
    populate(old)
    wait_until(lambda: d.replica_of(old).client(1).dbsize() >= ROWS, 20, "keys on the replica")
    writer = Writer(DB, ROWS, seed=len(how))
    writer.set_pool(range(1, ROWS + 1), fresh=True)
    writer.start()
    try:
        writer.wait_more(300)
        if how == "failover":
            d.sentinels[0].client().execute_command("SENTINEL", "FAILOVER", NAME)
        else:
            old.kill9()
        wait_until(lambda: d.agreed_master() not in (None, old.port), 60,
                   "every sentinel to name the promoted replica")
        if how != "failover":
            # Back empty on its port as a replica of the new master (as an
            # operator restarts it), which replicas=1 needs before anything
            # confirms. The Sentinels may still be settling: they have
            # been seen to make the restarted node the master again, with
            # the other as its replica. Either way round is a healthy
            # deployment; it is restarted again only while the Sentinels
            # name the other node and its own link stays down. It comes
            # back with replica-priority 0: once, on a loaded host, the
            # Sentinels failed over a second time to it while it was still
            # empty, which wiped the other's keys too (every key gone, the
            # check below could then see nothing).
            for attempt in range(3):
                master = d.agreed_master() or d.master_port()
                if master != old.port:
                    old.stop()
                    d.nodes[old.port] = Node(["--replicaof", "127.0.0.1", str(master),
                                              "--replica-priority", "0"],
                                             port=old.port).start()
                    old = d.nodes[old.port]
                try:
                    wait_until(d.healthy, 40, "the killed master back, master and replica linked")
                    break
                except AssertionError:
                    print(replication_report(d, d.nodes[old.port]))
                    if attempt == 2:
                        raise
        writer.wait_more(300, timeout=60)
    finally:
        writer.finish()
    written, stale, left = stale_after(d, writer)
    print(f"# {how}: {len(writer.txns)} transactions, {len(written)} rows updated, "
          f"{len(stale)} stale keys, {left} keys of untouched rows (and a control key) left (master now "
          f"{d.master_port()})")
    assert w.alive(), w.read_log()
    assert not stale, f"{len(stale)} stale keys after {how}, e.g. {sorted(stale)[:10]}"
    assert left > 0, "every key vanished: the test would not see a missed invalidation"
    return old


def test_sentinel_failovers():
    fresh_db(DB)
    sql(DB, "CREATE TABLE items(id bigint PRIMARY KEY, v int)")
    sql(DB, f"INSERT INTO items SELECT g, 0 FROM generate_series(1, {ROWS}) g")
    sql(DB, BARRIER_SQL)
    sql(DB, "CREATE PUBLICATION walbust FOR TABLE items, walbust_barrier")
    rules = write_rules(RULES)
    d = Deployment()
    w = Walbust(DB, rules, slot=SLOT, redis_urls=[d.url()])
    try:
        w.start().wait_streaming()
        catch_up(d)
        assert f"connected to redis at {NAME}@" in w.read_log(), w.read_log()
        failover_round(d, w, "failover")
        # Followed on an error of the old master, or on the Sentinels'
        # +switch-master event (test_sentinel_switch.py).
        log = w.read_log()
        assert any(s in log for s in ("READONLY", "redis I/O error", "connection closed",
                                      "(+switch-master)")), log
        failover_round(d, w, "kill -9")
        assert "s3cret" not in w.read_log(), "a password in walbust's log"
    finally:
        assert w.stop() == 0, w.read_log()[-3000:]
        d.stop()
        sql(DB, "SELECT pg_drop_replication_slot(%s) FROM pg_replication_slots "
            "WHERE slot_name = %s", (SLOT, SLOT))


def main():
    runner = Runner("test_sentinel")
    runner.run(test_sentinel_failovers)
    runner.done()


if __name__ == "__main__":
    main()
