// Internal snapshot creation laid out as QEMU lays it out (block/qcow2-snapshot.c's
// qcow2_snapshot_create): the snapshot's copy of the active L1 in the first free clusters,
// every L2 table and data cluster the active L1 reaches counting one more, with the COPIED
// flags of the active L1 and L2 tables cleared in place, then a new snapshot table in the next
// free clusters, the header switched to it, the old table freed. The same file, offset for
// offset, as qemu-img snapshot -c makes from the same image.
//
// QEMU writes those changes in place, in steps: a crash between the refcount raise and the
// flag clearing leaves COPIED flags over clusters counted twice, which check calls corruption
// (and a write would then go in place into a cluster a snapshot shares). Strata computes
// QEMU's result first, in memory (an overlay over the file), and reaches it in two header
// switches, each one write of the header's first sector:
//   1. Past the end of the file (and of everything QEMU's result uses): copies of the active
//      tables QEMU's result changes (the L1, and each L2 table whose flags change), as QEMU's
//      result has them, and a complete refcount structure counting QEMU's result plus those
//      copies; QEMU's snapshot L1 and snapshot table where QEMU puts them (clusters free now).
//      Flushed; the header switches to the copies, the new structure and the new snapshot
//      table. The image is QEMU's result but for where the active tables and the refcounts
//      live; the tables QEMU changes in place are now only the snapshot's (or no one's).
//   2. The in-place writes of QEMU's result: the active L2 tables (the snapshot's now: only
//      their COPIED flags change, which no one reads there), the active L1 and the refcount
//      blocks (no one's now). Flushed; the header switches back to them. The copies and the
//      interim structure lie past QEMU's end of file: the file is cut back to it.
// Before switch 1 the image is as it was; between the switches, it has the snapshot, with
// leaks; after switch 2 it is QEMU's. Every state in between checks clean but for leaks.
import * as C from '../format/constants';
import { CorruptImageError, RefcountOverflowError, StrataError, UsageError, printable } from '../errors';
import { decodeReftableEntry, refcountBlockEntries } from '../format/refcount';
import { decodeL2Entry, compressedRange } from '../format/l2';
import { encodeSnapshotTable, type SnapshotEntry } from '../format/snapshot';
import type { BlockFile } from '../io/block-file';
import { MetadataSwitch } from './metadata-switch';
import type { Qcow2Image } from './qcow2';
import type { Qcow2Writable } from './qcow2-write';
import { Refcounts } from './refcounts';

/** The file as a run would leave it: reads see the writes made here, nothing reaches the file. */
class OverlayFile implements BlockFile {
  readonly writable = true;
  readonly writes: { offset: number; data: Buffer }[] = [];
  constructor(private readonly inner: BlockFile, private readonly innerSize: number) {}
  get path(): string { return this.inner.path; }
  async size(): Promise<number> { return Math.max(this.innerSize, this.end); }
  get end(): number { return this.writes.reduce((m, w) => Math.max(m, w.offset + w.data.length), 0); }
  async read(buf: Uint8Array, offset: number): Promise<number> {
    const n = await this.inner.read(buf, offset);
    const end = offset + buf.length;
    for (const w of this.writes) {
      const a = Math.max(offset, w.offset);
      const b = Math.min(end, w.offset + w.data.length);
      if (a < b) buf.set(w.data.subarray(a - w.offset, b - w.offset), a - offset);
    }
    return n;
  }
  async write(buf: Uint8Array, offset: number): Promise<void> { this.writes.push({ offset, data: Buffer.from(buf) }); }
  async truncate(): Promise<void> { throw new Error('an overlay is not truncated'); }
  async flush(): Promise<void> { /* nothing reaches the file */ }
  async close(): Promise<void> { /* nothing to close */ }

  /** The ranges written (merged where they overlap), with what they hold now. */
  async ranges(): Promise<{ offset: number; data: Buffer }[]> {
    const spans = this.writes.map((w) => [w.offset, w.offset + w.data.length] as [number, number]).sort((x, y) => x[0] - y[0]);
    const merged: [number, number][] = [];
    for (const [a, b] of spans) {
      const last = merged[merged.length - 1];
      if (last && a < last[1]) last[1] = Math.max(last[1], b);
      else merged.push([a, b]);
    }
    return Promise.all(merged.map(async ([a, b]) => {
      const data = Buffer.alloc(b - a);
      await this.read(data, a);
      return { offset: a, data };
    }));
  }
}

/** QEMU's result of snapshot -c, in memory. */
export interface QemuLayout {
  /** The image as QEMU leaves it: what it writes (its header excepted) and the file's size then. */
  writes: { offset: number; data: Buffer }[];
  /** Header bytes [36, 72) then: L1, refcount table and snapshot table fields. */
  header: Buffer;
  size: number;
  /** The active L1 then, and the active L2 tables whose flags changed (by offset). */
  l1: Buffer;
  tables: Map<number, Buffer>;
  entries: SnapshotEntry[];
  tableSize: number;
  /** The refcounts then (reading through the overlay). */
  refcounts: Refcounts;
  /** Clusters the old snapshot table leaves free (QEMU discards them). */
  freed: [number, number][];
}

/**
 * Where QEMU's snapshot -c fails after allocating and writing its L1 copy: a refcount that
 * would overflow, a cluster its refcounts do not reach (QEMU: -EFBIG or -EAGAIN from the
 * refcount block allocation), a snapshot table past QEMU's limit. `failure` carries
 * qemu-img's words.
 */
export interface QemuFailure {
  failure: StrataError;
  l1Offset: number;
}

const HEADER_FIELDS = 36;
const HEADER_FIELDS_END = 72;

/**
 * QEMU's qcow2_snapshot_create on `img` (as on disk: nothing dirty), computed in memory.
 * `entry` gets the snapshot L1's place and size. With `qemu`, reserved bits in L2 entries are
 * passed over as QEMU passes over them.
 */
export async function layOutCreate(img: Qcow2Image, entry: SnapshotEntry, opts: { qemu?: boolean } = {}): Promise<QemuLayout | QemuFailure> {
  const g = img.geometry;
  const cs = g.clusterSize;
  const h = img.header;
  const size0 = await img.file.size();
  const ov = new OverlayFile(img.file, size0);
  const reftable = Buffer.alloc(h.refcountTableClusters * cs);
  await img.file.read(reftable, h.refcountTableOffset);
  const header = Buffer.alloc(HEADER_FIELDS_END - HEADER_FIELDS);
  await img.file.read(header, HEADER_FIELDS);
  const rc = new Refcounts({
    file: ov, filename: img.filename, clusterBits: h.clusterBits, refcountOrder: h.refcountOrder,
    switchReftable: async (offset, clusters) => {
      header.writeBigUInt64BE(BigInt(offset), 48 - HEADER_FIELDS);
      header.writeUInt32BE(clusters, 56 - HEADER_FIELDS);
    },
  }, reftable, h.refcountTableOffset, size0);

  // The snapshot's L1: the active one as it is, COPIED flags and all.
  const l1Bytes = img.l1.length;
  const l1Offset = l1Bytes ? await rc.alloc(Math.ceil(l1Bytes / cs)) : 0;
  if (l1Bytes) await ov.write(Buffer.from(img.l1), l1Offset);
  entry.l1TableOffset = l1Offset;
  entry.l1Size = l1Bytes / 8;

  // qcow2_update_snapshot_refcount(active L1, +1): data first, then the table, each entry's
  // COPIED flag set exactly when its cluster's refcount is 1 afterwards.
  const es = g.extendedL2 ? C.L2E_SIZE_EXTENDED : C.L2E_SIZE_NORMAL;
  const perBlock = refcountBlockEntries(h.clusterBits, h.refcountOrder);
  const failed = (code: string) => `Could not create snapshot '${printable(entry.name)}': ${code}`;
  // A cluster without a refcount block: QEMU allocates one (and grows the table) and fails with
  // -EAGAIN, or with -EFBIG when the table would pass its limit. Strata refuses first.
  const reach = (offset: number, where: string) => {
    const c = Math.floor(offset / cs);
    const ri = Math.floor(c / perBlock);
    if (ri < rc.reftableEntries && decodeReftableEntry(rc.reftable, ri).blockOffset !== 0) return;
    const big = ri >= rc.reftableEntries && Math.ceil(c / perBlock) > C.MAX_REFTABLE_SIZE_BYTES / 8;
    throw new CorruptImageError(`${where} points to host offset 0x${offset.toString(16)}, past what the refcount table covers; nothing was changed (run \`strata check -r all\`)`, img.filename)
      .asQemu(failed(big ? '-27 (File too large)' : '-11 (Resource temporarily unavailable)'));
  };
  const one = Buffer.alloc(es);
  const l1 = Buffer.from(img.l1);
  const seen = new Map<number, Buffer>();
  const tables = new Map<number, Buffer>();
  try {
    for (let i = 0; i < l1Bytes / 8; i++) {
      const old = l1.readBigUInt64BE(i * 8);
      const l2Offset = Number(old & C.L1E_OFFSET_MASK);
      if (!l2Offset) continue;
      let table = seen.get(l2Offset);
      if (!table) {
        table = Buffer.from(await img.l2Table(l2Offset));
        seen.set(l2Offset, table);
      }
      for (let j = 0; j < g.l2Entries; j++) {
        const raw = table.readBigUInt64BE(j * es);
        const where = `L2 entry ${j} of the L2 table at 0x${l2Offset.toString(16)}`;
        // QEMU reads an entry's type and offset past any reserved bits (qemu-img then fails
        // on where the offset points); Strata refuses reserved bits in its own words.
        one.writeBigUInt64BE(raw & C.QCOW_OFLAG_COMPRESSED ? raw : raw & (C.QCOW_OFLAG_COPIED | C.L2E_OFFSET_MASK | C.QCOW_OFLAG_ZERO), 0);
        const e = decodeL2Entry(one, 0, g, () => `of the L2 table at 0x${l2Offset.toString(16)}`, img.filename);
        let refcount = 0;
        if (e.kind === 'compressed') {
          const r = compressedRange(e.hostOffset, e.sectors);
          const start = r.start - (r.start % C.COMPRESSED_SECTOR_SIZE);
          for (let o = start - (start % cs); o < r.end; o += cs) reach(o, where);
          await rc.change(start, r.end - start, 1);
          refcount = 2;
        } else if ((e.kind === 'normal' || e.kind === 'zero') && e.hostOffset) {
          if (!opts.qemu && one.readBigUInt64BE(0) !== raw) {
            decodeL2Entry(table, j, g, () => `of the L2 table at 0x${l2Offset.toString(16)}`, img.filename);
          }
          reach(e.hostOffset, where);
          await rc.change(e.hostOffset, cs, 1);
          refcount = await rc.get(e.hostOffset / cs);
        }
        const next = refcount === 1 ? raw | C.QCOW_OFLAG_COPIED : raw & ~C.QCOW_OFLAG_COPIED;
        if (next !== raw) {
          table.writeBigUInt64BE(next, j * es);
          tables.set(l2Offset, table);
        }
      }
      reach(l2Offset, `L1 entry ${i}`);
      await rc.change(l2Offset, cs, 1);
      const next = BigInt(l2Offset) | ((await rc.get(l2Offset / cs)) === 1 ? C.QCOW_OFLAG_COPIED : 0n);
      if (next !== old) l1.writeBigUInt64BE(next, i * 8);
    }
  } catch (err) {
    if (err instanceof RefcountOverflowError) return { failure: err.asQemu(failed('-22 (Invalid argument)')), l1Offset };
    if (err instanceof StrataError && err.qemu?.startsWith(failed('-'))) return { failure: err, l1Offset };
    throw err;
  }
  for (const [off, t] of tables) await ov.write(t, off);
  if (!l1.equals(img.l1)) await ov.write(l1, h.l1TableOffset);

  // qcow2_write_snapshots: the new table in the next free clusters, the header, the old table freed.
  const entries = [...img.snapshots, entry];
  const table = encodeSnapshotTable(entries);
  if (table.length > C.MAX_SNAPSHOTS_SIZE) {
    return { failure: new UsageError(`${img.filename}: the snapshot table would pass ${C.MAX_SNAPSHOTS_SIZE} bytes; nothing was changed`).asQemu(failed('-27 (File too large)')), l1Offset };
  }
  const tableOffset = await rc.alloc(Math.ceil(table.length / cs));
  await ov.write(table, tableOffset);
  header.writeUInt32BE(entries.length, 60 - HEADER_FIELDS);
  header.writeBigUInt64BE(BigInt(tableOffset), 64 - HEADER_FIELDS);
  const freed: [number, number][] = [];
  if (img.snapshotTableSize > 0) {
    const from = img.header.snapshotsOffset - (img.header.snapshotsOffset % cs);
    const to = Math.ceil((img.header.snapshotsOffset + img.snapshotTableSize) / cs) * cs;
    await rc.change(from, to - from, -1);
    for (let c = from / cs; c < to / cs; c++) {
      if ((await rc.get(c)) !== 0) continue;
      const last = freed[freed.length - 1];
      if (last && last[1] === c * cs) last[1] += cs;
      else freed.push([c * cs, (c + 1) * cs]);
    }
  }
  await rc.writeBack();
  return { writes: await ov.ranges(), header, size: await ov.size(), l1, tables, entries, tableSize: table.length, refcounts: rc, freed };
}

/** The clusters [a, b) of a byte range. */
function clustersOf(offset: number, length: number, cs: number): [number, number] {
  return [Math.floor(offset / cs), Math.ceil((offset + length) / cs)];
}

/** Switch 1 laid out: the copies and the interim structure, not yet written. */
export interface InterimSwitch {
  sw: MetadataSwitch;
  /** Where the copy of the active L1 is, and what it holds. */
  l1Offset: number;
  l1: Buffer;
  /** The copies of the L2 tables QEMU changes: copy offset -> table. */
  copies: Map<number, Buffer>;
  /** QEMU's writes into clusters something uses now: written between the switches. */
  inPlace: { offset: number; data: Buffer }[];
}

/**
 * Lays out switch 1 (see the top) for `q` on `img` (as on disk). Refuses, before anything is
 * written, a result whose in-place writes would touch anything but the active tables and the
 * refcount structure (never the case for QEMU's procedure on a consistent image).
 */
export async function layOutInterim(img: Qcow2Image, refcountsNow: Refcounts, q: QemuLayout): Promise<InterimSwitch> {
  const cs = img.geometry.clusterSize;
  const sw = await MetadataSwitch.begin(img, q.refcounts, { past: true });
  // What QEMU writes in place may only be tables the active L1 reaches, the L1 itself or the
  // refcount structure.
  const mayRewrite = new Set<number>(refcountsNow.structureClusters());
  for (let c = 0; c < Math.ceil(img.l1.length / cs); c++) mayRewrite.add(img.header.l1TableOffset / cs + c);
  for (const off of q.tables.keys()) mayRewrite.add(off / cs);
  const inPlace: { offset: number; data: Buffer }[] = [];
  for (const w of q.writes) {
    const [a, b] = clustersOf(w.offset, w.data.length, cs);
    let used = false;
    for (let c = a; c < b; c++) if ((await refcountsNow.get(c)) !== 0) used = true;
    if (!used) { sw.writeAt(w.offset, w.data); continue; }
    for (let c = a; c < b; c++) {
      if (!mayRewrite.has(c)) throw new CorruptImageError(`snapshot create would rewrite cluster ${c} (host offset 0x${(c * cs).toString(16)}) in place, which the image uses for something else; nothing was changed (run \`strata check -r all\` first)`, img.filename);
    }
    inPlace.push(w);
  }
  const copies = new Map<number, Buffer>();
  const l1 = Buffer.from(q.l1);
  for (let i = 0; i < l1.length / 8; i++) {
    const l2Offset = Number(l1.readBigUInt64BE(i * 8) & C.L1E_OFFSET_MASK);
    const table = l2Offset ? q.tables.get(l2Offset) : undefined;
    if (!table) continue;
    let at = -1;
    for (const [off, t] of copies) if (t === table) at = off;
    if (at < 0) {
      at = sw.alloc(table);
      copies.set(at, table);
      // The copy counts 1 (the interim L1), the table QEMU changes keeps its counts (leaks
      // until switch 2).
      l1.writeBigUInt64BE(BigInt(at) | C.QCOW_OFLAG_COPIED, i * 8);
    } else {
      // Two entries for one table (only a damaged image has that): the copy is shared too.
      sw.ref(at, cs, 1);
      l1.writeBigUInt64BE(BigInt(at), i * 8);
    }
  }
  const l1Offset = l1.length ? sw.alloc(l1) : 0;
  return { sw, l1Offset, l1, copies, inPlace };
}

/**
 * Creates the snapshot as QEMU lays it out, in the two switches described at the top. The
 * caller holds the metadata mutex, with nothing dirty. On a failure between the switches, the
 * image keeps the snapshot, with its active tables in the copies (leaks only).
 */
export async function commitCreate(img: Qcow2Writable, q: QemuLayout): Promise<void> {
  const it = await layOutInterim(img, img.refcounts, q);
  const h = q.header;
  await it.sw.commit(img, {
    l1Offset: it.l1Offset, l1Size: img.l1.length / 8,
    snapshotsOffset: Number(h.readBigUInt64BE(64 - HEADER_FIELDS)), nbSnapshots: h.readUInt32BE(60 - HEADER_FIELDS),
  });
  // Switch 1 is done: the image has the snapshot, its active tables in the copies.
  img.l1 = it.l1;
  img.snapshots = q.entries;
  img.snapshotTableSize = q.tableSize;
  for (const [off, t] of it.copies) img.l2Cache.set(off, t);
  // The old snapshot table is no one's now.
  if (img.file.discard) for (const [a, b] of q.freed) await img.file.discard(a, b - a);

  // Switch 2: QEMU's in-place writes, flushed, then its header.
  await Promise.all(it.inPlace.map((w) => img.file.write(w.data, w.offset)));
  await img.file.flush();
  await img.file.write(h, HEADER_FIELDS);
  await img.file.flush();
  const head = img.header;
  head.l1TableOffset = Number(h.readBigUInt64BE(40 - HEADER_FIELDS));
  head.refcountTableOffset = Number(h.readBigUInt64BE(48 - HEADER_FIELDS));
  head.refcountTableClusters = h.readUInt32BE(56 - HEADER_FIELDS);
  head.nbSnapshots = h.readUInt32BE(60 - HEADER_FIELDS);
  head.snapshotsOffset = Number(h.readBigUInt64BE(64 - HEADER_FIELDS));
  img.l1 = q.l1;
  for (const off of it.copies.keys()) img.l2Cache.delete(off);
  for (const [off, t] of q.tables) img.l2Cache.set(off, t);
  img.refcounts = new Refcounts(img.refcounts.hostInfo, Buffer.from(q.refcounts.reftable), q.refcounts.reftableOffset, q.size);
  // The copies and the interim structure lie past QEMU's end of file.
  await img.file.truncate(q.size);
  img.noteFileSize(q.size);
}

/**
 * QEMU's failure when a refcount would overflow: it has allocated and written the snapshot's
 * L1 copy (leaked: nothing points to it) and fails. Done the same way: a new cluster's
 * refcount and its content, which nothing references (a leak, whatever lands).
 */
export async function leakL1Copy(img: Qcow2Writable): Promise<void> {
  const cs = img.geometry.clusterSize;
  if (!img.l1.length) return;
  const at = await img.refcounts.alloc(Math.ceil(img.l1.length / cs));
  img.noteAlloc();
  await img.file.write(Buffer.from(img.l1), at);
  await img.refcounts.writeBack();
  await img.file.flush();
}

/** Bytes the file grows by at most while the snapshot is created (switch 1's copies), for plans. */
export async function createGrowth(img: Qcow2Image, refcountsNow: Refcounts, q: QemuLayout): Promise<number> {
  const it = await layOutInterim(img, refcountsNow, q);
  return Math.max(0, it.sw.end * img.geometry.clusterSize - (await img.file.size()));
}
