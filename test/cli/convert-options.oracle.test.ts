// convert's qemu-img options beyond the basics, against qemu-img: several sources (read one
// after another), -C (copy offloading: data runs copied whole), --salvage (sectors that
// cannot be read become zeros, one warning each), --image-opts sources, and their refusals.
import { existsSync, openSync, readSync, writeSync, closeSync } from 'node:fs';
import { afterAll, expect, it } from 'vitest';
import { describeOracle, qemuImg, qemuImgRun, qemuIo, tempDir } from '../oracle/qemu';
import { sha256, strata } from './run-cli';

describeOracle('strata convert: several sources, -C, --salvage, --image-opts (as qemu-img)', () => {
  const t = tempDir('strata-convert-opts-');
  afterAll(() => t.cleanup());
  const a = t.path('a.qcow2');
  const b = t.path('b.raw');
  qemuImg('create', '-q', '-f', 'qcow2', a, '1M');
  qemuIo(a, ['write -P 1 0 64k', 'write -P 0 128k 64k', 'write -z 256k 64k']);
  qemuImg('create', '-q', '-f', 'raw', b, '512k');
  qemuIo(b, ['write -P 2 0 4k'], { format: 'raw' });

  const same = async (args: string[], fmt: string, tag: string) => {
    const theirs = t.path(`${tag}.q`);
    const ours = t.path(`${tag}.s`);
    const q = qemuImgRun('convert', ...args, theirs);
    expect(q.status).toBe(0);
    const r = await strata('convert', ...args, ours);
    expect(r.code, r.err).toBe(0);
    expect(qemuImgRun('compare', '-f', fmt, '-F', fmt, ours, theirs).status).toBe(0);
    expect(qemuImg('map', '--output=json', '-f', fmt, ours)).toBe(qemuImg('map', '--output=json', '-f', fmt, theirs));
    expect(JSON.parse(qemuImg('info', '--output=json', '-f', fmt, ours))['virtual-size']).toBe(JSON.parse(qemuImg('info', '--output=json', '-f', fmt, theirs))['virtual-size']);
    if (fmt === 'qcow2') expect(qemuImgRun('check', ours).status).toBe(0);
  };

  it('several sources are concatenated (qcow2 and raw targets)', async () => {
    await same(['-O', 'qcow2', a, b, a], 'qcow2', 'multi-qcow2');
    await same(['-f', 'qcow2', '-O', 'raw', a, a], 'raw', 'multi-raw');
  });

  it('-C copies data runs whole, zeros in them too (the same map as qemu-img -C)', async () => {
    await same(['-C', '-O', 'qcow2', a], 'qcow2', 'C-qcow2');
    await same(['-C', '-O', 'raw', a], 'raw', 'C-raw');
    // Without -C the zero-filled data cluster is not copied: -C really changes the map.
    const plain = t.path('plain.qcow2');
    await strata('convert', '-O', 'qcow2', a, plain);
    expect(qemuImg('map', '--output=json', plain)).not.toBe(qemuImg('map', '--output=json', t.path('C-qcow2.s')));
  });

  it('--image-opts names the sources as option strings', async () => {
    await same(['--image-opts', '-O', 'qcow2', `driver=qcow2,file.filename=${a}`, `driver=raw,file.filename=${b}`], 'qcow2', 'opts');
  });

  it('--salvage turns unreadable sectors into zeros with qemu-img\'s warnings; without it the convert fails', async () => {
    const c0 = t.path('c0.qcow2');
    const c = t.path('c.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', c0, '1M');
    qemuIo(c0, ['write -P 7 0 1M']);
    qemuImg('convert', '-c', '-O', 'qcow2', c0, c);
    // Damage the second compressed cluster's data.
    const fd = openSync(c, 'r+');
    const h = Buffer.alloc(104);
    readSync(fd, h, 0, 104, 0);
    const e = Buffer.alloc(8);
    readSync(fd, e, 0, 8, Number(h.readBigUInt64BE(40)));
    const l2 = Number(e.readBigUInt64BE(0) & 0x00fffffffffffe00n);
    readSync(fd, e, 0, 8, l2 + 8);
    const off = Number(e.readBigUInt64BE(0) & ((1n << 54n) - 1n));
    writeSync(fd, Buffer.alloc(64, 0xff), 0, 64, off);
    closeSync(fd);
    const failed = t.path('failed.raw');
    expect(qemuImgRun('convert', '-O', 'raw', c, failed).status).toBe(1);
    const r0 = await strata('convert', '-O', 'raw', c, t.path('failed-s.raw'));
    expect(r0.code).toBe(1);
    expect(existsSync(t.path('failed-s.raw'))).toBe(false);
    const theirs = t.path('salv.q');
    const ours = t.path('salv.s');
    const q = qemuImgRun('convert', '--salvage', '-O', 'raw', c, theirs);
    const r = await strata('convert', '--salvage', '-O', 'raw', c, ours);
    expect(r.code).toBe(q.status);
    expect(await sha256(ours)).toBe(await sha256(theirs));
    const warnings = (s: string) => s.split('\n').filter((l) => l.includes('warning:')).map((l) => l.replace(/^[a-z-]+: /, ''));
    expect(warnings(r.err)).toStrictEqual(warnings(q.stderr));
    expect(warnings(r.err).length).toBe(128);
    // -q keeps the warnings quiet, as qemu-img's.
    expect((await strata('convert', '-q', '--salvage', '-O', 'raw', c, ours)).err).toBe('');
  });

  it('--salvage over metadata that cannot be read (an unaligned L2 table): the same output and read warnings as qemu-img', async () => {
    const c = t.path('l2.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', c, '2M');
    qemuIo(c, ['write -P 7 0 1M', 'write -P 8 1536k 64k']);
    const fd = openSync(c, 'r+');
    const h = Buffer.alloc(104);
    readSync(fd, h, 0, 104, 0);
    // L1[0] (the only L2 table) moved off its cluster boundary: nothing in it can be read.
    const e = Buffer.alloc(8);
    readSync(fd, e, 0, 8, Number(h.readBigUInt64BE(40)));
    e.writeBigUInt64BE(e.readBigUInt64BE(0) + 0x200n);
    writeSync(fd, e, 0, 8, Number(h.readBigUInt64BE(40)));
    closeSync(fd);
    const theirs = t.path('l2.q.raw');
    const ours = t.path('l2.s.raw');
    expect(qemuImgRun('convert', '-O', 'raw', c, theirs).status).toBe(1);
    expect((await strata('convert', '-O', 'raw', c, ours)).code).toBe(1);
    const q = qemuImgRun('convert', '--salvage', '-O', 'raw', c, theirs);
    const r = await strata('convert', '--salvage', '-O', 'raw', c, ours);
    expect(r.code).toBe(q.status);
    expect(r.code).toBe(0);
    expect(await sha256(ours)).toBe(await sha256(theirs));
    const reads = (s: string) => s.split('\n').filter((l) => l.includes('error while reading offset')).map((l) => l.replace(/^[a-z-]+: /, ''));
    expect(reads(r.err)).toStrictEqual(reads(q.stderr));
    expect(reads(r.err).length).toBe(4096);
  });

  for (const bad of [['-C', '-c'], ['-C', '-S', '4k'], ['-C', '--salvage']]) {
    it(`refuses ${bad.join(' ')} as qemu-img, writing nothing`, async () => {
      const out = t.path(`never-${bad.join('')}.qcow2`);
      const q = qemuImgRun('convert', ...bad, '-O', 'qcow2', a, out);
      expect(q.status).toBe(1);
      const before = await sha256(a);
      const r = await strata('convert', ...bad, '-O', 'qcow2', a, out);
      expect(r.code).not.toBe(0);
      expect(r.err).toContain(q.stderr.trim().replace('qemu-img: ', ''));
      expect(existsSync(out)).toBe(false);
      expect(await sha256(a)).toBe(before);
    });
  }

  it('several sources with a snapshot are refused; a target that is one of the sources too', async () => {
    const r = await strata('convert', '-l', 'snapshot.name=x', '-O', 'qcow2', a, b, t.path('n.qcow2'));
    expect(r.code).not.toBe(0);
    expect(r.err).toContain('No support for concatenating multiple snapshot');
    const before = await sha256(b);
    const r2 = await strata('convert', '-O', 'raw', a, b, b);
    expect(r2.code).not.toBe(0);
    expect(await sha256(b)).toBe(before);
  });
});

describeOracle('strata convert --bitmaps (as qemu-img)', () => {
  const t = tempDir('strata-convert-bitmaps-');
  afterAll(() => t.cleanup());

  it('copies every bitmap with its granularity, state and bits; skips inconsistent ones only when asked', async () => {
    const src = t.path('src.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', src, '10M');
    qemuIo(src, ['write 0 1M']);
    qemuImg('bitmap', '--add', '-g', '512k', src, 'b1');
    qemuImg('bitmap', '--add', '--disable', src, 'b2');
    qemuIo(src, ['write 3M 1M']);
    qemuImg('bitmap', '--enable', src, 'b2');
    qemuImg('bitmap', '--disable', src, 'b1');
    qemuIo(src, ['write 5M 64k']);
    const theirs = t.path('q.qcow2');
    const ours = t.path('s.qcow2');
    expect(qemuImgRun('convert', '--bitmaps', '-O', 'qcow2', src, theirs).status).toBe(0);
    const r = await strata('convert', '--bitmaps', '-O', 'qcow2', src, ours);
    expect(r.code, r.err).toBe(0);
    const bitmaps = (f: string) => JSON.parse(qemuImg('info', '--output=json', f))['format-specific'].data.bitmaps;
    expect(bitmaps(ours)).toStrictEqual(bitmaps(theirs));
    expect(qemuImgRun('check', ours).status).toBe(0);
    expect(qemuImgRun('compare', ours, theirs).status).toBe(0);
    const { dirtyRanges, haveNbd } = await import('../oracle/qemu');
    if (haveNbd) for (const b of ['b1', 'b2']) expect(dirtyRanges(ours, b)).toStrictEqual(dirtyRanges(theirs, b));
    // A raw target cannot hold bitmaps: refused, nothing created.
    const raw = t.path('never.raw');
    const q = qemuImgRun('convert', '--bitmaps', '-O', 'raw', src, t.path('q.raw'));
    const rr = await strata('convert', '--bitmaps', '-O', 'raw', src, raw);
    expect(rr.code).toBe(1);
    expect(rr.err).toContain(q.stderr.trim().replace('qemu-img: ', ''));
    expect(existsSync(raw)).toBe(false);
    expect((await strata('convert', '--skip-broken-bitmaps', '-O', 'qcow2', src, t.path('x.qcow2'))).code).not.toBe(0);
  });
});
