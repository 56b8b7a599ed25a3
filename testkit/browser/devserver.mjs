// A dev server through the ingress as on localhost, in Debian's Chromium: its page opened
// top-level and inside a Workbench-like iframe (both over the ingress's https, through the
// proxy-token callback), its source edited on disk, and the page updated by the dev server's hot
// reload over the tunnelled WebSocket without a reload (a marker set on `window` survives).
// Prints one JSON object with what each step saw.
//
//   node devserver.mjs <top-level callback url> <framing page url> <message.js path>

import { writeFile } from "node:fs/promises";
import { withProfile } from "./profile.mjs";

const [topUrl, framingPage, messageFile] = process.argv.slice(2);
const text = () => document.querySelector("#app")?.textContent;

// Shows `before`, marks the window, edits message.js to `after`, waits for the new text.
async function hotUpdate(target, before, after) {
  const shows = (t) => document.querySelector("#app")?.textContent === t;
  await target.waitForFunction(shows, before, { timeout: 30000 });
  await target.evaluate(() => { window.__pinacleMarker = "kept"; });
  await writeFile(messageFile, `export const message = ${JSON.stringify(after)};\n`);
  await target.waitForFunction(shows, after, { timeout: 30000 });
  return { text: await target.evaluate(text), marker: await target.evaluate(() => window.__pinacleMarker ?? null) };
}

const result = await withProfile(async (context) => {
  const page = await context.newPage();
  page.setDefaultTimeout(30000);
  await page.goto(topUrl);
  const top = { url: page.url(), ...(await hotUpdate(page, "one", "two")) };
  await page.close();

  const dashboard = await context.newPage();
  dashboard.setDefaultTimeout(30000);
  await dashboard.goto(framingPage);
  await dashboard.waitForFunction(() => document.title === "framed");
  const frame = dashboard.frames().find((f) => f !== dashboard.mainFrame());
  const framed = { url: frame.url(), ...(await hotUpdate(frame, "two", "three")) };
  return { top, framed };
});
console.log(JSON.stringify(result));
