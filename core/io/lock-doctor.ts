// Who holds an image: scans /proc for open file descriptions of the same inode that carry
// locks (fdinfo "lock:" lines) and names the process, its program and the VM it runs.
import { readdir, readFile, readlink, stat } from './fs-async';

export interface LockHolder {
  pid: number;
  program: string;
  /** From QEMU's `-name guest=NAME` / `-name NAME`, when present. */
  vmName: string | null;
  /** Lock bytes it holds on the image (QEMU's 100+i "uses", 200+i "does not share"). */
  bytes: number[];
}

/**
 * The VM name from QEMU's `-name` option: `guest=NAME,...`, or a first item without `=`
 * (QEMU's implied key), with QEMU's ",," escape for a literal comma.
 */
export function vmNameFromArgs(args: string[]): string | null {
  const i = args.findIndex((a) => a === '-name' || a === '--name');
  if (i < 0 || i + 1 >= args.length) return null;
  // Split on single commas; ",," stands for a comma inside a value.
  const items = args[i + 1]!.replace(/,,/g, '\0').split(',').map((x) => x.replace(/\0/g, ','));
  for (const [k, item] of items.entries()) {
    if (item.startsWith('guest=')) return item.slice(6) || null;
    if (k === 0 && !item.includes('=')) return item || null;
  }
  return null;
}

/** Parses the lock lines of /proc/PID/fdinfo/FD (or /proc/locks) into byte ranges. */
export function parseLockLines(text: string): { kind: string; type: string; pid: number; dev: string; ino: number; start: number; end: number }[] {
  const out = [];
  for (const line of text.split('\n')) {
    const m = /(?:lock:\s*)?\d+:\s+(\S+)\s+\S+\s+(READ|WRITE)\s+(-?\d+)\s+([0-9a-f]+):([0-9a-f]+):(\d+)\s+(\d+)\s+(\d+|EOF)/i.exec(line);
    if (!m) continue;
    out.push({ kind: m[1]!, type: m[2]!, pid: Number(m[3]), dev: `${m[4]}:${m[5]}`, ino: Number(m[6]), start: Number(m[7]), end: m[8] === 'EOF' ? Number.MAX_SAFE_INTEGER : Number(m[8]) });
  }
  return out;
}

/** Processes (other than `exceptPid`) holding locks on the file at `path`. Linux only; [] elsewhere. */
export async function findLockHolders(path: string, exceptPid = process.pid): Promise<LockHolder[]> {
  let target: { dev: number; ino: number };
  try {
    const st = await stat(path);
    target = { dev: st.dev, ino: st.ino };
  } catch {
    return [];
  }
  let pids: string[];
  try { pids = (await readdir('/proc')).filter((d) => /^\d+$/.test(d)); } catch { return []; }
  const holders: LockHolder[] = [];
  await Promise.all(pids.map(async (p) => {
    const pid = Number(p);
    if (pid === exceptPid) return;
    let fds: string[];
    try { fds = await readdir(`/proc/${p}/fd`); } catch { return; }
    const bytes = new Set<number>();
    for (const fd of fds) {
      try {
        const link = await readlink(`/proc/${p}/fd/${fd}`);
        if (!link.startsWith('/')) continue;
        const st = await stat(`/proc/${p}/fd/${fd}`);
        if (st.ino !== target.ino || st.dev !== target.dev) continue;
        const info = await readFile(`/proc/${p}/fdinfo/${fd}`, 'utf8');
        for (const l of parseLockLines(info)) for (let b = l.start; b <= Math.min(l.end, 300); b++) bytes.add(b);
      } catch { /* the process or fd went away */ }
    }
    if (!bytes.size) return;
    let args: string[] = [];
    try { args = (await readFile(`/proc/${p}/cmdline`, 'utf8')).split('\0').filter(Boolean); } catch { /* gone */ }
    let program = args[0]?.split('/').pop() ?? '';
    if (!program) { try { program = (await readFile(`/proc/${p}/comm`, 'utf8')).trim(); } catch { program = '?'; } }
    holders.push({ pid, program, vmName: vmNameFromArgs(args), bytes: [...bytes].sort((a, b) => a - b) });
  }));
  return holders.sort((a, b) => a.pid - b.pid);
}

export function describeHolders(holders: LockHolder[]): string {
  if (!holders.length) return 'another process (not found in /proc) holds it';
  return holders.map((h) => `PID ${h.pid} (${h.program}${h.vmName ? `, VM '${h.vmName}'` : ''})`).join(', ') + (holders.length > 1 ? ' hold it' : ' holds it');
}
