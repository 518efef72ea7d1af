// Hostile images through the engine's API: every damaged image (hostile-cases.ts) must give a
// StrataError naming the file and the problem, at the stage where the damage is first met,
// quickly, on one line, and without any file changing. test/cli/hostile-cli.test.ts runs the
// same images through the strata command.
import { spawnSync } from 'node:child_process';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { build } from 'esbuild';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { StrataError } from '../../../core/errors';
import { closeChain, openImage, openImageFile } from '../../../core/chain/open';
import { mapImage } from '../../../core/chain/map';
import type { DiskImage } from '../../../core/engine/image';
import { describeOracle, qemuImg, tempDir } from '../../oracle/qemu';
import { CASES, WORST_CASES, sha256, type Built, type HostileCase } from './hostile-cases';

const repoRoot = join(dirname(fileURLToPath(import.meta.url)), '..', '..', '..');

/** Time any one stage may take ("within a few seconds"). */
const QUICK_MS = 5000;
const CHUNK = 256 * 1024;

async function timed<T>(what: string, f: () => Promise<T>): Promise<T> {
  const t0 = performance.now();
  try {
    return await f();
  } finally {
    const ms = performance.now() - t0;
    expect(ms, `${what} took ${ms.toFixed(0)} ms`).toBeLessThan(QUICK_MS);
  }
}

async function caught(f: () => Promise<unknown>): Promise<unknown> {
  try {
    await f();
  } catch (e) {
    return e;
  }
  return undefined;
}

async function readAll(img: DiskImage): Promise<Buffer> {
  const out = Buffer.alloc(img.virtualSize);
  for (let pos = 0; pos < img.virtualSize; pos += CHUNK) {
    await img.read(out.subarray(pos, Math.min(img.virtualSize, pos + CHUNK)), pos);
  }
  return out;
}

async function mapAll(img: DiskImage): Promise<number> {
  let covered = 0;
  for await (const e of mapImage(img)) covered += e.length;
  return covered;
}

/** The typed, one-line error naming the file that the requirement asks for. */
function expectHostileError(err: unknown, c: HostileCase, b: Built): void {
  if (!(err instanceof StrataError)) {
    throw new Error(`expected a StrataError, got ${err === undefined ? 'no error' : String((err as Error)?.stack ?? err)}`);
  }
  for (const name of c.names?.(b) ?? [b.image]) expect(err.message, 'the message names the file').toContain(name);
  if (c.problem) expect(err.message, 'the message names the problem').toMatch(c.problem);
  expect(err.message, 'the message is one line').not.toMatch(/[\r\n]/);
}

type Stage = 'open' | 'read' | 'map';

/** Opens with the chain, reads everything in chunks, maps everything; errors by stage. */
async function exercise(b: Built): Promise<{ errors: Partial<Record<Stage, unknown>>; content?: Buffer }> {
  let img: DiskImage;
  try {
    img = await timed('open', () => openImage(b.image, { format: b.format }));
  } catch (error) {
    return { errors: { open: error } };
  }
  try {
    const errors: Partial<Record<Stage, unknown>> = {};
    let content: Buffer | undefined;
    const readErr = await caught(async () => { content = await timed('read', () => readAll(img)); });
    if (readErr !== undefined) errors.read = readErr;
    const mapErr = await caught(() => timed('map', () => mapAll(img)));
    if (mapErr !== undefined) errors.map = mapErr;
    return { errors, content };
  } finally {
    await closeChain(img);
  }
}

/** What qemu-img reads from the image (or the file itself when raw). */
function expectedContent(b: Built, out: string): Buffer {
  if (b.format === 'raw' || !/\.qcow2$/.test(b.image)) return readFileSync(b.image);
  qemuImg('convert', '-O', 'raw', b.image, out);
  return readFileSync(out);
}

describeOracle('hostile images through the API', () => {
  const tmp = tempDir('strata-hostile-');
  afterAll(() => tmp.cleanup());

  CASES.forEach((c, i) => {
    it(`${c.name} [${c.level}]`, async () => {
      const dir = tmp.path(`case${i}`);
      mkdirSync(dir);
      const b = c.build(dir);
      const hashes = b.files.map(sha256);

      // The image alone, as `info` opens it.
      const alone = await caught(() => timed('open without backing', async () => closeChain(await openImageFile(b.image, { format: b.format }))));
      const r = await exercise(b);
      const stages = Object.keys(r.errors).sort();
      switch (c.level) {
        case 'open':
          expectHostileError(alone, c, b);
          expect(stages).toEqual(['open']);
          expectHostileError(r.errors.open, c, b);
          break;
        case 'chain':
          if (alone !== undefined) throw alone;
          expect(stages).toEqual(['open']);
          expectHostileError(r.errors.open, c, b);
          break;
        case 'l2':
          // Both a full read and a full map meet the bad table.
          if (alone !== undefined) throw alone;
          expect(stages).toEqual(['map', 'read']);
          expectHostileError(r.errors.read, c, b);
          expectHostileError(r.errors.map, c, b);
          break;
        case 'data':
          if (alone !== undefined) throw alone;
          expect(stages, 'map works, reading the data does not').toEqual(['read']);
          expectHostileError(r.errors.read, c, b);
          break;
        case 'ok':
          if (alone !== undefined) throw alone;
          for (const e of Object.values(r.errors)) throw e;
          expect(r.content!.equals(expectedContent(b, `${dir}.expected.raw`)), 'reads what qemu-img reads').toBe(true);
          break;
        case 'any':
          for (const e of [alone, ...Object.values(r.errors)]) if (e !== undefined) expectHostileError(e, c, b);
          break;
      }
      expect(b.files.map(sha256), 'the image files are unchanged').toEqual(hashes);
    });
  });
});

// ---------------------------------------------------------------- worst cases, in a child process

/**
 * The API in a child process with a 128 MiB heap and a hard time limit, so that a reader that
 * allocates from an unchecked field dies of OOM (instead of taking the test runner with it)
 * and one that loops is killed. Bundled with esbuild from the sources under test.
 */
const RUNNER = `
import { openImage, closeChain } from './core/chain/open';
import { mapImage } from './core/chain/map';
import { StrataError } from './core/errors';
const file = process.argv[2];
const t0 = performance.now();
let result;
try {
  const img = await openImage(file);
  try {
    const buf = Buffer.alloc(1 << 20);
    const limit = Math.min(img.virtualSize, 64 << 20);
    for (let p = 0; p < limit; p += buf.length) await img.read(buf.subarray(0, Math.min(buf.length, limit - p)), p);
    for await (const e of mapImage(img)) void e;
    result = { ok: true };
  } finally { await closeChain(img); }
} catch (e) {
  result = { ok: false, typed: e instanceof StrataError, message: String(e?.message), stack: String(e?.stack) };
}
result.ms = performance.now() - t0;
result.maxRssMiB = process.resourceUsage().maxRSS / 1024;
process.stdout.write(JSON.stringify(result));
`;

const CHILD_HEAP_MIB = 128;
/** Peak RSS allowed: the heap limit plus the 32 MiB L1 table QEMU allows, plus Node itself. */
const CHILD_RSS_MIB = 320;
const CHILD_KILL_MS = 15_000;

describeOracle('worst-case sizes through the API (child process, small heap)', () => {
  const tmp = tempDir('strata-worst-');
  const runner = join(tmp.dir, 'runner.mjs');
  afterAll(() => tmp.cleanup());
  beforeAll(async () => {
    const out = await build({
      stdin: { contents: RUNNER, resolveDir: repoRoot, loader: 'ts', sourcefile: 'runner.ts' },
      bundle: true, platform: 'node', format: 'esm', target: 'node20', write: false,
      external: ['zstd-napi'], logLevel: 'silent',
      banner: { js: "import { createRequire as __cr } from 'node:module'; const require = __cr(import.meta.url);" },
    });
    writeFileSync(runner, out.outputFiles[0]!.contents);
  });

  WORST_CASES.forEach((c, i) => {
    it(c.name, () => {
      const dir = tmp.path(`worst${i}`);
      mkdirSync(dir);
      const b = c.build(dir);
      const hashes = b.files.map(sha256);
      const t0 = performance.now();
      const r = spawnSync(process.execPath, [`--max-old-space-size=${CHILD_HEAP_MIB}`, runner, b.image], {
        encoding: 'utf8', timeout: CHILD_KILL_MS, killSignal: 'SIGKILL',
      });
      const wall = performance.now() - t0;
      expect(r.signal, `killed after ${wall.toFixed(0)} ms (limit ${CHILD_KILL_MS} ms); stderr: ${r.stderr.slice(0, 500)}`).toBeNull();
      expect(r.stderr, 'no crash, no OOM').not.toMatch(/heap out of memory|FATAL ERROR|Allocation failed/);
      expect(r.status, r.stderr).toBe(0);
      const res = JSON.parse(r.stdout) as { ok: boolean; typed?: boolean; message?: string; stack?: string; ms: number; maxRssMiB: number };
      expect(res.ms, 'within a few seconds').toBeLessThan(QUICK_MS);
      expect(res.maxRssMiB, 'peak RSS (MiB)').toBeLessThan(CHILD_RSS_MIB);
      if (c.expect === 'ok') expect(res.ok, res.stack).toBe(true);
      if (c.expect === 'error') expect(res.ok).toBe(false);
      if (!res.ok) {
        expect(res.typed, res.stack).toBe(true);
        expect(res.message).toContain(b.image);
        if (c.problem) expect(res.message).toMatch(c.problem);
      }
      expect(b.files.map(sha256)).toEqual(hashes);
    });
  });
});

describe('hostile case table', () => {
  it('covers every level', () => {
    const levels = new Set(CASES.map((c) => c.level));
    for (const l of ['open', 'chain', 'l2', 'data', 'ok', 'any'] as const) expect(levels).toContain(l);
  });
});
