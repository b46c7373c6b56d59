"""/metrics, /healthz and /readyz of a running walbust, scraped over HTTP
while real changes stream: counters and positions move with the stream,
the commit-to-ack histogram counts every acknowledged transaction, and
readiness follows Redis going away and coming back."""
import os
import re
import signal
import sys
import urllib.error
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (BARRIER_RULE, BARRIER_SQL, STACK_DIR, Runner, Walbust, barrier, connect,
                     free_port, fresh_db, scrape, sql, wait_until, write_rules)

import redis

DB = "metrics_e2e"
SLOT = "metrics_e2e"






def status(port, path):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code


def test_metrics_move_with_the_stream():
    fresh_db(DB)
    sql(DB, "CREATE TABLE items(id bigint PRIMARY KEY, v int)")
    sql(DB, BARRIER_SQL)
    sql(DB, "CREATE PUBLICATION walbust FOR TABLE items, walbust_barrier")
    rules = write_rules({"rules": [{"table": "items", "keys": ["m:{id}", "m:{id}:x"],
                                    "patterns": ["mp:{id}:*"]}, BARRIER_RULE]})
    # A private Redis, so readiness can follow it going away.
    rport = free_port()
    rdir = os.path.join(STACK_DIR, "metrics-redis")
    os.makedirs(rdir, exist_ok=True)
    import subprocess
    def start_redis():
        subprocess.run(["redis-server", "--port", str(rport), "--bind", "127.0.0.1", "--save", "",
                        "--appendonly", "no", "--daemonize", "yes", "--dir", rdir,
                        "--pidfile", os.path.join(rdir, "r.pid")], check=True,
                       stdout=subprocess.DEVNULL)
        wait_until(lambda: _ping(rport), 10, "redis to start")
    start_redis()
    r = redis.Redis(port=rport, decode_responses=True)
    mport = free_port()
    wb = Walbust(DB, rules, slot=SLOT, redis_urls=[f"redis://127.0.0.1:{rport}"])
    wb.args[wb.args.index("--metrics") + 1] = f"127.0.0.1:{mport}"
    try:
        wb.start().wait_streaming()
        assert status(mport, "/healthz") == 200
        barrier(DB, r)
        wait_until(lambda: status(mport, "/readyz") == 200, 10, "/readyz 200 while streaming")
        m0 = scrape(mport)
        assert m0["walbust_postgres_up"] == 1 and m0["walbust_redis_up"] == 1, m0

        sql(DB, "INSERT INTO items SELECT g, 0 FROM generate_series(1, 50) g")
        for i in range(1, 21):
            sql(DB, "UPDATE items SET v = v + 1 WHERE id = %s", (i,))
        barrier(DB, r)
        # The barrier key can be gone before its COMMIT is decoded (a
        # transaction's changes may be flushed before its COMMIT message
        # arrives), and commit-to-ack is recorded only when the batch holding
        # that COMMIT is acknowledged: both counters catch up within moments.
        def counted():
            m = scrape(mport)
            return (m["walbust_transactions_total"] - m0["walbust_transactions_total"] >= 22 and
                    m["walbust_commit_to_ack_seconds_count"] -
                    m0["walbust_commit_to_ack_seconds_count"] >= 22)
        wait_until(counted, 10, "22 transactions counted and acknowledged")
        m1 = scrape(mport)
        tx = m1["walbust_transactions_total"] - m0["walbust_transactions_total"]
        assert tx >= 22, tx  # 1 insert + 20 updates + the barrier
        assert m1['walbust_changes_total{table="public.items",op="insert"}'] == 50, m1
        assert m1['walbust_changes_total{table="public.items",op="update"}'] == 20, m1
        keys = (m1['walbust_invalidations_total{action="key"}'] -
                m0['walbust_invalidations_total{action="key"}'])
        assert keys >= 2 * 50, keys  # deduplicated within batches, so >= distinct keys
        assert (m1['walbust_invalidations_total{action="pattern"}'] -
                m0['walbust_invalidations_total{action="pattern"}']) >= 50
        assert m1["walbust_confirmed_lsn"] > m0["walbust_confirmed_lsn"]
        assert m1["walbust_received_lsn"] >= m1["walbust_confirmed_lsn"] - 1e6
        hist = m1["walbust_commit_to_ack_seconds_count"] - m0["walbust_commit_to_ack_seconds_count"]
        assert hist >= 22, hist
        assert m1['walbust_commit_to_ack_seconds_bucket{le="+Inf"}'] == \
            m1["walbust_commit_to_ack_seconds_count"]
        # Each acknowledged batch is split into stages: one observation per
        # stage, and together they are the batch's first commit's
        # commit-to-ack time, so their total stays within the histogram's.
        stages = ("decode", "batch", "visibility", "redis")
        counts = {st: m1[f'walbust_batch_stage_seconds_count{{stage="{st}"}}'] for st in stages}
        assert len(set(counts.values())) == 1, counts
        batches = counts["redis"]
        assert 1 <= batches <= m1["walbust_commit_to_ack_seconds_count"], (batches, m1)
        for st in stages:
            assert m1[f'walbust_batch_stage_seconds_bucket{{stage="{st}",le="+Inf"}}'] == batches
        total = sum(m1[f'walbust_batch_stage_seconds_sum{{stage="{st}"}}'] for st in stages)
        assert 0 < total <= m1["walbust_commit_to_ack_seconds_sum"] + 0.001 * batches, \
            (total, m1["walbust_commit_to_ack_seconds_sum"])
        # Idle: lag goes to zero once everything is confirmed.
        wait_until(lambda: scrape(mport)["walbust_lag_bytes"] == 0, 20, "lag 0 when idle")

        # Redis goes away: readiness drops, errors and retries count up, and
        # the confirmed position stays where it was.
        subprocess.run(["redis-cli", "-p", str(rport), "shutdown", "nosave"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # The WAL insert position just before the update's COMMIT: the
        # commit ends after it, so confirming the update passes it.
        conn = connect(DB, autocommit=False)
        with conn.cursor() as cur:
            cur.execute("UPDATE items SET v = v + 1 WHERE id = 30")
            cur.execute("SELECT (pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::bigint")
            upd_lsn = cur.fetchone()[0]
        conn.commit()
        conn.close()
        wait_until(lambda: status(mport, "/readyz") == 503, 20, "/readyz 503 without redis")
        wait_until(lambda: scrape(mport)["walbust_retries_total"] > m1["walbust_retries_total"], 20,
                   "retries to count")
        m2 = scrape(mport)
        assert m2["walbust_redis_up"] == 0 and m2["walbust_redis_errors_total"] > 0, m2
        # Nothing is confirmed past the update while Redis is down. Either
        # walbust read it (the lag shows it), or a failed batch before it
        # (the watermark SET after the barrier) paused reading first; then
        # walbust has not received it and cannot know the lag (seen under ASan).
        assert m2["walbust_confirmed_lsn"] <= upd_lsn, (upd_lsn, m2)
        assert m2["walbust_lag_bytes"] > 0 or m2["walbust_received_lsn"] < upd_lsn, (upd_lsn, m2)
        start_redis()
        wait_until(lambda: status(mport, "/readyz") == 200, 40, "/readyz 200 after redis is back")
        barrier(DB, r)
        m3 = scrape(mport)
        assert m3["walbust_confirmed_lsn"] > m2["walbust_confirmed_lsn"]
        assert m3["walbust_redis_up"] == 1
        assert wb.stop() == 0
    finally:
        if wb.alive():
            wb.proc.send_signal(signal.SIGKILL)
        subprocess.run(["redis-cli", "-p", str(rport), "shutdown", "nosave"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        sql("postgres", "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
            "WHERE slot_name = %s AND NOT active", (SLOT,))


def _ping(port):
    try:
        return redis.Redis(port=port, socket_timeout=1).ping()
    except redis.RedisError:
        return False


if __name__ == "__main__":
    t = Runner("test_metrics_e2e")
    t.run(test_metrics_move_with_the_stream)
    t.done()
