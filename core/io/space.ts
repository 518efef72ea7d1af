// Free space: checked before jobs that write a lot, and named in the error when a write runs
// out of it anyway.
import { readFileSync, realpathSync, statfsSync } from 'node:fs';
import { dirname, resolve } from 'node:path';
import { IoError, StrataError } from '../errors';
import { sizeToStr } from '../chain/size-str';

/** The mount point holding `path` (from /proc/self/mountinfo; '/' when unknown). */
export function mountPointOf(path: string): string {
  let p: string;
  try { p = realpathSync(dirname(resolve(path))); } catch { p = dirname(resolve(path)); }
  let best = '/';
  try {
    for (const line of readFileSync('/proc/self/mountinfo', 'utf8').split('\n')) {
      const mp = line.split(' ')[4]?.replace(/\\040/g, ' ');
      if (mp && (p === mp || p.startsWith(mp.endsWith('/') ? mp : mp + '/')) && mp.length > best.length) best = mp;
    }
  } catch { /* not Linux */ }
  return best;
}

/** Bytes an unprivileged writer may still use on the file system holding `path`. */
export function freeSpace(path: string): number | null {
  try {
    const st = statfsSync(dirname(resolve(path)));
    return st.bavail * st.bsize;
  } catch {
    return null;
  }
}

/** Refuses up front when `needed` bytes clearly do not fit next to `path`. */
export function ensureSpace(path: string, needed: number, what: string): void {
  const free = freeSpace(path);
  if (free === null || needed <= free) return;
  throw new IoError(`not enough space on ${mountPointOf(path)} for ${what}: ${sizeToStr(free)} free, about ${sizeToStr(needed)} needed`, path, 'ENOSPC');
}

/** Turns an ENOSPC from a job into one line naming the file system and the space involved. */
export function explainNoSpace(err: unknown, path: string, needed?: number): unknown {
  if (!(err instanceof StrataError) || (err as IoError).code !== 'ENOSPC') return err;
  if (err.message.includes('not enough space')) return err;
  const free = freeSpace(path);
  const parts = [`${free !== null ? sizeToStr(free) : 'no'} free`];
  if (needed !== undefined) parts.push(`the job needed about ${sizeToStr(needed)}`);
  return new IoError(`no space left on ${mountPointOf(path)} while writing (${parts.join('; ')}); the images are consistent, free some space and run it again`, err.file ?? path, 'ENOSPC', err);
}
