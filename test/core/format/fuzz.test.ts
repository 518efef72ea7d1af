// Property tests for the read path (fast-check): mutate the header, the L1/L2 tables, the
// snapshot table and compressed data of small valid images, then open, read everything and
// map everything; only StrataError may come out (never a TypeError, RangeError, ...), each run
// must be quick, and nothing is written. Then the pure decoders on arbitrary buffers.
//
// The seed images are built in memory with the format encoders, so this runs without qemu;
// an oracle test checks that qemu-img finds them clean and reads what we expect.
import { readFileSync, writeFileSync } from 'node:fs';
import fc from 'fast-check';
import { afterAll, describe, expect, it } from 'vitest';
import * as C from '../../../core/format/constants';
import { StrataError } from '../../../core/errors';
import { checkIncompatibleFeatures, decodeHeader, encodeHeader, type ParsedHeader } from '../../../core/format/header';
import { compressedRange, decodeL1Entry, decodeL2Bitmap, decodeL2Entry, encodeL1Entry, encodeL2Entry, subclusterState, type L2Geometry } from '../../../core/format/l2';
import { decodeReftableEntry, encodeReftableEntry, setRefcount } from '../../../core/format/refcount';
import { decodeSnapshotTable, encodeSnapshotTable, type SnapshotEntry } from '../../../core/format/snapshot';
import { decodeBitmapDirectory } from '../../../core/format/bitmaps';
import { compressCluster, terminateCodecWorkers, type CompressionType } from '../../../core/codec/index';
import { Qcow2Image } from '../../../core/engine/qcow2';
import type { DiskImage } from '../../../core/engine/image';
import { MemoryFile } from '../../../core/io/memory-file';
import { mapImage } from '../../../core/chain/map';
import { imageInfo } from '../../../core/chain/info';
import { describeOracle, qemuCheck, qemuImg, tempDir } from '../../oracle/qemu';

afterAll(() => terminateCodecWorkers());

// ---------------------------------------------------------------- seed images

interface Variant {
  name: string;
  version: 2 | 3;
  clusterBits: number;
  extendedL2: boolean;
  compression: CompressionType;
  backing: boolean;
}

const VARIANTS: Variant[] = [
  { name: 'v3, 4 KiB clusters, deflate, backing file', version: 3, clusterBits: 12, extendedL2: false, compression: 0, backing: true },
  { name: 'v2, 512 B clusters', version: 2, clusterBits: 9, extendedL2: false, compression: 0, backing: false },
  { name: 'v3, 16 KiB clusters, extended L2, zstd, backing file', version: 3, clusterBits: 14, extendedL2: true, compression: 1, backing: true },
];

interface Region { name: string; start: number; length: number }

interface Seed {
  variant: Variant;
  bytes: Buffer;
  /** Guest content as built (the backing file, when named, is empty). */
  content: Buffer;
  virtualSize: number;
  regions: Region[];
  snapshotCount: number;
}

/** xorshift32 bytes. */
function noise(n: number, seed: number): Buffer {
  let s = seed >>> 0 || 1;
  const b = Buffer.alloc(n);
  for (let i = 0; i < n; i++) { s ^= s << 13; s >>>= 0; s ^= s >>> 17; s ^= s << 5; s >>>= 0; b[i] = s & 0xff; }
  return b;
}

/** Compressible, but not trivially: runs of a byte that depends on the cluster. */
function compressible(n: number, k: number): Buffer {
  const b = Buffer.alloc(n);
  for (let i = 0; i < n; i++) b[i] = ((i >> 4) * (k + 3) + k) & 0x7f;
  return b;
}

/**
 * A small valid qcow2 image with every kind of cluster: normal data, compressed (two sharing
 * a host cluster, one at an unaligned offset), zero (plain and preallocated; extended L2:
 * zero, data and unallocated subclusters in one cluster), unallocated; two L2 tables; two
 * internal snapshots sharing them; refcounts as QEMU counts them.
 */
function buildSeed(v: Variant): Seed {
  const cs = 2 ** v.clusterBits;
  const g: L2Geometry = { clusterBits: v.clusterBits, extendedL2: v.extendedL2 };
  const entrySize = v.extendedL2 ? 16 : 8;
  const l2Entries = cs / entrySize;
  const span = l2Entries * cs;
  const virtualSize = span + 6 * cs;
  const l1Size = 2;
  const nSnap = 2;
  const content = Buffer.alloc(virtualSize);
  let clusters: Buffer[] = [];
  const refs = new Map<number, number>(); // host cluster index -> refcount
  const alloc = (refcount: number) => {
    clusters.push(Buffer.alloc(cs));
    refs.set(clusters.length - 1, refcount);
    return (clusters.length - 1) * cs;
  };
  const at = (off: number) => clusters[off / cs]!;
  const shared = 1 + nSnap; // active L1 + each snapshot's L1 reference the same L2 tables

  const hdr = alloc(1);
  const reft = alloc(1);
  const refb = alloc(1);
  const l1 = alloc(1);
  const l2s = [alloc(shared), alloc(shared)];
  const l1Table = Buffer.alloc(l1Size * 8);
  l2s.forEach((o, i) => encodeL1Entry(l1Table, i, o, false));
  at(l1).set(l1Table);

  const setEntry = (guestCluster: number, e: Parameters<typeof encodeL2Entry>[2], bitmap?: { alloc: number; zero: number }) => {
    const t = at(l2s[Math.floor(guestCluster / l2Entries)]!);
    encodeL2Entry(t, guestCluster % l2Entries, e, g, bitmap ?? (v.extendedL2 && e.kind === 'normal' ? { alloc: 0xffffffff, zero: 0 } : undefined));
  };
  const dataCluster = (guestCluster: number, data: Buffer) => {
    const host = alloc(shared);
    at(host).set(data);
    setEntry(guestCluster, { kind: 'normal', hostOffset: host, copied: false });
    data.copy(content, guestCluster * cs);
  };
  // Compressed clusters packed one after another, as QEMU packs them.
  let packHost = -1;
  let packPos = 0;
  const compressedClusterAt = (guestCluster: number, data: Buffer) => {
    const c = compressCluster(v.compression, data);
    if (!c) throw new Error('seed data did not compress');
    if (packHost < 0 || packPos + c.length > cs) { packHost = alloc(0); packPos = 0; }
    const hostOffset = packHost + packPos;
    at(packHost).set(c, packPos);
    refs.set(packHost / cs, refs.get(packHost / cs)! + shared);
    const sectors = Math.floor((hostOffset + c.length - 1) / 512) - Math.floor(hostOffset / 512) + 1;
    setEntry(guestCluster, { kind: 'compressed', hostOffset, sectors }, v.extendedL2 ? { alloc: 0, zero: 0 } : undefined);
    packPos += c.length;
    data.copy(content, guestCluster * cs);
  };

  dataCluster(0, noise(cs, 1));
  dataCluster(1, compressible(cs, 9));
  compressedClusterAt(2, compressible(cs, 2));
  compressedClusterAt(3, compressible(cs, 3));
  if (v.extendedL2) {
    // Cluster 4: zero (plain) subclusters everywhere. Cluster 5: data, zero and unallocated subclusters.
    setEntry(4, { kind: 'unallocated' }, { alloc: 0, zero: 0xffffffff });
    const host = alloc(shared);
    at(host).set(noise(cs, 5));
    setEntry(5, { kind: 'normal', hostOffset: host, copied: false }, { alloc: 0x0000ffff, zero: 0x00ff0000 });
    noise(cs, 5).copy(content, 5 * cs, 0, cs / 2);
  } else if (v.version === 3) {
    setEntry(4, { kind: 'zero', hostOffset: 0, copied: false });
    const host = alloc(shared);
    at(host).set(noise(cs, 5)); // preallocated: must not be read
    setEntry(5, { kind: 'zero', hostOffset: host, copied: false });
  }
  // 6: unallocated; 7: data.
  dataCluster(7, noise(cs, 7));
  dataCluster(l2Entries, noise(cs, 8));
  compressedClusterAt(l2Entries + 1, compressible(cs, 4));
  dataCluster(l2Entries + 3, compressible(cs, 10));

  // Snapshots: each has its own copy of the L1 table.
  const snapL1s = Array.from({ length: nSnap }, () => { const o = alloc(1); at(o).set(l1Table); return o; });
  const snaps: SnapshotEntry[] = snapL1s.map((o, i) => ({
    l1TableOffset: o, l1Size, id: String(i + 1), name: `snap-${i + 1}`, dateSec: 1_700_000_000 + i, dateNsec: 0,
    vmClockNsec: 0n, vmStateSize: 0, diskSize: virtualSize, icount: 0n, extraData: Buffer.alloc(0),
  }));
  const snapTable = encodeSnapshotTable(snaps);
  if (snapTable.length > cs) throw new Error('snapshot table does not fit in a cluster');
  const snapOff = alloc(1);
  at(snapOff).set(snapTable);

  // Header.
  const featureTable = Buffer.alloc(3 * C.FEATURE_NAME_ENTRY_SIZE);
  [[0, 0, 'dirty bit'], [0, 4, 'extended L2 entries'], [1, 0, 'lazy refcounts']].forEach(([type, bit, name], i) => {
    featureTable[i * 48] = type as number;
    featureTable[i * 48 + 1] = bit as number;
    featureTable.write(name as string, i * 48 + 2);
  });
  const parsed: ParsedHeader = {
    header: {
      version: v.version, backingFileOffset: 0, backingFileSize: 0, clusterBits: v.clusterBits, size: virtualSize,
      cryptMethod: 0, l1Size, l1TableOffset: l1, refcountTableOffset: reft, refcountTableClusters: 1,
      nbSnapshots: nSnap, snapshotsOffset: snapOff,
      incompatibleFeatures: (v.extendedL2 ? C.INCOMPAT_EXTL2 : 0n) | (v.compression ? C.INCOMPAT_COMPRESSION : 0n),
      compatibleFeatures: 0n, autoclearFeatures: 0n, refcountOrder: 4, headerLength: 0, compressionType: v.compression,
      unknownFields: Buffer.alloc(0),
    },
    extensions: v.version === 3 ? [{ type: C.EXT_FEATURE_TABLE, data: featureTable }] : [],
    backingFile: v.backing ? 'base.qcow2' : null,
    backingFormat: v.backing ? 'qcow2' : null,
    featureNames: [], bitmaps: null, dataFile: null, cryptoHeader: null,
  };
  at(hdr).set(encodeHeader(parsed));

  // Refcounts (16 bits): one block covers every cluster here.
  encodeReftableEntry(at(reft), 0, refb);
  for (const [i, n] of refs) setRefcount(at(refb), i, 4, n);

  const bytes = Buffer.concat(clusters);
  clusters = [];
  const headerFields = v.version === 3 ? C.HEADER_V3_WITH_COMPRESSION_LENGTH : C.HEADER_V2_LENGTH;
  return {
    variant: v, bytes, content, virtualSize, snapshotCount: nSnap,
    regions: [
      { name: 'header fields', start: 0, length: headerFields },
      { name: 'header cluster', start: 0, length: cs },
      { name: 'L1 table', start: l1, length: l1Size * 8 },
      { name: 'L2 table 0', start: l2s[0]!, length: cs },
      { name: 'L2 table 1', start: l2s[1]!, length: cs },
      { name: 'snapshot table', start: snapOff, length: snapTable.length },
      { name: 'snapshot L1 tables', start: snapL1s[0]!, length: nSnap * cs },
      { name: 'compressed data', start: packHost, length: cs },
      { name: 'refcount structures', start: reft, length: 2 * cs },
    ],
  };
}

const SEEDS = VARIANTS.map(buildSeed);
const FILE = '/fuzz/image.qcow2';

// ---------------------------------------------------------------- exercising an image

/** Reads and maps at most this much of a (possibly absurdly large) mutated disk. */
const READ_CAP = 32 * 1024 * 1024;
const MAP_CAP = 2 ** 32;
const RUN_MS = 3000;

async function exerciseImage(img: DiskImage): Promise<void> {
  const buf = Buffer.alloc(1024 * 1024);
  const limit = Math.min(img.virtualSize, READ_CAP);
  for (let p = 0; p < limit; p += buf.length) await img.read(buf.subarray(0, Math.min(buf.length, limit - p)), p);
  // A read that straddles the end of the disk.
  if (img.virtualSize > 100) await img.read(Buffer.alloc(4096), img.virtualSize - 100);
  for await (const e of mapImage(img, 0, Math.min(img.virtualSize, MAP_CAP))) void e;
}

/** Open, info, read and map the image and its snapshots; returns what was thrown, if anything. */
async function readEverything(bytes: Buffer): Promise<{ error: unknown; ms: number; writes: number; content?: Buffer }> {
  const file = new MemoryFile(FILE, bytes);
  const t0 = performance.now();
  let error: unknown;
  let content: Buffer | undefined;
  try {
    const img = await Qcow2Image.open(FILE, file);
    await imageInfo(img);
    await exerciseImage(img);
    if (img.virtualSize <= READ_CAP) {
      content = Buffer.alloc(img.virtualSize);
      await img.read(content, 0);
    }
    for (const s of img.snapshots.slice(0, 4)) await exerciseImage(await img.snapshotView(s));
  } catch (e) {
    error = e;
  }
  return { error, ms: performance.now() - t0, writes: file.stats.writes, content };
}

// ---------------------------------------------------------------- mutations

const U32S = [0, 1, 2, 7, 8, 9, 0x1ff, 0x200, 0x1000, 0x10000, 0x7fffffff, 0x80000000, 0xfffffffe, 0xffffffff];
const U64S = [
  0n, 1n, 0x200n, 0x1000n, 0x10000n, 2n ** 31n, 2n ** 32n, 2n ** 53n - 1n, 2n ** 53n, 2n ** 56n, 2n ** 62n, 2n ** 63n, 2n ** 64n - 1n,
  C.QCOW_OFLAG_COMPRESSED | 0x200n, C.QCOW_OFLAG_COMPRESSED | 0xfffn, C.QCOW_OFLAG_COPIED | 0x200n, C.QCOW_OFLAG_COPIED | 0x1000n | 1n,
];

type Mutation =
  | { kind: 'byte'; at: number; value: number }
  | { kind: 'bit'; at: number; bit: number }
  | { kind: 'u32'; at: number; value: number }
  | { kind: 'u64'; at: number; value: bigint }
  /** A 64-bit value relative to the image: a multiple of the cluster size near (or past) the end. */
  | { kind: 'offset'; at: number; clusters: number; flags: bigint };

const mutationArb: fc.Arbitrary<Mutation> = fc.oneof(
  fc.record({ kind: fc.constant('byte' as const), at: fc.nat(), value: fc.integer({ min: 0, max: 255 }) }),
  fc.record({ kind: fc.constant('bit' as const), at: fc.nat(), bit: fc.integer({ min: 0, max: 7 }) }),
  fc.record({ kind: fc.constant('u32' as const), at: fc.nat(), value: fc.constantFrom(...U32S) }),
  fc.record({ kind: fc.constant('u64' as const), at: fc.nat(), value: fc.constantFrom(...U64S) }),
  fc.record({
    kind: fc.constant('offset' as const), at: fc.nat(), clusters: fc.integer({ min: 0, max: 40 }),
    flags: fc.constantFrom(0n, C.QCOW_OFLAG_COPIED, C.QCOW_OFLAG_ZERO, C.QCOW_OFLAG_COMPRESSED, 0x100n),
  }),
);

function applyMutation(bytes: Buffer, r: Region, m: Mutation, clusterSize: number): void {
  const width = m.kind === 'byte' || m.kind === 'bit' ? 1 : m.kind === 'u32' ? 4 : 8;
  if (r.length < width) return;
  let off = m.at % (r.length - width + 1);
  off -= off % width; // fields are naturally aligned
  off += r.start;
  switch (m.kind) {
    case 'byte': bytes[off] = m.value; break;
    case 'bit': bytes[off]! ^= 1 << m.bit; break;
    case 'u32': bytes.writeUInt32BE(m.value, off); break;
    case 'u64': bytes.writeBigUInt64BE(m.value, off); break;
    case 'offset': bytes.writeBigUInt64BE(BigInt(m.clusters * clusterSize) | m.flags, off); break;
  }
}

const caseArb = (seed: Seed, regionNames: string[]) => fc.record({
  region: fc.constantFrom(...seed.regions.filter((r) => regionNames.includes(r.name))),
  mutations: fc.array(mutationArb, { minLength: 1, maxLength: 6 }),
});

/** Errors that were typed but did not name the file on one line: checked by a test at the end. */
const untidy = new Map<string, string>();

function describeMutation(seed: Seed, region: Region, mutations: Mutation[]): string {
  return `${seed.variant.name}, ${region.name}: ${JSON.stringify(mutations, (_k, v) => (typeof v === 'bigint' ? `0x${v.toString(16)}` : v))}`;
}

/**
 * Runs per property: a fixed number, so every run of the suite tries as many cases (none is
 * cut short by a clock). STRATA_FUZZ_RUNS=5000 for a long session.
 */
const NUM_RUNS = Number(process.env.STRATA_FUZZ_RUNS ?? 200);
/** Vitest's limit per property: generous, only there to end a hang. */
const PROPERTY_TIMEOUT_MS = 60_000 + NUM_RUNS * 600;

describe('seed images', () => {
  for (const seed of SEEDS) {
    it(`${seed.variant.name}: open and read back what was built`, async () => {
      const r = await readEverything(Buffer.from(seed.bytes));
      if (r.error) throw r.error;
      expect(r.writes).toBe(0);
      expect(r.content!.equals(seed.content)).toBe(true);
    });
  }
});

describeOracle('seed images are what QEMU would accept', () => {
  const tmp = tempDir('strata-fuzz-seed-');
  afterAll(() => tmp.cleanup());
  for (const [i, seed] of SEEDS.entries()) {
    it(`${seed.variant.name}: qemu-img check is clean and qemu-img reads the same`, () => {
      const dir = tmp.path('');
      const p = tmp.path(`seed${i}.qcow2`);
      writeFileSync(p, seed.bytes);
      if (seed.variant.backing) qemuImg('create', '-q', '-f', 'qcow2', `${dir}/base.qcow2`, String(seed.virtualSize));
      const check = qemuCheck(p);
      expect(check.status, JSON.stringify(check.json)).toBe(0);
      expect(check.json['leaks'] ?? 0).toBe(0);
      expect(check.json['corruptions'] ?? 0).toBe(0);
      const out = tmp.path(`seed${i}.raw`);
      qemuImg('convert', '-O', 'raw', p, out);
      expect(readFileSync(out).equals(seed.content)).toBe(true);
      const snaps = JSON.parse(qemuImg('info', '--output=json', p)).snapshots as unknown[];
      expect(snaps).toHaveLength(seed.snapshotCount);
    });
  }
});

const GROUPS: { name: string; regions: string[] }[] = [
  { name: 'header fields', regions: ['header fields'] },
  { name: 'header cluster (extensions, backing name)', regions: ['header cluster'] },
  { name: 'L1 and L2 tables', regions: ['L1 table', 'L2 table 0', 'L2 table 1'] },
  { name: 'snapshot table and snapshot L1 tables', regions: ['snapshot table', 'snapshot L1 tables'] },
  { name: 'compressed data', regions: ['compressed data'] },
  { name: 'anywhere in the metadata', regions: ['header fields', 'header cluster', 'L1 table', 'L2 table 0', 'L2 table 1', 'snapshot table', 'snapshot L1 tables', 'refcount structures'] },
];

describe('mutated images: only StrataError comes out, quickly, and nothing is written', () => {
  for (const seed of SEEDS) {
    for (const group of GROUPS) {
      it(`${seed.variant.name}: ${group.name}`, async () => {
        await fc.assert(fc.asyncProperty(caseArb(seed, group.regions), async ({ region, mutations }) => {
          const bytes = Buffer.from(seed.bytes);
          for (const m of mutations) applyMutation(bytes, region, m, 2 ** seed.variant.clusterBits);
          const r = await readEverything(bytes);
          if (r.error !== undefined && !(r.error instanceof StrataError)) {
            throw new Error(`untyped error for ${describeMutation(seed, region, mutations)}: ${(r.error as Error)?.stack ?? String(r.error)}`);
          }
          expect(r.ms, `took ${r.ms.toFixed(0)} ms`).toBeLessThan(RUN_MS);
          expect(r.writes, 'nothing is written').toBe(0);
          if (r.error instanceof StrataError && (!r.error.message.includes(FILE) || /[\r\n]/.test(r.error.message))) {
            const key = r.error.message.replace(/0x[0-9a-f]+|\d+/g, 'N');
            if (!untidy.has(key)) untidy.set(key, `${r.error.message}\n      after ${describeMutation(seed, region, mutations)}`);
          }
        }), { numRuns: NUM_RUNS });
      }, PROPERTY_TIMEOUT_MS);
    }
  }

  // Runs after the properties above (vitest runs a file's tests in order).
  it('every error names the file on one line', () => {
    expect([...untidy.values()], 'errors that do not name the file, or span lines').toEqual([]);
  });
});

// ---------------------------------------------------------------- the pure decoders

function onlyTyped(f: () => unknown): void {
  try {
    f();
  } catch (e) {
    if (!(e instanceof StrataError)) throw e;
  }
}

async function onlyTypedAsync(f: () => Promise<unknown>): Promise<void> {
  try {
    await f();
  } catch (e) {
    if (!(e instanceof StrataError)) throw e;
  }
}

describe('pure decoders on arbitrary buffers throw only StrataError', () => {
  const headerish = fc.oneof(
    // Anything at all.
    fc.uint8Array({ maxLength: 2048 }).map((a) => Buffer.from(a)),
    // A plausible start: magic, version 2/3, a valid cluster_bits, the rest arbitrary.
    fc.record({
      rest: fc.uint8Array({ minLength: 0, maxLength: 4096 }),
      version: fc.constantFrom(2, 3),
      clusterBits: fc.integer({ min: 9, max: 21 }),
    }).map(({ rest, version, clusterBits }) => {
      const b = Buffer.alloc(Math.max(rest.length, 24));
      b.set(rest);
      b.writeUInt32BE(C.QCOW_MAGIC, 0);
      b.writeUInt32BE(version, 4);
      b.writeUInt32BE(clusterBits, 20);
      return b;
    }),
    // A real header cluster, mutated and cut anywhere.
    fc.record({
      seed: fc.constantFrom(...SEEDS),
      mutations: fc.array(mutationArb, { maxLength: 6 }),
      cut: fc.nat(),
    }).map(({ seed, mutations, cut }) => {
      const cs = 2 ** seed.variant.clusterBits;
      const b = Buffer.from(seed.bytes.subarray(0, cs));
      for (const m of mutations) applyMutation(b, { name: 'header', start: 0, length: cs }, m, cs);
      return b.subarray(0, cut % (cs + 1));
    }),
  );

  it('decodeHeader and checkIncompatibleFeatures', () => {
    fc.assert(fc.property(headerish, (buf) => {
      onlyTyped(() => checkIncompatibleFeatures(decodeHeader(buf, FILE), FILE));
    }), { numRuns: 2000 });
  });

  it('decodeHeader errors name the file on one line', () => {
    fc.assert(fc.property(headerish, (buf) => {
      try {
        checkIncompatibleFeatures(decodeHeader(buf, FILE), FILE);
      } catch (e) {
        if (!(e instanceof StrataError)) throw e;
        expect(e.message).toContain(FILE);
        expect(e.message).not.toMatch(/[\r\n]/);
      }
    }), { numRuns: 1000 });
  });

  const geometry = fc.oneof(
    fc.record({ clusterBits: fc.integer({ min: 9, max: 21 }), extendedL2: fc.constant(false) }),
    fc.record({ clusterBits: fc.integer({ min: 14, max: 21 }), extendedL2: fc.constant(true) }),
  );

  it('decodeL2Entry, decodeL2Bitmap, subclusterState, compressedRange; decoded entries are sane', () => {
    fc.assert(fc.property(geometry, fc.uint8Array({ minLength: 16, maxLength: 16 * 8 }), fc.nat(), (g, raw, i) => {
      const size = g.extendedL2 ? 16 : 8;
      const n = Math.floor(raw.length / size);
      const table = Buffer.from(raw.buffer, raw.byteOffset, n * size);
      const index = i % n;
      onlyTyped(() => {
        const e = decodeL2Entry(table, index, g, () => 'in the test table');
        const bitmap = g.extendedL2 ? decodeL2Bitmap(table, index) : null;
        for (let sc = 0; sc < (g.extendedL2 ? 32 : 1); sc++) subclusterState(e, bitmap, sc);
        const cs = 2 ** g.clusterBits;
        switch (e.kind) {
          case 'normal':
            expect(e.hostOffset % cs).toBe(0);
            expect(e.hostOffset).toBeGreaterThan(0);
            break;
          case 'zero':
            expect(g.extendedL2).toBe(false);
            expect(e.hostOffset % cs).toBe(0);
            break;
          case 'compressed': {
            expect(e.sectors).toBeGreaterThanOrEqual(1);
            expect(e.sectors).toBeLessThanOrEqual(2 ** (g.clusterBits - 8));
            const r = compressedRange(e.hostOffset, e.sectors);
            expect(r.end).toBeGreaterThan(r.start);
            break;
          }
          case 'unallocated': break;
        }
      });
      onlyTyped(() => decodeL1Entry(table, Math.floor(index * size / 8)));
    }), { numRuns: 5000 });
  });

  it('decodeReftableEntry', () => {
    fc.assert(fc.property(fc.uint8Array({ minLength: 8, maxLength: 8 }), (raw) => {
      onlyTyped(() => decodeReftableEntry(Buffer.from(raw), 0));
    }), { numRuns: 2000 });
  });

  it('decodeSnapshotTable, growing its buffer from arbitrary bytes', async () => {
    await fc.assert(fc.asyncProperty(
      fc.uint8Array({ maxLength: 1024 }),
      fc.integer({ min: 0, max: 300 }),
      fc.integer({ min: 9, max: 21 }),
      fc.integer({ min: 0, max: 256 * 1024 }),
      fc.boolean(),
      async (first, count, clusterBits, available, zeroes) => {
        // The "file" behind the table: `first`, then `available` more bytes (noise or zeros).
        const whole = Buffer.concat([Buffer.from(first), zeroes ? Buffer.alloc(available) : noise(available, first.length + count)]);
        let asked = 0;
        await onlyTypedAsync(() => decodeSnapshotTable(Buffer.from(first), count, clusterBits, async (need) => {
          asked++;
          expect(need).toBeLessThanOrEqual(C.MAX_SNAPSHOTS_SIZE);
          return need > whole.length ? null : whole.subarray(0, Math.min(whole.length, Math.max(need, 2 * need)));
        }, FILE));
        expect(asked).toBeLessThanOrEqual(count + 1);
      },
    ), { numRuns: 1000 });
  });

  it('decodeBitmapDirectory', () => {
    fc.assert(fc.property(fc.uint8Array({ maxLength: 512 }), fc.integer({ min: 0, max: 100 }), fc.integer({ min: 9, max: 21 }), fc.nat(1 << 30), (raw, count, clusterBits, size) => {
      const ext = { nbBitmaps: count, bitmapDirectorySize: raw.length, bitmapDirectoryOffset: 2 ** clusterBits };
      onlyTyped(() => decodeBitmapDirectory(Buffer.from(raw), ext, 2 ** clusterBits, size, FILE));
    }), { numRuns: 2000 });
  });
});
