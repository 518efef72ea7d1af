// commit: copy what an overlay (and the layers between it and BASE) allocate into BASE, then
// empty the overlay in one metadata-sized step (or keep it with -d). The chain reads the same
// at every instant: base only changes where layers above it hide the change.
import { basename } from 'node:path';
import { IoError, UsageError } from '../errors';
import { errorText } from '../io/blkdebug';
import { isWritable, type DiskImage, type WritableImage } from '../engine/image';
import { Qcow2Writable } from '../engine/qcow2-write';
import { makeEmpty, type EmptyMethod } from '../engine/make-empty';
import { isZero } from '../engine/zero';
import { openImage, openImageFile, closeChain, chainOf, combineBackingPath } from '../chain/open';
import { Qcow2Image } from '../engine/qcow2';
import { ioBuffers } from '../io/buffers';
import { ProgressReporter, throwIfCancelled, type JobContext } from './job';
import { explainNoSpace } from '../io/space';
import { runPool } from './pool';
import { findOverlays } from './overlays';
import { identityOf, sameFile } from '../io/identity';
import { localPathOrNull } from '../chain/names';
import { WriteEstimate } from './space-estimate';
import {
  abs, addAffected, addSpace, bitmapWarning, chainLinks, checkSpace, enforcePlan, newPlan, permissionProblems, probeAll, type JobPlan,
} from './plan-kit';

export interface CommitOptions {
  /** Commit into this image down the chain instead of the immediate backing file (implies keep). */
  base?: string;
  /** -d: keep the overlay's content instead of emptying it. */
  keep?: boolean;
  /** Commit even when other images depend on the base (they then read different data). */
  force?: boolean;
  chunkSize?: number;
  parallel?: number;
}

export interface CommitResult {
  base: string;
  /** Bytes of the layers above the base copied into it (data and zeros). */
  bytesCopied: number;
  /** Of those, bytes written as data (the rest became zero flags). */
  dataBytesWritten: number;
  emptied: EmptyMethod | null;
  /** Other images that read through BASE and now see the committed data (the plan's affected). */
  otherDependents: string[];
  plan: JobPlan;
}

/** qcow2 images in `base`'s folder whose backing file is `base`, other than `except`. */
export async function dependentsOf(base: string, except: string[]): Promise<string[]> {
  return (await findOverlays(base, { except })).map((o) => o.path);
}

/** Index in `chain` of the image to commit into: the backing file, or BASE as qemu-img finds it. */
async function baseIndexOf(path: string, chain: DiskImage[], base: string | undefined): Promise<number> {
  if (chain.length < 2) throw new UsageError(`${path}: image has no backing file to commit into`);
  if (base === undefined) return 1;
  // As qemu-img (bdrv_find_backing_image): the name as recorded in the chain, or the file it
  // names taken relative to the image above each layer (a relative name is never taken from
  // the working directory). Files compared by device and inode: a hard link or symlink to a
  // layer is that layer.
  const local = (n: string) => identityOf(localPathOrNull(n) ?? n);
  for (let i = 1; i < chain.length; i++) {
    const id = (await chain[i]!.file.identity?.()) ?? null;
    if (chain[i - 1]!.backingFile === base || sameFile(await local(combineBackingPath(chain[i - 1]!.filename, base)), id)) return i;
  }
  throw new UsageError(`${path}: '${base}' is not in its backing chain`).asQemu(`Did not find '${base}' in the backing chain of '${path}'`);
}

/**
 * The commit's plan: what it copies (the layers above the base, from block status), the space
 * the base and the emptied overlay need, the other overlays of the base (and of the layers
 * between) whose content changes, and which images are in use. Reads only.
 */
export async function planCommit(ctx: JobContext, path: string, opts: CommitOptions = {}): Promise<JobPlan> {
  const keep = opts.keep || opts.base !== undefined;
  const top = await openImage(path, { lock: 'none' });
  try {
    const chain = chainOf(top);
    const baseIndex = await baseIndexOf(path, chain, opts.base);
    const base = chain[baseIndex]!;
    const above = chain.slice(0, baseIndex);
    const command = ['strata', 'commit'];
    if (opts.base !== undefined) command.push('-b', opts.base);
    if (opts.keep) command.push('-d');
    command.push(abs(path));
    const plan = newPlan('commit', `Commit ${basename(path)} into ${basename(base.filename)}`, command);
    plan.writes.push(abs(base.filename));
    if (!keep) plan.writes.push(abs(path));
    const size = top.virtualSize;
    const links = chainLinks(top);
    links[baseIndex]!.virtualSize = Math.max(base.virtualSize, size);
    plan.chainsAfter.push(links);
    const est = new WriteEstimate(base, await base.file.size());
    est.grow(size);
    await walkAbove(ctx, above, size, async (off, len, zero) => {
      if (zero) { await est.zero(off, len); return; }
      plan.bytesToCopy += len;
      await est.data(off, len);
    });
    plan.bytesToRead = plan.bytesToCopy;
    addSpace(plan, base.filename, est.bytes(), `committing into ${abs(base.filename)}`);
    if (!keep) {
      if (!(top instanceof Qcow2Image)) throw new UsageError(`${path}: only qcow2 overlays can be emptied (use -d)`);
      addSpace(plan, path, emptySpaceNeeded(top), `emptying ${abs(path)}`);
    }
    checkSpace(plan);
    // Other overlays of the base, or of a layer between, read what the commit changes.
    const inChain = chain.map((l) => l.filename);
    for (let i = 1; i <= baseIndex; i++) {
      const others = await dependentsOf(chain[i]!.filename, inChain);
      addAffected(plan, chain[i]!.filename, others, i === baseIndex ? 'would read the committed data' : `reads through it into ${abs(base.filename)}, which receives the committed data`);
    }
    await probeAll(plan, chain.slice(0, baseIndex + 1).map((l, i): [string, 'read' | 'write'] => [l.filename, i === baseIndex || (i === 0 && !keep) ? 'write' : 'read']));
    await permissionProblems(plan, keep ? [base.filename] : [base.filename, path]);
    for (const w of [bitmapWarning(base), keep ? null : bitmapWarning(top, 'emptying')]) if (w) plan.warnings.push(w);
    if (!keep && top instanceof Qcow2Image && top.snapshots.length) {
      plan.warnings.push(`${abs(path)} has internal snapshots: it is emptied cluster by cluster (they keep their data), so it shrinks less`);
    }
    return plan;
  } finally {
    await closeChain(top);
  }
}

/** Peak extra space of emptying: a fresh refcount structure and L1 table past the end of the file. */
function emptySpaceNeeded(img: Qcow2Image): number {
  const cs = img.geometry.clusterSize;
  if (img.snapshots.length || img.parsed.bitmaps || img.header.version === 2) return 0;
  return (2 + Math.ceil(img.l1.length / cs)) * cs;
}

/** Walks the runs the layers above the base allocate: (offset, length, reads as zero). */
async function walkAbove(ctx: JobContext, above: DiskImage[], size: number, fn: (off: number, len: number, zero: boolean) => Promise<void>): Promise<void> {
  let pos = 0;
  while (pos < size) {
    throwIfCancelled(ctx);
    const st = await aboveStatus(above, pos, size - pos);
    if (st.allocated) await fn(pos, st.length, st.zero);
    pos += st.length;
  }
}

export async function commit(ctx: JobContext, path: string, opts: CommitOptions = {}, planned?: JobPlan): Promise<CommitResult> {
  // The plan is the pre-check: nothing is written before it has passed.
  const plan = planned ?? await planCommit(ctx, path, opts);
  enforcePlan(plan, opts.force);
  const keep = opts.keep || opts.base !== undefined;
  const top = await openImage(path, { writable: !keep });
  let base: WritableImage | null = null;
  try {
    const chain = chainOf(top);
    const baseIndex = await baseIndexOf(path, chain, opts.base);
    const oldBase = chain[baseIndex]!;
    // Reopen the base for writing: drop the chain's read-only open (and its lock) first, or
    // our own consistent-read lock would refuse our write lock.
    await oldBase.close();
    // By the name it was opened by when that is a test driver's (blkdebug), which opens it alike;
    // an encrypted base keeps the cipher its key unlocked in the chain's open (the name alone
    // does not carry the key).
    const oldCipher = oldBase instanceof Qcow2Image ? oldBase.cipher : null;
    const baseImg = await openImageFile(oldBase.displayName ?? oldBase.filename, { format: oldBase.format, writable: true, noKey: oldCipher !== null });
    if (oldCipher && baseImg instanceof Qcow2Image) baseImg.attachCipher(oldCipher);
    if (!isWritable(baseImg)) throw new UsageError(`${oldBase.filename}: cannot be written`);
    base = baseImg;
    base.backing = oldBase.backing;
    chain[baseIndex - 1]!.backing = base;
    const above = chain.slice(0, baseIndex);
    const size = top.virtualSize;
    const needed = plan.space.find((s) => s.purpose.includes('committing'))?.needed;
    try {
      if (base.virtualSize < size) {
        // The grown area reads as zeros, not as the base's own backing file.
        if (base instanceof Qcow2Writable) await base.growZeroed(size);
        else { await base.file.truncate(size); (base as unknown as { virtualSize: number }).virtualSize = size; }
      }
    } catch (err) {
      throw explainNoSpace(err, base.filename, needed);
    }
    const progress = new ProgressReporter(ctx, size);
    progress.setPhase('copying into base');
    const chunk = opts.chunkSize ?? 2 << 20;
    const width = opts.parallel ?? 4;
    const buffers = ioBuffers(width, chunk);
    let bytesCopied = 0;
    let dataBytes = 0;
    async function* tasks(): AsyncGenerator<{ offset: number; length: number; zero: boolean; skip: boolean }> {
      let pos = 0;
      while (pos < size) {
        throwIfCancelled(ctx);
        const st = await aboveStatus(above, pos, Math.min(chunk - (pos % chunk), size - pos));
        yield { offset: pos, length: st.length, zero: st.zero, skip: !st.allocated };
        pos += st.length;
      }
    }
    const b = base;
    await runPool(tasks(), width, async (t, slot) => {
      try {
        await copyTask(t, slot);
      } catch (err) {
        throw jobFailed(explainNoSpace(err, b.filename, needed));
      }
    }, ctx.signal);
    async function copyTask(t: { offset: number; length: number; zero: boolean; skip: boolean }, slot: number): Promise<void> {
      throwIfCancelled(ctx);
      if (!t.skip) {
        if (t.zero) {
          // As QEMU's commit (a mirror with unmap): the base's clusters there are freed.
          await b.writeZeroes(t.offset, t.length, { unmap: true });
        } else {
          const buf = buffers[slot]!.subarray(0, t.length);
          await top.read(buf, t.offset);
          if (isZero(buf)) await b.writeZeroes(t.offset, t.length);
          else { await b.write(buf, t.offset); dataBytes += t.length; }
        }
        bytesCopied += t.length;
      }
      progress.add(t.length);
    }
    throwIfCancelled(ctx);
    try { await b.flush(); } catch (err) { throw jobFailed(explainNoSpace(err, b.filename, needed)); }
    let emptied: EmptyMethod | null = null;
    if (!keep) {
      progress.setPhase('emptying the overlay');
      if (!(top instanceof Qcow2Writable)) throw new UsageError(`${path}: only qcow2 overlays can be emptied (use -d)`);
      try {
        emptied = await makeEmpty(top);
      } catch (err) {
        const e = explainNoSpace(err, path);
        if (e instanceof IoError && e.qemu === undefined) e.asQemu(`Failed to empty ${top.displayName ?? top.filename}: ${errorText(e)}`);
        throw e;
      }
    }
    progress.done();
    return { base: oldBase.filename, bytesCopied, dataBytesWritten: dataBytes, emptied, otherDependents: plan.affected.map((a) => a.filename), plan };
  } finally {
    await closeChain(top);
    await closeChain(base);
  }
}

/** qemu-img's words for an I/O error of the copy: its block job failed. */
function jobFailed(err: unknown): unknown {
  if (err instanceof IoError && err.qemu === undefined) err.asQemu(`Block job failed: ${errorText(err)}`);
  return err;
}

/** Status of [offset, offset+length) over the layers above the base: allocated there or not. */
async function aboveStatus(layers: DiskImage[], offset: number, length: number): Promise<{ length: number; allocated: boolean; zero: boolean }> {
  let len = length;
  for (const l of layers) {
    if (offset >= l.virtualSize) {
      // Past a shorter layer's end the layers below it are hidden: it reads as zero here.
      return { length: len, allocated: true, zero: true };
    }
    const st = await l.blockStatus(offset, Math.min(len, l.virtualSize - offset));
    if (st.allocated) return { length: st.length, allocated: true, zero: st.zero && !st.data };
    len = st.length;
  }
  return { length: len, allocated: false, zero: false };
}
