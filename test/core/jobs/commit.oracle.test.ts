// Commit against qemu-img: the base ends up holding what the overlay showed, the chain keeps
// reading the same, the emptied overlay shrinks to a few clusters (or keeps its content with
// -d / -b), internal snapshots survive (falling back to discarding), and a base other overlays
// depend on is refused without --force (and named in a warning with it).
import { execFileSync } from 'node:child_process';
import { mkdirSync } from 'node:fs';
import { expect, it } from 'vitest';
import { describeOracle, qemuImg, qemuIo, tempDir } from '../../oracle/qemu';
import { commit } from '../../../core/jobs/commit';
import {
  allocatedBytes, expectClean, fileHash, fileSize, guestHash, KiB, MiB, qemuInfo, qemuIoMismatches, qemuMap, rng, strata, strataOk,
} from './helpers';

const SIZE = 256 * MiB;

function cpSparse(from: string, to: string): void {
  execFileSync('cp', ['--sparse=always', from, to]);
}

/** ~50 MiB of overlay data: 2 MiB pieces at unaligned offsets, small writes and zero writes. */
function topWrites(seed: number): string[] {
  const r = rng(seed);
  const cmds: string[] = [];
  // 24 slots of 10 MiB, each with a 2 MiB write at an unaligned offset inside it.
  for (let i = 0; i < 24; i++) cmds.push(`write -P ${0x40 + i} ${i * 10 * MiB + 1 + Math.floor(r() * 7 * MiB)} ${2 * MiB}`);
  for (let i = 0; i < 200; i++) cmds.push(`write -P ${0x90 + (i % 50)} ${Math.floor(r() * (SIZE - 16 * KiB))} ${1 + Math.floor(r() * 12 * KiB)}`);
  // Zeros over base data must reach the base as zeros.
  cmds.push('write -z 4M 1M', 'write -z 130M 65537', 'write -P 0xfe 255M 1M');
  return cmds;
}

function makeBase(path: string, opts: string): void {
  qemuImg('create', '-q', '-f', 'qcow2', '-o', opts, path, String(SIZE));
  qemuIo(path, ['write -P 0x11 0 32M', 'write -P 0x12 128M 32M', 'write -P 0x13 200M 3000']);
}

describeOracle('commit against qemu-img', () => {
  for (const v of [
    { name: '64 KiB base and top', base: 'cluster_size=64k', top: 'cluster_size=64k' },
    { name: 'extended-L2 base', base: 'cluster_size=128k,extended_l2=on', top: 'cluster_size=64k' },
    { name: '4 KiB-cluster top', base: 'cluster_size=64k', top: 'cluster_size=4k' },
  ]) {
    it(`50 MiB overlay into a 256 MiB base (${v.name}): base holds it, top reads the same and shrinks`, async () => {
      const t = tempDir();
      try {
        const base = t.path('base.qcow2');
        const top = t.path('top.qcow2');
        makeBase(base, v.base);
        qemuImg('create', '-q', '-f', 'qcow2', '-o', v.top, '-b', 'base.qcow2', '-F', 'qcow2', top);
        qemuIo(top, topWrites(21));
        // The same commit by qemu-img on a copy, for the numbers.
        mkdirSync(t.path('q'));
        cpSparse(base, t.path('q/base.qcow2'));
        cpSparse(top, t.path('q/top.qcow2'));
        const before = guestHash(top);
        const topBefore = allocatedBytes(top);

        const t0 = Date.now();
        const res = await commit({}, top);
        const ms = Date.now() - t0;
        const t1 = Date.now();
        qemuImg('commit', '-q', t.path('q/top.qcow2'));
        const qms = Date.now() - t1;

        expect(res.emptied).toBe('fresh-metadata');
        expect(res.otherDependents).toEqual([]);
        expectClean(base);
        expectClean(top);
        expect(guestHash(base)).toBe(before);
        expect(guestHash(top)).toBe(before);
        expect(qemuInfo(top)['backing-filename']).toBe('base.qcow2');
        // Nothing left in the overlay itself.
        expect(qemuMap(top).filter((e) => e.depth === 0)).toEqual([]);
        console.log(`[commit ${v.name}] top before ${topBefore} B allocated; after: file ${fileSize(top)} B, allocated ${allocatedBytes(top)} B ` +
          `(qemu-img commit: file ${fileSize(t.path('q/top.qcow2'))} B, allocated ${allocatedBytes(t.path('q/top.qcow2'))} B); ` +
          `base allocated strata ${allocatedBytes(base)} B vs qemu-img ${allocatedBytes(t.path('q/base.qcow2'))} B; ` +
          `bytesCopied ${res.bytesCopied}; time strata ${ms} ms, qemu-img ${qms} ms`);
        expect(fileSize(top)).toBeLessThanOrEqual(1 * MiB);
        expect(allocatedBytes(top)).toBeLessThanOrEqual(1 * MiB);
      } finally {
        t.cleanup();
      }
    });
  }

  it('-d keeps the overlay exactly as it was', async () => {
    const t = tempDir();
    try {
      const base = t.path('base.qcow2');
      const top = t.path('top.qcow2');
      qemuImg('create', '-q', '-f', 'qcow2', base, '32M');
      qemuIo(base, ['write -P 0x11 0 16M']);
      qemuImg('create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', top);
      qemuIo(top, ['write -P 0x21 1M 3M', 'write -z 8M 1M', 'write -P 0x22 20M 12345', 'write -P 0x23 5000 3']);
      const before = guestHash(top);
      const bytes = fileHash(top);
      const alloc = allocatedBytes(top);
      const map = qemuMap(top).filter((e) => e.depth === 0);
      const r = await strataOk('commit', '-d', top);
      expect(r.out).toBe('Image committed.\n');
      expect(r.err).toBe('');
      expectClean(base);
      expectClean(top);
      expect(guestHash(base)).toBe(before);
      expect(guestHash(top)).toBe(before);
      expect(fileHash(top)).toBe(bytes);
      expect(allocatedBytes(top)).toBe(alloc);
      expect(qemuMap(top).filter((e) => e.depth === 0)).toEqual(map);
    } finally {
      t.cleanup();
    }
  });

  /** base <- mid <- top, each layer with its own data. */
  function threeLayers(path: (n: string) => string): { base: string; mid: string; top: string } {
    const base = path('base.qcow2');
    const mid = path('mid.qcow2');
    const top = path('top.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', base, '32M');
    qemuIo(base, ['write -P 0x11 0 24M']);
    qemuImg('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=16k', '-b', 'base.qcow2', '-F', 'qcow2', mid);
    qemuIo(mid, ['write -P 0x21 2M 4M', 'write -z 10M 1M', 'write -P 0x22 28M 100000']);
    qemuImg('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=64k,extended_l2=on', '-b', 'mid.qcow2', '-F', 'qcow2', top);
    qemuIo(top, ['write -P 0x31 3M 2M', 'write -P 0x32 12M 777', 'write -z 2M 64k', 'write -P 0x33 31M 1M']);
    return { base, mid, top };
  }

  for (const how of ['absolute path', "the chain's relative name"]) {
    it(`-b commits a three-layer chain into the grandparent and keeps the top (base given as ${how})`, async () => {
      const t = tempDir();
      try {
        const { base, mid, top } = threeLayers(t.path);
        const before = guestHash(top);
        const topBytes = fileHash(top);
        const midBytes = fileHash(mid);
        // qemu-img resolves a relative -b against the overlay's folder, not the cwd.
        const r = await strataOk('commit', '-b', how === 'absolute path' ? base : 'base.qcow2', top);
        expect(r.out).toBe('Image committed.\n');
        for (const f of [base, mid, top]) expectClean(f);
        expect(guestHash(base)).toBe(before);
        expect(guestHash(top)).toBe(before);
        expect(fileHash(top)).toBe(topBytes);
        expect(fileHash(mid)).toBe(midBytes);
      } finally {
        t.cleanup();
      }
    });
  }

  it('zero ranges smaller than a base cluster reach the base as zeros', async () => {
    const t = tempDir();
    try {
      const base = t.path('base.qcow2');
      const top = t.path('top.qcow2');
      qemuImg('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=64k', base, '8M');
      qemuIo(base, ['write -P 0x11 0 8M']);
      qemuImg('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4k', '-b', 'base.qcow2', '-F', 'qcow2', top);
      // Cluster-aligned starts shorter than a base cluster, an unaligned one, a whole cluster,
      // and an aligned start running past a cluster end.
      qemuIo(top, ['write -z 64k 4k', 'write -z 200k 4k', 'write -z 1M 64k', 'write -z 2M 68k', 'write -z 3M 8k', 'write -P 0x22 3M 4k']);
      const before = guestHash(top);
      const res = await commit({}, top);
      expect(res.emptied).toBe('fresh-metadata');
      expectClean(base);
      expectClean(top);
      expect(qemuIoMismatches(base, ['read -P 0 64k 4k', 'read -P 0 200k 4k', 'read -P 0 1M 64k', 'read -P 0 2M 68k', 'read -P 0x22 3M 4k', 'read -P 0 3076k 4k'])).toEqual([]);
      expect(guestHash(base)).toBe(before);
      expect(guestHash(top)).toBe(before);
    } finally {
      t.cleanup();
    }
  });

  it('into a base smaller than the overlay: the base grows to the overlay size', async () => {
    const t = tempDir();
    try {
      const base = t.path('base.qcow2');
      const top = t.path('top.qcow2');
      qemuImg('create', '-q', '-f', 'qcow2', base, '8M');
      qemuIo(base, ['write -P 0x11 0 8M']);
      qemuImg('create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', top, '24M');
      qemuIo(top, ['write -P 0x21 7M 2M', 'write -P 0x22 20M 1M', 'write -P 0x23 1M 4096']);
      const before = guestHash(top);
      const res = await commit({}, top);
      expect(res.emptied).toBe('fresh-metadata');
      expectClean(base);
      expectClean(top);
      expect(qemuInfo(base)['virtual-size']).toBe(24 * MiB);
      expect(guestHash(base)).toBe(before);
      expect(guestHash(top)).toBe(before);
      expect(fileSize(top)).toBeLessThanOrEqual(1 * MiB);
    } finally {
      t.cleanup();
    }
  });

  it('a top with an internal snapshot keeps it unchanged and falls back to discarding', async () => {
    const t = tempDir();
    try {
      const base = t.path('base.qcow2');
      const top = t.path('top.qcow2');
      qemuImg('create', '-q', '-f', 'qcow2', base, '32M');
      qemuIo(base, ['write -P 0x11 0 20M']);
      qemuImg('create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', top);
      qemuIo(top, ['write -P 0x21 1M 2M', 'write -P 0x22 8M 1M', 'write -P 0x23 24M 512k', 'write -z 16M 64k']);
      qemuImg('snapshot', '-c', 'S', top);
      // After the snapshot, write only inside clusters S allocates, so S's view through the
      // chain is hidden from what the commit changes in the base.
      qemuIo(top, ['write -P 0x31 1100000 300000', 'write -P 0x32 8M 4096', 'write -z 24M 64k', 'write -P 0x33 16M 100']);
      const before = guestHash(top);
      const snapChain = guestHash(top, { snapshot: 'S' });
      const snapAlone = guestHash(top, { snapshot: 'S', alone: true });
      expect(snapChain).not.toBe(before);

      const res = await commit({}, top);
      expect(res.emptied).toBe('discard');
      expectClean(base);
      expectClean(top);
      expect(guestHash(base)).toBe(before);
      expect(guestHash(top)).toBe(before);
      expect((qemuInfo(top).snapshots ?? []).map((s) => s.name)).toEqual(['S']);
      expect(guestHash(top, { snapshot: 'S', alone: true })).toBe(snapAlone);
      expect(guestHash(top, { snapshot: 'S' })).toBe(snapChain);
      // The active layer no longer holds data of its own.
      expect(qemuMap(top).filter((e) => e.depth === 0 && e.data)).toEqual([]);
      // And the snapshot still applies (by qemu-img) to what it was.
      qemuImg('snapshot', '-a', 'S', top);
      expectClean(top);
      expect(guestHash(top)).toBe(snapChain);
    } finally {
      t.cleanup();
    }
  });

  it('refuses without --force when another overlay in the base folder depends on the base; warns with it', async () => {
    const t = tempDir();
    try {
      const base = t.path('base.qcow2');
      const top = t.path('top.qcow2');
      const other = t.path('other.qcow2');
      qemuImg('create', '-q', '-f', 'qcow2', base, '8M');
      qemuIo(base, ['write -P 0x11 0 4M']);
      qemuImg('create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', top);
      qemuImg('create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', other);
      // Not a dependent: an overlay of the top, and an unrelated image.
      qemuImg('create', '-q', '-f', 'qcow2', '-b', 'top.qcow2', '-F', 'qcow2', t.path('above.qcow2'));
      qemuImg('create', '-q', '-f', 'qcow2', t.path('unrelated.qcow2'), '8M');
      qemuIo(top, ['write -P 0x21 1M 1M']);
      const before = guestHash(top);
      const hashes = [base, top, other].map((f) => fileHash(f));
      const refused = await strata('commit', top);
      expect(refused.code).toBe(2);
      expect(refused.err.trim().split('\n')).toHaveLength(1);
      expect(refused.err).toContain('other.qcow2');
      expect(refused.err).toContain('--force');
      expect([base, top, other].map((f) => fileHash(f))).toEqual(hashes);
      const r = await strata('commit', '--force', top);
      expect(r.code).toBe(0);
      expect(r.out).toBe('Image committed.\n');
      expect(r.err).toMatch(/warning/);
      expect(r.err).toContain('other.qcow2');
      expect(r.err).not.toMatch(/above\.qcow2|unrelated\.qcow2|top\.qcow2/);
      expect(r.err.trim().split('\n')).toHaveLength(1);
      for (const f of [base, top, other]) expectClean(f);
      expect(guestHash(top)).toBe(before);
      expect(guestHash(base)).toBe(before);

      // No warning when nothing else depends on the base.
      qemuImg('rebase', '-u', '-b', 'unrelated.qcow2', '-F', 'qcow2', other);
      qemuIo(top, ['write -P 0x22 5M 1M']);
      const r2 = await strata('commit', top);
      expect(r2.code).toBe(0);
      expect(r2.err).toBe('');
    } finally {
      t.cleanup();
    }
  });
});
