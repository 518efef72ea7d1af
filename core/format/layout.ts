// The layout of a new qcow2 image, computed the way qemu-img create 7.2 computes it.
//
// QEMU does not lay a new image out from a formula: it writes a header, a one-cluster
// refcount table and one refcount block, opens that minimal image and lets its normal
// allocator place everything else (the L1 table, more refcount blocks, a bigger refcount
// table, and with preallocation=metadata every L2 table and data cluster). To land on the
// same bytes we replay that allocator: `QemuAllocator` is a transcription of the parts of
// block/qcow2-refcount.c and block/qcow2-cluster.c that creation goes through
// (alloc_clusters_noref, update_refcount, alloc_refcount_block, qcow2_refcount_area,
// qcow2_alloc_clusters[_at], qcow2_grow_l1_table, get_cluster_table/l2_allocate,
// qcow2_alloc_host_offset, preallocate_co), working on an in-memory sparse file.
//
// Pure: no I/O. The caller writes `clusters` (and the L2 tables handed out during
// preallocation) to disk and sets the file length to `fileLength`.
import * as C from './constants';
import { getRefcount, setRefcount } from './refcount';
import { encodeHeader, type HeaderExtension } from './header';
import { FormatError } from '../errors';

export interface Qcow2CreateSpec {
  /** Virtual size in bytes, a multiple of 512. */
  size: number;
  clusterBits: number;
  version: 2 | 3;
  refcountOrder: number;
  extendedL2: boolean;
  /** 0 = zlib (deflate), 1 = zstd */
  compressionType: number;
  lazyRefcounts: boolean;
  /** Written as given (a relative name stays relative). */
  backingFile: string | null;
  backingFormat: string | null;
  preallocation: 'off' | 'metadata';
  /**
   * The external data file's name as recorded (header extension 0x44415441, incompatible bit
   * 2): guest data lives there, each cluster at its guest offset; null: none.
   */
  dataFile?: string | null;
  /** The data file is a raw image of the disk (autoclear bit 1). */
  dataFileRaw?: boolean;
  /** crypt_method 1: the guest data is AES-encrypted (no header extension: the key is the secret). */
  encrypted?: boolean;
  /**
   * crypt_method 2: LUKS. `area` is the LUKS header and key material, placed in clusters
   * allocated once the image is laid out (QEMU's qcow2_set_up_encryption).
   */
  luks?: { area: Buffer };
}

/** QEMU's feature name table, exactly as qcow2_update_header writes it (v3, clusters > 4 KiB). */
export const QEMU_FEATURE_NAMES: ReadonlyArray<{ type: number; bit: number; name: string }> = [
  { type: C.FEATURE_TYPE_INCOMPATIBLE, bit: 0, name: 'dirty bit' },
  { type: C.FEATURE_TYPE_INCOMPATIBLE, bit: 1, name: 'corrupt bit' },
  { type: C.FEATURE_TYPE_INCOMPATIBLE, bit: 2, name: 'external data file' },
  { type: C.FEATURE_TYPE_INCOMPATIBLE, bit: 3, name: 'compression type' },
  { type: C.FEATURE_TYPE_INCOMPATIBLE, bit: 4, name: 'extended L2 entries' },
  { type: C.FEATURE_TYPE_COMPATIBLE, bit: 0, name: 'lazy refcounts' },
  { type: C.FEATURE_TYPE_AUTOCLEAR, bit: 0, name: 'bitmaps' },
  { type: C.FEATURE_TYPE_AUTOCLEAR, bit: 1, name: 'raw external data' },
];

/** QEMU omits the feature table for clusters this small (it would crowd out the backing name). */
const FEATURE_TABLE_MIN_CLUSTER = 4096;

/**
 * The feature name table QEMU writes into a v3 header (create and amend alike), or null where
 * it writes none (v2, and clusters of 4 KiB or less, where the header has no room to spare).
 */
export function featureTableExtension(version: number, clusterSize: number): HeaderExtension | null {
  if (version !== 3 || clusterSize <= FEATURE_TABLE_MIN_CLUSTER) return null;
  const table = Buffer.alloc(QEMU_FEATURE_NAMES.length * C.FEATURE_NAME_ENTRY_SIZE);
  QEMU_FEATURE_NAMES.forEach((f, i) => {
    const o = i * C.FEATURE_NAME_ENTRY_SIZE;
    table[o] = f.type;
    table[o + 1] = f.bit;
    table.write(f.name, o + 2, 'utf8');
  });
  return { type: C.EXT_FEATURE_TABLE, data: table };
}
/** sizeof(QCowHeader) in QEMU: the v3 header with the compression type byte, padded. */
const QEMU_HEADER_SIZE = C.HEADER_V3_WITH_COMPRESSION_LENGTH;
/** QCOW_MAX_REFTABLE_SIZE in entries... QEMU compares entry counts against the byte limit. */
const QCOW_MAX_REFTABLE_SIZE = C.MAX_REFTABLE_SIZE_BYTES;
const INT_MAX = 0x7fffffff;
/** BDRV_REQUEST_MAX_BYTES: INT_MAX rounded down to 512-byte sectors. */
const BDRV_REQUEST_MAX_BYTES = Math.floor(INT_MAX / 512) * 512;
const EAGAIN = -11;
const INV_OFFSET = -1;

export class SizeTooLargeError extends FormatError {}

/** Bytes in one L2 entry. */
export function l2EntrySize(extendedL2: boolean): number {
  return extendedL2 ? C.L2E_SIZE_EXTENDED : C.L2E_SIZE_NORMAL;
}

/** size_to_l1 */
export function l1EntriesFor(size: number, clusterBits: number, extendedL2: boolean): number {
  const l2Bits = clusterBits - (extendedL2 ? 4 : 3);
  return Math.ceil(size / 2 ** (clusterBits + l2Bits));
}

/**
 * qcow2_update_header: the header cluster from the image state. Throws when the
 * extensions and backing name do not fit the cluster (QEMU: ENOSPC).
 */
export function encodeCreateHeader(spec: Qcow2CreateSpec, st: {
  l1Size: number; l1TableOffset: number; refcountTableOffset: number; refcountTableClusters: number;
  /** Where the LUKS area lies (spec.luks). */
  luksOffset?: number;
}): Buffer {
  const cs = 2 ** spec.clusterBits;
  let incompat = 0n;
  if (spec.compressionType !== C.COMPRESSION_DEFLATE) incompat |= C.INCOMPAT_COMPRESSION;
  if (spec.extendedL2) incompat |= C.INCOMPAT_EXTL2;
  if (spec.dataFile != null) incompat |= C.INCOMPAT_DATA_FILE;
  const extensions: HeaderExtension[] = [];
  // qcow2_update_header's order: backing format (encodeHeader puts it first), data file,
  // feature table.
  if (spec.dataFile != null) extensions.push({ type: C.EXT_DATA_FILE, data: Buffer.from(spec.dataFile, 'utf8') });
  if (spec.luks) {
    // The full disk encryption header extension: where the LUKS area lies, and its length.
    const d = Buffer.alloc(16);
    d.writeBigUInt64BE(BigInt(st.luksOffset ?? 0), 0);
    d.writeBigUInt64BE(BigInt(spec.luks.area.length), 8);
    extensions.push({ type: C.EXT_CRYPTO_HEADER, data: d });
  }
  const table = featureTableExtension(spec.version, cs);
  if (table) extensions.push(table);
  return encodeHeader({
    header: {
      version: spec.version, backingFileOffset: 0, backingFileSize: 0, clusterBits: spec.clusterBits,
      size: spec.size, cryptMethod: spec.luks ? C.CRYPT_LUKS : spec.encrypted ? C.CRYPT_AES : C.CRYPT_NONE, l1Size: st.l1Size, l1TableOffset: st.l1TableOffset,
      refcountTableOffset: st.refcountTableOffset, refcountTableClusters: st.refcountTableClusters,
      nbSnapshots: 0, snapshotsOffset: 0,
      incompatibleFeatures: spec.version === 3 ? incompat : 0n,
      compatibleFeatures: spec.version === 3 && spec.lazyRefcounts ? C.COMPAT_LAZY_REFCOUNTS : 0n,
      autoclearFeatures: spec.version === 3 && spec.dataFileRaw ? C.AUTOCLEAR_DATA_FILE_RAW : 0n, refcountOrder: spec.refcountOrder,
      headerLength: spec.version === 3 ? QEMU_HEADER_SIZE : C.HEADER_V2_LENGTH,
      compressionType: spec.compressionType, unknownFields: Buffer.alloc(0),
    },
    extensions, backingFile: spec.backingFile, backingFormat: spec.backingFormat,
    featureNames: [], bitmaps: null, dataFile: spec.dataFile ?? null, cryptoHeader: null,
  });
}

/** qcow2_refcount_metadata_size: refcount blocks needed to cover `clusters` plus themselves. */
export function refcountMetadataSize(clusters: number, clusterSize: number, refcountOrder: number, generousIncrease: boolean): { bytes: number; refblocks: number } {
  const blocksPerTableCluster = clusterSize / 8;
  const refcountsPerBlock = (clusterSize * 8) / 2 ** refcountOrder;
  let table = 0;
  let blocks = 0;
  let last: number;
  let n = 0;
  let generous = generousIncrease;
  do {
    last = n;
    blocks = Math.ceil((clusters + table + blocks) / refcountsPerBlock);
    table = Math.ceil(blocks / blocksPerTableCluster);
    n = clusters + blocks + table;
    if (n === last && generous) {
      clusters += Math.ceil(table / 2);
      n = 0;
      generous = false;
    }
  } while (n !== last);
  return { bytes: (blocks + table) * clusterSize, refblocks: blocks };
}


/** One run of data clusters mapped by preallocation: guest offset → host offset. */
interface L2Meta { guestOffset: number; hostOffset: number; nbClusters: number }

/**
 * The qcow2 allocator of QEMU 7.2 over an in-memory sparse file, for a freshly created
 * image (no snapshots, no compressed clusters, no in-flight requests, no discards).
 */
export class QemuAllocator {
  readonly cs: number;
  readonly clusterBits: number;
  readonly refcountOrder: number;
  readonly refcountBlockBits: number;
  readonly refcountBlockSize: number;
  readonly refcountMax: number;
  readonly l2Size: number;
  readonly l2EntrySize: number;

  /** The file, cluster by cluster (absent = never written). */
  readonly clusters = new Map<number, Buffer>();
  /** End of the furthest write or truncation. */
  fileLength = 0;

  reftable: number[] = [];
  reftableOffset = 0;
  maxRefcountTableIndex = 0;
  freeClusterIndex = 0;

  l1: number[] = [];
  l1TableOffset = 0;

  /** Called when preallocation is done with an L2 table (it will not change again). */
  onL2Done: ((offset: number) => void) | null = null;

  /**
   * Data clusters go to an external data file at their guest offsets: the allocator gives
   * them no refcounts and the image file does not grow for them (do_alloc_cluster_offset).
   */
  externalData = false;

  constructor(clusterBits: number, refcountOrder: number, extendedL2: boolean) {
    this.clusterBits = clusterBits;
    this.cs = 2 ** clusterBits;
    this.refcountOrder = refcountOrder;
    this.refcountBlockBits = clusterBits + 3 - refcountOrder;
    this.refcountBlockSize = 2 ** this.refcountBlockBits;
    this.refcountMax = refcountOrder >= 6 ? Number.MAX_SAFE_INTEGER : 2 ** (2 ** refcountOrder) - 1;
    this.l2EntrySize = l2EntrySize(extendedL2);
    this.l2Size = this.cs / this.l2EntrySize;
  }

  get l1Size(): number { return this.l1.length; }
  get reftableSize(): number { return this.reftable.length; }

  // ---- the sparse file ----

  /** The buffer of a cluster, created zero-filled (the cache entry QEMU will write back). */
  clusterBuf(offset: number): Buffer {
    const idx = offset / this.cs;
    let b = this.clusters.get(idx);
    if (!b) {
      b = Buffer.alloc(this.cs);
      this.clusters.set(idx, b);
    }
    if (offset + this.cs > this.fileLength) this.fileLength = offset + this.cs;
    return b;
  }

  write(offset: number, data: Buffer): void {
    let done = 0;
    while (done < data.length) {
      const pos = offset + done;
      const idx = Math.floor(pos / this.cs);
      const within = pos - idx * this.cs;
      const n = Math.min(this.cs - within, data.length - done);
      let b = this.clusters.get(idx);
      if (!b) { b = Buffer.alloc(this.cs); this.clusters.set(idx, b); }
      data.copy(b, within, done, done + n);
      done += n;
    }
    if (offset + data.length > this.fileLength) this.fileLength = offset + data.length;
  }

  // ---- qcow2-refcount.c ----

  getRefcount(clusterIndex: number): number {
    const rti = Math.floor(clusterIndex / this.refcountBlockSize);
    if (rti >= this.reftable.length) return 0;
    const blockOffset = this.reftable[rti]!;
    if (!blockOffset) return 0;
    const block = this.clusters.get(blockOffset / this.cs);
    if (!block) return 0;
    return getRefcount(block, clusterIndex % this.refcountBlockSize, this.refcountOrder);
  }

  private refblockAt(offset: number): Buffer { return this.clusterBuf(offset); }

  private updateMaxRefcountTableIndex(): void {
    let i = this.reftable.length - 1;
    while (i > 0 && this.reftable[i] === 0) i--;
    this.maxRefcountTableIndex = i;
  }

  allocClustersNoref(size: number): number {
    const nb = Math.ceil(size / this.cs);
    retry: for (;;) {
      for (let i = 0; i < nb; i++) {
        const next = this.freeClusterIndex++;
        if (this.getRefcount(next) !== 0) continue retry;
      }
      break;
    }
    return (this.freeClusterIndex - nb) * this.cs;
  }

  /** update_refcount: returns 0 or EAGAIN; throws on real errors. */
  updateRefcount(offset: number, length: number, addend: number, decrease: boolean): number {
    if (length === 0) return 0;
    const cs = this.cs;
    const start = Math.floor(offset / cs) * cs;
    const last = Math.floor((offset + length - 1) / cs) * cs;
    let oldTableIndex = -1;
    let clusterOffset = start;
    let ret = 0;
    let block: Buffer | null = null;
    for (; clusterOffset <= last; clusterOffset += cs) {
      const clusterIndex = clusterOffset / cs;
      const tableIndex = Math.floor(clusterIndex / this.refcountBlockSize);
      if (tableIndex !== oldTableIndex) {
        ret = this.allocRefcountBlock(clusterIndex);
        if (ret === EAGAIN) {
          if (this.freeClusterIndex > start / cs) this.freeClusterIndex = start / cs;
        }
        if (ret < 0) break;
        block = this.refblockAt(this.reftable[tableIndex]!);
      }
      oldTableIndex = tableIndex;
      const blockIndex = clusterIndex % this.refcountBlockSize;
      let refcount = getRefcount(block!, blockIndex, this.refcountOrder);
      if (decrease ? refcount - addend < 0 : refcount + addend > this.refcountMax) {
        throw new FormatError(`refcount of cluster ${clusterIndex} would leave its ${2 ** this.refcountOrder}-bit range`);
      }
      refcount = decrease ? refcount - addend : refcount + addend;
      if (refcount === 0 && clusterIndex < this.freeClusterIndex) this.freeClusterIndex = clusterIndex;
      setRefcount(block!, blockIndex, this.refcountOrder, refcount);
    }
    if (ret < 0) {
      // Undo what was done before the failure (QEMU does the same).
      this.updateRefcount(offset, clusterOffset - offset, addend, !decrease);
    }
    return ret;
  }

  /** alloc_refcount_block: 0 when the block exists, EAGAIN after allocating one. */
  allocRefcountBlock(clusterIndex: number): number {
    const cs = this.cs;
    const rti = Math.floor(clusterIndex / this.refcountBlockSize);
    if (rti < this.reftable.length && this.reftable[rti]) return 0;

    const newBlock = this.allocClustersNoref(cs);
    if (newBlock === 0) throw new FormatError('refusing to allocate a refcount block at offset 0');
    const sameBlock = Math.floor(newBlock / cs / this.refcountBlockSize) === Math.floor(clusterIndex / this.refcountBlockSize);
    if (sameBlock) {
      const b = this.refblockAt(newBlock);
      b.fill(0);
      setRefcount(b, (newBlock / cs) % this.refcountBlockSize, this.refcountOrder, 1);
    } else {
      const r = this.updateRefcount(newBlock, cs, 1, false);
      if (r < 0) return r;
      this.refblockAt(newBlock).fill(0);
    }

    if (rti < this.reftable.length) {
      this.reftable[rti] = newBlock;
      const e = Buffer.alloc(8);
      e.writeBigUInt64BE(BigInt(newBlock));
      this.write(this.reftableOffset + rti * 8, e);
      this.maxRefcountTableIndex = Math.max(this.maxRefcountTableIndex, rti);
      return EAGAIN;
    }

    const blocksUsed = Math.ceil(Math.max(clusterIndex + 1, newBlock / cs + 1) / this.refcountBlockSize);
    const metaOffset = blocksUsed * this.refcountBlockSize * cs;
    this.refcountArea(metaOffset, 0, false, rti, newBlock);
    return EAGAIN;
  }

  /** qcow2_refcount_area: new self-describing refcount blocks and table at `startOffset`. */
  refcountArea(startOffset: number, additionalClusters: number, exactSize: boolean, newRefblockIndex: number, newRefblockOffset: number): number {
    const cs = this.cs;
    const { refblocks: totalRefblockCount } = refcountMetadataSize(startOffset / cs + additionalClusters, cs, this.refcountOrder, !exactSize);
    if (totalRefblockCount > QCOW_MAX_REFTABLE_SIZE) throw new SizeTooLargeError('the refcount table would be too large');
    const areaReftableIndex = Math.floor(startOffset / cs / this.refcountBlockSize);
    let tableSize = exactSize ? totalRefblockCount : totalRefblockCount + Math.ceil(totalRefblockCount / 2);
    const perCluster = cs / 8;
    tableSize = Math.ceil(tableSize / perCluster) * perCluster;
    const tableClusters = (tableSize * 8) / cs;
    if (tableSize > QCOW_MAX_REFTABLE_SIZE) throw new SizeTooLargeError('the refcount table would be too large');

    const newTable: number[] = new Array<number>(tableSize).fill(0);
    const copy = tableSize > this.maxRefcountTableIndex ? this.maxRefcountTableIndex + 1 : tableSize;
    for (let i = 0; i < copy && i < this.reftable.length; i++) newTable[i] = this.reftable[i]!;
    if (newRefblockOffset) newTable[newRefblockIndex] = newRefblockOffset;

    let additionalRefblockCount = 0;
    for (let i = areaReftableIndex; i < totalRefblockCount; i++) if (!newTable[i]) additionalRefblockCount++;
    const tableOffset = startOffset + additionalRefblockCount * cs;
    const endOffset = tableOffset + tableClusters * cs;

    let blockOffset = startOffset;
    for (let i = areaReftableIndex; i < totalRefblockCount; i++) {
      let block: Buffer;
      if (newTable[i]) {
        block = this.refblockAt(newTable[i]!);
      } else {
        block = this.refblockAt(blockOffset);
        block.fill(0);
        newTable[i] = blockOffset;
        blockOffset += cs;
      }
      const firstOffsetCovered = i * this.refcountBlockSize * cs;
      if (firstOffsetCovered < endOffset) {
        let j = firstOffsetCovered < startOffset ? (startOffset - firstOffsetCovered) / cs : 0;
        const endIndex = Math.min((endOffset - firstOffsetCovered) / cs, this.refcountBlockSize);
        for (; j < endIndex; j++) setRefcount(block, j, this.refcountOrder, 1);
      }
    }

    const tableBuf = Buffer.alloc(tableSize * 8);
    for (let i = 0; i < tableSize; i++) if (newTable[i]) tableBuf.writeBigUInt64BE(BigInt(newTable[i]!), i * 8);
    this.write(tableOffset, tableBuf);

    const oldTableOffset = this.reftableOffset;
    const oldTableSize = this.reftable.length;
    this.reftable = newTable;
    this.reftableOffset = tableOffset;
    this.updateMaxRefcountTableIndex();
    this.freeClusters(oldTableOffset, oldTableSize * 8);
    return endOffset;
  }

  /** qcow2_free_clusters (no discard: QEMU does not pass these through by default). */
  freeClusters(offset: number, size: number): void {
    this.updateRefcount(offset, size, 1, true);
  }

  allocClusters(size: number): number {
    let offset: number;
    let ret: number;
    do {
      offset = this.allocClustersNoref(size);
      ret = this.updateRefcount(offset, size, 1, false);
    } while (ret === EAGAIN);
    return offset;
  }

  allocClustersAt(offset: number, nbClusters: number): number {
    if (nbClusters === 0) return 0;
    let i: number;
    let ret: number;
    do {
      let idx = offset / this.cs;
      for (i = 0; i < nbClusters; i++) {
        if (this.getRefcount(idx++) !== 0) break;
      }
      ret = this.updateRefcount(offset, i * this.cs, 1, false);
    } while (ret === EAGAIN);
    return i;
  }

  // ---- qcow2-cluster.c ----

  /** qcow2_grow_l1_table with exact_size = true (what truncate uses). */
  growL1Table(minSize: number): void {
    if (minSize <= this.l1.length) return;
    if (minSize > C.MAX_L1_SIZE_BYTES / 8) throw new SizeTooLargeError('the L1 table would be too large');
    const newL1 = new Array<number>(minSize).fill(0);
    for (let i = 0; i < this.l1.length; i++) newL1[i] = this.l1[i]!;
    const bytes = minSize * 8;
    const newOffset = this.allocClusters(bytes);
    const buf = Buffer.alloc(bytes);
    for (let i = 0; i < newL1.length; i++) if (newL1[i]) buf.writeBigUInt64BE(BigInt(newL1[i]!) | C.QCOW_OFLAG_COPIED, i * 8);
    this.write(newOffset, buf);
    const oldOffset = this.l1TableOffset;
    const oldSize = this.l1.length;
    this.l1TableOffset = newOffset;
    this.l1 = newL1;
    this.freeClusters(oldOffset, oldSize * 8);
  }

  private writeL1Entry(index: number): void {
    const e = Buffer.alloc(8);
    e.writeBigUInt64BE(BigInt(this.l1[index]!) | C.QCOW_OFLAG_COPIED);
    this.write(this.l1TableOffset + index * 8, e);
  }

  /** get_cluster_table: the L2 table for a guest offset, allocated (l2_allocate) if missing. */
  getClusterTable(guestOffset: number): { l2Offset: number; index: number } {
    const l1Index = Math.floor(guestOffset / (this.cs * this.l2Size));
    if (l1Index >= this.l1.length) throw new Error('internal error: L1 table too small');
    if (!this.l1[l1Index]) {
      const l2Offset = this.allocClusters(this.l2Size * this.l2EntrySize);
      if (l2Offset === 0) throw new FormatError('refusing to allocate an L2 table at offset 0');
      this.clusterBuf(l2Offset).fill(0);
      this.l1[l1Index] = l2Offset;
      this.writeL1Entry(l1Index);
    }
    return { l2Offset: this.l1[l1Index]!, index: Math.floor(guestOffset / this.cs) % this.l2Size };
  }

  private l2EntryAt(l2Offset: number, index: number): number {
    const b = this.clusters.get(l2Offset / this.cs)!;
    const o = index * this.l2EntrySize;
    return (b.readUInt32BE(o) & 0x00ffffff) * 0x1_0000_0000 + ((b.readUInt32BE(o + 4) & 0xfffffe00) >>> 0);
  }

  /** qcow2_alloc_host_offset for a range where nothing is allocated yet. */
  allocHostOffset(offset: number, bytes: number): { hostOffset: number; bytes: number; metas: L2Meta[] } {
    const cs = this.cs;
    let start = offset;
    let remaining = bytes;
    let clusterOffset = INV_OFFSET;
    let hostOffset = INV_OFFSET;
    let cur = 0;
    const metas: L2Meta[] = [];
    for (;;) {
      if (hostOffset === INV_OFFSET && clusterOffset !== INV_OFFSET) hostOffset = clusterOffset;
      start += cur;
      remaining -= cur;
      if (clusterOffset !== INV_OFFSET) clusterOffset += cur;
      if (remaining === 0) break;
      cur = remaining;

      // handle_copied: looks up (and, if missing, allocates) the L2 table; nothing here is
      // allocated yet, so it never keeps clusters.
      {
        const t = this.getClusterTable(start);
        if (this.l2EntryAt(t.l2Offset, t.index) !== 0) throw new Error('internal error: preallocating over an allocated cluster');
      }

      // handle_alloc
      const within = start % cs;
      const l2Index = Math.floor(start / cs) % this.l2Size;
      let nb = Math.ceil((within + cur) / cs);
      nb = Math.min(nb, this.l2Size - l2Index);
      nb = Math.min(nb, Math.floor(BDRV_REQUEST_MAX_BYTES / cs));
      this.getClusterTable(start);
      let allocOffset = clusterOffset === INV_OFFSET ? INV_OFFSET : Math.floor(clusterOffset / cs) * cs;
      if (this.externalData) {
        allocOffset = Math.floor(start / cs) * cs;
      } else if (allocOffset === INV_OFFSET) {
        allocOffset = this.allocClusters(nb * cs);
      } else {
        nb = this.allocClustersAt(allocOffset, nb);
      }
      if (nb === 0) { cur = 0; break; }
      const requested = cur + within;
      const avail = nb * cs;
      const nbBytes = Math.min(requested, avail);
      clusterOffset = allocOffset + within;
      cur = Math.min(cur, nbBytes - within);
      metas.push({ guestOffset: start, hostOffset: allocOffset, nbClusters: nb });
    }
    return { hostOffset, bytes: bytes - remaining, metas };
  }

  /** qcow2_alloc_cluster_link_l2 for preallocation: offset | COPIED, subcluster bitmap untouched. */
  linkL2(m: L2Meta): void {
    const t = this.getClusterTable(m.guestOffset);
    const b = this.clusters.get(t.l2Offset / this.cs)!;
    for (let i = 0; i < m.nbClusters; i++) {
      const host = m.hostOffset + i * this.cs;
      const o = (t.index + i) * this.l2EntrySize;
      b.writeUInt32BE((Math.floor(host / 0x1_0000_0000) | 0x80000000) >>> 0, o);
      b.writeUInt32BE(host % 0x1_0000_0000, o + 4);
    }
  }

  /**
   * qcow2_co_truncate(0 → size) with preallocation=falloc|full: a refcount area after the last
   * cluster in use, sized for every data cluster and their L2 tables, then all data clusters
   * in one run right after it, linked into L2 tables that the normal allocator places.
   * Returns the data run [start, end): the file driver preallocates it (falloc or zeros).
   */
  preallocateData(size: number): { start: number; end: number } {
    const cs = this.cs;
    let last = Math.ceil(this.fileLength / cs) - 1;
    while (last >= 0 && this.getRefcount(last) === 0) last--;
    const oldFileSize = (last + 1) * cs;
    let nbData = Math.ceil(size / cs);
    const nbL2 = Math.ceil(nbData / this.l2Size) + 1;
    const start = this.refcountArea(oldFileSize, nbData + nbL2, true, 0, 0);
    this.allocClustersAt(start, nbData);
    const end = start + nbData * cs;
    if (end > this.fileLength) this.fileLength = end;
    let host = start;
    let guest = 0;
    while (nbData) {
      const n = Math.min(nbData, this.l2Size - ((guest / cs) % this.l2Size));
      this.linkL2({ guestOffset: guest, hostOffset: host, nbClusters: n });
      guest += n * cs;
      host += n * cs;
      nbData -= n;
    }
    return { start, end };
  }

  /**
   * preallocate_co(0, size) for metadata preallocation, one qcow2_alloc_host_offset step
   * at a time (so a caller can write finished L2 tables out and check for cancellation).
   */
  *preallocate(size: number, subclusterSize: number): Generator<number, void, void> {
    let offset = 0;
    let bytes = size;
    let hostOffset = 0;
    let cur = 0;
    const step = Math.floor(INT_MAX / this.cs) * this.cs;
    const bytesPerL2 = this.cs * this.l2Size;
    let nextDone = 0;
    while (bytes) {
      cur = Math.min(bytes, step);
      const r = this.allocHostOffset(offset, cur);
      hostOffset = r.hostOffset;
      cur = r.bytes;
      for (const m of r.metas) this.linkL2(m);
      bytes -= cur;
      offset += cur;
      const done = Math.floor(offset / bytesPerL2);
      for (; nextDone < done; nextDone++) this.onL2Done?.(this.l1[nextDone]!);
      yield offset;
    }
    // The data clusters are in the data file: the image file ends with its metadata.
    if (this.externalData) return;
    // perform_cow: the tail of the last cluster past the end of the request is copied
    // (from nothing: zeros) up to the next subcluster boundary, which writes it.
    const tail = size % this.cs;
    if (tail) {
      const end = hostOffset + cur - tail + Math.ceil(tail / subclusterSize) * subclusterSize;
      if (end > this.fileLength) this.fileLength = end;
    }
    if (hostOffset + cur > this.fileLength) this.fileLength = hostOffset + cur;
  }
}

/**
 * Replays qcow2_co_create up to (not including) preallocation: the minimal image, the
 * allocation of its first three clusters, the L1 table for `size`. Call
 * `finishQcow2Layout` after running `alloc.preallocate()` (if wanted) to get the header.
 */
export function startQcow2Layout(spec: Qcow2CreateSpec): QemuAllocator {
  const a = new QemuAllocator(spec.clusterBits, spec.refcountOrder, spec.extendedL2);
  a.externalData = spec.dataFile != null;
  const cs = a.cs;
  // The header is written last (from the final state); reserve its cluster.
  a.clusterBuf(0);
  // "Write a refcount table with one refcount block"
  a.reftable = new Array<number>(cs / 8).fill(0);
  a.reftable[0] = 2 * cs;
  a.reftableOffset = cs;
  a.write(cs, Buffer.alloc(2 * cs));
  const e = Buffer.alloc(8);
  e.writeBigUInt64BE(BigInt(2 * cs));
  a.write(cs, e);
  a.maxRefcountTableIndex = 0;
  // qcow2_alloc_clusters(3 * cluster_size) must land at 0
  const first = a.allocClusters(3 * cs);
  if (first !== 0) throw new Error('internal error: first clusters of an empty image are in use');
  // blk_truncate → qcow2_co_truncate → qcow2_grow_l1_table(size_to_l1(size), exact)
  const l1Entries = l1EntriesFor(spec.size, spec.clusterBits, spec.extendedL2);
  if (l1Entries > C.MAX_L1_SIZE_BYTES / 8) {
    throw new SizeTooLargeError(`the image size is too large for qcow2 with ${cs}-byte clusters (try a larger cluster size)`);
  }
  a.growL1Table(l1Entries);
  return a;
}

export function finishQcow2Layout(spec: Qcow2CreateSpec, a: QemuAllocator): Buffer {
  let luksOffset: number | undefined;
  if (spec.luks) {
    // qcow2_crypto_hdr_init_func: clusters for the LUKS area, zero-filled to their end.
    luksOffset = a.allocClusters(spec.luks.area.length);
    const whole = Buffer.alloc(Math.ceil(spec.luks.area.length / a.cs) * a.cs);
    spec.luks.area.copy(whole);
    a.write(luksOffset, whole);
  }
  const header = encodeCreateHeader(spec, {
    l1Size: a.l1Size,
    l1TableOffset: a.l1TableOffset,
    refcountTableOffset: a.reftableOffset,
    refcountTableClusters: (a.reftableSize * 8) / a.cs,
    luksOffset,
  });
  a.write(0, header);
  return header;
}
