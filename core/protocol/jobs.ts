// Jobs across process boundaries: what to run (a job description the app sends), the plan
// shown before it runs, its progress, its result, and the job manager's record of it.
import { z } from 'zod';
import type { JobPlan, JobResult, JobSpec } from '../jobs/job-types';

const path = z.string().min(1).max(4096).refine((p) => !p.includes('\0'), 'paths cannot contain NUL bytes');
const format = z.enum(['qcow2', 'raw']);
const options = z.record(z.string().max(64), z.string().max(4096));

/** Every writing job the app can run: the same descriptions the core's planJob/runJob take. */
export const JobSpecSchema = z.discriminatedUnion('op', [
  z.strictObject({
    op: z.literal('convert'), source: path, target: path, sourceFormat: format.optional(), targetFormat: format, compress: z.boolean().optional(),
    options: options.optional(), backing: z.string().max(4096).optional(), backingFormat: format.optional(),
    existing: z.boolean().optional(), targetIsZero: z.boolean().optional(), minSparse: z.number().int().nonnegative().max(2 ** 31).optional(),
    snapshot: z.string().max(1024).optional(), cache: z.enum(['unsafe', 'writeback']).optional(), forceShare: z.boolean().optional(),
  }),
  z.strictObject({ op: z.literal('compact'), image: path, compress: z.boolean().optional() }),
  z.strictObject({ op: z.literal('commit'), image: path, base: path.optional(), keep: z.boolean().optional() }),
  z.strictObject({ op: z.literal('empty'), image: path }),
  z.strictObject({ op: z.literal('merge'), image: path, folders: z.array(path).max(64).optional() }),
  z.strictObject({ op: z.literal('rebase'), image: path, backing: z.string().max(4096), backingFormat: format.optional(), unsafe: z.boolean().optional() }),
  z.strictObject({
    op: z.literal('mirror'), source: path, target: path, targetFormat: format.optional(), sync: z.enum(['full', 'top']).optional(), existing: z.boolean().optional(),
    sourceFormat: format.optional(), options: options.optional(), forceShare: z.boolean().optional(),
  }),
  z.strictObject({ op: z.literal('snapshot'), image: path, action: z.enum(['create', 'apply', 'delete']), name: z.string().min(1).max(1024) }),
  z.strictObject({ op: z.literal('resize'), image: path, size: z.number().int().min(-Number.MAX_SAFE_INTEGER).max(Number.MAX_SAFE_INTEGER), shrink: z.boolean().optional(), relative: z.boolean().optional(), format: format.optional(), preallocation: z.enum(['off', 'metadata', 'falloc', 'full']).optional() }),
  z.strictObject({ op: z.literal('check'), image: path, repair: z.enum(['leaks', 'all']), format: format.optional() }),
  z.strictObject({ op: z.literal('create'), image: path, format, size: z.number().int().nonnegative().max(Number.MAX_SAFE_INTEGER).optional(), backing: z.string().max(4096).optional(), backingFormat: format.optional(), options: options.optional(), unsafe: z.boolean().optional() }),
]);
export type JobSpecMessage = z.infer<typeof JobSpecSchema>;
export type JobOp = JobSpecMessage['op'];

/** Heavy reads that run in a job process too (they must not block the main process). */
export const ReadTaskSchema = z.discriminatedUnion('op', [
  z.strictObject({ op: z.literal('map-summary'), image: path, buckets: z.number().int().min(1).max(1 << 16) }),
  z.strictObject({ op: z.literal('check-read'), image: path }),
]);
export type ReadTask = z.infer<typeof ReadTaskSchema>;

const holder = z.object({ pid: z.number(), program: z.string(), vm: z.string().nullable() });
const chainLink = z.object({ filename: z.string(), format: format, virtualSize: z.number() });

export const JobPlanSchema = z.object({
  operation: z.enum(['convert', 'compact', 'commit', 'empty', 'merge', 'rebase', 'mirror', 'snapshot', 'resize', 'check', 'create']),
  title: z.string(),
  writes: z.array(z.string()),
  creates: z.array(z.string()),
  renames: z.array(z.object({ from: z.string(), to: z.string() })),
  removes: z.array(z.string()),
  chainsAfter: z.array(z.array(chainLink)),
  bytesToRead: z.number(),
  bytesToCopy: z.number(),
  space: z.array(z.object({ mountPoint: z.string(), needed: z.number(), available: z.number().nullable(), purpose: z.string(), files: z.array(z.object({ filename: z.string(), needed: z.number() })) })),
  spaceNeeded: z.number(),
  spaceAvailable: z.number().nullable(),
  affected: z.array(z.object({ filename: z.string(), reason: z.string() })),
  blocked: z.array(z.object({ filename: z.string(), reason: z.string(), holder: holder.nullable() })),
  warnings: z.array(z.string()),
  needsForce: z.string().nullable(),
  expectedSize: z.object({ before: z.number(), after: z.number() }).optional(),
  command: z.array(z.string()),
  problems: z.array(z.string()),
});
export type JobPlanMessage = z.infer<typeof JobPlanSchema>;

export const ProgressSchema = z.object({
  phase: z.string().max(200),
  bytesDone: z.number().nonnegative(),
  bytesTotal: z.number().nonnegative(),
  elapsedMs: z.number().nonnegative(),
});
export type ProgressMessage = z.infer<typeof ProgressSchema>;

export const JobResultSchema = z.object({
  operation: z.enum(['convert', 'compact', 'commit', 'empty', 'merge', 'rebase', 'mirror', 'snapshot', 'resize', 'check', 'create']),
  summary: z.string(),
  bytesWritten: z.number(),
  outputs: z.array(z.string()),
});
export type JobResultMessage = z.infer<typeof JobResultSchema>;

export const ErrorInfoSchema = z.object({ kind: z.string().max(64), message: z.string().max(8192) });
export type ErrorInfo = z.infer<typeof ErrorInfoSchema>;

export const JobStateSchema = z.enum(['queued', 'running', 'cancelling', 'succeeded', 'failed', 'cancelled']);
export type JobState = z.infer<typeof JobStateSchema>;

/** The job manager's record of a job: what the job monitor shows and the history keeps. */
export const JobRecordSchema = z.object({
  id: z.string(),
  spec: JobSpecSchema,
  title: z.string(),
  /** Every image the job reads or writes (for "which jobs touch this image"). */
  images: z.array(z.string()),
  state: JobStateSchema,
  /** Queued: what it waits for, in words ("another job on this chain: Commit a into b"). */
  waitingFor: z.string().nullable(),
  queuedAt: z.number(),
  startedAt: z.number().nullable(),
  endedAt: z.number().nullable(),
  progress: ProgressSchema.nullable(),
  /** The job process while it runs (for people who look at `ps`). */
  pid: z.number().int().nullable(),
  bytesWritten: z.number().nullable(),
  summary: z.string().nullable(),
  error: ErrorInfoSchema.nullable(),
});
export type JobRecord = z.infer<typeof JobRecordSchema>;

// The schemas and the core's types describe the same messages: a change to one without the
// other fails to compile here.
type Same<A, B> = [A] extends [B] ? ([B] extends [A] ? true : false) : false;
const specMatches: Same<z.infer<typeof JobSpecSchema>, JobSpec> = true;
const planMatches: Same<z.infer<typeof JobPlanSchema>, JobPlan> = true;
const resultMatches: Same<z.infer<typeof JobResultSchema>, JobResult> = true;
void specMatches; void planMatches; void resultMatches;
