import { commit } from '../core/jobs/commit';
import { parse, needPositionals, str, type CommandIO } from './common';
import { progressPrinter } from './progress';

const USAGE = 'strata commit [-p] [-b BASE] [-d] FILE';

export async function commitCommand(args: string[], io: CommandIO, signal: AbortSignal): Promise<number> {
  const { values, positionals } = parse(args, {
    progress: { type: 'boolean', short: 'p' },
    base: { type: 'string', short: 'b' },
    drop: { type: 'boolean', short: 'd' },
    format: { type: 'string', short: 'f' },
  }, USAGE);
  needPositionals(positionals, 1, USAGE);
  const bar = progressPrinter(!!values.progress && io.isTTY, io.err);
  const r = await commit({ signal, progress: bar.onProgress }, positionals[0]!, { base: str(values.base), keep: !!values.drop });
  bar.end();
  for (const d of r.otherDependents) {
    io.err(`strata: warning: ${d} also uses ${r.base} as its backing file and now sees the committed data\n`);
  }
  io.out('Image committed.\n');
  return 0;
}
