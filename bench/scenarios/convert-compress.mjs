// convert-compress: `strata convert -c -O qcow2` vs `qemu-img convert -c -O qcow2` on a
// 2 GiB qcow2 in which every cluster is allocated: 384 MiB random, 128 MiB text, 256 MiB explicit zeros
// (`write -z`, allocated zero clusters), the other 1280 MiB written as data full of zero bytes
// (`write -P 0`). See bench/lib/allocated-source.mjs (shared with convert-qcow2).
// Goals: at most qemu-img's time (ratio <= 1.0), strata peak RSS < 250 MiB.
// Both tools use their defaults: the target is written with cache=unsafe (no flush at the end),
// compression type zlib (deflate); clusters that do not shrink are stored uncompressed.
// Check: `qemu-img compare` of the two outputs.
import { join } from 'node:path';
import { linkAllocatedSource, ALLOCATED_SOURCE_KEY } from '../lib/allocated-source.mjs';
import { assertSameContent } from '../lib/util.mjs';

export default {
  name: 'convert-compress',
  description: '2 GiB qcow2, every cluster allocated (384M random, 128M text, 256M -z, rest zero data) -> compressed qcow2 (-c)',
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
    return [{
      label: 'convert -c -O qcow2',
      strata: ['convert', '-c', '-O', 'qcow2', src, a],
      qemu: { cmd: 'qemu-img', argv: ['convert', '-c', '-O', 'qcow2', src, b] },
      outputs: { strata: [a], qemu: [b] },
    }];
  },

  async check(dir, work, pair) {
    await assertSameContent(pair.outputs.strata[0], pair.outputs.qemu[0]);
  },
};
