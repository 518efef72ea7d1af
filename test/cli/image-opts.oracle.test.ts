// --image-opts against qemu-img: names given as option strings open the same image, for the
// commands qemu-img takes them on, and -f with them is refused as by qemu-img.
import { copyFileSync } from 'node:fs';
import { afterAll, expect, it } from 'vitest';
import { describeOracle, qemuImg, qemuImgRun, qemuIo, tempDir } from '../oracle/qemu';
import { sha256, strata } from './run-cli';
import { imageOptsName } from '../../core/chain/names';

describeOracle('--image-opts (as qemu-img)', () => {
  const t = tempDir('strata-image-opts-');
  afterAll(() => t.cleanup());
  const base = t.path('base.qcow2');
  const img = t.path('img.qcow2');
  qemuImg('create', '-q', '-f', 'qcow2', base, '4M');
  qemuIo(base, ['write -P 1 0 1M']);
  qemuImg('create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', img, '4M');
  qemuIo(img, ['write -P 2 1M 64k']);
  const opts = `driver=qcow2,file.driver=file,file.filename=${img}`;

  it('parses option strings as QEMU does (",," is a comma, a bare first part is file=)', () => {
    expect(JSON.parse(imageOptsName('driver=qcow2,file.filename=a,,b').slice(5))).toStrictEqual({ driver: 'qcow2', file: { filename: 'a,b' } });
    expect(JSON.parse(imageOptsName('x.qcow2,driver=raw').slice(5))).toStrictEqual({ file: 'x.qcow2', driver: 'raw' });
  });

  for (const cmd of [['info', '--output=json'], ['info', '--output=json', '--backing-chain'], ['map', '--output=json'], ['check', '--output=json']]) {
    it(`${cmd.join(' ')} --image-opts prints what qemu-img prints`, async () => {
      const q = qemuImgRun(...cmd, '--image-opts', opts);
      const r = await strata(...cmd, '--image-opts', opts);
      expect(r.code).toBe(q.status);
      const norm = (s: string) => JSON.parse(s);
      expect(norm(r.out)).toStrictEqual(norm(q.stdout));
    });
  }

  it('compare, measure and snapshot take option strings too', async () => {
    const raw = t.path('img.raw');
    qemuImg('convert', '-O', 'raw', img, raw);
    const c = await strata('compare', '--image-opts', opts, `driver=raw,file.filename=${raw}`);
    expect(c.code).toBe(qemuImgRun('compare', '--image-opts', opts, `driver=raw,file.filename=${raw}`).status);
    expect(c.code).toBe(0);
    const m = await strata('measure', '--output=json', '-O', 'qcow2', '--image-opts', opts);
    expect(JSON.parse(m.out)).toStrictEqual(JSON.parse(qemuImg('measure', '--output=json', '-O', 'qcow2', '--image-opts', opts)));
    const copy = t.path('snap.qcow2');
    copyFileSync(img, copy);
    expect((await strata('snapshot', '-c', 's1', '--image-opts', `driver=qcow2,file.filename=${copy}`)).code).toBe(0);
    expect(qemuImg('snapshot', '-l', copy)).toContain('s1');
  });

  it('-f with --image-opts is refused, as by qemu-img, and nothing is written', async () => {
    const before = await sha256(img);
    const q = qemuImgRun('info', '-f', 'qcow2', '--image-opts', opts);
    expect(q.status).toBe(1);
    for (const cmd of [['info'], ['check'], ['resize', '--image-opts', '-f', 'qcow2', opts, '8M']]) {
      const args = cmd.length > 1 ? cmd : [...cmd, '-f', 'qcow2', '--image-opts', opts];
      const r = await strata(...args);
      expect(r.code).not.toBe(0);
      expect(r.err).toContain('--image-opts and --format are mutually exclusive');
    }
    expect(await sha256(img)).toBe(before);
  });

  it('resize --image-opts grows the image qemu-img names', async () => {
    const f = t.path('grow.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', f, '1M');
    expect((await strata('resize', '--image-opts', `driver=qcow2,file.filename=${f}`, '2M')).code).toBe(0);
    expect(JSON.parse(qemuImg('info', '--output=json', f))['virtual-size']).toBe(2 << 20);
  });
});
