// Preallocation against qemu-img: create -o preallocation=falloc|full (qcow2 and raw),
// extent_size_hint, and resize --preallocation=metadata|falloc|full. The files come out byte
// for byte as qemu-img's, with the same map, info and disk use; refusals change nothing.
import { statSync } from 'node:fs';
import { afterAll, expect, it } from 'vitest';
import { describeOracle, qemuImg, qemuImgRun, qemuIo, tempDir } from '../oracle/qemu';
import { sha256, strata } from './run-cli';

describeOracle('preallocation (create -o preallocation, extent_size_hint; resize --preallocation) as qemu-img', () => {
  const t = tempDir('strata-prealloc-');
  afterAll(() => t.cleanup());
  let n = 0;

  const expectSameImage = async (ours: string, theirs: string, fmt: string) => {
    expect(await sha256(ours)).toBe(await sha256(theirs));
    expect(qemuImg('map', '--output=json', '-f', fmt, ours)).toBe(qemuImg('map', '--output=json', '-f', fmt, theirs));
    const info = (f: string) => { const i = JSON.parse(qemuImg('info', '--output=json', '-f', fmt, f)); delete i.filename; delete i['actual-size']; return i; };
    expect(info(ours)).toStrictEqual(info(theirs));
    // Disk use (actual-size) within a file system block of qemu-img's.
    expect(Math.abs(statSync(ours).blocks - statSync(theirs).blocks)).toBeLessThanOrEqual(8);
    if (fmt === 'qcow2') expect(qemuImgRun('check', ours).status).toBe(0);
  };

  const creates: [string, string, string][] = [
    ['qcow2', 'preallocation=falloc', '3M'], ['qcow2', 'preallocation=full', '3M'],
    ['qcow2', 'preallocation=falloc,cluster_size=4k', '20M'], ['qcow2', 'preallocation=full,extended_l2=on', '5M'],
    ['qcow2', 'preallocation=falloc,refcount_bits=1,cluster_size=512', '3M'], ['qcow2', 'preallocation=falloc,compat=0.10', '2M'],
    ['raw', 'preallocation=falloc', '1M'], ['raw', 'preallocation=full', '1M'],
    ['raw', 'preallocation=falloc,extent_size_hint=2M', '1M'], ['qcow2', 'extent_size_hint=0', '1M'],
  ];
  for (const [fmt, o, size] of creates) {
    it(`create -f ${fmt} -o ${o} ${size}: the same file, and the same Formatting line`, async () => {
      const theirs = t.path(`c${n}.q`);
      const ours = t.path(`c${n}.s`);
      n++;
      const q = qemuImgRun('create', '-f', fmt, '-o', o, theirs, size);
      expect(q.status).toBe(0);
      const r = await strata('create', '-f', fmt, '-o', o, ours, size);
      expect(r.code, r.err).toBe(0);
      expect(r.out.replace(ours, 'F')).toBe(q.stdout.replace(theirs, 'F'));
      await expectSameImage(ours, theirs, fmt);
    });
  }

  const resizes: [string, string[], number, string][] = [
    ['64k clusters, within one L2 table', [], 1 << 20, '3M'],
    ['4k clusters, across L2 tables, unaligned end', ['-o', 'cluster_size=4k'], 1 << 20, '5000k'],
    ['a partly written cluster at the old end', ['-o', 'cluster_size=64k'], 1000 * 1024, '2M'],
  ];
  for (const [title, opts, from, to] of resizes) {
    for (const mode of ['metadata', 'falloc', 'full']) {
      it(`resize --preallocation=${mode}, ${title}: the same file`, async () => {
        const theirs = t.path(`r${n}.q`);
        const ours = t.path(`r${n}.s`);
        n++;
        for (const f of [theirs, ours]) {
          qemuImg('create', '-q', '-f', 'qcow2', ...opts, f, String(from));
          qemuIo(f, ['write -P 5 0 100k', `write -P 6 ${from - 24 * 1024} 20k`]);
        }
        expect(qemuImgRun('resize', `--preallocation=${mode}`, theirs, to).status).toBe(0);
        const r = await strata('resize', `--preallocation=${mode}`, ours, to);
        expect(r.code, r.err).toBe(0);
        expect(r.out).toBe('Image resized.\n');
        await expectSameImage(ours, theirs, 'qcow2');
      });
    }
  }

  it('resize --preallocation=falloc|full over a longer backing file (iotest 125): the same file, the backing data kept, zeros after', async () => {
    const base = t.path('base.raw');
    qemuImg('create', '-q', '-f', 'raw', base, '128k');
    qemuIo(base, ['write -q -P 1 0 128k'], { format: 'raw' });
    for (const mode of ['falloc', 'full']) {
      for (const from of ['31k', '33k']) {
        const theirs = t.path(`bk-${mode}-${from}.q`);
        const ours = t.path(`bk-${mode}-${from}.s`);
        for (const f of [theirs, ours]) qemuImg('create', '-q', '-f', 'qcow2', '-F', 'raw', '-b', base, '-o', 'cluster_size=64k', f, from);
        expect(qemuImgRun('resize', '-f', 'qcow2', `--preallocation=${mode}`, theirs, '96k').status).toBe(0);
        expect((await strata('resize', '-f', 'qcow2', `--preallocation=${mode}`, ours, '96k')).code).toBe(0);
        await expectSameImage(ours, theirs, 'qcow2');
        expect(statSync(ours).size).toBe(65536 * 7);
      }
    }
  });

  it('resize --preallocation with extended L2 over a longer backing file (iotest 271): zeros after the old end, never the backing data', async () => {
    const base = t.path('base271.raw');
    qemuImg('create', '-q', '-f', 'raw', base, '1M');
    qemuIo(base, ['write -q -P 0xff 0 1M'], { format: 'raw' });
    for (const mode of ['metadata', 'falloc', 'full']) {
      const theirs = t.path(`x-${mode}.q`);
      const ours = t.path(`x-${mode}.s`);
      for (const f of [theirs, ours]) qemuImg('create', '-q', '-f', 'qcow2', '-o', 'extended_l2=on', '-F', 'raw', '-b', base, f, '503k');
      expect(qemuImgRun('resize', `--preallocation=${mode}`, theirs, '1013k').status).toBe(0);
      expect((await strata('resize', `--preallocation=${mode}`, ours, '1013k')).code).toBe(0);
      qemuIo(ours, ['read -q -P 0xff 0 503k', 'read -q -P 0 503k 510k']);
      expect(qemuImg('map', '--output=json', ours)).toBe(qemuImg('map', '--output=json', theirs));
      expect(qemuImgRun('compare', ours, theirs).status).toBe(0);
      expect(qemuImgRun('check', ours).status).toBe(0);
      // falloc and full: byte for byte (metadata differs in L2 bits the map does not show).
      if (mode !== 'metadata') expect(await sha256(ours)).toBe(await sha256(theirs));
    }
  });

  it('resize --preallocation=falloc|full of a raw image', async () => {
    for (const mode of ['falloc', 'full']) {
      const theirs = t.path(`raw-${mode}.q`);
      const ours = t.path(`raw-${mode}.s`);
      for (const f of [theirs, ours]) qemuImg('create', '-q', '-f', 'raw', f, '1M');
      expect(qemuImgRun('resize', '-f', 'raw', `--preallocation=${mode}`, theirs, '3M').status).toBe(0);
      expect((await strata('resize', '-f', 'raw', `--preallocation=${mode}`, ours, '3M')).code).toBe(0);
      await expectSameImage(ours, theirs, 'raw');
    }
  });

  for (const [args, fmt] of [[['--preallocation=full', '--shrink'], 'qcow2'], [['--preallocation=foo'], 'qcow2'], [['--preallocation=metadata', '-f', 'raw'], 'raw']] as [string[], string][]) {
    it(`refuses resize ${args.join(' ')} as qemu-img, changing nothing`, async () => {
      const f = t.path(`bad${n++}`);
      qemuImg('create', '-q', '-f', fmt, f, '2M');
      const before = await sha256(f);
      const size = args.includes('--shrink') ? '1M' : '4M';
      const q = qemuImgRun('resize', ...args, f, size);
      expect(q.status).toBe(1);
      expect(await sha256(f)).toBe(before);
      const r = await strata('resize', ...args, f, size);
      expect(r.code).not.toBe(0);
      expect(r.err).toContain(q.stderr.trim().replace('qemu-img: ', ''));
      expect(await sha256(f)).toBe(before);
    });
  }
});
