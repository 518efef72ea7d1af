// The internal snapshot table: decoding what QEMU writes, encode/decode round trips, extra
// data (known fields and unknown bytes), and typed errors for hostile tables. Pure: no I/O.
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import * as C from '../../../core/format/constants';
import { CorruptImageError, StrataError } from '../../../core/errors';
import { decodeSnapshotTable, encodeSnapshotTable, snapshotEntrySize, type SnapshotEntry } from '../../../core/format/snapshot';

const FILE = 'disk.qcow2';

function hex(s: string): Buffer {
  return Buffer.from(s.replace(/\s+/g, ''), 'hex');
}

// qemu-img 7.2 `snapshot -c snap1` on a 1 MiB image with 4 KiB clusters: the last thing in the
// file, so the entry's padding to 8 bytes is missing (70 bytes, not 72).
const QEMU_ENTRY = hex(`
  00000000 00007000 00000001 00010005 6b022c77 0ccbecb8 00000000 00000000
  00000000 00000018 00000000 00000000 00000000 00100000 00000000 00000000
  31736e61 7031`);

/** Decodes from a buffer that is the whole rest of the file. */
function decodeAll(buf: Buffer, count: number, clusterBits = 12) {
  return decodeSnapshotTable(buf, count, clusterBits, async () => null, FILE);
}

function entry(over: Partial<SnapshotEntry> = {}): SnapshotEntry {
  return {
    l1TableOffset: 0x7000, l1Size: 1, id: '1', name: 'snap1', dateSec: 1_800_000_000, dateNsec: 5, vmClockNsec: 12_345_678_901n,
    vmStateSize: 0, diskSize: 1 << 20, icount: 0n, extraData: Buffer.alloc(0), ...over,
  };
}

async function expectCorrupt(p: Promise<unknown>, re: RegExp): Promise<void> {
  let caught: unknown;
  try { await p; } catch (e) { caught = e; }
  expect(caught).toBeInstanceOf(CorruptImageError);
  expect((caught as Error).message).toMatch(new RegExp(`^${FILE}: `));
  expect((caught as Error).message).toMatch(re);
}

describe('decoding what QEMU writes', () => {
  it('an entry with 24 bytes of extra data, unpadded at the end of the file', async () => {
    const { entries, tableSize } = await decodeAll(QEMU_ENTRY, 1);
    expect(tableSize).toBe(72);
    expect(entries).toHaveLength(1);
    const e = entries[0]!;
    expect(e).toMatchObject({
      l1TableOffset: 0x7000, l1Size: 1, id: '1', name: 'snap1', dateSec: 0x6b022c77, dateNsec: 0x0ccbecb8,
      vmClockNsec: 0n, vmStateSize: 0, diskSize: 1 << 20, icount: 0n,
    });
    expect(e.extraData).toHaveLength(24);
    // Re-encoded, it is the same bytes (QEMU does not pad the last entry either).
    expect(encodeSnapshotTable(entries).equals(QEMU_ENTRY)).toBe(true);
  });

  it('a v2-style entry without extra data: the 32-bit VM state size, no disk size, icount disabled', async () => {
    const b = Buffer.alloc(48);
    b.writeBigUInt64BE(0x10000n, 0);
    b.writeUInt32BE(2, 8);
    b.writeUInt16BE(1, 12);
    b.writeUInt16BE(3, 14);
    b.writeUInt32BE(4096, 32);
    b.write('7abc', 40);
    const { entries } = await decodeAll(b, 1, 16);
    expect(entries[0]).toMatchObject({ id: '7', name: 'abc', vmStateSize: 4096, diskSize: null, icount: -1n, l1Size: 2 });
  });

  it('the 64-bit VM state size in the extra data wins over the 32-bit field', async () => {
    const e = entry({ vmStateSize: 2 ** 40 + 3 });
    const enc = encodeSnapshotTable([e]);
    expect(enc.readUInt32BE(32)).toBe(0xffffffff);
    expect((await decodeAll(enc, 1)).entries[0]!.vmStateSize).toBe(2 ** 40 + 3);
  });
});

describe('round trips', () => {
  const entryArb = fc.record({
    l1TableOffset: fc.integer({ min: 0, max: 2 ** 30 }).map((c) => c * 4096),
    l1Size: fc.integer({ min: 0, max: C.MAX_L1_SIZE_BYTES / 8 }),
    id: fc.string({ maxLength: 12 }),
    name: fc.string({ maxLength: 40 }),
    dateSec: fc.integer({ min: 0, max: 0xffffffff }),
    dateNsec: fc.integer({ min: 0, max: 999_999_999 }),
    vmClockNsec: fc.bigInt({ min: 0n, max: 2n ** 64n - 1n }),
    vmStateSize: fc.integer({ min: 0, max: Number.MAX_SAFE_INTEGER }),
    diskSize: fc.integer({ min: 0, max: Number.MAX_SAFE_INTEGER }),
    icount: fc.bigInt({ min: 0n, max: 2n ** 63n - 1n }),
    // Extra data past the known 24 bytes belongs to future versions and must survive.
    extraData: fc.uint8Array({ maxLength: 64 }).map((tail) => Buffer.concat([Buffer.alloc(24), Buffer.from(tail)])),
  });

  it('encodeSnapshotTable then decodeSnapshotTable gives back every entry', async () => {
    await fc.assert(fc.asyncProperty(fc.array(entryArb, { maxLength: 8 }), async (entries) => {
      const enc = encodeSnapshotTable(entries);
      const padded = entries.reduce((n, e) => n + snapshotEntrySize(e), 0);
      // Entries are padded to 8 bytes, except the last one (as QEMU writes the table).
      expect(enc.length).toBeLessThanOrEqual(padded);
      expect(enc.length).toBeGreaterThan(padded - 8);
      const { entries: dec, tableSize } = await decodeAll(enc, entries.length);
      expect(tableSize).toBe(padded);
      dec.forEach((d, i) => {
        const e = entries[i]!;
        const { extraData, ...fields } = d;
        const { extraData: want, ...wantFields } = e;
        expect(fields).toEqual(wantFields);
        expect(extraData.subarray(24).equals(want.subarray(24))).toBe(true);
      });
      expect(encodeSnapshotTable(dec).equals(enc)).toBe(true);
    }), { numRuns: 300 });
  });

  // The spec: icount "Set to -1 if icount was disabled"; SnapshotEntry.icount: "-1n when
  // disabled or not recorded". Decoding reads the field unsigned.
  it('icount -1 (disabled) decodes as -1n', async () => {
    const { entries } = await decodeAll(encodeSnapshotTable([entry({ icount: -1n })]), 1);
    expect(entries[0]!.icount).toBe(-1n);
  });

  // A snapshot QEMU took with icount disabled: its table must survive decode and re-encode
  // (every snapshot create/delete rewrites the whole table).
  it('a decoded entry with icount disabled can be encoded again', async () => {
    const raw = Buffer.from(QEMU_ENTRY);
    raw.writeBigUInt64BE(0xffffffffffffffffn, 40 + 16);
    const { entries } = await decodeAll(raw, 1);
    let enc: Buffer | undefined;
    let caught: unknown;
    try { enc = encodeSnapshotTable(entries); } catch (e) { caught = e; }
    expect(caught, String((caught as Error)?.message)).toBeUndefined();
    expect(enc!.subarray(0, raw.length).equals(raw)).toBe(true);
  });
});

describe('hostile tables: typed errors naming the file', () => {
  const one = () => encodeSnapshotTable([entry()]);

  it('extra data larger than QEMU allows (1 KiB)', async () => {
    const b = one();
    b.writeUInt32BE(1025, 36);
    await expectCorrupt(decodeAll(b, 1), /extra data/);
    b.writeUInt32BE(0xffffffff, 36);
    await expectCorrupt(decodeAll(b, 1), /extra data/);
  });

  it('an entry running past the end of the file', async () => {
    const b = one();
    b.writeUInt16BE(0xffff, 14);
    await expectCorrupt(decodeAll(b, 1), /past the end/);
    await expectCorrupt(decodeAll(b.subarray(0, 39), 1), /past the end/);
    await expectCorrupt(decodeAll(one(), 2), /past the end/);
  });

  it('a table larger than QEMU allows (64 MiB) is refused before reading it', async () => {
    const asked: number[] = [];
    const zeros = Buffer.alloc(C.SNAPSHOT_ENTRY_FIXED_SIZE);
    // Every entry is 40 zero bytes; a "file" that always has more.
    await expectCorrupt(decodeSnapshotTable(zeros, C.MAX_SNAPSHOTS, 12, async (need) => {
      asked.push(need);
      return need > 1 << 20 ? null : Buffer.alloc(Math.min(1 << 20, 2 * need));
    }, FILE), /past the end/);
    expect(Math.max(...asked)).toBeLessThanOrEqual(C.MAX_SNAPSHOTS_SIZE);
    const big = Buffer.alloc(C.SNAPSHOT_ENTRY_FIXED_SIZE);
    big.writeUInt32BE(1024, 36);
    big.writeUInt16BE(0xffff, 12);
    big.writeUInt16BE(0xffff, 14);
    // 65536 entries of 132 KiB would be 8 GiB: refused once past 64 MiB, without asking for more.
    const asked2: number[] = [];
    await expectCorrupt(decodeSnapshotTable(big, C.MAX_SNAPSHOTS, 12, async (need) => {
      asked2.push(need);
      const b = Buffer.alloc(Math.min(C.MAX_SNAPSHOTS_SIZE, 2 * need));
      for (let o = 0; o + 40 <= b.length; o += 40 + 1024 + 0x1fffe + 2) big.copy(b, o);
      return b;
    }, FILE), /Snapshot table is too big/);
    expect(Math.max(...asked2)).toBeLessThanOrEqual(C.MAX_SNAPSHOTS_SIZE);
    // iotest 261: the limit holds even when the buffer already holds the whole table.
    const entry = 40 + 1024 + 0x1fffe + 2;
    const whole = Buffer.alloc(C.MAX_SNAPSHOTS_SIZE + 2 * entry);
    let n = 0;
    for (let o = 0; o + 40 <= whole.length; o += entry, n++) big.copy(whole, o);
    await expectCorrupt(decodeSnapshotTable(whole, n, 16, async () => null, FILE), /Snapshot table is too big/);
  });

  it('an L1 table offset that is unaligned or past 2^53, or an L1 table larger than 32 MiB', async () => {
    const b = one();
    b.writeBigUInt64BE(0x7200n, 0);
    await expectCorrupt(decodeAll(b, 1), /not cluster-aligned/);
    b.writeBigUInt64BE(1n << 60n, 0);
    await expectCorrupt(decodeAll(b, 1), /out of range/);
    const c = one();
    c.writeUInt32BE(C.MAX_L1_SIZE_BYTES / 8 + 1, 8);
    await expectCorrupt(decodeAll(c, 1), /too large/);
  });

  it('VM state and disk sizes past 2^53 in the extra data', async () => {
    const b = one();
    b.writeBigUInt64BE(1n << 60n, 40);
    await expectCorrupt(decodeAll(b, 1), /VM state size/);
    const c = one();
    c.writeBigUInt64BE(1n << 60n, 48);
    await expectCorrupt(decodeAll(c, 1), /disk size/);
  });

  it('any error at all is a StrataError', async () => {
    await fc.assert(fc.asyncProperty(fc.uint8Array({ maxLength: 600 }), fc.integer({ min: 0, max: 20 }), async (raw, count) => {
      try {
        await decodeAll(Buffer.from(raw), count);
      } catch (e) {
        if (!(e instanceof StrataError)) throw e;
        expect(e.message).toContain(FILE);
      }
    }), { numRuns: 1000 });
  });
});

describe('IDs and names are C strings (iotest 261)', () => {
  it('end at their first NUL byte, as QEMU reads them', async () => {
    const e = entry({ id: '7', name: 'ab' });
    const buf = encodeSnapshotTable([e]);
    // Grow the stored ID and name with NUL bytes and garbage after them (sizes 3 and 4).
    const fixed = buf.subarray(0, C.SNAPSHOT_ENTRY_FIXED_SIZE);
    const extra = buf.subarray(C.SNAPSHOT_ENTRY_FIXED_SIZE, C.SNAPSHOT_ENTRY_FIXED_SIZE + fixed.readUInt32BE(36));
    const grown = Buffer.concat([fixed, extra, Buffer.from('7\0x'), Buffer.from('ab\0y')]);
    grown.writeUInt16BE(3, 12);
    grown.writeUInt16BE(4, 14);
    const { entries } = await decodeAll(grown, 1);
    expect([entries[0]!.id, entries[0]!.name]).toEqual(['7', 'ab']);
  });
});
