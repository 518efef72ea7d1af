// Shared plumbing for the block-job oracle tests: running strata in-process, guest content
// through qemu-img (hash of the raw conversion), allocation on disk, and qemu-img check.
import { createHash } from 'node:crypto';
import { spawnSync } from 'node:child_process';
import { closeSync, mkdtempSync, openSync, readSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { basename, join } from 'node:path';
import { expect } from 'vitest';
import { strata, type CliResult } from '../../cli/run-cli';
import { qemuCheck, qemuImg, qemuImgRun } from '../../oracle/qemu';

export function rng(seed: number): () => number {
  let s = seed >>> 0;
  return () => {
    s = (s + 0x6d2b79f5) >>> 0;
    let t = s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

export { strata, type CliResult };

/** `strata ARGS`, which must succeed; returns its result. */
export async function strataOk(...argv: string[]): Promise<CliResult> {
  const r = await strata(...argv);
  if (r.code !== 0) throw new Error(`strata ${argv.join(' ')} exited ${r.code}: ${r.err}`);
  return r;
}

/** SHA-256 of a file's bytes (optionally from `from` on). */
export function fileHash(path: string, from = 0): string {
  const h = createHash('sha256');
  const fd = openSync(path, 'r');
  try {
    const buf = Buffer.allocUnsafe(4 << 20);
    let pos = from;
    for (;;) {
      const n = readSync(fd, buf, 0, buf.length, pos);
      if (n <= 0) break;
      h.update(buf.subarray(0, n));
      pos += n;
    }
  } finally {
    closeSync(fd);
  }
  return h.digest('hex');
}

let scratch: string | null = null;
/**
 * A folder of this test process for verification output, on the machine's temporary file
 * system: never beside the image, which may sit on a file system a test has filled on purpose.
 */
function scratchDir(): string {
  if (!scratch) {
    scratch = mkdtempSync(join(tmpdir(), 'strata-verify-'));
    const dir = scratch;
    process.once('exit', () => rmSync(dir, { recursive: true, force: true }));
  }
  return scratch;
}

/**
 * Guest content as qemu-img reads it: SHA-256 of `qemu-img convert -O raw`. `snapshot` reads an
 * internal snapshot; `alone` reads the image without its backing chain.
 */
export function guestHash(file: string, opts: { snapshot?: string; alone?: boolean } = {}): string {
  const out = join(scratchDir(), `${basename(file)}.guest-${Math.random().toString(36).slice(2)}.raw`);
  const src = opts.alone
    ? `json:${JSON.stringify({ driver: 'qcow2', file: { driver: 'file', filename: file }, backing: null })}`
    : file;
  const args = ['convert', '-U', '-O', 'raw'];
  if (opts.snapshot) args.push('-l', `snapshot.name=${opts.snapshot}`);
  args.push(src, out);
  try {
    qemuImg(...args);
    return fileHash(out);
  } finally {
    rmSync(out, { force: true });
  }
}

/** Bytes the file occupies on disk (st_blocks * 512). */
export function allocatedBytes(file: string): number {
  return statSync(file).blocks * 512;
}

export function fileSize(file: string): number {
  return statSync(file).size;
}

/** qemu-img check must be clean: no corruptions, no leaks, exit 0. */
export function expectClean(file: string): Record<string, unknown> {
  const r = qemuCheck(file);
  expect({ file, status: r.status, corruptions: r.json.corruptions ?? 0, leaks: r.json.leaks ?? 0, errors: r.json['check-errors'] ?? 0 })
    .toEqual({ file, status: 0, corruptions: 0, leaks: 0, errors: 0 });
  return r.json;
}

/** qemu-img compare A B must report identical guest content. */
export function expectSameContent(a: string, b: string): void {
  const r = qemuImgRun('compare', '-U', a, b);
  expect({ a, b, status: r.status, out: (r.stdout + r.stderr).trim() }).toEqual({ a, b, status: 0, out: 'Images are identical.' });
}

export interface QemuInfo {
  'virtual-size': number;
  'actual-size': number;
  'cluster-size'?: number;
  'backing-filename'?: string;
  'full-backing-filename'?: string;
  'backing-filename-format'?: string;
  snapshots?: { id: string; name: string }[];
  'format-specific'?: { data: Record<string, unknown> };
}

export function qemuInfo(file: string): QemuInfo {
  return JSON.parse(qemuImg('info', '-U', '--output=json', file)) as QemuInfo;
}

export interface MapEntry { start: number; length: number; depth: number; present: boolean; zero: boolean; data: boolean; offset?: number }

export function qemuMap(file: string): MapEntry[] {
  return JSON.parse(qemuImg('map', '-U', '--output=json', file)) as MapEntry[];
}

/** qemu-io `read -P` checks: returns the lines reporting a mismatch (empty when all match). */
export function qemuIoMismatches(file: string, cmds: string[]): string[] {
  const r = spawnSync('qemu-io', ['-r', '-U', ...cmds.flatMap((c) => ['-c', c]), file], { encoding: 'utf8' });
  const lines = `${r.stdout}${r.stderr}`.split('\n').filter((l) => /fail|error/i.test(l));
  if (r.status !== 0 && lines.length === 0) lines.push(`qemu-io exited ${r.status}`);
  return lines.map((l) => `${l.trim()} (${file})`);
}

/** Splits a long list of qemu-io commands into batches (one qemu-io process each). */
export function batches<T>(items: T[], size: number): T[][] {
  const out: T[][] = [];
  for (let i = 0; i < items.length; i += size) out.push(items.slice(i, i + size));
  return out;
}

export const KiB = 1024;
export const MiB = 1024 * 1024;

/** Seeded random bytes (xorshift32 over whole words: fast enough for tens of MiB). */
export function randomBytes(seed: number, len: number): Buffer {
  const words = new Uint32Array(Math.ceil(len / 4));
  let s = (seed * 0x9e3779b1) >>> 0 || 1;
  for (let i = 0; i < words.length; i++) {
    s ^= s << 13; s >>>= 0;
    s ^= s >>> 17;
    s ^= s << 5; s >>>= 0;
    words[i] = s;
  }
  return Buffer.from(words.buffer, 0, len);
}
