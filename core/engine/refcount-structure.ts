// A complete refcount structure (refcount blocks, then the refcount table) built from known
// refcounts, describing itself, to be written where nothing lives and then switched to in one
// header write: what check -r all does to repair refcounts, and what snapshot create and
// delete do to change refcounts and COPIED flags in one step.
import { zeroedBuffer } from '../io/buffers';
import { encodeReftableEntry, refcountBlockEntries, setRefcount } from '../format/refcount';

export type RefArray = Uint8Array | Uint16Array | Uint32Array | Float64Array;

/** A zeroed array for `n` refcounts of 2^order bits. */
export function newRefArray(order: number, n: number): RefArray {
  const Ctor = order <= 3 ? Uint8Array : order === 4 ? Uint16Array : order === 5 ? Uint32Array : Float64Array;
  // Zeroed memory on huge pages: a large image's array is megabytes, faulted in 2 MiB at a time.
  const b = zeroedBuffer(n * Ctor.BYTES_PER_ELEMENT);
  return new Ctor(b.buffer as ArrayBuffer, b.byteOffset, n);
}

export interface StructureGeometry {
  clusterBits: number;
  refcountOrder: number;
}

/** Where a structure goes: clusters [start, start + clusters), its blocks first, then its table. */
export interface StructureLayout {
  start: number;
  clusters: number;
  /** Refcount table indices of the blocks, in the order they are stored from `start`. */
  blocks: number[];
  tableClusters: number;
}

/** Refcount table indices whose block would hold a non-zero refcount of `counts` [0, n). */
function usedBlocks(counts: RefArray, n: number, perBlock: number): number[] {
  const used: number[] = [];
  for (let b = 0; b * perBlock < n; b++) {
    const end = Math.min(n, (b + 1) * perBlock);
    for (let i = b * perBlock; i < end; i++) if (counts[i]) { used.push(b); break; }
  }
  return used;
}

/** The least self-describing structure at cluster `start` (null when none settles). */
function layoutAt(used: number[], start: number, g: StructureGeometry): StructureLayout | null {
  const cs = 2 ** g.clusterBits;
  const perBlock = refcountBlockEntries(g.clusterBits, g.refcountOrder);
  let k = 0;
  for (let guard = 0; guard < 64; guard++) {
    const blocks = new Set(used);
    if (k > 0) for (let b = Math.floor(start / perBlock); b <= Math.floor((start + k - 1) / perBlock); b++) blocks.add(b);
    let maxBlock = -1;
    for (const b of blocks) if (b > maxBlock) maxBlock = b;
    const tableClusters = Math.max(1, Math.ceil(((maxBlock + 1) * 8) / cs));
    const total = blocks.size + tableClusters;
    if (total === k) return { start, clusters: k, blocks: [...blocks].sort((a, b) => a - b), tableClusters };
    k = total;
  }
  return null;
}

/**
 * Places a structure for `counts` [0, n): in the first run of clusters below `inside` that
 * `free` accepts and that can hold it (so repeated rebuilds reuse the space old ones left),
 * else at the first cluster from `past` on where `free` accepts every cluster it needs.
 */
export function placeStructure(counts: RefArray, n: number, g: StructureGeometry, free: (cluster: number) => boolean, inside: number, past: number): StructureLayout {
  const perBlock = refcountBlockEntries(g.clusterBits, g.refcountOrder);
  const used = usedBlocks(counts, n, perBlock);
  const fits = (l: StructureLayout | null): l is StructureLayout => {
    if (!l) return false;
    for (let c = l.start; c < l.start + l.clusters; c++) if (!free(c)) return false;
    return true;
  };
  const least = used.length + 1;
  for (let c = 1; c < inside;) {
    if (!free(c)) { c++; continue; }
    let end = c + 1;
    while (end < inside && free(end)) end++;
    if (end - c >= least) {
      // The structure grows a little when its own clusters need blocks of their own: try each
      // start the run allows.
      for (let s = c; s + least <= end; s++) {
        const l = layoutAt(used, s, g);
        if (l && l.start + l.clusters <= end && fits(l)) return l;
        if (!l) break;
      }
    }
    c = end;
  }
  for (let s = past; ; s++) {
    const l = layoutAt(used, s, g);
    if (!l) throw new Error('could not lay out a refcount structure');
    if (fits(l)) return l;
  }
}

/**
 * The structure's clusters, encoded: block `i` of the layout at cluster start + i, then the
 * table. Its own clusters count 1; `counts` gives everything else.
 */
export function encodeStructure(counts: RefArray, n: number, l: StructureLayout, g: StructureGeometry): { blocks: { offset: number; data: Buffer }[]; table: Buffer; tableOffset: number } {
  const cs = 2 ** g.clusterBits;
  const perBlock = refcountBlockEntries(g.clusterBits, g.refcountOrder);
  const end = l.start + l.clusters;
  const table = Buffer.alloc(l.tableClusters * cs);
  const blocks = l.blocks.map((b, idx) => {
    const data = Buffer.alloc(cs);
    for (let j = 0; j < perBlock; j++) {
      const c = b * perBlock + j;
      const v = c >= l.start && c < end ? 1 : c < n ? counts[c]! : 0;
      if (v) setRefcount(data, j, g.refcountOrder, v);
    }
    const offset = (l.start + idx) * cs;
    encodeReftableEntry(table, b, offset);
    return { offset, data };
  });
  return { blocks, table, tableOffset: (l.start + l.blocks.length) * cs };
}
