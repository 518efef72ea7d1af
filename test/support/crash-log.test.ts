// The crash model the failure suites rely on: what is durable when, which writes may be lost
// at a cut, and (the reason it exists) that it sees write ordering inside one flush interval,
// which cutting only at flush boundaries cannot.
import { readFileSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { CrashLog } from './crash-log';
import { MemoryFile } from '../../core/io/memory-file';
import { Qcow2Writable } from '../../core/engine/qcow2-write';
import { checkQcow2 } from '../../core/engine/check';
import { tempDir } from '../oracle/qemu';
import { createImage } from '../../core/jobs/create';
import { rng } from '../core/jobs/helpers';

const sector = (v: number) => Buffer.alloc(512, v);

describe('CrashLog', () => {
  it('a flush makes durable what completed before it began; the rest may or may not land', async () => {
    const log = new CrashLog();
    const f = await log.wrap(new MemoryFile('a', Buffer.alloc(0)));
    await f.write(sector(1), 0);
    await f.flush();
    const afterFlush = log.now;
    await f.write(sector(2), 512);
    await f.write(sector(3), 0);
    expect(log.stateAt(afterFlush, () => false).files.get('a')).toEqual(sector(1));
    expect(log.stateAt(log.now, () => false)).toEqual({ files: new Map([['a', sector(1)]]), pending: 2 });
    expect(log.stateAt(log.now, () => true).files.get('a')).toEqual(Buffer.concat([sector(3), sector(2)]));
    // Before anything: the initial content.
    expect(log.stateAt(0, () => true).files.get('a')).toEqual(Buffer.alloc(0));
    expect(log.finalState().get('a')).toEqual(Buffer.concat([sector(3), sector(2)]));
  });

  it('a write still in flight when a flush starts is not made durable by it', async () => {
    const log = new CrashLog();
    let release!: () => void;
    const slow = new MemoryFile('b', Buffer.alloc(512));
    const inner = slow.write.bind(slow);
    slow.write = async (buf, off) => { if (buf[0] === 9) await new Promise<void>((r) => { release = r; }); return inner(buf, off); };
    const f = await log.wrap(slow);
    const w = f.write(sector(9), 0);
    await f.flush();
    const cut = log.now;
    release();
    await w;
    expect(log.stateAt(cut, () => false).files.get('b')).toEqual(Buffer.alloc(512));
    expect(log.stateAt(cut, () => true).files.get('b')).toEqual(sector(9));
  });

  it('cuts are taken per file: one file\'s flush does not make another\'s writes durable', async () => {
    const log = new CrashLog();
    const a = await log.wrap(new MemoryFile('a', Buffer.alloc(0)));
    const b = await log.wrap(new MemoryFile('b', Buffer.alloc(0)));
    await a.write(sector(1), 0);
    await b.write(sector(2), 0);
    await a.flush();
    const s = log.stateAt(log.now, () => false);
    expect(s.files.get('a')).toEqual(sector(1));
    expect(s.files.get('b')).toEqual(Buffer.alloc(0));
    expect(log.counts()).toEqual({ writes: 2, flushes: 1, truncates: 0 });
    expect(log.files).toEqual(['a', 'b']);
  });
});

describe('CrashLog sees ordering inside a flush interval', () => {
  /**
   * Writes, frees and rewrites on a 4k-cluster image so that a new L2 table lands in a freed
   * cluster full of old data; `misorder` makes flush() write the L1 entries before the L2 tables
   * with no flush between (the bug the model must catch). Returns how many cut states qemu's
   * check (ours, which matches qemu-img's) finds corrupt, with reordering and at flush boundaries only.
   */
  async function run(misorder: boolean): Promise<{ reordered: number; boundaries: number; cuts: number }> {
    const t = tempDir();
    try {
      await createImage(t.path('a.qcow2'), { format: 'qcow2', size: 8 << 20, clusterSize: 4096 });
      const log = new CrashLog();
      const file = await log.wrap(new MemoryFile('a.qcow2', readFileSync(t.path('a.qcow2'))));
      const img = await Qcow2Writable.openWritable('a.qcow2', file);
      if (misorder) {
        img.flush = async () => img.mutex.run(async () => {
          await img.refcounts.writeBack();
          await img.file.flush();
          for (const i of img.l1Dirty) await img.file.write(img.l1.subarray(i * 8, i * 8 + 8), img.header.l1TableOffset + i * 8);
          img.l1Dirty.clear();
          for (const [off, tb] of img.l2Cache.dirty) await img.file.write(tb, off);
          img.l2Cache.dirty.clear();
          await img.file.flush();
          for (const f of img.pendingFrees.splice(0)) await img.refcounts.change(f.offset, f.length, -1);
          await img.refcounts.writeBack();
          await img.file.flush();
        });
      }
      // Old data that reads as nonsense L2 entries, in clusters that are then freed.
      const junk = Buffer.alloc(64 * 1024);
      for (let p = 0; p < junk.length; p += 8) junk.writeBigUInt64BE(0x8000_0000_0000_1000n + BigInt(p % 4096), p);
      await img.write(junk, 0);
      await img.flush();
      await img.discard(0, junk.length);
      await img.flush();
      // New L2 tables (one per 2 MiB) go where the junk was.
      for (let i = 1; i < 4; i++) {
        await img.write(Buffer.alloc(4096, i), i * 2 * 1024 * 1024);
        await img.flush();
      }
      await img.close();
      const r = rng(7);
      const bad = async (bytes: Buffer) => {
        const res = await checkQcow2(new MemoryFile('cut', bytes));
        return res.corruptions > 0 || res.failure !== null;
      };
      let reordered = 0;
      let boundaries = 0;
      const points = log.cutPoints();
      for (const at of points) {
        for (let k = 0; k < 4; k++) if (await bad(log.stateAt(at, () => r() < 0.5).files.get('a.qcow2')!)) reordered++;
        if (await bad(log.stateAt(at, () => false).files.get('a.qcow2')!)) boundaries++;
      }
      return { reordered, boundaries, cuts: points.length };
    } finally {
      t.cleanup();
    }
  }

  it('an L1 entry written ahead of its L2 table is caught; the engine\'s own order passes', async () => {
    const broken = await run(true);
    expect(broken.cuts).toBeGreaterThan(10);
    // Cutting only where nothing is in flight (the old MemoryFile model) sees nothing wrong.
    expect(broken.boundaries).toBe(0);
    expect(broken.reordered).toBeGreaterThan(0);
    const sound = await run(false);
    expect({ reordered: sound.reordered, boundaries: sound.boundaries }).toEqual({ reordered: 0, boundaries: 0 });
  });
});
