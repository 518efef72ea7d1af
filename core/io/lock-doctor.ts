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

/**
 * The key /proc/locks names a file by: device major and minor (hex, as the kernel prints
 * them) and inode. `dev` is st_dev as glibc encodes it (gnu_dev_makedev).
 */
export function fileKey(dev: number, ino: number): string {
  const lo = dev % 0x1_0000_0000;
  const hi = Math.floor(dev / 0x1_0000_0000);
  const major = ((lo >>> 8) & 0xfff) | ((hi & 0xfffff000) >>> 0);
  const minor = (lo & 0xff) | ((lo >>> 12) & 0xfffff00);
  return `${major.toString(16)}:${minor.toString(16)}:${ino}`;
}

function keyOfLockLine(l: { dev: string; ino: number }): string {
  const [maj, min] = l.dev.split(':');
  return `${parseInt(maj!, 16).toString(16)}:${parseInt(min!, 16).toString(16)}:${l.ino}`;
}

/**
 * Every file with QEMU-style lock bytes (100-103, 200-203) held, by fileKey, from one read of
 * /proc/locks; null where that cannot be read (not Linux). Cheap enough to ask for a whole
 * folder of images at once.
 */
export async function qemuLockedFiles(): Promise<Map<string, number[]> | null> {
  let text: string;
  try { text = await readFile('/proc/locks', 'utf8'); } catch { return null; }
  const out = new Map<string, Set<number>>();
  for (const l of parseLockLines(text)) {
    if (l.kind !== 'OFDLCK' && l.kind !== 'POSIX') continue;
    for (let b = Math.max(100, l.start); b <= Math.min(l.end, 203); b++) {
      if (b > 103 && b < 200) continue;
      const k = keyOfLockLine(l);
      let set = out.get(k);
      if (!set) out.set(k, (set = new Set()));
      set.add(b);
    }
  }
  return new Map([...out].map(([k, v]) => [k, [...v].sort((a, b) => a - b)]));
}

/**
 * Processes (other than `exceptPid`) holding locks on the files with the given fileKeys, in
 * one walk over /proc. Linux only; an empty map elsewhere.
 */
export async function findHoldersOf(keys: Set<string>, exceptPid = process.pid): Promise<Map<string, LockHolder[]>> {
  const result = new Map<string, LockHolder[]>();
  if (!keys.size) return result;
  let pids: string[];
  try { pids = (await readdir('/proc')).filter((d) => /^\d+$/.test(d)); } catch { return result; }
  await Promise.all(pids.map(async (p) => {
    const pid = Number(p);
    if (pid === exceptPid) return;
    let fds: string[];
    try { fds = await readdir(`/proc/${p}/fd`); } catch { return; }
    const bytes = new Map<string, Set<number>>();
    for (const fd of fds) {
      try {
        const link = await readlink(`/proc/${p}/fd/${fd}`);
        if (!link.startsWith('/')) continue;
        const st = await stat(`/proc/${p}/fd/${fd}`);
        const key = fileKey(st.dev, st.ino);
        if (!keys.has(key)) continue;
        const info = await readFile(`/proc/${p}/fdinfo/${fd}`, 'utf8');
        let set = bytes.get(key);
        for (const l of parseLockLines(info)) {
          for (let b = l.start; b <= Math.min(l.end, 300); b++) {
            if (!set) bytes.set(key, (set = new Set()));
            set.add(b);
          }
        }
      } catch { /* the process or fd went away */ }
    }
    if (!bytes.size) return;
    let args: string[] = [];
    try { args = (await readFile(`/proc/${p}/cmdline`, 'utf8')).split('\0').filter(Boolean); } catch { /* gone */ }
    let program = programName(args);
    if (!program) { try { program = (await readFile(`/proc/${p}/comm`, 'utf8')).trim(); } catch { program = '?'; } }
    const vmName = vmNameFromArgs(args);
    for (const [key, set] of bytes) {
      let list = result.get(key);
      if (!list) result.set(key, (list = []));
      list.push({ pid, program, vmName, bytes: [...set].sort((a, b) => a - b) });
    }
  }));
  for (const list of result.values()) list.sort((a, b) => a.pid - b.pid);
  return result;
}

/** A process's program for people: node running Strata is Strata (a command or one of the app's jobs). */
export function programName(args: string[]): string {
  const first = args[0]?.split('/').pop() ?? '';
  if (/^node(js)?$/.test(first) || first === 'electron') {
    if (args.includes('__job-process') || args.some((a) => a.includes('job-process.cjs'))) return 'Strata job';
    if (args.some((a) => /(?:^|\/)strata(?:\.cjs)?$/.test(a))) return 'strata';
  }
  return first;
}

/** Processes (other than `exceptPid`) holding locks on the file at `path`. Linux only; [] elsewhere. */
export async function findLockHolders(path: string, exceptPid = process.pid): Promise<LockHolder[]> {
  let key: string;
  try {
    const st = await stat(path);
    key = fileKey(st.dev, st.ino);
  } catch {
    return [];
  }
  return (await findHoldersOf(new Set([key]), exceptPid)).get(key) ?? [];
}

export function describeHolders(holders: LockHolder[]): string {
  if (!holders.length) return 'another process (not found in /proc) holds it';
  return holders.map((h) => `PID ${h.pid} (${h.program}${h.vmName ? `, VM '${h.vmName}'` : ''})`).join(', ') + (holders.length > 1 ? ' hold it' : ' holds it');
}
