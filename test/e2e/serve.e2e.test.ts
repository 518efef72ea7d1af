// Browser mode: without the token every HTTP and WebSocket request is refused, a foreign Host
// or Origin is refused, the server listens on loopback only; with the token the page loads in
// Chromium and lists the folder's images, a missing backing file flagged, no console errors.
import { request } from 'node:http';
import { networkInterfaces } from 'node:os';
import { join } from 'node:path';
import { mkdirSync } from 'node:fs';
import { afterAll, beforeAll, expect, it } from 'vitest';
import WebSocket from 'ws';
import type { Browser } from 'playwright-core';
import { qemuImg, qemuIo, tempDir, haveQemu } from '../oracle/qemu';
import { repoRoot } from '../cli/run-cli';
import { AppServices } from '../../main/services/app-services';
import { ForkJobHost } from '../../main/services/job-host';
import { startServer, TOKEN_COOKIE, type RunningServer } from '../../main/server/http-server';
import { describeBrowser, launch, openPage } from './browser';

function get(port: number, path: string, headers: Record<string, string> = {}, host = '127.0.0.1'): Promise<{ status: number; headers: Record<string, string | string[] | undefined>; body: string }> {
  return new Promise((resolve, reject) => {
    const req = request({ host, port, path, headers: { host: `127.0.0.1:${port}`, ...headers } }, (res) => {
      let body = '';
      res.on('data', (d) => { body += d; });
      res.on('end', () => resolve({ status: res.statusCode!, headers: res.headers, body }));
    });
    req.on('error', reject);
    req.end();
  });
}

function wsStatus(port: number, headers: Record<string, string>): Promise<number | 'open'> {
  return new Promise((resolve) => {
    const ws = new WebSocket(`ws://127.0.0.1:${port}/ws`, { headers });
    ws.on('open', () => { ws.close(); resolve('open'); });
    ws.on('unexpected-response', (_req, res) => resolve(res.statusCode!));
    ws.on('error', () => resolve(-1));
  });
}

describeBrowser('browser mode (strata serve)', () => {
  const t = tempDir('strata-serve-');
  const pool = join(t.dir, 'pool');
  let services: AppServices;
  let server: RunningServer;
  let browser: Browser;
  let cookie: string;
  let origin: string;

  beforeAll(async () => {
    mkdirSync(pool);
    if (!haveQemu) throw new Error('these tests build their images with qemu-img');
    qemuImg('create', '-q', '-f', 'qcow2', join(pool, 'base.qcow2'), '64M');
    qemuIo(join(pool, 'base.qcow2'), ['write -P 1 0 4M']);
    qemuImg('create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', join(pool, 'vm1.qcow2'));
    qemuImg('create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', join(pool, 'vm2.qcow2'));
    qemuImg('create', '-q', '-f', 'qcow2', '-u', '-b', 'lost-base.qcow2', '-F', 'qcow2', join(pool, 'orphan.qcow2'), '64M');
    services = await AppServices.create({ dataDir: join(t.dir, 'data'), mode: 'browser', host: new ForkJobHost(join(repoRoot, 'bin', 'strata.cjs')), folders: [pool], libraryOptions: { holdersEveryMs: 0 } });
    server = await startServer({ services, root: join(repoRoot, 'dist', 'renderer') });
    cookie = `${TOKEN_COOKIE}=${server.token}`;
    origin = `http://127.0.0.1:${server.port}`;
    browser = await launch();
  });
  afterAll(async () => {
    await browser?.close();
    await server?.close();
    await services?.close();
    t.cleanup();
  });

  it('listens on loopback only', async () => {
    const addr = server.server.address();
    expect(typeof addr === 'object' && addr?.address).toBe('127.0.0.1');
    const other = Object.values(networkInterfaces()).flat().find((i) => i && i.family === 'IPv4' && !i.internal);
    if (other) await expect(get(server.port, '/', { cookie }, other.address)).rejects.toThrow(/ECONNREFUSED/);
  });

  it('refuses every request without the token, and with a wrong one', async () => {
    for (const path of ['/', '/index.html', '/assets/x.js', '/?token=wrong', `/?token=${server.token}x`]) {
      const r = await get(server.port, path);
      expect(r.status, path).toBe(401);
    }
    expect((await get(server.port, '/', { cookie: `${TOKEN_COOKIE}=nope` })).status).toBe(401);
    expect(await wsStatus(server.port, { origin })).toBe(401);
    expect(await wsStatus(server.port, { origin, cookie: `${TOKEN_COOKIE}=nope` })).toBe(401);
  });

  it('trades the URL token for an HttpOnly SameSite=Strict cookie, then serves the page with its CSP', async () => {
    const r = await get(server.port, `/?token=${server.token}`);
    expect(r.status).toBe(303);
    expect(r.headers.location).toBe('/');
    expect(String(r.headers['set-cookie'])).toMatch(new RegExp(`^${TOKEN_COOKIE}=${server.token}; HttpOnly; SameSite=Strict; Path=/$`));
    const page = await get(server.port, '/', { cookie });
    expect(page.status).toBe(200);
    expect(page.body).toContain('<div id="root">');
    expect(page.headers['content-security-policy']).toContain("script-src 'self'");
    expect(await wsStatus(server.port, { origin, cookie })).toBe('open');
  });

  it('refuses a foreign Host or Origin, even with the token', async () => {
    expect((await get(server.port, '/', { cookie, host: `evil.example:${server.port}` })).status).toBe(403);
    expect((await get(server.port, '/', { cookie, origin: 'http://evil.example' })).status).toBe(403);
    expect((await get(server.port, `/?token=${server.token}`, { host: 'attacker.example' })).status).toBe(403);
    expect(await wsStatus(server.port, { cookie, origin: 'http://evil.example' })).toBe(403);
    // A WebSocket needs an Origin at all: a non-browser client without one is refused too.
    expect(await wsStatus(server.port, { cookie })).toBe(403);
    expect(await wsStatus(server.port, { cookie, origin, host: `localhost.evil:${server.port}` })).toBe(403);
  });

  it('with the token the page lists the images in Chromium, the missing backing file flagged', async () => {
    const { page, errors, context } = await openPage(browser);
    try {
      await page.goto(server.url);
      await page.getByRole('tree', { name: 'Images and their backing chains' }).waitFor();
      const names = await page.getByTestId('image-node').evaluateAll((els) => els.map((e) => e.getAttribute('data-name')));
      expect(names.sort()).toEqual(['base.qcow2', 'orphan.qcow2', 'vm1.qcow2', 'vm2.qcow2']);
      const orphan = page.locator('[data-testid=image-node][data-name="orphan.qcow2"]');
      await expect(orphan.getByText('backing file missing')).toBeTruthy();
      // What a screen reader hears after the name.
      expect(await orphan.getByTestId('node-summary').textContent()).toContain('backing file missing');
      expect(page.url()).toBe(`${origin}/`);
      expect(errors).toEqual([]);
    } finally {
      await context.close();
    }
  });
});
