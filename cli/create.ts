import { UsageError } from '../core/errors';
import {
  CREATE_OPTIONS_HELP, createPlanned, formattingLine, isOptionsHelp, parseCreateOptions, planCreate, resolveCreate,
  type CreateFormat, type CreateOptions,
} from '../core/jobs/create';
import { parse, parseSize, str, type CommandIO } from './common';
import { progressPrinter } from './progress';
import { PLAN_OPTIONS, printPlan } from './plan-output';

const USAGE = 'strata create [-q] [-p] -f qcow2|raw [-o OPTIONS] [-b BACKING -F FMT] [-u] [--dry-run [--output=human|json]] [--force] FILE [SIZE]';

export async function createCommand(args: string[], io: CommandIO, signal: AbortSignal): Promise<number> {
  const { values, positionals } = parse(args, {
    format: { type: 'string', short: 'f' },
    options: { type: 'string', short: 'o', multiple: true },
    backing: { type: 'string', short: 'b' },
    'backing-format': { type: 'string', short: 'F' },
    unsafe: { type: 'boolean', short: 'u' },
    quiet: { type: 'boolean', short: 'q' },
    progress: { type: 'boolean', short: 'p' },
    ...PLAN_OPTIONS,
  }, USAGE);
  // qemu-img joins repeated -o options with commas.
  const o = ((values.options as string[] | undefined) ?? []).join(',');
  if (isOptionsHelp(o)) { io.out(CREATE_OPTIONS_HELP); return 0; }
  const format = str(values.format) ?? 'raw';
  if (format !== 'qcow2' && format !== 'raw') throw new UsageError(`unknown format '${format}' (supported: qcow2, raw)\nusage: ${USAGE}`);
  if (positionals.length < 1) throw new UsageError(`missing FILE\nusage: ${USAGE}`);
  if (positionals.length > 2) throw new UsageError(`unexpected argument '${positionals[2]}'\nusage: ${USAGE}`);
  const [file, sizeArg] = positionals as [string, string | undefined];
  const opts: CreateOptions = parseCreateOptions(o);
  // -o size wins over the SIZE argument, as in qemu-img.
  if (sizeArg !== undefined && opts.size === undefined) opts.size = parseSize(sizeArg);
  const b = str(values.backing);
  const bf = str(values['backing-format']);
  if (b !== undefined) opts.backingFile = b;
  if (bf !== undefined) opts.backingFormat = bf;
  opts.unsafe = !!values.unsafe;
  const resolved = await resolveCreate(file, format as CreateFormat, opts);
  if (values['dry-run']) return printPlan(await planCreate(resolved), values, io);
  if (values.output !== undefined) throw new UsageError('--output goes with --dry-run here (the plan as JSON)');
  if (!values.quiet) io.out(formattingLine(resolved) + '\n');
  const bar = progressPrinter(!!values.progress && io.isTTY, io.err);
  await createPlanned(resolved, { signal, progress: bar.onProgress }, { force: !!values.force });
  bar.end();
  return 0;
}
