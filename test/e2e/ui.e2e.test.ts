// The UI end to end, in Chromium against browser mode, on folders built with qemu-img and
// qemu-io: the tree and its edges, a missing backing file repaired from its badge, details
// (chain, dependents, allocation map), one-click compaction, the commit wizard's warning and a
// commit that empties the top, snapshots, cancel, responsiveness during a 4 GiB job, keyboard,
// accessibility (axe) in light and dark, no console errors; screenshots for the README.
import { execFileSync } from 'node:child_process';
import { copyFileSync, mkdirSync, readFileSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, expect, it } from 'vitest';
import type { Browser, Page } from 'playwright-core';
import { haveQemu, qemuImg, qemuIo, tempDir } from '../oracle/qemu';
import { repoRoot } from '../cli/run-cli';
import { expectClean, guestHash, qemuMap } from '../core/jobs/helpers';
import { AppServices } from '../../main/services/app-services';
import { ForkJobHost } from '../../main/services/job-host';
import { startServer, type RunningServer } from '../../main/server/http-server';
import { describeBrowser, launch, openPage, type WatchedPage } from './browser';

const MiB = 1 << 20;
const SHOTS = join(repoRoot, 'docs', 'screenshots');

const node = (page: Page, name: string) => page.locator(`[data-testid=image-node][data-name="${name}"]`);

/** axe-core in the page (evaluated through the DevTools protocol, which the CSP does not cover). */
async function axeViolations(page: Page): Promise<string[]> {
  const src = readFileSync(join(repoRoot, 'node_modules', 'axe-core', 'axe.min.js'), 'utf8');
  await page.evaluate(`${src}\n;0`);
  const res = await page.evaluate(async () => {
    const axe = (window as unknown as { axe: { run: (ctx: unknown, opts: unknown) => Promise<{ violations: { id: string; impact: string; nodes: { target: string[] }[] }[] }> } }).axe;
    return axe.run(document, { resultTypes: ['violations'] });
  });
  return res.violations.filter((v) => v.impact === 'serious' || v.impact === 'critical').map((v) => `${v.id} (${v.impact}): ${v.nodes.slice(0, 3).map((n) => n.target.join(' ')).join(', ')}`);
}

/** The colour of the allocation map at a fraction of the disk, in a layer's strip. */
async function mapColour(page: Page, layer: number, fraction: number): Promise<string> {
  return page.getByTestId('allocation-map').evaluate((c: HTMLCanvasElement, [l, f]) => {
    const dpr = window.devicePixelRatio || 1;
    const x = Math.floor(c.width * f);
    const y = Math.floor((l * (22 + 18) + 18 - 4 + 11) * dpr);
    const d = c.getContext('2d')!.getImageData(x, y, 1, 1).data;
    return `rgb(${d[0]}, ${d[1]}, ${d[2]})`;
  }, [layer, fraction] as [number, number]);
}

async function cssColour(page: Page, name: string): Promise<string> {
  return page.evaluate((n) => {
    const el = document.createElement('div');
    el.style.color = getComputedStyle(document.documentElement).getPropertyValue(`--map-${n}`);
    document.body.append(el);
    const c = getComputedStyle(el).color;
    el.remove();
    return c;
  }, name);
}

/**
 * Runs the plan shown in the open wizard: waits for the preview and an enabled Run button,
 * clicks it and waits until the dialog has closed (the job started). When any of that does not
 * happen, the error says what the dialog and the toasts showed instead.
 */
async function runPlan(page: Page, testId = 'run-job'): Promise<void> {
  const dialog = page.getByRole('dialog');
  const shown = async () => `dialog: ${(await dialog.allInnerTexts()).join(' | ').replace(/\s+/g, ' ')}; toasts: ${(await page.getByTestId('toasts').innerText()).replace(/\s+/g, ' ')}`;
  try {
    await dialog.getByTestId('plan-preview').waitFor({ timeout: 60_000 });
    await expect.poll(() => dialog.getByTestId(testId).isEnabled(), { timeout: 30_000 }).toBe(true);
    await dialog.getByTestId(testId).click({ timeout: 10_000 });
    await expect.poll(() => dialog.count(), { timeout: 60_000 }).toBe(0);
  } catch (err) {
    throw new Error(`the plan did not run (${(err as Error).message.split('\n')[0]}); ${await shown()}`);
  }
}

async function waitJob(page: Page, title: RegExp, state = 'done'): Promise<void> {
  await page.getByTestId('job-monitor').getByRole('list', { name: 'Finished jobs' }).getByText(title).first().waitFor({ timeout: 120_000 });
  const row = page.getByTestId('job-monitor').getByRole('list', { name: 'Finished jobs' }).locator('li').filter({ hasText: title }).first();
  await expect(row.getByText(state, { exact: true }).count()).resolves.toBe(1);
}

describeBrowser('the UI', () => {
  const t = tempDir('strata-ui-');
  const pool = join(t.dir, 'pool');
  const p = (n: string) => join(pool, n);
  let services: AppServices;
  let server: RunningServer;
  let browser: Browser;
  let w: WatchedPage;

  beforeAll(async () => {
    if (!haveQemu) throw new Error('these tests build their images with qemu-img');
    mkdirSync(join(pool, 'chain'), { recursive: true });
    mkdirSync(join(pool, 'archive'));
    mkdirSync(SHOTS, { recursive: true });
    qemuImg('create', '-q', '-f', 'qcow2', p('shared-base.qcow2'), '64M');
    qemuIo(p('shared-base.qcow2'), ['write -P 1 0 8M']);
    qemuImg('create', '-q', '-f', 'qcow2', '-b', 'shared-base.qcow2', '-F', 'qcow2', p('vm-a.qcow2'));
    qemuImg('create', '-q', '-f', 'qcow2', '-b', 'shared-base.qcow2', '-F', 'qcow2', p('vm-b.qcow2'));
    qemuIo(p('vm-a.qcow2'), ['write -P 2 2M 1M']);
    qemuImg('create', '-q', '-f', 'qcow2', p('chain/c1.qcow2'), '32M');
    qemuIo(p('chain/c1.qcow2'), ['write -P 3 0 4M']);
    qemuImg('create', '-q', '-f', 'qcow2', '-b', 'c1.qcow2', '-F', 'qcow2', p('chain/c2.qcow2'));
    qemuIo(p('chain/c2.qcow2'), ['write -P 4 1M 2M']);
    qemuImg('create', '-q', '-f', 'qcow2', '-b', 'c2.qcow2', '-F', 'qcow2', p('chain/c3.qcow2'));
    qemuIo(p('chain/c3.qcow2'), ['write -P 5 4M 1M']);
    qemuImg('create', '-q', '-f', 'qcow2', p('archive/moved.qcow2'), '16M');
    qemuImg('create', '-q', '-f', 'qcow2', '-u', '-b', 'moved.qcow2', '-F', 'qcow2', p('orphan.qcow2'), '16M');
    // Fully allocated, 30% live: the other 70% was written and then zeroed (clusters kept).
    qemuImg('create', '-q', '-f', 'qcow2', p('full.qcow2'), '64M');
    qemuIo(p('full.qcow2'), ['write -P 0x33 0 64M', 'write -z 19M 45M']);
    copyFileSync(p('full.qcow2'), join(t.dir, 'full-original.qcow2'));
    qemuImg('create', '-q', '-f', 'qcow2', p('snaps.qcow2'), '16M');
    qemuIo(p('snaps.qcow2'), ['write -P 6 0 1M']);
    execFileSync('sh', ['-c', `head -c ${160 * MiB} /dev/urandom > ${join(t.dir, 'rand.bin')}`]);
    qemuImg('convert', '-f', 'raw', '-O', 'qcow2', join(t.dir, 'rand.bin'), p('random.qcow2'));
    services = await AppServices.create({ dataDir: join(t.dir, 'data'), mode: 'browser', host: new ForkJobHost(join(repoRoot, 'bin', 'strata.cjs')), folders: [pool], libraryOptions: { debounceMs: 60, holdersEveryMs: 500 } });
    server = await startServer({ services, root: join(repoRoot, 'dist', 'renderer') });
    browser = await launch();
    w = await openPage(browser);
    await w.page.goto(server.url);
    await w.page.getByRole('tree', { name: 'Images and their backing chains' }).waitFor();
  });
  // A test that fails with a dialog open must not make the next ones fail on it.
  afterEach(async () => {
    for (let i = 0; i < 3 && await w?.page.getByRole('dialog').count(); i++) await w.page.keyboard.press('Escape');
  });
  afterAll(async () => {
    await w?.context.close();
    await browser?.close();
    await server?.close();
    await services?.close();
    t.cleanup();
  });

  it('draws the shared base with its two overlays and the three-deep chain with the right edges', async () => {
    const page = w.page;
    const parents = Object.fromEntries(await page.getByTestId('image-node').evaluateAll((els) => els.map((e) => [e.getAttribute('data-name'), e.getAttribute('data-parent')])));
    expect(parents).toMatchObject({ 'shared-base.qcow2': '', 'vm-a.qcow2': 'shared-base.qcow2', 'vm-b.qcow2': 'shared-base.qcow2', 'c1.qcow2': '', 'c2.qcow2': 'c1.qcow2', 'c3.qcow2': 'c2.qcow2', 'orphan.qcow2': '' });
    expect(await node(page, 'c3.qcow2').getAttribute('aria-level')).toBe('3');
    expect(await node(page, 'shared-base.qcow2').getByTestId('node-summary').textContent()).toContain('used by 2 overlays');
    await page.getByRole('treeitem', { name: /^shared-base\.qcow2.*used by 2 overlays/ }).waitFor();
    await expect(node(page, 'orphan.qcow2').getByText('backing file missing · fix').count()).resolves.toBe(1);
    await page.screenshot({ path: join(SHOTS, 'library.png') });
    expect(await axeViolations(page)).toEqual([]);
  });

  it('moves through the tree with the keyboard and opens details with Enter', async () => {
    const page = w.page;
    await node(page, 'c1.qcow2').click();
    await page.keyboard.press('ArrowRight');
    await expect(page.evaluate(() => document.activeElement?.getAttribute('data-name'))).resolves.toBe('c2.qcow2');
    await page.keyboard.press('ArrowRight');
    await page.keyboard.press('Enter');
    await page.getByTestId('details').getByRole('heading', { name: 'c3.qcow2' }).waitFor();
    await page.keyboard.press('ArrowLeft');
    await expect(page.evaluate(() => document.activeElement?.getAttribute('data-name'))).resolves.toBe('c2.qcow2');
  });

  it('repairs a missing backing file from its badge, through the plan preview', async () => {
    const page = w.page;
    await node(page, 'orphan.qcow2').getByText('backing file missing · fix').click();
    const dialog = page.getByRole('dialog');
    await dialog.getByTestId('plan-preview').waitFor();
    await expect(dialog.getByTestId('plan-command').textContent()).resolves.toBe(`strata rebase -u -b archive/moved.qcow2 -F qcow2 ${p('orphan.qcow2')}`);
    await runPlan(page, 'run-fix');
    await expect.poll(async () => node(page, 'orphan.qcow2').getAttribute('data-parent'), { timeout: 30_000 }).toBe('moved.qcow2');
    const chain = JSON.parse(qemuImg('info', '--backing-chain', '--output=json', p('orphan.qcow2'))) as { filename: string }[];
    expect(chain.map((c) => c.filename)).toEqual([p('orphan.qcow2'), p('archive/moved.qcow2')]);
    await expect(node(page, 'orphan.qcow2').getByText('backing file missing').count()).resolves.toBe(0);
    // A job over before its first record reaches the page still says it ended, in place of "started".
    const toasts = page.getByTestId('toasts');
    await toasts.getByText(/^Rebase orphan\.qcow2 .*: done$/).waitFor({ timeout: 10_000 });
    await expect(toasts.getByText(/: started$/).count()).resolves.toBe(0);
  });

  it('shows an overlay\'s chain and a base\'s dependents', async () => {
    const page = w.page;
    await node(page, 'c3.qcow2').click();
    const details = page.getByTestId('details');
    const chain = details.getByRole('list', { name: 'From this image down to its base' });
    await expect(chain.locator('li').allTextContents()).resolves.toEqual([expect.stringContaining('c3.qcow2'), expect.stringContaining('c2.qcow2'), expect.stringMatching(/c1\.qcow2.*base/)]);
    await node(page, 'shared-base.qcow2').click();
    await details.getByRole('heading', { name: 'shared-base.qcow2' }).waitFor();
    const usedBy = details.locator('section', { has: page.getByRole('heading', { name: 'Used by' }) });
    await expect(usedBy.getByRole('button').allTextContents()).resolves.toEqual(['vm-a.qcow2', 'vm-b.qcow2']);
    // With the details panel open, the three-deep chain is still seen whole: no card behind it.
    const view = (await page.getByTestId('chain-forest').boundingBox())!;
    for (const name of ['c1.qcow2', 'c2.qcow2', 'c3.qcow2']) {
      const box = (await node(page, name).boundingBox())!;
      expect(box.x + box.width, `${name} ends inside the chain view`).toBeLessThanOrEqual(view.x + view.width);
    }
  });

  it('draws the allocation map with data where qemu-io wrote it, layer by layer', async () => {
    const page = w.page;
    await node(page, 'vm-a.qcow2').click();
    await page.getByRole('tab', { name: 'Allocation' }).click();
    await page.getByTestId('map-readout').getByText(/columns of/).waitFor();
    const data = await cssColour(page, 'data');
    const unallocated = await cssColour(page, 'unallocated');
    // vm-a: its own 1 MiB at 2 MiB (of 64 MiB); the base: 8 MiB from 0.
    expect(await mapColour(page, 0, 2.5 / 64)).toBe(data);
    expect(await mapColour(page, 0, 40 / 64)).toBe(unallocated);
    expect(await mapColour(page, 1, 4 / 64)).toBe(data);
    expect(await mapColour(page, 1, 40 / 64)).toBe(unallocated);
    await page.getByTestId('allocation-map').hover({ position: { x: Math.floor(2.5 / 64 * 396), y: 20 } });
    await expect(page.getByTestId('map-readout').textContent()).resolves.toMatch(/This image, .*data/);
    await page.screenshot({ path: join(SHOTS, 'details-map.png') });
  });

  it('compacts a fully allocated image in one click: the saving, progress, a smaller clean copy', async () => {
    const page = w.page;
    const before = statSync(p('full.qcow2')).size;
    await node(page, 'full.qcow2').click({ button: 'right' });
    await page.getByRole('menuitem', { name: /Compact/ }).click();
    const dialog = page.getByRole('dialog');
    await dialog.getByTestId('plan-preview').waitFor();
    const saving = await dialog.getByText(/saves /).textContent();
    expect(saving).toMatch(/saves (4\d|5\d)(\.\d+)? MiB/);
    await page.screenshot({ path: join(SHOTS, 'wizard-preview.png') });
    expect(await axeViolations(page)).toEqual([]);
    await runPlan(page);
    await waitJob(page, /Compact full\.qcow2/);
    expectClean(p('full.qcow2'));
    expect(guestHash(p('full.qcow2'))).toBe(guestHash(join(t.dir, 'full-original.qcow2')));
    expect(statSync(p('full.qcow2')).size).toBeLessThan(before - 40 * MiB);
  });

  it('warns about the other overlay of a shared base and needs an explicit confirmation', async () => {
    const page = w.page;
    await node(page, 'vm-a.qcow2').click();
    await page.getByTestId('details').getByRole('button', { name: 'Commit into backing file' }).click();
    const dialog = page.getByRole('dialog');
    await dialog.getByRole('button', { name: 'Preview the plan' }).click();
    await dialog.getByTestId('plan-preview').waitFor();
    await expect(dialog.getByRole('heading', { name: 'Other images will read differently' }).count()).resolves.toBe(1);
    await expect(dialog.getByText('vm-b.qcow2').first().isVisible()).resolves.toBe(true);
    await expect(dialog.getByTestId('run-job').isDisabled()).resolves.toBe(true);
    await dialog.getByRole('checkbox').check();
    await expect(dialog.getByTestId('run-job').isEnabled()).resolves.toBe(true);
    await page.keyboard.press('Escape');
    await expect(page.getByRole('dialog').count()).resolves.toBe(0);
  });

  it('commits a private chain\'s top and leaves it empty, reading as before', async () => {
    const page = w.page;
    const before = guestHash(p('chain/c3.qcow2'));
    await node(page, 'c3.qcow2').click();
    await page.getByTestId('details').getByRole('button', { name: 'Commit into backing file' }).click();
    const dialog = page.getByRole('dialog');
    await dialog.getByRole('button', { name: 'Preview the plan' }).click();
    await dialog.getByTestId('plan-preview').waitFor();
    await expect(dialog.getByTestId('plan-command').textContent()).resolves.toBe(`strata commit ${p('chain/c3.qcow2')}`);
    await runPlan(page);
    await waitJob(page, /Commit c3\.qcow2/);
    expect(guestHash(p('chain/c3.qcow2'))).toBe(before);
    const own = qemuMap(`json:${JSON.stringify({ driver: 'qcow2', file: { driver: 'file', filename: p('chain/c3.qcow2') }, backing: null })}`);
    expect(own.filter((e) => e.data)).toEqual([]);
    expectClean(p('chain/c2.qcow2'));
  });

  it('creates, applies and deletes a snapshot; qemu-img agrees at each step', async () => {
    const page = w.page;
    const list = () => qemuImg('snapshot', '-l', p('snaps.qcow2'));
    await node(page, 'snaps.qcow2').click();
    await page.getByRole('tab', { name: /Snapshots/ }).click();
    await page.getByTestId('details').getByRole('button', { name: 'Create' }).click();
    const dialog = page.getByRole('dialog');
    await dialog.getByLabel('Snapshot name').fill('e2e-snap');
    await dialog.getByRole('button', { name: 'Preview the plan' }).click();
    await runPlan(page);
    await waitJob(page, /e2e-snap/);
    expect(list()).toContain('e2e-snap');
    qemuIo(p('snaps.qcow2'), ['write -P 7 0 1M']);
    await page.getByTestId('snapshot-table').getByRole('button', { name: 'Apply snapshot e2e-snap' }).click();
    await runPlan(page);
    await expect.poll(() => page.getByTestId('job-monitor').getByRole('list', { name: 'Finished jobs' }).locator('li').filter({ hasText: /apply/i }).count(), { timeout: 60_000 }).toBeGreaterThan(0);
    expect(qemuIo(p('snaps.qcow2'), ['read -P 6 0 1M'])).not.toMatch(/fail/i);
    await page.getByTestId('snapshot-table').getByRole('button', { name: 'Delete snapshot e2e-snap' }).click();
    await runPlan(page);
    // The job's own record says how it ended (and, when it did not succeed, why).
    const deleteJob = () => services.jobs.list().filter((j) => /Delete snapshot 'e2e-snap'/.test(j.title)).at(-1);
    for (const until = Date.now() + 120_000; !['succeeded', 'failed', 'cancelled'].includes(deleteJob()?.state ?? '') && Date.now() < until;) await page.waitForTimeout(200);
    const job = deleteJob();
    expect(job?.state, `delete job: ${JSON.stringify(job ? { state: job.state, waitingFor: job.waitingFor, error: job.error } : 'never started')}`).toBe('succeeded');
    expect(list()).not.toContain('e2e-snap');
    expectClean(p('snaps.qcow2'));
  });

  it('cancels a running job; the images stay consistent', async () => {
    const page = w.page;
    await node(page, 'random.qcow2').click();
    await page.getByTestId('details').getByRole('button', { name: 'Convert' }).click();
    const dialog = page.getByRole('dialog');
    await dialog.getByLabel('Target file').fill(join(t.dir, 'random-copy.qcow2'));
    await dialog.getByLabel(/Compress/).check();
    await dialog.getByRole('button', { name: 'Preview the plan' }).click();
    await runPlan(page);
    const running = page.getByTestId('running-job').filter({ hasText: 'random' });
    await running.waitFor();
    await expect.poll(async () => Number((await running.getByTestId('job-percent').textContent())?.replace('%', '')), { timeout: 30_000 }).toBeGreaterThan(0);
    await running.getByRole('button', { name: /Cancel/ }).click();
    await waitJob(page, /random/, 'cancelled');
    expectClean(p('random.qcow2'));
  });

  it('answers a click within 100 ms and updates progress at least twice a second during a 4 GiB job', async () => {
    const page = w.page;
    const big = join(t.dir, 'big4g.raw');
    qemuImg('create', '-q', '-f', 'raw', big, '4G');
    // qemu-io takes requests of up to 2 GiB.
    qemuIo(big, ['write -P 0x5a 0 1G', 'write -P 0x5a 1G 1G', 'write -P 0x5a 2G 1G', 'write -P 0x5a 3G 1G'], { format: 'raw' });
    // Every visible change of the job monitor, with its time.
    await page.evaluate(() => {
      const g = window as unknown as { __updates: number[] };
      g.__updates = [];
      new MutationObserver(() => g.__updates.push(performance.now())).observe(document.querySelector('[data-testid=job-monitor]')!, { subtree: true, childList: true, characterData: true });
    });
    const rec = await services.jobs.start({ op: 'convert', source: big, target: join(t.dir, 'big4g.qcow2'), targetFormat: 'qcow2' });
    const running = page.getByTestId('running-job').filter({ hasText: 'big4g' });
    await running.waitFor();
    const startedAt = await page.evaluate(() => performance.now());
    // From the click's input event to the frame that shows the new details.
    const latencies: number[] = [];
    for (const name of ['vm-a.qcow2', 'c1.qcow2', 'snaps.qcow2', 'vm-b.qcow2', 'c2.qcow2', 'shared-base.qcow2']) {
      await page.evaluate((n) => {
        const g = window as unknown as { __latency: Promise<number> };
        g.__latency = new Promise<number>((resolve) => {
          let start = 0;
          document.addEventListener('click', (e) => { start = e.timeStamp; }, { capture: true, once: true });
          const check = () => {
            if (start && document.querySelector('[data-testid=details] h2')?.textContent === n) requestAnimationFrame(() => resolve(performance.now() - start));
            else requestAnimationFrame(check);
          };
          requestAnimationFrame(check);
        });
      }, name);
      await node(page, name).click();
      latencies.push(await page.evaluate(() => (window as unknown as { __latency: Promise<number> }).__latency));
    }
    await page.screenshot({ path: join(SHOTS, 'job-monitor.png') });
    await expect.poll(() => services.jobs.list().find((j) => j.id === rec.id)?.state, { timeout: 300_000 }).toBe('succeeded');
    const endedAt = await page.evaluate(() => performance.now());
    // The typical click is answered within 100 ms; on a machine as busy as a test run, where
    // other test files compete for the CPU too, one may wait for the scheduler a little longer.
    const said = `click latencies ${latencies.map((l) => l.toFixed(0)).join(', ')} ms`;
    expect([...latencies].sort((a, b) => a - b)[latencies.length >> 1], said).toBeLessThan(100);
    expect(Math.max(...latencies), said).toBeLessThan(300);
    // Updates while it ran (those within 50 ms of each other count once).
    const updates = (await page.evaluate(() => (window as unknown as { __updates: number[] }).__updates)).filter((u) => u >= startedAt && u <= endedAt);
    const distinct = updates.filter((u, i) => i === 0 || u - updates[i - 1]! > 50);
    const seconds = (endedAt - startedAt) / 1000;
    console.log(`[ui during a 4 GiB job] ${said}; ${distinct.length} progress updates in ${seconds.toFixed(1)} s`);
    expect(seconds, 'the job ran long enough to measure').toBeGreaterThan(1);
    expect(distinct.length / seconds, `${distinct.length} updates in ${seconds.toFixed(1)} s`).toBeGreaterThanOrEqual(2);
    expectClean(join(t.dir, 'big4g.qcow2'));
  });

  it('has no serious accessibility problems in the dark theme either, and no console errors at all', async () => {
    const dark = await openPage(browser, { colorScheme: 'dark' });
    try {
      await dark.page.goto(server.url);
      await dark.page.getByRole('tree', { name: 'Images and their backing chains' }).waitFor();
      // A page opened later shows the library as it stands (the repair made earlier included).
      await expect(node(dark.page, 'orphan.qcow2').getAttribute('data-parent')).resolves.toBe('moved.qcow2');
      await expect(dark.page.evaluate(() => document.documentElement.classList.contains('dark'))).resolves.toBe(true);
      await node(dark.page, 'vm-a.qcow2').click();
      expect(await axeViolations(dark.page)).toEqual([]);
      await dark.page.getByRole('button', { name: 'Jobs' }).click();
      expect(await axeViolations(dark.page)).toEqual([]);
      await dark.page.screenshot({ path: join(SHOTS, 'dark.png') });
      expect(dark.errors).toEqual([]);
    } finally {
      await dark.context.close();
    }
    expect(w.errors).toEqual([]);
  });
});
