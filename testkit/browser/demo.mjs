// The demo from a person's seat, in Debian's Chromium (playwright-core drives it; no browser is
// downloaded): open the pod's address, get the stand-in sign-in page, pick a user, land on the
// pod; a stranger gets the ingress's 403 page; a stopped pod gets its status page. Prints one
// JSON object with what each step saw; screenshots go to the directory given.
//
//   node demo.mjs <pod url> <stopped pod url> <screenshot directory>

import { chromium } from "playwright-core";

const [podUrl, stoppedUrl, shots] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  timeout: 30000,
});
const result = {};
try {
  // Signs in as `label` (a button of the stand-in), then returns the page it lands on.
  async function signIn(url, label, shot) {
    const context = await browser.newContext({ viewport: { width: 900, height: 640 } });
    const page = await context.newPage();
    page.setDefaultTimeout(15000);
    await page.goto(url);
    const signInTitle = await page.title();
    await page.getByRole("button", { name: label }).click();
    await page.waitForLoadState("load");
    const landed = { signInTitle, url: page.url(), title: await page.title(), text: await page.innerText("body") };
    await page.screenshot({ path: `${shots}/${shot}.png` });
    await context.close();
    return landed;
  }
  result.owner = await signIn(podUrl, /^Ada/, "demo-owner");
  result.stranger = await signIn(podUrl, /^Mal/, "demo-stranger");
  result.stopped = await signIn(stoppedUrl, /^Ada/, "demo-stopped");
} finally {
  await browser.close();
}
console.log(JSON.stringify(result));
