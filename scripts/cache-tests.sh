#!/usr/bin/env bash
# RFC 9111 shared-cache conformance (issue 9): runs the public HTTP cache test suite
# (npm package http-cache-tests, the suite behind cache-tests.fyi, pinned in
# scripts/cache-tests/package-lock.json) against nginx, Varnish and — once it can proxy —
# fediedge, each in front of the suite's own origin server, and prints per-target counts by
# test kind (required / optimal / check) and the failing required tests with their reasons.
#
#   bash scripts/cache-tests.sh
#
# Knobs:
#   CACHE_TESTS_TARGETS=nginx,varnish,fediedge   which targets, in order (also: nginx-plain)
#   CACHE_TESTS_OUT=target/cache-tests  where results (<target>.json), logs and summary go
#   CACHE_TESTS_MIN_REQUIRED=N          exit 1 unless fediedge ran, passed >= N required tests
#                                       and more than every other target (issue 9: 140)
#   CACHE_TESTS_TIMEOUT=900             seconds one target's run may take
#   CACHE_TESTS_ID=<test-id>            run one test verbosely against each target (debugging)
#
# Targets:
#   nginx        proxy_cache as in Mastodon's nginx example, but without proxy_cache_valid
#                (response headers decide freshness): proxy_cache_lock, proxy_cache_revalidate,
#                proxy_cache_use_stale error timeout updating http_5xx
#   nginx-plain  the suite's own published nginx setup: proxy_cache + proxy_cache_revalidate
#   varnish      builtin VCL (-b), with the suite's published parameters default_ttl=0,
#                default_grace=0, default_keep=3600 (no caching without freshness information)
#   fediedge     fediedge serve, [core] in front of the origin with [core.cache] (a debug build
#                of this checkout unless FEDIEDGE_BIN names a binary)
#
# Everything binds 127.0.0.1 on free ports, runs under `nice -n 10`, lives in a temporary
# directory and is stopped on exit. Method and figures: docs/benchmarks.md.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
SUITE_PROJECT=$ROOT/scripts/cache-tests
SUITE=$SUITE_PROJECT/node_modules/http-cache-tests
TARGETS=${CACHE_TESTS_TARGETS:-nginx,varnish,fediedge}
OUT=${CACHE_TESTS_OUT:-$ROOT/target/cache-tests}
RUN_TIMEOUT=${CACHE_TESTS_TIMEOUT:-900}
ONE_ID=${CACHE_TESTS_ID:-}
NICE=(nice -n 10)

log() { echo "cache-tests: $*" >&2; }

# --- the suite --------------------------------------------------------------------------------
command -v node >/dev/null || { log "node is required (Debian: apt-get install nodejs npm)"; exit 2; }
want=$(node -p "require('$SUITE_PROJECT/package.json').dependencies['http-cache-tests']")
have=$(node -p "try { require('$SUITE/package.json').version } catch (e) { '' }" 2>/dev/null || true)
if [ "$have" != "$want" ]; then
    log "installing http-cache-tests $want (npm ci in scripts/cache-tests)"
    (cd "$SUITE_PROJECT" && "${NICE[@]}" npm ci --no-audit --no-fund --loglevel=error)
fi
SUITE_VERSION=$(node -p "require('$SUITE/package.json').version")

WANT=()
IFS=',' read -r -a targets <<<"$TARGETS"
for t in "${targets[@]}"; do
    t=${t// /}
    [ -n "$t" ] || continue
    case "$t" in
        nginx | nginx-plain | varnish | fediedge) WANT+=("$t") ;;
        *) log "unknown target '$t' (known: nginx, nginx-plain, varnish, fediedge)"; exit 2 ;;
    esac
done

mkdir -p "$OUT"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/cache-tests.XXXXXX")
PIDS=()

cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
    node -e "const s=require('net').createServer();s.listen(0,'127.0.0.1',()=>{console.log(s.address().port);s.close()})"
}

# wait_http URL: until something answers HTTP there (any status), 20 s at most
wait_http() {
    for _ in $(seq 200); do
        if curl -s -o /dev/null --max-time 1 "$1"; then return 0; fi
        sleep 0.1
    done
    log "nothing answered at $1"
    return 1
}

# --- the origin: the suite's server/server.mjs, held to 127.0.0.1 by loopback.mjs ---------------
ORIGIN_PORT=$(free_port)
mkdir -p "$WORK/origin" # its cwd: it serves files from there (none)
(
    cd "$WORK/origin"
    export npm_config_port=$ORIGIN_PORT npm_config_protocol=http npm_config_pidfile=$WORK/origin/server.pid
    exec "${NICE[@]}" node --no-warnings --import "$SUITE_PROJECT/loopback.mjs" "$SUITE/server/server.mjs"
) >"$OUT/origin.log" 2>&1 &
PIDS+=($!)
wait_http "http://127.0.0.1:$ORIGIN_PORT/state/none"
log "origin (http-cache-tests $SUITE_VERSION server) on 127.0.0.1:$ORIGIN_PORT"

# --- targets: start_<name> starts one, sets BASE (no trailing slash) and VERSION, returns 0;
# --- or returns 3 for "not available", which leaves it out of the results ---------------------

nginx_conf() { # $1 dir, $2 port, $3 extra cache directives
    local d=$1
    mkdir -p "$d/cache" "$d/tmp" "$d/logs"
    cat >"$d/nginx.conf" <<EOF
$([ "$(id -u)" -eq 0 ] && echo "user root root;")
worker_processes 1;
pid $d/nginx.pid;
error_log $d/logs/error.log warn;
events { worker_connections 2048; }
http {
  access_log $d/logs/access.log;
  client_body_temp_path $d/tmp/client;
  proxy_temp_path $d/tmp/proxy;
  fastcgi_temp_path $d/tmp/fastcgi;
  uwsgi_temp_path $d/tmp/uwsgi;
  scgi_temp_path $d/tmp/scgi;
  proxy_cache_path $d/cache levels=1:2 keys_zone=CACHE:8m max_size=1g inactive=600m;
  server {
    listen 127.0.0.1:$2;
    location / {
      proxy_pass http://127.0.0.1:$ORIGIN_PORT;
      proxy_cache CACHE;
$3
    }
  }
}
EOF
}

start_nginx_with() { # $1 name, $2 extra directives
    local bin port d
    bin=$(command -v nginx || echo /usr/sbin/nginx)
    [ -x "$bin" ] || { log "nginx not installed (apt-get install nginx)"; return 3; }
    port=$(free_port)
    d=$WORK/$1
    nginx_conf "$d" "$port" "$2"
    "$bin" -t -q -p "$d" -c "$d/nginx.conf" -e "$d/logs/error.log"
    "${NICE[@]}" "$bin" -p "$d" -c "$d/nginx.conf" -e "$d/logs/error.log" -g 'daemon off;' >"$OUT/$1.log" 2>&1 &
    PIDS+=($!)
    BASE=http://127.0.0.1:$port
    VERSION=$("$bin" -v 2>&1 | sed 's/^nginx version: //')
    wait_http "$BASE/state/none"
}

start_nginx() {
    start_nginx_with nginx '      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_cache_lock on;
      proxy_cache_revalidate on;
      proxy_cache_use_stale error timeout updating http_500 http_502 http_503 http_504;'
}

start_nginx-plain() {
    start_nginx_with nginx-plain '      proxy_cache_revalidate on;'
}

start_varnish() {
    local bin port d
    bin=$(command -v varnishd || echo /usr/sbin/varnishd)
    [ -x "$bin" ] || { log "varnishd not installed (apt-get install varnish)"; return 3; }
    port=$(free_port)
    d=$WORK/varnish
    mkdir -p "$d"
    "${NICE[@]}" "$bin" -F -n "$d/work" -a "127.0.0.1:$port" -T 127.0.0.1:0 -j none \
        -b "127.0.0.1:$ORIGIN_PORT" -s malloc,64m \
        -p default_ttl=0 -p default_grace=0 -p default_keep=3600 >"$OUT/varnish.log" 2>&1 &
    PIDS+=($!)
    BASE=http://127.0.0.1:$port
    VERSION=$("$bin" -V 2>&1 | head -1 | sed -E 's/^varnishd \((varnish-[^ ]+).*/\1/')
    wait_http "$BASE/state/none"
}

start_fediedge() {
    # fediedge serve with [core] in front of the suite's origin and [core.cache] on. The
    # binary: $FEDIEDGE_BIN, else a debug build of this checkout (cargo build, under nice).
    local bin port admin d
    bin=${FEDIEDGE_BIN:-}
    if [ -z "$bin" ]; then
        (cd "$ROOT" && "${NICE[@]}" cargo build --quiet --bin fediedge) >"$OUT/fediedge-build.log" 2>&1 ||
            { log "cargo build failed (log: $OUT/fediedge-build.log)"; return 1; }
        bin=$ROOT/target/debug/fediedge
    fi
    port=$(free_port)
    admin=$(free_port)
    d=$WORK/fediedge
    mkdir -p "$d/primary"
    # Health checks off (the origin has no /health); the breaker effectively off, since the
    # suite's origin answers 5xx on purpose; nothing else differs from a production setup.
    cat >"$d/fediedge.toml" <<EOF
listen = "127.0.0.1:$port"
admin_listen = "127.0.0.1:$admin"
data_dir = "$d/var"
[primary]
type = "fs"
root = "$d/primary"
[core]
hosts = ["127.0.0.1", "localhost"]
web = ["127.0.0.1:$ORIGIN_PORT"]
health_check_interval = "0s"
breaker_failures = 100000
[core.cache]
dir = "$d/core-cache"
max_size = "256MiB"
EOF
    "${NICE[@]}" "$bin" serve --config "$d/fediedge.toml" >"$OUT/fediedge.log" 2>&1 &
    PIDS+=($!)
    BASE=http://127.0.0.1:$port
    VERSION="fediedge $("$bin" --version 2>/dev/null | awk '{print $2}') ($(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?'))"
    wait_http "$BASE/state/none"
}

# --- run --------------------------------------------------------------------------------------
run_suite() { # $1 base url; results JSON on stdout
    (
        cd "$SUITE"
        export npm_config_base=$1 npm_package_config_base=$1
        export npm_config_id=$ONE_ID npm_package_config_id=$ONE_ID
        exec timeout "$RUN_TIMEOUT" "${NICE[@]}" node --no-warnings cli.mjs
    )
}

RAN=()
for t in "${WANT[@]}"; do
    BASE='' VERSION=''
    rc=0
    "start_$t" || rc=$?
    if [ "$rc" -eq 3 ]; then
        continue
    elif [ "$rc" -ne 0 ]; then
        log "$t did not start (log: $OUT/$t.log)"
        exit 1
    fi
    log "$t ($VERSION) at $BASE: running the suite"
    start=$(date +%s)
    if [ -n "$ONE_ID" ]; then
        run_suite "$BASE" | tee "$OUT/$t.$ONE_ID.txt"
        continue
    fi
    # In the background and waited for, so that a signal reaches the trap at once (bash runs
    # traps only after a foreground command ends) and the cleanup stops the client too.
    run_suite "$BASE" >"$OUT/$t.json.tmp" 2>"$OUT/$t.client.log" &
    PIDS+=($!)
    if ! wait "$!"; then
        log "$t: the suite's client failed (log: $OUT/$t.client.log)"
        exit 1
    fi
    unset 'PIDS[-1]' # the client has ended and was reaped: never signal its pid again
    # The CLI prints "Running …" lines only with an id; the results are the JSON object.
    mv "$OUT/$t.json.tmp" "$OUT/$t.json"
    echo "$t	$VERSION	$BASE	$(($(date +%s) - start))s" >>"$WORK/ran.tsv"
    RAN+=("$t=$OUT/$t.json")
    log "$t: done in $(($(date +%s) - start)) s"
done
[ -n "$ONE_ID" ] && exit 0

if [ "${#RAN[@]}" -eq 0 ]; then
    log "no target ran"
    exit 1
fi

{
    echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "suite: http-cache-tests $SUITE_VERSION, node $(node -v)"
    while IFS=$'\t' read -r name version base secs; do
        echo "target: $name, $version, $base, $secs"
    done <"$WORK/ran.tsv"
    echo
} | tee "$OUT/summary.txt"

GATE=()
if [ -n "${CACHE_TESTS_MIN_REQUIRED:-}" ]; then
    GATE=(--gate "fediedge:$CACHE_TESTS_MIN_REQUIRED")
fi
rc=0
node --no-warnings "$SUITE_PROJECT/summarise.mjs" --json "$OUT/summary.json" "${GATE[@]}" "${RAN[@]}" |
    tee -a "$OUT/summary.txt" || rc=$?
exit "$rc"
