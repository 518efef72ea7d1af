// The plan step of every writing job, for a JSON job description (JobSpec): what it will write,
// create, rename and remove, the chains afterwards, the bytes it reads and writes, the space it
// needs on each file system, the images whose content it changes (affected), the images in use
// (blocked), warnings, and the equivalent strata command. planJob writes nothing (no byte, no
// mtime): images are opened read-only and locks are only tested. The jobs themselves run this
// same plan first and refuse as it says (operations.ts runJob; each job function too).
import { NotFoundError, UsageError } from '../errors';
import type { DiskImage } from '../engine/image';
import { Qcow2Image } from '../engine/qcow2';
import { openImage, closeChain, chainOf } from '../chain/open';
import { sizeToStr } from '../chain/size-str';
import type { JobContext } from './job';
import { planConvert, convertCommand, type ConvertOptions } from './convert';
import { planCompact } from './compact';
import { planCommit } from './commit';
import { planEmpty } from './empty';
import { planMerge } from './merge';
import { planRebase } from './rebase';
import { planMirror, type MirrorFilesOptions } from './mirror';
import { planSnapshot } from './snapshot';
import { planResize } from './resize';
import { planCheck } from './check';
import { planCreate, resolveCreate, parseCreateOptions, recordToOptions, type CreateOptions } from './create';
import { bytesText, probeAll, type JobPlan, type JobSpec, type SpecOf } from './plan-kit';

export type { JobSpec, JobPlan, JobResult, PlanHolder, PlanChainLink, PlanSpace, JobOp, SpecOf } from './plan-kit';

/** -l of convert: "snapshot.name=N", "snapshot.id=I", both comma-separated, or a bare id-or-name. */
export function parseSnapshotParam(v: string): { id?: string; name?: string; any?: string } {
  if (!v.includes('=')) return { any: v };
  const out: { id?: string; name?: string } = {};
  for (const part of v.split(',')) {
    const [k, ...rest] = part.split('=');
    const val = rest.join('=');
    if (k === 'snapshot.name') out.name = val;
    else if (k === 'snapshot.id') out.id = val;
    else throw new UsageError(`unknown snapshot option '${k}' (use snapshot.name=NAME or snapshot.id=ID)`);
  }
  return out;
}

/** The source a conversion reads: the image, or one of its internal snapshots (-l). */
export async function convertSource(src: DiskImage, snapshot: string | undefined, name: string): Promise<DiskImage> {
  if (snapshot === undefined) return src;
  if (!(src instanceof Qcow2Image)) throw new UsageError(`${name}: raw images have no internal snapshots`);
  const q = parseSnapshotParam(snapshot);
  const entry = src.snapshots.find((s) => (q.any !== undefined ? s.id === q.any || s.name === q.any : (q.id === undefined || s.id === q.id) && (q.name === undefined || s.name === q.name)));
  if (!entry) throw new NotFoundError(`no snapshot matching '${snapshot}'`, name);
  return src.snapshotView(entry);
}

/** ConvertOptions for a convert spec, with qemu-img convert's argument checks. */
export function convertOptions(spec: SpecOf<'convert'>): ConvertOptions {
  const create: CreateOptions = parseCreateOptions(recordToOptions(spec.options));
  if (spec.backing !== undefined) {
    if (spec.targetFormat !== 'qcow2') throw new UsageError('-B needs a qcow2 target (-O qcow2)');
    create.backingFile = spec.backing;
    create.backingFormat = spec.backingFormat ?? create.backingFormat;
  }
  if (spec.compress && spec.targetFormat !== 'qcow2') throw new UsageError('-c (compression) needs a qcow2 target (-O qcow2)');
  if (spec.existing && spec.options && Object.keys(spec.options).length) throw new UsageError('-o cannot be used with -n (the target exists already)').asQemu('-o has no effect when skipping image creation');
  if (spec.targetIsZero && !spec.existing) throw new UsageError('--target-is-zero requires -n (an existing target)');
  const cache = spec.cache ?? 'unsafe';
  if (cache !== 'unsafe' && cache !== 'writeback') throw new UsageError(`-t must be unsafe or writeback, not '${String(cache)}'`);
  return {
    format: spec.targetFormat, create, existing: !!spec.existing, cache, targetIsZero: !!spec.targetIsZero,
    minSparse: spec.minSparse ?? 4096, compress: !!spec.compress,
  };
}

export function mirrorOptions(spec: SpecOf<'mirror'>): MirrorFilesOptions {
  return {
    sourceFormat: spec.sourceFormat, targetFormat: spec.targetFormat, sync: spec.sync ?? 'full', existing: !!spec.existing,
    create: parseCreateOptions(recordToOptions(spec.options)), forceShare: !!spec.forceShare,
  };
}

/** The source chain's consistent-read locks, tested (unless the job reads it without them, -U). */
async function probeSource(plan: JobPlan, src: DiskImage, forceShare: boolean | undefined): Promise<void> {
  if (forceShare) return;
  await probeAll(plan, chainOf(src).map((l): [string, 'read'] => [l.filename, 'read']));
}

/** Opens a source chain without locks (the plan only tests them), as the job will read it. */
async function openSource(path: string, format: 'qcow2' | 'raw' | undefined): Promise<DiskImage> {
  return openImage(path, { format, lock: 'none' });
}

/** The plan of a job. Writes nothing; throws (UsageError, NotFoundError, ...) when the job cannot be described at all. */
export async function planJob(spec: JobSpec, ctx: JobContext = {}): Promise<JobPlan> {
  switch (spec.op) {
    case 'convert': {
      const opts = convertOptions(spec);
      const src = await openSource(spec.source, spec.sourceFormat);
      try {
        const from = await convertSource(src, spec.snapshot, spec.source);
        const plan = await planConvert(ctx, from, spec.target, opts, convertCommand(spec.source, spec.target, { ...opts, sourceFormat: spec.sourceFormat, snapshot: spec.snapshot }));
        await probeSource(plan, src, spec.forceShare);
        return plan;
      } finally {
        await closeChain(src);
      }
    }
    case 'mirror': {
      const src = await openSource(spec.source, spec.sourceFormat);
      try {
        const plan = await planMirror(ctx, src, spec.target, mirrorOptions(spec), spec.source);
        await probeSource(plan, src, spec.forceShare);
        return plan;
      } finally {
        await closeChain(src);
      }
    }
    case 'compact': return planCompact(ctx, spec.image, { compress: spec.compress });
    case 'commit': return planCommit(ctx, spec.image, { base: spec.base, keep: spec.keep });
    case 'empty': return planEmpty(ctx, spec.image);
    case 'merge': return planMerge(ctx, spec.image, { folders: spec.folders });
    case 'rebase': return planRebase(ctx, spec.image, { backing: spec.backing, backingFormat: spec.backingFormat, backingFormatName: spec.backingFormatName, unsafe: spec.unsafe });
    case 'snapshot': return planSnapshot(spec.image, spec.action, spec.name, { qemu: spec.qemu });
    case 'resize': return planResize(spec.image, { size: spec.size, shrink: spec.shrink, relative: spec.relative, format: spec.format, preallocation: spec.preallocation });
    case 'check': return planCheck(spec.image, { repair: spec.repair, format: spec.format });
    case 'create': return planCreate(await resolveCreate(spec.image, spec.format, createOptions(spec)));
    default: {
      const never: never = spec;
      throw new UsageError(`unknown job '${(never as { op: string }).op}'`);
    }
  }
}

/** CreateOptions of a create spec (-o options, then SIZE, -b, -F, -u as the CLI gives them). */
export function createOptions(spec: SpecOf<'create'>): CreateOptions {
  const opts = parseCreateOptions(recordToOptions(spec.options));
  if (spec.size !== undefined && opts.size === undefined) opts.size = spec.size;
  if (spec.backing !== undefined) opts.backingFile = spec.backing;
  if (spec.backingFormat !== undefined) opts.backingFormat = spec.backingFormat;
  opts.unsafe = !!spec.unsafe;
  return opts;
}

/** Whether the run would go ahead (with `force` given or not). */
export function planRunnable(plan: JobPlan, force = false): boolean {
  return !plan.blocked.length && !plan.problems.length && (!plan.needsForce || force);
}

const kebab = (k: string) => k.replace(/[A-Z]/g, (c) => `-${c.toLowerCase()}`);

/** JSON-ready form of anything in a plan, with kebab-case keys (qemu-img's JSON style). */
function toKebab(v: unknown): unknown {
  if (Array.isArray(v)) return v.map(toKebab);
  if (v && typeof v === 'object') {
    const out: Record<string, unknown> = {};
    for (const [k, x] of Object.entries(v)) if (x !== undefined) out[kebab(k)] = toKebab(x);
    return out;
  }
  return v;
}

/** The plan as --dry-run --output=json prints it: every field, kebab-case keys. */
export function planToJson(plan: JobPlan): Record<string, unknown> {
  return toKebab(plan) as Record<string, unknown>;
}

const size = bytesText;

/** The plan as --dry-run prints it for people. */
export function planToText(plan: JobPlan): string {
  const lines: string[] = [`Plan: ${plan.title}`];
  const list = (label: string, items: string[]) => {
    if (!items.length) return;
    lines.push(`  ${label}:`);
    for (const i of items) lines.push(`    ${i}`);
  };
  list('writes', plan.writes);
  list('creates', plan.creates);
  list('renames', plan.renames.map((r) => `${r.from} -> ${r.to}`));
  list('removes', plan.removes);
  list('chains afterwards (top first)', plan.chainsAfter.map((c) => c.map((l) => `${l.filename} (${l.format}, ${sizeToStr(l.virtualSize)})`).join(' -> ')));
  lines.push(`  reads: ${size(plan.bytesToRead)}`);
  lines.push(`  writes data: ${size(plan.bytesToCopy)}`);
  if (plan.expectedSize) {
    const { before, after } = plan.expectedSize;
    lines.push(`  size on disk: ${size(before)} now, about ${size(after)} after (saves ${size(Math.max(0, before - after))})`);
  }
  for (const s of plan.space) {
    lines.push(`  space on ${s.mountPoint}: ${size(s.needed)} needed, ${s.available === null ? 'unknown' : size(s.available)} available`);
  }
  list('affected (their content changes)', plan.affected.map((a) => `${a.filename}: ${a.reason}`));
  list('blocked (in use)', plan.blocked.map((b) => `${b.filename}: ${b.reason}`));
  list('warnings', plan.warnings);
  list('cannot run', plan.problems);
  if (plan.needsForce) lines.push(`  needs --force: ${plan.needsForce}`);
  lines.push(`  command: ${plan.command.map(shellQuote).join(' ')}`);
  const verdict = plan.blocked.length ? 'would refuse: images in use'
    : plan.problems.length ? 'would refuse'
      : plan.needsForce ? 'would refuse without --force' : 'ready to run';
  lines.push(`  ${verdict}`);
  return lines.join('\n') + '\n';
}

function shellQuote(s: string): string {
  return /^[\w@%+=:,./-]+$/.test(s) ? s : `'${s.replace(/'/g, `'\\''`)}'`;
}

