// Chromium for the end-to-end tests: Debian's chromium driven by playwright-core, with the
// flags this machine needs (no sandbox as root, no GPU, no background networking). Console
// errors and page errors are collected so every test can assert there are none.
import { existsSync } from 'node:fs';
import { chromium, type Browser, type BrowserContext, type Page } from 'playwright-core';
import { describe, it } from 'vitest';

export const CHROMIUM = process.env.STRATA_CHROMIUM ?? '/usr/bin/chromium';
export const haveChromium = existsSync(CHROMIUM);

/** describe() for tests that need Chromium: skipped loudly without it, failed under CI=true. */
export function describeBrowser(name: string, fn: () => void): void {
  if (haveChromium) { describe(name, fn); return; }
  if (process.env.CI === 'true') {
    describe(name, () => { it('needs Chromium (apt-get install chromium)', () => { throw new Error(`${CHROMIUM} missing under CI=true: .ci/run must install chromium`); }); });
    return;
  }
  process.stderr.write(`\n*** ${CHROMIUM} NOT FOUND: browser tests are SKIPPED. Install chromium to run them. ***\n\n`);
  describe.skip(name, fn);
}

export async function launch(): Promise<Browser> {
  return chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync', '--disable-dev-shm-usage'],
  });
}

export interface WatchedPage {
  page: Page;
  context: BrowserContext;
  /** Console errors and uncaught page errors so far. */
  errors: string[];
}

export async function openPage(browser: Browser, opts: { colorScheme?: 'light' | 'dark'; width?: number; height?: number } = {}): Promise<WatchedPage> {
  const context = await browser.newContext({ viewport: { width: opts.width ?? 1440, height: opts.height ?? 900 }, colorScheme: opts.colorScheme ?? 'light', deviceScaleFactor: 1 });
  const page = await context.newPage();
  const errors: string[] = [];
  page.on('console', (m) => { if (m.type() === 'error') errors.push(`console: ${m.text()}`); });
  page.on('pageerror', (e) => errors.push(`page: ${e.message}`));
  return { page, context, errors };
}
