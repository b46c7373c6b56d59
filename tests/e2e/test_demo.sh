#!/usr/bin/env bash
# tests/e2e/test_demo.sh — `make demo` (scripts/demo) runs to the end and
# shows what the README says it shows: exactly the affected keys removed
# (user rename, team move, rolled-back write, walbust.invalidate), and in
# step 6 the derived-data rules of rules/derived.json: a lookup removes the
# member lists of exactly the renamed user's teams, a join-table insert
# removes its team's list, a bulk price update leaves all 1000 product
# entries in place with the new price (refresh), and of 3 concurrent readers
# of the stale page one rebuilds it while the other two get the old page at
# once. Prints TAP ("ok N - name") and exits non-zero when any test fails.
#
# Needs WALBUST_BIN; the demo starts (and stops) its own PostgreSQL + Redis,
# so no stack is needed. DEMO_PAUSE=0: no pauses between steps.
set -uo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
WALBUST_BIN=${WALBUST_BIN:-$root/build/walbust}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

n=0
failed=0
ok() { n=$((n + 1)); echo "ok $n - $1"; }
not_ok() {
    n=$((n + 1)); failed=$((failed + 1))
    echo "not ok $n - $1"
    printf '%s\n' "$2" | sed 's/^/#   /'
}

start=$SECONDS
DEMO_PAUSE=0 WALBUST_BIN=$WALBUST_BIN timeout 300 "$root/scripts/demo" >"$tmp/raw" 2>&1
rc=$?
took=$((SECONDS - start))
sed 's/\x1b\[[0-9;]*m//g' "$tmp/raw" >"$tmp/out"
if [ "$rc" -eq 0 ]; then
    ok "scripts/demo exits 0 (in ${took} s)"
else
    not_ok "scripts/demo exits 0 (in ${took} s)" "exit status $rc; last lines:
$(tail -n 20 "$tmp/out")"
fi

# section TITLE-PREFIX — the lines of the demo step whose title starts so.
section() {
    awk -v t="$1" 'index($0, t) == 1 { on = 1; next } on && /^[0-9]+[a-z]?\. |^done:/ { on = 0 } on' "$tmp/out"
}

# expect NAME TITLE-PREFIX LINE... — each LINE occurs (fixed string, whole line)
# in that step's output.
expect() {
    local name=$1 sec=$2 body line missing=""
    shift 2
    body=$(section "$sec")
    for line in "$@"; do
        grep -qxF -- "$line" <<<"$body" || missing="$missing
missing: $line"
    done
    if [ -z "$missing" ]; then
        ok "$name"
    else
        not_ok "$name" "${missing#?}
step output:
$body"
    fi
}

expect "renaming a user removes user:1, its profile and team:10:*, not user:2" "5a." \
    "   walbust removed: team:10:members user:1 user:1:profile "
expect "moving a user removes both teams' keys" "5b." \
    "   walbust removed: team:10:members team:20:members user:2 user:2:profile "
expect "a rolled-back write removes nothing" "5d." "   walbust removed: nothing"
expect "walbust.invalidate() removes its key" "5e." "   walbust removed: product:2 "
expect "the derived rules pass check --pg without warnings" "6." \
    "   $root/rules/derived.json: ok (5 rules, 4 tables)"
expect "lookup: renaming Ada removes exactly her 3 teams' member lists and user:1" "6a." \
    "   walbust removed: team:10:members team:11:members team:12:members user:1 "
expect "the join table's own rule removes the joined team's member list" "6b." \
    "   walbust removed: team:10:members "
expect "refresh: all 1000 product entries stay, re-warmed with the new price" "6c." \
    '   before: 1000 product:* entries; product:1 = {"id":"1","name":"Red hat","price":"9.99"}' \
    '   after:  1000 product:* entries; product:1 = {"id":"1","name":"Red hat","price":"10.99"}'
expect "stale: the page reads as a stale marker to plain GET, then a hit on the rebuilt page" "6d." \
    "   plain GET product:1:page: '\\x00walbust-lease:stale:0::<h1>Red '... (a stale marker: plain GET readers see a miss)" \
    "   the next reader: hit: <h1>Red hat</h1> price 10.99"

# Of the 3 concurrent readers, exactly one rebuilt (new price), two were
# served the old page without waiting for it.
body=$(section "6d.")
rebuilt=$(grep -c "rebuilt it (it got the lease): <h1>Red hat</h1> price 10.99$" <<<"$body")
served=$(grep -c "served the stale page at once: <h1>Red hat</h1> price 9.99$" <<<"$body")
if [ "$rebuilt" = 1 ] && [ "$served" = 2 ]; then
    ok "stale: one of 3 readers rebuilds the page, the other two get the old one"
else
    not_ok "stale: one of 3 readers rebuilds the page, the other two get the old one" \
        "rebuilt: $rebuilt (want 1), served stale: $served (want 2)
$body"
fi
# "At once": the two stale readers did not wait for the 1 s rebuild.
slow=$(grep "served the stale page" <<<"$body" | awk '$4 + 0 >= 0.9' | wc -l)
if [ "$served" = 2 ] && [ "$slow" = 0 ]; then
    ok "stale: the old page is served before the rebuild finishes"
else
    not_ok "stale: the old page is served before the rebuild finishes" "$body"
fi
if grep -q "has not confirmed" "$tmp/out"; then
    not_ok "every write was confirmed by walbust within the demo's wait" \
        "$(grep "has not confirmed" "$tmp/out")"
else
    ok "every write was confirmed by walbust within the demo's wait"
fi

echo "1..$n"
[ "$failed" -eq 0 ]
