import { StrataError, UsageError } from '../core/errors';
import { createLuksImage } from '../core/jobs/create';
import {
  CREATE_OPTIONS_HELP, REPORTED_AFTER_FORMATTING, createPlanned, formattingLine, isOptionsHelp, parseCreateOptions, planCreate, resolveCreate,
  type CreateFormat, type CreateOptions,
} from '../core/jobs/create';
import { asQemu, parse, parseSize, str, type CommandIO } from './common';
import { progressPrinter } from './progress';
import { PLAN_OPTIONS, printPlan } from './plan-output';

const USAGE = 'strata create [-q] [-p] -f qcow2|raw|luks [-o OPTIONS] [-b BACKING -F FMT] [-u] [--dry-run [--output=human|json]] [--force] FILE [SIZE]';

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
  if (format === 'luks') return createLuksCommand(positionals, o, !!values.quiet, io);
  if (format !== 'qcow2' && format !== 'raw') throw new UsageError(`unknown format '${format}' (supported: qcow2, raw)\nusage: ${USAGE}`);
  if (positionals.length < 1) throw new UsageError(`missing FILE\nusage: ${USAGE}`);
  if (positionals.length > 2) throw new UsageError(`unexpected argument '${positionals[2]}'\nusage: ${USAGE}`);
  const [file, sizeArg] = positionals as [string, string | undefined];
  // The SIZE argument is read first (qemu-img's cvtnum), then -o (errors naming the file).
  const sizeGiven = sizeArg !== undefined ? parseSize(sizeArg) : undefined;
  let opts: CreateOptions;
  try {
    opts = parseCreateOptions(o, { deferInvalid: true });
  } catch (err) {
    if (err instanceof StrataError && err.qemu !== undefined) err.qemu = `${file}: ${err.qemu}`;
    throw err;
  }
  if (sizeGiven !== undefined) {
    if (opts.size !== undefined) {
      throw new UsageError(`${file}: the size is given twice (-o size=${opts.given?.size} and ${sizeArg}): give it once`)
        .asQemu(`${file}: The image size must be specified only once`);
    }
    opts.size = sizeGiven;
  }
  const b = str(values.backing);
  const bf = str(values['backing-format']);
  if (b !== undefined) opts.backingFile = b;
  if (bf !== undefined) opts.backingFormat = bf;
  opts.unsafe = !!values.unsafe;
  let resolved;
  try {
    resolved = await resolveCreate(file, format as CreateFormat, opts);
  } catch (err) {
    // qemu-img reports the format driver's refusals after its "Formatting" line.
    if (asQemu(io) && !values.quiet && !values['dry-run'] && err instanceof Error && REPORTED_AFTER_FORMATTING.has(err)) {
      io.out(formattingLine({ path: file, format: format as CreateFormat, size: opts.size ?? 0, sizeGiven: opts.size ?? 0, preallocation: opts.preallocation ?? 'off', qcow2: null, opts }) + '\n');
    }
    throw err;
  }
  if (values['dry-run']) return printPlan(await planCreate(resolved), values, io);
  if (values.output !== undefined) throw new UsageError('--output goes with --dry-run here (the plan as JSON)');
  if (!values.quiet) io.out(formattingLine(resolved) + '\n');
  const bar = progressPrinter(!!values.progress && io.isTTY, io.err);
  // Replacing a backing file an overlay still uses needs --force from strata. Started as
  // qemu-img (the drop-in), it writes as qemu-img does: whoever linked it under that name asked
  // for qemu-img's behaviour (iotests 024, 043, 097, 154).
  await createPlanned(resolved, { signal, progress: bar.onProgress }, { force: !!values.force || asQemu(io) });
  bar.end();
  return 0;
}

/**
 * qemu-img create -f luks: a raw LUKS volume (the LUKS header and key material, then the
 * encrypted disk). Its options are LUKS's own, without the encrypt. prefix qcow2 gives them.
 */
async function createLuksCommand(positionals: string[], o: string, quiet: boolean, io: CommandIO): Promise<number> {
  if (positionals.length !== 2) throw new UsageError(`create -f luks needs FILE and SIZE\nusage: ${USAGE}`);
  const [file, sizeArg] = positionals as [string, string];
  const size = parseSize(sizeArg);
  const given = o === '' ? [] : o.split(',');
  if (!quiet) io.out(`Formatting '${file}', fmt=luks size=${size}${given.map((g) => ` ${g}`).join('')}\n`);
  await createLuksImage(file, size, o);
  return 0;
}
