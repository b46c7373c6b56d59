#!/usr/bin/python3
"""A small controllable TCP proxy for fault tests (loopback only).

    proxy.py LISTEN_PORT UPSTREAM_PORT CONTROL_PORT

forwards 127.0.0.1:LISTEN_PORT to 127.0.0.1:UPSTREAM_PORT and takes one-line
commands on 127.0.0.1:CONTROL_PORT (one command per connection; the reply is
one JSON line with the mode and counters):

    pass          forward normally (the default); ends slow and blackhole:
                  held bytes and held connections flow again
    cut           close every connection at once (RST) and refuse new ones
                  (the listening socket is closed) until the next mode
    blackhole     connections stay open and new ones are accepted, but not a
                  byte moves in either direction (a partition: TCP holds the
                  data, nothing is lost or reordered, nobody is told)
    slow MS       every chunk is delivered MS milliseconds late, in order
    stats         just the counters

Counters: accepted, cuts, closed_by_cut (connections reset by a cut),
upstream_refused (the server was down), chunks, bytes, delayed_chunks
(chunks that waited in slow mode), held_bytes (the most bytes that were
waiting, unread, during a blackhole), active (open connection pairs),
queued. The campaign uses them to verify that a fault really touched a
connection.

Everything runs in one thread with selectors. The proxy is run as its own
process (tests/faults/campaign.py starts it) so it never competes for the
test process's GIL. The Proxy class is importable for in-process use.
"""
import json
import selectors
import socket
import struct
import sys
import time

HOST = "127.0.0.1"
CHUNK = 65536
MAX_QUEUE = 4 << 20  # stop reading a direction while this much waits


class Pipe:
    """One direction of one connection pair: bytes read from src wait in
    queue (as (due, data)) until due, then go to dst."""

    def __init__(self, src, dst):
        self.src, self.dst = src, dst
        self.queue = []
        self.queued = 0
        self.eof = False  # src closed: shut dst's write side once drained


class Pair:
    def __init__(self, client):
        self.client = client
        self.upstream = None
        self.pipes = []
        self.closed = False


class Proxy:
    def __init__(self, listen_port, upstream_port, control_port=None):
        self.listen_port, self.upstream_port = listen_port, upstream_port
        self.control_port = control_port
        self.sel = selectors.DefaultSelector()
        self.mode, self.delay = "pass", 0.0
        self.pairs = []
        self.listener = None
        self.control = None
        self.stats = {"accepted": 0, "cuts": 0, "closed_by_cut": 0, "chunks": 0, "bytes": 0,
                      "delayed_chunks": 0, "held_bytes": 0, "upstream_refused": 0}
        self._open_listener()
        if control_port is not None:
            self.control = socket.socket()
            self.control.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.control.bind((HOST, control_port))
            self.control.listen(8)
            self.sel.register(self.control, selectors.EVENT_READ, ("control", None))

    # ---- listener ---------------------------------------------------------

    def _open_listener(self):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((HOST, self.listen_port))
        s.listen(128)
        s.setblocking(False)
        self.listener = s
        self.sel.register(s, selectors.EVENT_READ, ("accept", None))

    def _close_listener(self):
        if self.listener is not None:
            self.sel.unregister(self.listener)
            self.listener.close()
            self.listener = None

    def _accept(self):
        try:
            c, _ = self.listener.accept()
        except OSError:
            return
        c.setblocking(False)
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.stats["accepted"] += 1
        pair = Pair(c)
        self.pairs.append(pair)
        if self.mode != "blackhole":
            self._connect_upstream(pair)
        self._update(pair)

    def _connect_upstream(self, pair):
        u = socket.socket()
        u.settimeout(2)
        try:
            u.connect((HOST, self.upstream_port))
        except OSError:
            u.close()
            self.stats["upstream_refused"] += 1
            self._close_pair(pair)
            return
        u.setblocking(False)
        u.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pair.upstream = u
        pair.pipes = [Pipe(pair.client, u), Pipe(u, pair.client)]

    # ---- connection pairs -------------------------------------------------

    def _close_pair(self, pair, rst=False):
        if pair.closed:
            return
        pair.closed = True
        for s in (pair.client, pair.upstream):
            if s is None:
                continue
            try:
                self.sel.unregister(s)
            except (KeyError, ValueError):
                pass
            if rst:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()
        self.pairs.remove(pair)

    def _update(self, pair):
        """(Re)register the pair's sockets for what they can do now."""
        if pair.closed:
            return
        moving = self.mode != "blackhole"
        want = {pair.client: 0}
        if pair.upstream is not None:
            want[pair.upstream] = 0
        for p in pair.pipes:
            if moving and not p.eof and p.queued < MAX_QUEUE:
                want[p.src] |= selectors.EVENT_READ
            if moving and p.queue and p.queue[0][0] <= time.monotonic():
                want[p.dst] |= selectors.EVENT_WRITE
        for s, ev in want.items():
            try:
                if ev:
                    try:
                        self.sel.modify(s, ev, ("pair", pair))
                    except KeyError:
                        self.sel.register(s, ev, ("pair", pair))
                else:
                    self.sel.unregister(s)
            except (KeyError, ValueError):
                pass

    def _read(self, pair, sock):
        for p in pair.pipes:
            if p.src is sock and not p.eof:
                try:
                    data = sock.recv(CHUNK)
                except BlockingIOError:
                    return
                except OSError:
                    self._close_pair(pair)
                    return
                if not data:
                    p.eof = True
                    if not p.queue:
                        self._shut(pair, p)
                    return
                self.stats["chunks"] += 1
                self.stats["bytes"] += len(data)
                due = time.monotonic()
                if self.mode == "slow" and self.delay > 0:
                    due += self.delay
                    self.stats["delayed_chunks"] += 1
                p.queue.append((due, data))
                p.queued += len(data)

    def _shut(self, pair, pipe):
        """src said EOF and everything was delivered: pass the EOF on; when
        both directions ended, close the pair."""
        try:
            pipe.dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        if all(p.eof and not p.queue for p in pair.pipes):
            self._close_pair(pair)

    def _write(self, pair, sock):
        for p in pair.pipes:
            while p.dst is sock and p.queue and p.queue[0][0] <= time.monotonic():
                due, data = p.queue[0]
                try:
                    n = sock.send(data)
                except BlockingIOError:
                    return
                except OSError:
                    self._close_pair(pair)
                    return
                p.queued -= n
                if n < len(data):
                    p.queue[0] = (due, data[n:])
                    return
                p.queue.pop(0)
            if p.dst is sock and p.eof and not p.queue:
                self._shut(pair, p)
                if pair.closed:
                    return

    # ---- modes --------------------------------------------------------------

    def set_mode(self, mode, delay_ms=0):
        if mode not in ("pass", "cut", "blackhole", "slow"):
            raise ValueError(f"unknown mode {mode!r}")
        if mode == "cut":
            self.stats["cuts"] += 1
            for pair in list(self.pairs):
                self.stats["closed_by_cut"] += 1
                self._close_pair(pair, rst=True)
            self._close_listener()
        elif self.listener is None:
            self._open_listener()
        if mode == "blackhole":
            self.stats["held_bytes"] = 0
        if self.mode == "blackhole" and mode != "blackhole":
            for pair in list(self.pairs):
                if pair.upstream is None and not pair.closed:
                    self._connect_upstream(pair)
        self.mode, self.delay = mode, delay_ms / 1000.0
        for pair in list(self.pairs):
            self._update(pair)

    def _in_flight(self):
        return sum(p.queued for pair in self.pairs for p in pair.pipes)

    def snapshot(self):
        out = dict(self.stats, mode=self.mode, delay_ms=int(self.delay * 1000),
                   active=len(self.pairs), queued=self._in_flight())
        return out

    def _control(self):
        try:
            c, _ = self.control.accept()
        except OSError:
            return
        with c:
            c.settimeout(2)
            line = b""
            try:
                while not line.endswith(b"\n"):
                    part = c.recv(256)
                    if not part:
                        break
                    line += part
                words = line.decode().split()
                if words and words[0] != "stats":
                    self.set_mode(words[0], int(words[1]) if len(words) > 1 else 0)
                reply = self.snapshot()
            except (ValueError, OSError) as e:
                reply = {"error": str(e)}
            try:
                c.sendall((json.dumps(reply) + "\n").encode())
            except OSError:
                pass

    # ---- loop -------------------------------------------------------------

    def _blackhole_tick(self):
        """In blackhole, count what the peers are trying to send (readable
        bytes stay in the kernel: nothing is read)."""
        held = 0
        for pair in self.pairs:
            for s in (pair.client, pair.upstream):
                if s is None:
                    continue
                try:
                    held += len(s.recv(CHUNK, socket.MSG_PEEK | socket.MSG_DONTWAIT))
                except OSError:
                    pass
        self.stats["held_bytes"] = max(self.stats["held_bytes"], held)

    def serve_forever(self):
        while True:
            timeout = 0.05
            now = time.monotonic()
            if self.mode != "blackhole":
                for pair in self.pairs:
                    for p in pair.pipes:
                        if p.queue:
                            timeout = min(timeout, max(0.0, p.queue[0][0] - now))
            for key, ev in self.sel.select(timeout):
                kind, pair = key.data
                if kind == "accept":
                    if self.listener is not None:
                        self._accept()
                elif kind == "control":
                    self._control()
                elif not pair.closed:
                    if ev & selectors.EVENT_READ:
                        self._read(pair, key.fileobj)
                    if not pair.closed and ev & selectors.EVENT_WRITE:
                        self._write(pair, key.fileobj)
            if self.mode == "blackhole":
                self._blackhole_tick()
            for pair in list(self.pairs):
                self._update(pair)


def command(control_port, text, timeout=5):
    """Send one control command to a proxy process; return its JSON reply."""
    with socket.create_connection((HOST, control_port), timeout=timeout) as c:
        c.sendall((text + "\n").encode())
        data = b""
        while not data.endswith(b"\n"):
            part = c.recv(4096)
            if not part:
                break
            data += part
    reply = json.loads(data.decode())
    if "error" in reply:
        raise RuntimeError(f"proxy on control port {control_port}: {reply['error']}")
    return reply


def main(argv):
    if len(argv) != 4:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    proxy = Proxy(int(argv[1]), int(argv[2]), int(argv[3]))
    print("proxy ready", flush=True)
    try:
        proxy.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
