// QEMU-compatible image locks (QEMU's image locking scheme): one-byte shared OFD locks at
// 100+i ("I use permission i") and 200+i ("I do not share permission i"), with a conflict test
// on the other side's bytes. Without the native addon no lock can be held: reads go ahead
// after a look at /proc/locks (Linux) for a conflicting holder; writes are refused, since a VM
// starting meanwhile would not see us, unless the user insists (--force-unlocked).
import { readFile, stat } from './fs-async';
import { InUseError, StrataError } from '../errors';
import { native, nativeStatus } from './native';
import { describeHolders, findLockHolders, parseLockLines } from './lock-doctor';

export const PERM_CONSISTENT_READ = 0;
export const PERM_WRITE = 1;
export const PERM_WRITE_UNCHANGED = 2;
export const PERM_RESIZE = 3;
const PERM_NAMES = ['consistent read', 'write', 'write unchanged', 'resize'];
const ALL_PERMS = [0, 1, 2, 3];
const LOCK_BASE_USE = 100;
const LOCK_BASE_SHARE = 200;

export interface LockMode {
  /** Permissions we use. */
  perms: number[];
  /** Permissions we allow others to use. */
  shared: number[];
}

/** What QEMU takes for readers that need consistent data and for backing files: 100, 201, 203. */
export const READ_LOCK: LockMode = { perms: [PERM_CONSISTENT_READ], shared: [PERM_CONSISTENT_READ, PERM_WRITE_UNCHANGED] };
/** What qemu-img takes for writers (commit, rebase, resize, snapshot, check -r). */
export const WRITE_LOCK: LockMode = { perms: [PERM_CONSISTENT_READ, PERM_WRITE, PERM_RESIZE], shared: [PERM_CONSISTENT_READ, PERM_WRITE_UNCHANGED] };
/**
 * What QEMU takes on a qcow2 image's external data file (the qcow2 driver's permissions for its
 * data child): the same permissions as on the image, but only resizing is not shared, writes
 * are (100, 203 read-only; 100, 101, 103, 203 writable). A writer that holds the data file
 * still refuses our writes; the image file's own locks keep out everything else.
 */
export const DATA_FILE_READ_LOCK: LockMode = { perms: [PERM_CONSISTENT_READ], shared: [PERM_CONSISTENT_READ, PERM_WRITE, PERM_WRITE_UNCHANGED] };
export const DATA_FILE_WRITE_LOCK: LockMode = { perms: [PERM_CONSISTENT_READ, PERM_WRITE, PERM_RESIZE], shared: [PERM_CONSISTENT_READ, PERM_WRITE, PERM_WRITE_UNCHANGED] };

export interface ImageLock {
  readonly mode: LockMode;
  /** False when the addon is missing and the lock is only a check done at open time. */
  readonly held: boolean;
  release(): void;
}

let unlockedWrites = false;

/**
 * --force-unlocked: let writing go ahead where the locks cannot be held (no native addon).
 * Unsafe: a VM started on the image meanwhile would write it too.
 */
export function allowUnlockedWrites(on: boolean): void { unlockedWrites = on; }

/** Why writing needs the addon, and how to get it (one line, after the file name). */
export function unlockedWriteRefusal(): string {
  const why = nativeStatus().reason ?? 'it is not loaded';
  return `cannot hold QEMU's image locks: the native addon is not available (${why}), so a VM started on the image meanwhile would not be kept out. Build it with \`npm rebuild\` (node-gyp needs python3, make and g++), or pass --force-unlocked to write without locks (unsafe)`;
}

/**
 * Takes `mode` on the open file `fd` of `path`, or throws InUseError naming who holds a
 * conflicting lock. Without the addon: checks /proc/locks for a conflict and holds nothing;
 * a mode that writes is then refused (see allowUnlockedWrites).
 */
export async function lockImage(fd: number, path: string, mode: LockMode): Promise<ImageLock> {
  const n = native();
  const unshared = ALL_PERMS.filter((p) => !mode.shared.includes(p));
  if (!n) {
    const conflict = await procLocksConflict(path, mode, unshared);
    if (conflict) await throwInUse(path, conflict);
    const writes = mode.perms.includes(PERM_WRITE) || mode.perms.includes(PERM_RESIZE);
    if (writes && !unlockedWrites) throw new StrataError('unsupported', unlockedWriteRefusal(), path);
    return { mode, held: false, release: () => {} };
  }
  const taken: number[] = [];
  const release = () => { for (const b of taken) { try { n.ofdSetLock(fd, b, 1, 'unlock'); } catch { /* fd closed */ } } taken.length = 0; };
  const take = (b: number) => {
    if (!n.ofdSetLock(fd, b, 1, 'read')) return false;
    taken.push(b);
    return true;
  };
  let conflict: string | null = null;
  for (const p of mode.perms) if (!take(LOCK_BASE_USE + p)) { conflict = `Failed to get "${PERM_NAMES[p]}" lock`; break; }
  if (!conflict) for (const p of unshared) if (!take(LOCK_BASE_SHARE + p)) { conflict = `Failed to get shared "${PERM_NAMES[p]}" lock`; break; }
  if (!conflict) {
    for (const p of mode.perms) if (n.ofdGetLock(fd, LOCK_BASE_SHARE + p, 1, 'write')) { conflict = `Failed to get "${PERM_NAMES[p]}" lock`; break; }
  }
  if (!conflict) {
    for (const p of unshared) if (n.ofdGetLock(fd, LOCK_BASE_USE + p, 1, 'write')) { conflict = `Failed to get shared "${PERM_NAMES[p]}" lock`; break; }
  }
  if (conflict) {
    release();
    await throwInUse(path, conflict);
  }
  return { mode, held: true, release };
}

async function throwInUse(path: string, what: string): Promise<never> {
  const holders = await findLockHolders(path);
  throw new InUseError(`image is in use: ${what}; ${describeHolders(holders)}. Stop the VM or process first (read-only commands work with -U)`, path);
}

/** The addon-less check: conflicting QEMU-style bytes in /proc/locks for this inode. */
async function procLocksConflict(path: string, mode: LockMode, unshared: number[]): Promise<string | null> {
  let text: string;
  let ino: number;
  try {
    text = await readFile('/proc/locks', 'utf8');
    ino = (await stat(path)).ino;
  } catch {
    return null;
  }
  const held = new Set<number>();
  for (const l of parseLockLines(text)) {
    // QEMU uses OFD locks (POSIX record locks where those are missing), never flock().
    if (l.ino !== ino || (l.kind !== 'OFDLCK' && l.kind !== 'POSIX')) continue;
    for (let b = l.start; b <= Math.min(l.end, 300); b++) held.add(b);
  }
  for (const p of mode.perms) if (held.has(LOCK_BASE_SHARE + p)) return `Failed to get "${PERM_NAMES[p]}" lock`;
  for (const p of unshared) if (held.has(LOCK_BASE_USE + p)) return `Failed to get shared "${PERM_NAMES[p]}" lock`;
  return null;
}
