// rebase: safe rebase of the top of a 3-image chain onto the bottom, dropping the middle layer.
//   base.qcow2    2 GiB, 64 KiB clusters, 1 GiB of /dev/urandom data in 1..32 MiB runs
//   middle.qcow2  overlay of base (64 KiB clusters): 8000 scattered 4 KiB writes (4 KiB-aligned,
//                 each a different byte pattern); each allocates a 64 KiB cluster (COW from base)
//   top.qcow2     overlay of middle, 128 KiB clusters with extended L2 (4 KiB subclusters):
//                 64 writes of 4..256 KiB (~5 MiB)
// Pair: `strata rebase -b base.qcow2 -F qcow2 top.qcow2` vs `qemu-img rebase -b base.qcow2
// -F qcow2 top.qcow2`. Both must copy into top whatever middle changed (the 8000 4 KiB pieces,
// where top does not hide them). Goal: at most qemu-img's time (ratio <= 1.0).
//
// Each run works on a fresh chain in work/rebase/<side>/ (prepare, untimed): top.qcow2 is copied
// (cp --sparse=always) from the cache, base.qcow2 and middle.qcow2 are symlinks to the cached
// files. Rebase only reads those two (both tools open them read-only; check() verifies they are
// unchanged), so copying 1.5 GiB per run would only add disk writeback between runs.
// Check: both results have backing file base.qcow2, the same guest content as each other
// (qemu-img compare) and as the original chain (top over middle over base).
import { mkdirSync, rmSync, statSync, symlinkSync } from 'node:fs';
import { join } from 'node:path';
import { assertSameContent, copySparse, exec, prng, GiB, KiB, MiB } from '../lib/util.mjs';
import { planRuns, randomRunsQcow2 } from '../lib/chains.mjs';

const VIRTUAL_SIZE = 2 * GiB;
const SEED = 0x4eba5e;

async function buildBase(dir, r, log) {
  const runs = planRuns(r, { virtualSize: VIRTUAL_SIZE, dataBytes: 1 * GiB, minRun: 1 * MiB, maxRun: 32 * MiB });
  log(`rebase: base with ${runs.length} random runs (1 GiB) in 2 GiB`);
  await randomRunsQcow2(join(dir, 'base.qcow2'), VIRTUAL_SIZE, runs);
}

export default {
  name: 'rebase',
  description: '3-chain 2 GiB (1 GiB base, 8000 scattered 4 KiB writes in the middle, 128 KiB extended-L2 top): rebase top onto base',
  cacheKey: `v1-seed${SEED}`,
  goals: { ratio: 1.0 },

  async setup(dir, { log }) {
    const r = prng(SEED);
    await buildBase(dir, r, log);
    const middle = join(dir, 'middle.qcow2');
    const top = join(dir, 'top.qcow2');
    // Relative backing names, so the chain also works from copies/links in other directories.
    await exec('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=64k', '-b', 'base.qcow2', '-F', 'qcow2', middle]);
    const mcmds = [];
    for (let i = 0; i < 8000; i++) mcmds.push('-c', `write -q -P ${1 + (i % 255)} ${r.int(0, VIRTUAL_SIZE / (4 * KiB) - 1) * 4 * KiB} 4k`);
    log('rebase: middle with 8000 scattered 4 KiB writes');
    await exec('qemu-io', ['-f', 'qcow2', '-t', 'writeback', ...mcmds, middle]);
    await exec('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=128k,extended_l2=on', '-b', 'middle.qcow2', '-F', 'qcow2', top]);
    const tcmds = [];
    for (let i = 0; i < 64; i++) {
      const len = r.logSize(4 * KiB, 256 * KiB, 4 * KiB);
      tcmds.push('-c', `write -q -P ${0x80 + (i % 64)} ${r.int(0, (VIRTUAL_SIZE - len) / (4 * KiB)) * 4 * KiB} ${len}`);
    }
    await exec('qemu-io', ['-f', 'qcow2', '-t', 'writeback', ...tcmds, top]);
    for (const f of ['base.qcow2', 'middle.qcow2', 'top.qcow2']) await exec('qemu-img', ['check', '-q', join(dir, f)]);
  },

  // The read-only layers the rebase reads (top is a fresh copy, already in the page cache).
  inputs: (dir) => [join(dir, 'base.qcow2'), join(dir, 'middle.qcow2')],

  pairs(dir, work) {
    const top = (side) => join(work, side, 'top.qcow2');
    const prepare = async (side) => {
      const d = join(work, side);
      mkdirSync(d, { recursive: true });
      for (const f of ['base.qcow2', 'middle.qcow2']) {
        rmSync(join(d, f), { force: true });
        symlinkSync(join(dir, f), join(d, f));
      }
      await copySparse(join(dir, 'top.qcow2'), top(side));
    };
    return [{
      label: 'rebase -b base.qcow2 -F qcow2 top.qcow2',
      strata: ['rebase', '-b', 'base.qcow2', '-F', 'qcow2', top('strata')],
      qemu: { cmd: 'qemu-img', argv: ['rebase', '-b', 'base.qcow2', '-F', 'qcow2', top('qemu')] },
      outputs: { strata: [top('strata')], qemu: [top('qemu')] },
      prepare,
    }];
  },

  async check(dir, work, pair) {
    const [a, b] = [pair.outputs.strata[0], pair.outputs.qemu[0]];
    for (const f of [a, b]) {
      const info = JSON.parse(await exec('qemu-img', ['info', '--output=json', f]));
      if (info['backing-filename'] !== 'base.qcow2') throw new Error(`${f}: backing file is ${info['backing-filename']}, expected base.qcow2`);
      await exec('qemu-img', ['check', '-q', f]);
    }
    await assertSameContent(a, b);
    await assertSameContent(a, join(dir, 'top.qcow2'));
    const ready = statSync(join(dir, '.ready')).mtimeMs;
    for (const f of ['base.qcow2', 'middle.qcow2']) {
      if (statSync(join(dir, f)).mtimeMs > ready) throw new Error(`${f} in the cache was modified by a rebase run`);
    }
  },
};
