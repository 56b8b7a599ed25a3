// A port nobody listens on yet, in Debian's Chromium: the pod page is opened (through the
// proxy-token callback) while nothing listens on its port, so the ingress's page shows; then a
// server starts on that port, and the page, retrying on its own, turns into the app. Prints one
// JSON object with what the page showed before and after.
//
//   node waiting.mjs <callback url> <port to start the app on>

import { createServer } from "node:http";
import { withProfile } from "./profile.mjs";

const [url, port] = process.argv.slice(2);
let app;
const result = await withProfile(async (context) => {
  const page = await context.newPage();
  page.setDefaultTimeout(30000);
  await page.goto(url);
  const before = { title: await page.title(), text: await page.innerText("body") };
  app = createServer((_, res) => {
    res.setHeader("content-type", "text/html");
    res.end("<!doctype html><title>the app</title><p>the app is up</p>");
  });
  await new Promise((resolve) => app.listen(Number(port), "127.0.0.1", resolve));
  await page.waitForFunction(() => document.body?.innerText.includes("the app is up"), null, { timeout: 30000 });
  return { before, after: { title: await page.title(), url: page.url() } };
});
app?.close();
console.log(JSON.stringify(result));
