// Framing in Debian's Chromium: a page on the dashboard's origin and a page on an unrelated
// origin each frame the same pod page, the way the Workbench does: through the proxy-token
// callback with `embed=true`, whose cookie (SameSite=None; Secure; Partitioned, so the pod is
// served over https) authenticates the framed page. Prints one JSON object: what each frame
// ended up showing.
//
//   node frame.mjs <dashboard page url> <unrelated page url>

import { withProfile } from "./profile.mjs";

const [dashboardPage, unrelatedPage] = process.argv.slice(2);
const result = await withProfile(async (context) => {
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
  return { dashboard: await framed(dashboardPage), unrelated: await framed(unrelatedPage) };
});
console.log(JSON.stringify(result));
