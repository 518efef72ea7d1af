// The job contract: a job is an async function (ctx, ...args). The same function runs in the
// CLI, in a job process and in tests; progress events are throttled at the source.
import { CancelledError } from '../errors';

export interface Progress {
  phase: string;
  bytesDone: number;
  bytesTotal: number;
  /** Milliseconds since the job started, so consumers can compute throughput and ETA. */
  elapsedMs: number;
}

export interface JobContext {
  signal?: AbortSignal;
  progress?: (p: Progress) => void;
  log?: (line: string) => void;
}

export function throwIfCancelled(ctx: JobContext): void {
  if (ctx.signal?.aborted) throw new CancelledError();
}

/** Emits progress at most every `intervalMs` (always the first and the final event). */
export class ProgressReporter {
  private readonly started = Date.now();
  private last = 0;
  private phase = '';
  bytesDone = 0;

  constructor(private readonly ctx: JobContext, public bytesTotal: number, private readonly intervalMs = 100) {}

  setPhase(phase: string, bytesTotal?: number): void {
    this.phase = phase;
    if (bytesTotal !== undefined) { this.bytesTotal = bytesTotal; this.bytesDone = 0; }
    this.emit(true);
  }

  add(bytes: number): void {
    this.bytesDone += bytes;
    this.emit(false);
  }

  done(): void {
    this.bytesDone = this.bytesTotal;
    this.emit(true);
  }

  private emit(force: boolean): void {
    if (!this.ctx.progress) return;
    const now = Date.now();
    if (!force && now - this.last < this.intervalMs) return;
    this.last = now;
    this.ctx.progress({ phase: this.phase, bytesDone: this.bytesDone, bytesTotal: this.bytesTotal, elapsedMs: now - this.started });
  }
}
