// resize: grow or (with shrink allowed) shrink the virtual size, as qemu-img resize.
import { basename } from 'node:path';
import { UnsupportedFeatureError, UsageError } from '../errors';
import { openImageFile, openImage, closeChain } from '../chain/open';
import { Qcow2Writable } from '../engine/qcow2-write';
import { Qcow2Image } from '../engine/qcow2';
import { inconsistentBitmap } from '../engine/bitmaps';
import { BME_FLAG_IN_USE } from '../format/bitmaps';
import { RawImage } from '../engine/raw';
import type { DiskImage, ImageFormat } from '../engine/image';
import { findOverlays } from './overlays';
import { preallocateGrow } from '../engine/preallocate';
import { allocateHoles } from './create';
import {
  abs, addAffected, addSpace, bitmapWarning, chainLinks, checkSpace, enforcePlan, newPlan, permissionProblems, probeAll, type JobPlan,
} from './plan-kit';

export interface ResizeOptions {
  format?: ImageFormat;
  /** The new size, or a delta when `relative` is set (may be negative). */
  size: number;
  relative?: boolean;
  shrink?: boolean;
  /** Shrink an image other images depend on (they then read zeros past the new end). */
  force?: boolean;
  /** --preallocation (growing only): as qemu-img resize. */
  preallocation?: 'off' | 'metadata' | 'falloc' | 'full';
}

/** The new size, checked as qemu-img checks it. */
function targetSize(img: DiskImage, path: string, opts: ResizeOptions): number {
  const from = img.virtualSize;
  const to = opts.relative ? from + opts.size : opts.size;
  if (to < 0) throw new UsageError(`${path}: new size would be negative`);
  if (to < from && !opts.shrink) {
    throw new UsageError(`${path}: shrinking from ${from} to ${to} bytes deletes everything past the new end; add --shrink if that is what you want`);
  }
  const pre = opts.preallocation ?? 'off';
  if (pre !== 'off' && to < from) throw new UsageError('Preallocation can only be used for growing images');
  if (pre === 'metadata' && img instanceof RawImage) throw new UnsupportedFeatureError('Unsupported preallocation mode: metadata', path);
  if (img instanceof Qcow2Image) {
    if (to % 512 !== 0) throw new UsageError(`${path}: qcow2 sizes must be a multiple of 512 bytes`);
    // QEMU's qcow2_co_truncate: v2 snapshots need not record their size, so none may change.
    if (to !== from && img.snapshots.length && img.header.version < 3) throw new UnsupportedFeatureError("Can't resize a v2 image which has snapshots (upgrade it with `amend -o compat=1.1` first)", path).asQemu("Can't resize a v2 image which has snapshots");
  }
  return to;
}

/** The resize's plan: the new size, the L1 table a qcow2 grow may need, overlays a shrink reaches. */
export async function planResize(path: string, opts: ResizeOptions): Promise<JobPlan> {
  const img = await openImageFile(path, { format: opts.format, lock: 'none' });
  let chain: DiskImage | null = null;
  try {
    const from = img.virtualSize;
    const to = targetSize(img, path, opts);
    // QEMU refuses to resize while a bitmap is left in use (inconsistent).
    const stale = img instanceof Qcow2Image ? img.bitmaps?.find((e) => e.flags & BME_FLAG_IN_USE) : undefined;
    if (stale) throw inconsistentBitmap(stale, path);
    const sizeArg = opts.relative ? `${opts.size < 0 ? '-' : '+'}${Math.abs(opts.size)}` : String(opts.size);
    const command = ['strata', 'resize'];
    if (opts.shrink) command.push('--shrink');
    if (opts.format) command.push('-f', opts.format);
    if (opts.preallocation && opts.preallocation !== 'off') command.push(`--preallocation=${opts.preallocation}`);
    command.push(abs(path), sizeArg);
    const plan = newPlan('resize', `Resize ${basename(path)} from ${from} to ${to} bytes`, command);
    plan.writes.push(abs(path));
    try { chain = await openImage(path, { format: opts.format, lock: 'none' }); } catch { /* the backing chain does not open: list the image alone */ }
    if (img instanceof Qcow2Image && to > from && img.header.version < 3 && chain?.backing && chain.backing.virtualSize > from) {
      throw new UnsupportedFeatureError('Failed to zero out new clusters: Operation not supported (a compat=0.10 image has no zero clusters to hide its longer backing file with; upgrade it to compat=1.1 first)', path);
    }
    const links = chainLinks(chain ?? img);
    links[0]!.virtualSize = to;
    plan.chainsAfter.push(links);
    let grows = 0;
    if (img instanceof Qcow2Image && to > from) {
      const g = img.geometry;
      const need = Math.ceil(to / (g.l2Entries * g.clusterSize));
      if (need > img.l1.length / 8) grows = Math.ceil((need * 8) / g.clusterSize) * g.clusterSize;
    }
    addSpace(plan, path, grows, `resizing ${abs(path)}`);
    checkSpace(plan);
    if (to < from) {
      plan.warnings.push(`shrinking deletes everything ${abs(path)} holds past ${to} bytes`);
      addAffected(plan, path, (await findOverlays(path)).map((o) => o.path), 'would read zeros past the new end');
    }
    const w = bitmapWarning(img, 'resizing');
    if (w) plan.warnings.push(w);
    await probeAll(plan, [[path, 'write']]);
    await permissionProblems(plan, [path]);
    return plan;
  } finally {
    await closeChain(chain);
    await closeChain(img);
  }
}

export async function resize(path: string, opts: ResizeOptions, planned?: JobPlan): Promise<{ from: number; to: number }> {
  const plan = planned ?? await planResize(path, opts);
  enforcePlan(plan, opts.force);
  // With its backing chain: whether a longer backing file would show through the grown area
  // decides how it is zeroed (as qemu-img, which opens the chain too).
  const img = await openImage(path, { format: opts.format, writable: true });
  try {
    const from = img.virtualSize;
    const to = targetSize(img, path, opts);
    if (img instanceof Qcow2Writable) {
      const pre = opts.preallocation ?? 'off';
      // falloc, full: the new clusters are data clusters over a zeroed file area, so nothing
      // needs zero flags first (QEMU's truncate lets the file driver zero the new area);
      // bitmaps need growZeroed's handling.
      // metadata with extended L2 over a longer backing file: preallocated first, zeroed after.
      const zeroAfter = pre === 'metadata' && img.geometry.extendedL2 && img.backing !== null && img.backing.virtualSize > from;
      if (to > from && (pre === 'falloc' || pre === 'full' || zeroAfter) && !img.bitmaps?.length) await img.grow(to);
      else if (to > from) await img.growZeroed(to);
      else if (to < from) await img.shrink(to);
      if (to > from && pre !== 'off') {
        await preallocateGrow(img, from, to, pre);
        // metadata over a longer backing file, extended L2: the preallocated subclusters get
        // their "all zeroes" bits (QEMU zeroizes after preallocating).
        if (zeroAfter) await img.writeZeroes(from, to - from);
      }
    } else if (img instanceof RawImage) {
      await img.file.truncate(to);
      const pre = opts.preallocation ?? 'off';
      if (to > from && (pre === 'falloc' || pre === 'full')) await allocateHoles(img.file, to, pre, from);
      await img.file.flush();
    }
    return { from, to };
  } finally {
    await closeChain(img);
  }
}
