// Refcount table and blocks of an image opened for writing: lookups, allocation (clusters and
// the byte allocator for compressed data), growth of blocks and of the table, and write-back.
// Callers hold the image's metadata mutex.
import type { BlockFile } from '../io/block-file';
import { CorruptImageError, RefcountOverflowError } from '../errors';
import { decodeReftableEntry, encodeReftableEntry, getRefcount, setRefcount, maxRefcount, refcountBlockEntries } from '../format/refcount';

export interface RefcountHost {
  readonly file: BlockFile;
  readonly filename: string;
  readonly clusterBits: number;
  readonly refcountOrder: number;
  /** Writes the header fields for a new refcount table (offset, clusters) durably. */
  switchReftable(offset: number, clusters: number): Promise<void>;
}

export class Refcounts {
  reftable: Buffer;
  reftableOffset: number;
  /** What this was created with, so a fresh structure can be managed the same way. */
  readonly hostInfo: RefcountHost;
  private readonly reftableDirty = new Set<number>();
  private readonly blocks = new Map<number, Buffer>();
  private readonly dirtyBlocks = new Set<number>();
  private readonly perBlock: number;
  private readonly clusterSize: number;
  private readonly max: number;
  /** Lowest cluster index that may be free. */
  private freeHint = 0;
  /** One past the highest cluster in use (file end or allocated in memory). */
  allocEnd: number;
  /** Byte allocator state for compressed clusters (0 = none). */
  private freeByteOffset = 0;
  private readonly blockCacheLimit: number;

  constructor(private readonly host: RefcountHost, reftable: Buffer, reftableOffset: number, fileSize: number) {
    this.hostInfo = host;
    this.reftable = reftable;
    this.reftableOffset = reftableOffset;
    this.clusterSize = 2 ** host.clusterBits;
    this.perBlock = refcountBlockEntries(host.clusterBits, host.refcountOrder);
    this.max = maxRefcount(host.refcountOrder);
    this.allocEnd = Math.ceil(fileSize / this.clusterSize);
    this.blockCacheLimit = Math.max(64, Math.floor((64 << 20) / this.clusterSize));
  }

  get reftableEntries(): number { return this.reftable.length / 8; }

  /**
   * QEMU's qcow2_shrink_reftable: refcount blocks that count nothing but themselves are
   * dropped from the table, so a shrunk file can be truncated below them.
   */
  async dropIdleBlocks(): Promise<void> {
    const cs = this.clusterSize;
    for (let ri = 0; ri < this.reftableEntries; ri++) {
      const off = this.blockOffset(ri);
      if (!off) continue;
      const b = await this.loadBlock(off);
      const self = off / cs;
      const selfHere = Math.floor(self / this.perBlock) === ri;
      let busy = false;
      for (let i = 0; i < this.perBlock && !busy; i++) {
        if (getRefcount(b, i, this.host.refcountOrder) !== 0 && !(selfHere && ri * this.perBlock + i === self)) busy = true;
      }
      if (busy) continue;
      encodeReftableEntry(this.reftable, ri, 0);
      this.reftableDirty.add(ri);
      this.blocks.delete(off);
      this.dirtyBlocks.delete(off);
      if (!selfHere) await this.change(off, cs, -1);
      else if (self < this.freeHint) this.freeHint = self;
    }
  }

  /** One past the highest cluster with a non-zero refcount (scans down from the end). */
  async usedEnd(): Promise<number> {
    for (let ri = this.reftableEntries - 1; ri >= 0; ri--) {
      const off = this.blockOffset(ri);
      if (!off) continue;
      const b = await this.loadBlock(off);
      for (let i = this.perBlock - 1; i >= 0; i--) {
        if (getRefcount(b, i, this.host.refcountOrder) !== 0) return ri * this.perBlock + i + 1;
      }
    }
    return 0;
  }

  /**
   * Read-only check of every refcount table entry: a block at an unaligned offset or past the
   * end of the file cannot be used (throws, naming the entry), so a job can refuse first.
   */
  async checkTable(fileSize: number): Promise<void> {
    for (let ri = 0; ri < this.reftableEntries; ri++) {
      const off = this.blockOffset(ri);
      if (off + this.clusterSize > fileSize) {
        throw new CorruptImageError(`refcount block offset 0x${off.toString(16)} (refcount table entry ${ri}) lies past the end of the file; nothing was changed (run \`strata check -r all\` first)`, this.host.filename);
      }
    }
  }

  private blockOffset(ri: number): number {
    if (ri >= this.reftableEntries) return 0;
    const { blockOffset } = decodeReftableEntry(this.reftable, ri);
    if (blockOffset % this.clusterSize !== 0) {
      throw new CorruptImageError(`refcount block offset 0x${blockOffset.toString(16)} (refcount table entry ${ri}) is not cluster-aligned (run \`strata check -r all\`)`, this.host.filename);
    }
    return blockOffset;
  }

  private async loadBlock(off: number): Promise<Buffer> {
    let b = this.blocks.get(off);
    if (b) return b;
    b = Buffer.alloc(this.clusterSize);
    await this.host.file.read(b, off);
    this.blocks.set(off, b);
    if (this.blocks.size > this.blockCacheLimit) {
      for (const k of this.blocks.keys()) {
        if (this.blocks.size <= this.blockCacheLimit) break;
        if (!this.dirtyBlocks.has(k) && k !== off) this.blocks.delete(k);
      }
    }
    return b;
  }

  async get(cluster: number): Promise<number> {
    const off = this.blockOffset(Math.floor(cluster / this.perBlock));
    if (off === 0) return 0;
    return getRefcount(await this.loadBlock(off), cluster % this.perBlock, this.host.refcountOrder);
  }

  /** Makes sure refcount table index `ri` has a refcount block (growing the table if needed). */
  private async ensureBlock(ri: number): Promise<number> {
    if (ri >= this.reftableEntries) await this.growReftable(ri);
    const off = this.blockOffset(ri);
    return off !== 0 ? off : this.newBlock(ri);
  }

  /** Sets a refcount, creating refcount blocks (and growing the table) as needed. */
  private async set(cluster: number, value: number): Promise<void> {
    const off = await this.ensureBlock(Math.floor(cluster / this.perBlock));
    const b = await this.loadBlock(off);
    setRefcount(b, cluster % this.perBlock, this.host.refcountOrder, value);
    this.dirtyBlocks.add(off);
    if (value === 0) {
      if (cluster < this.freeHint) this.freeHint = cluster;
      // A freed cluster may be reused for anything: stop packing compressed data into it.
      if (this.freeByteOffset && Math.floor(this.freeByteOffset / this.clusterSize) === cluster) this.freeByteOffset = 0;
    }
    if (value > 0 && cluster >= this.allocEnd) this.allocEnd = cluster + 1;
  }

  /** Adds `delta` to every cluster overlapping [offset, offset+length). */
  async change(offset: number, length: number, delta: number): Promise<void> {
    if (length <= 0) return;
    const first = Math.floor(offset / this.clusterSize);
    const last = Math.floor((offset + length - 1) / this.clusterSize);
    for (let c = first; c <= last; c++) {
      const cur = await this.get(c);
      const next = cur + delta;
      if (next < 0) throw new CorruptImageError(`refcount of cluster ${c} (host offset 0x${(c * this.clusterSize).toString(16)}) would drop below zero`, this.host.filename);
      if (next > this.max) throw new RefcountOverflowError(`refcount of cluster ${c} would overflow ${this.max}`, this.host.filename);
      await this.set(c, next);
    }
  }

  /** Finds `n` contiguous free clusters at or after `from` (without claiming them). */
  private async findFree(n: number): Promise<number> {
    let start = this.freeHint;
    let run = 0;
    let seenFree = false;
    const noteFree = (c: number) => {
      // Everything between the hint and the first free cluster is in use: move the hint.
      if (!seenFree) { seenFree = true; this.freeHint = c; }
    };
    for (let c = this.freeHint; ; c++) {
      // Whole ranges without a refcount block are free: skip through them at once.
      const ri = Math.floor(c / this.perBlock);
      if (ri >= this.reftableEntries || this.blockOffset(ri) === 0) {
        noteFree(c);
        if (run === 0) start = c;
        const blockEnd = (ri + 1) * this.perBlock;
        run += blockEnd - c;
        if (run >= n) return start;
        c = blockEnd - 1;
        continue;
      }
      const block = await this.loadBlock(this.blockOffset(ri));
      // Scan within this block synchronously.
      const end = (ri + 1) * this.perBlock;
      for (; c < end; c++) {
        if (getRefcount(block, c % this.perBlock, this.host.refcountOrder) === 0) {
          noteFree(c);
          if (run === 0) start = c;
          if (++run >= n) return start;
        } else {
          run = 0;
        }
      }
      c = end - 1;
    }
  }

  /** True when [start, start+n) is free, after making sure refcount blocks cover it. */
  private async claimable(start: number, n: number): Promise<boolean> {
    const end = start + n;
    for (let ri = Math.floor(start / this.perBlock); ri <= Math.floor((end - 1) / this.perBlock); ri++) await this.ensureBlock(ri);
    return this.eachBlock(start, end, (block, _off, from, stop) => {
      for (let c = from; c < stop; c++) if (getRefcount(block, c % this.perBlock, this.host.refcountOrder) !== 0) return false;
      return true;
    });
  }

  /**
   * Calls `fn` with each refcount block over clusters [start, end) (they must exist) and the
   * clusters it covers, loading each block once: a run may be thousands of clusters, checked
   * or set in a plain loop. Stops, returning false, when `fn` does.
   */
  private async eachBlock(start: number, end: number, fn: (block: Buffer, off: number, from: number, stop: number) => boolean): Promise<boolean> {
    for (let c = start; c < end;) {
      const ri = Math.floor(c / this.perBlock);
      const stop = Math.min(end, (ri + 1) * this.perBlock);
      const off = this.blockOffset(ri);
      if (!fn(await this.loadBlock(off), off, c, stop)) return false;
      c = stop;
    }
    return true;
  }

  /** Allocates `n` contiguous clusters with refcount 1; returns the host offset of the first. */
  async alloc(n = 1): Promise<number> {
    for (;;) {
      const start = await this.findFree(n);
      // Creating refcount blocks for the range may take clusters from it: check again.
      if (!(await this.claimable(start, n))) continue;
      // claimable() made every block covering the range exist.
      const end = start + n;
      await this.eachBlock(start, end, (block, off, from, stop) => {
        for (let c = from; c < stop; c++) setRefcount(block, c % this.perBlock, this.host.refcountOrder, 1);
        this.dirtyBlocks.add(off);
        return true;
      });
      if (end > this.allocEnd) this.allocEnd = end;
      // As QEMU's free_cluster_index: the next search starts after this run, not back at a
      // hole too small for it (only a free moves it back): the same file layout as QEMU's.
      this.freeHint = end;
      return start * this.clusterSize;
    }
  }

  /** QEMU's qcow2_alloc_bytes: packs compressed data, adding one reference to each cluster it touches. */
  async allocBytes(size: number): Promise<number> {
    const cs = this.clusterSize;
    let offset = this.freeByteOffset;
    if (offset && (await this.get(Math.floor(offset / cs))) >= this.max) offset = 0;
    if (offset) {
      const freeIn = cs - (offset % cs);
      if (freeIn >= size) {
        await this.change(offset, size, 1);
      } else {
        // Continue into the clusters right after the current one if they are free.
        const next = Math.ceil(offset / cs);
        const k = Math.ceil((size - freeIn) / cs);
        if (await this.claimable(next, k)) await this.change(offset, size, 1);
        else offset = 0;
      }
    }
    if (!offset) offset = await this.alloc(Math.ceil(size / cs));
    this.freeByteOffset = (offset + size) % cs === 0 ? 0 : offset + size;
    return offset;
  }

  /** A fresh refcount block for table index `ri`, describing itself when it lies in its own range. */
  private async newBlock(ri: number): Promise<number> {
    let at = await this.findFree(1);
    const atRi = Math.floor(at / this.perBlock);
    // A free cluster in another range without a block would need a block of its own first:
    // take the start of our own range instead (all free, since it has no block).
    if (atRi !== ri && (atRi >= this.reftableEntries || this.blockOffset(atRi) === 0)) at = ri * this.perBlock;
    const off = at * this.clusterSize;
    const block = Buffer.alloc(this.clusterSize);
    this.blocks.set(off, block);
    this.dirtyBlocks.add(off);
    encodeReftableEntry(this.reftable, ri, off);
    this.reftableDirty.add(ri);
    if (Math.floor(at / this.perBlock) === ri) {
      setRefcount(block, at % this.perBlock, this.host.refcountOrder, 1);
      if (at >= this.allocEnd) this.allocEnd = at + 1;
    } else {
      await this.set(at, 1);
    }
    if (at === this.freeHint) this.freeHint = at + 1;
    return off;
  }

  /**
   * Grows the refcount table to cover index `ri`: a new table and any refcount blocks it needs
   * for its own clusters go past the end of the image, describing themselves; they are written
   * and flushed, then the header switches to the new table, then the old table is freed. Only
   * once the header points to it is the new table adopted here: if a write fails before, the
   * old table (still the one on disk) stays the one write-backs go to.
   */
  private async growReftable(ri: number): Promise<void> {
    const cs = this.clusterSize;
    const entriesPerCluster = cs / 8;
    const e = this.allocEnd;
    let entries = Math.max(ri + 1, Math.ceil(this.reftableEntries * 1.5));
    let tableClusters = 0;
    let newBlocks: number[] = [];
    for (let iter = 0; iter < 64; iter++) {
      tableClusters = Math.ceil(entries / entriesPerCluster);
      entries = tableClusters * entriesPerCluster;
      let nb = 0;
      for (;;) {
        const lastCluster = e + tableClusters + nb - 1;
        const idx: number[] = [];
        for (let r = Math.floor(e / this.perBlock); r <= Math.floor(lastCluster / this.perBlock); r++) {
          if (r >= this.reftableEntries || this.blockOffset(r) === 0) idx.push(r);
        }
        if (idx.length === nb) { newBlocks = idx; break; }
        nb = idx.length;
      }
      const lastIndex = Math.floor((e + tableClusters + newBlocks.length - 1) / this.perBlock);
      if (lastIndex < entries) break;
      entries = lastIndex + 1;
    }
    const table = Buffer.alloc(tableClusters * cs);
    this.reftable.copy(table);
    const oldOffset = this.reftableOffset;
    const oldClusters = Math.ceil(this.reftable.length / cs);
    const fresh = new Map<number, Buffer>();
    newBlocks.forEach((r, i) => {
      const off = (e + tableClusters + i) * cs;
      encodeReftableEntry(table, r, off);
      fresh.set(r, Buffer.alloc(cs));
    });
    const end = e + tableClusters + newBlocks.length;
    // The new clusters' refcounts: in the fresh blocks, or in blocks the old table already has
    // (those increments are harmless leaks should the switch never happen).
    for (let c = e; c < end; c++) {
      const r = Math.floor(c / this.perBlock);
      const block = fresh.get(r);
      if (block) { setRefcount(block, c % this.perBlock, this.host.refcountOrder, 1); continue; }
      const off = this.blockOffset(r);
      setRefcount(await this.loadBlock(off), c % this.perBlock, this.host.refcountOrder, 1);
      this.dirtyBlocks.add(off);
    }
    const newOffset = e * cs;
    // Blocks first (the dirty ones too: the new table copies entries whose blocks may not be
    // written yet), then the table, all durable before the header points to them.
    await this.writeBlocks();
    await Promise.all([...fresh].map(([r, b]) => this.host.file.write(b, decodeReftableEntry(table, r).blockOffset)));
    await this.host.file.write(table, newOffset);
    await this.host.file.flush();
    await this.host.switchReftable(newOffset, tableClusters);
    this.reftable = table;
    this.reftableOffset = newOffset;
    // Every entry is in the new table as written.
    this.reftableDirty.clear();
    for (const [r, b] of fresh) this.blocks.set(decodeReftableEntry(table, r).blockOffset, b);
    if (end > this.allocEnd) this.allocEnd = end;
    if (this.freeHint >= e && this.freeHint < end) this.freeHint = end;
    // Nothing references the old table now; its clusters are free.
    await this.change(oldOffset, oldClusters * cs, -1);
  }

  /** Writes the dirty refcount blocks; they stay dirty unless their writes succeed. */
  async writeBlocks(): Promise<void> {
    const offs = [...this.dirtyBlocks];
    await Promise.all(offs.map((off) => this.host.file.write(this.blocks.get(off)!, off)));
    // Callers hold the metadata mutex: nothing changed the blocks while they were written.
    for (const off of offs) this.dirtyBlocks.delete(off);
  }

  /** Copies the refcounts of clusters [0, n), as they are in memory, into `out` (for a complete new structure). */
  async countsInto(out: { [i: number]: number; length: number }, n: number): Promise<void> {
    for (let ri = 0; ri * this.perBlock < n; ri++) {
      const off = this.blockOffset(ri);
      if (!off) continue;
      const b = await this.loadBlock(off);
      const end = Math.min(n, (ri + 1) * this.perBlock);
      for (let c = ri * this.perBlock; c < end; c++) out[c] = getRefcount(b, c - ri * this.perBlock, this.host.refcountOrder);
    }
  }

  /** The clusters of the refcount structure itself: the table and every block it lists. */
  structureClusters(): number[] {
    const cs = this.clusterSize;
    const out: number[] = [];
    for (let c = 0; c < Math.ceil(this.reftable.length / cs); c++) out.push(this.reftableOffset / cs + c);
    for (let ri = 0; ri < this.reftableEntries; ri++) {
      const off = this.blockOffset(ri);
      if (off) out.push(off / cs);
    }
    return out;
  }

  get hasDirty(): boolean { return this.dirtyBlocks.size > 0 || this.reftableDirty.size > 0; }

  /**
   * Writes dirty refcount blocks, then (after a flush, so blocks precede pointers) table entries.
   * A new block often lies in another block's range, so its own refcount lives in that block:
   * its entry must not reach the disk before the entry of the block that counts it, or a crash
   * (or a failed write) in between leaves a listed block whose refcount reads as 0. Entries go
   * out in rounds, each round only entries whose block is counted by itself or by a block
   * already listed on disk, with a flush between rounds; any subset of a round may land.
   */
  async writeBack(): Promise<void> {
    if (this.dirtyBlocks.size) await this.writeBlocks();
    if (!this.reftableDirty.size) return;
    await this.host.file.flush();
    let pending = [...this.reftableDirty];
    while (pending.length) {
      const waiting = new Set(pending);
      let round = pending.filter((ri) => {
        const counter = Math.floor(this.blockOffset(ri) / this.clusterSize / this.perBlock);
        return counter === ri || !waiting.has(counter);
      });
      // A cycle cannot be made by the allocator; were there one, no order would help.
      if (!round.length) round = pending;
      if (round.length < pending.length) await this.writeEntries(round).then(() => this.host.file.flush());
      else await this.writeEntries(round);
      const done = new Set(round);
      pending = pending.filter((ri) => !done.has(ri));
    }
  }

  private async writeEntries(idx: number[]): Promise<void> {
    await Promise.all(idx.map((ri) => this.host.file.write(this.reftable.subarray(ri * 8, ri * 8 + 8), this.reftableOffset + ri * 8)));
    for (const ri of idx) this.reftableDirty.delete(ri);
  }
}
