// Copies the persistent bitmaps of one qcow2 image into another of the same cluster size and
// virtual size (compaction's rewritten copy): each bitmap's data clusters and table are written
// into the target as new clusters, the directory is written anew with only the table offsets
// changed (flags, type, granularity and name stay), and the header gets the bitmaps extension
// and its autoclear bit. Only bitmaps in use count (the directory checked at open, with QEMU's
// limits); a stale extension (autoclear bit clear) is not copied, as QEMU drops it.
import * as C from '../format/constants';
import { UnsupportedFeatureError } from '../errors';
import { decodeHeader, encodeHeader } from '../format/header';
import { decodeBitmapTableEntry, encodeBitmapDirectory, type BitmapDirectoryEntry } from '../format/bitmaps';
import type { BlockFile } from '../io/block-file';
import type { Qcow2Image } from './qcow2';
import type { Qcow2Writable } from './qcow2-write';

export interface CopiedBitmaps {
  nbBitmaps: number;
  bitmapDirectorySize: number;
  bitmapDirectoryOffset: number;
  /** Whether the source's autoclear bit said its bitmaps are consistent. */
  consistent: boolean;
}

/** Bytes a copy of `src`'s bitmaps takes: tables, data clusters, directory (whole clusters). */
export async function bitmapsCopySize(src: Qcow2Image): Promise<number> {
  const entries = src.bitmaps;
  if (!entries) return 0;
  const cs = src.geometry.clusterSize;
  const clusters = (n: number) => Math.ceil(n / cs);
  let total = clusters(encodeBitmapDirectory(entries).length);
  for (const e of entries) {
    total += clusters(e.bitmapTableSize * 8);
    const table = await readTable(src, e);
    for (let i = 0; i < e.bitmapTableSize; i++) if (decodeBitmapTableEntry(table, i, cs, src.filename).kind === 'data') total++;
  }
  return total * cs;
}

async function readTable(src: Qcow2Image, e: BitmapDirectoryEntry): Promise<Buffer> {
  const t = Buffer.alloc(e.bitmapTableSize * 8);
  if (t.length) await src.file.read(t, e.bitmapTableOffset);
  return t;
}

/**
 * Writes `src`'s bitmaps into `dst` (allocated through dst's refcounts, flushed) and returns
 * where the directory went. The caller then records it in the header (setBitmapsExtension).
 */
export async function copyBitmaps(src: Qcow2Image, dst: Qcow2Writable): Promise<CopiedBitmaps | null> {
  const entries = src.bitmaps;
  if (!entries) return null;
  const cs = src.geometry.clusterSize;
  if (dst.geometry.clusterSize !== cs) throw new UnsupportedFeatureError('bitmaps can only be copied between images of the same cluster size', dst.filename);
  const alloc = async (n: number) => dst.mutex.run(async () => {
    const off = await dst.refcounts.alloc(n);
    dst.noteAlloc();
    return off;
  });
  const cluster = Buffer.alloc(cs);
  const copied: BitmapDirectoryEntry[] = [];
  for (const e of entries) {
    const table = await readTable(src, e);
    for (let i = 0; i < e.bitmapTableSize; i++) {
      const t = decodeBitmapTableEntry(table, i, cs, src.filename);
      if (t.kind !== 'data') continue; // all zeros or all ones: nothing stored
      await src.file.read(cluster, t.offset);
      const to = await alloc(1);
      await dst.file.write(cluster, to);
      table.writeBigUInt64BE(BigInt(to), i * 8);
    }
    const tableOffset = await alloc(Math.ceil(table.length / cs));
    await dst.file.write(table, tableOffset);
    copied.push({ ...e, bitmapTableOffset: tableOffset });
  }
  const dir = encodeBitmapDirectory(copied);
  const dirOffset = await alloc(Math.max(1, Math.ceil(dir.length / cs)));
  await dst.file.write(dir, dirOffset);
  // Refcounts (and the data above) on disk before the header points at any of it.
  await dst.flush();
  return { nbBitmaps: copied.length, bitmapDirectorySize: dir.length, bitmapDirectoryOffset: dirOffset, consistent: true };
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
