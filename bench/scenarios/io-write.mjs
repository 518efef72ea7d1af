// io-write: 1 GiB of 64 KiB sequential guest writes through `strata io` into a fresh image,
// against `qemu-io` doing the same. Goal: strata at least as fast (ratio <= 1.0).
//
// Each run gets a fresh `qemu-img create -f qcow2 IMG 2G` (untimed, in prepare) and one process
// that runs 16384 commands `write -P 0x5a OFFk 64k`, OFF = 0, 64, 128, ... KiB.
// The commands go on the command line as `-c CMD` pairs (neither tool reads commands from a
// file): 32768 arguments, ~510 KB of argv; Linux allows 2 MiB (ARG_MAX = stack limit / 4 with
// the default 8 MiB stack), so this is far from the limit.
//
// Pairs:
//   1. the commands as typed: `qemu-io -c ... IMG`. qemu-io's default cache mode is
//      writethrough: it flushes (fdatasync) after every write, 16384 times; strata io does not.
//   2. `qemu-io -t writeback -c ... IMG`: flushes once when the image is closed, the same
//      durability as strata io (which fdatasyncs on close). The fair comparison.
// Check: `qemu-img compare` of the two resulting images.
import { join } from 'node:path';
import { assertSameContent, exec, GiB, KiB } from '../lib/util.mjs';

const TOTAL = 1 * GiB;
const CHUNK = 64 * KiB;
const COUNT = TOTAL / CHUNK; // 16384

function commandArgs() {
  const out = [];
  for (let i = 0; i < COUNT; i++) out.push('-c', `write -P 0x5a ${(i * CHUNK) / KiB}k 64k`);
  return out;
}

const createFresh = (img) => exec('qemu-img', ['create', '-q', '-f', 'qcow2', img, '2G']);

export default {
  name: 'io-write',
  description: '1 GiB of 64 KiB sequential writes (16384 -c commands) into a fresh 2 GiB qcow2: strata io vs qemu-io',
  cacheKey: 'v1',
  goals: { ratio: 1.0 },

  // Nothing to build: every run starts from a fresh image made by prepare.
  async setup() {},

  inputs: () => [],

  pairs(dir, work) {
    const a = join(work, 'strata.qcow2');
    const b = join(work, 'qemu.qcow2');
    const cmds = commandArgs();
    const base = {
      strata: ['io', ...cmds, a],
      outputs: { strata: [a], qemu: [b] },
      prepare: (side) => createFresh(side === 'strata' ? a : b),
    };
    return [{
      ...base,
      label: 'io 16384x write 64k (qemu-io as typed: writethrough)',
      qemu: { cmd: 'qemu-io', argv: [...cmds, b] },
    }, {
      ...base,
      label: 'io 16384x write 64k (qemu-io -t writeback)',
      qemu: { cmd: 'qemu-io', argv: ['-t', 'writeback', ...cmds, b] },
    }];
  },

  async check(dir, work, pair) {
    await assertSameContent(pair.outputs.strata[0], pair.outputs.qemu[0]);
  },
};
