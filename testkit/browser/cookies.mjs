// A pod's cookies in Debian's Chromium. The pod's app (started here, on the port the ingress
// dials) answers with a cookie for the whole base domain, one of its own and one forging the
// ingress's proxy token; the dashboard (a stand-in started here) reports the cookies it gets.
// Names under pinacle.test resolve to 127.0.0.1 inside Chromium only. Prints one JSON object.
//
//   node cookies.mjs <callback url> <app port> <dashboard url> <dashboard port>

import { createServer } from "node:http";
import { withProfile } from "./profile.mjs";

const [callback, appPort, dashboardUrl, dashboardPort] = process.argv.slice(2);
const app = createServer((req, res) => {
  res.setHeader("set-cookie", [
    "site=planted; Domain=pinacle.test; Path=/",
    "own=kept; Path=/",
    "pinacle-proxy-token=forged; Path=/",
  ]);
  res.setHeader("content-type", "text/plain");
  res.end(`the app got: ${req.headers.cookie ?? ""}`);
});
const dashboard = createServer((req, res) => {
  res.setHeader("content-type", "application/json");
  res.end(JSON.stringify({ cookie: req.headers.cookie ?? null }));
});
const listen = (server, port) =>
  new Promise((resolve) => server.listen(Number(port), "127.0.0.1", resolve));
await listen(app, appPort);
await listen(dashboard, dashboardPort);

let result;
try {
  result = await withProfile(async (context) => {
    const page = await context.newPage();
    page.setDefaultTimeout(30000);
    // Signs in to the pod through the callback and lands on the app, which sets its cookies.
    await page.goto(callback);
    // Again: the cookies the browser kept come back to the app; the pod is still reachable.
    await page.reload();
    const again = { url: page.url(), text: await page.innerText("body") };
    await page.goto(dashboardUrl);
    const atDashboard = JSON.parse(await page.innerText("body"));
    const cookies = (await context.cookies()).map(({ name, value, domain }) => ({ name, value, domain }));
    return { again, atDashboard, cookies };
  }, ["--host-resolver-rules=MAP *.pinacle.test 127.0.0.1, MAP pinacle.test 127.0.0.1"]);
} finally {
  app.close();
  dashboard.close();
}
console.log(JSON.stringify(result));
