// A stand-in for the Node.js ingress Pinacle runs today (shared/PINACLE.md: a custom server.ts on
// http-proxy), for the load comparison only. Per request, as the old ingress does: parse the pod
// host, read the `pinacle-proxy-token` cookie, verify it (HS256, jsonwebtoken), check it names
// this pod and port, and proxy with http-proxy without upstream keep-alive (`Connection: close`)
// and without `Accept-Encoding`; WebSocket upgrades the same way. The pod's upstream address comes
// from a fixed map (the old ingress's slug lookup, warm). Not built for anything but benches.
//
//   node server.js mint SECRET SLUG PORT                     -> a proxy token
//   node server.js serve LISTEN_PORT SECRET SLUG=UPSTREAM_PORT...
"use strict";
const crypto = require("crypto");
const http = require("http");
const httpProxy = require("http-proxy");
const jwt = require("jsonwebtoken");

const POD_HOST = /^localhost-(\d+)-pod-([a-z0-9-]+)\./i;

function cookie(header, name) {
  for (const part of (header || "").split(";")) {
    const eq = part.indexOf("=");
    if (eq > 0 && part.slice(0, eq).trim() === name) return part.slice(eq + 1).trim();
  }
  return undefined;
}

function authorize(req, secret, upstreams) {
  const m = POD_HOST.exec(req.headers.host || "");
  if (!m) return { status: 404 };
  const port = Number(m[1]);
  const slug = m[2].toLowerCase();
  const token = cookie(req.headers.cookie, "pinacle-proxy-token");
  if (!token) return { status: 401 };
  let claims;
  try {
    claims = jwt.verify(token, secret, { algorithms: ["HS256"] });
  } catch (_) {
    return { status: 401 };
  }
  if (claims.podSlug !== slug || claims.targetPort !== port) return { status: 403 };
  const upstream = upstreams[slug];
  if (!upstream) return { status: 404 };
  return { target: `http://127.0.0.1:${upstream}`, host: `localhost:${port}` };
}

function serve(listenPort, secretText, pairs) {
  // A key object made once: jsonwebtoken 9 given the secret as a string rebuilds the key on every
  // verify (about 0.4 ms each here), which would make this stand-in slower than the real one.
  const secret = crypto.createSecretKey(Buffer.from(secretText));
  const upstreams = {};
  for (const pair of pairs) {
    const [slug, port] = pair.split("=");
    upstreams[slug] = Number(port);
  }
  const proxy = httpProxy.createProxyServer({ xfwd: true });
  proxy.on("error", (_e, _req, res) => {
    if (res && res.writeHead && !res.headersSent) {
      res.writeHead(502);
      res.end();
    } else if (res && res.destroy) {
      res.destroy();
    }
  });
  const server = http.createServer((req, res) => {
    const decision = authorize(req, secret, upstreams);
    if (!decision.target) {
      res.writeHead(decision.status, { "content-type": "application/json" });
      res.end('{"error":"denied"}');
      return;
    }
    req.headers.host = decision.host;
    req.headers.connection = "close";
    delete req.headers["accept-encoding"];
    proxy.web(req, res, { target: decision.target });
  });
  server.on("upgrade", (req, socket, head) => {
    const decision = authorize(req, secret, upstreams);
    if (!decision.target) {
      socket.end(`HTTP/1.1 ${decision.status} Denied\r\n\r\n`);
      return;
    }
    req.headers.host = decision.host;
    proxy.ws(req, socket, head, { target: decision.target });
  });
  server.keepAliveTimeout = 120000;
  server.listen(listenPort, "127.0.0.1");
  process.on("SIGTERM", () => process.exit(0));
}

const [mode, ...args] = process.argv.slice(2);
if (mode === "mint") {
  const [secret, slug, port] = args;
  process.stdout.write(
    jwt.sign(
      { userId: "user_bench", podId: `pod_${slug}`, podSlug: slug, targetPort: Number(port) },
      secret,
      { algorithm: "HS256", expiresIn: 3600 },
    ) + "\n",
  );
} else if (mode === "serve") {
  const [listenPort, secret, ...pairs] = args;
  serve(Number(listenPort), secret, pairs);
} else {
  process.stderr.write("usage: node server.js mint SECRET SLUG PORT | serve PORT SECRET SLUG=PORT...\n");
  process.exit(2);
}
