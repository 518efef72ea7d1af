// A file system filling up under a running command: commit, rebase, convert and io work on
// files in a small tmpfs, and at chosen points of their run (before their Nth write) the rest
// of the tmpfs is filled, leaving nothing, a little, or somewhat more. Whatever the command
// then meets (it may still overwrite pages it has), it succeeds with everything in place or
// fails with one line naming the file, and no image is corrupt; the chain reads as before the
// command or as after (test/support/sweep.ts's rules). Verification writes nothing there.
import { spawnSync } from 'node:child_process';
import { closeSync, mkdtempSync, openSync, rmSync, statfsSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { describeOracle } from '../../oracle/qemu';
import { Sweep, spread, type SweepCase } from '../../support/sweep';
import { FaultInjector } from '../../support/fault-file';
import { CHAIN_CASES, create } from './sweep-cases';

const KiB = 1024;
const MiB = 1024 * KiB;

/** Mounts a tmpfs of `sizeMiB`; null (or, under CI, an error) where that is not allowed. */
function mountTmpfs(sizeMiB: number): { dir: string; cleanup: () => void } | null {
  const dir = mkdtempSync(join(tmpdir(), 'strata-full-'));
  const r = spawnSync('mount', ['-t', 'tmpfs', '-o', `size=${sizeMiB}M`, 'tmpfs', dir]);
  if (r.status !== 0) {
    rmSync(dir, { recursive: true, force: true });
    if (process.env.CI === 'true') throw new Error('cannot mount a tmpfs: CI runs as root and must run these tests');
    process.stderr.write('\n*** cannot mount a tmpfs here: the disk-full tests are SKIPPED ***\n\n');
    return null;
  }
  return {
    dir,
    cleanup: () => {
      if (spawnSync('umount', [dir]).status !== 0) spawnSync('umount', ['-l', dir]);
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

/** Fills the file system of `dir` until `leave` bytes are left (a file named filler). */
function fill(dir: string, leave: number): void {
  const st = statfsSync(dir);
  let n = st.bavail * st.bsize - leave;
  if (n <= 0) return;
  const fd = openSync(join(dir, 'filler'), 'a');
  const chunk = Buffer.alloc(256 * KiB, 1);
  try {
    while (n > 0) {
      const w = writeSync(fd, chunk, 0, Math.min(chunk.length, n));
      n -= w;
    }
  } catch { /* full already */ } finally {
    closeSync(fd);
  }
}

const CASES: SweepCase[] = [
  {
    name: "io -c 'write -P 9 0 2M' -c 'write -P 8 3M 1M'",
    build: (d) => { create(d, 'img.qcow2', '8M'); },
    argv: (d) => ['io', '-c', 'write -P 9 0 2M', '-c', 'write -P 8 3M 1M', join(d, 'img.qcow2')],
    images: ['img.qcow2'],
    views: [{ file: 'img.qcow2', rule: 'guest', written: [[0, 2 * MiB], [3 * MiB, 4 * MiB]] }],
  },
  ...CHAIN_CASES,
];

/** Bytes left free when the tmpfs is filled. */
const LEAVE = [0, 64 * KiB, 512 * KiB];
/** Points of the run (before these writes of it) at which it is filled. */
const WHEN = 4;

describeOracle('the file system fills up under a running command (tmpfs)', () => {
  let fs: ReturnType<typeof mountTmpfs> = null;
  const table: string[] = [];
  beforeAll(() => { fs = mountTmpfs(32); });
  afterAll(() => {
    fs?.cleanup();
    if (table.length) console.log(`[disk full] runs per command (fill points x free space left):\n  ${table.join('\n  ')}`);
  });

  for (const c of CASES) {
    it(c.name, async (ctx) => {
      if (!fs) return ctx.skip();
      const mnt = fs.dir;
      const sw = new Sweep(c, join(mnt, c.name.replace(/[^a-z0-9]+/gi, '_')));
      try {
        await sw.prepare();
        const problems: string[] = [];
        let failed = 0;
        let runs = 0;
        for (const at of spread(sw.clean.writes, WHEN)) {
          for (const leave of LEAVE) {
            const inj = new FaultInjector();
            inj.beforeEachWrite = (n) => { if (n === at) fill(mnt, leave); };
            try {
              const r = await sw.withInjector(inj, 'ENOSPC', `filled before write ${at}/${sw.clean.writes}, ${leave} bytes left`);
              problems.push(...r.problems);
              if (r.outcome.code !== 0) failed++;
            } finally {
              rmSync(join(mnt, 'filler'), { force: true });
            }
            runs++;
          }
        }
        table.push(`${c.name}: ${runs} runs, ${failed} ended in ENOSPC, ${runs - failed} still succeeded`);
        // Filling up to the last byte early in the run must stop it.
        expect(failed).toBeGreaterThan(0);
        expect(problems).toEqual([]);
      } finally {
        sw.cleanup();
      }
    });
  }
});
