// The qcow2 header and its extensions: pure decode/encode with validation. Nothing here does I/O.
import * as C from './constants';
import { CorruptImageError, FormatError, UnsupportedFeatureError } from '../errors';
import { readU64, toSafeNumber } from './u64';
import { printable } from '../errors';

export interface Qcow2Header {
  version: 2 | 3;
  backingFileOffset: number;
  backingFileSize: number;
  clusterBits: number;
  size: number;
  cryptMethod: number;
  l1Size: number;
  l1TableOffset: number;
  refcountTableOffset: number;
  refcountTableClusters: number;
  nbSnapshots: number;
  snapshotsOffset: number;
  incompatibleFeatures: bigint;
  compatibleFeatures: bigint;
  autoclearFeatures: bigint;
  refcountOrder: number;
  headerLength: number;
  compressionType: number;
  /** Additional fields past byte 112 that we do not know, preserved byte for byte. */
  unknownFields: Buffer;
}

export interface HeaderExtension {
  type: number;
  data: Buffer;
}

export interface FeatureName {
  type: number;
  bit: number;
  name: string;
}

export interface BitmapsExtension {
  nbBitmaps: number;
  bitmapDirectorySize: number;
  bitmapDirectoryOffset: number;
}

export interface ParsedHeader {
  header: Qcow2Header;
  /** Every extension in file order, known and unknown (unknown ones are preserved on rewrite). */
  extensions: HeaderExtension[];
  backingFile: string | null;
  backingFormat: string | null;
  featureNames: FeatureName[];
  bitmaps: BitmapsExtension | null;
  dataFile: string | null;
  cryptoHeader: { offset: number; length: number } | null;
}

/** Bytes needed to decode the fixed header fields (v3 with compression type). */
export const HEADER_PROBE_SIZE = C.HEADER_V3_WITH_COMPRESSION_LENGTH;

export function isQcow2Magic(buf: Uint8Array): boolean {
  return buf.length >= 4 && Buffer.from(buf.buffer, buf.byteOffset, 4).readUInt32BE(0) === C.QCOW_MAGIC;
}

/** QEMU's words for a virtual size its L1 table cannot cover (size_to_l1 past INT_MAX, or past l1_size). */
function qemuL1Text(file: string | undefined, needed: bigint): string {
  return `Could not open '${file}': ${needed > 0x7fffffffn ? 'Image is too big' : 'L1 table is too small'}`;
}

/** The L1 entries a virtual size needs (QEMU's size_to_l1). */
function sizeToL1(size: bigint, clusterBits: number, extendedL2: boolean): bigint {
  const shift = BigInt(clusterBits + clusterBits - (extendedL2 ? 4 : 3));
  return (size + (1n << shift) - 1n) >> shift;
}

function readVirtualSize(buf: Buffer, clusterBits: number, file?: string): number {
  const v = buf.readBigUInt64BE(24);
  try {
    return toSafeNumber(v, 'virtual size', file);
  } catch (err) {
    const extL2 = buf.length >= 80 && buf.readUInt32BE(4) >= 3 && (buf.readBigUInt64BE(72) & C.INCOMPAT_EXTL2) !== 0n;
    throw (err as CorruptImageError).asQemu(qemuL1Text(file, sizeToL1(v, clusterBits, extL2)));
  }
}

/** Decodes and validates the fixed fields. `buf` must hold at least the first 112 bytes (or the whole file if shorter). */
export function decodeHeaderFields(buf: Buffer, file?: string, opts: DecodeHeaderOptions = {}): Qcow2Header {
  if (buf.length < C.HEADER_V2_LENGTH) throw new FormatError(`not a qcow2 image: file is only ${buf.length} bytes, shorter than a qcow2 header`, file);
  if (buf.readUInt32BE(0) !== C.QCOW_MAGIC) throw new FormatError('not a qcow2 image (bad magic)', file);
  const version = buf.readUInt32BE(4);
  if (version !== 2 && version !== 3) throw new UnsupportedFeatureError(`qcow2 version ${version} is not supported (only 2 and 3)`, file);
  const clusterBits = buf.readUInt32BE(20);
  if (clusterBits < C.MIN_CLUSTER_BITS || clusterBits > C.MAX_CLUSTER_BITS) {
    throw new FormatError(`cluster_bits ${clusterBits} is out of range (cluster size must be 512 B to 2 MiB)`, file);
  }
  const h: Qcow2Header = {
    version,
    backingFileOffset: readU64(buf, 8, 'backing_file_offset', file),
    backingFileSize: buf.readUInt32BE(16),
    clusterBits,
    size: readVirtualSize(buf, clusterBits, file),
    cryptMethod: buf.readUInt32BE(32),
    l1Size: buf.readUInt32BE(36),
    l1TableOffset: readU64(buf, 40, 'l1_table_offset', file),
    refcountTableOffset: readU64(buf, 48, 'refcount_table_offset', file),
    refcountTableClusters: buf.readUInt32BE(56),
    nbSnapshots: buf.readUInt32BE(60),
    snapshotsOffset: readU64(buf, 64, 'snapshots_offset', file),
    incompatibleFeatures: 0n,
    compatibleFeatures: 0n,
    autoclearFeatures: 0n,
    refcountOrder: C.DEFAULT_REFCOUNT_ORDER,
    headerLength: C.HEADER_V2_LENGTH,
    compressionType: C.COMPRESSION_DEFLATE,
    unknownFields: Buffer.alloc(0),
  };
  const clusterSize = 2 ** clusterBits;
  if (version === 3) {
    if (buf.length < C.HEADER_V3_MIN_LENGTH) throw new FormatError(`truncated qcow2 v3 header (${buf.length} bytes)`, file);
    h.incompatibleFeatures = buf.readBigUInt64BE(72);
    h.compatibleFeatures = buf.readBigUInt64BE(80);
    h.autoclearFeatures = buf.readBigUInt64BE(88);
    h.refcountOrder = buf.readUInt32BE(96);
    h.headerLength = buf.readUInt32BE(100);
    if (h.headerLength < C.HEADER_V3_MIN_LENGTH) throw new FormatError(`header_length ${h.headerLength} is smaller than 104`, file);
    if (h.headerLength > clusterSize) throw new FormatError(`header_length ${h.headerLength} is larger than the cluster size ${clusterSize}`, file);
    if (h.headerLength > C.HEADER_V3_MIN_LENGTH) {
      if (buf.length < Math.min(h.headerLength, C.HEADER_V3_WITH_COMPRESSION_LENGTH)) throw new FormatError('truncated qcow2 header', file);
      h.compressionType = buf[104]!;
    }
    if (h.headerLength > C.HEADER_V3_WITH_COMPRESSION_LENGTH) {
      if (buf.length < h.headerLength) throw new FormatError('truncated qcow2 header', file);
      h.unknownFields = Buffer.from(buf.subarray(C.HEADER_V3_WITH_COMPRESSION_LENGTH, h.headerLength));
    }
  }
  validateHeader(h, file, opts);
  return h;
}

/** Options of the header decoders. */
export interface DecodeHeaderOptions {
  /** For check: the snapshot count and table are left to the check's own validation. */
  check?: boolean;
}

function validateHeader(h: Qcow2Header, file?: string, opts: DecodeHeaderOptions = {}): void {
  const clusterSize = 2 ** h.clusterBits;
  if (h.refcountOrder > C.MAX_REFCOUNT_ORDER) throw new FormatError(`refcount_order ${h.refcountOrder} is out of range (at most 6, i.e. 64-bit refcounts)`, file);
  // AES (crypt_method 1) and LUKS (2) are read and written with the key given at open.
  if (h.cryptMethod !== C.CRYPT_NONE && h.cryptMethod !== C.CRYPT_AES && h.cryptMethod !== C.CRYPT_LUKS) {
    throw new UnsupportedFeatureError(`encrypted images (method ${h.cryptMethod}) are not supported`, file);
  }
  if ((h.incompatibleFeatures & C.INCOMPAT_EXTL2) && h.clusterBits < C.MIN_CLUSTER_BITS_EXTENDED_L2) {
    throw new FormatError(`extended L2 entries need a cluster size of at least 16 KiB (cluster_bits ${h.clusterBits})`, file);
  }
  if (h.compressionType > C.COMPRESSION_ZSTD) {
    throw new UnsupportedFeatureError(`unknown compression type ${h.compressionType}`, file);
  }
  const hasCompressionBit = (h.incompatibleFeatures & C.INCOMPAT_COMPRESSION) !== 0n;
  if (hasCompressionBit !== (h.compressionType !== C.COMPRESSION_DEFLATE)) {
    throw new FormatError(hasCompressionBit
      ? 'compression type bit is set but compression_type is deflate'
      : `compression_type ${h.compressionType} is set without the compression type feature bit`, file);
  }
  if (h.l1Size > C.MAX_L1_SIZE_BYTES / 8) throw new FormatError(`l1_size ${h.l1Size} is too large (at most ${C.MAX_L1_SIZE_BYTES / 8} entries)`, file);
  const l2Entries = clusterSize / ((h.incompatibleFeatures & C.INCOMPAT_EXTL2) ? C.L2E_SIZE_EXTENDED : C.L2E_SIZE_NORMAL);
  const bytesPerL1 = l2Entries * clusterSize;
  const neededL1 = Math.ceil(h.size / bytesPerL1);
  const qemuText = qemuL1Text(file, BigInt(neededL1));
  if (neededL1 > C.MAX_L1_SIZE_BYTES / 8) throw new FormatError(`virtual size ${h.size} is too large for cluster size ${clusterSize}`, file).asQemu(qemuText);
  if (h.l1Size < neededL1) throw new CorruptImageError(`L1 table is too small: ${h.l1Size} entries for a virtual size of ${h.size} bytes (needs ${neededL1})`, file).asQemu(qemuText);
  checkTable('L1 table', h.l1TableOffset, h.l1Size * 8, clusterSize, file, h.l1Size > 0);
  if (h.refcountTableClusters === 0) throw new CorruptImageError('refcount table is empty (refcount_table_clusters is 0)', file);
  if (h.refcountTableClusters * clusterSize > C.MAX_REFTABLE_SIZE_BYTES) {
    throw new FormatError(`refcount table is too large (${h.refcountTableClusters} clusters, at most ${C.MAX_REFTABLE_SIZE_BYTES} bytes)`, file);
  }
  checkTable('refcount table', h.refcountTableOffset, h.refcountTableClusters * clusterSize, clusterSize, file, true);
  // check validates the snapshot table itself, as QEMU's check does (and repairs it).
  if (!opts.check) {
    if (h.nbSnapshots > C.MAX_SNAPSHOTS) {
      throw new FormatError(`snapshot count ${h.nbSnapshots} is too large (at most ${C.MAX_SNAPSHOTS}; \`check -r all\` drops the ones past it)`, file)
        .asQemu(`Could not open '${file}': Snapshot table too large`);
    }
    if (h.nbSnapshots > 0) checkTable('snapshot table', h.snapshotsOffset, C.SNAPSHOT_ENTRY_FIXED_SIZE * h.nbSnapshots, clusterSize, file, true);
  }
  if (h.backingFileOffset !== 0) {
    if (h.backingFileOffset > clusterSize) throw new CorruptImageError(`backing file name offset ${h.backingFileOffset} lies outside the header cluster`, file);
    const max = Math.min(C.MAX_BACKING_FILE_NAME, clusterSize - h.backingFileOffset);
    if (h.backingFileSize > max) throw new CorruptImageError(`backing file name is too long (${h.backingFileSize} bytes, at most ${max})`, file);
  }
}

function checkTable(what: string, offset: number, bytes: number, clusterSize: number, file: string | undefined, present: boolean): void {
  if (!present) return;
  if (offset % clusterSize !== 0) throw new CorruptImageError(`${what} offset ${offset} is not aligned to the cluster size ${clusterSize}`, file);
  if (offset === 0) throw new CorruptImageError(`${what} overlaps the image header (offset 0)`, file);
  if (offset + bytes > Number.MAX_SAFE_INTEGER) throw new CorruptImageError(`${what} at ${offset} is out of range`, file);
}

/**
 * QEMU's report_unsupported_feature: the names the image's table gives the bits (in table
 * order, up to the first entry without a name, each name cut at 46 bytes), then the rest as
 * one hexadecimal mask.
 */
function qemuUnsupportedFeatures(p: ParsedHeader, bits: bigint): string {
  const parts: string[] = [];
  let mask = bits;
  for (const f of p.featureNames) {
    if (f.name === '') break;
    if (f.type !== C.FEATURE_TYPE_INCOMPATIBLE || f.bit > 63 || !(mask & (1n << BigInt(f.bit)))) continue;
    parts.push(Buffer.from(f.name, 'utf8').subarray(0, 46).toString('utf8'));
    mask &= ~(1n << BigInt(f.bit));
  }
  if (mask) parts.push(`Unknown incompatible feature: ${mask.toString(16)}`);
  return `Unsupported qcow2 feature(s): ${parts.join(', ')}`;
}

/** Names the incompatible features we refuse, using the image's own feature name table when present. */
export function checkIncompatibleFeatures(p: ParsedHeader, file?: string): void {
  const unknown = p.header.incompatibleFeatures & ~C.INCOMPAT_KNOWN;
  if (unknown) {
    const names: string[] = [];
    for (let bit = 0; bit < 64; bit++) {
      if (!(unknown & (1n << BigInt(bit)))) continue;
      const n = p.featureNames.find((f) => f.type === C.FEATURE_TYPE_INCOMPATIBLE && f.bit === bit);
      names.push(n ? `${printable(n.name)} (bit ${bit})` : `unknown incompatible feature bit ${bit}`);
    }
    throw new UnsupportedFeatureError(`unsupported qcow2 feature: ${names.join(', ')}`, file).asQemu(`Could not open '${file}': ${qemuUnsupportedFeatures(p, unknown)}`);
  }
}

/** The image keeps its guest data in an external data file (incompatible feature bit 2). */
export function hasExternalData(h: Qcow2Header): boolean { return (h.incompatibleFeatures & C.INCOMPAT_DATA_FILE) !== 0n; }

/** The external data file is a valid raw image of the guest disk (autoclear bit 1). */
export function hasRawExternalData(h: Qcow2Header): boolean { return h.version >= 3 && (h.autoclearFeatures & C.AUTOCLEAR_DATA_FILE_RAW) !== 0n; }

/**
 * Decodes the header cluster: fields, extensions and the backing file name.
 * `buf` holds the first cluster (or the whole file if shorter).
 */
export function decodeHeader(buf: Buffer, file?: string, opts: DecodeHeaderOptions = {}): ParsedHeader {
  const header = decodeHeaderFields(buf, file, opts);
  const clusterSize = 2 ** header.clusterBits;
  const p: ParsedHeader = {
    header, extensions: [], backingFile: null, backingFormat: null, featureNames: [],
    bitmaps: null, dataFile: null, cryptoHeader: null,
  };
  {
    // Extensions run from the end of the header (72 bytes for v2, header_length for v3) to
    // the backing file name or the end of the cluster; QEMU reads them for both versions.
    const end = Math.min(header.backingFileOffset || clusterSize, clusterSize);
    let off = header.headerLength;
    while (off < end) {
      if (off + 8 > end || off + 8 > buf.length) {
        // QEMU: "Header extension too large" when even the type/length words do not fit.
        throw new CorruptImageError('header extension area is truncated or overruns the backing file name', file);
      }
      const type = buf.readUInt32BE(off);
      const len = buf.readUInt32BE(off + 4);
      off += 8;
      if (type === C.EXT_END) break;
      if (len > end - off || off + len > buf.length) {
        throw new CorruptImageError(`header extension 0x${type.toString(16)} is too large (${len} bytes)`, file);
      }
      const data = Buffer.from(buf.subarray(off, off + len));
      p.extensions.push({ type, data });
      decodeExtension(p, type, data, file);
      off += Math.ceil(len / 8) * 8;
    }
  }
  if (header.backingFileOffset !== 0 && header.backingFileSize > 0) {
    const s = header.backingFileOffset;
    if (s + header.backingFileSize > buf.length) throw new CorruptImageError('backing file name lies past the end of the file', file);
    p.backingFile = buf.toString('utf8', s, s + header.backingFileSize);
  }
  return p;
}

function decodeExtension(p: ParsedHeader, type: number, data: Buffer, file?: string): void {
  switch (type) {
    case C.EXT_BACKING_FORMAT:
      if (data.length > 1023) throw new CorruptImageError(`backing format name is too long (${data.length} bytes)`, file);
      p.backingFormat = data.toString('utf8');
      break;
    case C.EXT_FEATURE_TABLE:
      // A last entry cut short reads as padded with zeros (QEMU reads the extension into a
      // zeroed buffer of whole entries).
      for (let o = 0; o + 2 <= data.length; o += C.FEATURE_NAME_ENTRY_SIZE) {
        const nameBytes = data.subarray(o + 2, Math.min(o + C.FEATURE_NAME_ENTRY_SIZE, data.length));
        const z = nameBytes.indexOf(0);
        p.featureNames.push({ type: data[o]!, bit: data[o + 1]!, name: nameBytes.toString('utf8', 0, z < 0 ? nameBytes.length : z) });
      }
      break;
    case C.EXT_BITMAPS:
      // QEMU refuses a wrong length whether or not the bitmaps are in use.
      if (data.length !== 24) throw new CorruptImageError(`bitmaps extension: invalid extension length ${data.length} (24 expected)`, file);
      p.bitmaps = {
        nbBitmaps: data.readUInt32BE(0),
        bitmapDirectorySize: readU64(data, 8, 'bitmap_directory_size', file),
        bitmapDirectoryOffset: readU64(data, 16, 'bitmap_directory_offset', file),
      };
      break;
    case C.EXT_CRYPTO_HEADER:
      if (data.length < 16) throw new CorruptImageError('encryption header extension is too short', file);
      p.cryptoHeader = { offset: readU64(data, 0, 'crypto header offset', file), length: readU64(data, 8, 'crypto header length', file) };
      break;
    case C.EXT_DATA_FILE:
      p.dataFile = data.toString('utf8');
      break;
    default:
      break; // unknown: kept in p.extensions and preserved
  }
}

/**
 * Encodes the header cluster: fixed fields, then extensions (backing format first, other
 * known/unknown ones in their original order), the end marker, and the backing file name.
 * Throws when it does not fit in one cluster.
 */
export function encodeHeader(p: ParsedHeader, file?: string): Buffer {
  const h = p.header;
  const clusterSize = 2 ** h.clusterBits;
  const out = Buffer.alloc(clusterSize);
  const tooBig = () => new FormatError(`the header extensions and backing file name do not fit in one ${clusterSize}-byte cluster (use a shorter backing file name or a larger cluster size)`, file);
  out.writeUInt32BE(C.QCOW_MAGIC, 0);
  out.writeUInt32BE(h.version, 4);
  out.writeUInt32BE(h.clusterBits, 20);
  out.writeBigUInt64BE(BigInt(h.size), 24);
  out.writeUInt32BE(h.cryptMethod, 32);
  out.writeUInt32BE(h.l1Size, 36);
  out.writeBigUInt64BE(BigInt(h.l1TableOffset), 40);
  out.writeBigUInt64BE(BigInt(h.refcountTableOffset), 48);
  out.writeUInt32BE(h.refcountTableClusters, 56);
  out.writeUInt32BE(h.nbSnapshots, 60);
  out.writeBigUInt64BE(BigInt(h.snapshotsOffset), 64);
  let off = C.HEADER_V2_LENGTH;
  if (h.version === 3) {
    out.writeBigUInt64BE(h.incompatibleFeatures, 72);
    out.writeBigUInt64BE(h.compatibleFeatures, 80);
    out.writeBigUInt64BE(h.autoclearFeatures, 88);
    out.writeUInt32BE(h.refcountOrder, 96);
    const headerLength = C.HEADER_V3_WITH_COMPRESSION_LENGTH + h.unknownFields.length;
    out.writeUInt32BE(headerLength, 100);
    out[104] = h.compressionType;
    h.unknownFields.copy(out, C.HEADER_V3_WITH_COMPRESSION_LENGTH);
    off = headerLength;
  }
  {
    const exts = [...p.extensions];
    const putExt = (type: number, data: Buffer) => {
      if (off + 8 + Math.ceil(data.length / 8) * 8 > clusterSize) throw tooBig();
      out.writeUInt32BE(type, off);
      out.writeUInt32BE(data.length, off + 4);
      data.copy(out, off + 8);
      off += 8 + Math.ceil(data.length / 8) * 8;
    };
    if (p.backingFormat !== null && p.backingFile !== null) putExt(C.EXT_BACKING_FORMAT, Buffer.from(p.backingFormat, 'utf8'));
    for (const e of exts) if (e.type !== C.EXT_BACKING_FORMAT) putExt(e.type, e.data);
    putExt(C.EXT_END, Buffer.alloc(0));
  }
  if (p.backingFile !== null && p.backingFile.length > 0) {
    const name = Buffer.from(p.backingFile, 'utf8');
    if (name.length > C.MAX_BACKING_FILE_NAME) throw new FormatError(`backing file name is too long (${name.length} bytes, at most ${C.MAX_BACKING_FILE_NAME})`, file);
    if (off + name.length > clusterSize) throw tooBig();
    name.copy(out, off);
    out.writeBigUInt64BE(BigInt(off), 8);
    out.writeUInt32BE(name.length, 16);
  } else {
    out.writeBigUInt64BE(0n, 8);
    out.writeUInt32BE(0, 16);
  }
  return out;
}

/**
 * Where the data of the first extension of `type` starts in the header cluster `buf`, or null
 * (walked as decodeHeader walks it), so one extension can be updated in place.
 */
export function extensionDataOffset(buf: Buffer, h: Qcow2Header, type: number): number | null {
  const end = Math.min(h.backingFileOffset || buf.length, buf.length);
  for (let off = h.headerLength; off + 8 <= end;) {
    const t = buf.readUInt32BE(off);
    const len = buf.readUInt32BE(off + 4);
    if (t === C.EXT_END) return null;
    if (t === type) return off + 8;
    off += 8 + Math.ceil(len / 8) * 8;
  }
  return null;
}

export function hasExtendedL2(h: Qcow2Header): boolean { return (h.incompatibleFeatures & C.INCOMPAT_EXTL2) !== 0n; }
