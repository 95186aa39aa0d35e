#!/usr/bin/env bash
# What one fediedge process spends per proxied request (issue 8 §8's proxy target), measured
# so that a busy machine does not drown it: not req/s, but CPU time or instructions per request.
#
#   scripts/proxy-cpu.sh cpu BIN [SECS] [CONNS]   # wrk -t2 -cCONNS, 3 rounds of SECS (2, 64):
#                                                 # fediedge's utime+stime per request, new
#                                                 # upstream connections (nginx stub_status)
#   scripts/proxy-cpu.sh callgrind BIN [N]        # N (500) sequential keep-alive requests by
#                                                 # one curl under callgrind: instructions each
#
# The upstream is one nginx worker answering every request with a ~930-byte JSON body,
# keep-alive; `[core]` sends everything outside the media prefix to it. EXTRA_CORE adds lines
# to `[core]` (e.g. EXTRA_CORE='max_idle_per_upstream = 32'). Needs nginx, wrk, curl, valgrind.
# EXTRA_TOP adds top-level lines (e.g. EXTRA_TOP='worker_threads = 1'); CG_TOP=40 prints the 40 functions
# costing most instructions per request (callgrind mode); CG_OUT=FILE keeps the dump. URL_PATH=/api/v1/instance asks for a
# URL the upstream marks cacheable (`public, max-age=300`): with EXTRA_CORE adding a
# `[core.cache]` table, that measures a core cache hit instead of a proxied request.
# CURL_HEADER='Accept-Encoding: gzip' sends one more request header (curl and wrk).
# BODY_PAD=N: the upstream's JSON body pads N zeros (default 900: about 930 bytes; nginx takes up to about 4000).
# Figures and method: docs/benchmarks.md ("Proxy CPU per request, A/B").
set -euo pipefail

MODE=${1:?usage: proxy-cpu.sh cpu|callgrind BIN ...}
BIN=$(realpath "${2:?the fediedge binary}")
D=$(mktemp -d /tmp/proxy-cpu.XXXXXX)
mkdir -p "$D/media" "$D/var" "$D/cache" "$D/ng/logs" "$D/ng/tmp"
UP=$((20000 + RANDOM % 10000)); FE=$((UP + 1)); AD=$((UP + 2))
BODY=$(printf "{\"uri\":\"bench\",\"pad\":\"%0${BODY_PAD:-900}d\"}" 0)
USER_LINE=""
[ "$(id -u)" -eq 0 ] && USER_LINE="user root root;"
PID=""
cleanup() {
    [ -n "$PID" ] && kill "$PID" 2>/dev/null && wait "$PID" 2>/dev/null
    [ -f "$D/ng/nginx.pid" ] && kill "$(cat "$D/ng/nginx.pid")" 2>/dev/null
    rm -rf "$D"
}
trap cleanup EXIT

cat >"$D/ng/nginx.conf" <<NG
$USER_LINE
worker_processes 1; pid $D/ng/nginx.pid; error_log $D/ng/logs/error.log warn; daemon on;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000; client_body_temp_path $D/ng/tmp;
  proxy_temp_path $D/ng/tmp; fastcgi_temp_path $D/ng/tmp; uwsgi_temp_path $D/ng/tmp;
  scgi_temp_path $D/ng/tmp;
  server { listen 127.0.0.1:$UP;
    location = /nginx_status { stub_status; }
    location = /api/v1/instance { default_type application/json;
      add_header Cache-Control "public, max-age=300, stale-while-revalidate=30" always;
      return 200 '$BODY'; }
    location / { default_type application/json; return 200 '$BODY'; } } }
NG
nginx -c "$D/ng/nginx.conf" -p "$D/ng"
cat >"$D/fe.toml" <<FE
listen = "127.0.0.1:$FE"
admin_listen = "127.0.0.1:$AD"
url_prefix = "/system/"
data_dir = "$D/var"
${EXTRA_TOP:-}
[cache]
dir = "$D/cache"
max_size = "1GiB"
memory_max_size = "16MiB"
[primary]
type = "fs"
root = "$D/media"
[core]
hosts = ["127.0.0.1"]
web = ["127.0.0.1:$UP"]
health_check_interval = "0s"
${EXTRA_CORE:-}
FE
URL=http://127.0.0.1:$FE${URL_PATH:-/api/v1/timelines/public}
up() {
    for _ in $(seq 300); do
        curl -sf -o /dev/null "$URL" && return 0
        sleep 0.2
    done
    echo "fediedge did not answer; its log:" >&2
    cat "$D/fe.log" >&2
    exit 1
}
accepted() { curl -s "http://127.0.0.1:$UP/nginx_status" | awk 'NR==3{print $1}'; }

case $MODE in
cpu)
    SECS=${3:-2}; CONNS=${4:-64}
    "$BIN" serve --config "$D/fe.toml" >"$D/fe.log" 2>&1 &
    PID=$!
    up
    wrk -t2 -c"$CONNS" -d1s ${CURL_HEADER:+-H "$CURL_HEADER"} "$URL" >/dev/null # warm-up
    TCK=$(getconf CLK_TCK)
    for r in 1 2 3; do
        A0=$(accepted)
        T0=$(awk '{print $14+$15}' "/proc/$PID/stat")
        OUT=$(wrk -t2 -c"$CONNS" -d"${SECS}s" --latency ${CURL_HEADER:+-H "$CURL_HEADER"} "$URL")
        T1=$(awk '{print $14+$15}' "/proc/$PID/stat")
        A1=$(accepted)
        N=$(echo "$OUT" | awk '/requests in/{print $1}')
        RPS=$(echo "$OUT" | awk '/Requests\/sec/{print $2}')
        P99=$(echo "$OUT" | awk '$1=="99%"{print $2}')
        NON2=$(echo "$OUT" | awk '/Non-2xx/{print $NF}')
        # A1 - A0 counts the second status request's own connection.
        echo "round $r: requests=$N cpu_us_per_req=$(echo "scale=2; ($T1-$T0)*1000000/$TCK/$N" | bc)" \
            "req/s=$RPS p99=$P99 non2xx=${NON2:-0} upstream_connections_opened=$((A1 - A0 - 1))"
    done
    ;;
callgrind)
    N=${3:-500}
    valgrind --tool=callgrind --callgrind-out-file="$D/cg.out" \
        "$BIN" serve --config "$D/fe.toml" >"$D/fe.log" 2>&1 &
    PID=$!
    up
    ARGS=()
    for _ in $(seq "$N"); do ARGS+=(-o /dev/null "$URL"); done
    curl -s ${CURL_HEADER:+-H "$CURL_HEADER"} "${ARGS[@]:0:150}" # warm-up: 50 requests
    callgrind_control -z "$PID" >/dev/null
    CODES=$(curl -s ${CURL_HEADER:+-H "$CURL_HEADER"} -w "%{http_code}\n" "${ARGS[@]}" | sort | uniq -c)
    callgrind_control -d "$PID" >/dev/null
    for _ in $(seq 50); do compgen -G "$D/cg.out.*" >/dev/null && break; sleep 0.2; done
    sleep 0.5
    IR=$(grep -h "^summary:" "$D"/cg.out.* | awk '{s+=$2} END{print s}')
    # CG_OUT=FILE keeps the dump (for callgrind_annotate, scripts/callgrind-self.py).
    [ -n "${CG_OUT:-}" ] && cat "$D"/cg.out.* >"$CG_OUT"
    # CG_TOP=N: the N functions with the most instructions of their own, per request.
    [ -n "${CG_TOP:-}" ] && python3 "$(dirname "$0")/callgrind-self.py" "$D"/cg.out.* "$N" "$CG_TOP"
    echo "statuses: $CODES"
    echo "instructions=$IR requests=$N per_request=$((IR / N))"
    ;;
*)
    echo "mode: cpu or callgrind" >&2
    exit 2
    ;;
esac
