import { parse, needPositionals, type CommandIO } from './common';
import { progressPrinter } from './progress';
import { PLAN_OPTIONS, runOrPlan } from './plan-output';

const USAGE = 'strata empty [-p] [--dry-run [--output=human|json]] IMAGE';

export async function emptyCommand(args: string[], io: CommandIO, signal: AbortSignal): Promise<number> {
  const { values, positionals } = parse(args, {
    progress: { type: 'boolean', short: 'p' },
    ...PLAN_OPTIONS,
  }, USAGE);
  needPositionals(positionals, 1, USAGE);
  const bar = progressPrinter(!!values.progress && io.isTTY, io.err);
  return runOrPlan(values, io, { signal, progress: bar.onProgress }, { op: 'empty', image: positionals[0]! }, () => {
    bar.end();
    io.out('Image emptied.\n');
  });
}
