// Cancelling block jobs: convert and mirror stop midway through their AbortSignal (aborted from
// the progress callback at ~30%) and through SIGINT to the real CLI (node bin/strata.cjs). The
// job stops promptly, the CLI exits non-zero with one error line, the source is untouched, a
// target the job created is removed and an existing target (-n) stays, still a valid image.
import { spawn } from 'node:child_process';
import { closeSync, existsSync, fsyncSync, openSync, statSync, writeSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { describeOracle, qemuCheck, qemuImg, tempDir } from '../../oracle/qemu';
import { run } from '../../../cli/main';
import { convert } from '../../../core/jobs/convert';
import { mirror } from '../../../core/jobs/mirror';
import { openTarget } from '../../../core/jobs/target';
import type { Progress } from '../../../core/jobs/job';
import { closeChain, openImage } from '../../../core/chain/open';
import { CancelledError } from '../../../core/errors';
import { fileHash, MiB, randomBytes } from './helpers';
import { ensureBuilt } from '../../cli/run-cli';

const repoRoot = join(dirname(fileURLToPath(import.meta.url)), '..', '..', '..');
const SRC_SIZE = 512 * MiB;

/** 512 MiB of data everywhere (a random 4 MiB block, stamped with its index), as a raw file. */
function writeDataSource(path: string): void {
  const block = randomBytes(7, 4 * MiB);
  const fd = openSync(path, 'w');
  try {
    for (let i = 0; i < SRC_SIZE / block.length; i++) {
      block.writeUInt32LE(i, 0);
      writeSync(fd, block, 0, block.length, i * block.length);
    }
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
}

/** Aborts once bytesDone passes 30% of bytesTotal; records what it saw. */
function abortAt30() {
  const ac = new AbortController();
  const events: Progress[] = [];
  let abortedAt = 0;
  const progress = (p: Progress) => {
    events.push(p);
    if (!ac.signal.aborted && p.bytesTotal > 0 && p.bytesDone > 0.3 * p.bytesTotal && p.phase !== 'scanning target') {
      abortedAt = Date.now();
      ac.abort();
    }
  };
  return { ac, events, progress, abortedAt: () => abortedAt };
}

/** qemu-img check: no corruptions (leaked clusters are allowed after a cancel). */
function expectNoCorruption(file: string): void {
  const r = qemuCheck(file);
  expect({ file, status: r.status === 0 || r.status === 3 ? 'ok' : r.status, corruptions: r.json.corruptions ?? 0, errors: r.json['check-errors'] ?? 0 })
    .toEqual({ file, status: 'ok', corruptions: 0, errors: 0 });
}

interface Interrupted { code: number | null; signal: NodeJS.Signals | null; stderr: string; stdout: string; exitMsAfterSignal: number; startedMs: number }

/**
 * Spawns `node bin/strata.cjs ARGS`, waits until the job visibly runs (`started()` turns true,
 * polled every 20 ms: the target appeared or grew) and then `delayMs` more, sends SIGINT and
 * waits for the exit. Fails when the process ended before the signal could be sent.
 */
async function interrupt(args: string[], started: () => boolean, delayMs = 20): Promise<Interrupted> {
  const t0 = Date.now();
  const child = spawn(process.execPath, [join(repoRoot, 'bin', 'strata.cjs'), ...args], {
    cwd: repoRoot, env: { ...process.env, STRATA_DEBUG: undefined }, stdio: ['ignore', 'pipe', 'pipe'],
  });
  let stdout = '';
  let stderr = '';
  child.stdout.on('data', (d: Buffer) => { stdout += d.toString(); });
  child.stderr.on('data', (d: Buffer) => { stderr += d.toString(); });
  let exited = false;
  const exit = new Promise<{ code: number | null; signal: NodeJS.Signals | null; at: number }>((resolve) => {
    child.on('exit', (code, signal) => { exited = true; resolve({ code, signal, at: Date.now() }); });
  });
  const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
  while (!exited && !started() && Date.now() - t0 < 20_000) await sleep(20);
  const startedMs = Date.now() - t0;
  await sleep(delayMs);
  if (exited) throw new Error(`strata ${args.join(' ')} finished before it could be interrupted (after ${Date.now() - t0} ms): ${stderr}`);
  const sentAt = Date.now();
  child.kill('SIGINT');
  const e = await exit;
  return { code: e.code, signal: e.signal, stderr, stdout, exitMsAfterSignal: e.at - sentAt, startedMs };
}

function expectCleanInterrupt(r: Interrupted, what: string): void {
  console.log(`[cancel] ${what}: exit ${r.code ?? r.signal} ${r.exitMsAfterSignal} ms after SIGINT (job seen running after ${r.startedMs} ms); stderr ${JSON.stringify(r.stderr)}`);
  const lines = r.stderr.split('\n').filter((l) => l.trim() !== '');
  expect({
    what,
    exitedBySignal: r.signal,
    nonZero: r.code !== 0 && r.code !== null,
    prompt: r.exitMsAfterSignal <= 2000,
    errorLines: lines.length,
    stackTrace: /\n\s+at /.test(r.stderr),
    stdout: r.stdout,
  }).toEqual({ what, exitedBySignal: null, nonZero: true, prompt: true, errorLines: 1, stackTrace: false, stdout: '' });
  expect(lines[0]).toMatch(/^strata: .*cancel/i);
}

describeOracle('cancelling convert and mirror', () => {
  const t = tempDir('strata-cancel-');
  const src = t.path('src.raw');
  let srcHash = '';

  beforeAll(() => {
    ensureBuilt();
    writeDataSource(src);
    srcHash = fileHash(src);
  });
  afterAll(() => t.cleanup());

  it('convert: aborting the signal at ~30% stops it and removes the created target', async () => {
    const dst = t.path('conv-abort.qcow2');
    const a = abortAt30();
    const img = await openImage(src, { format: 'raw' });
    let err: unknown;
    let endedAt = 0;
    try {
      await convert({ signal: a.ac.signal, progress: a.progress }, img, dst, { format: 'qcow2' });
    } catch (e) {
      err = e;
    } finally {
      endedAt = Date.now();
      await closeChain(img);
    }
    console.log(`[cancel] convert via signal: ${a.events.length} events, aborted at ${a.events.at(-1)?.bytesDone} of ${SRC_SIZE}, rejected ${endedAt - a.abortedAt()} ms later`);
    expect(a.ac.signal.aborted).toBe(true);
    expect(err).toBeInstanceOf(CancelledError);
    expect(endedAt - a.abortedAt()).toBeLessThan(2000);
    // Midway: no event after the abort reports completion.
    expect(a.events.at(-1)!.bytesDone).toBeLessThan(SRC_SIZE);
    expect(existsSync(dst)).toBe(false);
  });

  it('convert -n: aborting the signal keeps the existing target, without corruption', async () => {
    const dst = t.path('conv-abort-n.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', dst, String(SRC_SIZE));
    const a = abortAt30();
    const img = await openImage(src, { format: 'raw' });
    let err: unknown;
    try {
      await convert({ signal: a.ac.signal, progress: a.progress }, img, dst, { format: 'qcow2', existing: true });
    } catch (e) {
      err = e;
    } finally {
      await closeChain(img);
    }
    expect(err).toBeInstanceOf(CancelledError);
    expect(existsSync(dst)).toBe(true);
    expectNoCorruption(dst);
  });

  it('mirror: aborting the signal at ~30% stops it; the target it was given stays consistent', async () => {
    const dst = t.path('mirror-abort.qcow2');
    const a = abortAt30();
    const img = await openImage(src, { format: 'raw' });
    let err: unknown;
    let endedAt = 0;
    try {
      const target = await openTarget(dst, img.virtualSize, { format: 'qcow2' });
      try {
        await mirror({ signal: a.ac.signal, progress: a.progress }, img, target.image, { sync: 'full', targetIsFresh: true });
      } catch (e) {
        err = e;
        endedAt = Date.now();
      } finally {
        await closeChain(target.image);
      }
    } finally {
      await closeChain(img);
    }
    console.log(`[cancel] mirror via signal: ${a.events.length} events, rejected ${endedAt - a.abortedAt()} ms after the abort`);
    expect(err).toBeInstanceOf(CancelledError);
    expect(endedAt - a.abortedAt()).toBeLessThan(2000);
    expect(a.events.at(-1)!.bytesDone).toBeLessThan(SRC_SIZE);
    expectNoCorruption(dst);
  });

  it('strata mirror in-process: aborting at ~30% (seen through -p on a TTY) exits 1 with one line and removes the target', async () => {
    const dst = t.path('mirror-cli-abort.qcow2');
    const ac = new AbortController();
    let out = '';
    let err = '';
    const io = {
      out: (s: string) => { out += s; },
      err: (s: string) => {
        // The -p bar: "\r[####----] 31.2% ..."; abort past 30%.
        const m = /\]\s+([\d.]+)%/.exec(s);
        if (m && Number(m[1]) > 30 && Number(m[1]) < 100) ac.abort();
        else if (!m) err += s;
      },
      isTTY: true,
    };
    const code = await run(['mirror', '-p', '-O', 'qcow2', src, dst], io, ac.signal);
    expect(ac.signal.aborted).toBe(true);
    expect({ code, out, lines: err.trim().split('\n').length }).toEqual({ code: 1, out: '', lines: 1 });
    expect(err).toMatch(/^strata: .*cancel/i);
    expect(existsSync(dst)).toBe(false);
  });

  it('SIGINT to `strata convert -O qcow2`: prompt non-zero exit, one error line, target removed', async () => {
    const dst = t.path('sigint-convert.qcow2');
    const r = await interrupt(['convert', '-O', 'qcow2', src, dst], () => existsSync(dst));
    expectCleanInterrupt(r, 'convert');
    expect(existsSync(dst)).toBe(false);
  });

  it('SIGINT to `strata convert -n`: the existing target stays, without corruption', async () => {
    const dst = t.path('sigint-convert-n.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', dst, String(SRC_SIZE));
    const size0 = statSync(dst).size;
    const r = await interrupt(['convert', '-n', '-O', 'qcow2', src, dst], () => statSync(dst).size > size0);
    expectCleanInterrupt(r, 'convert -n');
    expect(existsSync(dst)).toBe(true);
    expectNoCorruption(dst);
  });

  it('SIGINT to `strata mirror -O qcow2`: prompt non-zero exit, one error line, target removed', async () => {
    const dst = t.path('sigint-mirror.qcow2');
    // Mirror is quick: signal it as soon as it has created its target.
    const r = await interrupt(['mirror', '-O', 'qcow2', src, dst], () => existsSync(dst), 20);
    expectCleanInterrupt(r, 'mirror');
    expect(existsSync(dst)).toBe(false);
  });

  it('SIGINT to `strata mirror -n`: the existing target stays, without corruption', async () => {
    const dst = t.path('sigint-mirror-n.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', dst, String(SRC_SIZE));
    const size0 = statSync(dst).size;
    const r = await interrupt(['mirror', '-n', '-O', 'qcow2', src, dst], () => statSync(dst).size > size0);
    expectCleanInterrupt(r, 'mirror -n');
    expect(existsSync(dst)).toBe(true);
    expectNoCorruption(dst);
  });

  it('SIGINT to `strata mirror` to raw: the created raw target is removed', async () => {
    const dst = t.path('sigint-mirror.raw');
    const r = await interrupt(['mirror', src, dst], () => existsSync(dst) && statSync(dst).blocks > 0);
    expectCleanInterrupt(r, 'mirror (raw)');
    expect(existsSync(dst)).toBe(false);
  });

  it('the source is byte-identical after all the cancelled jobs', () => {
    expect(fileHash(src)).toBe(srcHash);
  });
});
