// tree: `strata tree` over a folder of 2,000 images (1,000 two-deep chains: a base and its
// overlay) against what a qemu-img user has instead: `qemu-img info --backing-chain` on every
// image, one process each (qemu-img only ever looks a chain up, never down).
// Goals: strata at most 1 s warm, and at most 1/20 of qemu-img's time.
// A second pair times the app: from starting `strata serve` on the folder until Chromium shows
// all 2,000 images (goal: 1.5 s), beside `strata tree` of it.
// Check: strata finds 2,000 images, 1,000 bases each with its one overlay, and no problems.
import { readdirSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { exec, warmQcow2Metadata } from '../lib/util.mjs';

const CHAINS = 1000;

export default {
  name: 'tree',
  description: '2,000 images in 1,000 two-deep chains: strata tree vs qemu-img info --backing-chain per image',
  cacheKey: 'v1-1000-chains',
  goals: { ratio: 0.05, strataS: 1 },

  async setup(dir, { log }) {
    log(`tree: creating ${CHAINS} bases and their overlays with qemu-img (a minute or so)`);
    const pool = join(dir, 'pool');
    // One shell per 100 chains: 2,000 qemu-img runs, without 2,000 node round trips.
    await exec('mkdir', ['-p', pool]);
    for (let i = 0; i < CHAINS; i += 100) {
      const cmds = [];
      for (let k = i; k < i + 100; k++) {
        const n = String(k).padStart(4, '0');
        cmds.push(`qemu-img create -q -f qcow2 ${pool}/base-${n}.qcow2 1G`, `qemu-img create -q -f qcow2 -b base-${n}.qcow2 -F qcow2 ${pool}/vm-${n}.qcow2`);
      }
      await exec('sh', ['-c', cmds.join(' && ')]);
    }
  },

  // Metadata only (header, L1, refcounts): what either side reads of these empty images.
  inputs: (dir) => readdirSync(join(dir, 'pool')).map((n) => ({ path: join(dir, 'pool', n), warm: warmQcow2Metadata })),

  pairs(dir, work, { engine }) {
    const pool = join(dir, 'pool');
    return [{
      label: 'tree over 2,000 images',
      strata: ['tree', '--output=json', pool],
      qemu: { cmd: 'sh', argv: ['-c', `for f in ${pool}/*.qcow2; do qemu-img info -U --backing-chain --output=json "$f" > /dev/null || exit 1; done`] },
      outputs: { strata: [], qemu: [] },
      reps: 3,
    }, {
      label: 'strata serve: 2,000 images in Chromium',
      strata: { cmd: process.execPath, argv: [join(fileURLToPath(new URL('../lib/serve-to-render.mjs', import.meta.url))), engine.launcher, pool, String(2 * CHAINS)] },
      qemu: { cmd: engine.launcher, argv: ['tree', '--output=json', pool] },
      outputs: { strata: [], qemu: [] },
      selfTimed: ['strata'],
      sideNames: { strata: 'serve to render', qemu: 'strata tree' },
      goals: { strataS: 1.5 },
      reps: 3,
    }];
  },

  async check(dir, work, pair, { strata }) {
    if (pair.label.startsWith('strata serve')) return; // the run itself waits for all 2,000
    const images = JSON.parse(await strata(['tree', '--output=json', join(dir, 'pool')]));
    const bases = images.filter((i) => !i['backing-filename']);
    const bad = images.filter((i) => i.problems.length);
    if (images.length !== 2 * CHAINS || bases.length !== CHAINS || bases.some((b) => b.children.length !== 1) || bad.length) {
      throw new Error(`tree found ${images.length} images, ${bases.length} bases, ${bad.length} with problems`);
    }
  },
};
