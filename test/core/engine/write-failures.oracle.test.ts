// What the write path does when a write or flush of the image file fails: the metadata it
// could not write stays dirty, the image stops writing (the failed state: nothing more reaches
// the file, and every later call, close() included, throws the first error), and the file left
// behind checks without corruption with everything flushed before intact.
import { readFileSync, writeFileSync } from 'node:fs';
import { afterAll, expect, it } from 'vitest';
import { describeOracle, qemuCheck, qemuImg, tempDir } from '../../oracle/qemu';
import { MemoryFile } from '../../../core/io/memory-file';
import { Qcow2Writable } from '../../../core/engine/qcow2-write';
import { Qcow2Image } from '../../../core/engine/qcow2';
import { IoError } from '../../../core/errors';
import { FaultInjector, type FaultPlan } from '../../support/fault-file';

const KiB = 1024;

describeOracle('write path failures', () => {
  const t = tempDir('strata-write-failures-');
  afterAll(() => t.cleanup());

  function image(name: string, opts: string, size: string): Buffer {
    qemuImg('create', '-q', '-f', 'qcow2', '-o', opts, t.path(name), size);
    return readFileSync(t.path(name));
  }

  /** qemu-img check of the bytes: corruptions (must be 0) and leaks. */
  function check(bytes: Buffer, name: string): { corruptions: number; leaks: number } {
    const p = t.path(`${name}.check.qcow2`);
    writeFileSync(p, bytes);
    const r = qemuCheck(p);
    return { corruptions: Number(r.json.corruptions ?? 0), leaks: Number(r.json.leaks ?? 0) };
  }

  async function reads(bytes: Buffer, offset: number, len: number): Promise<Buffer> {
    const v = await Qcow2Image.open('v', new MemoryFile('v', bytes));
    const b = Buffer.alloc(len);
    await v.read(b, offset);
    return b;
  }

  /**
   * Runs `steps` on a fresh copy of `initial` through a fault injector: once without faults to
   * trace what it writes, then again failing the write `pick` chooses (transient EIO unless
   * `plan` says otherwise). Returns the second run.
   */
  async function failing(initial: Buffer, steps: (img: Qcow2Writable) => Promise<void>, pick: (inj: FaultInjector) => number, plan: Partial<FaultPlan> = {}) {
    const dry = new FaultInjector();
    const img0 = await Qcow2Writable.openWritable('img.qcow2', dry.wrap(new MemoryFile('img.qcow2', initial)));
    await steps(img0);
    await img0.close();
    const n = pick(dry);
    expect(n, 'the write to fail was found in a clean run').toBeGreaterThan(0);
    const mem = new MemoryFile('img.qcow2', initial);
    const inj = new FaultInjector({ write: n, code: 'EIO', ...plan });
    const img = await Qcow2Writable.openWritable('img.qcow2', inj.wrap(mem));
    let error: unknown = null;
    try { await steps(img); } catch (err) { error = err; }
    return { img, inj, mem, error, failedAt: n };
  }

  const reftableOffset = (b: Buffer) => Number(b.readBigUInt64BE(48));
  const l1Offset = (b: Buffer) => Number(b.readBigUInt64BE(40));
  const firstBlock = (b: Buffer) => Number(b.readBigUInt64BE(reftableOffset(b)));

  it('a refcount block write that fails leaves the refcounts dirty; close() then writes nothing and throws', async () => {
    const initial = image('rb.qcow2', 'cluster_size=4k', '4M');
    const block = firstBlock(initial);
    const { img, inj, mem, error, failedAt } = await failing(initial, async (img) => {
      await img.write(Buffer.alloc(64 * KiB, 9), 0);
      await img.flush();
    }, (dry) => dry.writeIndex((_p, off) => off === block));
    expect(error).toBeInstanceOf(IoError);
    expect((error as IoError).message).toBe(`img.qcow2: write of 4096 bytes at offset ${block} failed: EIO: i/o error, write`);
    expect(img.refcounts.hasDirty).toBe(true);
    const writesBefore = inj.writes;
    await expect(img.close()).rejects.toBe(error);
    // Nothing more was tried: no L2 table may point at clusters whose refcount never landed.
    expect(inj.writes).toBe(writesBefore);
    expect(failedAt).toBe(writesBefore);
    expect(check(mem.contents(), 'rb').corruptions).toBe(0);
  });

  it('a refcount table entry write that fails leaves it dirty', async () => {
    // 512-byte clusters: a refcount block covers 128 KiB, so 256 KiB of data needs new ones.
    const initial = image('rt.qcow2', 'cluster_size=512', '4M');
    const rt = reftableOffset(initial);
    const { img, error, mem } = await failing(initial, async (img) => {
      await img.write(Buffer.alloc(256 * KiB, 5), 0);
      await img.flush();
    }, (dry) => dry.writeIndex((_p, off, len) => len === 8 && off > rt && off < rt + 512));
    expect(error).toBeInstanceOf(IoError);
    expect(img.refcounts.hasDirty).toBe(true);
    await expect(img.close()).rejects.toBe(error);
    expect(check(mem.contents(), 'rt').corruptions).toBe(0);
  });

  it('an L1 entry write that fails leaves it dirty', async () => {
    const initial = image('l1.qcow2', 'cluster_size=4k', '16M');
    const l1 = l1Offset(initial);
    const { img, error, mem } = await failing(initial, async (img) => {
      // Past the first L2 table's 2 MiB: a new L2 table, a new L1 entry.
      await img.write(Buffer.alloc(8 * KiB, 3), 4 << 20);
      await img.flush();
    }, (dry) => dry.writeIndex((_p, off, len) => len === 8 && off >= l1 && off < l1 + 4096));
    expect(error).toBeInstanceOf(IoError);
    expect(img.l1Dirty.size).toBe(1);
    await expect(img.close()).rejects.toBe(error);
    expect(check(mem.contents(), 'l1').corruptions).toBe(0);
  });

  it('in the failed state every later call throws the first error and nothing reaches the file', async () => {
    const initial = image('fs.qcow2', 'cluster_size=4k', '4M');
    const { img, inj, error, mem } = await failing(initial, async (img) => {
      await img.write(Buffer.alloc(8 * KiB, 1), 0);
      await img.flush();
      await img.write(Buffer.alloc(8 * KiB, 2), 64 * KiB);
      await img.flush();
    }, (dry) => dry.writeIndex(() => true, 4));
    expect(error).toBeInstanceOf(IoError);
    expect((img as unknown as { failure: unknown }).failure).toBe(error);
    const writes = inj.writes;
    const flushes = inj.flushes;
    await expect(img.write(Buffer.alloc(4 * KiB, 3), 128 * KiB)).rejects.toBe(error);
    await expect(img.writeZeroes(0, 4 * KiB)).rejects.toBe(error);
    await expect(img.discard(0, 64 * KiB)).rejects.toBe(error);
    await expect(img.flush()).rejects.toBe(error);
    await expect(img.close()).rejects.toBe(error);
    expect({ writes: inj.writes, flushes: inj.flushes }).toEqual({ writes, flushes });
    // Reads still work, from what the image holds.
    expect(await img.read(Buffer.alloc(16), 0).then(() => true)).toBe(true);
    expect(check(mem.contents(), 'fs').corruptions).toBe(0);
  });

  it('a failed flush (fsync) is final too: a later flush does not report success', async () => {
    const initial = image('ff.qcow2', 'cluster_size=4k', '4M');
    const mem = new MemoryFile('img.qcow2', initial);
    const inj = new FaultInjector({ flush: 1, code: 'EIO' });
    const img = await Qcow2Writable.openWritable('img.qcow2', inj.wrap(mem));
    await img.write(Buffer.alloc(64 * KiB, 4), 0);
    const err = await img.flush().catch((e: unknown) => e);
    expect(err).toBeInstanceOf(IoError);
    expect((err as Error).message).toBe('img.qcow2: flush failed: EIO: i/o error, fsync');
    await expect(img.flush()).rejects.toBe(err);
    await expect(img.close()).rejects.toBe(err);
    expect(check(mem.contents(), 'ff').corruptions).toBe(0);
  });

  it('refcount table growth: a failed header switch leaves the old table in use, in memory as on disk', async () => {
    // 512-byte clusters, 64-bit refcounts: one table cluster covers 2 MiB of file.
    const initial = image('grow.qcow2', 'cluster_size=512,refcount_bits=64', '8M');
    const steps = async (img: Qcow2Writable) => {
      for (let i = 0; i < 6; i++) {
        await img.write(Buffer.alloc(512 * KiB, 1 + i), i * 512 * KiB);
        await img.flush();
      }
    };
    const { img, error, mem } = await failing(initial, steps, (dry) => dry.writeIndex((_p, off, len) => off === 48 && len === 12));
    expect(error).toBeInstanceOf(IoError);
    const onDisk = mem.contents();
    expect(reftableOffset(onDisk)).toBe(reftableOffset(initial));
    expect(img.refcounts.reftableOffset).toBe(reftableOffset(onDisk));
    expect(img.refcounts.reftable.length).toBe(onDisk.readUInt32BE(56) * 512);
    await expect(img.close()).rejects.toBe(error);
    expect(check(onDisk, 'grow').corruptions).toBe(0);
    // What was flushed before the failure reads back.
    expect((await reads(onDisk, 0, 512 * KiB)).equals(Buffer.alloc(512 * KiB, 1))).toBe(true);
  });

  it('closing twice writes nothing the second time (the descriptor may belong to another file by then)', async () => {
    const initial = image('twice.qcow2', 'cluster_size=4k,lazy_refcounts=on', '4M');
    const inj = new FaultInjector();
    const img = await Qcow2Writable.openWritable('img.qcow2', inj.wrap(new MemoryFile('img.qcow2', initial)));
    await img.write(Buffer.alloc(4 * KiB, 1), 0);
    await img.close();
    const seen = inj.trace.length;
    await img.close();
    expect(inj.trace.slice(seen)).toEqual([]);
  });
});
