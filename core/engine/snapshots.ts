// Internal snapshots: create, apply (goto) and delete, in QEMU's order, each step durable
// before the next so that a crash leaves at worst leaked clusters.
import * as C from '../format/constants';
import { NotFoundError, UnsupportedFeatureError, UsageError, printable } from '../errors';
import { decodeL1Entry, encodeL1Entry, decodeL2Entry, encodeL2Entry, decodeL2Bitmap, compressedRange, type L2Entry } from '../format/l2';
import { encodeSnapshotTable, type SnapshotEntry } from '../format/snapshot';
import type { Qcow2Writable } from './qcow2-write';
import type { Qcow2Image } from './qcow2';

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
 * QEMU's qcow2_update_snapshot_refcount: adds `addend` to every cluster reachable from `l1`
 * (L2 tables and data), then, when `l1` is the active table, brings the COPIED flags in line
 * with the new refcounts. Clusters a drop leaves unused are punched out of the file (QEMU's
 * pass-discard-snapshot, on by default). Call under the image's metadata mutex.
 */
async function updateSnapshotRefcount(img: Qcow2Writable, l1: Buffer, addend: number, active: boolean): Promise<void> {
  const g = img.geometry;
  const cs = g.clusterSize;
  const rc = img.refcounts;
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
      if (active && (e.kind === 'normal' || e.kind === 'zero')) {
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
    if (active) {
      const copied = (await rc.get(l2Offset / cs)) === 1;
      if (decodeL1Entry(l1, i).copied !== copied) {
        encodeL1Entry(l1, i, l2Offset, copied);
        img.l1Dirty.add(i);
      }
    }
  }
  await img.punchFreed();
}

/** Writes a new snapshot table and switches the header to it; frees the old table. */
async function writeSnapshotTable(img: Qcow2Writable, entries: SnapshotEntry[]): Promise<void> {
  const cs = img.geometry.clusterSize;
  const h = img.header;
  const oldOffset = h.snapshotsOffset;
  const oldSize = img.snapshotTableSize;
  const table = encodeSnapshotTable(entries);
  let offset = 0;
  if (table.length) {
    if (table.length > C.MAX_SNAPSHOTS_SIZE) throw new UsageError(`${img.filename}: snapshot table would be too large`);
    offset = await img.mutex.run(async () => {
      const off = await img.refcounts.alloc(Math.ceil(table.length / cs));
      img.noteAlloc();
      return off;
    });
    await img.file.write(table, offset);
  }
  await img.flush();
  const hdr = Buffer.alloc(12);
  hdr.writeUInt32BE(entries.length, 0);
  hdr.writeBigUInt64BE(BigInt(offset), 4);
  await img.file.write(hdr, 60);
  await img.file.flush();
  h.nbSnapshots = entries.length;
  h.snapshotsOffset = offset;
  img.snapshots = entries;
  img.snapshotTableSize = table.length;
  if (oldSize > 0) {
    await img.mutex.run(async () => {
      await img.releaseRef({ offset: oldOffset, length: Math.ceil(oldSize / cs) * cs, punch: true });
      await img.punchFreed();
    });
    await img.flush();
  }
}

export function findSnapshot(img: Qcow2Writable, idOrName: string): SnapshotEntry {
  const s = img.snapshots.find((x) => x.id === idOrName) ?? img.snapshots.find((x) => x.name === idOrName);
  if (!s) throw new NotFoundError(`no snapshot with ID or name '${idOrName}'`, img.filename);
  return s;
}

export async function createSnapshot(img: Qcow2Writable, name: string, now = Date.now()): Promise<SnapshotEntry> {
  if (!name) throw new UsageError('a snapshot needs a name');
  if (img.snapshots.some((s) => s.name === name)) throw new UsageError(`${img.filename}: a snapshot named '${name}' already exists`);
  if (img.snapshots.length >= C.MAX_SNAPSHOTS) throw new UsageError(`${img.filename}: too many snapshots`);
  if (img.header.refcountOrder === 0) throw new UsageError(`${img.filename}: snapshots need refcounts wider than 1 bit`);
  const cs = img.geometry.clusterSize;
  await img.flush();
  let entry!: SnapshotEntry;
  await img.mutex.run(async () => {
    await img.beforeChange();
    const l1Bytes = img.l1.length;
    const l1Offset = l1Bytes ? await img.refcounts.alloc(Math.ceil(l1Bytes / cs)) : 0;
    img.noteAlloc();
    if (l1Bytes) await img.file.write(Buffer.from(img.l1), l1Offset);
    await updateSnapshotRefcount(img, img.l1, 1, true);
    const maxId = img.snapshots.reduce((m, s) => Math.max(m, Number.parseInt(s.id, 10) || 0), 0);
    entry = {
      l1TableOffset: l1Offset, l1Size: l1Bytes / 8, id: String(maxId + 1), name,
      dateSec: Math.floor(now / 1000), dateNsec: (now % 1000) * 1_000_000,
      vmClockNsec: 0n, vmStateSize: 0, diskSize: img.virtualSize, icount: 0n, extraData: Buffer.alloc(0),
    };
  });
  await img.flush();
  await writeSnapshotTable(img, [...img.snapshots, entry]);
  return entry;
}

export async function deleteSnapshot(img: Qcow2Writable, idOrName: string): Promise<void> {
  const sn = findSnapshot(img, idOrName);
  const cs = img.geometry.clusterSize;
  await img.flush();
  await img.mutex.run(() => img.beforeChange());
  // First the snapshot disappears from disk, then its references are dropped.
  await writeSnapshotTable(img, img.snapshots.filter((s) => s !== sn));
  await img.mutex.run(async () => {
    const l1 = Buffer.alloc(sn.l1Size * 8);
    if (l1.length) await img.file.read(l1, sn.l1TableOffset);
    await updateSnapshotRefcount(img, l1, -1, false);
    if (l1.length) await img.releaseRef({ offset: sn.l1TableOffset, length: Math.ceil(l1.length / cs) * cs, punch: true });
    await img.punchFreed();
    await updateSnapshotRefcount(img, img.l1, 0, true);
  });
  await img.flush();
}

/** As qemu-img: a bitmap cannot follow the disk back to a snapshot, so none may be there. */
export function checkSnapshotApplicable(img: Qcow2Image, idOrName: string): void {
  if (img.bitmaps?.length) throw new UnsupportedFeatureError(`Could not apply snapshot '${printable(idOrName)}': Device has active dirty bitmaps (remove them with \`qemu-img bitmap --remove\` first)`, img.filename);
}

export async function applySnapshot(img: Qcow2Writable, idOrName: string): Promise<void> {
  const sn = findSnapshot(img, idOrName);
  checkSnapshotApplicable(img, idOrName);
  const g = img.geometry;
  await img.flush();
  const snL1 = Buffer.alloc(sn.l1Size * 8);
  if (snL1.length) await img.file.read(snL1, sn.l1TableOffset);
  const size = sn.diskSize ?? img.virtualSize;
  if (sn.l1Size > img.l1.length / 8) await img.grow(Math.max(img.virtualSize, sn.l1Size * g.l2Entries * g.clusterSize));
  await img.mutex.run(async () => {
    await img.beforeChange();
    // Take references for the snapshot's tables before the active L1 is overwritten.
    await updateSnapshotRefcount(img, snL1, 1, false);
  });
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
