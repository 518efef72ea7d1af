// strata dd against qemu-img dd: the same output (content, map, info), the same operand
// checks and refusals.
import { existsSync } from 'node:fs';
import { afterAll, expect, it } from 'vitest';
import { describeOracle, qemuImg, qemuImgRun, qemuIo, tempDir } from '../oracle/qemu';
import { sha256, strata } from './run-cli';

describeOracle('strata dd (as qemu-img dd)', () => {
  const t = tempDir('strata-dd-');
  afterAll(() => t.cleanup());
  const src = t.path('src.qcow2');
  qemuImg('create', '-q', '-f', 'qcow2', src, '1M');
  qemuIo(src, ['write -P 0x11 0 64k', 'write -P 0x22 300k 100k', 'write -z 500k 64k']);

  const cases: string[][] = [
    ['-O', 'qcow2', 'bs=4k', 'count=100', 'skip=3'],
    ['bs=64k'],
    ['-O', 'raw', 'count=7'],
    ['-O', 'qcow2', 'bs=1M', 'skip=0'],
    ['bs=512', 'skip=5000'],
  ];
  for (const [i, c] of cases.entries()) {
    it(`dd ${c.join(' ')}: same content, map and info as qemu-img's output`, async () => {
      const fmt = c.includes('qcow2') ? 'qcow2' : 'raw';
      const theirs = t.path(`q${i}.${fmt}`);
      const ours = t.path(`s${i}.${fmt}`);
      const q = qemuImgRun('dd', ...c, `if=${src}`, `of=${theirs}`);
      const r = await strata('dd', ...c, `if=${src}`, `of=${ours}`);
      expect(r.code).toBe(q.status);
      expect(r.err !== '').toBe(q.stderr !== '');
      expect(qemuImgRun('compare', '-f', fmt, '-F', fmt, ours, theirs).status).toBe(0);
      expect(qemuImg('map', '--output=json', '-f', fmt, ours)).toBe(qemuImg('map', '--output=json', '-f', fmt, theirs));
      const qi = JSON.parse(qemuImg('info', '--output=json', '-f', fmt, theirs));
      const si = JSON.parse(qemuImg('info', '--output=json', '-f', fmt, ours));
      expect({ ...si, filename: '', 'actual-size': 0 }).toStrictEqual({ ...qi, filename: '', 'actual-size': 0 });
      if (fmt === 'qcow2') expect(qemuImgRun('check', ours).status).toBe(0);
    });
  }

  it('--image-opts names the input as an option string', async () => {
    const ours = t.path('opts.raw');
    const r = await strata('dd', '--image-opts', `if=driver=qcow2,file.filename=${src}`, `of=${ours}`);
    expect(r).toMatchObject({ code: 0 });
    expect(qemuImgRun('compare', '-F', 'raw', src, ours).status).toBe(0);
    expect((await strata('dd', '--image-opts', '-f', 'qcow2', `if=driver=qcow2,file.filename=${src}`, `of=${ours}`)).code).not.toBe(0);
  });

  for (const bad of [['if=x'], [`if=${src}`, 'bs=0', 'of=o'], [`if=${src}`, 'foo=1', 'of=o'], [`if=${src}`, 'junk', 'of=o'], [`if=${src}`, 'count=1Q', 'of=o']]) {
    it(`refuses ${bad.join(' ')} as qemu-img does, creating nothing`, async () => {
      const before = await sha256(src);
      const out = t.path('never.raw');
      const args = bad.map((a) => (a === 'of=o' ? `of=${out}` : a));
      const q = qemuImgRun('dd', ...args);
      expect(q.status).toBe(1);
      const r = await strata('dd', ...args);
      expect(r.code).not.toBe(0);
      expect(existsSync(out)).toBe(false);
      expect(await sha256(src)).toBe(before);
    });
  }

  it('a missing input creates no output', async () => {
    const out = t.path('none.raw');
    expect((await strata('dd', `if=${t.path('missing')}`, `of=${out}`)).code).toBe(1);
    expect(existsSync(out)).toBe(false);
  });
});
