#!/usr/bin/env bash
# tests/e2e/test_packaging.sh — the deployment files are correct by
# construction (no Docker engine or systemd runs here):
#   - docker-compose.yml passes Debian's `docker-compose config -q`, and its
#     resolved form has what the stack needs (wal_level=logical, health
#     checks, start order, bind-mounted files that exist, loopback-only ports)
#   - the Dockerfile's build stage really builds walbust from exactly the
#     files it COPYs (the build is replayed in a temp dir), its -dev packages
#     provide every pkg-config module of the Makefile, and its runtime stage
#     installs the Debian package of every shared library the binary needs
#   - packaging/walbust.service passes `systemd-analyze verify` with no
#     diagnostics (when systemd-analyze exists; otherwise its required keys
#     are checked with grep — the output says which), and has its keys
#   - every WALBUST_* variable and --option of `walbust --help` is in the
#     env example (variables) and docs/operations.md (both)
# Prints TAP ("ok N - name") and exits non-zero when any test fails. Needs
# no servers; WALBUST_BIN is the binary whose --help is compared.
set -uo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
WALBUST_BIN=${WALBUST_BIN:-$root/build/walbust}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cd "$root" || exit 1

n=0
failed=0
ok() { n=$((n + 1)); echo "ok $n - $1"; }
not_ok() {
    n=$((n + 1)); failed=$((failed + 1))
    echo "not ok $n - $1"
    [ -s "$tmp/out" ] && sed 's/^/#   /' "$tmp/out"
    return 0
}
# check NAME CMD...: CMD's output goes to $tmp/out (shown on failure).
check() {
    local name=$1; shift
    if "$@" >"$tmp/out" 2>&1; then ok "$name"; else not_ok "$name"; fi
}

# ---------------------------------------------------------------- compose
if command -v docker-compose >/dev/null; then
    check "docker-compose config -q accepts docker-compose.yml ($(docker-compose version --short))" \
        docker-compose -f docker-compose.yml config -q
    docker-compose -f docker-compose.yml config >"$tmp/compose.yml" 2>"$tmp/out" \
        || not_ok "docker-compose config renders"
else
    : >"$tmp/out"
    echo "docker-compose not installed (scripts/deps installs Debian's)" >"$tmp/out"
    not_ok "docker-compose is installed"
fi

compose_semantics() {
    /usr/bin/python3 - "$tmp/compose.yml" "$root" <<'PY'
import os, re, sys, yaml

cfg = yaml.safe_load(open(sys.argv[1]))
root = sys.argv[2]
svc = cfg["services"]
errors = []
def need(cond, msg):
    if not cond:
        errors.append(msg)

for name in ("postgres", "redis", "walbust", "walbust-setup"):
    need(name in svc, "service %s missing" % name)
if errors:
    sys.exit("\n".join(errors))

pg, rd, wb, setup = svc["postgres"], svc["redis"], svc["walbust"], svc["walbust-setup"]
need(pg["image"].startswith("postgres:15"), "postgres image is not 15: %s" % pg["image"])
need(rd["image"].startswith("redis:7"), "redis image is not 7: %s" % rd["image"])
need("wal_level=logical" in pg.get("command", []), "postgres command lacks wal_level=logical")
for name in ("postgres", "redis", "walbust"):
    hc = svc[name].get("healthcheck", {}).get("test")
    need(hc, "service %s has no healthcheck" % name)
need("pg_isready" in pg["healthcheck"]["test"], "postgres healthcheck is not pg_isready")

want = {"postgres": "service_healthy", "redis": "service_healthy",
        "walbust-setup": "service_completed_successfully"}
for dep, cond in want.items():
    got = wb.get("depends_on", {}).get(dep, {}).get("condition")
    need(got == cond, "walbust depends_on %s: %s, want %s" % (dep, got, cond))
need(setup.get("command") == ["setup"], "walbust-setup does not run `walbust setup`")
need(setup.get("restart", "no") == "no", "walbust-setup restarts")
need(wb.get("command") == ["run"], "walbust does not run `walbust run`")
for s in (wb, setup):
    need("build" in s, "walbust services are not built from source")

# Bind mounts: the host side exists; the schema goes to the init scripts.
def binds(s):
    for v in s.get("volumes", []):
        src, dst = v.split(":")[0], v.split(":")[1]
        if src.startswith("/"):
            yield src, dst
for name, s in svc.items():
    for src, dst in binds(s):
        need(os.path.exists(src), "%s mounts missing %s" % (name, src))
need(any(dst.startswith("/docker-entrypoint-initdb.d/") and src.endswith("rules/example.sql")
         for src, dst in binds(pg)), "rules/example.sql is not a postgres init script")

# WALBUST_RULES resolves to a mounted file that exists on the host.
for name, s in (("walbust", wb), ("walbust-setup", setup)):
    env = s.get("environment", {})
    rules = env.get("WALBUST_RULES", "")
    host = [src + rules[len(dst):] for src, dst in binds(s) if rules.startswith(dst + "/")]
    need(host and os.path.isfile(host[0]),
         "%s: WALBUST_RULES=%s is not a mounted file" % (name, rules))
    need("WALBUST_PG" in env and "host=postgres" in env["WALBUST_PG"],
         "%s: WALBUST_PG does not name the postgres service" % name)

# Published ports only on the host's loopback; metrics port matches.
for name, s in svc.items():
    for p in s.get("ports", []):
        need(str(p).startswith("127.0.0.1:"), "%s publishes %s beyond loopback" % (name, p))
m = re.match(r".*:(\d+)$", wb["environment"].get("WALBUST_METRICS", ""))
need(m and any(str(p).split(":")[-1].split("/")[0] == m.group(1) for p in wb.get("ports", [])),
     "walbust metrics port is not published")
need("9187" in " ".join(wb["healthcheck"]["test"]) and "/readyz" in " ".join(wb["healthcheck"]["test"]),
     "walbust healthcheck does not probe /readyz on the metrics port")

# The health check's tool is installed in the runtime image.
tool = wb["healthcheck"]["test"][1]
runtime = open(os.path.join(root, "Dockerfile")).read().split("\nFROM ")[-1]
need(tool != "curl" or re.search(r"\bcurl\b", runtime), "healthcheck uses curl; image lacks it")
if errors:
    sys.exit("\n".join(errors))
print("services:", ", ".join(sorted(svc)))
PY
}
if [ -s "$tmp/compose.yml" ]; then
    check "compose: pg15 wal_level=logical, redis 7, health checks, start order, mounts, ports" \
        compose_semantics
fi

# ---------------------------------------------------------------- Dockerfile
# Replay the build stage: copy what it COPYs (skipping .dockerignore'd
# paths) into an empty directory and build there.
replay_build() {
    /usr/bin/python3 - "$root" "$tmp/ctx" <<'PY' || return 1
import fnmatch, os, shutil, sys
root, ctx = sys.argv[1], sys.argv[2]
ignore = [l.strip().rstrip("/") for l in open(os.path.join(root, ".dockerignore"))
          if l.strip() and not l.startswith("#")]
def ignored(rel):
    parts = rel.split("/")
    return any(fnmatch.fnmatch("/".join(parts[:i]), pat.lstrip("/").replace("**/", "*"))
               for pat in ignore if not pat.startswith("!") for i in range(1, len(parts) + 1))
stage = open(os.path.join(root, "Dockerfile")).read().split("\nFROM ")[1]  # the build stage
os.makedirs(ctx)
for line in stage.replace("\\\n", " ").splitlines():
    words = line.split()
    if not words or words[0] != "COPY" or any(w.startswith("--from") for w in words):
        continue
    for src in words[1:-1]:
        src = src.rstrip("/")
        if ignored(src):
            sys.exit("Dockerfile COPYs %s but .dockerignore excludes it" % src)
        path = os.path.join(root, src)
        if os.path.isdir(path):
            shutil.copytree(path, os.path.join(ctx, src),
                            ignore=lambda d, names: [n for n in names
                                if ignored(os.path.relpath(os.path.join(d, n), root))])
        else:
            shutil.copy2(path, os.path.join(ctx, src))
print("context:", " ".join(sorted(os.listdir(ctx))))
PY
    # A clean make, as in the image: not the caller's (e.g. `make asan`'s
    # BUILD= and CFLAGS=, which MAKEFLAGS would pass down).
    env -u MAKEFLAGS -u MFLAGS -u MAKELEVEL -u BUILD -u CFLAGS -u LDFLAGS \
        make -C "$tmp/ctx" -j"$(nproc)" build/walbust && "$tmp/ctx/build/walbust" --version
}
check "Dockerfile build stage builds walbust from exactly the files it copies" replay_build

# The package owning a file (usrmerge: try both /lib and /usr/lib spellings).
owner() {
    local f=$1 alt
    case $f in /usr/*) alt=${f#/usr} ;; *) alt=/usr$f ;; esac
    { dpkg -S "$f" 2>/dev/null || dpkg -S "$alt" 2>/dev/null; } | head -1 | cut -d: -f1
}
stage_text() { # 1 = build stage, 2 = runtime stage
    awk -v want="$1" '/^FROM /{s++} s==want' Dockerfile
}

dev_packages() {
    local pkgs mod pc p missing=""
    pkgs=$(sed -n 's/^PKGS *= *//p' Makefile)
    for mod in $pkgs; do
        pc="$(pkg-config --variable=pcfiledir "$mod")/$mod.pc"
        p=$(owner "$pc")
        echo "$mod -> $p"
        stage_text 1 | grep -qw -- "$p" || missing="$missing $p"
    done
    [ -z "$missing" ] || { echo "build stage lacks:$missing"; return 1; }
}
check "Dockerfile build stage installs the -dev package of every Makefile pkg-config module" \
    dev_packages

runtime_packages() {
    local bin=$tmp/ctx/build/walbust lib path p missing=""
    [ -x "$bin" ] || { echo "no replayed build"; return 1; }
    for lib in $(objdump -p "$bin" | awk '/NEEDED/ {print $2}'); do
        path=$(ldd "$bin" | awk -v l="$lib" '$1 == l {print $3}')
        p=$(owner "$(readlink -f "$path")")
        [ -n "$p" ] || p=$(owner "$path")
        echo "$lib -> $p"
        [ -n "$p" ] || { missing="$missing ?$lib"; continue; }
        [ "$p" = libc6 ] && continue  # in every Debian image
        stage_text 2 | grep -qw -- "$p" || missing="$missing $p"
    done
    [ -z "$missing" ] || { echo "runtime stage lacks:$missing"; return 1; }
}
check "Dockerfile runtime stage installs the package of every library walbust links" \
    runtime_packages

# ---------------------------------------------------------------- systemd
unit=packaging/walbust.service
required_keys() {
    local k missing=""
    for k in '^Type=notify$' '^WatchdogSec=' '^Restart=on-failure$' \
             '^EnvironmentFile=-/etc/walbust/walbust.env$' '^ExecStart=/usr/local/bin/walbust run$' \
             '^ExecReload=/bin/kill -HUP \$MAINPID$' '^KillSignal=SIGTERM$' '^TimeoutStopSec=' \
             '^NoNewPrivileges=yes$' '^ProtectSystem=strict$' '^ProtectHome=yes$' \
             '^PrivateTmp=yes$' '^DynamicUser=yes$' '^WantedBy=multi-user.target$'; do
        grep -q -- "$k" "$unit" || missing="$missing $k"
    done
    for k in '\[Unit\]' '\[Service\]' '\[Install\]'; do
        grep -q "^$k$" "$unit" || missing="$missing $k"
    done
    [ -z "$missing" ] || { echo "missing:$missing"; return 1; }
}
check "walbust.service has its required keys (grep)" required_keys

if command -v systemd-analyze >/dev/null; then
    # verify wants the executables to exist: point them at the built binary.
    # Any diagnostic (an unknown key is only a warning) fails the test.
    verify_unit() {
        sed "s#/usr/local/bin/walbust#$WALBUST_BIN#g" "$unit" >"$tmp/walbust.service"
        systemd-analyze verify "$tmp/walbust.service" >"$tmp/verify.out" 2>&1
        local rc=$?
        cat "$tmp/verify.out"
        [ $rc -eq 0 ] && [ ! -s "$tmp/verify.out" ]
    }
    check "systemd-analyze verify walbust.service: no diagnostics ($(systemd-analyze --version | head -1))" \
        verify_unit
else
    echo "# systemd-analyze not available: the unit was checked with grep only"
fi

# ---------------------------------------------------------------- env + docs
"$WALBUST_BIN" --help >"$tmp/help" 2>&1
env_vars=$(grep -o '\[WALBUST_[A-Z_]*\]' "$tmp/help" | tr -d '[]' | sort -u)
options=$(grep -oE '^  --[a-z-]+' "$tmp/help" | tr -d ' ' | sort -u)

env_example() {
    local v bad=""
    [ -n "$env_vars" ] || { echo "no variables in walbust --help"; return 1; }
    for v in $env_vars; do
        grep -q "^#\?$v=" packaging/walbust.env.example || bad="$bad missing:$v"
    done
    for v in $(grep -oE '^#?WALBUST_[A-Z_]+' packaging/walbust.env.example | tr -d '#'); do
        grep -qx "$v" <<<"$env_vars" || bad="$bad unknown:$v"
    done
    [ -z "$bad" ] || { echo "$bad"; return 1; }
}
check "walbust.env.example sets every WALBUST_* variable walbust --help lists, and no other" \
    env_example

docs_cover() {
    local x bad=""
    for x in $env_vars $options; do
        grep -qF -- "$x" docs/operations.md || bad="$bad $x"
    done
    [ -z "$bad" ] || { echo "docs/operations.md lacks:$bad"; return 1; }
}
check "docs/operations.md documents every option and variable of walbust --help" docs_cover

# The alert rules and scrape config in the docs are pasted by operators.
if command -v promtool >/dev/null; then
    docs_prometheus() {
        /usr/bin/python3 - "$tmp" <<'PY' || return 1
import re, sys
s = open("docs/operations.md").read()
blocks = re.findall(r"```yaml\n(.*?)```", s, re.S)
rules = [b for b in blocks if b.startswith("groups:")]
scrape = [b for b in blocks if b.startswith("scrape_configs:")]
if len(rules) != 1 or len(scrape) != 1:
    sys.exit("expected one alert rules block and one scrape_configs block")
open(sys.argv[1] + "/alerts.yml", "w").write(rules[0])
open(sys.argv[1] + "/prometheus.yml", "w").write(scrape[0])
PY
        promtool check rules "$tmp/alerts.yml" && promtool check config "$tmp/prometheus.yml"
    }
    check "promtool accepts the docs' alert rules and scrape config" docs_prometheus
else
    echo "# promtool not available: the docs' alert rules were not checked"
fi

echo "1..$n"
[ "$failed" -eq 0 ]
