// Mirror against qemu-img's view of the result: a 1 GiB raw source with 48 MiB of random data
// and 16 MiB of allocated zeros (dd from /dev/zero) mirrors to a raw target with the same bytes
// and to a qcow2 target that passes qemu-img check, both keeping only the data allocated;
// mirroring again onto the finished target writes nothing; --sync top keeps the backing file.
import { execFileSync, spawnSync } from 'node:child_process';
import { closeSync, fsyncSync, mkdirSync, openSync, statSync, writeSync } from 'node:fs';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { describeOracle, qemuImg, qemuIo, tempDir } from '../../oracle/qemu';
import { mirror } from '../../../core/jobs/mirror';
import { openTarget } from '../../../core/jobs/target';
import { closeChain, openImage } from '../../../core/chain/open';
import { allocatedBytes, expectClean, expectSameContent, fileHash, fileSize, MiB, qemuInfo, qemuMap, strataOk, randomBytes } from './helpers';

const GiB = 1024 * MiB;


/** cmp(1): the two files hold the same bytes. */
function expectSameBytes(a: string, b: string): void {
  const r = spawnSync('cmp', [a, b], { encoding: 'utf8' });
  expect({ a, b, status: r.status, out: (r.stdout + r.stderr).trim() }).toEqual({ a, b, status: 0, out: '' });
}

/** Mirrors SRC onto the existing TARGET through the job function, returning its result. */
async function mirrorAgain(src: string, target: string, format: 'raw' | 'qcow2') {
  const s = await openImage(src);
  try {
    const t = await openTarget(target, s.virtualSize, { format, existing: true });
    try {
      return await mirror({}, s, t.image, { sync: 'full', targetIsFresh: false });
    } finally {
      await closeChain(t.image);
    }
  } finally {
    await closeChain(s);
  }
}

describeOracle('mirror', () => {
  const t = tempDir('strata-mirror-');
  const src = t.path('src.raw');
  let srcHash = '';

  beforeAll(() => {
    const fd = openSync(src, 'w');
    try {
      // 1 GiB, 48 MiB of random data in 24 pieces of 2 MiB (some unaligned), spread out.
      const data = randomBytes(1, 2 * MiB);
      for (let i = 0; i < 24; i++) {
        data.writeUInt32LE(i, 0);
        writeSync(fd, data, 0, data.length, i * 40 * MiB + (i % 4) * 4096 + (i % 3) * 513);
      }
      if (fileSize(src) < GiB) execFileSync('truncate', ['-s', String(GiB), src]);
      fsyncSync(fd);
    } finally {
      closeSync(fd);
    }
    // 16 MiB of explicit zeros, allocated: dd from /dev/zero, in four 4 MiB runs.
    for (const mib of [20 * 40 + 10, 21 * 40 + 10, 990, 1010]) {
      execFileSync('dd', ['if=/dev/zero', `of=${src}`, 'bs=1M', `seek=${mib}`, 'count=4', 'conv=notrunc,fsync', 'status=none']);
    }
    expect(fileSize(src)).toBe(GiB);
    // The zeros really are allocated: 48 MiB of data + 16 MiB of zeros.
    expect(allocatedBytes(src)).toBeGreaterThanOrEqual(64 * MiB);
    srcHash = fileHash(src);
  });
  afterAll(() => t.cleanup());

  it('to a raw target: the same bytes, at most 50 MiB allocated', async () => {
    const dst = t.path('dst.raw');
    await strataOk('mirror', src, dst);
    expect(fileSize(dst)).toBe(GiB);
    expectSameBytes(src, dst);
    const alloc = allocatedBytes(dst);
    console.log(`[mirror] raw target: ${alloc} bytes allocated (source ${allocatedBytes(src)})`);
    expect(alloc).toBeLessThanOrEqual(50 * MiB);
  });

  it('to a qcow2 target (-O qcow2): check clean, identical, at most 52 MiB allocated', async () => {
    const dst = t.path('dst.qcow2');
    await strataOk('mirror', '-O', 'qcow2', src, dst);
    expectClean(dst);
    expectSameContent(src, dst);
    const alloc = allocatedBytes(dst);
    console.log(`[mirror] qcow2 target: ${alloc} bytes allocated, file ${fileSize(dst)}`);
    expect(alloc).toBeLessThanOrEqual(52 * MiB);
    // The allocated zeros were not copied as data.
    const dataBytes = qemuMap(dst).filter((e) => e.data).reduce((n, e) => n + e.length, 0);
    expect(dataBytes).toBeLessThanOrEqual(50 * MiB);
  });

  // A bitmap of 64 KiB granules may leave one granule at each edge of the source's 24 data
  // pieces unknown: at most that much may be zeroed again. Nothing may be written.
  const REZERO_LIMIT = 2 * 24 * 64 * 1024;
  for (const fmt of ['raw', 'qcow2'] as const) {
    it(`mirroring again onto the finished ${fmt} target writes (almost) nothing`, async () => {
      const dst = t.path(`dst.${fmt}`);
      const before = statSync(dst);
      const r = await mirrorAgain(src, dst, fmt);
      console.log(`[mirror] again onto ${fmt}: ${JSON.stringify(r)}`);
      expect.soft({ written: r.bytesWritten, zeroedWithinLimit: r.bytesZeroed <= REZERO_LIMIT, zeroed: r.bytesZeroed })
        .toEqual({ written: 0, zeroedWithinLimit: true, zeroed: r.bytesZeroed });
      const after = statSync(dst);
      expect.soft({ blocks: after.blocks, size: after.size }).toEqual({ blocks: before.blocks, size: before.size });
      expectSameContent(src, dst);
      // And through the CLI (-n): the target file keeps its allocation and content.
      await strataOk('mirror', '-n', '-O', fmt, src, dst);
      const cli = statSync(dst);
      expect.soft({ blocks: cli.blocks, size: cli.size }).toEqual({ blocks: before.blocks, size: before.size });
      expectSameContent(src, dst);
      if (fmt === 'qcow2') expectClean(dst);
    });
  }

  it('-n onto an existing qcow2 target holding other data: zeros are written where the source is zero', async () => {
    const d = tempDir('strata-mirror-n-');
    try {
      const small = d.path('small.qcow2');
      qemuImg('create', '-q', '-f', 'qcow2', small, String(64 * MiB));
      qemuIo(small, ['write -P 0x11 0 8M', 'write -z 2M 1M', 'write -P 0 20M 2M', 'write -P 0x12 30M 12345']);
      const dst = d.path('dst.qcow2');
      qemuImg('create', '-q', '-f', 'qcow2', dst, String(64 * MiB));
      qemuIo(dst, ['write -P 0xa5 0 64M', 'write -P 0x11 4M 1M']);
      const r = await mirrorAgain(small, dst, 'qcow2');
      expectClean(dst);
      expectSameContent(small, dst);
      expect(r.bytesZeroed).toBeGreaterThan(0);
      // Mirroring once more writes nothing (zeros again at most in the one partly written cluster).
      const again = await mirrorAgain(small, dst, 'qcow2');
      expect({ written: again.bytesWritten, zeroedWithinLimit: again.bytesZeroed <= 64 * 1024 }).toEqual({ written: 0, zeroedWithinLimit: true });
    } finally {
      d.cleanup();
    }
  });

  it('--sync top of an overlay: the target gets the same backing file and reads identically', async () => {
    const d = tempDir('strata-mirror-top-');
    try {
      const base = d.path('base.qcow2');
      const top = d.path('top.qcow2');
      qemuImg('create', '-q', '-f', 'qcow2', base, String(256 * MiB));
      qemuIo(base, ['write -P 0x31 0 32M', 'write -P 0x32 100M 16M', 'write -P 0x33 250M 6M']);
      qemuImg('create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', top);
      qemuIo(top, ['write -P 0x41 1M 2M', 'write -z 8M 1M', 'write -P 0 104M 1M', 'write -P 0x42 180M 3M', 'write -P 0x43 255M 12345']);
      const dst = d.path('dst.qcow2');
      await strataOk('mirror', '--sync', 'top', top, dst);
      expectClean(dst);
      const info = qemuInfo(dst);
      expect({ backing: info['backing-filename'], fmt: info['backing-filename-format'] }).toEqual({ backing: 'base.qcow2', fmt: 'qcow2' });
      expectSameContent(top, dst);
      // Only the overlay's own data is in the target.
      const own = (f: string) => qemuMap(f).filter((e) => e.depth === 0 && e.data).reduce((n, e) => n + e.length, 0);
      console.log(`[mirror] --sync top: target ${allocatedBytes(dst)} bytes allocated, top ${allocatedBytes(top)}; own data ${own(dst)} vs ${own(top)}`);
      expect(own(dst)).toBeLessThanOrEqual(own(top));
      expect(allocatedBytes(dst)).toBeLessThanOrEqual(allocatedBytes(top) + 256 * 1024);
    } finally {
      d.cleanup();
    }
  });

  it('--sync top into another folder: the relative backing name is rewritten to lead to the same file', async () => {
    const d = tempDir('strata-mirror-top-dir-');
    try {
      mkdirSync(d.path('vms'));
      mkdirSync(d.path('backup'));
      qemuImg('create', '-q', '-f', 'qcow2', d.path('vms/base.qcow2'), '16M');
      qemuIo(d.path('vms/base.qcow2'), ['write -P 0x31 0 8M']);
      qemuImg('create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', d.path('vms/top.qcow2'));
      qemuIo(d.path('vms/top.qcow2'), ['write -P 0x41 1M 64k']);
      const dst = d.path('backup/top.qcow2');
      await strataOk('mirror', '--sync', 'top', d.path('vms/top.qcow2'), dst);
      expect(qemuInfo(dst)['backing-filename']).toBe('../vms/base.qcow2');
      expectClean(dst);
      expectSameContent(d.path('vms/top.qcow2'), dst);
    } finally {
      d.cleanup();
    }
  });

  it('the source was only read', () => {
    expect(fileHash(src)).toBe(srcHash);
  });

  it('sync full of an overlay flattens it (raw target)', async () => {
    const d = tempDir('strata-mirror-full-');
    try {
      const base = d.path('base.qcow2');
      const top = d.path('top.qcow2');
      qemuImg('create', '-q', '-f', 'qcow2', base, String(64 * MiB));
      qemuIo(base, ['write -P 0x31 0 8M', 'write -P 0x32 40M 4M']);
      qemuImg('create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', top);
      qemuIo(top, ['write -P 0x41 1M 2M', 'write -z 41M 1M', 'write -P 0x43 60M 12345']);
      const dst = d.path('dst.raw');
      await strataOk('mirror', '-O', 'raw', top, dst);
      expectSameContent(top, dst);
      expect(allocatedBytes(dst)).toBeLessThanOrEqual(12 * MiB);
    } finally {
      d.cleanup();
    }
  });
});
