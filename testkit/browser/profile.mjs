// Debian's Chromium in a throwaway persistent profile (third-party and partitioned cookies
// behave as in a person's browser, unlike an incognito context), accepting the tests' https
// certificate. playwright-core drives it; no browser is downloaded.

import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium } from "playwright-core";

/// Runs `body(context)` in a fresh profile and removes it afterwards; `extraArgs` go to
/// Chromium's command line.
export async function withProfile(body, extraArgs = []) {
  const profile = await mkdtemp(join(tmpdir(), "pinacle-chromium-"));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync",
      "--ignore-certificate-errors", ...extraArgs],
    timeout: 30000,
  });
  try {
    return await body(context);
  } finally {
    await context.close();
    await rm(profile, { recursive: true, force: true });
  }
}
