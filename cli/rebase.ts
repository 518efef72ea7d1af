import { QEMU_FORMAT_NAMES, parseFormat } from '../core/chain/open';
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
  const fmtName = str(values['backing-format']);
  // An unsafe rebase only records the name: qemu-img takes any format it knows there
  // (host_device, file, vmdk...; iotest 031) and refuses others in its own words.
  let backingFormatName: string | undefined;
  if (values.unsafe && fmtName && fmtName !== 'qcow2' && fmtName !== 'raw') {
    if (!QEMU_FORMAT_NAMES.has(fmtName)) {
      throw new UsageError(`unknown backing format '${fmtName}' (QEMU knows none of that name)`).asQemu(`Invalid format name: '${fmtName}'`);
    }
    backingFormatName = fmtName;
  }
  const bar = commandProgress(io, !!values.progress, 2, true);
  return runOrPlan(values, io, { signal, progress: bar.onProgress }, {
    op: 'rebase', image: imageArg(positionals[0]!, values), backing, unsafe: !!values.unsafe,
    ...(backingFormatName !== undefined ? { backingFormatName } : { backingFormat: parseFormat(fmtName, 'backing format') }),
  }, () => bar.end());
}
