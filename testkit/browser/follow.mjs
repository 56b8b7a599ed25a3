// A pod that is not running, in Debian's Chromium: its page (opened through the proxy-token
// callback) shows the status; then the pod starts (the directory file is rewritten and the
// ingress told to reload it with SIGHUP), and the page, following the status on its own, turns
// into the app at the path first asked for. Prints one JSON object with what the page showed.
//
//   node follow.mjs <callback url> <directory file> <its started text> <ingress pid>

import { writeFile } from "node:fs/promises";
import { withProfile } from "./profile.mjs";

const [url, directoryFile, started, pid] = process.argv.slice(2);
const result = await withProfile(async (context) => {
  const page = await context.newPage();
  page.setDefaultTimeout(30000);
  await page.goto(url);
  const before = { title: await page.title(), text: await page.innerText("body") };
  await writeFile(directoryFile, started);
  process.kill(Number(pid), "SIGHUP");
  await page.waitForFunction(() => document.body?.innerText.includes("\"name\""), null, { timeout: 40000 });
  return { before, after: { url: page.url(), text: await page.innerText("body") } };
});
console.log(JSON.stringify(result));
