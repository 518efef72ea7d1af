// Persistent dirty bitmaps of an opened image: the directory, read and checked at open as
// QEMU does (an image whose directory is broken does not open), and kept valid by writes.
import * as C from '../format/constants';
import { CorruptImageError, UnsupportedFeatureError, UsageError, printable } from '../errors';
import {
  activeBitmapsExtension, bitmapDataBytes, decodeBitmapDirectory, decodeBitmapTableEntry, encodeBitmapDirectory,
  BITMAPS_EXT_SIZE, BME_FLAG_AUTO, BME_FLAG_IN_USE, MAX_BITMAP_DIRECTORY_SIZE, type BitmapDirectoryEntry,
} from '../format/bitmaps';
import { extensionDataOffset, type BitmapsExtension, type ParsedHeader } from '../format/header';
import type { BlockFile } from '../io/block-file';
import type { Qcow2Writable } from './qcow2-write';

/**
 * The bitmap directory, or null when the image has no bitmaps in use (none, or the autoclear
 * bit is clear). The extension is checked before anything is read or allocated from it.
 */
export async function loadBitmapDirectory(file: BlockFile, p: ParsedHeader, fileSize: number, filename: string): Promise<BitmapDirectoryEntry[] | null> {
  const ext = activeBitmapsExtension(p, filename);
  if (!ext) return null;
  if (ext.bitmapDirectoryOffset + ext.bitmapDirectorySize > fileSize) {
    throw new CorruptImageError(`the bitmap directory at offset ${ext.bitmapDirectoryOffset} (${ext.bitmapDirectorySize} bytes) lies past the end of the file (${fileSize} bytes)`, filename);
  }
  const buf = Buffer.alloc(ext.bitmapDirectorySize);
  await file.read(buf, ext.bitmapDirectoryOffset);
  return decodeBitmapDirectory(buf, ext, 2 ** p.header.clusterBits, p.header.size, filename);
}

/** One bitmap of a writable image: its directory entry and, once loaded, its bits. */
interface Tracked {
  entry: BitmapDirectoryEntry;
  /** Bit k (byte k >> 3, bit k & 7) covers guest bytes [k, k+1) * granularity. */
  data: Uint8Array | null;
  /** Written anew (data, table, directory entry) at close; in use on disk until then. */
  rewrite: boolean;
}

/** QEMU's refusal to resize (or otherwise use) a bitmap left in use. */
export function inconsistentBitmap(e: BitmapDirectoryEntry, file: string): UnsupportedFeatureError {
  return new UnsupportedFeatureError(`Bitmap '${printable(e.name)}' is inconsistent and cannot be used (remove it with \`qemu-img bitmap --remove\` first)`, file);
}

const isEnabled = (e: BitmapDirectoryEntry) => (e.flags & BME_FLAG_AUTO) !== 0 && (e.flags & BME_FLAG_IN_USE) === 0;

/** Sets bits [a, b) of `bits`. */
function setBits(bits: Uint8Array, a: number, b: number): void {
  while (a < b && (a & 7) !== 0) { bits[a >>> 3]! |= 1 << (a & 7); a++; }
  const wholeEnd = b - (b & 7);
  if (a < wholeEnd) { bits.fill(0xff, a >>> 3, wholeEnd >>> 3); a = wholeEnd; }
  while (a < b) { bits[a >>> 3]! |= 1 << (a & 7); a++; }
}

/**
 * Keeps the persistent bitmaps of a writable image valid, as QEMU does: at the first change
 * the enabled bitmaps (auto, consistent) are loaded and marked in use on disk; every written,
 * zeroed or discarded range sets their bits; at close each is written anew (data clusters,
 * table, then a directory without the in-use flag, then the header, then the old clusters
 * are freed), so a crash at any point leaves them in use (inconsistent, as the spec has it)
 * or complete, and refcounts right. Disabled bitmaps are left as they are (unless a resize
 * changes their size); in-use ones are never touched, as QEMU leaves them.
 */
export class BitmapTracker {
  private readonly items: Tracked[];

  constructor(private readonly img: Qcow2Writable, entries: BitmapDirectoryEntry[]) {
    this.items = entries.map((entry) => ({ entry: { ...entry }, data: null, rewrite: false }));
  }

  private get cs(): number { return this.img.geometry.clusterSize; }

  /** Before the first change, under the metadata mutex. */
  async start(): Promise<void> {
    const todo = this.items.filter((t) => isEnabled(t.entry));
    if (todo.length === 0) return;
    for (const t of todo) t.data = await this.load(t.entry);
    await this.markInUse(todo);
  }

  /**
   * Before a resize, under the metadata mutex, with start() done: an inconsistent bitmap
   * cannot be resized (QEMU refuses too); disabled ones are loaded and marked in use as well,
   * since their tables must be written for the new size.
   */
  async beforeResize(): Promise<void> {
    this.checkResizable();
    const todo = this.items.filter((t) => !t.rewrite);
    if (todo.length === 0) return;
    for (const t of todo) t.data = await this.load(t.entry);
    await this.markInUse(todo);
  }

  /** Checks what beforeResize would refuse, without changing anything. */
  checkResizable(): void {
    const bad = this.items.find((t) => (t.entry.flags & BME_FLAG_IN_USE) !== 0 && !t.rewrite);
    if (bad) throw inconsistentBitmap(bad.entry, this.img.filename);
  }

  /** The disk is now `size` bytes: bits past it are dropped, new ones are clear (as QEMU's). */
  resized(size: number): void {
    for (const t of this.items) {
      if (!t.data) continue;
      const g = 2 ** t.entry.granularityBits;
      const bits = Math.ceil(size / g);
      const next = new Uint8Array(bitmapDataBytes(size, t.entry.granularityBits));
      next.set(t.data.subarray(0, Math.min(next.length, t.data.length)));
      // The spec wants the unused tail bits zero.
      if (bits & 7) next[next.length - 1]! &= (1 << (bits & 7)) - 1;
      t.data = next;
    }
  }

  /** A guest write, zero write or discard of [offset, offset+length). */
  markDirty(offset: number, length: number): void {
    if (length <= 0) return;
    for (const t of this.items) {
      if (!t.data || !(t.entry.flags & BME_FLAG_AUTO)) continue;
      const g = 2 ** t.entry.granularityBits;
      const end = Math.min(t.data.length * 8, Math.ceil((offset + length) / g));
      setBits(t.data, Math.floor(offset / g), end);
    }
  }

  /** At close, after the guest data is flushed. */
  async store(): Promise<void> {
    const todo = this.items.filter((t) => t.rewrite);
    if (todo.length === 0) return;
    const img = this.img;
    const cs = this.cs;
    const old: { offset: number; length: number; punch?: boolean }[] = [];
    for (const t of todo) {
      const data = t.data!;
      const entries = Math.ceil(data.length / cs);
      const table = Buffer.alloc(entries * 8);
      const oldTable = await this.readTable(t.entry);
      for (let i = 0; i < t.entry.bitmapTableSize; i++) {
        const e = decodeBitmapTableEntry(oldTable, i, cs, img.filename);
        // QEMU frees a replaced bitmap's data clusters with discard "always".
        if (e.kind === 'data') old.push({ offset: e.offset, length: cs, punch: true });
      }
      old.push({ offset: t.entry.bitmapTableOffset, length: Math.ceil(t.entry.bitmapTableSize * 8 / cs) * cs });
      for (let i = 0; i < entries; i++) {
        const chunk = data.subarray(i * cs, Math.min(data.length, (i + 1) * cs));
        if (chunk.every((b) => b === 0)) continue;
        const at = await img.mutex.run(async () => { const o = await img.refcounts.alloc(1); img.noteAlloc(); return o; });
        const cluster = Buffer.alloc(cs);
        cluster.set(chunk);
        await img.file.write(cluster, at);
        table.writeBigUInt64BE(BigInt(at), i * 8);
      }
      const tableOffset = await img.mutex.run(async () => { const o = await img.refcounts.alloc(Math.ceil(table.length / cs)); img.noteAlloc(); return o; });
      await img.file.write(table, tableOffset);
      t.entry = { ...t.entry, bitmapTableOffset: tableOffset, bitmapTableSize: entries };
    }
    // Data and tables (and their refcounts) on disk before the directory points to them.
    await img.flush();
    for (const t of todo) t.entry.flags &= ~BME_FLAG_IN_USE;
    await img.mutex.run(() => this.writeDirectory());
    for (const t of todo) t.rewrite = false;
    await img.mutex.run(async () => { img.pendingFrees.push(...old); });
    await img.flush();
  }

  private async readTable(e: BitmapDirectoryEntry): Promise<Buffer> {
    const table = Buffer.alloc(e.bitmapTableSize * 8);
    await this.img.file.read(table, e.bitmapTableOffset);
    return table;
  }

  /** load_bitmap: the bits as stored, the table checked and sized for the disk as QEMU requires. */
  private async load(e: BitmapDirectoryEntry): Promise<Uint8Array> {
    const img = this.img;
    const cs = this.cs;
    const bytes = bitmapDataBytes(img.virtualSize, e.granularityBits);
    if (e.bitmapTableSize !== Math.ceil(bytes / cs)) {
      throw new CorruptImageError(`Could not read bitmap '${printable(e.name)}' from image: its table has ${e.bitmapTableSize} entries, the disk needs ${Math.ceil(bytes / cs)}`, img.filename);
    }
    const table = await this.readTable(e);
    const data = new Uint8Array(bytes);
    const cluster = Buffer.alloc(cs);
    for (let i = 0; i < e.bitmapTableSize; i++) {
      const t = decodeBitmapTableEntry(table, i, cs, img.filename);
      const n = Math.min(cs, bytes - i * cs);
      if (t.kind === 'ones') data.fill(0xff, i * cs, i * cs + n);
      else if (t.kind === 'data') {
        await img.file.read(cluster, t.offset);
        data.set(cluster.subarray(0, n), i * cs);
      }
    }
    const bits = Math.ceil(img.virtualSize / 2 ** e.granularityBits);
    if (bits & 7) data[data.length - 1]! &= (1 << (bits & 7)) - 1;
    return data;
  }

  /** Marks `todo` in use on disk (a new directory and header), under the metadata mutex. */
  private async markInUse(todo: Tracked[]): Promise<void> {
    for (const t of todo) { t.rewrite = true; t.entry.flags |= BME_FLAG_IN_USE; }
    await this.writeDirectory();
  }

  /**
   * Writes the directory from the current entries to new clusters, durably, switches the
   * header's bitmaps extension to it and queues the old one to be freed. Under the mutex.
   */
  private async writeDirectory(): Promise<void> {
    const img = this.img;
    const cs = this.cs;
    const dir = encodeBitmapDirectory(this.items.map((t) => t.entry));
    if (dir.length > MAX_BITMAP_DIRECTORY_SIZE) throw new UsageError(`${img.filename}: the bitmap directory would be too large`);
    const off = await img.refcounts.alloc(Math.ceil(dir.length / cs));
    img.noteAlloc();
    await img.file.write(dir, off);
    await img.refcounts.writeBack();
    await img.file.flush();
    const ext = img.parsed.bitmaps!;
    const oldDir = { offset: ext.bitmapDirectoryOffset, length: Math.ceil(ext.bitmapDirectorySize / cs) * cs };
    await switchBitmapsExtension(img, { nbBitmaps: this.items.length, bitmapDirectorySize: dir.length, bitmapDirectoryOffset: off });
    img.bitmaps = this.items.map((t) => ({ ...t.entry }));
    img.pendingFrees.push(oldDir);
  }
}

/**
 * Points the header's bitmaps extension at a new directory: the autoclear bit is cleared
 * first and set again last (each write flushed), as QEMU updates the extension, so a torn
 * update can only make the bitmaps inconsistent, never point them at the wrong directory.
 */
export async function switchBitmapsExtension(img: Qcow2Writable, ext: BitmapsExtension): Promise<void> {
  const h = img.header;
  const cs = img.geometry.clusterSize;
  const field = Buffer.alloc(8);
  h.autoclearFeatures &= ~C.AUTOCLEAR_BITMAPS;
  field.writeBigUInt64BE(h.autoclearFeatures);
  await img.file.write(field, 88);
  await img.file.flush();
  const cluster = Buffer.alloc(cs);
  await img.file.read(cluster, 0);
  const at = extensionDataOffset(cluster, h, C.EXT_BITMAPS);
  if (at === null) throw new CorruptImageError('the bitmaps extension is gone from the header', img.filename);
  const data = Buffer.alloc(BITMAPS_EXT_SIZE);
  data.writeUInt32BE(ext.nbBitmaps, 0);
  data.writeBigUInt64BE(BigInt(ext.bitmapDirectorySize), 8);
  data.writeBigUInt64BE(BigInt(ext.bitmapDirectoryOffset), 16);
  await img.file.write(data, at);
  await img.file.flush();
  h.autoclearFeatures |= C.AUTOCLEAR_BITMAPS;
  field.writeBigUInt64BE(h.autoclearFeatures);
  await img.file.write(field, 88);
  await img.file.flush();
  img.parsed.bitmaps = { ...ext };
  const known = img.parsed.extensions.find((e) => e.type === C.EXT_BITMAPS);
  if (known) known.data = data;
}
