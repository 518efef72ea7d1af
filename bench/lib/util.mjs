// Small helpers shared by the harness and the scenarios.
import { spawn, spawnSync } from 'node:child_process';
import { closeSync, openSync, readSync, rmSync, statSync } from 'node:fs';

/** Runs a command to completion; throws with its stderr when it fails. Returns stdout. */
export function exec(cmd, argv, { input, env, quiet } = {}) {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, argv, { stdio: ['pipe', 'pipe', 'pipe'], env: env ?? process.env });
    let out = '';
    let err = '';
    child.stdout.setEncoding('utf8').on('data', (d) => { out += d; });
    child.stderr.setEncoding('utf8').on('data', (d) => { err = (err + d).slice(-8192); });
    child.on('error', reject);
    child.on('close', (code, signal) => {
      if (code === 0) { if (!quiet && err.trim()) process.stderr.write(err); resolve(out); return; }
      reject(new Error(`${cmd} ${argv.slice(0, 6).join(' ')}${argv.length > 6 ? ' ...' : ''} failed (${signal ?? `exit ${code}`}):\n${err.trim()}`));
    });
    // A child that exits without reading its stdin must not crash the harness with EPIPE.
    child.stdin.on('error', () => {});
    child.stdin.end(input ?? '');
  });
}

/** Writes dirty pages of every file system back, so the next timed run does not pay for them. */
export function syncAll() {
  spawnSync('sync', [], { stdio: 'ignore' });
}

/** Reads a file once (8 MiB at a time) so its pages are in the page cache. Returns bytes read. */
export function warmFile(path) {
  const fd = openSync(path, 'r');
  const buf = Buffer.allocUnsafe(8 << 20);
  let total = 0;
  try {
    for (let pos = 0; ; ) {
      const n = readSync(fd, buf, 0, buf.length, pos);
      if (n === 0) break;
      pos += n;
      total += n;
    }
  } finally {
    closeSync(fd);
  }
  return total;
}

export function removeFiles(paths) {
  for (const p of paths) rmSync(p, { force: true });
}

/** Bytes actually allocated on disk (st_blocks * 512); null when the file is missing. */
export function allocatedBytes(path) {
  try { return statSync(path).blocks * 512; } catch { return null; }
}

/** Throws unless the two files have the same bytes (cmp from diffutils, fast on large files). */
export async function assertIdentical(a, b) {
  try {
    await exec('cmp', [a, b], { quiet: true });
  } catch (err) {
    throw new Error(`outputs differ: ${a} vs ${b}\n${err.message.split('\n').slice(1).join('\n')}`);
  }
}

/** Deterministic PRNG (mulberry32) so a scenario's layout is the same on every machine. */
export function prng(seed) {
  let a = seed >>> 0;
  const next = () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
  return {
    next,
    /** Integer in [lo, hi]. */
    int: (lo, hi) => lo + Math.floor(next() * (hi - lo + 1)),
    /** Log-uniform integer in [lo, hi], rounded down to a multiple of align (at least align). */
    logSize: (lo, hi, align) => Math.max(align, Math.floor(Math.exp(Math.log(lo) + next() * (Math.log(hi) - Math.log(lo))) / align) * align),
    shuffle(arr) {
      for (let i = arr.length - 1; i > 0; i--) {
        const j = Math.floor(next() * (i + 1));
        [arr[i], arr[j]] = [arr[j], arr[i]];
      }
      return arr;
    },
  };
}

export function median(xs) {
  const v = xs.filter((x) => x !== null && x !== undefined && Number.isFinite(x)).sort((a, b) => a - b);
  if (v.length === 0) return null;
  const m = v.length >> 1;
  return v.length % 2 ? v[m] : (v[m - 1] + v[m]) / 2;
}

export const KiB = 1024;
export const MiB = 1024 * KiB;
export const GiB = 1024 * MiB;

/** Copies a file keeping its holes (cp --sparse=always); dst is replaced. */
export async function copySparse(src, dst) {
  rmSync(dst, { force: true });
  await exec('cp', ['--sparse=always', src, dst]);
}

/**
 * Throws unless `qemu-img compare` finds the two images' guest-visible content identical
 * (through their backing chains). Extra args go before the files, e.g. ['-f', 'qcow2', '-F', 'qcow2'].
 */
export async function assertSameContent(a, b, extra = []) {
  try {
    await exec('qemu-img', ['compare', ...extra, a, b], { quiet: true });
  } catch (err) {
    throw new Error(`guest content differs (qemu-img compare): ${a} vs ${b}\n${err.message.split('\n').slice(1).join('\n')}`);
  }
}

/**
 * Reads a qcow2 file's metadata into the page cache: header, L1 table, every L2 table, the
 * refcount table and every refcount block. For huge sparse images (preallocation=metadata)
 * where reading the whole file would mean reading hundreds of GiB of holes. Returns bytes read.
 */
export function warmQcow2Metadata(path) {
  const fd = openSync(path, 'r');
  let total = 0;
  const read = (length, position) => {
    const buf = Buffer.alloc(length);
    for (let p = 0; p < length; ) {
      const n = readSync(fd, buf, p, length - p, position + p);
      if (n === 0) break;
      p += n;
    }
    total += length;
    return buf;
  };
  try {
    const h = read(4096, 0);
    if (h.readUInt32BE(0) !== 0x514649fb) throw new Error(`${path}: not a qcow2 image`);
    const cs = 2 ** h.readUInt32BE(20);
    const l1Size = h.readUInt32BE(36);
    const l1Off = Number(h.readBigUInt64BE(40));
    const rtOff = Number(h.readBigUInt64BE(48));
    const rtClusters = h.readUInt32BE(56);
    const l1 = read(l1Size * 8, l1Off);
    for (let i = 0; i < l1Size; i++) {
      const off = Number(l1.readBigUInt64BE(i * 8) & 0x00fffffffffffe00n);
      if (off) read(cs, off);
    }
    const rt = read(rtClusters * cs, rtOff);
    for (let i = 0; i < rt.length / 8; i++) {
      const off = Number(rt.readBigUInt64BE(i * 8) & ~0x1ffn);
      if (off) read(cs, off);
    }
  } finally {
    closeSync(fd);
  }
  return total;
}
