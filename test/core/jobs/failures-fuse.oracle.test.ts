// The real file stack failing: strata runs (in this process, through NodeFile, the addon's
// writer thread and the kernel) on files in a FUSE pass-through file system of ours
// (test/support/faultfs.py) that fails the Nth write it sees, with EIO once, or with ENOSPC for
// it and everything after. At every injection point of io, commit, rebase and convert, the
// command either succeeds with its data in place or fails with one line naming the file and
// the cause, and qemu-img check finds no corruption (test/support/sweep.ts's rules). Under
// CI=true (root) this must run: a machine without FUSE or python3-fusepy fails it.
import { join } from 'node:path';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { describeOracle } from '../../oracle/qemu';
import { Sweep, type SweepCase } from '../../support/sweep';
import { faultFsUnavailable, startFaultFs, type FaultFs } from '../../support/faultfs';
import { CHAIN_CASES, chain, create } from './sweep-cases';

const MiB = 1024 * 1024;

const CASES: SweepCase[] = [
  {
    name: "io -c 'write -P 9 0 1M' (4 KiB clusters)",
    build: (d) => { create(d, 'img.qcow2', '4M'); },
    argv: (d) => ['io', '-c', 'write -P 9 0 1M', join(d, 'img.qcow2')],
    images: ['img.qcow2'],
    views: [{ file: 'img.qcow2', rule: 'guest', written: [[0, MiB]] }],
  },
  ...CHAIN_CASES,
  {
    // Raw targets take the addon's read-scan-write path.
    name: 'convert -O raw',
    build: (d) => { chain(d); },
    argv: (d) => ['convert', '-O', 'raw', join(d, 'top.qcow2'), join(d, 'out.raw')],
    images: ['top.qcow2'],
    views: [{ file: 'top.qcow2', rule: 'unchanged' }],
    createdTargets: ['out.raw'],
  },
];

const MODES = [
  { mode: 'once' as const, code: 'EIO' as const },
  { mode: 'sticky' as const, code: 'ENOSPC' as const },
];

describeOracle('the real file stack failing one write (FUSE)', () => {
  let fs: FaultFs | null = null;
  const table: string[] = [];
  beforeAll(async () => {
    const why = faultFsUnavailable();
    if (why) {
      if (process.env.CI === 'true') throw new Error(`${why}: CI runs as root and must run the FUSE failure tests (.ci/run installs python3-fusepy)`);
      process.stderr.write(`\n*** ${why}: the FUSE failure tests are SKIPPED ***\n\n`);
      return;
    }
    fs = await startFaultFs();
  });
  afterAll(async () => {
    await fs?.stop();
    if (table.length) console.log(`[fuse failures] injection points per command (every write the file system saw):\n  ${table.join('\n  ')}`);
  });

  for (const c of CASES) {
    it(c.name, async (ctx) => {
      if (!fs) return ctx.skip();
      const f = fs;
      const sw = new Sweep(c, join(f.root, c.name.replace(/[^a-z0-9]+/gi, '_')));
      const through = (dir: string) => join(f.mnt, dir.slice(f.root.length + 1));
      try {
        await sw.prepare();
        // How many writes the command makes, as the file system sees them.
        f.count();
        expect(await sw.cleanThrough(through)).toEqual([]);
        const writes = f.stats().writes;
        expect(writes).toBeGreaterThan(2);
        const problems: string[] = [];
        const counts: string[] = [];
        for (const { mode, code } of MODES) {
          let failed = 0;
          let recovered = 0;
          for (let n = 1; n <= writes; n++) {
            const r = await sw.faultThrough(through, () => f.arm(n, mode, code), () => f.stats().failed > 0, code, `write ${n}/${writes} ${code} ${mode}`);
            problems.push(...r.problems);
            if (r.outcome.code !== 0) failed++;
            else if (r.hit) recovered++;
          }
          // Every point was met: the runs are the clean run's until the fault.
          expect(failed + recovered).toBe(writes);
          counts.push(`${writes} ${code} ${mode} (${failed} failed, ${recovered} short writes retried and succeeded)`);
        }
        f.count();
        table.push(`${c.name}: ${counts.join(', ')}`);
        expect(problems).toEqual([]);
      } finally {
        sw.cleanup();
      }
    });
  }
});
