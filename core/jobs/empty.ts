// empty: drop everything an overlay holds when its backing file already holds the same (after
// `commit -d`, or a copy made by other means). Every range the overlay allocates is first read
// through the overlay and through its backing chain and compared; only when all of it is the
// same is the overlay emptied, in one metadata-sized step (core/engine/make-empty.ts). The
// overlay is write-locked and its backing chain read-locked from the comparison to the end,
// so nothing can change in between. Its content is the same before and after.
import { basename } from 'node:path';
import { UsageError } from '../errors';
import type { DiskImage } from '../engine/image';
import { Qcow2Image } from '../engine/qcow2';
import { Qcow2Writable } from '../engine/qcow2-write';
import { makeEmpty, fastEmptyObstacle, type EmptyMethod } from '../engine/make-empty';
import { openImage, closeChain, chainOf } from '../chain/open';
import { explainNoSpace } from '../io/space';
import { ProgressReporter, throwIfCancelled, type JobContext } from './job';
import {
  abs, addSpace, bitmapWarning, chainLinks, checkSpace, enforcePlan, newPlan, permissionProblems, probeAll, type JobPlan,
} from './plan-kit';

export interface EmptyResult {
  method: EmptyMethod;
  /** Bytes of the overlay compared with its backing chain. */
  bytesCompared: number;
  plan: JobPlan;
}

function needsBacking(img: DiskImage, path: string): Qcow2Image {
  if (!(img instanceof Qcow2Image)) throw new UsageError(`${path}: only qcow2 overlays can be emptied`);
  if (!img.backingFile) throw new UsageError(`${path}: has no backing file: emptying it would lose its data`);
  return img;
}

/** Bytes the overlay allocates (data, zeros, compressed): what is compared. */
async function allocatedBytes(ctx: JobContext, img: Qcow2Image): Promise<number> {
  let n = 0;
  for (let pos = 0; pos < img.virtualSize;) {
    throwIfCancelled(ctx);
    const runs = await img.runs(pos, Math.min(img.virtualSize - pos, 1 << 30));
    for (const r of runs) if (r.state !== 'unallocated') n += r.length;
    pos = runs.length ? runs[runs.length - 1]!.offset + runs[runs.length - 1]!.length : img.virtualSize;
  }
  return n;
}

/** The plan: nothing is copied; what the overlay allocates is read twice (it and its backing chain). */
export async function planEmpty(ctx: JobContext, path: string): Promise<JobPlan> {
  const top = await openImage(path, { lock: 'none' });
  try {
    const q = needsBacking(top, path);
    const below = top.backing!;
    const plan = newPlan('empty', `Empty ${basename(path)} (its data must already be in ${basename(below.filename)})`, ['strata', 'empty', abs(path)]);
    plan.writes.push(abs(path));
    plan.chainsAfter.push(chainLinks(top));
    plan.bytesToRead = 2 * (await allocatedBytes(ctx, q));
    const cs = q.geometry.clusterSize;
    addSpace(plan, path, fastEmptyObstacle(q as Qcow2Writable) ? 0 : (2 + Math.ceil(q.l1.length / cs)) * cs, `emptying ${abs(path)}`);
    checkSpace(plan);
    plan.warnings.push(`every range ${basename(path)} allocates is compared with ${basename(below.filename)} first; the run refuses at the first difference`);
    if (q.snapshots.length) plan.warnings.push(`${abs(path)} has internal snapshots: it is emptied cluster by cluster (they keep their data)`);
    const w = bitmapWarning(top, 'emptying');
    if (w) plan.warnings.push(w);
    await probeAll(plan, chainOf(top).map((l, i): [string, 'read' | 'write'] => [l.filename, i === 0 ? 'write' : 'read']));
    await permissionProblems(plan, [path]);
    return plan;
  } finally {
    await closeChain(top);
  }
}

export async function emptyOverlay(ctx: JobContext, path: string, planned?: JobPlan): Promise<EmptyResult> {
  const plan = planned ?? await planEmpty(ctx, path);
  enforcePlan(plan);
  const top = await openImage(path, { writable: true });
  try {
    const q = needsBacking(top, path);
    if (!(q instanceof Qcow2Writable)) throw new UsageError(`${path}: cannot be written`);
    const size = q.virtualSize;
    const progress = new ProgressReporter(ctx, size);
    progress.setPhase('comparing with the backing file');
    const compared = await firstDifference(ctx, q, progress, path);
    throwIfCancelled(ctx);
    progress.setPhase('emptying');
    let method: EmptyMethod;
    try { method = await makeEmpty(q); } catch (err) { throw explainNoSpace(err, path); }
    progress.done();
    return { method, bytesCompared: compared, plan };
  } finally {
    await closeChain(top);
  }
}

/** Compares every allocated range of `img` with its backing chain; throws at the first difference. */
async function firstDifference(ctx: JobContext, img: Qcow2Image, progress: ProgressReporter, path: string): Promise<number> {
  const chunk = 2 << 20;
  const a = Buffer.allocUnsafe(chunk);
  const b = Buffer.allocUnsafe(chunk);
  const below = img.backing!;
  let compared = 0;
  for (let pos = 0; pos < img.virtualSize; pos += chunk) {
    throwIfCancelled(ctx);
    const len = Math.min(chunk, img.virtualSize - pos);
    for (const r of await img.runs(pos, len)) {
      if (r.state === 'unallocated') continue;
      const x = a.subarray(0, r.length);
      const y = b.subarray(0, r.length);
      const inBacking = Math.max(0, Math.min(r.length, below.virtualSize - r.offset));
      await Promise.all([img.read(x, r.offset), inBacking ? below.read(y.subarray(0, inBacking), r.offset) : null]);
      y.fill(0, inBacking);
      compared += r.length;
      if (!x.equals(y)) {
        let i = 0;
        while (x[i] === y[i]) i++;
        throw new UsageError(`${path}: differs from its backing file ${below.filename} at offset ${r.offset + i}: not all of its data is there (commit it first: strata commit -d ${path})`);
      }
    }
    progress.add(len);
  }
  return compared;
}
