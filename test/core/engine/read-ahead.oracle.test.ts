// Walking a read-only qcow2 image loads the next L2 table ahead of the walk (its read overlaps
// the current table's decoding); a writable image never reads ahead; a read-ahead that fails
// is reported only when the walk itself reaches that table.
import { afterAll, beforeAll, expect, it } from 'vitest';
import { join } from 'node:path';
import { NodeFile } from '../../../core/io/node-file';
import { Qcow2Image } from '../../../core/engine/qcow2';
import type { BlockFile } from '../../../core/io/block-file';
import { describeOracle, qemuImg, qemuIo, tempDir } from '../../oracle/qemu';

/** A BlockFile that logs the offsets read and can fail reads at one offset. */
function logged(f: BlockFile, failAt = -1): BlockFile & { reads: number[] } {
  const reads: number[] = [];
  return new Proxy(f, {
    get(target, key, recv) {
      if (key === 'reads') return reads;
      if (key === 'read') {
        return async (buf: Uint8Array, offset: number) => {
          reads.push(offset);
          if (offset === failAt) throw new Error(`injected read failure at ${offset}`);
          return target.read(buf, offset);
        };
      }
      const v = Reflect.get(target, key, recv);
      return typeof v === 'function' ? v.bind(target) : v;
    },
  }) as BlockFile & { reads: number[] };
}

describeOracle('L2 read-ahead', () => {
  const t = tempDir('strata-readahead-');
  const img = join(t.dir, 'a.qcow2');
  // 4 KiB clusters: one L2 table covers 2 MiB, so 8 MiB of data spans four tables.
  const span = 512 * 4096;
  let l2: number[] = [];
  beforeAll(() => {
    qemuImg('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', img, '8M');
    qemuIo(img, ['write -P 7 0 8M']);
    const map = JSON.parse(qemuImg('map', '--output=json', img)) as { start: number; offset?: number }[];
    expect(map.length).toBeGreaterThan(0);
  });
  afterAll(() => t.cleanup());

  async function open(writable: boolean) {
    const f = logged(await NodeFile.open(img, { writable }));
    const q = await Qcow2Image.open(img, f);
    l2 = [0, 1, 2, 3].map((i) => Number((q as unknown as { l1: Buffer }).l1.readBigUInt64BE(i * 8) & 0x00fffffffffffe00n));
    f.reads.length = 0;
    return { f, q };
  }

  it('reads the next table while the walk is still on the first one (read-only)', async () => {
    const { f, q } = await open(false);
    try {
      expect(l2.every((o) => o > 0)).toBe(true);
      const st = await q.blockStatus(0, span);
      expect(st.data).toBe(true);
      expect(f.reads).toContain(l2[0]);
      expect(f.reads, 'the table of the next 2 MiB is read without being asked for').toContain(l2[1]);
      expect(f.reads).not.toContain(l2[2]);
      // The walk then finds it cached: no second read of it.
      await q.blockStatus(span, span);
      expect(f.reads.filter((o) => o === l2[1])).toHaveLength(1);
    } finally {
      await q.close();
    }
  });

  it('never reads ahead on a writable image', async () => {
    const { f, q } = await open(true);
    try {
      await q.blockStatus(0, span);
      expect(f.reads).toContain(l2[0]);
      expect(f.reads).not.toContain(l2[1]);
    } finally {
      await q.close();
    }
  });

  it('a read-ahead that fails is reported by the walk that reaches the table, not before', async () => {
    expect(l2[1]).toBeGreaterThan(0); // learnt by the tests above
    const failing = logged(await NodeFile.open(img, { writable: false }), l2[1]!);
    const q = await Qcow2Image.open(img, failing);
    try {
      const first = await q.blockStatus(0, span);
      expect(first.data).toBe(true);
      expect(failing.reads).toContain(l2[1]); // the read-ahead was tried, and failed quietly
      await expect(q.blockStatus(span, span)).rejects.toThrow(/injected read failure/);
    } finally {
      await q.close();
    }
  });
});
