// Behaviour QEMU's iotests showed to differ, each case with qemu-img as the oracle (the iotest
// it comes from in its name). Images are made at test time with qemu-img and qemu-io.
import { spawnSync } from 'node:child_process';
import { copyFileSync, existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { afterAll, describe, expect, it } from 'vitest';
import { describeOracleText, qemuImg, qemuImgRun, qemuIo, tempDir } from '../oracle/qemu';
import { asQemuImg, expectSameFile, strata } from './run-cli';
import { printfFixed2 } from '../../cli/progress';

describeOracleText('iotests: behaviour as qemu-img', () => {
  const t = tempDir('strata-iotests-');
  afterAll(() => t.cleanup());

  describe('commit -b finds BASE as qemu-img does (iotest 020)', () => {
    it('a relative name is taken relative to the images of the chain, never to the working directory', async () => {
      const run = (n: string) => {
        const d = t.path(n);
        mkdirSync(`${d}/subdir`, { recursive: true });
        qemuImg('create', '-q', '-f', 'qcow2', `${d}/subdir/base.qcow2`, '1M');
        qemuImg('create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', `${d}/subdir/mid.qcow2`);
        qemuImg('create', '-q', '-f', 'qcow2', '-b', 'mid.qcow2', '-F', 'qcow2', `${d}/subdir/top.qcow2`);
        return d;
      };
      const dq = run('q');
      const ds = run('s');
      const cwd = process.cwd();
      try {
        process.chdir(dq);
        const q = qemuImgRun('commit', '-b', 'subdir/mid.qcow2', 'subdir/top.qcow2');
        process.chdir(ds);
        const s = await asQemuImg('commit', '-b', 'subdir/mid.qcow2', 'subdir/top.qcow2');
        expect(q.status).toBe(1);
        expect(s.code).toBe(1);
        expect(s.err).toBe(q.stderr);
        // Relative to the overlay it is found.
        expect((await strata('commit', '-b', 'mid.qcow2', 'subdir/top.qcow2')).code).toBe(0);
      } finally {
        process.chdir(cwd);
      }
    });
  });

  /** Reads the 8-byte big-endian field at `off` of a file. */
  const u64 = (f: string, off: number) => readFileSync(f).readBigUInt64BE(off);
  /** Sets bits of the 8-byte big-endian field at `off`. */
  const setBits = (f: string, off: number, bits: bigint) => {
    const b = readFileSync(f);
    b.writeBigUInt64BE(b.readBigUInt64BE(off) | bits, off);
    writeFileSync(f, b);
  };

  describe('unknown incompatible features are named as qemu-img names them (iotest 036)', () => {
    it('without names in the table: one hexadecimal mask', async () => {
      const f = t.path('feat1.qcow2');
      qemuImg('create', '-q', '-f', 'qcow2', f, '64M');
      setBits(f, 72, 0xe000000000000000n);
      const q = qemuImgRun('info', f);
      const s = await asQemuImg('info', f);
      expect(q.stderr).toContain('Unknown incompatible feature: e000000000000000');
      expect(s.err).toBe(q.stderr);
      expect(s.code).toBe(q.status);
    });
    it('a feature table cut short inside its only entry still names the bit', async () => {
      const f = t.path('feat2.qcow2');
      qemuImg('create', '-q', '-f', 'qcow2', f, '64M');
      setBits(f, 72, 0xa000000000000000n);
      // Replace the feature table extension (the first one, at header_length) by a 14-byte
      // one: type 0, bit 63, "Test feature"; then the end of the extensions.
      const b = readFileSync(f);
      const at = b.readUInt32BE(100);
      expect(b.readUInt32BE(at)).toBe(0x6803f857);
      const data = Buffer.concat([Buffer.from([0, 63]), Buffer.from('Test feature')]);
      b.fill(0, at, at + 8 + 16 + 8);
      b.writeUInt32BE(0x6803f857, at);
      b.writeUInt32BE(data.length, at + 4);
      data.copy(b, at + 8);
      writeFileSync(f, b);
      const q = qemuImgRun('info', f);
      const s = await asQemuImg('info', f);
      expect(q.stderr).toContain('Test feature, Unknown incompatible feature: 2000000000000000');
      expect(s.err).toBe(q.stderr);
    });
  });

  it('info --output=json --backing-chain: members in qemu-img\'s order (iotest 043)', async () => {
    const b = t.path('j-base.qcow2');
    const o = t.path('j-top.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', b, '1M');
    qemuImg('create', '-q', '-f', 'qcow2', '-b', b, '-F', 'qcow2', o);
    qemuImg('snapshot', '-c', 's1', o);
    for (const args of [['info', '--output=json', o], ['info', '--output=json', '--backing-chain', o]]) {
      expect((await strata(...args)).out).toBe(qemuImg(...args));
    }
  });

  it('a backing chain loop: qemu-img\'s message (iotest 043)', async () => {
    const f = t.path('loop.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', f, '1M');
    qemuImg('rebase', '-u', '-b', f, '-F', 'qcow2', f);
    const q = qemuImgRun('info', '--backing-chain', f);
    const s = await asQemuImg('info', '--backing-chain', f);
    expect(q.stderr).toContain('creates an infinite loop');
    expect([s.code, s.err]).toEqual([q.status, q.stderr]);
  });

  it('check -r all clears autoclear bits it does not know, as qemu-img (iotest 036)', async () => {
    const q = t.path('ac-q.qcow2');
    const s = t.path('ac-s.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', q, '64M');
    setBits(q, 88, 1n << 63n);
    copyFileSync(q, s);
    const rq = qemuImgRun('check', '-r', 'all', q);
    const rs = await strata('check', '-r', 'all', s);
    expect(u64(q, 88)).toBe(0n);
    expect(u64(s, 88)).toBe(u64(q, 88));
    expect(rs.code).toBe(rq.status);
    expect(rs.out).toBe(rq.stdout);
    // A check without -r writes nothing.
    setBits(s, 88, 1n << 63n);
    expect((await strata('check', s)).code).toBe(0);
    expect(u64(s, 88)).toBe(1n << 63n);
  });

  describe('compare (iotest 048)', () => {
    it('-q prints nothing and exits as qemu-img', async () => {
      const a = t.path('cmp-a.qcow2');
      const b = t.path('cmp-b.qcow2');
      qemuImg('create', '-q', '-f', 'qcow2', a, '1M');
      qemuImg('create', '-q', '-f', 'qcow2', b, '1M');
      for (const extra of [[], ['-s']]) {
        const q = qemuImgRun('compare', '-q', ...extra, a, b);
        const s = await strata('compare', '-q', ...extra, a, b);
        expect([s.code, s.out, s.err]).toEqual([q.status, q.stdout, q.stderr]);
      }
      qemuIo(b, ['write -P 1 4096 512']);
      const q = qemuImgRun('compare', '-q', a, b);
      const s = await strata('compare', '-q', a, b);
      expect(q.status).toBe(1);
      expect([s.code, s.out, s.err]).toEqual([q.status, q.stdout, q.stderr]);
    });
    it('the size warning only once the common part compared equal', async () => {
      const a = t.path('cmp-c.qcow2');
      const b = t.path('cmp-d.qcow2');
      qemuImg('create', '-q', '-f', 'qcow2', a, '1M');
      qemuImg('create', '-q', '-f', 'qcow2', b, '2M');
      for (const step of [() => {}, () => qemuIo(b, ['write -P 1 1M 512']), () => qemuIo(b, ['write -P 1 4096 512'])]) {
        step();
        const q = qemuImgRun('compare', a, b);
        const s = await strata('compare', a, b);
        expect([s.code, s.out]).toEqual([q.status, q.stdout]);
      }
    });
  });

  it('check -r all of a killed lazy-refcounts writer: the rebuild frees the old structure as qemu-img does (iotest 039)', async () => {
    const q = t.path('dirty-q.qcow2');
    const s = t.path('dirty-s.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', '-o', 'compat=1.1,lazy_refcounts=on', q, '128M');
    spawnSync('qemu-io', ['-c', 'write -P 0x5a 0 512', '-c', 'sigraise 9', q]);
    copyFileSync(q, s);
    const rq = qemuImgRun('check', '-r', 'all', q);
    const rs = await strata('check', '-r', 'all', s);
    expect(rq.stderr).toContain('Repairing cluster 1 refcount=1 reference=0');
    expect([rs.code, rs.out, rs.err]).toEqual([rq.status, rq.stdout, rq.stderr]);
    expect(readFileSync(s).equals(readFileSync(q))).toBe(true);
  });

  describe('create and convert as qemu-img: sizes and refusals (iotests 049, 054, 079, 111, 112, 114, 214)', () => {
    const cases: [string, (f: string) => string[]][] = [
      ['hexadecimal size', (f) => ['create', '-f', 'qcow2', f, '0x10000']],
      ['hexadecimal cluster_size', (f) => ['create', '-f', 'qcow2', '-o', 'cluster_size=0x10000', f, '2M']],
      ['negative size', (f) => ['create', '-f', 'qcow2', f, '--', '-1k']],
      ['a size with a word after it', (f) => ['create', '-f', 'qcow2', f, '--', '1kilobyte']],
      ['-o size that is no size', (f) => ['create', '-f', 'qcow2', '-o', 'size=foobar', f]],
      ['the size given twice', (f) => ['create', '-f', 'qcow2', '-o', 'size=10M', f, '20M']],
      ['a 1 EiB qcow2 image (past 2^53)', (f) => ['create', '-f', 'qcow2', f, '1048576T']],
      ['a cluster size out of range', (f) => ['create', '-f', 'qcow2', '-o', 'cluster_size=4M', f, '4G']],
      ['refcount_bits=-1', (f) => ['create', '-f', 'qcow2', '-o', 'refcount_bits=-1', f, '64M']],
      ['refcount_bits=42', (f) => ['create', '-f', 'qcow2', '-o', 'refcount_bits=42', f, '64M']],
      ['lazy refcounts on compat=0.10', (f) => ['create', '-f', 'qcow2', '-o', 'compat=0.10,lazy_refcounts=on', f, '64M']],
      ['an empty backing name', (f) => ['create', '-f', 'qcow2', '-b', '', f, '1M']],
      ['a missing backing file without -F', (f) => ['create', '-f', 'qcow2', '-b', `${f}.inexistent`, f]],
      ['convert -B without -F', (f) => ['convert', '-O', 'qcow2', '-B', `${f}.src`, `${f}.src`, f]],
    ];
    for (const [name, args] of cases) {
      it(name, async () => {
        const fq = t.path(`c-q-${name.replace(/\W+/g, '-')}.qcow2`);
        const fs = t.path(`c-s-${name.replace(/\W+/g, '-')}.qcow2`);
        for (const f of [fq, fs]) qemuImg('create', '-q', '-f', 'qcow2', `${f}.src`, '1M');
        const q = qemuImgRun(...args(fq));
        const s = await asQemuImg(...args(fs));
        const same = (x: string) => x.split(fq).join('FILE');
        expect([s.code, same(s.out.split(fs).join(fq)), same(s.err.split(fs).join(fq))]).toEqual([q.status, same(q.stdout), same(q.stderr)]);
      });
    }
  });

  it('info of file:NAME whose name has a colon: shown as ./NAME, its backing file relative to . (iotest 126)', async () => {
    const d = t.path('colon');
    mkdirSync(d);
    const cwd = process.cwd();
    try {
      process.chdir(d);
      qemuImg('create', '-q', '-f', 'qcow2', 'base.qcow2', '1M');
      qemuImg('create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', 'file:image:top.qcow2');
      expect((await strata('info', 'file:image:top.qcow2')).out).toBe(qemuImg('info', 'file:image:top.qcow2'));
    } finally {
      process.chdir(cwd);
    }
  });

  describe('a virtual size the L1 table cannot cover: qemu-img\'s words (iotests 054, 080)', () => {
    const setU64 = (f: string, off: number, v: bigint) => { const b = readFileSync(f); b.writeBigUInt64BE(v, off); writeFileSync(f, b); };
    const setU32 = (f: string, off: number, v: number) => { const b = readFileSync(f); b.writeUInt32BE(v, off); writeFileSync(f, b); };
    for (const [name, edit] of [
      ['1 EiB (past 2^53)', (f: string) => setU64(f, 24, 1n << 60n)],
      ['an L1 table of 0 entries', (f: string) => setU32(f, 36, 0)],
      ['a size needing more L1 entries than QEMU allows', (f: string) => setU64(f, 24, 1n << 52n)],
    ] as const) {
      it(name, async () => {
        const f = t.path(`l1-${name.replace(/\W+/g, '-')}.qcow2`);
        qemuImg('create', '-q', '-f', 'qcow2', f, '4G');
        edit(f);
        const q = qemuImgRun('info', f);
        const s = await asQemuImg('info', f);
        expect(q.status).toBe(1);
        expect([s.code, s.err]).toEqual([q.status, q.stderr]);
      });
    }
  });

  it('rebase -b without -F: qemu-img\'s message (iotest 114)', async () => {
    const b = t.path('rb-base.qcow2');
    const o = t.path('rb-top.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', b, '1M');
    qemuImg('create', '-q', '-f', 'qcow2', o, '1M');
    const q = qemuImgRun('rebase', '-b', b, o);
    const s = await asQemuImg('rebase', '-b', b, o);
    expect(q.status).toBe(1);
    expect([s.code, s.err]).toEqual([q.status, q.stderr]);
  });

  describe('rebase -u -F records any format name qemu-img knows (iotest 031)', () => {
    for (const fmt of ['host_device', 'file', 'luks', 'vmdk']) {
      it(`-F ${fmt}: the same header as qemu-img writes, under both names`, async () => {
        const q = t.path(`fmt-${fmt}-q.qcow2`);
        qemuImg('create', '-q', '-f', 'qcow2', q, '1M');
        const rq = qemuImgRun('rebase', '-u', '-b', '/some/backing/file/path', '-F', fmt, q);
        expect(rq.status).toBe(0);
        for (const [n, runAs] of [['a', asQemuImg], ['b', strata]] as const) {
          const s = t.path(`fmt-${fmt}-${n}.qcow2`);
          qemuImg('create', '-q', '-f', 'qcow2', s, '1M');
          const rs = await runAs('rebase', '-u', '-b', '/some/backing/file/path', '-F', fmt, s);
          expect([rs.code, rs.out, rs.err]).toEqual([0, '', '']);
          // Byte for byte qemu-img's file (check cannot run: the backing file does not exist).
          expect(readFileSync(s).equals(readFileSync(q))).toBe(true);
        }
      });
    }
    it('an unknown format name: refused as qemu-img refuses it, nothing written', async () => {
      const q = t.path('fmt-bad-q.qcow2');
      const s = t.path('fmt-bad-s.qcow2');
      qemuImg('create', '-q', '-f', 'qcow2', q, '1M');
      copyFileSync(q, s);
      const before = readFileSync(s);
      const rq = qemuImgRun('rebase', '-u', '-b', 'x', '-F', 'nosuchfmt', q);
      const rs = await asQemuImg('rebase', '-u', '-b', 'x', '-F', 'nosuchfmt', s);
      expect(rq.status).toBe(1);
      expect([rs.code, rs.out, rs.err]).toEqual([rq.status, rq.stdout, rq.stderr]);
      expect((await strata('rebase', '-u', '-b', 'x', '-F', 'nosuchfmt', s)).code).not.toBe(0);
      expect(readFileSync(s).equals(before)).toBe(true);
    });
  });

  it('convert of several sources with a backing file: refused in qemu-img\'s words, nothing created (iotest 122)', async () => {
    const base = t.path('cat-base.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', base, '1M');
    const srcs = [1, 2].map((i) => { const f = t.path(`cat-${i}.qcow2`); qemuImg('create', '-q', '-f', 'qcow2', f, '1M'); return f; });
    for (const extra of [[], ['-c'], ['-F', 'qcow2'], ['-o', 'backing_fmt=qcow2']]) {
      const q = qemuImgRun('convert', '-O', 'qcow2', ...extra, '-B', base, ...srcs, t.path('cat-q.qcow2'));
      const s = await asQemuImg('convert', '-O', 'qcow2', ...extra, '-B', base, ...srcs, t.path('cat-s.qcow2'));
      expect(q.stderr).toBe('qemu-img: Having a backing file for the target makes no sense when concatenating multiple input images\n');
      expect([s.code, s.out, s.err]).toEqual([q.status, q.stdout, q.stderr]);
      expect(existsSync(t.path('cat-s.qcow2'))).toBe(false);
    }
    const r = await strata('convert', '-O', 'qcow2', '-B', base, '-F', 'qcow2', ...srcs, t.path('cat-s.qcow2'));
    expect(r.code).not.toBe(0);
    expect(r.err).toMatch(/^strata: .*several sources/);
  });

  describe('measure refusals in qemu-img\'s words (iotest 271)', () => {
    const cases: [string, string[]][] = [
      ['extended_l2 with 8k clusters', ['--size', '1M', '-O', 'qcow2', '-o', 'cluster_size=8k,extended_l2=on']],
      ['extended_l2 with 512-byte clusters', ['--size', '1M', '-O', 'qcow2', '-o', 'extended_l2=on,cluster_size=512']],
      ['1025 TiB with extended_l2', ['--size', '1025T', '-O', 'qcow2', '-o', 'extended_l2=on']],
      ['a size past the L1 limit without extended_l2', ['--size', '8P', '-O', 'qcow2', '-o', 'cluster_size=512']],
    ];
    for (const [name, args] of cases) {
      it(name, async () => {
        const q = qemuImgRun('measure', ...args);
        const s = await asQemuImg('measure', ...args);
        expect(q.status).toBe(1);
        expect([s.code, s.out, s.err]).toEqual([q.status, q.stdout, q.stderr]);
        expect((await strata('measure', ...args)).code).not.toBe(0);
      });
    }
    it('1024 TiB with extended_l2 is measured as qemu-img measures it', async () => {
      const args = ['--size', '1024T', '-O', 'qcow2', '-o', 'extended_l2=on'];
      const q = qemuImgRun('measure', ...args);
      expect([(await asQemuImg('measure', ...args)).out, q.status]).toEqual([q.stdout, 0]);
    });
  });

  describe('a shrink that meets internal snapshots shrinks, as qemu-img does; the snapshots keep their data (iotest 061)', () => {
    /** A v3 image with data inside and past 64M, a snapshot of it, then other data in the active layer. */
    const make = (f: string) => {
      qemuImg('create', '-q', '-f', 'qcow2', f, '128M');
      qemuIo(f, ['write -P 0x2a 24M 64k', 'write -P 0x11 100M 1M', 'write -P 0x33 127M 64k']);
      qemuImg('snapshot', '-c', 'foo', f);
      qemuIo(f, ['write -P 0x44 100M 64k', 'write -P 0x55 90M 2M', 'write -P 0x66 24M 4k']);
      qemuImg('snapshot', '-c', 'bar', f);
      qemuIo(f, ['write -P 0x77 70M 64k']);
    };
    const raw = (f: string, snap?: string) => {
      const out = `${f}.${snap ?? 'active'}.raw`;
      qemuImg('convert', '-O', 'raw', ...(snap ? ['-l', `snapshot.name=${snap}`] : []), f, out);
      return readFileSync(out);
    };
    const cases: [string, (f: string) => string[]][] = [
      ['resize --shrink', (f) => ['resize', '--shrink', f, '64M']],
      ['resize --shrink to a size inside a cluster', (f) => ['resize', '--shrink', f, '33554944']],
      ['amend -o size=', (f) => ['amend', '-o', 'size=64M', f]],
    ];
    for (const [name, args] of cases) {
      for (const [who, runAs] of [['qemu-img', asQemuImg], ['strata', strata]] as const) {
        it(`${name}, as ${who}`, async () => {
          const q = t.path(`shrink-snap-q.qcow2`);
          const s = t.path(`shrink-snap-s.qcow2`);
          make(q);
          make(s);
          const rq = qemuImgRun(...args(q));
          const rs = await runAs(...args(s));
          expect(rq.status).toBe(0);
          expect([rs.code, rs.out, rs.err]).toEqual([rq.status, rq.stdout, rq.stderr]);
          expect(qemuImgRun('check', s).status).toBe(0);
          expect(JSON.parse(qemuImg('info', '--output=json', s))['virtual-size']).toBe(JSON.parse(qemuImg('info', '--output=json', q))['virtual-size']);
          expect(qemuImg('snapshot', '-l', s).replace(/\d{4}-\d\d-\d\d \d\d:\d\d:\d\d/g, 'DATE')).toBe(qemuImg('snapshot', '-l', q).replace(/\d{4}-\d\d-\d\d \d\d:\d\d:\d\d/g, 'DATE'));
          for (const snap of [undefined, 'foo', 'bar']) expect(raw(s, snap).equals(raw(q, snap))).toBe(true);
          // Going back to a snapshot gives its size and data back.
          qemuImg('snapshot', '-a', 'foo', q);
          expect((await strata('snapshot', '-a', 'foo', s)).code).toBe(0);
          expect(raw(s).equals(raw(q))).toBe(true);
          expect(qemuImgRun('check', s).status).toBe(0);
        });
      }
    }

    it('amend -o compat=0.10,size=32M that the snapshots\' sizes refuse: as qemu-img, shrinks, then refuses the downgrade; as strata, refuses before writing', async () => {
      const q = t.path('shrink-down-q.qcow2');
      const s = t.path('shrink-down-s.qcow2');
      const own = t.path('shrink-down-own.qcow2');
      for (const f of [q, s, own]) make(f);
      const args = (f: string) => ['amend', '-o', 'compat=0.10,size=32M', f];
      const rq = qemuImgRun(...args(q));
      const rs = await asQemuImg(...args(s));
      expect(rq.stderr).toBe('qemu-img: Internal snapshots prevent downgrade of image\n');
      expect([rs.code, rs.out, rs.err]).toEqual([rq.status, rq.stdout, rq.stderr]);
      const info = (f: string) => { const j = JSON.parse(qemuImg('info', '--output=json', f)); return [j['virtual-size'], j['format-specific'].data.compat]; };
      expect(info(s)).toEqual([32 * 1024 * 1024, '1.1']);
      expect(info(s)).toEqual(info(q));
      expect(qemuImgRun('check', s).status).toBe(0);
      for (const snap of [undefined, 'foo', 'bar']) expect(raw(s, snap).equals(raw(q, snap))).toBe(true);
      const before = readFileSync(own);
      const r = await strata(...args(own));
      expect(r.code).not.toBe(0);
      expect(r.err).toMatch(/^strata: .*Internal snapshots prevent downgrade of image\n$/);
      expect(readFileSync(own).equals(before)).toBe(true);
    });
  });

  it('amend -o compat=0.10 over a snapshot whose L1 table points to an unaligned L2 table: refused in one line, nothing changed (iotest 080)', async () => {
    const f = t.path('unaligned-snap-l2.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', f, '64M');
    qemuIo(f, ['write 0 512']);
    qemuImg('snapshot', '-c', 'test', f);
    const b = readFileSync(f);
    const table = Number(b.readBigUInt64BE(64));
    const snapL1 = Number(b.readBigUInt64BE(table));
    b.writeBigUInt64BE(0x400200n, snapL1);
    writeFileSync(f, b);
    for (const r of [await strata('amend', '-o', 'compat=0.10', f), await asQemuImg('amend', '-o', 'compat=0.10', f)]) {
      expect(r.code).toBe(1);
      expect(r.err).toMatch(/^(strata|qemu-img): .*L2 table offset 0x400200 is not aligned to the cluster size\n$/);
    }
    expect(readFileSync(f).equals(b)).toBe(true);
  });

  describe('a snapshot whose L1 table is unaligned or too large: each command fails in qemu-img\'s words where it loads that table (iotest 080)', () => {
    const pokes: [string, number, string][] = [
      ['an unaligned L1 table offset', 0, '0000000000400200'],
      ['an L1 table too large', 8, '10000000'],
    ];
    for (const [name, field, hex] of pokes) {
      it(name, async () => {
        const make = (f: string) => {
          qemuImg('create', '-q', '-f', 'qcow2', f, '64M');
          qemuIo(f, ['write 0 512']);
          qemuImg('snapshot', '-c', 'test', f);
          const b = readFileSync(f);
          Buffer.from(hex, 'hex').copy(b, Number(b.readBigUInt64BE(64)) + field);
          writeFileSync(f, b);
        };
        const q = t.path('bad-l1-q.qcow2');
        const s = t.path('bad-l1-s.qcow2');
        make(q);
        make(s);
        const commands = (f: string) => [['convert', '-l', 'test', f, `${f}.snap`], ['amend', '-o', 'compat=0.10', f], ['snapshot', '-a', 'test', f], ['snapshot', '-d', 'test', f]];
        const theirs = commands(q).map((a) => qemuImgRun(...a));
        const ours: string[] = [];
        for (const a of commands(s)) {
          const r = await asQemuImg(...a);
          ours.push(`${r.code} ${r.err}`);
        }
        expect(ours).toEqual(theirs.map((r) => `${r.status} ${r.stderr}`));
        expect(ours[0]).toMatch(/Failed to load snapshot: Snapshot L1 table/);
        // Started as strata: refused in one line naming the file.
        const r = await strata('snapshot', '-a', 'test', s);
        expect(r.code).not.toBe(0);
        expect(r.err).toMatch(new RegExp(`^strata: ${s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}: snapshot 1 L1 table .*\n$`));
      });
    }
  });

  describe('snapshot -c where a refcount would overflow: under the name qemu-img, its message and the L1 copy it leaks; under strata\'s, refused before writing (iotest 112)', () => {
    const cases: [string, string, (f: string) => void][] = [
      ['refcount_bits=1', 'refcount_bits=1', () => {}],
      ['refcount_bits=2, a fourth reference', 'refcount_bits=2', (f) => { qemuImg('snapshot', '-c', 'foo', f); qemuImg('snapshot', '-c', 'bar', f); }],
      ['refcount_bits=64 at its maximum', 'refcount_bits=64', (f) => {
        const b = readFileSync(f);
        const refblock = Number(b.readBigUInt64BE(Number(b.readBigUInt64BE(48))));
        const l2 = Number(b.readBigUInt64BE(Number(b.readBigUInt64BE(40))) & 0x00fffffffffffe00n);
        const data = Number(b.readBigUInt64BE(l2) & 0x00fffffffffffe00n) / 65536;
        b.writeBigUInt64BE(0xffffffffffffffffn, refblock + data * 8);
        writeFileSync(f, b);
      }],
    ];
    for (const [name, opt, prepare] of cases) {
      it(name, async () => {
        const q = t.path('rc-snap-q.qcow2');
        const s = t.path('rc-snap-s.qcow2');
        qemuImg('create', '-q', '-f', 'qcow2', '-o', opt, q, '64M');
        qemuIo(q, ['write 0 512']);
        prepare(q);
        copyFileSync(q, s);
        const own = t.path('rc-snap-own.qcow2');
        copyFileSync(q, own);
        const rq = qemuImgRun('snapshot', '-c', 'baz', q);
        const rs = await asQemuImg('snapshot', '-c', 'baz', s);
        expect(rq.stderr).toBe("qemu-img: Could not create snapshot 'baz': -22 (Invalid argument)\n");
        expect([rs.code, rs.out, rs.err]).toEqual([rq.status, rq.stdout, rq.stderr]);
        // qemu-img leaks the new L1 table's cluster, and so does the drop-in: the same file.
        expect(readFileSync(s).equals(readFileSync(q))).toBe(true);
        expect(qemuImgRun('check', s).stdout).toBe(qemuImgRun('check', q).stdout);
        // Started as strata, it refuses before writing anything.
        const before = readFileSync(own);
        const r = await strata('snapshot', '-c', 'baz', own);
        expect(readFileSync(own).equals(before)).toBe(true);
        expect(r.code).not.toBe(0);
        expect(r.err).toMatch(/^strata: .*(refcounts wider than 1 bit|would overflow)/);
      });
    }
  });

  describe('check and snapshot tables qemu-img cannot read as they are (iotest 261)', () => {
    /** The snapshot table's entries as [fixed 40 bytes, extra data, id and name]. */
    const entries = (b: Buffer) => {
      const out: [Buffer, Buffer, Buffer][] = [];
      let p = Number(b.readBigUInt64BE(64));
      for (let i = 0; i < b.readUInt32BE(60); i++) {
        p = Math.ceil(p / 8) * 8;
        const fixed = Buffer.from(b.subarray(p, p + 40));
        const x = fixed.readUInt32BE(36);
        const ids = fixed.readUInt16BE(12) + fixed.readUInt16BE(14);
        out.push([fixed, Buffer.from(b.subarray(p + 40, p + 40 + x)), Buffer.from(b.subarray(p + 40 + x, p + 40 + x + ids))]);
        p += 40 + x + ids;
      }
      return out;
    };
    /** Writes entries back at the table's place (8-byte aligned), with their extra data as given. */
    const writeTable = (b: Buffer, es: [Buffer, Buffer, Buffer][]) => {
      let p = Number(b.readBigUInt64BE(64));
      for (const [fixed, extra, ids] of es) {
        p = Math.ceil(p / 8) * 8;
        fixed.writeUInt32BE(extra.length, 36);
        Buffer.concat([fixed, extra, ids]).copy(b, p);
        p += 40 + extra.length + ids.length;
      }
    };
    /** Three qemu-img snapshots of a v2 image; `edit` changes the table, `v3` makes the header v3. */
    const make = (f: string, edit: (es: [Buffer, Buffer, Buffer][]) => void, v3: boolean) => {
      qemuImg('create', '-q', '-f', 'qcow2', '-o', 'compat=0.10', f, '64M');
      for (const n of ['sn0', 'sn1', 'sn2']) qemuImg('snapshot', '-c', n, f);
      const b = readFileSync(f);
      const es = entries(b);
      edit(es);
      writeTable(b, es);
      if (v3) {
        b.writeUInt32BE(3, 4);
        b.writeUInt32BE(0x68, 100);
        b.writeUInt32BE(4, 96);
      }
      writeFileSync(f, b);
    };
    const short = (es: [Buffer, Buffer, Buffer][]) => {
      es[0]![1] = Buffer.alloc(0);
      es[1]![1] = Buffer.concat([es[1]![1].subarray(0, 24), Buffer.from('very important data'), Buffer.alloc(7)]);
      es[2]![1] = es[2]![1].subarray(0, 8);
    };
    const huge = (es: [Buffer, Buffer, Buffer][]) => { es[2]![1] = Buffer.alloc(65536); };

    const same = async (args: string[], f: string, edit: (es: [Buffer, Buffer, Buffer][]) => void, v3: boolean) => {
      const q = t.path(`snt-q-${f}.qcow2`);
      const s = t.path(`snt-s-${f}.qcow2`);
      make(q, edit, v3);
      copyFileSync(q, s);
      const rq = qemuImgRun(...args, q);
      const rs = await asQemuImg(...args, s);
      expect([rs.code, rs.out, rs.err.replaceAll(s, q)]).toEqual([rq.status, rq.stdout, rq.stderr]);
      return { q, s, rq };
    };

    it('check -r all of v3 entries whose extra data is too short: repaired as qemu-img repairs them, the same bytes', async () => {
      const { q, s, rq } = await same(['check', '-r', 'all'], 'short', short, true);
      expect(rq.stderr).toBe('Repairing snapshot table entry 0 is incomplete\nRepairing snapshot table entry 2 is incomplete\n');
      expect(qemuImgRun('check', s).status).toBe(0);
      await expectSameFile(s, q);
      // The unknown extra data is kept.
      expect(readFileSync(s).includes(Buffer.from('very important data'))).toBe(true);
    });

    it('check of v3 entries whose extra data is too short: reported as qemu-img reports them', async () => {
      await same(['check'], 'short-ro', short, true);
    });

    it('check -r leaks of v3 entries whose extra data is too short: reported, not repaired', async () => {
      await same(['check', '-r', 'leaks'], 'short-leaks', short, true);
    });

    it('too much extra data: info and check refuse in qemu-img\'s words; check -r all cuts it to 1 KiB as qemu-img does', async () => {
      await same(['info'], 'huge-info', huge, false);
      await same(['check'], 'huge-ro', huge, false);
      const { q, s } = await same(['check', '-r', 'all'], 'huge', huge, false);
      expect(qemuImgRun('check', s).status).toBe(0);
      expect(qemuImg('snapshot', '-l', s)).toBe(qemuImg('snapshot', '-l', q));
      // Under its own name Strata says what to do.
      const f = t.path('snt-huge-strata.qcow2');
      make(f, huge, false);
      const r = await strata('info', f);
      expect(r.err).toMatch(/^strata: .*Too much extra metadata in snapshot table entry 2 .*check -r all/);
    });

    it('more snapshots than qemu-img allows: check -r all drops the ones past the limit as qemu-img does', async () => {
      const q = t.path('snt-many-q.qcow2');
      const s = t.path('snt-many-s.qcow2');
      qemuImg('create', '-q', '-f', 'qcow2', '-o', 'compat=0.10', q, '64M');
      const b = readFileSync(q);
      b.writeBigUInt64BE(1048576n, 64);
      b.writeUInt32BE(65536 + 3, 60);
      writeFileSync(q, Buffer.concat([b, Buffer.alloc(1048576 + 40 * (65536 + 3) - b.length)]));
      // The table's clusters are in use: refcounts 1 from 1 MiB on (16-bit refcounts in the first block).
      const f = readFileSync(q);
      const block = Number(f.readBigUInt64BE(Number(f.readBigUInt64BE(48))));
      for (let c = 16; c < Math.ceil(f.length / 65536); c++) f.writeUInt16BE(1, block + c * 2);
      writeFileSync(q, f);
      copyFileSync(q, s);
      for (const args of [['info'], ['check'], ['check', '-r', 'all']]) {
        const rq = qemuImgRun(...args, q);
        const rs = await asQemuImg(...args, s);
        expect([rs.code, rs.out, rs.err.replaceAll(s, q)]).toEqual([rq.status, rq.stdout, rq.stderr]);
      }
      expect(readFileSync(s).readUInt32BE(60)).toBe(65536);
      expect(qemuImgRun('check', s).status).toBe(0);
    });
  });

  describe('convert -n as qemu-img (iotest 122)', () => {
    for (const compat of ['1.1', '0.10']) {
      it(`into an empty compat=${compat} image with a backing file: the target's own backing file is not looked at, zeros are written`, async () => {
        const src = t.path(`n-src-${compat}.qcow2`);
        const base = t.path(`n-base-${compat}.qcow2`);
        qemuImg('create', '-q', '-f', 'qcow2', src, '64M');
        qemuImg('create', '-q', '-f', 'qcow2', base, '64M');
        const maps: string[] = [];
        for (const who of ['q', 's']) {
          const dst = t.path(`n-dst-${compat}-${who}.qcow2`);
          qemuImg('create', '-q', '-f', 'qcow2', '-o', `compat=${compat}`, '-b', base, '-F', 'qcow2', dst, '64M');
          if (who === 'q') expect(qemuImgRun('convert', '-O', 'qcow2', '-n', src, dst).status).toBe(0);
          else expect(await asQemuImg('convert', '-O', 'qcow2', '-n', src, dst)).toEqual({ code: 0, out: '', err: '' });
          maps.push(qemuImg('map', '--output=json', dst));
        }
        expect(maps[1]).toBe(maps[0]);
      });
    }

    it('-n -B into an image without a backing file: no backing format asked for, as qemu-img', async () => {
      const base = t.path('nb-base.qcow2');
      const src = t.path('nb-src.qcow2');
      qemuImg('create', '-q', '-f', 'qcow2', base, '64M');
      qemuImg('create', '-q', '-f', 'qcow2', src, '64M');
      const res: unknown[] = [];
      for (const who of ['q', 's']) {
        const dst = t.path(`nb-dst-${who}.qcow2`);
        qemuImg('create', '-q', '-f', 'qcow2', dst, '64M');
        const r = who === 'q' ? qemuImgRun('convert', '-O', 'qcow2', '-B', base, '-n', src, dst) : await asQemuImg('convert', '-O', 'qcow2', '-B', base, '-n', src, dst);
        res.push('status' in r ? [r.status, r.stdout, r.stderr] : [r.code, r.out, r.err]);
        expect(qemuImgRun('check', dst).status).toBe(0);
      }
      expect(res[1]).toEqual(res[0]);
    });

    it('-n with -o: qemu-img\'s words', async () => {
      const src = t.path('no-src.qcow2');
      const dst = t.path('no-dst.qcow2');
      qemuImg('create', '-q', '-f', 'qcow2', src, '64M');
      qemuImg('create', '-q', '-f', 'qcow2', dst, '64M');
      const q = qemuImgRun('convert', '-O', 'qcow2', '-o', 'preallocation=metadata', '-n', src, dst);
      const s = await asQemuImg('convert', '-O', 'qcow2', '-o', 'preallocation=metadata', '-n', src, dst);
      expect(q.status).toBe(1);
      expect([s.code, s.out, s.err]).toEqual([q.status, q.stdout, q.stderr]);
    });
  });

  describe('convert -S larger than the target\'s clusters: data runs aligned and short zero runs kept as qemu-img does (iotest 122)', () => {
    const src = t.path('s-src.qcow2');
    const writes = ['write -P 0 0 64k', 'write 0 1k', 'write 8k 1k', 'write 17k 1k', 'write -P 0 65k 1k', 'write 200k 3k', 'write 300k 512', 'write 310k 512'];
    const cases: [string[], string][] = [];
    for (const sparse of ['4k', '8k', '2k', '16k', '6k']) for (const cluster of ['512', '1k', '2k']) cases.push([['-S', sparse], `cluster_size=${cluster}`]);
    // Extended L2 entries: 2 KiB subclusters under the default -S of 4 KiB.
    for (const sparse of [[], ['-S', '8k']]) cases.push([sparse, 'cluster_size=64k,extended_l2=on']);
    for (const [sparse, o] of cases) {
      {
        it(`${sparse.join(' ') || 'default -S'}, ${o}`, async () => {
          qemuImg('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=1k', src, '64M');
          qemuIo(src, writes);
          const q = t.path('s-q.qcow2');
          const s = t.path('s-s.qcow2');
          qemuImg('convert', '-O', 'qcow2', '-o', o, ...sparse, src, q);
          expect((await strata('convert', '-O', 'qcow2', '-o', o, ...sparse, src, s)).code).toBe(0);
          expect(qemuImg('map', '--output=json', s)).toBe(qemuImg('map', '--output=json', q));
          expect(qemuImgRun('compare', s, q).status).toBe(0);
        });
      }
    }
  });

  it('check -r all that rebuilds the refcounts: the recount prints what it finds again, before the leak repairs (iotest 271)', async () => {
    const base = t.path('unal-base.raw');
    qemuImg('create', '-q', '-f', 'raw', base, '128k');
    qemuIo(base, ['write -q -P 0xff 0 128k'], { format: 'raw' });
    const q = t.path('unal-q.qcow2');
    const s = t.path('unal-s.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', '-o', 'extended_l2=on', '-b', base, '-F', 'raw', q);
    qemuIo(q, ['write -q -P 1 4k 2k']);
    const b = readFileSync(q);
    const l2 = Number(b.readBigUInt64BE(Number(b.readBigUInt64BE(40))) & 0x00fffffffffffe00n);
    b[l2 + 6] = 0x02;
    writeFileSync(q, b);
    copyFileSync(q, s);
    const rq = qemuImgRun('check', '-r', 'all', q);
    const rs = await asQemuImg('check', '-r', 'all', s);
    expect(rq.stderr).toContain('Rebuilding refcount structure\nERROR offset=50200');
    expect([rs.code, rs.out, rs.err]).toEqual([rq.status, rq.stdout, rq.stderr]);
  });

  for (const mode of ['falloc', 'full', 'metadata']) {
    it(`resize --preallocation=${mode} of an extended-L2 image that ends inside a cluster keeps the data there (iotest 271)`, async () => {
      const q = t.path(`pre-${mode}-q.qcow2`);
      const s = t.path(`pre-${mode}-s.qcow2`);
      for (const f of [q, s]) {
        qemuImg('create', '-q', '-f', 'qcow2', '-o', 'extended_l2=on', f, '503k');
        qemuIo(f, ['write -P 0xff 0 503k']);
      }
      qemuImg('resize', '-q', `--preallocation=${mode}`, q, '1013k');
      expect((await strata('resize', `--preallocation=${mode}`, s, '1013k')).code).toBe(0);
      expect(qemuIo(s, ['read -P 0xff 0 503k', 'read -P 0 503k 510k'])).not.toMatch(/verification failed/);
      // metadata: Strata zeroes the grown part of the partial cluster (a deliberate difference).
      if (mode !== 'metadata') expect(qemuImg('map', '--output=json', s)).toBe(qemuImg('map', '--output=json', q));
      expect(qemuImgRun('check', s).status).toBe(0);
    });
  }

  describe('convert -p when stdout is no terminal: qemu-img\'s (NN.NN/100%) lines on stdout, its steps (iotest 086)', () => {
    const src = t.path('p-src.qcow2');
    const runs: [string, string[]][] = [['1 MiB runs', ['write 0 1M', 'write 2M 1M', 'write 4M 1M', 'write 32M 1M']], ['long runs and a zero run', ['write 0 7M', 'write 20M 3M', 'write -z 30M 1M']]];
    for (const [name, writes] of runs) {
      for (const extra of [[], ['-S', '0']]) {
        it(`${name} ${extra.join(' ')}`, async () => {
          qemuImg('create', '-q', '-f', 'qcow2', src, '128M');
          qemuIo(src, writes);
          const q = qemuImgRun('convert', '-p', ...extra, '-O', 'qcow2', src, t.path('p-q.qcow2'));
          for (const r of [await strata('convert', '-p', ...extra, '-O', 'qcow2', src, t.path('p-s.qcow2')), await asQemuImg('convert', '-p', ...extra, '-O', 'qcow2', src, t.path('p-s2.qcow2'))]) {
            expect([r.code, r.out, r.err]).toEqual([q.status, q.stdout, q.stderr]);
          }
        });
      }
    }
  });

  it('printf("%.2f") rounds the exact binary value half to even', () => {
    expect(printfFixed2(3.125)).toBe('3.12');
    expect(printfFixed2(9.375)).toBe('9.38');
    expect(printfFixed2(0)).toBe('0.00');
    expect(printfFixed2(100)).toBe('100.00');
    expect(printfFixed2(Math.fround(10.9375))).toBe('10.94');
    expect(printfFixed2(0.005)).toBe('0.01'); // 0.005 is stored a little above 0.005
  });

  it('map of a data cluster past the end of the file: printed as qemu-img prints it; reads still refuse it', async () => {
    const f = t.path('past-eof.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', f, '1M');
    qemuIo(f, ['write 0 64k', 'write 128k 64k']);
    // Point the first L2 entry at 256 MiB, far past the end of the file.
    const b = readFileSync(f);
    const l2 = Number(b.readBigUInt64BE(Number(b.readBigUInt64BE(40))) & 0x00fffffffffffe00n);
    b.writeBigUInt64BE((b.readBigUInt64BE(l2) & 0xff00000000000000n) | 0x10000000n, l2);
    writeFileSync(f, b);
    for (const o of ['human', 'json']) {
      const q = qemuImgRun('map', `--output=${o}`, f);
      const s = await strata('map', `--output=${o}`, f);
      expect(q.stdout).toContain(o === 'json' ? '268435456' : '0x10000000');
      expect([s.code, s.out]).toEqual([q.status, q.stdout]);
    }
    const c = await strata('convert', '-O', 'raw', f, t.path('past-eof.raw'));
    expect(c.code).toBe(1);
    expect(c.err).toMatch(/past the end of the file/);
  });

  it('check shows a 64-bit refcount as the unsigned value stored (iotest 112)', async () => {
    const f = t.path('rc64.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', '-o', 'refcount_bits=64', f, '64M');
    qemuIo(f, ['write 0 512']);
    const b = readFileSync(f);
    const refblock = Number(b.readBigUInt64BE(Number(b.readBigUInt64BE(48))));
    const l2 = Number(b.readBigUInt64BE(Number(b.readBigUInt64BE(40))) & 0x00fffffffffffe00n);
    const data = Number(b.readBigUInt64BE(l2) & 0x00fffffffffffe00n) / 65536;
    b.writeBigUInt64BE(0xffffffffffffffffn, refblock + data * 8);
    writeFileSync(f, b);
    const q = qemuImgRun('check', f);
    const s = await strata('check', f);
    expect(q.stderr).toContain('refcount=18446744073709551615');
    expect([s.code, s.out, s.err]).toEqual([q.status, q.stdout, q.stderr]);
  });

  for (const [name, clusters] of [['an emptied refcount table', '1M'], ['an emptied refcount table, 512-byte clusters', '16k']] as const) {
    it(`check -r all rebuilds from ${name} as qemu-img does: the same messages and the same bytes`, async () => {
      const q = t.path(`empty-rt-q-${clusters}.qcow2`);
      const s = t.path(`empty-rt-s-${clusters}.qcow2`);
      qemuImg('create', '-q', '-f', 'qcow2', '-o', clusters === '16k' ? 'cluster_size=512' : 'cluster_size=65536', q, '64M');
      qemuIo(q, [`write 0 ${clusters}`, 'write 32M 64k']);
      const b = readFileSync(q);
      b.fill(0, Number(b.readBigUInt64BE(48)), Number(b.readBigUInt64BE(48)) + 8);
      writeFileSync(q, b);
      copyFileSync(q, s);
      const rq = qemuImgRun('check', '-r', 'all', q);
      const rs = await strata('check', '-r', 'all', s);
      expect(rq.stderr).toContain('Rebuilding refcount structure');
      expect([rs.code, rs.out, rs.err]).toEqual([rq.status, rq.stdout, rq.stderr]);
      expect(readFileSync(s).equals(readFileSync(q))).toBe(true);
    });
  }
});
