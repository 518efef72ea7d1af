// The qcow2 driver's read side: open and validate, map guest ranges to runs, read through
// the chain, report block status the way QEMU does.
import * as C from '../format/constants';
import { CorruptImageError, printable } from '../errors';
import { decodeHeader, checkIncompatibleFeatures, hasExtendedL2, hasExternalData, type ParsedHeader } from '../format/header';
import { decodeL1Entry, decodeL2Entry, decodeL2Bitmap, subclusterState, compressedRange, type L2Entry } from '../format/l2';
import { decodeSnapshotTable, type SnapshotEntry } from '../format/snapshot';
import { countNonZeroRefcounts, decodeReftableEntry, refcountBlockEntries } from '../format/refcount';
import { decompressCluster, type CompressionType } from '../codec/index';
import type { BlockFile } from '../io/block-file';
import type { DiskImage, LayerStatus, ReadSegment } from './image';
import { TableCache } from './l2-cache';
import { loadBitmapDirectory } from './bitmaps';
import type { BitmapDirectoryEntry } from '../format/bitmaps';
import { native } from '../io/native';
import { BufferArena } from '../io/buffers';
import { AES_SECTOR, type AesCipher } from './aes';
import type { LuksCipher } from './luks';

/** The cipher of an encrypted image: both work on whole 512-byte sectors. */
export type SectorCipher = AesCipher | LuksCipher;

export interface Qcow2OpenOptions {
  /** Bytes of L2 tables to keep cached (default 32 MiB). */
  l2CacheBytes?: number;
}

/** A run of guest bytes with one state in this layer. */
export interface Run {
  offset: number;
  length: number;
  state: 'unallocated' | 'zero' | 'data' | 'compressed';
  /** Host offset of the run's first byte: data, and zero runs over a preallocated cluster; otherwise null. */
  hostOffset: number | null;
  /** Compressed runs: the cluster's compressed data and where the guest cluster starts. */
  compressed?: { hostOffset: number; sectors: number; clusterStart: number };
}

export interface Geometry {
  clusterBits: number;
  clusterSize: number;
  extendedL2: boolean;
  /** L2 entries per table. */
  l2Entries: number;
  subclusterSize: number;
  /** Guest data lives in an external data file, cluster for cluster at the guest offset. */
  externalData: boolean;
}

export function geometryOf(p: ParsedHeader): Geometry {
  const clusterBits = p.header.clusterBits;
  const clusterSize = 2 ** clusterBits;
  const extendedL2 = hasExtendedL2(p.header);
  return {
    clusterBits, clusterSize, extendedL2,
    l2Entries: clusterSize / (extendedL2 ? C.L2E_SIZE_EXTENDED : C.L2E_SIZE_NORMAL),
    subclusterSize: extendedL2 ? clusterSize / C.SUBCLUSTERS_PER_CLUSTER : clusterSize,
    externalData: hasExternalData(p.header),
  };
}

const DEFAULT_L2_CACHE_BYTES = 32 * 1024 * 1024;

type Qcow2Ctor<T> = new (
  filename: string, file: BlockFile, parsed: ParsedHeader, l1: Buffer, snapshots: SnapshotEntry[],
  snapshotTableSize: number, fileSize: number, l2Cache: TableCache | null, opts: Qcow2OpenOptions,
) => T;

/** True when the L2 entry at byte `o` (and, extended, its bitmap) is all zero: unallocated. */
function isEmptyEntry(t: Buffer, o: number, es: number): boolean {
  for (let i = o; i < o + es; i += 4) {
    if (t[i] !== 0 || t[i + 1] !== 0 || t[i + 2] !== 0 || t[i + 3] !== 0) return false;
  }
  return true;
}

/**
 * Standard L2 entries only: the first index in (index, end) whose entry is not its
 * predecessor's plus one cluster with the same flags and reserved bits (end when all are). Such
 * a run is what the first entry decoded to, cluster after cluster: it needs no decoding of its
 * own. Offsets are compared as numbers below 2^56, flags and reserved bits as the top byte.
 */
function contiguousEnd(t: Buffer, index: number, end: number, clusterSize: number): number {
  // The addon walks 16 million entries (1 TiB, preallocated) in ~20 ms; this loop took 1.6 s.
  const n = native();
  if (n?.l2RunEnd && end - index > 16) return n.l2RunEnd(t, index, end, clusterSize);
  let o = index * 8;
  const top = t[o]!;
  let prev = (t.readUInt32BE(o) & 0x00ffffff) * 0x1_0000_0000 + t.readUInt32BE(o + 4);
  let k = index + 1;
  for (o += 8; k < end; k++, o += 8) {
    const next = (t.readUInt32BE(o) & 0x00ffffff) * 0x1_0000_0000 + t.readUInt32BE(o + 4);
    if (t[o] !== top || next !== prev + clusterSize) break;
    prev = next;
  }
  return k;
}

export class Qcow2Image implements DiskImage {
  readonly format = 'qcow2' as const;
  backing: DiskImage | null = null;
  displayName?: string;
  noDirname?: boolean;
  readonly geometry: Geometry;
  /** The active L1 table as read from disk (or a snapshot's, for a snapshot view). */
  l1: Buffer;
  virtualSize: number;
  snapshots: SnapshotEntry[];
  /** Bytes of the snapshot table as stored. */
  snapshotTableSize: number;
  /** The persistent bitmaps (checked at open, as QEMU does), or null when there are none in use. */
  bitmaps: BitmapDirectoryEntry[] | null = null;
  protected fileSize: number;
  /** @internal */
  readonly l2Cache: TableCache;
  private lastCompressed: { hostOffset: number; data: Buffer } | null = null;
  private readonly tableArena = new BufferArena();

  constructor(
    readonly filename: string,
    readonly file: BlockFile,
    public parsed: ParsedHeader,
    l1: Buffer,
    snapshots: SnapshotEntry[],
    snapshotTableSize: number,
    fileSize: number,
    l2Cache: TableCache | null,
    opts: Qcow2OpenOptions,
  ) {
    this.geometry = geometryOf(parsed);
    this.l1 = l1;
    this.virtualSize = parsed.header.size;
    this.snapshots = snapshots;
    this.snapshotTableSize = snapshotTableSize;
    this.fileSize = fileSize;
    const cacheBytes = opts.l2CacheBytes ?? DEFAULT_L2_CACHE_BYTES;
    this.l2Cache = l2Cache ?? new TableCache(Math.max(16, Math.floor(cacheBytes / this.geometry.clusterSize)));
  }

  get header() { return this.parsed.header; }

  private externalDataFile: BlockFile | null = null;

  /**
   * Where the guest data clusters live: the image file itself, or the external data file
   * (incompatible feature bit 2) once the opener attached it. Metadata is always in `file`.
   */
  get dataFile(): BlockFile {
    if (!this.geometry.externalData) return this.file;
    if (!this.externalDataFile) throw new CorruptImageError(`the external data file${this.parsed.dataFile ? ` '${printable(this.parsed.dataFile)}'` : ''} was not opened`, this.filename);
    return this.externalDataFile;
  }

  /** True when the image has an external data file and it is opened. */
  get hasDataFile(): boolean { return this.externalDataFile !== null; }

  /**
   * The cipher of an encrypted image (AES, crypt_method 1, or LUKS, 2), attached by the opener
   * from the secret given for it; null for an image that is not encrypted or was opened without I/O.
   */
  cipher: SectorCipher | null = null;

  /** True when the header says the guest data is encrypted. */
  get encrypted(): boolean { return this.parsed.header.cryptMethod !== C.CRYPT_NONE; }

  /** Attaches the cipher of an encrypted image (the chain opener does, after open). */
  attachCipher(c: SectorCipher): void { this.cipher = c; }

  /**
   * The offset whose sector numbers a cluster's encryption IVs use: the guest offset for AES,
   * the host offset for LUKS (QEMU's crypt_physical_offset), so a LUKS cluster moved or copied
   * is re-encrypted for its new place.
   */
  cryptOffset(guest: number, host: number): number { return this.cipher?.physical ? host : guest; }

  /** The cipher, or the refusal when the image is encrypted and was opened without its key. */
  needCipher(): SectorCipher {
    if (this.cipher) return this.cipher;
    throw new CorruptImageError('the image is encrypted and was opened without its key (encrypt.key-secret): its data cannot be read or written', this.filename);
  }

  /** Attaches the opened external data file (the chain opener does, after open). */
  attachDataFile(f: BlockFile): void { this.externalDataFile = f; }
  get backingFile(): string | null { return this.parsed.backingFile; }
  get backingFormat(): string | null { return this.parsed.backingFormat; }
  get compressionType(): CompressionType { return this.parsed.header.compressionType as CompressionType; }

  static async open<T extends Qcow2Image>(this: Qcow2Ctor<T>, filename: string, file: BlockFile, opts: Qcow2OpenOptions = {}): Promise<T> {
    const fileSize = await file.size();
    const probe = Buffer.alloc(C.HEADER_V3_WITH_COMPRESSION_LENGTH);
    await file.read(probe, 0);
    // Decode the fixed fields first to learn the cluster size, then read the whole header cluster.
    const clusterBits = probe.length >= 24 ? probe.readUInt32BE(20) : 0;
    const headerBytes = clusterBits >= C.MIN_CLUSTER_BITS && clusterBits <= C.MAX_CLUSTER_BITS ? 2 ** clusterBits : probe.length;
    const headerBuf = Buffer.alloc(Math.max(headerBytes, probe.length));
    const got = await file.read(headerBuf, 0);
    // Only what the file holds: a header cut short must be reported as such.
    const parsed = decodeHeader(headerBuf.subarray(0, got), filename);
    checkIncompatibleFeatures(parsed, filename);
    const h = parsed.header;
    const clusterSize = 2 ** h.clusterBits;
    const within = (what: string, off: number, len: number) => {
      if (off + len > fileSize) {
        throw new CorruptImageError(`${what} at offset ${off} (${len} bytes) lies past the end of the file (${fileSize} bytes)`, filename);
      }
    };
    within('L1 table', h.l1TableOffset, h.l1Size * 8);
    within('refcount table', h.refcountTableOffset, h.refcountTableClusters * clusterSize);
    const l1 = Buffer.alloc(h.l1Size * 8);
    if (h.l1Size) await file.read(l1, h.l1TableOffset);
    let snapshots: SnapshotEntry[] = [];
    let snapshotTableSize = 0;
    if (h.nbSnapshots > 0) {
      within('snapshot table', h.snapshotsOffset, C.SNAPSHOT_ENTRY_FIXED_SIZE * h.nbSnapshots);
      const readAt = async (n: number) => {
        const len = Math.min(n, fileSize - h.snapshotsOffset);
        const b = Buffer.alloc(len);
        await file.read(b, h.snapshotsOffset);
        return b;
      };
      let have = Math.min(64 * 1024, fileSize - h.snapshotsOffset);
      const first = await readAt(have);
      const t = await decodeSnapshotTable(first, h.nbSnapshots, h.clusterBits, async (need) => {
        if (h.snapshotsOffset + need > fileSize) return null;
        // Grow geometrically from what we have, so a large table is read a few times, not per
        // entry, and never past QEMU's limit on it (decodeSnapshotTable asks for no more).
        have = Math.min(C.MAX_SNAPSHOTS_SIZE, Math.max(need, have * 2));
        return readAt(have);
      }, filename);
      snapshots = t.entries;
      snapshotTableSize = t.tableSize;
      for (const s of snapshots) within(`L1 table of snapshot '${printable(s.name)}'`, s.l1TableOffset, s.l1Size * 8);
    }
    const bitmaps = await loadBitmapDirectory(file, parsed, fileSize, filename);
    const img = new this(filename, file, parsed, l1, snapshots, snapshotTableSize, fileSize, null, opts);
    img.bitmaps = bitmaps;
    return img;
  }

  /** A read-only view of an internal snapshot's content (shares the file and the L2 cache). */
  async snapshotView(s: SnapshotEntry): Promise<Qcow2Image> {
    const l1 = Buffer.alloc(s.l1Size * 8);
    await this.file.read(l1, s.l1TableOffset);
    const view = new Qcow2Image(this.filename, this.file, this.parsed, l1, this.snapshots, this.snapshotTableSize, this.fileSize, this.l2Cache, {});
    view.cipher = this.cipher;
    // qemu-img convert -l reads the snapshot at the image's current size.
    view.virtualSize = this.parsed.header.size;
    view.backing = this.backing;
    return view;
  }

  findSnapshot(idOrName: string): SnapshotEntry | undefined {
    return this.snapshots.find((s) => s.id === idOrName) ?? this.snapshots.find((s) => s.name === idOrName);
  }

  protected get l1Entries(): number { return this.l1.length / 8; }

  /** Loads (through the cache) the L2 table at `l2Offset`, validating where it lies. */
  async l2Table(l2Offset: number): Promise<Buffer> {
    const { clusterSize } = this.geometry;
    if (l2Offset % clusterSize !== 0) throw new CorruptImageError(`L2 table offset 0x${l2Offset.toString(16)} is not aligned to the cluster size`, this.filename);
    return this.l2Cache.get(l2Offset, async () => {
      if (l2Offset + clusterSize > this.fileSize) this.fileSize = await this.file.size();
      if (l2Offset + clusterSize > this.fileSize) {
        throw new CorruptImageError(`L2 table at offset 0x${l2Offset.toString(16)} lies past the end of the file (${this.fileSize} bytes)`, this.filename);
      }
      // From huge-page chunks: a walk over every table of a large image (map, convert) faults
      // in one page per 2 MiB instead of one per 4 KiB, and leaves far less for the GC.
      const t = this.tableArena.take(clusterSize);
      await this.file.read(t, l2Offset);
      return t;
    });
  }

  /**
   * Starts loading the L2 table of L1 entry `l1Index` if it is not cached: a walk over the
   * image (map, block status, a copy) asks for the tables in order, and the next one's read
   * then overlaps this one's decoding instead of waiting its turn in the thread pool. Only for
   * images opened read-only (a writer's tables change under it). A failed read is not reported
   * here: the walk meets it again when it gets there, and reports it then.
   */
  private readAhead(l1Index: number): void {
    if (this.file.writable || l1Index >= this.l1Entries) return;
    const next = decodeL1Entry(this.l1, l1Index).l2Offset;
    if (next === 0 || next % this.geometry.clusterSize !== 0 || this.l2Cache.has(next)) return;
    this.l2Table(next).catch(() => {});
  }

  /**
   * The runs covering [offset, offset+length) in this layer, adjacent runs of the same state
   * (and contiguous host offsets) merged. With `firstOnly`, stops once the first run is known.
   */
  /**
   * Set by `map` only: data clusters past the end of the file are reported where the L2 table
   * puts them, as qemu-img map prints them. Reads (and every job) still refuse them.
   */
  mapPastEof = false;

  async runs(offset: number, length: number, firstOnly = false): Promise<Run[]> {
    const g = this.geometry;
    const out: Run[] = [];
    const end = Math.min(offset + length, this.virtualSize);
    const push = (off: number, len: number, state: Run['state'], host: number | null, comp?: Run['compressed']) => {
      const last = out[out.length - 1];
      if (last && !comp && last.state === state && last.offset + last.length === off &&
          (host === null ? last.hostOffset === null : last.hostOffset !== null && last.hostOffset + last.length === host)) {
        last.length += len;
        return;
      }
      out.push({ offset: off, length: len, state, hostOffset: host, compressed: comp });
    };
    const l2Span = g.l2Entries * g.clusterSize;
    let pos = offset;
    while (pos < end) {
      if (firstOnly && out.length > 1) break;
      const l1Index = Math.floor(pos / l2Span);
      const spanEnd = Math.min(end, (l1Index + 1) * l2Span);
      const l2Offset = l1Index < this.l1Entries ? decodeL1Entry(this.l1, l1Index).l2Offset : 0;
      if (l2Offset === 0) {
        push(pos, spanEnd - pos, 'unallocated', null);
        pos = spanEnd;
        continue;
      }
      const table = await this.l2Table(l2Offset);
      if (spanEnd < end || firstOnly) this.readAhead(l1Index + 1);
      const where = () => `of the L2 table at 0x${l2Offset.toString(16)}`;
      const es = g.extendedL2 ? 16 : 8;
      while (pos < spanEnd) {
        if (firstOnly && out.length > 1) break;
        const clusterIndex = Math.floor(pos / g.clusterSize);
        const clusterStart = clusterIndex * g.clusterSize;
        const l2Index = clusterIndex % g.l2Entries;
        if (isEmptyEntry(table, l2Index * es, es)) {
          // A run of unallocated entries (sparse overlays are mostly these): one run, no decoding.
          let k = l2Index + 1;
          const kEnd = l2Index + Math.ceil((spanEnd - clusterStart) / g.clusterSize);
          while (k < kEnd && isEmptyEntry(table, k * es, es)) k++;
          const runEnd = Math.min(spanEnd, clusterStart + (k - l2Index) * g.clusterSize);
          push(pos, runEnd - pos, 'unallocated', null);
          pos = runEnd;
          continue;
        }
        const clusterEnd = Math.min(spanEnd, clusterStart + g.clusterSize);
        const entry = decodeL2Entry(table, l2Index, g, where, this.filename);
        if (entry.kind === 'compressed') {
          this.checkCompressed(entry, clusterStart, l2Offset, l2Index);
          push(pos, clusterEnd - pos, 'compressed', null, { hostOffset: entry.hostOffset, sectors: entry.sectors, clusterStart });
          pos = clusterEnd;
          continue;
        }
        if (entry.kind === 'normal' || entry.kind === 'zero') {
          const pending = this.checkDataCluster(entry, clusterStart);
          if (pending) await pending;
        }
        if (!g.extendedL2) {
          if (entry.kind === 'normal') {
            // Data clusters that follow each other in the file: one run, decoded once, its
            // last cluster checked against the end of the file.
            const kEnd = l2Index + Math.ceil((spanEnd - clusterStart) / g.clusterSize);
            const k = contiguousEnd(table, l2Index, kEnd, g.clusterSize);
            if (k > l2Index + 1) {
              const lastStart = clusterStart + (k - 1 - l2Index) * g.clusterSize;
              const pendingLast = this.checkDataCluster({ hostOffset: entry.hostOffset + (lastStart - clusterStart) }, lastStart);
              if (pendingLast) await pendingLast;
              const runEnd = Math.min(spanEnd, lastStart + g.clusterSize);
              push(pos, runEnd - pos, 'data', entry.hostOffset + (pos - clusterStart));
              pos = runEnd;
              continue;
            }
          }
          this.pushState(push, subclusterState(entry, null, 0), pos, clusterEnd - pos, entry, pos - clusterStart);
          pos = clusterEnd;
          continue;
        }
        const bitmap = decodeL2Bitmap(table, l2Index);
        while (pos < clusterEnd) {
          const sc = Math.floor((pos - clusterStart) / g.subclusterSize);
          const scEnd = Math.min(clusterEnd, clusterStart + (sc + 1) * g.subclusterSize);
          const st = subclusterState(entry, bitmap, sc);
          if (st === 'invalid') {
            throw new CorruptImageError(`invalid subcluster bitmap for guest offset ${clusterStart} (L2 table at 0x${l2Offset.toString(16)}, entry ${l2Index})`, this.filename);
          }
          this.pushState(push, st, pos, scEnd - pos, entry, pos - clusterStart);
          pos = scEnd;
        }
      }
    }
    if (firstOnly && out.length > 1) out.length = 1;
    return out;
  }

  private pushState(
    push: (off: number, len: number, state: Run['state'], host: number | null) => void,
    st: ReturnType<typeof subclusterState>, pos: number, len: number, entry: L2Entry, inCluster: number,
  ): void {
    const host = entry.kind === 'normal' || entry.kind === 'zero' ? entry.hostOffset + inCluster : null;
    switch (st) {
      case 'normal': push(pos, len, 'data', host); return;
      case 'zero-alloc': push(pos, len, 'zero', host); return;
      case 'zero-plain': push(pos, len, 'zero', null); return;
      case 'unallocated-plain': push(pos, len, 'unallocated', null); return;
      // Inside an allocated cluster QEMU still reports where the subcluster would live.
      case 'unallocated-alloc': push(pos, len, 'unallocated', host); return;
      case 'compressed':
      case 'invalid':
        throw new CorruptImageError(`unexpected subcluster state ${st} at guest offset ${pos}`, this.filename);
      default: { const never: never = st; return never; }
    }
  }

  /**
   * Throws when a data cluster lies in the header or past the end of the file. Synchronous
   * (undefined) in the common case; a promise only when the file size must be asked again.
   */
  private checkDataCluster(entry: { hostOffset: number; kind?: string }, guest: number): Promise<void> | undefined {
    if (this.geometry.externalData) {
      // QEMU: "External data file host cluster offset ... does not match guest cluster offset".
      if (entry.hostOffset !== guest && !(entry.kind === 'zero' && entry.hostOffset === 0)) {
        throw new CorruptImageError(`guest offset ${guest} maps to host offset 0x${entry.hostOffset.toString(16)} in the external data file, which must be the guest offset`, this.filename);
      }
      return undefined;
    }
    if (entry.hostOffset === 0) return undefined;
    if (entry.hostOffset < this.geometry.clusterSize) {
      throw new CorruptImageError(`guest offset ${guest} maps into the image header (host offset 0x${entry.hostOffset.toString(16)})`, this.filename);
    }
    if (entry.hostOffset < this.fileSize || this.mapPastEof) return undefined;
    return (async () => {
      this.fileSize = await this.file.size();
      if (entry.hostOffset >= this.fileSize) {
        throw new CorruptImageError(`guest offset ${guest} maps to host offset 0x${entry.hostOffset.toString(16)}, past the end of the file (${this.fileSize} bytes)`, this.filename);
      }
    })();
  }

  private checkCompressed(entry: { hostOffset: number; sectors: number }, guest: number, l2Offset: number, l2Index: number): void {
    if (this.geometry.externalData) {
      throw new CorruptImageError(`compressed cluster entry for guest offset ${guest} in an image with an external data file (L2 table at 0x${l2Offset.toString(16)}, entry ${l2Index})`, this.filename);
    }
    if (entry.hostOffset < this.geometry.clusterSize) {
      throw new CorruptImageError(`compressed cluster for guest offset ${guest} points into the image header (host offset 0x${entry.hostOffset.toString(16)})`, this.filename);
    }
  }

  async read(buf: Uint8Array, offset: number): Promise<void> {
    const inside = Math.max(0, Math.min(buf.length, this.virtualSize - offset));
    if (inside < buf.length) buf.fill(0, inside);
    if (inside === 0) return;
    const runs = await this.runs(offset, inside);
    const pending: Promise<unknown>[] = [];
    for (const r of runs) {
      const sub = buf.subarray(r.offset - offset, r.offset - offset + r.length);
      switch (r.state) {
        case 'data':
          // QEMU's BLKDBG_READ_AIO, before guest data is read (for the blkdebug test driver).
          this.file.debugEvent?.('read_aio');
          pending.push(this.encrypted ? this.readEncrypted(sub, r.offset, r.hostOffset!) : this.dataFile.read(sub, r.hostOffset!));
          break;
        case 'zero': sub.fill(0); break;
        case 'unallocated': pending.push(this.readBacking(sub, r.offset)); break;
        case 'compressed': pending.push(this.readCompressed(sub, r)); break;
        default: { const never: never = r.state; throw new Error(String(never)); }
      }
    }
    await Promise.all(pending);
  }

  /**
   * Reads encrypted guest data at `guest` (stored at `host`): whole sectors are read and
   * decrypted (their IV is the guest sector's number), and the part asked for copied out.
   */
  private async readEncrypted(buf: Uint8Array, guest: number, host: number): Promise<void> {
    const cipher = this.needCipher();
    const head = guest % AES_SECTOR;
    const len = Math.ceil((head + buf.length) / AES_SECTOR) * AES_SECTOR;
    if (head === 0 && len === buf.length) {
      await this.dataFile.read(buf, host);
      cipher.decrypt(buf, cipher.physical ? host : guest);
      return;
    }
    const tmp = Buffer.alloc(len);
    await this.dataFile.read(tmp, host - head);
    cipher.decrypt(tmp, cipher.physical ? host - head : guest - head);
    buf.set(tmp.subarray(head, head + buf.length));
  }

  async readPlan(offset: number, length: number): Promise<ReadSegment[] | null> {
    // Encrypted data is decrypted on the way: no plain file reads.
    if (this.encrypted) return null;
    const out: ReadSegment[] = [];
    const inside = Math.max(0, Math.min(length, this.virtualSize - offset));
    if (inside > 0) {
      for (const r of await this.runs(offset, inside)) {
        const at = r.offset - offset;
        switch (r.state) {
          case 'data':
            this.file.debugEvent?.('read_aio');
            out.push({ at, length: r.length, file: this.dataFile, offset: r.hostOffset! });
            break;
          case 'zero': out.push({ at, length: r.length, file: null, offset: 0 }); break;
          case 'unallocated': {
            // As readBacking: the backing chain, zeros past its end or without one.
            const n = this.backingPart(r.offset, r.length);
            if (n > 0) {
              const below = this.backing!.readPlan ? await this.backing!.readPlan(r.offset, n) : null;
              if (!below) return null;
              for (const seg of below) out.push({ ...seg, at: seg.at + at });
            }
            if (n < r.length) out.push({ at: at + n, length: r.length - n, file: null, offset: 0 });
            break;
          }
          case 'compressed': return null;
          default: { const never: never = r.state; throw new Error(String(never)); }
        }
      }
    }
    if (inside < length) out.push({ at: inside, length: length - inside, file: null, offset: 0 });
    return out;
  }

  /** Reads what lies below this layer: the backing chain, zeros past its end or without one. */
  protected async readBacking(buf: Uint8Array, offset: number): Promise<void> {
    const n = this.backingPart(offset, buf.length);
    if (n > 0) await this.backing!.read(buf.subarray(0, n), offset);
    if (n < buf.length) buf.fill(0, n);
  }

  /** How much of [offset, offset+length) the backing file covers (none without one). */
  private backingPart(offset: number, length: number): number {
    const b = this.backing;
    return b ? Math.max(0, Math.min(length, b.virtualSize - offset)) : 0;
  }

  /** Decompresses the cluster behind a compressed run (cached for the next partial read). */
  async compressedCluster(c: NonNullable<Run['compressed']>): Promise<Buffer> {
    if (this.lastCompressed?.hostOffset === c.hostOffset) return this.lastCompressed.data;
    const { start, end } = compressedRange(c.hostOffset, c.sectors);
    const input = Buffer.allocUnsafe(end - start);
    await this.file.read(input, start);
    const data = Buffer.allocUnsafe(this.geometry.clusterSize);
    try {
      decompressCluster(this.compressionType, input, data, `compressed cluster at host offset 0x${c.hostOffset.toString(16)}`);
    } catch (err) {
      if (err instanceof CorruptImageError && !err.file) throw new CorruptImageError(err.message, this.filename);
      throw err;
    }
    this.lastCompressed = { hostOffset: c.hostOffset, data };
    return data;
  }

  private async readCompressed(buf: Uint8Array, r: Run): Promise<void> {
    const c = r.compressed!;
    const data = await this.compressedCluster(c);
    const from = r.offset - c.clusterStart;
    buf.set(data.subarray(from, from + r.length));
  }

  async blockStatus(offset: number, bytes: number): Promise<LayerStatus> {
    const [r] = await this.runs(offset, bytes, true);
    if (!r) throw new RangeError(`blockStatus past the end of ${this.filename}`);
    switch (r.state) {
      case 'data': {
        // QEMU gives no host offset for encrypted data (it is not the guest's bytes).
        const st: LayerStatus = { length: r.length, allocated: true, data: true, zero: false, offset: this.encrypted ? null : r.hostOffset, compressed: false };
        // As QEMU does for images it takes for metadata-preallocated: ask the host file
        // whether the run is backed by data or by a hole.
        // (Never with an external data file: its clusters have no refcounts to count.)
        if (!this.geometry.externalData && this.file.extents && (await this.metadataPreallocated())) {
          const ext = (await this.file.extents(r.hostOffset!, r.length))[0];
          if (ext) { st.length = ext.length; st.zero = !ext.data; }
        }
        return st;
      }
      case 'zero': return { length: r.length, allocated: true, data: false, zero: true, offset: this.encrypted ? null : r.hostOffset, compressed: false };
      case 'compressed': return { length: r.length, allocated: true, data: true, zero: false, offset: null, compressed: true };
      case 'unallocated': {
        const below = this.backing;
        return { length: r.length, allocated: false, data: false, zero: !below || offset >= below.virtualSize, offset: this.encrypted ? null : r.hostOffset, compressed: false };
      }
      default: { const never: never = r.state; throw new Error(String(never)); }
    }
  }

  private preallocCheck: Promise<boolean> | null = null;

  /**
   * QEMU's qcow2_detect_metadata_preallocation: true when clearly more clusters are in use
   * (refcount > 0) than the file occupies on disk. Asked once, like QEMU.
   */
  metadataPreallocated(): Promise<boolean> {
    this.preallocCheck ??= (async () => {
      if (!this.file.allocatedSize || this.geometry.externalData) return false;
      const cs = this.geometry.clusterSize;
      const realClusters = Math.floor((await this.file.allocatedSize()) / cs);
      const threshold = Math.max(Math.floor((realClusters * 10) / 9), realClusters + 2);
      const endCluster = Math.ceil((await this.file.size()) / cs);
      const h = this.header;
      const reftable = Buffer.alloc(h.refcountTableClusters * cs);
      await this.file.read(reftable, h.refcountTableOffset);
      const perBlock = refcountBlockEntries(h.clusterBits, h.refcountOrder);
      const block = Buffer.alloc(cs);
      let count = 0;
      for (let ri = 0; ri * perBlock < endCluster && count < threshold && ri < reftable.length / 8; ri++) {
        const { blockOffset } = decodeReftableEntry(reftable, ri);
        if (!blockOffset) continue;
        await this.file.read(block, blockOffset);
        count += countNonZeroRefcounts(block, h.refcountOrder, Math.min(perBlock, endCluster - ri * perBlock));
      }
      return count >= threshold;
    })();
    return this.preallocCheck;
  }

  async close(): Promise<void> {
    const data = this.externalDataFile;
    try {
      await this.file.close();
    } finally {
      if (data) await data.close();
    }
  }
}
