// Starts and drives test/support/faultfs.py: a FUSE pass-through of a folder that fails a chosen
// write (EIO or ENOSPC, once or from then on), so the failure tests can run strata over the
// real file stack (NodeFile, the addon's writer thread, the kernel) rather than a test double.
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync, mkdirSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const SCRIPT = join(dirname(fileURLToPath(import.meta.url)), 'faultfs.py');
/** Debian's python (the one python3-fusepy installs for), else whatever python3 is first. */
const PYTHON = existsSync('/usr/bin/python3') ? '/usr/bin/python3' : 'python3';

/** Why the FUSE tests cannot run here, or null when they can. */
export function faultFsUnavailable(): string | null {
  if (process.platform !== 'linux') return 'FUSE tests need Linux';
  if (!existsSync('/dev/fuse')) return '/dev/fuse is missing';
  const r = spawnSync(PYTHON, ['-c', 'import fusepy'], { encoding: 'utf8' });
  if (r.status !== 0) return `${PYTHON} cannot import fusepy (install python3-fusepy): ${r.stderr.trim().split('\n').pop()}`;
  return null;
}

export interface FaultFs {
  /** Where the files really are (read them here to check them without going through FUSE). */
  root: string;
  /** The mount: strata works on files here. */
  mnt: string;
  /** Fails the Nth write from now: once, or it and everything after. */
  arm(n: number, mode: 'once' | 'sticky', code: 'EIO' | 'ENOSPC'): void;
  /** Fails nothing, counts anew. */
  count(): void;
  /** Writes and fsyncs seen since the last arm/count, and how many were failed. */
  stats(): { writes: number; fsyncs: number; failed: number };
  stop(): Promise<void>;
}

export async function startFaultFs(): Promise<FaultFs> {
  const base = mkdtempSync(join(tmpdir(), 'strata-faultfs-'));
  const root = join(base, 'root');
  const mnt = join(base, 'mnt');
  mkdirSync(root);
  mkdirSync(mnt);
  const child: ChildProcess = spawn(PYTHON, [SCRIPT, root, mnt], { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  child.stderr!.on('data', (d: Buffer) => { stderr += d.toString(); });
  const control = join(mnt, '.faultfs');
  const t0 = Date.now();
  while (!existsSync(control)) {
    if (child.exitCode !== null || Date.now() - t0 > 15_000) {
      child.kill('SIGKILL');
      rmSync(base, { recursive: true, force: true });
      throw new Error(`faultfs did not mount (exit ${child.exitCode}): ${stderr}`);
    }
    await new Promise((r) => setTimeout(r, 20));
  }
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  return {
    root,
    mnt,
    arm: (n, mode, code) => writeFileSync(control, `arm ${n} ${mode} ${code}\n`),
    count: () => writeFileSync(control, 'count\n'),
    stats: () => {
      const m = /writes=(\d+) fsyncs=(\d+) failed=(\d+)/.exec(readFileSync(control, 'utf8'));
      if (!m) throw new Error('faultfs: unreadable control file');
      return { writes: Number(m[1]), fsyncs: Number(m[2]), failed: Number(m[3]) };
    },
    stop: async () => {
      if (spawnSync('fusermount', ['-u', mnt]).status !== 0) spawnSync('umount', ['-l', mnt]);
      const timer = setTimeout(() => child.kill('SIGKILL'), 5000);
      await exited;
      clearTimeout(timer);
      rmSync(base, { recursive: true, force: true });
    },
  };
}
