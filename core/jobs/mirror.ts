// mirror: copy a chain to a target and keep the target sparse. A bitmap remembers which target
// ranges already read as zero (all of a fresh target; discovered on an existing one): zeros are
// never written there. On an existing target, data that already matches is not rewritten, so
// mirroring onto a finished target writes (almost) nothing.
import { CancelledError } from '../errors';
import type { DiskImage, WritableImage } from '../engine/image';
import { zeroRuns } from '../engine/zero';
import { chainBlockStatus, walkChain } from '../chain/block-status';
import { ioBuffers } from '../io/buffers';
import { ProgressReporter, type JobContext } from './job';
import { runPool } from './pool';

export interface MirrorOptions {
  /** 'top': copy only what the top layer allocates (the target keeps the same backing file). */
  sync?: 'full' | 'top';
  /** True when the target was just created (reads as zero everywhere). */
  targetIsFresh: boolean;
  chunkSize?: number;
  parallel?: number;
}

export interface MirrorResult {
  bytesRead: number;
  bytesWritten: number;
  bytesZeroed: number;
}

/** Per-granule "reads as zero on the target" bitmap. */
class ZeroMap {
  private readonly bits: Uint8Array;
  constructor(readonly granule: number, size: number, initial: boolean) {
    this.bits = new Uint8Array(Math.ceil(size / granule)).fill(initial ? 1 : 0);
  }
  /** True when every granule overlapping [off, off+len) is known zero. */
  isZero(off: number, len: number): boolean {
    for (let g = Math.floor(off / this.granule); g * this.granule < off + len; g++) if (!this.bits[g]) return false;
    return true;
  }
  /** Marks granules fully inside [off, off+len) as `zero`; partially covered ones become unknown unless zero is false. */
  set(off: number, len: number, zero: boolean): void {
    for (let g = Math.floor(off / this.granule); g * this.granule < off + len; g++) {
      const full = g * this.granule >= off && (g + 1) * this.granule <= off + len;
      if (zero) { if (full) this.bits[g] = 1; } else this.bits[g] = 0;
    }
  }
}

export async function mirror(ctx: JobContext, src: DiskImage, target: WritableImage, opts: MirrorOptions): Promise<MirrorResult> {
  const size = Math.min(src.virtualSize, target.virtualSize);
  const chunk = opts.chunkSize ?? 2 << 20;
  const width = opts.parallel ?? 4;
  const granule = 64 * 1024;
  const zeros = new ZeroMap(granule, size, opts.targetIsFresh);
  const result: MirrorResult = { bytesRead: 0, bytesWritten: 0, bytesZeroed: 0 };
  const progress = new ProgressReporter(ctx, size);
  if (!opts.targetIsFresh) {
    progress.setPhase('scanning target');
    for await (const st of walkChain(target, 0, size)) if (st.zero) zeros.set(st.start, st.length, true);
  }
  progress.setPhase('mirroring', size);
  const srcBufs = ioBuffers(width, chunk);
  const dstBufs = ioBuffers(width, chunk);

  type Task = { offset: number; length: number; image: DiskImage | null; zero: boolean };
  async function* tasks(): AsyncGenerator<Task> {
    let pos = 0;
    while (pos < size) {
      const want = Math.min(chunk - (pos % chunk), size - pos);
      if (opts.sync === 'top') {
        const st = await src.blockStatus(pos, want);
        // Unallocated in the top layer: the target's own backing file provides it.
        if (!st.allocated) { yield { offset: pos, length: st.length, image: null, zero: false }; pos += st.length; continue; }
        yield { offset: pos, length: st.length, image: src, zero: st.zero && !st.data };
        pos += st.length;
        continue;
      }
      const st = await chainBlockStatus(src, pos, want);
      yield { offset: pos, length: st.length, image: st.image, zero: st.zero };
      pos += st.length;
    }
  }

  // Zero only the granules not already known to read as zero on the target.
  const zeroRange = async (off: number, len: number) => {
    const end = off + len;
    let p = off;
    while (p < end) {
      const gEnd = Math.min(end, (Math.floor(p / granule) + 1) * granule);
      if (zeros.isZero(p, gEnd - p)) { p = gEnd; continue; }
      let q = gEnd;
      while (q < end) {
        const next = Math.min(end, q + granule);
        if (zeros.isZero(q, next - q)) break;
        q = next;
      }
      await target.writeZeroes(p, q - p, { unmap: true });
      zeros.set(p, q - p, true);
      result.bytesZeroed += q - p;
      p = q;
    }
  };

  try {
    await runPool(tasks(), width, async (t, slot) => mirrorTask(t, slot), ctx.signal);
  } catch (err) {
    if (ctx.signal?.aborted) throw new CancelledError();
    throw err;
  }
  if (ctx.signal?.aborted) throw new CancelledError();
  await target.flush();
  progress.done();
  return result;

  async function mirrorTask(t: Task, slot: number): Promise<void> {
    if (ctx.signal?.aborted) throw new CancelledError();
    if (!t.image) { progress.add(t.length); return; }
    if (t.zero) { await zeroRange(t.offset, t.length); progress.add(t.length); return; }
    const buf = srcBufs[slot]!.subarray(0, t.length);
    await t.image.read(buf, t.offset);
    result.bytesRead += t.length;
    for (const r of zeroRuns(buf, t.offset, 4096)) {
      const off = t.offset + r.offset;
      if (r.zero) { await zeroRange(off, r.length); continue; }
      const data = buf.subarray(r.offset, r.offset + r.length);
      if (!zeros.isZero(off, r.length)) {
        // The target may already hold exactly this: compare before writing.
        const cur = dstBufs[slot]!.subarray(0, r.length);
        await target.read(cur, off);
        if (cur.equals(data)) continue;
      }
      await target.write(data, off);
      zeros.set(off, r.length, false);
      result.bytesWritten += r.length;
    }
    progress.add(t.length);
  }
}

