#!/usr/bin/env bash
# Instructions per request of an ingress binary, counted by callgrind: deterministic where the
# load comparison's rates move 10-40 % with this VM's neighbours, so a small change can be told
# apart from noise. The ingress (one thread, file directory, access log off) serves N1 then N2
# requests from one client on one keep-alive connection, each run under callgrind from start to
# stop; (I2 - I1) / (N2 - N1) cancels start-up, the warm-up request and shutdown.
#
#   benches/load/instructions.sh [binary] [pod|dashboard|post]
#     pod        1 KiB GET with a session cookie on the pod route (the plain engine)
#     dashboard  the same GET on the dashboard route (no credentials)
#     post       a POST with a 1 KiB body on the pod route (Pingora's loop)
#   PINACLE_INGRESS_PLAIN_PATH=false ... measures with every request on Pingora's loop.
#
# Installs valgrind, nginx and curl when missing; stops what it started by PID.
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/lib.sh
BIN=${1:-target/release/pinacle-ingress}
ROUTE=${2:-pod}
N1=${N1:-200}
N2=${N2:-1200}
missing=()
command -v valgrind >/dev/null 2>&1 || missing+=(valgrind)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx-light)
command -v curl >/dev/null 2>&1 || missing+=(curl)
[ "${#missing[@]}" -eq 0 ] || apt_install "${missing[@]}"
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
[ -x "$BIN" ] || cargo build --release --locked -p pinacle-ingress --bin pinacle-ingress

W=$(mktemp -d /tmp/pinacle-instructions-XXXXXX)
chmod 755 "$W"
mkdir -p "$W/www"
head -c 1024 /dev/urandom > "$W/www/1k.bin"
chmod -R a+rX "$W/www"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
ORIGIN=$(free_port)
cat > "$W/origin.conf" <<NG
worker_processes 1; daemon off; pid $W/origin.pid; error_log $W/origin-error.log;
events { worker_connections 1024; }
http { access_log off; keepalive_requests 1000000; client_body_temp_path $W/b;
  proxy_temp_path $W/p; fastcgi_temp_path $W/f; uwsgi_temp_path $W/u; scgi_temp_path $W/s;
  server { listen 127.0.0.1:$ORIGIN; root $W/www; location / { }
    location = /post { client_body_buffer_size 64k; return 200 "ok"; } } }
NG
"$NGINX" -c "$W/origin.conf" -p "$W" &
NGINX_PID=$!
INGRESS_PID=
cleanup() {
  [ -n "$INGRESS_PID" ] && kill "$INGRESS_PID" 2>/dev/null || true
  kill "$NGINX_PID" 2>/dev/null || true
  wait 2>/dev/null || true
  [ -n "${KEEP_CALLGRIND:-}" ] && cp "$W"/callgrind.* "$KEEP_CALLGRIND"/ 2>/dev/null; rm -rf "$W"
}
trap cleanup EXIT
cat > "$W/directory.toml" <<T
[[users]]
id = "user_bench"
email = "bench@example.test"
[[teams]]
id = "team_bench"
[[servers]]
id = "server_local"
ip_address = "127.0.0.1"
[[pods]]
id = "pod_bench"
slug = "bench"
owner_id = "user_bench"
team_id = "team_bench"
server_id = "server_local"
status = "running"
ports = [{ name = "nginx-proxy", internal = 80, external = $ORIGIN, protocol = "tcp" }]
T
export NEXTAUTH_SECRET=instructions-secret NEXTAUTH_URL=http://pinacle.bench
# `session mint` prints the whole `name=value` pair.
COOKIE="$(env -u DATABASE_URL "$BIN" session mint --user user_bench)"
HOST=localhost-3000-pod-bench.pinacle.bench
PATH_=/1k.bin
DATA=()
case "$ROUTE" in
  pod) ;;
  dashboard) HOST=pinacle.bench ;;
  post) PATH_=/post; DATA=(--data-binary "@$W/www/1k.bin") ;;
  *) echo "route: pod, dashboard or post" >&2; exit 2 ;;
esac

# Instructions of one run serving $1 requests.
run() {
  local n=$1 port
  port=$(free_port)
  env -u DATABASE_URL PINACLE_INGRESS_LISTEN="127.0.0.1:$port" PINACLE_INGRESS_ADMIN_LISTEN=off \
    PINACLE_INGRESS_THREADS=1 PINACLE_INGRESS_UPGRADE_SOCK="$W/upgrade-$port.sock" \
    PINACLE_INGRESS_SHUTDOWN_GRACE_PERIOD=1s RUST_LOG=warn \
    PINACLE_INGRESS_DIRECTORY_FILE="$W/directory.toml" PINACLE_INGRESS_BASE_DOMAINS=pinacle.bench \
    PINACLE_INGRESS_DASHBOARD_UPSTREAM="127.0.0.1:$ORIGIN" \
    valgrind --tool=callgrind --callgrind-out-file="$W/callgrind.$n" "$BIN" serve \
    > "$W/ingress-$n.log" 2>&1 &
  INGRESS_PID=$!
  for _ in $(seq 1 600); do
    curl -s -o /dev/null "http://127.0.0.1:$port/" && break
    sleep 0.1
  done
  # What is counted must be the request meant: a 401 would be measured just as well.
  local code
  code=$(curl -s -o /dev/null -w '%{http_code}' -H "Host: $HOST" -H "Cookie: $COOKIE" "${DATA[@]}" \
    "http://127.0.0.1:$port$PATH_")
  if [ "$code" != 200 ]; then
    echo "the measured request answers $code, not 200" >&2
    kill -INT "$INGRESS_PID"; wait "$INGRESS_PID" || true; INGRESS_PID=
    exit 1
  fi
  local urls=()
  for _ in $(seq 1 "$n"); do urls+=(-o /dev/null "http://127.0.0.1:$port$PATH_"); done
  curl -s -H "Host: $HOST" -H "Cookie: $COOKIE" "${DATA[@]}" "${urls[@]}"
  kill -INT "$INGRESS_PID"
  wait "$INGRESS_PID" || true
  INGRESS_PID=
  awk '/^(summary|totals):/ {print $2}' "$W/callgrind.$n" | tail -1
}
I1=$(run "$N1")
I2=$(run "$N2")
echo "$(basename "$BIN") $ROUTE${PINACLE_INGRESS_PLAIN_PATH:+ (plain_path=$PINACLE_INGRESS_PLAIN_PATH)}: $(( (I2 - I1) / (N2 - N1) )) instructions per request"
