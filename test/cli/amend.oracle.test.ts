// strata amend against qemu-img amend: the same image afterwards (content, map, info; byte
// for byte where QEMU's result is deterministic), check clean, and the same refusals, which
// change nothing.
import { copyFileSync } from 'node:fs';
import { afterAll, describe, expect, it } from 'vitest';
import { startHolder } from '../oracle/holders';
import { describeOracle, qemuImg, qemuImgRun, qemuIo, tempDir } from '../oracle/qemu';
import { sha256, strata } from './run-cli';

type Setup = (file: string, dir: (n: string) => string) => void;

const zeroes: Setup = (f) => {
  qemuImg('create', '-q', '-f', 'qcow2', f, '1M');
  qemuIo(f, ['write -P 1 0 64k', 'write -z 64k 64k', 'write -P 2 128k 64k', 'write -z 128k 64k']);
};
const snapped: Setup = (f) => {
  qemuImg('create', '-q', '-f', 'qcow2', f, '10M');
  qemuIo(f, ['write -P 1 0 3M']);
  qemuImg('snapshot', '-c', 's', f);
};
const v2: Setup = (f) => {
  qemuImg('create', '-q', '-f', 'qcow2', '-o', 'compat=0.10', f, '10M');
  qemuIo(f, ['write -P 1 0 3M']);
};
const v2snap: Setup = (f) => {
  v2(f, () => '');
  qemuImg('snapshot', '-c', 's', f);
  qemuIo(f, ['write -P 3 1M 64k']);
};
const rc8: Setup = (f) => {
  qemuImg('create', '-q', '-f', 'qcow2', '-o', 'refcount_bits=8,lazy_refcounts=on', f, '10M');
  qemuIo(f, ['write -P 1 0 3M']);
};
const backed: Setup = (f, p) => {
  qemuImg('create', '-q', '-f', 'qcow2', p('base.qcow2'), '1M');
  qemuIo(p('base.qcow2'), ['write -P 9 0 1M']);
  qemuImg('create', '-q', '-f', 'qcow2', '-b', p('base.qcow2'), '-F', 'qcow2', f, '1M');
  qemuIo(f, ['write -P 1 0 64k', 'write -z 64k 64k', 'write -z 192k 64k']);
};

/** Fields of info that must match (not the file name or disk use, nor snapshot dates). */
function infoOf(f: string): unknown {
  const i = JSON.parse(qemuImg('info', '--output=json', f));
  delete i.filename; delete i['actual-size']; delete i['backing-filename']; delete i['full-backing-filename'];
  for (const s of i.snapshots ?? []) { delete s['date-sec']; delete s['date-nsec']; }
  return i;
}

describeOracle('strata amend (as qemu-img amend)', () => {
  const t = tempDir('strata-amend-');
  afterAll(() => t.cleanup());
  let n = 0;

  const same: [string, Setup, string, boolean][] = [
    ['downgrade with zero clusters, no backing file', zeroes, 'compat=0.10', true],
    ['downgrade with zero clusters over a backing file', backed, 'compat=0.10', false],
    ['refcount_bits=1 refused: a snapshot shares clusters', snapped, 'refcount_bits=1', false],
    ['refcount_bits=64', snapped, 'refcount_bits=64', false],
    ['refcount_bits=8 and lazy_refcounts=on', snapped, 'refcount_bits=8,lazy_refcounts=on', false],
    ['back to 16 bits and down to compat=0.10', rc8, 'compat=0.10,refcount_bits=16', false],
    ['upgrade with lazy refcounts and a larger size', v2, 'compat=1.1,lazy_refcounts=on,size=128M', true],
    ['upgrade and shrink', v2, 'compat=1.1,size=2M', true],
    ['upgrade with an internal snapshot', v2snap, 'compat=1.1', false],
    ['lazy_refcounts=off', rc8, 'lazy_refcounts=off', true],
  ];
  for (const [title, setup, opts, bytes] of same) {
    it(`${title} (-o ${opts}): as qemu-img's`, async () => {
      const p = (x: string) => t.path(`${n}-${x}`);
      n++;
      const theirs = p('q.qcow2');
      const ours = p('s.qcow2');
      setup(theirs, p);
      copyFileSync(theirs, ours);
      const before = await sha256(ours);
      const q = qemuImgRun('amend', '-o', opts, theirs);
      const r = await strata('amend', '-o', opts, ours);
      expect(r.code).toBe(q.status);
      if (q.status !== 0) {
        expect(r.err).toContain(q.stderr.replace(/^qemu-img: /, '').trim());
        expect(await sha256(ours)).toBe(before);
        return;
      }
      expect(qemuImgRun('check', ours).status).toBe(0);
      expect(qemuImgRun('compare', ours, theirs).status).toBe(0);
      expect(qemuImg('map', '--output=json', ours)).toBe(qemuImg('map', '--output=json', theirs));
      expect(infoOf(ours)).toStrictEqual(infoOf(theirs));
      if (bytes) expect(await sha256(ours)).toBe(await sha256(theirs));
    });
  }

  it('a downgrade keeps what a snapshot reads in a preallocated zero cluster it shares (QEMU 7.2 loses it)', async () => {
    const f = t.path('shared.qcow2');
    backed(f, (x) => t.path(`shared-${x}`));
    qemuIo(f, ['write -P 2 128k 64k']);
    qemuImg('snapshot', '-c', 's', f);
    qemuIo(f, ['write -z 128k 64k']);
    const snapBefore = t.path('shared-before.raw');
    qemuImg('convert', '-O', 'raw', '-l', 'snapshot.name=s', f, snapBefore);
    const activeBefore = t.path('shared-active.raw');
    qemuImg('convert', '-O', 'raw', f, activeBefore);
    expect((await strata('amend', '-o', 'compat=0.10', f)).code).toBe(0);
    expect(qemuImgRun('check', f).status).toBe(0);
    const snapAfter = t.path('shared-after.raw');
    qemuImg('convert', '-O', 'raw', '-l', 'snapshot.name=s', f, snapAfter);
    expect(await sha256(snapAfter)).toBe(await sha256(snapBefore));
    expect(qemuImgRun('compare', '-F', 'raw', f, activeBefore).status).toBe(0);
    expect(JSON.parse(qemuImg('info', '--output=json', f))['format-specific'].data.compat).toBe('0.10');
  });

  describe('refusals, with qemu-img\'s text, change nothing', () => {
    const cases: [string, string[]][] = [
      ['cluster_size=1k', []], ['foo=bar', []], ['compat=0.42', []], ['compat=0.10,lazy_refcounts=on', []],
      ['refcount_bits=3', []], ['refcount_bits=8,compat=0.10', []], ['backing_file=x', []], ['preallocation=metadata', []],
      ['lazy_refcounts=maybe', []], ['data_file=foo', []],
    ];
    for (const [opts] of cases) {
      it(`-o ${opts}`, async () => {
        const f = t.path(`refuse-${n++}.qcow2`);
        qemuImg('create', '-q', '-f', 'qcow2', f, '1M');
        const before = await sha256(f);
        const q = qemuImgRun('amend', '-o', opts, f);
        expect(q.status).toBe(1);
        expect(await sha256(f)).toBe(before); // qemu-img's refusal changed nothing either
        const r = await strata('amend', '-o', opts, f);
        expect(r.code).toBe(1);
        expect(r.err).toContain(q.stderr.split('\n')[0]!.replace(/^qemu-img: /, ''));
        expect(await sha256(f)).toBe(before);
      });
    }
    it('no -o, a raw image, an image with bitmaps downgraded', async () => {
      const f = t.path('plain.qcow2');
      qemuImg('create', '-q', '-f', 'qcow2', f, '1M');
      expect((await strata('amend', f)).code).toBe(1);
      const raw = t.path('r.raw');
      qemuImg('create', '-q', '-f', 'raw', raw, '1M');
      const r = await strata('amend', '-o', 'compat=0.10', raw);
      expect(r.code).toBe(1);
      expect(r.err).toContain("Format driver 'raw' does not support option amendment");
      qemuImg('bitmap', '--add', f, 'b0');
      const before = await sha256(f);
      const b = await strata('amend', '-o', 'compat=0.10', f);
      expect(b.code).toBe(1);
      expect(await sha256(f)).toBe(before);
    });
    it('an image in use is refused', async () => {
      const f = t.path('busy.qcow2');
      qemuImg('create', '-q', '-f', 'qcow2', f, '1M');
      const before = await sha256(f);
      const holder = await startHolder('qemu-io', f, '');
      try {
        const r = await strata('amend', '-o', 'compat=0.10', f);
        expect(r.code).toBe(1);
        expect(r.err).toMatch(/in use|lock/i);
      } finally {
        await holder.stop();
      }
      expect(await sha256(f)).toBe(before);
    });
  });

  it('--image-opts', async () => {
    const f = t.path('opts.qcow2');
    v2(f, () => '');
    expect((await strata('amend', '--image-opts', '-o', 'compat=1.1', `driver=qcow2,file.filename=${f}`)).code).toBe(0);
    expect(JSON.parse(qemuImg('info', '--output=json', f))['format-specific'].data.compat).toBe('1.1');
  });

  it('an image left dirty (lazy refcounts) is repaired first, as qemu-img amend does, with the same report', async () => {
    const mk = (f: string) => {
      qemuImg('create', '-q', '-f', 'qcow2', '-o', 'compat=1.1,lazy_refcounts=on', f, '64M');
      const { spawnSync } = require('node:child_process') as typeof import('node:child_process');
      spawnSync('qemu-io', ['-c', 'write -P 0x2a 0 128k', '-c', 'abort', f], { stdio: 'ignore' });
    };
    const theirs = t.path('dirty-q.qcow2');
    const ours = t.path('dirty-s.qcow2');
    mk(theirs);
    mk(ours);
    expect(JSON.parse(qemuImg('info', '--output=json', '-U', ours))['dirty-flag']).toBe(true);
    const q = qemuImgRun('amend', '-o', 'compat=0.10', theirs);
    const r = await strata('amend', '-o', 'compat=0.10', ours);
    expect(r.code, r.err).toBe(q.status);
    expect(r.err).toBe(q.stderr);
    expect(qemuImgRun('check', ours).status).toBe(0);
    expect(infoOf(ours)).toStrictEqual(infoOf(theirs));
    expect(qemuImgRun('compare', ours, theirs).status).toBe(0);
  });

  it('-p prints qemu-img\'s progress lines (a downgrade over 8 L1 entries)', async () => {
    const theirs = t.path('p-q.qcow2');
    const ours = t.path('p-s.qcow2');
    for (const f of [theirs, ours]) {
      qemuImg('create', '-q', '-f', 'qcow2', f, '4G');
      qemuIo(f, ['write -z 0 64k', 'write -z 1G 64k', 'write -z 3G 64k']);
    }
    const q = qemuImgRun('amend', '-p', '-o', 'compat=0.10', theirs);
    const r = await strata('amend', '-p', '-o', 'compat=0.10', ours);
    expect(r.code).toBe(0);
    expect(r.out).toBe(q.stdout);
    expect(r.out).toContain('(12.50/100%)');
    expect(await sha256(ours)).toBe(await sha256(theirs));
  });

  // QEMU's refcount width change walks the old refcount table two times to allocate, once more
  // when those allocations need a block of their own (iotest 112: 66.67% then back to 50.00%),
  // then once to write: each walk reports every table entry.
  const widths: [string, string, string, string][] = [
    ['an extra allocation walk (iotest 112)', 'cluster_size=512', '64k', `write 0 ${58 * 512}`],
    ['16 to 64 bits, 4 KiB clusters', 'cluster_size=4k', '64M', 'write 0 5M'],
    ['16 to 1 bit, 64 KiB clusters', 'cluster_size=64k', '1G', 'write 0 50M'],
    ['64 to 2 bits, 512 B clusters', 'cluster_size=512,refcount_bits=64', '4M', 'write 0 1M'],
  ];
  for (const [name, opts, size, io] of widths) {
    it(`-p of a refcount width change prints qemu-img's walks: ${name}`, async () => {
      const theirs = t.path('w-q.qcow2');
      const ours = t.path('w-s.qcow2');
      const bits = name.match(/to (\d+) bit/)?.[1] ?? '64';
      for (const f of [theirs, ours]) {
        qemuImg('create', '-q', '-f', 'qcow2', '-o', opts, f, size);
        qemuIo(f, [io]);
      }
      const q = qemuImgRun('amend', '-p', '-o', `refcount_bits=${bits}`, theirs);
      const r = await strata('amend', '-p', '-o', `refcount_bits=${bits}`, ours);
      expect(r.code).toBe(0);
      expect(r.out).toBe(q.stdout);
      if (name.includes('112')) expect(r.out).toContain('    (66.67/100%)\r    (50.00/100%)\r');
    });
  }
});
