// compact: rewrite an image in place with only its live data.
//
// qcow2: the image is rewritten into a temporary file beside it (.NAME.strata-compact-XXXXXXXXXXXX)
// with the same format options (cluster size, extended L2, compression type, compat, refcount
// width, lazy refcounts), the same backing name and format exactly as recorded, and its
// persistent bitmaps. Only what this layer allocates is copied: data that reads as zero becomes
// nothing (or a zero flag over a backing file), compressed clusters are copied as they are
// stored (-c compresses the others too). The copy is compared with the original, given its
// mode, owner and extended attributes, and renamed over it; all that while the original is
// held with QEMU's write locks, so no VM can start on it meanwhile. The original is only read:
// a failure, a cancel or a kill at any moment leaves it untouched, and the temporary file is
// removed (a killed run's is removed by the next run on the image).
//
// raw: nothing to rewrite: blocks that read as zero are punched out of the file in place
// (every punch keeps the content: it only drops blocks of zeros), under the same write lock.
//
// Images with internal snapshots are refused: a copy of the active layer would lose them.
import { basename, dirname, join } from 'node:path';
import { fchmod, fchown, fstat, fsync, fsyncSync, openSync, closeSync, rename as renameCb } from 'node:fs';
import { promisify } from 'node:util';
import { CancelledError, CorruptImageError, StrataError, UsageError } from '../errors';
import * as C from '../format/constants';
import { decodeHeader, encodeHeader } from '../format/header';
import { compressedRange } from '../format/l2';
import { Qcow2Image } from '../engine/qcow2';
import { Qcow2Writable } from '../engine/qcow2-write';
import { RawImage } from '../engine/raw';
import { copyBitmaps, bitmapsCopySize, setBitmapsExtension } from '../engine/bitmap-copy';
import { compressClusterAsync } from '../codec/index';
import { openImage, openImageFile, closeChain } from '../chain/open';
import { lockImage, WRITE_LOCK, type ImageLock } from '../io/locks';
import { NodeFile } from '../io/node-file';
import { native } from '../io/native';
import { readdir, stat, unlink } from '../io/fs-async';
import { explainNoSpace } from '../io/space';
import { isZero } from '../engine/zero';
import { refcountBlockEntries } from '../format/refcount';
import { startQcow2Layout, finishQcow2Layout } from '../format/layout';
import { ProgressReporter, throwIfCancelled, type JobContext } from './job';
import { createImage } from './create';
import {
  abs, addSpace, chainLinks, checkSpace, enforcePlan, newPlan, permissionProblems, probeAll, probeLock, type JobPlan,
} from './plan-kit';
import { realOrSelf } from './overlays';

const renameP = promisify(renameCb);
const fchmodP = promisify(fchmod);
const fchownP = promisify(fchown);
const fstatP = promisify(fstat);
const fsyncP = promisify(fsync);

export interface CompactOptions {
  /** -c: store the data clusters compressed (already compressed ones are kept as they are). */
  compress?: boolean;
  /** Bytes per step (default 4 MiB, whole clusters). */
  chunkSize?: number;
}

export interface CompactResult {
  /** Bytes the image occupied (st_blocks) before and after. */
  before: number;
  after: number;
  /** Guest data written to the new file (compressed clusters count their stored size). */
  bytesWritten: number;
  plan: JobPlan;
}

const TEMP_MARK = '.strata-compact-';

/** The temporary name's prefix for `path`: `.NAME.strata-compact-` beside it. */
export function compactTempPrefix(path: string): string {
  return join(dirname(abs(path)), `.${basename(path)}${TEMP_MARK}`);
}

/** Temporary files of earlier compactions of `path` that are still there (a killed run's). */
export async function compactLeftovers(path: string): Promise<string[]> {
  const prefix = basename(compactTempPrefix(path));
  let names: string[] = [];
  try { names = await readdir(dirname(abs(path))); } catch { return []; }
  const out: string[] = [];
  for (const n of names.sort()) {
    if (!n.startsWith(prefix) || !/^[0-9a-f]{12}$/.test(n.slice(prefix.length))) continue;
    const p = join(dirname(abs(path)), n);
    try { if ((await stat(p)).isFile()) out.push(p); } catch { /* gone */ }
  }
  return out;
}

/** Compressed clusters of `img` by host offset, each with the end of its stored bytes. */
async function compressedBlobs(img: Qcow2Image): Promise<Map<number, number>> {
  const starts: { start: number; end: number }[] = [];
  for (let pos = 0; pos < img.virtualSize;) {
    const runs = await img.runs(pos, Math.min(img.virtualSize - pos, 1 << 30));
    for (const r of runs) {
      if (r.compressed && r.offset === r.compressed.clusterStart) starts.push(compressedRange(r.compressed.hostOffset, r.compressed.sectors));
    }
    pos = runs.length ? runs[runs.length - 1]!.offset + runs[runs.length - 1]!.length : img.virtualSize;
  }
  starts.sort((a, b) => a.start - b.start);
  // A cluster's stored bytes end at its last sector's end, which may be the next one's data:
  // QEMU packs them byte by byte. So the next start (when nearer) is where this one ends.
  const out = new Map<number, number>();
  for (let i = 0; i < starts.length; i++) {
    const next = i + 1 < starts.length ? starts[i + 1]!.start : Infinity;
    out.set(starts[i]!.start, Math.max(starts[i]!.start + 1, Math.min(starts[i]!.end, next > starts[i]!.start ? next : Infinity)));
  }
  return out;
}

/** Why a qcow2 image cannot be compacted (null when it can). */
function obstacle(img: Qcow2Image): string | null {
  if (img.snapshots.length) return `it has ${img.snapshots.length} internal snapshot(s), which a compacted copy would lose; delete them first (strata snapshot -d NAME) or keep them with convert`;
  if (img.geometry.externalData) return 'it has an external data file';
  if (img.encrypted) return 'it is encrypted (its clusters are copied as stored, which needs them unencrypted); use convert with encryption options instead';
  if (img.header.incompatibleFeatures & C.INCOMPAT_CORRUPT) return 'it is marked corrupt; run strata check -r all on it first';
  if ((img.header.incompatibleFeatures & C.INCOMPAT_DIRTY) && !(img.header.compatibleFeatures & C.COMPAT_LAZY_REFCOUNTS)) return 'it was not closed cleanly; run strata check -r all on it first';
  return null;
}

/** What the rewritten qcow2 file will take, from the mapping of `img` (data reading as zero dropped as well, so at most this). */
async function expectedAfter(ctx: JobContext, img: Qcow2Image): Promise<{ after: number; read: number; copy: number }> {
  const g = img.geometry;
  const cs = g.clusterSize;
  const hasBacking = img.backingFile !== null;
  const unit = g.extendedL2 ? g.subclusterSize : cs;
  let dataClusters = 0;
  let lastCluster = -1;
  const l2 = new Set<number>();
  let read = 0;
  let copy = 0;
  const blobs = await compressedBlobs(img);
  let blobBytes = 0;
  for (let pos = 0; pos < img.virtualSize;) {
    throwIfCancelled(ctx);
    const runs = await img.runs(pos, Math.min(img.virtualSize - pos, 1 << 30));
    for (const r of runs) {
      const l1i = (c: number) => Math.floor(c / g.l2Entries);
      const first = Math.floor(r.offset / cs);
      const last = Math.floor((r.offset + r.length - 1) / cs);
      switch (r.state) {
        case 'data':
          read += r.length;
          copy += Math.min(img.virtualSize, Math.ceil((r.offset + r.length) / unit) * unit) - Math.floor(r.offset / unit) * unit;
          for (let c = Math.max(first, lastCluster + 1); c <= last; c++) { dataClusters++; l2.add(l1i(c)); }
          lastCluster = Math.max(lastCluster, last);
          break;
        case 'compressed':
          if (r.offset === r.compressed!.clusterStart) {
            const start = r.compressed!.hostOffset;
            const n = blobs.get(start)! - start;
            blobBytes += n;
            read += n;
            copy += n;
            l2.add(l1i(first));
          }
          break;
        case 'zero':
          if (hasBacking && img.header.version === 3) for (let c = first; c <= last; c++) l2.add(l1i(c));
          else if (hasBacking) {
            // compat 0.10 has no zero flag: zeros over a backing file are written as data.
            for (let c = Math.max(first, lastCluster + 1); c <= last; c++) { dataClusters++; l2.add(l1i(c)); }
            lastCluster = Math.max(lastCluster, last);
          }
          break;
        case 'unallocated':
          break;
        default: { const never: never = r.state; throw new Error(String(never)); }
      }
    }
    pos = runs.length ? runs[runs.length - 1]!.offset + runs[runs.length - 1]!.length : img.virtualSize;
  }
  // The fresh layout (header, refcount table and block, L1 table), laid out as create does.
  const spec = {
    size: img.virtualSize, clusterBits: g.clusterBits, version: img.header.version, refcountOrder: img.header.refcountOrder,
    extendedL2: g.extendedL2, compressionType: img.header.compressionType, lazyRefcounts: false,
    backingFile: img.backingFile, backingFormat: img.backingFormat ?? (img.backingFile ? 'qcow2' : null), preallocation: 'off' as const,
  };
  const layout = startQcow2Layout(spec);
  finishQcow2Layout(spec, layout);
  const base = Math.ceil(layout.fileLength / cs);
  let clusters = base + l2.size + dataClusters + Math.ceil(blobBytes / cs) + (await bitmapsCopySize(img)) / cs;
  const perBlock = refcountBlockEntries(g.clusterBits, img.header.refcountOrder);
  // The first refcount block covers perBlock clusters; each further block is one more cluster.
  clusters += Math.max(0, Math.ceil(clusters / perBlock) - 1);
  return { after: clusters * cs, read, copy };
}

/** The compaction's plan: the expected size afterwards and the saving, the temporary file's space, the locks. */
export async function planCompact(ctx: JobContext, path: string, opts: CompactOptions = {}): Promise<JobPlan> {
  const top = await openImage(path, { lock: 'none' });
  try {
    const command = ['strata', 'compact'];
    if (opts.compress) command.push('-c');
    command.push(abs(path));
    const before = (await stat(path)).blocks * 512;
    const plan = newPlan('compact', `Compact ${basename(path)}`, command);
    plan.chainsAfter.push(chainLinks(top));
    // A symbolic link is followed: the file it names is the one rewritten and replaced.
    const real = await realOrSelf(path);
    const leftovers = await compactLeftovers(real);
    for (const l of leftovers) {
      // A temporary file someone holds is a compaction running now, not a leftover.
      const live = await probeLock(l, 'write');
      if (live) plan.blocked.push({ filename: abs(path), reason: `being compacted right now (${l}): ${live.reason}`, holder: live.holder });
      else plan.removes.push(l);
    }
    if (top instanceof RawImage) {
      if (!native()) throw new UsageError(`${path}: compacting a raw image punches holes, which needs the native addon (npm run build)`);
      plan.writes.push(abs(path));
      let data = 0;
      for (let p = 0; p < top.virtualSize;) {
        const st = await top.blockStatus(p, top.virtualSize - p);
        if (st.data) data += st.length;
        p += st.length;
      }
      plan.bytesToRead = data;
      plan.expectedSize = { before, after: before };
      plan.warnings.push('raw image: blocks that read as zero are punched out in place; how many is only known once they are read (the size after is at most the size now)');
      addSpace(plan, path, 0, `compacting ${abs(path)}`);
      await probeAll(plan, [[path, 'write']]);
      await permissionProblems(plan, [path]);
      return plan;
    }
    const q = top as Qcow2Image;
    const why = obstacle(q);
    if (why) throw new UsageError(`${path}: cannot compact: ${why}`);
    const e = await expectedAfter(ctx, q);
    plan.expectedSize = { before, after: e.after };
    plan.bytesToRead = e.read;
    plan.bytesToCopy = e.copy;
    plan.title = `Compact ${basename(path)} (${sizeText(before)} now, about ${sizeText(e.after)} after)`;
    plan.renames.push({ from: `${compactTempPrefix(real)}XXXXXXXXXXXX`, to: real });
    addSpace(plan, path, e.after, `the compacted copy of ${abs(path)}`);
    checkSpace(plan);
    if (e.after >= before) plan.warnings.push(`${abs(path)} is already compact: the copy will not be smaller`);
    if (opts.compress) plan.warnings.push('-c: the data is compressed, so the image ends up smaller than the size after given here');
    plan.warnings.push(top.backing
      ? 'data that reads as zero, or the same as in the backing file, is dropped too, so the image may end up smaller than the size after given here'
      : 'data that reads as zero is dropped too, so the image may end up smaller than the size after given here');
    if (!native()?.listXattrs) plan.warnings.push('the native addon is not loaded: extended attributes of the image are not kept');
    await probeAll(plan, [[path, 'write'], ...chainLinks(top.backing).map((l): [string, 'read'] => [l.filename, 'read'])]);
    await permissionProblems(plan, [], [dirname(real)]);
    await ownerProblems(plan, real);
    return plan;
  } finally {
    await closeChain(top);
  }
}

function sizeText(n: number): string {
  const u = ['bytes', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  let v = n;
  while (v >= 1024 && i < u.length - 1) { v /= 1024; i++; }
  return i === 0 ? `${n} bytes` : `${v.toFixed(1)} ${u[i]}`;
}

/** The copy gets the original's owner and group: only root, or the owner in that group, can give them. */
async function ownerProblems(plan: JobPlan, path: string): Promise<void> {
  const st = await stat(path);
  if (typeof process.getuid !== 'function' || process.getuid() === 0) return;
  if (st.uid !== process.getuid()) plan.problems.push(`${abs(path)}: owned by user ${st.uid}: only that user or root can compact it (the copy must keep its owner)`);
  else if (st.gid !== process.getgid?.() && !(process.getgroups?.() ?? []).includes(st.gid)) {
    plan.problems.push(`${abs(path)}: its group ${st.gid} is not one of ours: the copy could not keep it`);
  }
}

export async function compact(ctx: JobContext, path: string, opts: CompactOptions = {}, planned?: JobPlan): Promise<CompactResult> {
  const plan = planned ?? await planCompact(ctx, path, opts);
  enforcePlan(plan);
  const top = await openImage(path);
  let lock: ImageLock | null = null;
  try {
    // Writers (a VM starting) stay out until the copy has replaced the original.
    lock = await lockImage((top.file as NodeFile).fd, path, WRITE_LOCK);
    for (const l of plan.removes) await removeLeftover(l);
    const before = (await stat(path)).blocks * 512;
    if (top instanceof RawImage) {
      await closeChain(top);
      const bytes = await punchZeros(ctx, path);
      return { before, after: (await stat(path)).blocks * 512, bytesWritten: bytes, plan };
    }
    const why = obstacle(top as Qcow2Image);
    if (why) throw new UsageError(`${path}: cannot compact: ${why}`);
    const bytes = await rewrite(ctx, top as Qcow2Image, await realOrSelf(path), opts, plan);
    return { before, after: (await stat(path)).blocks * 512, bytesWritten: bytes, plan };
  } finally {
    lock?.release();
    await closeChain(top);
  }
}

/** Removes a killed run's temporary file, unless a live compaction holds it. */
async function removeLeftover(p: string): Promise<void> {
  if (await probeLock(p, 'write')) return;
  await unlink(p).catch(() => {});
}

/** Writes the copy, checks it, gives it the original's metadata and renames it over the original. */
async function rewrite(ctx: JobContext, src: Qcow2Image, path: string, opts: CompactOptions, plan: JobPlan): Promise<number> {
  // 48 random bits: node:crypto would load node's streams into every command's start.
  const tmp = compactTempPrefix(path) + Math.floor(Math.random() * 2 ** 48).toString(16).padStart(12, '0');
  const st0 = await stat(path);
  let out: Qcow2Writable | null = null;
  let held: NodeFile | null = null;
  let renamed = false;
  const needed = plan.space[0]?.needed;
  try {
    await createLike(src, tmp);
    out = (await openImageFile(tmp, { format: 'qcow2', writable: true })) as Qcow2Writable;
    out.backing = src.backing;
    const bytes = await copyLayer(ctx, src, out, opts);
    throwIfCancelled(ctx);
    if (src.bitmaps) {
      const copied = await copyBitmaps(src, out);
      await out.close();
      out = null;
      if (copied) {
        const f = await NodeFile.open(tmp, { writable: true });
        try { await setBitmapsExtension(f, copied); } finally { await f.close(); }
      }
    } else {
      await out.close();
      out = null;
    }
    // From here to the rename the copy is held with the write lock too.
    held = await NodeFile.open(tmp, { writable: true });
    await lockImage(held.fd, tmp, WRITE_LOCK);
    const copy = await Qcow2Image.open(tmp, held);
    copy.backing = src.backing;
    await verify(ctx, src, copy, path);
    throwIfCancelled(ctx);
    await keepMetadata(path, held.fd, st0);
    await held.flush();
    const st1 = await stat(path);
    if (st1.ino !== st0.ino || st1.size !== st0.size || st1.mtimeMs !== st0.mtimeMs) {
      throw new StrataError('io', 'the image changed while it was being compacted (by a program that does not take QEMU\'s locks); it is left as it is', path);
    }
    await renameP(tmp, path);
    renamed = true;
    syncDir(dirname(abs(path)));
    return bytes;
  } catch (err) {
    if (ctx.signal?.aborted) throw new CancelledError('compact cancelled; the image is unchanged');
    throw explainNoSpace(err, tmp, needed);
  } finally {
    if (out) await out.close().catch(() => {});
    if (held) await held.close().catch(() => {});
    if (!renamed) await unlink(tmp).catch(() => {});
  }
}

/** An empty image with `src`'s options and its backing name and format exactly as recorded. */
async function createLike(src: Qcow2Image, tmp: string): Promise<void> {
  const h = src.header;
  const recorded = src.backingFormat;
  await createImage(tmp, {
    format: 'qcow2', size: src.virtualSize, clusterSize: src.geometry.clusterSize, extendedL2: src.geometry.extendedL2,
    compressionType: h.compressionType === C.COMPRESSION_ZSTD ? 'zstd' : 'zlib', refcountBits: 2 ** h.refcountOrder,
    lazyRefcounts: h.version === 3 && (h.compatibleFeatures & C.COMPAT_LAZY_REFCOUNTS) !== 0n, compat: h.version === 2 ? '0.10' : '1.1',
    backingFile: src.backingFile ?? undefined, backingFormat: src.backingFile ? recorded ?? src.backing?.format ?? 'qcow2' : undefined, unsafe: true,
  });
  if (src.backingFile && recorded === null) {
    // The original records no backing format (older images): neither does the copy.
    const f = await NodeFile.open(tmp, { writable: true });
    try {
      const head = Buffer.alloc(src.geometry.clusterSize);
      await f.read(head, 0);
      const p = decodeHeader(head, tmp);
      p.backingFormat = null;
      p.extensions = p.extensions.filter((e) => e.type !== C.EXT_BACKING_FORMAT);
      await f.write(encodeHeader(p, tmp), 0);
      await f.flush();
    } finally {
      await f.close();
    }
  }
}

/**
 * Copies what `src` itself allocates into the fresh `out`, leaving out what `out` would read
 * the same without it: zeros without a backing file, and over one what the backing chain
 * already holds. Returns the data bytes written.
 */
async function copyLayer(ctx: JobContext, src: Qcow2Image, out: Qcow2Writable, opts: CompactOptions): Promise<number> {
  const g = src.geometry;
  const cs = g.clusterSize;
  const unit = g.extendedL2 ? g.subclusterSize : cs;
  const below = src.backing;
  const size = src.virtualSize;
  const chunk = Math.max(cs, Math.floor((opts.chunkSize ?? 4 << 20) / cs) * cs);
  const buf = Buffer.allocUnsafe(chunk);
  const belowBuf = below ? Buffer.allocUnsafe(chunk) : null;
  const blobs = await compressedBlobs(src);
  const progress = new ProgressReporter(ctx, size);
  progress.setPhase('compacting');
  let written = 0;
  /** What the backing chain shows at [off, off+n), zeros past its end (null without one). */
  const readBelow = async (off: number, n: number): Promise<Buffer | null> => {
    if (!below) return null;
    const b = belowBuf!.subarray(0, n);
    const inside = Math.max(0, Math.min(n, below.virtualSize - off));
    if (inside) await below.read(b.subarray(0, inside), off);
    b.fill(0, inside);
    return b;
  };
  for (let pos = 0; pos < size; pos += chunk) {
    throwIfCancelled(ctx);
    const len = Math.min(chunk, size - pos);
    for (const r of await src.runs(pos, len)) {
      switch (r.state) {
        case 'unallocated': break;
        case 'zero': {
          const data = buf.subarray(0, r.length).fill(0);
          written += await writeUnits(out, data, await readBelow(r.offset, r.length), r.offset, unit, cs, false);
          break;
        }
        case 'compressed': {
          const c = r.compressed!;
          if (r.offset !== c.clusterStart) throw new CorruptImageError(`compressed cluster at guest offset ${c.clusterStart} read in part`, src.filename);
          const b = await readBelow(r.offset, r.length);
          if (b) {
            const data = buf.subarray(0, r.length);
            await src.read(data, r.offset);
            if (data.equals(b)) break;
          }
          // Copied as stored: no recompression, and the same bytes a second time round.
          const end = blobs.get(c.hostOffset)!;
          const blob = Buffer.allocUnsafe(end - c.hostOffset);
          await src.file.read(blob, c.hostOffset);
          await out.writeCompressedCluster(blob, r.offset);
          written += blob.length;
          break;
        }
        case 'data': {
          const data = buf.subarray(0, r.length);
          await src.file.read(data, r.hostOffset!);
          written += await writeUnits(out, data, await readBelow(r.offset, r.length), r.offset, unit, cs, !!opts.compress);
          break;
        }
        default: { const never: never = r.state; throw new Error(String(never)); }
      }
    }
    progress.add(len);
  }
  await out.flush();
  progress.done();
  return written;
}

/**
 * Writes `data` (guest offset `off`) unit by unit: nothing where `out` reads the same without
 * it (zeros without a backing file; what `below` holds), a zero flag for zeros over a backing
 * file that holds something else, data elsewhere (-c: whole clusters compressed).
 */
async function writeUnits(out: Qcow2Writable, data: Buffer, below: Buffer | null, off: number, unit: number, cs: number, compress: boolean): Promise<number> {
  type Kind = 'skip' | 'zero' | 'data';
  const kindAt = (a: number, b: number): Kind => {
    const zero = isZero(data, a, b);
    if (below) return data.compare(below, a, b, a, b) === 0 ? 'skip' : zero ? 'zero' : 'data';
    return zero ? 'skip' : 'data';
  };
  let written = 0;
  for (let p = 0; p < data.length;) {
    const q0 = Math.min(data.length, (Math.floor((off + p) / unit) + 1) * unit - off);
    const kind = kindAt(p, q0);
    let q = q0;
    while (q < data.length) {
      const next = Math.min(data.length, q + unit);
      if (kindAt(q, next) !== kind) break;
      q = next;
    }
    if (kind === 'zero') {
      await out.writeZeroes(off + p, q - p);
    } else if (kind === 'data' && compress) {
      for (let c = p; c < q;) {
        const cEnd = Math.min(q, (Math.floor((off + c) / cs) + 1) * cs - off);
        const part = data.subarray(c, cEnd);
        const whole = (off + c) % cs === 0 && (cEnd - c === cs || off + cEnd === out.virtualSize);
        const packed = whole ? await compressClusterAsync(out.compressionType, part.length === cs ? part : Buffer.concat([part, Buffer.alloc(cs - part.length)])) : null;
        if (packed) { await out.writeCompressedCluster(packed, off + c); written += packed.length; } else { await out.write(part, off + c); written += part.length; }
        c = cEnd;
      }
    } else if (kind === 'data') {
      await out.write(data.subarray(p, q), off + p);
      written += q - p;
    }
    p = q;
  }
  return written;
}

/** The copy must read exactly as the original, wherever either of them allocates something. */
async function verify(ctx: JobContext, a: Qcow2Image, b: Qcow2Image, path: string): Promise<void> {
  if (a.virtualSize !== b.virtualSize || a.backingFile !== b.backingFile || a.backingFormat !== b.backingFormat) {
    throw new CorruptImageError('the compacted copy does not match the original (size or backing file); the image is unchanged', path);
  }
  const size = a.virtualSize;
  const chunk = 4 << 20;
  const ba = Buffer.allocUnsafe(chunk);
  const bb = Buffer.allocUnsafe(chunk);
  const progress = new ProgressReporter(ctx, size);
  progress.setPhase('verifying');
  const unallocated = async (img: Qcow2Image, off: number, len: number) => (await img.runs(off, len)).every((r) => r.state === 'unallocated');
  for (let pos = 0; pos < size; pos += chunk) {
    throwIfCancelled(ctx);
    const len = Math.min(chunk, size - pos);
    // Both unallocated: both read the same backing file there.
    if (!((await unallocated(a, pos, len)) && (await unallocated(b, pos, len)))) {
      const x = ba.subarray(0, len);
      const y = bb.subarray(0, len);
      await Promise.all([a.read(x, pos), b.read(y, pos)]);
      if (!x.equals(y)) {
        let i = 0;
        while (x[i] === y[i]) i++;
        throw new CorruptImageError(`the compacted copy differs from the original at offset ${pos + i}; the image is unchanged`, path);
      }
    }
    progress.add(len);
  }
}

/** Mode, owner and extended attributes of the original onto the copy (open as `fd`). */
async function keepMetadata(path: string, fd: number, st: { mode: number; uid: number; gid: number }): Promise<void> {
  const cur = await fstatP(fd);
  if (cur.uid !== st.uid || cur.gid !== st.gid) await fchownP(fd, st.uid, st.gid);
  await fchmodP(fd, st.mode & 0o7777);
  const n = native();
  if (!n?.listXattrs || !n.getXattr || !n.setXattr) return;
  const from = await NodeFile.open(path);
  try {
    for (const name of n.listXattrs(from.fd)) {
      let value: Buffer;
      try { value = n.getXattr(from.fd, name); } catch { continue; } // gone meanwhile
      try {
        n.setXattr(fd, name, value);
      } catch (err) {
        // Attributes of other namespaces may be reserved to root or to the kernel (security.*);
        // the user's own must come along.
        if (name.startsWith('user.')) throw new StrataError('io', `cannot keep extended attribute ${name}: ${(err as Error).message}`, path);
      }
    }
  } finally {
    await from.close();
  }
  await fsyncP(fd);
}

function syncDir(dir: string): void {
  try {
    const fd = openSync(dir, 'r');
    try { fsyncSync(fd); } finally { closeSync(fd); }
  } catch { /* some file systems cannot sync a folder; the rename is done either way */ }
}

/** raw: punches out every 4 KiB block that reads as zero; returns the bytes punched. */
async function punchZeros(ctx: JobContext, path: string): Promise<number> {
  const n = native();
  if (!n) throw new UsageError(`${path}: compacting a raw image punches holes, which needs the native addon`);
  const img = await openImageFile(path, { format: 'raw', writable: true });
  try {
    const size = img.virtualSize;
    const block = 4096;
    const chunk = 4 << 20;
    const buf = Buffer.allocUnsafe(chunk);
    const progress = new ProgressReporter(ctx, size);
    progress.setPhase('punching zeros');
    let punched = 0;
    for (let pos = 0; pos < size;) {
      throwIfCancelled(ctx);
      const st = await img.blockStatus(pos, Math.min(chunk, size - pos));
      if (st.data) {
        const data = buf.subarray(0, st.length);
        await img.read(data, pos);
        for (let p = 0; p < st.length;) {
          const a = Math.ceil((pos + p) / block) * block - pos;
          let q = a;
          while (q + block <= st.length && isZero(data.subarray(q, q + block))) q += block;
          if (q > a) { n.punchHole((img.file as NodeFile).fd, pos + a, q - a); punched += q - a; p = q; } else p = Math.max(a, p) + block;
        }
      }
      progress.add(st.length);
      pos += st.length;
    }
    await img.file.flush();
    progress.done();
    return punched;
  } finally {
    await img.close();
  }
}

