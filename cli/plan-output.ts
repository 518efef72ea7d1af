// --dry-run and --force for every writing command: the job's plan (planJob), printed for people
// or as JSON (--output=json), and nothing written; or the job run through runJob, which plans
// the same way first and refuses as the plan says.
import { UsageError } from '../core/errors';
import type { JobContext } from '../core/jobs/job';
import { planJob, planRunnable, planToJson, planToText, type JobPlan } from '../core/jobs/plan';
import { runJob } from '../core/jobs/operations';
import type { JobResult, JobSpec } from '../core/jobs/plan-kit';
import { optionsToRecord } from '../core/jobs/create';
import { outputFormat, type CommandIO, type Options } from './common';

export const PLAN_OPTIONS: Options = {
  'dry-run': { type: 'boolean' },
  force: { type: 'boolean' },
  output: { type: 'string' },
};

export const PLAN_HELP = '--dry-run prints the plan (--output=json for JSON) and writes nothing; --force runs it even when other images would read different data';

type Values = Record<string, string | boolean | string[] | undefined>;

/** -o OPTS (joined) as the JobSpec's options record; undefined when there are none. */
export function optionsRecord(o: string): Record<string, string> | undefined {
  return o ? optionsToRecord(o) : undefined;
}

/** Prints a plan; exit 0 when the run would go ahead, 1 when it would refuse. */
export function printPlan(plan: JobPlan, values: Values, io: CommandIO): number {
  const fmt = outputFormat(values.output);
  io.out(fmt === 'json' ? JSON.stringify(planToJson(plan), null, 4) + '\n' : planToText(plan));
  return planRunnable(plan, !!values.force) ? 0 : 1;
}

/** The dry run of `spec` when --dry-run was given, else the job itself (then `done` reports). */
export async function runOrPlan(values: Values, io: CommandIO, ctx: JobContext, spec: JobSpec, done: (r: JobResult & { plan: JobPlan }) => void): Promise<number> {
  if (values['dry-run']) return printPlan(await planJob(spec, ctx), values, io);
  if (values.output !== undefined) throw new UsageError('--output goes with --dry-run here (the plan as JSON)');
  done(await runJob(ctx, spec, { force: !!values.force }));
  return 0;
}
