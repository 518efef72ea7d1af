// `npm start` on a machine without a desktop window (no display, or no Electron binary, as in
// CI): it says so in one line, starts browser mode on a sample library (no folders chosen yet),
// prints the URL, and that URL opens a usable app in Chromium. Ctrl-C ends it cleanly (exit 130,
// as every strata command interrupted by SIGINT).
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdirSync, readdirSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, expect, it } from 'vitest';
import type { Browser } from 'playwright-core';
import { tempDir } from '../oracle/qemu';
import { repoRoot } from '../cli/run-cli';
import { describeBrowser, launch, openPage } from './browser';

describeBrowser('npm start without a desktop window', () => {
  const t = tempDir('strata-start-');
  let child: ChildProcess | undefined;
  let browser: Browser | undefined;
  afterAll(async () => {
    await browser?.close();
    // The whole group: npm start's browser mode is a child of its own.
    if (child?.pid && child.exitCode === null) try { process.kill(-child.pid, 'SIGKILL'); } catch { /* gone */ }
    t.cleanup();
  });

  it('says why, serves the sample library in the browser, and stops on Ctrl-C', async () => {
    const tmp = join(t.dir, 'tmp');
    mkdirSync(tmp);
    const env: NodeJS.ProcessEnv = { ...process.env, STRATA_DATA_DIR: join(t.dir, 'data'), TMPDIR: tmp, ELECTRON_SKIP_BINARY_DOWNLOAD: '1', BROWSER: 'none' };
    delete env.DISPLAY;
    delete env.WAYLAND_DISPLAY;
    child = spawn(process.execPath, [join(repoRoot, 'scripts', 'start.mjs')], { cwd: repoRoot, env, stdio: ['ignore', 'pipe', 'pipe'], detached: true });
    let out = '';
    let err = '';
    child.stderr!.on('data', (d) => { err += d; });
    const url = await new Promise<string>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`no URL after 60 s; stdout: ${out}\nstderr: ${err}`)), 60_000);
      child!.stdout!.on('data', (d) => {
        out += d;
        const m = /Strata is at (http:\/\/127\.0\.0\.1:\d+\/\S+)/.exec(out);
        if (m) { clearTimeout(timer); resolve(m[1]!); }
      });
      child!.on('exit', (code) => { clearTimeout(timer); reject(new Error(`npm start exited ${code}; stdout: ${out}\nstderr: ${err}`)); });
    });
    expect(out.split('\n')[0]).toMatch(/^Strata: no desktop window, since .+; starting browser mode instead with a sample library\.$/);
    expect(url).toMatch(/[?&]token=[A-Za-z0-9_-]{24,}/);
    const demo = readdirSync(tmp).filter((f) => f.startsWith('strata-demo-'));
    expect(demo).toHaveLength(1);
    expect(existsSync(join(tmp, demo[0]!, 'debian-12-base.qcow2'))).toBe(true);

    browser = await launch();
    const w = await openPage(browser);
    await w.page.goto(url);
    await w.page.getByRole('tree', { name: 'Images and their backing chains' }).waitFor();
    await w.page.getByRole('treeitem', { name: /^debian-12-base\.qcow2.*used by 2 overlays/ }).waitFor();
    await expect(w.page.getByTestId('image-node').filter({ has: w.page.getByText('backing file missing · fix') }).count()).resolves.toBe(1);
    expect(w.errors).toEqual([]);
    await w.context.close();

    const code = await new Promise<number | null>((resolve) => {
      child!.on('exit', (c) => resolve(c));
      child!.kill('SIGINT');
    });
    expect(code, err).toBe(130); // as every strata command interrupted by SIGINT, after a clean stop
    expect(err).not.toMatch(/Error|at .*\(/);
  });
});
