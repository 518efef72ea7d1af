// Changing refcounts and an active table's COPIED flags together, in one step. A snapshot
// create raises the refcount of every cluster the active tables reach and must clear their
// COPIED flags; a delete lowers refcounts and must set flags again. Written in place, one of
// the two always reaches the disk first, and a crash between leaves flags that disagree with
// the refcounts (QEMU's check calls each such entry a corruption; a set flag over a shared
// cluster is one: a write would go in place). So nothing in use is written: the new tables
// (copies of the L2 tables whose flags change, a new L1, a new snapshot table) and a complete
// new refcount structure go into clusters nothing uses, are flushed, and one header write
// (l1_size through snapshots_offset share the first sector) switches the image to all of them
// at once. Before it the image is as it was; after it, as it should be; the clusters only the
// old metadata used are then free.
import type { Qcow2Image } from './qcow2';
import type { Qcow2Writable } from './qcow2-write';
import { Refcounts } from './refcounts';
import type { StructureLayout } from './refcount-structure';
import { encodeStructure, newRefArray, placeStructure, type RefArray } from './refcount-structure';
import { maxRefcount } from '../format/refcount';
import { CorruptImageError, RefcountOverflowError } from '../errors';

export interface SwitchHeader {
  l1Offset: number;
  l1Size: number;
  snapshotsOffset: number;
  nbSnapshots: number;
}

export class MetadataSwitch {
  private counts: RefArray;
  /** Clusters [0, wasFree.length) that no one used when the switch began (1): the only ones it may take. */
  private readonly wasFree: Uint8Array;
  private len: number;
  private cursor: number;
  /** The first cluster the switch may take (see begin's `past`). */
  private readonly from: number;
  private readonly writes: { offset: number; data: Buffer }[] = [];
  private readonly cs: number;
  private readonly max: number;

  private constructor(private readonly img: Qcow2Image, private readonly refcounts: Refcounts, counts: RefArray, n: number, from: number) {
    this.cs = img.geometry.clusterSize;
    this.from = Math.max(1, from);
    this.cursor = this.from;
    this.counts = counts;
    this.len = n;
    this.max = maxRefcount(img.header.refcountOrder);
    this.wasFree = new Uint8Array(n);
    for (let c = 0; c < n; c++) if (!counts[c]) this.wasFree[c] = 1;
  }

  /**
   * Starts from the image's refcounts (for a writable image: under its metadata mutex, with
   * nothing dirty). A switch that is only measured (see end) may start from any image.
   * `refcounts` may be another structure than the image's (one laid out in memory, see
   * snapshot-create.ts). With `past`, everything the switch writes goes past the end of the
   * file and of what `refcounts` counts: nothing already in the file is touched, and cutting
   * the file back gives the space back.
   */
  static async begin(img: Qcow2Image, refcounts: Refcounts, opts: { past?: boolean } = {}): Promise<MetadataSwitch> {
    const cs = img.geometry.clusterSize;
    const n = Math.max(refcounts.allocEnd, Math.ceil((await img.file.size()) / cs));
    const counts = newRefArray(img.header.refcountOrder, n + 64);
    await refcounts.countsInto(counts, n);
    return new MetadataSwitch(img, refcounts, counts, n, opts.past ? n : 1);
  }

  /** Refcounts as the image has them on disk, for a switch that is only measured. */
  static async refcountsOf(img: Qcow2Image): Promise<Refcounts> {
    const h = img.header;
    const table = Buffer.alloc(h.refcountTableClusters * img.geometry.clusterSize);
    await img.file.read(table, h.refcountTableOffset);
    return new Refcounts({
      file: img.file, filename: img.filename, clusterBits: h.clusterBits, refcountOrder: h.refcountOrder,
      switchReftable: () => Promise.reject(new Error('read-only refcounts')),
    }, table, h.refcountTableOffset, await img.file.size());
  }

  /** The refcount `cluster` will have after the switch (as changed so far). */
  get(cluster: number): number {
    return cluster < this.len ? this.counts[cluster]! : 0;
  }

  /** Adds `delta` to every cluster overlapping [offset, offset+length). */
  ref(offset: number, length: number, delta: number): void {
    if (length <= 0) return;
    const first = Math.floor(offset / this.cs);
    const last = Math.floor((offset + length - 1) / this.cs);
    for (let c = first; c <= last; c++) {
      if (c >= this.len) throw new CorruptImageError(`cluster ${c} (host offset 0x${(c * this.cs).toString(16)}) lies past the end of the image`, this.img.filename);
      const v = this.counts[c]! + delta;
      if (v < 0) throw new CorruptImageError(`refcount of cluster ${c} (host offset 0x${(c * this.cs).toString(16)}) would drop below zero`, this.img.filename);
      if (v > this.max) throw new RefcountOverflowError(`refcount of cluster ${c} would overflow ${this.max}`, this.img.filename);
      this.counts[c] = v;
    }
  }

  /**
   * Places `data` in clusters nothing used when the switch began (or past the end), to be
   * written before the switch; returns its offset. Its clusters count 1.
   */
  alloc(data: Buffer): number {
    const k = Math.max(1, Math.ceil(data.length / this.cs));
    let first = -1;
    let start = this.cursor;
    for (let c = this.cursor, run = 0; ; c++) {
      if (!this.takeable(c)) { run = 0; continue; }
      if (first < 0) first = c;
      if (run === 0) start = c;
      if (++run === k) break;
    }
    for (let c = start; c < start + k; c++) this.set(c, 1);
    // Everything before the first free cluster seen is taken: later searches start there.
    this.cursor = start === first ? start + k : first;
    this.writes.push({ offset: start * this.cs, data });
    return start * this.cs;
  }

  /**
   * Places `data` at `offset`, whose clusters the counts the switch began from already count
   * (a table laid out in memory): written before the switch with everything else.
   */
  writeAt(offset: number, data: Buffer): void {
    this.writes.push({ offset, data });
  }

  /** Free when the switch began and not taken since; everything past the old end is free. */
  private takeable(c: number): boolean {
    if (c < this.from) return false;
    if (c < this.wasFree.length) return this.wasFree[c] === 1 && !this.counts[c];
    return c >= this.len || !this.counts[c];
  }

  private set(c: number, v: number): void {
    if (c >= this.counts.length) {
      const bigger = newRefArray(this.img.header.refcountOrder, Math.max(c + 1, this.counts.length * 2));
      bigger.set(this.counts);
      this.counts = bigger;
    }
    if (c >= this.len) this.len = c + 1;
    this.counts[c] = v;
  }

  private placed: StructureLayout | null = null;

  /** Where the new refcount structure goes (placed once everything else is). */
  private place(): StructureLayout {
    if (this.placed) return this.placed;
    const img = this.img;
    const g = { clusterBits: img.header.clusterBits, refcountOrder: img.header.refcountOrder };
    // The old structure is replaced: its clusters are free after the switch, not before.
    for (const c of this.refcounts.structureClusters()) this.ref(c * this.cs, this.cs, -1);
    const n = this.len;
    const free = (c: number) => c > 0 && this.takeable(c);
    this.placed = placeStructure(this.counts, n, g, free, Math.min(n, this.wasFree.length), Math.max(n, this.from));
    return this.placed;
  }

  /**
   * Host byte ranges that something used before the switch and nothing uses after it (the
   * old tables, snapshot table and refcount structure): after commit, what QEMU would discard.
   */
  freedRanges(): [number, number][] {
    this.place();
    const out: [number, number][] = [];
    for (let c = 1; c < this.wasFree.length; c++) {
      if (this.wasFree[c] || this.get(c) !== 0) continue;
      const last = out[out.length - 1];
      if (last && last[1] === c * this.cs) last[1] += this.cs;
      else out.push([c * this.cs, (c + 1) * this.cs]);
    }
    return out;
  }

  /** One past the last cluster in use once the switch is done: how far the file grows. */
  get end(): number {
    const lay = this.place();
    return Math.max(this.len, lay.start + lay.clusters);
  }

  /**
   * Writes the new tables and a new refcount structure, flushes, switches the header to them
   * in one write, flushes, and adopts the new refcount structure. The caller adopts the rest.
   */
  async commit(img: Qcow2Writable, h: SwitchHeader): Promise<void> {
    if (img !== this.img) throw new Error('a metadata switch commits to the image it began on');
    const g = { clusterBits: img.header.clusterBits, refcountOrder: img.header.refcountOrder };
    const lay = this.place();
    const n = this.len;
    const enc = encodeStructure(this.counts, n, lay, g);
    await Promise.all([
      ...this.writes.map((w) => img.file.write(w.data, w.offset)),
      ...enc.blocks.map((b) => img.file.write(b.data, b.offset)),
      img.file.write(enc.table, enc.tableOffset),
    ]);
    await img.file.flush();
    const hdr = Buffer.alloc(36);
    hdr.writeUInt32BE(h.l1Size, 0);
    hdr.writeBigUInt64BE(BigInt(h.l1Offset), 4);
    hdr.writeBigUInt64BE(BigInt(enc.tableOffset), 12);
    hdr.writeUInt32BE(lay.tableClusters, 20);
    hdr.writeUInt32BE(h.nbSnapshots, 24);
    hdr.writeBigUInt64BE(BigInt(h.snapshotsOffset), 28);
    await img.file.write(hdr, 36);
    await img.file.flush();
    const head = img.header;
    head.l1Size = h.l1Size;
    head.l1TableOffset = h.l1Offset;
    head.refcountTableOffset = enc.tableOffset;
    head.refcountTableClusters = lay.tableClusters;
    head.nbSnapshots = h.nbSnapshots;
    head.snapshotsOffset = h.snapshotsOffset;
    img.refcounts = new Refcounts(img.refcounts.hostInfo, Buffer.from(enc.table), enc.tableOffset, this.end * this.cs);
    img.noteAlloc();
  }
}
