import { parse, needPositionals, type CommandIO } from './common';
import { progressPrinter } from './progress';
import { PLAN_OPTIONS, runOrPlan } from './plan-output';

const USAGE = 'strata merge [-p] [--folder DIR ...] [--dry-run [--output=human|json]] [--force] IMAGE';

export async function mergeCommand(args: string[], io: CommandIO, signal: AbortSignal): Promise<number> {
  const { values, positionals } = parse(args, {
    progress: { type: 'boolean', short: 'p' },
    folder: { type: 'string', multiple: true },
    ...PLAN_OPTIONS,
  }, USAGE);
  needPositionals(positionals, 1, USAGE);
  const bar = progressPrinter(!!values.progress && io.isTTY, io.err);
  return runOrPlan(values, io, { signal, progress: bar.onProgress }, { op: 'merge', image: positionals[0]!, folders: values.folder as string[] | undefined }, (r) => {
    bar.end();
    for (const a of r.plan.affected) io.err(`strata: warning: ${a.filename} ${a.reason.replace('would read', 'now reads')}\n`);
    io.out('Image merged.\n');
  });
}
