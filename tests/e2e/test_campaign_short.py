"""A short run of the fault campaign (tests/faults/campaign.py) in `make test`.

Three rounds of fill, storm (a few hundred mixed transactions a second from
three writers), with two Redis targets (each filled and checked on its own,
so a target that fails while the other goes on is covered too), two faults
per round drawn from the quick kinds (walbust
kill -9, kill -9 while its redis batch is held and then dropped, walsender
terminated, PostgreSQL fast restart, Redis restart from its AOF or from an
older copy of it (acknowledged writes lost), cut of the proxied path to
each server, and the two migrations: a column added and dropped, a rules
table rename-swapped), quiesce and check. The campaign starts and
stops its own stack (scripts/stack in a temp dir, its own redis-server and
proxies), so restarting PostgreSQL here disturbs no other test. It must
finish in well under a minute, report zero missed and zero over-invalidated
keys, and verify every fault it injected.
"""
import os
import random
import re
import subprocess
import sys

from harness import BIN, SRC, Runner

KINDS = ["walbust_kill9", "kill9_redis_held", "walsender_kill", "pg_restart",
         "redis_restart_aof", "redis_restart_lagging", "pg_proxy_cut", "redis_proxy_cut",
         "ddl_add_drop_column", "ddl_swap_table"]
ROUNDS = 3


def test_short_campaign():
    seed = random.randrange(1 << 30)
    cmd = ["/usr/bin/python3", os.path.join(SRC, "tests/faults/campaign.py"), "--bin", BIN,
           "--rounds", str(ROUNDS), "--txns", "600", "--rate", "250", "--ids", "6000",
           "--writers", "3", "--faults-per-round", "2", "--max-storm", "25", "--targets", "2",
           "--kinds", ",".join(KINDS), "--seed", str(seed)]
    out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         timeout=170)
    text = out.stdout
    print("".join(f"# {line}\n" for line in text.splitlines()), end="")
    assert out.returncode == 0, f"campaign failed (seed {seed}, rerun with --seed {seed})"
    assert f"# seed {seed}: PASS" in text
    rows = re.findall(r"^\| (\d+) \| (\d+) \| ([^|]*) \| (\d+) \| (\d+) \| (\d+) \|$", text, re.M)
    assert len(rows) == ROUNDS, rows
    for _, txns, faults, missed, over, lost in rows:
        assert int(txns) >= 600, f"a round committed only {txns} transactions"
        assert faults.strip(), "a round injected no fault"
        assert (missed, over, lost) == ("0", "0", "0"), (missed, over, lost)
    injected = dict(re.findall(r"^\| (\w+) \| (\d+) \|$", text, re.M))
    assert sum(int(injected.get(k, 0)) for k in KINDS) == 2 * ROUNDS, injected


def main():
    runner = Runner("test_campaign_short")
    runner.run(test_short_campaign)
    runner.done()


if __name__ == "__main__":
    sys.exit(main())
