// commit: copy what an overlay (and the layers between it and BASE) allocate into BASE, then
// empty the overlay in one metadata-sized step (or keep it with -d). The chain reads the same
// at every instant: base only changes where layers above it hide the change.
import { readdir, realpath } from '../io/fs-async';
import { join, dirname } from 'node:path';
import { UsageError } from '../errors';
import { isWritable, type DiskImage, type WritableImage } from '../engine/image';
import { Qcow2Writable } from '../engine/qcow2-write';
import { makeEmpty, type EmptyMethod } from '../engine/make-empty';
import { isZero } from '../engine/zero';
import { openImage, openImageFile, closeChain, chainOf, combineBackingPath } from '../chain/open';
import { decodeHeader, isQcow2Magic } from '../format/header';
import { NodeFile } from '../io/node-file';
import { identityOf, sameFile } from '../io/identity';
import { localPathOrNull } from '../chain/names';
import { ioBuffers } from '../io/buffers';
import { ProgressReporter, throwIfCancelled, type JobContext } from './job';
import { ensureSpace, explainNoSpace, freeSpace } from '../io/space';
import { qcow2PreallocSize } from './measure';
import { runPool } from './pool';

export interface CommitOptions {
  /** Commit into this image down the chain instead of the immediate backing file (implies keep). */
  base?: string;
  /** -d: keep the overlay's content instead of emptying it. */
  keep?: boolean;
  chunkSize?: number;
  parallel?: number;
}

export interface CommitResult {
  base: string;
  bytesCopied: number;
  emptied: EmptyMethod | null;
  /** Other images (outside this chain) that use BASE as their backing file. */
  otherDependents: string[];
}

async function real(p: string): Promise<string> { try { return await realpath(p); } catch { return p; } }

/** qcow2 images in `base`'s folder whose backing file is `base`, other than `except`. */
export async function dependentsOf(base: string, except: string[]): Promise<string[]> {
  const dir = dirname(base);
  const target = await real(base);
  const skip = new Set(await Promise.all(except.map(real)));
  const out: string[] = [];
  let names: string[] = [];
  try { names = await readdir(dir); } catch { return out; }
  for (const name of names) {
    const path = join(dir, name);
    let f: NodeFile | null = null;
    try {
      f = await NodeFile.open(path);
      const head = Buffer.alloc(65536);
      await f.read(head, 0);
      if (!isQcow2Magic(head)) continue;
      const p = decodeHeader(head.subarray(0, Math.min(head.length, 2 ** head.readUInt32BE(20))), path);
      if (!p.backingFile) continue;
      const full = await real(localPathOrNull(combineBackingPath(path, p.backingFile)) ?? p.backingFile);
      const me = await real(path);
      if (full === target && !skip.has(me)) out.push(path);
    } catch { /* not an image we can read: not a dependent we can name */ } finally {
      await f?.close();
    }
  }
  return out.sort();
}

export async function commit(ctx: JobContext, path: string, opts: CommitOptions = {}): Promise<CommitResult> {
  const keep = opts.keep || opts.base !== undefined;
  const top = await openImage(path, { writable: !keep });
  let base: WritableImage | null = null;
  let dependents: Promise<string[]> | null = null;
  try {
    const chain = chainOf(top);
    if (chain.length < 2) throw new UsageError(`${path}: image has no backing file to commit into`);
    let baseIndex = 1;
    if (opts.base !== undefined) {
      // As qemu-img: the name as given (from here), as taken relative to the overlay, or as
      // recorded in the chain.
      const local = (n: string) => identityOf(localPathOrNull(n) ?? n);
      const wants = [await local(opts.base), await local(combineBackingPath(path, opts.base))];
      baseIndex = -1;
      for (let i = 1; i < chain.length && baseIndex < 0; i++) {
        const id = (await chain[i]!.file.identity?.()) ?? null;
        if (wants.some((w) => sameFile(w, id)) || chain[i - 1]!.backingFile === opts.base) baseIndex = i;
      }
      if (baseIndex < 0) throw new UsageError(`${path}: '${opts.base}' is not in its backing chain`);
    }
    const oldBase = chain[baseIndex]!;
    // Reopen the base for writing: drop the chain's read-only open (and its lock) first, or
    // our own consistent-read lock would refuse our write lock.
    await oldBase.file.close();
    const baseImg = await openImageFile(oldBase.filename, { format: oldBase.format, writable: true });
    if (!isWritable(baseImg)) throw new UsageError(`${oldBase.filename}: cannot be written`);
    base = baseImg;
    base.backing = oldBase.backing;
    chain[baseIndex - 1]!.backing = base;
    const above = chain.slice(0, baseIndex);
    const size = top.virtualSize;
    if (base.virtualSize < size) {
      if (base instanceof Qcow2Writable) await base.growZeroed(size);
      else { await base.file.truncate(size); (base as unknown as { virtualSize: number }).virtualSize = size; }
    }
    // The exact figure needs a walk over every layer; skip it when even a base filled to its
    // full size (data and metadata) fits.
    const free = freeSpace(oldBase.filename);
    const worst = base instanceof Qcow2Writable
      ? qcow2PreallocSize(size, base.geometry.clusterSize, base.header.refcountOrder, base.geometry.extendedL2)
      : size;
    let needed: number | undefined;
    if (free !== null && worst > free) {
      needed = await commitSpaceNeeded(ctx, above, base, size);
      ensureSpace(oldBase.filename, needed, `committing into ${oldBase.filename}`);
    }
    // Only reads other files' headers (it never fails): it runs while the data is copied,
    // and is waited for on every way out, so no file of it stays open after the job.
    dependents = dependentsOf(oldBase.filename, chain.slice(0, baseIndex).map((l) => l.filename));
    const progress = new ProgressReporter(ctx, size);
    progress.setPhase('copying into base');
    const chunk = opts.chunkSize ?? 2 << 20;
    const width = opts.parallel ?? 4;
    const buffers = ioBuffers(width, chunk);
    let bytesCopied = 0;
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
        throw explainNoSpace(err, b.filename, needed);
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
          else await b.write(buf, t.offset);
        }
        bytesCopied += t.length;
      }
      progress.add(t.length);
    }
    throwIfCancelled(ctx);
    try { await b.flush(); } catch (err) { throw explainNoSpace(err, b.filename, needed); }
    let emptied: EmptyMethod | null = null;
    if (!keep) {
      progress.setPhase('emptying the overlay');
      if (!(top instanceof Qcow2Writable)) throw new UsageError(`${path}: only qcow2 overlays can be emptied (use -d)`);
      try { emptied = await makeEmpty(top); } catch (err) { throw explainNoSpace(err, path); }
    }
    progress.done();
    return { base: oldBase.filename, bytesCopied, emptied, otherDependents: await dependents };
  } finally {
    await dependents;
    await closeChain(top);
    await closeChain(base);
  }
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

/** Data above the base that lands where the base allocates nothing yet (new space in the base). */
async function commitSpaceNeeded(ctx: JobContext, above: DiskImage[], base: DiskImage, size: number): Promise<number> {
  let needed = 0;
  let pos = 0;
  while (pos < size) {
    throwIfCancelled(ctx);
    const st = await aboveStatus(above, pos, size - pos);
    if (st.allocated && !st.zero) {
      let p = pos;
      const end = pos + st.length;
      while (p < end) {
        if (p >= base.virtualSize) { needed += end - p; break; }
        const b = await base.blockStatus(p, Math.min(end, base.virtualSize) - p);
        if (!(b.allocated && b.offset !== null && b.data)) needed += b.length;
        p += b.length;
      }
    }
    pos += st.length;
  }
  return needed;
}
