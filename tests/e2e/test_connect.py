"""Commands that end: connecting to PostgreSQL fails fast or times out, and
a stop request ends a connection attempt.

- `decode` against a refused port exits 1 at once, naming host and port;
- `decode`, `check` and `run` against a port that accepts connections but
  never answers give up after the default connect_timeout (10 s; `run`
  then retries, as a daemon does), or the conninfo's own connect_timeout;
- SIGTERM ends `run` and `decode` while they wait for such a server.
"""
import os
import socket
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import BIN, REDIS_PORT, Runner, wait_until, write_rules
from faultkit import free_port, port_closed

RULES = {"rules": [{"table": "items", "keys": ["c:{id}"]}]}


class SilentServer:
    """Accepts TCP connections on a loopback port and never says a word."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.conns = []
        self.accepted = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(c)
            self.accepted += 1

    def close(self):
        self.sock.close()
        for c in self.conns:
            c.close()


def pg(port, extra=""):
    return f"host=127.0.0.1 port={port} user=postgres dbname=nowhere {extra}".strip()


def spawn(args, env=None):
    e = dict(os.environ)
    e.pop("PGCONNECT_TIMEOUT", None)
    e.update(env or {})
    return subprocess.Popen([BIN] + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=e)


def finish(p, timeout):
    """Wait for p to exit within timeout; return (rc, seconds, output)."""
    t0 = time.time()
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
        raise AssertionError(f"{p.args[1]} did not exit within {timeout}s:\n{err}")
    return p.returncode, time.time() - t0, out + err


def test_decode_refused_port_fails_fast():
    port = free_port()
    assert port_closed(port)
    t0 = time.time()
    rc, _, out = finish(spawn(["decode", "--pg", pg(port)]), 10)
    took = time.time() - t0
    assert rc == 1, (rc, out)
    assert f"could not connect to postgresql at 127.0.0.1:{port}" in out, out
    assert "retrying" not in out, out
    assert took < 3, took
    print(f"# refused: exit 1 after {took:.2f}s")


def test_silent_server_times_out():
    """The default connect_timeout (10 s) for decode, check and run at once;
    a conninfo's own connect_timeout wins."""
    srv = SilentServer()
    rules = write_rules(RULES)
    try:
        t0 = time.time()
        dec = spawn(["decode", "--pg", pg(srv.port)])
        chk = spawn(["check", "--rules", rules, "--pg", pg(srv.port)])
        run = spawn(["run", "--rules", rules, "--pg", pg(srv.port), "--metrics", "off",
                     "--redis", f"redis://127.0.0.1:{REDIS_PORT}"])
        own = spawn(["decode", "--pg", pg(srv.port, "connect_timeout=2")])
        rc, took, out = finish(own, 10)
        assert rc == 1 and "no answer within 2 s (connect_timeout" in out, out
        assert 1.5 < took < 6, took
        for name, p in (("decode", dec), ("check", chk)):
            rc, _, out = finish(p, 25)
            took = time.time() - t0
            assert rc == 1, (name, rc, out)
            assert f"could not connect to postgresql at 127.0.0.1:{srv.port}" in out, out
            assert "no answer within 10 s (connect_timeout" in out, out
            assert 9 < took < 20, (name, took)
            print(f"# silent server: {name} exit 1 after {took:.1f}s")
        # run is a daemon: it gives up on the attempt and retries.
        lines = []
        threading.Thread(target=lambda: lines.extend(iter(run.stderr.readline, "")),
                         daemon=True).start()
        wait_until(lambda: any("no answer within 10 s" in l and "retrying in" in l
                               for l in lines), 25, "run to time out and retry")
        run.terminate()
        assert run.wait(5) == 0, run.returncode
        assert srv.accepted >= 4, srv.accepted
    finally:
        srv.close()


def test_sigterm_while_connecting():
    srv = SilentServer()
    rules = write_rules(RULES)
    try:
        for args in (["decode", "--pg", pg(srv.port)],
                     ["decode", "--slot", "nope", "--pg", pg(srv.port)],
                     ["run", "--rules", rules, "--pg", pg(srv.port), "--metrics", "off",
                      "--redis", f"redis://127.0.0.1:{REDIS_PORT}"]):
            before = srv.accepted
            p = spawn(args)
            wait_until(lambda: srv.accepted > before, 10, f"{args[0]} to connect")
            time.sleep(0.5)  # well inside the connection attempt
            t0 = time.time()
            p.terminate()
            rc, _, out = finish(p, 5)
            took = time.time() - t0
            assert rc == 0, (args[0], rc, out)
            assert took < 1.5, (args[0], took)
            assert "retrying" not in out, out
            print(f"# SIGTERM ends {args[0]} while connecting in {took:.2f}s")
    finally:
        srv.close()


if __name__ == "__main__":
    t = Runner("test_connect")
    t.run(test_decode_refused_port_fails_fast)
    t.run(test_silent_server_times_out)
    t.run(test_sigterm_while_connecting)
    t.done()
