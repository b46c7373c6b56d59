"""walbust_cache: cache-aside without the read/invalidate race (Python).

A small client for walbust's freshness protocol (docs/freshness.md):

    import psycopg2, redis
    from walbust_cache import WalbustCache

    r = redis.Redis()                        # redis-py (Debian: python3-redis)
    cache = WalbustCache(r)                  # slot "walbust", tag prefix "tag:"

    def load():                              # runs only on a miss, holding the lease
        with db.cursor() as cur:
            cur.execute("SELECT row_to_json(u)::text FROM users u WHERE id = %s", (42,))
            row = cur.fetchone()
            return row[0] if row else "null"
    user = cache.get_or_fill("user:42", load, ttl=300, tags=["user:42"])

    # read-your-writes: after committing, wait until walbust has applied it
    with db:                                 # psycopg2: commits on exit
        db.cursor().execute("UPDATE users SET name = 'Ada' WHERE id = 42")
    cache.wait_caught_up(WalbustCache.commit_lsn(db), timeout=5.0)

get_or_fill: `walbust_get` answers hit (return it), lease (this caller loads
from the database and fills with `walbust_fill`, which stores only if no
invalidation revoked the lease meanwhile), or wait (another caller is
loading: poll again, backing off, at most until the hint). If the wait
outlasts `max_wait` seconds, the loader is called without caching, so a
reader is never stuck.

Stale while revalidate (rules "stale", docs/freshness.md): walbust marks the
key stale instead of deleting it; `walbust_get` then answers stale: one
caller gets a rebuild lease (get_or_fill loads, fills with the lease and
returns the new value), the others get the old value at once until the
rebuild lands or the rule's grace period ends.

Tags: the key is added to each tag set `<tag_prefix><tag>` BEFORE the
database read. walbust's tag invalidation deletes the members of the set, so
once the key is a member, a committed change to that tag revokes the lease
and the fill is refused. Registering after the fill would leave a window
(read old row, change commits, tag invalidated while the key is not yet a
member, fill succeeds, SADD) in which a stale value survives.

Redis 7 uses the function library (FCALL; load it with
scripts/load-redis-functions); Redis 6.2 the EVALSHA script
redis/walbust_eval.lua (loaded automatically). mode="auto" picks FCALL when
the library is loaded.
"""
import os
import time

LEASE_PREFIX = b"\0walbust-lease:"
EVAL_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "redis",
                           "walbust_eval.lua")


def is_lease_marker(value):
    """True when a value read with a plain GET is a walbust lease marker
    (a miss for the reader), not cached data."""
    if value is None:
        return False
    if isinstance(value, str):
        value = value.encode("utf-8", "surrogateescape")
    return value.startswith(LEASE_PREFIX)


def _text(v):
    return v.decode() if isinstance(v, bytes) else v


class WalbustCache:
    """Lease-fenced cache-aside over one redis-py client."""

    def __init__(self, r, *, slot="walbust", tag_prefix="tag:", lease_ms=2000, max_wait=5.0,
                 mode="auto", eval_script=EVAL_SCRIPT):
        """r: a redis.Redis (decode_responses either way). slot: walbust's
        slot name (watermark key walbust:confirmed:<slot>). tag_prefix: the
        rules' defaults.tag_prefix. lease_ms: how long a loader may take
        before its lease lapses (its fill is then refused). max_wait: seconds
        a reader waits for another's fill before loading uncached.
        mode: "function" (FCALL), "eval" (EVALSHA) or "auto"."""
        self.r = r
        self.watermark_key = f"walbust:confirmed:{slot}"
        self.tag_prefix = tag_prefix
        self.lease_ms = int(lease_ms)
        self.max_wait = max_wait
        self.stats = {"hit": 0, "lease": 0, "wait": 0, "filled": 0, "refused": 0, "uncached": 0,
                      "stale": 0}
        self._major = int(_text(r.info("server")["redis_version"]).split(".")[0])
        if mode == "auto":
            mode = "function" if self._major >= 7 and self._has_library() else "eval"
        if mode not in ("function", "eval"):
            raise ValueError(f"mode must be function, eval or auto, not {mode!r}")
        self.mode = mode
        self._script = None
        if mode == "eval":
            with open(eval_script, "rb") as f:
                self._script = r.register_script(f.read())

    def _has_library(self):
        return bool(self.r.execute_command("FUNCTION", "LIST", "LIBRARYNAME", "walbust"))

    def call(self, name, key, *args):
        """One protocol call, FCALL or EVALSHA: walbust_get, walbust_fill or
        walbust_caught_up. Returns Redis's reply."""
        if self.mode == "function":
            cmd = "FCALL_RO" if name == "walbust_caught_up" else "FCALL"
            return self.r.execute_command(cmd, name, 1, key, *args)
        return self._script(keys=[key], args=[name, *args])

    def get(self, key, lease_ms=None):
        """walbust_get: ("hit", value) | ("lease", token) | ("wait", ms) |
        ("stale", (old_value, token or None)): a token means this caller
        rebuilds the value and fills with it."""
        reply = self.call("walbust_get", key, lease_ms or self.lease_ms)
        kind = _text(reply[0])
        if kind == "stale":
            return kind, (reply[1], reply[2] if len(reply) > 2 else None)
        return kind, reply[1]

    def fill(self, key, token, value, ttl):
        """walbust_fill: True stored, False refused (lease revoked or lapsed)."""
        return self.call("walbust_fill", key, token, value, int(ttl)) == 1

    def register_tags(self, key, tags, ttl):
        """Add key to each tag set; call before reading the database. The
        set lives at least as long as the entry will (Redis 7: EXPIRE NX+GT;
        on 6.2 tag sets get no expiry)."""
        if not tags:
            return
        p = self.r.pipeline(transaction=False)
        keep = int(ttl) + self.lease_ms // 1000 + 1
        for tag in tags:
            tkey = self.tag_prefix + tag
            p.sadd(tkey, key)
            if int(ttl) == 0:
                p.persist(tkey)
            elif self._major >= 7:
                p.execute_command("EXPIRE", tkey, keep, "NX")
                p.execute_command("EXPIRE", tkey, keep, "GT")
        p.execute()

    def get_or_fill(self, key, loader, ttl, tags=()):
        """The cached value of key, or loader()'s result (str or bytes)
        stored with ttl seconds (0: no expiry) when this caller won the
        lease and no invalidation intervened. loader() returning None is
        not cached (store a representation of absence to cache misses)."""
        deadline = time.monotonic() + self.max_wait
        pause = 0.002
        while True:
            kind, x = self.get(key)
            if kind == "hit":
                self.stats["hit"] += 1
                return x
            if kind == "stale":
                self.stats["stale"] += 1
                old, token = x
                if token is None:
                    return old  # another caller rebuilds it
                x = token  # this caller rebuilds: as with a lease
            if kind in ("lease", "stale"):
                self.stats["lease"] += kind == "lease"
                self.register_tags(key, tags, ttl)
                value = loader()
                if value is not None:
                    ok = self.fill(key, x, value, ttl)
                    self.stats["filled" if ok else "refused"] += 1
                return value
            self.stats["wait"] += 1
            now = time.monotonic()
            if now >= deadline:
                self.stats["uncached"] += 1
                return loader()
            time.sleep(min(pause, int(x) / 1000.0, deadline - now))
            pause = min(pause * 2, 0.05)

    def caught_up(self, lsn):
        """True when walbust's watermark has reached lsn ("X/X")."""
        return self.call("walbust_caught_up", self.watermark_key, lsn) == 1

    def wait_caught_up(self, lsn, timeout=5.0):
        """Wait until walbust has applied everything up to lsn; False on
        timeout (walbust down or lagging: read from the database instead)."""
        deadline = time.monotonic() + timeout
        pause = 0.002
        while True:
            if self.caught_up(lsn):
                return True
            now = time.monotonic()
            if now >= deadline:
                return False
            time.sleep(min(pause, deadline - now))
            pause = min(pause * 2, 0.05)

    @staticmethod
    def commit_lsn(conn):
        """An LSN at or after the end of every transaction committed before
        this call (so: call it after your COMMIT returned; any connection
        to the same server will do). pg_current_wal_insert_lsn() is past the
        commit record even with synchronous_commit=off, where
        pg_current_wal_lsn() (the write position) may not be yet."""
        with conn.cursor() as cur:
            cur.execute("SELECT pg_current_wal_insert_lsn()::text")
            lsn = cur.fetchone()[0]
        if not conn.autocommit:
            conn.rollback()  # end the read-only transaction the SELECT opened
        return lsn

    def commit_and_wait(self, conn, timeout=5.0):
        """conn.commit(), then wait_caught_up on its LSN. Returns the wait's
        result: True when the cache no longer holds anything this commit
        invalidated."""
        conn.commit()
        return self.wait_caught_up(self.commit_lsn(conn), timeout)
