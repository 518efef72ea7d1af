// The writing paths the fault and crash sweeps drive, each a small image set built with QEMU's
// own tools and one strata command line. Small on purpose: every path is run dozens of times.
import { execFileSync } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { qemuImg, qemuIo } from '../../oracle/qemu';
import type { SweepCase } from '../../support/sweep';

const KiB = 1024;
const MiB = 1024 * KiB;

export function create(dir: string, name: string, size: string, opts = 'cluster_size=4k', backing?: string): string {
  const p = join(dir, name);
  const args = ['create', '-q', '-f', 'qcow2', '-o', opts];
  if (backing) args.push('-b', backing, '-F', 'qcow2');
  args.push(p, size);
  qemuImg(...args);
  return p;
}

/** base <- mid <- top, with data in every layer (4 KiB clusters, 2 MiB). */
export function chain(dir: string): void {
  const base = create(dir, 'base.qcow2', '2M');
  qemuIo(base, ['write -P 0x11 0 1M', 'write -P 0x12 1536k 256k']);
  const mid = create(dir, 'mid.qcow2', '2M', 'cluster_size=4k', 'base.qcow2');
  qemuIo(mid, ['write -P 0x21 256k 256k', 'write -z 640k 64k', 'write -P 0x22 1600k 24k']);
  const top = create(dir, 'top.qcow2', '2M', 'cluster_size=4k', 'mid.qcow2');
  qemuIo(top, ['write -P 0x31 512k 128k', 'write -P 0x32 1200k 8k', 'write -P 0x33 100k 4k']);
}

/** An image with a leaked cluster (its refcount raised with nothing using it) and one whose refcount is too low. */
function damaged(dir: string, name: string, kind: 'leak' | 'low'): void {
  const p = create(dir, name, '1M');
  qemuIo(p, ['write -P 0x41 0 256k', 'write -P 0x42 512k 64k']);
  // qemu-img creates 4k images as: header, reftable (cluster 1), refcount block (cluster 2),
  // L1 (cluster 3); 16-bit refcounts.
  const fd = Buffer.from(execFileSync('cat', [p]));
  const block = Number(fd.readBigUInt64BE(Number(fd.readBigUInt64BE(48))));
  if (kind === 'leak') {
    // Clusters past the data: refcount 1 for three of them, and the file covers them.
    const end = Math.ceil(fd.length / 4096);
    for (let c = end; c < end + 3; c++) fd.writeUInt16BE(1, block + c * 2);
    writeFileSync(p, Buffer.concat([fd, Buffer.alloc(3 * 4096)]));
  } else {
    // A data cluster's refcount down to 0: a corruption only -r all can fix.
    const l1 = Number(fd.readBigUInt64BE(40));
    const l2 = Number(fd.readBigUInt64BE(l1) & 0x00fffffffffffe00n);
    const data = Number(fd.readBigUInt64BE(l2 + 8) & 0x00fffffffffffe00n);
    fd.writeUInt16BE(0, block + (data / 4096) * 2);
    writeFileSync(p, fd);
  }
}

/** What check prints of its findings on stderr (as qemu-img), before any error line. */
const CHECK_REPORT = /^(Leaked cluster|Repairing|ERROR|Rebuilding)/;

/**
 * commit, safe rebase and convert over the three-deep chain, as the real file stack runs them
 * (the FUSE fault sweep and the disk-full runs share them; CASES has its own variants).
 */
export const CHAIN_CASES: SweepCase[] = [
  {
    name: 'commit',
    build: (d) => { chain(d); qemuIo(join(d, 'top.qcow2'), ['write -P 0x35 1536k 384k']); },
    argv: (d) => ['commit', join(d, 'top.qcow2')],
    images: ['top.qcow2', 'mid.qcow2', 'base.qcow2'],
    views: [{ file: 'top.qcow2', rule: 'unchanged' }, { file: 'top.qcow2', alone: true, rule: 'result' }],
  },
  {
    name: 'rebase -b base.qcow2',
    build: (d) => { chain(d); },
    argv: (d) => ['rebase', '-b', 'base.qcow2', '-F', 'qcow2', join(d, 'top.qcow2')],
    images: ['top.qcow2', 'mid.qcow2', 'base.qcow2'],
    views: [{ file: 'top.qcow2', rule: 'unchanged' }, { file: 'top.qcow2', alone: true, rule: 'result' }],
  },
  {
    name: 'convert -O qcow2',
    build: (d) => { chain(d); },
    argv: (d) => ['convert', '-O', 'qcow2', '-o', 'cluster_size=4k', join(d, 'top.qcow2'), join(d, 'out.qcow2')],
    images: ['top.qcow2', 'out.qcow2'],
    views: [{ file: 'top.qcow2', rule: 'unchanged' }, { file: 'out.qcow2', rule: 'result' }],
    createdTargets: ['out.qcow2'],
  },
];

export const CASES: SweepCase[] = [
  {
    name: "io -c 'write -P 9 0 1M' (4 KiB clusters)",
    build: (d) => { create(d, 'img.qcow2', '4M'); },
    argv: (d) => ['io', '-c', 'write -P 9 0 1M', join(d, 'img.qcow2')],
    images: ['img.qcow2'],
    views: [{ file: 'img.qcow2', rule: 'guest', written: [[0, MiB]] }],
  },
  {
    name: 'io on 512-byte clusters, 64-bit refcounts (the refcount table grows)',
    build: (d) => { const p = create(d, 'img.qcow2', '4M', 'cluster_size=512,refcount_bits=64'); qemuIo(p, ['write -P 1 0 1536k']); },
    argv: (d) => ['io', '-c', 'write -P 7 1536k 1M', join(d, 'img.qcow2')],
    images: ['img.qcow2'],
    views: [{ file: 'img.qcow2', rule: 'guest', written: [[1536 * KiB, 2560 * KiB]] }],
  },
  {
    name: 'convert -O qcow2',
    build: (d) => { chain(d); },
    buildKey: 'chain',
    argv: (d) => ['convert', '-t', 'writeback', '-O', 'qcow2', '-o', 'cluster_size=4k', join(d, 'top.qcow2'), join(d, 'out.qcow2')],
    images: ['top.qcow2', 'out.qcow2'],
    views: [{ file: 'top.qcow2', rule: 'unchanged' }, { file: 'out.qcow2', rule: 'result' }],
    createdTargets: ['out.qcow2'],
  },
  {
    name: 'convert -c -O qcow2',
    build: (d) => { chain(d); },
    buildKey: 'chain',
    argv: (d) => ['convert', '-t', 'writeback', '-c', '-O', 'qcow2', '-o', 'cluster_size=4k', join(d, 'top.qcow2'), join(d, 'out.qcow2')],
    images: ['top.qcow2', 'out.qcow2'],
    views: [{ file: 'top.qcow2', rule: 'unchanged' }, { file: 'out.qcow2', rule: 'result' }],
    createdTargets: ['out.qcow2'],
  },
  {
    name: 'convert -B base.qcow2 -O qcow2',
    build: (d) => { chain(d); },
    buildKey: 'chain',
    argv: (d) => ['convert', '-t', 'writeback', '-O', 'qcow2', '-o', 'cluster_size=4k', '-B', 'base.qcow2', '-F', 'qcow2', join(d, 'top.qcow2'), join(d, 'out.qcow2')],
    images: ['top.qcow2', 'out.qcow2'],
    views: [{ file: 'top.qcow2', rule: 'unchanged' }, { file: 'out.qcow2', rule: 'result' }],
    createdTargets: ['out.qcow2'],
  },
  {
    name: 'commit (then the fast empty of the overlay)',
    build: (d) => { chain(d); },
    buildKey: 'chain',
    argv: (d) => ['commit', join(d, 'top.qcow2')],
    images: ['top.qcow2', 'mid.qcow2', 'base.qcow2'],
    views: [{ file: 'top.qcow2', rule: 'unchanged' }, { file: 'top.qcow2', alone: true, rule: 'result' }],
  },
  {
    name: 'commit -d',
    build: (d) => { chain(d); },
    buildKey: 'chain',
    argv: (d) => ['commit', '-d', join(d, 'top.qcow2')],
    images: ['top.qcow2', 'mid.qcow2', 'base.qcow2'],
    views: [{ file: 'top.qcow2', rule: 'unchanged' }, { file: 'top.qcow2', alone: true, rule: 'unchanged' }],
  },
  {
    name: 'commit -b base.qcow2 (two layers down)',
    build: (d) => { chain(d); },
    buildKey: 'chain',
    argv: (d) => ['commit', '-b', join(d, 'base.qcow2'), join(d, 'top.qcow2')],
    images: ['top.qcow2', 'mid.qcow2', 'base.qcow2'],
    views: [{ file: 'top.qcow2', rule: 'unchanged' }, { file: 'mid.qcow2', alone: true, rule: 'unchanged' }],
  },
  {
    name: 'commit of an overlay with a snapshot (emptied by discarding)',
    build: (d) => { chain(d); qemuImg('snapshot', '-c', 's1', join(d, 'top.qcow2')); qemuIo(join(d, 'top.qcow2'), ['write -P 0x34 0 16k']); },
    argv: (d) => ['commit', join(d, 'top.qcow2')],
    images: ['top.qcow2', 'mid.qcow2', 'base.qcow2'],
    views: [{ file: 'top.qcow2', rule: 'unchanged' }, { file: 'top.qcow2', alone: true, rule: 'result' }, { file: 'top.qcow2', snapshots: true, alone: true, rule: 'unchanged' }],
  },
  {
    name: 'compact (rewritten beside itself, then renamed over)',
    build: (d) => { chain(d); },
    buildKey: 'chain',
    argv: (d) => ['compact', join(d, 'top.qcow2')],
    images: ['top.qcow2', 'mid.qcow2', 'base.qcow2'],
    views: [{ file: 'top.qcow2', rule: 'unchanged' }],
  },
  {
    name: 'empty (an overlay whose data its backing file already has)',
    build: (d) => {
      const base = create(d, 'base.qcow2', '2M');
      qemuIo(base, ['write -P 0x71 0 512k', 'write -P 0x72 1M 256k']);
      const top = create(d, 'top.qcow2', '2M', 'cluster_size=4k', 'base.qcow2');
      qemuIo(top, ['write -P 0x71 64k 128k', 'write -P 0x72 1M 64k']);
    },
    argv: (d) => ['empty', join(d, 'top.qcow2')],
    images: ['top.qcow2', 'base.qcow2'],
    views: [{ file: 'top.qcow2', rule: 'unchanged' }, { file: 'top.qcow2', alone: true, rule: 'result' }],
  },
  {
    name: 'merge of the middle layer (committed down, its child repointed, deleted)',
    build: (d) => { chain(d); },
    buildKey: 'chain',
    argv: (d) => ['merge', join(d, 'mid.qcow2')],
    images: ['top.qcow2', 'base.qcow2'],
    views: [{ file: 'top.qcow2', rule: 'unchanged' }],
  },
  {
    name: 'rebase -b base.qcow2 (safe)',
    build: (d) => { chain(d); },
    buildKey: 'chain',
    argv: (d) => ['rebase', '-b', 'base.qcow2', '-F', 'qcow2', join(d, 'top.qcow2')],
    images: ['top.qcow2', 'mid.qcow2', 'base.qcow2'],
    views: [{ file: 'top.qcow2', rule: 'unchanged' }, { file: 'top.qcow2', alone: true, rule: 'result' }],
  },
  {
    name: 'rebase -u -b base.qcow2',
    build: (d) => { chain(d); },
    buildKey: 'chain',
    argv: (d) => ['rebase', '-u', '-b', 'base.qcow2', '-F', 'qcow2', join(d, 'top.qcow2')],
    images: ['top.qcow2', 'mid.qcow2', 'base.qcow2'],
    views: [{ file: 'top.qcow2', rule: 'job' }, { file: 'top.qcow2', alone: true, rule: 'unchanged' }],
  },
  {
    name: "rebase -b '' (flatten)",
    build: (d) => { chain(d); },
    buildKey: 'chain',
    argv: (d) => ['rebase', '-b', '', join(d, 'top.qcow2')],
    images: ['top.qcow2', 'mid.qcow2', 'base.qcow2'],
    views: [{ file: 'top.qcow2', rule: 'unchanged' }, { file: 'top.qcow2', alone: true, rule: 'result' }],
  },
  {
    name: 'snapshot -c',
    build: (d) => { const p = create(d, 'img.qcow2', '2M'); qemuIo(p, ['write -P 0x51 0 512k']); qemuImg('snapshot', '-c', 'old', p); qemuIo(p, ['write -P 0x52 256k 512k']); },
    argv: (d) => ['snapshot', '-c', 'new', join(d, 'img.qcow2')],
    images: ['img.qcow2'],
    views: [{ file: 'img.qcow2', rule: 'unchanged' }, { file: 'img.qcow2', snapshots: true, rule: 'job' }],
  },
  {
    name: 'snapshot -a',
    build: (d) => { const p = create(d, 'img.qcow2', '2M'); qemuIo(p, ['write -P 0x51 0 512k']); qemuImg('snapshot', '-c', 'old', p); qemuIo(p, ['write -P 0x52 256k 512k', 'write -P 0x53 1M 64k']); },
    argv: (d) => ['snapshot', '-a', 'old', join(d, 'img.qcow2')],
    images: ['img.qcow2'],
    views: [{ file: 'img.qcow2', rule: 'job' }, { file: 'img.qcow2', snapshots: true, rule: 'unchanged' }],
  },
  {
    name: 'snapshot -d',
    build: (d) => { const p = create(d, 'img.qcow2', '2M'); qemuIo(p, ['write -P 0x51 0 512k']); qemuImg('snapshot', '-c', 'old', p); qemuIo(p, ['write -P 0x52 256k 512k']); qemuImg('snapshot', '-c', 'keep', p); },
    argv: (d) => ['snapshot', '-d', 'old', join(d, 'img.qcow2')],
    images: ['img.qcow2'],
    views: [{ file: 'img.qcow2', rule: 'unchanged' }, { file: 'img.qcow2', snapshots: true, rule: 'job' }],
  },
  {
    name: 'snapshot -d of the only snapshot (its clusters go back to one reference)',
    build: (d) => { const p = create(d, 'img.qcow2', '2M'); qemuIo(p, ['write -P 0x54 0 768k']); qemuImg('snapshot', '-c', 'only', p); qemuIo(p, ['write -P 0x55 512k 64k']); },
    argv: (d) => ['snapshot', '-d', 'only', join(d, 'img.qcow2')],
    images: ['img.qcow2'],
    views: [{ file: 'img.qcow2', rule: 'unchanged' }, { file: 'img.qcow2', snapshots: true, rule: 'job' }],
  },
  {
    name: 'snapshot -c of an image without snapshots',
    build: (d) => { const p = create(d, 'img.qcow2', '2M'); qemuIo(p, ['write -P 0x56 0 768k']); },
    argv: (d) => ['snapshot', '-c', 'mine', join(d, 'img.qcow2')],
    images: ['img.qcow2'],
    views: [{ file: 'img.qcow2', rule: 'unchanged' }, { file: 'img.qcow2', snapshots: true, rule: 'job' }],
  },
  {
    name: 'resize (grow past what the L1 table covers)',
    build: (d) => { const p = create(d, 'img.qcow2', '1M', 'cluster_size=512'); qemuIo(p, ['write -P 0x61 0 256k']); },
    argv: (d) => ['resize', join(d, 'img.qcow2'), '4M'],
    images: ['img.qcow2'],
    views: [{ file: 'img.qcow2', rule: 'job' }, { file: 'img.qcow2', rule: 'unchanged', range: [0, MiB] }],
  },
  {
    name: 'resize --shrink',
    build: (d) => { const p = create(d, 'img.qcow2', '4M'); qemuIo(p, ['write -P 0x62 0 1M', 'write -P 0x63 3M 512k']); },
    argv: (d) => ['resize', '--shrink', join(d, 'img.qcow2'), '1536k'],
    images: ['img.qcow2'],
    // What lies past the new end is being dropped: only the part that stays must not change.
    views: [{ file: 'img.qcow2', rule: 'result' }, { file: 'img.qcow2', rule: 'unchanged', range: [0, 1536 * KiB] }],
  },
  {
    name: 'resize --shrink of an image with internal snapshots (tables shared with them)',
    build: (d) => {
      const p = create(d, 'img.qcow2', '4M');
      qemuIo(p, ['write -P 0x64 0 1M', 'write -P 0x65 3M 512k']);
      qemuImg('snapshot', '-c', 'one', p);
      qemuIo(p, ['write -P 0x66 3M 64k', 'write -P 0x67 1M 128k']);
    },
    argv: (d) => ['resize', '--shrink', join(d, 'img.qcow2'), '1536k'],
    images: ['img.qcow2'],
    // The snapshot keeps everything, at every step; of the active layer, what stays.
    views: [{ file: 'img.qcow2', rule: 'result' }, { file: 'img.qcow2', rule: 'unchanged', range: [0, 1536 * KiB] }, { file: 'img.qcow2', snapshots: true, rule: 'unchanged' }],
  },
  {
    name: 'check -r leaks',
    build: (d) => { damaged(d, 'img.qcow2', 'leak'); },
    argv: (d) => ['check', '-r', 'leaks', join(d, 'img.qcow2')],
    reportLines: CHECK_REPORT,
    images: ['img.qcow2'],
    views: [{ file: 'img.qcow2', rule: 'unchanged' }],
  },
  {
    name: 'check -r all',
    build: (d) => { damaged(d, 'img.qcow2', 'low'); },
    argv: (d) => ['check', '-r', 'all', join(d, 'img.qcow2')],
    reportLines: CHECK_REPORT,
    // Damaged on purpose: until the repair, the corruption it started with is allowed.
    images: ['img.qcow2'],
    views: [{ file: 'img.qcow2', rule: 'unchanged' }],
  },
  {
    name: 'check -r all of v3 snapshot table entries whose extra data is too short (a new snapshot table)',
    build: (d) => {
      const p = create(d, 'img.qcow2', '1M', 'cluster_size=4k,compat=0.10');
      qemuIo(p, ['write -P 0x71 0 64k']);
      for (const n of ['sn0', 'sn1']) qemuImg('snapshot', '-c', n, p);
      // Both entries lose their extra data (v2 allows that), then the header says v3.
      const b = readFileSync(p);
      const table = Number(b.readBigUInt64BE(64));
      const parts: Buffer[] = [];
      let q = table;
      for (let i = 0; i < 2; i++) {
        q = Math.ceil(q / 8) * 8;
        const x = b.readUInt32BE(q + 36);
        const ids = b.readUInt16BE(q + 12) + b.readUInt16BE(q + 14);
        const fixed = Buffer.from(b.subarray(q, q + 40));
        fixed.writeUInt32BE(0, 36);
        const e = Buffer.concat([fixed, b.subarray(q + 40 + x, q + 40 + x + ids)]);
        parts.push(Buffer.concat([e, Buffer.alloc((8 - (e.length % 8)) % 8)]));
        q += 40 + x + ids;
      }
      Buffer.concat(parts).copy(b, table);
      b.writeUInt32BE(3, 4);
      b.writeUInt32BE(0x68, 100);
      b.writeUInt32BE(4, 96);
      writeFileSync(p, b);
    },
    argv: (d) => ['check', '-r', 'all', join(d, 'img.qcow2')],
    reportLines: CHECK_REPORT,
    images: ['img.qcow2'],
    views: [{ file: 'img.qcow2', rule: 'unchanged' }, { file: 'img.qcow2', snapshots: true, rule: 'unchanged' }],
  },
  {
    name: 'mirror -O qcow2',
    build: (d) => { chain(d); },
    buildKey: 'chain',
    argv: (d) => ['mirror', '-O', 'qcow2', join(d, 'top.qcow2'), join(d, 'out.qcow2')],
    images: ['top.qcow2', 'out.qcow2'],
    views: [{ file: 'top.qcow2', rule: 'unchanged' }, { file: 'out.qcow2', rule: 'result' }],
    createdTargets: ['out.qcow2'],
  },
  {
    name: 'amend -o compat=0.10 (zero clusters expanded, a snapshot)',
    build: (d) => {
      const base = create(d, 'base.qcow2', '1M');
      qemuIo(base, ['write -P 0x11 0 1M']);
      const p = create(d, 'img.qcow2', '1M', 'cluster_size=4k', 'base.qcow2');
      qemuIo(p, ['write -P 0x51 0 64k', 'write -z 64k 64k', 'write -P 0x52 128k 16k']);
      qemuImg('snapshot', '-c', 's1', p);
      qemuIo(p, ['write -z 128k 16k', 'write -z 512k 32k']);
    },
    argv: (d) => ['amend', '-o', 'compat=0.10', join(d, 'img.qcow2')],
    images: ['img.qcow2'],
    views: [{ file: 'img.qcow2', rule: 'unchanged' }, { file: 'img.qcow2', snapshots: true, rule: 'unchanged' }],
  },
  {
    name: 'amend -o refcount_bits=1 (a new refcount structure, one header write)',
    build: (d) => { const p = create(d, 'img.qcow2', '2M'); qemuIo(p, ['write -P 0x61 0 1M', 'write -P 0x62 1536k 64k']); },
    argv: (d) => ['amend', '-o', 'refcount_bits=1', join(d, 'img.qcow2')],
    images: ['img.qcow2'],
    views: [{ file: 'img.qcow2', rule: 'unchanged' }],
  },
  {
    name: 'amend -o compat=1.1 of a v2 image with a snapshot (a new snapshot table)',
    build: (d) => { const p = create(d, 'img.qcow2', '1M', 'cluster_size=4k,compat=0.10'); qemuIo(p, ['write -P 0x71 0 256k']); qemuImg('snapshot', '-c', 's1', p); qemuIo(p, ['write -P 0x72 0 4k']); },
    argv: (d) => ['amend', '-o', 'compat=1.1', join(d, 'img.qcow2')],
    images: ['img.qcow2'],
    views: [{ file: 'img.qcow2', rule: 'unchanged' }, { file: 'img.qcow2', snapshots: true, rule: 'unchanged' }],
  },
  {
    name: 'bitmap --add --merge (bitmaps stored anew, the header switched)',
    build: (d) => { const p = create(d, 'img.qcow2', '1M'); qemuImg('bitmap', '--add', p, 'a'); qemuIo(p, ['write -P 0x81 0 128k']); },
    argv: (d) => ['bitmap', '--add', '--merge', 'a', join(d, 'img.qcow2'), 'b'],
    images: ['img.qcow2'],
    views: [{ file: 'img.qcow2', rule: 'unchanged' }],
  },
  {
    name: 'resize --preallocation=full (a refcount area, one data run)',
    build: (d) => { const p = create(d, 'img.qcow2', '1M'); qemuIo(p, ['write -P 0x91 0 100k']); },
    argv: (d) => ['resize', '--preallocation=full', join(d, 'img.qcow2'), '3M'],
    images: ['img.qcow2'],
    views: [{ file: 'img.qcow2', rule: 'unchanged', range: [0, MiB] }],
  },
];
