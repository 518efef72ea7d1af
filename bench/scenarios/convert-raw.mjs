// convert-raw: `strata convert -O raw` vs `qemu-img convert -O raw` on a 2 GiB virtual qcow2
// (64 KiB clusters) holding 1 GiB of guest data, written in shuffled order so the host layout
// is fragmented like a used VM disk:
//   - random data (/dev/urandom): ~400 small runs (4 KiB..1 MiB) plus large runs (4..32 MiB)
//     that fill the rest of the 1 GiB
//   - ~40 runs of text-like (compressible) log lines, 512-byte aligned sizes and offsets
//   - ~40 runs of explicit zeros (`write -z`, zero clusters), and 24 zero overlays punched
//     cluster-aligned into earlier random runs (data clusters that became zero clusters)
//   - the other ~1 GiB is never written (unallocated)
// Setup takes qemu-img create + one qemu-io process with one `write -s FILE` per run.
import { closeSync, mkdirSync, openSync, readSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { assertIdentical, exec, prng, GiB, KiB, MiB } from '../lib/util.mjs';
import { textCorpus } from '../lib/allocated-source.mjs';

const VIRTUAL_SIZE = 2 * GiB;
const DATA_BYTES = 1 * GiB;
const CLUSTER = 64 * KiB;
const SEED = 0x5747a7a;

/** The layout: runs { kind: 'random'|'text'|'zero', offset, length }, non-overlapping. */
function plan() {
  const r = prng(SEED);
  const runs = [];
  let total = 0;
  const add = (kind, length) => { runs.push({ kind, length }); total += length; };
  for (let i = 0; i < 400; i++) add('random', r.logSize(4 * KiB, 1 * MiB, 4 * KiB));
  for (let i = 0; i < 40; i++) add('text', r.logSize(64 * KiB, 10 * MiB, 512));
  for (let i = 0; i < 40; i++) add('zero', r.int(0, 3) === 0 ? r.logSize(4 * KiB, 4 * MiB, 4 * KiB) : r.logSize(1, 64, 1) * CLUSTER);
  while (total < DATA_BYTES) add('random', Math.min(DATA_BYTES - total, r.int(1, 8) * 4 * MiB));
  r.shuffle(runs);
  // Spread the unwritten space over the gaps: skewed weights give a few big holes and many
  // small or empty ones (adjacent runs). Gaps are multiples of 4 KiB.
  const free = VIRTUAL_SIZE - total;
  const weights = Array.from({ length: runs.length + 1 }, () => r.next() ** 3);
  const wsum = weights.reduce((a, b) => a + b, 0);
  let offset = 0;
  runs.forEach((run, i) => {
    offset += Math.floor((free * weights[i]) / wsum / (4 * KiB)) * 4 * KiB;
    run.offset = offset;
    offset += run.length;
  });
  if (offset > VIRTUAL_SIZE) throw new Error('convert-raw plan overflows the virtual size');
  // Zero overlays: cluster-aligned pieces of large random runs become zero clusters.
  const overlays = [];
  const big = runs.filter((x) => x.kind === 'random' && x.length >= 4 * MiB);
  for (let i = 0; i < 24 && big.length > 0; i++) {
    const run = big[r.int(0, big.length - 1)];
    const first = Math.ceil(run.offset / CLUSTER) * CLUSTER;
    const len = r.int(1, 16) * CLUSTER;
    const start = first + Math.floor(r.next() * Math.max(0, (run.offset + run.length - first - len) / CLUSTER)) * CLUSTER;
    if (start + len <= run.offset + run.length) overlays.push({ offset: start, length: len });
  }
  return { runs, overlays, writeOrder: r.shuffle(runs.map((_, i) => i)) };
}

export default {
  name: 'convert-raw',
  description: '2 GiB qcow2 (64 KiB clusters, 1 GiB mixed data, fragmented) -> raw',
  // Change this string whenever setup() changes: it names the cache directory.
  cacheKey: `v1-seed${SEED}-2G-64k-1G`,
  goals: { ratio: 1.2, strataRssMiB: 200 },

  async setup(dir, { log }) {
    const src = join(dir, 'src.qcow2');
    const tmp = join(dir, 'runs');
    mkdirSync(tmp, { recursive: true });
    const { runs, overlays, writeOrder } = plan();
    log(`convert-raw: writing ${runs.length} runs + ${overlays.length} zero overlays into a 2 GiB qcow2`);
    await exec('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', `cluster_size=${CLUSTER}`, src, String(VIRTUAL_SIZE)]);
    const corpus = textCorpus(SEED ^ 0x7e47);
    const urandom = openSync('/dev/urandom', 'r');
    const cmds = [];
    try {
      for (const i of writeOrder) {
        const run = runs[i];
        if (run.kind === 'zero') { cmds.push(`write -q -z ${run.offset} ${run.length}`); continue; }
        const buf = Buffer.allocUnsafe(run.length);
        if (run.kind === 'random') {
          for (let p = 0; p < buf.length; ) p += readSync(urandom, buf, p, Math.min(buf.length - p, 32 * MiB), null);
        } else {
          let from = (run.offset * 7919) % corpus.length;
          for (let p = 0; p < buf.length; ) {
            const n = corpus.copy(buf, p, from);
            p += n;
            from = 0;
          }
        }
        const file = join(tmp, `run-${i}.bin`);
        writeFileSync(file, buf);
        cmds.push(`write -q -s ${file} ${run.offset} ${run.length}`);
      }
    } finally {
      closeSync(urandom);
    }
    for (const o of overlays) cmds.push(`write -q -z ${o.offset} ${o.length}`);
    // -t writeback: qemu-io defaults to writethrough, an fsync per write.
    await exec('qemu-io', ['-f', 'qcow2', '-t', 'writeback', ...cmds.flatMap((c) => ['-c', c]), src]);
    rmSync(tmp, { recursive: true, force: true });
    await exec('qemu-img', ['check', '-q', src]);
  },

  /** Files read into the page cache before every timed run. */
  inputs: (dir) => [join(dir, 'src.qcow2')],

  pairs(dir, work) {
    const src = join(dir, 'src.qcow2');
    const a = join(work, 'strata.raw');
    const b = join(work, 'qemu.raw');
    return [{
      // The commands as people type them. Note qemu-img convert's default target cache mode
      // is 'unsafe' (no flush at the end) while strata fdatasyncs its target.
      label: 'convert -O raw',
      strata: ['convert', '-O', 'raw', src, a],
      qemu: { cmd: 'qemu-img', argv: ['convert', '-O', 'raw', src, b] },
      outputs: { strata: [a], qemu: [b] },
    }, {
      // Same durability on both sides: qemu-img flushes the target too.
      label: 'convert -O raw (qemu -t writeback)',
      strata: ['convert', '-O', 'raw', src, a],
      qemu: { cmd: 'qemu-img', argv: ['convert', '-t', 'writeback', '-O', 'raw', src, b] },
      outputs: { strata: [a], qemu: [b] },
    }];
  },

  /** Runs once, after the untimed warm-up of a pair, with both outputs present. */
  async check(dir, work, pair) {
    await assertIdentical(pair.outputs.strata[0], pair.outputs.qemu[0]);
  },
};
