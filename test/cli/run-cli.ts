// Running the strata CLI from tests: in-process (fast) through cli/main's run(), or as the
// real binary (node bin/strata.cjs) for exit codes and stderr; plus the per-image oracle
// suite that checks the CLI's read path against qemu-img on QEMU-built images.
import { spawnSync } from 'node:child_process';
import { closeSync, copyFileSync, createReadStream, existsSync, fsyncSync, openSync, readdirSync, readSync, statSync, writeSync } from 'node:fs';
import { createHash } from 'node:crypto';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { beforeAll, describe, expect, it } from 'vitest';
import { run } from '../../cli/main';
import { qemuImg, qemuImgRun } from '../oracle/qemu';
import { imageWorkspace, type BuiltImage, type ImageCase } from '../oracle/images';

export const repoRoot = join(dirname(fileURLToPath(import.meta.url)), '..', '..');

export interface CliResult {
  code: number;
  out: string;
  err: string;
}

/** Runs `strata ARGS` in this process, capturing stdout and stderr. */
export async function strata(...argv: string[]): Promise<CliResult> {
  let out = '';
  let err = '';
  const code = await run(argv, { out: (s) => { out += s; }, err: (s) => { err += s; }, isTTY: false }, new AbortController().signal);
  return { code, out, err };
}

/**
 * Runs ARGS in this process as the qemu-img drop-in (strata started through a link named
 * qemu-img): qemu-img's messages under qemu-img's name.
 */
export async function asQemuImg(...argv: string[]): Promise<CliResult> {
  let out = '';
  let err = '';
  const code = await run(argv, { program: 'qemu-img', out: (s) => { out += s; }, err: (s) => { err += s; }, isTTY: false }, new AbortController().signal);
  return { code, out, err };
}

/** Runs `strata ARGS`, expecting success: returns stdout (fails the test with stderr otherwise). */
export async function strataOk(...argv: string[]): Promise<string> {
  const r = await strata(...argv);
  if (r.code !== 0) throw new Error(`strata ${argv.join(' ')} exited ${r.code}: ${r.err}`);
  return r.out;
}

/** Runs the built binary: node bin/strata.cjs ARGS. */
export function strataBin(args: string[], opts: { env?: NodeJS.ProcessEnv } = {}): { status: number | null; stdout: string; stderr: string } {
  const r = spawnSync(process.execPath, [join(repoRoot, 'bin', 'strata.cjs'), ...args], {
    encoding: 'utf8', cwd: repoRoot, env: { ...process.env, STRATA_DEBUG: undefined, ...opts.env }, maxBuffer: 256 << 20,
  });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

export { buildIsStale, ensureBuilt } from '../build';

export async function sha256(file: string): Promise<string> {
  const h = createHash('sha256');
  for await (const chunk of createReadStream(file, { highWaterMark: 1 << 20 })) h.update(chunk as Buffer);
  return h.digest('hex');
}

/** First offset where two files differ (or where the shorter one ends); -1 when identical. */
export function firstDifference(a: string, b: string): number {
  const fa = openSync(a, 'r');
  const fb = openSync(b, 'r');
  try {
    const ba = Buffer.alloc(1 << 20);
    const bb = Buffer.alloc(1 << 20);
    for (let pos = 0; ; pos += ba.length) {
      const na = readSync(fa, ba, 0, ba.length, pos);
      const nb = readSync(fb, bb, 0, bb.length, pos);
      const n = Math.min(na, nb);
      for (let i = 0; i < n; i++) if (ba[i] !== bb[i]) return pos + i;
      if (na !== nb) return pos + n;
      if (na === 0) return -1;
    }
  } finally {
    closeSync(fa);
    closeSync(fb);
  }
}

/** Asserts two files have the same bytes: same hash, else names the first differing offset. */
export async function expectSameFile(actual: string, expected: string): Promise<void> {
  const [ha, hb] = await Promise.all([sha256(actual), sha256(expected)]);
  if (ha === hb) return;
  const sa = statSync(actual).size;
  const sb = statSync(expected).size;
  const d = firstDifference(actual, expected);
  expect.fail(`${actual} (${sa} bytes) differs from ${expected} (${sb} bytes) first at offset ${d}`);
}

/**
 * fsyncs every file in `dir`: waits for writeback, so the host file's extents are final
 * (ext4 turns small unwritten extents next to written data into written zeros when the
 * data is written back) and strata and qemu-img see the same holes whenever they run.
 */
export function syncFiles(dir: string): void {
  for (const e of readdirSync(dir, { withFileTypes: true })) {
    if (!e.isFile()) continue;
    const fd = openSync(join(dir, e.name), 'r');
    try { fsyncSync(fd); } finally { closeSync(fd); }
  }
}

/** Flips every bit of the byte at `offset` of `file`. */
export function flipByte(file: string, offset: number): void {
  const fd = openSync(file, 'r+');
  try {
    const b = Buffer.alloc(1);
    readSync(fd, b, 0, 1, offset);
    b[0] = b[0]! ^ 0xff;
    writeSync(fd, b, 0, 1, offset);
  } finally {
    closeSync(fd);
  }
}

/**
 * The oracle suite for a list of QEMU-built images. For each image:
 *   map      strata map --output=json == qemu-img map --output=json, as text
 *   convert  strata convert -O raw == qemu-img convert -O raw, byte for byte
 *   info     strata info --output=json deep-equals qemu-img's, with and without --backing-chain
 *   snapshot (images with snapshots) snapshot -l text, and convert -l snapshot.name=NAME, as qemu-img's
 *   compare  identical against qemu-img's raw copy; one flipped byte reported at its sector
 */
export function describeImageMatrix(title: string, cases: ImageCase[]): void {
  describe(title, () => {
    const workspace = imageWorkspace('strata-oracle-');

    for (const c of cases) {
      describe(c.name, () => {
        let img: BuiltImage;
        let dir: string;
        let refFile: string | undefined;
        /** qemu-img convert -O raw of the image, made on first use. */
        const ref = () => {
          if (!refFile) {
            refFile = join(dir, 'qemu.raw');
            qemuImg('convert', '-O', 'raw', img.file, refFile);
          }
          return refFile;
        };
        beforeAll(() => {
          const ctx = workspace.context(c.name);
          dir = ctx.dir;
          img = c.build(ctx);
          syncFiles(dir);
        });

        // First, before anything reads the image's data: on ext4, reading the zeroed
        // (unwritten) extents QEMU leaves around partial writes puts their pages in the page
        // cache, and SEEK_DATA then reports them as data; a host-hole difference between
        // strata and qemu-img only shows while they are still holes.
        it('map --output=json equals qemu-img map, as text', async () => {
          const ours = await strataOk('map', '--output=json', img.file);
          expect(ours).toBe(qemuImg('map', '--output=json', img.file));
        });

        it('convert -O raw equals qemu-img convert', async () => {
          const out = join(dir, 'strata.raw');
          await strataOk('convert', '-O', 'raw', img.file, out);
          await expectSameFile(out, ref());
        });

        it('info --output=json deep-equals qemu-img info', async () => {
          const ours = JSON.parse(await strataOk('info', '--output=json', img.file));
          expect(ours).toStrictEqual(JSON.parse(qemuImg('info', '--output=json', img.file)));
        });

        it('info --output=json --backing-chain deep-equals qemu-img info', async () => {
          const ours = JSON.parse(await strataOk('info', '--output=json', '--backing-chain', img.file));
          expect(ours).toStrictEqual(JSON.parse(qemuImg('info', '--output=json', '--backing-chain', img.file)));
        });

        if (c.snapshots?.length) it('snapshot -l equals qemu-img snapshot -l, as text', async () => {
          expect(await strataOk('snapshot', '-l', img.file)).toBe(qemuImg('snapshot', '-l', img.file));
        });

        if (c.snapshots?.length) it('convert -O raw -l snapshot.name=NAME equals qemu-img, every snapshot', async () => {
          for (const [i, name] of c.snapshots!.entries()) {
            const theirs = join(dir, `qemu-snap${i}.raw`);
            const ours = join(dir, `strata-snap${i}.raw`);
            qemuImg('convert', '-O', 'raw', '-l', `snapshot.name=${name}`, img.file, theirs);
            await strataOk('convert', '-O', 'raw', '-l', `snapshot.name=${name}`, img.file, ours);
            await expectSameFile(ours, theirs);
          }
        });

        it('compare: identical to qemu-img\'s raw copy; a flipped byte found at its sector', async () => {
          const same = await strata('compare', img.file, ref());
          expect({ code: same.code, out: same.out, err: same.err }).toStrictEqual({ code: 0, out: 'Images are identical.\n', err: '' });
          const mutated = join(dir, 'mutated.raw');
          for (const off of img.mutateAt) {
            copyFileSync(ref(), mutated);
            flipByte(mutated, off);
            const r = await strata('compare', img.file, mutated);
            const want = `Content mismatch at offset ${Math.floor(off / 512) * 512}!\n`;
            // qemu-img agrees on the message (a cross-check of the expectation itself).
            const q = qemuImgRun('compare', img.file, mutated);
            expect(q.stdout).toBe(want);
            expect({ off, code: r.code, out: r.out, err: r.err }).toStrictEqual({ off, code: 1, out: want, err: '' });
          }
        });
      });
    }
  });
}
