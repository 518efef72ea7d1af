// mirror: copy a chain to a target and keep the target sparse. A bitmap remembers which target
// ranges already read as zero (all of a fresh target; discovered on an existing one): zeros are
// never written there. On an existing target, data that already matches is not rewritten, so
// mirroring onto a finished target writes (almost) nothing.
import { basename, dirname, isAbsolute, relative, resolve } from 'node:path';
import { CancelledError, UsageError } from '../errors';
import { explainNoSpace } from '../io/space';
import { assertNotInChain, closeChain, combineBackingPath, openImage } from '../chain/open';
import { hasProtocol, localPath } from '../chain/names';
import type { CreateOptions } from './create';
import { openTarget, abandonTarget, type Target, type TargetSpec } from './target';
import { copyWarnings, dataToCopy, targetPlan, targetSpace } from './convert';
import { qcow2PreallocSize } from './measure';
import { abs, addSpace, chainLinks, checkSpace, enforcePlan, newPlan, type JobPlan } from './plan-kit';
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


export interface MirrorFilesOptions {
  sourceFormat?: 'qcow2' | 'raw';
  /** Default: the source's format. */
  targetFormat?: 'qcow2' | 'raw';
  sync?: 'full' | 'top';
  /** -n: mirror onto an existing target. */
  existing?: boolean;
  /** -o: creation options of a fresh target. */
  create?: CreateOptions;
  /** -U: read the source without its locks. */
  forceShare?: boolean;
  /** Write onto a target other images depend on. */
  force?: boolean;
}

function mirrorCommand(srcPath: string, dstPath: string, o: MirrorFilesOptions): string[] {
  const cmd = ['strata', 'mirror'];
  if (o.sourceFormat) cmd.push('-f', o.sourceFormat);
  if (o.targetFormat) cmd.push('-O', o.targetFormat);
  const given = Object.entries(o.create?.given ?? {}).map(([k, v]) => `${k}=${v}`);
  if (given.length) cmd.push('-o', given.join(','));
  if (o.sync === 'top') cmd.push('--sync', 'top');
  if (o.existing) cmd.push('-n');
  if (o.forceShare) cmd.push('-U');
  cmd.push(abs(srcPath), abs(dstPath));
  return cmd;
}

/**
 * The source's backing name as the target must record it: a relative name resolves against
 * the folder of the image that records it, so from the target's folder it must lead to the
 * same file. Absolute and protocol names (json:, file:, ...) stay as they are.
 */
export function backingNameFor(target: string, source: string, backing: string): string {
  if (isAbsolute(backing) || hasProtocol(backing)) return backing;
  const full = combineBackingPath(source, backing);
  const from = dirname(resolve(localPath(target)));
  return dirname(resolve(localPath(source))) === from ? backing : relative(from, resolve(full));
}

/** The target's creation spec: the source's format, and for --sync top its backing file. */
function mirrorTargetSpec(src: DiskImage, dstPath: string, o: MirrorFilesOptions): TargetSpec {
  const format = o.targetFormat ?? src.format;
  const create: CreateOptions = { ...o.create };
  if (o.sync === 'top') {
    if (!src.backingFile) throw new UsageError(`${src.filename}: --sync top needs a source with a backing file`);
    if (format !== 'qcow2') throw new UsageError('--sync top needs a qcow2 target (it keeps the backing file)');
    create.backingFile ??= backingNameFor(dstPath, src.filename, src.backingFile);
    create.backingFormat ??= src.backingFormat ?? src.backing?.format;
  }
  return { format, create, existing: !!o.existing };
}

/**
 * The mirror's plan for an opened source: the target created or written (-n), the data read and
 * written (exact for a fresh target: it reads as zero, so only data is written, in 4 KiB
 * pieces), the target's space, and what the copy does not carry (snapshots, bitmaps).
 */
export async function planMirror(ctx: JobContext, src: DiskImage, dstPath: string, o: MirrorFilesOptions, srcPath = src.filename): Promise<JobPlan> {
  const spec = mirrorTargetSpec(src, dstPath, o);
  const sync = o.sync ?? 'full';
  const plan = newPlan('mirror', `Mirror ${basename(srcPath)} to ${basename(dstPath)}${sync === 'top' ? ' (top layer)' : ''}`, mirrorCommand(srcPath, dstPath, o));
  // By device and inode: the source or any image of its chain, under any name.
  await assertNotInChain(dstPath, src, 'mirror');
  await targetPlan(plan, dstPath, !!o.existing);
  const link = { filename: abs(dstPath), format: spec.format, virtualSize: src.virtualSize };
  plan.chainsAfter.push(sync === 'top' ? [link, ...chainLinks(src.backing)] : [link]);
  const d = await dataToCopy(src, 4096, sync);
  plan.bytesToRead = d.read;
  plan.bytesToCopy = d.write;
  if (o.existing) {
    plan.warnings.push(`${abs(dstPath)} is written in place: only what differs is written (bytes to copy is at most that much), and the space it needs is not counted`);
    addSpace(plan, dstPath, 0, `the mirror ${abs(dstPath)}`);
  } else if (sync === 'top') {
    // The target keeps the backing file: only what the top layer allocates takes space.
    const cs = spec.create?.clusterSize ?? 65536;
    const full = qcow2PreallocSize(src.virtualSize, cs, Math.log2(spec.create?.refcountBits ?? 16), !!spec.create?.extendedL2);
    const clusters = (await dataToCopy(src, cs, 'top')).write;
    addSpace(plan, dstPath, full - Math.ceil(src.virtualSize / cs) * cs + clusters, `the mirror ${abs(dstPath)}`);
  } else {
    addSpace(plan, dstPath, await targetSpace(ctx, src, dstPath, spec), `the mirror ${abs(dstPath)}`);
  }
  checkSpace(plan);
  plan.warnings.push(...copyWarnings(src, 'a mirror'));
  return plan;
}

/** Opens the source, plans (unless given a plan), creates or opens the target, mirrors, closes. */
export async function mirrorFiles(ctx: JobContext, srcPath: string, dstPath: string, o: MirrorFilesOptions, planned?: JobPlan): Promise<MirrorResult & { plan: JobPlan }> {
  const src = await openImage(srcPath, { format: o.sourceFormat, lock: o.forceShare ? 'none' : 'auto' });
  let target: Target | null = null;
  try {
    const plan = planned ?? await planMirror(ctx, src, dstPath, o, srcPath);
    enforcePlan(plan, o.force);
    const spec = mirrorTargetSpec(src, dstPath, o);
    const needed = plan.space[0]?.needed;
    try {
      target = await openTarget(dstPath, src.virtualSize, spec);
      const r = await mirror(ctx, src, target.image, { sync: o.sync, targetIsFresh: target.created && target.zeroInitialized });
      await closeChain(target.image);
      target = null;
      return { ...r, plan };
    } catch (err) {
      if (target) await abandonTarget(target, dstPath);
      if (ctx.signal?.aborted) throw new CancelledError(target?.created ? 'mirror cancelled; the partial target was removed' : 'mirror cancelled');
      throw explainNoSpace(err, dstPath, needed);
    }
  } finally {
    await closeChain(src);
  }
}
