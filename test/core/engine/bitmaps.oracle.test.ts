// Persistent dirty bitmaps stay valid through strata's writes, as through QEMU's: a bitmap
// added with `qemu-img bitmap --add` is still there, enabled and consistent afterwards, and
// the dirty ranges QEMU reports for it (qemu-nbd -B + nbdinfo) cover every range strata wrote.
// Disabled and in-use bitmaps are left as they were; a crash at any flush leaves each bitmap
// either in use (inconsistent, as the spec has it) or covering what reached the disk.
import { copyFileSync, readFileSync, writeFileSync } from 'node:fs';
import { afterAll, describe, expect, it } from 'vitest';
import { describeOracle, dirtyRanges, qemuImg, qemuImgRun, qemuIo, tempDir } from '../../oracle/qemu';
import { expectClean, fileHash, qemuInfo, rng, strata, strataOk } from '../jobs/helpers';
import { getU32, getU64, writeAt, u32 } from '../format/hostile-cases';
import { MemoryFile } from '../../../core/io/memory-file';
import { Qcow2Image } from '../../../core/engine/qcow2';
import { Qcow2Writable } from '../../../core/engine/qcow2-write';
import { bitmapDataBytes, decodeBitmapTableEntry, type BitmapDirectoryEntry } from '../../../core/format/bitmaps';

const MiB = 1 << 20;

interface BitmapInfo { name: string; flags: string[]; granularity: number }

function bitmapsOf(file: string): BitmapInfo[] {
  return (qemuInfo(file)['format-specific']?.data.bitmaps as BitmapInfo[] | undefined) ?? [];
}

/** True when every byte of [a, b) lies in one of the dirty ranges. */
function covered(dirty: [number, number][], a: number, b: number): boolean {
  let pos = a;
  for (const [s, e] of dirty) {
    if (e <= pos) continue;
    if (s > pos) return false;
    pos = e;
    if (pos >= b) return true;
  }
  return pos >= b;
}

function expectCovers(file: string, bitmap: string, written: [number, number][]): void {
  const dirty = dirtyRanges(file, bitmap);
  for (const [a, b] of written) expect({ bitmap, a, b, covered: covered(dirty, a, b) }).toEqual({ bitmap, a, b, covered: true });
}

/** An image with an enabled bitmap, a disabled one and a fine-grained enabled one. */
function withBitmaps(file: string, size: string, opts: string[] = []): void {
  qemuImg('create', '-q', '-f', 'qcow2', ...opts, file, size);
  qemuImg('bitmap', '--add', file, 'b0');
  qemuImg('bitmap', '--add', '--disable', file, 'off');
  qemuImg('bitmap', '--add', '-g', '512', file, 'fine');
}

function expectHealthy(file: string, disabledDirty: [number, number][] = []): void {
  expectClean(file);
  expect(bitmapsOf(file)).toEqual([
    { flags: ['auto'], name: 'b0', granularity: 65536 },
    { flags: [], name: 'off', granularity: 65536 },
    { flags: ['auto'], name: 'fine', granularity: 512 },
  ]);
  expect(dirtyRanges(file, 'off')).toEqual(disabledDirty);
}

describeOracle('persistent bitmaps through strata\'s writes and jobs', () => {
  const t = tempDir('strata-bitmaps-');
  afterAll(() => t.cleanup());

  it('strata io writes, zero writes, discards: every bitmap present, enabled ones cover every range, the disabled one untouched', async () => {
    const f = t.path('io.qcow2');
    withBitmaps(f, '64M');
    const r = rng(11);
    const cmds: string[] = [];
    const written: [number, number][] = [];
    for (let i = 0; i < 40; i++) {
      const len = 1 + Math.floor(r() * 300_000);
      const off = Math.floor(r() * (64 * MiB - len));
      const k = r();
      cmds.push(k < 0.6 ? `write -P ${1 + i} ${off} ${len}` : k < 0.8 ? `write -z ${off} ${len}` : `discard ${off} ${len}`);
      written.push([off, off + len]);
    }
    await strataOk('io', ...cmds.flatMap((c) => ['-c', c]), f);
    expectHealthy(f);
    expectCovers(f, 'b0', written);
    expectCovers(f, 'fine', written);
    // And QEMU keeps them going from there: a qemu-io write lands in the same bitmap.
    qemuIo(f, ['write -P 9 60M 4k']);
    expectCovers(f, 'b0', [...written, [60 * MiB, 60 * MiB + 4096]]);
  });

  it('commit into a base with bitmaps, emptying the overlay: the base\'s bitmaps cover the committed ranges', async () => {
    const base = t.path('commit-base.qcow2');
    withBitmaps(base, '32M');
    const top = t.path('commit-top.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', top);
    qemuImg('bitmap', '--add', top, 'b0');
    qemuImg('bitmap', '--add', '--disable', top, 'off');
    qemuImg('bitmap', '--add', '-g', '512', top, 'fine');
    qemuIo(top, ['write -P 1 1M 100k', 'write -z 8M 1M', 'write -P 2 20M 64k']);
    await strataOk('commit', top);
    expectHealthy(base);
    const committed: [number, number][] = [[MiB, MiB + 100 * 1024], [8 * MiB, 9 * MiB], [20 * MiB, 20 * MiB + 65536]];
    expectCovers(base, 'b0', committed);
    expectCovers(base, 'fine', committed);
    expectHealthy(top);
  });

  it('safe rebase writes into the overlay: its bitmaps cover what the rebase copied', async () => {
    const old = t.path('rb-old.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', old, '16M');
    qemuIo(old, ['write -P 3 2M 1M']);
    const top = t.path('rb-top.qcow2');
    withBitmaps(top, '16M', ['-b', old, '-F', 'qcow2']);
    await strataOk('rebase', '-b', '', top);
    expectHealthy(top);
    expectCovers(top, 'b0', [[2 * MiB, 3 * MiB]]);
  });

  it('snapshot create and delete keep the bitmaps; apply is refused as by qemu-img ("Device has active dirty bitmaps")', async () => {
    const f = t.path('snap.qcow2');
    withBitmaps(f, '16M');
    await strataOk('io', '-c', 'write -P 1 0 1M', f);
    await strataOk('snapshot', '-c', 's1', f);
    await strataOk('io', '-c', 'write -P 2 4M 1M', f);
    await strataOk('snapshot', '-c', 's2', f);
    await strataOk('snapshot', '-d', 's1', f);
    expectHealthy(f);
    expectCovers(f, 'b0', [[0, MiB], [4 * MiB, 5 * MiB]]);
    const copy = t.path('snap-qemu.qcow2');
    copyFileSync(f, copy);
    const q = qemuImgRun('snapshot', '-a', 's2', copy);
    expect(q.stderr).toMatch(/Device has active dirty bitmaps/);
    const before = fileHash(f);
    const r = await strata('snapshot', '-a', 's2', f);
    expect(r.code).toBe(1);
    expect(r.err).toMatch(/Could not apply snapshot 's2': Device has active dirty bitmaps/);
    expect(fileHash(f)).toBe(before);
  });

  for (const [what, size] of [['grow', '200M'], ['shrink', '5M']] as const) {
    it(`resize (${what}) rewrites every bitmap for the new size: qemu-img opens it, the bits below the end are kept`, async () => {
      const f = t.path(`resize-${what}.qcow2`);
      withBitmaps(f, '64M');
      await strataOk('io', '-c', 'write -P 1 1M 64k', f);
      await strataOk('resize', ...(what === 'shrink' ? ['--shrink'] : []), f, size);
      expectHealthy(f);
      expectCovers(f, 'b0', [[MiB, MiB + 65536]]);
      expect(qemuInfo(f)['virtual-size']).toBe(what === 'grow' ? 200 * MiB : 5 * MiB);
      qemuIo(f, ['write -P 2 4M 4k']);
      expectCovers(f, 'fine', [[4 * MiB, 4 * MiB + 4096]]);
    });
  }

  it('an in-use (inconsistent) bitmap: writes leave it as it is, a resize is refused as by qemu-img', async () => {
    const f = t.path('inuse.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', f, '16M');
    qemuImg('bitmap', '--add', f, 'stale');
    qemuImg('bitmap', '--add', f, 'b0');
    // Set the in_use flag of the first directory entry, as a QEMU that crashed leaves it.
    const ext = findBitmapsExt(f);
    writeAt(f, ext.dirOffset + 12, u32(getU32(f, ext.dirOffset + 12) | 1));
    expect(bitmapsOf(f)[0]!.flags).toEqual(['in-use', 'auto']);
    await strataOk('io', '-c', 'write -P 1 0 64k', f);
    expectClean(f);
    expect(bitmapsOf(f).map((b) => b.flags)).toEqual([['in-use', 'auto'], ['auto']]);
    expectCovers(f, 'b0', [[0, 65536]]);
    const copy = t.path('inuse-qemu.qcow2');
    copyFileSync(f, copy);
    expect(qemuImgRun('resize', copy, '32M').stderr).toMatch(/Bitmap 'stale' is inconsistent and cannot be used/);
    const before = fileHash(f);
    const r = await strata('resize', f, '32M');
    expect(r.code).toBe(1);
    expect(r.err).toMatch(/Bitmap 'stale' is inconsistent and cannot be used/);
    expect(fileHash(f)).toBe(before);
  });
});

function findBitmapsExt(file: string): { dirOffset: number } {
  const head = readFileSync(file).subarray(0, 65536);
  for (let off = head.readUInt32BE(100); off + 8 <= head.length;) {
    const type = head.readUInt32BE(off);
    const len = head.readUInt32BE(off + 4);
    if (type === 0) break;
    if (type === 0x23852875) return { dirOffset: Number(getU64(file, off + 8 + 16)) };
    off += 8 + Math.ceil(len / 8) * 8;
  }
  throw new Error(`no bitmaps extension in ${file}`);
}

/**
 * The bits of a bitmap as stored, or 'inconsistent' when the extension's autoclear bit is
 * clear (mid-update) or the bitmap is in use.
 */
async function storedBits(bytes: Buffer, name: string): Promise<{ entry: BitmapDirectoryEntry; bits: Uint8Array } | 'inconsistent'> {
  const img = await Qcow2Image.open('cut', new MemoryFile('cut', bytes));
  if (!img.bitmaps) return 'inconsistent';
  const entry = img.bitmaps.find((e) => e.name === name);
  if (!entry) throw new Error(`bitmap ${name} is gone`);
  if (entry.flags & 1) return 'inconsistent';
  const cs = img.geometry.clusterSize;
  const table = Buffer.alloc(entry.bitmapTableSize * 8);
  await img.file.read(table, entry.bitmapTableOffset);
  const n = bitmapDataBytes(img.virtualSize, entry.granularityBits);
  const bits = new Uint8Array(n);
  for (let i = 0; i < entry.bitmapTableSize; i++) {
    const e = decodeBitmapTableEntry(table, i, cs);
    if (e.kind === 'ones') bits.fill(0xff, i * cs, Math.min(n, (i + 1) * cs));
    if (e.kind === 'data') {
      const c = Buffer.alloc(cs);
      await img.file.read(c, e.offset);
      bits.set(c.subarray(0, Math.min(cs, n - i * cs)), i * cs);
    }
  }
  return { entry, bits };
}

describeOracle('crash safety of the bitmaps', () => {
  it('at every flush of writes and the store at close: check finds no corruption, each bitmap is in use or covers every non-zero byte on disk, the disabled one is unchanged', async () => {
    const t = tempDir();
    try {
      const size = 4 * MiB;
      const path = t.path('img.qcow2');
      withBitmaps(path, String(size), ['-o', 'cluster_size=4k']);
      const mem = new MemoryFile('mem.qcow2', readFileSync(path), true);
      const cuts: Buffer[] = [];
      mem.onFlush = (durable) => cuts.push(Buffer.from(durable));
      const img = await Qcow2Writable.openWritable('mem.qcow2', mem);
      const r = rng(5);
      for (let i = 0; i < 60; i++) {
        const len = 1 + Math.floor(r() * 64 * 1024);
        const off = Math.floor(r() * (size - len));
        const k = r();
        if (k < 0.6) await img.write(Buffer.alloc(len, 1 + (i % 250)), off);
        else if (k < 0.8) await img.writeZeroes(off, len);
        else if (k < 0.9) await img.discard(off, len);
        else await img.flush();
      }
      await img.close();
      expect(cuts.length).toBeGreaterThan(10);
      const cutPath = t.path('cut.qcow2');
      const step = Math.max(1, Math.floor(cuts.length / 40));
      let consistentCuts = 0;
      for (let i = 0; i < cuts.length; i += step) {
        const bytes = cuts[i]!;
        writeFileSync(cutPath, bytes);
        const check = qemuImgRun('check', '--output=json', cutPath);
        const json = check.stdout ? JSON.parse(check.stdout) : {};
        expect(json.corruptions ?? 0, `cut ${i}: ${check.stdout}${check.stderr}`).toBe(0);
        const view = await Qcow2Image.open('cut', new MemoryFile('cut', bytes));
        const content = Buffer.alloc(size);
        await view.read(content, 0);
        for (const name of ['b0', 'fine']) {
          const b = await storedBits(bytes, name);
          if (b === 'inconsistent') continue;
          consistentCuts++;
          const g = 2 ** b.entry.granularityBits;
          for (let p = 0; p < size; p += 512) {
            if (content.subarray(p, p + 512).some((x) => x !== 0)) {
              const bit = Math.floor(p / g);
              expect({ cut: i, name, p, dirty: (b.bits[bit >> 3]! >> (bit & 7)) & 1 }).toEqual({ cut: i, name, p, dirty: 1 });
            }
          }
        }
        const off = await storedBits(bytes, 'off');
        expect(off === 'inconsistent' || off.bits.every((x) => x === 0), `cut ${i}: the disabled bitmap`).toBe(true);
      }
      expect(consistentCuts, 'some cuts (before the first write, after the store) have the bitmaps consistent').toBeGreaterThan(0);
      // The final image, through QEMU.
      writeFileSync(cutPath, mem.contents());
      expect(bitmapsOf(cutPath).map((b) => b.flags)).toEqual([['auto'], [], ['auto']]);
    } finally {
      t.cleanup();
    }
  });
});

describe('bitmaps test helpers', () => {
  it('covered(): ranges, gaps, ends', () => {
    expect(covered([[0, 10], [10, 20]], 5, 15)).toBe(true);
    expect(covered([[0, 10], [11, 20]], 5, 15)).toBe(false);
    expect(covered([[0, 10]], 5, 11)).toBe(false);
  });
});
