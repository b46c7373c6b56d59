"""The walbust freshness calls (redis/walbust.lua) against a real Redis, both
as a Function library (FCALL after FUNCTION LOAD) and as the EVALSHA script
(redis/walbust_eval.lua, the Redis 6.2 path): every reply of docs/freshness.md, lease
revocation by UNLINK and by expiry, token replacement, argument errors, the
LSN comparison, a randomized check that a lease marker is never returned
as a hit, stale-while-revalidate markers and the fenced refresh script
(redis/refresh.lua, the script walbust runs for "refresh" and "stale"
rules). No walbust process is needed here.
"""
import os
import random
import subprocess
import time

import fresh
from fresh import LEASE_PREFIX, WalbustCache, harness, is_lease_marker

RDB = 10
MODES = ("function", "eval")


def clients():
    r = harness.redis.Redis(host="127.0.0.1", port=harness.REDIS_PORT, db=RDB)
    r.flushdb()
    fresh.load_functions(r)
    return r, {m: WalbustCache(r, mode=m) for m in MODES}


def expect_error(fn, text):
    try:
        fn()
    except harness.redis.ResponseError as e:
        assert text in str(e), (text, str(e))
        return
    raise AssertionError(f"no error containing {text!r}")


def test_eval_script_is_generated_from_library():
    out = subprocess.run([os.path.join(fresh.ROOT, "scripts", "load-redis-functions"), "--check"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    lib = open(os.path.join(fresh.ROOT, "redis", "walbust.lua")).read()
    ev = open(os.path.join(fresh.ROOT, "redis", "walbust_eval.lua")).read()
    core = lib[lib.index("-- @@CORE-BEGIN"):lib.index("-- @@CORE-END")]
    assert len(core) > 2000 and core in ev


def test_raw_calls_both_paths():
    r, _ = clients()
    sha = subprocess.run([os.path.join(fresh.ROOT, "scripts", "load-redis-functions"), "--eval",
                          "-p", str(harness.REDIS_PORT)], capture_output=True, text=True, check=True
                         ).stdout.strip()
    assert len(sha) == 40 and r.script_exists(sha) == [True]
    for how, call in (("fcall", lambda name, key, *a: r.execute_command("FCALL", name, 1, key, *a)),
                      ("evalsha", lambda name, key, *a: r.evalsha(sha, 1, key, name, *a))):
        key = f"raw:{how}"
        kind, token = call("walbust_get", key, 5000)
        assert kind == b"lease" and token, (kind, token)
        assert r.get(key) == LEASE_PREFIX + token
        assert 4000 < r.pttl(key) <= 5000
        kind, ms = call("walbust_get", key, 5000)
        assert kind == b"wait" and 4000 < ms <= 5000, (kind, ms)
        assert call("walbust_fill", key, token, "v1", 60) == 1
        assert call("walbust_get", key, 5000) == [b"hit", b"v1"]
        assert 55 <= r.ttl(key) <= 60
        assert call("walbust_fill", key, token, "v2", 60) == 0  # the lease was consumed
        assert r.get(key) == b"v1"


def test_lease_revoked_by_unlink_expiry_and_replacement():
    r, cs = clients()
    for mode, c in cs.items():
        k = f"rev:{mode}"
        kind, t1 = c.get(k, 5000)
        assert kind == "lease"
        r.unlink(k)                                   # what walbust does on a change
        assert not c.fill(k, t1, "stale", 60) and r.get(k) is None
        kind, t2 = c.get(k, 5000)
        assert kind == "lease" and t2 != t1
        r.unlink(k)
        kind, t3 = c.get(k, 5000)                     # a later reader's lease
        assert kind == "lease" and t3 not in (t1, t2)
        assert not c.fill(k, t2, "stale", 60)         # replaced: refused
        assert r.get(k) == LEASE_PREFIX + t3          # and t3's lease untouched
        assert c.fill(k, t3, "fresh", 0)
        assert r.get(k) == b"fresh" and r.ttl(k) == -1  # ttl 0: no expiry
        k2 = f"exp:{mode}"
        kind, t4 = c.get(k2, 30)
        harness.wait_until(lambda: not r.exists(k2), 5, "the lease to expire")
        assert not c.fill(k2, t4, "late", 60) and r.get(k2) is None


def test_wait_hint_tracks_lease():
    r, cs = clients()
    for mode, c in cs.items():
        k = f"wait:{mode}"
        assert c.get(k, 800)[0] == "lease"
        kind, ms = c.get(k, 99999)
        assert kind == "wait" and 1 <= ms <= 800, (kind, ms)
        r.pexpire(k, 1)                               # about to lapse: hint at least 1
        kind, x = c.get(k, 800)
        assert (kind == "wait" and x >= 1) or kind == "lease", (kind, x)


def test_errors():
    r, cs = clients()
    for mode, c in cs.items():
        expect_error(lambda: c.call("walbust_get", "e", "0"), "lease_ms must be a positive integer")
        expect_error(lambda: c.call("walbust_get", "e", "1.5"), "lease_ms must be a positive integer")
        expect_error(lambda: c.call("walbust_fill", "e", "t", "v", "-1"), "ttl_s must be")
        expect_error(lambda: c.call("walbust_fill", "e", "", "v", "1"), "token must be")
        kind, tok = c.get(f"e:{mode}", 5000)
        assert kind == "lease"
        expect_error(lambda: c.fill(f"e:{mode}", tok, LEASE_PREFIX + b"x", 10), "reserved lease prefix")
        assert r.get(f"e:{mode}") == LEASE_PREFIX + tok  # the refused value was not stored
        expect_error(lambda: c.call("walbust_caught_up", "wm", "16B3748"), "lsn must be")
        expect_error(lambda: c.call("walbust_caught_up", "wm", "123456789/0"), "lsn must be")
        r.set("wm", "garbage")
        expect_error(lambda: c.call("walbust_caught_up", "wm", "0/1"), "not an LSN")
    expect_error(lambda: r.execute_command("FCALL", "walbust_get", 2, "a", "b", 100), "exactly 1 key")
    expect_error(lambda: r.execute_command("FCALL", "walbust_fill", 1, "a", "t", "v"), "takes 3 argument")
    expect_error(lambda: cs["eval"]._script(keys=["a"], args=["walbust_nope"]), "first argument must be")
    # walbust_caught_up is read-only (FCALL_RO, replicas); the others are not.
    expect_error(lambda: r.execute_command("FCALL_RO", "walbust_get", 1, "a", 100), "")


def test_caught_up_compares_lsns_numerically():
    r, cs = clients()
    cases = [  # (watermark, lsn, expected)
        (None, "0/0", 0), ("0/16B3748", "0/16B3748", 1), ("0/16B3748", "0/16B3749", 0),
        ("0/16B3749", "0/16B3748", 1), ("0/A", "0/9", 1), ("0/9", "0/A", 0),
        ("1/0", "0/FFFFFFFF", 1), ("0/FFFFFFFF", "1/0", 0), ("10/0", "F/FFFFFFFF", 1),
        ("FFFFFFFF/FFFFFFFF", "FFFFFFFF/FFFFFFFE", 1), ("ffffffff/fffffffe", "FFFFFFFF/FFFFFFFF", 0),
        ("2/10", "10/2", 0), ("0/100", "0/FF", 1),
    ]
    for mode, c in cs.items():
        for wm, lsn, want in cases:
            if wm is None:
                r.delete(c.watermark_key)
            else:
                r.set(c.watermark_key, wm)
            assert c.call("walbust_caught_up", c.watermark_key, lsn) == want, (mode, wm, lsn)
            assert c.caught_up(lsn) == bool(want)
        r.set(c.watermark_key, "0/5")
        t0 = time.monotonic()
        assert c.wait_caught_up("0/6", timeout=0.3) is False
        assert 0.25 < time.monotonic() - t0 < 2


def test_marker_never_returned_as_hit():
    """Random interleavings of leases, fills, refused fills, UNLINKs, expiries,
    stale marks and plain SETs over a few keys: no walbust_get reply is ever a marker,
    and a plain GET that sees one recognises it with is_lease_marker."""
    r, cs = clients()
    run = refresh_script(r)
    rnd = random.Random(7)
    keys = [f"m:{i}" for i in range(5)]
    tokens = {}
    seen = {"hit": 0, "lease": 0, "wait": 0, "marker_gets": 0, "refused": 0, "stale": 0}
    for i in range(6000):
        c = cs[rnd.choice(MODES)]
        k = rnd.choice(keys)
        op = rnd.random()
        if op < 0.45:
            kind, x = c.get(k, rnd.choice([1, 2, 50, 5000]))
            seen[kind] += 1
            if kind == "hit":
                assert not is_lease_marker(x) and not x.startswith(b"\0"), x
            elif kind == "lease":
                tokens.setdefault(k, []).append(x)
            elif kind == "stale":
                assert not is_lease_marker(x[0]) and not x[0].startswith(b"\0"), x
                if x[1] is not None:
                    tokens.setdefault(k, []).append(x[1])
            else:
                assert x >= 1
        elif op < 0.7 and tokens.get(k):
            tok = rnd.choice(tokens[k])
            if not c.fill(k, tok, f"v{i}", rnd.choice([0, 60])):
                seen["refused"] += 1
        elif op < 0.8:
            r.unlink(k)
        elif op < 0.83:
            r.set(k, f"plain{i}")
        elif op < 0.86:
            mark_stale(run, k, grace=rnd.choice([1, 60]))
        else:
            v = r.get(k)
            if is_lease_marker(v):
                seen["marker_gets"] += 1
                assert v.startswith(b"\0walbust-lease:")
    assert all(seen[x] > 100 for x in ("hit", "lease", "wait", "marker_gets", "refused")), seen
    assert seen["stale"] > 50, seen
    print(f"# marker fuzz: {seen}")


def refresh_script(r):
    with open(os.path.join(fresh.ROOT, "redis", "refresh.lua")) as f:
        src = f.read()
    return lambda *keys_and_args, nkeys=1: r.eval(src, nkeys, *keys_and_args)


def mark_stale(run, key, grace=5):
    """What walbust does for a "stale" rule: redis/refresh.lua in stale mode."""
    return run(key, "stale", "", str(grace), "")


def test_stale_while_revalidate():
    r, cs = clients()
    run = refresh_script(r)
    for mode, c in cs.items():
        k = f"stale:{mode}"
        r.set(k, "old")
        assert mark_stale(run, k) == 1
        assert is_lease_marker(r.get(k)) and 0 < r.pttl(k) <= 5000  # plain GET: a miss
        kind, (old, token) = c.get(k, 5000)
        assert (kind, old) == ("stale", b"old") and token, (kind, old, token)
        assert c.get(k, 5000) == ("stale", (b"old", None))  # the others: no lease
        assert c.get(k, 5000) == ("stale", (b"old", None))
        assert not c.fill(k, b"not-the-token", "x", 60)
        assert c.fill(k, token, "new", 60)
        assert c.get(k, 5000) == ("hit", b"new") and 55 <= r.ttl(k) <= 60
        # the rebuilder's lease lapses: the next reader gets a new one
        mark_stale(run, k)
        _, (_, t1) = c.get(k, 30)
        time.sleep(0.05)
        kind, (old, t2) = c.get(k, 5000)
        assert kind == "stale" and old == b"new" and t2 and t2 != t1
        assert not c.fill(k, t1, "late", 60) and c.fill(k, t2, "newer", 60)
        # a newer change during a rebuild revokes it; the old value stays
        mark_stale(run, k)
        _, (_, t3) = c.get(k, 5000)
        ttl_before = r.pttl(k)
        mark_stale(run, k)
        assert r.pttl(k) <= ttl_before  # the grace is not extended
        assert not c.fill(k, t3, "built-from-older-data", 60)
        kind, (old, t4) = c.get(k, 5000)
        assert kind == "stale" and old == b"newer" and t4 not in (None, t3)
        # nobody rebuilds: gone after the grace, then an ordinary lease
        k2 = f"grace:{mode}"
        r.set(k2, "v")
        mark_stale(run, k2, grace=1)
        harness.wait_until(lambda: not r.exists(k2), 5, "the stale value to expire")
        assert c.get(k2, 5000)[0] == "lease"
        # a lease marker is revoked (as an invalidation does); nothing: nothing
        assert mark_stale(run, k2) == 1 and not r.exists(k2)
        assert mark_stale(run, f"none:{mode}") == 0 and not r.exists(f"none:{mode}")
        r.sadd(f"set:{mode}", "m")
        assert mark_stale(run, f"set:{mode}") == 1 and not r.exists(f"set:{mode}")


def test_get_or_fill_serves_stale_to_all_but_one():
    r, cs = clients()
    run = refresh_script(r)
    for mode, c in cs.items():
        k = f"gof:{mode}"
        r.set(k, "old")
        mark_stale(run, k)
        calls = []
        got = [c.get_or_fill(k, lambda: calls.append(1) or "rebuilt", ttl=60)]
        assert got == ["rebuilt"] and len(calls) == 1
        assert c.get_or_fill(k, lambda: calls.append(1) or "again", ttl=60) == b"rebuilt"
        mark_stale(run, k)
        _, (_, token) = c.get(k, 5000)  # someone else is rebuilding
        vals = [c.get_or_fill(k, lambda: calls.append(1) or "x", ttl=60) for _ in range(5)]
        assert vals == [b"rebuilt"] * 5 and len(calls) == 1, (vals, calls)
        assert c.stats["stale"] >= 6


def test_refresh_script_fence():
    r, cs = clients()
    run = refresh_script(r)
    k, f = "product:{1}", "walbust:fence:product:{1}"
    row = '{"id":"1","name":"a","price":null}'
    assert run(k, f, "json", "0/10", "60", row, nkeys=2) == 1
    assert r.get(k) == row.encode() and r.get(f) == b"0/10" and 55 <= r.ttl(f) <= 60
    assert run(k, f, "json", "0/F", "60", '{"id":"1","name":"older"}', nkeys=2) == 0
    assert r.get(k) == row.encode()
    assert run(k, f, "json", "0/10", "60", '{"id":"1","name":"same commit"}', nkeys=2) == 1
    assert run(k, f, "json", "1/0", "0", '{"id":"1","name":"b"}', nkeys=2) == 1  # 1/0 > 0/FFFFFFFF
    assert r.ttl(k) == -1 and r.get(f) == b"1/0"
    assert run(k, f, "hash", "0/FFFFFFFF", "0", row, nkeys=2) == 0  # numerically older
    h, hf = "ph:{1}", "walbust:fence:ph:{1}"
    assert run(h, hf, "hash", "2/0", "30", row, nkeys=2) == 1
    assert r.hgetall(h) == {b"id": b"1", b"name": b"a"} and 25 <= r.ttl(h) <= 30
    # a refresh revokes a live lease: the cache-aside filler is refused
    for mode, c in cs.items():
        lk, lf = f"lease:{mode}", f"walbust:fence:{{lease:{mode}}}"
        kind, token = c.get(lk, 5000)
        assert kind == "lease"
        assert run(lk, lf, "json", "0/1", "0", "fresh", nkeys=2) == 1
        assert not c.fill(lk, token, "stale", 60) and r.get(lk) == b"fresh"
    try:
        run(k, f, "json", "nope", "0", row, nkeys=2)
        raise AssertionError("a bad LSN was accepted")
    except harness.redis.ResponseError as e:
        assert "not an LSN" in str(e)


if __name__ == "__main__":
    fresh.run_module("freshness protocol", [
        test_eval_script_is_generated_from_library,
        test_raw_calls_both_paths,
        test_lease_revoked_by_unlink_expiry_and_replacement,
        test_wait_hint_tracks_lease,
        test_errors,
        test_caught_up_compares_lsns_numerically,
        test_marker_never_returned_as_hit,
        test_stale_while_revalidate,
        test_get_or_fill_serves_stale_to_all_but_one,
        test_refresh_script_fence,
    ])
