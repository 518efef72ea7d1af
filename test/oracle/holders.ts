// QEMU processes that hold an image open (and so hold its locks), and what /proc says about
// the locks a process holds: shared by the lock and in-use tests.
import { spawn, type ChildProcess } from 'node:child_process';
import { readdirSync, readFileSync, readlinkSync, statSync } from 'node:fs';
import { parseLockLines } from '../../core/io/lock-doctor';

/** The fds of process `pid` open on `file` (same inode and device). */
export function fdsOn(pid: number, file: string): string[] {
  const st = statSync(file);
  const out: string[] = [];
  let fds: string[] = [];
  try { fds = readdirSync(`/proc/${pid}/fd`); } catch { return out; }
  for (const fd of fds) {
    try {
      if (!readlinkSync(`/proc/${pid}/fd/${fd}`).startsWith('/')) continue;
      const s = statSync(`/proc/${pid}/fd/${fd}`);
      if (s.ino === st.ino && s.dev === st.dev) out.push(fd);
    } catch { /* gone */ }
  }
  return out;
}

/** Lock bytes (<= 300) process `pid` holds on `file`, from /proc/PID/fdinfo. */
export function lockBytes(pid: number, file: string): number[] {
  const bytes = new Set<number>();
  for (const fd of fdsOn(pid, file)) {
    let info = '';
    try { info = readFileSync(`/proc/${pid}/fdinfo/${fd}`, 'utf8'); } catch { continue; }
    for (const l of parseLockLines(info)) for (let b = l.start; b <= Math.min(l.end, 300); b++) bytes.add(b);
  }
  return [...bytes].sort((a, b) => a - b);
}

export async function poll<T>(fn: () => T | null | undefined | false, timeoutMs: number, what: string): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = fn();
    if (v !== null && v !== undefined && v !== false) return v;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

export interface Holder { pid: number; program: string; stop: () => Promise<void> }

/**
 * Starts a QEMU process that keeps `img` open: `qemu-io [-r] IMG` with its stdin left open, or
 * `qemu-nbd [-r] -f qcow2 -t -k SOCK IMG`. Resolves once its locks on `img` are visible in /proc.
 */
export async function startHolder(kind: 'qemu-io' | 'qemu-nbd', img: string, sock: string, opts: { readOnly?: boolean } = {}): Promise<Holder> {
  const ro = opts.readOnly ? ['-r'] : [];
  const args = kind === 'qemu-nbd' ? [...ro, '-f', 'qcow2', '-t', '-k', sock, img] : [...ro, img];
  const child: ChildProcess = spawn(kind, args, { stdio: ['pipe', 'pipe', 'pipe'] });
  let stderr = '';
  child.stdout!.resume();
  child.stderr!.on('data', (d: Buffer) => { stderr += d.toString(); });
  const pid = child.pid!;
  const stop = () => new Promise<void>((resolve) => {
    if (child.exitCode !== null || child.signalCode !== null) return resolve();
    const timer = setTimeout(() => child.kill('SIGKILL'), 10_000);
    child.once('exit', () => { clearTimeout(timer); resolve(); });
    if (kind === 'qemu-io') child.stdin!.end(); else child.kill('SIGTERM');
  });
  try {
    await poll(() => {
      if (child.exitCode !== null) throw new Error(`${kind} exited early (${child.exitCode}): ${stderr}`);
      return lockBytes(pid, img).includes(100);
    }, 15_000, `${kind} to lock ${img}`);
  } catch (err) {
    await stop();
    throw err;
  }
  return { pid, program: kind, stop };
}
