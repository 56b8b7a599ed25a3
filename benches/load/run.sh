#!/usr/bin/env bash
# Load comparison on 127.0.0.1: the origin directly (the floor), nginx (the anchor), HAProxy, a
# stand-in for today's Node.js ingress, and pinacle-ingress with authentication on, one core for
# the proxy under test and one for the load generator and the upstreams. Writes
# benches/RESULTS.md.
#
#   benches/load/run.sh                 # ~12 minutes (3 interleaved rounds of 4 s per row)
#   ROUNDS=1 DURATION=5 IDLE_WS=500 benches/load/run.sh
#   BASELINE_INGRESS=/path/to/older/pinacle-ingress benches/load/run.sh   # before/after in one run
#
# Installs what it needs (wrk, nginx, haproxy, python3, Node.js) with apt-get when missing,
# builds the release binaries, and stops every process it started (by PID) when it ends. Every
# load loop is bounded in time. DATABASE_URL (or the local Postgres scripts/test finds) is used for the
# first-request (cache miss) measurement.
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/lib.sh

missing=()
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || missing+=(haproxy)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx-light)
command -v python3 >/dev/null 2>&1 || missing+=(python3)
command -v psql >/dev/null 2>&1 || missing+=(postgresql-client)
command -v cmake >/dev/null 2>&1 || missing+=(cmake)
# The old-ingress stand-in (benches/load/old-ingress) runs on Node.js; the row is skipped without.
command -v npm >/dev/null 2>&1 || missing+=(nodejs npm)
if [ "${#missing[@]}" -gt 0 ]; then
  echo "== installing ${missing[*]}" >&2
  apt_install "${missing[@]}"
fi
export DATABASE_URL="${DATABASE_URL:-$(find_or_start_postgres)}"

echo "== building release binaries" >&2
# One invocation: both binaries with the same feature set (no second build of Pingora).
cargo build --release --locked -p pinacle-ingress -p pinacle-benches --bins

ulimit -n "$(ulimit -Hn)"
exec python3 benches/load/run.py "$@"
