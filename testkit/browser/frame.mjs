// Framing in Debian's Chromium (playwright-core drives it; no browser is downloaded): a page on
// the dashboard's origin and a page on an unrelated origin each frame the same pod page, the way
// the Workbench does: through the proxy-token callback with `embed=true`, whose cookie
// (SameSite=None; Secure; Partitioned, so the pod is served over https with a test certificate
// Chromium is told to accept) authenticates the framed page. Prints one JSON object: what each frame ended up showing.
//
//   node frame.mjs <dashboard page url> <unrelated page url>

import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium } from "playwright-core";

const [dashboardPage, unrelatedPage] = process.argv.slice(2);
const profile = await mkdtemp(join(tmpdir(), "pinacle-frame-"));
const context = await chromium.launchPersistentContext(profile, {
  executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--ignore-certificate-errors"],
  timeout: 30000,
});
const result = {};
try {
  async function framed(url) {
    const page = await context.newPage();
    page.setDefaultTimeout(15000);
    const blocked = [];
    page.on("console", (m) => { if (/frame-ancestors/.test(m.text())) blocked.push(m.text()); });
    await page.goto(url);
    await page.waitForFunction(() => document.title === "framed");
    const frame = page.frames().find((f) => f !== page.mainFrame());
    let text = "";
    try { text = await frame.innerText("body", { timeout: 2000 }); } catch { text = ""; }
    const seen = { frameUrl: frame ? frame.url() : null, text, blocked };
    await page.close();
    return seen;
  }
  result.dashboard = await framed(dashboardPage);
  result.unrelated = await framed(unrelatedPage);
} finally {
  await context.close();
  await rm(profile, { recursive: true, force: true });
}
console.log(JSON.stringify(result));
