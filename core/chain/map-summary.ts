// `map --summary N`: for each layer of a chain, N equal buckets across the virtual disk with
// the bytes of data, zero, unallocated and compressed clusters each holds — what an allocation
// picture needs. Computed from each layer's own block status, run by run: nothing is
// materialised per cluster, so a 1 TiB image costs its L2 tables and nothing more.
import type { DiskImage, LayerStatus } from '../engine/image';
import { chainOf } from './open';

export type AllocationKind = 'data' | 'zero' | 'unallocated' | 'compressed';

export interface LayerSummary {
  filename: string;
  format: string;
  /** 0 = the image itself, 1 = its backing file, ... */
  depth: number;
  virtualSize: number;
  /** One entry per bucket: bytes of each kind. Bucket k covers [k * bucketSize, ...). */
  data: number[];
  zero: number[];
  unallocated: number[];
  compressed: number[];
}

export interface MapSummary {
  virtualSize: number;
  bucketSize: number;
  buckets: number;
  layers: LayerSummary[];
}

/** What a layer's status means in the picture: reads-as-zero wins over data (holes, zero flags). */
export function kindOf(st: LayerStatus): AllocationKind {
  if (!st.allocated) return 'unallocated';
  if (st.compressed) return 'compressed';
  if (st.zero) return 'zero';
  return 'data';
}

/** Bucket size for N buckets over `virtualSize`: a multiple of 512, so buckets fall on sectors. */
export function bucketSizeFor(virtualSize: number, n: number): number {
  return Math.max(512, Math.ceil(virtualSize / n / 512) * 512);
}

export async function mapSummary(top: DiskImage, n: number, signal?: AbortSignal): Promise<MapSummary> {
  if (!Number.isInteger(n) || n < 1 || n > 1 << 20) throw new RangeError(`bucket count ${n} must be between 1 and ${1 << 20}`);
  const virtualSize = top.virtualSize;
  const bucketSize = virtualSize ? bucketSizeFor(virtualSize, n) : 512;
  const buckets = virtualSize ? Math.ceil(virtualSize / bucketSize) : 0;
  const layers: LayerSummary[] = [];
  let depth = 0;
  for (const layer of chainOf(top)) {
    const s: LayerSummary = {
      filename: layer.filename, format: layer.format, depth: depth++, virtualSize: layer.virtualSize,
      data: new Array<number>(buckets).fill(0), zero: new Array<number>(buckets).fill(0),
      unallocated: new Array<number>(buckets).fill(0), compressed: new Array<number>(buckets).fill(0),
    };
    const end = Math.min(virtualSize, layer.virtualSize);
    let pos = 0;
    while (pos < end) {
      signal?.throwIfAborted();
      // Ask for as much as possible at once: one run may span many buckets.
      const st = await layer.blockStatus(pos, Math.min(end - pos, 1 << 30));
      add(s[kindOf(st)], pos, st.length, bucketSize);
      pos += st.length;
    }
    // Past a shorter layer's end it stores nothing.
    if (end < virtualSize) add(s.unallocated, end, virtualSize - end, bucketSize);
    layers.push(s);
  }
  return { virtualSize, bucketSize, buckets, layers };
}

/** Spreads [offset, offset+length) over the buckets it covers. */
function add(into: number[], offset: number, length: number, bucketSize: number): void {
  let pos = offset;
  const end = offset + length;
  while (pos < end) {
    const k = Math.floor(pos / bucketSize);
    const stop = Math.min(end, (k + 1) * bucketSize);
    into[k]! += stop - pos;
    pos = stop;
  }
}

export function mapSummaryJson(m: MapSummary): Record<string, unknown> {
  return {
    'virtual-size': m.virtualSize,
    'bucket-size': m.bucketSize,
    buckets: m.buckets,
    layers: m.layers.map((l) => ({
      filename: l.filename, format: l.format, depth: l.depth, 'virtual-size': l.virtualSize,
      data: l.data, zero: l.zero, unallocated: l.unallocated, compressed: l.compressed,
    })),
  };
}

const GLYPH: Record<AllocationKind, string> = { data: '#', compressed: '%', zero: '0', unallocated: '.' };

/** One line per layer: a character per bucket for the kind holding most of it, then the totals. */
export function mapSummaryText(m: MapSummary, sizeStr: (n: number) => string): string {
  const lines = [`${m.buckets} buckets of ${sizeStr(m.bucketSize)}: # data, % compressed, 0 zero, . unallocated`];
  for (const l of m.layers) {
    let bar = '';
    for (let k = 0; k < m.buckets; k++) {
      let best: AllocationKind = 'unallocated';
      // On a tie, what is stored wins over what is not.
      for (const kind of ['zero', 'compressed', 'data'] as const) if (l[kind][k]! > 0 && l[kind][k]! >= l[best][k]!) best = kind;
      bar += GLYPH[best];
    }
    const total = (xs: number[]) => sizeStr(xs.reduce((a, b) => a + b, 0));
    lines.push(`${l.depth}: ${l.filename} (${l.format})`, `   ${bar}`,
      `   data ${total(l.data)}, compressed ${total(l.compressed)}, zero ${total(l.zero)}, unallocated ${total(l.unallocated)}`);
  }
  return lines.join('\n') + '\n';
}
