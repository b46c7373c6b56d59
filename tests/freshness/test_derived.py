"""Randomized staleness of derived entries: keys that walbust invalidates
through a lookup (docs/rules.md "Lookups").

Each team's cached entry team:{id}:members holds the names of its members
(a join of team_members and users). Two rules keep it fresh: users →
lookup of the user's teams → team:{team_id}:members (a rename), and
team_members → team:{team_id}:members (a membership added, removed or moved
between teams: both images). Writers rename users and move, add and remove
memberships concurrently; readers fill the entries cache-aside, 70 % of the
time pausing up to 5 ms before storing (an application doing work), once naive
(GET, query, SET) and once through the lease protocol (walbust_get/fill).
The run is cut into epochs: writers pause, a barrier waits until walbust
applied every commit (lookups included), and every cached entry is compared
with the join. Naive must show stale entries (the checker has teeth); lease
fills must show none. At least 100,000 reads per mode (--long: 500,000).
"""
import random
import threading
import time

import psycopg2
import psycopg2.errors

import fresh
from fresh import LONG, harness, is_lease_marker

RDB = 13
USERS = 60
TEAMS = 30
READERS = 12
WRITERS = 4
READS = 500_000 if LONG else 100_000
EPOCH_S = 0.3

SCHEMA = """
CREATE TABLE users(id int PRIMARY KEY, name text NOT NULL);
CREATE TABLE teams(id int PRIMARY KEY);
CREATE TABLE team_members(team_id int NOT NULL, user_id int NOT NULL,
                          PRIMARY KEY (team_id, user_id));
""" + fresh.BARRIER_SQL + """;
CREATE PUBLICATION walbust FOR TABLE users, team_members, walbust_barrier;
"""

RULES = {"rules": [
    {"table": "users", "on": ["update"], "changed": ["name"],
     "lookup": {"sql": "SELECT team_id FROM public.team_members WHERE user_id = $1",
                "args": ["{id}"]},
     "keys": ["team:{team_id}:members"]},
    {"table": "team_members", "keys": ["team:{team_id}:members"]},
    fresh.BARRIER_RULE,
]}

MEMBERS_SQL = ("SELECT coalesce(string_agg(u.name, ',' ORDER BY u.id), '') FROM team_members m "
               "JOIN users u ON u.id = m.user_id WHERE m.team_id = %s")


class DerivedEnv(fresh.Env):
    """fresh.Env with the users/teams schema and the lookup rules."""

    def __init__(self, db, rdb):  # noqa: D107 - replaces fresh.Env's schema
        self.db = fresh.fresh_db(db)
        self.rdb = rdb
        self.slot = db
        self.r = harness.redis_client(rdb)
        self.r.flushdb()
        self.rb = harness.redis.Redis(host="127.0.0.1", port=harness.REDIS_PORT, db=rdb)
        fresh.load_functions(self.r)
        fresh.sql(self.db, SCHEMA)
        fresh.sql(self.db, "ALTER TABLE users REPLICA IDENTITY FULL")
        fresh.sql(self.db, "INSERT INTO users SELECT g, 'u' || g FROM generate_series(1, %s) g",
                  (USERS,))
        fresh.sql(self.db, "INSERT INTO teams SELECT g FROM generate_series(1, %s) g", (TEAMS,))
        rnd = random.Random(7)
        pairs = {(rnd.randint(1, TEAMS), u) for u in range(1, USERS + 1) for _ in range(3)}
        for t, u in sorted(pairs):
            fresh.sql(self.db, "INSERT INTO team_members VALUES (%s, %s)", (t, u))
        self.rules = fresh.write_rules(RULES)
        self.wb = None


env = None


class Run:
    def __init__(self, mode):
        self.mode = mode
        self.reads = self.db_reads = self.renames = self.moves = 0
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.writing = threading.Event()
        self.wlock = [threading.Lock() for _ in range(WRITERS)]
        self.errors = []
        self.stale = self.stale_epochs = self.epochs = self.markers = 0
        self.refused = self.leases = 0


def reader(run, seed):
    rnd = random.Random(seed)
    r = harness.redis_client(RDB)
    conn = env.conn()
    cur = conn.cursor()
    cache = env.cache(lease_ms=2000) if run.mode == fresh.LEASE else None
    n = dbr = 0

    def load(t):
        nonlocal dbr
        cur.execute(MEMBERS_SQL, (t,))
        v = cur.fetchone()[0]
        dbr += 1
        if rnd.random() < 0.7:
            time.sleep(rnd.random() * 0.005)
        return v

    try:
        while not run.done.is_set():
            t = rnd.randint(1, TEAMS)
            key = f"team:{t}:members"
            if cache is None:
                if r.get(key) is None:
                    r.set(key, load(t), ex=600)
            else:
                cache.get_or_fill(key, lambda: load(t), 600)
            n += 1
            if n % 200 == 0:
                with run.lock:
                    run.reads += 200
                    if run.reads >= READS:
                        run.done.set()
    except Exception as e:  # noqa: BLE001 - reported by the main thread
        run.errors.append(repr(e))
        run.done.set()
    with run.lock:
        run.reads += n % 200
        run.db_reads += dbr
        if cache is not None:
            run.refused += cache.stats["refused"]
            run.leases += cache.stats["lease"]
    conn.close()


def write_one(cur, rnd, seq):
    """A rename (half of the time) or a membership change; returns which."""
    u = rnd.randint(1, USERS)
    if rnd.random() < 0.5:
        cur.execute("UPDATE users SET name = %s WHERE id = %s", (f"u{u}-{seq}", u))
        return "rename"
    t2 = rnd.randint(1, TEAMS)
    k = rnd.random()
    if k < 0.6:  # move one of the user's memberships to another team
        try:
            cur.execute("UPDATE team_members SET team_id = %s WHERE (team_id, user_id) = "
                        "(SELECT team_id, user_id FROM team_members WHERE user_id = %s "
                        " ORDER BY random() LIMIT 1) AND NOT EXISTS (SELECT 1 FROM team_members "
                        " WHERE team_id = %s AND user_id = %s)", (t2, u, t2, u))
        except psycopg2.errors.UniqueViolation:
            # Another writer added (t2, u) after NOT EXISTS looked (READ
            # COMMITTED): nothing was written (autocommit).
            return None
    elif k < 0.8:
        cur.execute("INSERT INTO team_members VALUES (%s, %s) ON CONFLICT DO NOTHING", (t2, u))
    else:
        cur.execute("DELETE FROM team_members WHERE (team_id, user_id) = (SELECT team_id, "
                    "user_id FROM team_members WHERE user_id = %s ORDER BY random() LIMIT 1)",
                    (u,))
    return "move"


def writer(run, w, seed):
    rnd = random.Random(seed)
    conn = env.conn()
    cur = conn.cursor()
    renames = moves = 0
    try:
        while not run.done.is_set():
            with run.wlock[w]:
                what = write_one(cur, rnd, seed * 1_000_000 + renames + moves) \
                    if run.writing.is_set() else None
            if what == "rename":
                renames += 1
            elif what == "move":
                moves += 1
            if what:
                time.sleep(rnd.random() * 0.002)
            else:
                run.writing.wait(0.05)
    except Exception as e:  # noqa: BLE001
        run.errors.append(repr(e))
        run.done.set()
    with run.lock:
        run.renames += renames
        run.moves += moves
    conn.close()


def truth():
    rows = fresh.sql(env.db, "SELECT t.id, coalesce(string_agg(u.name, ',' ORDER BY u.id), '') "
                             "FROM teams t LEFT JOIN team_members m ON m.team_id = t.id "
                             "LEFT JOIN users u ON u.id = m.user_id GROUP BY t.id", fetch=True)
    return dict(rows)


def check(run):
    """Cached member lists vs the join, with writers paused and walbust caught up."""
    want = truth()
    keys = [f"team:{t}:members" for t in range(1, TEAMS + 1)]
    stale = 0
    for t, v in zip(range(1, TEAMS + 1), env.r.mget(keys)):
        if v is None:
            continue
        if is_lease_marker(v):
            run.markers += 1
        elif v != want[t]:
            stale += 1
    assert truth() == want, "the database moved during the check"
    run.stale += stale
    run.stale_epochs += 1 if stale else 0
    run.epochs += 1


def run_mode(mode, seed):
    env.r.flushdb()
    run = Run(mode)
    threads = [threading.Thread(target=reader, args=(run, seed * 1000 + k)) for k in range(READERS)]
    threads += [threading.Thread(target=writer, args=(run, w, seed * 2000 + w))
                for w in range(WRITERS)]
    for t in threads:
        t.start()
    t0 = time.monotonic()
    deadline = t0 + (900 if LONG else 180)
    while not run.done.is_set():
        run.writing.set()
        run.done.wait(EPOCH_S)
        run.writing.clear()
        for lock in run.wlock:
            with lock:
                pass
        env.barrier()
        check(run)
        assert time.monotonic() < deadline, f"{mode}: too slow ({run.reads} reads)"
    for t in threads:
        t.join(30)
        assert not t.is_alive()
    env.barrier()
    check(run)
    assert not run.errors, run.errors
    secs = time.monotonic() - t0
    print(f"# {mode}: {run.reads} reads ({run.reads / secs:.0f}/s), {run.db_reads} database "
          f"reads, {run.renames} renames, {run.moves} membership changes, {run.epochs} checks: "
          f"{run.stale} stale entries (in {run.stale_epochs} checks); leases {run.leases}, "
          f"fills refused {run.refused}, markers seen {run.markers}", flush=True)
    assert run.reads >= READS and run.renames > 100 and run.moves > 100 and run.epochs >= 2
    return run


def test_naive_derived_entries_go_stale():
    # The naive race is rare (a few stale entries per run): a run that
    # happens to see none is repeated with other seeds, at most twice, so
    # the test keeps its teeth without failing on a quiet machine.
    for attempt in range(3):
        run = run_mode(fresh.NAIVE, 1 + 10 * attempt)
        if run.stale > 0:
            break
    assert run.stale > 0, "the checker saw no stale derived entry for naive cache-aside in 3 runs"


def test_lease_fenced_derived_entries_never_stale():
    run = run_mode(fresh.LEASE, 2)
    assert run.refused > 0, "no fill was refused: the race was not exercised"
    assert run.stale == 0, f"{run.stale} stale derived entries with lease-fenced fills"
    log = env.wb.read_log()
    assert "lookup" not in log or "retrying in" not in log, log[-2000:]


def main():
    global env
    env = DerivedEnv("freshness_derived", RDB).start()
    try:
        fresh.run_module("freshness derived (lookups)", [
            test_naive_derived_entries_go_stale,
            test_lease_fenced_derived_entries_never_stale,
        ])
    finally:
        env.close()


if __name__ == "__main__":
    main()
