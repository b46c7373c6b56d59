"""Oracle test: `walbust decode` (pgoutput) against PostgreSQL's test_decoding.

Two slots are created at the same point in a fresh database: `oracle_pgo`
(pgoutput, read by walbust) and `oracle_td` (test_decoding, read with
pg_logical_slot_peek_changes). A seeded random workload then exercises the
decoding corners: NULLs, unicode, quotes and backslashes, TOASTed values
(incompressible, > 8 kB) left unchanged by updates, arrays, numeric, bytea,
jsonb, timestamptz, multi-row statements and transactions, savepoints rolled
back, aborted transactions, multi-table TRUNCATE, REPLICA IDENTITY DEFAULT /
FULL / USING INDEX, primary key changes, FK cascades and ALTER TABLE ADD /
DROP COLUMN between and inside transactions.

Both decodings of the same WAL must agree on every change in order (table,
operation, new values, old-key values, unchanged TOAST columns, truncated
tables and flags), and on each transaction's xid, commit LSN and commit time.
Marker values written only by aborted work must appear in neither.

Set ORACLE_SEED to replay a run; ORACLE_TXNS to change the workload size.
"""
import copy
import datetime
import hashlib
import json
import os
import random
import re
import subprocess
import sys
import time

import psycopg2
import psycopg2.extras

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import BIN, Runner, dsn, fresh_db, sql, wait_until  # noqa: E402

DB = "walbust_e2e_decode_oracle"
PUB = "oracle_pub"
SLOT_PGO = "oracle_pgo"
SLOT_TD = "oracle_td"
SEED = int(os.environ.get("ORACLE_SEED", str(int(time.time() * 1000) % 1000000007)))
NTXNS = int(os.environ.get("ORACLE_TXNS", "400"))
UNCHANGED = "<unchanged-toast-datum>"  # normalized form of an unchanged TOAST column

SCHEMA = '''
CREATE TABLE t_def (id int PRIMARY KEY, name text, n numeric, f float8, flag boolean,
                    data bytea, doc jsonb, tags text[], at timestamptz, big text);
CREATE TABLE t_full (id int PRIMARY KEY, label text, big text, qty int, nums int[], doc jsonb);
ALTER TABLE t_full REPLICA IDENTITY FULL;
CREATE TABLE "MixedCase" ("Key A" int, kb text, "val ""q""" text, big text,
                          PRIMARY KEY ("Key A", kb));
CREATE TABLE t_idx (id int PRIMARY KEY, code text NOT NULL, v text, blob bytea);
CREATE UNIQUE INDEX t_idx_code ON t_idx (code);
ALTER TABLE t_idx REPLICA IDENTITY USING INDEX t_idx_code;
CREATE TABLE t_alt (id int PRIMARY KEY, a text);
CREATE TABLE p_parent (id int PRIMARY KEY, name text);
CREATE TABLE p_child (id int PRIMARY KEY, pid int NOT NULL REFERENCES p_parent ON DELETE CASCADE,
                      note text);
'''

PIECES = ["it's", "O''Reilly", "back\\slash", "\\x41\\\\", 'dq "quoted"', "ünïcødé", "日本語",
          "🐘", "tab\there", "new\nline", "", " ", "null", "NULL", "unchanged-toast-datum",
          " new-tuple: x[text]:'y'", " old-key:", "{a,b}", "%s", "--", "ä'ö\\ü", "]:", "(no-flags)"]
ALT_TYPES = [("int", None), ("text", "'dflt ''x'' \\'"), ("jsonb", None), ("bigint", "42"),
             ("boolean", "true"), ("numeric(10,2)", "1.5")]
TRUNCATABLE = ["t_def", "t_full", '"MixedCase"', "t_idx", "t_alt"]


# ---------------------------------------------------------------- workload

class Workload:
    """Random DML with a model of the committed keys, so updates and deletes
    usually hit rows. Text written by aborted work carries a marker."""

    def __init__(self, conn, rng):
        self.conn = conn
        self.rng = rng
        self.model = {"t_def": set(), "t_full": set(), "mixed": set(), "t_idx": {},
                      "t_alt": set(), "alt_cols": [], "parent": set(), "child": {}}
        self.work = None
        self.next_id = 1
        self.ncol = 0
        self.nbig = 0
        self.marker = None
        self.markers = []
        self.aborted_xids = []
        self.committed_xids = []
        self.stats = {"txns": 0, "aborted": 0, "rolled_back_savepoints": 0, "truncates": 0,
                      "alters": 0}

    # values
    def new_id(self):
        self.next_id += 1
        return self.next_id

    def text(self):
        r = self.rng
        s = "".join(r.choice(PIECES) for _ in range(r.randint(0, 3)))
        if r.random() < 0.5:
            s += str(r.randint(0, 999))
        return (self.marker + s) if self.marker else s

    def maybe(self, v, p=0.15):
        return None if self.rng.random() < p else v

    def big(self):
        """Incompressible text over 8 kB (concatenated md5s): stored out of line."""
        self.nbig += 1
        n = self.rng.randint(280, 560)
        s = "".join(hashlib.md5(f"{SEED}-{self.nbig}-{i}".encode()).hexdigest() for i in range(n))
        return (self.marker + s) if self.marker else s

    def big_or_small(self):
        x = self.rng.random()
        return self.big() if x < 0.5 else (None if x < 0.65 else self.text())

    def numeric(self):
        r = self.rng
        return r.choice(["0", "-1.50", "123456789012345678901234567890.123456789", "1e-20", "NaN",
                         "Infinity", "-0.000", f"{r.randint(-10**6, 10**6)}.{r.randint(0, 9999)}"])

    def float8(self):
        r = self.rng
        return r.choice([r.uniform(-1e6, 1e6), float("inf"), float("-inf"), float("nan"), 0.1,
                         1.5e300, -2.5e-300, float(r.randint(-99, 99)), 1 / 3])

    def bytea(self):
        r = self.rng
        n = r.choice([0, 1, 7, 40, 9000]) if r.random() < 0.2 else r.randint(0, 40)
        return psycopg2.Binary(bytes(r.getrandbits(8) for _ in range(n)))

    def jsonb(self):
        r = self.rng
        obj = {"s": self.text(), "n": r.randint(-5, 5) * 1.25, "a": [None, True, "x\\y", "é\"'"],
               "nested": {"k": r.random() < 0.5}}
        return psycopg2.extras.Json(r.choice([obj, [obj, 1], self.text(), 12345678901234567890, None]))

    def text_array(self):
        return [self.maybe(self.text(), 0.2) for _ in range(self.rng.randint(0, 4))]

    def tstz(self):
        r = self.rng
        if r.random() < 0.05:
            return r.choice(["infinity", "-infinity"])
        tz = datetime.timezone(datetime.timedelta(minutes=r.choice([0, -480, 330, 60])))
        return datetime.datetime(r.randint(1970, 2037), r.randint(1, 12), r.randint(1, 28),
                                 r.randint(0, 23), r.randint(0, 59), r.randint(0, 59),
                                 r.choice([0, r.randint(0, 999999)]), tzinfo=tz)

    def pick(self, coll):
        if not coll:
            return None
        return self.rng.choice(sorted(coll) if isinstance(coll, set) else sorted(coll.keys()))

    def ex(self, cur, q, args=None):
        cur.execute(q, args)

    # operations; each returns nothing and updates self.work
    def ins_def(self, cur):
        rows = []
        for _ in range(self.rng.randint(1, 3)):
            i = self.new_id()
            rows.append((i, self.maybe(self.text()), self.maybe(self.numeric()),
                         self.maybe(self.float8()), self.maybe(self.rng.random() < 0.5),
                         self.maybe(self.bytea()), self.maybe(self.jsonb()),
                         self.maybe(self.text_array()), self.maybe(self.tstz()), self.big_or_small()))
            self.work["t_def"].add(i)
        psycopg2.extras.execute_values(cur, "INSERT INTO t_def VALUES %s", rows)

    def upd_def(self, cur):
        i = self.pick(self.work["t_def"])
        if i is None:
            return self.ins_def(cur)
        cols = {"name": self.text, "n": self.numeric, "f": self.float8, "data": self.bytea,
                "doc": self.jsonb, "tags": self.text_array, "at": self.tstz,
                "flag": lambda: self.rng.random() < 0.5}
        chosen = self.rng.sample(sorted(cols), self.rng.randint(1, 3))
        sets = ", ".join(f"{c} = %s" for c in chosen)
        self.ex(cur, f"UPDATE t_def SET {sets} WHERE id = %s",
                [self.maybe(cols[c](), 0.1) for c in chosen] + [i])

    def upd_def_big(self, cur):
        i = self.pick(self.work["t_def"])
        if i is not None:
            self.ex(cur, "UPDATE t_def SET big = %s, name = %s WHERE id = %s",
                    (self.big_or_small(), self.text(), i))

    def upd_def_pk(self, cur):
        i = self.pick(self.work["t_def"])
        if i is not None:
            j = self.new_id()
            self.ex(cur, "UPDATE t_def SET id = %s WHERE id = %s", (j, i))
            self.work["t_def"].discard(i)
            self.work["t_def"].add(j)

    def upd_def_multi(self, cur):
        m = self.rng.randint(2, 4)
        self.ex(cur, "UPDATE t_def SET flag = NOT coalesce(flag, false), n = n + 1 "
                     "WHERE id %% %s = %s", (m, self.rng.randrange(m)))

    def del_def(self, cur):
        ids = self.rng.sample(sorted(self.work["t_def"]), min(len(self.work["t_def"]),
                                                              self.rng.randint(1, 3)))
        if ids:
            self.ex(cur, "DELETE FROM t_def WHERE id = ANY(%s)", (ids,))
            self.work["t_def"].difference_update(ids)

    def ins_full(self, cur):
        i = self.new_id()
        self.ex(cur, "INSERT INTO t_full VALUES (%s, %s, %s, %s, %s::int[], %s)",
                (i, self.maybe(self.text()), self.big_or_small(), self.maybe(self.rng.randint(-9, 9)),
                 self.maybe([self.maybe(self.rng.randint(-100, 100)) for _ in range(self.rng.randint(0, 3))]),
                 self.maybe(self.jsonb())))
        self.work["t_full"].add(i)

    def upd_full(self, cur):
        i = self.pick(self.work["t_full"])
        if i is None:
            return self.ins_full(cur)
        x = self.rng.random()
        if x < 0.5:   # big left unchanged
            self.ex(cur, "UPDATE t_full SET label = %s, qty = coalesce(qty, 0) + 1 WHERE id = %s",
                    (self.maybe(self.text()), i))
        elif x < 0.75:
            self.ex(cur, "UPDATE t_full SET big = %s WHERE id = %s", (self.big_or_small(), i))
        else:
            j = self.new_id()
            self.ex(cur, "UPDATE t_full SET id = %s, nums = %s WHERE id = %s", (j, [1, None, 3], i))
            self.work["t_full"].discard(i)
            self.work["t_full"].add(j)

    def del_full(self, cur):
        i = self.pick(self.work["t_full"])
        if i is not None:
            self.ex(cur, "DELETE FROM t_full WHERE id = %s", (i,))
            self.work["t_full"].discard(i)

    def ins_mixed(self, cur):
        k = (self.new_id(), self.rng.choice(["k", "k'q", "ü", "a b"]))
        self.ex(cur, 'INSERT INTO "MixedCase" VALUES (%s, %s, %s, %s)',
                k + (self.maybe(self.text()), self.big_or_small()))
        self.work["mixed"].add(k)

    def upd_mixed(self, cur):
        k = self.pick(self.work["mixed"])
        if k is None:
            return self.ins_mixed(cur)
        if self.rng.random() < 0.6:
            self.ex(cur, 'UPDATE "MixedCase" SET "val ""q""" = %s WHERE "Key A" = %s AND kb = %s',
                    (self.maybe(self.text()),) + k)
        else:   # change part of the composite key
            nk = (k[0], k[1] + "+" + str(self.new_id()))
            self.ex(cur, 'UPDATE "MixedCase" SET kb = %s WHERE "Key A" = %s AND kb = %s',
                    (nk[1],) + k)
            self.work["mixed"].discard(k)
            self.work["mixed"].add(nk)

    def del_mixed(self, cur):
        k = self.pick(self.work["mixed"])
        if k is not None:
            self.ex(cur, 'DELETE FROM "MixedCase" WHERE "Key A" = %s AND kb = %s', k)
            self.work["mixed"].discard(k)

    def ins_idx(self, cur):
        i = self.new_id()
        self.ex(cur, "INSERT INTO t_idx VALUES (%s, %s, %s, %s)",
                (i, f"c{i}'{self.rng.randint(0, 9)}", self.maybe(self.text()), self.maybe(self.bytea())))
        self.work["t_idx"][i] = True

    def upd_idx(self, cur):
        i = self.pick(self.work["t_idx"])
        if i is None:
            return self.ins_idx(cur)
        if self.rng.random() < 0.5:
            self.ex(cur, "UPDATE t_idx SET v = %s WHERE id = %s", (self.maybe(self.text()), i))
        else:   # changes the replica identity index column
            self.ex(cur, "UPDATE t_idx SET code = %s, blob = %s WHERE id = %s",
                    (f"c{self.new_id()}\\", self.maybe(self.bytea()), i))

    def del_idx(self, cur):
        i = self.pick(self.work["t_idx"])
        if i is not None:
            self.ex(cur, "DELETE FROM t_idx WHERE id = %s", (i,))
            del self.work["t_idx"][i]

    def alt_value(self, typ):
        r = self.rng
        return {"int": lambda: r.randint(-5, 5), "text": self.text, "jsonb": self.jsonb,
                "bigint": lambda: r.randint(-2**62, 2**62), "boolean": lambda: r.random() < 0.5,
                "numeric(10,2)": lambda: f"{r.randint(-999, 999)}.{r.randint(0, 99)}"}[typ]()

    def ins_alt(self, cur):
        i = self.new_id()
        cols = ["id", "a"] + [c for c, _ in self.work["alt_cols"] if self.rng.random() < 0.7]
        types = dict(self.work["alt_cols"])
        vals = [i, self.maybe(self.text())] + [self.maybe(self.alt_value(types[c])) for c in cols[2:]]
        self.ex(cur, f"INSERT INTO t_alt ({', '.join(cols)}) VALUES ({', '.join(['%s'] * len(cols))})",
                vals)
        self.work["t_alt"].add(i)

    def upd_alt(self, cur):
        i = self.pick(self.work["t_alt"])
        if i is None:
            return self.ins_alt(cur)
        if self.work["alt_cols"] and self.rng.random() < 0.6:
            c, typ = self.rng.choice(self.work["alt_cols"])
            self.ex(cur, f"UPDATE t_alt SET {c} = %s WHERE id = %s",
                    (self.maybe(self.alt_value(typ)), i))
        else:
            self.ex(cur, "UPDATE t_alt SET a = %s WHERE id = %s", (self.text(), i))

    def del_alt(self, cur):
        i = self.pick(self.work["t_alt"])
        if i is not None:
            self.ex(cur, "DELETE FROM t_alt WHERE id = %s", (i,))
            self.work["t_alt"].discard(i)

    def alter_alt(self, cur):
        self.stats["alters"] += 1
        cols = self.work["alt_cols"]
        if cols and (len(cols) >= 4 or self.rng.random() < 0.4):
            c = self.rng.choice(cols)
            self.ex(cur, f"ALTER TABLE t_alt DROP COLUMN {c[0]}")
            cols.remove(c)
        else:
            self.ncol += 1
            typ, default = self.rng.choice(ALT_TYPES)
            name = f"c{self.ncol}"
            self.ex(cur, f"ALTER TABLE t_alt ADD COLUMN {name} {typ}"
                         + (f" DEFAULT {default}" if default else ""))
            cols.append((name, typ))
        if self.rng.random() < 0.5:   # a change right after the DDL, same transaction
            self.ins_alt(cur)

    def ins_family(self, cur):
        p = self.pick(self.work["parent"])
        if p is None or self.rng.random() < 0.4:
            p = self.new_id()
            self.ex(cur, "INSERT INTO p_parent VALUES (%s, %s)", (p, self.text()))
            self.work["parent"].add(p)
        c = self.new_id()
        self.ex(cur, "INSERT INTO p_child VALUES (%s, %s, %s)", (c, p, self.maybe(self.text())))
        self.work["child"][c] = p

    def del_parent(self, cur):
        p = self.pick(self.work["parent"])
        if p is not None:   # children go by ON DELETE CASCADE
            self.ex(cur, "DELETE FROM p_parent WHERE id = %s", (p,))
            self.work["parent"].discard(p)
            self.work["child"] = {c: q for c, q in self.work["child"].items() if q != p}

    def truncate(self, cur, cascade=None):
        self.stats["truncates"] += 1
        r = self.rng
        if cascade if cascade is not None else r.random() < 0.3:
            self.ex(cur, "TRUNCATE p_parent CASCADE")
            self.work["parent"].clear()
            self.work["child"].clear()
            return
        tables = r.sample(TRUNCATABLE, r.randint(2, 3))
        self.ex(cur, f"TRUNCATE {', '.join(tables)}" + (" RESTART IDENTITY" if r.random() < 0.5 else ""))
        for t in tables:
            self.work[{'"MixedCase"': "mixed"}.get(t, t)].clear()

    OPS = [("ins_def", 5), ("upd_def", 4), ("upd_def_big", 1), ("upd_def_pk", 1.5),
           ("upd_def_multi", 0.7), ("del_def", 1.5), ("ins_full", 3), ("upd_full", 3),
           ("del_full", 1.2), ("ins_mixed", 2), ("upd_mixed", 2), ("del_mixed", 0.8),
           ("ins_idx", 2), ("upd_idx", 2), ("del_idx", 0.8), ("ins_alt", 2.5), ("upd_alt", 2),
           ("del_alt", 0.8), ("alter_alt", 0.5), ("ins_family", 2), ("del_parent", 0.7),
           ("truncate", 0.25)]

    def random_ops(self, cur, n):
        names = [o for o, _ in self.OPS]
        weights = [w for _, w in self.OPS]
        for name in self.rng.choices(names, weights, k=n):
            getattr(self, name)(cur)

    def new_marker(self):
        m = f"ABORTED_MARK_{SEED}_{len(self.markers)}_"
        self.markers.append(m)
        return m

    def transaction(self, n):
        """Transaction number n: random, except that every 50 transactions a
        committed TRUNCATE (alternately multi-table and CASCADE), a savepoint
        rollback and an abort are guaranteed."""
        r = self.rng
        cur = self.conn.cursor()
        self.work = copy.deepcopy(self.model)
        kind = {17: "savepoint", 33: "abort"}.get(n % 50) or \
            r.choices(["plain", "savepoint", "abort"], [0.78, 0.12, 0.10])[0]
        self.ex(cur, "SELECT pg_current_xact_id()::text::bigint")
        xid = cur.fetchone()[0] & 0xFFFFFFFF
        self.random_ops(cur, r.randint(1, 6))
        if n % 50 == 45:
            self.truncate(cur, cascade=(n // 50) % 2 == 1)
            self.random_ops(cur, r.randint(1, 3))
        if kind == "savepoint":
            self.ex(cur, "SAVEPOINT sp")
            keep = copy.deepcopy(self.work)
            self.marker = self.new_marker()
            self.random_ops(cur, r.randint(1, 4))
            self.ins_def(cur)  # at least one marked change
            self.marker = None
            self.ex(cur, "ROLLBACK TO SAVEPOINT sp")
            self.work = keep
            self.stats["rolled_back_savepoints"] += 1
            if r.random() < 0.5:   # a committed subtransaction too
                self.ex(cur, "SAVEPOINT sp2")
                self.random_ops(cur, r.randint(1, 3))
                self.ex(cur, "RELEASE SAVEPOINT sp2")
            self.random_ops(cur, r.randint(0, 2))
        if kind == "abort":
            self.marker = self.new_marker()
            self.random_ops(cur, r.randint(1, 4))
            self.ins_def(cur)
            self.marker = None
            self.conn.rollback()
            self.aborted_xids.append(xid)
            self.stats["aborted"] += 1
        else:
            self.conn.commit()
            self.model = self.work
            self.committed_xids.append(xid)
            self.stats["txns"] += 1
        cur.close()


# ---------------------------------------------------------- test_decoding

def parse_ident(s, pos):
    """An identifier as quote_identifier() prints it: bare, or in double quotes
    with embedded double quotes doubled."""
    if s[pos] == '"':
        out = []
        pos += 1
        while True:
            ch = s[pos]
            if ch == '"':
                if s.startswith('""', pos):
                    out.append('"')
                    pos += 2
                    continue
                return "".join(out), pos + 1
            out.append(ch)
            pos += 1
    m = re.compile(r"[^.\[:, ]+").match(s, pos)
    assert m, f"identifier expected at {pos}: {s[pos:pos + 60]!r}"
    return m.group(0), m.end()


def parse_qualname(s, pos):
    nsp, pos = parse_ident(s, pos)
    assert s[pos] == ".", f"qualified name expected at {pos}: {s[:pos + 40]!r}"
    rel, pos = parse_ident(s, pos + 1)
    return f"{nsp}.{rel}", pos


def parse_value(s, pos, typ):
    """One column value: null, unchanged-toast-datum, 'quoted''text' or a bare
    number/boolean. Returned in the type's text output form."""
    for word, val in (("null", None), ("unchanged-toast-datum", UNCHANGED)):
        end = pos + len(word)
        if s.startswith(word, pos) and (end == len(s) or s[end] == " "):
            return val, end
    if s[pos] == "'":
        out = []
        pos += 1
        while True:
            q = s.index("'", pos)
            out.append(s[pos:q])
            if s.startswith("''", q):
                out.append("'")
                pos = q + 2
                continue
            return "".join(out), q + 1
    end = s.find(" ", pos)
    end = len(s) if end < 0 else end
    raw = s[pos:end]
    if typ == "boolean":
        assert raw in ("true", "false"), raw
        raw = "t" if raw == "true" else "f"
    return raw, end


def parse_tuple(s, pos):
    """Columns ' name[type]:value' up to ' new-tuple:' or the end."""
    cols = {}
    while pos < len(s) and not s.startswith(" new-tuple:", pos):
        assert s[pos] == " ", f"column expected at {pos}: {s[pos:pos + 60]!r}"
        name, pos = parse_ident(s, pos + 1)
        assert s[pos] == "[", f"type expected at {pos}: {s[pos:pos + 60]!r}"
        end = s.index("]:", pos)
        typ = s[pos + 1:end]
        val, pos = parse_value(s, end + 2, typ)
        assert name not in cols, f"column {name} twice"
        cols[name] = val
    return cols, pos


def parse_td_change(s):
    """A test_decoding change line into the normalized comparison form."""
    assert s.startswith("table "), s[:80]
    tables = []
    pos = 6
    while True:
        name, pos = parse_qualname(s, pos)
        tables.append(name)
        if s.startswith(", ", pos):
            pos += 2
            continue
        assert s.startswith(": ", pos), s[:pos + 40]
        pos += 2
        break
    colon = s.index(":", pos)
    op, pos = s[pos:colon], colon + 1
    if op == "TRUNCATE":
        flags = s[pos:].split()
        assert set(flags) <= {"cascade", "restart_seqs", "(no-flags)"}, flags
        return ("truncate", tuple(tables), "cascade" in flags, "restart_seqs" in flags)
    assert len(tables) == 1, s[:200]
    old = new = None
    if op == "INSERT":
        new, pos = parse_tuple(s, pos)
    elif op == "UPDATE":
        if s.startswith(" old-key:", pos):
            old, pos = parse_tuple(s, pos + len(" old-key:"))
            assert s.startswith(" new-tuple:", pos), s[pos:pos + 60]
            pos += len(" new-tuple:")
        new, pos = parse_tuple(s, pos)
    elif op == "DELETE":
        if s.startswith(" (no-tuple-data)", pos):
            pos = len(s)
        else:
            old, pos = parse_tuple(s, pos)
    else:
        raise AssertionError(f"unknown operation {op!r}: {s[:200]!r}")
    assert pos == len(s), f"trailing text at {pos}: {s[pos:pos + 80]!r}"
    return (op.lower(), tables[0], new, old)


TS_RE = re.compile(r"(\d{4})-(\d\d)-(\d\d)[ T](\d\d):(\d\d):(\d\d)(?:\.(\d{1,6}))?(Z|[+-]\d\d(?::?\d\d)?)$")


def parse_time(s):
    m = TS_RE.match(s)
    assert m, f"unparsable timestamp {s!r}"
    y, mo, d, h, mi, sec = (int(x) for x in m.groups()[:6])
    us = int((m.group(7) or "0").ljust(6, "0"))
    z = m.group(8)
    off = datetime.timedelta(0)
    if z != "Z":
        sign = -1 if z[0] == "-" else 1
        digits = z[1:].replace(":", "")
        off = sign * datetime.timedelta(hours=int(digits[:2]), minutes=int(digits[2:4] or 0))
    return datetime.datetime(y, mo, d, h, mi, sec, us, tzinfo=datetime.timezone(off))


def td_transactions(rows):
    """(lsn, xid, data) rows into [{xid, end_lsn, time, changes}]."""
    txns, cur = [], None
    for lsn, xid, data in rows:
        if data.startswith("BEGIN "):
            assert cur is None, f"nested BEGIN at {lsn}"
            cur = {"xid": int(data.split()[1]), "changes": []}
            assert cur["xid"] == int(xid), (data, xid)
        elif data.startswith("COMMIT "):
            m = re.match(r"COMMIT (\d+) \(at (.*)\)$", data)
            assert m and cur and int(m.group(1)) == cur["xid"], data
            cur["end_lsn"] = lsn
            cur["time"] = parse_time(m.group(2))
            txns.append(cur)
            cur = None
        else:
            assert cur is not None, f"change outside a transaction: {data[:100]!r}"
            cur["changes"].append(parse_td_change(data))
    assert cur is None, "unterminated transaction"
    return txns


# ---------------------------------------------------------------- walbust

IDENTITY = {"public.t_def": {"id"}, "public.MixedCase": {"Key A", "kb"}, "public.t_idx": {"code"},
            "public.t_alt": {"id"}, "public.p_parent": {"id"}, "public.p_child": {"id"}}


def wb_change(o):
    """A walbust decode line into the normalized comparison form, after the
    checks test_decoding cannot make: a key-only old image holds exactly the
    replica identity columns, a FULL one every column."""
    if o["op"] == "truncate":
        return ("truncate", tuple(o["tables"]), o["cascade"], o["restart_identity"])
    assert o["op"] in ("insert", "update", "delete"), o["op"]
    if "old" in o and o["table"] in IDENTITY:
        assert set(o["old"]) == IDENTITY[o["table"]], o["old"]
        assert None not in o["old"].values(), o["old"]
    if "old" in o and o["table"] == "public.t_full" and o["op"] == "update":
        assert set(o["old"]) == set(o["new"]) | set(o["unchanged"]), o
    new = old = None
    if "new" in o:
        new = dict(o["new"])
        for c in o["unchanged"]:
            assert c not in new, f"{c} both in new and unchanged"
            new[c] = UNCHANGED
    else:
        assert o["unchanged"] == [], o
    if "old" in o:   # test_decoding leaves NULLs out of old tuples
        old = {k: v for k, v in o["old"].items() if v is not None}
    return (o["op"], o["table"], new, old)


def wb_transactions(lines):
    txns = []
    for o in lines:
        assert o["op"] != "message", o
        if not txns or (txns[-1]["xid"], txns[-1]["lsn"]) != (o["xid"], o["lsn"]):
            txns.append({"xid": o["xid"], "lsn": o["lsn"], "time": parse_time(o["commit_time"]),
                         "changes": []})
        txns[-1]["changes"].append(wb_change(o))
    return txns


def lsn_int(s):
    hi, lo = s.split("/")
    return (int(hi, 16) << 32) | int(lo, 16)


def short(x, n=600):
    r = repr(x)
    return r if len(r) <= n else r[:n] + f"... ({len(r)} chars)"


def first_difference(a, b):
    if isinstance(a, tuple) and isinstance(b, tuple) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                if isinstance(x, dict) and isinstance(y, dict):
                    keys = sorted(set(x) | set(y))
                    diff = {k: (x.get(k, "<absent>"), y.get(k, "<absent>")) for k in keys
                            if x.get(k, "<absent>") != y.get(k, "<absent>")}
                    return f"field {i}: " + short(diff, 1500)
                return f"field {i}: {short(x)} != {short(y)}"
    return f"{short(a)} != {short(b)}"


# ------------------------------------------------------------------- test

def run_decode(until):
    p = subprocess.run([BIN, "decode", "--pg", dsn(DB), "--slot", SLOT_PGO, "--publication", PUB,
                        "--until", until], capture_output=True, timeout=60)
    assert p.returncode == 0, f"walbust decode exited {p.returncode}: {p.stderr.decode(errors='replace')}"
    return p.stdout


def test_decode_matches_test_decoding():
    fresh_db(DB)
    sql(DB, SCHEMA)
    try:
        sql(DB, "CREATE EXTENSION IF NOT EXISTS pg_walinspect")
        walinspect = True
    except psycopg2.Error:
        walinspect = False
    sql(DB, f"CREATE PUBLICATION {PUB} FOR ALL TABLES")
    start = sql(DB, "SELECT lsn::text FROM pg_create_logical_replication_slot(%s, 'pgoutput')",
                (SLOT_PGO,), fetch=True)[0][0]
    sql(DB, "SELECT pg_create_logical_replication_slot(%s, 'test_decoding')", (SLOT_TD,))

    rng = random.Random(SEED)
    conn = harness.connect(DB, autocommit=False)
    w = Workload(conn, rng)
    for n in range(NTXNS):
        w.transaction(n)
    conn.close()
    end = sql(DB, "SELECT pg_current_wal_lsn()::text", fetch=True)[0][0]
    confirmed = harness.slot_confirmed(DB, SLOT_PGO)

    # (1) walbust, twice: the slot must not move
    out1 = run_decode(end)
    wait_until(lambda: sql(DB, "SELECT active_pid IS NULL FROM pg_replication_slots WHERE slot_name=%s",
                           (SLOT_PGO,), fetch=True)[0][0], 10, "the pgoutput slot to be released")
    out2 = run_decode(end)
    assert out1 == out2, "a second decode printed something else"
    assert harness.slot_confirmed(DB, SLOT_PGO) == confirmed, "decode advanced the slot"
    wb = wb_transactions([json.loads(line) for line in out1.decode().splitlines()])

    # (2) test_decoding
    rows = sql(DB, "SELECT lsn::text, xid::text, data FROM pg_logical_slot_peek_changes("
                   "%s, %s::pg_lsn, NULL, 'include-xids', '1', 'skip-empty-xacts', '1', "
                   "'include-timestamp', '1')", (SLOT_TD, end), fetch=True)
    td = td_transactions(rows)

    # aborted and rolled-back work is in neither
    td_text = "\n".join(r[2] for r in rows)
    wb_text = out1.decode()
    assert w.markers and w.aborted_xids, "the workload produced no aborted work"
    for m in w.markers:
        assert m not in td_text, f"test_decoding shows aborted marker {m}"
        assert m not in wb_text, f"walbust shows aborted marker {m}"
    for xid in w.aborted_xids:
        assert xid not in {t["xid"] for t in td}, f"test_decoding shows aborted xid {xid}"
        assert xid not in {t["xid"] for t in wb}, f"walbust shows aborted xid {xid}"
    assert {t["xid"] for t in wb} <= set(w.committed_xids)

    # commit record positions, independently of both decoders
    commits = {}
    if walinspect:
        for s_lsn, e_lsn, xid in sql(DB, "SELECT start_lsn::text, end_lsn::text, xid::text::bigint "
                                         "FROM pg_get_wal_records_info_till_end_of_wal(%s) "
                                         "WHERE resource_manager = 'Transaction' "
                                         "AND record_type LIKE 'COMMIT%%'", (start,), fetch=True):
            commits[xid] = (s_lsn, e_lsn)

    wb_xids, td_xids = {t["xid"] for t in wb}, {t["xid"] for t in td}
    assert len(wb) == len(td), (f"walbust shows {len(wb)} transactions, test_decoding {len(td)}; "
                                f"xids only in walbust: {sorted(wb_xids - td_xids)[:10]}, "
                                f"only in test_decoding: {sorted(td_xids - wb_xids)[:10]}")
    nchanges = 0
    for n, (a, b) in enumerate(zip(wb, td)):
        where = f"transaction #{n} xid {b['xid']} (seed {SEED})"
        assert a["xid"] == b["xid"], f"{where}: walbust xid {a['xid']}"
        assert a["time"] == b["time"], f"{where}: commit time {a['time']} != {b['time']}"
        if walinspect:
            assert commits.get(b["xid"]) == (a["lsn"], b["end_lsn"]), (
                f"{where}: walbust lsn {a['lsn']}, test_decoding commit end {b['end_lsn']}, "
                f"WAL commit record {commits.get(b['xid'])}")
        else:
            assert lsn_int(a["lsn"]) < lsn_int(b["end_lsn"]), where
        for i, (x, y) in enumerate(zip(a["changes"], b["changes"])):
            assert x == y, (f"{where}, change #{i}: walbust vs test_decoding differ in "
                            f"{first_difference(x, y)}")
        assert len(a["changes"]) == len(b["changes"]), (
            f"{where}: walbust {len(a['changes'])} changes, test_decoding {len(b['changes'])}")
        nchanges += len(a["changes"])

    kinds = {}
    for t in td:
        for c in t["changes"]:
            kinds[c[0]] = kinds.get(c[0], 0) + 1
            if c[0] != "truncate" and c[2] and UNCHANGED in c[2].values():
                kinds["unchanged-toast"] = kinds.get("unchanged-toast", 0) + 1
            if c[0] == "update" and c[3] is not None:
                kinds["update-with-old"] = kinds.get("update-with-old", 0) + 1
            if c[0] == "truncate" and len(c[1]) > 1:
                kinds["truncate-multi"] = kinds.get("truncate-multi", 0) + 1
            if c[0] == "truncate" and c[2]:
                kinds["truncate-cascade"] = kinds.get("truncate-cascade", 0) + 1
    for k in ("insert", "update", "delete", "truncate-multi", "truncate-cascade",
              "unchanged-toast", "update-with-old"):
        assert kinds.get(k, 0) > 0, f"the workload produced no {k} (seed {SEED}): {kinds}"
    print(f"# oracle: {len(td)} transactions, {nchanges} changes compared, seed {SEED}", flush=True)
    print(f"# workload: {w.stats}, kinds: {kinds}, commit LSNs checked via "
          f"{'pg_walinspect' if walinspect else 'ordering only'}", flush=True)


def test_parser_on_known_lines():
    """The test_decoding parser itself, on lines in the exact server format."""
    c = parse_td_change("table public.\"Mixed\"\"Q\": UPDATE: old-key: \"Key A\"[integer]:1 "
                        "kb[text]:'it''s new-tuple: x' new-tuple: \"Key A\"[integer]:2 "
                        "kb[text]:' old-key: ' f[boolean]:false n[numeric]:-1.50 big[text]:unchanged-toast-datum "
                        "s[text]:'null' z[text]:null a[text[]]:'{\"x y\",NULL}'")
    assert c == ("update", 'public.Mixed"Q', {"Key A": "2", "kb": " old-key: ", "f": "f", "n": "-1.50",
                                              "big": UNCHANGED, "s": "null", "z": None,
                                              "a": '{"x y",NULL}'},
                 {"Key A": "1", "kb": "it's new-tuple: x"}), c
    assert parse_td_change("table public.a, public.\"B c\": TRUNCATE: cascade restart_seqs") == \
        ("truncate", ("public.a", "public.B c"), True, True)
    assert parse_td_change("table public.a: TRUNCATE: (no-flags)") == ("truncate", ("public.a",), False, False)
    assert parse_td_change("table public.a: DELETE: id[integer]:3") == ("delete", "public.a", None, {"id": "3"})
    assert parse_time("2026-11-27 04:00:40.66+05:30") == datetime.datetime(
        2026, 11, 26, 22, 30, 40, 660000, tzinfo=datetime.timezone.utc)


if __name__ == "__main__":
    print(f"# seed {SEED}", flush=True)
    r = Runner("decode_oracle")
    r.run(test_parser_on_known_lines)
    r.run(test_decode_matches_test_decoding)
    r.done()
