"""A Redis Cluster over TLS (rediss+cluster://) with real servers:
scripts/cluster with CLUSTER_TLS starts 3 masters and 3 replicas that speak
only TLS (--port 0 --tls-port, cluster bus and replication over TLS too,
client certificates required), certificates made here with the openssl CLI.

- walbust learns the nodes from CLUSTER SLOTS (which names their TLS ports)
  and invalidates keys of rows spread over every master, and pattern keys
  (SCAN on every master), with mutual TLS (cacert=, cert=, key=); keys of
  rows not written stay;
- restarted without the client certificate, every node refuses it: walbust
  logs that the server requires a client certificate, applies nothing and
  the slot's confirmed position does not move; restarted with the
  certificate, the same slot applies what was held.

Database walbust_tls_cluster, slot tls_cluster.
"""
import os
import re
import shutil
import subprocess
import tempfile
import time

import redis
from redis.cluster import ClusterNode, RedisCluster

from harness import (BARRIER_RULE, BARRIER_SQL, STACK_DIR, Runner, Walbust, barrier, fresh_db,
                     slot_confirmed, sql, wait_until, write_rules)

DB = "walbust_tls_cluster"
SLOT = "tls_cluster"
ROWS = 300
SRC = os.environ.get("WALBUST_SRC", os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))
RULES = {"rules": [{"table": "items", "keys": ["tc:item:{id}"], "patterns": ["tc:page:{id}:*"]},
                   BARRIER_RULE]}


def make_certs(d):
    def ossl(*a):
        subprocess.run(["openssl", *a], check=True, cwd=d, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    ossl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-subj", "/CN=ca", "-days", "2")
    with open(os.path.join(d, "san.ext"), "w") as f:
        f.write("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name, ext in (("server", ["-extfile", "san.ext"]), ("client", [])):
        ossl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
        ossl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", *ext)


class TlsCluster:
    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="tls-cluster-", dir=STACK_DIR)
        self.certs = os.path.join(self.dir, "certs")
        os.makedirs(self.certs)
        make_certs(self.certs)
        out = subprocess.run([os.path.join(SRC, "scripts/cluster"), "start",
                              os.path.join(self.dir, "nodes")], capture_output=True, text=True,
                             timeout=120, env=dict(os.environ, CLUSTER_TLS=self.certs))
        assert out.returncode == 0, out.stderr
        env = dict(re.findall(r"export (\w+)='?([^'\n]*)'?", out.stdout))
        self.ports = [int(p) for p in env["CLUSTER_PORTS"].split()]
        self.url = env["CLUSTER_URL"]

    def tls(self):
        c = lambda n: os.path.join(self.certs, n)  # noqa: E731
        return dict(ssl=True, ssl_ca_certs=c("ca.crt"), ssl_certfile=c("client.crt"),
                    ssl_keyfile=c("client.key"))

    def node(self, port):
        return redis.Redis(host="127.0.0.1", port=port, decode_responses=True, socket_timeout=5,
                           **self.tls())

    def client(self):
        return RedisCluster(startup_nodes=[ClusterNode("127.0.0.1", p) for p in self.ports],
                            decode_responses=True, **self.tls())

    def masters(self):
        return [p for p in self.ports
                if self.node(p).execute_command("ROLE")[0] == "master"]

    def stop(self):
        subprocess.run([os.path.join(SRC, "scripts/cluster"), "stop",
                        os.path.join(self.dir, "nodes")], timeout=60,
                       env=dict(os.environ, CLUSTER_TLS=self.certs))
        shutil.rmtree(self.dir, ignore_errors=True)


def fill(cl, r):
    for i in range(1, ROWS + 1):
        r.set(f"tc:item:{i}", "cached")
        r.set(f"tc:page:{i}:a", "cached")
        r.set(f"tc:page:{i}:b", "cached")


def present(r, ids):
    return [i for i in ids if r.exists(f"tc:item:{i}") or r.exists(f"tc:page:{i}:a")
            or r.exists(f"tc:page:{i}:b")]


def test_tls_cluster():
    cl = TlsCluster()
    fresh_db(DB)
    sql(DB, "CREATE TABLE items(id bigint PRIMARY KEY, v int)")
    sql(DB, f"INSERT INTO items SELECT g, 0 FROM generate_series(1, {ROWS}) g")
    sql(DB, BARRIER_SQL)
    sql(DB, "CREATE PUBLICATION walbust FOR TABLE items, walbust_barrier")
    rules = write_rules(RULES)
    no_cert = re.sub(r"&cert=[^&]*&key=[^&]*", "", cl.url)
    assert cl.url.startswith("rediss+cluster://") and "cert=" in cl.url and "cert=" not in \
        no_cert.replace("cacert=", ""), cl.url
    w = Walbust(DB, rules, slot=SLOT, redis_urls=[cl.url])
    try:
        r = cl.client()
        fill(cl, r)
        masters = cl.masters()
        assert len(masters) == 3, masters
        per = [cl.node(p).dbsize() for p in masters]
        assert all(n > 0 for n in per), f"keys not on every master: {per}"

        # Mutual TLS: applied on every master.
        w.start().wait_streaming()
        sql(DB, "UPDATE items SET v = v + 1 WHERE id <= 100")
        barrier(DB, r)
        left = present(r, range(1, 101))
        assert not left, f"{len(left)} rows still cached, e.g. {left[:10]}"
        assert len(present(r, range(101, ROWS + 1))) == ROWS - 100, "unwritten rows invalidated"
        per_after = [cl.node(p).dbsize() for p in masters]
        print(f"# keys per master before {per}, after {per_after}")
        assert all(a < b for a, b in zip(per_after, per)), "some master saw no invalidation"
        assert w.stop() == 0, w.read_log()[-3000:]

        # Without the client certificate every node refuses: nothing applied.
        w = Walbust(DB, rules, slot=SLOT, redis_urls=[no_cert], create_slot=False)
        w.start().wait_streaming()
        conf0 = slot_confirmed(DB, SLOT)
        sql(DB, "UPDATE items SET v = v + 1 WHERE id > 100 AND id <= 200")
        wait_until(lambda: "requires a client certificate" in w.read_log(), 30,
                   "walbust to say the server requires a client certificate")
        time.sleep(2)
        assert len(present(r, range(101, 201))) == 100, "applied without a client certificate"
        assert slot_confirmed(DB, SLOT) == conf0, "the slot moved while nothing was applied"
        print("# " + next(line for line in w.read_log().splitlines()
                          if "requires a client certificate" in line)[:400])
        assert w.stop() == 0, w.read_log()[-3000:]

        # The certificate back: the same slot applies what was held.
        w = Walbust(DB, rules, slot=SLOT, redis_urls=[cl.url], create_slot=False)
        w.start().wait_streaming()
        barrier(DB, r)
        left = present(r, range(1, 201))
        assert not left, f"{len(left)} rows still cached, e.g. {left[:10]}"
        kept = present(r, range(201, ROWS + 1))
        assert len(kept) == ROWS - 200, f"{ROWS - 200 - len(kept)} unwritten rows invalidated"
    finally:
        rc = w.stop() if w.proc else 0
        cl.stop()
        sql(DB, "SELECT pg_drop_replication_slot(%s) FROM pg_replication_slots "
            "WHERE slot_name = %s", (SLOT, SLOT))
    assert rc == 0, w.read_log()[-3000:]


def main():
    runner = Runner("test_tls_cluster")
    runner.run(test_tls_cluster)
    runner.done()


if __name__ == "__main__":
    main()
