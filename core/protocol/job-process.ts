// Messages between the main process and a job process. A process runs at most one job or one
// heavy read and then exits; before it, it may plan that job (the plan shown and enforced).
import { z } from 'zod';
import { ErrorInfoSchema, JobPlanSchema, JobResultSchema, JobSpecSchema, ProgressSchema, ReadTaskSchema } from './jobs';

/** main -> job process. */
export const ToJobSchema = z.discriminatedUnion('type', [
  z.strictObject({ type: z.literal('run'), id: z.string().max(64), spec: JobSpecSchema, force: z.boolean() }),
  z.strictObject({ type: z.literal('read'), task: ReadTaskSchema }),
  z.strictObject({ type: z.literal('plan'), spec: JobSpecSchema }),
  z.strictObject({ type: z.literal('cancel') }),
  /** The process is not needed after all (a plan that was only previewed). */
  z.strictObject({ type: z.literal('exit') }),
]);
export type ToJob = z.infer<typeof ToJobSchema>;

/** job process -> main (or, in Electron, straight to the window for progress). */
export const FromJobSchema = z.discriminatedUnion('type', [
  z.strictObject({ type: z.literal('ready') }),
  z.strictObject({ type: z.literal('progress'), progress: ProgressSchema }),
  z.strictObject({ type: z.literal('log'), line: z.string().max(8192) }),
  z.strictObject({ type: z.literal('result'), result: JobResultSchema }),
  z.strictObject({ type: z.literal('plan'), plan: JobPlanSchema }),
  z.strictObject({ type: z.literal('read-result'), result: z.unknown() }),
  z.strictObject({ type: z.literal('error'), error: ErrorInfoSchema }),
]);
export type FromJob = z.infer<typeof FromJobSchema>;
