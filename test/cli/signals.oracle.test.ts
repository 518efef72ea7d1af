// Ctrl-C: the first SIGINT cancels the command through its signal and lets it finish cleanly
// (what is in flight completes, the image is flushed and its dirty bit cleared), then strata
// exits 130; no timer cuts that short. A second SIGINT ends the process at once.
import { spawn } from 'node:child_process';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { interruptStatus, signalHandler } from '../../cli/main';
import { describeOracle, qemuCheck, qemuImg, tempDir } from '../oracle/qemu';
import { ensureBuilt, repoRoot } from './run-cli';
import { qemuIoMismatches } from '../core/jobs/helpers';

describe('signal handling', () => {
  it('the first signal cancels through the job\'s signal, a second exits at once', () => {
    const ac = new AbortController();
    const exits: number[] = [];
    const on = signalHandler(ac, (code) => exits.push(code));
    on('SIGINT');
    expect(ac.signal.aborted).toBe(true);
    expect(exits).toEqual([]);
    expect(interruptStatus(ac.signal)).toBe(130);
    on('SIGINT');
    expect(exits).toEqual([130]);
  });

  it('SIGTERM: exit status 143', () => {
    const ac = new AbortController();
    const exits: number[] = [];
    const on = signalHandler(ac, (code) => exits.push(code));
    on('SIGTERM');
    expect(interruptStatus(ac.signal)).toBe(143);
    on('SIGTERM');
    expect(exits).toEqual([143]);
  });
});

describeOracle('SIGINT to a running strata', () => {
  const t = tempDir('strata-sigint-');
  beforeAll(() => ensureBuilt());
  afterAll(() => t.cleanup());

  it('io: stops between commands, closes the image cleanly (dirty bit cleared), exits 130', async () => {
    const img = t.path('lazy.qcow2');
    // Lazy refcounts: the dirty bit is set while strata writes and cleared when it closes.
    qemuImg('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4k,lazy_refcounts=on', img, '64M');
    const n = 4000;
    const args: string[] = ['io'];
    for (let i = 0; i < n; i++) args.push('-c', `write -P ${1 + (i % 250)} ${i * 8192} 4k`, '-c', 'flush');
    args.push(img);
    const child = spawn(process.execPath, [join(repoRoot, 'bin', 'strata.cjs'), ...args], { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, STRATA_DEBUG: undefined } });
    let out = '';
    let err = '';
    child.stdout!.on('data', (d: Buffer) => { out += d.toString(); });
    child.stderr!.on('data', (d: Buffer) => { err += d.toString(); });
    const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
    // Interrupt once it has written for a while (its output shows progress).
    const t0 = Date.now();
    while (!/wrote/.test(out) && Date.now() - t0 < 20_000) await new Promise((r) => setTimeout(r, 20));
    await new Promise((r) => setTimeout(r, 300));
    const sent = Date.now();
    child.kill('SIGINT');
    const code = await exited;
    const ms = Date.now() - sent;
    const done = out.split('\n').filter((l) => l.startsWith('wrote ')).length;
    console.log(`[sigint] io: exit ${code} ${ms} ms after SIGINT, ${done}/${n} writes done; stderr ${JSON.stringify(err)}`);
    expect({ code, err }).toEqual({ code: 130, err: 'strata: io cancelled\n' });
    expect(done).toBeGreaterThan(0);
    expect(done).toBeLessThan(n);
    const info = JSON.parse(qemuImg('info', '--output=json', img)) as { 'dirty-flag': boolean };
    expect(info['dirty-flag']).toBe(false);
    const c = qemuCheck(img);
    expect({ status: c.status, leaks: c.json.leaks ?? 0, corruptions: c.json.corruptions ?? 0 }).toEqual({ status: 0, leaks: 0, corruptions: 0 });
    // Every write it reported is in the image.
    const reads: string[] = [];
    for (let i = 0; i < done; i += Math.max(1, Math.floor(done / 200))) reads.push(`read -P ${1 + (i % 250)} ${i * 8192} 4k`);
    expect(qemuIoMismatches(img, reads)).toEqual([]);
  }, 60_000);
});
