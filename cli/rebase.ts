import { parseFormat } from '../core/chain/open';
import { UsageError } from '../core/errors';
import { parse, needPositionals, str, type CommandIO, imageArg, IMAGE_OPTS } from './common';
import { commandProgress } from './progress';
import { PLAN_OPTIONS, runOrPlan } from './plan-output';

const USAGE = 'strata rebase [-p] [-u] [-f FMT] -b BACKING [-F FMT] [--dry-run [--output=human|json]] FILE   (-b "" flattens)';

export async function rebaseCommand(args: string[], io: CommandIO, signal: AbortSignal): Promise<number> {
  const { values, positionals } = parse(args, {
    ...IMAGE_OPTS,
    progress: { type: 'boolean', short: 'p' },
    unsafe: { type: 'boolean', short: 'u' },
    backing: { type: 'string', short: 'b' },
    'backing-format': { type: 'string', short: 'F' },
    format: { type: 'string', short: 'f' },
    ...PLAN_OPTIONS,
  }, USAGE);
  needPositionals(positionals, 1, USAGE);
  const backing = str(values.backing);
  if (backing === undefined) throw new UsageError(`-b BACKING is required ('' to flatten)\nusage: ${USAGE}`);
  if (values.format !== undefined && parseFormat(str(values.format)) !== 'qcow2') throw new UsageError('rebase works on qcow2 images');
  const bar = commandProgress(io, !!values.progress, 2, true);
  return runOrPlan(values, io, { signal, progress: bar.onProgress }, {
    op: 'rebase', image: imageArg(positionals[0]!, values), backing, backingFormat: parseFormat(str(values['backing-format']), 'backing format'), unsafe: !!values.unsafe,
  }, () => bar.end());
}
