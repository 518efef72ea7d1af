// amend: qemu-img amend on qcow2 images (compat=0.10|1.1 both ways, lazy_refcounts,
// refcount_bits, size), with QEMU's order of steps (upgrade first, then the refcount width,
// the header, lazy refcounts, the size, and the downgrade last) and QEMU's refusals. Every
// refusal is found before the first write (QEMU finds some of them half-way): a refused
// amend leaves the file byte for byte as it was.
//
// Crash safety, step by step:
// - upgrade: a snapshot table that needs v3's extra data is written to new clusters (its
//   refcounts first, flushed), then the header (version 3, the new table) in one write; the
//   old table is freed after that.
// - refcount width: a complete refcount structure of the new width is written where nothing
//   lives and flushed; one header write (refcount_order, the table's offset and size, all in
//   the first sector) switches to it. Before it the old structure is in force, after it the
//   new one; the old one's clusters are free in the new one.
// - downgrade: zero clusters become data clusters (allocated and zeroed, their refcounts
//   flushed, before the L2 entry changes) or unallocated ones, as QEMU's
//   qcow2_expand_zero_clusters; only then does the header say version 2.
import { amendLuksKeyslots, LuksError, type LuksAmendOptions } from '../engine/luks';
import { lookupSecret, secretFor } from '../chain/secrets';
import * as C from '../format/constants';
import { featureTableExtension } from '../format/layout';
import { encodeHeader, type HeaderExtension } from '../format/header';
import { decodeL1Entry, decodeL2Entry } from '../format/l2';
import { encodeSnapshotTable } from '../format/snapshot';
import { maxRefcount, refcountBlockEntries } from '../format/refcount';
import { CorruptImageError, UnsupportedFeatureError, UsageError } from '../errors';
import { closeChain, openImageFile } from '../chain/open';
import type { DiskImage, ImageFormat } from '../engine/image';
import { Qcow2Writable } from '../engine/qcow2-write';
import { Refcounts } from '../engine/refcounts';
import { MetadataSwitch } from '../engine/metadata-switch';
import { encodeStructure, newRefArray, placeStructure } from '../engine/refcount-structure';
import { throwIfCancelled, type JobContext } from './job';
import { checkImage } from './check';
import { parseImageName } from '../chain/names';
import { NodeFile } from '../io/node-file';
import { hasRawExternalData, isQcow2Magic } from '../format/header';

/** A refusal with qemu-img's text (exit 1, nothing written). */
export class AmendError extends UnsupportedFeatureError {}

/** Bad -o for amend: a usage error whose text is qemu-img's, hint lines included. */
function qemuUsage(text: string): UsageError {
  return new UsageError(text).asQemu(text);
}

export interface AmendOptions {
  version?: 2 | 3;
  lazyRefcounts?: boolean;
  refcountBits?: number;
  size?: number;
  backingFile?: string;
  backingFormat?: string;
  dataFile?: string;
  dataFileRaw?: boolean;
  /** LUKS key slot changes (encrypt.state, encrypt.keyslot, encrypt.new-secret, ...). */
  luks?: Partial<LuksAmendOptions>;
}

/** Options qemu-img amend takes for qcow2 (qcow2_amend_opts). */
const AMEND_KEYS = new Set(['compat', 'size', 'backing_file', 'backing_fmt', 'lazy_refcounts', 'refcount_bits', 'data_file', 'data_file_raw']);
/** LUKS key slot options (qcow2's amend takes them for LUKS images). */
const LUKS_AMEND_KEYS = new Set(['encrypt.state', 'encrypt.keyslot', 'encrypt.new-secret', 'encrypt.old-secret', 'encrypt.iter-time']);
/** Options that only qemu-img create takes: refused with QEMU's hint. */
const CREATE_ONLY = new Set(['encryption', 'cluster_size', 'preallocation', 'compression_type', 'extended_l2', 'encrypt.format', 'encrypt.cipher-alg', 'encrypt.cipher-mode', 'encrypt.ivgen-alg', 'encrypt.ivgen-hash-alg', 'encrypt.hash-alg', 'encrypt.iter-time', 'encrypt.slot', 'encrypt.state', 'encrypt.new-secret', 'encrypt.keysecret', 'encrypt.key-secret', 'encrypt.old-secret', 'encrypt.secret', 'data_file_raw']);

function parseBool(key: string, v: string): boolean {
  if (v === 'on' || v === 'yes' || v === 'true' || v === 'y') return true;
  if (v === 'off' || v === 'no' || v === 'false' || v === 'n') return false;
  throw qemuUsage(`Parameter '${key}' expects 'on' or 'off'`);
}

/** QEMU's option syntax: key=value pairs, `,,` a literal comma. */
export function splitOptions(o: string): [string, string][] {
  const out: [string, string][] = [];
  let i = 0;
  while (i < o.length) {
    let key = '';
    while (i < o.length && o[i] !== '=' && o[i] !== ',') key += o[i++];
    let value = '';
    if (o[i] === '=') {
      i++;
      while (i < o.length) {
        if (o[i] === ',') { if (o[i + 1] === ',') { value += ','; i += 2; continue; } break; }
        value += o[i++];
      }
    } else {
      // A bare key is a boolean "on" (QEMU's opts parsing).
      value = 'on';
    }
    i++;
    if (key) out.push([key, value]);
  }
  return out;
}

/** -o for amend, checked as qemu-img checks it. */
export function parseAmendOptions(o: string): AmendOptions {
  const r: AmendOptions = {};
  for (const [key, value] of splitOptions(o)) {
    if (LUKS_AMEND_KEYS.has(key)) {
      const l = (r.luks ??= {});
      if (key === 'encrypt.state') {
        if (value !== 'active' && value !== 'inactive') throw qemuUsage(`Parameter 'encrypt.state' does not accept value '${value}'`);
        l.state = value;
      } else if (key === 'encrypt.keyslot' || key === 'encrypt.iter-time') {
        if (!/^\d+$/.test(value)) throw qemuUsage(`Parameter '${key}' expects a number`);
        if (key === 'encrypt.keyslot') l.keyslot = Number(value);
        else l.iterTime = Number(value);
      } else if (key === 'encrypt.new-secret') l.newSecret = value;
      else l.oldSecret = value;
      continue;
    }
    if (!AMEND_KEYS.has(key)) {
      if (CREATE_ONLY.has(key) || key.startsWith('encrypt.')) throw qemuUsage(`Invalid parameter '${key}'\nThis option is only supported for image creation`);
      throw qemuUsage(`Invalid parameter '${key}'`);
    }
    switch (key) {
      case 'compat':
        if (value === '0.10' || value === 'v2') r.version = 2;
        else if (value === '1.1' || value === 'v3') r.version = 3;
        else throw qemuUsage(`Unknown compatibility level ${value}`);
        break;
      case 'lazy_refcounts': r.lazyRefcounts = parseBool(key, value); break;
      case 'data_file_raw': r.dataFileRaw = parseBool(key, value); break;
      case 'refcount_bits': {
        if (!/^\d+$/.test(value)) throw qemuUsage(`Parameter '${key}' expects a number`);
        const n = Number(value);
        if (n <= 0 || n > 64 || (n & (n - 1)) !== 0) throw qemuUsage('Refcount width must be a power of two and may not exceed 64 bits');
        r.refcountBits = n;
        break;
      }
      case 'size': {
        const m = /^(\d+(?:\.\d+)?)([kmgtpe]?)$/i.exec(value);
        if (!m) throw qemuUsage(`Parameter '${key}' expects a non-negative number below 2^64\nOptional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively.`);
        const mult = 1024 ** ' kmgtpe'.indexOf((m[2] || ' ').toLowerCase());
        r.size = Math.round(Number(m[1]) * (m[2] ? mult : 1));
        break;
      }
      case 'backing_file': r.backingFile = value; break;
      case 'backing_fmt': r.backingFormat = value; break;
      case 'data_file': r.dataFile = value; break;
    }
  }
  return r;
}

/**
 * QEMU's amend progress (qcow2_amend_helper_cb): each operation reports its own progress, and
 * the total is projected from the operations done so far. `report` gets percents.
 */
export class AmendProgress {
  private completed = 0;
  private offsetCompleted = 0;
  private lastWork = 0;
  private last: string | null = null;
  constructor(private readonly total: number, private readonly report: (percent: number) => void) {}

  status(op: string, offset: number, work: number): void {
    if (this.total <= 0) return;
    if (op !== this.last) {
      if (this.last !== null) { this.offsetCompleted += this.lastWork; this.completed++; }
      this.last = op;
    }
    this.lastWork = work;
    const current = this.offsetCompleted + work;
    const projected = Math.floor((current * (this.total - this.completed - 1)) / (this.completed + 1));
    this.report(Math.fround((100 * (this.offsetCompleted + offset)) / (current + projected)));
  }
}

/** What the amend will do, decided (and every refusal found) before anything is written. */
interface AmendPlan {
  fromVersion: number;
  toVersion: number;
  fromOrder: number;
  toOrder: number;
  lazy: boolean;
  size: number | null;
  /**
   * The snapshots' sizes are checked against the size the downgrade meets only after the
   * resize, as qemu-img does (it shrinks, then refuses the downgrade: iotest 061).
   */
  snapshotsAfterResize: boolean;
}

/** QEMU's qcow2_downgrade condition on internal snapshots, for an image of `size` bytes. */
function snapshotsAllowDowngrade(img: Qcow2Writable, size: number): boolean {
  return img.snapshots.every((s) => s.vmStateSize <= 0xffffffff && (s.diskSize ?? size) === size);
}

/** The checks QEMU makes along the way, all made up front. */
async function planAmend(img: Qcow2Writable, o: AmendOptions, qemu = false): Promise<AmendPlan> {
  const h = img.header;
  const fromVersion = h.version;
  const toVersion = o.version ?? fromVersion;
  const fromOrder = h.refcountOrder;
  const bits = o.refcountBits ?? 2 ** fromOrder;
  const toOrder = Math.log2(bits);
  const lazyNow = (h.compatibleFeatures & C.COMPAT_LAZY_REFCOUNTS) !== 0n;
  const lazy = o.lazyRefcounts ?? lazyNow;
  // qcow2_amend_options: data_file (even empty) needs an image with an external data file;
  // data_file_raw can only be kept on or turned off.
  if (o.dataFile !== undefined && !img.geometry.externalData) throw new AmendError('data-file can only be set for images that use an external data file');
  if (o.dataFileRaw && !hasRawExternalData(h)) throw new AmendError('data-file-raw cannot be set on existing images');
  if (toOrder !== fromOrder && toVersion < 3 && bits !== 16) {
    throw new AmendError('Refcount widths other than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)');
  }
  if (toOrder < fromOrder) {
    // qcow2_change_refcount_order: every refcount must fit the narrower width.
    const max = maxRefcount(toOrder);
    const sw = await MetadataSwitch.begin(img, img.refcounts);
    const n = Math.ceil((await img.file.size()) / img.geometry.clusterSize);
    for (let c = 0; c < Math.max(n, img.refcounts.allocEnd); c++) {
      const v = sw.get(c);
      if (v > max) throw new AmendError(`Cannot decrease refcount entry width to ${bits} bits: Cluster at offset 0x${(c * img.geometry.clusterSize).toString(16)} has a refcount of ${v}`);
    }
  }
  if (o.backingFile !== undefined || o.backingFormat !== undefined) {
    if ((o.backingFile ?? null) !== img.parsed.backingFile || (o.backingFormat ?? null) !== img.parsed.backingFormat) {
      throw new AmendError("Cannot amend the backing file\nYou can use 'qemu-img rebase' instead.");
    }
  }
  if (lazy !== lazyNow && lazy && toVersion < 3) {
    throw new AmendError('Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)');
  }
  const size = o.size !== undefined && o.size !== 0 ? o.size : null;
  if (size !== null) {
    if (size % 512 !== 0) throw new AmendError('The new size must be a multiple of 512');
    const versionAtResize = Math.max(fromVersion, toVersion);
    if (img.snapshots.length && versionAtResize < 3) throw new AmendError("Can't resize a v2 image which has snapshots");
  }
  let snapshotsAfterResize = false;
  if (toVersion < fromVersion) {
    if (toOrder !== 4) throw new AmendError('compat=0.10 requires refcount_bits=16');
    if (img.parsed.dataFile) throw new AmendError('Cannot downgrade an image with a data file');
    const sizeAfter = size ?? img.virtualSize;
    snapshotsAfterResize = qemu && size !== null && size !== img.virtualSize;
    if (!snapshotsAfterResize && !snapshotsAllowDowngrade(img, sizeAfter)) throw new AmendError('Internal snapshots prevent downgrade of image');
    const other = h.incompatibleFeatures & ~C.INCOMPAT_COMPRESSION & ~C.INCOMPAT_DIRTY;
    if (other) throw new AmendError(`Cannot downgrade an image with incompatible features 0x${other.toString(16)} set`);
    // A deliberate difference: QEMU downgrades and leaves the bitmaps in a v2 header, where
    // they are inconsistent and their clusters leak.
    if (img.bitmaps?.length) throw new AmendError('Cannot downgrade an image with persistent bitmaps (a compat=0.10 image cannot keep them); remove them first with `qemu-img bitmap --remove`');
    if (h.incompatibleFeatures & C.INCOMPAT_COMPRESSION && await hasCompressedClusters(img)) {
      throw new AmendError('Cannot downgrade an image with zstd compression type and existing compressed clusters');
    }
  }
  return { fromVersion, toVersion, fromOrder, toOrder, lazy, size, snapshotsAfterResize };
}

/** The L2 tables of the active L1 table. */
async function activeL2Offsets(img: Qcow2Writable): Promise<number[]> {
  const out: number[] = [];
  for (let i = 0; i < img.l1.length / 8; i++) {
    const e = decodeL1Entry(img.l1, i);
    if (e.l2Offset) out.push(e.l2Offset);
  }
  return out;
}

async function hasCompressedClusters(img: Qcow2Writable): Promise<boolean> {
  const cs = img.geometry.clusterSize;
  const g = { clusterBits: img.header.clusterBits, extendedL2: false };
  const t = Buffer.alloc(cs);
  for (const off of await activeL2Offsets(img)) {
    await img.file.read(t, off);
    for (let j = 0; j < cs / 8; j++) if (decodeL2Entry(t, j, g, undefined, img.filename).kind === 'compressed') return true;
  }
  return false;
}

/** The header cluster with QEMU's extensions, in qcow2_update_header's order. */
function headerCluster(img: Qcow2Writable): Buffer {
  const p = img.parsed;
  const h = p.header;
  const cs = img.geometry.clusterSize;
  const known = new Set([C.EXT_BACKING_FORMAT, C.EXT_FEATURE_TABLE, C.EXT_BITMAPS, C.EXT_DATA_FILE, C.EXT_CRYPTO_HEADER]);
  const exts: HeaderExtension[] = [];
  const keep = (type: number) => { for (const e of p.extensions) if (e.type === type) exts.push(e); };
  keep(C.EXT_DATA_FILE);
  keep(C.EXT_CRYPTO_HEADER);
  if (h.version === 3) keep(C.EXT_BITMAPS);
  const table = featureTableExtension(h.version, cs);
  if (table) exts.push(table);
  for (const e of p.extensions) if (!known.has(e.type)) exts.push(e);
  p.extensions = exts;
  return encodeHeader(p, img.filename);
}

/**
 * data_file=NAME records another name for the external data file (an empty one records none:
 * it must then be given when the image is opened); data_file_raw=off clears the raw flag.
 * One header write, as QEMU's qcow2_update_header at the end of its amend.
 */
async function setDataFile(img: Qcow2Writable, o: AmendOptions): Promise<void> {
  const p = img.parsed;
  const h = p.header;
  if (o.dataFileRaw === false) h.autoclearFeatures &= ~C.AUTOCLEAR_DATA_FILE_RAW;
  if (o.dataFile !== undefined) {
    p.dataFile = o.dataFile === '' ? null : o.dataFile;
    const i = p.extensions.findIndex((e) => e.type === C.EXT_DATA_FILE);
    const ext = p.dataFile === null ? [] : [{ type: C.EXT_DATA_FILE, data: Buffer.from(p.dataFile, 'utf8') }];
    if (i >= 0) p.extensions.splice(i, 1, ...ext);
    else p.extensions.unshift(...ext);
  }
  await img.flush();
  await writeHeader(img);
}

async function writeHeader(img: Qcow2Writable): Promise<void> {
  await img.file.write(headerCluster(img), 0);
  await img.file.flush();
}

/** v2 → v3: snapshots get v3's extra data; the header its v3 fields. */
async function upgrade(img: Qcow2Writable, progress?: AmendProgress): Promise<void> {
  progress?.status('upgrade', 0, 2);
  await img.flush();
  const h = img.header;
  const cs = img.geometry.clusterSize;
  let freeOld: { offset: number; length: number } | null = null;
  if (img.snapshots.some((s) => s.extraData.length < 16)) {
    for (const s of img.snapshots) if (s.diskSize === null) s.diskSize = img.virtualSize;
    const table = encodeSnapshotTable(img.snapshots);
    const at = await img.mutex.run(async () => { const o = await img.refcounts.alloc(Math.ceil(table.length / cs)); img.noteAlloc(); return o; });
    await img.file.write(table, at);
    await img.refcounts.writeBack();
    await img.file.flush();
    freeOld = { offset: h.snapshotsOffset, length: Math.ceil(img.snapshotTableSize / cs) * cs };
    h.snapshotsOffset = at;
    img.snapshotTableSize = table.length;
  }
  progress?.status('upgrade', 1, 2);
  h.version = 3;
  h.headerLength = C.HEADER_V3_WITH_COMPRESSION_LENGTH;
  h.incompatibleFeatures = 0n;
  h.compatibleFeatures = 0n;
  h.autoclearFeatures = 0n;
  h.refcountOrder = 4;
  h.compressionType = 0;
  h.unknownFields = Buffer.alloc(0);
  await writeHeader(img);
  if (freeOld && freeOld.offset) { img.pendingFrees.push(freeOld); await img.flush(); }
  progress?.status('upgrade', 2, 2);
}

/**
 * The progress QEMU's qcow2_change_refcount_order reports, as `report(offset, work)`: it walks
 * the old refcount table, reporting each entry, first to allocate the new structure's blocks
 * and table (again until a walk allocates nothing: two walks, or more when the allocations
 * themselves need new blocks), then once more to write them. Which walks there are follows
 * QEMU's allocations, replayed here on which clusters are in use (QEMU's allocator takes the
 * first free clusters from the start); only the reports are made.
 */
export function replayRefcountWalks(inUse: (cluster: number) => boolean, n: number, oldTable: Buffer, clusterBits: number, oldOrder: number, newOrder: number, report: (offset: number, work: number) => void): void {
  const cs = 2 ** clusterBits;
  const oldPer = refcountBlockEntries(clusterBits, oldOrder);
  const newPer = refcountBlockEntries(clusterBits, newOrder);
  const entries = oldTable.length / 8;
  let used = new Uint8Array(n + 64);
  for (let c = 0; c < n; c++) if (inUse(c)) used[c] = 1;
  const present = new Set<number>();
  for (let ri = 0; ri < entries; ri++) if (oldTable.readBigUInt64BE(ri * 8) & C.REFT_OFFSET_MASK) present.add(ri);
  const get = (c: number) => c < used.length && used[c] === 1;
  const set = (c: number, v: number) => {
    if (c >= used.length) { const b = new Uint8Array(Math.max(c + 1, used.length * 2)); b.set(used); used = b; }
    used[c] = v;
  };
  let freeIndex = 0;
  const alloc = (k: number): number => {
    let start = freeIndex;
    for (let run = 0; run < k;) {
      const c = freeIndex++;
      if (get(c)) { run = 0; start = freeIndex; } else run++;
    }
    for (let c = start; c < start + k; c++) { set(c, 1); present.add(Math.floor(c / oldPer)); }
    return start;
  };
  const newTable = new Set<number>();
  let newSize = 0;
  const walk = (index: number, total: number, allocate: boolean): boolean => {
    let allocated = false;
    let at = 0;
    let filled = 0;
    let empty = true;
    const finish = () => {
      if (allocate) {
        if (at >= newSize) { newSize = Math.ceil((at + 1) / (cs / 8)) * (cs / 8); allocated = true; }
        if (!empty && !newTable.has(at)) { newTable.add(at); alloc(1); allocated = true; }
      }
      at++;
      filled = 0;
      empty = true;
    };
    for (let ri = 0; ri < entries; ri++) {
      report(index * entries + ri, total * entries);
      if (present.has(ri)) {
        for (let k = 0; k < oldPer; k++) {
          if (get(ri * oldPer + k)) empty = false;
          if (++filled >= newPer) finish();
        }
      } else {
        // No block: every refcount is 0 there.
        for (let left = oldPer; left > 0;) {
          const step = Math.min(left, newPer - filled);
          filled += step;
          left -= step;
          if (filled >= newPer) finish();
        }
      }
    }
    if (filled > 0) finish();
    report((index + 1) * entries, total * entries);
    return allocated;
  };
  let index = 0;
  let table = -1;
  let tableClusters = 0;
  for (let again = true; again && index < 64;) {
    again = walk(index, Math.max(index + 2, 3), true);
    index++;
    if (again) {
      if (table >= 0) {
        for (let c = table; c < table + tableClusters; c++) set(c, 0);
        if (table < freeIndex) freeIndex = table;
      }
      tableClusters = Math.ceil((newSize * 8) / cs);
      table = alloc(tableClusters);
    }
  }
  walk(index, index + 1, false);
}

/** A new refcount structure of width 2^order, switched to with one header write. */
async function changeRefcountOrder(img: Qcow2Writable, order: number, progress?: AmendProgress): Promise<void> {
  await img.flush();
  const cs = img.geometry.clusterSize;
  const h = img.header;
  const sw = await MetadataSwitch.begin(img, img.refcounts);
  const n = Math.max(img.refcounts.allocEnd, Math.ceil((await img.file.size()) / cs));
  if (progress) replayRefcountWalks((c) => sw.get(c) !== 0, n, img.refcounts.reftable, h.clusterBits, h.refcountOrder, order, (o, w) => progress.status('refcount', o, w));
  const old = new Set(img.refcounts.structureClusters());
  const counts = newRefArray(order, n + 64);
  const wasFree = new Uint8Array(n);
  for (let c = 0; c < n; c++) {
    const v = old.has(c) ? 0 : sw.get(c);
    counts[c] = v;
    if (sw.get(c) === 0) wasFree[c] = 1;
  }
  const g = { clusterBits: h.clusterBits, refcountOrder: order };
  // Only clusters free before (not the old structure's: it stays in force until the switch).
  const free = (c: number) => c > 0 && (c >= n || wasFree[c] === 1);
  const lay = placeStructure(counts, n, g, free, n, n);
  const enc = encodeStructure(counts, n, lay, g);
  await Promise.all([...enc.blocks.map((b) => img.file.write(b.data, b.offset)), img.file.write(enc.table, enc.tableOffset)]);
  await img.file.flush();
  h.refcountOrder = order;
  h.refcountTableOffset = enc.tableOffset;
  h.refcountTableClusters = lay.tableClusters;
  await writeHeader(img);
  const end = Math.max(n, lay.start + lay.clusters);
  img.refcounts = new Refcounts({ ...img.refcounts.hostInfo, refcountOrder: order }, Buffer.from(enc.table), enc.tableOffset, end * cs);
  img.noteAlloc();
}

/** qcow2_expand_zero_clusters: no zero clusters left, in the active tables or a snapshot's. */
async function expandZeroClusters(img: Qcow2Writable, ctx: JobContext, progress?: AmendProgress): Promise<void> {
  await img.flush();
  const cs = img.geometry.clusterSize;
  const g = { clusterBits: img.header.clusterBits, extendedL2: false };
  const backed = img.parsed.backingFile !== null;
  const l1s: Buffer[] = [img.l1];
  for (const s of img.snapshots) {
    const t = Buffer.alloc(s.l1Size * 8);
    await img.file.read(t, s.l1TableOffset);
    l1s.push(t);
  }
  // Every table the walk will read, checked before anything is written: a damaged one (a
  // snapshot's L1 entry pointing inside a cluster) refuses the amend with nothing changed.
  const fileSize = await img.file.size();
  for (const l1 of l1s) {
    for (let i = 0; i < l1.length / 8; i++) {
      const l2Offset = decodeL1Entry(l1, i).l2Offset;
      if (l2Offset % cs !== 0) throw new CorruptImageError(`L2 table offset 0x${l2Offset.toString(16)} is not aligned to the cluster size`, img.filename);
      if (l2Offset + cs > fileSize) throw new CorruptImageError(`L2 table at offset 0x${l2Offset.toString(16)} lies past the end of the file (${fileSize} bytes)`, img.filename);
    }
  }
  const done = new Set<number>();
  const zeros = Buffer.alloc(cs);
  const entries = l1s.reduce((n, t) => n + t.length / 8, 0);
  let visited = 0;
  for (const l1 of l1s) {
    for (let i = 0; i < l1.length / 8; i++) {
      throwIfCancelled(ctx);
      // QEMU reports every L1 entry visited (before its table is expanded, when it has none).
      const l2Offset = decodeL1Entry(l1, i).l2Offset;
      if (!l2Offset) { progress?.status('downgrade', ++visited, entries); continue; }
      if (done.has(l2Offset)) { progress?.status('downgrade', ++visited, entries); continue; }
      done.add(l2Offset);
      const l2Refcount = await img.refcounts.get(l2Offset / cs);
      const t = Buffer.alloc(cs);
      await img.file.read(t, l2Offset);
      let dirty = false;
      const release: number[] = [];
      for (let j = 0; j < cs / 8; j++) {
        const e = decodeL2Entry(t, j, g, undefined, img.filename);
        if (e.kind !== 'zero') continue;
        let offset = e.hostOffset;
        // A preallocated zero cluster that other tables reference too (a snapshot's, as data
        // or as zero) is not zeroed in place (QEMU 7.2 does, and marks it COPIED: its check
        // then finds an error, and a snapshot that still reads it as data loses it): it is
        // replaced by a new zeroed cluster, and loses this table's references afterwards.
        const shared = offset !== 0 && (await img.refcounts.get(offset / cs)) > l2Refcount;
        if (shared) release.push(offset);
        if (!offset || shared) {
          if (!offset && !backed) { t.writeBigUInt64BE(0n, j * 8); dirty = true; continue; }
          offset = await img.mutex.run(async () => { const o = await img.refcounts.alloc(1); img.noteAlloc(); return o; });
          if (l2Refcount > 1) await img.refcounts.change(offset, cs, l2Refcount - 1);
        }
        // An encrypted image stores the zeros encrypted, for the cluster's guest offset.
        let block = zeros;
        if (img.encrypted) {
          block = Buffer.alloc(cs);
          img.cipher!.encrypt(block, img.cryptOffset((i * (cs / 8) + j) * cs, offset));
        }
        await img.file.write(block, offset);
        const entry = BigInt(offset) | (l2Refcount === 1 ? C.QCOW_OFLAG_COPIED : 0n);
        t.writeBigUInt64BE(entry, j * 8);
        dirty = true;
      }
      if (!dirty) { progress?.status('downgrade', ++visited, entries); continue; }
      // The new clusters' data and refcounts on disk before the entries that point to them.
      await img.refcounts.writeBack();
      await img.file.flush();
      await img.file.write(t, l2Offset);
      await img.file.flush();
      if (release.length) {
        for (const off of release) await img.refcounts.change(off, cs, -l2Refcount);
        await img.refcounts.writeBack();
        await img.file.flush();
      }
      progress?.status('downgrade', ++visited, entries);
    }
  }
  // The cached active tables are stale now: nothing reads them again (the downgrade is the
  // last step, and the image is closed after it with no dirty tables to write).
}

async function setLazy(img: Qcow2Writable, on: boolean): Promise<void> {
  const h = img.header;
  if (on) h.compatibleFeatures |= C.COMPAT_LAZY_REFCOUNTS;
  else h.compatibleFeatures &= ~C.COMPAT_LAZY_REFCOUNTS;
  const b = Buffer.alloc(8);
  b.writeBigUInt64BE(h.compatibleFeatures);
  await img.file.write(b, 80);
  await img.file.flush();
}

async function downgrade(img: Qcow2Writable, ctx: JobContext, progress?: AmendProgress): Promise<void> {
  await expandZeroClusters(img, ctx, progress);
  await img.flush();
  const h = img.header;
  h.version = 2;
  h.incompatibleFeatures = 0n;
  h.compatibleFeatures = 0n;
  h.autoclearFeatures = 0n;
  h.compressionType = 0;
  h.headerLength = C.HEADER_V2_LENGTH;
  h.unknownFields = Buffer.alloc(0);
  await writeHeader(img);
}

/** The dirty bit of a qcow2 image's header (false for anything else). */
export async function isDirty(name: string): Promise<{ dirty: boolean; path: string }> {
  const p = parseImageName(name);
  if (p.kind !== 'file') return { dirty: false, path: name };
  const f = await NodeFile.open(p.path);
  try {
    const h = Buffer.alloc(80);
    await f.read(h, 0);
    return { dirty: isQcow2Magic(h) && h.readUInt32BE(4) >= 3 && (h.readBigUInt64BE(72) & C.INCOMPAT_DIRTY) !== 0n, path: p.path };
  } finally {
    await f.close();
  }
}

/**
 * `qemu`: as qemu-img, an amend whose resize makes the snapshots' sizes refuse the downgrade
 * resizes (a complete operation of its own), then refuses the downgrade.
 */
export async function amend(ctx: JobContext, name: string, o: AmendOptions, opts: { format?: ImageFormat; percent?: (p: number) => void; qemu?: boolean; force?: boolean } = {}): Promise<void> {
  let img: DiskImage | null = null;
  // As QEMU's writable open: an image left dirty (lazy refcounts) has its refcounts repaired
  // first (`check -r all`, its report on stderr), then is amended.
  const d = await isDirty(name);
  if (d.dirty && opts.format !== 'raw') await checkImage(ctx, d.path, { repair: 'all', format: 'qcow2' });
  try {
    img = await openImageFile(name, { format: opts.format, writable: true });
    if (!(img instanceof Qcow2Writable)) throw new AmendError(`Format driver '${img.format}' does not support option amendment`);
    const w = img;
    if (o.luks) await amendLuks(w, name, o.luks, !!opts.force);
    const plan = await planAmend(w, o, opts.qemu);
    throwIfCancelled(ctx);
    const lazyNow = (w.header.compatibleFeatures & C.COMPAT_LAZY_REFCOUNTS) !== 0n;
    // Lazy refcounts off before anything that a v2 header could not record (the dirty bit).
    if (lazyNow && (!plan.lazy || plan.toVersion < plan.fromVersion)) await setLazy(w, false);
    const ops = Number(plan.toVersion !== plan.fromVersion) + Number(plan.toOrder !== plan.fromOrder);
    const progress = opts.percent ? new AmendProgress(ops, opts.percent) : undefined;
    if (plan.toVersion > plan.fromVersion) await upgrade(w, progress);
    if (plan.toOrder !== w.header.refcountOrder) await changeRefcountOrder(w, plan.toOrder, progress);
    if (plan.lazy && !lazyNow) await setLazy(w, true);
    if (plan.size !== null && plan.size !== w.virtualSize) {
      if (plan.size > w.virtualSize) await w.growZeroed(plan.size);
      else await w.shrink(plan.size);
      await w.flush();
    }
    if (o.dataFile !== undefined || (o.dataFileRaw === false && hasRawExternalData(w.header))) await setDataFile(w, o);
    if (plan.snapshotsAfterResize && !snapshotsAllowDowngrade(w, w.virtualSize)) throw new AmendError('Internal snapshots prevent downgrade of image');
    if (plan.toVersion < plan.fromVersion) await downgrade(w, ctx, progress);
  } finally {
    await closeChain(img);
  }
}

/**
 * Key slot changes of a LUKS image (qcow2_amend_options' encrypt.* part): the image is open
 * with its key (encrypt.key-secret), which unlocks the master key a new slot stores.
 */
async function amendLuks(w: Qcow2Writable, name: string, l: Partial<LuksAmendOptions>, force: boolean): Promise<void> {
  const area = w.parsed.cryptoHeader;
  if (w.header.cryptMethod !== C.CRYPT_LUKS || !area) {
    throw new UsageError(`${w.filename}: encrypt.state, encrypt.keyslot and the secrets amend LUKS key slots, and the image is not LUKS-encrypted`)
      .asQemu('Amending encryption options is only supported for LUKS-encrypted images');
  }
  if (l.state === undefined) throw new UsageError(`${w.filename}: give encrypt.state=active or inactive`).asQemu("Parameter 'state' is missing");
  const parsed = parseImageName(name);
  const keyId = parsed.kind === 'file' ? parsed.keySecrets?.[0] : undefined;
  const unlockWith = keyId !== undefined ? secretFor(keyId, w.filename) : Buffer.alloc(0);
  const io = {
    read: async (offset: number, length: number) => {
      if (offset + length > area.length) throw new CorruptImageError(`the LUKS header asks for ${length} bytes at ${offset}, outside its ${area.length}-byte area`, w.filename);
      const b = Buffer.alloc(length);
      await w.file.read(b, area.offset + offset);
      return b;
    },
    write: async (data: Buffer, offset: number) => {
      if (offset + data.length > area.length) throw new CorruptImageError(`a LUKS write of ${data.length} bytes at ${offset} is outside its ${area.length}-byte area`, w.filename);
      await w.file.write(data, area.offset + offset);
    },
  };
  try {
    await amendLuksKeyslots(io, { ...l, state: l.state }, force, unlockWith, lookupSecret);
    await w.file.flush();
  } catch (err) {
    if (err instanceof LuksError) throw new UsageError(`${w.filename}: ${err.message}`).asQemu(err.message);
    throw err;
  }
}
