// Growing a qcow2 image with preallocation, as QEMU's qcow2_co_truncate does it:
// - metadata (preallocate_co): every new cluster gets a data cluster, allocated run by run
//   (one L2 table's worth at most) where the allocator finds room, its L2 table after it;
//   the file grows to the last one, sparse;
// - falloc, full: a refcount area (qcow2_refcount_area) after the last cluster in use, sized
//   for every new data cluster and L2 table, switched to with one header write; then all the
//   data clusters in one run right after it, preallocated in the file (fallocate, or zeros
//   written), and only then linked into the L2 tables.
// Each step is written and flushed before what points to it: a crash leaks, never corrupts.
import { encodeReftableEntry, refcountBlockEntries, setRefcount } from '../format/refcount';
import { refcountMetadataSize } from '../format/layout';
import type { BlockFile } from '../io/block-file';
import { Refcounts } from './refcounts';
import type { Qcow2Writable } from './qcow2-write';

export type GrowPreallocation = 'metadata' | 'falloc' | 'full';

/** Allocates [start, end) of the file's holes: unwritten extents (falloc) or zeros (full). */
async function fillHoles(file: BlockFile, start: number, end: number, mode: 'falloc' | 'full'): Promise<void> {
  const holes = file.extents ? (await file.extents(start, end - start)).filter((e) => !e.data) : [{ offset: start, length: end - start }];
  const chunk = Buffer.alloc(1 << 20);
  for (const h of holes) {
    if (mode === 'falloc' && file.zeroRange && (await file.zeroRange(h.offset, h.length))) continue;
    for (let p = h.offset; p < h.offset + h.length; p += chunk.length) await file.write(chunk.subarray(0, Math.min(chunk.length, h.offset + h.length - p)), p);
  }
}

/** Preallocates guest [from, to) of an image already grown to `to` (from: the old size). */
export async function preallocateGrow(img: Qcow2Writable, from: number, to: number, mode: GrowPreallocation): Promise<void> {
  const g = img.geometry;
  const cs = g.clusterSize;
  await img.flush();
  const first = Math.floor(from / cs) * cs;
  if (g.externalData) {
    await preallocateExternal(img, first, to, mode);
    return;
  }
  if (mode === 'metadata') {
    let fileEnd = 0;
    for (let guest = first; guest < to;) {
      const l2End = Math.min(to, (Math.floor(guest / (g.l2Entries * cs)) + 1) * g.l2Entries * cs);
      // Clusters already allocated are kept (QEMU's handle_copied); runs of unallocated ones get data clusters.
      const runs = await img.runs(guest, l2End - guest);
      for (const r of runs) {
        const a = Math.floor(r.offset / cs) * cs;
        const b = Math.ceil((r.offset + r.length) / cs) * cs;
        if (r.state !== 'unallocated' && !(r.state === 'zero' && r.hostOffset === null)) continue;
        const n = (b - a) / cs;
        if (n <= 0) continue;
        await img.prepareL2(a);
        const host = await img.mutex.run(async () => { const o = await img.refcounts.alloc(n); img.noteAlloc(); return o; });
        await img.refcounts.writeBack();
        await img.file.flush();
        await img.linkClusters(a, host, n);
        fileEnd = Math.max(fileEnd, host + n * cs);
      }
      guest = l2End;
    }
    if (fileEnd > (await img.file.size())) await img.file.truncate(fileEnd);
    await img.flush();
    return;
  }
  // falloc, full. A longer backing file would show through unallocated subclusters.
  const backingShows = img.backing !== null && img.backing.virtualSize > from;
  const order = img.header.refcountOrder;
  const perBlock = refcountBlockEntries(img.header.clusterBits, order);
  const fileSize = await img.file.size();
  let last = Math.ceil(fileSize / cs) - 1;
  while (last >= 0 && (await img.refcounts.get(last)) === 0) last--;
  const start = last >= 0 ? (last + 1) * cs : Math.ceil(fileSize / cs) * cs;
  const nbData = (Math.ceil(to / cs) * cs - first) / cs;
  const nbL2 = Math.ceil(nbData / g.l2Entries) + 1;
  // qcow2_refcount_area(start, nbData + nbL2, exact)
  const total = refcountMetadataSize(start / cs + nbData + nbL2, cs, order, false).refblocks;
  const areaIndex = Math.floor(start / cs / perBlock);
  const tableSize = Math.ceil(total / (cs / 8)) * (cs / 8);
  const tableClusters = (tableSize * 8) / cs;
  const old = img.refcounts.reftable;
  const oldOffset = img.header.refcountTableOffset;
  const oldClusters = img.header.refcountTableClusters;
  const table = Buffer.alloc(tableSize * 8);
  old.copy(table, 0, 0, Math.min(old.length, table.length));
  const entry = (i: number) => Number(table.readBigUInt64BE(i * 8) & 0x00fffffffffffe00n);
  let additional = 0;
  for (let i = areaIndex; i < total; i++) if (!entry(i)) additional++;
  const tableOffset = start + additional * cs;
  const endOffset = tableOffset + tableClusters * cs;
  const dataEnd = endOffset + nbData * cs;
  // The refcount blocks: new ones laid out from `start`, existing ones updated. Everything in
  // [start, dataEnd) counts 1: the new structures and the data run (qcow2_alloc_clusters_at).
  const writes: { offset: number; data: Buffer }[] = [];
  let blockOffset = start;
  for (let i = areaIndex; i < total; i++) {
    let block: Buffer;
    let at = entry(i);
    if (at) {
      block = Buffer.alloc(cs);
      await img.file.read(block, at);
    } else {
      block = Buffer.alloc(cs);
      at = blockOffset;
      blockOffset += cs;
      encodeReftableEntry(table, i, at);
    }
    const firstCovered = i * perBlock * cs;
    const a = Math.max(start, firstCovered);
    const b = Math.min(dataEnd, firstCovered + perBlock * cs);
    for (let c = a / cs; c < b / cs; c++) setRefcount(block, c - i * perBlock, order, 1);
    if (b > a || at >= start) writes.push({ offset: at, data: block });
  }
  writes.push({ offset: tableOffset, data: table });
  // Blocks and table first (past the clusters in use: nothing refers to them yet), flushed;
  // the existing blocks among them only count clusters no one uses (a crash leaks them).
  for (const w of writes) await img.file.write(w.data, w.offset);
  await img.file.flush();
  const hdr = Buffer.alloc(12);
  hdr.writeBigUInt64BE(BigInt(tableOffset), 0);
  hdr.writeUInt32BE(tableClusters, 8);
  await img.file.write(hdr, 48);
  await img.file.flush();
  img.header.refcountTableOffset = tableOffset;
  img.header.refcountTableClusters = tableClusters;
  img.refcounts = new Refcounts(img.refcounts.hostInfo, table, tableOffset, Math.max(fileSize, dataEnd));
  img.noteAlloc();
  // The old table is free now (QEMU frees it without a discard).
  await img.refcounts.change(oldOffset, oldClusters * cs, -1);
  await img.refcounts.writeBack();
  await img.file.flush();
  // The data run in the file (QEMU truncates the file with falloc or full preallocation).
  if ((await img.file.size()) < dataEnd) await img.file.truncate(dataEnd);
  await fillHoles(img.file, endOffset, dataEnd, mode);
  await img.file.flush();
  // Linked last, L2 table by L2 table.
  let guest = first;
  let host = endOffset;
  let left = nbData;
  while (left) {
    const n = Math.min(left, g.l2Entries - ((guest / cs) % g.l2Entries));
    await img.linkClusters(guest, host, n, from, backingShows);
    guest += n * cs;
    host += n * cs;
    left -= n;
  }
  await img.flush();
}

/**
 * With an external data file (QEMU's preallocate_co for every mode): each new cluster is
 * linked to its own guest offset in the data file (no refcounts, nothing allocated in the
 * image file but L2 tables); the data file then grows to the new end, its new blocks
 * allocated (falloc) or written with zeros (full), as QEMU's truncate of the data file with
 * that preallocation does. Tables are written only after the data file has its new length.
 */
async function preallocateExternal(img: Qcow2Writable, first: number, to: number, mode: GrowPreallocation): Promise<void> {
  const g = img.geometry;
  const cs = g.clusterSize;
  const data = img.dataFile;
  const oldSize = await data.size();
  if (oldSize < to) {
    await data.truncate(to);
    if (mode !== 'metadata') await fillHoles(data, oldSize, to, mode);
    await data.flush();
  }
  for (let guest = first; guest < to;) {
    const l2End = Math.min(to, (Math.floor(guest / (g.l2Entries * cs)) + 1) * g.l2Entries * cs);
    for (const r of await img.runs(guest, l2End - guest)) {
      const a = Math.floor(r.offset / cs) * cs;
      const b = Math.ceil((r.offset + r.length) / cs) * cs;
      if (r.state !== 'unallocated' && !(r.state === 'zero' && r.hostOffset === null)) continue;
      if (b <= a) continue;
      await img.prepareL2(a);
      await img.linkClusters(a, a, (b - a) / cs);
    }
    guest = l2End;
  }
  await img.flush();
}
