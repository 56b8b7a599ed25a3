#!/usr/bin/env python3
"""The load comparison behind benches/RESULTS.md (run it through benches/load/run.sh).

On 127.0.0.1: an origin (nginx serving 1 KiB and 100 KiB files) and a WebSocket echo server on
the load core, with wrk and the WebSocket client; the proxy under test alone on the proxy core.
Measured per proxy: requests/s and p50/p99 for both bodies at fixed concurrency, CPU time per
request, WebSocket echo messages/s and p99 over 50 connections, resident memory after the runs
and per idle WebSocket (IDLE_WS held open). For the ingress also the first request of a user
(authorization cache miss against Postgres) against a repeated one.

Every process started here is stopped by its PID at exit; every loop is bounded in time.
"""

import atexit
import datetime
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import http.client

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
INGRESS = os.path.join(ROOT, "target", "release", "pinacle-ingress")
WSLOAD = os.path.join(ROOT, "target", "release", "pinacle-wsload")
FLOOR = os.path.join(ROOT, "target", "release", "pingora-floor")
TOKIO_FLOOR = os.path.join(ROOT, "target", "release", "tokio-floor")
OLD_INGRESS = os.path.join(ROOT, "benches", "load", "old-ingress")
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"

DURATION = int(os.environ.get("DURATION", "4"))
ROUNDS = int(os.environ.get("ROUNDS", "3"))
CONNECTIONS = int(os.environ.get("CONNECTIONS", "50"))
WS_CONNECTIONS = int(os.environ.get("WS_CONNECTIONS", "50"))
IDLE_WS = int(os.environ.get("IDLE_WS", "2000"))
MISS_USERS = int(os.environ.get("MISS_USERS", "200"))
# Another pinacle-ingress binary (e.g. the last release) measured in the same rounds as this one:
# the row "ingress-baseline", for before/after comparisons within one run.
BASELINE = os.environ.get("BASELINE_INGRESS")
SECRET = "load-test-secret-not-for-production"
POD_HOST = "localhost-3000-pod-bench.pinacle.bench"
WS_HOST = "localhost-7681-pod-benchws.pinacle.bench"
PROXY_CPU = "0"
LOAD_CPU = "1" if (os.cpu_count() or 1) >= 2 else "0"

WORK = tempfile.mkdtemp(prefix="pinacle-load-")
# The rows that also get a POST with a 1 KiB body (Pingora's path in the ingress).
POST_ROWS = ("nginx", "pingora-floor", "ingress-dashboard", "pinacle-ingress", "ingress-baseline")
# Rows of the HTTP table, in order (a row absent from a run is skipped).
HTTP_ROWS = ("direct", "nginx", "haproxy", "pingora-floor", "tokio-floor", "ingress-dashboard",
             "pingora-only-dashboard", "baseline-dashboard", "pinacle-ingress", "pingora-only",
             "ingress-baseline", "old-ingress")
# nginx workers started by root run as nobody: they must be able to read the files.
os.chmod(WORK, 0o755)
PROCS = []


def log(msg):
    print(f"== {msg}", file=sys.stderr, flush=True)


def stop_all():
    if os.environ.get("KEEP_WORK"):
        log(f"keeping {WORK}")
    for proc in reversed(PROCS):
        if proc.poll() is None:
            proc.terminate()
    deadline = time.time() + 10
    for proc in PROCS:
        try:
            proc.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            proc.kill()
    if not os.environ.get("KEEP_WORK"):
        shutil.rmtree(WORK, ignore_errors=True)


atexit.register(stop_all)


def start(name, cmd, cpu, env=None):
    out = open(os.path.join(WORK, f"{name}.log"), "w")
    full_env = dict(os.environ)
    full_env.update(env or {})
    proc = subprocess.Popen(["taskset", "-c", cpu] + cmd, stdout=out, stderr=subprocess.STDOUT,
                            env=full_env, cwd=WORK)
    PROCS.append(proc)
    return proc


def stop(proc):
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=15):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port} after {timeout}s")


def tree(pid):
    """The pid and its direct children (nginx's master and workers)."""
    pids = [pid]
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                if int(fields[1]) == pid:
                    pids.append(int(entry))
            except OSError:
                pass
    return pids


def cpu_seconds(pids):
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except OSError:
            pass
    return total / ticks


def rss_kib(pids):
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


def to_ms(value):
    number, unit = re.match(r"([\d.]+)(us|ms|s)", value).groups()
    return float(number) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


# wrk's script for the POST row: a 1 KiB body on every request.
POST_SCRIPT = 'wrk.method = "POST"\nwrk.body = string.rep("x", 1024)\n' \
    'wrk.headers["Content-Type"] = "application/octet-stream"\n'


def wrk(port, host, cookie, path, pids, post=False):
    cmd = ["taskset", "-c", LOAD_CPU, "wrk", "-t1", f"-c{CONNECTIONS}", f"-d{DURATION}s",
           "--latency", "--timeout", "10s", "-H", f"Host: {host}"]
    if cookie:
        cmd += ["-H", f"Cookie: {cookie}"]
    if post:
        script = os.path.join(WORK, "post.lua")
        if not os.path.exists(script):
            write(script, POST_SCRIPT)
        cmd += ["-s", script]
    cmd.append(f"http://127.0.0.1:{port}{path}")
    before = cpu_seconds(pids)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=DURATION + 60).stdout
    used = cpu_seconds(pids) - before
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: (.*)", out)
    return {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "p50_ms": to_ms(re.search(r"\s50%\s+(\S+)", out).group(1)),
        "p99_ms": to_ms(re.search(r"\s99%\s+(\S+)", out).group(1)),
        "cpu_us_per_request": used * 1e6 / requests if requests else None,
        "requests": requests,
        "errors": (int(errors.group(1)) if errors else 0),
        "socket_errors": socket_errors.group(1) if socket_errors else "",
    }


def median_round(rounds, key):
    """Every figure of the rounds that worked, each the median of its own values (a latency
    spike in one round does not ride along with that round's throughput; counts are summed),
    and every round's `key` kept beside them. An error when every round failed."""
    ok = [r for r in rounds if key in r]
    if not ok:
        return rounds[-1]
    merged = dict(ok[0])
    for name, value in ok[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            values = [r[name] for r in ok if isinstance(r.get(name), (int, float))]
            # Counts add up (an error in any round shows); rates and times take the median.
            summed = name in ("errors", "requests", "messages")
            merged[name] = sum(values) if summed else statistics.median(values)
    merged["rounds"] = [r.get(key) for r in rounds]
    merged["p99_rounds"] = [r.get("p99_ms", r.get("p99_us")) for r in rounds]
    return merged


def ws_echo(port, host, cookie, pids):
    """Echo messages/s and round-trip percentiles; with `pids`, the proxy's CPU per message
    (steadier than messages/s on a shared VM, where both move between runs)."""
    before = cpu_seconds(pids)
    out = subprocess.run(
        ["taskset", "-c", LOAD_CPU, WSLOAD, "echo", f"ws://127.0.0.1:{port}/ws", host, cookie,
         str(WS_CONNECTIONS), str(DURATION)],
        capture_output=True, text=True, timeout=DURATION + 60)
    used = cpu_seconds(pids) - before
    if out.returncode != 0:
        return {"error": out.stderr.strip()[-300:]}
    result = json.loads(out.stdout.strip().splitlines()[-1])
    messages = result.get("messages") or 0
    result["cpu_us_per_message"] = used * 1e6 / messages if pids and messages else None
    return result


def idle_ws(port, host, cookie, pids):
    before = rss_kib(pids)
    hold_seconds = 120
    proc = subprocess.Popen(
        ["taskset", "-c", LOAD_CPU, WSLOAD, "hold", f"ws://127.0.0.1:{port}/ws", host, cookie,
         str(IDLE_WS), str(hold_seconds)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    PROCS.append(proc)
    line = proc.stdout.readline().strip()
    if not line.startswith("ready"):
        proc.kill()
        return {"error": (line or proc.stderr.read())[-300:]}
    time.sleep(1)
    during = rss_kib(pids)
    proc.terminate()
    proc.wait(timeout=10)
    return {"rss_before_kib": before, "rss_held_kib": during,
            "per_connection_kib": (during - before) / IDLE_WS}


def idle_http(port, host, cookie, pids):
    """Memory per idle keep-alive connection: IDLE_WS connections, one small request each."""
    before = rss_kib(pids)
    request = f"GET /1k.bin HTTP/1.1\r\nHost: {host}\r\n"
    if cookie:
        request += f"Cookie: {cookie}\r\n"
    request = (request + "\r\n").encode()
    sockets = []
    try:
        for _ in range(IDLE_WS):
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.sendall(request)
            received = b""
            deadline = time.time() + 10
            while len(received) < 1024 and time.time() < deadline:
                chunk = s.recv(65536)
                if not chunk:
                    break
                received += chunk
            sockets.append(s)
        time.sleep(1)
        return {"per_connection_kib": (rss_kib(pids) - before) / IDLE_WS}
    finally:
        for s in sockets:
            s.close()


def write(path, text):
    with open(path, "w") as f:
        f.write(text)
    return path


def origin_and_upstreams():
    www = os.path.join(WORK, "www")
    os.makedirs(www)
    for name, size in (("1k.bin", 1024), ("100k.bin", 100 * 1024)):
        with open(os.path.join(www, name), "wb") as f:
            f.write(os.urandom(size))
        os.chmod(os.path.join(www, name), 0o644)
    port = free_port()
    conf = write(os.path.join(WORK, "origin.conf"), f"""
worker_processes 1; daemon off; pid {WORK}/origin.pid; error_log {WORK}/origin-error.log;
events {{ worker_connections 8192; }}
http {{ access_log off; keepalive_requests 1000000; keepalive_timeout 120s;
  client_body_temp_path {WORK}/ob; proxy_temp_path {WORK}/op; fastcgi_temp_path {WORK}/of;
  uwsgi_temp_path {WORK}/ou; scgi_temp_path {WORK}/os;
  server {{ listen 127.0.0.1:{port}; root {www}; location / {{ }}
    location = /post {{ client_body_buffer_size 64k; return 200 "ok"; }} }} }}
""")
    start("origin", [NGINX, "-c", conf, "-p", WORK], LOAD_CPU)
    wait_port(port)
    ws_port = free_port()
    start("ws-echo", [WSLOAD, "serve", f"127.0.0.1:{ws_port}"], LOAD_CPU)
    wait_port(ws_port)
    return port, ws_port


def nginx_proxy(origin, ws):
    port = free_port()
    conf = write(os.path.join(WORK, "proxy-nginx.conf"), f"""
worker_processes 1; daemon off; pid {WORK}/proxy-nginx.pid; error_log {WORK}/proxy-error.log;
worker_rlimit_nofile 16384;
events {{ worker_connections 8192; }}
http {{ access_log off;
  client_body_temp_path {WORK}/pb; proxy_temp_path {WORK}/pp; fastcgi_temp_path {WORK}/pf;
  uwsgi_temp_path {WORK}/pu; scgi_temp_path {WORK}/ps;
  map $http_upgrade $connection_upgrade {{ default upgrade; '' ''; }}
  upstream origin {{ server 127.0.0.1:{origin}; keepalive 64; }}
  upstream ws {{ server 127.0.0.1:{ws}; }}
  server {{ listen 127.0.0.1:{port} backlog=4096; server_name {POD_HOST};
    location / {{ proxy_pass http://origin; proxy_http_version 1.1;
      proxy_set_header Connection ""; proxy_set_header Host $host;
      proxy_set_header X-Forwarded-For $remote_addr; }} }}
  server {{ listen 127.0.0.1:{port}; server_name {WS_HOST};
    location / {{ proxy_pass http://ws; proxy_http_version 1.1;
      proxy_set_header Upgrade $http_upgrade; proxy_set_header Connection $connection_upgrade;
      proxy_read_timeout 1h; }} }} }}
""")
    proc = start("proxy-nginx", [NGINX, "-c", conf, "-p", WORK], PROXY_CPU)
    wait_port(port)
    return port, proc


def haproxy(origin, ws):
    port = free_port()
    conf = write(os.path.join(WORK, "haproxy.cfg"), f"""
global
  nbthread 1
  maxconn 8000
defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  timeout tunnel 1h
frontend fe
  bind 127.0.0.1:{port}
  acl is_ws hdr(host) -i {WS_HOST}
  use_backend ws if is_ws
  default_backend origin
backend origin
  http-reuse always
  server o 127.0.0.1:{origin} maxconn 1000
backend ws
  server w 127.0.0.1:{ws}
""")
    proc = start("haproxy", [HAPROXY, "-db", "-f", conf], PROXY_CPU)
    wait_port(port)
    return port, proc


def floor(name, binary, origin):
    """A floor: the smallest Pingora proxy (benches/src/bin/pingora-floor.rs), Pingora's own
    cost; or the least a hand-written Tokio forwarder does (benches/src/bin/tokio-floor.rs)."""
    port = free_port()
    proc = start(name, [binary, f"127.0.0.1:{port}", f"127.0.0.1:{origin}"], PROXY_CPU)
    wait_port(port)
    return port, proc


def old_ingress(origin, ws):
    """The stand-in for today's Node.js ingress (benches/load/old-ingress/server.js), with a
    proxy token for the HTTP pod and one for the WebSocket pod; None when Node is missing."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        log("node/npm not found: no old-ingress row")
        return None
    if not os.path.isdir(os.path.join(OLD_INGRESS, "node_modules")):
        subprocess.run([npm, "install", "--no-package-lock", "--no-audit", "--no-fund", "--silent"],
                       cwd=OLD_INGRESS, check=True, timeout=300)
    script = os.path.join(OLD_INGRESS, "server.js")

    def token(slug, port):
        out = subprocess.run([node, script, "mint", SECRET, slug, str(port)], capture_output=True,
                             text=True, check=True, timeout=30)
        return f"pinacle-proxy-token={out.stdout.strip()}"

    port = free_port()
    proc = start("old-ingress", [node, script, "serve", str(port), SECRET, f"bench={origin}",
                                 f"benchws={ws}"], PROXY_CPU)
    wait_port(port)
    return port, proc, token("bench", 3000), token("benchws", 7681)


def directory_file(origin, ws):
    pods = "".join(f"""
[[pods]]
id = "pod_{slug}"
slug = "{slug}"
owner_id = "user_bench"
team_id = "team_bench"
server_id = "server_local"
status = "running"
ports = [{{ name = "nginx-proxy", internal = 80, external = {port}, protocol = "tcp" }}]
""" for slug, port in (("bench", origin), ("benchws", ws)))
    return write(os.path.join(WORK, "directory.toml"), f"""
[[users]]
id = "user_bench"
email = "bench@example.test"
[[teams]]
id = "team_bench"
[[servers]]
id = "server_local"
ip_address = "127.0.0.1"
{pods}""")


def ingress_env(port, extra=None):
    env = {
        "NEXTAUTH_SECRET": SECRET,
        "NEXTAUTH_URL": "http://pinacle.bench",
        "PINACLE_INGRESS_LISTEN": f"127.0.0.1:{port}",
        "PINACLE_INGRESS_ADMIN_LISTEN": "off",
        "PINACLE_INGRESS_THREADS": "1",
        "PINACLE_INGRESS_UPGRADE_SOCK": os.path.join(WORK, f"upgrade-{port}.sock"),
        "PINACLE_INGRESS_SHUTDOWN_GRACE_PERIOD": "1s",
        # Access logging off for every proxy measured here (nginx: access_log off).
        "RUST_LOG": "warn",
    }
    env.update(extra or {})
    env.pop("DATABASE_URL", None)
    return env


def start_ingress(name, port, extra, database_url=None, binary=None):
    env = ingress_env(port, extra)
    full = dict(os.environ)
    full.pop("DATABASE_URL", None)
    full.update(env)
    if database_url:
        full["DATABASE_URL"] = database_url
    out = open(os.path.join(WORK, f"{name}.log"), "w")
    proc = subprocess.Popen(["taskset", "-c", PROXY_CPU, binary or INGRESS, "serve"], stdout=out,
                            stderr=subprocess.STDOUT, env=full, cwd=WORK)
    PROCS.append(proc)
    wait_port(port)
    return proc


def fresh_ingress(origin, ws):
    port = free_port()
    proc = start_ingress(f"ingress-{port}", port,
                         {"PINACLE_INGRESS_DIRECTORY_FILE": directory_file(origin, ws)})
    return port, proc


def mint(user):
    env = dict(os.environ, NEXTAUTH_SECRET=SECRET)
    return subprocess.run([INGRESS, "session", "mint", "--user", user], capture_output=True,
                          text=True, env=env, check=True).stdout.strip()


def psql(url, sql):
    subprocess.run(["psql", url, "-qtAc", sql], check=True, capture_output=True)


def first_request(origin):
    """Cache miss (a user's first request) against a repeated request, Postgres directory."""
    base = os.environ["DATABASE_URL"]
    db = f"pinacle_load_{os.getpid()}"
    psql(base, f"DROP DATABASE IF EXISTS {db}")
    psql(base, f"CREATE DATABASE {db}")
    url = re.sub(r"/[^/?]*(\?|$)", f"/{db}\\1", base.split("://", 1)[1], count=1)
    url = base.split("://", 1)[0] + "://" + url
    try:
        subprocess.run([INGRESS, "migrate"], env=dict(os.environ, DATABASE_URL=url), check=True,
                       capture_output=True)
        users = [f"user_{i}" for i in range(MISS_USERS)]
        values = ",".join(f"('{u}','{u}','{u}@example.test')" for u in users)
        psql(url, f'INSERT INTO "user" (id, name, email) VALUES {values}')
        psql(url, "INSERT INTO team (id, name, slug, owner_id) VALUES ('t','t','t','user_0')")
        members = ",".join(f"('tm_{u}','t','{u}','{u}@example.test','member',now(),now())"
                           for u in users)
        psql(url, "INSERT INTO team_member (id, team_id, user_id, email, role, invited_at, "
                  f"joined_at) VALUES {members}")
        psql(url, "INSERT INTO server (id, hostname, ip_address, status) "
                  "VALUES ('s','s','127.0.0.1','online')")
        psql(url, "INSERT INTO pod (id, name, slug, owner_id, team_id, server_id, status, ports) "
                  "VALUES ('p','bench','bench','user_0','t','s','running', "
                  f"'[{{\"name\":\"nginx-proxy\",\"internal\":80,\"external\":{origin}}}]')")
        port = free_port()
        proc = start_ingress("ingress-postgres", port, {}, database_url=url)
        cookies = [mint(u) for u in users]
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)

        def timed(cookie):
            started = time.perf_counter()
            conn.request("GET", "/1k.bin", headers={"Host": POD_HOST, "Cookie": cookie})
            response = conn.getresponse()
            body = response.read()
            assert response.status == 200, (response.status, body[:300])
            return (time.perf_counter() - started) * 1000

        timed(cookies[0])  # warm the connection pools on both sides
        misses, hits = [], []
        for cookie in cookies[1:]:
            misses.append(timed(cookie))
            hits.append(timed(cookie))
        conn.close()
        proc.terminate()
        proc.wait(timeout=15)
        return {
            "users": len(misses),
            "miss_p50_ms": statistics.median(misses),
            "hit_p50_ms": statistics.median(hits),
            "added_p50_ms": statistics.median(misses) - statistics.median(hits),
            "added_p90_ms": sorted(misses)[int(len(misses) * 0.9)] - statistics.median(hits),
        }
    finally:
        psql(base, f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")


def version(cmd):
    out = subprocess.run(cmd, capture_output=True, text=True)
    return (out.stdout + out.stderr).strip().splitlines()[0]


def machine():
    model = "unknown CPU"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{model}, {os.cpu_count()} cores, Linux {platform.release()}"


def main():
    log(f"work directory {WORK}; proxy on CPU {PROXY_CPU}, load and upstreams on CPU {LOAD_CPU}")
    origin, ws = origin_and_upstreams()
    nginx_port, nginx_proc = nginx_proxy(origin, ws)
    haproxy_port, haproxy_proc = haproxy(origin, ws)
    ingress_port = free_port()
    ingress_proc = start_ingress("ingress", ingress_port, {
        "PINACLE_INGRESS_DIRECTORY_FILE": directory_file(origin, ws),
        # The dashboard route (no credentials, no directory) goes to the origin too.
        "PINACLE_INGRESS_DASHBOARD_UPSTREAM": f"127.0.0.1:{origin}"})
    floor_port, floor_proc = floor("pingora-floor", FLOOR, origin)
    tokio_port, tokio_proc = floor("tokio-floor", TOKIO_FLOOR, origin)
    old = old_ingress(origin, ws)
    cookie = mint("user_bench")

    # (name, port, host, cookie, WebSocket port or None for HTTP only, its cookie, process)
    targets = [
        ("direct", origin, "origin", "", ws, "", None),
        ("nginx", nginx_port, POD_HOST, "", nginx_port, "", nginx_proc),
        ("haproxy", haproxy_port, POD_HOST, "", haproxy_port, "", haproxy_proc),
        ("pingora-floor", floor_port, POD_HOST, "", None, "", floor_proc),
        ("tokio-floor", tokio_port, POD_HOST, "", None, "", tokio_proc),
        ("ingress-dashboard", ingress_port, "pinacle.bench", "", None, "", ingress_proc),
        ("pinacle-ingress", ingress_port, POD_HOST, cookie, ingress_port, cookie, ingress_proc),
    ]
    if old:
        old_port, old_proc, old_http, old_ws = old
        targets.append(("old-ingress", old_port, POD_HOST, old_http, old_port, old_ws, old_proc))
    # The same ingress with every request on Pingora's loop (`plain_path = false`): the plain
    # engine (our HTTP/1 exchange and upstream pool) against Pingora's (its loop, pingora-pool)
    # on the same decisions.
    pingora_only_port = free_port()
    pingora_only = start_ingress("pingora-only", pingora_only_port, {
        "PINACLE_INGRESS_DIRECTORY_FILE": directory_file(origin, ws),
        "PINACLE_INGRESS_PLAIN_PATH": "false",
        "PINACLE_INGRESS_DASHBOARD_UPSTREAM": f"127.0.0.1:{origin}"})
    targets += [
        ("pingora-only-dashboard", pingora_only_port, "pinacle.bench", "", None, "", pingora_only),
        ("pingora-only", pingora_only_port, POD_HOST, cookie, None, "", pingora_only),
    ]
    baseline = None
    if BASELINE:
        baseline_port = free_port()
        baseline = start_ingress("ingress-baseline", baseline_port, {
            "PINACLE_INGRESS_DIRECTORY_FILE": directory_file(origin, ws),
            "PINACLE_INGRESS_DASHBOARD_UPSTREAM": f"127.0.0.1:{origin}"}, binary=BASELINE)
        targets.append(("baseline-dashboard", baseline_port, "pinacle.bench", "", None, "",
                        baseline))
        targets.append(("ingress-baseline", baseline_port, POD_HOST, cookie, baseline_port, cookie,
                        baseline))
    # Interleaved rounds, the median round reported: a burst from the VM's neighbours then
    # lands on one round of one row instead of deciding a ratio.
    runs = {name: {} for name, *_ in targets}
    for round_no in range(1, ROUNDS + 1):
        for name, port, host, cookie_value, ws_port, ws_cookie, proc in targets:
            pids = tree(proc.pid) if proc else []
            for label, path in (("1k", "/1k.bin"), ("100k", "/100k.bin")):
                log(f"round {round_no}/{ROUNDS} {name}: HTTP {label}")
                runs[name].setdefault(label, []).append(
                    wrk(port, host, cookie_value, path, pids))
            if name in POST_ROWS:
                log(f"round {round_no}/{ROUNDS} {name}: POST 1 KiB")
                runs[name].setdefault("post1k", []).append(
                    wrk(port, host, cookie_value, "/post", pids, post=True))
            if ws_port is not None:
                log(f"round {round_no}/{ROUNDS} {name}: WebSocket echo")
                ws_host = "ws" if name == "direct" else WS_HOST
                runs[name].setdefault("ws", []).append(
                    ws_echo(ws_port, ws_host, ws_cookie, pids))
    results = {}
    for name, port, host, cookie_value, ws_port, ws_cookie, proc in targets:
        entry = {"1k": median_round(runs[name]["1k"], "rps"),
                 "100k": median_round(runs[name]["100k"], "rps")}
        if "post1k" in runs[name]:
            entry["post1k"] = median_round(runs[name]["post1k"], "rps")
        if "ws" in runs[name]:
            entry["ws"] = median_round(runs[name]["ws"], "per_second")
        if proc:
            entry["rss_after_runs_kib"] = rss_kib(tree(proc.pid))
        results[name] = entry
    stop(floor_proc)
    stop(tokio_proc)
    stop(pingora_only)
    if baseline:
        stop(baseline)
    if old:
        stop(old[1])
    # Idle connections, each count on a fresh process: an allocator keeps the pages a previous
    # phase freed, which would hide the cost of the next one.
    fresh = {
        "nginx": lambda: nginx_proxy(origin, ws),
        "haproxy": lambda: haproxy(origin, ws),
        "pinacle-ingress": lambda: fresh_ingress(origin, ws),
    }
    for name, make in fresh.items():
        cookie_value = cookie if name == "pinacle-ingress" else ""
        port, proc = make()
        log(f"{name}: {IDLE_WS} idle WebSockets (fresh process)")
        results[name]["idle_ws"] = idle_ws(port, WS_HOST, cookie_value, tree(proc.pid))
        stop(proc)
        port, proc = make()
        log(f"{name}: {IDLE_WS} idle keep-alive connections (fresh process)")
        results[name]["idle_http"] = idle_http(port, POD_HOST, cookie_value, tree(proc.pid))
        stop(proc)
    log("pinacle-ingress: first request of a user (Postgres, cache miss)")
    results["first_request"] = first_request(origin)
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "nginx": version([NGINX, "-v"]),
        "haproxy": version([HAPROXY, "-v"]),
        "wrk": version(["wrk", "-v"]),
        "duration_s": DURATION, "rounds": ROUNDS, "connections": CONNECTIONS, "ws_connections": WS_CONNECTIONS,
        "idle_ws": IDLE_WS, "proxy_cpu": PROXY_CPU, "load_cpu": LOAD_CPU,
    }
    out = os.path.join(ROOT, "benches", "RESULTS.md")
    write(out, render(meta, results))
    write(os.path.join(ROOT, "benches", "load", "last-run.json"),
          json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    log(f"wrote {out}")
    print(render(meta, results))


def ratio(value, anchor):
    return f"{value / anchor:.2f}" if value and anchor else "n/a"


def render(meta, r):
    nginx = r["nginx"]
    lines = [
        "# Load comparison",
        "",
        f"Produced by `benches/load/run.sh` on {meta['date']}; {meta['machine']}.",
        f"Proxy under test pinned to CPU {meta['proxy_cpu']} (`taskset`), wrk, the WebSocket "
        f"client, the origin (nginx serving static files) and the WebSocket echo server on CPU "
        f"{meta['load_cpu']}. {meta['nginx']}; {meta['haproxy']}; {meta['wrk']}.",
        f"HTTP: wrk, 1 thread, {meta['connections']} connections, {meta['duration_s']} s per "
        f"run. WebSocket: {meta['ws_connections']} connections each sending 64-byte messages "
        f"and waiting for the echo, {meta['duration_s']} s. Every HTTP and WebSocket figure is the "
        f"median, figure by figure, of {meta.get('rounds', 1)} rounds run in turn across all "
        f"proxies (each round's rate and p99 in `last-run.json`). Idle: {meta['idle_ws']} WebSockets "
        "held open. Access logging is off in every proxy. Ratios are to nginx.",
        "The ingress runs with authentication on: every request carries a next-auth session "
        "cookie that is decrypted and authorized (warm cache, file directory); nginx and HAProxy "
        "only route by Host. Three reference rows: `pingora-floor` is the smallest Pingora proxy "
        "(same Pingora and allocator, no routing, credentials, logs or metrics: "
        "`benches/src/bin/pingora-floor.rs`); `tokio-floor` is the least a hand-written Tokio "
        "HTTP/1 forwarder does (same runtime shape and allocator, httparse, pooled upstream, "
        "`Content-Length` bodies only: `benches/src/bin/tokio-floor.rs`), what a path of our own "
        "for plain requests could approach; and `ingress-dashboard` is the ingress on its "
        "dashboard route (no credentials, no directory). `pingora-only` and "
        "`pingora-only-dashboard` are the same ingress with `plain_path = false`: every request "
        "on Pingora's loop and its upstream pool (pingora-pool) instead of the plain engine, on "
        "the same decisions. `old-ingress` stands in for the Node.js "
        "ingress Pinacle runs today (`benches/load/old-ingress/server.js`: http-proxy, a "
        "jsonwebtoken proxy-token check per request, no upstream keep-alive, as shared/PINACLE.md "
        "describes it). `ingress-baseline`, when present, is another ingress binary "
        "(`BASELINE_INGRESS`, e.g. the previous commit's) in the same rounds (`baseline-dashboard`: its dashboard route).",
        "",
        "## HTTP",
        "",
        "| proxy | body | requests/s | ratio | p50 ms | p99 ms | p99 ratio | CPU µs/request |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in HTTP_ROWS:
        if name not in r:
            continue
        for body in ("1k", "100k"):
            m = r[name][body]
            cpu = m["cpu_us_per_request"]
            errors = f" ({m['errors']} errors)" if m["errors"] else ""
            lines.append(
                f"| {name} | {'1 KiB' if body == '1k' else '100 KiB'} | {m['rps']:,.0f}{errors} | "
                f"{ratio(m['rps'], nginx[body]['rps'])} | {m['p50_ms']:.2f} | {m['p99_ms']:.2f} | "
                f"{ratio(m['p99_ms'], nginx[body]['p99_ms'])} | "
                f"{'n/a (origin)' if cpu is None or name == 'direct' else f'{cpu:.1f}'} |")
    lines += ["", "## POST with a 1 KiB body (the ingress: Pingora's path)", "",
              "| proxy | requests/s | ratio | p99 ms | CPU µs/request |", "|---|---|---|---|---|"]
    for name in ("nginx", "pingora-floor", "ingress-dashboard", "pinacle-ingress", "ingress-baseline"):
        if name not in r or "post1k" not in r[name]:
            continue
        m = r[name]["post1k"]
        cpu = m.get("cpu_us_per_request")
        errors = f" ({m['errors']} errors)" if m.get("errors") else ""
        lines.append(f"| {name} | {m['rps']:,.0f}{errors} | {ratio(m['rps'], nginx.get('post1k', {}).get('rps'))} | "
                     f"{m['p99_ms']:.2f} | {'n/a' if cpu is None else f'{cpu:.1f}'} |")
    lines += ["", "## WebSocket echo", "",
              "| proxy | messages/s | ratio | p50 µs | p99 µs | p99 ratio | CPU µs/message |",
              "|---|---|---|---|---|---|---|"]
    for name in ("direct", "nginx", "haproxy", "pinacle-ingress", "ingress-baseline", "old-ingress"):
        if name not in r:
            continue
        m = r[name]["ws"]
        if "error" in m:
            lines.append(f"| {name} | error: {m['error']} | | | | | |")
            continue
        cpu = m.get("cpu_us_per_message")
        lines.append(f"| {name} | {m['per_second']:,.0f} | {ratio(m['per_second'], nginx['ws'].get('per_second'))} | "
                     f"{m['p50_us']} | {m['p99_us']} | {ratio(m['p99_us'], nginx['ws'].get('p99_us'))} | "
                     f"{'n/a (origin)' if cpu is None else f'{cpu:.1f}'} |")
    lines += ["", "## Memory", "",
              "| proxy | resident after the runs | per idle WebSocket | ratio | per idle keep-alive connection |",
              "|---|---|---|---|---|"]
    for name in ("nginx", "haproxy", "pinacle-ingress"):
        idle = r[name]["idle_ws"]
        per = idle.get("per_connection_kib")
        anchor = nginx["idle_ws"].get("per_connection_kib")
        keepalive = r[name]["idle_http"]["per_connection_kib"]
        lines.append(f"| {name} | {r[name]['rss_after_runs_kib'] / 1024:.1f} MiB | "
                     f"{f'{per:.1f} KiB' if per is not None else idle.get('error')} | {ratio(per, anchor)} | "
                     f"{keepalive:.1f} KiB |")
    f = r["first_request"]
    lines += ["", "## First request of a user (authorization cache miss, Postgres on this machine)", "",
              f"{f['users']} users, each requesting twice on one keep-alive connection: the first "
              f"request (cache miss: one Postgres query) took {f['miss_p50_ms']:.2f} ms at the "
              f"median, the repeat {f['hit_p50_ms']:.2f} ms: the miss adds "
              f"{f['added_p50_ms']:.2f} ms (p90 {f['added_p90_ms']:.2f} ms).", ""]
    ingress = r["pinacle-ingress"]
    checks = [
        ("requests/s with authentication ≥ 0.8 × nginx (1 KiB)",
         ingress["1k"]["rps"] >= 0.8 * nginx["1k"]["rps"]),
        ("requests/s with authentication ≥ 0.8 × nginx (100 KiB)",
         ingress["100k"]["rps"] >= 0.8 * nginx["100k"]["rps"]),
        ("p99 ≤ 1.5 × nginx (1 KiB)", ingress["1k"]["p99_ms"] <= 1.5 * nginx["1k"]["p99_ms"]),
        ("p99 ≤ 1.5 × nginx (100 KiB)", ingress["100k"]["p99_ms"] <= 1.5 * nginx["100k"]["p99_ms"]),
        ("WebSocket messages/s ≥ 0.9 × nginx",
         ingress["ws"].get("per_second", 0) >= 0.9 * nginx["ws"].get("per_second", 1)),
        ("memory per idle WebSocket ≤ nginx",
         (ingress["idle_ws"].get("per_connection_kib") or 1e9)
         <= (nginx["idle_ws"].get("per_connection_kib") or 0)),
        ("first request adds < 2 ms", f["added_p50_ms"] < 2.0),
    ]
    lines += ["## Targets", ""]
    lines += [f"- {'met' if ok else 'MISSED'}: {label}" for label, ok in checks]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
