#!/usr/bin/env python3
"""A stand-in for the dashboard's sign-in, for scripts/demo only (development secret, no
passwords): GET /api/proxy-auth?pod=<slug>&port=<n>&return_url=<path> shows the demo users;
choosing one mints a proxy token with `pinacle-ingress session mint` and sends the browser to
the pod's /pinacle-proxy-callback, exactly as the real dashboard does. Every other path gets a
short page that says what this is.

    demo-dashboard.py <listen port> <pinacle-ingress binary> <ingress port> <base domain>
"""

import html
import os
import subprocess
import sys
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PORT, BINARY, INGRESS_PORT, DOMAIN = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
# The demo directory (config/directory.example.toml): who may open which pod.
USERS = [("user_ada", "Ada (owns the demo pod)"), ("user_bob", "Bob (a member of Ada's team)"),
         ("user_mal", "Mal (a stranger: gets 403)")]
PODS = {"demo": "pod_demo", "sleepy": "pod_stopped"}
STYLE = ("body{font-family:system-ui,sans-serif;background:#f6f7f9;margin:0}main{max-width:30rem;"
         "margin:12vh auto;background:#fff;border:1px solid #d9dde3;border-radius:12px;"
         "padding:2rem}button{display:block;width:100%;margin:.5rem 0;padding:.6rem;"
         "font-size:1rem;border:1px solid #0b5fcc;border-radius:6px;background:#fff;"
         "color:#0b5fcc;cursor:pointer}p{color:#57606a}")


def page(title, body):
    return (f"<!doctype html><meta charset=utf-8><title>{title}</title><style>{STYLE}</style>"
            f"<main><h1>{title}</h1>{body}</main>").encode()


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def send(self, status, body=b"", location=None):
        self.send_response(status)
        if location:
            self.send_header("location", location)
        self.send_header("content-type", "text/html; charset=utf-8")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        url = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(url.query))
        if url.path != "/api/proxy-auth":
            self.send(200, page("Demo dashboard", "<p>A stand-in for Pinacle's dashboard, "
                                "run by scripts/demo. Open a pod address to sign in.</p>"))
            return
        pod, port, back = query.get("pod", ""), query.get("port", ""), query.get("return_url", "/")
        if pod not in PODS or not port.isdigit():
            self.send(400, page("Unknown pod", "<p>The demo has pods demo and sleepy.</p>"))
            return
        user = query.get("user")
        if user not in dict(USERS):
            buttons = "".join(
                f"<form><input type=hidden name=pod value={html.escape(pod)}>"
                f"<input type=hidden name=port value={html.escape(port)}>"
                f"<input type=hidden name=return_url value=\"{html.escape(back)}\">"
                f"<button name=user value={u}>{html.escape(label)}</button></form>"
                for u, label in USERS)
            self.send(200, page("Sign in to the demo",
                                f"<p>Open port {html.escape(port)} of pod "
                                f"<b>{html.escape(pod)}</b> as:</p>{buttons}"))
            return
        token = subprocess.run(
            [BINARY, "session", "mint", "--user", user, "--pod", pod, "--pod-id", PODS[pod],
             "--port", port], capture_output=True, text=True, check=True,
            env=dict(os.environ)).stdout.strip().split("=", 1)[1]
        target = (f"http://localhost-{port}-pod-{pod}.{DOMAIN}:{INGRESS_PORT}"
                  f"/pinacle-proxy-callback?token={urllib.parse.quote(token)}"
                  f"&return_url={urllib.parse.quote(back, safe='')}")
        self.send(302, location=target)


ThreadingHTTPServer(("127.0.0.1", PORT), Handler).serve_forever()
