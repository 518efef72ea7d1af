// The differential test of guest I/O: the same random writes, zero writes (with and without
// unmap) and discards go through qemu-io on one image and `strata io` on an identical copy,
// for every kind of image (compat 0.10 and 1.1, cluster sizes 512 B to 2 MiB, extended L2,
// refcount widths, with and without a backing file, with internal snapshots taken between
// batches, with persistent bitmaps). After each batch the two must read the same, map the
// same (qemu-img map: what is allocated, zero, data and at which depth), take the same room
// on disk (within 2%), and strata's must pass qemu-img check; with bitmaps, QEMU must report
// the same dirty ranges for both. Fixed seeds and case counts.
import { closeSync, fsyncSync, openSync, statSync } from 'node:fs';
import { afterAll, expect, it } from 'vitest';
import { describeOracle, dirtyRanges, qemuImg, qemuImgRun, qemuIo, tempDir } from '../oracle/qemu';
import { rng } from '../core/jobs/helpers';
import { strata } from './run-cli';

interface Case {
  name: string;
  /** -o options of qemu-img create. */
  opts: string;
  cluster: number;
  size: number;
  backing?: boolean;
  /** Internal snapshots taken (qemu-img on QEMU's copy, strata on ours) before each batch. */
  snapshots?: boolean;
  bitmaps?: boolean;
  seed: number;
}

const MiB = 1 << 20;

const CASES: Case[] = [
  { name: 'compat 1.1, 64k clusters, 16-bit refcounts', opts: 'cluster_size=64k', cluster: 65536, size: 64 * MiB, seed: 1 },
  { name: 'compat 0.10, 64k clusters', opts: 'compat=0.10', cluster: 65536, size: 64 * MiB, seed: 2 },
  { name: 'compat 0.10 with a backing file (discards are ignored)', opts: 'compat=0.10', cluster: 65536, size: 64 * MiB, backing: true, seed: 3 },
  { name: '512 B clusters', opts: 'cluster_size=512', cluster: 512, size: 8 * MiB, seed: 4 },
  { name: '4k clusters, 1-bit refcounts', opts: 'cluster_size=4k,refcount_bits=1', cluster: 4096, size: 32 * MiB, seed: 5 },
  { name: '2M clusters, 64-bit refcounts', opts: 'cluster_size=2M,refcount_bits=64', cluster: 2 * MiB, size: 64 * MiB, seed: 6 },
  { name: 'extended L2, 64k clusters', opts: 'cluster_size=64k,extended_l2=on', cluster: 65536, size: 64 * MiB, seed: 7 },
  { name: 'extended L2, 2M clusters, with a backing file', opts: 'cluster_size=2M,extended_l2=on', cluster: 2 * MiB, size: 64 * MiB, backing: true, seed: 8 },
  { name: '64k clusters, 8-bit refcounts, with a backing file', opts: 'refcount_bits=8', cluster: 65536, size: 64 * MiB, backing: true, seed: 9 },
  { name: '4k clusters, 2-bit refcounts, with a backing file', opts: 'cluster_size=4k,refcount_bits=2', cluster: 4096, size: 32 * MiB, backing: true, seed: 10 },
  { name: '64k clusters with internal snapshots', opts: 'cluster_size=64k', cluster: 65536, size: 64 * MiB, snapshots: true, seed: 11 },
  { name: 'compat 0.10 with internal snapshots', opts: 'compat=0.10', cluster: 65536, size: 64 * MiB, snapshots: true, seed: 12 },
  { name: '64k clusters with persistent bitmaps', opts: 'cluster_size=64k', cluster: 65536, size: 64 * MiB, bitmaps: true, seed: 13 },
  { name: 'extended L2 32k with snapshots and bitmaps, 32-bit refcounts', opts: 'cluster_size=32k,extended_l2=on,refcount_bits=32', cluster: 32768, size: 32 * MiB, snapshots: true, bitmaps: true, seed: 14 },
];

const BATCHES = 2;
const OPS = 30;

/** Random guest I/O: lengths from a byte to a few clusters, some cluster-aligned. */
function randomOps(r: () => number, c: Case): string[] {
  const ops: string[] = [];
  for (let i = 0; i < OPS; i++) {
    const aligned = r() < 0.3;
    const maxLen = Math.min(c.size / 16, Math.max(2 * c.cluster, 256 * 1024));
    let len = 1 + Math.floor(r() * r() * maxLen);
    let off = Math.floor(r() * (c.size - len));
    if (aligned) {
      off = Math.floor(off / c.cluster) * c.cluster;
      len = Math.max(c.cluster, Math.floor(len / c.cluster) * c.cluster);
      if (off + len > c.size) off = c.size - len;
    }
    const k = r();
    if (k < 0.55) ops.push(`write -P ${1 + Math.floor(r() * 254)} ${off} ${len}`);
    else if (k < 0.7) ops.push(`write -z ${off} ${len}`);
    else if (k < 0.8) ops.push(`write -z -u ${off} ${len}`);
    else ops.push(`discard ${off} ${len}`);
  }
  return ops;
}

interface MapRun { start: number; length: number; depth: number; present: boolean; zero: boolean; data: boolean }

/** qemu-img map without host offsets, adjacent runs of the same kind merged. */
function allocation(file: string): MapRun[] {
  const out: MapRun[] = [];
  for (const e of JSON.parse(qemuImg('map', '-U', '--output=json', file)) as (MapRun & { offset?: number })[]) {
    const last = out[out.length - 1];
    if (last && last.start + last.length === e.start && last.depth === e.depth && last.present === e.present && last.zero === e.zero && last.data === e.data) {
      last.length += e.length;
    } else {
      out.push({ start: e.start, length: e.length, depth: e.depth, present: e.present, zero: e.zero, data: e.data });
    }
  }
  return out;
}

/** Bytes on disk once the file system has placed everything (fsync: no delayed allocation left). */
function used(file: string): number {
  const fd = openSync(file, 'r');
  try { fsyncSync(fd); } finally { closeSync(fd); }
  return statSync(file).blocks * 512;
}

describeOracle('qemu-io and strata io: same content, same map, same disk use', () => {
  const t = tempDir('strata-io-diff-');
  const report: string[] = [];
  afterAll(() => {
    console.log(`[io differential] disk use, strata / qemu after the last batch:\n${report.join('\n')}`);
    t.cleanup();
  });

  CASES.forEach((c, n) => {
    it(c.name, async () => {
      const opts = [c.opts];
      if (c.backing) {
        const base = t.path(`base${n}.qcow2`);
        qemuImg('create', '-q', '-f', 'qcow2', '-o', c.opts, base, String(c.size));
        const r = rng(c.seed + 1000);
        const fill: string[] = [];
        for (let i = 0; i < 12; i++) fill.push(`write -P ${0x40 + i} ${Math.floor(r() * (c.size - MiB))} ${1 + Math.floor(r() * MiB)}`);
        qemuIo(base, fill);
        opts.push(`backing_file=${base}`, 'backing_fmt=qcow2');
      }
      const theirs = t.path(`qemu${n}.qcow2`);
      const ours = t.path(`strata${n}.qcow2`);
      for (const f of [theirs, ours]) {
        qemuImg('create', '-q', '-f', 'qcow2', '-o', opts.join(','), f, String(c.size));
        if (c.bitmaps) {
          qemuImg('bitmap', '--add', f, 'b0');
          qemuImg('bitmap', '--add', '-g', '512', f, 'fine');
          qemuImg('bitmap', '--add', '--disable', f, 'off');
        }
      }
      const r = rng(c.seed);
      for (let batch = 0; batch < BATCHES; batch++) {
        if (c.snapshots) {
          qemuImg('snapshot', '-c', `s${batch}`, theirs);
          const s = await strata('snapshot', '-c', `s${batch}`, ours);
          expect(s.code, s.err).toBe(0);
        }
        const ops = randomOps(r, c);
        const what = `batch ${batch}: ${ops.join('; ')}`;
        qemuIo(theirs, ops);
        const io = await strata('io', ...ops.flatMap((o) => ['-c', o]), ours);
        expect(io.code, `${what}\n${io.err}`).toBe(0);
        const cmp = qemuImgRun('compare', '-U', theirs, ours);
        expect(cmp.stdout + cmp.stderr, what).toContain('Images are identical');
        expect(allocation(ours), what).toEqual(allocation(theirs));
        const check = qemuImgRun('check', '--output=json', ours);
        expect(check.status, `${what}\n${check.stdout}${check.stderr}`).toBe(0);
        const [a, b] = [used(ours), used(theirs)];
        expect({ batch, ours: a, theirs: b, within2pct: Math.abs(a - b) <= 0.02 * b }).toEqual({ batch, ours: a, theirs: b, within2pct: true });
        if (c.bitmaps) {
          for (const name of ['b0', 'fine', 'off']) expect(dirtyRanges(ours, name), `${what}: bitmap ${name}`).toEqual(dirtyRanges(theirs, name));
        }
        if (batch === BATCHES - 1) report.push(`  ${c.name}: ${a} / ${b} bytes (${((a / b - 1) * 100).toFixed(2)}%)`);
      }
    });
  });
});
