// rebase: point an overlay at a new backing file while it keeps reading exactly the same.
// Safe mode compares old and new backing content only where the overlay allocates nothing
// and writes only what differs, widened to the overlay's subcluster (or cluster) so no write
// needs a copy-on-write read; the header switches last. Unsafe mode (-u) rewrites the name.
import { basename } from 'node:path';
import { FormatError, UsageError, printable } from '../errors';
import { identityOf, sameFile } from '../io/identity';
import { localPathOrNull } from '../chain/names';
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
import { WriteEstimate } from './space-estimate';
import { abs, addSpace, bitmapWarning, chainLinks, checkSpace, enforcePlan, newPlan, permissionProblems, probeAll, type JobPlan } from './plan-kit';

export interface RebaseOptions {
  /** New backing file name as the user gave it; '' flattens. */
  backing: string;
  backingFormat?: ImageFormat;
  unsafe?: boolean;
  /**
   * Unsafe mode only: a backing format name Strata does not open (any QEMU_FORMAT_NAMES entry
   * but qcow2 and raw), recorded as given, as qemu-img records it (iotest 031).
   */
  backingFormatName?: string;
  /** Bytes compared per step (default 1 MiB, rounded to the overlay's write unit). */
  chunkSize?: number;
  /** Run even when the plan says other images would read differently (not the case for rebase today). */
  force?: boolean;
}

export interface RebaseResult {
  bytesCompared: number;
  /** Bytes written to keep the overlay's content (data and zeros). */
  bytesWritten: number;
  /** Of those, bytes written as data (the rest became zero flags). */
  dataBytesWritten: number;
  writes: number;
}

/**
 * qemu-img 7.2 never records a probed format (iotest 114): a new backing file needs -F. It
 * fails only after copying; refusing first leaves the overlay as it was.
 */
function requireBackingFormat(path: string, opts: RebaseOptions): void {
  if (opts.backingFormatName !== undefined && !opts.unsafe) throw new UsageError(`${path}: a backing file of format '${opts.backingFormatName}' can only be recorded with -u (Strata opens qcow2 and raw only)`);
  if (opts.backing && !opts.backingFormat && !opts.backingFormatName) {
    throw new FormatError(`Could not change the backing file to '${printable(opts.backing)}': backing format must be specified (add -F qcow2 or -F raw)`, path)
      .asQemu(`Could not change the backing file to '${opts.backing}': backing format must be specified`);
  }
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

/** Opens what the rebase needs: the overlay's chain and the new backing (in that chain or opened here). */
async function openRebase(path: string, opts: RebaseOptions, lock: 'auto' | 'none', writable: boolean): Promise<{
  top: Qcow2Image; next: DiskImage | null; nextOpenedHere: boolean; fmt: ImageFormat | null; close: () => Promise<void>;
}> {
  const top = await openImage(path, { writable, lock });
  let next: DiskImage | null = null;
  let nextOpenedHere = false;
  const close = async () => {
    if (nextOpenedHere) await closeChain(next);
    await closeChain(top);
  };
  try {
    if (!(top instanceof Qcow2Image)) throw new UsageError(`${path}: only qcow2 images have a backing file`);
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
        next = await openImage(full, { format: opts.backingFormat, lock, avoid: [top] });
        nextOpenedHere = true;
      }
    }
    return { top, next, nextOpenedHere, fmt, close };
  } catch (err) {
    await close();
    throw err;
  }
}

/**
 * The pieces a safe rebase compares, in order: where the overlay allocates nothing, the old and
 * the new backing chains do not both read as zero, and (when the new backing is in the old
 * chain) some layer between them allocates something. Block status only: the plan and the job
 * walk the same pieces.
 */
async function* rebasePieces(ctx: JobContext, top: Qcow2Image, next: DiskImage | null, chunk: number, progress?: ProgressReporter): AsyncGenerator<[number, number]> {
  const g = top.geometry;
  const unit = g.extendedL2 ? g.subclusterSize : g.clusterSize;
  const old = top.backing;
  const size = top.virtualSize;
  const between: DiskImage[] | null = next && chainOf(top).includes(next) ? [] : null;
  if (between) for (let l = old; l && l !== next; l = l.backing) between.push(l);
  let pos = 0;
  while (pos < size) {
    throwIfCancelled(ctx);
    const [st] = await top.runs(pos, Math.min(chunk, size - pos), true);
    const run = st!;
    if (run.state !== 'unallocated') { pos += run.length; progress?.add(run.length); continue; }
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
    progress?.add(end - pos);
    pos = end;
  }
}

function rebaseChunk(top: Qcow2Image, opts: RebaseOptions): number {
  const g = top.geometry;
  const unit = g.extendedL2 ? g.subclusterSize : g.clusterSize;
  return Math.max(unit, Math.floor((opts.chunkSize ?? 1 << 20) / unit) * unit);
}

/**
 * The rebase's plan. Safe mode: the pieces it will compare (read in both chains) and, of them,
 * what the old chain holds as data: what the overlay takes in where the new backing differs
 * (exact when it differs wherever it may, as when rebasing past layers that hold data).
 */
export async function planRebase(ctx: JobContext, path: string, opts: RebaseOptions): Promise<JobPlan> {
  requireBackingFormat(path, opts);
  const command = ['strata', 'rebase'];
  if (opts.unsafe) command.push('-u');
  command.push('-b', opts.backing);
  if (opts.backingFormat || opts.backingFormatName) command.push('-F', (opts.backingFormat ?? opts.backingFormatName)!);
  command.push(abs(path));
  const what = opts.backing ? `onto ${opts.backing}` : '(flatten: no backing file)';
  const plan = newPlan('rebase', `Rebase ${basename(path)} ${what}${opts.unsafe ? ', unsafe' : ''}`, command);
  plan.writes.push(abs(path));
  if (opts.unsafe) {
    const top = await openImage(path, { lock: 'none', backing: false });
    try {
      if (!(top instanceof Qcow2Image)) throw new UsageError(`${path}: only qcow2 images have a backing file`);
      let next: DiskImage | null = null;
      if (opts.backing && opts.backingFormatName) {
        plan.warnings.push(`the new backing file '${opts.backing}' is recorded as ${opts.backingFormatName}, a format Strata does not open: ${abs(path)} opens only in QEMU`);
      } else if (opts.backing) {
        try { next = await openImage(combineBackingPath(path, opts.backing), { format: opts.backingFormat, lock: 'none' }); } catch {
          plan.warnings.push(`the new backing file '${opts.backing}' cannot be opened now: ${abs(path)} will not open until it can`);
        }
      }
      try {
        plan.chainsAfter.push([...chainLinks(top).slice(0, 1), ...chainLinks(next)]);
      } finally {
        await closeChain(next);
      }
      plan.warnings.push(`unsafe rebase: only the backing name changes; ${abs(path)} reads differently unless the new backing file holds the same data as the old one`);
      await probeAll(plan, [[path, 'write']]);
      await permissionProblems(plan, [path]);
      return plan;
    } finally {
      await closeChain(top);
    }
  }
  const r = await openRebase(path, opts, 'none', false);
  try {
    const { top, next } = r;
    plan.chainsAfter.push([...chainLinks(top).slice(0, 1), ...chainLinks(next)]);
    const est = new WriteEstimate(top, await top.file.size());
    const old = top.backing;
    for await (const [at, n] of rebasePieces(ctx, top, next, rebaseChunk(top, opts))) {
      plan.bytesToRead += 2 * n;
      // Where the old chain reads as zero the overlay gets zero flags, elsewhere data.
      for (let p = at; p < at + n;) {
        const inOld = old && p < old.virtualSize;
        const st = inOld ? await chainBlockStatus(old, p, Math.min(at + n, old.virtualSize) - p) : null;
        const len = st ? st.length : at + n - p;
        if (st && !st.zero) { plan.bytesToCopy += len; await est.data(p, len); } else await est.zero(p, len);
        p += len;
      }
    }
    addSpace(plan, path, est.bytes(), `rebasing ${abs(path)}`);
    checkSpace(plan);
    const reads = [...chainOf(top).slice(1), ...(next ? chainOf(next) : [])].map((l): [string, 'read'] => [l.filename, 'read']);
    await probeAll(plan, [[path, 'write'], ...reads]);
    await permissionProblems(plan, [path]);
    const w = bitmapWarning(top);
    if (w && plan.bytesToCopy > 0) plan.warnings.push(w);
    return plan;
  } finally {
    await r.close();
  }
}

export async function rebase(ctx: JobContext, path: string, opts: RebaseOptions, planned?: JobPlan): Promise<RebaseResult> {
  requireBackingFormat(path, opts);
  const plan = planned ?? await planRebase(ctx, path, opts);
  enforcePlan(plan, opts.force);
  const result: RebaseResult = { bytesCompared: 0, bytesWritten: 0, dataBytesWritten: 0, writes: 0 };
  if (opts.unsafe) {
    const top = await openImageFile(path, { writable: true });
    try {
      if (!(top instanceof Qcow2Writable)) throw new UsageError(`${path}: only qcow2 images have a backing file`);
      await writeBackingName(top, opts.backing, opts.backingFormat ?? opts.backingFormatName ?? null);
    } finally {
      await closeChain(top);
    }
    return result;
  }

  const r = await openRebase(path, opts, 'auto', true);
  try {
    const { next, fmt } = r;
    if (!(r.top instanceof Qcow2Writable)) throw new UsageError(`${path}: cannot be written`);
    // Narrowed once, for the closures below.
    const overlay: Qcow2Writable = r.top;
    const g = overlay.geometry;
    const unit = g.extendedL2 ? g.subclusterSize : g.clusterSize;
    const chunk = rebaseChunk(overlay, opts);
    const old = overlay.backing;
    const size = overlay.virtualSize;
    const progress = new ProgressReporter(ctx, size);
    progress.setPhase('comparing');
    const width = 8;
    const oldBufs = ioBuffers(width, chunk);
    const newBufs = ioBuffers(width, chunk);
    // Pieces are disjoint, so their writes into the overlay never touch the same clusters.
    await runPool(rebasePieces(ctx, overlay, next, chunk, progress), width, ([at, n], slot) => compareAndWrite(at, n, slot), ctx.signal);

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
        else { await overlay.write(o.subarray(p, q), at + p); result.dataBytesWritten += q - p; }
        result.writes++;
        result.bytesWritten += q - p;
        p = q;
      }
    }
    throwIfCancelled(ctx);
    progress.setPhase('switching backing file');
    await writeBackingName(overlay, opts.backing, fmt);
    progress.done();
    return result;
  } finally {
    await r.close();
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
