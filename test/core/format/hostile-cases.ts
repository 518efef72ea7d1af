// Hostile images for the read path, built at test time: a small valid image from qemu-img,
// then bytes patched with node:fs. Shared by hostile.test.ts (the API) and
// test/cli/hostile-cli.test.ts (the strata command), so both see exactly the same files.
//
// Each case says how far a reader gets before the damage must stop it:
//   open   opening the file alone fails (so `info` fails too)
//   chain  the file opens, its backing chain does not (`info` succeeds as qemu-img's does,
//          `info --backing-chain`, `map`, `convert`, `compare` fail)
//   l2     opening works, walking the L1/L2 tables fails (`map`, reads, `convert`, `compare`)
//   data   tables are fine, reading guest data fails (`map` works, reads do not)
//   ok     nothing is wrong: everything works (controls, raw files)
//   any    noise: whatever happens, errors must still be typed and name the file
import { createHash } from 'node:crypto';
import { closeSync, openSync, readFileSync, readSync, symlinkSync, truncateSync, writeFileSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { qemuImg, qemuIo } from '../../oracle/qemu';

export type Level = 'open' | 'chain' | 'l2' | 'data' | 'ok' | 'any';

export interface Built {
  /** The image the commands are run on. */
  image: string;
  /** Every file of the case (image, backing files): none may change. */
  files: string[];
  /** Format to pass with -f, when probing would not pick the damaged one. */
  format?: 'qcow2' | 'raw';
}

export interface HostileCase {
  name: string;
  level: Level;
  /** What the message must say about the problem (besides naming the file). */
  problem?: RegExp;
  /** Strings the message must contain (default: the image's name). */
  names?: (b: Built) => string[];
  /**
   * qemu-img map lists this damage as it is (a data cluster past the end of the file is only
   * an error when read), and so does `strata map`: the CLI's map must then succeed and print
   * what qemu-img prints, while reads still fail.
   */
  mapLists?: true;
  /**
   * `info` prints the image without opening what the header names beside it (its external
   * data file, as qemu-img info with BDRV_O_NO_IO): the CLI's info succeeds where opening for
   * I/O fails.
   */
  infoOpens?: true;
  build(dir: string): Built;
}

// ---------------------------------------------------------------- byte patching

export function readAt(path: string, off: number, len: number): Buffer {
  const fd = openSync(path, 'r');
  try {
    const b = Buffer.alloc(len);
    readSync(fd, b, 0, len, off);
    return b;
  } finally { closeSync(fd); }
}

export function writeAt(path: string, off: number, data: Uint8Array): void {
  const fd = openSync(path, 'r+');
  try { writeSync(fd, data, 0, data.length, off); } finally { closeSync(fd); }
}

export const u16 = (v: number) => { const b = Buffer.alloc(2); b.writeUInt16BE(v); return b; };
export const u32 = (v: number) => { const b = Buffer.alloc(4); b.writeUInt32BE(v >>> 0); return b; };
export const u64 = (v: bigint | number) => { const b = Buffer.alloc(8); b.writeBigUInt64BE(BigInt(v)); return b; };
export const getU32 = (path: string, off: number) => readAt(path, off, 4).readUInt32BE(0);
export const getU64 = (path: string, off: number) => readAt(path, off, 8).readBigUInt64BE(0);

export function sha256(path: string): string {
  return createHash('sha256').update(readFileSync(path)).digest('hex');
}

/** xorshift32: deterministic pseudo-random bytes. */
export function randomBytes(n: number, seed: number): Buffer {
  let s = seed >>> 0 || 1;
  const b = Buffer.alloc(n);
  for (let i = 0; i < n; i++) {
    s ^= s << 13; s >>>= 0; s ^= s >>> 17; s ^= s << 5; s >>>= 0;
    b[i] = s & 0xff;
  }
  return b;
}

// Header field offsets (reference/qcow2-spec.txt).
export const H = {
  magic: 0, version: 4, backingFileOffset: 8, backingFileSize: 16, clusterBits: 20, size: 24,
  cryptMethod: 32, l1Size: 36, l1TableOffset: 40, refcountTableOffset: 48, refcountTableClusters: 56,
  nbSnapshots: 60, snapshotsOffset: 64, incompatibleFeatures: 72, refcountOrder: 96, headerLength: 100,
  compressionType: 104,
} as const;

const OFFSET_MASK = 0x00fffffffffffe00n;
const COPIED = 1n << 63n;
const COMPRESSED = 1n << 62n;

export const l1Offset = (p: string) => Number(getU64(p, H.l1TableOffset));
/** Host offset of the L2 table of L1 entry `i`. */
export const l2Offset = (p: string, i = 0) => Number(getU64(p, l1Offset(p) + 8 * i) & OFFSET_MASK);
export const l2EntryPos = (p: string, i: number, extended = false) => l2Offset(p) + i * (extended ? 16 : 8);
export const snapshotsOffset = (p: string) => Number(getU64(p, H.snapshotsOffset));

// ---------------------------------------------------------------- base images

const KiB = 1024;
export const VIRTUAL_SIZE = 1024 * KiB;

export interface BaseOptions {
  clusterSize?: number;
  extendedL2?: boolean;
  compression?: 'zlib' | 'zstd';
  compat?: '0.10' | '1.1';
  backing?: string;
  backingFmt?: 'qcow2' | 'raw';
  /** qemu-io commands run after creation. */
  io?: string[];
  snapshot?: string;
}

/**
 * A small qcow2 image (1 MiB virtual). By default 4 KiB clusters with data at [0, 8k) and a
 * zero cluster at 64k; the layout qemu-img 7.2 gives it is header 0x0, refcount table
 * 0x1000, refcount block 0x2000, L1 0x3000, L2 0x4000, data 0x5000 and 0x6000.
 */
export function baseQcow2(dir: string, name = 'image.qcow2', o: BaseOptions = {}): string {
  const path = join(dir, name);
  const opts = [`cluster_size=${o.clusterSize ?? 4096}`];
  if (o.extendedL2) opts.push('extended_l2=on');
  if (o.compression) opts.push(`compression_type=${o.compression}`);
  if (o.compat) opts.push(`compat=${o.compat}`);
  qemuImg('create', '-q', '-f', 'qcow2', '-o', opts.join(','), path, String(VIRTUAL_SIZE));
  const io = o.io ?? ['write -P 0xab 0 8k', 'write -z 64k 4k'];
  if (io.length) qemuIo(path, io, { format: 'qcow2' });
  // Recorded afterwards so that a backing file need not exist (loops, missing files).
  if (o.backing) qemuImg('rebase', '-u', '-b', o.backing, '-F', o.backingFmt ?? 'qcow2', path);
  if (o.snapshot) qemuImg('snapshot', '-c', o.snapshot, path);
  return path;
}

function one(image: string, format?: 'qcow2' | 'raw'): Built {
  return { image, files: [image], format };
}

/** Base image with `patch` applied. */
function patched(patch: (p: string) => void, o: BaseOptions = {}): (dir: string) => Built {
  return (dir) => {
    const p = baseQcow2(dir, 'image.qcow2', o);
    patch(p);
    return one(p);
  };
}

function setField(off: number, value: Buffer): (p: string) => void {
  return (p) => writeAt(p, off, value);
}

/** A feature name table extension (at header_length, followed by the end marker). */
function featureTable(entries: { type: number; bit: number; name: string }[]): Buffer {
  const data = Buffer.alloc(48 * entries.length);
  entries.forEach((e, i) => {
    data[i * 48] = e.type;
    data[i * 48 + 1] = e.bit;
    Buffer.from(e.name, 'utf8').copy(data, i * 48 + 2, 0, 46);
  });
  return Buffer.concat([u32(0x6803f857), u32(data.length), data, Buffer.alloc(8)]);
}

function withUnknownBit(name: string | null): (p: string) => void {
  return (p) => {
    const bits = getU64(p, H.incompatibleFeatures) | (1n << 10n);
    writeAt(p, H.incompatibleFeatures, u64(bits));
    if (name !== null) writeAt(p, getU32(p, H.headerLength), featureTable([{ type: 0, bit: 10, name }]));
  };
}

/** Sets L2 entry `i` (standard 8-byte entries) of the first L2 table. */
function setL2(i: number, entry: bigint): (p: string) => void {
  return (p) => writeAt(p, l2EntryPos(p, i), u64(entry));
}

/** Compressed cluster descriptor for 4 KiB clusters: x = 62 - (12 - 8) = 58. */
function compressedDescriptor(hostOffset: number, sectors: number, clusterBits = 12): bigint {
  const x = 62n - BigInt(clusterBits - 8);
  return COMPRESSED | (BigInt(sectors - 1) << x) | BigInt(hostOffset);
}

function decodeCompressed(entry: bigint, clusterBits: number): { hostOffset: number; sectors: number } {
  const x = 62n - BigInt(clusterBits - 8);
  return {
    hostOffset: Number(entry & ((1n << x) - 1n)),
    sectors: Number((entry >> x) & ((1n << (62n - x)) - 1n)) + 1,
  };
}

/** Overwrites the compressed bytes of guest cluster 0 (written with qemu-io write -c). */
function garbleCompressed(fill: (len: number) => Buffer, clusterBits = 12): (p: string) => void {
  return (p) => {
    const e = getU64(p, l2EntryPos(p, 0));
    if (!(e & COMPRESSED)) throw new Error('cluster 0 is not compressed');
    const { hostOffset, sectors } = decodeCompressed(e, clusterBits);
    const len = (hostOffset - (hostOffset % 512)) + sectors * 512 - hostOffset;
    writeAt(p, hostOffset, fill(len));
  };
}

/** Replaces the backing file name stored in the image with `name` (same header slot). */
function rewriteBackingName(p: string, name: string): void {
  const off = Number(getU64(p, H.backingFileOffset));
  const b = Buffer.from(name, 'utf8');
  writeAt(p, off, b);
  writeAt(p, H.backingFileSize, u32(b.length));
}

/** Appends a snapshot table of `count` entries at the next cluster boundary past EOF. */
function appendSnapshotTable(p: string, count: number, last?: Buffer): void {
  const clusterSize = 2 ** getU32(p, H.clusterBits);
  const size = readFileSync(p).length;
  const at = Math.ceil(size / clusterSize) * clusterSize;
  truncateSync(p, at + count * 40);
  if (last) writeAt(p, at + (count - 1) * 40, last);
  writeAt(p, H.nbSnapshots, u32(count));
  writeAt(p, H.snapshotsOffset, u64(at));
}

const FILE_TOO_SHORT = /only \d+ bytes|truncat|shorter than/i;

// ---------------------------------------------------------------- the cases

export const CASES: HostileCase[] = [
  // ---- controls: nothing wrong
  { name: 'valid qcow2 (control)', level: 'ok', build: patched(() => {}) },
  { name: 'valid qcow2 with an internal snapshot (control)', level: 'ok', build: patched(() => {}, { snapshot: 's1' }) },
  { name: 'valid compressed qcow2 (control)', level: 'ok', build: patched(() => {}, { io: ['write -c -P 0xcd 0 4k', 'write -c -P 0xce 4k 4k'] }) },
  { name: 'valid extended-L2 qcow2 (control)', level: 'ok', build: patched(() => {}, { clusterSize: 16 * KiB, extendedL2: true, io: ['write -P 1 0 4k', 'write -z 8k 4k'] }) },
  {
    name: 'valid backing chain (control)', level: 'ok',
    build: (dir) => {
      const base = baseQcow2(dir, 'base.qcow2');
      const top = baseQcow2(dir, 'top.qcow2', { backing: 'base.qcow2', io: ['write -P 0x11 4k 4k'] });
      return { image: top, files: [top, base] };
    },
  },
  {
    // qemu-img writes the backing format extension into v2 images too; without it a raw base
    // is never probed as raw, so this chain only opens if the extension is read.
    name: 'valid compat=0.10 (v2) overlay over a raw base (control)', level: 'ok',
    build: (dir) => {
      const base = join(dir, 'base.raw');
      writeFileSync(base, Buffer.alloc(VIRTUAL_SIZE, 0x42));
      const top = baseQcow2(dir, 'top.qcow2', { compat: '0.10', backing: 'base.raw', backingFmt: 'raw', io: ['write -P 0x11 4k 4k'] });
      return { image: top, files: [top, base] };
    },
  },
  {
    name: 'raw file is simply read', level: 'ok',
    build: (dir) => {
      const p = join(dir, 'disk.raw');
      const b = Buffer.alloc(VIRTUAL_SIZE);
      b.fill(0x5a, 4096, 12288);
      randomBytes(4096, 99).copy(b, 512 * KiB);
      writeFileSync(p, b);
      return one(p);
    },
  },
  {
    name: 'random bytes without a qcow2 magic are a raw image', level: 'ok',
    build: (dir) => {
      const p = join(dir, 'noise.img');
      const b = randomBytes(64 * KiB, 7);
      if (b.readUInt32BE(0) === 0x514649fb) b[0] ^= 1;
      writeFileSync(p, b);
      return one(p);
    },
  },

  // ---- truncated header
  ...[10, 50, 71, 100].map((n): HostileCase => ({
    name: `truncated header: file of ${n} bytes`, level: 'open', problem: FILE_TOO_SHORT,
    build: patched((p) => truncateSync(p, n)),
  })),

  // ---- fixed fields
  {
    name: 'bad magic (opened as qcow2)', level: 'open', problem: /magic/i,
    build: (dir) => { const p = baseQcow2(dir); writeAt(p, H.magic, u32(0x514649fa)); return one(p, 'qcow2'); },
  },
  ...[1, 4].map((v): HostileCase => ({ name: `version ${v}`, level: 'open', problem: new RegExp(`version ${v}`), build: patched(setField(H.version, u32(v))) })),
  ...[8, 22, 255].map((v): HostileCase => ({ name: `cluster_bits ${v}`, level: 'open', problem: /cluster_bits|cluster size/, build: patched(setField(H.clusterBits, u32(v))) })),
  { name: 'l1_size 0xffffffff', level: 'open', problem: /l1_size|L1 table/, build: patched(setField(H.l1Size, u32(0xffffffff))) },
  { name: 'l1_size too small for the virtual size', level: 'open', problem: /L1 table is too small|l1_size/, build: patched(setField(H.size, u64(64 * 1024 * KiB))) },
  { name: 'virtual size 2^63', level: 'open', problem: /size/, build: patched(setField(H.size, u64(1n << 63n))) },
  { name: 'refcount_order 7', level: 'open', problem: /refcount_order/, build: patched(setField(H.refcountOrder, u32(7))) },
  { name: 'refcount_table_clusters 0xffffffff', level: 'open', problem: /refcount table/, build: patched(setField(H.refcountTableClusters, u32(0xffffffff))) },
  { name: 'refcount table offset past EOF', level: 'open', problem: /refcount table.*past the end/, build: patched(setField(H.refcountTableOffset, u64(0x100000))) },
  { name: 'L1 table offset past EOF', level: 'open', problem: /L1 table.*past the end/, build: patched(setField(H.l1TableOffset, u64(0x100000))) },
  { name: 'L1 table offset unaligned', level: 'open', problem: /L1 table.*align/, build: patched(setField(H.l1TableOffset, u64(0x3008))) },
  { name: 'L1 table offset 0', level: 'open', problem: /L1 table.*(header|offset 0)/, build: patched(setField(H.l1TableOffset, u64(0))) },
  // Without its key (encrypt.key-secret): info shows it (as qemu-img, without I/O), nothing reads it.
  { name: 'encryption: crypt_method 1 (AES) without a key', level: 'open', problem: /encrypt.*AES|AES.*encrypt/i, infoOpens: true, build: patched(setField(H.cryptMethod, u32(1))) },
  { name: 'encryption: crypt_method 2 (LUKS)', level: 'open', problem: /encrypt.*LUKS|LUKS.*encrypt/i, build: patched(setField(H.cryptMethod, u32(2))) },
  { name: 'unknown compression_type', level: 'open', problem: /compression/, build: patched((p) => { writeAt(p, H.compressionType, Buffer.from([7])); writeAt(p, H.incompatibleFeatures, u64(1n << 3n)); }) },
  // No data file name recorded: the image cannot be read; info still shows it (as qemu-img's).
  { name: 'external data file bit', level: 'open', problem: /data file/, infoOpens: true, build: patched(setField(H.incompatibleFeatures, u64(1n << 2n))) },

  // ---- incompatible features
  { name: 'unknown incompatible feature bit, no feature name table', level: 'open', problem: /bit 10/, build: patched(withUnknownBit(null)) },
  { name: 'unknown incompatible feature bit named in the feature name table', level: 'open', problem: /hostile-feature/, build: patched(withUnknownBit('hostile-feature')) },
  { name: 'unknown incompatible feature whose name holds a newline', level: 'open', problem: /bit 10/, build: patched(withUnknownBit('evil\nfeature')) },

  // ---- header extensions and the backing file name
  {
    name: 'header extension longer than the header cluster', level: 'open', problem: /extension/,
    build: patched((p) => writeAt(p, getU32(p, H.headerLength), Buffer.concat([u32(0x12345678), u32(0x7fffffff)]))),
  },
  { name: 'backing file name offset past the header cluster', level: 'open', problem: /backing file name/, build: patched((p) => { writeAt(p, H.backingFileOffset, u64(0x2000)); writeAt(p, H.backingFileSize, u32(8)); }) },
  { name: 'backing file name running past the header cluster', level: 'open', problem: /backing file name/, build: patched((p) => { writeAt(p, H.backingFileOffset, u64(0xff0)); writeAt(p, H.backingFileSize, u32(100)); }) },
  { name: 'backing file name longer than 1023 bytes', level: 'open', problem: /backing file name/, build: patched((p) => { writeAt(p, H.backingFileOffset, u64(0x200)); writeAt(p, H.backingFileSize, u32(2000)); }) },

  // ---- backing chains
  {
    name: 'backing loop a -> a', level: 'chain', problem: /loop/,
    build: (dir) => {
      const a = baseQcow2(dir, 'a.qcow2', { backing: 'x.qcow2' });
      rewriteBackingName(a, 'a.qcow2');
      return one(a);
    },
  },
  {
    name: 'backing loop a -> ./a (same file, another spelling)', level: 'chain', problem: /loop/,
    build: (dir) => {
      const a = baseQcow2(dir, 'a.qcow2', { backing: './a.qcow2x' });
      rewriteBackingName(a, './a.qcow2');
      return one(a);
    },
  },
  {
    name: 'backing loop a -> b -> a', level: 'chain', problem: /loop/,
    build: (dir) => {
      const a = baseQcow2(dir, 'a.qcow2', { backing: 'b.qcow2' });
      const b = baseQcow2(dir, 'b.qcow2', { backing: 'a.qcow2' });
      return { image: a, files: [a, b] };
    },
  },
  {
    name: 'backing loop a -> b -> link-to-a', level: 'chain', problem: /loop/,
    build: (dir) => {
      const a = baseQcow2(dir, 'a.qcow2', { backing: 'b.qcow2' });
      const b = baseQcow2(dir, 'b.qcow2', { backing: 'link.qcow2' });
      symlinkSync('a.qcow2', join(dir, 'link.qcow2'));
      return { image: a, files: [a, b] };
    },
  },
  {
    name: 'missing backing file', level: 'chain', problem: /does not exist|no such file|not found/i,
    names: (b) => [b.image, b.image.replace(/image\.qcow2$/, 'missing.qcow2')],
    build: (dir) => one(baseQcow2(dir, 'image.qcow2', { backing: 'missing.qcow2' })),
  },
  {
    name: 'missing backing file two levels down', level: 'chain', problem: /does not exist|no such file|not found/i,
    // The overlay that names the missing file, and the missing file.
    names: (b) => [b.files[1]!, b.image.replace(/top\.qcow2$/, 'gone.qcow2')],
    build: (dir) => {
      const mid = baseQcow2(dir, 'mid.qcow2', { backing: 'gone.qcow2' });
      const top = baseQcow2(dir, 'top.qcow2', { backing: 'mid.qcow2' });
      return { image: top, files: [top, mid] };
    },
  },
  {
    name: 'missing backing file whose name holds a newline', level: 'chain', problem: /does not exist|no such file|not found/i,
    build: (dir) => {
      const p = baseQcow2(dir, 'image.qcow2', { backing: 'missing.qcow2' });
      rewriteBackingName(p, 'evil\nname.qcow2');
      return one(p);
    },
  },

  // ---- snapshot table
  { name: 'nb_snapshots 0xffffffff', level: 'open', problem: /snapshot/, build: patched(setField(H.nbSnapshots, u32(0xffffffff))) },
  { name: 'snapshot table offset past EOF', level: 'open', problem: /snapshot table.*past the end/, build: patched(setField(H.snapshotsOffset, u64(0x100000)), { snapshot: 's1' }) },
  { name: 'snapshot table offset unaligned', level: 'open', problem: /snapshot table.*align/, build: patched((p) => writeAt(p, H.snapshotsOffset, u64(snapshotsOffset(p) + 8)), { snapshot: 's1' }) },
  { name: 'snapshot entry with extra_data_size 0xffffffff', level: 'open', problem: /extra data/, build: patched((p) => writeAt(p, snapshotsOffset(p) + 36, u32(0xffffffff)), { snapshot: 's1' }) },
  { name: 'snapshot entry with id and name sizes 0xffff', level: 'open', problem: /snapshot table.*past the end/, build: patched((p) => writeAt(p, snapshotsOffset(p) + 12, Buffer.concat([u16(0xffff), u16(0xffff)])), { snapshot: 's1' }) },
  { name: 'snapshot L1 table past EOF', level: 'open', problem: /snapshot.*past the end/, build: patched((p) => writeAt(p, snapshotsOffset(p), u64(0x100000)), { snapshot: 's1' }) },
  { name: 'snapshot L1 size 0xffffffff', level: 'open', problem: /snapshot.*too large/, build: patched((p) => writeAt(p, snapshotsOffset(p) + 8, u32(0xffffffff)), { snapshot: 's1' }) },

  // ---- L1 entries
  { name: 'L1 entry pointing to an L2 table past EOF', level: 'l2', problem: /L2 table.*past the end/, build: patched((p) => writeAt(p, l1Offset(p), u64(COPIED | 0x100000n))) },
  { name: 'L1 entry pointing to an unaligned L2 table', level: 'l2', problem: /L2 table.*align/, build: patched((p) => writeAt(p, l1Offset(p), u64(COPIED | BigInt(l2Offset(p) + 0x200)))) },

  // ---- L2 entries
  { name: 'L2 entry pointing to a data cluster past EOF', level: 'l2', problem: /past the end/, mapLists: true, build: patched(setL2(0, COPIED | 0x100000n)) },
  { name: 'L2 entry pointing into the header', level: 'l2', problem: /header|align/, build: patched(setL2(0, COPIED | 0x200n)) },
  { name: 'L2 entry pointing to an unaligned data cluster', level: 'l2', problem: /align/, build: patched((p) => writeAt(p, l2EntryPos(p, 0), u64((getU64(p, l2EntryPos(p, 0)) & ~OFFSET_MASK) | BigInt(Number(getU64(p, l2EntryPos(p, 0)) & OFFSET_MASK) + 0x200)))) },
  { name: 'L2 entry with reserved bits set', level: 'l2', problem: /reserved/, build: patched((p) => writeAt(p, l2EntryPos(p, 0), u64(getU64(p, l2EntryPos(p, 0)) | 0x2n))) },
  // Runs of host-contiguous data clusters are read without decoding each entry: the damage
  // must still be found at the run's end and in its middle.
  {
    name: 'contiguous data clusters, the last ones past EOF', level: 'l2', problem: /past the end/, mapLists: true,
    build: patched((p) => truncateSync(p, 0xb000), { io: ['write -P 0xab 0 32k'] }),
  },
  {
    name: 'contiguous data clusters, reserved bits set in the middle of the run', level: 'l2', problem: /reserved/,
    build: patched((p) => writeAt(p, l2EntryPos(p, 4), u64(getU64(p, l2EntryPos(p, 4)) | (1n << 57n))), { io: ['write -P 0xab 0 32k'] }),
  },
  { name: 'zero L2 entry preallocated past EOF', level: 'l2', problem: /past the end/, mapLists: true, build: patched(setL2(16, 0x100000n | 1n)) },
  { name: 'compressed descriptor pointing into the header', level: 'l2', problem: /header/, build: patched(setL2(0, compressedDescriptor(0x100, 1))) },
  {
    name: 'compressed data that is garbage (deflate)', level: 'data', problem: /compressed/,
    build: patched(garbleCompressed((n) => Buffer.alloc(n, 0xff)), { io: ['write -c -P 0xcd 0 4k'] }),
  },
  {
    name: 'compressed data that is truncated (deflate)', level: 'data', problem: /compressed/,
    build: patched(garbleCompressed((n) => Buffer.concat([Buffer.from([0x04]), Buffer.alloc(n - 1)])), { io: ['write -c -P 0xcd 0 4k'] }),
  },
  {
    name: 'compressed data that is garbage (zstd)', level: 'data', problem: /compressed/,
    build: patched(garbleCompressed((n) => randomBytes(n, 3)), { compression: 'zstd', io: ['write -c -P 0xcd 0 4k'] }),
  },
  {
    name: 'extended L2: subcluster both allocated and zero', level: 'l2', problem: /subcluster/,
    build: patched((p) => writeAt(p, l2Offset(p) + 8, u32(1)), { clusterSize: 16 * KiB, extendedL2: true, io: ['write -P 1 0 4k'] }),
  },
  {
    name: 'extended L2: unallocated cluster with allocated subclusters', level: 'l2', problem: /subcluster/,
    build: patched((p) => writeAt(p, l2Offset(p) + 16 + 12, u32(1)), { clusterSize: 16 * KiB, extendedL2: true, io: ['write -P 1 0 4k'] }),
  },

  // ---- noise
  ...[11, 12, 13].map((seed): HostileCase => ({
    name: `random bytes after a qcow2 magic (seed ${seed})`, level: 'open',
    build: (dir) => {
      const p = join(dir, 'noise.qcow2');
      const b = randomBytes(64 * KiB, seed);
      b.writeUInt32BE(0x514649fb, 0);
      writeFileSync(p, b);
      return one(p);
    },
  })),
  ...[2, 3].flatMap((version) => [12, 16].map((bits): HostileCase => ({
    name: `random bytes after a valid magic, version ${version}, cluster_bits ${bits}, 64-bit fields below 2^24`, level: 'any',
    build: (dir) => {
      const p = join(dir, 'noise.qcow2');
      const b = randomBytes(256 * KiB, version * 100 + bits);
      b.writeUInt32BE(0x514649fb, 0);
      b.writeUInt32BE(version, 4);
      b.writeUInt32BE(bits, 20);
      for (const off of [H.backingFileOffset, H.size, H.l1TableOffset, H.refcountTableOffset, H.snapshotsOffset]) b.fill(0, off, off + 5);
      writeFileSync(p, b);
      return one(p);
    },
  }))),
];

// ---------------------------------------------------------------- worst cases for time and memory
//
// Fields at (or just past) QEMU's own limits, in sparse files: what a reader may have to
// allocate is bounded by those limits, and nothing may be allocated from a field before it is
// checked. These run in a child process with a small heap (see the tests).

export interface WorstCase {
  name: string;
  /** 'error': a typed error; 'ok': succeeds; 'any': either, within the bounds. */
  expect: 'error' | 'ok' | 'any';
  problem?: RegExp;
  /** The strata command to run on the image (the file name is appended). */
  command: string[];
  build(dir: string): Built;
}

/** QEMU's limit: a 32 MiB L1 table (4 Mi entries); with 4 KiB clusters that is 8 TiB of disk. */
const MAX_L1_ENTRIES = 4 * 1024 * 1024;

/** Moves the L1 table to a fresh cluster past EOF with `entries` entries (sparse), `present` of its bytes in the file. */
function hugeL1(p: string, entries: number, shortBy: number): void {
  const l1 = readAt(p, l1Offset(p), 8);
  const size = readFileSync(p).length;
  const at = Math.ceil(size / 4096) * 4096;
  truncateSync(p, at + entries * 8 - shortBy);
  writeAt(p, at, l1);
  writeAt(p, H.l1Size, u32(entries));
  writeAt(p, H.l1TableOffset, u64(at));
  // The largest virtual size that table can address (4 KiB clusters: 2 MiB per L1 entry).
  writeAt(p, H.size, u64(entries * 2 * 1024 * 1024));
}

export const WORST_CASES: WorstCase[] = [
  { name: 'l1_size 0xffffffff', expect: 'error', problem: /l1_size/, command: ['info'], build: patched(setField(H.l1Size, u32(0xffffffff))) },
  { name: 'L1 table at the 32 MiB limit, 8 bytes short of EOF', expect: 'error', problem: /L1 table.*past the end/, command: ['info'], build: patched((p) => hugeL1(p, MAX_L1_ENTRIES, 8)) },
  { name: 'L1 table at the 32 MiB limit (8 TiB disk), map', expect: 'ok', command: ['map', '--output=json'], build: patched((p) => hugeL1(p, MAX_L1_ENTRIES, 0)) },
  { name: 'nb_snapshots 0xffffffff', expect: 'error', problem: /snapshot/, command: ['info'], build: patched(setField(H.nbSnapshots, u32(0xffffffff))) },
  {
    name: '65536 snapshots (the limit), the last with its L1 table past EOF', expect: 'error', problem: /snapshot.*past the end/, command: ['info'],
    build: patched((p) => appendSnapshotTable(p, 65536, Buffer.concat([u64(0x40000000), u32(1)]))),
  },
  { name: 'refcount_table_clusters 0xffffffff', expect: 'error', problem: /refcount table/, command: ['info'], build: patched(setField(H.refcountTableClusters, u32(0xffffffff))) },
  {
    name: 'refcount table at the 8 MiB limit, past EOF', expect: 'error', problem: /refcount table.*past the end/, command: ['info'],
    build: patched((p) => { writeAt(p, H.refcountTableClusters, u32(2048)); writeAt(p, H.refcountTableOffset, u64(0x10000)); }),
  },
  {
    // iotest 261: entries with 1 KiB of extra data and 64 KiB ID and name, past 64 MiB in all.
    name: 'snapshot table of 64 MiB and one more entry (iotest 261)', expect: 'error', problem: /Snapshot table is too big/, command: ['info'],
    build: patched((p) => {
      const entry = Buffer.alloc(40);
      entry.writeUInt16BE(0xffff, 12);
      entry.writeUInt16BE(0xffff, 14);
      entry.writeUInt32BE(1024, 36);
      const stride = 40 + 1024 + 0xffff * 2 + 2;
      const at = 1 << 20;
      let n = 0;
      for (let written = 0; written <= 64 * 1024 * 1024; written += stride, n++) writeAt(p, at + n * stride, entry);
      truncateSync(p, at + n * stride);
      writeAt(p, H.nbSnapshots, u32(n));
      writeAt(p, H.snapshotsOffset, u64(at));
    }),
  },
  ...(['info', 'measure'] as const).map((cmd): WorstCase => ({
    name: 'bitmap directory size of 1 TiB in the header', expect: 'error', problem: /bitmap directory size/,
    command: cmd === 'info' ? ['info'] : ['measure', '-O', 'qcow2'],
    build: patched((p) => {
      const ext = Buffer.concat([u32(0x23852875), u32(24), u32(1), u32(0), u64(2 ** 40), u64(0x10000), Buffer.alloc(8)]);
      writeAt(p, getU32(p, H.headerLength), ext);
      writeAt(p, 88, u64(1)); // autoclear: bitmaps
    }),
  })),
  {
    // The autoclear bit is clear: a program without bitmap support wrote the image, the
    // extension is stale and ignored (QEMU opens it), whatever it says.
    name: 'stale bitmaps extension (autoclear bit clear) with a 1 TiB directory', expect: 'ok', command: ['measure', '-O', 'qcow2'],
    build: patched((p) => {
      const ext = Buffer.concat([u32(0x23852875), u32(24), u32(0), u32(0), u64(2 ** 40), u64(0x10001), Buffer.alloc(8)]);
      writeAt(p, getU32(p, H.headerLength), ext);
    }),
  },
  {
    name: 'bitmap directory at its 64 MiB limit, past EOF', expect: 'any', command: ['info'],
    build: patched((p) => {
      const ext = Buffer.concat([u32(0x23852875), u32(24), u32(1), u32(0), u64(64 * 1024 * 1024), u64(0x40000000), Buffer.alloc(8)]);
      writeAt(p, getU32(p, H.headerLength), ext);
      writeAt(p, 88, u64(1)); // autoclear: bitmaps
    }),
  },
];
