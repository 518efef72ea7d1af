// The qcow2 driver's write side: guest writes with copy-on-write (subcluster-aware for
// extended L2), zero writes, discard, compressed writes, growth, and write-back of metadata
// in crash-safe order.
//
// Ordering (see flush()): data clusters and refcount increments reach the disk before any L2
// entry points to them; new L2 tables before L1 entries point to them; freed clusters lose
// their references on disk before their refcounts drop. A crash at any instant leaves at
// worst leaked clusters.
//
// Failures: the first write, flush or truncate of the image file that fails puts the image in
// a failed state, and from then on nothing more is written to it. Every later write, flush or
// truncate through `file` throws that first error without reaching the file; metadata still in
// memory stays dirty and is never written; close() closes the file and throws the error
// instead of flushing and clearing the dirty bit. The file is left as the ordering above had
// it when the failure came: consistent, at worst with leaked clusters, everything flushed
// before intact. Retrying instead would not be sound: after a failed fdatasync Linux may have
// dropped the pages it could not write and report the next one clean (QEMU's file driver
// treats its page cache as inconsistent from then on, for the same reason), and a metadata
// write that failed half-way leaves no telling what the disk holds. Jobs report the error
// (it names the file and the cause) and stop; closeChain() reports a failure that only
// close() met.
import * as C from '../format/constants';
import { CorruptImageError, UnsupportedFeatureError, UsageError } from '../errors';
import { decodeL1Entry, encodeL1Entry, decodeL2Entry, decodeL2Bitmap, encodeL2Entry, subclusterState, compressedRange, type L2Entry } from '../format/l2';
import { compressClusterAsync } from '../codec/index';
import type { BlockFile, HostExtent } from '../io/block-file';
import type { FileIdentity } from '../io/identity';
import { Qcow2Image, type Qcow2OpenOptions } from './qcow2';
import { AES_SECTOR } from './aes';
import type { DiskImage } from './image';
import { Refcounts } from './refcounts';
import { Mutex, RangeLock } from './mutex';
import { BitmapTracker, inconsistentBitmap } from './bitmaps';
import { BME_FLAG_IN_USE } from '../format/bitmaps';
import { hasRawExternalData } from '../format/header';
import { preallocateGrow } from './preallocate';

export interface WriteStats {
  /** Guest data writes issued to the image file (requests, bytes). */
  dataWrites: number;
  dataWriteBytes: number;
  /** Bytes read for copy-on-write (from this image or its backing chain). */
  cowReadBytes: number;
}

type Bitmap = { alloc: number; zero: number };

const ALL = 0xffffffff;

function bitsFor(fromSc: number, toSc: number): number {
  // Subclusters [fromSc, toSc) as a 32-bit mask.
  let m = 0;
  for (let i = fromSc; i < toSc; i++) m |= 1 << i;
  return m >>> 0;
}

/** Sorted, overlapping or adjacent ranges merged. */
function mergeRanges(ranges: [number, number][]): [number, number][] {
  const out: [number, number][] = [];
  for (const [a, b] of [...ranges].sort((x, y) => x[0] - y[0])) {
    const last = out[out.length - 1];
    if (last && a <= last[1]) last[1] = Math.max(last[1], b);
    else out.push([a, b]);
  }
  return out;
}

interface Segment {
  host: number;
  guest: number;
  length: number;
  /** Every cluster of it is newly allocated. */
  fresh: boolean;
}

/**
 * The image file as the engine writes it: the first write, flush or truncate that fails is
 * kept, and every later one throws it without touching the file (the failed state, above).
 */
class GuardedFile implements BlockFile {
  get failure(): unknown { return this.state.failure; }
  readonly extents?: (offset: number, length: number) => Promise<HostExtent[]>;
  readonly allocatedSize?: () => Promise<number>;
  readonly discard?: (offset: number, length: number) => Promise<void>;
  readonly zeroRange?: (offset: number, length: number) => Promise<boolean>;
  readonly identity?: () => Promise<FileIdentity>;
  readonly debugEvent?: (event: string) => void;

  /**
   * `state` is shared by the image file and its external data file: a failure of either puts
   * the image in the failed state (its data and its metadata are one image).
   */
  constructor(private readonly inner: BlockFile, readonly state: { failure: unknown } = { failure: null }) {
    // Every optional call the file has, the guarded file has: those that change the file are
    // guarded like writes.
    if (inner.extents) this.extents = (o, l) => inner.extents!(o, l);
    if (inner.allocatedSize) this.allocatedSize = () => inner.allocatedSize!();
    if (inner.identity) this.identity = () => inner.identity!();
    if (inner.debugEvent) this.debugEvent = (e) => inner.debugEvent!(e);
    if (inner.discard) this.discard = (o, l) => this.guard(() => inner.discard!(o, l));
    if (inner.zeroRange) this.zeroRange = (o, l) => this.guard(() => inner.zeroRange!(o, l));
  }

  get path(): string { return this.inner.path; }
  get writable(): boolean { return this.inner.writable; }
  size(): Promise<number> { return this.inner.size(); }
  read(buf: Uint8Array, offset: number): Promise<number> { return this.inner.read(buf, offset); }
  write(buf: Uint8Array, offset: number): Promise<void> { return this.guard(() => this.inner.write(buf, offset)); }
  truncate(size: number): Promise<void> { return this.guard(() => this.inner.truncate(size)); }
  flush(): Promise<void> { return this.guard(() => this.inner.flush()); }
  close(): Promise<void> { return this.inner.close(); }

  private guard<T>(op: () => Promise<T>): Promise<T> {
    if (this.failure !== null) return Promise.reject(this.failure);
    let p: Promise<T>;
    try { p = op(); } catch (err) { p = Promise.reject(err); }
    return p.catch((err: unknown) => {
      this.state.failure ??= err;
      throw err;
    });
  }
}

export class Qcow2Writable extends Qcow2Image {
  refcounts!: Refcounts;
  /** @internal Serialises metadata changes (engine modules only). */
  readonly mutex = new Mutex();
  private readonly ranges = new RangeLock();
  /** @internal */
  readonly l1Dirty = new Set<number>();
  /**
   * @internal Reference drops applied after the next metadata write-back. `punch`: the
   * clusters that become free are handed back to the file system (QEMU passes these discards
   * down by default: guest discards and unmapping zero writes, snapshot deletion, shrinking).
   */
  pendingFrees: { offset: number; length: number; punch?: boolean; dataFile?: boolean }[] = [];
  private markedDirty = false;
  private headerAdjusted = false;
  /** @internal Keeps the persistent bitmaps valid once the image changes. */
  bitmapTracker: BitmapTracker | null = null;
  private corrupt = false;
  readonly stats: WriteStats = { dataWrites: 0, dataWriteBytes: 0, cowReadBytes: 0 };

  static async openWritable(filename: string, file: BlockFile, opts: Qcow2OpenOptions & { allowCorrupt?: boolean } = {}): Promise<Qcow2Writable> {
    if (!file.writable) throw new UsageError(`${filename}: opened read-only`);
    const img = await Qcow2Writable.open(filename, new GuardedFile(file), opts);
    const h = img.header;
    if ((h.incompatibleFeatures & C.INCOMPAT_CORRUPT) && !opts.allowCorrupt) {
      throw new CorruptImageError('image is marked corrupt and cannot be written; run `strata check -r all` on it first', filename);
    }
    if ((h.incompatibleFeatures & C.INCOMPAT_DIRTY) && !opts.allowCorrupt) {
      throw new CorruptImageError('image was not closed cleanly (dirty bit set); run `strata check -r all` on it first', filename);
    }
    const cs = img.geometry.clusterSize;
    const reftable = Buffer.alloc(h.refcountTableClusters * cs);
    await img.file.read(reftable, h.refcountTableOffset);
    img.refcounts = new Refcounts({
      // The guarded file: refcount writes put the image in the failed state like any other.
      file: img.file, filename, clusterBits: h.clusterBits, refcountOrder: h.refcountOrder,
      switchReftable: (offset, clusters) => img.switchReftable(offset, clusters),
    }, reftable, h.refcountTableOffset, await img.file.size());
    return img;
  }

  private get cs(): number { return this.geometry.clusterSize; }

  /** The error that put the image in the failed state (see the top of this file), or null. */
  get failure(): unknown { return (this.file as GuardedFile).failure; }

  /** The external data file is guarded with the image file: one failed state for both. */
  override attachDataFile(f: BlockFile): void {
    super.attachDataFile(new GuardedFile(f, (this.file as GuardedFile).state));
  }

  /** Flushes the image file, and the external data file first when there is one. */
  private async flushAll(): Promise<void> {
    if (this.geometry.externalData) await this.dataFile.flush();
    await this.file.flush();
  }

  /** QEMU's bs->backing: the image has a backing file (whether or not it is opened). */
  private get hasBacking(): boolean { return this.backing !== null || this.parsed.backingFile !== null; }

  /** Before the first change: clear autoclear bits we do not maintain, set the dirty bit with lazy refcounts. */
  /** @internal */
  async beforeChange(): Promise<void> {
    // Failed: a change made now could never be written, so none is accepted.
    if (this.failure !== null) throw this.failure;
    if (this.corrupt) throw new CorruptImageError('image has been marked corrupt; no further writes', this.filename);
    const h = this.header;
    if (!this.headerAdjusted) {
      // Persistent bitmaps are kept valid (BitmapTracker); the spec has us clear the autoclear
      // bits of anything else we do not maintain before writing.
      // The raw external data bit is kept too: writes keep the data file a raw image.
      const keep = (this.bitmaps ? C.AUTOCLEAR_BITMAPS : 0n) | (this.geometry.externalData ? C.AUTOCLEAR_DATA_FILE_RAW : 0n);
      if (h.version === 3 && (h.autoclearFeatures & ~keep) !== 0n) {
        h.autoclearFeatures &= keep;
        const b = Buffer.alloc(8);
        b.writeBigUInt64BE(h.autoclearFeatures);
        await this.file.write(b, 88);
        await this.file.flush();
      }
      if (this.bitmaps) {
        const tracker = new BitmapTracker(this, this.bitmaps);
        await tracker.start();
        this.bitmapTracker = tracker;
      }
      this.headerAdjusted = true;
    }
    if (!this.markedDirty && h.version === 3 && (h.compatibleFeatures & C.COMPAT_LAZY_REFCOUNTS)) {
      this.markedDirty = true;
      h.incompatibleFeatures |= C.INCOMPAT_DIRTY;
      await this.writeIncompatible();
      await this.file.flush();
    }
  }

  /** @internal */
  async writeIncompatible(): Promise<void> {
    const b = Buffer.alloc(8);
    b.writeBigUInt64BE(this.header.incompatibleFeatures);
    await this.file.write(b, 72);
  }

  private async switchReftable(offset: number, clusters: number): Promise<void> {
    const b = Buffer.alloc(12);
    b.writeBigUInt64BE(BigInt(offset), 0);
    b.writeUInt32BE(clusters, 8);
    await this.file.write(b, 48);
    await this.file.flush();
    this.header.refcountTableOffset = offset;
    this.header.refcountTableClusters = clusters;
  }

  /** Marks the image corrupt on disk (as QEMU does) and refuses further writes. */
  private async markCorrupt(err: unknown): Promise<never> {
    if (err instanceof CorruptImageError && !this.corrupt && this.header.version === 3) {
      this.corrupt = true;
      this.header.incompatibleFeatures |= C.INCOMPAT_CORRUPT;
      try { await this.writeIncompatible(); await this.file.flush(); } catch { /* keep the first error */ }
    }
    throw err;
  }

  /** @internal */
  noteAlloc(): void {
    const end = this.refcounts.allocEnd * this.cs;
    if (end > this.fileSize) this.fileSize = end;
  }

  /** @internal The file has been cut back to `size` (nothing in use lies past it). */
  noteFileSize(size: number): void {
    this.fileSize = size;
  }

  /** The L2 table for `l1Index`, allocated or copied (if shared) so it may be modified. */
  private async writableL2(l1Index: number): Promise<Buffer> {
    const e = decodeL1Entry(this.l1, l1Index);
    if (e.l2Offset !== 0 && e.copied) return this.l2Table(e.l2Offset);
    const off = await this.refcounts.alloc(1);
    this.noteAlloc();
    const table = Buffer.alloc(this.cs);
    if (e.l2Offset !== 0) {
      // Shared with a snapshot: copy it; the old table loses the active L1's reference.
      (await this.l2Table(e.l2Offset)).copy(table);
      this.pendingFrees.push({ offset: e.l2Offset, length: this.cs });
    }
    this.l2Cache.set(off, table);
    this.l2Cache.markDirty(off, table);
    encodeL1Entry(this.l1, l1Index, off, true);
    this.l1Dirty.add(l1Index);
    return table;
  }

  private entryAt(table: Buffer, l2Index: number): { entry: L2Entry; bitmap: Bitmap | null } {
    const entry = decodeL2Entry(table, l2Index, this.geometry, undefined, this.filename);
    return { entry, bitmap: this.geometry.extendedL2 ? decodeL2Bitmap(table, l2Index) : null };
  }

  private setEntry(table: Buffer, l2Offset: number, l2Index: number, entry: L2Entry, bitmap?: Bitmap): void {
    encodeL2Entry(table, l2Index, entry, this.geometry, bitmap);
    this.l2Cache.markDirty(l2Offset, table);
  }

  /** Offsets of the data file clusters with a discard in pendingFrees. */
  private readonly pendingDataPunch = new Set<number>();

  private cancelDataPunch(host: number): void {
    if (!this.pendingDataPunch.delete(host)) return;
    this.pendingFrees = this.pendingFrees.filter((f) => !(f.dataFile && f.offset === host));
  }

  private freeEntry(entry: L2Entry, punch = false): void {
    if (this.geometry.externalData) {
      // Clusters of an external data file have no refcounts: freeing one only passes the
      // discard down to the data file (QEMU's qcow2_free_any_cluster), once no entry points
      // to it any more.
      if (punch && (entry.kind === 'normal' || (entry.kind === 'zero' && entry.hostOffset))) {
        this.pendingFrees.push({ offset: entry.hostOffset, length: this.cs, punch: true, dataFile: true });
        this.pendingDataPunch.add(entry.hostOffset);
      }
      return;
    }
    switch (entry.kind) {
      case 'normal':
      case 'zero':
        if (entry.hostOffset) this.pendingFrees.push({ offset: entry.hostOffset, length: this.cs, punch });
        return;
      case 'compressed': {
        const r = compressedRange(entry.hostOffset, entry.sectors);
        const start = r.start - (r.start % C.COMPRESSED_SECTOR_SIZE);
        this.pendingFrees.push({ offset: start, length: r.end - start, punch });
        return;
      }
      case 'unallocated': return;
      default: { const never: never = entry; return never; }
    }
  }

  private checkRange(offset: number, length: number): void {
    if (offset < 0 || length < 0 || offset + length > this.virtualSize) {
      throw new UsageError(`${this.filename}: request [${offset}, ${offset + length}) lies outside the image (${this.virtualSize} bytes)`);
    }
  }

  private l1Location(cluster: number): { l1Index: number; l2Index: number } {
    return { l1Index: Math.floor(cluster / this.geometry.l2Entries), l2Index: cluster % this.geometry.l2Entries };
  }

  private l2OffsetOf(l1Index: number): number { return decodeL1Entry(this.l1, l1Index).l2Offset; }

  /** Guest write of `buf` at `offset`. */
  async write(buf: Uint8Array, offset: number): Promise<void> {
    this.checkRange(offset, buf.length);
    if (buf.length === 0) return;
    const cs = this.cs;
    const first = Math.floor(offset / cs);
    const last = Math.floor((offset + buf.length - 1) / cs);
    const release = await this.ranges.lock(first, last + 1);
    try {
      await this.doWrite(Buffer.from(buf.buffer, buf.byteOffset, buf.byteLength), offset, first, last);
    } catch (err) {
      await this.markCorrupt(err);
    } finally {
      this.bitmapTracker?.markDirty(offset, buf.length);
      release();
    }
    await this.maybeFlush();
  }

  private async doWrite(buf: Buffer, offset: number, first: number, last: number): Promise<void> {
    const cs = this.cs;
    const g = this.geometry;
    const end = offset + buf.length;
    type Plan = {
      cluster: number; a: number; b: number; fa: number; fb: number;
      host: number; needsAlloc: boolean; entry: L2Entry; bitmap: Bitmap | null; newBitmap?: Bitmap;
      /** The cluster stays where it is but its entry changes (a preallocated zero cluster). */
      relink?: boolean;
    };
    const plans: Plan[] = [];
    await this.mutex.run(async () => {
      await this.beforeChange();
      // Runs of consecutive new clusters are allocated together, so their data lands
      // contiguously; table by table, each table before its data, as QEMU allocates (the
      // same file layout).
      let allocFrom = 0;
      const allocPending = async () => {
        for (let i = allocFrom; i < plans.length;) {
          if (!plans[i]!.needsAlloc) { i++; continue; }
          let j = i;
          while (j + 1 < plans.length && plans[j + 1]!.needsAlloc) j++;
          if (g.externalData) {
            // An external data file holds each guest cluster at its guest offset, without
            // refcounts (QEMU's do_alloc_cluster_offset). A discard of that place still
            // waiting for the next write-back must not punch the new data: it is dropped.
            for (let k = i; k <= j; k++) {
              plans[k]!.host = plans[k]!.cluster * cs;
              this.cancelDataPunch(plans[k]!.host);
            }
            i = j + 1;
            continue;
          }
          const base = await this.refcounts.alloc(j - i + 1);
          for (let k = i; k <= j; k++) plans[k]!.host = base + (k - i) * cs;
          i = j + 1;
        }
        allocFrom = plans.length;
      };
      // One table serves l2Entries clusters: look it up when the write crosses into the next.
      let tableL1 = -1;
      let table: Buffer | null = null;
      for (let c = first; c <= last; c++) {
        const cStart = c * cs;
        const a = Math.max(offset, cStart);
        const b = Math.min(end, cStart + cs);
        const { l1Index, l2Index } = this.l1Location(c);
        if (l1Index !== tableL1) {
          await allocPending();
          table = await this.writableL2(l1Index);
          tableL1 = l1Index;
        }
        const { entry, bitmap } = this.entryAt(table!, l2Index);
        let fa = a;
        let fb = b;
        let host = 0;
        let needsAlloc = false;
        let relink = false;
        let newBitmap: Bitmap | undefined;
        if (!g.extendedL2) {
          if (entry.kind === 'normal' && entry.copied) {
            host = entry.hostOffset;
          } else if (entry.kind === 'zero' && entry.copied && entry.hostOffset) {
            // A preallocated zero cluster of ours alone is written in place, zeros around the
            // data, as QEMU does (it does not need a new cluster).
            host = entry.hostOffset;
            relink = true;
            fa = cStart;
            fb = cStart + cs;
          } else {
            needsAlloc = true;
            fa = cStart;
            fb = cStart + cs;
          }
        } else {
          const sc = g.subclusterSize;
          if (entry.kind === 'compressed') {
            needsAlloc = true;
            fa = cStart;
            fb = cStart + cs;
            // The whole cluster is written (old content completed around the new data).
            newBitmap = { alloc: ALL, zero: 0 };
          } else if (entry.kind === 'normal' && !entry.copied) {
            // Shared with a snapshot: a new cluster gets the written subclusters and the old
            // allocated ones up to them; zero and unallocated subclusters beyond stay as they
            // are (QEMU's calculate_l2_meta / qcow2_alloc_cluster_link_l2).
            needsAlloc = true;
            const alloc = bitmap!.alloc >>> 0;
            const scA = Math.floor((a - cStart) / sc);
            const scB = Math.ceil((b - cStart) / sc);
            const fromSc = Math.min(scA, alloc ? 31 - Math.clz32(alloc & -alloc) : 32);
            const toSc = Math.max(scB, alloc ? 32 - Math.clz32(alloc) : 0);
            fa = cStart + fromSc * sc;
            fb = cStart + toSc * sc;
            const bits = bitsFor(fromSc, toSc);
            newBitmap = { alloc: (alloc | bits) >>> 0, zero: (bitmap!.zero & ~bits) >>> 0 };
          } else {
            if (entry.kind === 'normal') host = entry.hostOffset;
            else needsAlloc = true;
            const scA = Math.floor((a - cStart) / sc);
            const scB = Math.ceil((b - cStart) / sc);
            // Only partially written subclusters that do not hold data already need completing.
            if ((a - cStart) % sc !== 0 && subclusterState(entry, bitmap, scA) !== 'normal') fa = cStart + scA * sc;
            if ((b - cStart) % sc !== 0 && subclusterState(entry, bitmap, scB - 1) !== 'normal') fb = cStart + scB * sc;
            const touched = bitsFor(scA, scB);
            newBitmap = { alloc: (bitmap!.alloc | touched) >>> 0, zero: (bitmap!.zero & ~touched) >>> 0 };
          }
        }
        if (this.encrypted) {
          // Encryption works on whole sectors: the rest of a partly written sector is kept.
          fa = Math.floor(fa / AES_SECTOR) * AES_SECTOR;
          fb = Math.min(cStart + cs, Math.ceil(fb / AES_SECTOR) * AES_SECTOR);
        }
        plans.push({ cluster: c, a, b, fa, fb, host, needsAlloc, entry, bitmap, newBitmap, relink });
      }
      await allocPending();
      this.noteAlloc();
    });

    // Data: merge host-contiguous pieces, completing head and tail from the old content.
    const segs: Segment[] = [];
    for (const p of plans) {
      const host = p.host + (p.fa - p.cluster * cs);
      const lastSeg = segs[segs.length - 1];
      if (lastSeg && lastSeg.host + lastSeg.length === host && lastSeg.guest + lastSeg.length === p.fa) {
        lastSeg.length += p.fb - p.fa;
        lastSeg.fresh &&= p.needsAlloc;
      } else {
        segs.push({ host, guest: p.fa, length: p.fb - p.fa, fresh: p.needsAlloc });
      }
    }
    // Guest data goes to the external data file when the image has one.
    const target = this.dataFile;
    const cipher = this.encrypted ? this.needCipher() : null;
    await Promise.all(segs.map(async (s) => {
      let data: Buffer;
      if (s.guest >= offset && s.guest + s.length <= end) {
        data = buf.subarray(s.guest - offset, s.guest - offset + s.length);
        // Encrypted in a copy: the caller's buffer stays as it was.
        if (cipher) data = Buffer.from(data);
      } else {
        const headLen = Math.max(0, Math.min(offset, s.guest + s.length) - s.guest);
        const tailStart = Math.max(end, s.guest);
        const from = Math.max(offset, s.guest);
        const to = Math.min(end, s.guest + s.length);
        // QEMU's handle_alloc_space: new clusters whose copy-on-write parts hold nothing in
        // the whole chain are zeroed by the file system (fallocate ZERO_RANGE), and only the
        // guest's data is written (the same blocks on disk as QEMU's).
        // Not when encrypted: zeros on disk would not read as zeros (QEMU skips it there too).
        if (s.fresh && !cipher && target.zeroRange && (await this.unallocatedAbove(s.guest, headLen)) &&
            (await this.unallocatedAbove(tailStart, s.guest + s.length - tailStart)) && (await target.zeroRange(s.host, s.length))) {
          this.stats.dataWrites++;
          this.stats.dataWriteBytes += to - from;
          // QEMU's BLKDBG_WRITE_AIO, before guest data is written (for the blkdebug test driver).
          this.file.debugEvent?.('write_aio');
          await target.write(buf.subarray(from - offset, to - offset), s.host + (from - s.guest));
          return;
        }
        data = Buffer.allocUnsafe(s.length);
        const reads: Promise<void>[] = [];
        if (headLen > 0) reads.push(this.read(data.subarray(0, headLen), s.guest));
        if (tailStart < s.guest + s.length) reads.push(this.read(data.subarray(tailStart - s.guest), tailStart));
        this.stats.cowReadBytes += headLen + Math.max(0, s.guest + s.length - tailStart);
        await Promise.all(reads);
        buf.copy(data, from - s.guest, from - offset, to - offset);
      }
      cipher?.encrypt(data, cipher.physical ? s.host : s.guest);
      this.stats.dataWrites++;
      this.stats.dataWriteBytes += s.length;
      this.file.debugEvent?.('write_aio');
      await target.write(data, s.host);
    }));

    await this.mutex.run(async () => {
      let tableL1 = -1;
      let l2Offset = 0;
      let table: Buffer | null = null;
      for (const p of plans) {
        if (!p.needsAlloc && !p.relink && !g.extendedL2) continue;
        const { l1Index, l2Index } = this.l1Location(p.cluster);
        if (l1Index !== tableL1) {
          l2Offset = this.l2OffsetOf(l1Index);
          table = await this.l2Table(l2Offset);
          tableL1 = l1Index;
        }
        if (p.needsAlloc) this.freeEntry(p.entry);
        this.setEntry(table!, l2Offset, l2Index, { kind: 'normal', hostOffset: p.host, copied: true }, p.newBitmap);
      }
    });
  }

  /**
   * Makes [offset, offset+length) read as zeros, as QEMU's write-zeroes does: whole units
   * ((sub)clusters) get zero flags (v3), or are discarded (v2 without a backing file); a
   * partial unit does too when the rest of it already reads as zero and holds no data, and
   * the partial unit at the end of the image counts as whole; anything else is written as
   * zeros. `unmap` (qemu-io's write -z -u) also frees whole allocated clusters.
   */
  async writeZeroes(offset: number, length: number, opts: { unmap?: boolean } = {}): Promise<void> {
    this.checkRange(offset, length);
    if (length === 0) return;
    try {
      await this.doWriteZeroes(offset, length, opts);
    } finally {
      this.bitmapTracker?.markDirty(offset, length);
    }
    await this.maybeFlush();
  }

  private async doWriteZeroes(offset: number, length: number, opts: { unmap?: boolean }): Promise<void> {
    const g = this.geometry;
    const unit = g.extendedL2 ? g.subclusterSize : g.clusterSize;
    const end = offset + length;
    // v2 has no zero flags: without a backing file a discard reads as zeros; with one, data.
    const flags = this.header.version === 3 || !this.hasBacking;
    const zeroed: [number, number][] = [];
    const explicit: [number, number][] = [];
    const unitEnd = (u: number) => Math.min(u + unit, this.virtualSize);
    const partial = async (a: number, b: number) => {
      const u = Math.floor(a / unit) * unit;
      if (flags && (await this.unitZeroable(u, unitEnd(u), a, b))) zeroed.push([u, unitEnd(u)]);
      else explicit.push([a, b]);
    };
    const A = Math.ceil(offset / unit) * unit;
    const B = end === this.virtualSize ? end : Math.floor(end / unit) * unit;
    if (A > B) {
      await partial(offset, end); // inside one unit
    } else {
      if (A > offset) await partial(offset, A);
      if (B > A) zeroed.push([A, B]);
      if (end > B) await partial(B, end);
    }
    if (!flags) { explicit.push(...zeroed.splice(0)); explicit.sort((x, y) => x[0] - y[0]); }
    for (const [a, b] of mergeRanges(zeroed)) {
      if (this.header.version === 3) await this.zeroUnits(a, b, !!opts.unmap, explicit);
      else await this.discardClusters(a, b, { punch: true });
    }
    for (const [a, b] of explicit) await this.writeZeroData(a, b - a);
  }

  /**
   * QEMU's test for a partial unit: [u, uEnd) holds no data in this layer (unallocated or zero)
   * and its bytes outside [a, b) read as zero by block status (not by reading data).
   */
  private async unitZeroable(u: number, uEnd: number, a: number, b: number): Promise<boolean> {
    for (const r of await this.runs(u, uEnd - u)) if (r.state !== 'unallocated' && r.state !== 'zero') return false;
    return (await this.isZeroFast(u, a - u)) && (await this.isZeroFast(b, uEnd - b));
  }

  /**
   * True when no layer of the chain allocates anything in [offset, offset+length)
   * (bdrv_co_is_allocated_above down to the bottom); past a shorter layer's end nothing is.
   */
  private async unallocatedAbove(offset: number, length: number): Promise<boolean> {
    if (length <= 0) return true;
    if (this.backing === null && this.parsed.backingFile !== null) return false;
    for (const r of await this.runs(offset, length)) if (r.state !== 'unallocated') return false;
    for (let img = this.backing; img; img = img.backing) {
      const end = Math.min(offset + length, img.virtualSize);
      for (let pos = offset; pos < end;) {
        const st = await img.blockStatus(pos, end - pos);
        if (st.allocated) return false;
        pos += st.length;
      }
      if (img.backingFile !== null && img.backing === null) return false;
    }
    return true;
  }

  /**
   * True when block status through the chain says [offset, offset+length) reads as zero
   * (bdrv_co_is_zero_fast). A backing file that is recorded but not opened is not known to.
   */
  private async isZeroFast(offset: number, length: number): Promise<boolean> {
    const end = Math.min(offset + length, this.virtualSize);
    for (let pos = offset; pos < end;) {
      let img: DiskImage = this;
      let n = end - pos;
      for (;;) {
        const st = await img.blockStatus(pos, n);
        n = st.length;
        if (st.allocated) {
          if (!st.zero) return false;
          break;
        }
        if (!img.backing) {
          if (img.backingFile !== null) return false;
          break;
        }
        if (pos >= img.backing.virtualSize) break;
        img = img.backing;
        n = Math.min(n, img.virtualSize - pos);
      }
      pos += n;
    }
    return true;
  }

  /** Zero flags (bits) over unit-aligned [A, B) (B may be the unaligned end of the image). */
  private async zeroUnits(A: number, B: number, unmap: boolean, explicit: [number, number][]): Promise<void> {
    const g = this.geometry;
    // A raw external data file stays a raw image of the disk: zeroed first (QEMU's
    // qcow2_subcluster_zeroize), then the tables.
    if (g.externalData && hasRawExternalData(this.header)) await this.zeroDataFile(A, B - A);
    const unit = g.extendedL2 ? g.subclusterSize : g.clusterSize;
    const first = Math.floor(A / g.clusterSize);
    const last = Math.floor((B - 1) / g.clusterSize);
    const release = await this.ranges.lock(first, last + 1);
    try {
      await this.mutex.run(async () => {
        await this.beforeChange();
        for (let c = first; c <= last; c++) {
          const cStart = c * g.clusterSize;
          const a = Math.max(A, cStart);
          const b = Math.min(B, cStart + g.clusterSize);
          const whole = a === cStart && (b === cStart + g.clusterSize || b === this.virtualSize);
          const { l1Index, l2Index } = this.l1Location(c);
          const table = await this.writableL2(l1Index);
          const l2Offset = this.l2OffsetOf(l1Index);
          const { entry, bitmap } = this.entryAt(table, l2Index);
          const allocated = entry.kind === 'normal' || entry.kind === 'compressed' || (entry.kind === 'zero' && entry.hostOffset !== 0);
          // Compressed clusters are always dropped; others only when unmapping.
          const drop = whole && (entry.kind === 'compressed' || (unmap && allocated));
          if (!g.extendedL2) {
            if (drop || entry.kind === 'unallocated') {
              this.freeEntry(entry, true);
              this.setEntry(table, l2Offset, l2Index, { kind: 'zero', hostOffset: 0, copied: false });
            } else if (entry.kind === 'normal' || entry.kind === 'zero') {
              this.setEntry(table, l2Offset, l2Index, { kind: 'zero', hostOffset: entry.hostOffset, copied: entry.copied });
            }
            continue;
          }
          if (drop) {
            this.freeEntry(entry, true);
            this.setEntry(table, l2Offset, l2Index, { kind: 'unallocated' }, { alloc: 0, zero: ALL });
            continue;
          }
          if (entry.kind === 'compressed') { explicit.push([a, b]); continue; }
          const bits = bitsFor((a - cStart) / unit, Math.ceil((b - cStart) / unit));
          this.setEntry(table, l2Offset, l2Index, entry, { alloc: (bitmap!.alloc & ~bits) >>> 0, zero: (bitmap!.zero | bits) >>> 0 });
        }
      });
    } catch (err) {
      await this.markCorrupt(err);
    } finally {
      release();
    }
  }

  /** Zeros in [offset, offset+length) of the external data file (by the file system where it can). */
  private async zeroDataFile(offset: number, length: number): Promise<void> {
    const data = this.dataFile;
    if (data.zeroRange && (await data.zeroRange(offset, length))) return;
    const zero = Buffer.alloc(Math.min(length, 4 << 20));
    for (let p = 0; p < length; p += zero.length) await data.write(zero.subarray(0, Math.min(zero.length, length - p)), offset + p);
  }

  private async writeZeroData(offset: number, length: number): Promise<void> {
    const zero = Buffer.alloc(Math.min(length, 4 << 20));
    for (let p = 0; p < length; p += zero.length) await this.write(zero.subarray(0, Math.min(zero.length, length - p)), offset + p);
  }

  /**
   * Discards whole clusters (partial ones are left alone, as QEMU does, except a partial last
   * cluster at the end of the image): they read as zero afterwards (v3), or from the backing
   * file (with `full`), and their host clusters are freed and handed back to the file system.
   * A compat=0.10 image with a backing file cannot discard (it would expose the backing file's
   * data): nothing happens, as QEMU's discard reports "not supported" and the block layer
   * drops it.
   */
  async discard(offset: number, length: number, opts: { full?: boolean } = {}): Promise<void> {
    this.checkRange(offset, length);
    // Even a discard that changes nothing is recorded in the bitmaps, so they must be loaded.
    if (this.bitmaps && !this.bitmapTracker) await this.mutex.run(() => this.beforeChange());
    try {
      await this.doDiscard(offset, length, opts);
    } finally {
      // QEMU's block layer marks the range even when the driver ignores (part of) it.
      this.bitmapTracker?.markDirty(offset, length);
    }
    await this.maybeFlush();
  }

  private async doDiscard(offset: number, length: number, opts: { full?: boolean }): Promise<void> {
    if (!opts.full && this.header.version < 3 && this.hasBacking) return;
    const cs = this.cs;
    const end = offset + length;
    const first = Math.ceil(offset / cs);
    let last = Math.floor(end / cs) - 1;
    if (end === this.virtualSize && end % cs !== 0 && Math.floor(end / cs) * cs >= offset) last = Math.floor(end / cs);
    if (last < first) return;
    await this.discardClusters(first * cs, Math.min((last + 1) * cs, this.virtualSize), { full: opts.full, punch: true });
  }

  /** qcow2_cluster_discard over the clusters of cluster-aligned [a, b). */
  private async discardClusters(a: number, b: number, opts: { full?: boolean; punch: boolean }): Promise<void> {
    const cs = this.cs;
    const first = Math.floor(a / cs);
    const last = Math.floor((b - 1) / cs);
    const release = await this.ranges.lock(first, last + 1);
    try {
      await this.mutex.run(async () => {
        await this.beforeChange();
        for (let c = first; c <= last; c++) {
          const { l1Index, l2Index } = this.l1Location(c);
          // A full discard (shrink, emptying) needs no table where there is none. A guest
          // discard takes one anyway, as QEMU's (get_cluster_table): the same file layout.
          if (this.l2OffsetOf(l1Index) === 0 && opts.full) continue;
          const table = await this.writableL2(l1Index);
          const l2Offset = this.l2OffsetOf(l1Index);
          const { entry } = this.entryAt(table, l2Index);
          const allocated = entry.kind === 'normal' || entry.kind === 'compressed' || (entry.kind === 'zero' && entry.hostOffset !== 0);
          if (opts.full) {
            // Full discard (emptying an overlay, shrinking): the cluster falls through to the backing file.
            this.setEntry(table, l2Offset, l2Index, { kind: 'unallocated' }, { alloc: 0, zero: 0 });
          } else if (this.hasBacking || allocated) {
            if (this.geometry.extendedL2) this.setEntry(table, l2Offset, l2Index, { kind: 'unallocated' }, { alloc: 0, zero: ALL });
            else if (this.header.version >= 3) this.setEntry(table, l2Offset, l2Index, { kind: 'zero', hostOffset: 0, copied: false });
            else this.setEntry(table, l2Offset, l2Index, { kind: 'unallocated' });
          }
          // Otherwise it holds nothing and reads as zero already: left as it is (as QEMU).
          this.freeEntry(entry, opts.punch);
        }
      });
    } catch (err) {
      await this.markCorrupt(err);
    } finally {
      release();
    }
  }

  /**
   * Writes whole clusters compressed (the last cluster of the image may be partial). A cluster
   * that does not shrink is written normally, as QEMU does.
   */
  async writeCompressed(buf: Uint8Array, offset: number): Promise<void> {
    const cs = this.cs;
    this.checkRange(offset, buf.length);
    if (offset % cs !== 0 || (buf.length % cs !== 0 && offset + buf.length !== this.virtualSize)) {
      throw new UsageError(`${this.filename}: compressed writes must cover whole clusters (${cs} bytes)`);
    }
    const data = Buffer.from(buf.buffer, buf.byteOffset, buf.byteLength);
    for (let p = 0; p < data.length; p += cs) {
      const chunk = data.subarray(p, Math.min(data.length, p + cs));
      const full = chunk.length === cs ? chunk : Buffer.concat([chunk, Buffer.alloc(cs - chunk.length)]);
      const packed = await compressClusterAsync(this.compressionType, full);
      if (!packed) { await this.write(chunk, offset + p); continue; }
      await this.writeCompressedCluster(packed, offset + p);
    }
  }

  /** Stores already-compressed data for the cluster at guest `offset`. */
  async writeCompressedCluster(packed: Uint8Array, offset: number): Promise<void> {
    if (this.encrypted) {
      // QEMU does not encrypt compressed clusters and refuses to write them to an encrypted image.
      throw new UnsupportedFeatureError('compressed clusters cannot be written to an encrypted image (write without -c)', this.filename)
        .asQemu('Compression and encryption not supported at the same time');
    }
    if (this.geometry.externalData) {
      // QEMU: compressed clusters cannot live in an external data file (-ENOTSUP).
      throw new UnsupportedFeatureError('compressed clusters cannot be written to an image with an external data file (write without -c)', this.filename)
        .asQemu(`error while writing at byte ${offset}: Operation not supported`);
    }
    const c = Math.floor(offset / this.cs);
    const release = await this.ranges.lock(c, c + 1);
    try {
      await this.mutex.run(async () => {
        await this.beforeChange();
        const { l1Index, l2Index } = this.l1Location(c);
        const table = await this.writableL2(l1Index);
        const l2Offset = this.l2OffsetOf(l1Index);
        const { entry } = this.entryAt(table, l2Index);
        const host = await this.refcounts.allocBytes(packed.length);
        this.noteAlloc();
        await this.file.write(packed, host);
        this.stats.dataWrites++;
        this.stats.dataWriteBytes += packed.length;
        const sectors = Math.floor((host + packed.length - 1) / 512) - Math.floor(host / 512) + 1;
        this.freeEntry(entry);
        this.setEntry(table, l2Offset, l2Index, { kind: 'compressed', hostOffset: host, sectors }, { alloc: 0, zero: 0 });
      });
    } catch (err) {
      await this.markCorrupt(err);
    } finally {
      this.bitmapTracker?.markDirty(c * this.cs, this.cs);
      release();
    }
    await this.maybeFlush();
  }

  /**
   * Grows the virtual size, growing the L1 table when it no longer covers it. What was past
   * the old end is not touched (applying a snapshot uses this); `resize` uses growZeroed.
   */
  async grow(newSize: number): Promise<void> {
    if (newSize < this.virtualSize) throw new UsageError(`${this.filename}: grow to ${newSize} is smaller than the current size ${this.virtualSize}`);
    await this.flush();
    await this.mutex.run(async () => {
      await this.beforeChange();
      await this.growL1For(newSize);
      await this.setVirtualSize(newSize);
    });
  }

  /**
   * Grows the virtual size as qemu-img resize does, and the new area reads as zeros. Where
   * a longer backing file would show through, [old end, new end) gets zero flags (QEMU's
   * truncate with BDRV_REQ_ZERO_WRITE, iotest 271); a compat=0.10 image cannot have them and
   * is refused, unchanged. Otherwise only a partial (sub)cluster at the old end can hold old
   * bytes (a shrink keeps it): it is zeroed (iotest 292; QEMU 7.2 skips this when there is
   * no backing file). The header gets the new size last.
   */
  async growZeroed(newSize: number): Promise<void> {
    const old = this.virtualSize;
    if (newSize < old) throw new UsageError(`${this.filename}: grow to ${newSize} is smaller than the current size ${old}`);
    if (newSize === old) return;
    const g = this.geometry;
    if (this.backing === null && this.parsed.backingFile !== null) {
      throw new UsageError(`${this.filename}: internal error: growing needs the backing chain open`);
    }
    const backingShows = this.backing !== null && this.backing.virtualSize > old;
    if (backingShows && this.header.version < 3) {
      throw new UnsupportedFeatureError('Failed to zero out new clusters: Operation not supported (a compat=0.10 image has no zero clusters to hide its longer backing file with; upgrade it to compat=1.1 first)', this.filename);
    }
    this.checkBitmapsResizable();
    await this.flush();
    await this.mutex.run(async () => {
      await this.beforeChange();
      await this.bitmapTracker?.beforeResize();
      await this.growL1For(newSize);
    });
    this.virtualSize = newSize;
    this.bitmapTracker?.resized(newSize);
    try {
      if (backingShows) {
        // In steps, so the L2 tables a huge grow creates are written out as it goes.
        const step = g.l2Entries * g.clusterSize * 256;
        for (let p = old; p < newSize; p = Math.min(newSize, (Math.floor(p / step) + 1) * step)) {
          await this.writeZeroes(p, Math.min(newSize, (Math.floor(p / step) + 1) * step) - p);
        }
      } else {
        const tailEnd = Math.min(newSize, Math.ceil(old / g.clusterSize) * g.clusterSize);
        if (tailEnd > old && (await this.runs(old, tailEnd - old)).some((r) => r.state !== 'unallocated' && r.state !== 'zero')) {
          await this.writeZeroes(old, tailEnd - old);
        }
      }
      await this.flush();
    } catch (err) {
      this.virtualSize = old;
      this.bitmapTracker?.resized(old);
      throw err;
    }
    await this.setVirtualSize(newSize);
    if (this.geometry.externalData) {
      // QEMU's qcow2_co_truncate: the data file follows the image; a raw data file must stay
      // a complete raw image, so its new clusters are preallocated (metadata) in the tables.
      if (hasRawExternalData(this.header)) await preallocateGrow(this, old, newSize, 'metadata');
      else await this.resizeDataFile(newSize);
    }
  }

  /** The external data file truncated (or extended) to `size`, durably. */
  private async resizeDataFile(size: number): Promise<void> {
    const data = this.dataFile;
    if ((await data.size()) === size) return;
    await data.truncate(size);
    await data.flush();
  }

  /** Grows the L1 table (durably) so it covers `newSize`. Under the metadata mutex. */
  private async growL1For(newSize: number): Promise<void> {
    const g = this.geometry;
    const need = Math.ceil(newSize / (g.l2Entries * g.clusterSize));
    if (need > C.MAX_L1_SIZE_BYTES / 8) throw new UsageError(`${this.filename}: ${newSize} bytes is too large for cluster size ${g.clusterSize}`);
    if (need <= this.l1.length / 8) return;
    const entries = need;
    const clusters = Math.ceil((entries * 8) / g.clusterSize);
    const off = await this.refcounts.alloc(clusters);
    this.noteAlloc();
    const l1 = Buffer.alloc(entries * 8);
    this.l1.copy(l1);
    await this.refcounts.writeBack();
    await this.file.write(l1, off);
    await this.file.flush();
    const b = Buffer.alloc(12);
    b.writeUInt32BE(entries, 0);
    b.writeBigUInt64BE(BigInt(off), 4);
    await this.file.write(b, 36);
    await this.file.flush();
    const oldOff = this.header.l1TableOffset;
    const oldLen = this.l1.length;
    this.header.l1TableOffset = off;
    this.header.l1Size = entries;
    this.l1 = l1;
    if (oldLen > 0) await this.refcounts.change(oldOff, Math.ceil(oldLen / g.clusterSize) * g.clusterSize, -1);
    await this.refcounts.writeBack();
  }

  /** @internal The L2 table covering `guestOffset` allocated (QEMU's get_cluster_table, before a data allocation). */
  async prepareL2(guestOffset: number): Promise<void> {
    const g = this.geometry;
    await this.mutex.run(async () => {
      await this.beforeChange();
      await this.writableL2(Math.floor(guestOffset / (g.l2Entries * g.clusterSize)));
    });
  }

  /**
   * @internal Preallocation (QEMU's qcow2_alloc_cluster_link_l2 with prealloc): guest clusters
   * [guestOffset, +n clusters) now point at host clusters [hostOffset, ...), whose refcounts
   * the caller has raised and flushed. A cluster that was allocated before keeps its data up
   * to `keepUntil` (copied over, as QEMU's copy-on-write does) and loses its reference.
   * `allocSubclusters`: extended L2 entries get every subcluster allocated.
   */
  async linkClusters(guestOffset: number, hostOffset: number, n: number, keepUntil = 0, allocSubclusters = false): Promise<void> {
    const g = this.geometry;
    await this.mutex.run(async () => {
      await this.beforeChange();
      for (let i = 0; i < n; i++) {
        const guest = guestOffset + i * g.clusterSize;
        const host = hostOffset + i * g.clusterSize;
        const l1Index = Math.floor(guest / (g.l2Entries * g.clusterSize));
        const l2Index = Math.floor(guest / g.clusterSize) % g.l2Entries;
        const table = await this.writableL2(l1Index);
        const l2Offset = decodeL1Entry(this.l1, l1Index).l2Offset;
        const { entry, bitmap } = this.entryAt(table, l2Index);
        // The head before the old end: the cluster's own data, or the backing file's (QEMU's
        // copy-on-write start); an unallocated cluster without a backing file reads zeros.
        if ((entry.kind !== 'unallocated' || this.hasBacking) && keepUntil > guest) {
          // Encrypted: whole sectors, encrypted for their guest offset.
          const len = this.encrypted ? Math.min(g.clusterSize, Math.ceil((keepUntil - guest) / AES_SECTOR) * AES_SECTOR) : keepUntil - guest;
          const head = Buffer.alloc(len);
          await this.read(head, guest);
          if (this.encrypted) this.needCipher().encrypt(head, this.cryptOffset(guest, host));
          await this.dataFile.write(head, host);
        }
        if ((entry.kind === 'normal' || (entry.kind === 'zero' && entry.hostOffset)) && !g.externalData) this.pendingFrees.push({ offset: entry.hostOffset, length: g.clusterSize });
        // Extended L2: the subclusters keep their bitmap (QEMU's prealloc leaves it as it was:
        // the head copied above stays allocated, the new ones stay unallocated), unless a
        // backing file would show through them: then all are allocated, over the zeroed file area.
        this.setEntry(table, l2Offset, l2Index, { kind: 'normal', hostOffset: host, copied: true }, g.extendedL2 ? (allocSubclusters ? { alloc: 0xffffffff, zero: 0 } : bitmap ?? { alloc: 0, zero: 0 }) : undefined);
      }
    });
    await this.flush();
  }

  /** @internal Writes the header's size field durably and adopts it. */
  async setVirtualSize(size: number): Promise<void> {
    const b = Buffer.alloc(8);
    b.writeBigUInt64BE(BigInt(size));
    await this.file.write(b, 24);
    await this.file.flush();
    this.header.size = size;
    this.virtualSize = size;
  }

  /**
   * Shrinks the virtual size, dropping everything past it (as qemu-img resize --shrink): whole
   * clusters past the end are discarded, L2 tables past the end freed, the file truncated
   * after the last cluster still in use.
   */
  async shrink(newSize: number): Promise<void> {
    if (newSize > this.virtualSize) throw new UsageError(`${this.filename}: shrink to ${newSize} is larger than the current size ${this.virtualSize}`);
    const g = this.geometry;
    const from = Math.ceil(newSize / g.clusterSize) * g.clusterSize;
    // Everything that could fail halfway is checked first, so a refusal changes nothing.
    await this.flush();
    await this.mutex.run(() => this.shrinkPreflight(newSize));
    await this.mutex.run(async () => {
      await this.beforeChange();
      await this.bitmapTracker?.beforeResize();
    });
    if (from < this.virtualSize) await this.discard(from, this.virtualSize - from, { full: true });
    await this.mutex.run(async () => {
      await this.beforeChange();
      const keepL1 = Math.ceil(newSize / (g.l2Entries * g.clusterSize));
      for (let i = keepL1; i < this.l1.length / 8; i++) {
        const e = decodeL1Entry(this.l1, i);
        if (!e.l2Offset) continue;
        this.pendingFrees.push({ offset: e.l2Offset, length: g.clusterSize, punch: true });
        encodeL1Entry(this.l1, i, 0, false);
        this.l1Dirty.add(i);
      }
    });
    await this.flush();
    await this.setVirtualSize(newSize);
    this.bitmapTracker?.resized(newSize);
    await this.mutex.run(async () => {
      await this.refcounts.dropIdleBlocks();
      await this.refcounts.writeBack();
      await this.file.flush();
      const end = (await this.refcounts.usedEnd()) * g.clusterSize;
      if (end < (await this.file.size())) {
        await this.file.truncate(end);
        await this.file.flush();
      }
    });
    // Nothing points past the new end any more: the data file is cut there too (QEMU).
    if (g.externalData) await this.resizeDataFile(newSize);
  }

  /** QEMU refuses to resize an image with a bitmap left in use (inconsistent). */
  private checkBitmapsResizable(): void {
    if (this.bitmapTracker) { this.bitmapTracker.checkResizable(); return; }
    const bad = this.bitmaps?.find((e) => (e.flags & BME_FLAG_IN_USE) !== 0);
    if (bad) throw inconsistentBitmap(bad, this.filename);
  }

  /**
   * What shrinking to `newSize` will read and drop, checked without changing anything: the
   * refcount table's blocks, the L2 tables past the new end and their entries, and a
   * reference to drop for every cluster the shrink frees. Under the metadata mutex.
   */
  private async shrinkPreflight(newSize: number): Promise<void> {
    const g = this.geometry;
    const cs = g.clusterSize;
    this.checkBitmapsResizable();
    await this.refcounts.checkTable(await this.file.size());
    const drops = new Map<number, number>();
    const drop = (offset: number, length: number) => {
      for (let c = Math.floor(offset / cs); c * cs < offset + length; c++) drops.set(c, (drops.get(c) ?? 0) + 1);
    };
    const from = Math.ceil(newSize / cs);
    const end = Math.ceil(this.virtualSize / cs);
    const keepL1 = Math.ceil(newSize / (g.l2Entries * cs));
    for (let i = Math.floor(from / g.l2Entries); i < this.l1.length / 8; i++) {
      const l2Offset = decodeL1Entry(this.l1, i).l2Offset;
      if (!l2Offset) continue;
      if (i >= keepL1) drop(l2Offset, cs);
      const table = await this.l2Table(l2Offset);
      const first = Math.max(from, i * g.l2Entries);
      const last = Math.min(end, (i + 1) * g.l2Entries);
      for (let c = first; c < last; c++) {
        const e = decodeL2Entry(table, c % g.l2Entries, g, () => `of the L2 table at 0x${l2Offset.toString(16)}`, this.filename);
        if (e.kind === 'compressed') {
          const r = compressedRange(e.hostOffset, e.sectors);
          drop(r.start, r.end - r.start);
        } else if ((e.kind === 'normal' || e.kind === 'zero') && e.hostOffset && !g.externalData) {
          // (Clusters of an external data file have no refcounts to drop.)
          drop(e.hostOffset, cs);
        }
      }
    }
    for (const [c, n] of drops) {
      const have = await this.refcounts.get(c);
      if (have < n) {
        throw new CorruptImageError(`refcount of cluster ${c} (host offset 0x${(c * cs).toString(16)}) is ${have}, but it is referenced ${n} time(s) past the new end; nothing was changed (run \`strata check -r all\` first)`, this.filename);
      }
    }
  }

  /** Host ranges freed with `punch`, merged, to hand back to the file system (punchFreed). */
  private toPunch: [number, number][] = [];
  /** The same for clusters of the external data file. */
  private toPunchData: [number, number][] = [];

  /**
   * @internal Drops one reference from each cluster of a pending free; with `punch`, clusters
   * left with none are queued for punchFreed, which the caller runs before the metadata mutex
   * (which it holds) lets anyone allocate them again.
   */
  async releaseRef(f: { offset: number; length: number; punch?: boolean; dataFile?: boolean }): Promise<void> {
    if (f.dataFile) {
      this.pendingDataPunch.delete(f.offset);
      if (!this.dataFile.discard) return;
      const last = this.toPunchData[this.toPunchData.length - 1];
      if (last && last[1] === f.offset) last[1] += f.length;
      else this.toPunchData.push([f.offset, f.offset + f.length]);
      return;
    }
    await this.refcounts.change(f.offset, f.length, -1);
    if (!f.punch || !this.file.discard) return;
    const cs = this.cs;
    for (let c = Math.floor(f.offset / cs); c * cs < f.offset + f.length; c++) {
      if ((await this.refcounts.get(c)) !== 0) continue;
      const last = this.toPunch[this.toPunch.length - 1];
      if (last && last[1] === c * cs) last[1] += cs;
      else this.toPunch.push([c * cs, (c + 1) * cs]);
    }
  }

  /**
   * @internal Punches the queued ranges, adjacent ones merged (as QEMU merges its queued
   * discards): small clusters freed one by one still free whole file system blocks.
   */
  async punchFreed(): Promise<void> {
    const ranges = mergeRanges(this.toPunch);
    this.toPunch = [];
    for (const [a, b] of ranges) await this.file.discard!(a, b - a);
    const data = mergeRanges(this.toPunchData);
    this.toPunchData = [];
    for (const [a, b] of data) await this.dataFile.discard!(a, b - a);
  }

  private async maybeFlush(): Promise<void> {
    if (this.l2Cache.dirty.size > 256 || this.pendingFrees.length > 4096) await this.flush();
  }

  /** Writes back all metadata in crash-safe order and makes everything durable. */
  async flush(): Promise<void> {
    await this.mutex.run(async () => {
      const metadata = this.refcounts.hasDirty || this.l2Cache.dirty.size > 0 || this.l1Dirty.size > 0 || this.pendingFrees.length > 0;
      if (!metadata) { await this.flushAll(); return; }
      // 1. Data (in the external data file too) and refcount increments.
      await this.refcounts.writeBack();
      await this.flushAll();
      // 2. L2 tables, then (after a flush) the L1 entries that point to new ones.
      const l2 = [...this.l2Cache.dirty.entries()];
      await Promise.all(l2.map(([off, t]) => this.file.write(t, off)));
      // Unpin only once written, so an eviction never exposes a stale table.
      for (const [off, t] of l2) if (this.l2Cache.dirty.get(off) === t) this.l2Cache.dirty.delete(off);
      if (this.l1Dirty.size) {
        await this.file.flush();
        const idx = [...this.l1Dirty];
        await Promise.all(idx.map((i) => this.file.write(this.l1.subarray(i * 8, i * 8 + 8), this.header.l1TableOffset + i * 8)));
        for (const i of idx) this.l1Dirty.delete(i);
      }
      await this.file.flush();
      // 3. Only now that nothing on disk references them, drop freed clusters' refcounts.
      if (this.pendingFrees.length) {
        const frees = this.pendingFrees;
        this.pendingFrees = [];
        for (const f of frees) await this.releaseRef(f);
        await this.punchFreed();
        await this.refcounts.writeBack();
        await this.file.flush();
      }
    });
  }

  /**
   * Writes back what is dirty, clears the dirty bit and closes the file. In the failed state
   * (or when that write-back fails) it only closes the file, and throws the failure: the image
   * on disk lacks what was not written. Closing again returns the first close's outcome (a
   * chain and a job may both close an image; the second must not write through a descriptor
   * that is closed, or reused by another file by then).
   */
  override close(): Promise<void> {
    this.closing ??= this.closeOnce();
    return this.closing;
  }

  private closing: Promise<void> | null = null;

  private async closeOnce(): Promise<void> {
    try {
      if (!this.corrupt && this.failure === null) {
        await this.flush();
        await this.bitmapTracker?.store();
        if (this.markedDirty) {
          this.header.incompatibleFeatures &= ~C.INCOMPAT_DIRTY;
          await this.writeIncompatible();
          await this.file.flush();
        }
      }
    } finally {
      await super.close();
    }
    if (this.failure !== null) throw this.failure;
  }
}
