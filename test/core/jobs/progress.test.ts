// Job progress events, as the CLI and the GUI consume them: throttled at the source (~10 per
// second), each with a phase, a monotonic bytesDone, bytesTotal and elapsedMs, and a final event
// with bytesDone == bytesTotal; `-p` adds nothing to the output when stdout is not a TTY.
// Strata alone: raw sources are plain files, so qemu-img is not needed here.
import { closeSync, fsyncSync, openSync, writeSync } from 'node:fs';
import { afterAll, beforeAll, expect, it, describe } from 'vitest';
import { tempDir } from '../../oracle/qemu';
import { run } from '../../../cli/main';
import { convert } from '../../../core/jobs/convert';
import { mirror } from '../../../core/jobs/mirror';
import { openTarget } from '../../../core/jobs/target';
import type { Progress } from '../../../core/jobs/job';
import { closeChain, openImage } from '../../../core/chain/open';
import { MiB, randomBytes } from './helpers';

const SIZE = 256 * MiB;

/** 256 MiB raw: data in most of it (a random 1 MiB block, stamped), 32 MiB holes at two places. */
function writeSource(path: string): void {
  const block = randomBytes(3, MiB);
  const fd = openSync(path, 'w');
  try {
    for (let i = 0; i < SIZE / MiB; i++) {
      if ((i >= 64 && i < 96) || (i >= 200 && i < 232)) continue;
      block.writeUInt32LE(i, 0);
      writeSync(fd, block, 0, block.length, i * MiB);
    }
    writeSync(fd, Buffer.alloc(1), 0, 1, SIZE - 1);
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
}

interface Run { events: Progress[]; ms: number }

async function collect(job: (progress: (p: Progress) => void) => Promise<unknown>): Promise<Run> {
  const events: Progress[] = [];
  const t0 = Date.now();
  await job((p) => { events.push({ ...p }); });
  return { events, ms: Date.now() - t0 };
}

/** The properties every job's event stream must have. */
function expectWellFormed(r: Run, total: number, phases: string[]): void {
  const { events, ms } = r;
  // About 10 a second, plus the events that are never held back: each phase's first, the last.
  const perSecondLimit = 15 * (ms / 1000) + phases.length + 1;
  const summary = events.map((e) => `${e.phase}:${e.bytesDone}/${e.bytesTotal}@${e.elapsedMs}`);
  expect(events.length, summary.join(' ')).toBeGreaterThan(0);
  // Throttled: well under one event per progress step.
  expect({ events: events.length, ms, withinLimit: events.length <= perSecondLimit }).toEqual({ events: events.length, ms, withinLimit: true });
  // The phases come in order, each named.
  const seen = events.map((e) => e.phase).filter((p, i, a) => i === 0 || a[i - 1] !== p);
  expect(seen).toEqual(phases);
  for (let i = 0; i < events.length; i++) {
    const e = events[i]!;
    expect(typeof e.phase === 'string' && e.phase.length > 0).toBe(true);
    expect(Number.isInteger(e.bytesDone) && e.bytesDone >= 0 && e.bytesDone <= e.bytesTotal, summary[i]).toBe(true);
    expect(e.elapsedMs).toBeGreaterThanOrEqual(0);
    if (i > 0) {
      const p = events[i - 1]!;
      expect(e.elapsedMs, summary.slice(i - 1, i + 1).join(' -> ')).toBeGreaterThanOrEqual(p.elapsedMs);
      if (p.phase === e.phase) expect(e.bytesDone, summary.slice(i - 1, i + 1).join(' -> ')).toBeGreaterThanOrEqual(p.bytesDone);
    }
  }
  const last = events[events.length - 1]!;
  expect({ phase: last.phase, bytesDone: last.bytesDone, bytesTotal: last.bytesTotal }, `last of: ${summary.slice(-4).join(' ')}`)
    .toEqual({ phase: phases[phases.length - 1], bytesDone: total, bytesTotal: total });
  expect(last.elapsedMs).toBeLessThanOrEqual(ms + 50);
}

describe('job progress events', () => {
  const t = tempDir('strata-progress-');
  const src = t.path('src.raw');
  beforeAll(() => writeSource(src));
  afterAll(() => t.cleanup());

  it('convert (lasting over a second): throttled, monotonic, final event complete', async () => {
    const dst = t.path('conv.raw');
    const img = await openImage(src, { format: 'raw' });
    try {
      // Small windows, one at a time, each read delayed a little: thousands of progress steps
      // over more than a second however fast the machine is.
      // (convert reads through readPlan when the native addon is there, img.read otherwise.)
      const read = img.read.bind(img);
      img.read = async (buf, off) => { await new Promise((r) => setTimeout(r, 1)); return read(buf, off); };
      const plan = img.readPlan?.bind(img);
      if (plan) img.readPlan = async (off, len) => { await new Promise((r) => setTimeout(r, 1)); return plan(off, len); };
      const r = await collect((progress) => convert({ progress }, img, dst, { format: 'raw', chunkSize: 128 * 1024, parallel: 1 }));
      console.log(`[progress] convert: ${r.events.length} events over ${r.ms} ms; last ${JSON.stringify(r.events.at(-1))}`);
      expect(r.ms).toBeGreaterThan(1000);
      expectWellFormed(r, SIZE, ['converting']);
    } finally {
      await closeChain(img);
    }
  });

  it('mirror to a fresh target: throttled, monotonic, final event complete', async () => {
    const dst = t.path('mirror.qcow2');
    const img = await openImage(src, { format: 'raw' });
    try {
      const target = await openTarget(dst, img.virtualSize, { format: 'qcow2' });
      try {
        const read = img.read.bind(img);
        img.read = async (buf, off) => { await new Promise((r) => setTimeout(r, 1)); return read(buf, off); };
        const r = await collect((progress) => mirror({ progress }, img, target.image, { targetIsFresh: true, chunkSize: 128 * 1024, parallel: 1 }));
        console.log(`[progress] mirror: ${r.events.length} events over ${r.ms} ms`);
        expect(r.ms).toBeGreaterThan(1000);
        expectWellFormed(r, SIZE, ['mirroring']);
      } finally {
        await closeChain(target.image);
      }
    } finally {
      await closeChain(img);
    }
  });

  it('mirror onto an existing target: a scanning phase, then mirroring, each monotonic', async () => {
    const dst = t.path('mirror.qcow2');
    const img = await openImage(src, { format: 'raw' });
    try {
      const target = await openTarget(dst, img.virtualSize, { format: 'qcow2', existing: true });
      try {
        const r = await collect((progress) => mirror({ progress }, img, target.image, { targetIsFresh: false, chunkSize: 64 * 1024, parallel: 1 }));
        console.log(`[progress] mirror -n: ${r.events.length} events over ${r.ms} ms`);
        expectWellFormed(r, SIZE, ['scanning target', 'mirroring']);
        for (const e of r.events) expect(e.bytesTotal).toBe(SIZE);
      } finally {
        await closeChain(target.image);
      }
    } finally {
      await closeChain(img);
    }
  });

  async function cli(argv: string[], isTTY: boolean): Promise<{ code: number; out: string; err: string }> {
    let out = '';
    let err = '';
    const code = await run(argv, { out: (s) => { out += s; }, err: (s) => { err += s; }, isTTY }, new AbortController().signal);
    return { code, out, err };
  }

  it('strata mirror -p prints nothing when stdout is not a TTY', async () => {
    const r = await cli(['mirror', '-p', '-O', 'qcow2', src, t.path('mirror-p.qcow2')], false);
    expect(r).toEqual({ code: 0, out: '', err: '' });
  });

  it('strata convert -p when stdout is not a TTY prints qemu-img\'s (NN.NN/100%) lines on stdout', async () => {
    const r = await cli(['convert', '-p', '-O', 'qcow2', src, t.path('convert-p.qcow2')], false);
    expect(r.code).toBe(0);
    expect(r.err).toBe('');
    expect(r.out).toMatch(/^ {4}\(0\.00\/100%\)\r( {4}\(\d{1,3}\.\d\d\/100%\)\r)* {4}\(100\.00\/100%\)\r\n$/);
  });

  for (const cmd of ['convert', 'mirror'] as const) {

    it(`strata ${cmd} -p on a TTY shows a bar that ends at 100%`, async () => {
      const r = await cli([cmd, '-p', '-O', 'qcow2', src, t.path(`${cmd}-p-tty.qcow2`)], true);
      expect(r.code).toBe(0);
      const updates = (r.out + r.err).split('\r').filter((l) => /%/.test(l));
      expect(updates.length).toBeGreaterThan(0);
      expect(updates[updates.length - 1]).toMatch(/100\.0%/);
    });
  }
});
