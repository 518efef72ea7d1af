// Copies the persistent bitmaps of one qcow2 image into another of the same cluster size and
// virtual size (compaction's rewritten copy): each bitmap's data clusters and table are written
// into the target as new clusters, the directory is copied entry by entry with only the table
// offsets changed (flags, type, granularity, name and extra data stay byte for byte), and the
// header gets the bitmaps extension and the original's autoclear bit.
import * as C from '../format/constants';
import { CorruptImageError, UnsupportedFeatureError } from '../errors';
import { decodeHeader, encodeHeader } from '../format/header';
import { readU64 } from '../format/u64';
import type { BlockFile } from '../io/block-file';
import type { Qcow2Image } from './qcow2';
import type { Qcow2Writable } from './qcow2-write';

/** Bits 9-55 of a bitmap table entry: the host offset of a data cluster (0 = none). */
const BME_TABLE_ENTRY_OFFSET_MASK = 0x00fffffffffffe00n;

export interface CopiedBitmaps {
  nbBitmaps: number;
  bitmapDirectorySize: number;
  bitmapDirectoryOffset: number;
  /** Whether the source's autoclear bit said its bitmaps are consistent. */
  consistent: boolean;
}

/** Bytes a copy of `src`'s bitmaps takes: tables, data clusters, directory (whole clusters). */
export async function bitmapsCopySize(src: Qcow2Image): Promise<number> {
  const b = src.parsed.bitmaps;
  if (!b) return 0;
  const cs = src.geometry.clusterSize;
  const clusters = (n: number) => Math.ceil(n / cs);
  let total = clusters(b.bitmapDirectorySize);
  for (const e of await readDirectory(src)) {
    total += clusters(e.tableSize * 8);
    const table = await readTable(src, e);
    for (let i = 0; i < e.tableSize; i++) if (tableEntryOffset(table, i, src.filename) !== 0) total++;
  }
  return total * cs;
}

interface RawEntry { at: number; tableOffset: number; tableSize: number }

async function readDirectory(src: Qcow2Image): Promise<RawEntry[]> {
  const b = src.parsed.bitmaps!;
  const dir = Buffer.alloc(b.bitmapDirectorySize);
  await src.file.read(dir, b.bitmapDirectoryOffset);
  const out: RawEntry[] = [];
  let off = 0;
  for (let i = 0; i < b.nbBitmaps; i++) {
    if (off + 24 > dir.length) throw new CorruptImageError('bitmap directory is truncated', src.filename);
    const end = off + 24 + dir.readUInt32BE(off + 20) + dir.readUInt16BE(off + 18);
    if (end > dir.length) throw new CorruptImageError('bitmap directory entry runs past the directory', src.filename);
    out.push({ at: off, tableOffset: readU64(dir, off, 'bitmap table offset', src.filename), tableSize: dir.readUInt32BE(off + 8) });
    off = Math.ceil(end / 8) * 8;
  }
  return out;
}

async function readTable(src: Qcow2Image, e: RawEntry): Promise<Buffer> {
  const t = Buffer.alloc(e.tableSize * 8);
  if (t.length) await src.file.read(t, e.tableOffset);
  return t;
}

function tableEntryOffset(table: Buffer, i: number, file: string): number {
  const v = table.readBigUInt64BE(i * 8) & BME_TABLE_ENTRY_OFFSET_MASK;
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw new CorruptImageError(`bitmap table entry ${i} points past any file`, file);
  return Number(v);
}

/**
 * Writes `src`'s bitmaps into `dst` (allocated through dst's refcounts, flushed) and returns
 * where the directory went. The caller then records it in the header (setBitmapsExtension).
 */
export async function copyBitmaps(src: Qcow2Image, dst: Qcow2Writable): Promise<CopiedBitmaps | null> {
  const b = src.parsed.bitmaps;
  if (!b) return null;
  const cs = src.geometry.clusterSize;
  if (dst.geometry.clusterSize !== cs) throw new UnsupportedFeatureError('bitmaps can only be copied between images of the same cluster size', dst.filename);
  const alloc = async (n: number) => dst.mutex.run(async () => {
    const off = await dst.refcounts.alloc(n);
    dst.noteAlloc();
    return off;
  });
  const dir = Buffer.alloc(b.bitmapDirectorySize);
  await src.file.read(dir, b.bitmapDirectoryOffset);
  const cluster = Buffer.alloc(cs);
  for (const e of await readDirectory(src)) {
    const table = await readTable(src, e);
    for (let i = 0; i < e.tableSize; i++) {
      const from = tableEntryOffset(table, i, src.filename);
      if (from === 0) continue; // all zeros or all ones (bit 0): nothing stored
      await src.file.read(cluster, from);
      const to = await alloc(1);
      await dst.file.write(cluster, to);
      table.writeBigUInt64BE(BigInt(to), i * 8);
    }
    let tableOffset = 0;
    if (table.length) {
      tableOffset = await alloc(Math.ceil(table.length / cs));
      await dst.file.write(table, tableOffset);
    }
    dir.writeBigUInt64BE(BigInt(tableOffset), e.at);
  }
  const dirOffset = await alloc(Math.max(1, Math.ceil(dir.length / cs)));
  await dst.file.write(dir, dirOffset);
  // Refcounts (and the data above) on disk before the header points at any of it.
  await dst.flush();
  return {
    nbBitmaps: b.nbBitmaps, bitmapDirectorySize: dir.length, bitmapDirectoryOffset: dirOffset,
    consistent: (src.header.autoclearFeatures & C.AUTOCLEAR_BITMAPS) !== 0n,
  };
}

/** Adds (or replaces) the bitmaps extension in the header of a closed image file, and its autoclear bit. */
export async function setBitmapsExtension(file: BlockFile, copied: CopiedBitmaps): Promise<void> {
  const head = Buffer.alloc(2 ** 21);
  const got = await file.read(head, 0);
  const cs = 2 ** head.readUInt32BE(20);
  const p = decodeHeader(head.subarray(0, Math.min(got, cs)), file.path);
  const data = Buffer.alloc(24);
  data.writeUInt32BE(copied.nbBitmaps, 0);
  data.writeBigUInt64BE(BigInt(copied.bitmapDirectorySize), 8);
  data.writeBigUInt64BE(BigInt(copied.bitmapDirectoryOffset), 16);
  p.extensions = p.extensions.filter((x) => x.type !== C.EXT_BITMAPS);
  p.extensions.push({ type: C.EXT_BITMAPS, data });
  if (copied.consistent) p.header.autoclearFeatures |= C.AUTOCLEAR_BITMAPS;
  await file.write(encodeHeader(p, file.path), 0);
  await file.flush();
}
