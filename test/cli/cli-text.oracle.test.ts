// The strata binary and its human output against qemu-img: exit codes and one-line errors
// from the real binary (node bin/strata.cjs), human `info` and `map` text character for
// character, and `map` of a 1 TiB image with a few scattered writes.
import { copyFileSync } from 'node:fs';
import { beforeAll, describe, expect, it } from 'vitest';
import { qemuImg, qemuImgRun, describeOracleText } from '../oracle/qemu';
import { MATRIX, buildHugeImage, imageWorkspace, type ImageCase } from '../oracle/images';
import { ensureBuilt, flipByte, strata, strataBin, strataOk, syncFiles } from './run-cli';

function byName(name: string): ImageCase {
  const all = [...MATRIX.single, ...MATRIX.snapshots, ...MATRIX.chains];
  const c = all.find((x) => x.name === name);
  if (!c) throw new Error(`no matrix case ${name}`);
  return c;
}

/** A stack trace line as V8 prints them. */
const STACK_LINE = /^\s+at .+/m;

describeOracleText('strata CLI text and binary against qemu-img', () => {
  const workspace = imageWorkspace('strata-cli-text-');
  const built: Record<string, string> = {};

  beforeAll(() => {
    for (const name of ['chain3-raw-base', 'chain-short-backing', 'snap-c64k', 'snap-c512-rc64', 'chain-short-qcow2-mid', 'c64k-plain', 'c4k', 'bitmaps', 'lazy-dirty-c4k']) {
      const ctx = workspace.context(name);
      built[name] = byName(name).build(ctx).file;
      syncFiles(ctx.dir);
    }
  });

  describe('human output equals qemu-img text', () => {
    for (const name of ['chain3-raw-base', 'chain-short-backing', 'snap-c64k', 'c64k-plain', 'bitmaps', 'lazy-dirty-c4k']) {
      it(`info: ${name}`, async () => {
        expect(await strataOk('info', built[name]!)).toBe(qemuImg('info', built[name]!));
      });
    }
    for (const name of ['chain3-raw-base', 'chain-short-qcow2-mid']) {
      it(`info --backing-chain: ${name}`, async () => {
        expect(await strataOk('info', '--backing-chain', built[name]!)).toBe(qemuImg('info', '--backing-chain', built[name]!));
      });
    }
    for (const name of ['chain-short-qcow2-mid', 'chain-short-backing', 'c64k-plain', 'snap-c512-rc64']) {
      it(`map: ${name}`, async () => {
        expect(await strataOk('map', built[name]!)).toBe(qemuImg('map', built[name]!));
      });
    }
    it('map of an image with compressed clusters fails like qemu-img (exit 1, nothing on stdout past the header)', async () => {
      const q = qemuImgRun('map', built['c4k']!);
      const r = await strata('map', built['c4k']!);
      expect(q.status).toBe(1);
      expect(r.code).toBe(1);
      expect(r.err).toMatch(/compressed/);
      expect(r.out).toBe(q.stdout);
    });
    it('snapshot -l text', async () => {
      expect(await strataOk('snapshot', '-l', built['snap-c64k']!)).toBe(qemuImg('snapshot', '-l', built['snap-c64k']!));
    });
  });

  describe('the real binary (node bin/strata.cjs)', () => {
    beforeAll(() => ensureBuilt());

    it('map --output=json through a chain equals qemu-img, exit 0, nothing on stderr', () => {
      const r = strataBin(['map', '--output=json', built['chain3-raw-base']!]);
      expect({ status: r.status, stderr: r.stderr }).toStrictEqual({ status: 0, stderr: '' });
      expect(r.stdout).toBe(qemuImg('map', '--output=json', built['chain3-raw-base']!));
    });

    it('compare: exit 0 identical, exit 1 with the first differing sector', () => {
      const img = built['c64k-plain']!;
      const ref = workspace.path('c64k-plain.raw');
      qemuImg('convert', '-O', 'raw', img, ref);
      const same = strataBin(['compare', img, ref]);
      expect(same).toStrictEqual({ status: 0, stdout: 'Images are identical.\n', stderr: '' });
      const mutated = workspace.path('c64k-plain-mutated.raw');
      copyFileSync(ref, mutated);
      flipByte(mutated, 6 * 1024 * 1024 + 4321);
      const diff = strataBin(['compare', img, mutated]);
      expect(diff).toStrictEqual({ status: 1, stdout: `Content mismatch at offset ${6 * 1024 * 1024 + 4096}!\n`, stderr: '' });
    });

    it('errors are one line on stderr without a stack trace, with qemu-img\'s exit codes', () => {
      const missing = workspace.path('does-not-exist.qcow2');
      const cases: { args: string[]; status: number }[] = [
        { args: ['info', missing], status: 1 },
        { args: ['map', '--output=json', missing], status: 1 },
        { args: ['convert', '-O', 'raw', missing, workspace.path('out.raw')], status: 1 },
        { args: ['compare', missing, built['c4k']!], status: 2 },
        { args: ['info', '--output=yaml', built['c4k']!], status: 2 },
      ];
      for (const c of cases) {
        const r = strataBin(c.args);
        expect({ args: c.args, status: r.status }).toStrictEqual({ args: c.args, status: c.status });
        expect(r.stdout).toBe('');
        expect(r.stderr).toMatch(/^strata: /);
        expect(r.stderr).not.toMatch(STACK_LINE);
        if (c.status !== 2) expect(r.stderr.trimEnd().split('\n')).toHaveLength(1);
      }
      // A missing backing file names the file and who wants it, still on one line.
      const orphan = workspace.path('orphan.qcow2');
      qemuImg('create', '-q', '-f', 'qcow2', '-u', '-b', 'gone.raw', '-F', 'raw', orphan, '1M');
      const r = strataBin(['map', '--output=json', orphan]);
      expect(r.status).toBe(1);
      expect(r.stderr.trimEnd().split('\n')).toHaveLength(1);
      expect(r.stderr).toContain('gone.raw');
      expect(r.stderr).not.toMatch(STACK_LINE);
    });
  });

  describe('a 1 TiB image with a few scattered writes', () => {
    let huge: string;
    beforeAll(() => {
      const ctx = workspace.context('huge');
      huge = buildHugeImage(ctx).file;
      syncFiles(ctx.dir);
    });

    it('map --output=json equals qemu-img map', async () => {
      expect(await strataOk('map', '--output=json', huge)).toBe(qemuImg('map', '--output=json', huge));
    });

    it('info --output=json deep-equals qemu-img info', async () => {
      expect(JSON.parse(await strataOk('info', '--output=json', huge))).toStrictEqual(JSON.parse(qemuImg('info', '--output=json', huge)));
    });
  });
});
