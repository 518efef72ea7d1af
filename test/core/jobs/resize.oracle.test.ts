// resize: the area a grow adds reads as zeros (iotests 271, 292, and raw), a shrink that fails
// leaves the image byte for byte as it was, and a shrink gives the freed clusters back to the
// file system as qemu-img's does (iotest 250).
import { copyFileSync, statSync, writeFileSync } from 'node:fs';
import { afterAll, expect, it } from 'vitest';
import { describeOracle, qemuImg, qemuImgRun, qemuIo, tempDir } from '../../oracle/qemu';
import { allocatedBytes, expectClean, fileHash, MiB, qemuIoMismatches, qemuMap, randomBytes, rng, strata, strataOk } from './helpers';
import { getU64, writeAt, u64 } from '../format/hostile-cases';

describeOracle('resize: grown areas read as zeros', () => {
  const t = tempDir('strata-resize-zero-');
  afterAll(() => t.cleanup());

  it('iotest 292: shrink into a cluster, grow again: the tail reads as zeros, not the old data (with a backing file)', async () => {
    const base = t.path('292.base');
    const top = t.path('292.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', base, '1M');
    qemuIo(base, ['write -P 0x11 0 1M']);
    qemuImg('create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', top);
    qemuIo(top, ['write -P 0x22 0 1M']);
    await strataOk('resize', '--shrink', top, '520k');
    await strataOk('resize', top, '567k');
    expect(qemuIoMismatches(top, ['read -P 0x22 0 520k', 'read -P 0x00 520k 47k'])).toEqual([]);
    expectClean(top);
  });

  it('without a backing file too (qemu-img 7.2 shows the old bytes there: a deliberate difference)', async () => {
    const top = t.path('292-alone.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', top, '1M');
    qemuIo(top, ['write -P 0x22 0 1M']);
    await strataOk('resize', '--shrink', top, '520k');
    await strataOk('resize', top, '567k');
    expect(qemuIoMismatches(top, ['read -P 0x22 0 520k', 'read -P 0x00 520k 47k'])).toEqual([]);
    expectClean(top);
  });

  for (const l2 of ['standard', 'extended'] as const) {
    it(`iotest 271: an overlay grown past its shorter size does not show its backing file there, map equals qemu-img's (${l2} L2)`, async () => {
      const opts = l2 === 'extended' ? ['-o', 'extended_l2=on,cluster_size=64k'] : [];
      const base = t.path(`271-${l2}.base`);
      qemuImg('create', '-q', '-f', 'qcow2', ...opts, base, '1M');
      qemuIo(base, ['write -P 0x11 0 1M']);
      const files: string[] = [];
      for (const who of ['strata', 'qemu']) {
        const top = t.path(`271-${l2}-${who}.qcow2`);
        // 100000 bytes: the old end is inside a (sub)cluster, so the head of the new area is written.
        qemuImg('create', '-q', '-f', 'qcow2', ...opts, '-b', base, '-F', 'qcow2', top, '100000');
        if (who === 'strata') await strataOk('resize', top, '1M');
        else qemuImg('resize', '-q', top, '1M');
        files.push(top);
      }
      const [ours, theirs] = files as [string, string];
      expect(qemuIoMismatches(ours, ['read -P 0x11 0 99840', `read -P 0 100352 ${MiB - 100352}`])).toEqual([]);
      expect(qemuMap(ours)).toEqual(qemuMap(theirs));
      expectClean(ours);
    });
  }

  it('a compat=0.10 overlay over a longer backing file cannot be grown (no zero clusters): refused, file unchanged, as qemu-img', async () => {
    const base = t.path('v2.base');
    const top = t.path('v2.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', '-o', 'compat=0.10', base, '1M');
    qemuImg('create', '-q', '-f', 'qcow2', '-o', 'compat=0.10', '-b', base, '-F', 'qcow2', top, '512k');
    const copy = t.path('v2-qemu.qcow2');
    copyFileSync(top, copy);
    const q = qemuImgRun('resize', copy, '1M');
    expect(q.status).toBe(1);
    expect(q.stderr).toMatch(/Failed to zero out new clusters/);
    const before = fileHash(top);
    const r = await strata('resize', top, '1M');
    expect(r.code).toBe(1);
    expect(r.err).toMatch(/Failed to zero out new clusters/);
    expect(r.err.trim().split('\n')).toHaveLength(1);
    expect(fileHash(top)).toBe(before);
  });

  it('raw: shrink and grow read zeros in the new area', async () => {
    const f = t.path('r.raw');
    writeFileSync(f, randomBytes(7, MiB));
    await strataOk('resize', '-f', 'raw', '--shrink', f, '520k');
    await strataOk('resize', '-f', 'raw', f, '567k');
    expect(statSync(f).size).toBe(567 * 1024);
    expect(qemuIoMismatches(f, ['read -P 0 520k 47k']).map((l) => l.replace(/ \(.*$/, ''))).toEqual([]);
  });
});

describeOracle('resize --shrink: a failure changes nothing; freed clusters are punched', () => {
  const t = tempDir('strata-resize-shrink-');
  afterAll(() => t.cleanup());

  it('an unaligned refcount block offset (unused reftable entry): exit 1, file byte for byte unchanged', async () => {
    const f = t.path('damaged.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', f, '4M');
    qemuIo(f, ['write -P 0x22 0 4M']);
    const reftable = Number(getU64(f, 48));
    writeAt(f, reftable + 8, u64(0x20200));
    const before = fileHash(f);
    const r = await strata('resize', '--shrink', f, '1M');
    expect(r.code).toBe(1);
    expect(r.err).toMatch(/refcount/);
    expect(r.err.trim().split('\n')).toHaveLength(1);
    expect(fileHash(f)).toBe(before);
  });

  it('a referenced cluster with refcount 0: refused up front, file unchanged (qemu-img would drop the entries)', async () => {
    const f = t.path('refcount0.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', f, '4M');
    qemuIo(f, ['write -P 0x22 0 4M']);
    const last = qemuMap(f).at(-1)!;
    const cluster = (last.offset! + last.length) / 65536 - 1;
    const block = Number(getU64(f, Number(getU64(f, 48))));
    writeAt(f, block + cluster * 2, Buffer.alloc(2));
    const before = fileHash(f);
    const r = await strata('resize', '--shrink', f, '1M');
    expect(r.code).toBe(1);
    expect(r.err).toMatch(/refcount/);
    expect(fileHash(f)).toBe(before);
  });

  it('iotest 250-like: data past the new end interleaved with data before it: disk use drops as far as qemu-img\'s', async () => {
    const files: string[] = [];
    for (const who of ['strata', 'qemu']) {
      const f = t.path(`interleaved-${who}.qcow2`);
      qemuImg('create', '-q', '-f', 'qcow2', f, '32M');
      // Guest offsets in a shuffled order: clusters past 16M end up all over the file.
      const r = rng(250);
      const order = Array.from({ length: 32 }, (_, i) => i).sort(() => r() - 0.5);
      qemuIo(f, order.map((i) => `write -P ${i + 1} ${i}M 1M`));
      if (who === 'strata') await strataOk('resize', '--shrink', f, '16M');
      else qemuImg('resize', '-q', '--shrink', f, '16M');
      files.push(f);
    }
    const [ours, theirs] = files as [string, string];
    expectClean(ours);
    expect(qemuImgRun('compare', ours, theirs).status).toBe(0);
    expect(allocatedBytes(ours)).toBeLessThanOrEqual(allocatedBytes(theirs) * 1.02);
  });
});
