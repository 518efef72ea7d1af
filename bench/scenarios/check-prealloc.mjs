// check-prealloc: `strata check` vs `qemu-img check` on a 256 GiB qcow2 created with
// preallocation=metadata (64 KiB clusters): 4194304 allocated clusters, 512 L2 tables and 128
// refcount blocks spread through a 256 GiB sparse file (~40 MiB actually on disk).
// Goal: strata takes at most 1.5x qemu-img's time.
//
// Page cache: reading the whole 256 GiB file before each run (the harness default) would mostly
// read holes, so only the metadata is warmed (header, L1, every L2 table, refcount table and
// blocks), which is all either tool reads.
// Check: both report a clean image with the same JSON numbers.
import { join } from 'node:path';
import { exec, warmQcow2Metadata } from '../lib/util.mjs';

export default {
  name: 'check-prealloc',
  description: '256 GiB qcow2, preallocation=metadata: strata check vs qemu-img check',
  cacheKey: 'v1-256G-metadata',
  goals: { ratio: 1.5 },

  async setup(dir, { log }) {
    log('check-prealloc: qemu-img create -o preallocation=metadata 256G (a few seconds)');
    await exec('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'preallocation=metadata', join(dir, 'img.qcow2'), '256G']);
  },

  inputs: (dir) => [{ path: join(dir, 'img.qcow2'), warm: warmQcow2Metadata }],

  pairs(dir) {
    const img = join(dir, 'img.qcow2');
    return [{
      label: 'check (256 GiB, preallocation=metadata)',
      strata: ['check', img],
      qemu: { cmd: 'qemu-img', argv: ['check', img] },
      outputs: { strata: [], qemu: [] },
    }];
  },

  async check(dir, work, pair, { strata }) {
    const img = join(dir, 'img.qcow2');
    const pick = (j) => {
      const o = JSON.parse(j);
      return JSON.stringify({
        corruptions: o.corruptions ?? 0, leaks: o.leaks ?? 0, 'check-errors': o['check-errors'] ?? 0,
        'image-end-offset': o['image-end-offset'], 'total-clusters': o['total-clusters'], 'allocated-clusters': o['allocated-clusters'],
        'fragmented-clusters': o['fragmented-clusters'], 'compressed-clusters': o['compressed-clusters'],
      });
    };
    const s = pick(await strata(['check', '--output=json', img]));
    const q = pick(await exec('qemu-img', ['check', '--output=json', img]));
    if (s !== q) throw new Error(`check results differ:\n  strata ${s}\n  qemu   ${q}`);
  },
};
