import { parseFormat } from '../core/chain/open';
import { UsageError } from '../core/errors';
import { parse, needPositionals, str, type CommandIO } from './common';
import { progressPrinter } from './progress';
import { parseCreateOptions } from '../core/jobs/create';
import { runOrPlan, PLAN_OPTIONS, optionsRecord } from './plan-output';

const USAGE = 'strata mirror [-p] [-f FMT] [-O FMT] [-o OPTS] [--sync full|top] [-n] [-U] [--dry-run [--output=human|json]] [--force] SRC DST';

export async function mirrorCommand(args: string[], io: CommandIO, signal: AbortSignal): Promise<number> {
  const { values, positionals } = parse(args, {
    progress: { type: 'boolean', short: 'p' },
    format: { type: 'string', short: 'f' },
    'output-format': { type: 'string', short: 'O' },
    options: { type: 'string', short: 'o', multiple: true },
    sync: { type: 'string' },
    n: { type: 'boolean', short: 'n' },
    'force-share': { type: 'boolean', short: 'U' },
    ...PLAN_OPTIONS,
  }, USAGE);
  needPositionals(positionals, 2, USAGE);
  const sync = str(values.sync) ?? 'full';
  if (sync !== 'full' && sync !== 'top') throw new UsageError(`--sync must be full or top, not '${sync}'`);
  const [srcName, dstName] = positionals as [string, string];
  const o = ((values.options as string[] | undefined) ?? []).join(',');
  parseCreateOptions(o); // checked before anything is opened
  const bar = progressPrinter(!!values.progress && io.isTTY, io.err);
  return runOrPlan(values, io, { signal, progress: bar.onProgress }, {
    op: 'mirror', source: srcName, target: dstName, sourceFormat: parseFormat(str(values.format)),
    targetFormat: parseFormat(str(values['output-format']), 'output format'), sync, existing: !!values.n,
    options: optionsRecord(o), forceShare: !!values['force-share'],
  }, (r) => {
    bar.end();
    if (values.progress && io.isTTY) io.err(`mirrored: ${r.summary}\n`);
  });
}
