// The job manager with job processes it only imagines: a second job on an image that a running
// job of ours holds waits for it, also when the lock doctor could not name the holder (an OFD
// lock whose process it missed).
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, expect, it } from 'vitest';
import { JobManager } from '../../main/services/job-manager';
import type { JobHandle, JobHost, JobExit } from '../../main/services/job-host';
import type { FromJob, ToJob } from '../../core/protocol/job-process';
import type { JobPlanMessage } from '../../core/protocol/jobs';
import { newPlan } from '../../core/jobs/plan-kit';

const dir = mkdtempSync(join(tmpdir(), 'strata-jobmanager-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));
const image = join(dir, 'disk.qcow2');
writeFileSync(image, '');

/** Processes that plan every job as writing `image`, blocked by an unnamed holder once a job runs. */
class FakeHost implements JobHost {
  running = false;
  finishRun: (() => void)[] = [];
  private pid = 1000;
  spawn(): JobHandle {
    let listener: ((m: FromJob) => void) | null = null;
    let exit!: (e: JobExit) => void;
    const exited = new Promise<JobExit>((r) => { exit = r; });
    const post = (m: FromJob) => setImmediate(() => listener?.(m));
    setImmediate(() => listener?.({ type: 'ready' }));
    return {
      pid: ++this.pid,
      onMessage: (fn) => { listener = fn; },
      exited,
      kill: () => exit({ code: null, signal: 'SIGKILL' }),
      send: (msg: ToJob) => {
        if (msg.type === 'plan') {
          const plan = newPlan('snapshot', 'Snapshot disk.qcow2', ['strata', 'snapshot', image]) as JobPlanMessage;
          plan.writes.push(image);
          if (this.running) plan.blocked.push({ filename: image, reason: 'image is in use: another process (not found in /proc) holds it', holder: null });
          post({ type: 'plan', plan });
        } else if (msg.type === 'run') {
          this.running = true;
          this.finishRun.push(() => { this.running = false; post({ type: 'result', result: { operation: 'snapshot', summary: 'done', bytesWritten: 0, outputs: [] } }); setImmediate(() => exit({ code: 0, signal: null })); });
        } else if (msg.type === 'exit') exit({ code: 0, signal: null });
      },
    };
  }
}

it('a second job on an image our running job holds (holder unnamed) waits for it instead of being refused', async () => {
  const host = new FakeHost();
  const jobs = new JobManager(host, { dataDir: dir, concurrency: 2, warmSpare: false });
  const first = await jobs.start({ op: 'snapshot', image, action: 'create', name: 'a' });
  await new Promise((r) => setTimeout(r, 20));
  expect(jobs.list().find((j) => j.id === first.id)?.state).toBe('running');
  const second = await jobs.start({ op: 'snapshot', image, action: 'create', name: 'b' });
  expect(second.state).toBe('queued');
  await new Promise((r) => setTimeout(r, 20));
  expect(jobs.list().find((j) => j.id === second.id)?.waitingFor).toContain('Snapshot disk.qcow2');
  host.finishRun.shift()!();
  await new Promise((r) => setTimeout(r, 50));
  expect(jobs.list().find((j) => j.id === first.id)?.state).toBe('succeeded');
  expect(jobs.list().find((j) => j.id === second.id)?.state).toBe('running');
  host.finishRun.shift()!();
  await jobs.shutdown();
});
