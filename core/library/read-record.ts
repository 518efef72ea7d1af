// One image file's record: its inode and its header, read once, without opening anything that
// could block (FIFOs, sockets and devices are never opened) and without taking any lock.
import { closeSync, constants, fstatSync, openSync, readSync, statSync, type Stats } from 'node:fs';
import { extname } from 'node:path';
import * as C from '../format/constants';
import { decodeHeader, isQcow2Magic } from '../format/header';
import { StrataError, printable } from '../errors';
import type { ImageRecord } from './types';

/** File names taken for raw images without being named as a backing file. */
export const RAW_EXTENSIONS = new Set(['.img', '.raw']);
/** Extensions that say "qcow2": such a file without the magic is a damaged image, not a stranger. */
const QCOW2_EXTENSIONS = new Set(['.qcow2', '.qcow', '.qcow2c']);

/** Enough for the fixed header, its extensions and the backing name in all but odd images. */
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

/**
 * Reads the record of the file at `path` (already known to exist), or null when it is not an
 * image of the kind asked for (a file without the qcow2 magic and no raw extension).
 * `st` is the file's stat (symlinks followed). Never throws for a bad file: the problem is
 * recorded instead.
 */
export function readRecord(path: string, realPath: string, st: Stats, kind: Candidate, external = false): ImageRecord | null {
  const rec = baseRecord(path, realPath, st, external);
  const ext = extname(path).toLowerCase();
  if (!st.isFile() && !st.isBlockDevice()) {
    if (kind !== 'backing') return null;
    rec.error = { code: 'unreadable', message: 'not a regular file or block device' };
    return rec;
  }
  let fd: number;
  try {
    // O_NONBLOCK: should the file have been swapped for a FIFO since the stat, open returns at once.
    fd = openSync(path, constants.O_RDONLY | constants.O_NONBLOCK | constants.O_NOCTTY);
  } catch (err) {
    rec.error = { code: 'unreadable', message: `cannot open: ${errnoMessage(err)}` };
    return rec;
  }
  try {
    const now = fstatSync(fd);
    if (!now.isFile() && !now.isBlockDevice()) {
      if (kind !== 'backing') return null;
      rec.error = { code: 'unreadable', message: 'not a regular file or block device' };
      return rec;
    }
    const size = now.isBlockDevice() ? Number.MAX_SAFE_INTEGER : now.size;
    let head = Buffer.allocUnsafe(Math.min(FIRST_READ, Math.max(0, size)));
    let got = head.length ? readSync(fd, head, 0, head.length, 0) : 0;
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
    // The header is the first cluster: read it whole when the extensions or the backing name
    // may lie past what was read.
    const clusterBits = got >= 24 ? head.readUInt32BE(20) : 0;
    if (clusterBits >= C.MIN_CLUSTER_BITS && clusterBits <= C.MAX_CLUSTER_BITS && 2 ** clusterBits > got && got === FIRST_READ) {
      head = Buffer.allocUnsafe(2 ** clusterBits);
      got = readSync(fd, head, 0, head.length, 0);
    }
    try {
      const p = decodeHeader(head.subarray(0, got), path);
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
    } catch (err) {
      const msg = err instanceof StrataError ? err.message.replace(`${path}: `, '') : String(err);
      rec.error = { code: 'damaged', message: printable(msg) };
    }
    return rec;
  } catch (err) {
    rec.error = { code: 'unreadable', message: `cannot read: ${errnoMessage(err)}` };
    return rec;
  } finally {
    closeSync(fd);
  }
}

/** Overlays' L1 tables up to this size are read to tell an empty overlay (a few KiB for most). */
const MAX_L1_PEEK = 1 << 20;

function l1HasEntries(fd: number, offset: number, entries: number): boolean {
  const b = Buffer.alloc(entries * 8);
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
  return /^[a-z][a-z0-9+.-]*:/i.test(name) && !name.startsWith('file:');
}
