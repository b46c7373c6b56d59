"""--flush-interval: while commits arrive faster than one per interval,
walbust gathers those that arrive within the interval into one Redis write.
The same 80 one-row commits, 10 ms apart, go through walbust with
--flush-interval 0.2 (about one batch per commit) and with
--flush-interval 50 (one batch per ~50 ms once walbust has their pace); the
batches acknowledged are counted from walbust_batch_stage_seconds, and
every key must be gone in both runs, and a held batch must cost one
snapshot query, not one started with its first commit and another after
the hold (walbust_visibility_queries_total). Counting batches and
queries, not timing them, keeps that test stable on a loaded machine. Commits 20 and 180 ms apart in
turn with --flush-interval 60 come slower than one per interval: none is
held, where holding every commit that comes soon after a write would delay
every second one by ~40 ms (counted from walbust_commit_to_ack_seconds,
with a 25 ms margin). Then the default, auto:
walbust_flush_interval_seconds follows real CPU contention (busy processes)
up and back down; walbust's streaming thread runs with 1 µs of timer slack
so that those sub-millisecond holds end on time."""
import collections
import os
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (BARRIER_RULE, BARRIER_SQL, REDIS_PORT, Runner, Walbust, barrier, connect,
                     free_port, fresh_db, redis_client, scrape, sql, wait_until, write_rules)

DB = "flush_interval"
COMMITS = 80
# commits before walbust has the pace of a burst that follows a pause
# (commitpace.h: the smoothed gap falls from four intervals under one)
PACE_WARMUP = 12
SPACING = 0.01
HOG_SECONDS = 40
HOGS_PER_CPU = 8  # enough runnable processes that a wakeup waits (3 per CPU: ~0.1 ms)


Run = collections.namedtuple("Run", "batches left elapsed queries fast")
QUERIES = "walbust_visibility_queries_total"
WAITS = "walbust_visibility_waits_total"  # one more query each: a commit not visible yet


def batches_and_keys(extra, slot, spacing=(SPACING,), within=None):
    """Run walbust with `extra` options on its own slot, commit COMMITS
    one-row updates `spacing` seconds apart (taken in turn), and return
    a Run: batches acknowledged, keys left in Redis, seconds the commits
    took, snapshot queries sent (less those repeated for a commit not
    visible yet), and with `within` (a bucket of
    walbust_commit_to_ack_seconds) how many commits were acknowledged
    within that many seconds."""
    r = redis_client(4)
    mport = free_port()
    rules = write_rules({"rules": [{"table": "items", "keys": ["fi:{id}"]}, BARRIER_RULE]})
    wb = Walbust(DB, rules, slot=slot, redis_urls=[f"redis://127.0.0.1:{REDIS_PORT}/4"],
                 extra=extra)
    wb.args[wb.args.index("--metrics") + 1] = f"127.0.0.1:{mport}"
    try:
        wb.start().wait_streaming()
        barrier(DB, r)
        for i in range(1, COMMITS + 1):
            r.set(f"fi:{i}", "cached")
        m0 = scrape(mport)
        conn = connect(DB)
        t0 = time.monotonic()
        with conn.cursor() as cur:
            for i in range(1, COMMITS + 1):
                cur.execute("UPDATE items SET v = v + 1 WHERE id = %s", (i,))
                time.sleep(spacing[i % len(spacing)])
        elapsed = time.monotonic() - t0
        conn.close()
        barrier(DB, r)
        # The barrier's key can go before its batch's stages are recorded.
        count = 'walbust_batch_stage_seconds_count{stage="redis"}'
        wait_until(lambda: scrape(mport)["walbust_transactions_total"] -
                   m0["walbust_transactions_total"] >= COMMITS + 1, 10, "every commit counted")
        time.sleep(0.2)
        m1 = scrape(mport)
        left = [i for i in range(1, COMMITS + 1) if r.exists(f"fi:{i}")]
        # a fixed interval is shown as it was given
        want = float(extra[extra.index("--flush-interval") + 1]) / 1000
        assert abs(m1["walbust_flush_interval_seconds"] - want) < 1e-9, \
            (m1["walbust_flush_interval_seconds"], want)
        le = (f'walbust_commit_to_ack_seconds_bucket{{le="{within:g}"}}'
              if within is not None else None)
        return Run(batches=int(m1[count] - m0[count]), left=left, elapsed=elapsed,
                   queries=int(m1[QUERIES] - m0[QUERIES] - (m1[WAITS] - m0[WAITS])),
                   fast=int(m1[le] - m0[le]) if within is not None else None)
    finally:
        if wb.alive():
            wb.proc.send_signal(signal.SIGTERM)
            wb.proc.wait(20)
        sql("postgres", "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
            "WHERE slot_name = %s AND NOT active", (slot,))


def make_db():
    fresh_db(DB)
    sql(DB, "CREATE TABLE items(id int PRIMARY KEY, v int NOT NULL DEFAULT 0)")
    sql(DB, BARRIER_SQL)
    sql(DB, f"INSERT INTO items(id) SELECT g FROM generate_series(1, {COMMITS}) g")
    sql(DB, "CREATE PUBLICATION walbust FOR TABLE items, walbust_barrier")


def test_flush_interval_gathers_commits():
    make_db()
    a = batches_and_keys(["--flush-interval", "0.2"], "fi_default")
    assert a.left == [], f"keys not invalidated with --flush-interval 0.2: {a.left}"
    b = batches_and_keys(["--flush-interval", "50"], "fi_spaced")
    assert b.left == [], f"keys not invalidated with --flush-interval 50: {b.left}"
    fast, spaced, elapsed = a.batches, b.batches, b.elapsed
    # With 0.2 ms nearly one batch per commit (10 ms apart); with 50 ms
    # between writes at most one per 50 ms of the commits' span once walbust
    # has their pace (+ the first PACE_WARMUP commits', the barrier's and
    # one of slack), so several commits share each.
    assert fast >= COMMITS // 2, f"--flush-interval 0.2: {fast} batches for {COMMITS} commits"
    most = int(elapsed / 0.05) + 4 + PACE_WARMUP
    print(f"# {COMMITS} commits in {elapsed:.2f} s: {fast} batches with "
          f"--flush-interval 0.2, {spaced} with --flush-interval 50 (at most {most})")
    assert 2 <= spaced <= most, \
        f"--flush-interval 50: {spaced} batches for {COMMITS} commits in {elapsed:.2f} s"
    assert spaced * 2 < fast, (spaced, fast)
    # One snapshot query per batch, held or not: a held batch does not
    # start its query with its first commit (the reply would predate the
    # commits the hold gathers and the query would go again; the build
    # before sent 41 for 26 batches). The slack: the barrier's batch, a
    # batch begun before walbust had the pace and held after it.
    print(f"# snapshot queries: {a.queries} for {fast} batches (0.2 ms), "
          f"{b.queries} for {spaced} (50 ms)")
    assert b.queries <= spaced * 5 // 4 + 3, \
        f"--flush-interval 50: {b.queries} snapshot queries for {spaced} batches"


def test_commits_at_ordinary_rates_are_not_held():
    """Commits at a slower pace than one per interval are never held, even
    one that comes soon after the previous write: 80 commits alternately
    20 ms and 180 ms apart (one per 100 ms on average) with a 60 ms
    interval. A plain spacing would hold every second commit ~40 ms for
    nothing; here each is acknowledged well within 25 ms (read from
    walbust_commit_to_ack_seconds, which counts every commit)."""
    make_db()
    run = batches_and_keys(["--flush-interval", "60"], "fi_ordinary", spacing=[0.02, 0.18],
                           within=0.025)
    batches, left, elapsed, fast = run.batches, run.left, run.elapsed, run.fast
    assert left == [], f"keys not invalidated with --flush-interval 60: {left}"
    print(f"# {COMMITS} commits 20/180 ms apart in {elapsed:.2f} s: {fast} acknowledged "
          f"within 25 ms, {batches} batches, with --flush-interval 60")
    # the barrier is among them too; slack for a loaded machine
    assert fast >= COMMITS - 4, \
        f"only {fast} of {COMMITS + 1} commits acknowledged within 25 ms: some were held"


HOG = "import time\nt = time.monotonic() + {secs}\nwhile time.monotonic() < t:\n    pass\n"


def test_auto_follows_cpu_contention():
    """--flush-interval auto (the default) keeps 0.2 ms while walbust gets a
    CPU when it wakes, rises (never past 1 ms) while busy processes keep
    every CPU saturated, invalidates every key meanwhile, and comes back to
    0.2 ms once the load is gone. The contention is real: HOGS_PER_CPU processes
    spinning per CPU, each stopping by itself after HOG_SECONDS."""
    make_db()
    r = redis_client(4)
    mport = free_port()
    rules = write_rules({"rules": [{"table": "items", "keys": ["fa:{id}"]}, BARRIER_RULE]})
    wb = Walbust(DB, rules, slot="fi_auto", redis_urls=[f"redis://127.0.0.1:{REDIS_PORT}/4"])
    wb.args[wb.args.index("--metrics") + 1] = f"127.0.0.1:{mport}"
    gauge = "walbust_flush_interval_seconds"
    hogs = []
    seen = []
    try:
        wb.start().wait_streaming()
        assert abs(scrape(mport)[gauge] - 0.0002) < 1e-9, scrape(mport)[gauge]
        # The holds are fractions of a millisecond: the streaming (main)
        # thread asks for 1 µs of timer slack instead of Linux's 50 µs.
        with open(f"/proc/{wb.proc.pid}/timerslack_ns") as f:
            slack = int(f.read())
        assert slack == 1000, f"walbust's timer slack is {slack} ns, not 1000"
        conn = connect(DB)
        conn.autocommit = True

        def commits_until(pred, timeout, what):
            """Commit one-row updates (keys set first) until pred() holds."""
            end = time.monotonic() + timeout
            with conn.cursor() as cur:
                while time.monotonic() < end:
                    for i in range(1, COMMITS + 1):
                        r.set(f"fa:{i}", "cached")
                        cur.execute("UPDATE items SET v = v + 1 WHERE id = %s", (i,))
                        time.sleep(0.002)
                    seen.append(scrape(mport)[gauge])
                    if pred(seen[-1]):
                        return
            raise AssertionError(f"{what} within {timeout} s: {gauge} was {seen}")

        hogs = [subprocess.Popen([sys.executable, "-c", HOG.format(secs=HOG_SECONDS)])
                for _ in range(HOGS_PER_CPU * (os.cpu_count() or 2))]
        commits_until(lambda v: v > 0.0002, HOG_SECONDS - 5,
                      "the interval rose under CPU contention")
        for h in hogs:
            h.kill()
            h.wait()
        barrier(DB, r)
        left = [i for i in range(1, COMMITS + 1) if r.exists(f"fa:{i}")]
        assert left == [], f"keys not invalidated under contention: {left}"
        # Without load (and then without commits: too few wakeups to
        # gather) it goes back to the floor.
        wait_until(lambda: scrape(mport)[gauge] < 0.0002 + 1e-9, 30,
                   "the interval back at 0.2 ms after the load")
        print(f"# {gauge} under contention: {seen}")
        assert max(seen) <= 0.001 + 1e-9, f"auto interval above its 1 ms cap: {seen}"
        conn.close()
    finally:
        for h in hogs:
            h.kill()
            h.wait()
        if wb.alive():
            wb.proc.send_signal(signal.SIGTERM)
            wb.proc.wait(20)
        sql("postgres", "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
            "WHERE slot_name = 'fi_auto' AND NOT active")


if __name__ == "__main__":
    t = Runner("test_flush_interval")
    t.run(test_flush_interval_gathers_commits)
    t.run(test_commits_at_ordinary_rates_are_not_held)
    t.run(test_auto_follows_cpu_contention)
    t.done()
