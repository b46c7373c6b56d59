#!/usr/bin/env bash
# tests/e2e/test_valgrind.sh — walbust under valgrind memcheck, end to end.
#
# A short real scenario with every walbust process under
#   valgrind --leak-check=full --errors-for-leak-kinds=definite,indirect
#            --error-exitcode=99
# so any invalid read/write, use of uninitialised memory, bad free, or a
# definitely/indirectly lost block makes that process exit 99 (and the test
# fail, with the valgrind report printed):
#   1. walbust check --rules (offline, a good and a bad file) and --pg;
#   2. walbust setup (publication, slot, SQL schema);
#   3. walbust run with a rules file using keys, patterns, tags, versions and
#      publish: inserts, updates (one moves a row's key), deletes, an explicit
#      walbust.invalidate() and a TRUNCATE, each confirmed by waiting for its
#      keys to disappear from Redis, then a key nothing touched is still
#      there, then SIGTERM (drain; exit 0);
#   4. walbust decode --slot --until over the same writes (a second slot
#      created before them), whose JSON lines are checked;
#   5. walbust status.
# Prints TAP; exits non-zero when a test fails. Skipped (exit 0) when
# WALBUST_BIN is built with AddressSanitizer (make asan), which cannot run
# under valgrind.
#
# Needs WALBUST_BIN and the stack's PGHOST/PGPORT/REDIS_PORT (tests/run
# exports them; or STACK_DIR with its env file). Works in its own database
# walbust_vg_<pid>, slots vg_<pid>*, and Redis keys vg<pid>:* in db 0, all
# removed at the end.
set -euo pipefail

: "${WALBUST_BIN:?set WALBUST_BIN to the walbust binary}"
if [ -z "${PGPORT:-}" ] && [ -n "${STACK_DIR:-}" ]; then
    # shellcheck disable=SC1091
    . "$STACK_DIR/env"
fi
: "${PGPORT:?source the env file written by scripts/stack start DIR}"
: "${REDIS_PORT:?source the env file written by scripts/stack start DIR}"
export PGHOST=${PGHOST:-127.0.0.1} PGUSER=${PGUSER:-postgres}
unset WALBUST_PG WALBUST_RULES WALBUST_SLOT WALBUST_PUBLICATION WALBUST_REDIS WALBUST_METRICS

if ! command -v valgrind >/dev/null; then
    echo "not ok 1 - valgrind is not installed (make deps)"
    exit 1
fi
# (nm's whole output is read first: with pipefail, `grep -q` closing the pipe
# early would fail the pipeline through nm's SIGPIPE.)
syms=$( { nm -D "$WALBUST_BIN"; nm "$WALBUST_BIN"; } 2>/dev/null || true)
if grep -q __asan_init <<<"$syms"; then
    echo "ok 1 - valgrind # SKIP $WALBUST_BIN is built with AddressSanitizer"
    exit 0
fi

db=walbust_vg_$$
slot=vg_$$
dslot=vg_$$_decode
pub=vg_$$
p=vg$$
tmp=$(mktemp -d "${STACK_DIR:-/tmp}/walbust-vg.XXXXXX")
pg="host=$PGHOST port=$PGPORT user=$PGUSER dbname=$db"
redis_url="redis://127.0.0.1:$REDIS_PORT/0"
run_pid=""

rcli() { redis-cli -p "$REDIS_PORT" -n 0 "$@"; }
q() { psql -X -q -v ON_ERROR_STOP=1 -d "$db" -At -c "$1"; }

cleanup() {
    if [ -n "$run_pid" ] && kill -0 "$run_pid" 2>/dev/null; then
        kill -KILL "$run_pid" 2>/dev/null || true
    fi
    psql -X -q -d postgres -c "SELECT pg_drop_replication_slot(slot_name)
        FROM pg_replication_slots WHERE slot_name LIKE 'vg\_$$%' AND NOT active" >/dev/null 2>&1 || true
    dropdb --if-exists --force "$db" >/dev/null 2>&1 || true
    rcli --scan --pattern "$p:*" 2>/dev/null | xargs -r redis-cli -p "$REDIS_PORT" -n 0 del >/dev/null 2>&1 || true
    rm -rf "$tmp"
}
trap cleanup EXIT

# ---------------------------------------------------------------- helpers
n=0
failed=0
pass() { n=$((n + 1)); echo "ok $n - $1"; }
fail() {
    n=$((n + 1)); failed=$((failed + 1))
    echo "not ok $n - $1"
    printf '%s\n' "$2" | sed 's/^/#   /'
}

# shellcheck disable=SC2054
VG=(valgrind --leak-check=full --errors-for-leak-kinds=definite,indirect --error-exitcode=99
    --track-origins=yes --num-callers=30)

# vg NAME LOG ARGS... — run walbust under valgrind, valgrind's report in
# $tmp/NAME.vg, walbust's stdout in $tmp/NAME.out, stderr in $tmp/NAME.err;
# the exit code in rc.
rc=0
vg() {
    local name=$1
    shift
    set +e
    "${VG[@]}" --log-file="$tmp/$name.vg" "$WALBUST_BIN" "$@" >"$tmp/$name.out" 2>"$tmp/$name.err"
    rc=$?
    set -e
}

# memcheck NAME — the valgrind report of NAME is clean: no errors, nothing
# definitely or indirectly lost.
memcheck() {
    local name=$1 report=$tmp/$1.vg why=""
    grep -q "ERROR SUMMARY: 0 errors" "$report" || why="memcheck errors"
    if grep -qE "(definitely|indirectly) lost: [1-9]" "$report"; then
        why="${why:+$why; }leaks"
    fi
    if [ -z "$why" ]; then
        pass "$name: valgrind clean ($(grep -o 'total heap usage: .*' "$report"))"
    else
        fail "$name: valgrind: $why" "$(grep -v '^==[0-9]*== *$' "$report" | head -n 120)"
    fi
}

# expect_rc NAME WANT — the last vg run exited WANT.
expect_rc() {
    if [ "$rc" -eq "$2" ]; then
        pass "$1 exits $2"
    else
        fail "$1 exits $rc, want $2" "$(cat "$tmp/$1.err" "$tmp/$1.out" | tail -n 30)"
    fi
}

# wait_gone TIMEOUT KEY... — every KEY is absent from Redis before TIMEOUT s.
wait_gone() {
    local deadline=$((SECONDS + $1)) k left
    shift
    while :; do
        left=""
        for k in "$@"; do
            [ "$(rcli exists "$k")" = 0 ] || left="$left $k"
        done
        [ -z "$left" ] && return 0
        [ $SECONDS -ge $deadline ] && { echo "still present:$left"; return 1; }
        sleep 0.2
    done
}

# wait_log TIMEOUT TEXT FILE — TEXT appears in FILE before TIMEOUT s.
wait_log() {
    local deadline=$((SECONDS + $1))
    until grep -qF -- "$2" "$3" 2>/dev/null; do
        [ $SECONDS -ge $deadline ] && return 1
        kill -0 "$run_pid" 2>/dev/null || return 1
        sleep 0.2
    done
}

# ---------------------------------------------------------------- set up
createdb "$db"
q "CREATE TABLE items(id int PRIMARY KEY, name text NOT NULL, team int);
   ALTER TABLE items REPLICA IDENTITY FULL;
   INSERT INTO items VALUES (1, 'one', 5), (2, 'two', 5), (3, 'three', 7), (4, 'four', 8);"
cat >"$tmp/rules.json" <<EOF
{
  "defaults": { "tag_prefix": "$p:tag:" },
  "rules": [
    {
      "table": "public.items",
      "keys": ["$p:item:{id}", "$p:name:{name}"],
      "patterns": ["$p:team:{team}:*"],
      "tags": ["item{id}"],
      "versions": ["$p:ver:{id}"],
      "publish": ["$p:chan"]
    }
  ]
}
EOF
printf '{"rules": [{"table": "items", "keys": ["x:{nope"], "bogus": 1}]}\n' >"$tmp/bad.json"

# ---------------------------------------------------------------- check
vg check_offline check --rules "$tmp/rules.json"
expect_rc check_offline 0
memcheck check_offline
vg check_bad check --rules "$tmp/bad.json"
expect_rc check_bad 1
memcheck check_bad
vg check_pg check --rules "$tmp/rules.json" --pg "$pg" --publication "$pub"
# The publication and slot do not exist yet: check --pg says setup will
# create them, and passes (exit 0).
expect_rc check_pg 0
memcheck check_pg

# ---------------------------------------------------------------- setup
vg setup setup --rules "$tmp/rules.json" --pg "$pg" --slot "$slot" --publication "$pub"
expect_rc setup 0
memcheck setup
q "SELECT pg_create_logical_replication_slot('$dslot', 'pgoutput')" >/dev/null

# ---------------------------------------------------------------- run
fill() {
    local k
    for k in "$@"; do rcli set "$k" cached >/dev/null; done
}
fill "$p:item:1" "$p:item:2" "$p:item:3" "$p:item:4" "$p:item:20" "$p:name:one" "$p:name:two" \
    "$p:team:5:list" "$p:team:7:list" "$p:team:8:list" "$p:team:9:list" "$p:explicit" \
    "$p:item:999" "$p:keep"
rcli sadd "$p:tag:item1" "$p:tagged:a" "$p:tagged:b" >/dev/null
fill "$p:tagged:a" "$p:tagged:b"

# scenario — the writes, each confirmed through Redis. Returns 1 at the
# first step that fails (the rest would only time out).
scenario() {
    local out
    q "UPDATE items SET name = 'uno' WHERE id = 1"
    if ! out=$(wait_gone 90 "$p:item:1" "$p:name:one" "$p:team:5:list" "$p:tagged:a" "$p:tagged:b" \
        "$p:tag:item1"); then
        fail "run: update" "$out"
        return 1
    fi
    pass "run: update invalidated keys, pattern and tag"
    q "UPDATE items SET id = 20, team = 9 WHERE id = 2"
    q "DELETE FROM items WHERE id = 3"
    q "INSERT INTO items VALUES (5, 'five', 8)"
    q "BEGIN; SELECT walbust.invalidate('$p:explicit'); COMMIT;" >/dev/null
    if ! out=$(wait_gone 90 "$p:item:2" "$p:item:20" "$p:name:two" "$p:team:9:list" "$p:item:3" \
        "$p:team:7:list" "$p:team:8:list" "$p:explicit"); then
        fail "run: changes" "$out"
        return 1
    fi
    pass "run: key change, delete, insert and walbust.invalidate invalidated"
    if [ "$(rcli get "$p:ver:1")" -ge 1 ] 2>/dev/null && [ "$(rcli exists "$p:item:4")" = 1 ] &&
        [ "$(rcli exists "$p:keep")" = 1 ]; then
        pass "run: version counter moved; untouched keys kept"
    else
        fail "run: versions/untouched" "ver:1=$(rcli get "$p:ver:1") item:4=$(rcli exists "$p:item:4")"
    fi
    q "TRUNCATE items"
    if ! out=$(wait_gone 90 "$p:item:999" "$p:item:4"); then
        fail "run: truncate" "$out"
        return 1
    fi
    pass "run: truncate widened to patterns"
}

set +e
"${VG[@]}" --log-file="$tmp/run.vg" "$WALBUST_BIN" run --pg "$pg" --redis "$redis_url" \
    --rules "$tmp/rules.json" --slot "$slot" --publication "$pub" --metrics off \
    --log-level debug >"$tmp/run.err" 2>&1 &
run_pid=$!
set -e
if wait_log 120 "streaming from" "$tmp/run.err"; then
    pass "run: streaming under valgrind"
    scenario || true
else
    fail "run: did not start streaming" "$(tail -n 40 "$tmp/run.err")"
fi
end_lsn=$(q "SELECT pg_current_wal_lsn()")

kill -TERM "$run_pid" 2>/dev/null || true
set +e
wait "$run_pid"
rc=$?
set -e
run_pid=""
if [ "$rc" -eq 0 ]; then
    pass "run: SIGTERM drains and exits 0"
else
    fail "run: exit $rc after SIGTERM (99: valgrind errors)" "$(tail -n 20 "$tmp/run.err")"
fi
memcheck run

# ---------------------------------------------------------------- decode
vg decode decode --pg "$pg" --rules "$tmp/rules.json" --slot "$dslot" --publication "$pub" \
    --until "$end_lsn"
expect_rc decode 0
memcheck decode
lines=$(grep -c '"op"' "$tmp/decode.out" || true)
if [ "$lines" -ge 5 ] && grep -q '"truncate"' "$tmp/decode.out" && grep -q "$p:explicit" "$tmp/decode.out"; then
    pass "decode: $lines JSON lines up to $end_lsn, with the truncate and the explicit invalidation"
else
    fail "decode output" "$(head -n 20 "$tmp/decode.out")"
fi

# ---------------------------------------------------------------- status
vg status status --pg "$pg" --slot "$slot" --publication "$pub"
expect_rc status 0
memcheck status

echo "1..$n"
[ "$failed" -eq 0 ]
