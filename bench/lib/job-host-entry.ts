// The app's way of running a job, timed: the job manager plans it in one job process and
// runs it in another (child_process.fork of the strata bundle, as browser mode does), from the
// request to the result. Bundled by bench/scenarios/job-host.mjs; prints BENCH_WALL_S.
// The clock starts once the manager's spare job process is up, as it is in an app that has
// been open for a moment.
// usage: node job-host.cjs STRATA_LAUNCHER SPEC_JSON
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { JobManager } from '../../main/services/job-manager';
import { ForkJobHost } from '../../main/services/job-host';
import type { JobRecord } from '../../core/protocol/jobs';

async function main(): Promise<number> {
  const [bundle, specText] = process.argv.slice(2);
  if (!bundle || !specText) throw new Error('usage: job-host.cjs STRATA_LAUNCHER SPEC_JSON');
  const data = mkdtempSync(join(tmpdir(), 'strata-bench-jobs-'));
  try {
    const jobs = new JobManager(new ForkJobHost(bundle), { dataDir: data, concurrency: 1 });
    await jobs.warm();
    const t0 = process.hrtime.bigint();
    const ended = new Promise<JobRecord>((resolve) => jobs.on({ job: (r) => { if (['succeeded', 'failed', 'cancelled'].includes(r.state)) resolve(r); } }));
    await jobs.start(JSON.parse(specText));
    const r = await ended;
    const wall = Number(process.hrtime.bigint() - t0) / 1e9;
    if (r.state !== 'succeeded') throw new Error(`job ${r.state}: ${r.error?.message}`);
    await jobs.shutdown();
    process.stderr.write(`BENCH_WALL_S=${wall.toFixed(4)}\n`);
    return 0;
  } finally {
    rmSync(data, { recursive: true, force: true });
  }
}

main().then((code) => process.exit(code), (err) => { process.stderr.write(`${err.message}\n`); process.exit(1); });
