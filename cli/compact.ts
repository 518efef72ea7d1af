import { parse, needPositionals, type CommandIO } from './common';
import { parseNbdName } from '../core/chain/nbd-name';
import { nbdWriteRefusal } from '../core/chain/nbd-open';
import { progressPrinter } from './progress';
import { PLAN_OPTIONS, runOrPlan } from './plan-output';

const USAGE = 'strata compact [-p] [-c] [--dry-run [--output=human|json]] IMAGE';

export async function compactCommand(args: string[], io: CommandIO, signal: AbortSignal): Promise<number> {
  const { values, positionals } = parse(args, {
    progress: { type: 'boolean', short: 'p' },
    compress: { type: 'boolean', short: 'c' },
    ...PLAN_OPTIONS,
  }, USAGE);
  needPositionals(positionals, 1, USAGE);
  // Compaction rewrites the image's file in place: an NBD export has none here.
  if (parseNbdName(positionals[0]!)) throw nbdWriteRefusal(positionals[0]!);
  const bar = progressPrinter(!!values.progress && io.isTTY, io.err);
  return runOrPlan(values, io, { signal, progress: bar.onProgress }, { op: 'compact', image: positionals[0]!, compress: !!values.compress }, (r) => {
    bar.end();
    io.out(`Image compacted: ${r.summary.replace(/^compacted \S+ /, '')}.\n`);
  });
}
