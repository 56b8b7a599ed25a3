#!/usr/bin/env bash
# What a reverse tunnel costs: one pod reached directly and the same pod reached through
# pinacle-agent, on one machine (release builds, nginx serving the pod, wrk and curl as clients).
#   latency: wrk, one connection, 1 KiB GET, 10 s each: the mean and p99 per request
#   throughput: one download of 1 GiB (nginx sendfile) through each, MB/s
#
#   benches/load/tunnel.sh            (builds target/release/{pinacle-ingress,pinacle-agent})
#
# Installs wrk, nginx and curl when missing; stops what it started by PID.
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/lib.sh
missing=()
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx-light)
command -v curl >/dev/null 2>&1 || missing+=(curl)
[ "${#missing[@]}" -eq 0 ] || apt_install "${missing[@]}"
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
cargo build --release --locked -p pinacle-ingress -p pinacle-agent --bins >&2
BIN=target/release/pinacle-ingress
AGENT=target/release/pinacle-agent

W=$(mktemp -d /tmp/pinacle-tunnel-XXXXXX)
chmod 755 "$W"
mkdir -p "$W/www"
head -c 1024 /dev/urandom > "$W/www/1k.bin"
head -c $((1024 * 1024 * 1024)) /dev/zero > "$W/www/1g.bin"
chmod -R a+rX "$W/www"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
ORIGIN=$(free_port); LISTEN=$(free_port); AGENTS=$(free_port)
cat > "$W/origin.conf" <<NG
worker_processes 1; daemon off; pid $W/origin.pid; error_log $W/origin-error.log;
events { worker_connections 1024; }
http { access_log off; sendfile on; keepalive_requests 1000000; client_body_temp_path $W/b;
  proxy_temp_path $W/p; fastcgi_temp_path $W/f; uwsgi_temp_path $W/u; scgi_temp_path $W/s;
  server { listen 127.0.0.1:$ORIGIN; root $W/www; location / { } } }
NG
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$W"
}
trap cleanup EXIT
"$NGINX" -c "$W/origin.conf" -p "$W" & PIDS+=($!)
SECRET=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
HASH=$(printf %s "$SECRET" | sha256sum | cut -c1-64)
# Two servers, one pod each on the same nginx: `direct` dialed, `tunnel` behind an agent
# (its registered address, TEST-NET-1, is never dialed).
cat > "$W/directory.toml" <<T
[[users]]
id = "user_bench"
[[teams]]
id = "team_bench"
[[servers]]
id = "server_direct"
ip_address = "127.0.0.1"
[[servers]]
id = "server_nat"
ip_address = "192.0.2.10"
[[agents]]
server_id = "server_nat"
secret_sha256 = "$HASH"
[[pods]]
id = "pod_direct"
slug = "direct"
owner_id = "user_bench"
team_id = "team_bench"
server_id = "server_direct"
status = "running"
ports = [{ name = "nginx-proxy", internal = 80, external = $ORIGIN, protocol = "tcp" }]
[[pods]]
id = "pod_tunnel"
slug = "tunnel"
owner_id = "user_bench"
team_id = "team_bench"
server_id = "server_nat"
status = "running"
ports = [{ name = "nginx-proxy", internal = 80, external = $ORIGIN, protocol = "tcp" }]
T
export NEXTAUTH_SECRET=tunnel-bench-secret NEXTAUTH_URL=http://pinacle.bench
# `session mint` prints the whole `name=value` pair.
COOKIE="$(env -u DATABASE_URL "$BIN" session mint --user user_bench)"
env -u DATABASE_URL PINACLE_INGRESS_LISTEN="127.0.0.1:$LISTEN" PINACLE_INGRESS_ADMIN_LISTEN=off \
  PINACLE_INGRESS_AGENT_LISTEN="127.0.0.1:$AGENTS" PINACLE_INGRESS_THREADS=1 \
  PINACLE_INGRESS_UPGRADE_SOCK="$W/upgrade.sock" RUST_LOG=warn \
  PINACLE_INGRESS_DIRECTORY_FILE="$W/directory.toml" PINACLE_INGRESS_BASE_DOMAINS=pinacle.bench \
  PINACLE_INGRESS_DASHBOARD_UPSTREAM="127.0.0.1:$ORIGIN" PINACLE_INGRESS_UPSTREAM_READ_TIMEOUT=120s \
  "$BIN" serve > "$W/ingress.log" 2>&1 & PIDS+=($!)
PINACLE_AGENT_SECRET=$SECRET RUST_LOG=warn "$AGENT" --gateway "127.0.0.1:$AGENTS" \
  --server server_nat --insecure-plaintext --allow-ports "$ORIGIN" > "$W/agent.log" 2>&1 & PIDS+=($!)
for slug in direct tunnel; do
  for _ in $(seq 1 100); do
    code=$(curl -s -o /dev/null -w '%{http_code}' -H "Host: localhost-3000-pod-$slug.pinacle.bench" \
      -H "Cookie: $COOKIE" "http://127.0.0.1:$LISTEN/1k.bin" || true)
    [ "$code" = 200 ] && break
    sleep 0.1
  done
  [ "$code" = 200 ] || { echo "$slug: $code"; cat "$W/ingress.log" "$W/agent.log"; exit 1; }
done
echo "| route | 1 KiB GET, one connection: mean / p99 latency, req/s | 1 GiB download |"
echo "|---|---|---|"
for slug in direct tunnel; do
  H="localhost-3000-pod-$slug.pinacle.bench"
  out=$(wrk -t1 -c1 -d10s --latency -H "Host: $H" -H "Cookie: $COOKIE" "http://127.0.0.1:$LISTEN/1k.bin")
  mean=$(awk '/Latency/ {print $2; exit}' <<< "$out")
  p99=$(awk '$1 == "99%" {print $2}' <<< "$out")
  rps=$(awk '/Requests\/sec/ {print $2}' <<< "$out")
  speed=$(curl -s -o /dev/null -w '%{speed_download}' -H "Host: $H" -H "Cookie: $COOKIE" \
    "http://127.0.0.1:$LISTEN/1g.bin")
  echo "| $slug | $mean / $p99, $rps | $(awk -v s="$speed" 'BEGIN {printf "%.0f MB/s", s / 1e6}') |"
done
