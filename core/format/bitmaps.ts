// Persistent dirty bitmaps: the bitmaps extension, the bitmap directory and bitmap tables,
// decoded and validated with QEMU 7.2's limits (block/qcow2.c qcow2_read_extensions,
// block/qcow2-bitmap.c bitmap_list_load and check_dir_entry). Every reader (open, info,
// measure, check, the write path) goes through these, so all refuse the same images, and
// nothing is allocated from a size field before it is checked.
import * as C from './constants';
import { CorruptImageError } from '../errors';
import { printable } from '../errors';
import { readU64 } from './u64';
import type { BitmapsExtension, ParsedHeader } from './header';

export interface BitmapDirectoryEntry {
  bitmapTableOffset: number;
  bitmapTableSize: number;
  flags: number;
  type: number;
  granularityBits: number;
  name: string;
}

export const BME_FLAG_IN_USE = 1 << 0;
export const BME_FLAG_AUTO = 1 << 1;
/** Flags bits 2-31: QEMU refuses bitmaps that set any. */
export const BME_RESERVED_FLAGS = 0xfffffffc;
/** Bytes of the bitmaps header extension. */
export const BITMAPS_EXT_SIZE = 24;
/** QCOW2_MAX_BITMAP_DIRECTORY_SIZE */
export const MAX_BITMAP_DIRECTORY_SIZE = 1024 * C.MAX_BITMAPS;
/** BME_MAX_TABLE_SIZE: entries of one bitmap table. */
export const BME_MAX_TABLE_SIZE = 0x8000000;
/** BME_MAX_PHYS_SIZE: bytes of one bitmap's data (what QEMU holds in memory). */
export const BME_MAX_PHYS_SIZE = 0x20000000;
export const BME_MIN_GRANULARITY_BITS = 9;
export const BME_MAX_GRANULARITY_BITS = 31;
export const BME_MAX_NAME_SIZE = 1023;
/** Dirty tracking bitmap, the only type there is. */
export const BT_DIRTY_TRACKING_BITMAP = 1;
const DIR_ENTRY_FIXED_SIZE = 24;

/**
 * The bitmaps extension when it counts: present and with the autoclear bit set (a program
 * without bitmap support cleared it, so the data is stale and QEMU ignores it). Checked as
 * qcow2_read_extensions checks it; throws CorruptImageError naming the problem.
 */
export function activeBitmapsExtension(p: ParsedHeader, file?: string): BitmapsExtension | null {
  const b = p.bitmaps;
  if (!b || !(p.header.autoclearFeatures & C.AUTOCLEAR_BITMAPS)) return null;
  const what = 'bitmaps extension';
  const ext = p.extensions.find((e) => e.type === C.EXT_BITMAPS);
  if (ext && ext.data.readUInt32BE(4) !== 0) throw new CorruptImageError(`${what}: reserved field is not zero`, file);
  if (b.nbBitmaps > C.MAX_BITMAPS) throw new CorruptImageError(`${what}: ${b.nbBitmaps} bitmaps, more than the ${C.MAX_BITMAPS} QEMU supports`, file);
  if (b.nbBitmaps === 0) throw new CorruptImageError(`${what} with zero bitmaps`, file);
  if (b.bitmapDirectoryOffset % 2 ** p.header.clusterBits !== 0) throw new CorruptImageError(`${what}: bitmap directory offset ${b.bitmapDirectoryOffset} is not cluster-aligned`, file);
  if (b.bitmapDirectorySize > MAX_BITMAP_DIRECTORY_SIZE) {
    throw new CorruptImageError(`${what}: bitmap directory size (${b.bitmapDirectorySize}) exceeds the maximum supported size (${MAX_BITMAP_DIRECTORY_SIZE})`, file);
  }
  if (b.bitmapDirectorySize === 0) throw new CorruptImageError(`${what}: the bitmap directory is empty`, file);
  return b;
}

/** Bytes of bitmap data for a disk of `virtualSize` at 2^granularityBits bytes per bit. */
export function bitmapDataBytes(virtualSize: number, granularityBits: number): number {
  return Math.ceil(Math.ceil(virtualSize / 2 ** granularityBits) / 8);
}

/** Entries of the bitmap table (one per cluster of bitmap data). */
export function bitmapTableEntries(virtualSize: number, granularityBits: number, clusterSize: number): number {
  return Math.ceil(bitmapDataBytes(virtualSize, granularityBits) / clusterSize);
}

/** Size of one directory entry, padded to 8 bytes. */
export function dirEntrySize(nameBytes: number, extraBytes = 0): number {
  return Math.ceil((DIR_ENTRY_FIXED_SIZE + nameBytes + extraBytes) / 8) * 8;
}

/** check_dir_entry: the reason an entry is unusable, or null. */
function dirEntryProblem(e: BitmapDirectoryEntry, nameSize: number, clusterSize: number, virtualSize: number): string | null {
  if (e.bitmapTableSize === 0) return 'its bitmap table is empty';
  if (e.bitmapTableOffset === 0 || e.bitmapTableOffset % clusterSize !== 0) return `its bitmap table offset ${e.bitmapTableOffset} is not a cluster-aligned offset`;
  if (e.bitmapTableSize > BME_MAX_TABLE_SIZE) return `its bitmap table has ${e.bitmapTableSize} entries (at most ${BME_MAX_TABLE_SIZE})`;
  if (e.granularityBits > BME_MAX_GRANULARITY_BITS || e.granularityBits < BME_MIN_GRANULARITY_BITS) return `granularity_bits ${e.granularityBits} is outside ${BME_MIN_GRANULARITY_BITS}-${BME_MAX_GRANULARITY_BITS}`;
  if ((e.flags & BME_RESERVED_FLAGS) >>> 0 !== 0) return `reserved flags 0x${(e.flags >>> 0).toString(16)} are set`;
  if (nameSize > BME_MAX_NAME_SIZE) return `its name is ${nameSize} bytes (at most ${BME_MAX_NAME_SIZE})`;
  if (e.type !== BT_DIRTY_TRACKING_BITMAP) return `type ${e.type} is not a dirty tracking bitmap`;
  const phys = e.bitmapTableSize * clusterSize;
  if (phys > BME_MAX_PHYS_SIZE) return `its data would take ${phys} bytes (at most ${BME_MAX_PHYS_SIZE})`;
  if (!(e.flags & BME_FLAG_IN_USE) && virtualSize > phys * 8 * 2 ** e.granularityBits) return 'its bitmap table is too small for the disk';
  return null;
}

/**
 * bitmap_list_load: the directory of `ext.nbBitmaps` entries in `buf` (ext.bitmapDirectorySize
 * bytes), every entry checked as QEMU checks it (check_dir_entry), the entry count and the
 * directory size matching exactly.
 */
export function decodeBitmapDirectory(buf: Buffer, ext: BitmapsExtension, clusterSize: number, virtualSize: number, file?: string): BitmapDirectoryEntry[] {
  const out: BitmapDirectoryEntry[] = [];
  const broken = (why: string) => new CorruptImageError(`broken bitmap directory: ${why}`, file);
  let off = 0;
  while (off < buf.length) {
    if (off + DIR_ENTRY_FIXED_SIZE > buf.length) throw broken('an entry runs past the directory');
    if (out.length + 1 > ext.nbBitmaps) throw new CorruptImageError('more bitmaps found than specified in the header extension', file);
    const nameSize = buf.readUInt16BE(off + 18);
    const extra = buf.readUInt32BE(off + 20);
    const size = dirEntrySize(nameSize, extra);
    if (off + size > buf.length) throw broken('an entry runs past the directory');
    const nameStart = off + DIR_ENTRY_FIXED_SIZE + extra;
    const e: BitmapDirectoryEntry = {
      bitmapTableOffset: readU64(buf, off, 'bitmap table offset', file),
      bitmapTableSize: buf.readUInt32BE(off + 8),
      flags: buf.readUInt32BE(off + 12),
      type: buf[off + 16]!,
      granularityBits: buf[off + 17]!,
      name: buf.toString('utf8', nameStart, nameStart + nameSize),
    };
    if (extra !== 0) throw new CorruptImageError(`bitmap '${printable(e.name)}' has extra data, which is not supported`, file);
    const problem = dirEntryProblem(e, nameSize, clusterSize, virtualSize);
    if (problem) throw new CorruptImageError(`bitmap '${printable(e.name)}' doesn't satisfy the constraints: ${problem}`, file);
    out.push(e);
    off += size;
  }
  if (out.length !== ext.nbBitmaps) throw new CorruptImageError('less bitmaps found than specified in the header extension', file);
  return out;
}

/** Encodes a directory (no extra data), entries padded to 8 bytes. */
export function encodeBitmapDirectory(entries: BitmapDirectoryEntry[]): Buffer {
  const names = entries.map((e) => Buffer.from(e.name, 'utf8'));
  const out = Buffer.alloc(names.reduce((n, name) => n + dirEntrySize(name.length), 0));
  let off = 0;
  entries.forEach((e, i) => {
    out.writeBigUInt64BE(BigInt(e.bitmapTableOffset), off);
    out.writeUInt32BE(e.bitmapTableSize, off + 8);
    out.writeUInt32BE(e.flags >>> 0, off + 12);
    out[off + 16] = e.type;
    out[off + 17] = e.granularityBits;
    out.writeUInt16BE(names[i]!.length, off + 18);
    out.writeUInt32BE(0, off + 20);
    names[i]!.copy(out, off + DIR_ENTRY_FIXED_SIZE);
    off += dirEntrySize(names[i]!.length);
  });
  return out;
}

/** A bitmap table entry: the data cluster's offset, or an unallocated cluster of all zeros or all ones. */
export type BitmapTableEntry = { kind: 'data'; offset: number } | { kind: 'zeros' } | { kind: 'ones' };

/** check_table_entry and the entry's meaning; throws on reserved bits or misalignment. */
export function decodeBitmapTableEntry(table: Buffer, index: number, clusterSize: number, file?: string): BitmapTableEntry {
  const hi = table.readUInt32BE(index * 8);
  const lo = table.readUInt32BE(index * 8 + 4);
  // BME_TABLE_ENTRY_RESERVED_MASK: bits 1-8 and 56-63
  if ((hi & 0xff000000) !== 0 || (lo & 0x1fe) !== 0) throw new CorruptImageError(`bitmap table entry ${index} has reserved bits set`, file);
  const offset = (hi & 0x00ffffff) * 0x1_0000_0000 + ((lo & 0xfffffe00) >>> 0);
  if (offset === 0) return (lo & 1) ? { kind: 'ones' } : { kind: 'zeros' };
  if ((lo & 1) !== 0 || offset % clusterSize !== 0) throw new CorruptImageError(`bitmap table entry ${index} is invalid (offset 0x${offset.toString(16)})`, file);
  return { kind: 'data', offset };
}
