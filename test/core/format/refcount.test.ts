// Refcount table entries and refcount block entries of every width (refcount_order 0..6):
// round trips, QEMU's bit order for sub-byte widths, limits and errors. Pure: no I/O.
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { CorruptImageError } from '../../../core/errors';
import {
  countNonZeroRefcounts, decodeReftableEntry, encodeReftableEntry, getRefcount, maxRefcount, refcountBlockEntries, setRefcount,
} from '../../../core/format/refcount';

const ORDERS = [0, 1, 2, 3, 4, 5, 6];

describe('refcount block entries', () => {
  it('maxRefcount and entries per block follow refcount_bits = 2^order', () => {
    expect(ORDERS.map(maxRefcount)).toEqual([1, 3, 15, 255, 65535, 0xffffffff, Number.MAX_SAFE_INTEGER]);
    expect(refcountBlockEntries(16, 4)).toBe(32768); // 64 KiB clusters, 16-bit refcounts
    expect(refcountBlockEntries(9, 0)).toBe(4096);
    expect(refcountBlockEntries(21, 6)).toBe(262144);
  });

  it('countNonZeroRefcounts counts what getRefcount reads as non-zero, every width, any prefix', () => {
    const arb = fc.record({
      order: fc.constantFrom(...ORDERS),
      bytes: fc.uint8Array({ minLength: 64, maxLength: 64 }).map((b) => b.map((x) => (x % 3 === 0 ? x : 0))), // mostly zeros
      cut: fc.double({ min: 0, max: 1, noNaN: true }),
    });
    fc.assert(fc.property(arb, ({ order, bytes, cut }) => {
      const block = Buffer.from(bytes);
      const entries = (8 * block.length) / 2 ** order;
      const n = Math.floor(cut * entries);
      let expected = 0;
      for (let i = 0; i < n; i++) if (getRefcount(block, i, order) !== 0) expected++;
      expect(countNonZeroRefcounts(block, order, n)).toBe(expected);
    }), { numRuns: 500 });
    // one set bit in the last entry's top byte, the first entry's lowest bit
    expect(countNonZeroRefcounts(Buffer.from([0, 0, 0, 0x80]), 4, 2)).toBe(1);
    expect(countNonZeroRefcounts(Buffer.from([0x01, 0, 0, 0]), 0, 1)).toBe(1);
    expect(countNonZeroRefcounts(Buffer.from([0x02, 0, 0, 0]), 0, 1)).toBe(0);
  });

  it('set then get, every width, without touching the neighbours', () => {
    const arb = fc.constantFrom(...ORDERS).chain((order) => fc.record({
      order: fc.constant(order),
      index: fc.integer({ min: 0, max: 8 * 512 / 2 ** order - 1 }),
      value: fc.integer({ min: 0, max: maxRefcount(order) }),
      fill: fc.constantFrom(0x00, 0xff, 0x5a),
    }));
    fc.assert(fc.property(arb, ({ order, index, value, fill }) => {
      const block = Buffer.alloc(512, fill);
      const before = Array.from({ length: 8 * 512 / 2 ** order }, (_, i) => getRefcount(block, i, order));
      setRefcount(block, index, order, value);
      expect(getRefcount(block, index, order)).toBe(value);
      for (const i of [index - 1, index + 1, 0, 8 * 512 / 2 ** order - 1]) {
        if (i >= 0 && i < before.length && i !== index) expect(getRefcount(block, i, order), `entry ${i}`).toBe(before[i]);
      }
    }), { numRuns: 3000 });
  });

  it("sub-byte widths pack from the least significant bit, as QEMU's get_refcount_ro0..2", () => {
    const b0 = Buffer.alloc(1);
    setRefcount(b0, 0, 0, 1);
    setRefcount(b0, 7, 0, 1);
    expect(b0[0]).toBe(0b1000_0001);
    const b1 = Buffer.alloc(1);
    setRefcount(b1, 1, 1, 3);
    expect(b1[0]).toBe(0b0000_1100);
    const b2 = Buffer.alloc(1);
    setRefcount(b2, 0, 2, 0xa);
    setRefcount(b2, 1, 2, 0x5);
    expect(b2[0]).toBe(0x5a);
  });

  it('wider entries are big endian', () => {
    const b = Buffer.alloc(16);
    setRefcount(b, 1, 4, 0x1234);
    expect(b.subarray(2, 4).toString('hex')).toBe('1234');
    setRefcount(b, 1, 5, 0x12345678);
    expect(b.subarray(4, 8).toString('hex')).toBe('12345678');
    setRefcount(b, 1, 6, 2 ** 40 + 7);
    expect(b.subarray(8, 16).toString('hex')).toBe('0000010000000007');
  });

  it('a 64-bit refcount past 2^53 reads as MAX_SAFE_INTEGER (a corruption signal), not a rounded number', () => {
    const b = Buffer.alloc(8);
    b.writeBigUInt64BE(2n ** 60n);
    expect(getRefcount(b, 0, 6)).toBe(Number.MAX_SAFE_INTEGER);
  });

  it('values that do not fit are refused', () => {
    for (const order of ORDERS.slice(0, 6)) {
      expect(() => setRefcount(Buffer.alloc(8), 0, order, maxRefcount(order) + 1)).toThrow(RangeError);
    }
    expect(() => setRefcount(Buffer.alloc(8), 0, 4, -1)).toThrow(RangeError);
  });
});

describe('refcount table entries', () => {
  it('round trip of cluster-aligned block offsets', () => {
    fc.assert(fc.property(fc.integer({ min: 0, max: 2 ** 44 - 1 }), (sectors) => {
      const off = sectors * 512;
      const t = Buffer.alloc(24, 0xee);
      encodeReftableEntry(t, 1, off);
      expect(t.subarray(0, 8).equals(Buffer.alloc(8, 0xee))).toBe(true);
      expect(t.subarray(16).equals(Buffer.alloc(8, 0xee))).toBe(true);
      expect(decodeReftableEntry(t, 1)).toEqual({ blockOffset: off, reserved: false });
    }), { numRuns: 2000 });
  });

  it('reserved bits 0-8 are reported', () => {
    const t = Buffer.alloc(8);
    t.writeBigUInt64BE(0x10000n | 0x100n);
    expect(decodeReftableEntry(t, 0)).toEqual({ blockOffset: 0x10000, reserved: true });
  });

  it('an offset past 2^53 is a typed error', () => {
    const t = Buffer.alloc(8);
    t.writeBigUInt64BE(1n << 60n);
    expect(() => decodeReftableEntry(t, 0)).toThrow(CorruptImageError);
  });
});
