// The source image shared by convert-qcow2 and convert-compress: a 2 GiB qcow2 (64 KiB
// clusters) in which EVERY cluster is allocated (has a host cluster):
//   - 384 MiB of /dev/urandom data
//   - 128 MiB of log-like text (compressible, never zero)
//   - 256 MiB of explicit zeros: first written as data, then `write -z` (without -u), so the
//     clusters become zero clusters that keep their host allocation (QCOW_OFLAG_ZERO + offset)
//   - the remaining 1280 MiB written as data full of zero bytes (`write -P 0`): allocated
//     clusters that the tools must read to find out they are zero
// in runs of 64 KiB..16 MiB (cluster multiples) laid end to end in shuffled order and written in
// another shuffled order, so the host layout is fragmented. Built once (~30 s) in
// bench/out/cache/shared/<key>/src.qcow2; the scenarios link to it from their own cache dirs.
import { closeSync, existsSync, mkdirSync, openSync, readSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { assertSameContent, exec, prng, GiB, KiB, MiB } from './util.mjs';

const VIRTUAL_SIZE = 2 * GiB;
const CLUSTER = 64 * KiB;
const SEED = 0xa110c8;
export const ALLOCATED_SOURCE_KEY = `alloc2g-v1-seed${SEED}`;

function plan() {
  const r = prng(SEED);
  const targets = { random: 384 * MiB, text: 128 * MiB, zero: 256 * MiB, pzero: VIRTUAL_SIZE - 768 * MiB };
  const runs = [];
  for (const [kind, total] of Object.entries(targets)) {
    for (let left = total; left > 0; ) {
      const len = Math.min(left, r.logSize(64 * KiB, 16 * MiB, CLUSTER));
      runs.push({ kind, length: len });
      left -= len;
    }
  }
  r.shuffle(runs);
  let offset = 0;
  for (const run of runs) { run.offset = offset; offset += run.length; }
  if (offset !== VIRTUAL_SIZE) throw new Error('allocated-source plan does not cover the image');
  return { runs, writeOrder: r.shuffle(runs.map((_, i) => i)) };
}

/** ~8 MiB of log-like lines: compressible (deflate ~4x), never zero. */
export function textCorpus(seed) {
  const r = prng(seed);
  const words = ['GET', 'POST', 'PUT', 'request', 'handled', 'cache', 'miss', 'hit', 'user', 'session', 'token', 'refresh', 'items', 'orders', 'invoice', 'timeout', 'retry', 'backend', 'upstream', 'ok'];
  const levels = ['INFO ', 'DEBUG', 'WARN ', 'ERROR'];
  const parts = [];
  let size = 0;
  for (let i = 0; size < 8 * MiB; i++) {
    const ts = new Date(1_700_000_000_000 + i * 137).toISOString();
    const msg = Array.from({ length: r.int(3, 9) }, () => words[r.int(0, words.length - 1)]).join(' ');
    const line = `${ts} ${levels[r.int(0, 3)]} [worker-${r.int(0, 15)}] ${msg} id=${r.int(0, 1e9).toString(16)} path=/api/v1/${words[r.int(0, 19)]}/${r.int(1, 99999)} status=${[200, 200, 200, 404, 500][r.int(0, 4)]} ms=${r.int(0, 2000)}\n`;
    parts.push(line);
    size += line.length;
  }
  return Buffer.from(parts.join(''), 'latin1');
}

async function build(path, tmp, log) {
  const { runs, writeOrder } = plan();
  const count = (k) => runs.filter((x) => x.kind === k).length;
  log(`allocated source: ${runs.length} runs (${count('random')} random, ${count('text')} text, ${count('zero')} write -z, ${count('pzero')} write -P 0) over 2 GiB`);
  await exec('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', `cluster_size=${CLUSTER}`, path, String(VIRTUAL_SIZE)]);
  mkdirSync(tmp, { recursive: true });
  const corpus = textCorpus(SEED ^ 0x7e47);
  const urandom = openSync('/dev/urandom', 'r');
  const cmds = [];
  try {
    for (const i of writeOrder) {
      const run = runs[i];
      if (run.kind === 'zero' || run.kind === 'pzero') { cmds.push(`write -q -P 0 ${run.offset} ${run.length}`); continue; }
      const buf = Buffer.allocUnsafe(run.length);
      if (run.kind === 'random') {
        for (let p = 0; p < buf.length; ) p += readSync(urandom, buf, p, Math.min(buf.length - p, 32 * MiB), null);
      } else {
        let from = (run.offset * 7919) % corpus.length;
        for (let p = 0; p < buf.length; ) { p += corpus.copy(buf, p, from); from = 0; }
      }
      const file = join(tmp, `run-${i}.bin`);
      writeFileSync(file, buf);
      cmds.push(`write -q -s ${file} ${run.offset} ${run.length}`);
    }
  } finally {
    closeSync(urandom);
  }
  // Now the explicit zeros: the clusters are allocated, and `write -z` without -u keeps them so.
  for (const run of runs.filter((x) => x.kind === 'zero')) cmds.push(`write -q -z ${run.offset} ${run.length}`);
  await exec('qemu-io', ['-f', 'qcow2', '-t', 'writeback', ...cmds.flatMap((c) => ['-c', c]), path]);
  rmSync(tmp, { recursive: true, force: true });
  await exec('qemu-img', ['check', '-q', path]);
  // Every cluster must have a host offset (data, or a zero cluster that kept its allocation).
  const map = JSON.parse(await exec('qemu-img', ['map', '--output=json', path]));
  const unallocated = map.filter((e) => e.offset === undefined);
  if (unallocated.length) throw new Error(`allocated source: ${unallocated.length} map entries without a host offset, e.g. ${JSON.stringify(unallocated[0])}`);
}

/**
 * Makes `dir/src.qcow2` a link to the shared source, building the source first unless it is
 * already there. `dir` is a scenario cache dir (bench/out/cache/NAME/KEY).
 */
export async function linkAllocatedSource(dir, log) {
  const shared = resolve(dir, '..', '..', 'shared', ALLOCATED_SOURCE_KEY);
  const src = join(shared, 'src.qcow2');
  if (!existsSync(join(shared, '.ready'))) {
    rmSync(shared, { recursive: true, force: true });
    mkdirSync(shared, { recursive: true });
    await build(src, join(shared, 'runs'), log);
    writeFileSync(join(shared, '.ready'), new Date().toISOString() + '\n');
  } else {
    log(`allocated source: using ${src}`);
  }
  symlinkSync(src, join(dir, 'src.qcow2'));
}

/**
 * A `convert` scenario on the allocated source: `strata convert FLAGS -O qcow2` against
 * `qemu-img convert FLAGS -O qcow2`, both with their defaults (the target is written with
 * cache=unsafe, no flush at the end). Check: `qemu-img compare` of the two outputs.
 */
export function allocatedConvertScenario({ name, description, flags }) {
  return {
    name,
    description,
    cacheKey: ALLOCATED_SOURCE_KEY,
    goals: { ratio: 1.0, strataRssMiB: 250 },

    async setup(dir, { log }) {
      await linkAllocatedSource(dir, log);
    },

    inputs: (dir) => [join(dir, 'src.qcow2')],

    pairs(dir, work) {
      const src = join(dir, 'src.qcow2');
      const a = join(work, 'strata.qcow2');
      const b = join(work, 'qemu.qcow2');
      const argv = (out) => ['convert', ...flags, '-O', 'qcow2', src, out];
      return [{
        label: ['convert', ...flags, '-O qcow2'].join(' '),
        strata: argv(a),
        qemu: { cmd: 'qemu-img', argv: argv(b) },
        outputs: { strata: [a], qemu: [b] },
      }];
    },

    async check(dir, work, pair) {
      await assertSameContent(pair.outputs.strata[0], pair.outputs.qemu[0]);
    },
  };
}
