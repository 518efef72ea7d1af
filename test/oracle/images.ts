// Test images built by QEMU itself (qemu-img create/convert/snapshot/resize/commit and
// qemu-io writes), for the read-path oracle matrix: every image here is something QEMU
// writes, and Strata must read it exactly as qemu-img does.
//
// Images are built at test time into a temporary folder; each case is small (8-64 MiB
// virtual, a few MiB of data). `MATRIX` covers every value of every axis the design names:
// cluster sizes 512 B..2 MiB, extended L2, compat 0.10/1.1, refcount widths 1/16/64,
// zlib/zstd compression (qemu-io `write -c` and `qemu-img convert -c`), lazy refcounts,
// internal snapshots, backing chains (raw bases, shorter backing files), unaligned writes,
// write -z (with and without unmap), discard, and compressed clusters overwritten later.
import { spawnSync } from 'node:child_process';
import { closeSync, mkdirSync, openSync, truncateSync, writeFileSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll } from 'vitest';
import { qemuImg, qemuIo, tempDir } from './qemu';

export const KiB = 1024;
export const MiB = 1024 * KiB;
export const GiB = 1024 * MiB;
export const TiB = 1024 * GiB;

/** What a case hands to the assertions. */
export interface BuiltImage {
  /** Absolute path of the image under test (the top of its chain). */
  file: string;
  /** Guest offsets at which `compare` checks are made to find a one-byte change. */
  mutateAt: number[];
}

export interface BuildContext {
  /** Absolute path of a file in this case's own folder. */
  path: (name: string) => string;
  /** Pattern files (PATTERN_BYTES each) for `write -s`: compressible, not constant. */
  pattern: (i: 0 | 1 | 2) => string;
}

export interface ImageCase {
  name: string;
  /** Which axes it exercises, for the report. */
  axes: string;
  build: (ctx: BuildContext) => BuiltImage;
  /** The image has compressed clusters: qemu-img map's human format refuses it. */
  compressed?: boolean;
  /** Internal snapshots (names) the build leaves, to read with `convert -l snapshot.name=NAME`. */
  snapshots?: string[];
}

export const PATTERN_BYTES = 2 * MiB;

/**
 * Writes the pattern files: bytes from a small alphabet in short runs, from a seeded PRNG,
 * so that zlib and zstd compress them to roughly a third (QEMU stores a cluster uncompressed
 * when compressing does not pay, and a constant fill would compress to almost nothing).
 */
export function writePatternFiles(path: (name: string) => string): (i: 0 | 1 | 2) => string {
  const names = [0, 1, 2].map((i) => {
    let s = 0x9e3779b9 ^ (i * 0x85ebca6b);
    const next = () => {
      s ^= s << 13; s >>>= 0;
      s ^= s >>> 17;
      s ^= s << 5; s >>>= 0;
      return s;
    };
    const b = Buffer.allocUnsafe(PATTERN_BYTES);
    let p = 0;
    while (p < b.length) {
      const r = next();
      const sym = 0x41 + ((r >>> 3) & 15) + i;
      const run = 1 + (r & 7);
      for (let k = 0; k < run && p < b.length; k++) b[p++] = sym;
    }
    const name = path(`pattern${i}.bin`);
    writeFileSync(name, b);
    return name;
  });
  return (i) => names[i]!;
}

/**
 * For the describe block it is called in: a temporary folder holding the pattern files, made
 * in beforeAll (so a run filtered with -t leaves no empty folders) and removed in afterAll.
 * context(sub) makes the subfolder `sub` and gives the BuildContext that builds into it;
 * path(name) names a file in the folder itself.
 */
export function imageWorkspace(prefix: string): { context(sub: string): BuildContext & { dir: string }; path(name: string): string } {
  let tmp: ReturnType<typeof tempDir> | undefined;
  let pattern: ReturnType<typeof writePatternFiles> | undefined;
  beforeAll(() => {
    tmp = tempDir(prefix);
    pattern = writePatternFiles(tmp.path);
  });
  afterAll(() => tmp?.cleanup());
  return {
    context(sub) {
      if (!tmp || !pattern) throw new Error('imageWorkspace: context() before its beforeAll ran');
      const dir = tmp.path(sub);
      mkdirSync(dir, { recursive: true });
      return { dir, path: (n) => join(dir, n), pattern };
    },
    path(name) {
      if (!tmp) throw new Error('imageWorkspace: path() before its beforeAll ran');
      return tmp.path(name);
    },
  };
}

// ---------------------------------------------------------------------------------------
// Building blocks

export interface Qcow2Options {
  cluster_size?: number | string;
  compat?: '0.10' | '1.1';
  extended_l2?: boolean;
  refcount_bits?: 1 | 2 | 4 | 8 | 16 | 32 | 64;
  compression_type?: 'zlib' | 'zstd';
  lazy_refcounts?: boolean;
  preallocation?: 'off' | 'metadata' | 'falloc' | 'full';
}

function optString(o: Qcow2Options): string {
  return Object.entries(o)
    .filter(([, v]) => v !== undefined)
    .map(([k, v]) => `${k}=${typeof v === 'boolean' ? (v ? 'on' : 'off') : String(v)}`)
    .join(',');
}

/** qemu-img create -f qcow2 [-o OPTS] [-b BACKING -F FMT] FILE [SIZE]. */
export function createQcow2(file: string, size: number | null, o: Qcow2Options = {}, backing?: { name: string; fmt: 'raw' | 'qcow2' }): string {
  const args = ['create', '-q', '-f', 'qcow2'];
  const opts = optString(o);
  if (opts) args.push('-o', opts);
  if (backing) args.push('-b', backing.name, '-F', backing.fmt);
  args.push(file);
  if (size !== null) args.push(String(size));
  qemuImg(...args);
  return file;
}

/** A raw image of `size` bytes (qemu-img create -f raw: a sparse file). */
export function createRaw(file: string, size: number): string {
  qemuImg('create', '-q', '-f', 'raw', file, String(size));
  return file;
}

export function io(file: string, cmds: string[], format: 'raw' | 'qcow2' = 'qcow2'): void {
  if (cmds.length) qemuIo(file, cmds, { format });
}

export function snapshot(file: string, name: string): void {
  qemuImg('snapshot', '-c', name, file);
}

/**
 * Runs qemu-io commands, then `abort` (qemu-io's simulated crash), so the image is left
 * as QEMU leaves it after a crash: with lazy refcounts, the dirty bit set.
 */
export function ioThenCrash(file: string, cmds: string[]): void {
  const args = ['-f', 'qcow2'];
  for (const c of [...cmds, 'abort']) args.push('-c', c);
  args.push(file);
  const r = spawnSync('qemu-io', args, { encoding: 'utf8' });
  if (r.signal !== 'SIGABRT') throw new Error(`qemu-io abort on ${file}: expected SIGABRT, got status ${r.status} signal ${r.signal}: ${r.stderr}`);
}

/** Writes `len` bytes of `fill` at `offset` of a plain file (for bytes qemu-io cannot reach). */
export function appendTail(file: string, offset: number, fill: number, len: number): void {
  const fd = openSync(file, 'r+');
  try { writeSync(fd, Buffer.alloc(len, fill), 0, len, offset); } finally { closeSync(fd); }
}

/** Lengths for compressed writes must be whole clusters: at least `min`, a multiple of the cluster. */
function clusters(cluster: number, min: number): number {
  return Math.max(cluster, Math.ceil(min / cluster) * cluster);
}

/**
 * The standard write program for one layer of `size` bytes (>= 8 MiB) with clusters of
 * `cluster` bytes: unaligned data, small aligned data, compressed clusters (partly and
 * wholly overwritten later, one zeroed), data then write -z with and without unmap and a
 * discard inside it, a partial discard, write -z over unallocated space, and a tail write
 * that ends exactly at the end of the image.
 */
export function standardProgram(ctx: BuildContext, o: { cluster: number; size: number; compress?: boolean; tail?: boolean }): string[] {
  const { cluster: c, size: V } = o;
  const cmds = [
    `write -s ${ctx.pattern(0)} 1000 70000`,
    `write -P 0x5a ${MiB + 513} 5000`,
    `write -P 0x66 ${MiB + 100 * KiB} 4096`,
  ];
  if (o.compress) {
    const clen = clusters(c, 256 * KiB);
    cmds.push(`write -c -s ${ctx.pattern(1)} ${2 * MiB} ${clen}`);
    // A normal write into a compressed cluster: copy-on-write from decompressed data.
    cmds.push(`write -P 0x11 ${2 * MiB + 300} 1000`);
    if (clen >= 3 * c) {
      cmds.push(`write -P 0x12 ${2 * MiB + c} ${c}`); // a whole compressed cluster overwritten
      cmds.push(`write -z ${2 * MiB + 2 * c} ${c}`); // and one zeroed
    }
  }
  cmds.push(
    `write -s ${ctx.pattern(2)} ${4 * MiB} ${MiB}`,
    `write -z ${4 * MiB + 64 * KiB} ${128 * KiB}`,
    `write -z -u ${4 * MiB + 512 * KiB} ${128 * KiB}`,
    `discard ${4 * MiB + 768 * KiB} ${128 * KiB}`,
    `discard ${MiB} 3000`,
    `write -z ${6 * MiB} ${MiB}`,
  );
  if (o.tail !== false) cmds.push(`write -P 0x33 ${V - 5000} 5000`);
  return cmds;
}

/** Default compare offsets: inside the first unaligned write, and near the end. */
function mutations(size: number): number[] {
  return [5321, Math.floor(size * 0.6) + 77];
}

/** A single qcow2 layer with the standard program. */
function single(name: string, axes: string, size: number, o: Qcow2Options & { compress?: boolean }): ImageCase {
  const { compress, ...opts } = o;
  const cluster = typeof opts.cluster_size === 'number' ? opts.cluster_size : 64 * KiB;
  return {
    name, axes, compressed: !!compress,
    build: (ctx) => {
      const file = createQcow2(ctx.path('img.qcow2'), size, opts);
      io(file, standardProgram(ctx, { cluster, size, compress }));
      return { file, mutateAt: mutations(size) };
    },
  };
}

// ---------------------------------------------------------------------------------------
// The matrix

const SINGLE: ImageCase[] = [
  // Cluster sizes, compat 1.1, zlib, refcount 16.
  single('c512', 'cluster 512, zlib compressed', 8 * MiB, { cluster_size: 512, compress: true }),
  single('c4k', 'cluster 4k, zlib compressed', 16 * MiB, { cluster_size: 4 * KiB, compress: true }),
  single('c64k', 'cluster 64k (default), zlib compressed', 32 * MiB, { cluster_size: 64 * KiB, compress: true }),
  single('c2M', 'cluster 2M, zlib compressed', 64 * MiB, { cluster_size: 2 * MiB, compress: true }),
  single('c64k-plain', 'cluster 64k, no compressed clusters', 16 * MiB, { cluster_size: 64 * KiB }),
  // Extended L2.
  single('c16k-extl2', 'extended L2 at the smallest cluster it allows (16k)', 16 * MiB, { cluster_size: 16 * KiB, extended_l2: true, compress: true }),
  single('c64k-extl2', 'extended L2, cluster 64k', 32 * MiB, { cluster_size: 64 * KiB, extended_l2: true, compress: true }),
  single('c2M-extl2', 'extended L2, cluster 2M (64k subclusters)', 64 * MiB, { cluster_size: 2 * MiB, extended_l2: true, compress: true }),
  single('c32k-extl2-zstd', 'extended L2, zstd', 16 * MiB, { cluster_size: 32 * KiB, extended_l2: true, compression_type: 'zstd', compress: true }),
  // compat 0.10 (version 2): no zero flag, refcount 16 only, zlib only.
  single('v2-c64k', 'compat 0.10, cluster 64k, zlib compressed', 16 * MiB, { compat: '0.10', cluster_size: 64 * KiB, compress: true }),
  single('v2-c512', 'compat 0.10, cluster 512', 8 * MiB, { compat: '0.10', cluster_size: 512, compress: true }),
  single('v2-c2M', 'compat 0.10, cluster 2M', 32 * MiB, { compat: '0.10', cluster_size: 2 * MiB, compress: true }),
  // Refcount widths.
  single('rc1-c4k', 'refcount_bits 1, compressed', 16 * MiB, { cluster_size: 4 * KiB, refcount_bits: 1, compress: true }),
  single('rc1-c64k-extl2', 'refcount_bits 1, extended L2', 16 * MiB, { cluster_size: 64 * KiB, refcount_bits: 1, extended_l2: true }),
  single('rc64-c64k', 'refcount_bits 64, compressed', 16 * MiB, { cluster_size: 64 * KiB, refcount_bits: 64, compress: true }),
  single('rc64-c2M-zstd', 'refcount_bits 64, cluster 2M, zstd', 64 * MiB, { cluster_size: 2 * MiB, refcount_bits: 64, compression_type: 'zstd', compress: true }),
  single('rc4-c512', 'refcount_bits 4, cluster 512', 8 * MiB, { cluster_size: 512, refcount_bits: 4 }),
  // zstd.
  single('zstd-c512', 'zstd, cluster 512', 8 * MiB, { cluster_size: 512, compression_type: 'zstd', compress: true }),
  single('zstd-c4k', 'zstd, cluster 4k', 16 * MiB, { cluster_size: 4 * KiB, compression_type: 'zstd', compress: true }),
  single('zstd-c64k', 'zstd, cluster 64k', 32 * MiB, { cluster_size: 64 * KiB, compression_type: 'zstd', compress: true }),
  // Lazy refcounts.
  single('lazy-c64k', 'lazy_refcounts=on, closed cleanly', 16 * MiB, { cluster_size: 64 * KiB, lazy_refcounts: true, compress: true }),
  {
    name: 'lazy-dirty-c4k', axes: 'lazy_refcounts=on, qemu-io crashed (abort): dirty bit set, refcounts stale', compressed: true,
    build: (ctx) => {
      const size = 16 * MiB;
      const file = createQcow2(ctx.path('img.qcow2'), size, { cluster_size: 4 * KiB, lazy_refcounts: true });
      ioThenCrash(file, standardProgram(ctx, { cluster: 4 * KiB, size, compress: true }));
      return { file, mutateAt: mutations(size) };
    },
  },
  // Virtual sizes that are not a multiple of the cluster size; a compressed partial last cluster.
  {
    name: 'odd-size-c64k', axes: 'virtual size not a multiple of the cluster; compressed partial last cluster', compressed: true,
    build: (ctx) => {
      const size = 33 * MiB + 1536;
      const file = createQcow2(ctx.path('img.qcow2'), size, { cluster_size: 64 * KiB });
      const last = Math.floor(size / (64 * KiB)) * 64 * KiB;
      // Compressed writes need unallocated clusters: the last two are written compressed,
      // then the one before the end partly overwritten.
      io(file, [
        ...standardProgram(ctx, { cluster: 64 * KiB, size, tail: false }),
        `write -c -s ${ctx.pattern(1)} ${last - 64 * KiB} ${size - last + 64 * KiB}`,
        `write -P 0x33 ${last - 100} 100`,
      ]);
      return { file, mutateAt: [5321, size - 700] };
    },
  },
  {
    name: 'odd-size-c2M-extl2', axes: 'virtual size not a multiple of the cluster or subcluster, extended L2',
    build: (ctx) => {
      const size = 20 * MiB + 512;
      const file = createQcow2(ctx.path('img.qcow2'), size, { cluster_size: 2 * MiB, extended_l2: true });
      io(file, standardProgram(ctx, { cluster: 2 * MiB, size }));
      return { file, mutateAt: [5321, size - 300] };
    },
  },
  // Preallocation.
  {
    name: 'prealloc-metadata', axes: 'preallocation=metadata (L2 entries point at holes in the file)',
    build: (ctx) => {
      const size = 16 * MiB;
      const file = createQcow2(ctx.path('img.qcow2'), size, { cluster_size: 64 * KiB, preallocation: 'metadata' });
      io(file, standardProgram(ctx, { cluster: 64 * KiB, size }));
      return { file, mutateAt: mutations(size) };
    },
  },
  {
    name: 'prealloc-falloc-extl2', axes: 'preallocation=falloc, extended L2, cluster 32k',
    build: (ctx) => {
      const size = 8 * MiB;
      const file = createQcow2(ctx.path('img.qcow2'), size, { cluster_size: 32 * KiB, extended_l2: true, preallocation: 'falloc' });
      io(file, standardProgram(ctx, { cluster: 32 * KiB, size }));
      return { file, mutateAt: mutations(size) };
    },
  },
  {
    name: 'prealloc-full-c2M', axes: 'preallocation=full (zeros written), cluster 2M',
    build: (ctx) => {
      const size = 8 * MiB;
      const file = createQcow2(ctx.path('img.qcow2'), size, { cluster_size: 2 * MiB, preallocation: 'full' });
      io(file, standardProgram(ctx, { cluster: 2 * MiB, size }));
      return { file, mutateAt: mutations(size) };
    },
  },
  // qemu-img convert -c.
  {
    name: 'convert-c-zlib-c4k', axes: 'qemu-img convert -c (zlib), cluster 4k', compressed: true,
    build: (ctx) => {
      const size = 16 * MiB;
      const src = createQcow2(ctx.path('src.qcow2'), size, {});
      io(src, standardProgram(ctx, { cluster: 64 * KiB, size }));
      const file = ctx.path('img.qcow2');
      qemuImg('convert', '-c', '-O', 'qcow2', '-o', 'cluster_size=4k', src, file);
      return { file, mutateAt: mutations(size) };
    },
  },
  {
    name: 'convert-c-zstd-extl2', axes: 'qemu-img convert -c (zstd), extended L2, cluster 128k', compressed: true,
    build: (ctx) => {
      const size = 24 * MiB;
      const src = createQcow2(ctx.path('src.qcow2'), size, { cluster_size: 4 * KiB });
      io(src, standardProgram(ctx, { cluster: 4 * KiB, size, compress: true }));
      const file = ctx.path('img.qcow2');
      qemuImg('convert', '-c', '-O', 'qcow2', '-o', 'cluster_size=128k,extended_l2=on,compression_type=zstd', src, file);
      return { file, mutateAt: mutations(size) };
    },
  },
  // Resized images.
  {
    name: 'resize-grow', axes: 'qemu-img resize (grow, L1 table grows), data past the old end',
    build: (ctx) => {
      const file = createQcow2(ctx.path('img.qcow2'), 8 * MiB, { cluster_size: 4 * KiB });
      io(file, standardProgram(ctx, { cluster: 4 * KiB, size: 8 * MiB }));
      const size = 40 * MiB + 512;
      qemuImg('resize', '-q', file, String(size));
      io(file, [`write -P 0x44 ${30 * MiB - 100} 300`, `write -P 0x45 ${size - 512} 512`]);
      return { file, mutateAt: [5321, 30 * MiB + 3, size - 10] };
    },
  },
  {
    name: 'resize-shrink', axes: 'qemu-img resize --shrink (data past the new end dropped)',
    build: (ctx) => {
      const file = createQcow2(ctx.path('img.qcow2'), 32 * MiB, { cluster_size: 64 * KiB });
      io(file, [...standardProgram(ctx, { cluster: 64 * KiB, size: 32 * MiB }), `write -P 0x46 ${20 * MiB} ${MiB}`]);
      const size = 12 * MiB + 1024;
      qemuImg('resize', '-q', '--shrink', file, String(size));
      return { file, mutateAt: [5321, size - 1000] };
    },
  },
  // Persistent dirty bitmaps (reported by info).
  {
    name: 'bitmaps', axes: 'persistent dirty bitmaps (info format-specific bitmaps)',
    build: (ctx) => {
      const size = 16 * MiB;
      const file = createQcow2(ctx.path('img.qcow2'), size, {});
      qemuImg('bitmap', '--add', file, 'b0');
      qemuImg('bitmap', '--add', '-g', '128k', '--disable', file, 'b1-disabled');
      io(file, standardProgram(ctx, { cluster: 64 * KiB, size }));
      return { file, mutateAt: mutations(size) };
    },
  },
  // Nothing written.
  {
    name: 'empty-c2M', axes: 'no data at all, cluster 2M',
    build: (ctx) => ({ file: createQcow2(ctx.path('img.qcow2'), 64 * MiB, { cluster_size: 2 * MiB }), mutateAt: [0, 40 * MiB + 1] }),
  },
  // Raw images as the top.
  {
    name: 'raw-sparse', axes: 'a raw image with data and holes',
    build: (ctx) => {
      const size = 16 * MiB;
      const file = createRaw(ctx.path('img.raw'), size);
      io(file, [`write -s ${ctx.pattern(0)} 1000 70000`, `write -P 0x5a ${3 * MiB} ${MiB}`, `write -z ${3 * MiB + 4096} 8192`, `write -P 0x33 ${size - 5000} 5000`], 'raw');
      return { file, mutateAt: mutations(size) };
    },
  },
  {
    name: 'raw-odd-size', axes: 'a raw file whose size is not a multiple of 512 (QEMU rounds the size up)',
    build: (ctx) => {
      const file = ctx.path('img.raw');
      const size = 8 * MiB + 1000;
      writeFileSync(file, '');
      truncateSync(file, size);
      io(file, [`write -P 0x5a 1000 70000`, `write -P 0x33 ${8 * MiB - 512} 512`], 'raw');
      return { file, mutateAt: [5321, 8 * MiB + 999] };
    },
  },
];

/** Snapshot program: data before s1, more (overwriting some) before s2, more after s2. */
function snapCase(name: string, axes: string, size: number, o: Qcow2Options & { compress?: boolean }): ImageCase {
  const { compress, ...opts } = o;
  const c = typeof opts.cluster_size === 'number' ? opts.cluster_size : 64 * KiB;
  return {
    name, axes, compressed: !!compress, snapshots: ['before', 'middle snap'],
    build: (ctx) => {
      const file = createQcow2(ctx.path('img.qcow2'), size, opts);
      const clen = clusters(c, 128 * KiB);
      io(file, [
        `write -s ${ctx.pattern(0)} 0 ${MiB}`,
        `write -P 0x21 ${3 * MiB + 5} 70000`,
        ...(compress ? [`write -c -s ${ctx.pattern(1)} ${4 * MiB} ${clen}`] : []),
        `write -P 0x20 ${size - 4096} 4096`,
      ]);
      snapshot(file, 'before');
      io(file, [
        `write -P 0x22 ${512 * KiB + 77} ${MiB}`, // copy-on-write of clusters shared with the snapshot
        `write -z ${3 * MiB} ${64 * KiB}`,
        ...(compress ? [`write -P 0x25 ${4 * MiB + 100} 200`] : []), // into a shared compressed cluster
        `write -P 0x23 ${6 * MiB} ${100 * KiB}`,
      ]);
      snapshot(file, 'middle snap');
      io(file, [
        `write -P 0x24 100 200`,
        `discard ${6 * MiB} ${clusters(c, 64 * KiB)}`,
        `write -z -u ${size - 4096} 4096`,
        `write -s ${ctx.pattern(2)} ${5 * MiB + 3} 33333`,
      ]);
      return { file, mutateAt: mutations(size) };
    },
  };
}

const SNAPSHOTS: ImageCase[] = [
  snapCase('snap-c64k', 'internal snapshots, cluster 64k, compressed', 16 * MiB, { compress: true }),
  snapCase('snap-c512-rc64', 'internal snapshots, cluster 512, refcount_bits 64', 8 * MiB, { cluster_size: 512, refcount_bits: 64 }),
  snapCase('snap-c2M-extl2-zstd', 'internal snapshots, cluster 2M, extended L2, zstd', 32 * MiB, { cluster_size: 2 * MiB, extended_l2: true, compression_type: 'zstd', compress: true }),
  snapCase('snap-v2-c4k', 'internal snapshots, compat 0.10, cluster 4k', 8 * MiB, { compat: '0.10', cluster_size: 4 * KiB, compress: true }),
  snapCase('snap-rc8-lazy', 'internal snapshots, refcount_bits 8, lazy refcounts', 8 * MiB, { refcount_bits: 8, lazy_refcounts: true }),
  {
    name: 'snap-then-grow', axes: 'snapshot taken at 8 MiB, image grown to 16 MiB after', snapshots: ['small'],
    build: (ctx) => {
      const file = createQcow2(ctx.path('img.qcow2'), 8 * MiB, { cluster_size: 4 * KiB });
      io(file, [`write -s ${ctx.pattern(0)} 1000 70000`, `write -P 0x20 ${8 * MiB - 4096} 4096`]);
      snapshot(file, 'small');
      qemuImg('resize', '-q', file, String(16 * MiB));
      io(file, [`write -P 0x30 ${12 * MiB} 5000`]);
      return { file, mutateAt: [5321, 12 * MiB + 1000] };
    },
  },
  {
    name: 'snap-deleted', axes: 'three snapshots, the middle one deleted (qemu-img snapshot -d)', snapshots: ['a', 'c'],
    build: (ctx) => {
      const file = createQcow2(ctx.path('img.qcow2'), 8 * MiB, { cluster_size: 16 * KiB, extended_l2: true });
      io(file, [`write -s ${ctx.pattern(0)} 1000 70000`]);
      snapshot(file, 'a');
      io(file, [`write -P 0x31 ${MiB + 3} 50000`]);
      snapshot(file, 'b');
      io(file, [`write -P 0x32 ${2 * MiB + 3} 50000`, `discard 0 ${64 * KiB}`]);
      snapshot(file, 'c');
      qemuImg('snapshot', '-d', 'b', file);
      io(file, [`write -P 0x33 ${MiB} ${MiB}`]);
      return { file, mutateAt: [5321, MiB + 100] };
    },
  },
];

const CHAINS: ImageCase[] = [
  {
    name: 'chain3-raw-base', axes: 'three deep: raw base <- qcow2 (-F raw) <- qcow2, relative backing names',
    build: (ctx) => {
      const size = 16 * MiB;
      const base = createRaw(ctx.path('base.raw'), size);
      io(base, [`write -s ${ctx.pattern(0)} 0 ${2 * MiB}`, `write -P 0x51 ${5 * MiB + 1} ${MiB}`, `write -P 0x52 ${size - 4096} 4096`], 'raw');
      const mid = createQcow2(ctx.path('mid.qcow2'), null, { cluster_size: 4 * KiB }, { name: 'base.raw', fmt: 'raw' });
      io(mid, [`write -P 0x61 ${MiB + 1000} 70000`, `write -z ${5 * MiB} ${64 * KiB}`, `discard ${6 * MiB - 8192} 8192`, `write -c -s ${ctx.pattern(1)} ${8 * MiB} ${64 * KiB}`]);
      const top = createQcow2(ctx.path('top.qcow2'), null, { cluster_size: 64 * KiB }, { name: 'mid.qcow2', fmt: 'qcow2' });
      io(top, [`write -P 0x71 ${MiB + 3000} 1000`, `write -z ${0} ${64 * KiB}`, `discard ${5 * MiB + 64 * KiB} ${64 * KiB}`, `write -P 0x72 ${8 * MiB + 512} 512`]);
      return { file: top, mutateAt: [70001, 5 * MiB + 200 * KiB] };
    },
    compressed: true,
  },
  {
    name: 'chain-short-backing', axes: 'raw base (16 MiB) shorter than its qcow2 overlay (32 MiB)',
    build: (ctx) => {
      const base = createRaw(ctx.path('base.raw'), 16 * MiB);
      io(base, [`write -s ${ctx.pattern(0)} 0 ${MiB}`, `write -P 0x52 ${16 * MiB - 8192} 8192`], 'raw');
      const top = createQcow2(ctx.path('top.qcow2'), 32 * MiB, { cluster_size: 64 * KiB }, { name: ctx.path('base.raw'), fmt: 'raw' });
      io(top, [`write -P 0x71 ${16 * MiB - 4096} 8192`, `write -P 0x72 ${20 * MiB} 1000`, `write -z ${MiB - 64 * KiB} ${64 * KiB}`]);
      return { file: top, mutateAt: [5321, 16 * MiB - 6000, 24 * MiB] };
    },
  },
  {
    name: 'chain-short-qcow2-mid', axes: 'three deep, the middle qcow2 (12 MiB) shorter than both its base (32 MiB) and its overlay (32 MiB), unaligned end',
    build: (ctx) => {
      const base = createRaw(ctx.path('base.raw'), 32 * MiB);
      io(base, [`write -P 0x50 0 ${32 * MiB}`], 'raw');
      const mid = createQcow2(ctx.path('mid.qcow2'), 12 * MiB + 3584, { cluster_size: 64 * KiB, extended_l2: true }, { name: 'base.raw', fmt: 'raw' });
      io(mid, [`write -P 0x60 ${MiB + 5} 3000`, `write -z ${2 * MiB} ${2 * KiB * 3}`]);
      const top = createQcow2(ctx.path('top.qcow2'), 32 * MiB, { cluster_size: 4 * KiB }, { name: 'mid.qcow2', fmt: 'qcow2' });
      io(top, [`write -P 0x70 ${12 * MiB} 4096`]);
      return { file: top, mutateAt: [5321, 12 * MiB + 3000, 20 * MiB] };
    },
  },
  {
    name: 'chain3-qcow2-mixed', axes: 'three deep qcow2: c512 v2 base <- c2M extended L2 <- c64k zstd; absolute names',
    compressed: true,
    build: (ctx) => {
      const size = 32 * MiB;
      const base = createQcow2(ctx.path('base.qcow2'), size, { compat: '0.10', cluster_size: 512 });
      io(base, standardProgram(ctx, { cluster: 512, size, compress: true }));
      const mid = createQcow2(ctx.path('mid.qcow2'), null, { cluster_size: 2 * MiB, extended_l2: true }, { name: base, fmt: 'qcow2' });
      io(mid, [`write -P 0x61 ${MiB + 1000} 70000`, `write -z ${4 * MiB} ${64 * KiB}`, `discard ${4 * MiB + 128 * KiB} ${128 * KiB}`]);
      const top = createQcow2(ctx.path('top.qcow2'), null, { compression_type: 'zstd' }, { name: mid, fmt: 'qcow2' });
      io(top, [`write -c -s ${ctx.pattern(2)} ${8 * MiB} ${128 * KiB}`, `write -P 0x71 ${8 * MiB + 10} 10`, `write -z ${2 * MiB} ${64 * KiB}`]);
      return { file: top, mutateAt: [5321, 4 * MiB + 70 * KiB, 8 * MiB + 1000] };
    },
  },
  {
    name: 'chain-compressed-cow', axes: 'compressed clusters in an overlay, partly overwritten (COW from a compressed cluster over a backing file)',
    compressed: true,
    build: (ctx) => {
      const size = 16 * MiB;
      const base = createQcow2(ctx.path('base.qcow2'), size, { cluster_size: 4 * KiB });
      io(base, [`write -P 0x50 0 ${4 * MiB}`]);
      const top = createQcow2(ctx.path('top.qcow2'), null, { cluster_size: 16 * KiB, extended_l2: true, compression_type: 'zstd' }, { name: 'base.qcow2', fmt: 'qcow2' });
      io(top, [`write -c -s ${ctx.pattern(1)} ${MiB} ${256 * KiB}`, `write -P 0x71 ${MiB + 1000} 600`, `write -z ${MiB + 32 * KiB} ${16 * KiB}`, `discard ${MiB + 64 * KiB} ${16 * KiB}`]);
      return { file: top, mutateAt: [5321, MiB + 1200] };
    },
  },
  {
    name: 'chain-odd-raw-base', axes: 'raw base whose size is not a multiple of 512, under a larger qcow2 overlay',
    build: (ctx) => {
      const base = ctx.path('base.raw');
      writeFileSync(base, '');
      truncateSync(base, 4 * MiB + 700);
      io(base, [`write -P 0x50 ${4 * MiB - 4096} 4096`], 'raw');
      // Bytes past the last whole sector of the base, which QEMU's rounded size exposes.
      appendTail(base, 4 * MiB, 0x5b, 700);
      const top = createQcow2(ctx.path('top.qcow2'), 8 * MiB, { cluster_size: 4 * KiB }, { name: 'base.raw', fmt: 'raw' });
      io(top, [`write -P 0x71 ${MiB} 5000`]);
      // Not inside the base's last partial sector (4 MiB + 512 .. + 700): there qemu-img compare's
      // reported offset depends on where its block-status chunks start (sometimes 4195004,
      // sometimes the sector 4194816), so no single expectation holds.
      return { file: top, mutateAt: [5321, 4 * MiB + 300, 6 * MiB] };
    },
  },
  {
    name: 'chain-committed', axes: 'after qemu-img commit: the overlay emptied, the data in its qcow2 base',
    build: (ctx) => {
      const size = 16 * MiB;
      const base = createQcow2(ctx.path('base.qcow2'), size, { cluster_size: 64 * KiB, refcount_bits: 1 });
      io(base, [`write -P 0x50 0 ${2 * MiB}`]);
      const top = createQcow2(ctx.path('top.qcow2'), null, { cluster_size: 64 * KiB }, { name: 'base.qcow2', fmt: 'qcow2' });
      io(top, standardProgram(ctx, { cluster: 64 * KiB, size }));
      qemuImg('commit', '-q', top);
      return { file: top, mutateAt: mutations(size) };
    },
  },
  {
    name: 'chain-snapshots-in-overlay', axes: 'internal snapshots in an overlay over a raw base', snapshots: ['s1'],
    build: (ctx) => {
      const base = createRaw(ctx.path('base.raw'), 8 * MiB);
      io(base, [`write -P 0x50 0 ${8 * MiB}`], 'raw');
      const top = createQcow2(ctx.path('top.qcow2'), null, { cluster_size: 4 * KiB }, { name: 'base.raw', fmt: 'raw' });
      io(top, [`write -P 0x71 ${MiB + 3} 5000`]);
      snapshot(top, 's1');
      io(top, [`write -z ${MiB} ${8 * KiB}`, `discard 0 ${64 * KiB}`, `write -P 0x72 ${2 * MiB} 5000`]);
      return { file: top, mutateAt: [5321, MiB + 100] };
    },
  },
];

export const MATRIX = { single: SINGLE, snapshots: SNAPSHOTS, chains: CHAINS };

/** Writes a few scattered ranges into a 1 TiB qcow2 (default 64k clusters). */
export function buildHugeImage(ctx: BuildContext): BuiltImage {
  const size = TiB;
  const file = createQcow2(ctx.path('huge.qcow2'), size, {});
  io(file, [
    `write -P 0x01 0 ${64 * KiB}`,
    `write -P 0x02 ${GiB + 123} 5000`,
    `write -z ${2 * GiB} ${MiB}`,
    `write -c -P 0x03 ${100 * GiB} ${128 * KiB}`,
    `write -P 0x04 ${512 * GiB - 4096} 8192`,
    `write -P 0x05 ${777 * GiB + 7 * MiB} ${3 * MiB}`,
    `write -P 0x06 ${size - 1000} 1000`,
  ]);
  return { file, mutateAt: [] };
}
