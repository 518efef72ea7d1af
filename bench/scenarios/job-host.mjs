// job-host: the same 2 GiB convert (the allocated source of convert-qcow2) run as the app runs
// it, through the job manager and job processes (planned in one, run in another, progress
// over IPC), and as the strata command. The job host's time runs from the request to the
// result, as a person in the app waits for it; the command's is its process's wall time.
// Goal: the job host takes at most 1.05x the command's time.
// Check: both outputs have the same guest content.
import { build } from 'esbuild';
import { join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { linkAllocatedSource, ALLOCATED_SOURCE_KEY } from '../lib/allocated-source.mjs';
import { assertSameContent } from '../lib/util.mjs';
import { cliBundleOptions } from '../../scripts/bundle-options.mjs';

const benchDir = resolve(fileURLToPath(import.meta.url), '..', '..');
const root = resolve(benchDir, '..');
const hostBundle = join(benchDir, 'out', 'job-host.cjs');
let bundled = null;

/** The job manager as the app has it, bundled like the rest of the app (once per run). */
function bundleHost() {
  bundled ??= build({ ...cliBundleOptions(join(root, 'bench', 'lib', 'job-host-entry.ts'), join(benchDir, 'out')), entryPoints: { 'job-host': join(root, 'bench', 'lib', 'job-host-entry.ts') } });
  return bundled;
}

export default {
  name: 'job-host',
  description: '2 GiB convert -O qcow2 through the app\'s job host vs the strata command',
  cacheKey: ALLOCATED_SOURCE_KEY,
  goals: { ratio: 1.05 },

  async setup(dir, { log }) {
    await linkAllocatedSource(dir, log);
  },

  inputs: (dir) => [join(dir, 'src.qcow2')],

  pairs(dir, work, { engine }) {
    const src = join(dir, 'src.qcow2');
    const a = join(work, 'jobhost.qcow2');
    const b = join(work, 'cli.qcow2');
    return [{
      label: 'convert -O qcow2: job host vs command',
      strata: { cmd: process.execPath, argv: [hostBundle, engine.launcher, JSON.stringify({ op: 'convert', source: src, target: a, targetFormat: 'qcow2' })] },
      qemu: { cmd: engine.launcher, argv: ['convert', '-O', 'qcow2', src, b] },
      outputs: { strata: [a], qemu: [b] },
      selfTimed: ['strata'],
      sideNames: { strata: 'job host', qemu: 'strata command' },
      prepare: () => bundleHost(),
    }];
  },

  async check(dir, work, pair) {
    await assertSameContent(pair.outputs.strata[0], pair.outputs.qemu[0]);
  },
};
