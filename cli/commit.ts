import { parse, needPositionals, str, type CommandIO, imageArg, IMAGE_OPTS } from './common';
import { commandProgress } from './progress';
import { PLAN_OPTIONS, runOrPlan } from './plan-output';

const USAGE = 'strata commit [-p] [-b BASE] [-d] [--dry-run [--output=human|json]] [--force] FILE';

export async function commitCommand(args: string[], io: CommandIO, signal: AbortSignal): Promise<number> {
  const { values, positionals } = parse(args, {
    ...IMAGE_OPTS,
    progress: { type: 'boolean', short: 'p' },
    base: { type: 'string', short: 'b' },
    drop: { type: 'boolean', short: 'd' },
    format: { type: 'string', short: 'f' },
    ...PLAN_OPTIONS,
  }, USAGE);
  needPositionals(positionals, 1, USAGE);
  const bar = commandProgress(io, !!values.progress, 1, true);
  return runOrPlan(values, io, { signal, progress: bar.onProgress }, { op: 'commit', image: imageArg(positionals[0]!, values), base: str(values.base), keep: !!values.drop }, (r) => {
    bar.end();
    // Only with --force: the images that now read the committed data.
    for (const a of r.plan.affected) io.err(`strata: warning: ${a.filename} ${a.reason.replace('would read', 'now reads')}\n`);
    io.out('Image committed.\n');
  });
}
