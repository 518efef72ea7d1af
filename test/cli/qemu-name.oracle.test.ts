// Strata started through a link named qemu-img (the drop-in QEMU's iotests run with
// QEMU_IMG_PROG) prints qemu-img's messages under qemu-img's name and exits as qemu-img does;
// started as strata it keeps its own messages. Each case runs qemu-img as the oracle.
import { spawnSync } from 'node:child_process';
import { readFileSync, symlinkSync } from 'node:fs';
import { join } from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { describeOracleText, qemuImg, qemuImgRun, tempDir } from '../oracle/qemu';
import { programOf } from '../../cli/common';
import { asQemuImg, ensureBuilt, repoRoot, strata } from './run-cli';

describe('programOf', () => {
  it('is qemu-img only for a path whose last part is qemu-img', () => {
    expect(programOf('/usr/local/bin/qemu-img')).toBe('qemu-img');
    expect(programOf('qemu-img')).toBe('qemu-img');
    expect(programOf('/work/bin/strata.cjs')).toBe('strata');
    expect(programOf('/x/qemu-img-wrapper')).toBe('strata');
  });
});

describeOracleText('strata as qemu-img', () => {
  const t = tempDir('strata-qemu-name-');

  it('an unknown command: qemu-img\'s two lines and exit 1', async () => {
    const q = qemuImgRun('bogus');
    const r = await asQemuImg('bogus');
    expect(r.err).toBe(q.stderr);
    expect(r.code).toBe(q.status);
    // As strata: its own message and the usage exit code.
    expect((await strata('bogus')).code).toBe(2);
  });

  it('a usage error: the message and the pointer to --help, exit 1', async () => {
    const q = qemuImgRun('info');
    const r = await asQemuImg('info');
    expect(r.code).toBe(q.status);
    expect(r.err).toMatch(/^qemu-img: .+\nTry 'qemu-img --help' for more information\n$/);
  });

  describe('through a link named qemu-img', () => {
    beforeAll(() => ensureBuilt());
    it('errors are printed under the name qemu-img', () => {
      const link = t.path('qemu-img');
      symlinkSync(join(repoRoot, 'bin', 'strata.cjs'), link);
      const r = spawnSync(link, ['bogus'], { encoding: 'utf8' });
      expect(r.status).toBe(1);
      expect(r.stderr).toBe(qemuImgRun('bogus').stderr);
      const s = spawnSync(join(repoRoot, 'bin', 'strata.cjs'), ['bogus'], { encoding: 'utf8' });
      expect(s.stderr).toMatch(/^strata: /);
    });
  });
});

// Strata's own refusal of a write that changes what another image reads (create over a
// backing file an overlay still uses) holds only under the name strata: started as qemu-img,
// whoever linked it asked for qemu-img's behaviour, which writes (iotests 024, 043, 097, 154).
describeOracleText('create over a backing file an overlay uses', () => {
  const t = tempDir('strata-qemu-name-force-');

  /** A base and an overlay on it in a folder of their own; returns the base's path. */
  const chain = (name: string): string => {
    const base = t.path(`${name}.base`);
    qemuImg('create', '-q', '-f', 'qcow2', base, '1M');
    qemuImg('create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', t.path(`${name}.top`));
    return base;
  };

  it('as qemu-img: written, with qemu-img\'s output and exit status', async () => {
    const q = qemuImgRun('create', '-f', 'qcow2', chain('q'), '2M');
    const base = chain('s');
    const r = await asQemuImg('create', '-f', 'qcow2', base, '2M');
    expect({ code: r.code, out: r.out.replaceAll('/s.base', '/q.base'), err: r.err }).toStrictEqual({ code: q.status, out: q.stdout, err: q.stderr });
    expect(q.status).toBe(0);
    expect(JSON.parse(qemuImg('info', '--output=json', base))['virtual-size']).toBe(2 << 20);
    expect(qemuImgRun('check', base).status).toBe(0);
  });

  it('as strata: refused without --force, the base untouched; written with --force', async () => {
    const base = chain('f');
    const before = readFileSync(base);
    const r = await strata('create', '-f', 'qcow2', base, '2M');
    expect(r.code).toBe(2);
    expect(r.err).toMatch(/^strata: refused: .*f\.top depends on .*f\.base and would read different data afterwards \(use --force if that is intended\)\n$/);
    expect(readFileSync(base).equals(before)).toBe(true);
    expect((await strata('create', '-q', '--force', '-f', 'qcow2', base, '2M')).code).toBe(0);
    expect(JSON.parse(qemuImg('info', '--output=json', base))['virtual-size']).toBe(2 << 20);
  });

  it('rebase -u of a base onto its own overlay: recorded under both names, as qemu-img records it', async () => {
    const q = chain('rq');
    expect(qemuImgRun('rebase', '-u', '-b', t.path('rq.top'), '-F', 'qcow2', q).status).toBe(0);
    for (const [name, runAs] of [['rs', asQemuImg], ['rt', strata]] as const) {
      const base = chain(name);
      const r = await runAs('rebase', '-u', '-b', t.path(`${name}.top`), '-F', 'qcow2', base);
      expect({ code: r.code, out: r.out, err: r.err }).toStrictEqual({ code: 0, out: '', err: '' });
      const header = (f: string) => readFileSync(f).subarray(0, 4096).toString('latin1').replace(/r[qst]\.top/g, 'X.top');
      expect(header(base)).toBe(header(q));
    }
  });
});
