// The job manager: a queue with a global concurrency limit, at most one writing job per chain
// (a job that touches what a running job writes, or writes what it reads, waits and says on
// what), every job planned first and refused when its plan is blocked, cancel, progress
// throttled to what a screen needs, and a history persisted across restarts. A job whose
// process dies is marked failed with the reason; the manager keeps serving.
import { existsSync, readFileSync, realpathSync, renameSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { StrataError, UsageError } from '../../core/errors';
import { enforcePlan } from '../../core/jobs/plan-kit';
import { JobRecordSchema, type ErrorInfo, type JobPlanMessage, type JobRecord, type JobSpecMessage, type ProgressMessage, type ReadTask } from '../../core/protocol/jobs';
import type { FromJob, ToJob } from '../../core/protocol/job-process';
import { describeExit, type JobHandle, type JobHost } from './job-host';
import { writeFileAtomic } from './settings';
import { z } from 'zod';

/** History entries kept on disk. */
const HISTORY_LIMIT = 200;
/** At most this many progress events a second per job reach the screen. */
const PROGRESS_INTERVAL_MS = 150;
/** How long a cancelled job may take to reach its consistent state before it is killed. */
const CANCEL_GRACE_MS = 120_000;

export interface JobManagerOptions {
  dataDir: string;
  concurrency: number;
  /** The images of the chain under `path` (itself first), as realpaths: what a job there reads. */
  chainOf?: (path: string) => string[];
  log?: (line: string) => void;
  /** Called with the paths a finished job changed (the library rescans them). */
  touched?: (paths: string[]) => void;
  /**
   * Keep one job process started and idle, so that a plan or a job does not wait for node to
   * start (default true).
   */
  warmSpare?: boolean;
  /**
   * Start the first spare only when warm() is called, not at once: at the app's start the
   * machine is busy scanning the library and loading the page, and a job process starting
   * beside them (node and the whole bundle) slows what the person is waiting for.
   */
  deferSpare?: boolean;
}

interface Running {
  record: JobRecord;
  proc: JobProcess;
  reads: Set<string>;
  writes: Set<string>;
  lastProgressAt: number;
  pendingProgress: ProgressMessage | null;
  progressTimer: NodeJS.Timeout | null;
  killTimer: NodeJS.Timeout | null;
}

interface Queued {
  record: JobRecord;
  /** The process that planned it, waiting to run it. */
  proc: JobProcess;
  force: boolean;
  reads: Set<string>;
  writes: Set<string>;
}

type Listener = { job?: (r: JobRecord) => void; progress?: (id: string, p: ProgressMessage) => void };

/** An error from a job process, as a typed error again. */
function toError(e: ErrorInfo): Error {
  return new StrataError(e.kind as StrataError['kind'], e.message);
}

/**
 * One job process as the manager talks to it: it is ready once it says so, and its messages
 * go to whoever is listening now (the plan, then the run).
 */
class JobProcess {
  readonly ready: Promise<void>;
  private listener: ((m: FromJob) => void) | null = null;
  constructor(readonly handle: JobHandle) {
    let ready!: () => void;
    this.ready = new Promise<void>((r) => { ready = r; });
    handle.onMessage((m) => { if (m.type === 'ready') ready(); else this.listener?.(m); });
  }
  listen(fn: (m: FromJob) => void): void { this.listener = fn; }
  send(msg: ToJob): void { void this.ready.then(() => this.handle.send(msg)); }

  /** Sends `msg` and resolves with the first answer `pick` takes; an error or an exit rejects. */
  ask<T>(msg: ToJob, pick: (m: FromJob) => T | undefined): Promise<T> {
    return new Promise<T>((resolveAnswer, reject) => {
      let settled = false;
      this.listen((m) => {
        if (settled) return;
        if (m.type === 'error') { settled = true; reject(toError(m.error)); return; }
        const v = pick(m);
        if (v !== undefined) { settled = true; resolveAnswer(v); }
      });
      void this.handle.exited.then((e) => { if (!settled) { settled = true; reject(new StrataError('io', describeExit(e))); } });
      this.send(msg);
    });
  }
}

/** The paths named in a job description: the images it works on. */
export function specPaths(spec: JobSpecMessage): { sources: string[]; targets: string[] } {
  switch (spec.op) {
    case 'convert': case 'mirror': return { sources: [spec.source], targets: [spec.target] };
    case 'create': return { sources: [], targets: [spec.image] };
    default: return { sources: [spec.image], targets: [] };
  }
}

export class JobManager {
  private readonly history: JobRecord[] = [];
  private readonly queue: Queued[] = [];
  private readonly running = new Map<string, Running>();
  private readonly listeners = new Set<Listener>();
  private readonly historyFile: string;
  private seq = 0;
  private concurrency: number;
  private stopping = false;
  private spare: JobProcess | null = null;

  constructor(private readonly host: JobHost, private readonly opts: JobManagerOptions) {
    this.concurrency = opts.concurrency;
    this.historyFile = join(opts.dataDir, 'history.json');
    this.loadHistory();
    if (!opts.deferSpare) this.refillSpare();
  }

  /** A ready (or starting) job process: the spare, replaced at once by a new one. */
  private take(): JobProcess {
    const p = this.spare ?? new JobProcess(this.host.spawn());
    this.spare = null;
    this.refillSpare();
    return p;
  }

  /** Resolves once the spare job process is ready (an app that has been open a moment). */
  async warm(): Promise<void> {
    this.refillSpare();
    await this.spare?.ready;
  }

  private refillSpare(): void {
    if (this.stopping || this.opts.warmSpare === false || this.spare) return;
    const p = new JobProcess(this.host.spawn());
    this.spare = p;
    void p.handle.exited.then(() => { if (this.spare === p) this.spare = null; });
  }

  setConcurrency(n: number): void {
    this.concurrency = n;
    this.pump();
  }

  on(l: Listener): () => void {
    this.listeners.add(l);
    return () => this.listeners.delete(l);
  }

  /** Running and queued jobs first (oldest first), then the history (newest first). */
  list(): JobRecord[] {
    return [...[...this.running.values()].map((r) => r.record), ...this.queue.map((q) => q.record), ...this.history].map((r) => structuredClone(r));
  }

  clearHistory(): JobRecord[] {
    this.history.length = 0;
    this.saveHistory();
    return this.list();
  }

  /** The plan of a job, computed in a job process (it may read a lot of block status). */
  async plan(spec: JobSpecMessage): Promise<JobPlanMessage> {
    const p = this.take();
    try {
      return this.ownHolders(await p.ask({ type: 'plan', spec }, (m) => (m.type === 'plan' ? m.plan : undefined)));
    } finally {
      p.send({ type: 'exit' });
    }
  }

  /**
   * An image held by one of our own running jobs does not block a plan: the new job waits for
   * that one (the queue sees to it), and plans again before it writes.
   */
  private ownHolders(plan: JobPlanMessage): JobPlanMessage {
    const ours = new Map([...this.running.values()].filter((r) => r.record.pid).map((r) => [r.record.pid!, r.record]));
    const waitsFor = new Set<string>();
    const blocked = plan.blocked.filter((b) => {
      let job = b.holder ? ours.get(b.holder.pid) : undefined;
      // A holder the lock doctor could not name (QEMU's locks are OFD locks, which /proc/locks
      // lists without a PID; the process is found through its open files, and one that has just
      // opened the image can be missed) on an image one of our running jobs works on is that job.
      if (!job && !b.holder) job = this.runningOn(b.filename);
      if (job) waitsFor.add(job.title);
      return !job;
    });
    if (blocked.length === plan.blocked.length) return plan;
    return { ...plan, blocked, warnings: [...plan.warnings, ...[...waitsFor].map((t) => `it will wait for "${t}", which is running on the same images, and start when that ends`)] };
  }

  /** The record of a running job that reads or writes the image at `path`. */
  private runningOn(path: string): JobRecord | undefined {
    let real: string;
    try { real = realpathSync.native(path); } catch { real = resolve(path); }
    const named = resolve(path);
    for (const r of this.running.values()) if ([real, named].some((p) => r.writes.has(p) || r.reads.has(p))) return r.record;
    return undefined;
  }

  /** A heavy read (map summary, check without repair) in a job process. */
  read(task: ReadTask): Promise<unknown> {
    return this.take().ask({ type: 'read', task }, (m) => (m.type === 'read-result' ? m.result : undefined));
  }

  /**
   * Plans the job, refuses it when its plan is blocked (an image in use) or needs force that
   * was not given, and queues it. Returns its record.
   */
  async start(spec: JobSpecMessage, force = false): Promise<JobRecord> {
    if (this.stopping) throw new UsageError('Strata is shutting down: no new jobs');
    // The process that plans the job is the one that will run it (runJob plans again there,
    // warm, right before it writes: what it follows is what is true then).
    const proc = this.take();
    let plan: JobPlanMessage;
    try {
      plan = this.ownHolders(await proc.ask({ type: 'plan', spec }, (m) => (m.type === 'plan' ? m.plan : undefined)));
      // The same refusals as the job's own (runJob): in use, no space or permission, force.
      enforcePlan(plan, force);
    } catch (err) {
      proc.send({ type: 'exit' });
      throw err;
    }
    const { reads, writes } = this.touchSets(spec, plan);
    const record: JobRecord = {
      id: `job-${Date.now().toString(36)}-${(++this.seq).toString(36)}`,
      spec, title: plan.title, images: [...new Set([...writes, ...reads])].sort(),
      state: 'queued', waitingFor: null, queuedAt: Date.now(), startedAt: null, endedAt: null,
      progress: null, pid: null, bytesWritten: null, summary: null, error: null,
    };
    this.queue.push({ record, proc, force, reads, writes });
    this.changed(record);
    this.pump();
    return structuredClone(record);
  }

  cancel(id: string): JobRecord {
    const qi = this.queue.findIndex((q) => q.record.id === id);
    if (qi >= 0) {
      const [q] = this.queue.splice(qi, 1);
      q!.proc.send({ type: 'exit' });
      this.finish(q!.record, 'cancelled', null);
      this.pump();
      return structuredClone(q!.record);
    }
    const r = this.running.get(id);
    if (!r) {
      const h = this.history.find((x) => x.id === id);
      if (h) return structuredClone(h);
      throw new UsageError(`no job '${id}'`);
    }
    if (r.record.state === 'running') {
      r.record.state = 'cancelling';
      r.proc.send({ type: 'cancel' });
      // A job that does not reach its consistent state in time is ended by force; the engine's
      // crash-safe order then leaves its images consistent all the same.
      r.killTimer = setTimeout(() => r.proc.handle.kill(), CANCEL_GRACE_MS);
      r.killTimer.unref();
      this.changed(r.record);
    }
    return structuredClone(r.record);
  }

  /** Cancels everything and waits until every running job has reached its consistent state. */
  async shutdown(): Promise<void> {
    this.stopping = true;
    this.spare?.send({ type: 'exit' });
    for (const q of this.queue.splice(0)) { q.proc.send({ type: 'exit' }); this.finish(q.record, 'cancelled', null); }
    const waits = [...this.running.values()].map((r) => {
      this.cancel(r.record.id);
      return r.proc.handle.exited;
    });
    await Promise.all(waits);
  }

  /** What a job reads (the chains under its sources) and writes (targets, and what its plan writes). */
  private touchSets(spec: JobSpecMessage, plan: JobPlanMessage): { reads: Set<string>; writes: Set<string> } {
    const chain = this.opts.chainOf ?? ((p: string) => [resolve(p)]);
    const { sources, targets } = specPaths(spec);
    const reads = new Set<string>();
    for (const s of sources) for (const p of chain(s)) reads.add(p);
    const writes = new Set<string>([...plan.writes, ...plan.creates, ...plan.removes, ...plan.renames.flatMap((r) => [r.from, r.to]), ...targets].map((p) => chain(p)[0] ?? resolve(p)));
    return { reads, writes };
  }

  private conflict(q: Queued): Running | undefined {
    for (const r of this.running.values()) {
      const hits = (a: Set<string>, b: Set<string>) => [...a].some((x) => b.has(x));
      if (hits(q.writes, r.writes) || hits(q.writes, r.reads) || hits(r.writes, q.reads)) return r;
    }
    return undefined;
  }

  /** Starts what may start; tells the others what they wait for. */
  private pump(): void {
    if (this.stopping) return;
    for (const q of [...this.queue]) {
      const blocker = this.conflict(q);
      let waiting: string | null = null;
      if (blocker) waiting = `waits for "${blocker.record.title}", which works on the same chain`;
      else if (this.running.size >= this.concurrency) waiting = `waits for a free slot (${this.running.size} job${this.running.size > 1 ? 's' : ''} running, at most ${this.concurrency})`;
      if (waiting) {
        if (q.record.waitingFor !== waiting) { q.record.waitingFor = waiting; this.changed(q.record); }
        continue;
      }
      this.queue.splice(this.queue.indexOf(q), 1);
      this.launch(q);
    }
  }

  private launch(q: Queued): void {
    const record = q.record;
    record.state = 'running';
    record.waitingFor = null;
    record.startedAt = Date.now();
    const proc = q.proc;
    record.pid = proc.handle.pid ?? null;
    const r: Running = { record, proc, reads: q.reads, writes: q.writes, lastProgressAt: 0, pendingProgress: null, progressTimer: null, killTimer: null };
    this.running.set(record.id, r);
    this.saveHistory();
    this.changed(record);
    let outcome: { state: 'succeeded' | 'failed' | 'cancelled'; error: ErrorInfo | null; summary: string | null; bytes: number | null } | null = null;
    proc.listen((m) => {
      switch (m.type) {
        case 'progress': this.progress(r, m.progress); return;
        case 'log': this.opts.log?.(`${record.id}: ${m.line}`); return;
        case 'result': outcome = { state: 'succeeded', error: null, summary: m.result.summary, bytes: m.result.bytesWritten }; return;
        case 'error': outcome = { state: m.error.kind === 'cancelled' ? 'cancelled' : 'failed', error: m.error.kind === 'cancelled' ? null : m.error, summary: null, bytes: null }; return;
        case 'ready': case 'plan': case 'read-result': return;
        default: { const never: never = m; return never; }
      }
    });
    proc.send({ type: 'run', id: record.id, spec: record.spec, force: q.force });
    void proc.handle.exited.then((exit) => {
      this.running.delete(record.id);
      if (r.progressTimer) clearTimeout(r.progressTimer);
      if (r.killTimer) clearTimeout(r.killTimer);
      const o = outcome ?? { state: 'failed' as const, error: { kind: 'crash', message: describeExit(exit) }, summary: null, bytes: null };
      if (r.pendingProgress) record.progress = r.pendingProgress;
      record.bytesWritten = o.bytes;
      record.summary = o.summary;
      this.finish(record, o.state, o.error);
      this.opts.touched?.([...r.writes, ...r.reads]);
      this.pump();
    });
  }

  /** Progress reaches listeners at most every PROGRESS_INTERVAL_MS; the latest one always does. */
  private progress(r: Running, p: ProgressMessage): void {
    r.record.progress = p;
    const now = Date.now();
    const send = () => {
      r.lastProgressAt = Date.now();
      r.pendingProgress = null;
      r.progressTimer = null;
      for (const l of this.listeners) l.progress?.(r.record.id, r.record.progress!);
    };
    if (now - r.lastProgressAt >= PROGRESS_INTERVAL_MS) { send(); return; }
    r.pendingProgress = p;
    r.progressTimer ??= setTimeout(send, PROGRESS_INTERVAL_MS - (now - r.lastProgressAt));
  }

  private finish(record: JobRecord, state: 'succeeded' | 'failed' | 'cancelled', error: ErrorInfo | null): void {
    record.state = state;
    record.pid = null;
    record.error = error;
    record.waitingFor = null;
    record.endedAt = Date.now();
    this.history.unshift(record);
    if (this.history.length > HISTORY_LIMIT) this.history.length = HISTORY_LIMIT;
    this.saveHistory();
    this.changed(record);
  }

  private changed(record: JobRecord): void {
    const copy = structuredClone(record);
    for (const l of this.listeners) l.job?.(copy);
  }

  private loadHistory(): void {
    if (!existsSync(this.historyFile)) return;
    try {
      const parsed = z.array(JobRecordSchema).safeParse(JSON.parse(readFileSync(this.historyFile, 'utf8')));
      if (!parsed.success) throw new Error('not a job history');
      for (const r of parsed.data.slice(0, HISTORY_LIMIT)) {
        // A job saved as running belonged to an app that stopped without finishing it.
        r.pid = null;
        if (r.state === 'running' || r.state === 'queued' || r.state === 'cancelling') {
          r.state = 'failed';
          r.error = { kind: 'interrupted', message: 'Strata stopped while this job was running; its images are consistent (crash-safe order), run it again to finish' };
          r.endedAt ??= Date.now();
        }
        this.history.push(r);
      }
    } catch (err) {
      this.opts.log?.(`${this.historyFile}: ${(err as Error).message}; starting a new history`);
      try { renameSync(this.historyFile, `${this.historyFile}.broken-${Date.now()}`); } catch { /* keep going */ }
    }
  }

  /** Running jobs are saved too: after a crash of the app they show up as interrupted. */
  private saveHistory(): void {
    try {
      const live = [...this.running.values()].map((r) => r.record);
      writeFileAtomic(this.historyFile, JSON.stringify([...live, ...this.history], null, 1) + '\n');
    } catch (err) {
      this.opts.log?.(`cannot save the job history to ${this.historyFile}: ${(err as Error).message}`);
    }
  }
}
