// map-prealloc: allocation maps of metadata-preallocated images (every cluster allocated, the
// data clusters holes of the host file), the worst case for a map: every L2 entry is read and
// the host file is asked where its holes are.
//   - `strata map --summary 1024` of a 1 TiB image against `qemu-img map --output=json` of it
//     (what the app's allocation picture needs, against the nearest qemu-img has): goal <= 1.0.
//   - plain `map --output=json` of a 256 GiB image, both tools: goal <= 1.2.
// Check: the plain maps are byte-identical; the summary counts the whole disk as zero.
import { join } from 'node:path';
import { exec, warmQcow2Metadata } from '../lib/util.mjs';

export default {
  name: 'map-prealloc',
  description: 'map --summary 1024 of 1 TiB and map --output=json of 256 GiB, preallocation=metadata',
  cacheKey: 'v1-1T-256G-metadata',

  async setup(dir, { log }) {
    log('map-prealloc: qemu-img create -o preallocation=metadata 1T and 256G (several seconds)');
    await exec('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'preallocation=metadata', join(dir, '1t.qcow2'), '1T']);
    await exec('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'preallocation=metadata', join(dir, '256g.qcow2'), '256G']);
  },

  pairs(dir) {
    const big = join(dir, '1t.qcow2');
    const img = join(dir, '256g.qcow2');
    return [{
      label: 'map --summary 1024 (1 TiB) vs qemu-img map',
      strata: ['map', '--summary', '1024', '--output=json', big],
      qemu: { cmd: 'qemu-img', argv: ['map', '--output=json', big] },
      outputs: { strata: [], qemu: [] },
      inputs: [{ path: big, warm: warmQcow2Metadata }],
      goals: { ratio: 1.0 },
    }, {
      label: 'map --output=json (256 GiB)',
      strata: ['map', '--output=json', img],
      qemu: { cmd: 'qemu-img', argv: ['map', '--output=json', img] },
      outputs: { strata: [], qemu: [] },
      inputs: [{ path: img, warm: warmQcow2Metadata }],
      goals: { ratio: 1.2 },
    }];
  },

  async check(dir, work, pair, { strata }) {
    if (pair.label.startsWith('map --summary')) {
      const s = JSON.parse(await strata(pair.strata));
      const zero = s.layers[0].zero.reduce((a, b) => a + b, 0);
      if (zero !== 2 ** 40) throw new Error(`summary counts ${zero} zero bytes, not the whole 1 TiB`);
      return;
    }
    const ours = await strata(pair.strata);
    const theirs = await exec(pair.qemu.cmd, pair.qemu.argv);
    if (ours !== theirs) throw new Error('map --output=json differs from qemu-img map');
  },
};
