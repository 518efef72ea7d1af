// Subcluster copy-on-write is measurable: writes into an extended-L2 overlay read nothing from
// the backing file when subcluster-aligned, and complete only the touched subclusters otherwise.
import { expect, it } from 'vitest';
import { describeOracle, qemuImg, qemuImgRun, qemuIo, tempDir } from '../../oracle/qemu';
import { openImage, closeChain } from '../../../core/chain/open';
import { Qcow2Writable } from '../../../core/engine/qcow2-write';

describeOracle('subcluster-aware copy-on-write', () => {
  it('128 KiB extended-L2 overlay: aligned 4 KiB writes copy nothing, unaligned complete two subclusters', async () => {
    const t = tempDir();
    try {
      const base = t.path('base.raw');
      const top = t.path('top.qcow2');
      qemuImg('create', '-f', 'raw', base, '64M');
      qemuIo(base, ['write -P 0xaa 0 64M'], { format: 'raw' });
      qemuImg('create', '-f', 'qcow2', '-o', 'cluster_size=128k,extended_l2=on', '-b', base, '-F', 'raw', top);
      const img = await openImage(top, { writable: true });
      expect(img).toBeInstanceOf(Qcow2Writable);
      const w = img as Qcow2Writable;
      let backingReads = 0;
      const backing = img.backing!;
      const origRead = backing.read.bind(backing);
      backing.read = async (buf, off) => { backingReads += buf.length; return origRead(buf, off); };

      // Aligned: one subcluster in a fresh cluster, then another in the same cluster.
      await w.write(Buffer.alloc(4096, 0x11), 3 * 4096);
      await w.write(Buffer.alloc(4096, 0x12), 128 * 1024 + 7 * 4096);
      expect(backingReads).toBe(0);
      expect(w.stats.cowReadBytes).toBe(0);
      expect(w.stats.dataWrites).toBe(2);
      expect(w.stats.dataWriteBytes).toBe(2 * 4096);

      // Unaligned: 4 KiB at 2 KiB into a fresh cluster touches subclusters 0 and 1 only.
      const before = { ...w.stats };
      await w.write(Buffer.alloc(4096, 0x13), 1024 * 1024 + 2048);
      expect(w.stats.dataWrites - before.dataWrites).toBe(1);
      expect(w.stats.dataWriteBytes - before.dataWriteBytes).toBe(8192);
      expect(w.stats.cowReadBytes - before.cowReadBytes).toBe(4096);
      expect(backingReads).toBe(4096);
      await closeChain(img);

      expect(qemuImgRun('check', top).status).toBe(0);
      const out = qemuIo(top, [
        'read -P 0xaa 0 12288', 'read -P 0x11 12288 4096', 'read -P 0xaa 16384 114688',
        'read -P 0x12 159744 4096', 'read -P 0x13 1050624 4096', 'read -P 0xaa 1054720 4096',
      ]);
      expect(out).not.toMatch(/fail/i);
      // Untouched subclusters keep their state: the map shows them coming from the backing file.
      const map = JSON.parse(qemuImg('map', '--output=json', top)) as { start: number; length: number; depth: number }[];
      const top0 = map.filter((e) => e.depth === 0).map((e) => [e.start, e.length]);
      expect(top0).toEqual([[12288, 4096], [159744, 4096], [1048576, 8192]]);
    } finally {
      t.cleanup();
    }
  });

  it('standard 64 KiB overlay: a partial write copies the rest of the cluster in one write', async () => {
    const t = tempDir();
    try {
      const base = t.path('base.raw');
      const top = t.path('top.qcow2');
      qemuImg('create', '-f', 'raw', base, '8M');
      qemuIo(base, ['write -P 0xbb 0 8M'], { format: 'raw' });
      qemuImg('create', '-f', 'qcow2', '-b', base, '-F', 'raw', top);
      const w = (await openImage(top, { writable: true })) as Qcow2Writable;
      await w.write(Buffer.alloc(100, 0x44), 65536 + 1000);
      expect(w.stats.dataWrites).toBe(1);
      expect(w.stats.dataWriteBytes).toBe(65536);
      expect(w.stats.cowReadBytes).toBe(65536 - 100);
      await closeChain(w);
      expect(qemuImgRun('check', top).status).toBe(0);
      expect(qemuIo(top, ['read -P 0xbb 65536 1000', 'read -P 0x44 66536 100', 'read -P 0xbb 66636 64436'])).not.toMatch(/fail/i);
    } finally {
      t.cleanup();
    }
  });
});
