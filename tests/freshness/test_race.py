"""The read/invalidate race of the seed's §2 Problem 1, step by step, with a
real walbust: a reader misses (t0) and reads the row, a writer commits and
walbust invalidates the key (t1), the reader stores what it read (t2), and at
t3 the cache is compared with the database. A naive SET leaves the stale
value; walbust_fill refuses it. Then the same race through a tag (and the
ordering hazard of registering the tag after the fill), and read-your-writes
with walbust stopped and running.
"""
import fresh
from fresh import Env, WalbustCache, sql

RDB = 11
env = None


def row(conn, i):
    """The reader's database read (t0 .. t1)."""
    with conn.cursor() as cur:
        cur.execute("SELECT v FROM items WHERE id = %s", (i,))
        return str(cur.fetchone()[0])


def commit_update(i, v):
    """The writer (t1): commit, then wait until walbust applied everything
    committed so far (the barrier key is invalidated after this commit)."""
    sql(env.db, "UPDATE items SET v = %s WHERE id = %s", (v, i))
    env.barrier()


def test_t0_t3_naive_set_leaves_stale_value():
    r, conn = env.r, env.conn()
    sql(env.db, "UPDATE items SET v = 1 WHERE id = 1")
    env.barrier()
    r.delete("item:1")
    assert r.get("item:1") is None                        # t0: miss
    old = row(conn, 1)                                    # t0: read v=1
    commit_update(1, 2)                                   # t1: commit + invalidate
    r.set("item:1", old, ex=300)                          # t2: naive fill
    cached, db = r.get("item:1"), row(conn, 1)            # t3
    assert (cached, db) == ("1", "2"), (cached, db)       # stale until TTL
    print(f"# naive: cache holds v={cached} while the database has v={db} (ttl {r.ttl('item:1')}s)")


def test_t0_t3_lease_fill_refused():
    r, conn, c = env.r, env.conn(), env.cache()
    r.delete("item:2")
    kind, token = c.get("item:2")                         # t0: miss -> lease
    assert kind == "lease"
    old = row(conn, 2)                                    # t0: read v=0
    commit_update(2, 7)                                   # t1: commit + invalidate
    assert r.get("item:2") is None                        # walbust's UNLINK took the lease
    assert c.fill("item:2", token, old, 300) is False     # t2: refused
    assert r.get("item:2") is None                        # t3: no stale value
    assert c.get_or_fill("item:2", lambda: row(conn, 2), 300) == "7"
    assert r.get("item:2") == "7"


def test_t0_t3_eval_path():
    """The same race through EVALSHA (redis/walbust_eval.lua, Redis 6.2)."""
    r, conn, c = env.r, env.conn(), env.cache(mode="eval")
    r.delete("item:6")
    kind, token = c.get("item:6")
    assert kind == "lease" and c.mode == "eval"
    old = row(conn, 6)
    commit_update(6, 3)
    assert c.fill("item:6", token, old, 300) is False and r.get("item:6") is None
    assert c.get_or_fill("item:6", lambda: row(conn, 6), 300) == "3"
    lsn = WalbustCache.commit_lsn(conn)
    assert c.wait_caught_up(lsn, timeout=10) is True


def test_lease_fill_without_intervening_write_stores():
    r, conn, c = env.r, env.conn(), env.cache()
    r.delete("item:3")
    kind, token = c.get("item:3")
    assert kind == "lease"
    commit_update(4, 1)                                   # another row changes: no effect
    assert c.fill("item:3", token, row(conn, 3), 300) is True
    assert c.get("item:3") == ("hit", "0")


def test_tag_registered_before_read_closes_race():
    """docs rows are reachable only through tag doc:{id}: the entry
    page:doc:<id> is invalidated only if it is a member of tag:doc:<id>."""
    r, conn, c = env.r, env.conn(), env.cache()
    sql(env.db, "INSERT INTO docs VALUES (1, 'old'), (2, 'old')")
    env.barrier()

    def body(i):
        with conn.cursor() as cur:
            cur.execute("SELECT body FROM docs WHERE id = %s", (i,))
            return cur.fetchone()[0]

    # Hazard: lease, read, change commits and the tag is invalidated while
    # the key is not yet a member, fill succeeds, then the tag is added.
    kind, token = c.get("page:doc:1")
    old = body(1)
    sql(env.db, "UPDATE docs SET body = 'new' WHERE id = 1")
    env.barrier()
    assert c.fill("page:doc:1", token, old, 300) is True
    r.sadd("tag:doc:1", "page:doc:1")
    assert r.get("page:doc:1") == "old" and body(1) == "new"   # stale: wrong order
    # The client's order: member of the tag before the database read.
    seen = {}

    def loader():
        seen["members"] = r.smembers("tag:doc:2")
        v = body(2)
        sql(env.db, "UPDATE docs SET body = 'new' WHERE id = 2")  # commits mid-load
        env.barrier()
        return v

    assert c.get_or_fill("page:doc:2", loader, 300, tags=["doc:2"]) == "old"
    assert seen["members"] == {"page:doc:2"}
    assert c.stats["refused"] == 1 and r.get("page:doc:2") is None
    assert r.exists("tag:doc:2") == 0                     # walbust deleted the set too
    assert c.get_or_fill("page:doc:2", lambda: body(2), 300, tags=["doc:2"]) == "new"
    assert r.smembers("tag:doc:2") == {"page:doc:2"} and 300 < r.ttl("tag:doc:2") <= 303


def test_read_your_writes():
    """A committed write, then wait_caught_up: with walbust stopped it times
    out (and the cache still holds the old value); once walbust runs, the
    wait returns and the cache read gives the new value."""
    r, c = env.r, env.cache()
    conn = env.conn(autocommit=False)
    loader = lambda: row(env.conn(), 5)  # noqa: E731
    assert c.get_or_fill("item:5", loader, 300) == "0"
    env.stop()
    with conn.cursor() as cur:
        cur.execute("UPDATE items SET v = 55 WHERE id = 5")
    assert c.commit_and_wait(conn, timeout=0.5) is False  # nobody applies it
    lsn = WalbustCache.commit_lsn(conn)
    assert not c.caught_up(lsn)
    assert c.get_or_fill("item:5", loader, 300) == "0"    # the cache is behind
    env.start()
    assert c.wait_caught_up(lsn, timeout=20) is True
    assert c.get_or_fill("item:5", loader, 300) == "55"   # reads its own write
    wm = r.get(c.watermark_key)
    hi, lo = (int(x, 16) for x in wm.split("/"))
    thi, tlo = (int(x, 16) for x in lsn.split("/"))
    assert (hi, lo) >= (thi, tlo), (wm, lsn)
    # And right away after a commit, with walbust running.
    for n in range(20):
        with conn.cursor() as cur:
            cur.execute("UPDATE items SET v = %s WHERE id = 5", (100 + n,))
        assert c.commit_and_wait(conn, timeout=10) is True
        assert c.get_or_fill("item:5", loader, 300) == str(100 + n)


def main():
    global env
    env = Env("freshness_race", RDB).start()
    try:
        fresh.run_module("freshness race", [
            test_t0_t3_naive_set_leaves_stale_value,
            test_t0_t3_lease_fill_refused,
            test_t0_t3_eval_path,
            test_lease_fill_without_intervening_write_stores,
            test_tag_registered_before_read_closes_race,
            test_read_your_writes,
        ])
    finally:
        env.close()


if __name__ == "__main__":
    main()
