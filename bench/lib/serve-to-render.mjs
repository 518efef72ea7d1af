// How long a library takes to reach the renderer in browser mode: from starting
// `strata serve --folder POOL` until Chromium shows every image of it (the sidebar's count
// says so and the first chain is drawn). Chromium is started first and not counted.
// usage: node serve-to-render.mjs STRATA_LAUNCHER POOL EXPECTED_IMAGES; prints BENCH_WALL_S.
import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { chromium } from 'playwright-core';

const [launcher, pool, expected] = process.argv.slice(2);
const data = mkdtempSync(join(tmpdir(), 'strata-bench-serve-'));
const browser = await chromium.launch({ executablePath: process.env.STRATA_CHROMIUM ?? '/usr/bin/chromium', args: ['--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking', '--disable-component-update'] });
let server;
try {
  const page = await browser.newPage();
  const t0 = process.hrtime.bigint();
  server = spawn(launcher, ['serve', '--no-open', '--folder', pool], { env: { ...process.env, STRATA_DATA_DIR: data, BROWSER: 'none' }, stdio: ['ignore', 'pipe', 'inherit'] });
  const url = await new Promise((resolve, reject) => {
    let out = '';
    server.stdout.on('data', (d) => { out += d; const m = /(http:\/\/127\.0\.0\.1:\d+\/\?token=\S+)/.exec(out); if (m) resolve(m[1]); });
    server.on('exit', (code) => reject(new Error(`strata serve exited (${code}) before printing its URL`)));
  });
  await page.goto(url);
  await page.waitForFunction((n) => {
    const dd = [...document.querySelectorAll('[aria-label=Summary] dd')][0];
    return dd?.textContent === n && document.querySelector('[data-testid=image-node]');
  }, expected, { timeout: 60_000, polling: 'raf' });
  const wall = Number(process.hrtime.bigint() - t0) / 1e9;
  process.stderr.write(`BENCH_WALL_S=${wall.toFixed(4)}\n`);
} finally {
  server?.kill('SIGINT');
  await browser.close();
  rmSync(data, { recursive: true, force: true });
}
