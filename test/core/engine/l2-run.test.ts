// The addon's l2RunEnd against a plain reading of the entries: where a run of host-contiguous
// standard L2 entries with the same flags ends, for random tables with breaks of every kind.
import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { native } from '../../../core/io/native';

function reference(t: Buffer, index: number, end: number, cs: number): number {
  const off = (i: number) => t.readBigUInt64BE(i * 8) & 0x00ffffffffffffffn;
  for (let k = index + 1; k < end; k++) {
    if (t[k * 8] !== t[(k - 1) * 8] || off(k) !== off(k - 1) + BigInt(cs)) return k;
  }
  return end;
}

describe('l2RunEnd (native)', () => {
  const n = native();
  it('is built into the addon', () => {
    expect(typeof n?.l2RunEnd).toBe('function');
  });

  it('ends runs where a plain reading of the entries does', () => {
    fc.assert(fc.property(
      fc.integer({ min: 9, max: 21 }),
      fc.integer({ min: 2, max: 600 }),
      fc.array(fc.record({ at: fc.nat(), kind: fc.constantFrom('offset', 'flags', 'reserved', 'carry') }), { maxLength: 6 }),
      fc.nat({ max: 0xffff }),
      (bits, entries, breaks, start) => {
        const cs = 2 ** bits;
        const t = Buffer.alloc(entries * 8);
        let host = BigInt(start + 1) * BigInt(cs) + (0xfffff000n * BigInt(cs)) / 4096n;
        for (let i = 0; i < entries; i++) {
          t.writeBigUInt64BE((host & 0x00ffffffffffffffn) | (1n << 63n), i * 8);
          host += BigInt(cs);
        }
        for (const b of breaks) {
          const i = b.at % entries;
          const v = t.readBigUInt64BE(i * 8);
          if (b.kind === 'offset') t.writeBigUInt64BE(v + BigInt(cs) * 3n, i * 8);
          else if (b.kind === 'flags') t.writeBigUInt64BE(v ^ (1n << 62n), i * 8);
          else if (b.kind === 'reserved') t.writeBigUInt64BE(v | (1n << 57n), i * 8);
          else t.writeBigUInt64BE(v + (1n << 32n), i * 8);
        }
        for (const index of [0, Math.floor(entries / 3), entries - 2]) {
          expect(n!.l2RunEnd!(t, index, entries, cs)).toBe(reference(t, index, entries, cs));
        }
      },
    ), { numRuns: 300, seed: 0x12e2 });
  });

  it('refuses arguments outside the table', () => {
    const t = Buffer.alloc(64);
    expect(() => n!.l2RunEnd!(t, 0, 9, 65536)).toThrow(/end/);
    expect(() => n!.l2RunEnd!(t, 3, 3, 65536)).toThrow(/end/);
    expect(() => n!.l2RunEnd!(t, -1, 4, 65536)).toThrow(/index/);
    expect(() => n!.l2RunEnd!(t, 0, 4, 100)).toThrow(/clusterSize/);
    expect(() => n!.l2RunEnd!('x' as unknown as Buffer, 0, 4, 65536)).toThrow(/table/);
  });
});
