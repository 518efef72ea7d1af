import { parseFormat } from '../core/chain/open';
import { UsageError } from '../core/errors';
import { parse, parseSize, str, type CommandIO, imageArg, IMAGE_OPTS } from './common';
import { PLAN_OPTIONS, runOrPlan } from './plan-output';

const USAGE = 'strata resize [-q] [--shrink] [--preallocation=off|metadata|falloc|full] [-f FMT] [--dry-run [--output=human|json]] [--force] FILE [+|-]SIZE';

export async function resizeCommand(args: string[], io: CommandIO, signal: AbortSignal): Promise<number> {
  // "-10G" must reach us as a size, not as an option: take the last argument out first.
  const sizeArg = args[args.length - 1];
  if (args.length < 2 || sizeArg === undefined) throw new UsageError(`missing argument\nusage: ${USAGE}`);
  const { values, positionals } = parse(args.slice(0, -1), {
    ...IMAGE_OPTS,
    shrink: { type: 'boolean' },
    preallocation: { type: 'string' },
    quiet: { type: 'boolean', short: 'q' },
    format: { type: 'string', short: 'f' },
    ...PLAN_OPTIONS,
  }, USAGE);
  if (positionals.length !== 1) throw new UsageError(`expected FILE and SIZE\nusage: ${USAGE}`);
  const pre = str(values.preallocation);
  if (pre !== undefined && !['off', 'metadata', 'falloc', 'full'].includes(pre)) throw new UsageError(`Invalid preallocation mode '${pre}'`);
  const sign = sizeArg.startsWith('+') ? 1 : sizeArg.startsWith('-') ? -1 : 0;
  const n = parseSize(sign ? sizeArg.slice(1) : sizeArg);
  return runOrPlan(values, io, { signal }, {
    op: 'resize', image: imageArg(positionals[0]!, values), format: parseFormat(str(values.format)), size: sign ? sign * n : n, relative: sign !== 0, shrink: !!values.shrink, preallocation: pre as 'off' | undefined,
  }, () => { if (!values.quiet) io.out('Image resized.\n'); });
}
