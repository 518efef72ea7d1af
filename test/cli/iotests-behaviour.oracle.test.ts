// Behaviour QEMU's iotests showed to differ, each case with qemu-img as the oracle (the iotest
// it comes from in its name). Images are made at test time with qemu-img and qemu-io.
import { spawnSync } from 'node:child_process';
import { copyFileSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { afterAll, describe, expect, it } from 'vitest';
import { describeOracleText, qemuImg, qemuImgRun, qemuIo, tempDir } from '../oracle/qemu';
import { asQemuImg, strata } from './run-cli';

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
});
