// convert-qcow2: `strata convert -O qcow2` vs `qemu-img convert -O qcow2` on a 2 GiB qcow2 in
// which every cluster is allocated: 384 MiB random, 128 MiB text, 256 MiB explicit zeros
// (`write -z`, allocated zero clusters), the other 1280 MiB written as data full of zero bytes
// (`write -P 0`). See bench/lib/allocated-source.mjs (shared with convert-compress).
// Goals: at most qemu-img's time (ratio <= 1.0), strata peak RSS < 250 MiB.
// Both tools use their defaults: the target is written with cache=unsafe (no flush at the end).
// Check: `qemu-img compare` of the two outputs.
import { allocatedConvertScenario } from '../lib/allocated-source.mjs';

export default allocatedConvertScenario({
  name: 'convert-qcow2',
  description: '2 GiB qcow2, every cluster allocated (384M random, 128M text, 256M -z, rest zero data) -> qcow2',
  flags: [],
});
