// bitmap: qemu-img bitmap on the persistent dirty bitmaps of a qcow2 image: --add, --remove,
// --clear, --enable, --disable, --merge (from the same image or another with -b), applied in
// the order given. All of them are worked out in memory first; when one fails nothing is
// written (qemu-img keeps the ones before it). Then, as QEMU stores bitmaps at close: each
// consistent bitmap's data clusters and table are written anew, then the directory, all
// flushed with their refcounts, then the header's bitmaps extension is switched to the new
// directory (the autoclear bit cleared around the switch), and only then are the old
// clusters freed. A crash leaves the old bitmaps or the new ones, and at worst leaks.
import * as C from '../format/constants';
import {
  bitmapDataBytes, decodeBitmapTableEntry, encodeBitmapDirectory, BITMAPS_EXT_SIZE, BME_FLAG_AUTO, BME_FLAG_IN_USE,
  BME_MAX_NAME_SIZE, BT_DIRTY_TRACKING_BITMAP, type BitmapDirectoryEntry,
} from '../format/bitmaps';
import { encodeHeader } from '../format/header';
import { StrataError, UnsupportedFeatureError, printable } from '../errors';
import { closeChain, openImageFile } from '../chain/open';
import type { DiskImage, ImageFormat } from '../engine/image';
import { Qcow2Image } from '../engine/qcow2';
import { Qcow2Writable } from '../engine/qcow2-write';
import { switchBitmapsExtension } from '../engine/bitmaps';
import { throwIfCancelled, type JobContext } from './job';
import { isDirty } from './amend';
import { checkImage } from './check';

export type BitmapAction = { act: 'add' | 'remove' | 'clear' | 'enable' | 'disable' } | { act: 'merge'; source: string };

export interface BitmapJobOptions {
  format?: ImageFormat;
  granularity?: number;
  sourceFile?: string;
  sourceFormat?: ImageFormat;
}

/** "Operation OP on bitmap NAME failed: ..." (exit 1, nothing written). */
export class BitmapOpError extends StrataError {
  constructor(op: string, bitmap: string, message: string) { super('unsupported', `Operation ${op} on bitmap ${printable(bitmap)} failed: ${message}`); }
}

export interface Bm {
  entry: BitmapDirectoryEntry;
  /** The bits, loaded (consistent bitmaps) or null (in use on disk: kept as they are). */
  data: Uint8Array | null;
  /** Clusters the bitmap used on disk (its table and data), freed once it is rewritten. */
  old: { offset: number; length: number; punch?: boolean }[];
}

export async function readBits(img: Qcow2Image, e: BitmapDirectoryEntry): Promise<{ data: Uint8Array; old: { offset: number; length: number; punch?: boolean }[] }> {
  const cs = img.geometry.clusterSize;
  const bytes = bitmapDataBytes(img.virtualSize, e.granularityBits);
  const data = new Uint8Array(bytes);
  const old: { offset: number; length: number; punch?: boolean }[] = [];
  const table = Buffer.alloc(e.bitmapTableSize * 8);
  if (table.length) await img.file.read(table, e.bitmapTableOffset);
  old.push({ offset: e.bitmapTableOffset, length: Math.ceil(table.length / cs) * cs });
  const cluster = Buffer.alloc(cs);
  for (let i = 0; i < e.bitmapTableSize; i++) {
    const t = decodeBitmapTableEntry(table, i, cs, img.filename);
    const n = Math.min(cs, bytes - i * cs);
    if (n <= 0) break;
    if (t.kind === 'ones') data.fill(0xff, i * cs, i * cs + n);
    else if (t.kind === 'data') {
      await img.file.read(cluster, t.offset);
      data.set(cluster.subarray(0, n), i * cs);
      // QEMU frees a bitmap's data clusters with discard "always" (punched), its table not.
      old.push({ offset: t.offset, length: cs, punch: true });
    }
  }
  const bits = Math.ceil(img.virtualSize / 2 ** e.granularityBits);
  if (bits & 7 && data.length) data[data.length - 1]! &= (1 << (bits & 7)) - 1;
  return { data, old };
}

/** Sets in `dst` every bit whose range overlaps a set bit of `src` (hbitmap_merge). */
function mergeBits(dst: Bm, src: { entry: BitmapDirectoryEntry; data: Uint8Array }, size: number): void {
  const gs = 2 ** src.entry.granularityBits;
  const gd = 2 ** dst.entry.granularityBits;
  const d = dst.data!;
  const nbits = Math.ceil(size / gs);
  for (let k = 0; k < nbits; k++) {
    if (!(src.data[k >>> 3]! & (1 << (k & 7)))) continue;
    const a = Math.floor((k * gs) / gd);
    const b = Math.ceil(Math.min(size, (k + 1) * gs) / gd);
    for (let j = a; j < b; j++) d[j >>> 3]! |= 1 << (j & 7);
  }
}

const inconsistent = (name: string) => `Bitmap '${printable(name)}' is inconsistent and cannot be used\nTry block-dirty-bitmap-remove to delete this bitmap from disk`;

export async function bitmapJob(ctx: JobContext, name: string, bitmap: string, actions: BitmapAction[], o: BitmapJobOptions = {}): Promise<void> {
  let img: DiskImage | null = null;
  let src: DiskImage | null = null;
  // An image left dirty is repaired first, as QEMU's writable open does (see amend).
  const d = await isDirty(name);
  if (d.dirty && o.format !== 'raw') await checkImage(ctx, d.path, { repair: 'all', format: 'qcow2' });
  try {
    // No backing chain: bitmaps are changed without reference to the image's contents.
    img = await openImageFile(name, { format: o.format, writable: true });
    if (o.sourceFile !== undefined) src = await openImageFile(o.sourceFile, { format: o.sourceFormat });
    const w = img;
    const bms: Bm[] = [];
    if (w instanceof Qcow2Image) {
      for (const e of w.bitmaps ?? []) {
        if (e.flags & BME_FLAG_IN_USE) bms.push({ entry: { ...e }, data: null, old: [] });
        else bms.push({ entry: { ...e }, ...(await readBits(w, e)) });
      }
    }
    const removed: Bm[] = [];
    const find = (n: string) => bms.find((b) => b.entry.name === n);
    const opName = (a: BitmapAction) => a.act;
    for (const a of actions) {
      throwIfCancelled(ctx);
      const fail = (msg: string): never => { throw new BitmapOpError(opName(a), bitmap, msg); };
      const b = find(bitmap);
      switch (a.act) {
        case 'add': {
          if (bitmap === '') fail('Bitmap name cannot be empty');
          if (b) fail(`Bitmap already exists: ${printable(bitmap)}`);
          if (!(w instanceof Qcow2Writable)) fail(`Can't make bitmap '${printable(bitmap)}' persistent in '${printable(w.filename)}': the ${w.format} format cannot store persistent bitmaps`);
          const q = w as Qcow2Writable;
          if (Buffer.byteLength(bitmap) > BME_MAX_NAME_SIZE) fail(`Can't make bitmap '${printable(bitmap)}' persistent in '${printable(q.filename)}': Name length exceeds maximum (${BME_MAX_NAME_SIZE} characters)`);
          if (q.header.version < 3) fail(`Can't make bitmap '${printable(bitmap)}' persistent in '${printable(q.filename)}': Cannot store dirty bitmaps in qcow2 v2 files`);
          if (bms.length >= C.MAX_BITMAPS) fail(`Can't make bitmap '${printable(bitmap)}' persistent in '${printable(q.filename)}': Maximum number of persistent bitmaps is already reached`);
          // QMP's granularity is 32 bits wide.
          const g = o.granularity !== undefined ? o.granularity % 2 ** 32 : Math.max(4096, q.geometry.clusterSize);
          if (g < 512 || (g & (g - 1)) !== 0) fail('Granularity must be power of 2 and at least 512');
          const entry: BitmapDirectoryEntry = { bitmapTableOffset: 0, bitmapTableSize: 0, flags: BME_FLAG_AUTO, type: BT_DIRTY_TRACKING_BITMAP, granularityBits: Math.log2(g), name: bitmap };
          bms.push({ entry, data: new Uint8Array(bitmapDataBytes(q.virtualSize, entry.granularityBits)), old: [] });
          break;
        }
        case 'remove':
          if (!b) fail(`Dirty bitmap '${printable(bitmap)}' not found`);
          bms.splice(bms.indexOf(b!), 1);
          removed.push(b!);
          break;
        case 'clear':
          if (!b) fail(`Dirty bitmap '${printable(bitmap)}' not found`);
          if (!b!.data) fail(inconsistent(bitmap));
          b!.data!.fill(0);
          break;
        case 'enable': case 'disable':
          if (!b) fail(`Dirty bitmap '${printable(bitmap)}' not found`);
          if (!b!.data) fail(inconsistent(bitmap));
          if (a.act === 'enable') b!.entry.flags |= BME_FLAG_AUTO;
          else b!.entry.flags &= ~BME_FLAG_AUTO;
          break;
        case 'merge': {
          if (!b) fail(`Dirty bitmap '${printable(bitmap)}' not found`);
          if (!b!.data) fail(inconsistent(bitmap));
          let from: { entry: BitmapDirectoryEntry; data: Uint8Array } | null = null;
          let fromSize = w.virtualSize;
          if (src) {
            const e = src instanceof Qcow2Image ? src.bitmaps?.find((x) => x.name === a.source) : undefined;
            if (!e) fail(`Dirty bitmap '${printable(a.source)}' not found`);
            if (e!.flags & BME_FLAG_IN_USE) fail(inconsistent(a.source));
            from = { entry: e!, data: (await readBits(src as Qcow2Image, e!)).data };
            fromSize = src.virtualSize;
          } else {
            const s = find(a.source);
            if (!s) fail(`Dirty bitmap '${printable(a.source)}' not found`);
            if (!s!.data) fail(inconsistent(a.source));
            from = { entry: s!.entry, data: s!.data! };
          }
          if (fromSize !== w.virtualSize) fail('Bitmaps are incompatible and can\'t be merged');
          mergeBits(b!, from!, w.virtualSize);
          break;
        }
      }
    }
    if (!(w instanceof Qcow2Writable)) return;
    await storeBitmaps(w, bms, removed);
  } finally {
    await closeChain(src);
    await closeChain(img);
  }
}

/** Writes the bitmaps anew and switches the header to them (see the top of this file). */
export async function storeBitmaps(img: Qcow2Writable, bms: Bm[], removed: Bm[]): Promise<void> {
  const cs = img.geometry.clusterSize;
  const alloc = (n: number) => img.mutex.run(async () => { const o = await img.refcounts.alloc(n); img.noteAlloc(); return o; });
  const frees: { offset: number; length: number; punch?: boolean }[] = [];
  for (const b of removed) {
    if (b.data) frees.push(...b.old);
    else frees.push(...(await inUseClusters(img, b.entry)));
  }
  for (const b of bms) {
    if (!b.data) continue;
    const entries = Math.ceil(b.data.length / cs);
    const table = Buffer.alloc(entries * 8);
    for (let i = 0; i < entries; i++) {
      const chunk = b.data.subarray(i * cs, Math.min(b.data.length, (i + 1) * cs));
      if (chunk.every((x) => x === 0)) continue;
      const at = await alloc(1);
      const cluster = Buffer.alloc(cs);
      cluster.set(chunk);
      await img.file.write(cluster, at);
      table.writeBigUInt64BE(BigInt(at), i * 8);
    }
    const tableOffset = await alloc(Math.max(1, Math.ceil(table.length / cs)));
    await img.file.write(table, tableOffset);
    frees.push(...b.old.filter((x) => x.offset !== 0 && x.length > 0));
    b.entry = { ...b.entry, bitmapTableOffset: tableOffset, bitmapTableSize: entries };
  }
  const ext = img.parsed.bitmaps && (img.header.autoclearFeatures & C.AUTOCLEAR_BITMAPS) ? img.parsed.bitmaps : null;
  if (ext) frees.push({ offset: ext.bitmapDirectoryOffset, length: Math.ceil(ext.bitmapDirectorySize / cs) * cs });
  if (bms.length === 0) {
    // No bitmaps left: the header loses the extension and its autoclear bit.
    await img.flush();
    await rewriteHeader(img, null);
  } else {
    const dir = encodeBitmapDirectory(bms.map((b) => b.entry));
    const dirOffset = await alloc(Math.ceil(dir.length / cs));
    await img.file.write(dir, dirOffset);
    // Data, tables, directory and their refcounts on disk before the header points at them.
    await img.flush();
    const next = { nbBitmaps: bms.length, bitmapDirectorySize: dir.length, bitmapDirectoryOffset: dirOffset };
    if (ext) await switchBitmapsExtension(img, next);
    else await rewriteHeader(img, next);
  }
  img.bitmaps = bms.length ? bms.map((b) => ({ ...b.entry })) : null;
  await img.mutex.run(async () => { img.pendingFrees.push(...frees.filter((f) => f.offset !== 0 && f.length > 0)); });
  await img.flush();
}

/** The clusters of a bitmap left in use (its table and data), for --remove. */
async function inUseClusters(img: Qcow2Writable, e: BitmapDirectoryEntry): Promise<{ offset: number; length: number; punch?: boolean }[]> {
  const cs = img.geometry.clusterSize;
  const out: { offset: number; length: number; punch?: boolean }[] = [{ offset: e.bitmapTableOffset, length: Math.ceil((e.bitmapTableSize * 8) / cs) * cs }];
  const table = Buffer.alloc(e.bitmapTableSize * 8);
  if (table.length) await img.file.read(table, e.bitmapTableOffset);
  for (let i = 0; i < e.bitmapTableSize; i++) {
    const t = decodeBitmapTableEntry(table, i, cs, img.filename);
    if (t.kind === 'data') out.push({ offset: t.offset, length: cs, punch: true });
  }
  return out;
}

/** The header cluster with the bitmaps extension added, replaced or (null) dropped. */
async function rewriteHeader(img: Qcow2Writable, ext: { nbBitmaps: number; bitmapDirectorySize: number; bitmapDirectoryOffset: number } | null): Promise<void> {
  const p = img.parsed;
  const at = p.extensions.findIndex((e) => e.type === C.EXT_BITMAPS);
  if (ext) {
    const data = Buffer.alloc(BITMAPS_EXT_SIZE);
    data.writeUInt32BE(ext.nbBitmaps, 0);
    data.writeBigUInt64BE(BigInt(ext.bitmapDirectorySize), 8);
    data.writeBigUInt64BE(BigInt(ext.bitmapDirectoryOffset), 16);
    // QEMU puts the bitmaps extension before the feature table.
    const ft = p.extensions.findIndex((e) => e.type === C.EXT_FEATURE_TABLE);
    if (at >= 0) p.extensions[at] = { type: C.EXT_BITMAPS, data };
    else if (ft >= 0) p.extensions.splice(ft, 0, { type: C.EXT_BITMAPS, data });
    else p.extensions.push({ type: C.EXT_BITMAPS, data });
    p.bitmaps = { ...ext };
    p.header.autoclearFeatures |= C.AUTOCLEAR_BITMAPS;
  } else {
    if (at >= 0) p.extensions.splice(at, 1);
    p.bitmaps = null;
    p.header.autoclearFeatures &= ~C.AUTOCLEAR_BITMAPS;
  }
  await img.file.write(encodeHeader(p, img.filename), 0);
  await img.file.flush();
}

export { UnsupportedFeatureError };
