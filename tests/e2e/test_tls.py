"""Redis over TLS (rediss://) against Debian's real redis-server with
--tls-port, certificates generated here with the openssl CLI.

- invalidation over TLS (server certificate and name verified against
  cacert=), and over mutual TLS (cert=/key=, tls-auth-clients yes);
- a wrong CA, a missing client certificate, a wrong server name and an
  expired server certificate are each refused with an error naming the
  problem, walbust keeps retrying, nothing is applied and the slot's
  confirmed position does not move; the same slot then applies everything
  once walbust runs with the fixed URL;
- a missing cacert file is a start-up error naming the file (exit 1);
- redis:// (plain text) to a TLS port says to use rediss://.

Each redis-server also listens on a plain port, used only by the test to
prepare and check keys. Database walbust_tls, slot tls.
"""
import os
import subprocess
import tempfile

from harness import (BARRIER_RULE, BARRIER_SQL, STACK_DIR, Runner, Walbust, barrier, fresh_db,
                     slot_confirmed, sql, wait_until, write_rules)
from faultkit import RedisServer, free_port, lsn_int, port_closed

DB = "walbust_tls"
SLOT = "tls"
RULES = {"rules": [{"table": "items", "keys": ["tls:item:{id}"]}, BARRIER_RULE]}
CERTS = tempfile.mkdtemp(prefix="tls-certs-", dir=STACK_DIR)


def openssl(*args):
    subprocess.run(["openssl", *args], check=True, cwd=CERTS, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)


def make_ca(name):
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", f"{name}.key", "-out", f"{name}.crt", "-subj", f"/CN={name}", "-days", "2")


def make_cert(name, ca, cn, san=None, days="2"):
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}")
    ext = []
    if san:
        with open(os.path.join(CERTS, f"{name}.ext"), "w") as f:
            f.write(f"subjectAltName={san}\n")
        ext = ["-extfile", f"{name}.ext"]
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
            "-CAcreateserial", "-out", f"{name}.crt", "-days", days, *ext)


def cert(name):
    return os.path.join(CERTS, name)


class TlsRedis(RedisServer):
    """A redis-server with a plain port (for the test) and a TLS port."""

    def __init__(self, server_cert="server", auth_clients="no"):
        super().__init__()
        self.tls_port = free_port()
        self.server_cert = server_cert
        self.auth_clients = auth_clients

    def start(self):
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                "--tls-port", str(self.tls_port), "--tls-cert-file", cert(f"{self.server_cert}.crt"),
                "--tls-key-file", cert(f"{self.server_cert}.key"), "--tls-ca-cert-file",
                cert("ca.crt"), "--tls-auth-clients", self.auth_clients, "--dir", self.dir,
                "--save", "", "--appendonly", "no", "--logfile", os.path.join(self.dir, "redis.log")]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: self.ping() or self.proc.poll() is not None, 10, "redis-server to start")
        assert self.proc.poll() is None, f"redis-server exited with {self.proc.returncode}"
        return self

    def tls_url(self, host="localhost", params=""):
        return f"rediss://{host}:{self.tls_port}/0?cacert={cert('ca.crt')}{params}"


def setup():
    make_ca("ca")
    make_ca("otherca")
    make_cert("server", "ca", "localhost", "DNS:localhost,IP:127.0.0.1")
    make_cert("expired", "ca", "localhost", "DNS:localhost,IP:127.0.0.1", days="-1")
    make_cert("client", "ca", "walbust")
    fresh_db(DB)
    sql(DB, "CREATE TABLE items(id bigint PRIMARY KEY, v int)")
    sql(DB, BARRIER_SQL)
    sql(DB, "CREATE PUBLICATION walbust FOR TABLE items, walbust_barrier")
    return write_rules(RULES)


RULES_PATH = None


def run(url):
    return Walbust(DB, RULES_PATH, slot=SLOT, redis_urls=[url]).start()


def current_lsn():
    return lsn_int(sql(DB, "SELECT pg_current_wal_lsn()::text", fetch=True)[0][0])


def applied_over(srv, url, ids):
    """walbust with url applies deletes of ids (keys set first)."""
    r = srv.client()
    for i in ids:
        r.set(f"tls:item:{i}", "cached")
    w = run(url).wait_streaming()
    try:
        for i in ids:
            sql(DB, "INSERT INTO items VALUES (%s, 0) ON CONFLICT (id) DO UPDATE SET v = items.v + 1",
                (i,))
        wait_until(lambda: not any(r.exists(f"tls:item:{i}") for i in ids), 20,
                   "invalidation over TLS")
        barrier(DB, r)
    finally:
        assert w.stop() == 0, w.read_log()
    return w


def test_tls_invalidation():
    srv = TlsRedis().start()
    try:
        w = applied_over(srv, srv.tls_url(), [1, 2, 3])
        assert "connected to redis at localhost:" in w.read_log(), w.read_log()
        # By IP address: the certificate lists IP:127.0.0.1.
        applied_over(srv, srv.tls_url(host="127.0.0.1"), [4])
        # TLS clients the server saw (the plain port is only ours).
        info = srv.client().info("stats")
        assert info.get("total_connections_received", 0) > 0
    finally:
        srv.stop()


def test_mutual_tls():
    srv = TlsRedis(auth_clients="yes").start()
    try:
        applied_over(srv, srv.tls_url(params=f"&cert={cert('client.crt')}&key={cert('client.key')}"),
                     [10, 11])
    finally:
        srv.stop()


def refused_then_fixed(srv, bad_url, want, good_url, key_id):
    """bad_url is refused with `want` in the log, nothing is applied or
    confirmed while it retries; the same slot then applies with good_url."""
    r = srv.client()
    r.set(f"tls:item:{key_id}", "cached")
    w = run(bad_url).wait_streaming()
    try:
        sql(DB, "INSERT INTO items VALUES (%s, 0) ON CONFLICT (id) DO UPDATE SET v = items.v + 1",
            (key_id,))
        after_insert = current_lsn()
        def refusals():
            return [ln for ln in w.read_log().splitlines() if want in ln and "retrying in" in ln]
        wait_until(lambda: len(refusals()) >= 2, 30, f"two refusals naming {want!r}")
        assert w.alive(), w.read_log()
        assert r.exists(f"tls:item:{key_id}"), "applied although the TLS setup is wrong"
        confirmed = lsn_int(slot_confirmed(DB, SLOT))
        assert confirmed < after_insert, (
            f"slot confirmed {confirmed} past the unapplied insert at {after_insert}")
        print(f"# {refusals()[-1]}")
    finally:
        assert w.stop() == 0, w.read_log()
    applied = run(good_url).wait_streaming()
    try:
        wait_until(lambda: not r.exists(f"tls:item:{key_id}"), 20, "the insert applied once fixed")
    finally:
        assert applied.stop() == 0, applied.read_log()


def test_wrong_ca():
    srv = TlsRedis().start()
    try:
        bad = f"rediss://localhost:{srv.tls_port}/0?cacert={cert('otherca.crt')}"
        refused_then_fixed(srv, bad, "unknown CA", srv.tls_url(), 20)
    finally:
        srv.stop()


def test_missing_client_cert():
    srv = TlsRedis(auth_clients="yes").start()
    try:
        good = srv.tls_url(params=f"&cert={cert('client.crt')}&key={cert('client.key')}")
        refused_then_fixed(srv, srv.tls_url(), "requires a client certificate", good, 21)
    finally:
        srv.stop()


def test_wrong_server_name():
    srv = TlsRedis().start()
    try:
        refused_then_fixed(srv, srv.tls_url(params="&sni=cache.example.org"), "name mismatch",
                           srv.tls_url(), 22)
    finally:
        srv.stop()


def test_expired_certificate():
    srv = TlsRedis(server_cert="expired").start()
    try:
        # Fixed by trusting nothing less, but by accepting it explicitly.
        refused_then_fixed(srv, srv.tls_url(), "has expired", srv.tls_url(params="&insecure=1"), 23)
    finally:
        srv.stop()


def test_tls_sentinel():
    """rediss+sentinel://: a Sentinel on a TLS port monitoring a master on
    a TLS port (tls-replication yes); walbust asks the Sentinel over TLS,
    connects to the master it names (127.0.0.1, verified against the
    certificate's IP entry) over TLS, and invalidates there."""
    srv = TlsRedis().start()
    sdir = tempfile.mkdtemp(prefix="tls-sentinel-", dir=STACK_DIR)
    sport = free_port()
    conf = os.path.join(sdir, "sentinel.conf")
    with open(conf, "w") as f:
        f.write(f"port 0\ntls-port {sport}\nbind 127.0.0.1\ndir {sdir}\n"
                f"tls-cert-file {cert('server.crt')}\ntls-key-file {cert('server.key')}\n"
                f"tls-ca-cert-file {cert('ca.crt')}\ntls-auth-clients no\ntls-replication yes\n"
                f"sentinel monitor tlsmaster 127.0.0.1 {srv.tls_port} 1\n")
    sen = subprocess.Popen(["redis-server", conf, "--sentinel", "--logfile",
                            os.path.join(sdir, "sentinel.log")],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: not port_closed(sport), 10, "the sentinel to listen")
        url = (f"rediss+sentinel://localhost:{sport}/tlsmaster/0?cacert={cert('ca.crt')}")
        w = applied_over(srv, url, [30, 31])
        assert "connected to redis at tlsmaster@localhost:" in w.read_log(), w.read_log()
    finally:
        sen.kill()
        sen.wait()
        srv.stop()


def test_missing_cacert_file():
    missing = os.path.join(CERTS, "nonexistent-ca.pem")
    w = run(f"rediss://localhost:{free_port()}/0?cacert={missing}")
    w.proc.wait(30)
    w.log.close()
    log = w.read_log()
    assert w.proc.returncode == 1, f"exit {w.proc.returncode}:\n{log}"
    assert f"cannot read the TLS CA file {missing}: No such file or directory" in log, log


def test_plain_url_to_tls_port():
    srv = TlsRedis().start()
    try:
        w = run(f"redis://127.0.0.1:{srv.tls_port}/0")
        try:
            wait_until(lambda: "use rediss://" in w.read_log(), 20, "a hint to use rediss://")
        finally:
            w.stop()
    finally:
        srv.stop()


def main():
    global RULES_PATH
    RULES_PATH = setup()
    runner = Runner("test_tls")
    for t in (test_tls_invalidation, test_mutual_tls, test_wrong_ca, test_missing_client_cert,
              test_wrong_server_name, test_expired_certificate, test_tls_sentinel,
              test_missing_cacert_file,
              test_plain_url_to_tls_port):
        runner.run(t)
    sql(DB, "SELECT pg_drop_replication_slot(%s) FROM pg_replication_slots WHERE slot_name = %s",
        (SLOT, SLOT))
    runner.done()


if __name__ == "__main__":
    main()
