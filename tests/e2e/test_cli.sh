#!/usr/bin/env bash
# tests/e2e/test_cli.sh — the operator-facing commands against a real server:
# `walbust check` (offline and --pg), `walbust setup`, `walbust status`,
# usage, version and usage errors. Prints TAP ("ok N - name") and exits
# non-zero when any test fails.
#
# Needs WALBUST_BIN (the binary) and a running stack: the variables from
# scripts/stack's env file (PGHOST, PGPORT, PGUSER...), either exported or
# found through STACK_DIR. Works in its own database walbust_cli_<pid> and
# slots cli_<pid>*, all dropped at the end, even on failure.
set -euo pipefail

: "${WALBUST_BIN:?set WALBUST_BIN to the walbust binary}"
if [ -z "${PGPORT:-}" ] && [ -n "${STACK_DIR:-}" ]; then
    # shellcheck disable=SC1091
    . "$STACK_DIR/env"
fi
: "${PGPORT:?source the env file written by scripts/stack start DIR}"
export PGHOST=${PGHOST:-127.0.0.1} PGUSER=${PGUSER:-postgres}

root=$(cd "$(dirname "$0")/../.." && pwd)
db=walbust_cli_$$
slot=cli_$$
tmp=$(mktemp -d)
pg="host=$PGHOST port=$PGPORT user=$PGUSER dbname=$db"
# Options come from flags only in this test.
unset WALBUST_PG WALBUST_RULES WALBUST_SLOT WALBUST_PUBLICATION WALBUST_LOG_FORMAT \
    WALBUST_LOG_LEVEL

cleanup() {
    psql -X -q -d postgres -c "SELECT pg_drop_replication_slot(slot_name)
        FROM pg_replication_slots WHERE slot_name LIKE 'cli\_$$%'" >/dev/null 2>&1 || true
    dropdb --if-exists "$db" >/dev/null 2>&1 || true
    dropdb --if-exists "${db}_ex" >/dev/null 2>&1 || true
    rm -rf "$tmp"
}
trap cleanup EXIT

# ---------------------------------------------------------------- helpers
n=0
failed=0
out=""
stdout=""
rc=0

pass() { n=$((n + 1)); echo "ok $n - $1"; }
fail() {
    n=$((n + 1)); failed=$((failed + 1))
    echo "not ok $n - $1"
    printf '%s\n' "$2" | sed 's/^/#   /'
}

# run CMD... — run a command: exit code in rc, stdout in stdout, and
# stdout followed by stderr in out.
run() {
    set +e
    stdout=$("$@" 2>"$tmp/stderr")
    rc=$?
    set -e
    out=$stdout$'\n'$(cat "$tmp/stderr")
}

# expect NAME RC [TEXT...] — the last run exited RC and its output contains
# every TEXT (a fixed string; "!TEXT" must not appear; "~RE" is a regex).
expect() {
    local name=$1 want=$2 why="" t
    shift 2
    [ "$rc" -eq "$want" ] || why="exit code $rc, want $want"
    for t in "$@"; do
        case $t in
        !*) if grep -qF -- "${t#!}" <<<"$out"; then why="${why:+$why; }unwanted \"${t#!}\""; fi ;;
        ~*) grep -qE -- "${t#\~}" <<<"$out" || why="${why:+$why; }no match for /${t#\~}/" ;;
        *) grep -qF -- "$t" <<<"$out" || why="${why:+$why; }missing \"$t\"" ;;
        esac
    done
    if [ -z "$why" ]; then pass "$name"; else fail "$name" "$why"$'\n'"$out"; fi
}

# is NAME GOT WANT — equality.
is() {
    if [ "$2" = "$3" ]; then pass "$1"; else fail "$1" "got \"$2\", want \"$3\""; fi
}

q() { psql -X -q -At -v ON_ERROR_STOP=1 -d "$db" -c "$1"; }
wb() { "$WALBUST_BIN" "$@"; }
json() { python3 -c "import json,sys; d=json.loads(sys.stdin.read()); $1" <<<"$stdout"; }

rules() { cat >"$tmp/$1"; }

# ------------------------------------------------------- usage and version
run wb --help
expect "walbust --help exits 0 and lists every command" 0 run check decode setup status teardown
run wb --help
expect "walbust --help lists every option" 0 --pg --redis --rules --slot --publication \
    --create-slot --metrics --log-format --log-level --until --max-changes --json \
    --replica-identity-full WALBUST_PG WALBUST_REDIS WALBUST_RULES WALBUST_SLOT \
    WALBUST_PUBLICATION WALBUST_METRICS WALBUST_LOG_FORMAT WALBUST_LOG_LEVEL
run wb check --help
expect "walbust check --help exits 0 and names check's options" 0 check --rules --pg \
    --publication --log-format --log-level
run wb --version
expect "walbust --version prints the version" 0 "walbust $(cat "$root/VERSION")"
run wb frobnicate
expect "unknown command exits 2" 2 'unknown command "frobnicate"'
run wb check --rules "$tmp/x.json" --frob
expect "unknown option exits 2" 2 "unknown option" --frob
run wb check
expect "check without --rules exits 2" 2 "--rules FILE is required"
run wb check --rules "$tmp/x.json" --redis redis://x
expect "an option of another command exits 2" 2 "does not apply"
for bad in 101 -1 abc nan 1ms "" AUTO auto1; do
    run wb run --rules "$tmp/x.json" --flush-interval "$bad"
    expect "run --flush-interval \"$bad\" exits 2 naming the range" 2 \
        "--flush-interval must be auto or a number of milliseconds from 0 to 100"
done
run env WALBUST_FLUSH_INTERVAL=200 "$WALBUST_BIN" run --rules "$tmp/x.json"
expect "WALBUST_FLUSH_INTERVAL is checked like the flag" 2 "got \"200\""
run wb run --rules "$tmp/nosuch.json" --flush-interval 2.5
expect "run --flush-interval 2.5 is accepted (then the missing rules file)" 1 \
    "could not read rules file" "!--flush-interval"
run wb run --rules "$tmp/nosuch.json" --flush-interval auto
expect "run --flush-interval auto is accepted (then the missing rules file)" 1 \
    "could not read rules file" "!--flush-interval"
run wb status --rules "$tmp/x.json" --slot nosuch --pg "host=127.0.0.1 port=1 connect_timeout=2"
expect "status accepts --rules" 1 "could not read rules file"

# ------------------------------------------------------ check, offline
if [ -f "$root/rules/example.json" ]; then
    run wb check --rules "$root/rules/example.json"
    expect "check rules/example.json" 0 "~example.json: ok \([0-9]+ rules, [0-9]+ tables\)"
else
    pass "check rules/example.json # SKIP rules/example.json not written yet"
fi

rules good.json <<'EOF'
{
  "defaults": { "delete": "unlink", "tag_prefix": "tag:" },
  "rules": [
    { "table": "public.users", "keys": ["user:{id}"], "patterns": ["team:{new.team_id}:*"] },
    { "table": "public.users", "on": ["update"], "changed": ["email"], "versions": ["user:{id}:v"] },
    { "table": "teams", "keys": ["team:{id}"], "publish": ["cache:invalidation"] }
  ]
}
EOF
run wb check --rules "$tmp/good.json"
expect "check a valid file: ok with rule and table counts" 0 "$tmp/good.json: ok (3 rules, 2 tables)"

rules syntax.json <<'EOF'
{
  "rules": [
    {"table": "public.users" "keys": ["user:{id}"]}
  ]
}
EOF
run wb check --rules "$tmp/syntax.json"
expect "JSON syntax error: exit 1 with FILE:LINE:COLUMN" 1 "$tmp/syntax.json:3:30: " "!ok ("

rules unknown.json <<'EOF'
{
  "rules": [
    { "table": "public.users",
      "keys": ["user:{id}"], "kees": ["user:{id}:x"] }
  ]
}
EOF
run wb check --rules "$tmp/unknown.json"
expect "unknown field: exit 1, names the field and its line" 1 "$tmp/unknown.json:4:" kees

rules badtpl.json <<'EOF'
{
  "rules": [
    { "table": "public.users",
      "keys": ["user:{id"] }
  ]
}
EOF
run wb check --rules "$tmp/badtpl.json"
expect "bad template: exit 1, quotes the template with its place" 1 \
    "$tmp/badtpl.json:4:" 'user:{id' "(at rules[0].keys[0])"

rules wrongtype.json <<'EOF'
{
  "rules": [
    { "table": "public.users", "keys": ["user:{id}"],
      "on": "insert" }
  ]
}
EOF
run wb check --rules "$tmp/wrongtype.json"
expect "wrong type: exit 1, says what was expected" 1 "$tmp/wrongtype.json:4:" '"on"' array \
    "(at rules[0].on)"

run wb check --rules "$tmp/does-not-exist.json"
expect "unreadable file: exit 1 with the reason" 1 \
    "walbust: could not read rules file $tmp/does-not-exist.json: No such file or directory"

# ------------------------------------------------------ check --pg
createdb "$db"
q "CREATE TABLE users (id int PRIMARY KEY, name text, email text, team_id int);
   CREATE TABLE teams (id int PRIMARY KEY, name text);
   CREATE TABLE orders (id int PRIMARY KEY, user_id int, total numeric);
   CREATE PUBLICATION p_users FOR TABLE users;
   CREATE PUBLICATION p_all FOR TABLE users, teams, orders;"

run wb check --rules "$tmp/good.json" --pg "$pg" --publication p_all
expect "check --pg against a matching schema" 0 "$tmp/good.json: ok (3 rules, 2 tables)"

run wb check --rules "$tmp/good.json" --pg "$pg" --publication nopub --slot "${slot}_none"
expect "check --pg before setup: missing publication and slot are what setup creates" 0 \
    'publication "nopub" does not exist yet' "CREATE PUBLICATION" "walbust setup --rules" \
    "slot \"${slot}_none\" does not exist yet" "$tmp/good.json: ok (3 rules, 2 tables)"

q "SELECT pg_create_physical_replication_slot('${slot}_phys')" >/dev/null
run wb check --rules "$tmp/good.json" --pg "$pg" --publication p_all --slot "${slot}_phys"
expect "check --pg: a slot walbust cannot use is a problem" 1 "${slot}_phys" "physical" \
    "choose another --slot" "!ok ("

run wb check --rules "$tmp/good.json" --pg "$pg" --publication p_users
expect "check --pg: a table missing from the publication is named" 1 public.teams p_users "!ok ("

rules missing_table.json <<'EOF'
{ "rules": [
    { "table": "public.users", "keys": ["user:{id}"] },
    { "table": "public.nosuch", "keys": ["nosuch:{id}"] } ] }
EOF
run wb check --rules "$tmp/missing_table.json" --pg "$pg" --publication p_all
expect "check --pg: a missing table is named" 1 public.nosuch "!ok ("

rules missing_col.json <<'EOF'
{ "rules": [
    { "table": "public.users", "keys": ["user:{id}", "user:{nickname}"] } ] }
EOF
run wb check --rules "$tmp/missing_col.json" --pg "$pg" --publication p_all
expect "check --pg: a missing column is named" 1 nickname public.users "!ok ("

rules needs_old.json <<'EOF'
{ "rules": [
    { "table": "public.users", "keys": ["user:{id}"] },
    { "table": "public.teams", "keys": ["team:{id}"] },
    { "table": "public.orders", "keys": ["orders:{user_id}"] } ] }
EOF
run wb check --rules "$tmp/needs_old.json" --pg "$pg" --publication p_all
expect "check --pg: an old value under REPLICA IDENTITY DEFAULT names the fix" 1 \
    public.orders "ALTER TABLE" "REPLICA IDENTITY FULL" "orders:{user_id}" "!ok ("

run wb check --rules "$tmp/good.json" \
    --pg "host=127.0.0.1 port=1 dbname=x password=sekrit-pw connect_timeout=2"
expect "check --pg: connection failure exits 1 without the password" 1 "could not connect" \
    "!sekrit-pw"

# The shipped example against its demo schema: needs only the publication.
if [ -f "$root/rules/example.sql" ] && [ -f "$root/rules/example.json" ]; then
    createdb "${db}_ex"
    psql -X -q -v ON_ERROR_STOP=1 -d "${db}_ex" -f "$root/rules/example.sql" >/dev/null
    run wb check --rules "$root/rules/example.json" --pg "$pg"_ex
    expect "check --pg on the demo schema before setup passes: setup will create the rest" 0 \
        'publication "walbust" does not exist yet' "~example.json: ok \("
    run wb setup --rules "$root/rules/example.json" --pg "$pg"_ex --slot "${slot}_ex"
    expect "setup on the demo schema succeeds without warnings" 0 "created publication walbust" \
        "!warning:"
    run wb check --rules "$root/rules/example.json" --pg "$pg"_ex
    expect "check --pg on the demo schema after setup" 0 "~example.json: ok \("
    psql -X -q -d "${db}_ex" -c "SELECT pg_drop_replication_slot('${slot}_ex')" >/dev/null
else
    pass "example.json against rules/example.sql # SKIP not written yet"
fi

# ------------------------------------------------------ setup
run wb setup --rules "$tmp/needs_old.json" --pg "$pg" --slot "$slot"
expect "setup creates publication, schema and slot" 0 \
    "created publication walbust for 3 tables" "installed schema walbust" \
    "created replication slot $slot"
expect "setup without --replica-identity-full warns with the fix" 0 \
    "warning:" public.orders "--replica-identity-full"
is "setup: publication walbust holds the rules' tables" \
    "$(q "SELECT string_agg(tablename, ',' ORDER BY tablename) FROM pg_publication_tables
          WHERE pubname = 'walbust'")" "orders,teams,users"
is "setup: slot is a pgoutput slot in the database" \
    "$(q "SELECT plugin || ' ' || database FROM pg_replication_slots WHERE slot_name = '$slot'")" \
    "pgoutput $db"
is "setup: schema walbust is installed" "$(q "SELECT walbust.version()")" 1
is "setup without the flag leaves replica identity alone" \
    "$(q "SELECT relreplident FROM pg_class WHERE relname = 'orders'")" d

run wb setup --rules "$tmp/needs_old.json" --pg "$pg" --slot "$slot"
expect "second setup is a no-op that succeeds" 0 \
    "publication walbust already covers the rules' tables" "slot $slot already exists" \
    "!created"

run wb setup --rules "$tmp/needs_old.json" --pg "$pg" --slot "$slot" --replica-identity-full
expect "setup --replica-identity-full reports the change" 0 \
    "set REPLICA IDENTITY FULL on public.orders" "!warning:"
is "setup --replica-identity-full sets relreplident f where needed" \
    "$(q "SELECT string_agg(relname || '=' || relreplident::text, ',' ORDER BY relname) FROM pg_class
          WHERE relname IN ('users', 'teams', 'orders')")" "orders=f,teams=d,users=d"

run wb check --rules "$tmp/needs_old.json" --pg "$pg"
expect "check --pg passes after setup" 0 "$tmp/needs_old.json: ok (3 rules, 3 tables)"

q "CREATE TABLE extra (id int PRIMARY KEY)"
rules extended.json <<'EOF'
{ "rules": [
    { "table": "public.users", "keys": ["user:{id}"] },
    { "table": "public.extra", "keys": ["extra:{id}"] } ] }
EOF
run wb setup --rules "$tmp/extended.json" --pg "$pg" --slot "$slot"
expect "setup adds missing tables to an existing publication" 0 \
    "added 1 table to publication walbust: public.extra"
is "setup never drops tables from the publication" \
    "$(q "SELECT string_agg(tablename, ',' ORDER BY tablename) FROM pg_publication_tables
          WHERE pubname = 'walbust'")" "extra,orders,teams,users"

run wb setup --rules "$tmp/missing_table.json" --pg "$pg" --slot "${slot}_x" --publication fresh
expect "setup with a missing table fails and names it" 1 public.nosuch
is "a failed setup creates nothing" \
    "$(q "SELECT (SELECT count(*) FROM pg_publication WHERE pubname = 'fresh')::text ||
                 (SELECT count(*) FROM pg_replication_slots WHERE slot_name = '${slot}_x')")" 00

# ------------------------------------------------------ status
run wb status --pg "$pg" --slot "$slot"
expect "status text reports the slot" 0 "~^slot: +$slot$" "~^exists: +true$" \
    "~^plugin: +pgoutput$" "~^active: +false$" "~^lag_bytes: +[0-9]+$" "~^wal_status: +" \
    "~^confirmed_flush_lsn: +[0-9A-F]+/[0-9A-F]+$" "~^publication_exists: +true$"
vals=$(grep -oE '^[a-z_]+: +' <<<"$stdout" | awk '{ print length($0) }' | sort -u | wc -l)
is "status text values are aligned" "$vals" 1

q "INSERT INTO users SELECT g, 'n' || g, NULL, 1 FROM generate_series(1, 200) g"
run wb status --pg "$pg" --slot "$slot" --json
expect "status --json exits 0" 0
is "status --json is one object with typed fields" "$(json '
assert d["slot"] == "'"$slot"'" and d["exists"] is True and d["plugin"] == "pgoutput"
assert d["active"] is False and d["active_pid"] is None
assert isinstance(d["lag_bytes"], int) and d["lag_bytes"] > 0, d["lag_bytes"]
assert d["wal_status"] in ("reserved", "extended"), d["wal_status"]
assert "/" in d["confirmed_flush_lsn"] and "/" in d["restart_lsn"]
assert d["publication"] == "walbust" and d["publication_exists"] is True
print("ok")' 2>&1)" ok

run wb status --pg "$pg" --slot "$slot" --json --rules "$tmp/needs_old.json"
is "status --rules: publication covers every rules table" \
    "$(json 'print(d["publication_missing_tables"] == [] and d["rules"].endswith("needs_old.json"))' \
        2>&1)" True
expect "status --rules exits 0 when covered" 0

q "CREATE TABLE other (id int PRIMARY KEY)"
rules other.json <<'EOF'
{ "rules": [ { "table": "public.other", "keys": ["other:{id}"] } ] }
EOF
run wb status --pg "$pg" --slot "$slot" --rules "$tmp/other.json"
expect "status --rules lists uncovered tables and exits 1" 1 "~^publication_missing_tables: +public.other$" \
    "walbust setup"

run wb status --pg "$pg" --slot "${slot}_missing"
expect "status on a missing slot exits 1 with a hint" 1 "~^exists: +false$" "walbust setup" \
    "--create-slot"
run wb status --pg "$pg" --slot "${slot}_missing" --json
is "status --json on a missing slot still prints the object" \
    "$(json 'print(d["exists"], d["lag_bytes"])' 2>/dev/null | head -1)" "False None"

run wb status --pg "$pg" --slot "$slot" --publication nopub
expect "status on a missing publication exits 1" 1 "~^publication_exists: +false$" \
    'publication "nopub" does not exist'

echo "1..$n"
if [ "$failed" -gt 0 ]; then
    echo "# $failed of $n failed"
    exit 1
fi
