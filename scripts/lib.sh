# Helpers shared by scripts/: installing system packages and finding or starting Postgres.
# Sourced, not run.

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

apt_updated=0
apt_install() {
  if [ "$apt_updated" = 0 ]; then
    as_root apt-get update -qq
    apt_updated=1
  fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# cmake (Pingora's build), nginx (the pod's second hop, tested for real), Chromium, Node.js and
# python3 (the browser tests and the demo's stand-in sign-in).
ensure_packages() {
  local missing=()
  command -v cmake >/dev/null 2>&1 || missing+=(cmake)
  command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx-light)
  command -v psql >/dev/null 2>&1 || missing+=(postgresql-client)
  command -v chromium >/dev/null 2>&1 || missing+=(chromium)
  command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
  command -v npm >/dev/null 2>&1 || missing+=(nodejs npm)
  command -v python3 >/dev/null 2>&1 || missing+=(python3)
  if [ "${#missing[@]}" -gt 0 ]; then
    echo "== installing ${missing[*]}" >&2
    apt_install "${missing[@]}"
  fi
}

pg_works() {
  psql "$1" -qtAc 'select 1' >/dev/null 2>&1
}

# Prints a DATABASE_URL for a running Postgres, starting or installing one when needed.
find_or_start_postgres() {
  local tcp="postgres://postgres@127.0.0.1:5432/postgres"
  if pg_works "$tcp"; then echo "$tcp"; return; fi
  if ! ls /etc/postgresql/*/main >/dev/null 2>&1; then
    echo "== installing postgresql" >&2
    apt_install postgresql
  fi
  local version
  version=$(ls /etc/postgresql | sort -V | tail -n 1)
  if ! pg_works "$tcp"; then
    echo "== starting postgresql $version" >&2
    as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start >&2 || true
    for _ in $(seq 1 30); do
      pg_isready -q -h 127.0.0.1 -p 5432 && break
      sleep 1
    done
  fi
  if pg_works "$tcp"; then echo "$tcp"; return; fi
  # A fresh Debian cluster asks for passwords over TCP: use the socket with a role for this user.
  local me socket
  me=$(id -un)
  socket="postgres:///postgres?host=/var/run/postgresql&user=$me"
  if ! pg_works "$socket"; then
    as_root su postgres -c "psql -qc \"CREATE ROLE \\\"$me\\\" SUPERUSER LOGIN\"" >&2 || true
  fi
  if pg_works "$socket"; then echo "$socket"; return; fi
  echo "cannot reach or start PostgreSQL; set DATABASE_URL" >&2
  return 1
}

# playwright-core (drives Debian's Chromium; never downloads a browser) and the dev servers the
# browser tests run (Vite, Next.js), pinned by the lockfile.
ensure_browser_driver() {
  if [ ! -d testkit/browser/node_modules/playwright-core ] || [ ! -d testkit/browser/node_modules/vite ] \
     || [ ! -d testkit/browser/node_modules/next ]; then
    echo "== installing playwright-core, Vite and Next.js for the browser tests" >&2
    npm ci --prefix testkit/browser --no-audit --no-fund >&2
  fi
}
