// empty: an overlay whose data is already in its backing file (after qemu-img commit -d) is
// emptied in one step: it reads the same, allocates nothing, shrinks to a few clusters and
// checks clean. One whose data differs anywhere is refused with the first differing offset,
// and left byte for byte as it was.
import { expect, it } from 'vitest';
import { describeOracle, qemuImg, qemuIo, tempDir } from '../../oracle/qemu';
import { strata } from '../../cli/run-cli';
import { allocatedBytes, expectClean, fileHash, guestHash, qemuMap } from './helpers';

/** A 64 MiB base with 32 MiB of 0x11, and an overlay on it holding `writes`, committed with -d. */
function committedOverlay(t: ReturnType<typeof tempDir>, writes: string[]): string {
  const base = t.path('base.qcow2');
  const top = t.path('top.qcow2');
  qemuImg('create', '-q', '-f', 'qcow2', base, '64M');
  qemuIo(base, ['write -P 0x11 0 32M']);
  qemuImg('create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', top);
  qemuIo(top, writes);
  qemuImg('commit', '-q', '-d', top);
  return top;
}

describeOracle('empty', () => {
  it('after commit -d: the overlay reads the same, allocates nothing and shrinks', async () => {
    const t = tempDir();
    try {
      const top = committedOverlay(t, ['write -P 0x21 4M 8M', 'write -z 20M 1M', 'write -P 0x22 40M 65537']);
      const before = guestHash(top);
      const size = allocatedBytes(top);
      const r = await strata('empty', top);
      expect({ code: r.code, out: r.out, err: r.err }).toEqual({ code: 0, out: 'Image emptied.\n', err: '' });
      expectClean(top);
      expect(guestHash(top)).toBe(before);
      expect(qemuMap(top).filter((e) => e.depth === 0)).toEqual([]);
      expect(allocatedBytes(top)).toBeLessThan(Math.min(size, 512 * 1024));
    } finally {
      t.cleanup();
    }
  });

  it('an overlay that differs from its backing file: refused at the first differing byte, untouched', async () => {
    const t = tempDir();
    try {
      const top = committedOverlay(t, ['write -P 0x11 4M 8M', 'write -P 0x11 40M 4M']);
      // One byte past what was committed: in the base it reads 0x11.
      qemuIo(top, ['write -P 0x12 5000001 1']);
      const hash = fileHash(top);
      const dry = await strata('empty', '--dry-run', top);
      expect(dry.code).toBe(0);
      expect(dry.out).toMatch(/compared with base\.qcow2 first/);
      const r = await strata('empty', top);
      expect(r.code).toBe(2);
      expect(r.err.trim().split('\n')).toHaveLength(1);
      expect(r.err).toContain('at offset 5000001');
      expect(fileHash(top)).toBe(hash);
    } finally {
      t.cleanup();
    }
  });
});
