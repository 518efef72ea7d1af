// L1 and L2 entries (standard and extended), subcluster states and compressed descriptors:
// encode/decode round trips, the bit layouts of the spec and of what QEMU writes, and the
// errors for reserved bits and misaligned offsets. Pure: no I/O.
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import * as C from '../../../core/format/constants';
import { CorruptImageError, StrataError } from '../../../core/errors';
import {
  compressedRange, decodeL1Entry, decodeL2Bitmap, decodeL2Entry, encodeL1Entry, encodeL2Entry, subclusterState,
  type L2Entry, type L2Geometry, type SubclusterState,
} from '../../../core/format/l2';

const u64 = (v: bigint) => { const b = Buffer.alloc(8); b.writeBigUInt64BE(v); return b; };
const u128 = (entry: bigint, bitmap: bigint) => Buffer.concat([u64(entry), u64(bitmap)]);
const std = (clusterBits: number): L2Geometry => ({ clusterBits, extendedL2: false });
const ext = (clusterBits: number): L2Geometry => ({ clusterBits, extendedL2: true });

/** Bits of the compressed descriptor's offset field: x = 62 - (cluster_bits - 8). */
const offsetBits = (clusterBits: number) => 62 - (clusterBits - 8);

describe('L1 entries', () => {
  it('round trip: offset (bits 9-55) and the copied flag', () => {
    fc.assert(fc.property(fc.bigInt({ min: 0n, max: (1n << 47n) - 1n }), fc.boolean(), (sectors, copied) => {
      const l2Offset = Number(sectors << 9n);
      const t = Buffer.alloc(16, 0xee);
      encodeL1Entry(t, 1, l2Offset, copied);
      expect(t.subarray(0, 8).equals(Buffer.alloc(8, 0xee)), 'the neighbour is untouched').toBe(true);
      expect(t.readBigUInt64BE(8)).toBe(BigInt(l2Offset) | (copied ? C.QCOW_OFLAG_COPIED : 0n));
      expect(decodeL1Entry(t, 1)).toEqual({ l2Offset, copied, reserved: false });
    }), { numRuns: 2000 });
  });

  it('reserved bits 0-8 and 56-62 are reported, and do not leak into the offset', () => {
    for (const bit of [0, 1, 8, 56, 60, 62]) {
      const d = decodeL1Entry(u64((1n << BigInt(bit)) | 0x50000n), 0);
      expect(d, `bit ${bit}`).toEqual({ l2Offset: 0x50000, copied: false, reserved: true });
    }
  });
});

describe('standard L2 entries', () => {
  it('what QEMU writes: normal with the copied flag, zero, preallocated zero, compressed', () => {
    const g = std(16);
    expect(decodeL2Entry(u64(0x8000000000050000n), 0, g)).toEqual({ kind: 'normal', hostOffset: 0x50000, copied: true });
    expect(decodeL2Entry(u64(0x0000000000050000n), 0, g)).toEqual({ kind: 'normal', hostOffset: 0x50000, copied: false });
    expect(decodeL2Entry(u64(1n), 0, g)).toEqual({ kind: 'zero', hostOffset: 0, copied: false });
    expect(decodeL2Entry(u64(0x8000000000050001n), 0, g)).toEqual({ kind: 'zero', hostOffset: 0x50000, copied: true });
    expect(decodeL2Entry(u64(0n), 0, g)).toEqual({ kind: 'unallocated' });
    // Offset 0 with the copied flag: unallocated (only external data files make it data).
    expect(decodeL2Entry(u64(C.QCOW_OFLAG_COPIED), 0, g)).toEqual({ kind: 'unallocated' });
    // With an external data file it is guest cluster 0's data at offset 0 of the data file;
    // without the copied flag it stays unallocated, with the zero flag a plain zero cluster.
    const ext = { ...g, externalData: true };
    expect(decodeL2Entry(u64(C.QCOW_OFLAG_COPIED), 0, ext)).toEqual({ kind: 'normal', hostOffset: 0, copied: true });
    expect(decodeL2Entry(u64(0n), 0, ext)).toEqual({ kind: 'unallocated' });
    expect(decodeL2Entry(u64(C.QCOW_OFLAG_COPIED | 1n), 0, ext)).toEqual({ kind: 'zero', hostOffset: 0, copied: true });
    // qemu-io `write -c` into a 4 KiB-cluster image: two compressed clusters packed in one host cluster.
    const t = Buffer.from('4000000000005000' + '4000000000005016', 'hex');
    expect(decodeL2Entry(t, 0, std(12))).toEqual({ kind: 'compressed', hostOffset: 0x5000, sectors: 1 });
    expect(decodeL2Entry(t, 1, std(12))).toEqual({ kind: 'compressed', hostOffset: 0x5016, sectors: 1 });
  });

  it('compressed descriptor layout for every cluster size: offset in bits 0..x-1, additional sectors in x..61', () => {
    for (let cb = 9; cb <= 21; cb++) {
      const x = BigInt(offsetBits(cb));
      const maxSectors = 2 ** (cb - 8);
      const e = decodeL2Entry(u64(C.QCOW_OFLAG_COMPRESSED | (BigInt(maxSectors - 1) << x) | 0x12345n), 0, std(cb));
      expect(e, `cluster_bits ${cb}`).toEqual({ kind: 'compressed', hostOffset: 0x12345, sectors: maxSectors });
    }
  });

  it('round trip of every kind for every cluster size', () => {
    const arb = fc.integer({ min: 9, max: 21 }).chain((cb) => {
      const maxCompressed = 2 ** Math.min(offsetBits(cb), 53);
      return fc.tuple(fc.constant(cb), fc.oneof(
        fc.constant<L2Entry>({ kind: 'unallocated' }),
        fc.record({ kind: fc.constant('normal' as const), hostOffset: fc.integer({ min: 1, max: 2 ** (56 - cb) - 1 }).map((c) => c * 2 ** cb), copied: fc.boolean() }),
        fc.record({ kind: fc.constant('zero' as const), hostOffset: fc.integer({ min: 0, max: 2 ** (56 - cb) - 1 }).map((c) => c * 2 ** cb), copied: fc.boolean() }),
        fc.record({ kind: fc.constant('compressed' as const), hostOffset: fc.integer({ min: 0, max: maxCompressed - 1 }), sectors: fc.integer({ min: 1, max: 2 ** (cb - 8) }) }),
      ));
    });
    fc.assert(fc.property(arb, ([cb, e]) => {
      const t = Buffer.alloc(24, 0xee);
      encodeL2Entry(t, 1, e, std(cb));
      expect(t.subarray(0, 8).equals(Buffer.alloc(8, 0xee))).toBe(true);
      expect(t.subarray(16).equals(Buffer.alloc(8, 0xee))).toBe(true);
      expect(decodeL2Entry(t, 1, std(cb))).toEqual(e);
    }), { numRuns: 3000 });
  });

  it('reserved bits 1-8 and 56-61 are a typed error saying where', () => {
    for (const bit of [1, 2, 8, 56, 59, 61]) {
      let caught: unknown;
      try { decodeL2Entry(u64((1n << BigInt(bit)) | 0x50000n), 0, std(16), () => 'of the L2 table at 0x40000'); } catch (e) { caught = e; }
      expect(caught, `bit ${bit}`).toBeInstanceOf(CorruptImageError);
      expect((caught as Error).message).toMatch(/reserved bits/);
      expect((caught as Error).message).toContain('of the L2 table at 0x40000');
    }
  });

  it('a host offset not aligned to the cluster size is a typed error', () => {
    for (const off of [0x200n, 0x50200n, 0xfe00n]) {
      expect(() => decodeL2Entry(u64(off), 0, std(16))).toThrow(CorruptImageError);
      expect(() => decodeL2Entry(u64(off | 1n), 0, std(16))).toThrow(CorruptImageError);
    }
    expect(() => decodeL2Entry(u64(0x200n), 0, std(9))).not.toThrow();
    // Past 4 GiB: the high word never makes an offset misaligned, the low word decides.
    expect(() => decodeL2Entry(u64(0x1_0000_0200n), 0, std(16))).toThrow(CorruptImageError);
    expect(() => decodeL2Entry(u64(0x3_0001_0000n), 0, std(16))).not.toThrow();
    expect(() => decodeL2Entry(u64(0x1_0010_0000n), 0, std(21))).toThrow(CorruptImageError);
    expect(decodeL2Entry(u64(0x1_0020_0000n), 0, std(21))).toMatchObject({ kind: 'normal', hostOffset: 0x1_0020_0000 });
  });

  // DESIGN.md: "64-bit on-disk values are read once and converted with a guard that rejects
  // values past Number.MAX_SAFE_INTEGER with a typed error". With 512-byte clusters the
  // compressed offset field has 61 bits; past 2^53 it cannot be held in a number exactly.
  it('a compressed host offset past 2^53 is a typed error, not a rounded number', () => {
    const raw = C.QCOW_OFLAG_COMPRESSED | ((1n << 60n) + 0x1235n); // offset field of cluster_bits 9 is 61 bits
    let result: unknown;
    try { result = decodeL2Entry(u64(raw), 0, std(9)); } catch (e) { result = e; }
    expect(result, `decoded as ${JSON.stringify(result)}`).toBeInstanceOf(StrataError);
  });
});

describe('extended L2 entries', () => {
  it('the bitmap: bits 32-63 (first word) read as zero, bits 0-31 (second word) allocated', () => {
    const t = u128(0x80000000000a0000n, 0x0000ff00_000000ffn);
    expect(decodeL2Bitmap(t, 0)).toEqual({ zero: 0x0000ff00, alloc: 0x000000ff });
    expect(decodeL2Entry(t, 0, ext(16))).toEqual({ kind: 'normal', hostOffset: 0xa0000, copied: true });
  });

  it('bit 0 is not a zero flag with extended L2 (the bitmap says what reads as zero)', () => {
    expect(decodeL2Entry(u128(1n, 0n), 0, ext(16))).toEqual({ kind: 'unallocated' });
  });

  it('round trip with the bitmap, entries being 16 bytes', () => {
    const arb = fc.tuple(
      fc.integer({ min: 14, max: 21 }),
      fc.integer({ min: 0, max: 2 ** 20 }),
      fc.boolean(),
      fc.integer({ min: 0, max: 0xffffffff }),
      fc.integer({ min: 0, max: 0xffffffff }),
    );
    fc.assert(fc.property(arb, ([cb, cluster, copied, alloc, zero]) => {
      const g = ext(cb);
      const t = Buffer.alloc(48, 0xee);
      const e: L2Entry = cluster ? { kind: 'normal', hostOffset: cluster * 2 ** cb, copied } : { kind: 'unallocated' };
      encodeL2Entry(t, 1, e, g, { alloc, zero });
      expect(t.subarray(0, 16).equals(Buffer.alloc(16, 0xee))).toBe(true);
      expect(t.subarray(32).equals(Buffer.alloc(16, 0xee))).toBe(true);
      expect(decodeL2Entry(t, 1, g)).toEqual(e);
      expect(decodeL2Bitmap(t, 1)).toEqual({ alloc, zero });
    }), { numRuns: 1000 });
  });

  it('zero entries do not exist with extended L2 and are refused by the encoder', () => {
    expect(() => encodeL2Entry(Buffer.alloc(16), 0, { kind: 'zero', hostOffset: 0, copied: false }, ext(16))).toThrow();
  });
});

describe('subcluster states (QEMU qcow2_get_subcluster_type)', () => {
  const normal: L2Entry = { kind: 'normal', hostOffset: 0x50000, copied: true };
  const unalloc: L2Entry = { kind: 'unallocated' };
  const cases: [string, L2Entry, { alloc: number; zero: number } | null, number, SubclusterState][] = [
    ['standard normal', normal, null, 0, 'normal'],
    ['standard unallocated', unalloc, null, 0, 'unallocated-plain'],
    ['standard zero', { kind: 'zero', hostOffset: 0, copied: false }, null, 0, 'zero-plain'],
    ['standard preallocated zero', { kind: 'zero', hostOffset: 0x50000, copied: false }, null, 0, 'zero-alloc'],
    ['standard compressed', { kind: 'compressed', hostOffset: 0x50010, sectors: 2 }, null, 0, 'compressed'],
    ['normal, allocated bit', normal, { alloc: 1 << 3, zero: 0 }, 3, 'normal'],
    ['normal, zero bit', normal, { alloc: 0, zero: 1 << 3 }, 3, 'zero-alloc'],
    ['normal, neither bit', normal, { alloc: 1, zero: 0 }, 3, 'unallocated-alloc'],
    ['normal, both bits of one subcluster', normal, { alloc: 1 << 3, zero: 1 << 3 }, 3, 'invalid'],
    ['normal, both bits on another subcluster taint all', normal, { alloc: 1 << 5, zero: 1 << 5 }, 3, 'invalid'],
    ['normal, bit 31', normal, { alloc: 0x80000000, zero: 0 }, 31, 'normal'],
    ['unallocated, zero bit', unalloc, { alloc: 0, zero: 1 << 7 }, 7, 'zero-plain'],
    ['unallocated, no bit', unalloc, { alloc: 0, zero: 0 }, 7, 'unallocated-plain'],
    ['unallocated, any allocated bit', unalloc, { alloc: 1 << 30, zero: 0 }, 7, 'invalid'],
    ['compressed ignores the bitmap', { kind: 'compressed', hostOffset: 0x50010, sectors: 2 }, { alloc: 0, zero: 0 }, 0, 'compressed'],
  ];
  for (const [name, e, bitmap, sc, want] of cases) {
    it(name, () => expect(subclusterState(e, bitmap, sc)).toBe(want));
  }
});

describe('compressed ranges', () => {
  it('run from the offset to the end of its last sector', () => {
    expect(compressedRange(0x5000, 1)).toEqual({ start: 0x5000, end: 0x5200 });
    expect(compressedRange(0x5016, 1)).toEqual({ start: 0x5016, end: 0x5200 });
    expect(compressedRange(0x51ff, 2)).toEqual({ start: 0x51ff, end: 0x5400 });
  });

  it('are never empty and span at most `sectors` sectors', () => {
    fc.assert(fc.property(fc.integer({ min: 0, max: 2 ** 52 }), fc.integer({ min: 1, max: 8192 }), (off, sectors) => {
      const r = compressedRange(off, sectors);
      expect(r.start).toBe(off);
      expect(r.end).toBeGreaterThan(r.start);
      expect(r.end - r.start).toBeLessThanOrEqual(sectors * 512);
      expect(r.end % 512).toBe(0);
    }));
  });
});
