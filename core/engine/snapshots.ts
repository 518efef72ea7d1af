// Internal snapshots: create laid out as QEMU lays it out, through two header switches
// (snapshot-create.ts); delete in one metadata switch (metadata-switch.ts); apply (goto) in
// QEMU's order, each step durable before the next. A crash at any point leaves at worst leaked
// clusters, and COPIED flags that agree with the refcounts.
import * as C from '../format/constants';
import { NotFoundError, UnsupportedFeatureError, UsageError, printable } from '../errors';
import { decodeL1Entry, encodeL1Entry, decodeL2Entry, encodeL2Entry, decodeL2Bitmap, compressedRange, type L2Entry } from '../format/l2';
import { encodeSnapshotTable, type SnapshotEntry } from '../format/snapshot';
import type { Qcow2Writable } from './qcow2-write';
import { MetadataSwitch, type SwitchHeader } from './metadata-switch';
import { commitCreate, createGrowth, layOutCreate, leakL1Copy } from './snapshot-create';
import type { Qcow2Image } from './qcow2';
import type { Refcounts } from './refcounts';

function refRange(e: L2Entry, cs: number): { offset: number; length: number } | null {
  switch (e.kind) {
    case 'normal': return { offset: e.hostOffset, length: cs };
    case 'zero': return e.hostOffset ? { offset: e.hostOffset, length: cs } : null;
    case 'compressed': {
      const r = compressedRange(e.hostOffset, e.sectors);
      const start = r.start - (r.start % C.COMPRESSED_SECTOR_SIZE);
      return { offset: start, length: r.end - start };
    }
    case 'unallocated': return null;
    default: { const never: never = e; return never; }
  }
}

/**
 * QEMU's qcow2_update_snapshot_refcount, in memory: adds `addend` to every cluster reachable
 * from `l1` (L2 tables and data). With `flags`, the COPIED flags of every table it walks (the
 * L2 entries, and `l1`'s own entries) are then brought in line with the new refcounts; for
 * the active L1, its changed entries are marked dirty. Returns whether `l1` changed. Call
 * under the image's metadata mutex; what it changes is written by the next flush (refcounts
 * first). Not for tables being freed: nothing may be written to them. Clusters a drop leaves
 * unused are punched out of the file (QEMU's pass-discard-snapshot, on by default): only drop
 * references nothing on disk still makes (an L1 already replaced there).
 */
async function updateSnapshotRefcount(img: Qcow2Writable, l1: Buffer, addend: number, flags: boolean): Promise<boolean> {
  const g = img.geometry;
  const cs = g.clusterSize;
  const rc = img.refcounts;
  const active = l1 === img.l1;
  let l1Changed = false;
  for (let i = 0; i < l1.length / 8; i++) {
    const { l2Offset } = decodeL1Entry(l1, i);
    if (!l2Offset) continue;
    const table = await img.l2Table(l2Offset);
    let changed = false;
    for (let j = 0; j < g.l2Entries; j++) {
      const e = decodeL2Entry(table, j, g);
      const r = refRange(e, cs);
      if (!r) continue;
      if (addend < 0) await img.releaseRef({ offset: r.offset, length: r.length, punch: true });
      else if (addend) await rc.change(r.offset, r.length, addend);
      if (flags && (e.kind === 'normal' || e.kind === 'zero')) {
        const copied = (await rc.get(r.offset / cs)) === 1;
        if (copied !== e.copied) {
          encodeL2Entry(table, j, { ...e, copied }, g, g.extendedL2 ? decodeL2Bitmap(table, j) : undefined);
          changed = true;
        }
      }
    }
    if (addend < 0) await img.releaseRef({ offset: l2Offset, length: cs, punch: true });
    else if (addend) await rc.change(l2Offset, cs, addend);
    if (changed) img.l2Cache.markDirty(l2Offset, table);
    if (flags) {
      const copied = (await rc.get(l2Offset / cs)) === 1;
      if (decodeL1Entry(l1, i).copied !== copied) {
        encodeL1Entry(l1, i, l2Offset, copied);
        l1Changed = true;
        if (active) img.l1Dirty.add(i);
      }
    }
  }
  await img.punchFreed();
  return l1Changed;
}

/** The header fields a snapshot table takes, for a metadata switch. */
function snapshotTableFor(img: Qcow2Image, sw: MetadataSwitch, entries: SnapshotEntry[]): { offset: number; size: number } {
  const cs = img.geometry.clusterSize;
  const table = encodeSnapshotTable(entries);
  if (table.length > C.MAX_SNAPSHOTS_SIZE) throw new UsageError(`${img.filename}: snapshot table would be too large`);
  if (img.snapshotTableSize > 0) sw.ref(img.header.snapshotsOffset, Math.ceil(img.snapshotTableSize / cs) * cs, -1);
  return { offset: table.length ? sw.alloc(table) : 0, size: table.length };
}

/** An L2 table with the COPIED flag of each allocated data entry set as `copied` says. */
function withFlags(img: Qcow2Image, table: Buffer, copied: (host: number) => boolean): Buffer | null {
  const g = img.geometry;
  let out: Buffer | null = null;
  for (let j = 0; j < g.l2Entries; j++) {
    const e = decodeL2Entry(out ?? table, j, g);
    if (!((e.kind === 'normal' || e.kind === 'zero') && e.hostOffset)) continue;
    const want = copied(e.hostOffset);
    if (want === e.copied) continue;
    out ??= Buffer.from(table);
    encodeL2Entry(out, j, { ...e, copied: want }, g, g.extendedL2 ? decodeL2Bitmap(out, j) : undefined);
  }
  return out;
}

export function findSnapshot(img: Qcow2Image, idOrName: string): SnapshotEntry {
  const s = img.snapshots.find((x) => x.id === idOrName) ?? img.snapshots.find((x) => x.name === idOrName);
  if (!s) throw new NotFoundError(`no snapshot with ID or name '${idOrName}'`, img.filename);
  return s;
}

/** A snapshot create or delete, laid out in a metadata switch and not yet written. */
interface Prepared {
  sw: MetadataSwitch;
  header: SwitchHeader;
  l1: Buffer;
  entries: SnapshotEntry[];
  tableSize: number;
  /** New L2 tables by offset (for the cache). */
  copies: Map<number, Buffer>;
}

/** How a create fails: as Strata (refused before anything is written) or as qemu-img. */
export interface CreateOptions {
  /**
   * Fail as qemu-img does when a refcount would overflow or an L2 entry points where the
   * refcounts do not reach: it has then allocated and written the snapshot's L1 copy, which
   * stays behind as a leaked cluster (check reports it); reserved bits in L2 entries are
   * passed over as qemu-img passes over them. Images with 1-bit refcounts are not refused up
   * front (qemu-img snapshots one with no data).
   */
  qemu?: boolean;
}

function checkCreate(img: Qcow2Image, name: string, opts: CreateOptions = {}): void {
  if (!name) throw new UsageError('a snapshot needs a name');
  if (img.snapshots.some((s) => s.name === name)) throw new UsageError(`${img.filename}: a snapshot named '${name}' already exists`);
  if (img.snapshots.length >= C.MAX_SNAPSHOTS) throw new UsageError(`${img.filename}: too many snapshots`).asQemu(`Could not create snapshot '${printable(name)}': -27 (File too large)`);
  if (img.header.refcountOrder === 0 && !opts.qemu) {
    throw new UsageError(`${img.filename}: snapshots need refcounts wider than 1 bit (amend -o refcount_bits=16 first)`).asQemu(snapshotOverflowText(name));
  }
  // QEMU: -ENOTSUP (a snapshot cannot share the clusters of an external data file).
  if (img.geometry.externalData) throw new UnsupportedFeatureError('internal snapshots are not supported with an external data file', img.filename).asQemu(`Could not create snapshot '${name}': -95 (Operation not supported)`);
}

/**
 * qemu-img's words when a snapshot's new references do not fit the refcount width (it fails
 * with EINVAL from qcow2_update_snapshot_refcount, after allocating the L1 copy; Strata's own
 * create refuses before writing).
 */
export function snapshotOverflowText(name: string): string {
  return `Could not create snapshot '${name}': -22 (Invalid argument)`;
}

/**
 * A snapshot delete, as one metadata switch: everything its L1 reaches counts one less, and
 * the active tables whose COPIED flags that changes are replaced by copies with the flags
 * right (a new active L1 when any of its own flags or pointers change).
 */
async function prepareDelete(img: Qcow2Image, refcounts: Refcounts, sn: SnapshotEntry): Promise<Prepared> {
  const g = img.geometry;
  const cs = g.clusterSize;
  const sw = await MetadataSwitch.begin(img, refcounts);
  const snL1 = Buffer.alloc(sn.l1Size * 8);
  if (snL1.length) await img.file.read(snL1, sn.l1TableOffset);
  for (let i = 0; i < sn.l1Size; i++) {
    const { l2Offset } = decodeL1Entry(snL1, i);
    if (!l2Offset) continue;
    const table = await img.l2Table(l2Offset);
    for (let j = 0; j < g.l2Entries; j++) {
      const r = refRange(decodeL2Entry(table, j, g), cs);
      if (r) sw.ref(r.offset, r.length, -1);
    }
    sw.ref(l2Offset, cs, -1);
  }
  if (snL1.length) sw.ref(sn.l1TableOffset, Math.ceil(snL1.length / cs) * cs, -1);
  const l1 = img.l1;
  const newL1 = Buffer.from(l1);
  let l1Changed = false;
  const copies = new Map<number, Buffer>();
  for (let i = 0; i < l1.length / 8; i++) {
    const e = decodeL1Entry(l1, i);
    if (!e.l2Offset) continue;
    const table = await img.l2Table(e.l2Offset);
    let at = e.l2Offset;
    const fixed = withFlags(img, table, (host) => sw.get(host / cs) === 1);
    if (fixed) {
      // The active L1 lets go of the table for its copy; the data keeps its count.
      at = sw.alloc(fixed);
      copies.set(at, fixed);
      sw.ref(e.l2Offset, cs, -1);
    }
    const copied = sw.get(at / cs) === 1;
    if (at !== e.l2Offset || copied !== e.copied) {
      encodeL1Entry(newL1, i, at, copied);
      l1Changed = true;
    }
  }
  let l1Offset = img.header.l1TableOffset;
  if (l1Changed) {
    l1Offset = sw.alloc(newL1);
    sw.ref(img.header.l1TableOffset, Math.ceil(l1.length / cs) * cs, -1);
  }
  const entries = img.snapshots.filter((s) => s !== sn);
  const t = snapshotTableFor(img, sw, entries);
  return { sw, header: { l1Offset, l1Size: l1.length / 8, snapshotsOffset: t.offset, nbSnapshots: entries.length }, l1: newL1, entries, tableSize: t.size, copies };
}

/** Writes a prepared switch and adopts it. */
async function commitPrepared(img: Qcow2Writable, p: Prepared): Promise<void> {
  await p.sw.commit(img, p.header);
  // What only the old metadata used goes back to the file system, as QEMU discards it.
  if (img.file.discard) for (const [a, b] of p.sw.freedRanges()) await img.file.discard(a, b - a);
  img.l1 = p.l1;
  img.snapshots = p.entries;
  img.snapshotTableSize = p.tableSize;
  for (const [off, table] of p.copies) img.l2Cache.set(off, table);
}

function newEntry(img: Qcow2Image, name: string, now: number): SnapshotEntry {
  const maxId = img.snapshots.reduce((m, s) => Math.max(m, Number.parseInt(s.id, 10) || 0), 0);
  return {
    l1TableOffset: 0, l1Size: 0, id: String(maxId + 1), name,
    dateSec: Math.floor(now / 1000), dateNsec: (now % 1000) * 1_000_000,
    vmClockNsec: 0n, vmStateSize: 0, diskSize: img.virtualSize, icount: 0n, extraData: Buffer.alloc(0),
  };
}

/**
 * Creates a snapshot laid out as qemu-img lays it out, in crash-safe steps (see
 * snapshot-create.ts).
 */
export async function createSnapshot(img: Qcow2Writable, name: string, now = Date.now(), opts: CreateOptions = {}): Promise<SnapshotEntry> {
  checkCreate(img, name, opts);
  await img.flush();
  const entry = newEntry(img, name, now);
  await img.mutex.run(async () => {
    await img.beforeChange();
    // QEMU's result is computed from the refcounts on disk: nothing may wait in memory.
    if (img.refcounts.hasDirty) { await img.refcounts.writeBack(); await img.file.flush(); }
    const q = await layOutCreate(img, entry, opts);
    if ('failure' in q) {
      if (opts.qemu) await leakL1Copy(img);
      throw q.failure;
    }
    await commitCreate(img, q);
  });
  return entry;
}

export async function deleteSnapshot(img: Qcow2Writable, idOrName: string): Promise<void> {
  const sn = findSnapshot(img, idOrName);
  await img.flush();
  await img.mutex.run(async () => {
    await img.beforeChange();
    const p = await prepareDelete(img, img.refcounts, sn);
    // QEMU's BLKDBG_CLUSTER_FREE (blkdebug test driver): the switch frees the snapshot's clusters.
    img.file.debugEvent?.('cluster_free');
    await commitPrepared(img, p);
  });
}

/**
 * Bytes the file of `img` (opened only to read) grows by at most when the snapshot is created
 * or deleted: the switch laid out as the run will lay it out, and not written. For plans.
 * With `qemu`, a create that would overflow a refcount (and fail) grows it by its L1 copy.
 */
export async function snapshotGrowth(img: Qcow2Image, action: 'create' | 'delete', name: string, opts: CreateOptions = {}): Promise<number> {
  const refcounts = await MetadataSwitch.refcountsOf(img);
  if (action === 'create') {
    checkCreate(img, name, opts);
    const q = await layOutCreate(img, newEntry(img, name, Date.now()), opts);
    if ('failure' in q) {
      if (!opts.qemu) throw q.failure;
      return Math.ceil(img.l1.length / img.geometry.clusterSize) * img.geometry.clusterSize;
    }
    return createGrowth(img, refcounts, q);
  }
  const p = await prepareDelete(img, refcounts, findSnapshot(img, name));
  return Math.max(0, p.sw.end * img.geometry.clusterSize - (await img.file.size()));
}

/**
 * Reverts the active state to a snapshot, in QEMU's order: the snapshot's tables gain a
 * reference, with the COPIED flags of every table walked (and of the snapshot's L1) fixed on
 * the way and written; only then is the snapshot's L1, as fixed, written over the active one;
 * then the old active tables lose their reference. A crash at any step leaves at worst leaks:
 * the active L1 never carries a COPIED flag over a table that another L1 shares.
 */
/** As qemu-img: a bitmap cannot follow the disk back to a snapshot, so none may be there. */
export function checkSnapshotApplicable(img: Qcow2Image, idOrName: string): void {
  if (img.bitmaps?.length) throw new UnsupportedFeatureError(`Could not apply snapshot '${printable(idOrName)}': Device has active dirty bitmaps (remove them with \`qemu-img bitmap --remove\` first)`, img.filename);
}

export async function applySnapshot(img: Qcow2Writable, idOrName: string): Promise<void> {
  const sn = findSnapshot(img, idOrName);
  checkSnapshotApplicable(img, idOrName);
  const g = img.geometry;
  await img.flush();
  const size = sn.diskSize ?? img.virtualSize;
  if (sn.l1Size > img.l1.length / 8) await img.grow(Math.max(img.virtualSize, sn.l1Size * g.l2Entries * g.clusterSize));
  const snL1 = Buffer.alloc(sn.l1Size * 8);
  await img.mutex.run(async () => {
    await img.beforeChange();
    if (snL1.length) await img.file.read(snL1, sn.l1TableOffset);
    if (await updateSnapshotRefcount(img, snL1, 1, true)) await img.file.write(snL1, sn.l1TableOffset);
  });
  // Refcounts first, then the tables whose flags changed (the snapshot's own).
  await img.flush();
  const old = Buffer.from(img.l1);
  const next = Buffer.alloc(img.l1.length);
  snL1.copy(next);
  await img.file.write(next, img.header.l1TableOffset);
  await img.file.flush();
  img.l1 = next;
  img.l1Dirty.clear();
  await img.mutex.run(async () => {
    await updateSnapshotRefcount(img, old, -1, false);
    await updateSnapshotRefcount(img, img.l1, 0, true);
  });
  await img.flush();
  if (size !== img.virtualSize) await img.setVirtualSize(size);
}
