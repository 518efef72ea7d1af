// Emptying a committed overlay in one metadata-sized step: the L1 table is zeroed, then a fresh
// refcount structure is written past the end of the file and the header switched to it, then a
// second one at the front, the header switched again, and the file truncated to a few clusters.
// Every instant is consistent: first only leaks, then clean structures.
import { encodeReftableEntry, refcountBlockEntries, setRefcount } from '../format/refcount';
import type { Qcow2Writable } from './qcow2-write';
import { Refcounts } from './refcounts';

export type EmptyMethod = 'fresh-metadata' | 'discard';

/** Why the fast path cannot be used for this image, or null when it can. */
export function fastEmptyObstacle(img: Qcow2Writable): string | null {
  if (img.snapshots.length) return 'it has internal snapshots';
  if (img.parsed.bitmaps) return 'it has persistent bitmaps';
  if (img.geometry.externalData) return 'it has an external data file';
  if (img.header.version === 2) return 'it is compat 0.10';
  // The LUKS header's clusters must stay (QEMU keeps to discarding for LUKS images too).
  if (img.parsed.cryptoHeader) return 'it is LUKS-encrypted';
  return null;
}

export async function makeEmpty(img: Qcow2Writable): Promise<EmptyMethod> {
  if (fastEmptyObstacle(img)) {
    await img.discard(0, img.virtualSize, { full: true });
    await img.flush();
    return 'discard';
  }
  await img.flush();
  await img.mutex.run(async () => {
    await img.beforeChange();
    const cs = img.geometry.clusterSize;
    const file = img.file;
    const l1Bytes = img.l1.length;
    const l1Clusters = Math.ceil(l1Bytes / cs);
    // QEMU's BLKDBG_* points of its make_completely_empty, for the blkdebug test driver: where
    // the same step begins here (the L1 zeroed, the first write of new structures, the header
    // switched to them).
    // 1. Nothing is mapped any more: everything the image held is now a leak.
    file.debugEvent?.('l1_update');
    if (l1Bytes) await file.write(Buffer.alloc(l1Bytes), img.header.l1TableOffset);
    await file.flush();
    // 2. A fresh structure past everything in use, then 3. one at the front.
    file.debugEvent?.('empty_image_prepare');
    const end = Math.max(Math.ceil((await file.size()) / cs), img.refcounts.allocEnd);
    await writeFresh(img, end, l1Clusters);
    const front = await writeFresh(img, 1, l1Clusters);
    await file.truncate(front.endCluster * cs);
    await file.flush();
    img.l1 = Buffer.alloc(l1Bytes);
    img.l1Dirty.clear();
    img.pendingFrees = [];
    img.l2Cache.clear();
    img.refcounts = new Refcounts(img.refcounts.hostInfo, front.reftable, front.reftableOffset, front.endCluster * cs);
  });
  return 'fresh-metadata';
}

interface Fresh { reftable: Buffer; reftableOffset: number; endCluster: number }

/** Writes reftable + refcount blocks + an empty L1 at cluster `at` and switches the header to them. */
async function writeFresh(img: Qcow2Writable, at: number, l1Clusters: number): Promise<Fresh> {
  const h = img.header;
  const cs = img.geometry.clusterSize;
  const perBlock = refcountBlockEntries(h.clusterBits, h.refcountOrder);
  let t = 1;
  let indices: number[] = [];
  for (;;) {
    const used = [0];
    const total = t + Math.max(1, indices.length) + l1Clusters;
    for (let c = at; c < at + total; c++) used.push(c);
    const next = [...new Set(used.map((c) => Math.floor(c / perBlock)))].sort((a, b) => a - b);
    const nextT = Math.ceil(((next[next.length - 1]! + 1) * 8) / cs);
    if (nextT === t && next.length === indices.length) break;
    t = nextT;
    indices = next;
  }
  const b = indices.length;
  const buf = Buffer.alloc((t + b + l1Clusters) * cs);
  const reftable = buf.subarray(0, t * cs);
  indices.forEach((idx, k) => encodeReftableEntry(reftable, idx, (at + t + k) * cs));
  const mark = (c: number) => {
    const k = indices.indexOf(Math.floor(c / perBlock));
    const block = buf.subarray((t + k) * cs, (t + k + 1) * cs);
    setRefcount(block, c % perBlock, h.refcountOrder, 1);
  };
  mark(0);
  for (let c = at; c < at + t + b + l1Clusters; c++) mark(c);
  img.file.debugEvent?.('refblock_alloc');
  await img.file.write(buf, at * cs);
  await img.file.flush();
  // l1_table_offset, refcount_table_offset and refcount_table_clusters are adjacent: one write.
  img.file.debugEvent?.('l1_update');
  img.file.debugEvent?.('reftable_update');
  const hdr = Buffer.alloc(20);
  hdr.writeBigUInt64BE(BigInt((at + t + b) * cs), 0);
  hdr.writeBigUInt64BE(BigInt(at * cs), 8);
  hdr.writeUInt32BE(t, 16);
  await img.file.write(hdr, 40);
  await img.file.flush();
  h.l1TableOffset = (at + t + b) * cs;
  h.refcountTableOffset = at * cs;
  h.refcountTableClusters = t;
  return { reftable: Buffer.from(reftable), reftableOffset: at * cs, endCluster: at + t + b + l1Clusters };
}
