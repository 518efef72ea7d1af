// One image file's record: its inode and its header, read once, without opening anything that
// could block (FIFOs, sockets and devices are never opened) and without taking any lock.
import { closeSync, constants, fstatSync, openSync, readSync, statSync, type Stats } from 'node:fs';
import { extname } from 'node:path';
import * as C from '../format/constants';
import { decodeHeader, isQcow2Magic, type ParsedHeader } from '../format/header';
import { StrataError, printable } from '../errors';
import type { ImageRecord } from './types';
import { localPathOrNull } from '../chain/names';

/** File names taken for raw images without being named as a backing file. */
export const RAW_EXTENSIONS = new Set(['.img', '.raw']);
/** Extensions that say "qcow2": such a file without the magic is a damaged image, not a stranger. */
const QCOW2_EXTENSIONS = new Set(['.qcow2', '.qcow', '.qcow2c']);

/** The scratch buffer for header reads: a whole header cluster up to the default 64 KiB. */
const FIRST_READ = 64 * 1024;

export type Candidate = 'qcow2-or-raw' | 'qcow2-only' | 'backing';

/**
 * Whether a directory entry is worth opening: qcow2 is known by its magic, raw only by its
 * extension (or because an image names it as its backing file).
 */
export function candidateKind(name: string): Candidate {
  const ext = extname(name).toLowerCase();
  if (RAW_EXTENSIONS.has(ext)) return 'qcow2-or-raw';
  return 'qcow2-only';
}

function baseRecord(path: string, realPath: string, st: Stats, external: boolean): ImageRecord {
  return {
    path, realPath, dev: st.dev, ino: st.ino, format: null, error: null,
    virtualSize: 0, actualSize: st.blocks * 512, fileSize: st.size,
    clusterSize: null, compat: null, extendedL2: false, compressionType: null, refcountBits: null, lazyRefcounts: false,
    snapshots: 0, bitmaps: 0, dirty: false, corrupt: false, backingName: null, backingFormat: null, hasData: null,
    mtimeMs: st.mtimeMs,
    // Where the file system keeps no birth time, node reports 0 (or the epoch's ctime).
    birthtimeMs: st.birthtimeMs > 0 ? st.birthtimeMs : null,
    external,
  };
}

function errnoMessage(err: unknown): string {
  const e = err as NodeJS.ErrnoException;
  switch (e?.code) {
    case 'EACCES': case 'EPERM': return 'permission denied';
    case 'ENOENT': return 'no such file';
    case 'ELOOP': return 'too many levels of symbolic links';
    default: return e?.message ?? String(err);
  }
}

/** One scratch buffer for every header read: a scan of thousands of files makes no garbage. */
const scratch = Buffer.alloc(FIRST_READ);

function readAt(fd: number, buf: Buffer, length: number): number {
  let got = 0;
  while (got < length) {
    const n = readSync(fd, buf, got, length - got, got);
    if (n === 0) break;
    got += n;
  }
  return got;
}

/**
 * Reads the record of the file at `path`, or null when it is not an image of the kind asked
 * for (a file without the qcow2 magic and no raw extension, or not a regular file). Files are
 * opened non-blocking and checked before anything is read, so a FIFO or device never hangs
 * the scan. Never throws for a bad file: the problem is recorded instead.
 */
export function readRecord(path: string, realPath: string, kind: Candidate, external = false): ImageRecord | null {
  const ext = extname(path).toLowerCase();
  let fd: number;
  try {
    fd = openSync(path, constants.O_RDONLY | constants.O_NONBLOCK | constants.O_NOCTTY);
  } catch (err) {
    const s = statOrError(path);
    if (!('st' in s)) return null;
    if (!s.st.isFile() && kind !== 'backing') return null;
    const rec = baseRecord(path, realPath, s.st, external);
    rec.error = { code: 'unreadable', message: `cannot open: ${errnoMessage(err)}` };
    return rec;
  }
  try {
    const st = fstatSync(fd);
    const rec = baseRecord(path, realPath, st, external);
    if (!st.isFile() && !st.isBlockDevice()) {
      if (kind !== 'backing') return null;
      rec.error = { code: 'unreadable', message: 'not a regular file or block device' };
      return rec;
    }
    const size = st.isBlockDevice() ? Number.MAX_SAFE_INTEGER : st.size;
    // The fixed header, its extensions and the backing name fit in the first 4 KiB of nearly
    // every image; the whole header cluster is read only when they do not.
    let head = scratch;
    let got = readAt(fd, head, Math.min(4096, size));
    if (!isQcow2Magic(head.subarray(0, got))) {
      if (kind === 'qcow2-only' && !QCOW2_EXTENSIONS.has(ext)) return null;
      if (QCOW2_EXTENSIONS.has(ext) && kind !== 'backing') {
        rec.error = { code: 'damaged', message: got < 4 ? 'file is empty or too short for an image header' : 'named like a qcow2 image but has no qcow2 header (bad magic)' };
        return rec;
      }
      rec.format = 'raw';
      rec.virtualSize = size === Number.MAX_SAFE_INTEGER ? 0 : size;
      return rec;
    }
    rec.format = 'qcow2';
    const clusterBits = got >= 24 ? head.readUInt32BE(20) : 0;
    const clusterSize = clusterBits >= C.MIN_CLUSTER_BITS && clusterBits <= C.MAX_CLUSTER_BITS ? 2 ** clusterBits : 0;
    let p: ParsedHeader;
    try {
      try {
        p = decodeHeader(head.subarray(0, Math.min(got, clusterSize || got)), path);
      } catch (err) {
        if (got < 4096 || clusterSize <= got) throw err;
        // Cut short by the 4 KiB read: decode the whole header cluster.
        head = clusterSize <= scratch.length ? scratch : Buffer.allocUnsafe(clusterSize);
        got = readAt(fd, head, Math.min(clusterSize, size));
        p = decodeHeader(head.subarray(0, got), path);
      }
    } catch (err) {
      const msg = err instanceof StrataError ? err.message.replace(`${path}: `, '') : String(err);
      rec.error = { code: 'damaged', message: printable(msg) };
      return rec;
    }
    const h = p.header;
    rec.virtualSize = h.size;
    rec.clusterSize = 2 ** h.clusterBits;
    rec.compat = h.version === 2 ? '0.10' : '1.1';
    rec.extendedL2 = (h.incompatibleFeatures & C.INCOMPAT_EXTL2) !== 0n;
    rec.compressionType = h.compressionType === C.COMPRESSION_ZSTD ? 'zstd' : 'zlib';
    rec.refcountBits = 2 ** h.refcountOrder;
    rec.lazyRefcounts = (h.compatibleFeatures & C.COMPAT_LAZY_REFCOUNTS) !== 0n;
    rec.snapshots = h.nbSnapshots;
    // Bitmaps count only while their autoclear bit says the directory is valid (as QEMU).
    rec.bitmaps = p.bitmaps && (h.autoclearFeatures & C.AUTOCLEAR_BITMAPS) ? p.bitmaps.nbBitmaps : 0;
    rec.dirty = (h.incompatibleFeatures & C.INCOMPAT_DIRTY) !== 0n;
    rec.corrupt = (h.incompatibleFeatures & C.INCOMPAT_CORRUPT) !== 0n;
    rec.backingName = p.backingFile;
    rec.backingFormat = p.backingFormat;
    if (p.backingFile && h.l1Size * 8 <= MAX_L1_PEEK && h.l1TableOffset + h.l1Size * 8 <= size) rec.hasData = l1HasEntries(fd, h.l1TableOffset, h.l1Size);
    return rec;
  } catch (err) {
    const s = statOrError(path);
    if (!('st' in s)) return null;
    const rec = baseRecord(path, realPath, s.st, external);
    rec.error = { code: 'unreadable', message: `cannot read: ${errnoMessage(err)}` };
    return rec;
  } finally {
    closeSync(fd);
  }
}

/** Overlays' L1 tables up to this size are read to tell an empty overlay (a few KiB for most). */
const MAX_L1_PEEK = 1 << 20;

function l1HasEntries(fd: number, offset: number, entries: number): boolean {
  const b = entries * 8 <= scratch.length ? scratch.subarray(0, entries * 8) : Buffer.alloc(entries * 8);
  b.fill(0);
  readSync(fd, b, 0, b.length, offset);
  for (let i = 0; i < b.length; i += 4) if (b.readUInt32BE(i) !== 0) return true;
  return false;
}

/** stat() that reports instead of throwing. */
export function statOrError(path: string): { st: Stats } | { code: string; message: string } {
  try {
    return { st: statSync(path) };
  } catch (err) {
    return { code: (err as NodeJS.ErrnoException).code ?? 'EIO', message: errnoMessage(err) };
  }
}

/** Backing names in QEMU's protocol syntaxes (nbd:, http:, json:...) that name no local path. */
export function isProtocolName(name: string): boolean {
  // As qemu-img reads names: file: and json: over a file name local files (core/chain/names.ts).
  return localPathOrNull(name) === null;
}
