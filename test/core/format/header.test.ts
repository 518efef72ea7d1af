// The qcow2 header: encode/decode round trips, the bytes QEMU writes, and the validation of
// every field (typed errors that name the file). Pure: no I/O, no qemu.
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import * as C from '../../../core/format/constants';
import { CorruptImageError, FormatError, StrataError, UnsupportedFeatureError } from '../../../core/errors';
import {
  checkIncompatibleFeatures, decodeHeader, decodeHeaderFields, encodeHeader, hasExtendedL2,
  type HeaderExtension, type ParsedHeader, type Qcow2Header,
} from '../../../core/format/header';

const FILE = 'disk.qcow2';

function hex(s: string): Buffer {
  return Buffer.from(s.replace(/\s+/g, ''), 'hex');
}

/** A header cluster: `head` then zeros. */
function cluster(head: Buffer, size: number): Buffer {
  const b = Buffer.alloc(size);
  head.copy(b);
  return b;
}

// qemu-img 7.2: `create -f qcow2 -o cluster_size=4096 a.qcow2 1M` (first 112 bytes; end marker follows).
const QEMU_V3_4K = hex(`
  514649fb 00000003 00000000 00000000 00000000 0000000c 00000000 00100000
  00000000 00000001 00000000 00003000 00000000 00001000 00000001 00000000
  00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000
  00000004 00000070 00000000 00000000`);

// qemu-img 7.2: `create -f qcow2 -o compat=0.10 -b base.raw -F raw v2.qcow2` (v2, 64 KiB
// clusters): a backing format extension right after the 72-byte header, then the name.
const QEMU_V2_BACKING_RAW = hex(`
  514649fb 00000002 00000000 00000060 00000008 00000010 00000000 00100000
  00000000 00000001 00000000 00030000 00000000 00010000 00000001 00000000
  00000000 00000000 e2792aca 00000003 72617700 00000000 00000000 00000000
  62617365 2e726177`);

function baseHeader(over: Partial<Qcow2Header> = {}): Qcow2Header {
  return {
    version: 3, backingFileOffset: 0, backingFileSize: 0, clusterBits: 16, size: 1 << 30,
    cryptMethod: 0, l1Size: 2, l1TableOffset: 0x30000, refcountTableOffset: 0x10000, refcountTableClusters: 1,
    nbSnapshots: 0, snapshotsOffset: 0, incompatibleFeatures: 0n, compatibleFeatures: 0n, autoclearFeatures: 0n,
    refcountOrder: 4, headerLength: 112, compressionType: 0, unknownFields: Buffer.alloc(0), ...over,
  };
}

function parsed(h: Qcow2Header, over: Partial<ParsedHeader> = {}): ParsedHeader {
  return { header: h, extensions: [], backingFile: null, backingFormat: null, featureNames: [], bitmaps: null, dataFile: null, cryptoHeader: null, ...over };
}

function featureTable(entries: [number, number, string][]): HeaderExtension {
  const data = Buffer.alloc(entries.length * 48);
  entries.forEach(([type, bit, name], i) => { data[i * 48] = type; data[i * 48 + 1] = bit; data.write(name, i * 48 + 2); });
  return { type: C.EXT_FEATURE_TABLE, data };
}

function expectTyped<T extends StrataError>(f: () => unknown, cls: new (...a: never[]) => T, re: RegExp): T {
  let caught: unknown;
  try { f(); } catch (e) { caught = e; }
  expect(caught).toBeInstanceOf(cls);
  const e = caught as T;
  expect(e.message).toMatch(new RegExp(`^${FILE}: `));
  expect(e.file).toBe(FILE);
  expect(e.message).toMatch(re);
  return e;
}

describe('decoding what QEMU writes', () => {
  it('a v3 header with 4 KiB clusters', () => {
    const p = decodeHeader(cluster(QEMU_V3_4K, 4096), FILE);
    expect(p.header).toMatchObject({
      version: 3, clusterBits: 12, size: 1 << 20, l1Size: 1, l1TableOffset: 0x3000, refcountTableOffset: 0x1000,
      refcountTableClusters: 1, nbSnapshots: 0, snapshotsOffset: 0, refcountOrder: 4, headerLength: 112, compressionType: 0,
      incompatibleFeatures: 0n, compatibleFeatures: 0n, autoclearFeatures: 0n,
    });
    expect(p.backingFile).toBeNull();
    expect(p.extensions).toEqual([]);
  });

  it('a v2 header: backing file name', () => {
    const p = decodeHeader(cluster(QEMU_V2_BACKING_RAW, 65536), FILE);
    expect(p.header.version).toBe(2);
    expect(p.header.headerLength).toBe(72);
    expect(p.backingFile).toBe('base.raw');
  });

  // QEMU reads and writes header extensions for version 2 images too (qcow2_read_extensions
  // runs from the end of the 72-byte header): `-o compat=0.10 -F raw` records the backing
  // format there, and without it a raw base cannot be opened (it is never probed as raw).
  it('a v2 header: the backing format extension QEMU writes after the 72-byte header', () => {
    const p = decodeHeader(cluster(QEMU_V2_BACKING_RAW, 65536), FILE);
    expect(p.backingFormat).toBe('raw');
    expect(p.extensions.map((e) => e.type)).toContain(C.EXT_BACKING_FORMAT);
  });

  it('a v3 header whose header_length is exactly 104 (no compression_type byte)', () => {
    const b = cluster(QEMU_V3_4K, 4096);
    b.writeUInt32BE(104, 100);
    b[104] = 0xff; // not a field any more: extensions start here, so this is an extension type
    b.fill(0, 104, 112);
    const p = decodeHeader(b, FILE);
    expect(p.header.headerLength).toBe(104);
    expect(p.header.compressionType).toBe(0);
  });
});

describe('round trips', () => {
  it('encodeHeader then decodeHeader gives back every field, the backing file and all extensions', () => {
    const arb = fc.record({
      version: fc.constantFrom(2 as const, 3 as const),
      clusterBits: fc.integer({ min: 9, max: 21 }),
      extendedL2: fc.boolean(),
      zstd: fc.boolean(),
      lazy: fc.boolean(),
      dirty: fc.boolean(),
      bitmapsAutoclear: fc.boolean(),
      refcountOrder: fc.integer({ min: 0, max: 6 }),
      l1Size: fc.integer({ min: 0, max: 1000 }),
      sizeFraction: fc.double({ min: 0, max: 1, noNaN: true }),
      l1Cluster: fc.integer({ min: 1, max: 1 << 20 }),
      reftCluster: fc.integer({ min: 1, max: 1 << 20 }),
      reftClusters: fc.integer({ min: 1, max: 16 }),
      nbSnapshots: fc.integer({ min: 0, max: C.MAX_SNAPSHOTS }),
      snapCluster: fc.integer({ min: 1, max: 1 << 20 }),
      unknownFieldWords: fc.integer({ min: 0, max: 2 }),
      backing: fc.option(fc.string({ unit: fc.constantFrom(...'abcdefghij./-_0123456789'), minLength: 1, maxLength: 100 }), { nil: null }),
      backingFormat: fc.constantFrom('qcow2', 'raw'),
      features: fc.array(fc.tuple(fc.integer({ min: 0, max: 2 }), fc.integer({ min: 0, max: 63 }), fc.string({ unit: fc.constantFrom(...'abc xyz'), maxLength: 46 })), { maxLength: 3 }),
      unknownExt: fc.option(fc.uint8Array({ maxLength: 40 }), { nil: null }),
    });
    fc.assert(fc.property(arb, (a) => {
      const v3 = a.version === 3;
      const extendedL2 = v3 && a.extendedL2 && a.clusterBits >= 14;
      const cs = 2 ** a.clusterBits;
      const perL1 = (cs / (extendedL2 ? 16 : 8)) * cs;
      const size = Math.min(Number.MAX_SAFE_INTEGER, Math.floor(a.sizeFraction * a.l1Size * perL1));
      const h = baseHeader({
        version: a.version, clusterBits: a.clusterBits, size, l1Size: a.l1Size,
        l1TableOffset: a.l1Size ? a.l1Cluster * cs : 0,
        refcountTableOffset: a.reftCluster * cs, refcountTableClusters: Math.min(a.reftClusters, C.MAX_REFTABLE_SIZE_BYTES / cs),
        nbSnapshots: a.nbSnapshots, snapshotsOffset: a.nbSnapshots ? a.snapCluster * cs : 0,
        incompatibleFeatures: v3 ? (extendedL2 ? C.INCOMPAT_EXTL2 : 0n) | (a.zstd ? C.INCOMPAT_COMPRESSION : 0n) | (a.dirty ? C.INCOMPAT_DIRTY : 0n) : 0n,
        compatibleFeatures: v3 && a.lazy ? C.COMPAT_LAZY_REFCOUNTS : 0n,
        autoclearFeatures: v3 && a.bitmapsAutoclear ? C.AUTOCLEAR_BITMAPS : 0n,
        refcountOrder: v3 ? a.refcountOrder : 4,
        compressionType: v3 && a.zstd ? 1 : 0,
        unknownFields: v3 ? Buffer.from(Array.from({ length: a.unknownFieldWords * 8 }, (_, i) => i + 1)) : Buffer.alloc(0),
      });
      const exts: HeaderExtension[] = [];
      if (v3 && a.features.length) exts.push(featureTable(a.features));
      if (v3 && a.unknownExt) exts.push({ type: 0x12345678, data: Buffer.from(a.unknownExt) });
      const p = parsed(h, { extensions: exts, backingFile: a.backing, backingFormat: a.backing && v3 ? a.backingFormat : null });
      let enc: Buffer;
      try {
        enc = encodeHeader(p, FILE);
      } catch (e) {
        // Only "does not fit in the cluster" may stop the encoder (512-byte clusters).
        expect(e).toBeInstanceOf(FormatError);
        expect(cs).toBeLessThan(4096);
        return;
      }
      expect(enc.length).toBe(cs);
      const d = decodeHeader(enc, FILE);
      const { backingFileOffset, backingFileSize, headerLength, ...rest } = d.header;
      const { backingFileOffset: _o, backingFileSize: _s, headerLength: _l, ...want } = h;
      expect(rest).toEqual(want);
      expect(headerLength).toBe(v3 ? 112 + h.unknownFields.length : 72);
      expect(d.backingFile).toBe(a.backing);
      if (a.backing) {
        expect(backingFileSize).toBe(Buffer.byteLength(a.backing));
        expect(enc.toString('utf8', backingFileOffset, backingFileOffset + backingFileSize)).toBe(a.backing);
      } else {
        expect(backingFileOffset).toBe(0);
      }
      expect(d.backingFormat).toBe(p.backingFormat);
      const wantExts = [...(p.backingFormat ? [{ type: C.EXT_BACKING_FORMAT, data: Buffer.from(p.backingFormat) }] : []), ...exts];
      expect(d.extensions).toEqual(wantExts);
      expect(d.featureNames).toEqual(v3 ? a.features.map(([type, bit, name]) => ({ type, bit, name })) : []);
      expect(hasExtendedL2(d.header)).toBe(extendedL2);
      // And encoding what was decoded gives the same bytes.
      expect(encodeHeader(d, FILE).equals(enc)).toBe(true);
    }), { numRuns: 500 });
  });

  it('refuses to encode a backing file name longer than 1023 bytes or extensions that do not fit', () => {
    expect(() => encodeHeader(parsed(baseHeader(), { backingFile: 'x'.repeat(1024) }), FILE)).toThrow(FormatError);
    expect(() => encodeHeader(parsed(baseHeader({ clusterBits: 9, size: 1 << 20, l1Size: 1, l1TableOffset: 512, refcountTableOffset: 1024 }),
      { extensions: [{ type: 0x1234, data: Buffer.alloc(500) }] }), FILE)).toThrow(FormatError);
  });
});

describe('validation: every bad field is a typed error naming the file', () => {
  const good = () => encodeHeader(parsed(baseHeader()), FILE);
  const cases: [string, (b: Buffer) => void, new (...a: never[]) => StrataError, RegExp][] = [
    ['bad magic', (b) => b.writeUInt32BE(0x514649fa, 0), FormatError, /magic/],
    ['version 1', (b) => b.writeUInt32BE(1, 4), UnsupportedFeatureError, /version 1/],
    ['version 4', (b) => b.writeUInt32BE(4, 4), UnsupportedFeatureError, /version 4/],
    ['cluster_bits 8', (b) => b.writeUInt32BE(8, 20), FormatError, /cluster_bits 8/],
    ['cluster_bits 22', (b) => b.writeUInt32BE(22, 20), FormatError, /cluster_bits 22/],
    ['virtual size 2^63', (b) => b.writeBigUInt64BE(1n << 63n, 24), CorruptImageError, /virtual size/],
    ['crypt_method 3', (b) => b.writeUInt32BE(3, 32), UnsupportedFeatureError, /encrypt/],
    ['l1_size past 32 MiB', (b) => b.writeUInt32BE(C.MAX_L1_SIZE_BYTES / 8 + 1, 36), FormatError, /l1_size/],
    ['l1_size too small', (b) => b.writeUInt32BE(1, 36), CorruptImageError, /L1 table is too small/],
    ['L1 table unaligned', (b) => b.writeBigUInt64BE(0x30200n, 40), CorruptImageError, /L1 table.*aligned/],
    ['L1 table at 0', (b) => b.writeBigUInt64BE(0n, 40), CorruptImageError, /L1 table.*header/],
    ['L1 table offset past 2^53', (b) => b.writeBigUInt64BE(1n << 60n, 40), CorruptImageError, /l1_table_offset/],
    ['refcount table unaligned', (b) => b.writeBigUInt64BE(0x10008n, 48), CorruptImageError, /refcount table.*aligned/],
    ['refcount table clusters 0', (b) => b.writeUInt32BE(0, 56), CorruptImageError, /refcount table is empty/],
    ['refcount table past 8 MiB', (b) => b.writeUInt32BE(129, 56), FormatError, /refcount table is too large/],
    ['nb_snapshots past 65536', (b) => b.writeUInt32BE(65537, 60), FormatError, /snapshot count/],
    ['snapshot table at 0', (b) => b.writeUInt32BE(1, 60), CorruptImageError, /snapshot table.*header/],
    ['refcount_order 7', (b) => b.writeUInt32BE(7, 96), FormatError, /refcount_order 7/],
    ['header_length 103', (b) => b.writeUInt32BE(103, 100), FormatError, /header_length/],
    ['header_length past the cluster', (b) => b.writeUInt32BE(65537, 100), FormatError, /header_length/],
    ['compression_type without its bit', (b) => { b[104] = 1; }, FormatError, /compression/],
    ['compression bit with deflate', (b) => b.writeBigUInt64BE(C.INCOMPAT_COMPRESSION, 72), FormatError, /compression/],
    ['unknown compression_type', (b) => { b[104] = 2; b.writeBigUInt64BE(C.INCOMPAT_COMPRESSION, 72); }, UnsupportedFeatureError, /compression type 2/],
    ['extended L2 with 8 KiB clusters', (b) => { b.writeUInt32BE(13, 20); b.writeBigUInt64BE(C.INCOMPAT_EXTL2, 72); b.writeBigUInt64BE(0x2000n, 48); b.writeBigUInt64BE(0x6000n, 40); b.writeUInt32BE(1 << 10, 36); }, FormatError, /extended L2/],
    ['backing name offset outside the cluster', (b) => { b.writeBigUInt64BE(0x10001n, 8); b.writeUInt32BE(4, 16); }, CorruptImageError, /backing file name offset/],
    ['backing name past the cluster', (b) => { b.writeBigUInt64BE(0xfff0n, 8); b.writeUInt32BE(17, 16); }, CorruptImageError, /backing file name is too long/],
    ['backing name over 1023 bytes', (b) => { b.writeBigUInt64BE(0x200n, 8); b.writeUInt32BE(1024, 16); }, CorruptImageError, /backing file name is too long/],
    ['extension longer than the cluster', (b) => { b.writeUInt32BE(0x1234, 112); b.writeUInt32BE(0xffffffff, 116); }, CorruptImageError, /extension/],
    ['bitmaps extension too short', (b) => { b.writeUInt32BE(C.EXT_BITMAPS, 112); b.writeUInt32BE(8, 116); }, CorruptImageError, /bitmaps extension/],
    // QEMU (qcow2_read_extensions): "Header extension too large" when an extension header
    // does not fit before the backing file name.
    ['an extension header straddling the backing file name', (b) => { b.writeBigUInt64BE(116n, 8); b.writeUInt32BE(4, 16); b.writeUInt32BE(0x1234, 112); }, CorruptImageError, /extension/],
  ];
  for (const [name, patch, cls, re] of cases) {
    it(name, () => {
      const b = good();
      patch(b);
      expectTyped(() => decodeHeader(b, FILE), cls, re);
    });
  }

  it('AES (crypt_method 1) and LUKS (2) decode: their data is read with the key given at open', () => {
    for (const m of [1, 2]) {
      const b = good();
      b.writeUInt32BE(m, 32);
      expect(decodeHeader(b, FILE).header.cryptMethod).toBe(m);
    }
  });

  it('a file shorter than the fixed fields', () => {
    const b = good();
    for (const n of [0, 3, 10, 50, 71]) expectTyped(() => decodeHeaderFields(b.subarray(0, n), FILE), FormatError, new RegExp(`only ${n} bytes`));
    for (const n of [72, 100, 103]) expectTyped(() => decodeHeaderFields(b.subarray(0, n), FILE), FormatError, /truncated/);
  });

  it('a header cluster cut short before the extensions end', () => {
    const b = good();
    expectTyped(() => decodeHeader(b.subarray(0, 115), FILE), CorruptImageError, /extension/);
  });
});

describe('incompatible features', () => {
  const withBits = (bits: bigint, exts: HeaderExtension[] = []) => decodeHeader(encodeHeader(parsed(baseHeader({ incompatibleFeatures: bits }), { extensions: exts }), FILE), FILE);

  it('known bits pass', () => {
    expect(() => checkIncompatibleFeatures(withBits(C.INCOMPAT_DIRTY | C.INCOMPAT_CORRUPT), FILE)).not.toThrow();
  });

  it('an unknown bit is named by its number, or by the feature name table', () => {
    expectTyped(() => checkIncompatibleFeatures(withBits(1n << 10n), FILE), UnsupportedFeatureError, /bit 10/);
    const e = expectTyped(() => checkIncompatibleFeatures(withBits((1n << 10n) | (1n << 63n), [featureTable([[0, 10, 'frobnication'], [1, 63, 'not this one']])]), FILE), UnsupportedFeatureError, /frobnication/);
    expect(e.message).toMatch(/bit 63/);
    expect(e.message).not.toMatch(/not this one/);
  });

  it('the external data file bit is known: the image opens (its data file is opened by the chain opener)', () => {
    const data: HeaderExtension = { type: C.EXT_DATA_FILE, data: Buffer.from('disk.data') };
    expect(() => checkIncompatibleFeatures(withBits(C.INCOMPAT_DATA_FILE, [data]), FILE)).not.toThrow();
  });

  // Names come from the image: a hostile one must not be able to break the one-line error.
  it('a feature name holding control characters does not break the message into lines', () => {
    let caught: unknown;
    try { checkIncompatibleFeatures(withBits(1n << 10n, [featureTable([[0, 10, 'evil\nname\r\x1b[2J']])]), FILE); } catch (e) { caught = e; }
    expect(caught).toBeInstanceOf(UnsupportedFeatureError);
    expect((caught as Error).message).not.toMatch(/[\r\n\x1b]/);
  });
});
