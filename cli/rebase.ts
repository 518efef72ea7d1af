import { rebase } from '../core/jobs/rebase';
import { parseFormat } from '../core/chain/open';
import { UsageError } from '../core/errors';
import { parse, needPositionals, str, type CommandIO } from './common';
import { progressPrinter } from './progress';

const USAGE = 'strata rebase [-p] [-u] [-f FMT] -b BACKING [-F FMT] FILE   (-b "" flattens)';

export async function rebaseCommand(args: string[], io: CommandIO, signal: AbortSignal): Promise<number> {
  const { values, positionals } = parse(args, {
    progress: { type: 'boolean', short: 'p' },
    unsafe: { type: 'boolean', short: 'u' },
    backing: { type: 'string', short: 'b' },
    'backing-format': { type: 'string', short: 'F' },
    format: { type: 'string', short: 'f' },
  }, USAGE);
  needPositionals(positionals, 1, USAGE);
  const backing = str(values.backing);
  if (backing === undefined) throw new UsageError(`-b BACKING is required ('' to flatten)\nusage: ${USAGE}`);
  if (values.format !== undefined && parseFormat(str(values.format)) !== 'qcow2') throw new UsageError('rebase works on qcow2 images');
  const bar = progressPrinter(!!values.progress && io.isTTY, io.err);
  await rebase({ signal, progress: bar.onProgress }, positionals[0]!, {
    backing, backingFormat: parseFormat(str(values['backing-format']), 'backing format'), unsafe: !!values.unsafe,
  });
  bar.end();
  return 0;
}
