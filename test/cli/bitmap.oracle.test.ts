// strata bitmap against qemu-img bitmap: the same sequence of operations on two copies gives
// the same bitmaps (qemu-img info), the same dirty ranges (qemu-nbd -B + nbdinfo), a clean
// check and the same file size; refusals have qemu-img's text and change nothing.
import { copyFileSync, statSync } from 'node:fs';
import { afterAll, expect, it } from 'vitest';
import { startHolder } from '../oracle/holders';
import { describeOracle, dirtyRanges, haveNbd, qemuImg, qemuImgRun, qemuIo, tempDir } from '../oracle/qemu';
import { sha256, strata } from './run-cli';

function bitmapsOf(f: string): unknown {
  return JSON.parse(qemuImg('info', '--output=json', f))['format-specific'].data.bitmaps ?? null;
}

describeOracle('strata bitmap (as qemu-img bitmap)', () => {
  const t = tempDir('strata-bitmap-');
  afterAll(() => t.cleanup());

  /** Runs the same steps with qemu-img and with strata on two fresh image pairs. */
  async function both(steps: (run: (...a: string[]) => Promise<void>, img: string, base: string) => Promise<void>, tag: string): Promise<[string, string]> {
    const out: string[] = [];
    for (const who of ['q', 's']) {
      const img = t.path(`${tag}-${who}.qcow2`);
      const base = t.path(`${tag}-${who}.base.qcow2`);
      qemuImg('create', '-q', '-f', 'qcow2', base, '10M');
      qemuImg('create', '-q', '-f', 'qcow2', img, '10M');
      const run = async (...a: string[]) => {
        if (who === 'q') { const r = qemuImgRun('bitmap', ...a); if (r.status !== 0) throw new Error(r.stderr); }
        else { const r = await strata('bitmap', ...a); if (r.code !== 0) throw new Error(r.err); }
      };
      await steps(run, img, base);
      out.push(img);
    }
    return out as [string, string];
  }

  it('the qemu-img-bitmaps sequence: add, clear, disable, enable, merge from another file, remove', async () => {
    const [q, s] = await both(async (run, img, base) => {
      await run('--add', '-f', 'qcow2', base, 'b0');
      qemuIo(base, ['write 1M 1M']);
      await run('--add', '-g', '512k', '-f', 'qcow2', img, 'b1');
      await run('--add', '--disable', '-f', 'qcow2', img, 'b2');
      qemuIo(img, ['write 2M 64k']);
      await run('--clear', '-f', 'qcow2', img, 'b1');
      qemuIo(img, ['write 3M 64k']);
      await run('--disable', '-f', 'qcow2', img, 'b1');
      await run('--enable', '-f', 'qcow2', img, 'b2');
      qemuIo(img, ['write 4M 64k']);
      await run('--add', '--merge', 'b0', '-b', base, '-F', 'qcow2', '-f', 'qcow2', img, 'tmp');
      await run('--merge', 'b1', '-f', 'qcow2', img, 'tmp');
      await run('--remove', '--image-opts', `driver=qcow2,file.filename=${img}`, 'b2');
    }, 'seq');
    expect(bitmapsOf(s)).toStrictEqual(bitmapsOf(q));
    expect(qemuImgRun('check', s).status).toBe(0);
    expect(statSync(s).size).toBe(statSync(q).size);
    if (haveNbd) for (const b of ['b1', 'tmp']) expect(dirtyRanges(s, b)).toStrictEqual(dirtyRanges(q, b));
  });

  it('several actions in one call run in order; removing the last bitmap drops the extension', async () => {
    const [q, s] = await both(async (run, img) => {
      await run('--add', '-g', '64k', img, 'a');
      qemuIo(img, ['write 0 128k']);
      await run('--add', '--merge', 'a', '--disable', img, 'c');
      await run('--remove', img, 'a');
    }, 'multi');
    expect(bitmapsOf(s)).toStrictEqual(bitmapsOf(q));
    if (haveNbd) expect(dirtyRanges(s, 'c')).toStrictEqual(dirtyRanges(q, 'c'));
    const [q2, s2] = await both(async (run, img) => {
      await run('--add', img, 'x');
      await run('--remove', img, 'x');
    }, 'last');
    // (Not byte for byte: QEMU leaves its last directory, marked in use, in the freed cluster.)
    expect(bitmapsOf(s2)).toBe(null);
    expect(bitmapsOf(q2)).toBe(null);
    expect(statSync(s2).size).toBe(statSync(q2).size);
    expect(qemuImgRun('check', s2).status).toBe(0);
  });

  it('an inconsistent bitmap can only be removed', async () => {
    const f = t.path('incons.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', f, '10M');
    qemuImg('bitmap', '--add', f, 'b0');
    // Mark it in use as a crashed QEMU would leave it: flags at directory entry offset 12.
    const { openSync, readSync, writeSync, closeSync } = await import('node:fs');
    const fd = openSync(f, 'r+');
    const info = JSON.parse(qemuImg('info', '--output=json', '-U', f));
    expect(info['format-specific'].data.bitmaps[0].name).toBe('b0');
    const h = Buffer.alloc(4096);
    readSync(fd, h, 0, 4096, 0);
    let off = h.readUInt32BE(100);
    let dir = 0;
    while (off < 4096) { const type = h.readUInt32BE(off); const len = h.readUInt32BE(off + 4); if (type === 0x23852875) { dir = Number(h.readBigUInt64BE(off + 8 + 16)); break; } if (type === 0) break; off += 8 + Math.ceil(len / 8) * 8; }
    const fl = Buffer.alloc(4);
    readSync(fd, fl, 0, 4, dir + 12);
    fl.writeUInt32BE(fl.readUInt32BE(0) | 1);
    writeSync(fd, fl, 0, 4, dir + 12);
    closeSync(fd);
    const before = await sha256(f);
    for (const op of ['--clear', '--enable', '--disable']) {
      const q = qemuImgRun('bitmap', op, f, 'b0');
      const r = await strata('bitmap', op, f, 'b0');
      expect(r.code).toBe(1);
      expect(r.err).toContain(q.stderr.split('\n')[0]!.replace('qemu-img: ', ''));
      expect(await sha256(f)).toBe(before);
    }
    const copy = t.path('incons-q.qcow2');
    copyFileSync(f, copy);
    expect(qemuImgRun('bitmap', '--remove', copy, 'b0').status).toBe(0);
    expect((await strata('bitmap', '--remove', f, 'b0')).code).toBe(0);
    expect(bitmapsOf(f)).toStrictEqual(bitmapsOf(copy));
    expect(qemuImgRun('check', f).status).toBe(0);
  });

  const refusals: string[][] = [
    ['--add', 'F', 'b0'], ['--remove', 'F', 'nope'], ['--clear', 'F', 'nope'], ['--add', '-g', '1000', 'F', 'b1'],
    ['--add', '-g', '256', 'F', 'b1'], ['--merge', 'nope', 'F', 'b0'], ['F', 'b0'], ['-g', '4k', '--remove', 'F', 'b0'],
    ['--add', 'F'], ['--add', 'F', ''], ['--add', '-b', 'F', 'F', 'x'], ['--merge', 'b0', '-F', 'qcow2', 'F', 'x'],
    ['--add', '--merge', 'nope', 'F', 'new'],
  ];
  for (const args of refusals) {
    it(`refuses ${args.join(' ')} as qemu-img does, changing nothing`, async () => {
      const f = t.path(`ref-${refusals.indexOf(args)}.qcow2`);
      qemuImg('create', '-q', '-f', 'qcow2', f, '1M');
      qemuImg('bitmap', '--add', f, 'b0');
      const a = args.map((x) => (x === 'F' ? f : x));
      const before = await sha256(f);
      const copy = `${f}.q`;
      copyFileSync(f, copy);
      const q = qemuImgRun('bitmap', ...a.map((x) => (x === f ? copy : x)));
      expect(q.status).toBe(1);
      const r = await strata('bitmap', ...a);
      expect(r.code).toBe(1);
      expect(r.err).toContain(q.stderr.split('\n')[0]!.replace('qemu-img: ', '').replaceAll(copy, f));
      expect(await sha256(f)).toBe(before);
    });
  }

  it('a compat=0.10 image cannot store bitmaps', async () => {
    const f = t.path('v2.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', '-o', 'compat=0.10', f, '1M');
    const before = await sha256(f);
    const r = await strata('bitmap', '--add', f, 'x');
    expect(r.code).toBe(1);
    expect(r.err).toContain('Cannot store dirty bitmaps in qcow2 v2 files');
    expect(await sha256(f)).toBe(before);
  });

  it('an image in use (held by qemu-io) is refused and left as it was', async () => {
    const f = t.path('busy.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', f, '1M');
    const before = await sha256(f);
    const holder = await startHolder('qemu-io', f, '');
    try {
      const r = await strata('bitmap', '--add', f, 'x');
      expect(r.code).toBe(1);
      expect(r.err).toMatch(/in use|lock/i);
    } finally {
      await holder.stop();
    }
    expect(await sha256(f)).toBe(before);
  });

  it('an image left dirty (lazy refcounts) is repaired first, with qemu-img\'s report, then gets its bitmap', async () => {
    const { spawnSync } = await import('node:child_process');
    const out: string[] = [];
    for (const who of ['q', 's']) {
      const f = t.path(`dirty-${who}.qcow2`);
      qemuImg('create', '-q', '-f', 'qcow2', '-o', 'lazy_refcounts=on', f, '64M');
      spawnSync('qemu-io', ['-c', 'write 0 128k', '-c', 'abort', f], { stdio: 'ignore' });
      if (who === 'q') out.push(qemuImgRun('bitmap', '--add', f, 'b').stderr);
      else { const r = await strata('bitmap', '--add', f, 'b'); expect(r.code).toBe(0); out.push(r.err); }
      expect(qemuImgRun('check', f).status).toBe(0);
      expect(bitmapsOf(f)).toStrictEqual([{ flags: ['auto'], name: 'b', granularity: 65536 }]);
    }
    expect(out[1]).toBe(out[0]);
  });
});
