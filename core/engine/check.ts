// Consistency check and repair of a qcow2 image, as QEMU 7.2's qcow2_co_check does it
// (block/qcow2-refcount.c: calculate_refcounts, compare_refcounts, check_oflag_copied).
//
// The check rebuilds in memory the refcount every cluster should have, compares it with the
// stored refcounts, checks the QCOW_OFLAG_COPIED flags of the active tables, and counts
// corruptions, leaks and the allocation figures exactly as QEMU does (same messages, same
// numbers), so `strata check` and `qemu-img check` agree on every image.
//
// Repairs never change guest-visible data. Where QEMU fixes refcounts in place, we write a
// complete new refcount structure past the end of the image (it describes itself), flush,
// switch the header to it in one write, flush: a crash at any point leaves either the old
// structure or the new one, never a mix. COPIED flags that must be cleared are cleared
// before the switch and the ones that must be set after it, so a flag never claims a
// refcount of 1 that the refcount structure on disk does not have. Like qemu-img 7.2, -r all
// also turns misaligned preallocated zero clusters into plain zero clusters, leaves L2
// entries that point past the end of the file or at misaligned data alone (reported, not
// fixed), and clears the dirty and corrupt bits once no corruption is left; -r leaks fixes
// leaks only and fails (as QEMU) when only a rebuild could fix the refcounts.
//
// The image is opened by hand (not through Qcow2Image.open) so images with the corrupt or
// the dirty bit, or with broken tables, can be checked. Memory is bounded by the file:
// the in-memory refcounts cover the file's clusters (plus one), never an on-disk count.
import * as C from '../format/constants';
import { CorruptImageError, FormatError, StrataError } from '../errors';
import { checkIncompatibleFeatures, decodeHeader, hasExtendedL2, hasExternalData, type ParsedHeader } from '../format/header';
import { getRefcount, maxRefcount, refcountBlockEntries, setRefcount } from '../format/refcount';
import { cString, encodeSnapshotTable, type SnapshotEntry } from '../format/snapshot';
import { activeBitmapsExtension, decodeBitmapDirectory, decodeBitmapTableEntry } from '../format/bitmaps';
import type { BlockFile } from '../io/block-file';
import { BufferArena } from '../io/buffers';
import { encodeStructure, newRefArray, placeStructure, type RefArray } from './refcount-structure';

/** qemu-img check -r: `leaks` fixes leaked clusters only, `all` fixes corruptions too. */
export type RepairMode = 'leaks' | 'all';

/** BdrvCheckResult: what one check pass found (and fixed). */
export interface CheckCounts {
  checkErrors: number;
  corruptions: number;
  leaks: number;
  corruptionsFixed: number;
  leaksFixed: number;
  /** End of the highest cluster in use (stored or referenced). */
  imageEndOffset: number;
  /** Clusters of the virtual disk. */
  totalClusters: number;
  allocatedClusters: number;
  fragmentedClusters: number;
  compressedClusters: number;
}

export interface CheckPass extends CheckCounts {
  /**
   * Set when the check could not run to its end (qemu-img's "Check failed: REASON", exit 1):
   * the counts are then not meaningful and nothing is printed.
   */
  failure: string | null;
}

export interface CheckHooks {
  /** One message line (no newline) as QEMU prints them on stderr. */
  log?: (line: string) => void;
  /** Units of work done out of a total (tables and refcount blocks visited). */
  progress?: (done: number, total: number) => void;
  /** Throws when the caller wants to stop; called between tables. */
  checkCancelled?: () => void;
}

export interface CheckOptions extends CheckHooks {
  /** null/undefined: check only (the file may be read-only). */
  repair?: RepairMode | null;
}

const TWO32 = 0x1_0000_0000;
const FIX_LEAKS = 1;
const FIX_ERRORS = 2;

/** Past-EOF references this close to the end of the file are remembered, so the new refcount structure is not placed where they point. */
const PAST_EOF_WINDOW = 1 << 16;

/** L2 tables the refcount pass keeps for the COPIED-flag pass, in bytes. */
const L2_KEEP_MAX = 64 * 1024 * 1024;

/** Big-endian u32 at `o` (index arithmetic: cheaper than Buffer#readUInt32BE in hot loops). */
function u32(b: Uint8Array, o: number): number {
  return ((b[o]! << 24) | (b[o + 1]! << 16) | (b[o + 2]! << 8) | b[o + 3]!) >>> 0;
}

/** The offset field (bits 9-55) of an L1/L2/bitmap table entry given as two u32 halves. */
function entryOffset(hi: number, lo: number): number {
  return (hi & 0x00ffffff) * TWO32 + ((lo & 0xfffffe00) >>> 0);
}

function hex(n: number | bigint): string { return n.toString(16); }
function hex64(hi: number, lo: number): string { return ((BigInt(hi >>> 0) << 32n) | BigInt(lo >>> 0)).toString(16); }
/** C's %#x: "0" for zero, "0x..." otherwise. */
function altHex(n: number | bigint): string { return n === 0 || n === 0n ? '0' : `0x${n.toString(16)}`; }

/**
 * A failure that ends the check (QEMU's negative return): `message` goes to the log and
 * `reason` (QEMU's strerror) into "Check failed: REASON".
 */
class CheckAbort extends Error {
  constructor(message: string, readonly reason: string) { super(message); }
}

interface SnapshotInfo {
  id: string;
  name: string;
  l1Offset: bigint;
  l1Size: number;
}

/** What a check pass needs to know about the image, as loaded from disk. */
interface ImageState {
  parsed: ParsedHeader;
  clusterBits: number;
  clusterSize: number;
  refcountOrder: number;
  extendedL2: boolean;
  l2Entries: number;
  l2EntrySize: number;
  fileSize: number;
  reftableOffset: number;
  reftable: Buffer;
  reftableEntries: number;
  l1Offset: number;
  l1Size: number;
  l1: Buffer;
  snapshots: SnapshotInfo[];
  /** Bytes of the snapshot table as QEMU measures it (the last entry unpadded). */
  snapshotsSize: number;
  /**
   * Guest data is in an external data file: data clusters have no refcounts (their L2
   * entries always have COPIED set, offset 0 included), and compressed clusters are errors.
   */
  externalData: boolean;
  /** The table as read, with what a repair trimmed. */
  snapshotTable: SnapshotTable;
}

function emptyCounts(): CheckCounts {
  return {
    checkErrors: 0, corruptions: 0, leaks: 0, corruptionsFixed: 0, leaksFixed: 0,
    imageEndOffset: 0, totalClusters: 0, allocatedClusters: 0, fragmentedClusters: 0, compressedClusters: 0,
  };
}

/** Reads [offset, offset+len) zero-filled past the end of the file (as QEMU's reads are). */
async function readAt(file: BlockFile, fileSize: number, offset: number, len: number, into?: Buffer): Promise<Buffer> {
  const buf = into ?? Buffer.alloc(len);
  let n = 0;
  if (len > 0 && offset < fileSize && offset <= Number.MAX_SAFE_INTEGER) {
    n = Math.min(len, fileSize - offset);
    await file.read(buf.subarray(0, n), offset);
  }
  if (into) into.fill(0, n);
  return buf;
}

/**
 * Reads of small tables through a read-ahead window: metadata of small-cluster images is
 * often laid out back to back, and one 256 KiB read is much cheaper than 512 tiny ones.
 * Writes through the checker must call invalidate().
 */
class TableReader {
  private static readonly WINDOW = 256 * 1024;
  private start = -1;
  private buf: Buffer = Buffer.alloc(0);
  /** Requests the current window served; a window that served one turns read-ahead off. */
  private served = 0;
  private readAhead = true;
  private lastEnd = -1;
  constructor(private readonly file: BlockFile, private readonly fileSize: number) {}

  /** The bytes at [offset, offset+len), in `into` (len bytes) when given, else in a new buffer. */
  async read(offset: number, len: number, into?: Buffer): Promise<Buffer> {
    if (len * 4 > TableReader.WINDOW || offset >= this.fileSize) return readAt(this.file, this.fileSize, offset, len, into);
    const sequential = offset === this.lastEnd;
    this.lastEnd = offset + len;
    if (this.start >= 0 && offset >= this.start && offset + len <= this.start + this.buf.length) {
      this.served++;
      return copyOut(this.buf.subarray(offset - this.start, offset - this.start + len), into);
    }
    // Tables far apart (metadata-preallocated images): reading ahead only copies data.
    if (this.start >= 0 && this.served <= 1) this.readAhead = sequential;
    else if (sequential) this.readAhead = true;
    if (!this.readAhead) return readAt(this.file, this.fileSize, offset, len, into);
    // Start and contents change together, after the read: concurrent reads stay consistent.
    const buf = await readAt(this.file, this.fileSize, offset, Math.min(TableReader.WINDOW, Math.max(len, this.fileSize - offset)));
    this.start = offset;
    this.buf = buf;
    this.served = 1;
    return copyOut(buf.subarray(0, len), into);
  }

  invalidate(): void { this.start = -1; }
}

function copyOut(bytes: Buffer, into?: Buffer): Buffer {
  if (!into) return Buffer.from(bytes);
  bytes.copy(into);
  return into;
}

/** The header cluster, decoded with the format decoders; dirty and corrupt images are accepted. */
async function loadHeader(file: BlockFile): Promise<ParsedHeader> {
  const fileSize = await file.size();
  const probe = Buffer.alloc(C.HEADER_V3_WITH_COMPRESSION_LENGTH);
  const got = await file.read(probe, 0);
  const clusterBits = got >= 24 ? probe.readUInt32BE(20) : 0;
  const headerBytes = clusterBits >= C.MIN_CLUSTER_BITS && clusterBits <= C.MAX_CLUSTER_BITS ? 2 ** clusterBits : probe.length;
  const buf = Buffer.alloc(Math.max(headerBytes, probe.length));
  const n = await file.read(buf, 0);
  const parsed = decodeHeader(n < C.HEADER_V2_LENGTH ? buf.subarray(0, Math.min(n, fileSize)) : buf, file.path, { check: true });
  checkIncompatibleFeatures(parsed, file.path);
  // qcow2_read_extensions refuses to open an image whose bitmaps extension is bad.
  activeBitmapsExtension(parsed, file.path);
  return parsed;
}

/** The snapshot table as the check read it (and, with -r all, trimmed as QEMU trims it). */
interface SnapshotTable {
  snapshots: SnapshotInfo[];
  /** Bytes from the table's start to the end of the last entry kept (QEMU's snapshots_size). */
  size: number;
  /** The kept entries, decoded for a rewrite (null when an L1 offset is past 2^53). */
  entries: SnapshotEntry[] | null;
  /** Snapshots dropped off the end (QEMU's nb_clusters_reduced). */
  reduced: number;
  /** Entries whose extra data was cut to 1 KiB (QEMU's extra_data_dropped). */
  dropped: number;
  /** The extra data size of each kept entry (after any cut). */
  extraSizes: number[];
}

/**
 * The snapshot table as QEMU's check reads it (qcow2_check_read_snapshot_table and
 * qcow2_do_read_snapshots): no validation of the L1 tables (the check reports those), reads
 * past the end of the file give zeros. Without `repair` a table QEMU cannot read stops the
 * check in QEMU's words; with it, too many snapshots and a table past 64 MiB lose the entries
 * past the limit, and extra data past 1 KiB is cut, each with QEMU's line.
 */
async function loadSnapshots(file: BlockFile, fileSize: number, h: ParsedHeader['header'], repair: boolean, log: (s: string) => void): Promise<SnapshotTable> {
  const out: SnapshotTable = { snapshots: [], size: 0, entries: [], reduced: 0, dropped: 0, extraSizes: [] };
  let count = h.nbSnapshots;
  const offset = h.snapshotsOffset;
  if (count === 0) return out;
  if (count > C.MAX_SNAPSHOTS && repair) {
    log(`Discarding ${count - C.MAX_SNAPSHOTS} overhanging snapshots`);
    out.reduced += count - C.MAX_SNAPSHOTS;
    count = C.MAX_SNAPSHOTS;
  }
  // qcow2_validate_table
  if (count > C.MAX_SNAPSHOTS) {
    throw new CheckAbort(`qemu-img: ERROR snapshot table too large\nYou can force-remove all ${count - C.MAX_SNAPSHOTS} overhanging snapshots with qemu-img check -r all`, 'File too large');
  }
  if (offset % (2 ** h.clusterBits) !== 0 || offset + count * C.SNAPSHOT_ENTRY_FIXED_SIZE > Number.MAX_SAFE_INTEGER) {
    throw new CheckAbort('qemu-img: ERROR snapshot table offset invalid', 'Invalid argument');
  }
  const WINDOW = 64 * 1024;
  let winStart = -1;
  let win: Buffer = Buffer.alloc(0);
  const bytes = async (pos: number, len: number): Promise<Buffer> => {
    if (len > WINDOW) return readAt(file, fileSize, pos, len);
    if (winStart < 0 || pos < winStart || pos + len > winStart + win.length) {
      winStart = pos;
      win = await readAt(file, fileSize, pos, WINDOW);
    }
    return win.subarray(pos - winStart, pos - winStart + len);
  };
  const failed = (what: string, hint: string) => new CheckAbort(`qemu-img: ERROR failed to read the snapshot table: ${what}\n${hint}`, 'File too large');
  let pos = offset;
  let tableLength = 0;
  for (let i = 0; i < count; i++) {
    const pre = pos;
    tableLength = Math.ceil(tableLength / 8) * 8;
    pos = Math.ceil(pos / 8) * 8;
    const hd = Buffer.from(await bytes(pos, C.SNAPSHOT_ENTRY_FIXED_SIZE));
    pos += C.SNAPSHOT_ENTRY_FIXED_SIZE;
    const l1Offset = hd.readBigUInt64BE(0);
    const l1Size = hd.readUInt32BE(8);
    const idSize = hd.readUInt16BE(12);
    const nameSize = hd.readUInt16BE(14);
    let extraSize = hd.readUInt32BE(36);
    const fullExtra = extraSize;
    if (extraSize > C.MAX_SNAPSHOT_EXTRA_DATA) {
      if (!repair) throw failed(`Too much extra metadata in snapshot table entry ${i}`, 'You can force-remove this extra metadata with qemu-img check -r all');
      log(`Discarding too much extra metadata in snapshot table entry ${i} (${extraSize} > ${C.MAX_SNAPSHOT_EXTRA_DATA})`);
      out.dropped++;
      extraSize = C.MAX_SNAPSHOT_EXTRA_DATA;
    }
    const extra = Buffer.from(await bytes(pos, extraSize));
    pos += fullExtra;
    const id = cString((await bytes(pos, idSize)).toString('utf8'));
    pos += idSize;
    const name = cString((await bytes(pos, nameSize)).toString('utf8'));
    pos += nameSize;
    tableLength += C.SNAPSHOT_ENTRY_FIXED_SIZE + extraSize + idSize + nameSize;
    if (tableLength > C.MAX_SNAPSHOTS_SIZE || pos - offset > 0x7fffffff) {
      if (!repair) throw failed('Snapshot table is too big', `You can force-remove all ${count - i} overhanging snapshots with qemu-img check -r all`);
      log(`Discarding ${count - i} overhanging snapshots (snapshot table is too big)`);
      out.reduced += count - i;
      pos = pre;
      break;
    }
    out.snapshots.push({ id, name, l1Offset, l1Size });
    out.extraSizes.push(extraSize);
    if (out.entries && l1Offset <= BigInt(Number.MAX_SAFE_INTEGER)) {
      // As QEMU keeps it in memory: what the extra data does not record gets its defaults
      // (the image's size; icount -1); the 32-bit VM state size unless a 64-bit one is there.
      out.entries.push({
        l1TableOffset: Number(l1Offset), l1Size, id, name,
        dateSec: hd.readUInt32BE(16), dateNsec: hd.readUInt32BE(20), vmClockNsec: hd.readBigUInt64BE(24),
        vmStateSize: extraSize >= 8 ? Number(extra.readBigUInt64BE(0)) : hd.readUInt32BE(32),
        diskSize: extraSize >= 16 ? Number(extra.readBigUInt64BE(8)) : h.size,
        icount: extraSize >= 24 ? extra.readBigInt64BE(16) : -1n,
        extraData: extra,
      });
    } else {
      out.entries = null;
    }
  }
  out.size = pos - offset;
  return out;
}

/**
 * qcow2_write_snapshots after a repair: the kept entries in a new table at the first clusters
 * free (whose refcounts are taken first), the header switched to it in one write, then the
 * old table's clusters let go. A crash at any point leaves a leak at worst. The refcounts are
 * right on disk when this runs (the refcount pass has repaired them).
 */
async function rewriteSnapshotTable(file: BlockFile, entries: SnapshotEntry[], oldOffset: number, oldSize: number): Promise<void> {
  const st = await loadState(file, null);
  const cs = st.clusterSize;
  const table = encodeSnapshotTable(entries);
  const need = Math.ceil(table.length / cs);
  const E = refcountBlockEntries(st.clusterBits, st.refcountOrder);
  const blockOf = (c: number): number => {
    const b = Math.floor(c / E);
    if (b >= st.reftableEntries) return 0;
    return Number(st.reftable.readBigUInt64BE(b * 8) & 0x00fffffffffffe00n);
  };
  const blocks = new Map<number, Buffer>();
  const block = async (off: number): Promise<Buffer> => {
    let b = blocks.get(off);
    if (!b) { b = await readAt(file, st.fileSize, off, cs); blocks.set(off, b); }
    return b;
  };
  const refOf = async (c: number): Promise<number | null> => {
    const off = blockOf(c);
    // A cluster no refcount block covers cannot be taken without allocating one: skipped.
    if (!off || off % cs !== 0) return null;
    return getRefcount(await block(off), c % E, st.refcountOrder);
  };
  let at = -1;
  if (need > 0) {
    const limit = st.reftableEntries * E;
    for (let c = 1, run = 0; c < limit; c++) {
      run = (await refOf(c)) === 0 ? run + 1 : 0;
      if (run === need) { at = c - need + 1; break; }
    }
    if (at < 0) throw new CheckAbort('ERROR failed to update snapshot table: No space left on device', 'No space left on device');
  }
  const setRefs = async (first: number, n: number, delta: number): Promise<void> => {
    const touched = new Set<number>();
    const freed: number[] = [];
    for (let c = first; c < first + n; c++) {
      const off = blockOf(c);
      if (!off || off % cs !== 0) continue;
      const b = await block(off);
      const v = getRefcount(b, c % E, st.refcountOrder);
      if (v + delta < 0) continue;
      setRefcount(b, c % E, st.refcountOrder, v + delta);
      touched.add(off);
      if (v + delta === 0) freed.push(c);
    }
    for (const off of touched) await file.write(blocks.get(off)!, off);
    await file.flush();
    // What the old table leaves unused goes back to the file system, as QEMU discards it.
    if (file.discard) for (const c of freed) await file.discard(c * cs, cs);
  };
  // 1. The new table's clusters are taken (a crash: leaked), 2. the table written there,
  // 3. the header switched to it, 4. the old table let go.
  if (at > 0) {
    await setRefs(at, need, 1);
    await file.write(table, at * cs);
    await file.flush();
  }
  const hdr = Buffer.alloc(12);
  hdr.writeUInt32BE(entries.length, 0);
  hdr.writeBigUInt64BE(BigInt(at > 0 ? at * cs : 0), 4);
  await file.write(hdr, 60);
  await file.flush();
  if (oldOffset && oldSize > 0) await setRefs(Math.floor(oldOffset / cs), Math.ceil((oldOffset % cs + oldSize) / cs), -1);
}

/**
 * A repair opens the image for writing, and QEMU's open for writing clears the autoclear bits
 * it does not know (the structures they vouch for may be stale once anything is written).
 */
async function clearUnknownAutoclear(file: BlockFile, h: ImageState['parsed']['header']): Promise<void> {
  if (h.version < 3 || (h.autoclearFeatures & ~C.AUTOCLEAR_KNOWN) === 0n) return;
  h.autoclearFeatures &= C.AUTOCLEAR_KNOWN;
  const b = Buffer.alloc(8);
  b.writeBigUInt64BE(h.autoclearFeatures);
  await file.write(b, 88);
  await file.flush();
}

/**
 * The image as on disk. `snapshots`: how to take the snapshot table: 'check' reads it as a
 * check does, 'repair' as -r all does (trimming what QEMU trims, with its lines), an earlier
 * state reuses that state's table (the recount after a rebuild, as QEMU's in-memory one),
 * null reads it quietly as a repair would (the table is not looked at).
 */
async function loadState(file: BlockFile, snapshots: 'check' | 'repair' | ImageState | null = 'check', log: (s: string) => void = () => {}): Promise<ImageState> {
  const parsed = await loadHeader(file);
  const h = parsed.header;
  const fileSize = await file.size();
  const clusterBits = h.clusterBits;
  const clusterSize = 2 ** clusterBits;
  const extendedL2 = hasExtendedL2(h);
  const l2EntrySize = extendedL2 ? C.L2E_SIZE_EXTENDED : C.L2E_SIZE_NORMAL;
  const reftableBytes = h.refcountTableClusters * clusterSize;
  const reftable = await readAt(file, fileSize, h.refcountTableOffset, reftableBytes);
  const l1 = await readAt(file, fileSize, h.l1TableOffset, h.l1Size * 8);
  const snaps = snapshots !== null && typeof snapshots === 'object'
    ? snapshots.snapshotTable
    : await loadSnapshots(file, fileSize, h, snapshots !== 'check', snapshots === null ? () => {} : log);
  return {
    parsed, clusterBits, clusterSize, refcountOrder: h.refcountOrder, extendedL2,
    l2Entries: clusterSize / l2EntrySize, l2EntrySize, fileSize,
    reftableOffset: h.refcountTableOffset, reftable, reftableEntries: reftableBytes / 8,
    l1Offset: h.l1TableOffset, l1Size: h.l1Size, l1,
    snapshots: snaps.snapshots, snapshotsSize: snaps.size, snapshotTable: snaps,
    externalData: hasExternalData(h),
  };
}

/**
 * The stored refcounts, read through the refcount table (qcow2_get_refcount). A refcount
 * block at an unaligned offset cannot be read: get() returns null, as QEMU's -EIO.
 */
class StoredRefcounts {
  private readonly entries: number;
  private readonly cache = new Map<number, Buffer>();
  private readonly cacheMax: number;
  private reported = false;
  private readonly reader: TableReader;

  constructor(file: BlockFile, private readonly st: ImageState, private readonly log: (s: string) => void) {
    this.reader = new TableReader(file, st.fileSize);
    this.entries = refcountBlockEntries(st.clusterBits, st.refcountOrder);
    this.cacheMax = Math.max(16, Math.floor((32 * 1024 * 1024) / st.clusterSize));
  }

  /** The refcount block covering block index `b`: a buffer, 'zero' (none), or null (unreadable). */
  async block(b: number): Promise<Buffer | 'zero' | null> {
    const st = this.st;
    if (b >= st.reftableEntries) return 'zero';
    const hi = st.reftable.readUInt32BE(b * 8);
    const lo = st.reftable.readUInt32BE(b * 8 + 4);
    const offset = hi * TWO32 + ((lo & 0xfffffe00) >>> 0);
    if (offset === 0) return 'zero';
    if (offset % st.clusterSize !== 0) {
      if (!this.reported) {
        this.reported = true;
        this.log(`qcow2: Image is corrupt: Refblock offset ${altHex(offset)} unaligned (reftable index: ${altHex(b)}); further non-fatal corruption events will be suppressed`);
      }
      return null;
    }
    if (offset >= st.fileSize) return 'zero';
    const hit = this.cache.get(offset);
    if (hit) {
      this.cache.delete(offset);
      this.cache.set(offset, hit);
      return hit;
    }
    const buf = await this.reader.read(offset, st.clusterSize);
    if (this.cache.size >= this.cacheMax) this.cache.delete(this.cache.keys().next().value!);
    this.cache.set(offset, buf);
    return buf;
  }

  async get(cluster: number): Promise<number | null> {
    const b = Math.floor(cluster / this.entries);
    const blk = await this.block(b);
    if (blk === null) return null;
    if (blk === 'zero') return 0;
    return getRefcount(blk, cluster - b * this.entries, this.st.refcountOrder);
  }

  get blockEntries(): number { return this.entries; }
}

/** One entry of the active tables whose COPIED flag must change. */
interface FlagFix { table: 'l1' | 'l2'; offset: number; entryIndex: number; set: boolean }

/** One check pass over an image (calculate_refcounts + compare_refcounts + check_oflag_copied). */
class Checker {
  readonly res: CheckCounts = emptyCounts();
  rebuild = false;
  /** In-memory refcount table (IMRT), entries [0, n) in use. */
  imrt: RefArray;
  n: number;
  private readonly max: number;
  /** Increments the refcount table and the refcount blocks contributed, per cluster. */
  readonly structureRefs = new Map<number, number>();
  /** 64-bit refcounts past 2^53 as stored (the arrays hold them capped), for the messages. */
  private readonly wideRefs = new Map<number, bigint>();

  /** A refcount as QEMU prints it: unsigned 64-bit. */
  private shownRef(cluster: number, r: number): number | bigint {
    return r === Number.MAX_SAFE_INTEGER ? (this.wideRefs.get(cluster) ?? r) : r;
  }
  /** Clusters past the end of the file (in a window) that something references. */
  readonly pastEofRefs = new Set<number>();
  /** Refcount blocks outside the image that QEMU's -r all would have grown the file for. */
  readonly outsideBlocks = new Set<number>();
  highestCluster = 0;
  private readonly reader: TableReader;
  private unitsDone = 0;
  private readonly unitsTotal: number;

  constructor(
    private readonly file: BlockFile,
    readonly st: ImageState,
    private readonly fix: number,
    private readonly hooks: CheckHooks,
  ) {
    const nb = Math.ceil(st.fileSize / st.clusterSize);
    if (nb > 0x7fffffff) throw new CheckAbort(`the image file has too many clusters (${nb}) to be checked`, 'File too large');
    // One spare entry: a reference may run into the cluster after the last (partial) one.
    this.imrt = newRefArray(st.refcountOrder, nb + 1);
    this.n = nb;
    this.max = maxRefcount(st.refcountOrder);
    this.reader = new TableReader(file, st.fileSize);
    const h = st.parsed.header;
    this.res.totalClusters = Math.ceil((Math.floor(h.size / 512) * 512) / st.clusterSize);
    this.unitsTotal = st.l1Size + st.snapshots.reduce((a, s) => a + s.l1Size, 0) + Math.ceil(nb / refcountBlockEntries(st.clusterBits, st.refcountOrder)) * 2 + 1;
  }

  private log(line: string): void { this.hooks.log?.(line); }

  private tick(units = 1): void {
    this.unitsDone += units;
    this.hooks.progress?.(Math.min(this.unitsDone, this.unitsTotal), this.unitsTotal);
  }

  private get cs(): number { return this.st.clusterSize; }

  /** qcow2_inc_refcounts_imrt */
  private inc(offset: number, size: number, structure = false, exact?: bigint): void {
    if (size <= 0) return;
    const cs = this.cs;
    if (offset + size - this.st.fileSize >= cs) {
      this.log(`ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset 0x${hex(exact ?? offset)} size 0x${hex(size)}`);
      this.res.corruptions++;
      const nb = Math.ceil(this.st.fileSize / cs);
      const first = Math.floor(offset / cs);
      const last = Math.floor((offset + size - 1) / cs);
      for (let k = Math.max(first, nb); k <= last && k < nb + PAST_EOF_WINDOW; k++) this.pastEofRefs.add(k);
      return;
    }
    const first = Math.floor(offset / cs);
    const last = Math.floor((offset + size - 1) / cs);
    for (let k = first; k <= last; k++) {
      if (k >= this.imrt.length) { this.res.checkErrors++; return; }
      if (k >= this.n) this.n = k + 1;
      const r = this.imrt[k]!;
      if (r >= this.max) {
        this.log(`ERROR: overflow cluster offset=0x${hex(k * cs)}`);
        this.log('Use qemu-img amend to increase the refcount entry width or qemu-img convert to create a clean copy if the image cannot be opened for writing');
        this.res.corruptions++;
        continue;
      }
      this.imrt[k] = r + 1;
      if (structure) this.structureRefs.set(k, (this.structureRefs.get(k) ?? 0) + 1);
    }
  }

  /** L2 tables read by the refcount pass, kept (up to 64 MiB) for the COPIED-flag pass. */
  private readonly l2Tables = new Map<number, Buffer>();
  private l2TableBytes = 0;
  private readonly l2Arena = new BufferArena();

  /** L2 reads started ahead of their turn (read-only checks), by offset. */
  private readonly prefetched = new Map<number, Promise<Buffer>>();

  /** Starts reading the L2 table at `offset` so the next checkL2 finds it on its way. */
  private prefetchL2(offset: number): void {
    if (this.fix !== 0 || offset === 0 || offset % this.cs !== 0 || offset >= this.st.fileSize) return;
    if (this.l2Tables.has(offset) || this.prefetched.has(offset)) return;
    const p = this.readL2(offset);
    p.catch(() => {}); // the real read reports it
    this.prefetched.set(offset, p);
  }

  private async readL2(offset: number): Promise<Buffer> {
    const hit = this.l2Tables.get(offset);
    if (hit) return hit;
    const pending = this.prefetched.get(offset);
    if (pending) {
      this.prefetched.delete(offset);
      return pending;
    }
    // Tables that will be kept go to the arena (huge pages: 32 MiB of tables, 16 page faults).
    const keep = this.l2TableBytes + this.cs <= L2_KEEP_MAX;
    if (keep) this.l2TableBytes += this.cs;
    const t = await this.reader.read(offset, this.cs, keep ? this.l2Arena.take(this.cs) : undefined);
    if (keep) this.l2Tables.set(offset, t);
    return t;
  }

  private read(offset: number, len: number): Promise<Buffer> {
    return this.reader.read(offset, len);
  }

  /** calculate_refcounts */
  async calculate(): Promise<void> {
    const st = this.st;
    const cs = this.cs;
    this.inc(0, cs);
    await this.checkL1(st.l1Offset, st.l1Size, true, true);
    if (st.externalData && st.snapshots.length) {
      this.log(`ERROR ${st.snapshots.length} snapshots in image with data file`);
      this.res.corruptions++;
    }
    for (const sn of st.snapshots) {
      if (sn.l1Offset % BigInt(cs) !== 0n) {
        this.log(`ERROR snapshot ${sn.id} (${sn.name}) l1_offset=${altHex(sn.l1Offset)}: L1 table is not cluster aligned; snapshot table entry corrupted`);
        this.res.corruptions++;
        continue;
      }
      if (sn.l1Size > C.MAX_L1_SIZE_BYTES / 8) {
        this.log(`ERROR snapshot ${sn.id} (${sn.name}) l1_size=${altHex(sn.l1Size)}: L1 table is too large; snapshot table entry corrupted`);
        this.res.corruptions++;
        continue;
      }
      // An offset past 2^53 is far past the end of the file: inc() reports it and reads give zeros.
      const off = sn.l1Offset > BigInt(Number.MAX_SAFE_INTEGER) ? Number.MAX_SAFE_INTEGER - (Number.MAX_SAFE_INTEGER % cs) : Number(sn.l1Offset);
      await this.checkL1(off, sn.l1Size, false, false);
    }
    this.inc(st.parsed.header.snapshotsOffset, st.snapshotsSize);
    this.inc(st.reftableOffset, st.reftableEntries * 8, true);
    const crypto = st.parsed.cryptoHeader;
    if (crypto && crypto.length) this.inc(crypto.offset, crypto.length);
    await this.checkBitmaps();
    this.checkRefblocks();
  }

  /** check_refcounts_l1 */
  private async checkL1(l1Offset: number, l1Size: number, fragInfo: boolean, active: boolean): Promise<void> {
    if (!l1Size) return;
    const cs = this.cs;
    this.inc(l1Offset, l1Size * 8);
    const l1 = active && l1Offset === this.st.l1Offset ? this.st.l1 : await this.read(l1Offset, l1Size * 8);
    let ahead = 0;
    for (let i = 0; i < l1Size; i++) {
      const hi = l1.readUInt32BE(i * 8);
      const lo = l1.readUInt32BE(i * 8 + 4);
      if (hi === 0 && lo === 0) { this.tick(); continue; }
      // Keep one table read in flight while this one is walked.
      for (ahead = Math.max(ahead, i + 1); ahead < l1Size; ahead++) {
        const nhi = l1.readUInt32BE(ahead * 8);
        const nlo = l1.readUInt32BE(ahead * 8 + 4);
        if (nhi === 0 && nlo === 0) continue;
        this.prefetchL2(entryOffset(nhi, nlo));
        ahead++;
        break;
      }
      this.hooks.checkCancelled?.();
      if ((hi & 0x7f000000) !== 0 || (lo & 0x1ff) !== 0) {
        this.log(`ERROR found L1 entry with reserved bits set: ${hex64(hi, lo)}`);
        this.res.corruptions++;
      }
      const l2Offset = entryOffset(hi, lo);
      this.inc(l2Offset, cs);
      if (l2Offset % cs !== 0) {
        this.log(`ERROR l2_offset=${hex(l2Offset)}: Table is not cluster aligned; L1 entry corrupted`);
        this.res.corruptions++;
      }
      await this.checkL2(l2Offset, fragInfo);
      this.tick();
    }
  }

  /** check_refcounts_l2 */
  private async checkL2(l2Offset: number, fragInfo: boolean): Promise<void> {
    const st = this.st;
    const cs = this.cs;
    const ext = st.extendedL2;
    const es = st.l2EntrySize;
    const table = await this.readL2(l2Offset);
    let nextContiguous = 0;
    const csizeShift = 62 - (st.clusterBits - 8);
    const hiShift = csizeShift - 32;
    const offsetHiMask = (1 << hiShift) - 1;
    const csizeMask = (1 << (st.clusterBits - 8)) - 1;
    // The common entry (standard L2, normal, aligned, inside the file, refcount not at its
    // maximum) is counted inline: millions of them in a large image.
    const imrt = this.imrt;
    const max = this.max;
    const clustersInFile = Math.ceil(st.fileSize / cs);
    const external = st.externalData;
    for (let i = 0; i < st.l2Entries; i++) {
      const o = i * es;
      let hi = u32(table, o);
      const lo = u32(table, o + 4);
      if (!ext && !external && (hi & 0x7f000000) === 0 && (lo & 0x1ff) === 0 && (hi | lo) !== 0) {
        const offset = (hi & 0x00ffffff) * TWO32 + lo;
        const k = offset / cs;
        if (k === Math.floor(k) && k < clustersInFile) {
          const r = imrt[k]!;
          if (r < max) {
            imrt[k] = r + 1;
            if (k >= this.n) this.n = k + 1;
            if (fragInfo) {
              this.res.allocatedClusters++;
              if (nextContiguous && offset !== nextContiguous) this.res.fragmentedClusters++;
              nextContiguous = offset + cs;
            }
            continue;
          }
        }
      }
      const bmZero = ext ? u32(table, o + 8) : 0;
      const bmAlloc = ext ? u32(table, o + 12) : 0;
      if (hi === 0 && lo === 0 && bmZero === 0 && bmAlloc === 0) continue;
      const compressed = (hi & 0x40000000) !== 0;
      if (!compressed && ((hi & 0x3f000000) !== 0 || (lo & 0x1fe) !== 0)) {
        this.log(`ERROR found l2 entry with reserved bits set: ${hex64(hi, lo)}`);
        this.res.corruptions++;
      }
      if (compressed) {
        const coffset = (hi & offsetHiMask) * TWO32 + (lo >>> 0);
        // Offsets past 2^53 are not exact as numbers; print them exactly.
        const exact = (hi & offsetHiMask) > 0x1fffff ? (BigInt(hi & offsetHiMask) << 32n) | BigInt(lo >>> 0) : undefined;
        if (hi & 0x80000000) {
          this.log(`ERROR: coffset=0x${hex(exact ?? coffset)}: copied flag must never be set for compressed clusters`);
          hi &= 0x7fffffff;
          this.res.corruptions++;
        }
        if (external) {
          this.log(`ERROR compressed cluster ${i} with data file, entry=0x${hex64(hi, lo)}`);
          this.res.corruptions++;
          continue;
        }
        if (bmZero !== 0 || bmAlloc !== 0) {
          this.log(`ERROR compressed cluster ${i} with non-zero subcluster allocation bitmap, entry=0x${hex64(hi, lo)}`);
          this.res.corruptions++;
          continue;
        }
        const sectors = ((hi >>> hiShift) & csizeMask) + 1;
        const csize = sectors * C.COMPRESSED_SECTOR_SIZE - (lo & (C.COMPRESSED_SECTOR_SIZE - 1));
        this.inc(coffset, csize, false, exact);
        if (fragInfo) {
          this.res.allocatedClusters++;
          this.res.compressedClusters++;
          this.res.fragmentedClusters++;
        }
        continue;
      }
      const offset = entryOffset(hi, lo);
      const zeroFlag = !ext && (lo & 1) !== 0;
      // With a data file, offset 0 and COPIED is guest cluster 0's data (QEMU's cluster type).
      if (offset === 0 && !(external && !zeroFlag && (hi & 0x80000000) !== 0)) {
        // ZERO_PLAIN or UNALLOCATED
        if (!zeroFlag && ext && bmAlloc !== 0) {
          this.res.corruptions++;
          this.log('ERROR: Unallocated cluster has non-zero subcluster allocation map');
        }
        continue;
      }
      // NORMAL or ZERO_ALLOC
      if (ext && (bmZero & bmAlloc) !== 0) {
        this.res.corruptions++;
        this.log(`ERROR offset=${hex(offset)}: Allocated cluster has corrupted subcluster allocation bitmap`);
      }
      if (offset % cs !== 0) {
        this.res.corruptions++;
        const containsData = ext ? bmAlloc !== 0 : !zeroFlag;
        if (!containsData) {
          const repair = (this.fix & FIX_ERRORS) !== 0;
          this.log(`${repair ? 'Repairing' : 'ERROR'} offset=${hex(offset)}: Preallocated cluster is not properly aligned; L2 entry corrupted.`);
          if (repair) {
            await this.zeroEntry(l2Offset, i, bmZero | bmAlloc);
            this.res.corruptions--;
            this.res.corruptionsFixed++;
            continue;
          }
        } else {
          this.log(`ERROR offset=${hex(offset)}: Data cluster is not properly aligned; L2 entry corrupted.`);
        }
      }
      if (fragInfo) {
        this.res.allocatedClusters++;
        if (nextContiguous && offset !== nextContiguous) this.res.fragmentedClusters++;
        nextContiguous = offset + cs;
      }
      // Clusters of an external data file are not counted in the image's refcounts.
      if (!external) this.inc(offset, cs);
    }
  }

  /** fix_l2_entry_by_zero: the entry becomes a plain zero cluster (its subclusters read as before). */
  private async zeroEntry(l2Offset: number, index: number, bitmapAll: number): Promise<void> {
    const es = this.st.l2EntrySize;
    const e = Buffer.alloc(es);
    if (this.st.extendedL2) e.writeUInt32BE(bitmapAll >>> 0, 8);
    else e.writeUInt32BE(1, 4);
    await this.file.write(e, l2Offset + index * es);
    this.reader.invalidate();
    // Keep the cached copy of the table in step with the disk.
    e.copy(this.l2Tables.get(l2Offset) ?? Buffer.alloc(0), index * es);
  }

  /** qcow2_check_bitmaps_refcounts */
  private async checkBitmaps(): Promise<void> {
    const st = this.st;
    const bm = activeBitmapsExtension(st.parsed);
    if (!bm) return;
    const cs = this.cs;
    this.inc(bm.bitmapDirectoryOffset, bm.bitmapDirectorySize);
    const dir = await this.read(bm.bitmapDirectoryOffset, bm.bitmapDirectorySize);
    let entries;
    try {
      entries = decodeBitmapDirectory(dir, bm, cs, st.parsed.header.size);
    } catch (err) {
      if (!(err instanceof StrataError)) throw err;
      this.res.corruptions++;
      throw new CheckAbort(`ERROR failed to load the bitmap directory: ${(err as Error).message}`, 'Invalid argument');
    }
    for (const e of entries) {
      this.inc(e.bitmapTableOffset, e.bitmapTableSize * 8);
      const table = await this.read(e.bitmapTableOffset, e.bitmapTableSize * 8);
      for (let i = 0; i < e.bitmapTableSize; i++) {
        let entry;
        try { entry = decodeBitmapTableEntry(table, i, cs); } catch (err) {
          if (!(err instanceof StrataError)) throw err;
          this.res.corruptions++;
          continue;
        }
        if (entry.kind === 'data') this.inc(entry.offset, cs);
      }
    }
  }

  /** check_refblocks */
  private checkRefblocks(): void {
    const st = this.st;
    const cs = this.cs;
    const repair = (this.fix & FIX_ERRORS) !== 0;
    for (let i = 0; i < st.reftableEntries; i++) {
      const hi = st.reftable.readUInt32BE(i * 8);
      const lo = st.reftable.readUInt32BE(i * 8 + 4);
      if (hi === 0 && lo === 0) continue;
      const offset = hi * TWO32 + ((lo & 0xfffffe00) >>> 0);
      if ((lo & 0x1ff) !== 0) {
        this.log(`ERROR refcount table entry ${i} has reserved bits set`);
        this.res.corruptions++;
        this.rebuild = true;
        continue;
      }
      if (offset % cs !== 0) {
        this.log(`ERROR refcount block ${i} is not cluster aligned; refcount table entry corrupted`);
        this.res.corruptions++;
        this.rebuild = true;
        continue;
      }
      const cluster = Math.floor(offset / cs);
      if (cluster >= this.n) {
        this.res.corruptions++;
        this.log(`${repair ? 'Repairing' : 'ERROR'} refcount block ${i} is outside image`);
        if (repair) {
          // QEMU grows the file so the block lies inside it, then rebuilds the structure
          // because the grown block reads as zeros. We rebuild without growing the file.
          this.res.corruptions--;
          this.res.corruptionsFixed++;
          this.outsideBlocks.add(cluster);
          this.rebuild = true;
        }
        continue;
      }
      this.inc(offset, cs, true);
      const r = this.imrt[cluster]!;
      if (r !== 1) {
        this.log(`ERROR refcount block ${i} refcount=${r}`);
        this.res.corruptions++;
        this.rebuild = true;
      }
    }
  }

  /**
   * compare_refcounts. Fills `final` with the refcounts the image must end up with: the stored
   * ones, except where this pass fixes them (computed ones instead). Blocks that cannot be
   * read go into `unreadable` (their clusters get the computed refcounts in `final`).
   */
  async compare(stored: StoredRefcounts, fix: number, final: RefArray, unreadable?: Set<number>): Promise<void> {
    const E = stored.blockEntries;
    const order = this.st.refcountOrder;
    const imrt = this.imrt;
    this.highestCluster = 0;
    for (let b = 0; b * E < this.n; b++) {
      this.hooks.checkCancelled?.();
      const blk = await stored.block(b);
      if (blk === null) unreadable?.add(b);
      const end = Math.min(this.n, (b + 1) * E);
      let i = b * E;
      if (blk !== null && blk !== 'zero' && order === 4) {
        // 16-bit refcounts (the default): the matching entries without a call per cluster.
        for (let j = 0; i < end; i++, j += 2) {
          const s = (blk[j]! << 8) | blk[j + 1]!;
          final[i] = s;
          if (s !== imrt[i]) break;
          if (s > 0) this.highestCluster = i;
        }
      }
      for (; i < end; i++) {
        const computed = imrt[i]!;
        if (blk === null) {
          this.log(`Can't get refcount for cluster ${i}: Input/output error`);
          this.res.checkErrors++;
          final[i] = computed;
          continue;
        }
        const s = blk === 'zero' ? 0 : getRefcount(blk, i - b * E, order);
        final[i] = s;
        if (s > 0 || computed > 0) this.highestCluster = i;
        if (s === computed) continue;
        let fixed: 'leak' | 'corruption' | null = null;
        if (s === 0) this.rebuild = true;
        else if (s > computed && (fix & FIX_LEAKS)) fixed = 'leak';
        else if (s < computed && (fix & FIX_ERRORS)) fixed = 'corruption';
        // A 64-bit refcount is printed as the unsigned value stored (getRefcount caps it).
        if (s === Number.MAX_SAFE_INTEGER && order === 6 && blk !== 'zero') this.wideRefs.set(i, blk.readBigUInt64BE((i - b * E) * 8));
        const shown = this.shownRef(i, s);
        this.log(`${fixed ? 'Repairing' : s < computed ? 'ERROR' : 'Leaked'} cluster ${i} refcount=${shown} reference=${computed}`);
        if (fixed === 'leak') this.res.leaksFixed++;
        else if (fixed === 'corruption') this.res.corruptionsFixed++;
        else if (s < computed) this.res.corruptions++;
        else this.res.leaks++;
        if (fixed) final[i] = computed;
      }
      this.tick();
    }
  }

  /**
   * check_oflag_copied over the active L1 and its L2 tables, against `refs` (the refcounts the
   * image has, or will have once the repair is written). Returns the flags to change when
   * `repair`.
   */
  async checkCopiedFlags(refs: RefLookup, repair: boolean): Promise<FlagFix[]> {
    const st = this.st;
    const cs = this.cs;
    const fixes: FlagFix[] = [];
    const { refs: known, n: knownN, entries: E, unreadable } = refs;
    const anyUnreadable = unreadable.size > 0;
    const refcount = async (cluster: number): Promise<number | null> => {
      if (cluster >= knownN) return refs.beyond(cluster);
      return anyUnreadable && unreadable.has(Math.floor(cluster / E)) ? null : known[cluster]!;
    };
    for (let i = 0; i < st.l1Size; i++) {
      const hi = st.l1.readUInt32BE(i * 8);
      const lo = st.l1.readUInt32BE(i * 8 + 4);
      const l2Offset = entryOffset(hi, lo);
      if (!l2Offset) { this.tick(); continue; }
      this.hooks.checkCancelled?.();
      const r = await refcount(Math.floor(l2Offset / cs));
      if (r !== null && (r === 1) !== ((hi & 0x80000000) !== 0)) {
        this.res.corruptions++;
        this.log(`${repair ? 'Repairing' : 'ERROR'} OFLAG_COPIED L2 cluster: l1_index=${i} l1_entry=${hex64(hi, lo)} refcount=${this.shownRef(Math.floor(l2Offset / cs), r)}`);
        if (repair) {
          fixes.push({ table: 'l1', offset: st.l1Offset, entryIndex: i, set: r === 1 });
          this.res.corruptions--;
          this.res.corruptionsFixed++;
        }
      }
      const table = await this.readL2(l2Offset);
      const es = st.l2EntrySize;
      for (let j = 0; j < st.l2Entries; j++) {
        const ehi = u32(table, j * es);
        const elo = u32(table, j * es + 4);
        if (ehi & 0x40000000) continue; // compressed
        const dataOffset = entryOffset(ehi, elo);
        // Unallocated or plain zero (with a data file, offset 0 with COPIED is a data cluster).
        if (dataOffset === 0 && !(st.externalData && (ehi & 0x80000000) !== 0 && (st.extendedL2 || (elo & 1) === 0))) continue;
        // Millions of entries: a plain array lookup for the clusters the passes counted.
        const cluster = Math.floor(dataOffset / cs);
        // Clusters of an external data file have refcount 1, as far as QEMU's check goes.
        const rc = st.externalData ? 1 : cluster < knownN && !anyUnreadable ? known[cluster]! : await refcount(cluster);
        if (rc === null) continue;
        if ((rc === 1) !== ((ehi & 0x80000000) !== 0)) {
          this.res.corruptions++;
          this.log(`${repair ? 'Repairing' : 'ERROR'} OFLAG_COPIED data cluster: l2_entry=${hex64(ehi, elo)} refcount=${this.shownRef(cluster, rc)}`);
          if (repair) {
            fixes.push({ table: 'l2', offset: l2Offset, entryIndex: j, set: rc === 1 });
            this.res.corruptions--;
            this.res.corruptionsFixed++;
          }
        }
      }
      this.tick();
    }
    return fixes;
  }
}

/**
 * Refcounts for the COPIED-flag pass: `refs` for clusters [0, n) (except those in refcount
 * blocks that could not be read, which count as unknown), `beyond` for the rest.
 */
interface RefLookup {
  refs: RefArray;
  n: number;
  /** Entries per refcount block, for `unreadable`. */
  entries: number;
  unreadable: Set<number>;
  beyond: (cluster: number) => Promise<number | null>;
}

/**
 * Writes the COPIED flag changes whose `set` equals `which`: each table is read, its entries'
 * flag bits changed and the part of it inside the file written back.
 */
async function writeFlagFixes(file: BlockFile, st: ImageState, fixes: FlagFix[], which: boolean): Promise<void> {
  const byTable = new Map<string, FlagFix[]>();
  for (const f of fixes) {
    if (f.set !== which) continue;
    const key = `${f.table}:${f.offset}`;
    const list = byTable.get(key);
    if (list) list.push(f); else byTable.set(key, [f]);
  }
  const fileSize = await file.size();
  for (const list of byTable.values()) {
    const { table, offset } = list[0]!;
    const es = table === 'l1' ? 8 : st.l2EntrySize;
    const len = Math.min(table === 'l1' ? st.l1Size * 8 : st.clusterSize, fileSize - offset);
    if (len <= 0) continue;
    const buf = Buffer.alloc(len);
    await file.read(buf, offset);
    for (const f of list) {
      const at = f.entryIndex * es;
      if (at + 8 > len) continue;
      const hi = buf.readUInt32BE(at);
      buf.writeUInt32BE((f.set ? hi | 0x80000000 : hi & 0x7fffffff) >>> 0, at);
      if (table === 'l1') st.l1.writeUInt32BE(buf.readUInt32BE(at), f.entryIndex * 8);
    }
    await file.write(buf, offset);
  }
}

/**
 * Writes a complete refcount structure for `final` (entries [0, n)) and switches the header to
 * it. It goes into the first run of clusters inside the file that nothing uses (no reference,
 * not the old structure, which stays in use until the switch) and that can hold it, so
 * repeated repairs do not grow the file; else past the end, avoiding `avoid`. Returns the new
 * reftable location and the end of the structure.
 */
async function writeRefcountStructure(
  file: BlockFile, st: ImageState, final: RefArray, n: number, avoid: Set<number>, oldStructure: Map<number, number>,
): Promise<{ reftableOffset: number; reftableClusters: number; end: number }> {
  const cs = st.clusterSize;
  const g = { clusterBits: st.clusterBits, refcountOrder: st.refcountOrder };
  const inFile = Math.min(n, Math.floor(st.fileSize / cs));
  const free = (c: number) => (c < n ? c > 0 && !final[c] && !oldStructure.has(c) : true) && !avoid.has(c);
  let lay;
  try {
    lay = placeStructure(final, n, g, free, inFile, Math.max(n, Math.ceil(st.fileSize / cs)));
  } catch {
    throw new StrataError('corrupt', 'could not lay out a new refcount structure', file.path);
  }
  if (lay.tableClusters * cs > C.MAX_REFTABLE_SIZE_BYTES) {
    throw new FormatError(`the rebuilt refcount table would exceed ${C.MAX_REFTABLE_SIZE_BYTES} bytes`, file.path);
  }
  const enc = encodeStructure(final, n, lay, g);
  for (const b of enc.blocks) await file.write(b.data, b.offset);
  await file.write(enc.table, enc.tableOffset);
  await file.flush();
  const hdr = Buffer.alloc(12);
  hdr.writeBigUInt64BE(BigInt(enc.tableOffset), 0);
  hdr.writeUInt32BE(lay.tableClusters, 8);
  await file.write(hdr, 48);
  await file.flush();
  return { reftableOffset: enc.tableOffset, reftableClusters: lay.tableClusters, end: (lay.start + lay.clusters) * cs };
}

/**
 * QEMU 7.2's rebuild_refcount_structure: from the computed refcounts (`counts`, the old
 * structure still counted), refblocks are allocated one by one in the first free cluster (not
 * below the block they cover), then the refcount table in the first free run, again until
 * the table stops growing; blocks, then the table, then the header are written. Then QEMU's
 * leak pass: `freed` (the old structure, referenced by nothing now) drop to `after[c]`, the
 * blocks holding them are written again and the clusters discarded. Returns the clusters the
 * new structure covers (for the image end).
 */
async function qemuRebuild(file: BlockFile, st: ImageState, counts: RefArray, n: number, freed: [number, number][]): Promise<number> {
  const cs = st.clusterSize;
  const order = st.refcountOrder;
  const E = refcountBlockEntries(st.clusterBits, order);
  let refs = new Float64Array(Math.max(n, 1));
  refs.set(counts.subarray(0, n));
  let size = n;
  const get = (c: number) => (c < size ? refs[c]! : 0);
  const grow = (to: number) => {
    if (to > refs.length) { const r = new Float64Array(Math.max(to, refs.length * 2)); r.set(refs); refs = r; }
    size = Math.max(size, to);
  };
  // alloc_clusters_imrt: the first run of `count` free clusters from *first on.
  const alloc = (count: number, first: { c: number }): number => {
    let c = first.c;
    let run = 0;
    let firstGap = true;
    for (; c < size && run < count; c++) {
      if (!get(c)) {
        run++;
        if (firstGap) { first.c = c; firstGap = false; }
      } else run = 0;
    }
    if (run < count) grow(c + count - run);
    c -= run;
    for (let i = 0; i < count; i++) refs[c + i] = 1;
    return c;
  };
  const reftable: number[] = [];
  const writeBlock = async (idx: number) => {
    const data = Buffer.alloc(cs);
    for (let j = 0; j < E; j++) { const v = get(idx * E + j); if (v) setRefcount(data, j, order, v); }
    await file.write(data, reftable[idx]!);
  };
  // rebuild_refcounts_write_refblocks: true when the table had to grow.
  const writeBlocks = async (from: number, to: number): Promise<boolean> => {
    let grown = false;
    const first = { c: 0 };
    let end = to;
    for (let c = from; c < end; c++) {
      if (!get(c)) continue;
      const idx = Math.floor(c / E);
      const start = idx * E;
      if (!(idx < reftable.length && reftable[idx])) {
        if (first.c < start) first.c = start;
        const b = alloc(1, first);
        if (b >= end) end = b + 1;
        if (reftable.length <= idx) {
          const entries = Math.ceil(((idx + 1) * 8) / cs) * cs / 8;
          while (reftable.length < entries) reftable.push(0);
          grown = true;
        }
        reftable[idx] = b * cs;
      }
      await writeBlock(idx);
      c = start + E - 1;
    }
    return grown;
  };
  await writeBlocks(0, size);
  let tableAt = 0;
  let tableClusters = 0;
  for (let changed = true; changed;) {
    tableClusters = Math.ceil((reftable.length * 8) / cs);
    tableAt = alloc(tableClusters, { c: 0 });
    changed = await writeBlocks(tableAt, tableAt + tableClusters);
  }
  const table = Buffer.alloc(tableClusters * cs);
  reftable.forEach((o, i) => table.writeBigUInt64BE(BigInt(o), i * 8));
  await file.write(table, tableAt * cs);
  await file.flush();
  const hdr = Buffer.alloc(12);
  hdr.writeBigUInt64BE(BigInt(tableAt * cs), 0);
  hdr.writeUInt32BE(tableClusters, 8);
  await file.write(hdr, 48);
  await file.flush();
  let highest = 0;
  for (let c = size - 1; c >= 0; c--) if (get(c)) { highest = c; break; }
  // The leak pass over the old structure.
  const blocks = new Set<number>();
  for (const [c, v] of freed) { refs[c] = v; blocks.add(Math.floor(c / E)); }
  for (const idx of [...blocks].sort((a, b) => a - b)) await writeBlock(idx);
  await file.flush();
  for (const [c, v] of freed) if (!v) await file.discard?.(c * cs, cs);
  return highest + 1;
}

/** The refcounts `final` describes (0 past it: the new structure covers nothing else). */
function finalLookup(final: RefArray, n: number, entries: number): RefLookup {
  return { refs: final, n, entries, unreadable: new Set(), beyond: async () => 0 };
}

/**
 * Checks (and with `repair`, repairs) one qcow2 image, as one call of QEMU's qcow2_co_check.
 * The caller runs a second, read-only pass after a repair fixed something (qemu-img does).
 * Throws on images that cannot be opened (not qcow2, unsupported features); returns
 * `failure` when the check itself could not complete.
 */
export async function checkQcow2(file: BlockFile, opts: CheckOptions = {}): Promise<CheckPass> {
  const fix = opts.repair === 'all' ? FIX_ERRORS | FIX_LEAKS : opts.repair === 'leaks' ? FIX_LEAKS : 0;
  const log = (s: string) => opts.log?.(s);
  let ck: Checker | null = null;
  try {
    const st = await loadState(file, fix & FIX_ERRORS ? 'repair' : 'check', log);
    if (fix !== 0) await clearUnknownAutoclear(file, st.parsed.header);
    // The snapshot table's own findings (qcow2_check_read_snapshot_table): entries dropped past
    // QEMU's limits are fixed at once (the header's count), the rest by a rewrite at the end.
    const table = st.snapshotTable;
    const snap = { corruptions: table.reduced + table.dropped, fixed: 0 };
    if (table.reduced) {
      const b = Buffer.alloc(4);
      b.writeUInt32BE(st.snapshots.length);
      await file.write(b, 60);
      await file.flush();
      st.parsed.header.nbSnapshots = st.snapshots.length;
      snap.fixed += table.reduced;
      snap.corruptions -= table.reduced;
    }
    // A v3 entry needs 16 bytes of extra data (the VM state and disk sizes).
    if (st.parsed.header.version >= 3) {
      table.extraSizes.forEach((x, i) => {
        if (x >= 16) return;
        snap.corruptions++;
        log(`${fix & FIX_ERRORS ? 'Repairing' : 'ERROR'} snapshot table entry ${i} is incomplete`);
      });
    }
    // The first pass's lines go through `sink`, which a rebuild holds back while the recount
    // prints its own (QEMU's order: the recount's findings, then the leak repairs and flags).
    let sink = log;
    ck = new Checker(file, st, fix, { ...opts, log: (s) => sink(s) });
    const cs = st.clusterSize;
    await ck.calculate();
    if (fix & FIX_ERRORS) await file.flush(); // entries fix_l2_entry_by_zero rewrote
    const stored = new StoredRefcounts(file, st, log);
    const preCompare = { ...ck.res };
    let flagFixes: FlagFix[] = [];
    let rewrite = false;

    const E = stored.blockEntries;
    const unreadable = new Set<number>();
    const final = newRefArray(st.refcountOrder, ck.n);
    await ck.compare(stored, 0, final, unreadable);
    // The stored refcounts, as compare() read them: what the COPIED flags are checked against
    // (until a repair changes `final`).
    const storedLookup: RefLookup = { refs: final, n: ck.n, entries: E, unreadable, beyond: (c) => stored.get(c) };
    if (fix === 0) {
      await ck.checkCopiedFlags(storedLookup, false);
    } else {
      if (ck.rebuild && (fix & FIX_ERRORS)) {
        // QEMU: rebuild_refcount_structure from the computed refcounts, then recount.
        const old = { ...ck.res };
        old.corruptions += ck.outsideBlocks.size; // the grown blocks QEMU would find at refcount 0
        log('Rebuilding refcount structure');
        final.set(ck.imrt.subarray(0, ck.n));
        for (const [c, k] of ck.structureRefs) final[c] = final[c]! - k;
        // QEMU's rebuilt structure still counts the old one, which nothing references once the
        // header points to the new: its leak pass then frees those clusters ("Repairing
        // cluster N refcount=R reference=0"), discarding them, before the COPIED checks. Here
        // the new refcounts leave them out from the start; the same lines, the same holes.
        const { n, imrt } = ck;
        const oldClusters = [...ck.structureRefs.keys()].filter((c) => c < n && imrt[c]! > final[c]!).sort((a, b) => a - b);
        const held: string[] = [];
        sink = (s) => { held.push(s); };
        for (const c of oldClusters) sink(`Repairing cluster ${c} refcount=${ck.imrt[c]} reference=${final[c]}`);
        // QEMU checks the flags against the rebuilt refcounts (it prints this after the rebuild).
        const fixes = await ck.checkCopiedFlags(finalLookup(final, ck.n, E), true);
        const flagsFixed = fixes.length;
        await writeFlagFixes(file, st, fixes, false);
        await file.flush();
        const covered = await qemuRebuild(file, st, imrt, n, oldClusters.map((c) => [c, final[c]!]));
        await writeFlagFixes(file, st, fixes, true);
        await file.flush();
        // Recount on the rebuilt image, as QEMU's second calculate_refcounts (which prints what
        // it finds in the tables again, before the leak repairs and the flag checks).
        const st2 = await loadState(file, st);
        const again = new Checker(file, st2, 0, { log });
        await again.calculate();
        sink = log;
        for (const s of held) log(s);
        const res = ck.res;
        res.checkErrors = old.checkErrors + again.res.checkErrors;
        res.corruptions = again.res.corruptions;
        res.leaks = 0;
        res.corruptionsFixed = old.corruptionsFixed + Math.max(0, old.corruptions - again.res.corruptions) + flagsFixed;
        res.leaksFixed = old.leaksFixed + old.leaks;
        res.allocatedClusters = again.res.allocatedClusters;
        res.fragmentedClusters = again.res.fragmentedClusters;
        res.compressedClusters = again.res.compressedClusters;
        ck.highestCluster = Math.max(ck.highestCluster, covered - 1);
        flagFixes = [];
      } else {
        if (ck.rebuild) {
          log('ERROR need to rebuild refcount structures');
          ck.res.checkErrors++;
          return { ...ck.res, failure: 'Input/output error' };
        }
        if (ck.res.leaks || ck.res.corruptions) {
          Object.assign(ck.res, preCompare);
          await ck.compare(stored, fix, final, unreadable);
          rewrite = ck.res.leaksFixed > preCompare.leaksFixed || ck.res.corruptionsFixed > preCompare.corruptionsFixed;
        }
        if (rewrite) {
          for (const [c, k] of ck.structureRefs) final[c] = ck.imrt[c]! - k;
        }
        const repairFlags = (fix & FIX_ERRORS) !== 0 || (!ck.res.checkErrors && !ck.res.corruptions && !ck.res.leaks);
        flagFixes = await ck.checkCopiedFlags(rewrite ? finalLookup(final, ck.n, E) : storedLookup, repairFlags);
        await writeFlagFixes(file, st, flagFixes, false);
        if (rewrite) {
          await file.flush();
          const w = await writeRefcountStructure(file, st, final, ck.n, ck.pastEofRefs, ck.structureRefs);
          ck.highestCluster = Math.max(ck.highestCluster, Math.ceil(w.end / cs) - 1);
        }
        await writeFlagFixes(file, st, flagFixes, true);
        await file.flush();
      }
    }
    const res = ck.res;
    res.imageEndOffset = (ck.highestCluster + 1) * cs;
    if (snap.corruptions && (fix & FIX_ERRORS) && table.entries) {
      await rewriteSnapshotTable(file, table.entries, st.parsed.header.snapshotsOffset, st.snapshotsSize);
      snap.fixed += snap.corruptions;
      snap.corruptions = 0;
    }
    res.corruptions += snap.corruptions;
    res.corruptionsFixed += snap.fixed;
    if (fix && res.checkErrors === 0 && res.corruptions === 0) {
      const h = st.parsed.header;
      const bits = C.INCOMPAT_DIRTY | C.INCOMPAT_CORRUPT;
      if (h.version === 3 && (h.incompatibleFeatures & bits)) {
        // qcow2_mark_clean + qcow2_mark_consistent
        const b = Buffer.alloc(8);
        b.writeBigUInt64BE(h.incompatibleFeatures & ~bits);
        await file.write(b, 72);
        await file.flush();
      }
    }
    return { ...res, failure: null };
  } catch (err) {
    if (err instanceof CheckAbort) {
      const res = ck?.res ?? emptyCounts();
      res.checkErrors++;
      log(err.message);
      return { ...res, failure: err.reason };
    }
    throw err;
  }
}
