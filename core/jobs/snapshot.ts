// Internal snapshots as planned jobs: create, apply (goto) and delete, over the engine's
// crash-safe steps (core/engine/snapshots.ts). Applying one changes the image's content, so
// its overlays are affected and the run asks for force.
import { basename } from 'node:path';
import { close, open, read } from '../io/fs-async';
import { CorruptImageError, IoError, NotFoundError, UnsupportedFeatureError, UsageError, printable } from '../errors';
import { errorText } from '../io/blkdebug';
import { openImageFile, openImage, closeChain } from '../chain/open';
import type { DiskImage } from '../engine/image';
import { Qcow2Image } from '../engine/qcow2';
import { Qcow2Writable } from '../engine/qcow2-write';
import { applySnapshot, checkSnapshotApplicable, createSnapshot, deleteSnapshot, snapshotGrowth, snapshotOverflowText, type CreateOptions } from '../engine/snapshots';
import * as C from '../format/constants';
import { findOverlays } from './overlays';
import {
  abs, addAffected, addSpace, bitmapWarning, chainLinks, checkSpace, enforcePlan, newPlan, permissionProblems, probeAll, type JobPlan,
} from './plan-kit';

export type SnapshotAction = 'create' | 'apply' | 'delete';

const FLAG: Record<SnapshotAction, string> = { create: '-c', apply: '-a', delete: '-d' };

function findIn(img: Qcow2Image, idOrName: string) {
  const s = img.findSnapshot(idOrName);
  if (!s) throw new NotFoundError(`no snapshot with ID or name '${idOrName}'`, img.filename);
  return s;
}

/** qemu-img's words for a create with QCOW_MAX_SNAPSHOTS snapshots already (-EFBIG). */
function tooManyText(name: string): string {
  return `Could not create snapshot '${printable(name)}': -27 (File too large)`;
}

/** The snapshot count in a qcow2 header (null when the file is not a qcow2 image read here). */
async function headerSnapshotCount(path: string): Promise<number | null> {
  try {
    const fd = await open(path, 'r');
    try {
      const b = Buffer.alloc(72);
      const { bytesRead } = await read(fd, b, 0, 72, 0);
      return bytesRead === 72 && b.readUInt32BE(0) === C.QCOW_MAGIC ? b.readUInt32BE(60) : null;
    } finally {
      await close(fd);
    }
  } catch {
    return null;
  }
}

export async function planSnapshot(path: string, action: SnapshotAction, name: string, opts: CreateOptions = {}): Promise<JobPlan> {
  let img: DiskImage;
  try {
    img = await openImageFile(path, { lock: 'none' });
  } catch (err) {
    // qemu-img opens an image with as many snapshots as it allows whose table lies past the
    // end of the file (it reads zeros there), and then refuses to add one (iotest 080).
    if (opts.qemu && action === 'create' && err instanceof CorruptImageError && (await headerSnapshotCount(path)) === C.MAX_SNAPSHOTS) {
      throw err.asQemu(tooManyText(name));
    }
    throw err;
  }
  let chain: DiskImage | null = null;
  try {
    if (!(img instanceof Qcow2Image)) throw new UsageError(`${img.filename}: raw images have no internal snapshots`);
    const verb = { create: 'Create', apply: 'Apply', delete: 'Delete' }[action];
    const plan = newPlan('snapshot', `${verb} snapshot '${name}' ${action === 'create' ? 'of' : action === 'apply' ? 'to' : 'of'} ${basename(path)}`,
      ['strata', 'snapshot', FLAG[action], name, abs(path)]);
    plan.writes.push(abs(path));
    const cs = img.geometry.clusterSize;
    const clusters = (bytes: number) => Math.ceil(bytes / cs) * cs;
    let size = img.virtualSize;
    let space = 0;
    if (action === 'create') {
      if (!name) throw new UsageError('a snapshot needs a name');
      if (img.snapshots.some((s) => s.name === name)) throw new UsageError(`${img.filename}: a snapshot named '${name}' already exists`);
      if (img.snapshots.length >= C.MAX_SNAPSHOTS) throw new UsageError(`${img.filename}: too many snapshots`).asQemu(tooManyText(name));
      if (img.header.refcountOrder === 0 && !opts.qemu) throw new UsageError(`${img.filename}: snapshots need refcounts wider than 1 bit (amend -o refcount_bits=16 first)`).asQemu(snapshotOverflowText(name));
      // QEMU: -ENOTSUP (a snapshot cannot share the clusters of an external data file).
      if (img.geometry.externalData) throw new UnsupportedFeatureError('internal snapshots are not supported with an external data file', img.filename).asQemu(`Could not create snapshot '${name}': -95 (Operation not supported)`);
      // What the create writes where nothing lives (QEMU's snapshot L1 and table, and for a
      // while copies of the active tables and a refcount structure), laid out as the run will.
      space = await snapshotGrowth(img, 'create', name, opts);
    } else {
      const s = findIn(img, name);
      if (action === 'apply') checkSnapshotApplicable(img, name);
      if (action === 'delete') {
        space = await snapshotGrowth(img, 'delete', s.id);
      } else {
        size = s.diskSize ?? img.virtualSize;
        const g = img.geometry;
        if (s.l1Size > img.l1.length / 8) space = clusters(Math.max(img.virtualSize, s.l1Size * g.l2Entries * cs) / (g.l2Entries * cs) * 8);
        plan.warnings.push(`${abs(path)} is returned to snapshot '${s.name}': what it holds now and was not in a snapshot is lost`);
        addAffected(plan, path, (await findOverlays(path)).map((o) => o.path), 'would read the snapshot\'s content');
      }
    }
    try { chain = await openImage(path, { lock: 'none' }); } catch { /* list the image alone */ }
    const links = chainLinks(chain ?? img);
    links[0]!.virtualSize = size;
    plan.chainsAfter.push(links);
    addSpace(plan, path, space, `the snapshot metadata of ${abs(path)}`);
    checkSpace(plan);
    const w = bitmapWarning(img, `${action === 'create' ? 'creating' : action === 'apply' ? 'applying' : 'deleting'} a snapshot in`);
    if (w) plan.warnings.push(w);
    await probeAll(plan, [[path, 'write']]);
    await permissionProblems(plan, [path]);
    return plan;
  } finally {
    await closeChain(chain);
    await closeChain(img);
  }
}

export async function snapshotJob(path: string, action: SnapshotAction, name: string, opts: { force?: boolean } & CreateOptions = {}, planned?: JobPlan): Promise<JobPlan> {
  const plan = planned ?? await planSnapshot(path, action, name, opts);
  enforcePlan(plan, opts.force);
  const img = await openImageFile(path, { writable: true });
  try {
    if (!(img instanceof Qcow2Writable)) throw new UsageError(`${img.filename}: raw images have no internal snapshots`);
    if (action === 'create') await createSnapshot(img, name, Date.now(), { qemu: opts.qemu });
    else if (action === 'apply') await applySnapshot(img, name);
    else {
      try {
        await deleteSnapshot(img, name);
      } catch (err) {
        // Nothing changed (one metadata switch): qemu-img's words for a delete that failed
        // before the snapshot left the table.
        if (err instanceof IoError && err.qemu === undefined) err.asQemu(`Could not delete snapshot '${name}': Failed to remove snapshot from snapshot list: ${errorText(err)}`);
        throw err;
      }
    }
  } catch (err) {
    // The failure is the one to report: closing may fail the same way.
    await closeChain(img).catch(() => {});
    throw err;
  }
  await closeChain(img);
  return plan;
}
