// What every job's plan step is made of: the JSON-serialisable job descriptions (JobSpec), the
// plan they produce (JobPlan), and the helpers planners share: lock probes that name the holder,
// free space per file system, the chain as it will be. A planner writes nothing: it opens
// images read-only without locks (our own lock would conflict with the probes) and only tests
// locks, releasing them at once. plan.ts dispatches; each job module has its own planner.
import { access, constants } from 'node:fs';
import { resolve } from 'node:path';
import { InUseError, IoError, UsageError } from '../errors';
import type { DiskImage } from '../engine/image';
import { NodeFile } from '../io/node-file';
import { lockImage, READ_LOCK, WRITE_LOCK } from '../io/locks';
import { findLockHolders } from '../io/lock-doctor';
import { freeSpace, mountPointOf } from '../io/space';
import { sizeToStr } from '../chain/size-str';
import { stat } from '../io/fs-async';
import { Qcow2Image } from '../engine/qcow2';
import { BME_FLAG_IN_USE } from '../format/bitmaps';

export type { Fmt, JobSpec, JobOp, SpecOf, PlanHolder, PlanChainLink, PlanSpace, JobPlan, JobResult } from './job-types';
import type { JobOp, JobPlan, PlanChainLink, PlanHolder } from './job-types';

export function abs(p: string): string { return resolve(p); }

export function newPlan(operation: JobOp, title: string, command: string[]): JobPlan {
  return {
    operation, title, writes: [], creates: [], renames: [], removes: [], chainsAfter: [], bytesToRead: 0, bytesToCopy: 0,
    space: [], spaceNeeded: 0, spaceAvailable: null, affected: [], blocked: [], warnings: [], needsForce: null, command, problems: [],
  };
}

/** The chain below (and including) `top` as plan links. */
export function chainLinks(top: DiskImage | null): PlanChainLink[] {
  const out: PlanChainLink[] = [];
  for (let l = top; l; l = l.backing) out.push({ filename: abs(l.filename), format: l.format, virtualSize: l.virtualSize });
  return out;
}

export type ProbeMode = 'read' | 'write';

/**
 * Tests whether the locks a job needs on `path` could be taken now ('write': what writers take;
 * 'read': the consistent-read lock of a reader), on a read-only descriptor, released at once.
 * Null when they could (or the file does not exist); otherwise the reason and who holds it.
 */
export async function probeLock(path: string, mode: ProbeMode): Promise<{ reason: string; holder: PlanHolder | null } | null> {
  let f: NodeFile;
  try {
    if (!(await stat(path)).isFile()) return null;
    f = await NodeFile.open(path);
  } catch {
    return null;
  }
  try {
    const lock = await lockImage(f.fd, path, mode === 'write' ? WRITE_LOCK : READ_LOCK);
    lock.release();
    return null;
  } catch (err) {
    if (!(err instanceof InUseError)) return null;
    const h = (await findLockHolders(path))[0];
    // lockImage's own words ("in use: Failed to get "write" lock; PID 123 (qemu-io) holds it"),
    // so a refusal reads as it always has.
    const m = /image is (in use: .*?)\. Stop the VM/.exec(err.message);
    return { reason: m ? m[1]! : 'in use by another process', holder: h ? { pid: h.pid, program: h.program, vm: h.vmName } : null };
  } finally {
    await f.close();
  }
}

/** Probes each path (once) and lists the ones in use as blocked. */
export async function probeAll(plan: JobPlan, items: Array<[string, ProbeMode]>): Promise<void> {
  const seen = new Map<string, ProbeMode>();
  for (const [p, m] of items) {
    const a = abs(p);
    if (seen.get(a) !== 'write') seen.set(a, m);
  }
  for (const [p, m] of seen) {
    const b = await probeLock(p, m);
    if (b && !plan.blocked.some((x) => x.filename === p)) plan.blocked.push({ filename: p, ...b });
  }
}

/** Space a job needs, per file system (several targets on one file system add up). */
export function addSpace(plan: JobPlan, path: string, needed: number, purpose: string): void {
  const mp = mountPointOf(path);
  const n = Math.max(0, needed);
  const cur = plan.space.find((s) => s.mountPoint === mp);
  if (cur) {
    cur.needed += n;
    if (!cur.purpose.includes(purpose)) cur.purpose += ` and ${purpose}`;
    const f = cur.files.find((x) => x.filename === abs(path));
    if (f) f.needed += n; else cur.files.push({ filename: abs(path), needed: n });
  } else {
    plan.space.push({ mountPoint: mp, needed: n, available: freeSpace(path), purpose, files: [{ filename: abs(path), needed: n }] });
  }
  plan.spaceNeeded = plan.space.reduce((a, s) => a + s.needed, 0);
  const known = plan.space.filter((s) => s.available !== null).map((s) => s.available as number);
  plan.spaceAvailable = known.length ? Math.min(...known) : null;
}

/** Adds a "no space" problem for every file system where the job clearly does not fit. */
export function checkSpace(plan: JobPlan): void {
  for (const s of plan.space) {
    if (s.available !== null && s.needed > s.available) {
      plan.problems.push(`not enough space on ${s.mountPoint} for ${s.purpose}: ${sizeToStr(s.available)} free, about ${sizeToStr(s.needed)} needed`);
    }
  }
}

/** Lists `overlays` as affected by a change of `image`'s content, and asks for force. */
export function addAffected(plan: JobPlan, image: string, overlays: string[], why: string): void {
  for (const o of overlays) {
    if (!plan.affected.some((a) => a.filename === abs(o))) plan.affected.push({ filename: abs(o), reason: `uses ${abs(image)} as its backing file and ${why}` });
  }
  if (plan.affected.length) {
    const names = plan.affected.map((a) => a.filename).join(', ');
    plan.needsForce = `${names} ${plan.affected.length > 1 ? 'depend' : 'depends'} on ${abs(image)} and would read different data afterwards (use --force if that is intended)`;
  }
}

/** Persistent bitmaps an image has: writing it makes them inconsistent (QEMU then refuses to use them). */
export function bitmapWarning(img: DiskImage, verb = 'writing'): string | null {
  // Writes keep persistent bitmaps valid (engine/bitmaps.ts); only those already left in use
  // (inconsistent) are worth a word: they stay as they are, as QEMU leaves them.
  if (!(img instanceof Qcow2Image) || !img.bitmaps) return null;
  const stale = img.bitmaps.filter((e) => e.flags & BME_FLAG_IN_USE).length;
  return stale ? `${abs(img.filename)} has ${stale} inconsistent (in-use) persistent bitmap(s); ${verb} it leaves them inconsistent (\`qemu-img bitmap --remove\` drops them)` : null;
}

/** Which of `paths` we may not write (files), and in which `folders` we may not create or rename. */
export async function permissionProblems(plan: JobPlan, paths: string[], folders: string[] = []): Promise<void> {
  const why = (p: string, mode: number) => new Promise<string | null>((r) => access(p, mode, (err) => {
    if (!err) r(null);
    else if (err.code === 'EROFS') r('the file system is read-only');
    else if (err.code === 'ENOENT') r(null); // named elsewhere (opening it fails with "no such file")
    else r('no write permission');
  }));
  for (const p of paths) {
    const w = await why(p, constants.W_OK);
    if (w) plan.problems.push(`${abs(p)}: cannot write: ${w}`);
  }
  for (const d of folders) {
    const w = await why(d, constants.W_OK | constants.X_OK);
    if (w) plan.problems.push(`${abs(d)}: cannot create or rename files in this folder: ${w}`);
  }
}

/**
 * The run's gate: refuses, with one line, when an image is in use (InUseError), when something
 * makes the job impossible (IoError: space, permissions, a read-only file system), or when it
 * needs force that was not given (UsageError naming --force).
 */
export function enforcePlan(plan: JobPlan, force = false): void {
  const b = plan.blocked[0];
  if (b) throw new InUseError(`image is ${b.reason}. Stop the VM or process first (read-only commands work with -U)`, b.filename);
  const p = plan.problems[0];
  if (p) {
    const code = p.startsWith('not enough space') ? 'ENOSPC' : p.includes('read-only') ? 'EROFS' : 'EACCES';
    throw new IoError(p, undefined, code);
  }
  if (plan.needsForce && !force) throw new UsageError(`refused: ${plan.needsForce}`);
}

/** A size for people: "24 MiB (25165824 bytes)". */
export function bytesText(n: number): string {
  return n < 1024 ? `${n} bytes` : `${sizeToStr(n)} (${n} bytes)`;
}
