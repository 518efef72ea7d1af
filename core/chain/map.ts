// `map`: allocation through the chain, adjacent runs merged exactly as qemu-img map merges them.
import type { DiskImage } from '../engine/image';
import { UnsupportedFeatureError } from '../errors';
import { chainBlockStatus } from './block-status';
import { Qcow2Image } from '../engine/qcow2';

export interface MapEntry {
  start: number;
  length: number;
  depth: number;
  present: boolean;
  zero: boolean;
  data: boolean;
  offset?: number;
  /** The file the offset refers to (only with an offset). */
  filename?: string;
}

function mergeable(a: MapEntry, b: MapEntry): boolean {
  if (a.length === 0) return false;
  if (a.zero !== b.zero || a.data !== b.data || a.depth !== b.depth || a.present !== b.present) return false;
  if ((a.filename === undefined) !== (b.filename === undefined) || a.filename !== b.filename) return false;
  if ((a.offset === undefined) !== (b.offset === undefined)) return false;
  if (a.offset !== undefined && a.offset + a.length !== b.offset) return false;
  return true;
}

/** Yields merged map entries for the whole image (or [start, end)). */
export async function* mapImage(top: DiskImage, start = 0, end = top.virtualSize, signal?: AbortSignal): AsyncGenerator<MapEntry> {
  let cur: MapEntry | null = null;
  let pos = start;
  while (pos < end) {
    signal?.throwIfAborted();
    const st = await chainBlockStatus(top, pos, Math.min(1 << 30, end - pos));
    const next: MapEntry = { start: pos, length: st.length, depth: st.depth, present: st.present, zero: st.zero, data: st.data };
    if (st.offset !== null) {
      next.offset = st.offset;
      // Offsets of an image with an external data file are in the data file (QEMU's *file).
      // The file holding the data; through a test driver (blkdebug:), that driver's name for it.
      next.filename = st.image instanceof Qcow2Image && st.image.hasDataFile ? st.image.dataFile.path : st.image.displayName ?? st.image.filename;
    }
    pos += st.length;
    if (cur && mergeable(cur, next)) { cur.length += next.length; continue; }
    if (cur) yield cur;
    cur = next;
  }
  if (cur) yield cur;
}

/** One JSON line as qemu-img prints it (without the separator). */
export function mapEntryJson(e: MapEntry): string {
  let s = `{ "start": ${e.start}, "length": ${e.length}, "depth": ${e.depth}, "present": ${e.present}, "zero": ${e.zero}, "data": ${e.data}`;
  if (e.offset !== undefined) s += `, "offset": ${e.offset}`;
  return s + '}';
}

const hex = (n: number) => (n === 0 ? '0' : '0x' + n.toString(16));

/** Human output: like qemu-img, only data runs are listed, and zero/unallocated runs coalesce. */
export async function formatMapHuman(top: DiskImage, entries: AsyncIterable<MapEntry>, out: (s: string) => void): Promise<void> {
  out(`${'Offset'.padEnd(16)}${'Length'.padEnd(16)}${'Mapped to'.padEnd(16)}File\n`);
  let cur: MapEntry | null = null;
  const flush = (e: MapEntry) => {
    if (e.data && e.offset === undefined) {
      throw new UnsupportedFeatureError('the human map format cannot show compressed or encrypted clusters (they have no plain host offset); use --output=json', top.filename)
        .asQemu('File contains external, encrypted or compressed clusters.');
    }
    if (e.data && !e.zero) out(`${hex(e.start).padEnd(16)}${hex(e.length).padEnd(16)}${hex(e.offset ?? 0).padEnd(16)}${e.filename ?? ''}\n`);
  };
  for await (const raw of entries) {
    // The human format ignores the difference between unallocated, zero and zero+data.
    const next = { ...raw };
    if (!next.data || next.zero) { next.data = false; next.zero = true; }
    if (cur && mergeable(cur, next)) { cur.length += next.length; continue; }
    if (cur) flush(cur);
    cur = next;
  }
  if (cur) flush(cur);
}
