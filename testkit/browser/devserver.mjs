// A dev server through the ingress as on localhost, in Debian's Chromium: a Vite page opened
// top-level and inside a Workbench-like iframe (both over the ingress's https, through the
// proxy-token callback), its source edited on disk, and the page updated by Vite's HMR over the
// tunnelled WebSocket without a reload (a marker set on `window` survives). Prints one JSON
// object with what each step saw.
//
//   node devserver.mjs <top-level callback url> <framing page url> <message.js path>

import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium } from "playwright-core";

const [topUrl, framingPage, messageFile] = process.argv.slice(2);
const profile = await mkdtemp(join(tmpdir(), "pinacle-devserver-"));
const context = await chromium.launchPersistentContext(profile, {
  executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--ignore-certificate-errors"],
  timeout: 30000,
});
const text = () => document.querySelector("#app")?.textContent;
const result = {};
try {
  // Shows `before`, marks the window, edits message.js to `after`, waits for the new text.
  async function hotUpdate(target, before, after) {
    await target.waitForFunction((t) => document.querySelector("#app")?.textContent === t, before, { timeout: 20000 });
    await target.evaluate(() => { window.__pinacleMarker = "kept"; });
    await writeFile(messageFile, `export const message = ${JSON.stringify(after)};\n`);
    await target.waitForFunction((t) => document.querySelector("#app")?.textContent === t, after, { timeout: 20000 });
    return { text: await target.evaluate(text), marker: await target.evaluate(() => window.__pinacleMarker ?? null) };
  }
  const page = await context.newPage();
  page.setDefaultTimeout(20000);
  await page.goto(topUrl);
  result.top = { url: page.url(), ...(await hotUpdate(page, "one", "two")) };
  await page.close();

  const dashboard = await context.newPage();
  dashboard.setDefaultTimeout(20000);
  await dashboard.goto(framingPage);
  await dashboard.waitForFunction(() => document.title === "framed");
  const frame = dashboard.frames().find((f) => f !== dashboard.mainFrame());
  result.framed = { url: frame.url(), ...(await hotUpdate(frame, "two", "three")) };
} finally {
  await context.close();
  await rm(profile, { recursive: true, force: true });
}
console.log(JSON.stringify(result));
