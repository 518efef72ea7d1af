// How many bytes a job's writes will add to an image file, worked out from its mapping before
// anything is written: new data clusters, new L2 tables, a larger L1 table, new refcount blocks
// (qcow2), or data landing in holes (raw). Writes must be reported in ascending offset order,
// which is how every job walks an image; that keeps the bookkeeping to a few numbers.
import type { DiskImage } from '../engine/image';
import { Qcow2Image } from '../engine/qcow2';
import { decodeL1Entry } from '../format/l2';
import { refcountBlockEntries } from '../format/refcount';

export class WriteEstimate {
  private newClusters = 0;
  private lastCluster = -1;
  private lastL1 = -1;
  private rawBytes = 0;
  private size: number;
  private readonly q: Qcow2Image | null;

  constructor(readonly img: DiskImage, private readonly fileSize: number) {
    this.q = img instanceof Qcow2Image ? img : null;
    this.size = img.virtualSize;
  }

  /** The image will first grow to `size` (qcow2: the L1 table may move to a larger one). */
  grow(size: number): void {
    if (size <= this.size) return;
    const q = this.q;
    if (q) {
      const g = q.geometry;
      const need = Math.ceil(size / (g.l2Entries * g.clusterSize));
      if (need > q.l1.length / 8) this.newClusters += Math.ceil((need * 8) / g.clusterSize);
    }
    this.size = size;
  }

  /** A guest data write of [offset, offset+length). */
  async data(offset: number, length: number): Promise<void> {
    if (length <= 0) return;
    const q = this.q;
    if (!q) { await this.rawData(offset, length); return; }
    const cs = q.geometry.clusterSize;
    this.l2For(offset, length);
    const end = offset + length;
    let p = offset;
    const inside = Math.min(end, q.virtualSize);
    while (p < inside) {
      const runs = await q.runs(p, inside - p);
      for (const r of runs) {
        // Where a write lands in place: standard L2 needs a data cluster of its own (COPIED,
        // which we take as given); extended L2 any cluster with a host offset.
        const inPlace = q.geometry.extendedL2 ? r.hostOffset !== null : r.state === 'data';
        if (!inPlace) this.count(Math.floor(r.offset / cs), Math.floor((r.offset + r.length - 1) / cs));
        else this.lastCluster = Math.max(this.lastCluster, Math.floor((r.offset + r.length - 1) / cs));
        p = r.offset + r.length;
      }
      if (!runs.length) break;
    }
    if (end > inside) this.count(Math.floor(Math.max(offset, inside) / cs), Math.floor((end - 1) / cs));
  }

  /** writeZeroes of [offset, offset+length): flags where whole units are covered (v3), data elsewhere. */
  async zero(offset: number, length: number): Promise<void> {
    if (length <= 0) return;
    const q = this.q;
    if (!q) return; // raw: a punched hole
    const g = q.geometry;
    const unit = g.extendedL2 ? g.subclusterSize : g.clusterSize;
    const end = offset + length;
    const A = Math.ceil(offset / unit) * unit;
    const B = Math.floor(end / unit) * unit;
    if (q.header.version !== 3 || A >= B) { await this.data(offset, length); return; }
    if (A > offset) await this.data(offset, A - offset);
    this.l2For(A, B - A);
    if (end > B) await this.data(B, end - B);
  }

  /** New L2 tables for L1 entries [offset, offset+length) touches that have none yet. */
  private l2For(offset: number, length: number): void {
    const q = this.q!;
    const span = q.geometry.l2Entries * q.geometry.clusterSize;
    for (let i = Math.max(this.lastL1 + 1, Math.floor(offset / span)); i <= Math.floor((offset + length - 1) / span); i++) {
      if (i >= q.l1.length / 8 || decodeL1Entry(q.l1, i).l2Offset === 0) this.newClusters++;
      this.lastL1 = i;
    }
  }

  private count(first: number, last: number): void {
    const from = Math.max(first, this.lastCluster + 1);
    if (last >= from) this.newClusters += last - from + 1;
    this.lastCluster = Math.max(this.lastCluster, last);
  }

  private async rawData(offset: number, length: number): Promise<void> {
    const end = Math.min(offset + length, this.img.virtualSize);
    let p = offset;
    while (p < end) {
      const st = await this.img.blockStatus(p, end - p);
      if (!st.data) this.rawBytes += st.length;
      p += st.length;
    }
    if (offset + length > Math.max(offset, end)) this.rawBytes += offset + length - Math.max(offset, end);
  }

  /** Bytes the file will grow by (qcow2: whole clusters, with the refcount blocks they need). */
  bytes(): number {
    const q = this.q;
    if (!q) return this.rawBytes;
    const cs = q.geometry.clusterSize;
    const perBlock = refcountBlockEntries(q.header.clusterBits, q.header.refcountOrder);
    const end = Math.ceil(this.fileSize / cs);
    const n = this.newClusters;
    const blocks = n ? Math.ceil((end + n) / perBlock) - Math.ceil(end / perBlock) : 0;
    return (n + blocks) * cs;
  }
}
