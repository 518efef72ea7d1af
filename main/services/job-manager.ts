// The job manager: a queue with a global concurrency limit, at most one writing job per chain
// (a job that touches what a running job writes, or writes what it reads, waits and says on
// what), every job planned first and refused when its plan is blocked, cancel, progress
// throttled to what a screen needs, and a history persisted across restarts. A job whose
// process dies is marked failed with the reason; the manager keeps serving.
import { existsSync, readFileSync, renameSync } from 'node:fs';
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
}

interface Running {
  record: JobRecord;
  handle: JobHandle;
  reads: Set<string>;
  writes: Set<string>;
  lastProgressAt: number;
  pendingProgress: ProgressMessage | null;
  progressTimer: NodeJS.Timeout | null;
  killTimer: NodeJS.Timeout | null;
}

interface Queued {
  record: JobRecord;
  force: boolean;
  reads: Set<string>;
  writes: Set<string>;
}

type Listener = { job?: (r: JobRecord) => void; progress?: (id: string, p: ProgressMessage) => void };

/** An error from a job process, as a typed error again. */
function toError(e: ErrorInfo): Error {
  return new StrataError(e.kind as StrataError['kind'], e.message);
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

  constructor(private readonly host: JobHost, private readonly opts: JobManagerOptions) {
    this.concurrency = opts.concurrency;
    this.historyFile = join(opts.dataDir, 'history.json');
    this.loadHistory();
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
  plan(spec: JobSpecMessage): Promise<JobPlanMessage> {
    return this.ask({ type: 'plan', spec }, (m) => (m.type === 'plan' ? m.plan : undefined));
  }

  /** A heavy read (map summary, check without repair) in a job process. */
  read(task: ReadTask): Promise<unknown> {
    return this.ask({ type: 'read', task }, (m) => (m.type === 'read-result' ? m.result : undefined));
  }

  /** Runs one request in a fresh job process and returns its one answer. */
  private ask<T>(msg: ToJob, pick: (m: FromJob) => T | undefined): Promise<T> {
    const handle = this.host.spawn();
    return new Promise<T>((resolveAnswer, reject) => {
      let settled = false;
      handle.onMessage((m) => {
        if (settled) return;
        if (m.type === 'ready') { handle.send(msg); return; }
        if (m.type === 'error') { settled = true; reject(toError(m.error)); return; }
        const v = pick(m);
        if (v !== undefined) { settled = true; resolveAnswer(v); }
      });
      void handle.exited.then((e) => {
        if (!settled) { settled = true; reject(new StrataError('io', describeExit(e))); }
      });
    });
  }

  /**
   * Plans the job, refuses it when its plan is blocked (an image in use) or needs force that
   * was not given, and queues it. Returns its record.
   */
  async start(spec: JobSpecMessage, force = false): Promise<JobRecord> {
    if (this.stopping) throw new UsageError('Strata is shutting down: no new jobs');
    const plan = await this.plan(spec);
    // The same refusals as the job's own (runJob): in use, no space or permission, force. An
    // image one of our own running jobs holds is not in use by someone else: the queue orders
    // the two jobs, and this one's plan is made again when it runs.
    const ours = new Set([...this.running.values()].map((r) => r.handle.pid));
    enforcePlan({ ...plan, blocked: plan.blocked.filter((b) => !(b.holder && ours.has(b.holder.pid))) }, force);
    const { reads, writes } = this.touchSets(spec, plan);
    const record: JobRecord = {
      id: `job-${Date.now().toString(36)}-${(++this.seq).toString(36)}`,
      spec, title: plan.title, images: [...new Set([...writes, ...reads])].sort(),
      state: 'queued', waitingFor: null, queuedAt: Date.now(), startedAt: null, endedAt: null,
      progress: null, bytesWritten: null, summary: null, error: null,
    };
    this.queue.push({ record, force, reads, writes });
    this.changed(record);
    this.pump();
    return structuredClone(record);
  }

  cancel(id: string): JobRecord {
    const qi = this.queue.findIndex((q) => q.record.id === id);
    if (qi >= 0) {
      const [q] = this.queue.splice(qi, 1);
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
      r.handle.send({ type: 'cancel' });
      // A job that does not reach its consistent state in time is ended by force; the engine's
      // crash-safe order then leaves its images consistent all the same.
      r.killTimer = setTimeout(() => r.handle.kill(), CANCEL_GRACE_MS);
      r.killTimer.unref();
      this.changed(r.record);
    }
    return structuredClone(r.record);
  }

  /** Cancels everything and waits until every running job has reached its consistent state. */
  async shutdown(): Promise<void> {
    this.stopping = true;
    for (const q of this.queue.splice(0)) this.finish(q.record, 'cancelled', null);
    const waits = [...this.running.values()].map((r) => {
      this.cancel(r.record.id);
      return r.handle.exited;
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
    const handle = this.host.spawn();
    const r: Running = { record, handle, reads: q.reads, writes: q.writes, lastProgressAt: 0, pendingProgress: null, progressTimer: null, killTimer: null };
    this.running.set(record.id, r);
    this.saveHistory();
    this.changed(record);
    let outcome: { state: 'succeeded' | 'failed' | 'cancelled'; error: ErrorInfo | null; summary: string | null; bytes: number | null } | null = null;
    handle.onMessage((m) => {
      switch (m.type) {
        case 'ready': handle.send({ type: 'run', id: record.id, spec: record.spec, force: q.force }); return;
        case 'progress': this.progress(r, m.progress); return;
        case 'log': this.opts.log?.(`${record.id}: ${m.line}`); return;
        case 'result': outcome = { state: 'succeeded', error: null, summary: m.result.summary, bytes: m.result.bytesWritten }; return;
        case 'error': outcome = { state: m.error.kind === 'cancelled' ? 'cancelled' : 'failed', error: m.error.kind === 'cancelled' ? null : m.error, summary: null, bytes: null }; return;
        case 'plan': case 'read-result': return;
        default: { const never: never = m; return never; }
      }
    });
    void handle.exited.then((exit) => {
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
