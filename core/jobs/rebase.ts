// rebase: point an overlay at a new backing file while it keeps reading exactly the same.
// Safe mode compares old and new backing content only where the overlay allocates nothing
// and writes only what differs, widened to the overlay's subcluster (or cluster) so no write
// needs a copy-on-write read; the header switches last. Unsafe mode (-u) rewrites the name.
import { identityOf, sameFile } from '../io/identity';
import { localPathOrNull } from '../chain/names';
import { FormatError, UsageError, printable } from '../errors';
import { encodeHeader } from '../format/header';
import type { DiskImage, ImageFormat } from '../engine/image';
import { Qcow2Writable } from '../engine/qcow2-write';
import { openImage, openImageFile, closeChain, combineBackingPath, chainOf } from '../chain/open';
import { ioBuffers } from '../io/buffers';
import { isZero } from '../engine/zero';
import { Qcow2Image } from '../engine/qcow2';
import { runPool } from './pool';
import { chainBlockStatus } from '../chain/block-status';
import { ProgressReporter, throwIfCancelled, type JobContext } from './job';

export interface RebaseOptions {
  /** New backing file name as the user gave it; '' flattens. */
  backing: string;
  backingFormat?: ImageFormat;
  unsafe?: boolean;
  /** Bytes compared per step (default 1 MiB, rounded to the overlay's write unit). */
  chunkSize?: number;
}

export interface RebaseResult {
  bytesCompared: number;
  bytesWritten: number;
  writes: number;
}

/** Rewrites the header with a new backing name/format (the last, single step of every rebase). */
export async function writeBackingName(img: Qcow2Writable, backing: string | null, format: string | null): Promise<void> {
  await img.flush();
  const p = img.parsed;
  p.backingFile = backing || null;
  p.backingFormat = backing ? format : null;
  p.extensions = p.extensions.filter((e) => e.type !== 0xe2792aca);
  const cluster = encodeHeader(p, img.filename);
  await img.file.write(cluster, 0);
  await img.file.flush();
}

/**
 * qemu-img 7.2 never records a probed format (iotest 114): a new backing file needs -F. It
 * fails only after copying; refusing first leaves the overlay as it was.
 */
function requireBackingFormat(path: string, opts: RebaseOptions): void {
  if (opts.backing && !opts.backingFormat) {
    throw new FormatError(`Could not change the backing file to '${printable(opts.backing)}': backing format must be specified (add -F qcow2 or -F raw)`, path);
  }
}

export async function rebase(ctx: JobContext, path: string, opts: RebaseOptions): Promise<RebaseResult> {
  const result: RebaseResult = { bytesCompared: 0, bytesWritten: 0, writes: 0 };
  requireBackingFormat(path, opts);
  if (opts.unsafe) {
    const top = await openImageFile(path, { writable: true });
    try {
      if (!(top instanceof Qcow2Writable)) throw new UsageError(`${path}: only qcow2 images have a backing file`);
      await writeBackingName(top, opts.backing, opts.backingFormat ?? null);
    } finally {
      await closeChain(top);
    }
    return result;
  }

  const top = await openImage(path, { writable: true });
  let next: DiskImage | null = null;
  let nextOpenedHere = false;
  try {
    if (!(top instanceof Qcow2Writable)) throw new UsageError(`${path}: only qcow2 images have a backing file`);
    // Narrowed once, for the closures below.
    const overlay: Qcow2Writable = top;
    const fmt: ImageFormat | null = opts.backingFormat ?? null;
    if (opts.backing) {
      const full = combineBackingPath(path, opts.backing);
      // By device and inode: a hard link or symlink to the overlay is the overlay.
      const fullId = await identityOf(localPathOrNull(full) ?? full);
      if (sameFile(fullId, (await top.file.identity?.()) ?? null)) throw new UsageError(`${path}: an image cannot be its own backing file`);
      // A new backing inside the old chain is used as it is opened there.
      for (const layer of chainOf(top).slice(1)) if (sameFile(fullId, (await layer.file.identity?.()) ?? null)) next = layer;
      if (!next) {
        // Its chain must not lead back to the overlay.
        next = await openImage(full, { format: opts.backingFormat, avoid: [top] });
        nextOpenedHere = true;
      }
    }
    const g = top.geometry;
    const unit = g.extendedL2 ? g.subclusterSize : g.clusterSize;
    const chunk = Math.max(unit, Math.floor((opts.chunkSize ?? 1 << 20) / unit) * unit);
    const old = top.backing;
    const size = top.virtualSize;
    const progress = new ProgressReporter(ctx, size);
    progress.setPhase('comparing');
    const layersAbove = (): DiskImage[] => {
      // Layers between the overlay and the new backing, when the new backing is in the old chain.
      const out: DiskImage[] = [];
      for (let l = old; l && l !== next; l = l.backing) out.push(l);
      return out;
    };
    const between = next && chainOf(top).includes(next) ? layersAbove() : null;
    const width = 8;
    const oldBufs = ioBuffers(width, chunk);
    const newBufs = ioBuffers(width, chunk);
    // Pieces to compare, produced in order and processed several at a time (they are disjoint,
    // so their writes into the overlay never touch the same clusters).
    async function* pieces(): AsyncGenerator<[number, number]> {
      let pos = 0;
      while (pos < size) {
        throwIfCancelled(ctx);
        const [st] = await overlay.runs(pos, Math.min(chunk, size - pos), true);
        const run = st!;
        if (run.state !== 'unallocated') { pos += run.length; progress.add(run.length); continue; }
        const end = pos + run.length;
        // Only ranges some layer between the overlay and the new backing allocates can differ
        // (when the new backing is in the old chain); they are widened to whole write units.
        const work = between ? await changedRanges(between, pos, end, unit) : [[pos, end] as [number, number]];
        for (const [a, b] of work) {
          for (let p0 = a; p0 < b;) {
            throwIfCancelled(ctx);
            const n = Math.min(chunk - (p0 % chunk), b - p0);
            const zeroRun = await bothZero(old, next, p0, n);
            if (zeroRun > 0) { p0 += zeroRun; continue; }
            yield [p0, n];
            p0 += n;
          }
        }
        progress.add(end - pos);
        pos = end;
      }
    }
    await runPool(pieces(), width, ([at, n], slot) => compareAndWrite(at, n, slot), ctx.signal);

    /** Reads [at, at+n) from both chains and writes what differs, widened to whole units. */
    async function compareAndWrite(at: number, n: number, slot: number): Promise<void> {
      const o = oldBufs[slot]!.subarray(0, n);
      const w = newBufs[slot]!.subarray(0, n);
      await Promise.all([readLayer(old, o, at), readLayer(next, w, at)]);
      result.bytesCompared += n;
      let p = 0;
      while (p < n) {
        const u = Math.min(unit - ((at + p) % unit), n - p);
        if (o.compare(w, p, p + u, p, p + u) === 0) { p += u; continue; }
        let q = p + u;
        while (q < n) {
          const v = Math.min(unit, n - q);
          if (o.compare(w, q, q + v, q, q + v) === 0) break;
          q += v;
        }
        // What the overlay must keep reading; zeros become zero flags, not written data.
        if (isZero(o, p, q)) await overlay.writeZeroes(at + p, q - p);
        else await overlay.write(o.subarray(p, q), at + p);
        result.writes++;
        result.bytesWritten += q - p;
        p = q;
      }
    }
    throwIfCancelled(ctx);
    progress.setPhase('switching backing file');
    await writeBackingName(top, opts.backing, fmt);
    progress.done();
    return result;
  } finally {
    if (nextOpenedHere) await closeChain(next);
    await closeChain(top);
  }
}

/** Guest content of a chain below the overlay (zeros past its end, or with no chain). */
async function readLayer(img: DiskImage | null, buf: Buffer, offset: number): Promise<void> {
  const n = img ? Math.max(0, Math.min(buf.length, img.virtualSize - offset)) : 0;
  if (n > 0) await img!.read(buf.subarray(0, n), offset);
  if (n < buf.length) buf.fill(0, n);
}

/**
 * The parts of [start, end) that any of `layers` allocates (or that lie past a shorter
 * layer's end, where it hides what is below), widened outward to multiples of `unit`,
 * clamped and merged.
 */
async function changedRanges(layers: DiskImage[], start: number, end: number, unit: number): Promise<[number, number][]> {
  const out: [number, number][] = [];
  let p = start;
  while (p < end) {
    let step = end - p;
    let allocated = false;
    for (const l of layers) {
      if (p >= l.virtualSize) { allocated = true; continue; }
      if (!(l instanceof Qcow2Image)) { allocated = true; continue; } // raw: everything is allocated
      // Allocation only: the mapping, without asking the host file about holes.
      const [r] = await l.runs(p, Math.min(step, l.virtualSize - p), true);
      step = Math.min(step, r!.length);
      if (r!.state !== 'unallocated') allocated = true;
    }
    if (allocated) {
      const a = Math.max(start, Math.floor(p / unit) * unit);
      const b = Math.min(end, Math.ceil((p + step) / unit) * unit);
      const last = out[out.length - 1];
      if (last && a <= last[1]) last[1] = Math.max(last[1], b);
      else out.push([a, b]);
    }
    p += step;
  }
  return out;
}

/** Length of the run at `offset` (at most `length`) that reads as zero in both chains, or 0. */
async function bothZero(a: DiskImage | null, b: DiskImage | null, offset: number, length: number): Promise<number> {
  const zeroLen = async (img: DiskImage | null): Promise<number> => {
    if (!img || offset >= img.virtualSize) return length;
    const st = await chainBlockStatus(img, offset, Math.min(length, img.virtualSize - offset));
    return st.zero ? st.length : 0;
  };
  const la = await zeroLen(a);
  if (la === 0) return 0;
  return Math.min(la, await zeroLen(b));
}
