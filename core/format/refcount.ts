// Refcount table entries and refcount block entries of every width (refcount_order 0..6).
import { CorruptImageError } from '../errors';

const TWO32 = 0x1_0000_0000;

export function decodeReftableEntry(table: Buffer, index: number): { blockOffset: number; reserved: boolean } {
  const hi = table.readUInt32BE(index * 8);
  const lo = table.readUInt32BE(index * 8 + 4);
  if (hi > 0x1fffff) throw new CorruptImageError(`refcount table entry ${index} points past 2^53`);
  return { blockOffset: hi * TWO32 + ((lo & 0xfffffe00) >>> 0), reserved: (lo & 0x1ff) !== 0 };
}

export function encodeReftableEntry(table: Buffer, index: number, blockOffset: number): void {
  table.writeUInt32BE(Math.floor(blockOffset / TWO32), index * 8);
  table.writeUInt32BE(blockOffset % TWO32, index * 8 + 4);
}

/** Refcount of entry `index` in a refcount block with entries of 2^order bits. */
export function getRefcount(block: Buffer, index: number, order: number): number {
  switch (order) {
    case 0: return (block[index >>> 3]! >>> (index & 7)) & 1;
    case 1: return (block[index >>> 2]! >>> ((index & 3) * 2)) & 3;
    case 2: return (block[index >>> 1]! >>> ((index & 1) * 4)) & 15;
    case 3: return block[index]!;
    case 4: return block.readUInt16BE(index * 2);
    case 5: return block.readUInt32BE(index * 4);
    case 6: {
      const hi = block.readUInt32BE(index * 8);
      // Refcounts past 2^53 cannot be real; treat them as a corruption signal at the caller.
      if (hi > 0x1fffff) return Number.MAX_SAFE_INTEGER;
      return hi * TWO32 + block.readUInt32BE(index * 8 + 4);
    }
    default: throw new RangeError(`refcount_order ${order}`);
  }
}

/**
 * How many of entries [0, n) of a refcount block are not zero: the same as counting
 * getRefcount(block, i, order) !== 0, without decoding each entry (an entry is zero when all
 * its bits are). For scans over every cluster of a file, such as QEMU's preallocation check.
 */
export function countNonZeroRefcounts(block: Uint8Array, order: number, n: number): number {
  let count = 0;
  if (order < 3) {
    const bits = 1 << order;
    const perByte = 8 / bits;
    const mask = (1 << bits) - 1;
    for (let i = 0; i < n; i++) if ((block[(i / perByte) | 0]! >>> ((i % perByte) * bits)) & mask) count++;
    return count;
  }
  const bytes = 1 << (order - 3);
  for (let i = 0, p = 0; i < n; i++) {
    let any = 0;
    for (const end = p + bytes; p < end; p++) any |= block[p]!;
    if (any !== 0) count++;
  }
  return count;
}

export function setRefcount(block: Buffer, index: number, order: number, value: number): void {
  const max = maxRefcount(order);
  if (value < 0 || value > max) throw new RangeError(`refcount ${value} does not fit in ${1 << order} bits`);
  switch (order) {
    case 0: case 1: case 2: {
      const bits = 1 << order;
      const perByte = 8 / bits;
      const byte = Math.floor(index / perByte);
      const shift = (index % perByte) * bits;
      const mask = ((1 << bits) - 1) << shift;
      block[byte] = (block[byte]! & ~mask) | (value << shift);
      return;
    }
    case 3: block[index] = value; return;
    case 4: block.writeUInt16BE(value, index * 2); return;
    case 5: block.writeUInt32BE(value, index * 4); return;
    case 6:
      block.writeUInt32BE(Math.floor(value / TWO32), index * 8);
      block.writeUInt32BE(value % TWO32, index * 8 + 4);
      return;
    default: throw new RangeError(`refcount_order ${order}`);
  }
}

// Largest refcount of each width: a table, as setRefcount asks for it on every call.
const MAX_REFCOUNT = [1, 3, 15, 255, 65535, 0xffffffff, Number.MAX_SAFE_INTEGER];

export function maxRefcount(order: number): number {
  return MAX_REFCOUNT[Math.min(order, 6)]!;
}

/** Entries in one refcount block: cluster_size * 8 / refcount_bits. */
export function refcountBlockEntries(clusterBits: number, order: number): number {
  return 2 ** (clusterBits + 3 - order);
}
