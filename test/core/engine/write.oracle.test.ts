// Differential tests of the write path: the same random guest I/O through qemu-io on one image
// and `strata io` on another must give identical content, and ours must pass qemu-img check.
import { expect, it } from 'vitest';
import { rng } from '../jobs/helpers';
import { describeOracle, qemuImg, qemuImgRun, qemuIo, tempDir } from '../../oracle/qemu';
import { run } from '../../../cli/main';
import { randomOps } from '../../oracle/random-io';

async function strataIo(file: string, cmds: string[]): Promise<void> {
  let err = '';
  const code = await run(['io', ...cmds.flatMap((c) => ['-c', c]), file], { out: () => {}, err: (s) => { err += s; }, isTTY: false });
  if (code !== 0) throw new Error(`strata io failed (${code}): ${err}`);
}

interface Case {
  name: string;
  cluster: number;
  extendedL2?: boolean;
  refcountBits: number;
  backing?: boolean;
  size?: number;
  ops?: number;
  maxLen?: number;
}

const CASES: Case[] = [
  { name: '4k clusters, refcount 16', cluster: 4096, refcountBits: 16 },
  { name: '64k clusters, refcount 1', cluster: 65536, refcountBits: 1 },
  { name: '64k clusters, refcount 4, backing', cluster: 65536, refcountBits: 4, backing: true },
  { name: '2M clusters, refcount 64', cluster: 2 << 20, refcountBits: 64, maxLen: 5 << 20 },
  { name: '64k extended L2, refcount 16', cluster: 65536, extendedL2: true, refcountBits: 16 },
  { name: '64k extended L2, backing', cluster: 65536, extendedL2: true, refcountBits: 16, backing: true },
  { name: '2M extended L2, refcount 64, backing', cluster: 2 << 20, extendedL2: true, refcountBits: 64, backing: true, maxLen: 5 << 20 },
  { name: '4k clusters, refcount 64: grows past the first refcount block', cluster: 4096, refcountBits: 64, ops: 60, maxLen: 1 << 20 },
  { name: '512 B clusters, refcount 64: grows the refcount table', cluster: 512, refcountBits: 64, size: 16 << 20, ops: 60, maxLen: 1 << 20 },
  { name: '4k clusters with backing: many L2 tables', cluster: 4096, refcountBits: 16, backing: true },
];

describeOracle('write path against qemu-io', () => {
  for (const c of CASES) {
    it(c.name, async () => {
      const t = tempDir();
      try {
        const size = c.size ?? 64 << 20;
        const opts = [`cluster_size=${c.cluster}`, `refcount_bits=${c.refcountBits}`, `extended_l2=${c.extendedL2 ? 'on' : 'off'}`];
        const base = t.path('base.qcow2');
        if (c.backing) {
          qemuImg('create', '-f', 'qcow2', base, String(size));
          const r = rng(7);
          const fill: string[] = [];
          for (let i = 0; i < 20; i++) fill.push(`write -P ${0x40 + i} ${Math.floor(r() * (size - (1 << 20)))} ${1 + Math.floor(r() * (1 << 20))}`);
          qemuIo(base, fill);
          opts.push(`backing_file=${base}`, 'backing_fmt=qcow2');
        }
        const a = t.path('qemu.qcow2');
        const b = t.path('strata.qcow2');
        qemuImg('create', '-f', 'qcow2', '-o', opts.join(','), a, String(size));
        qemuImg('create', '-f', 'qcow2', '-o', opts.join(','), b, String(size));
        const r = rng(c.cluster + c.refcountBits * 7 + (c.extendedL2 ? 1 : 0) + (c.backing ? 2 : 0));
        // Compressed writes first, on fresh clusters (qemu-io refuses to overwrite with -c).
        const pre = [0, 3, 5].map((k) => `write -c -P ${0x70 + k} ${k * c.cluster} ${c.cluster}`);
        qemuIo(a, pre);
        await strataIo(b, pre);
        for (let batch = 0; batch < 3; batch++) {
          const ops = randomOps(r, size, c.ops ?? 30, c.maxLen ?? 3 * c.cluster);
          qemuIo(a, ops);
          await strataIo(b, ops);
          const check = qemuImgRun('check', '--output=json', b);
          expect(check.status, `qemu-img check after batch ${batch}: ${check.stdout}${check.stderr}`).toBe(0);
          const cmp = qemuImgRun('compare', a, b);
          expect(cmp.stdout + cmp.stderr, `batch ${batch}: ${ops.join('; ')}`).toContain('Images are identical');
        }
      } finally {
        t.cleanup();
      }
    });
  }
});
