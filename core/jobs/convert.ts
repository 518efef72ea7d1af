// convert: copy a chain's guest content into a new or existing image (compaction, compression,
// format change, flattening, -B). Block status decides what is read: windows that read as zero
// in every layer are never read, and zeros are never written to a fresh target. Windows are
// processed several at a time, and compression runs off the main thread, on both cores.
import { CancelledError } from '../errors';
import type { DiskImage } from '../engine/image';
import { Qcow2Writable } from '../engine/qcow2-write';
import { readScanned, readScannedInto } from '../engine/read-scan';
import { NodeFile } from '../io/node-file';
import { ioBuffers } from '../io/buffers';
import { compressClusterAsync } from '../codec/index';
import { chainBlockStatus } from '../chain/block-status';
import { assertNotInChain } from '../chain/open';
import { ProgressReporter, type JobContext } from './job';
import { runPool } from './pool';
import { openTarget, abandonTarget, type TargetSpec } from './target';
import { measure } from './measure';
import { explainNoSpace } from '../io/space';
import { stat } from '../io/fs-async';
import { basename, dirname } from 'node:path';
import { UsageError } from '../errors';
import { Qcow2Image } from '../engine/qcow2';
import { closeChain, combineBackingPath, openImage, parseFormat } from '../chain/open';
import { findOverlays } from './overlays';
import {
  abs, addAffected, addSpace, chainLinks, checkSpace, enforcePlan, newPlan, permissionProblems, probeAll, type JobPlan,
} from './plan-kit';

export interface ConvertOptions extends TargetSpec {
  /** -c: store data clusters compressed (qcow2 targets). */
  compress?: boolean;
  /**
   * -S: zero detection granularity for raw targets (default 4096); 0 writes everything as
   * data, zeros and unallocated areas too: the target is fully allocated, as qemu-img's.
   */
  minSparse?: number;
  /**
   * Bytes per window (default 4 MiB, 2 MiB with -c) and windows in flight (default 8). Each
   * window costs the JavaScript thread about the same whatever its size, and that thread is
   * what limits a copy on a small machine: 4 MiB halves that cost against 2 MiB for 16 MiB
   * more buffers. Compression is bound by the codecs instead, and holds every window's
   * clusters several times over (input, worker copies, output): it keeps 2 MiB.
   */
  chunkSize?: number;
  parallel?: number;
  /** Replace a target other images depend on (they then read different data). */
  force?: boolean;
  /**
   * -C (copy offloading): data runs are copied whole, as qemu-img's copy_range copies them,
   * without looking for zeros inside them (runs that read as zero by block status are still
   * skipped). The bytes are the same; the copy takes what the source has as data.
   */
  copyOffload?: boolean;
  /** --salvage: a read that fails is retried sector by sector; sectors that fail become zeros, with a warning each. */
  salvage?: boolean;
}

export interface ConvertResult {
  bytesRead: number;
  bytesWritten: number;
  compressedClusters: number;
}

/** True when every run in [off, off+len) reads as zero, per block status (no data read). */
async function windowIsZero(src: DiskImage, off: number, len: number): Promise<boolean> {
  let p = off;
  while (p < off + len) {
    const st = await chainBlockStatus(src, p, off + len - p);
    if (!st.zero) return false;
    p += st.length;
  }
  return true;
}

export async function convert(ctx: JobContext, src: DiskImage, targetPath: string, opts: ConvertOptions, planned?: JobPlan): Promise<ConvertResult> {
  // Creating the target empties the file first: it must not be one the source reads.
  await assertNotInChain(targetPath, src, 'convert');
  const size = src.virtualSize;
  // The plan is the pre-check: arguments, locks, permissions and space before the target is touched.
  const plan = planned ?? await planConvert(ctx, src, targetPath, opts);
  enforcePlan(plan, opts.force);
  const needed = opts.existing ? undefined : plan.space[0]?.needed;
  const target = await openTarget(targetPath, size, opts);
  const img = target.image;
  const result: ConvertResult = { bytesRead: 0, bytesWritten: 0, compressedClusters: 0 };
  try {
    const q = img instanceof Qcow2Writable ? img : null;
    const compress = !!opts.compress && !!q;
    const minSparse = opts.minSparse ?? 4096;
    const fullyAllocate = minSparse === 0;
    // The unit zeros are judged in: what the target allocates (cluster/subcluster), or -S.
    const unit = q ? (compress || !q.geometry.extendedL2 ? q.geometry.clusterSize : q.geometry.subclusterSize) : Math.max(512, minSparse || 512);
    const chunk = Math.max(unit, Math.ceil((opts.chunkSize ?? (compress ? 2 << 20 : 4 << 20)) / unit) * unit);
    // -S above the target's cluster size (a qcow2 target with small clusters): qemu-img aligns
    // the data it writes to pow2floor(-S) and writes zero runs shorter than -S as data
    // (is_allocated_sectors_min); the units are then decided as it decides them.
    const sparseAlign = q && !compress && minSparse >= 512 ? 512 * 2 ** Math.floor(Math.log2(Math.floor(minSparse / 512))) : 0;
    /** The data units of a window's data extents, as qemu-img's convert_co_write splits them. */
    async function qemuSparseUnits(buf: Buffer, off: number, len: number, dataUnits: Uint8Array): Promise<void> {
      const S = 512;
      const minSectors = Math.floor(minSparse / S);
      const align = sparseAlign / S;
      for (let p = off; p < off + len;) {
        const st = await chainBlockStatus(src, p, off + len - p);
        if (!st.zero) {
          // qemu-img reads data extents in buffers of 2 MiB (buf_sectors).
          for (let c = p; c < p + st.length; c += 2 << 20) {
            const end = Math.min(p + st.length, c + (2 << 20));
            const from = Math.floor((c - off) / unit);
            const to = Math.ceil((end - off) / unit);
            dataUnits.fill(0, from, to);
            for (const [a, b] of sparseDataRuns(buf.subarray(c - off, end - off), c / S, minSectors, align)) {
              for (let u = Math.floor((c - off + a * S) / unit); u * unit < c - off + b * S; u++) dataUnits[u] = 1;
            }
          }
        }
        p += st.length;
      }
    }
    const width = opts.parallel ?? 8;
    // The target's backing file counts where -B gave it (qemu-img's target_has_backing): an
    // existing target's own backing file (-n without -B) is not looked at, and zeros are
    // written where the source reads zero, as qemu-img writes them.
    const below = opts.existing && !opts.create?.backingFile ? null : img.backing;
    const progress = new ProgressReporter(ctx, size);
    progress.setPhase('converting');
    const srcBufs = ioBuffers(width, chunk);
    // Which units of a window hold data (1) or only zeros (0); none with -S 0: all is data.
    const scan = !fullyAllocate;
    const unitMaps = Array.from({ length: width }, () => (scan ? new Uint8Array(chunk / unit) : null));
    const baseBufs = below ? ioBuffers(width, chunk) : [];
    // A raw target that reads as zero wherever nothing is written takes each window's data
    // where the source has it: read, zero scan and write in one request (readScannedInto).
    const direct = !q && !below && scan && !opts.salvage && !opts.copyOffload && target.zeroInitialized && img.file instanceof NodeFile ? img.file : null;

    // Each window yielded gets the next turn number (skipped ranges take none).
    async function* windows(): AsyncGenerator<{ off: number; turn: number; hasData: boolean }> {
      let turn = 0;
      let off = 0;
      while (off < size) {
        let hasData = false;
        if (target.zeroInitialized && !below && !fullyAllocate) {
          // Jump over long runs that read as zero everywhere without visiting each window. The
          // status of the window alone first: asking to the end of the disk each time would
          // walk a long data run again for every window of it.
          const win = Math.min(chunk, size - off);
          let st = await chainBlockStatus(src, off, win);
          if (st.zero && st.length === win) {
            st = await chainBlockStatus(src, off, size - off);
            const skipTo = Math.min(size, Math.floor((off + st.length) / chunk) * chunk);
            if (skipTo > off) { progress.add(skipTo - off); off = skipTo; continue; }
          }
          hasData = !st.zero;
        }
        yield { off, turn: turn++, hasData };
        off += chunk;
      }
    }
    // Reads overlap; writes are started in guest order (as qemu-img does without -W), which
    // keeps the file system's and the target's allocation sequential.
    const gate = new OrderedGate();

    await runPool(windows(), width, async ({ off, turn, hasData }, slot) => {
      try {
        await processWindow(off, slot, turn, hasData);
      } finally {
        gate.done(turn);
      }
    }, ctx.signal);

    async function processWindow(off: number, slot: number, turn: number, hasData: boolean): Promise<void> {
      if (ctx.signal?.aborted) throw new CancelledError();
      const len = Math.min(chunk, size - off);
      // The window generator already knows when the window starts with data: no second walk.
      const zeroWindow = !hasData && (await windowIsZero(src, off, len));
      if (zeroWindow && target.zeroInitialized && !fullyAllocate) { progress.add(len); return; }
      const buf = srcBufs[slot]!.subarray(0, len);
      const dataUnits = unitMaps[slot] ?? null;
      if (zeroWindow) {
        buf.fill(0);
        dataUnits?.fill(0);
      } else if (direct && dataUnits && (await readScannedInto(src, buf, off, unit, dataUnits, direct))) {
        result.bytesRead += len;
        for (let i = 0, p = 0; p < len; p += unit, i++) if (dataUnits[i]) result.bytesWritten += Math.min(unit, len - p);
        progress.add(len);
        return;
      } else {
        try {
          await readScanned(src, buf, off, unit, dataUnits);
        } catch (err) {
          if (!opts.salvage) throw err;
          await salvageRead(ctx, src, buf, off, unit, dataUnits);
        }
        result.bytesRead += len;
      }
      if (sparseAlign > unit && dataUnits && !opts.copyOffload) await qemuSparseUnits(buf, off, len, dataUnits);
      if (opts.copyOffload && dataUnits) {
        // Every unit that block status calls data is copied, zeros or not.
        for (let p = off; p < off + len;) {
          const st = await chainBlockStatus(src, p, off + len - p);
          if (!st.zero) for (let u = Math.floor((p - off) / unit); u * unit < p - off + st.length; u++) dataUnits[u] = 1;
          p += st.length;
        }
      }
      let base: Buffer | null = null;
      if (below) {
        base = baseBufs[slot]!.subarray(0, len);
        const n = Math.max(0, Math.min(len, below.virtualSize - off));
        if (n > 0) await below.read(base.subarray(0, n), off);
        base.fill(0, n);
      }
      // Decide per unit: skip (already right on the target), zero, or data; merge neighbours.
      // Units with the same zero map value are taken as one run (a raw target has a thousand
      // 4 KiB units per window); only -B compares unit by unit.
      type Piece = { start: number; end: number; kind: 'zero' | 'data' };
      const pieces: Piece[] = [];
      const add = (start: number, end: number, kind: Piece['kind']) => {
        if (compress && kind === 'data') {
          // Compressed clusters are written one by one.
          for (let p = start; p < end; p += unit) pieces.push({ start: p, end: Math.min(end, p + unit), kind });
          return;
        }
        const last = pieces[pieces.length - 1];
        if (last && last.kind === kind && last.end === start) last.end = end;
        else pieces.push({ start, end, kind });
      };
      const units = Math.ceil(len / unit);
      for (let i = 0; i < units;) {
        const v = dataUnits ? dataUnits[i] : 1;
        let j = i + 1;
        if (dataUnits) while (j < units && dataUnits[j] === v) j++;
        else j = units;
        const zero = v === 0;
        if (base) {
          for (let k = i; k < j; k++) {
            const p = k * unit;
            const e = Math.min(len, p + unit);
            if (buf.compare(base, p, e, p, e) !== 0) add(p, e, zero ? 'zero' : 'data');
          }
        } else if (!zero) {
          add(i * unit, Math.min(len, j * unit), 'data');
        } else if (!target.zeroInitialized) {
          add(i * unit, Math.min(len, j * unit), 'zero');
        }
        i = j;
      }
      // Compress before taking our turn, so compression of several windows overlaps.
      const packed = compress
        ? await Promise.all(pieces.map((pc) => (pc.kind === 'data' ? compressClusterAsync(q!.compressionType, padTo(buf.subarray(pc.start, pc.end), unit)) : null)))
        : null;
      await gate.wait(turn);
      // Started in guest order, the writes allocate in that order (the target's layout stays
      // sequential), and the next window may start its own while these are still in flight:
      // the target file takes them one at a time, but its queue no longer runs dry while the
      // main thread finishes this window's metadata or scans another window.
      const writes = pieces.map((pc, i) => writePiece(pc, i));
      gate.done(turn);
      const settled = await Promise.allSettled(writes);
      for (const r of settled) if (r.status === 'rejected') throw r.reason;
      progress.add(len);

      async function writePiece(pc: Piece, i: number): Promise<void> {
        // As qemu-img convert: zeros on an existing target may free its clusters.
        if (pc.kind === 'zero') { await img.writeZeroes(off + pc.start, pc.end - pc.start, { unmap: true }); return; }
        const data = buf.subarray(pc.start, pc.end);
        const c = packed?.[i];
        if (c) {
          await q!.writeCompressedCluster(c, off + pc.start);
          result.compressedClusters++;
          result.bytesWritten += c.length;
          return;
        }
        await img.write(data, off + pc.start);
        result.bytesWritten += data.length;
      }
    }
    if (ctx.signal?.aborted) throw new CancelledError();
    await img.flush();
    // Closing writes the last metadata: a target that cannot be closed is incomplete.
    await img.close();
    progress.done();
  } catch (err) {
    await abandonTarget(target, targetPath);
    if (ctx.signal?.aborted) throw new CancelledError(target.created ? 'convert cancelled; the partial target was removed' : 'convert cancelled');
    throw explainNoSpace(err, targetPath, needed);
  }
  await closeBelow(img.backing);
  return result;
}

const ZERO_SECTOR = Buffer.alloc(512);

/**
 * The sector runs [a, b) of `buf` (starting at sector `first` of the disk) that qemu-img's
 * convert writes as data with -S: is_allocated_sectors_min over the buffer, again and again
 * (zero runs of at least `min` sectors are skipped; the end of a data run is aligned up to
 * `align` sectors, a zero run's end down to it).
 */
export function sparseDataRuns(buf: Buffer, first: number, min: number, align: number): [number, number][] {
  const S = 512;
  const total = Math.floor(buf.length / S) + (buf.length % S ? 1 : 0);
  const zero = new Uint8Array(total);
  for (let i = 0; i < total; i++) {
    const end = Math.min(buf.length, (i + 1) * S);
    zero[i] = ZERO_SECTOR.compare(buf, i * S, end, 0, end - i * S) === 0 ? 1 : 0;
  }
  // is_allocated_sectors: [data?, pnum] for the sectors from i (n of them).
  const allocated = (i: number, n: number): [boolean, number] => {
    let isZero = zero[i] === 1;
    let k = 1;
    while (k < n && (zero[i + k] === 1) === isZero) k++;
    if (k === n) return [!isZero, k];
    const tail = (first + i + k) & (align - 1);
    if (tail) {
      if (isZero && k <= tail) isZero = false;
      if (!isZero) k = Math.min(k + align - tail, n);
      else k -= tail;
    }
    return [!isZero, k];
  };
  const out: [number, number][] = [];
  for (let i = 0; i < total;) {
    const n = total - i;
    const m = Math.min(min, n);
    let [data, pnum] = allocated(i, n);
    if (data) {
      // is_allocated_sectors_min: zero runs shorter than `m` inside data are taken as data.
      let used = pnum;
      let checked = pnum;
      while (i + checked < i + n) {
        const [d, k] = allocated(i + checked, n - checked);
        checked += k;
        if (d) used = checked;
        else if (k >= m) break;
      }
      pnum = used;
      const last = out[out.length - 1];
      if (last && last[1] === i) last[1] = i + pnum; else out.push([i, i + pnum]);
    }
    i += pnum;
  }
  return out;
}

async function closeBelow(img: DiskImage | null): Promise<void> {
  for (let l = img; l; l = l.backing) await l.close().catch(() => {});
}

/**
 * --salvage: the window read again sector by sector (as qemu-img's convert_co_read retries);
 * a sector that cannot be read becomes zeros, with qemu-img's warning.
 */
async function salvageRead(ctx: JobContext, src: DiskImage, buf: Buffer, off: number, unit: number, dataUnits: Uint8Array | null): Promise<void> {
  for (let p = 0; p < buf.length; p += 512) {
    const s = buf.subarray(p, Math.min(buf.length, p + 512));
    try {
      await src.read(s, off + p);
    } catch (err) {
      ctx.log?.(`warning: error while reading offset ${off + p}: ${(err as NodeJS.ErrnoException).code === 'EIO' || !(err as NodeJS.ErrnoException).code ? 'Input/output error' : (err as Error).message}`);
      s.fill(0);
    }
  }
  if (dataUnits) for (let i = 0, p = 0; p < buf.length; p += unit, i++) dataUnits[i] = buf.subarray(p, Math.min(buf.length, p + unit)).some((b) => b !== 0) ? 1 : 0;
}

function padTo(data: Buffer, n: number): Buffer {
  return data.length === n ? data : Buffer.concat([data, Buffer.alloc(n - data.length)]);
}

/** Lets tasks numbered 0, 1, 2, ... pass one after another, in order. */
class OrderedGate {
  private next = 0;
  private readonly finished = new Set<number>();
  private readonly waiting = new Map<number, () => void>();

  wait(turn: number): Promise<void> {
    if (turn <= this.next) return Promise.resolve();
    return new Promise((r) => this.waiting.set(turn, r));
  }

  /** Marks `turn` finished (also when it failed or had nothing to write); again is a no-op. */
  done(turn: number): void {
    if (turn < this.next || this.finished.has(turn)) return;
    this.finished.add(turn);
    while (this.finished.has(this.next)) {
      this.finished.delete(this.next);
      this.next++;
    }
    const w = this.waiting.get(this.next);
    if (w) { this.waiting.delete(this.next); w(); }
  }
}

/**
 * What a fresh target will take: qemu-img measure's `required`, or the data for raw, less what
 * an existing file there gives back when it is replaced.
 */
export async function targetSpace(ctx: JobContext, src: DiskImage, targetPath: string, opts: TargetSpec): Promise<number> {
  const c = opts.create ?? {};
  let reclaimed = 0;
  try { reclaimed = (await stat(targetPath)).blocks * 512; } catch { /* no file there yet */ }
  let needed = 0;
  if (opts.format === 'raw') {
    // Raw targets hold exactly the data: count what is not zero.
    for (let off = 0; off < src.virtualSize;) {
      const st = await chainBlockStatus(src, off, src.virtualSize - off);
      if (!st.zero) needed += st.length;
      off += st.length;
    }
  } else {
    needed = (await measure(ctx, {
      format: 'qcow2', clusterSize: c.clusterSize ?? 65536, refcountBits: c.refcountBits ?? 16,
      extendedL2: !!c.extendedL2, hasBacking: !!c.backingFile,
    }, src)).required;
  }
  return Math.max(0, needed - reclaimed);
}

/**
 * Bytes a copy of `src` writes as data to a target that reads as zero where nothing is written:
 * the runs that do not read as zero, widened to the target's write unit.
 */
export async function dataToCopy(src: DiskImage, unit: number, sync: 'full' | 'top' = 'full'): Promise<{ read: number; write: number }> {
  let read = 0;
  let write = 0;
  let coveredTo = 0;
  const size = src.virtualSize;
  for (let off = 0; off < size;) {
    let isData: boolean;
    let len: number;
    if (sync === 'top') {
      const st = await src.blockStatus(off, size - off);
      isData = st.allocated && !(st.zero && !st.data);
      len = st.length;
    } else {
      const st = await chainBlockStatus(src, off, size - off);
      isData = !st.zero;
      len = st.length;
    }
    const st = { length: len };
    if (isData) {
      read += st.length;
      const a = Math.max(coveredTo, Math.floor(off / unit) * unit);
      const b = Math.min(size, Math.ceil((off + st.length) / unit) * unit);
      if (b > a) write += b - a;
      coveredTo = Math.max(coveredTo, b);
    }
    off += st.length;
  }
  return { read, write };
}

/** Warnings for what a copy of `src` does not carry over: internal snapshots, persistent bitmaps. */
export function copyWarnings(src: DiskImage, what: string): string[] {
  const out: string[] = [];
  if (src instanceof Qcow2Image) {
    if (src.snapshots.length) out.push(`${abs(src.filename)} has ${src.snapshots.length} internal snapshot(s); ${what} copies only the current state, not them`);
    if (src.bitmaps?.length) out.push(`${abs(src.filename)} has ${src.bitmaps.length} persistent bitmap(s); ${what} does not copy them`);
  }
  return out;
}

/** What happens to an existing file at a target path: replaced, or written into (-n); its overlays. */
export async function targetPlan(plan: JobPlan, targetPath: string, existing: boolean): Promise<void> {
  let exists = false;
  try { exists = (await stat(targetPath)).isFile(); } catch { /* nothing there */ }
  if (existing) plan.writes.push(abs(targetPath));
  else plan.creates.push(abs(targetPath));
  if (exists && !existing) plan.warnings.push(`${abs(targetPath)} exists and is replaced`);
  if (exists) {
    addAffected(plan, targetPath, (await findOverlays(targetPath)).map((o) => o.path), 'would read the new content');
    await probeAll(plan, [[targetPath, 'write']]);
    await permissionProblems(plan, [targetPath]);
  } else {
    await permissionProblems(plan, [], [dirname(abs(targetPath))]);
  }
}

/** The command line of a conversion. */
export function convertCommand(source: string, targetPath: string, opts: ConvertOptions & { sourceFormat?: string; snapshot?: string }): string[] {
  const cmd = ['strata', 'convert'];
  if (opts.sourceFormat) cmd.push('-f', opts.sourceFormat);
  cmd.push('-O', opts.format);
  const c = opts.create ?? {};
  const o = Object.entries(c.given ?? {}).filter(([k]) => k !== 'backing_file' && k !== 'backing_fmt').map(([k, v]) => `${k}=${v}`);
  if (o.length) cmd.push('-o', o.join(','));
  if (opts.compress) cmd.push('-c');
  if (c.backingFile) { cmd.push('-B', c.backingFile); if (c.backingFormat) cmd.push('-F', c.backingFormat); }
  if (opts.existing) cmd.push('-n');
  if (opts.targetIsZero) cmd.push('--target-is-zero');
  if (opts.minSparse !== undefined && opts.minSparse !== 4096) cmd.push('-S', String(opts.minSparse));
  if (opts.snapshot) cmd.push('-l', `snapshot.name=${opts.snapshot}`);
  cmd.push(abs(source), abs(targetPath));
  return cmd;
}

/**
 * The conversion's plan for an opened source: the target created (or replaced, or written with
 * -n), the data read and written (block status), the space the target needs on its file
 * system, and what the copy leaves behind (snapshots, bitmaps).
 */
export async function planConvert(ctx: JobContext, src: DiskImage, targetPath: string, opts: ConvertOptions, command?: string[]): Promise<JobPlan> {
  const plan = newPlan('convert', `Convert ${basename(src.filename)} to ${opts.format} ${basename(targetPath)}${opts.compress ? ', compressed' : ''}`,
    command ?? convertCommand(src.filename, targetPath, opts));
  if (opts.compress && opts.format !== 'qcow2') throw new UsageError('-c (compression) needs a qcow2 target (-O qcow2)');
  // QEMU does not encrypt compressed clusters: qemu-img refuses the two together.
  if (opts.compress && (opts.create?.encryption || opts.create?.encryptFormat !== undefined)) {
    throw new UsageError('-c (compression) cannot go with encryption: compressed clusters are not encrypted').asQemu('Compression and encryption not supported at the same time');
  }
  if (opts.targetIsZero && !opts.existing) throw new UsageError('--target-is-zero requires -n (an existing target)');
  // By device and inode: the source or any image of its chain, under any name.
  await assertNotInChain(targetPath, src, 'convert');
  await targetPlan(plan, targetPath, !!opts.existing);
  const c = opts.create ?? {};
  const link = { filename: abs(targetPath), format: opts.format, virtualSize: opts.format === 'raw' ? src.virtualSize : Math.ceil(src.virtualSize / 512) * 512 };
  let below: DiskImage | null = null;
  if (c.backingFile) {
    try { below = await openImage(combineBackingPath(targetPath, c.backingFile), { format: parseFormat(c.backingFormat), lock: 'none' }); } catch { /* create names it */ }
  }
  try {
    plan.chainsAfter.push([link, ...chainLinks(below)]);
  } finally {
    await closeChain(below);
  }
  const unit = opts.format === 'qcow2'
    ? (!opts.compress && c.extendedL2 ? (c.clusterSize ?? 65536) / 32 : c.clusterSize ?? 65536)
    : Math.max(512, (opts.minSparse ?? 4096) || 512);
  const d = await dataToCopy(src, unit);
  plan.bytesToRead = d.read;
  plan.bytesToCopy = d.write;
  if (opts.existing) {
    plan.warnings.push(`${abs(targetPath)} is written in place: the space it needs depends on what it holds already (not counted)`);
    addSpace(plan, targetPath, 0, `the converted image ${abs(targetPath)}`);
  } else {
    addSpace(plan, targetPath, await targetSpace(ctx, src, targetPath, opts), `the converted image ${abs(targetPath)}`);
  }
  checkSpace(plan);
  if (opts.compress) plan.warnings.push('compressed: bytes to copy and space needed are before compression (at most that much)');
  if (c.backingFile) plan.warnings.push(`-B: only what differs from ${c.backingFile} is written (bytes to copy is at most that much)`);
  plan.warnings.push(...copyWarnings(src, 'a conversion'));
  return plan;
}

