// The internal snapshot table: variable-length entries, decoded from and encoded to one buffer.
import * as C from './constants';
import { CorruptImageError, SnapshotL1Error } from '../errors';
import { readU64 } from './u64';

export interface SnapshotEntry {
  l1TableOffset: number;
  l1Size: number;
  id: string;
  name: string;
  dateSec: number;
  dateNsec: number;
  vmClockNsec: bigint;
  vmStateSize: number;
  /** Virtual disk size when the snapshot was taken (extra data), null when not recorded. */
  diskSize: number | null;
  /** Record/replay instruction count; -1n when disabled or not recorded. */
  icount: bigint;
  /** The entry's extra data as stored, preserved on rewrite (known fields re-encoded over it). */
  extraData: Buffer;
}

/** Size of one encoded entry (including padding to 8 bytes). */
export function snapshotEntrySize(e: SnapshotEntry): number {
  const raw = C.SNAPSHOT_ENTRY_FIXED_SIZE + extraDataFor(e).length + Buffer.byteLength(e.id) + Buffer.byteLength(e.name);
  return Math.ceil(raw / 8) * 8;
}

/**
 * Decodes `count` entries from `buf` (which starts at snapshots_offset). `more(n)` is asked
 * for a larger buffer when an entry runs past the end of the current one; it returns the
 * longer buffer or null at end of file.
 */
export async function decodeSnapshotTable(
  first: Buffer, count: number, clusterBits: number, more: (need: number) => Promise<Buffer | null>, file?: string,
): Promise<{ entries: SnapshotEntry[]; tableSize: number }> {
  let buf = first;
  const entries: SnapshotEntry[] = [];
  let off = 0;
  // QEMU's limit on the table (QCOW_MAX_SNAPSHOTS_SIZE), checked before an entry is read, so
  // nothing past it is ever asked for.
  let i = 0;
  const tooBig = () => new CorruptImageError(`Snapshot table is too big (more than ${C.MAX_SNAPSHOTS_SIZE} bytes; \`qemu-img check -r all\` drops the snapshots past the limit)`, file)
    .asQemu(`Could not open '${file}': Snapshot table is too big\nYou can force-remove all ${count - i} overhanging snapshots with qemu-img check -r all`);
  const need = async (n: number) => {
    if (off + n > C.MAX_SNAPSHOTS_SIZE) throw tooBig();
    if (off + n <= buf.length) return;
    const next = await more(off + n);
    if (!next || next.length < off + n) throw new CorruptImageError('snapshot table lies past the end of the file', file);
    buf = next;
  };
  for (; i < count; i++) {
    await need(C.SNAPSHOT_ENTRY_FIXED_SIZE);
    const l1TableOffset = readU64(buf, off, `snapshot ${i} L1 table offset`, file);
    const l1Size = buf.readUInt32BE(off + 8);
    const idSize = buf.readUInt16BE(off + 12);
    const nameSize = buf.readUInt16BE(off + 14);
    const dateSec = buf.readUInt32BE(off + 16);
    const dateNsec = buf.readUInt32BE(off + 20);
    const vmClockNsec = buf.readBigUInt64BE(off + 24);
    let vmStateSize = buf.readUInt32BE(off + 32);
    const extraSize = buf.readUInt32BE(off + 36);
    if (extraSize > C.MAX_SNAPSHOT_EXTRA_DATA) {
      throw new CorruptImageError(`Too much extra metadata in snapshot table entry ${i} (${extraSize} bytes of extra data, at most ${C.MAX_SNAPSHOT_EXTRA_DATA}; \`check -r all\` drops it)`, file)
        .asQemu(`Could not open '${file}': Too much extra metadata in snapshot table entry ${i}\nYou can force-remove this extra metadata with qemu-img check -r all`);
    }
    const unpadded = C.SNAPSHOT_ENTRY_FIXED_SIZE + extraSize + idSize + nameSize;
    // QEMU pads entries to 8 bytes but the file may end before the last entry's padding.
    await need(unpadded);
    const total = Math.ceil(unpadded / 8) * 8;
    const x = off + C.SNAPSHOT_ENTRY_FIXED_SIZE;
    const extraData = Buffer.from(buf.subarray(x, x + extraSize));
    let diskSize: number | null = null;
    let icount = -1n;
    if (extraSize >= 8) vmStateSize = readU64(extraData, 0, `snapshot ${i} VM state size`, file);
    if (extraSize >= 16) diskSize = readU64(extraData, 8, `snapshot ${i} disk size`, file);
    // Signed: -1 means "icount disabled".
    if (extraSize >= 24) icount = extraData.readBigInt64BE(16);
    const id = cString(buf.toString('utf8', x + extraSize, x + extraSize + idSize));
    const name = cString(buf.toString('utf8', x + extraSize + idSize, x + extraSize + idSize + nameSize));
    if (l1TableOffset % 2 ** clusterBits !== 0) throw new SnapshotL1Error(`snapshot ${id || i} L1 table offset ${l1TableOffset} is not cluster-aligned`, file, { id, name }, 'offset');
    if (l1Size > C.MAX_L1_SIZE_BYTES / 8) throw new SnapshotL1Error(`snapshot ${id || i} L1 table is too large (${l1Size} entries)`, file, { id, name }, 'size');
    entries.push({ l1TableOffset, l1Size, id, name, dateSec, dateNsec, vmClockNsec, vmStateSize, diskSize, icount, extraData });
    off += total;
  }
  return { entries, tableSize: off };
}

/** An ID or name as QEMU holds it: a C string, ending at its first NUL byte. */
export function cString(s: string): string {
  const nul = s.indexOf('\0');
  return nul < 0 ? s : s.slice(0, nul);
}

function extraDataFor(e: SnapshotEntry): Buffer {
  const len = Math.max(e.extraData.length, C.SNAPSHOT_EXTRA_DATA_SIZE);
  const x = Buffer.alloc(len);
  e.extraData.copy(x);
  x.writeBigUInt64BE(BigInt(e.vmStateSize), 0);
  x.writeBigUInt64BE(BigInt(e.diskSize ?? 0), 8);
  x.writeBigInt64BE(e.icount, 16);
  return x;
}

/** The table as QEMU writes it: entries padded to 8 bytes, except that the last one is not. */
export function encodeSnapshotTable(entries: SnapshotEntry[]): Buffer {
  const padded = entries.reduce((n, e) => n + snapshotEntrySize(e), 0);
  const last = entries[entries.length - 1];
  const size = last ? padded - snapshotEntrySize(last) + C.SNAPSHOT_ENTRY_FIXED_SIZE + extraDataFor(last).length + Buffer.byteLength(last.id) + Buffer.byteLength(last.name) : 0;
  const out = Buffer.alloc(size);
  let off = 0;
  for (const e of entries) {
    const extra = extraDataFor(e);
    const id = Buffer.from(e.id, 'utf8');
    const name = Buffer.from(e.name, 'utf8');
    out.writeBigUInt64BE(BigInt(e.l1TableOffset), off);
    out.writeUInt32BE(e.l1Size, off + 8);
    out.writeUInt16BE(id.length, off + 12);
    out.writeUInt16BE(name.length, off + 14);
    out.writeUInt32BE(e.dateSec, off + 16);
    out.writeUInt32BE(e.dateNsec, off + 20);
    out.writeBigUInt64BE(e.vmClockNsec, off + 24);
    out.writeUInt32BE(Math.min(e.vmStateSize, 0xffffffff), off + 32);
    out.writeUInt32BE(extra.length, off + 36);
    let p = off + C.SNAPSHOT_ENTRY_FIXED_SIZE;
    extra.copy(out, p); p += extra.length;
    id.copy(out, p); p += id.length;
    name.copy(out, p);
    off += snapshotEntrySize(e);
    if (off > size) break;
  }
  return out;
}
