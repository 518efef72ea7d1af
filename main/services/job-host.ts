// Job processes: one job per process, so a crash or a long CPU burst in a job never freezes
// the window or the server. Two hosts implement this: child_process.fork (browser mode, the
// CLI, tests) here, and Electron's utilityProcess in main/electron/.
import { fork, type ChildProcess } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { FromJobSchema, type FromJob, type ToJob } from '../../core/protocol/job-process';
import { describeIssues } from '../../core/protocol/rpc';

export interface JobExit {
  code: number | null;
  signal: string | null;
}

export interface JobHandle {
  readonly pid: number | undefined;
  send(msg: ToJob): void;
  /** Validated messages from the job process (an invalid one is reported as an error message). */
  onMessage(fn: (m: FromJob) => void): void;
  /** Settles once the process has exited. */
  readonly exited: Promise<JobExit>;
  /** Ends the process at once (SIGKILL): for a job that no longer answers. */
  kill(): void;
}

export interface JobHost {
  spawn(): JobHandle;
}

/** What a job process's exit means for a person, when it ended without a result. */
export function describeExit(e: JobExit): string {
  if (e.signal === 'SIGKILL') return 'the job process was killed (SIGKILL), possibly by the system running out of memory';
  if (e.signal) return `the job process was stopped by ${e.signal}`;
  // V8 aborts with 134 (SIGABRT) when the heap is exhausted.
  if (e.code === 134) return 'the job process ran out of memory';
  return `the job process exited with code ${e.code} without a result`;
}

/**
 * Checks a message from a job process. Anything malformed becomes an error message, so a
 * broken or hostile job process can only fail its own job.
 */
export function parseFromJob(raw: unknown): FromJob {
  const r = FromJobSchema.safeParse(raw);
  if (r.success) return r.data;
  return { type: 'error', error: { kind: 'protocol', message: `malformed message from the job process: ${describeIssues(r.error)}` } };
}

/**
 * How bin/strata.cjs starts node (the flags on its `exec node ... "$0"` line): job processes
 * start the same way, so the V8 code cache made for those flags is used and the copy loops
 * run with the tier-up budget they were measured with.
 */
export function launcherFlags(launcher: string): string[] {
  const m = /^":" \/\/;.*exec node (.*?)"\$0" "\$@"$/m.exec(readFileSync(launcher, 'utf8'));
  return m ? m[1]!.trim().split(/\s+/).filter(Boolean) : [];
}

/** Jobs in `node <entry> __job-process`: the strata command (its launcher), with an IPC channel. */
export class ForkJobHost implements JobHost {
  private readonly execArgv: string[];
  constructor(private readonly entry: string, execArgv?: string[]) {
    this.execArgv = execArgv ?? (entry.endsWith(join('bin', 'strata.cjs')) ? launcherFlags(entry) : []);
  }

  spawn(): JobHandle {
    const child: ChildProcess = fork(this.entry, ['__job-process'], {
      stdio: ['ignore', 'ignore', 'pipe', 'ipc'],
      serialization: 'json',
      execArgv: this.execArgv,
      // As the launcher does: Strata makes no TLS connections, and node would parse that file.
      env: { ...process.env, NODE_EXTRA_CA_CERTS: undefined, STRATA_JOB_PROCESS: '1' },
    });
    let stderr = '';
    child.stderr?.on('data', (d: Buffer) => { if (stderr.length < 8192) stderr += d.toString(); });
    const exited = new Promise<JobExit>((resolve) => {
      child.once('exit', (code, signal) => resolve({ code, signal }));
      child.once('error', () => resolve({ code: child.exitCode ?? -1, signal: null }));
    });
    return {
      pid: child.pid,
      send: (msg) => { if (child.connected) child.send(msg); },
      onMessage: (fn) => { child.on('message', (m) => fn(parseFromJob(m))); },
      exited,
      kill: () => { child.kill('SIGKILL'); },
    };
  }
}
