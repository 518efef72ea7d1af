// merge ("delete this external snapshot"): remove a layer L from the middle or the top of a
// chain. L's data goes into its backing file B, every child of L (an overlay found in the
// scanned folders whose backing file is L) is pointed at B, and L is deleted.
//
// The order keeps every remaining image reading as before at every instant, a SIGKILL
// included, and makes a rerun finish the job:
//   1. commit L into B, keeping L (commit -d). B changes only where L allocates, and there L
//      hides B from L's children; B's other overlays would see it, hence --force for a shared B.
//      Afterwards B reads exactly as L over L's size.
//   2. write the journal `.L.strata-merge` beside L (written to a temporary name, synced,
//      renamed): B, L's identity (inode, size, mtime) and each child with the backing name it
//      gets. It says that step 1 is complete.
//   3. point each child at B with an unsafe rebase (one header write): it then reads B, which
//      holds what L showed it. Children already pointing at B (an earlier run) are skipped.
//   4. delete L, then the journal.
// A rerun finds the journal: the commit is done (unless L changed since, which is refused),
// it rebases the children still on L (those found now included) and deletes L and the
// journal. Killed before the journal is written, a rerun commits again (the same data again).
import { basename, dirname, isAbsolute, join, relative } from 'node:path';
import { closeSync, fsyncSync, openSync, readFileSync, renameSync, unlinkSync, writeFileSync } from 'node:fs';
import { NotFoundError, UsageError } from '../errors';
import type { DiskImage } from '../engine/image';
import { Qcow2Image } from '../engine/qcow2';
import { Qcow2Writable } from '../engine/qcow2-write';
import { openImage, openImageFile, closeChain, combineBackingPath, chainOf } from '../chain/open';
import { stat, unlink } from '../io/fs-async';
import { throwIfCancelled, type JobContext } from './job';
import { commit, planCommit } from './commit';
import { writeBackingName } from './rebase';
import { findOverlays, realOrSelf } from './overlays';
import {
  abs, addAffected, bitmapWarning, chainLinks, enforcePlan, newPlan, permissionProblems, probeAll, type JobPlan,
} from './plan-kit';

export interface MergeOptions {
  /** Folders scanned for L's children besides its own. */
  folders?: string[];
  /** Merge although B has other overlays (they read L's data afterwards) or L has internal snapshots. */
  force?: boolean;
}

export interface MergeResult {
  backing: string;
  children: string[];
  /** Bytes of L written into B as data (0 when an earlier run had done it). */
  bytesWritten: number;
  plan: JobPlan;
}

interface Journal {
  version: 1;
  layer: string;
  backing: string;
  backingFormat: string;
  /** L's identity when the commit finished: a rerun must not trust a commit of a layer that changed since. */
  layerIno: number;
  layerSize: number;
  layerMtimeMs: number;
  children: { path: string; backingName: string }[];
}

export function mergeJournalPath(layer: string): string {
  return join(dirname(abs(layer)), `.${basename(layer)}.strata-merge`);
}

function readJournal(layer: string): Journal | null {
  let text: string;
  try { text = readFileSync(mergeJournalPath(layer), 'utf8'); } catch { return null; }
  try {
    const j = JSON.parse(text) as Journal;
    if (j.version === 1 && typeof j.backing === 'string' && Array.isArray(j.children)) return j;
  } catch { /* written through a temporary name and a rename: never half there */ }
  throw new UsageError(`${mergeJournalPath(layer)}: not a merge journal Strata can read; remove it if no merge of ${layer} is under way`);
}

function syncDir(dir: string): void {
  try {
    const fd = openSync(dir, 'r');
    try { fsyncSync(fd); } finally { closeSync(fd); }
  } catch { /* a folder that cannot be synced: the rename is made either way */ }
}

function writeJournal(layer: string, j: Journal): void {
  const path = mergeJournalPath(layer);
  const tmp = `${path}.tmp`;
  writeFileSync(tmp, JSON.stringify(j, null, 2) + '\n');
  const fd = openSync(tmp, 'r');
  try { fsyncSync(fd); } finally { closeSync(fd); }
  renameSync(tmp, path);
  syncDir(dirname(path));
}

/** The backing name a child of L records for B: L's own name for B where it resolves the same. */
function nameForChild(child: string, layer: string, layerRecorded: string, backingAbs: string): string {
  if (isAbsolute(layerRecorded) || dirname(abs(child)) === dirname(abs(layer))) return layerRecorded;
  return relative(dirname(abs(child)), backingAbs);
}

function mergeCommand(layer: string, opts: MergeOptions): string[] {
  const cmd = ['strata', 'merge'];
  for (const f of opts.folders ?? []) cmd.push('--folder', abs(f));
  cmd.push(abs(layer));
  return cmd;
}

async function exists(p: string): Promise<boolean> {
  try { await stat(p); return true; } catch { return false; }
}

/** Where a child's recorded backing name leads (resolved), or null when it has none. */
async function backingOf(child: string): Promise<string | null> {
  const img = await openImageFile(child, { lock: 'none' }).catch(() => null);
  if (!img) return null;
  try {
    return img.backingFile ? await realOrSelf(combineBackingPath(child, img.backingFile)) : null;
  } finally {
    await img.close();
  }
}

interface Layout {
  layer: Qcow2Image;
  backing: DiskImage;
  backingFormat: string;
  children: { path: string; backingName: string; onLayer: boolean }[];
  journal: Journal | null;
  committed: boolean;
}

/** Opens L (without locks) and works out B, the children and what an earlier run did. */
async function layout(path: string, opts: MergeOptions, top: DiskImage): Promise<Layout> {
  if (!(top instanceof Qcow2Image) || !top.backingFile || !top.backing) throw new UsageError(`${path}: has no backing file: there is nothing to merge it into`);
  const b = top.backing;
  const backingAbs = await realOrSelf(b.filename);
  const journal = readJournal(path);
  if (journal && (await realOrSelf(journal.backing)) !== backingAbs) {
    throw new UsageError(`${path}: an interrupted merge into ${journal.backing} is recorded in ${mergeJournalPath(path)}, but its backing file is now ${b.filename}; remove the journal if that merge is abandoned`);
  }
  let committed = false;
  if (journal) {
    const st = await stat(path);
    if (st.ino !== journal.layerIno || st.size !== journal.layerSize || st.mtimeMs !== journal.layerMtimeMs) {
      throw new UsageError(`${path} changed after an interrupted merge committed it into ${b.filename} (${mergeJournalPath(path)}): some of its children may already read ${basename(b.filename)}; finish by hand (strata commit -d, then strata rebase -u) or remove the journal`);
    }
    committed = true;
  }
  const folders = [dirname(abs(path)), ...(opts.folders ?? [])];
  const found = await findOverlays(path, { folders });
  const children = new Map<string, { path: string; backingName: string; onLayer: boolean }>();
  for (const o of found) children.set(await realOrSelf(o.path), { path: abs(o.path), backingName: nameForChild(o.path, path, top.backingFile, backingAbs), onLayer: true });
  for (const c of journal?.children ?? []) {
    const key = await realOrSelf(c.path);
    if (children.has(key) || !(await exists(c.path))) continue;
    // Rebased by the earlier run (or pointed elsewhere since: then it is not ours to touch).
    if ((await backingOf(c.path)) === backingAbs) children.set(key, { ...c, onLayer: false });
  }
  return {
    layer: top, backing: b, backingFormat: top.backingFormat ?? b.format, journal, committed,
    children: [...children.values()].sort((x, y) => (x.path < y.path ? -1 : 1)),
  };
}

/** The merge's plan: the commit into B, the children rebased, L deleted; B's other overlays, the locks. */
export async function planMerge(ctx: JobContext, path: string, opts: MergeOptions = {}): Promise<JobPlan> {
  if (!(await exists(path))) {
    const j = readJournal(path);
    if (!j) throw new NotFoundError(`${path}: no such file`);
    // Killed after L was deleted: only the journal is left to remove.
    const plan = newPlan('merge', `Finish merging ${basename(path)} into ${basename(j.backing)}`, mergeCommand(path, opts));
    plan.removes.push(mergeJournalPath(path));
    await permissionProblems(plan, [], [dirname(abs(path))]);
    return plan;
  }
  const top = await openImage(path, { lock: 'none' });
  try {
    const l = await layout(path, opts, top);
    const b = l.backing;
    const plan = newPlan('merge', `Merge ${basename(path)} into ${basename(b.filename)}`, mergeCommand(path, opts));
    if (l.committed) plan.title += ' (finishing an interrupted merge)';
    // Past L's end its children read zeros; B must not show them data there.
    if (b.virtualSize > top.virtualSize) {
      for (const c of l.children.filter((x) => x.onLayer)) {
        const img = await openImageFile(c.path, { lock: 'none' });
        const big = img.virtualSize > top.virtualSize;
        await img.close();
        if (big) throw new UsageError(`${c.path} is larger than ${path}, and ${b.filename} larger still: past ${top.virtualSize} bytes it would read ${basename(b.filename)} instead of zeros; resize ${path} first`);
      }
    }
    if (!l.committed) {
      // The commit's own plan (commit -d): its bytes, its space, B's other overlays.
      const cp = await planCommit(ctx, path, { keep: true });
      plan.bytesToRead = cp.bytesToRead;
      plan.bytesToCopy = cp.bytesToCopy;
      plan.space = cp.space;
      plan.spaceNeeded = cp.spaceNeeded;
      plan.spaceAvailable = cp.spaceAvailable;
      plan.problems.push(...cp.problems);
      plan.writes.push(abs(b.filename));
      plan.warnings.push(`${basename(b.filename)} takes ${basename(path)}'s data: it reads as ${basename(path)} did afterwards`);
    }
    const others = (await findOverlays(b.filename, { folders: [dirname(abs(b.filename)), ...(opts.folders ?? [])], except: [path, ...l.children.map((c) => c.path)] })).map((o) => o.path);
    addAffected(plan, b.filename, others, `would read ${basename(path)}'s data`);
    if (l.layer.snapshots.length) {
      const why = `${abs(path)} has ${l.layer.snapshots.length} internal snapshot(s), which are deleted with it`;
      plan.warnings.push(why);
      plan.needsForce = plan.needsForce ? `${plan.needsForce}; ${why}` : `${why} (use --force if that is intended)`;
    }
    const w = bitmapWarning(l.layer, 'merging');
    if (w) plan.warnings.push(`${abs(path)}'s persistent bitmaps are deleted with it`);
    for (const c of l.children) if (c.onLayer) plan.writes.push(c.path);
    plan.removes.push(abs(path));
    const newSize = Math.max(b.virtualSize, top.virtualSize);
    const below = chainLinks(b);
    below[0]!.virtualSize = newSize;
    for (const c of l.children) {
      const img = await openImageFile(c.path, { lock: 'none' }).catch(() => null);
      if (!img) continue;
      plan.chainsAfter.push([{ filename: c.path, format: img.format, virtualSize: img.virtualSize }, ...below]);
      await img.close();
    }
    if (!l.children.length) plan.chainsAfter.push(below);
    await probeAll(plan, [
      [path, 'write'], [b.filename, 'write'], ...l.children.filter((c) => c.onLayer).map((c): [string, 'write'] => [c.path, 'write']),
      ...chainOf(b).slice(1).map((x): [string, 'read'] => [x.filename, 'read']),
    ]);
    await permissionProblems(plan, [...(l.committed ? [] : [b.filename]), ...l.children.filter((c) => c.onLayer).map((c) => c.path)], [dirname(abs(path))]);
    return plan;
  } finally {
    await closeChain(top);
  }
}

export async function merge(ctx: JobContext, path: string, opts: MergeOptions = {}, planned?: JobPlan): Promise<MergeResult> {
  const plan = planned ?? await planMerge(ctx, path, opts);
  enforcePlan(plan, opts.force);
  if (!(await exists(path))) {
    const j = readJournal(path)!;
    await unlink(mergeJournalPath(path));
    syncDir(dirname(abs(path)));
    return { backing: j.backing, children: j.children.map((c) => c.path), bytesWritten: 0, plan };
  }
  const top = await openImage(path, { lock: 'none' });
  let l: Layout;
  try {
    l = await layout(path, opts, top);
  } finally {
    await closeChain(top);
  }
  const backing = abs(l.backing.filename);
  let bytesWritten = 0;
  // 1. The commit (skipped when the journal says an earlier run completed it).
  if (!l.committed) {
    const r = await commit(ctx, path, { keep: true, force: opts.force });
    bytesWritten = r.dataBytesWritten;
    throwIfCancelled(ctx);
    const st = await stat(path);
    // 2. The journal: from here on, B holds what L shows.
    writeJournal(path, {
      version: 1, layer: abs(path), backing, backingFormat: l.backingFormat,
      layerIno: st.ino, layerSize: st.size, layerMtimeMs: st.mtimeMs,
      children: l.children.map((c) => ({ path: c.path, backingName: c.backingName })),
    });
  } else {
    const j = l.journal!;
    // Children found now that the earlier run did not know of are recorded before they change.
    const known = new Set(j.children.map((c) => c.path));
    if (l.children.some((c) => !known.has(c.path))) {
      writeJournal(path, { ...j, children: l.children.map((c) => ({ path: c.path, backingName: c.backingName })) });
    }
  }
  // 3. Each child onto B: one header write each, after which it reads B (= what L showed).
  for (const c of l.children) {
    if (!c.onLayer) continue;
    throwIfCancelled(ctx);
    const img = await openImageFile(c.path, { writable: true });
    try {
      if (!(img instanceof Qcow2Writable)) throw new UsageError(`${c.path}: cannot be written`);
      await writeBackingName(img, c.backingName, l.backingFormat);
    } finally {
      await img.close();
    }
  }
  throwIfCancelled(ctx);
  // 4. L, then the journal (a rerun that finds only the journal just removes it).
  unlinkSync(path);
  syncDir(dirname(abs(path)));
  unlinkSync(mergeJournalPath(path));
  syncDir(dirname(abs(path)));
  return { backing, children: l.children.map((c) => c.path), bytesWritten, plan };
}
