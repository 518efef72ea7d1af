import { parseFormat } from '../core/chain/open';
import { UsageError } from '../core/errors';
import { dd } from '../core/jobs/dd';
import { parse, parseSize, str, type CommandIO, imageArg, IMAGE_OPTS } from './common';

const USAGE = 'strata dd [--image-opts] [-U] [-f FMT] [-O FMT] [bs=BLOCK_SIZE] [count=BLOCKS] [skip=BLOCKS] if=INPUT of=OUTPUT';

/** qemu-img's cvtnum_full: a size with suffixes, between min and max. */
function ddNumber(name: string, value: string, min: number, max: number): number {
  let n: number;
  try {
    n = parseSize(value, name);
  } catch {
    throw new UsageError(`Invalid ${name} specified. You may use k, M, G, T, P or E suffixes for kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.`).asQemu(`Invalid ${name} specified. You may use k, M, G, T, P or E suffixes for\nqemu-img: kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.`);
  }
  if (n < min || n > max) throw new UsageError(`Invalid ${name} specified. Must be between ${min} and ${max}.`).asQemu(`Invalid ${name} specified. Must be between ${min} and ${max}.`);
  return n;
}

export async function ddCommand(args: string[], io: CommandIO, signal: AbortSignal): Promise<number> {
  const { values, positionals } = parse(args, {
    ...IMAGE_OPTS,
    format: { type: 'string', short: 'f' },
    'output-format': { type: 'string', short: 'O' },
    'force-share': { type: 'boolean', short: 'U' },
  }, USAGE);
  const ops: Record<string, string> = {};
  for (const a of positionals) {
    const eq = a.indexOf('=');
    const key = eq < 0 ? a : a.slice(0, eq);
    if (eq < 0 || !['bs', 'count', 'if', 'of', 'skip'].includes(key)) throw new UsageError(`unrecognized operand ${a}`).asQemu(`unrecognized operand ${a}`);
    ops[key] = a.slice(eq + 1);
  }
  const bs = ops.bs !== undefined ? ddNumber('bs', ops.bs, 1, 2 ** 31 - 1) : 512;
  const count = ops.count !== undefined ? ddNumber('count', ops.count, 0, Number.MAX_SAFE_INTEGER) : undefined;
  const skip = ops.skip !== undefined ? ddNumber('skip', ops.skip, 0, Number.MAX_SAFE_INTEGER) : undefined;
  if (ops.if === undefined || ops.of === undefined) throw new UsageError('Must specify both input and output files').asQemu('Must specify both input and output files');
  const outFormat = parseFormat(str(values['output-format']) ?? 'raw', 'output format')!;
  const input = imageArg(ops.if, values);
  const r = await dd({ signal }, {
    input, output: ops.of, inFormat: parseFormat(str(values.format)), outFormat, bs, count, skip, forceShare: !!values['force-share'],
  });
  if (r.skippedPastEnd) io.err(`${io.program ?? 'strata'}: ${ops.if}: cannot skip to specified offset\n`);
  return 0;
}
