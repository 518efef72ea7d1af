import { parseFormat } from '../core/chain/open';
import { UsageError } from '../core/errors';
import { bitmapJob, type BitmapAction } from '../core/jobs/bitmap';
import { parse, parseSize, str, type CommandIO, imageArg, IMAGE_OPTS } from './common';

const USAGE = 'strata bitmap (--merge SOURCE | --add | --remove | --clear | --enable | --disable)... [-b SOURCE_FILE [-F SOURCE_FMT]] [-g GRANULARITY] [--image-opts | -f FMT] FILE BITMAP';

export async function bitmapCommand(args: string[], io: CommandIO, signal: AbortSignal): Promise<number> {
  const { values, positionals } = parse(args, {
    ...IMAGE_OPTS,
    add: { type: 'boolean', multiple: true },
    remove: { type: 'boolean', multiple: true },
    clear: { type: 'boolean', multiple: true },
    enable: { type: 'boolean', multiple: true },
    disable: { type: 'boolean', multiple: true },
    merge: { type: 'string', multiple: true },
    granularity: { type: 'string', short: 'g' },
    'source-file': { type: 'string', short: 'b' },
    'source-format': { type: 'string', short: 'F' },
    format: { type: 'string', short: 'f' },
  }, USAGE);
  // The actions run in the order given, as qemu-img's.
  const actions: BitmapAction[] = [];
  for (let i = 0; i < args.length; i++) {
    const a = args[i]!;
    if (a === '--') break;
    const m = /^--(add|remove|clear|enable|disable)$/.exec(a);
    if (m) actions.push({ act: m[1] as 'add' });
    else if (a === '--merge') actions.push({ act: 'merge', source: args[++i]! });
    else if (a.startsWith('--merge=')) actions.push({ act: 'merge', source: a.slice(8) });
    else if (/^-[bfFg]$/.test(a) || a === '--granularity' || a === '--source-file' || a === '--source-format') i++;
  }
  if (actions.length === 0) throw new UsageError('Need at least one of --add, --remove, --clear, --enable, --disable, or --merge').asQemu('Need at least one of --add, --remove, --clear, --enable, --disable, or --merge');
  let granularity: number | undefined;
  const g = str(values.granularity);
  if (g !== undefined) {
    try { granularity = parseSize(g, 'granularity'); } catch { throw new UsageError('Invalid granularity specified. You may use k, M, G, T, P or E suffixes for kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.').asQemu('Invalid granularity specified. You may use k, M, G, T, P or E suffixes for\nqemu-img: kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.'); }
    if (granularity === 0) granularity = undefined; // qemu-img: 0 means the default
  }
  const add = actions.some((a) => a.act === 'add');
  const merge = actions.some((a) => a.act === 'merge');
  if (granularity !== undefined && !add) throw new UsageError('granularity only supported with --add').asQemu('granularity only supported with --add');
  if (values['source-format'] !== undefined && values['source-file'] === undefined) throw new UsageError('-F only supported with -b').asQemu('-F only supported with -b');
  if (values['source-file'] !== undefined && !merge) throw new UsageError('Merge bitmap source file only supported with --merge').asQemu('Merge bitmap source file only supported with --merge');
  if (positionals.length !== 2) throw new UsageError('Expecting filename and bitmap name').asQemu('Expecting filename and bitmap name');
  await bitmapJob({ signal, log: (l) => io.err(`${l}\n`) }, imageArg(positionals[0]!, values), positionals[1]!, actions, {
    format: parseFormat(str(values.format)), granularity, sourceFile: str(values['source-file']), sourceFormat: parseFormat(str(values['source-format'])),
  });
  return 0;
}
