// The job process: runs one job (or one plan, or one heavy read) for the main process and
// exits. The job is the same core function the CLI runs (runJob); progress and the result go
// back as validated messages. Cancel reaches the job through its AbortSignal, so it ends in its
// consistent state (its own cleanup, flush, dirty bit cleared) before the process exits.
import { ToJobSchema, type FromJob, type ToJob } from '../../core/protocol/job-process';
import { describeIssues } from '../../core/protocol/rpc';
import { StrataError, CancelledError } from '../../core/errors';
import { planJob, runJob } from '../../core/jobs/operations';
import { openImage, closeChain } from '../../core/chain/open';
import { mapSummary } from '../../core/chain/map-summary';
import { checkImage } from '../../core/jobs/check';
import type { JobSpec } from '../../core/jobs/plan';
import { getPriority, setPriority } from 'node:os';

/**
 * The nice value of a process running a job or a heavy read: a long copy must not make the
 * window slow to answer on a busy machine. It only matters when the CPU is contended; alone on
 * the machine the job runs as fast as at the default priority.
 */
export const JOB_NICE = 10;

function lowerPriority(): void {
  try { setPriority(Math.max(getPriority(), JOB_NICE)); } catch { /* not allowed here: keep the default priority */ }
}

export interface JobPort {
  post(msg: FromJob): void;
  onMessage(fn: (raw: unknown) => void): void;
}

function errorOf(err: unknown): FromJob {
  if (err instanceof StrataError) return { type: 'error', error: { kind: err.kind, message: err.message } };
  return { type: 'error', error: { kind: 'internal', message: (err as Error)?.message ?? String(err) } };
}

/**
 * Serves requests arriving on `port` until it has run one job or one read (or is told to exit,
 * or cancelled before it started one): plans may come first, a job's own plan among them.
 * Resolves when it is done; the caller then exits.
 */
export function serveJob(port: JobPort): Promise<void> {
  const ac = new AbortController();
  return new Promise<void>((resolve) => {
    let busy: Promise<void> = Promise.resolve();
    let done = false;
    const finish = () => { done = true; resolve(); };
    port.onMessage((raw) => {
      if (done) return;
      const parsed = ToJobSchema.safeParse(raw);
      if (!parsed.success) {
        port.post({ type: 'error', error: { kind: 'protocol', message: `malformed message for the job process: ${describeIssues(parsed.error)}` } });
        return;
      }
      const msg = parsed.data;
      if (msg.type === 'cancel') { ac.abort(); return; }
      if (msg.type === 'exit') { void busy.then(finish); return; }
      // One at a time, in order; a run or a read is the last thing this process does.
      const last = msg.type === 'run' || msg.type === 'read';
      if (last) lowerPriority();
      busy = busy.then(() => handle(msg, port, ac.signal).then((reply) => port.post(reply), (err) => port.post(errorOf(err)))).then(() => { if (last) finish(); });
    });
    ac.signal.addEventListener('abort', () => { void busy.then(() => { if (!done) finish(); }); });
    port.post({ type: 'ready' });
  });
}

async function handle(msg: Exclude<ToJob, { type: 'cancel' } | { type: 'exit' }>, port: JobPort, signal: AbortSignal): Promise<FromJob> {
  switch (msg.type) {
    case 'plan':
      return { type: 'plan', plan: await planJob(msg.spec as JobSpec) };
    case 'run': {
      const r = await runJob({
        signal,
        progress: (p) => port.post({ type: 'progress', progress: p }),
        log: (line) => port.post({ type: 'log', line: line.slice(0, 8192) }),
      }, msg.spec as JobSpec, { force: msg.force });
      if (signal.aborted) throw new CancelledError();
      return { type: 'result', result: { operation: r.operation, summary: r.summary, bytesWritten: r.bytesWritten, outputs: r.outputs } };
    }
    case 'read': {
      const t = msg.task;
      switch (t.op) {
        case 'map-summary': {
          const top = await openImage(t.image, { lock: 'none' });
          try { return { type: 'read-result', result: await mapSummary(top, t.buckets, signal) }; } finally { await closeChain(top); }
        }
        case 'check-read':
          return { type: 'read-result', result: await checkImage({ signal }, t.image, {}) };
        default: { const never: never = t; throw new Error(`unknown task ${String(never)}`); }
      }
    }
    default: { const never: never = msg; throw new Error(`unknown message ${String(never)}`); }
  }
}

/** Entry point under child_process.fork: the IPC channel is the port. */
export async function forkedJobMain(): Promise<void> {
  if (!process.send) throw new Error('the job process must be started by Strata (no IPC channel)');
  let lastSend: Promise<void> = Promise.resolve();
  const handlers: ((raw: unknown) => void)[] = [];
  const port: JobPort = {
    post: (m) => { if (process.connected) lastSend = new Promise<void>((r) => process.send!(m, () => r())); },
    onMessage: (fn) => { handlers.push(fn); process.on('message', fn); },
  };
  const cancel = () => { for (const h of handlers) h({ type: 'cancel' }); };
  // Ctrl-C in the terminal of `strata serve` reaches the whole process group: the server
  // cancels its jobs itself, in order, so the job does not stop on its own here. A parent
  // that goes away, or a SIGTERM, cancels: the job then ends in its consistent state.
  process.on('SIGINT', () => {});
  process.on('SIGTERM', cancel);
  process.on('disconnect', cancel);
  await serveJob(port);
  await lastSend;
  if (process.connected) process.disconnect();
}
