import { openImage, closeChain, parseFormat } from '../core/chain/open';
import { measure } from '../core/jobs/measure';
import { parseCreateOptions } from '../core/jobs/create';
import type { DiskImage } from '../core/engine/image';
import { UsageError } from '../core/errors';
import { outputFormat, parse, parseSize, str, type CommandIO } from './common';

const USAGE = 'strata measure [--output=human|json] -O FMT [-o OPTS] [-f FMT] [-U] (FILE | --size SIZE)';

export async function measureCommand(args: string[], io: CommandIO, signal: AbortSignal): Promise<number> {
  const { values, positionals } = parse(args, {
    output: { type: 'string' },
    'output-format': { type: 'string', short: 'O' },
    options: { type: 'string', short: 'o', multiple: true },
    format: { type: 'string', short: 'f' },
    size: { type: 'string' },
    'force-share': { type: 'boolean', short: 'U' },
  }, USAGE);
  const fmt = outputFormat(values.output);
  const outFmt = parseFormat(str(values['output-format']) ?? 'raw', 'output format')!;
  const o = parseCreateOptions(((values.options as string[] | undefined) ?? []).join(','));
  if ((positionals.length === 1) === (values.size !== undefined)) throw new UsageError(`give either FILE or --size SIZE\nusage: ${USAGE}`);
  let src: DiskImage | null = null;
  try {
    if (positionals.length) src = await openImage(positionals[0]!, { format: parseFormat(str(values.format)), lock: values['force-share'] ? 'none' : 'auto' });
    const r = await measure({ signal }, {
      format: outFmt,
      clusterSize: o.clusterSize ?? 65536,
      refcountBits: o.refcountBits ?? 16,
      extendedL2: !!o.extendedL2,
      hasBacking: o.backingFile !== undefined,
      preallocation: o.preallocation,
    }, src, values.size !== undefined ? parseSize(str(values.size)!) : undefined);
    if (fmt === 'json') {
      io.out(JSON.stringify(r, null, 4) + '\n');
    } else {
      io.out(`required size: ${r.required}\nfully allocated size: ${r['fully-allocated']}\n`);
      if (r.bitmaps !== undefined) io.out(`bitmaps size: ${r.bitmaps}\n`);
    }
  } finally {
    await closeChain(src);
  }
  return 0;
}
