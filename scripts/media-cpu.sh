#!/usr/bin/env bash
# Instructions (or system calls) one server spends per 4 KiB media request, fediedge against
# nginx serving the same file statically over the same TLS, measured so that a busy machine does
# not drown it: one `curl` sends N sequential keep-alive requests on one connection while the
# server runs under callgrind (user-space instructions, deterministic to about ±1 %) or strace.
#
#   scripts/media-cpu.sh fediedge|nginx [BIN] [N]     # BIN: fediedge binary (target/release/fediedge)
#
# knobs: PROTO=--http1.1 (default) | --http2     PLAIN=1: fediedge's plain listener, no TLS
#        STRACE=1: system calls per request instead of instructions   TOP=30: functions listed
#        CG_KEEP=FILE: keep the callgrind dump (e.g. for callers of a function)
# fediedge answers from its cache's memory tier (the file is warmed first), nginx with
# `sendfile` and `open_file_cache`, both with one ECDSA P-256 certificate (openssl) and TLS 1.3.
# The handshake of the measured connection is included (amortised over N; use N ≥ 1000).
# Figures: docs/benchmarks.md ("Front door vs nginx", "Per request, one connection").
set -euo pipefail
WHO=${1:?usage: media-cpu.sh fediedge|nginx [BIN] [N]}
BIN=$(realpath "${2:-target/release/fediedge}")
N=${3:-1000}
PROTO=${PROTO:---http1.1}
D=$(mktemp -d /tmp/media-cpu.XXXXXX)
mkdir -p "$D/media/x" "$D/var" "$D/cache" "$D/ng/logs" "$D/ng/tmp"
head -c 4096 /dev/urandom >"$D/media/x/a.bin"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$D/key.pem" \
    -out "$D/cert.pem" -days 2 -subj /CN=localhost \
    -addext subjectAltName=DNS:localhost,IP:127.0.0.1 2>/dev/null
WRAP=(valgrind --tool=callgrind --callgrind-out-file="$D/cg.out")
[ -n "${STRACE:-}" ] && WRAP=()
P=$((20000 + RANDOM % 10000))
PID=""
cleanup() {
    [ -n "$PID" ] && kill "$PID" 2>/dev/null
    wait 2>/dev/null
    rm -rf "$D"
}
trap cleanup EXIT
USER_LINE=""
[ "$(id -u)" -eq 0 ] && USER_LINE="user root root;"
URL=https://127.0.0.1:$P/system/x/a.bin
if [ "$WHO" = fediedge ]; then
    cat >"$D/fe.toml" <<FE
listen = "127.0.0.1:$((P + 1))"
admin_listen = "127.0.0.1:$((P + 2))"
url_prefix = "/system/"
data_dir = "$D/var"
[cache]
dir = "$D/cache"
max_size = "1GiB"
memory_max_size = "16MiB"
[primary]
type = "fs"
root = "$D/media"
[tls]
listen = "127.0.0.1:$P"
certificates = [ { cert = "$D/cert.pem", key = "$D/key.pem" } ]
FE
    "${WRAP[@]}" "$BIN" serve --config "$D/fe.toml" >"$D/log" 2>&1 &
    PID=$!
    [ -n "${PLAIN:-}" ] && URL=http://127.0.0.1:$((P + 1))/system/x/a.bin
else
    cat >"$D/ng/nginx.conf" <<NG
$USER_LINE
worker_processes 1; master_process off; daemon off; pid $D/ng/nginx.pid;
error_log $D/ng/logs/error.log warn;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000; client_body_temp_path $D/ng/tmp;
  proxy_temp_path $D/ng/tmp; fastcgi_temp_path $D/ng/tmp; uwsgi_temp_path $D/ng/tmp;
  scgi_temp_path $D/ng/tmp; sendfile on; open_file_cache max=1000;
  ssl_session_cache shared:SSL:10m;
  server { listen 127.0.0.1:$P ssl http2; ssl_certificate $D/cert.pem;
    ssl_certificate_key $D/key.pem; ssl_protocols TLSv1.2 TLSv1.3;
    location /system/ { alias $D/media/; } } }
NG
    "${WRAP[@]}" nginx -c "$D/ng/nginx.conf" -p "$D/ng" >"$D/log" 2>&1 &
    PID=$!
fi
for _ in $(seq 300); do
    curl -skf "$PROTO" -o /dev/null "$URL" && break
    sleep 0.2
done
ARGS=()
for _ in $(seq "$N"); do ARGS+=(-o /dev/null "$URL"); done
curl -sk "$PROTO" "${ARGS[@]:0:150}" || { cat "$D/log"; exit 1; } # warm-up: 50 requests
if [ -n "${STRACE:-}" ]; then
    strace -c -f -p "$PID" -o "$D/st" 2>/dev/null &
    SP=$!
    sleep 1
else
    callgrind_control -z "$PID" >/dev/null
fi
CODES=$(curl -sk "$PROTO" -w "%{http_code}\n" "${ARGS[@]}" | sort | uniq -c)
echo "$WHO $PROTO${PLAIN:+ plain} statuses: $CODES"
if [ -n "${STRACE:-}" ]; then
    kill -INT "$SP"
    wait "$SP" || true
    echo "system calls per request ($N requests):"
    awk -v n="$N" '$4 ~ /^[0-9]+$/ {printf "%8.2f %s\n", $4/n, $NF}' "$D/st" | sort -rn | head -12
    exit 0
fi
callgrind_control -d "$PID" >/dev/null
for _ in $(seq 50); do compgen -G "$D/cg.out.*" >/dev/null && break; sleep 0.2; done
sleep 0.5
[ -n "${CG_KEEP:-}" ] && cp "$D"/cg.out.* "$CG_KEEP"
python3 "$(dirname "$0")/callgrind-self.py" "$D"/cg.out.* "$N" "${TOP:-30}"
