// A pod's lifecycle at the door, in Debian's Chromium. Modes:
//   start: a stopped pod's page (opened through the proxy-token callback at a deep path) shows
//          Start; the click starts the pod and the page lands on the pod at that path.
//   stop:  a running pod's status page shows Stop; the click stops it, the page then offers
//          Start; that click starts it again and "Open the app" opens the pod.
//   wake:  a stopped pod with wake_on_request: the navigation alone lands on the pod.
// Screenshots go to <dir>/<mode>-<step>.png. Prints one JSON object with what the page showed.
//
//   node lifecycle.mjs <mode> <callback url> <screenshot dir>

import { withProfile } from "./profile.mjs";

const [mode, url, shots] = process.argv.slice(2);
const podShown = () => document.body?.innerText.includes("\"name\"");
const state = async (page) => ({
  title: await page.title(),
  text: await page.innerText("body"),
  status: await page.locator("#pod-status").textContent().catch(() => null),
  start: await page.locator("#start").isVisible().catch(() => false),
  startEnabled: await page.locator("#start").isEnabled().catch(() => false),
  stop: await page.locator("#stop").isVisible().catch(() => false),
  stopEnabled: await page.locator("#stop").isEnabled().catch(() => false),
  message: await page.locator("#lifecycle-message").textContent().catch(() => null),
});
const shot = (page, step) => page.screenshot({ path: `${shots}/${mode}-${step}.png` });

const result = await withProfile(async (context) => {
  const page = await context.newPage();
  page.setDefaultTimeout(30000);
  await page.goto(url);
  if (mode === "wake") {
    const first = await state(page);
    await shot(page, "waking");
    await page.waitForFunction(podShown, null, { timeout: 40000 });
    return { first, after: { url: page.url(), text: await page.innerText("body") } };
  }
  const before = await state(page);
  await shot(page, "before");
  await page.click(mode === "start" ? "#start" : "#stop");
  await page.waitForFunction(() => /Starting|Stopping/.test(document.getElementById("lifecycle-message")?.textContent ?? ""));
  const during = await state(page);
  await shot(page, "during");
  if (mode === "start") {
    await page.waitForFunction(podShown, null, { timeout: 40000 });
    return { before, during, after: { url: page.url(), text: await page.innerText("body") } };
  }
  await page.waitForFunction(() => document.getElementById("pod-status")?.textContent === "stopped"
    && !document.getElementById("start").hidden && !document.getElementById("start").disabled, null, { timeout: 40000 });
  const stopped = await state(page);
  await shot(page, "stopped");
  await page.click("#start");
  await page.waitForFunction(() => !document.getElementById("open").hidden, null, { timeout: 40000 });
  const running = await state(page);
  await shot(page, "running-again");
  await page.click("#open");
  await page.waitForFunction(podShown, null, { timeout: 40000 });
  return { before, during, stopped, running, after: { url: page.url(), text: await page.innerText("body") } };
});
console.log(JSON.stringify(result));
