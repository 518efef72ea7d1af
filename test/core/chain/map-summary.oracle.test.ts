// map --summary against qemu-img map of each layer on its own: per bucket, the bytes QEMU
// reports as data, zero and unallocated are what the summary counts (compressed is data to
// QEMU, without an offset).
import { join } from 'node:path';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { describeOracle, qemuImg, qemuIo, tempDir } from '../../oracle/qemu';
import { openImage, closeChain } from '../../../core/chain/open';
import { mapSummary, bucketSizeFor } from '../../../core/chain/map-summary';
import { strata } from '../jobs/helpers';

interface QemuMapEntry { start: number; length: number; present: boolean; zero: boolean; data: boolean; offset?: number }

/** qemu-img map of one layer alone, spread into buckets the way the summary spreads runs. */
function qemuBuckets(file: string, format: string, virtualSize: number, bucketSize: number, buckets: number) {
  const spec = format === 'qcow2'
    ? `json:${JSON.stringify({ driver: 'qcow2', file: { driver: 'file', filename: file }, backing: null })}`
    : `json:${JSON.stringify({ driver: 'raw', file: { driver: 'file', filename: file } })}`;
  const entries = JSON.parse(qemuImg('map', '-U', '--output=json', spec)) as QemuMapEntry[];
  const out = { data: new Array(buckets).fill(0), zero: new Array(buckets).fill(0), unallocated: new Array(buckets).fill(0), compressed: new Array(buckets).fill(0) };
  for (const e of entries) {
    const kind = !e.present ? 'unallocated' : e.zero ? 'zero' : e.offset === undefined ? 'compressed' : 'data';
    spread(out[kind], e.start, Math.min(e.length, virtualSize - e.start), bucketSize);
  }
  return out;
}

function spread(into: number[], start: number, length: number, bucketSize: number): void {
  for (let pos = start; pos < start + length;) {
    const k = Math.floor(pos / bucketSize);
    const stop = Math.min(start + length, (k + 1) * bucketSize);
    into[k]! += stop - pos;
    pos = stop;
  }
}

describeOracle('map --summary', () => {
  const t = tempDir();
  beforeAll(() => {
    qemuImg('create', '-q', '-f', 'raw', t.path('base.raw'), '48M');
    qemuIo(t.path('base.raw'), ['write -P 1 0 3M', 'write -P 2 40M 1M'], { format: 'raw' });
    qemuImg('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4k', '-b', 'base.raw', '-F', 'raw', t.path('mid.qcow2'), '64M');
    qemuIo(t.path('mid.qcow2'), ['write -P 3 1M 5M', 'write -z 10M 2M', 'write -c -P 4 20M 64k', 'write -c -P 5 21M 64k', 'discard 2M 1M']);
    qemuImg('create', '-q', '-f', 'qcow2', '-o', 'extended_l2=on,cluster_size=64k', '-b', 'mid.qcow2', '-F', 'qcow2', t.path('top.qcow2'));
    qemuIo(t.path('top.qcow2'), ['write -P 6 100k 8k', 'write -z 30M 3M', 'write -P 7 63M 1M']);
    qemuImg('create', '-q', '-f', 'qcow2', '-o', 'preallocation=metadata', t.path('prealloc.qcow2'), '256M');
    qemuIo(t.path('prealloc.qcow2'), ['write -P 8 64M 2M']);
  });
  afterAll(() => t.cleanup());

  for (const n of [1, 7, 64, 1000]) {
    it(`${n} buckets over a three-layer chain (raw base shorter than the top, compressed, zero, subclusters)`, async () => {
      const top = await openImage(t.path('top.qcow2'));
      try {
        const m = await mapSummary(top, n);
        expect(m.bucketSize).toBe(bucketSizeFor(64 << 20, n));
        expect(m.buckets).toBe(Math.ceil((64 << 20) / m.bucketSize));
        expect(m.layers.map((l) => [l.filename, l.format, l.depth])).toEqual([
          [t.path('top.qcow2'), 'qcow2', 0], [t.path('mid.qcow2'), 'qcow2', 1], [t.path('base.raw'), 'raw', 2]]);
        for (const l of m.layers) {
          const q = qemuBuckets(l.filename, l.format, l.virtualSize, m.bucketSize, m.buckets);
          // The raw base is 48 MiB under a 64 MiB top: the rest it does not store.
          if (l.format === 'raw') spread(q.unallocated, 48 << 20, 16 << 20, m.bucketSize);
          expect({ layer: l.filename, data: l.data, zero: l.zero, unallocated: l.unallocated, compressed: l.compressed }).toEqual({ layer: l.filename, ...q });
          for (let k = 0; k < m.buckets; k++) {
            const sum = l.data[k]! + l.zero[k]! + l.unallocated[k]! + l.compressed[k]!;
            expect(sum).toBe(Math.min(m.bucketSize, (64 << 20) - k * m.bucketSize));
          }
        }
        expect(m.layers[1]!.compressed.reduce((a, b) => a + b, 0)).toBe(128 * 1024);
      } finally {
        await closeChain(top);
      }
    });
  }

  it('preallocated metadata over holes counts as zero, written clusters as data', async () => {
    const img = await openImage(t.path('prealloc.qcow2'));
    try {
      const m = await mapSummary(img, 4);
      const l = m.layers[0]!;
      expect(l.data).toEqual([0, 2 << 20, 0, 0]);
      expect(l.zero).toEqual([64 << 20, (62 << 20), 64 << 20, 64 << 20]);
      expect(l.unallocated).toEqual([0, 0, 0, 0]);
    } finally {
      await closeChain(img);
    }
  });

  it('strata map --summary prints JSON and a picture; bad counts are usage errors', async () => {
    const j = await strata('map', '--summary', '8', '--output=json', t.path('top.qcow2'));
    expect(j.code, j.err).toBe(0);
    const parsed = JSON.parse(j.out);
    expect(parsed).toMatchObject({ 'virtual-size': 64 << 20, 'bucket-size': 8 << 20, buckets: 8 });
    expect(parsed.layers).toHaveLength(3);
    const h = await strata('map', '--summary', '8', t.path('top.qcow2'));
    // One character per bucket for the kind that holds most of it.
    const lines = h.out.split('\n');
    expect(lines.slice(0, 3)).toEqual(['8 buckets of 8 MiB: # data, % compressed, 0 zero, . unallocated', `0: ${t.path('top.qcow2')} (qcow2)`, '   ........']);
    expect(lines[3]).toBe('   data 1.01 MiB, compressed 0 B, zero 3 MiB, unallocated 60 MiB');
    expect(lines.slice(4, 6)).toEqual([`1: ${t.path('mid.qcow2')} (qcow2)`, '   #.......']);
    for (const bad of ['0', 'x', '-3', '2000000']) expect((await strata('map', '--summary', bad, t.path('top.qcow2'))).code).toBe(2);
  });
});
