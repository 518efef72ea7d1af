// Strata started through a link named qemu-img (the drop-in QEMU's iotests run with
// QEMU_IMG_PROG) prints qemu-img's messages under qemu-img's name and exits as qemu-img does;
// started as strata it keeps its own messages. Each case runs qemu-img as the oracle.
import { spawnSync } from 'node:child_process';
import { symlinkSync } from 'node:fs';
import { join } from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { describeOracleText, qemuImgRun, tempDir } from '../oracle/qemu';
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
