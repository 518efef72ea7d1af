// Hostile images through the strata command: the images of test/core/format/hostile-cases.ts
// through `info`, `map --output=json`, `convert -O raw` and `compare`, in-process, plus the
// worst-case sizes through `node bin/strata.cjs` in a child process with a small heap.
// Errors are one line on stderr (two for usage errors) starting with "strata: ", naming the
// file and the problem, with a non-zero exit, no stack trace unless STRATA_DEBUG=1, quickly,
// and no file changes.
import { spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { run } from '../../cli/main';
import { describeOracle, qemuImg, tempDir } from '../oracle/qemu';
import { ensureBuilt } from './run-cli';
import { CASES, WORST_CASES, baseQcow2, sha256, writeAt, u32, type Built, type HostileCase, type Level } from '../core/format/hostile-cases';

const repoRoot = join(dirname(fileURLToPath(import.meta.url)), '..', '..');
const QUICK_MS = 5000;

interface CliResult { code: number; out: string; err: string; ms: number }

async function cli(args: string[]): Promise<CliResult> {
  let out = '';
  let err = '';
  const t0 = performance.now();
  const code = await run(args, { out: (s) => { out += s; }, err: (s) => { err += s; }, isTTY: false });
  return { code, out, err, ms: performance.now() - t0 };
}

/** One line on stderr, "strata: ...", naming the file(s) and the problem, no stack trace. */
function expectOneLineError(r: CliResult, what: string, names: string[], problem?: RegExp): void {
  expect(r.code, `${what}: exit code (stderr: ${r.err})`).not.toBe(0);
  expect(r.err, `${what}: stderr ends with a newline`).toMatch(/\n$/);
  const lines = r.err.slice(0, -1).split('\n');
  expect(lines, `${what}: exactly one line on stderr`).toHaveLength(1);
  expect(lines[0], what).toMatch(/^strata: /);
  for (const n of names) expect(lines[0], `${what}: names ${n}`).toContain(n);
  if (problem) expect(lines[0], `${what}: names the problem`).toMatch(problem);
  expect(r.err, `${what}: no stack trace`).not.toMatch(/^\s+at /m);
}

type Outcome = 'ok' | 'error' | 'either';

/** Which commands must fail, by how far the damage lets a reader get. */
const EXPECT: Record<Level, { info: Outcome; infoChain: Outcome; map: Outcome; convert: Outcome; compare: Outcome }> = {
  open: { info: 'error', infoChain: 'error', map: 'error', convert: 'error', compare: 'error' },
  // Like qemu-img, plain `info` does not open the backing chain.
  chain: { info: 'ok', infoChain: 'error', map: 'error', convert: 'error', compare: 'error' },
  l2: { info: 'ok', infoChain: 'ok', map: 'error', convert: 'error', compare: 'error' },
  data: { info: 'ok', infoChain: 'ok', map: 'ok', convert: 'error', compare: 'error' },
  ok: { info: 'ok', infoChain: 'ok', map: 'ok', convert: 'ok', compare: 'ok' },
  any: { info: 'either', infoChain: 'either', map: 'either', convert: 'either', compare: 'either' },
};

describeOracle('hostile images through the strata command (in-process)', () => {
  const tmp = tempDir('strata-hostile-cli-');
  afterAll(() => tmp.cleanup());

  CASES.forEach((c: HostileCase, i) => {
    it(`${c.name} [${c.level}]`, async () => {
      const dir = tmp.path(`case${i}`);
      mkdirSync(dir);
      const b: Built = c.build(dir);
      const hashes = b.files.map(sha256);
      const names = c.names?.(b) ?? [b.image];
      const f = b.format ? ['-f', b.format] : [];
      const want = c.infoOpens ? { ...EXPECT[c.level], info: 'ok' as Outcome, infoChain: 'ok' as Outcome } : EXPECT[c.level];
      let expected: Buffer | undefined;
      if (c.level === 'ok') {
        if (b.format === 'raw' || !/\.qcow2$/.test(b.image)) expected = readFileSync(b.image);
        else { qemuImg('convert', '-O', 'raw', b.image, join(dir, 'expected.raw')); expected = readFileSync(join(dir, 'expected.raw')); }
        writeFileSync(join(dir, 'expected.raw'), expected);
      }

      const check = (what: string, r: CliResult, outcome: Outcome) => {
        expect(r.ms, `${what} took ${r.ms.toFixed(0)} ms`).toBeLessThan(QUICK_MS);
        if (outcome === 'ok' || (outcome === 'either' && r.code === 0)) {
          expect(r.code, `${what} should succeed; stderr: ${r.err}`).toBe(0);
          expect(r.err, what).toBe('');
        } else {
          expectOneLineError(r, what, names, c.problem);
        }
      };

      check('info', await cli(['info', ...f, b.image]), want.info);
      check('info --backing-chain', await cli(['info', '--backing-chain', '--output=json', ...f, b.image]), want.infoChain);
      const map = await cli(['map', '--output=json', ...f, b.image]);
      check('map --output=json', map, c.mapLists ? 'ok' : want.map);
      if (map.code === 0) expect(JSON.parse(map.out)).toBeInstanceOf(Array);
      // Past-EOF data clusters: listed as qemu-img lists them, byte for byte.
      if (c.mapLists) expect(map.out).toBe(qemuImg('map', '--output=json', ...f, b.image));

      const dst = join(dir, 'out.raw');
      const conv = await cli(['convert', ...f, '-O', 'raw', b.image, dst]);
      check('convert -O raw', conv, want.convert);
      if (conv.code === 0) {
        if (expected) expect(readFileSync(dst).equals(expected), 'convert output equals qemu-img convert output').toBe(true);
      } else {
        expect(existsSync(dst), 'a failed convert leaves no partial target').toBe(false);
      }

      // A damaged image is compared with itself: nothing differs, so compare must read it all.
      const cmp = expected
        ? await cli(['compare', ...f, '-F', 'raw', b.image, join(dir, 'expected.raw')])
        : await cli(['compare', ...f, ...(b.format ? ['-F', b.format] : []), b.image, b.image]);
      check('compare', cmp, want.compare);
      if (cmp.code !== 0) expect(cmp.code, 'compare exits 2 on errors, as qemu-img').toBe(2);
      else expect(cmp.out).toMatch(/Images are identical/);

      expect(b.files.map(sha256), 'the image files are unchanged').toEqual(hashes);
    });
  });

  it('STRATA_DEBUG=1 adds the stack trace, and only then', async () => {
    const p = baseQcow2(tmp.dir, 'debug.qcow2', { io: [] });
    writeAt(p, 0, u32(0x514649fa));
    const plain = await cli(['info', '-f', 'qcow2', p]);
    expectOneLineError(plain, 'without STRATA_DEBUG', [p], /magic/);
    const saved = process.env.STRATA_DEBUG;
    process.env.STRATA_DEBUG = '1';
    try {
      const dbg = await cli(['info', '-f', 'qcow2', p]);
      expect(dbg.code).toBe(1);
      expect(dbg.err).toMatch(/^\s+at /m);
      expect(dbg.err).toMatch(new RegExp(`^strata: .*${p.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}.*magic`, 'm'));
    } finally {
      if (saved === undefined) delete process.env.STRATA_DEBUG; else process.env.STRATA_DEBUG = saved;
    }
  });

  it('usage errors are two lines: the problem and the usage', async () => {
    for (const args of [['map'], ['info', '--no-such-option', 'x.qcow2'], ['compare', 'a.qcow2']]) {
      const r = await cli(args);
      expect(r.code, args.join(' ')).toBe(2);
      const lines = r.err.replace(/\n$/, '').split('\n');
      expect(lines, args.join(' ')).toHaveLength(2);
      expect(lines[0]).toMatch(/^strata: /);
      expect(lines[1]).toMatch(/^usage: strata /);
    }
  });

  it('a file that does not exist is one line naming it', async () => {
    const p = tmp.path('no-such-image.qcow2');
    for (const cmd of [['info'], ['map', '--output=json']]) {
      expectOneLineError(await cli([...cmd, p]), cmd[0]!, [p], /no such file|does not exist/);
    }
  });
});

// ---------------------------------------------------------------- worst cases, in a child process

const CHILD_HEAP_MIB = 128;
const CHILD_RSS_MIB = 320;
const CHILD_KILL_MS = 15_000;

describeOracle('worst-case sizes through node bin/strata.cjs (child process, 128 MiB heap)', () => {
  const tmp = tempDir('strata-worst-cli-');
  const preload = join(tmp.dir, 'rss.cjs');
  afterAll(() => tmp.cleanup());
  beforeAll(() => {
    ensureBuilt();
    // Reports the child's peak RSS without touching its stdout/stderr.
    writeFileSync(preload, "process.on('exit', () => require('node:fs').writeFileSync(process.env.STRATA_TEST_RSS_FILE, String(process.resourceUsage().maxRSS / 1024)));\n");
  });

  WORST_CASES.forEach((c, i) => {
    it(`${c.name}: strata ${c.command.join(' ')}`, () => {
      const dir = tmp.path(`worst${i}`);
      mkdirSync(dir);
      const b = c.build(dir);
      const hashes = b.files.map(sha256);
      const rssFile = join(dir, 'rss');
      const t0 = performance.now();
      const r = spawnSync(process.execPath, [`--max-old-space-size=${CHILD_HEAP_MIB}`, '--require', preload, join(repoRoot, 'bin', 'strata.cjs'), ...c.command, b.image], {
        encoding: 'utf8', timeout: CHILD_KILL_MS, killSignal: 'SIGKILL', maxBuffer: 64 << 20,
        env: { ...process.env, STRATA_TEST_RSS_FILE: rssFile, STRATA_DEBUG: '' },
      });
      const ms = performance.now() - t0;
      expect(r.signal, `killed after ${ms.toFixed(0)} ms (limit ${CHILD_KILL_MS} ms)`).toBeNull();
      expect(r.stderr, 'no OOM crash').not.toMatch(/heap out of memory|FATAL ERROR|Allocation failed/);
      expect(ms, 'within a few seconds').toBeLessThan(QUICK_MS);
      const rss = Number(readFileSync(rssFile, 'utf8'));
      expect(rss, 'peak RSS (MiB)').toBeLessThan(CHILD_RSS_MIB);
      const res: CliResult = { code: r.status ?? -1, out: r.stdout, err: r.stderr, ms };
      if (c.expect === 'ok' || (c.expect === 'any' && res.code === 0)) {
        expect(res.code, res.err).toBe(0);
        expect(res.err).toBe('');
      } else {
        expect(res.code).toBe(1);
        expectOneLineError(res, c.command.join(' '), [b.image], c.problem);
      }
      expect(b.files.map(sha256)).toEqual(hashes);
    });
  });
});
