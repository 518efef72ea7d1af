// Every writing command, through injected faults and through simulated crashes, judged by the
// rules in test/support/sweep.ts (the images check without corruption, content reads as before
// or as after, a command that met a fault fails with one line naming the file and the cause).
//   Faults: transient EIO on chosen writes and on chosen flushes; a disk that fills up (sticky
//   ENOSPC from a chosen write on, and a byte budget whose last write lands short).
//   Crashes: the command runs once with its writes logged; the files are rebuilt as a power cut
//   at each cut point could leave them (what was flushed, plus any subset of the sectors
//   written since, each torn or not).
// Points per kind: every one up to the counts below, else that many spread over the run.
import { afterAll, expect, it } from 'vitest';
import { describeOracle, tempDir } from '../../oracle/qemu';
import { Sweep, spread } from '../../support/sweep';
import type { FaultPlan } from '../../support/fault-file';
import { CASES } from './sweep-cases';

const WRITE_POINTS = 12;
const FLUSH_POINTS = 6;
const CUTS = 24;

describeOracle('writing commands under injected faults and crashes', () => {
  const table: string[] = [];
  afterAll(() => console.log(`[failure sweep] points per path: EIO write / EIO flush / sticky ENOSPC / budget ENOSPC | crash cuts checked (of the run's cut points)\n  ${table.join('\n  ')}`));

  for (const [i, c] of CASES.entries()) {
    it(c.name, async () => {
      const t = tempDir('strata-failures-');
      const sw = new Sweep(c, t.dir);
      try {
        await sw.prepare();
        const { writes, flushes, bytes } = sw.clean;
        const kinds: FaultPlan[][] = [
          spread(writes, WRITE_POINTS).map((n) => ({ write: n, code: 'EIO' })),
          spread(flushes, FLUSH_POINTS).map((n) => ({ flush: n, code: 'EIO' })),
          spread(writes, 2).map((n) => ({ write: n, code: 'ENOSPC', sticky: true })),
          [0.3, 0.8].map((f) => ({ budget: Math.floor(bytes * f), code: 'ENOSPC' as const })),
        ];
        const problems: string[] = [];
        for (const plans of kinds) {
          let hits = 0;
          for (const p of plans) {
            const r = await sw.fault(p);
            problems.push(...r.problems);
            if (r.hit) hits++;
          }
          // Runs are deterministic: every fault planned inside the clean run's operations is met.
          expect(hits).toBe(plans.length);
        }
        const crash = await sw.crash(CUTS, 100 + i);
        problems.push(...crash.problems.map((p) => `crash: ${p}`));
        table.push(`${c.name}: ${kinds.map((k) => k.length).join(' / ')} | ${crash.checked} (${crash.points}); clean run ${writes} writes, ${flushes} flushes`);
        // Before and after at least (identical states are checked once).
        expect(crash.checked).toBeGreaterThanOrEqual(2);
        expect(problems).toEqual([]);
      } finally {
        t.cleanup();
      }
    });
  }
});
