// The optional native addon (native/strata_native.c): the file syscalls Node lacks — QEMU-
// compatible OFD image locks, SEEK_DATA/SEEK_HOLE and fallocate hole punching — and the copy
// loops' data path (a window's reads plus its zero scan, a large write in steps, each as one
// thread-pool request) and huge pages for their buffers. It is built by `npm install`
// (scripts/build-native.mjs) when a compiler is there; without it Strata still works, minus
// those features (the copy loops fall back to Node's fs, on ordinary pages), and
// nativeStatus() says why so the CLI/UI can tell the user.
// Loaded lazily, once. STRATA_NO_NATIVE=1 turns it off (for tests of the fallback paths).
// No electron import: this runs under Node, in Electron's main/utility processes, and from
// the esbuild bundle in dist/.
import { existsSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

export type LockType = 'read' | 'write';

/** A lock that conflicts with the one asked about (from F_OFD_GETLK). */
export interface LockInfo {
  type: LockType;
  start: number;
  /** 0 means "to the end of the file". */
  len: number;
  /** -1 for OFD locks (QEMU's); the owner's pid for classic POSIX record locks. */
  pid: number;
}

/** readScan's error: a system error plus the index of the segment whose read failed. */
export interface ReadScanError extends Error {
  code: string;
  errno: number;
  syscall: string;
  segment: number;
}

/**
 * All functions but readScan and writeQueued are synchronous single syscalls. Offsets and
 * lengths must be integers in [0, 2^53 - 1] and fd an integer >= 0, otherwise they throw a
 * TypeError. System failures throw an Error with Node's usual `code` ('EBADF', 'EOPNOTSUPP',
 * ...), `errno` and `syscall`.
 */
export interface NativeApi {
  /** lseek(SEEK_DATA): the first data byte at or after offset; -1 when there is none (ENXIO). */
  seekData(fd: number, offset: number): number;
  /** lseek(SEEK_HOLE): the first hole at or after offset (EOF counts as one); -1 at or past EOF. */
  seekHole(fd: number, offset: number): number;
  /**
   * fcntl(F_OFD_SETLK) on bytes [start, start + len) (len 0 = to EOF). Locks belong to the open
   * file description of fd and are released when its last duplicate closes. Returns false when
   * another open file description holds a conflicting lock (EAGAIN/EACCES); throws on anything
   * else (a 'write' lock on a read-only fd throws EBADF).
   */
  ofdSetLock(fd: number, start: number, len: number, type: LockType | 'unlock'): boolean;
  /**
   * fcntl(F_OFD_GETLK): a lock held through another open file description that would conflict
   * with taking `type` on the range, or null. Locks held through fd itself never conflict.
   * QEMU's test is a 'write' query, which reports any holder.
   */
  ofdGetLock(fd: number, start: number, len: number, type: LockType): LockInfo | null;
  /** fallocate(PUNCH_HOLE | KEEP_SIZE): the range reads as zeros and frees its blocks; size unchanged. len 0 is a no-op. */
  punchHole(fd: number, offset: number, len: number): void;
  /**
   * fallocate(ZERO_RANGE): the range reads as zeros (blocks may stay allocated, as unwritten);
   * extends the file when the range ends past EOF. Throws code 'EOPNOTSUPP' where the file
   * system cannot (tmpfs, NFS, ...): see isUnsupported(). len 0 is a no-op.
   */
  zeroRange(fd: number, offset: number, len: number): void;
  /**
   * sync_file_range(SYNC_FILE_RANGE_WRITE): starts writing the range's dirty pages to the
   * device and returns without waiting (len 0 = to the end of the file). Durability still
   * needs a flush; this only leaves the flush less to wait for.
   */
  startWriteback(fd: number, offset: number, len: number): void;
  /**
   * On a libuv thread-pool thread: fills buf from `segments`, a Float64Array of quadruples
   * [fd, bufOffset, fileOffset, length] (fd -1: zeros; bytes past a file's end read as zero),
   * then, when unit > 0, sets bitmap[i] to 1 when buf[i*unit, (i+1)*unit) holds a non-zero
   * byte, else 0 (the last unit may be shorter). callback(null | error) runs on the JS thread
   * when done; until then buf and bitmap belong to the request. Bad arguments throw a TypeError
   * at once. The segments are copied, so the Float64Array may be reused right away.
   * With outFd >= 0 (and unit > 0) the same thread then writes each run of units holding data
   * to outFd at outOffset + its place in buf, in pwrites of at most `step` bytes (as
   * writeQueued); a failed write reports syscall 'pwrite' and segment -1.
   */
  readScan(buf: Uint8Array, segments: Float64Array, unit: number, bitmap: Uint8Array | null, callback: (err: ReadScanError | null) => void,
    outFd?: number, outOffset?: number, step?: number): void;
  /**
   * On the addon's writer thread: writes all of buf at `offset` with pwrite calls of at most
   * `step` bytes, then callback(null | error) on the JS thread; until then buf belongs to the
   * request. Writes run one at a time, in the order they were queued (across all files), and
   * keep the event loop alive until their callbacks have run. Bad arguments throw a TypeError
   * at once.
   */
  writeQueued(fd: number, buf: Uint8Array, offset: number, step: number, callback: (err: NodeJS.ErrnoException | null) => void): void;
  /**
   * madvise(MADV_HUGEPAGE) on the part of buf that starts and ends on a transparent-huge-page
   * boundary; returns that part's offset in buf, or -1 when there is none or the system has
   * no huge pages (not Linux, THP "never"). A hint: buf's contents and use do not change.
   */
  adviseHugePages(buf: Uint8Array): number;
  /**
   * Standard L2 entries from `index`: the first index in (index, end) whose entry is not its
   * predecessor's host offset plus `clusterSize` with the same top byte, else `end`.
   * Optional: an addon built before it existed lacks it.
   */
  l2RunEnd?(table: Uint8Array, index: number, end: number, clusterSize: number): number;
  /**
   * flistxattr / fgetxattr / fsetxattr: a file's extended attributes (those this process may
   * see), one value, and setting one. Optional: an addon built before they existed lacks them.
   * getXattr throws code 'ENODATA' for a missing name; listXattrs gives [] where the file
   * system has none.
   */
  listXattrs?(fd: number): string[];
  getXattr?(fd: number, name: string): Buffer;
  setXattr?(fd: number, name: string, value: Uint8Array): void;
}

export interface NativeStatus {
  available: boolean;
  /** Why it is not available, in words a person can act on. */
  reason?: string;
  /** The addon file that was loaded (or that failed to load). */
  path?: string;
}

/** Where the addon lives relative to the repository (or package) root. */
export const NATIVE_ADDON_RELATIVE_PATH = join('native', 'build', 'Release', 'strata_native.node');

const FUNCTIONS = ['seekData', 'seekHole', 'ofdSetLock', 'ofdGetLock', 'punchHole', 'zeroRange', 'startWriteback', 'readScan', 'writeQueued', 'adviseHugePages'] as const satisfies readonly (keyof NativeApi)[];

let loaded: { api: NativeApi | null; status: NativeStatus } | undefined;

function disabledByEnv(): boolean {
  const v = process.env.STRATA_NO_NATIVE;
  return v !== undefined && v !== '' && v !== '0' && v.toLowerCase() !== 'false';
}

/** Walks up from this module's directory (core/io/ in the sources, dist/ in the bundle). */
function findAddon(): { path?: string; searchedFrom: string } {
  let dir: string;
  try {
    dir = dirname(fileURLToPath(import.meta.url));
  } catch {
    return { searchedFrom: String(import.meta.url) };
  }
  const searchedFrom = dir;
  for (;;) {
    const candidate = join(dir, NATIVE_ADDON_RELATIVE_PATH);
    if (existsSync(candidate)) return { path: candidate, searchedFrom };
    const parent = resolve(dir, '..');
    if (parent === dir) return { searchedFrom };
    dir = parent;
  }
}

function load(): { api: NativeApi | null; status: NativeStatus } {
  if (disabledByEnv()) return { api: null, status: { available: false, reason: 'disabled by STRATA_NO_NATIVE=1' } };
  const found = findAddon();
  if (!found.path) {
    return {
      api: null,
      status: {
        available: false,
        reason: `${NATIVE_ADDON_RELATIVE_PATH} not found above ${found.searchedFrom} (it is built by npm install / npm run build, which needs a C compiler)`,
      },
    };
  }
  let mod: Record<string, unknown>;
  try {
    mod = createRequire(import.meta.url)(found.path) as Record<string, unknown>;
  } catch (err) {
    const msg = err instanceof Error ? err.message.split('\n')[0] : String(err);
    return { api: null, status: { available: false, reason: `cannot load the native addon: ${msg} (rebuild with npm run build)`, path: found.path } };
  }
  const missing = FUNCTIONS.filter((f) => typeof mod[f] !== 'function');
  if (missing.length > 0) {
    return { api: null, status: { available: false, reason: `the native addon is outdated (no ${missing.join(', ')}); rebuild with npm run build`, path: found.path } };
  }
  return { api: mod as unknown as NativeApi, status: { available: true, path: found.path } };
}

/** The addon, or null when it is not built, cannot load or is disabled (see nativeStatus()). */
export function native(): NativeApi | null {
  loaded ??= load();
  return loaded.api;
}

/** Whether the addon is in use and, if not, why. */
export function nativeStatus(): NativeStatus {
  loaded ??= load();
  return { ...loaded.status };
}

/** True for the errors that mean "this file system / platform cannot do that": fall back. */
export function isUnsupported(err: unknown): boolean {
  const code = (err as { code?: unknown } | null)?.code;
  return code === 'EOPNOTSUPP' || code === 'ENOTSUP' || code === 'ENOSYS';
}
