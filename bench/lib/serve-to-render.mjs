// How long a library takes to reach the renderer in browser mode: from starting
// `strata serve --folder POOL` until Chromium shows every image of it (the sidebar's count
// says so and the first chain is drawn). Chromium is started first and not counted: the run
// begins once it has finished starting (its processes idle), as a browser a person already has
// open. Chromium's own start (its spare renderer, the browser's first tasks) otherwise ran into
// the measured time and doubled the CPU Chromium used in it.
// usage: node serve-to-render.mjs STRATA_LAUNCHER POOL EXPECTED_IMAGES; prints BENCH_WALL_S.
import { spawn } from 'node:child_process';
import { mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { chromium } from 'playwright-core';

const [launcher, pool, expected] = process.argv.slice(2);
const data = mkdtempSync(join(tmpdir(), 'strata-bench-serve-'));
const browser = await chromium.launch({ executablePath: process.env.STRATA_CHROMIUM ?? '/usr/bin/chromium', args: ['--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking', '--disable-component-update'] });
let server;

/** CPU time (ms) used so far by the descendants of the process `pid` (Chromium's, of this one). */
function treeCpuMs(pid) {
  const kids = new Map();
  let total = 0;
  for (const p of readdirSync('/proc')) {
    if (!/^\d+$/.test(p)) continue;
    try {
      const f = readFileSync(`/proc/${p}/stat`, 'utf8').split(') ')[1].split(' ');
      const ppid = Number(f[1]);
      kids.set(ppid, [...(kids.get(ppid) ?? []), [Number(p), (Number(f[11]) + Number(f[12])) * 10]]);
    } catch { /* gone */ }
  }
  const walk = (p) => { for (const [c, ms] of kids.get(p) ?? []) { total += ms; walk(c); } };
  walk(pid);
  return total;
}

/** Waits until Chromium uses (almost) no CPU for half a second, 15 s at most. */
async function settled(pid) {
  const end = Date.now() + 15_000;
  let last = treeCpuMs(pid);
  while (Date.now() < end) {
    await new Promise((r) => setTimeout(r, 500));
    const now = treeCpuMs(pid);
    if (now - last <= 20) return;
    last = now;
  }
}

try {
  const page = await browser.newPage();
  await settled(process.pid);
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
