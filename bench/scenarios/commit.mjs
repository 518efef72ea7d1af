// commit: `strata commit top.qcow2` vs `qemu-img commit top.qcow2` -- copy an overlay's data into
// its 2 GiB base, then empty the overlay.
//   base.qcow2     2 GiB, 64 KiB clusters, 256 MiB of /dev/urandom data in 1..16 MiB runs
//   top384.qcow2   overlay of base (64 KiB clusters): 384 MiB of data in 64 KiB..4 MiB runs
//                  (byte patterns), partly over base's data, partly over unallocated space
//   top38.qcow2    the same with 38 MiB (small variant)
// Pairs, for each top: `commit` and `commit -d` (keep the top: no emptying). Goal: the 384 MiB
// `commit` takes at most qemu-img's time; the other three pairs are for comparison. commit minus commit -d is the cost of emptying the top, which should not depend on
// how much data the top held; notes() prints it for both sizes and both tools.
//
// Each run works on fresh copies (prepare, untimed): base and top are copied
// (cp --sparse=always) into work/commit/<top>/<side>/, one directory per side so neither tool
// sees the other's images as dependents of its base. qemu-img commit's default cache mode is
// writeback (it flushes base and top before exiting), as does strata.
// Check: the two bases have the same guest content as each other and as the original chain; after
// `commit` both tops are empty (nothing allocated in the top layer); after `commit -d` both
// tops still hold their data.
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { assertSameContent, copySparse, exec, prng, GiB, KiB, MiB } from '../lib/util.mjs';
import { planRuns, randomRunsQcow2 } from '../lib/chains.mjs';

const VIRTUAL_SIZE = 2 * GiB;
const SEED = 0xc0331;
const TOPS = [{ name: 'top384', bytes: 384 * MiB }, { name: 'top38', bytes: 38 * MiB }];

async function writeTop(dir, name, bytes, r) {
  const path = join(dir, `${name}.qcow2`);
  await exec('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=64k', '-b', 'base.qcow2', '-F', 'qcow2', path]);
  const runs = planRuns(r, { virtualSize: VIRTUAL_SIZE, dataBytes: bytes, minRun: 64 * KiB, maxRun: 4 * MiB, align: 64 * KiB });
  r.shuffle(runs);
  const cmds = runs.flatMap((run, i) => ['-c', `write -q -P ${1 + (i % 255)} ${run.offset} ${run.length}`]);
  await exec('qemu-io', ['-f', 'qcow2', '-t', 'writeback', ...cmds, path]);
  await exec('qemu-img', ['check', '-q', path]);
}

/** Bytes allocated in the top layer itself (qemu-img map depth 0). */
async function topAllocated(path) {
  const map = JSON.parse(await exec('qemu-img', ['map', '--output=json', path]));
  return map.filter((e) => e.depth === 0 && (e.data || e.zero) && e.present !== false).reduce((a, e) => a + e.length, 0);
}

export default {
  name: 'commit',
  description: 'commit a 384 MiB (and a 38 MiB) overlay into a 2 GiB base; with and without emptying the top (-d)',
  cacheKey: `v1-seed${SEED}`,
  goals: { ratio: 1.0 },

  async setup(dir, { log }) {
    const r = prng(SEED);
    const baseRuns = planRuns(r, { virtualSize: VIRTUAL_SIZE, dataBytes: 256 * MiB, minRun: 1 * MiB, maxRun: 16 * MiB });
    log(`commit: base with ${baseRuns.length} random runs (256 MiB) in 2 GiB`);
    await randomRunsQcow2(join(dir, 'base.qcow2'), VIRTUAL_SIZE, baseRuns);
    for (const t of TOPS) {
      log(`commit: ${t.name} with ${t.bytes / MiB} MiB`);
      await writeTop(dir, t.name, t.bytes, r);
    }
  },

  // The copies made by prepare are fresh in the page cache; nothing else is read.
  inputs: () => [],

  pairs(dir, work) {
    const pairs = [];
    for (const t of TOPS) {
      const sideDir = (side) => join(work, t.name, side);
      const base = (side) => join(sideDir(side), 'base.qcow2');
      const top = (side) => join(sideDir(side), 'top.qcow2');
      const prepare = async (side) => {
        mkdirSync(sideDir(side), { recursive: true });
        await copySparse(join(dir, 'base.qcow2'), base(side));
        await copySparse(join(dir, `${t.name}.qcow2`), top(side));
      };
      for (const keep of [false, true]) {
        const d = keep ? ['-d'] : [];
        pairs.push({
          label: `commit${keep ? ' -d' : ''} (${t.bytes / MiB} MiB top)`,
          top: t.name,
          keep,
          strata: ['commit', ...d, top('strata')],
          qemu: { cmd: 'qemu-img', argv: ['commit', ...d, top('qemu')] },
          outputs: { strata: [base('strata'), top('strata')], qemu: [base('qemu'), top('qemu')] },
          prepare,
          // The goal is on the 384 MiB commit as typed; commit -d shows what emptying costs,
          // and the 38 MiB top is there for the emptying comparison (and is dominated by fixed
          // costs such as node's startup, ~0.1 s, which is all qemu-img needs for it).
          goals: !keep && t.bytes === 384 * MiB ? undefined : {},
        });
      }
    }
    return pairs;
  },

  async check(dir, work, pair) {
    const [sBase, sTop] = pair.outputs.strata;
    const [qBase, qTop] = pair.outputs.qemu;
    for (const f of [sBase, sTop, qBase, qTop]) await exec('qemu-img', ['check', '-q', f]);
    await assertSameContent(sBase, qBase);
    // The base now reads as the whole original chain did.
    await assertSameContent(sBase, join(dir, `${pair.top}.qcow2`));
    await assertSameContent(sTop, qTop);
    const [s, q] = [await topAllocated(sTop), await topAllocated(qTop)];
    if (pair.keep ? s === 0 || q === 0 : s !== 0 || q !== 0) {
      throw new Error(`top layer allocation after commit${pair.keep ? ' -d' : ''}: strata ${s} bytes, qemu ${q} bytes`);
    }
  },

  notes(results) {
    const med = (label) => results.find((r) => r.label === label)?.summary ?? null;
    const lines = [];
    for (const t of TOPS) {
      const full = med(`commit (${t.bytes / MiB} MiB top)`);
      const keep = med(`commit -d (${t.bytes / MiB} MiB top)`);
      if (!full || !keep) continue;
      const f = (x) => x.toFixed(2);
      lines.push(`emptying the ${t.bytes / MiB} MiB top (median commit - median commit -d): strata ${f(full.strataMedianS - keep.strataMedianS)} s, qemu ${f(full.qemuMedianS - keep.qemuMedianS)} s`);
    }
    return lines;
  },
};
