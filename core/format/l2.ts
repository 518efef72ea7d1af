// L1 and L2 table entries, standard and extended, as closed unions. Decoding reads two
// 32-bit halves instead of a bigint: these run once per cluster on the hot path.
import * as C from './constants';
import { CorruptImageError } from '../errors';

const TWO32 = 0x1_0000_0000;

/** L1 entry → L2 table offset (0 = unallocated) and the copied flag. */
export function decodeL1Entry(table: Buffer, index: number): { l2Offset: number; copied: boolean; reserved: boolean } {
  const hi = table.readUInt32BE(index * 8);
  const lo = table.readUInt32BE(index * 8 + 4);
  return {
    l2Offset: (hi & 0x00ffffff) * TWO32 + ((lo & 0xfffffe00) >>> 0),
    copied: (hi & 0x80000000) !== 0,
    reserved: (hi & 0x7f000000) !== 0 || (lo & 0x1ff) !== 0,
  };
}

export function encodeL1Entry(table: Buffer, index: number, l2Offset: number, copied: boolean): void {
  const hi = Math.floor(l2Offset / TWO32) | (copied ? 0x80000000 : 0);
  table.writeUInt32BE(hi >>> 0, index * 8);
  table.writeUInt32BE(l2Offset % TWO32, index * 8 + 4);
}

/** The cluster-level type of an L2 entry. */
export type L2Entry =
  | { kind: 'unallocated' }
  /** Standard L2 only: zero flag; hostOffset 0 = plain, otherwise preallocated. */
  | { kind: 'zero'; hostOffset: number; copied: boolean }
  | { kind: 'normal'; hostOffset: number; copied: boolean }
  /** hostOffset: byte offset of the compressed data; sectors: 512-byte sectors it may span. */
  | { kind: 'compressed'; hostOffset: number; sectors: number };

export interface L2Geometry {
  clusterBits: number;
  extendedL2: boolean;
  /**
   * The image has an external data file: host offset 0 is then guest cluster 0's place in it,
   * and an entry with offset 0 and the COPIED flag is a data cluster (QEMU's
   * qcow2_get_cluster_type: all such clusters have refcount 1, so COPIED tells them apart).
   */
  externalData?: boolean;
}

/** Decodes entry `index` of an L2 table. Throws CorruptImageError on reserved bits or misalignment. */
export function decodeL2Entry(table: Buffer, index: number, g: L2Geometry, where?: () => string, file?: string): L2Entry {
  const off = index * (g.extendedL2 ? C.L2E_SIZE_EXTENDED : C.L2E_SIZE_NORMAL);
  const hi = table.readUInt32BE(off);
  const lo = table.readUInt32BE(off + 4);
  if (hi & 0x40000000) {
    const x = 62 - (g.clusterBits - 8); // bits of the offset field
    const hiOffsetBits = x - 32;
    const hiOffset = hi & ((1 << hiOffsetBits) - 1);
    if (hiOffset > 0x1fffff) throw new CorruptImageError(`compressed cluster offset in L2 entry ${index}${where ? ' ' + where() : ''} lies past 2^53`, file);
    const hostOffset = hiOffset * TWO32 + lo;
    const sectors = ((hi & 0x3fffffff) >>> hiOffsetBits) + 1;
    return { kind: 'compressed', hostOffset, sectors };
  }
  const copied = (hi & 0x80000000) !== 0;
  const hostOffset = (hi & 0x00ffffff) * TWO32 + ((lo & 0xfffffe00) >>> 0);
  if ((hi & 0x3f000000) !== 0 || (lo & 0x1fe) !== 0) {
    throw new CorruptImageError(`L2 entry ${index}${where ? ' ' + where() : ''} has reserved bits set`, file);
  }
  // Clusters are at most 2 MiB: alignment is decided by the low word alone (integer ops, not a
  // floating-point remainder of an offset past 2^31).
  if ((lo & 0xfffffe00 & ((1 << g.clusterBits) - 1)) !== 0) {
    throw new CorruptImageError(`cluster offset 0x${hostOffset.toString(16)} in L2 entry ${index}${where ? ' ' + where() : ''} is not aligned to the cluster size`, file);
  }
  if ((lo & 1) && !g.extendedL2) return { kind: 'zero', hostOffset, copied };
  if (hostOffset === 0) return copied && g.externalData ? { kind: 'normal', hostOffset, copied } : { kind: 'unallocated' };
  return { kind: 'normal', hostOffset, copied };
}

/** The 64-bit subcluster bitmap of an extended L2 entry: low word = allocated, high word = reads as zero. */
export function decodeL2Bitmap(table: Buffer, index: number): { alloc: number; zero: number } {
  const off = index * C.L2E_SIZE_EXTENDED + 8;
  return { zero: table.readUInt32BE(off), alloc: table.readUInt32BE(off + 4) };
}

export function encodeL2Entry(table: Buffer, index: number, e: L2Entry, g: L2Geometry, bitmap?: { alloc: number; zero: number }): void {
  const off = index * (g.extendedL2 ? C.L2E_SIZE_EXTENDED : C.L2E_SIZE_NORMAL);
  let hi = 0;
  let lo = 0;
  switch (e.kind) {
    case 'unallocated':
      break;
    case 'zero':
      if (g.extendedL2) throw new Error('zero L2 entries do not exist with extended L2; use the bitmap');
      hi = Math.floor(e.hostOffset / TWO32) | (e.copied ? 0x80000000 : 0);
      lo = (e.hostOffset % TWO32) | 1;
      break;
    case 'normal':
      hi = Math.floor(e.hostOffset / TWO32) | (e.copied ? 0x80000000 : 0);
      lo = e.hostOffset % TWO32;
      break;
    case 'compressed': {
      const x = 62 - (g.clusterBits - 8);
      const hiOffsetBits = x - 32;
      hi = 0x40000000 | ((e.sectors - 1) << hiOffsetBits) | Math.floor(e.hostOffset / TWO32);
      lo = e.hostOffset % TWO32;
      break;
    }
    default: {
      const never: never = e;
      throw new Error(`unknown L2 entry ${String(never)}`);
    }
  }
  table.writeUInt32BE(hi >>> 0, off);
  table.writeUInt32BE(lo >>> 0, off + 4);
  if (g.extendedL2) {
    table.writeUInt32BE((bitmap?.zero ?? 0) >>> 0, off + 8);
    table.writeUInt32BE((bitmap?.alloc ?? 0) >>> 0, off + 12);
  }
}

/** The state of one subcluster (for standard L2 the cluster is its only subcluster). */
export type SubclusterState =
  | 'unallocated-plain'
  | 'unallocated-alloc'
  | 'zero-plain'
  | 'zero-alloc'
  | 'normal'
  | 'compressed'
  | 'invalid';

/** QEMU's qcow2_get_subcluster_type, as a pure function of the entry and its bitmap. */
export function subclusterState(e: L2Entry, bitmap: { alloc: number; zero: number } | null, sc: number): SubclusterState {
  if (!bitmap) {
    switch (e.kind) {
      case 'unallocated': return 'unallocated-plain';
      case 'zero': return e.hostOffset ? 'zero-alloc' : 'zero-plain';
      case 'normal': return 'normal';
      case 'compressed': return 'compressed';
      default: { const never: never = e; return never; }
    }
  }
  const bit = 1 << sc;
  switch (e.kind) {
    case 'compressed': return 'compressed';
    case 'normal':
      if (bitmap.zero & bitmap.alloc) return 'invalid';
      if (bitmap.zero & bit) return 'zero-alloc';
      if (bitmap.alloc & bit) return 'normal';
      return 'unallocated-alloc';
    case 'unallocated':
      if (bitmap.alloc) return 'invalid';
      if (bitmap.zero & bit) return 'zero-plain';
      return 'unallocated-plain';
    case 'zero': return 'invalid'; // cannot be decoded with extended L2
    default: { const never: never = e; return never; }
  }
}

/** Host bytes [start, end) a compressed cluster's data may occupy. */
export function compressedRange(hostOffset: number, sectors: number): { start: number; end: number } {
  const start = hostOffset;
  const end = (hostOffset - (hostOffset % C.COMPRESSED_SECTOR_SIZE)) + sectors * C.COMPRESSED_SECTOR_SIZE;
  return { start, end };
}
