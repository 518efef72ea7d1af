// qcow2 images with an external data file (data_file=, data_file_raw=on): the same random
// guest I/O through qemu-io on one image and `strata io` on another gives the same content, the
// same map and the same data file; both pass qemu-img check, and each side reads what the
// other wrote. Guest clusters live in the data file at their guest offset, without refcounts.
import { closeSync, openSync, readFileSync, readSync, statSync, writeSync } from 'node:fs';
import { expect, it } from 'vitest';
import { rng } from '../jobs/helpers';
import { describeOracle, qemuImg, qemuImgRun, qemuIo, tempDir } from '../../oracle/qemu';
import { asQemuImg, strata } from '../../cli/run-cli';
import { randomOps } from '../../oracle/random-io';

async function strataIo(file: string, cmds: string[]): Promise<string> {
  const r = await strata('io', ...cmds.flatMap((c) => ['-c', c]), file);
  if (r.code !== 0) throw new Error(`strata io failed (${r.code}): ${r.err}`);
  return r.out;
}

interface Case { name: string; opts: string; backing?: boolean }

const CASES: Case[] = [
  { name: 'data file, 64k clusters', opts: 'cluster_size=65536' },
  { name: 'data file, 4k clusters, over a backing file', opts: 'cluster_size=4096', backing: true },
  { name: 'data file, extended L2', opts: 'cluster_size=65536,extended_l2=on' },
  { name: 'raw data file (data_file_raw=on)', opts: 'cluster_size=65536,data_file_raw=on' },
];

describeOracle('external data files against qemu-io', () => {
  for (const c of CASES) {
    it(`${c.name}: same content, map and data file; qemu-img check passes`, async () => {
      const t = tempDir();
      try {
        const size = 16 << 20;
        const mk = (img: string, data: string) => {
          const args = ['create', '-q', '-f', 'qcow2', '-o', `${c.opts},data_file=${data}`];
          if (c.backing) args.push('-b', t.path('base.qcow2'), '-F', 'qcow2');
          qemuImg(...args, img, String(size));
        };
        if (c.backing) {
          qemuImg('create', '-q', '-f', 'qcow2', t.path('base.qcow2'), String(size));
          qemuIo(t.path('base.qcow2'), ['write -P 0x41 0 3M', 'write -P 0x42 9M 2M']);
        }
        const a = t.path('qemu.qcow2');
        const b = t.path('strata.qcow2');
        mk(a, t.path('qemu.data'));
        mk(b, t.path('strata.data'));
        const r = rng(c.opts.length * 31 + (c.backing ? 1 : 0));
        for (let batch = 0; batch < 3; batch++) {
          const ops = randomOps(r, size, 25, 300 << 10);
          qemuIo(a, ops);
          await strataIo(b, ops);
          const check = qemuImgRun('check', b);
          expect(check.status, `qemu-img check after batch ${batch}: ${check.stdout}${check.stderr}`).toBe(0);
          const cmp = qemuImgRun('compare', a, b);
          expect(cmp.stdout + cmp.stderr, `batch ${batch}: ${ops.join('; ')}`).toContain('Images are identical');
          const map = (img: string) => qemuImg('map', '--output=json', img);
          expect(map(b)).toBe(map(a));
        }
        // The same bytes at the same offsets of the data files (the qcow2 files differ only in
        // the data file name they record).
        expect(statSync(t.path('strata.data')).size).toBe(statSync(t.path('qemu.data')).size);
        expect(readFileSync(t.path('strata.data')).equals(readFileSync(t.path('qemu.data')))).toBe(true);
        if (c.opts.includes('data_file_raw=on')) {
          // Still a complete raw image of the disk.
          expect(qemuImg('compare', '-f', 'qcow2', '-F', 'raw', b, t.path('strata.data'))).toContain('Images are identical');
          expect(qemuImg('info', b)).toContain('data file raw: true');
        }
      } finally {
        t.cleanup();
      }
    });
  }

  it('reads what qemu-io wrote, and qemu-io reads what strata wrote', async () => {
    const t = tempDir();
    try {
      const img = t.path('img.qcow2');
      const data = t.path('img.data');
      qemuImg('create', '-q', '-f', 'qcow2', '-o', `data_file=${data}`, img, '4M');
      qemuIo(img, ['write -P 0x11 0 64k', 'write -P 0x12 200k 300k', 'write -z 1M 128k']);
      const out = await strataIo(img, ['read -P 0x11 0 64k', 'read -P 0x12 200k 300k', 'read -P 0 64k 136k', 'read -P 0 1M 128k']);
      expect(out).not.toContain('Pattern verification failed');
      await strataIo(img, ['write -P 0x21 3M 100k', 'write -P 0x22 0 4k']);
      const q = qemuIo(img, ['read -P 0x22 0 4k', 'read -P 0x11 4k 60k', 'read -P 0x21 3M 100k']);
      expect(q).not.toContain('Pattern verification failed');
      // Cluster 0 of the guest is at offset 0 of the data file (its L2 entry is offset 0, COPIED).
      expect(readFileSync(data).subarray(0, 4096).every((x) => x === 0x22)).toBe(true);
      expect(qemuImgRun('check', img).status).toBe(0);
    } finally {
      t.cleanup();
    }
  });

  it('compressed writes are refused with an external data file, as by qemu-io, and nothing changes', async () => {
    const t = tempDir();
    try {
      const img = t.path('img.qcow2');
      qemuImg('create', '-q', '-f', 'qcow2', '-o', `data_file=${t.path('d')}`, img, '1M');
      const before = readFileSync(img);
      const r = await strata('io', '-c', 'write -c -P 1 0 64k', img);
      expect(r.code).not.toBe(0);
      expect(r.err).toMatch(/compressed clusters cannot be written to an image with an external data file/);
      expect(readFileSync(img).equals(before)).toBe(true);
      expect(qemuImgRun('check', img).status).toBe(0);
    } finally {
      t.cleanup();
    }
  });

  it('check reports what qemu-img check reports: data clusters without refcounts, a compressed entry is an error', async () => {
    const t = tempDir();
    try {
      const img = t.path('img.qcow2');
      qemuImg('create', '-q', '-f', 'qcow2', '-o', `data_file=${t.path('img.data')}`, img, '4M');
      qemuIo(img, ['write -P 1 0 64k', 'write -P 2 1M 128k']);
      const same = async () => {
        for (const args of [['check'], ['check', '--output=json']]) {
          const q = qemuImgRun(...args, img);
          const s = await asQemuImg(...args, img);
          expect(s.code).toBe(q.status);
          expect(s.out).toBe(q.stdout);
          expect(s.err).toBe(q.stderr);
        }
      };
      await same();
      // Entry 16 (guest 1M) of the first L2 table turned into a compressed descriptor.
      const fd = openSync(img, 'r+');
      try {
        const h = Buffer.alloc(48);
        readSync(fd, h, 0, 48, 0);
        const l1 = Buffer.alloc(8);
        readSync(fd, l1, 0, 8, Number(h.readBigUInt64BE(40)));
        const l2 = Number(l1.readBigUInt64BE(0) & 0x00fffffffffffe00n);
        const e = Buffer.alloc(8);
        e.writeBigUInt64BE(0x4000000000100000n);
        writeSync(fd, e, 0, 8, l2 + 16 * 8);
      } finally {
        closeSync(fd);
      }
      await same();
      expect(qemuImgRun('check', img).stderr).toContain('ERROR compressed cluster 16 with data file');
    } finally {
      t.cleanup();
    }
  });
});
