import { openImage, closeChain, parseFormat } from '../core/chain/open';
import { measure } from '../core/jobs/measure';
import { parseCreateOptions } from '../core/jobs/create';
import type { DiskImage } from '../core/engine/image';
import { UsageError } from '../core/errors';
import { outputFormat, parse, parseSize, str, type CommandIO, imageArg, IMAGE_OPTS } from './common';

const USAGE = 'strata measure [--output=human|json] -O FMT [-o OPTS] [-f FMT] [-U] (FILE | --size SIZE)';

export async function measureCommand(args: string[], io: CommandIO, signal: AbortSignal): Promise<number> {
  const { values, positionals } = parse(args, {
    ...IMAGE_OPTS,
    output: { type: 'string' },
    'output-format': { type: 'string', short: 'O' },
    options: { type: 'string', short: 'o', multiple: true },
    format: { type: 'string', short: 'f' },
    size: { type: 'string' },
    'force-share': { type: 'boolean', short: 'U' },
  }, USAGE);
  const fmt = outputFormat(values.output);
  const outFmt = parseFormat(str(values['output-format']) ?? 'raw', 'output format')!;
  // measure also takes preallocation=falloc|full (it only changes the arithmetic).
  let prealloc: 'off' | 'metadata' | 'falloc' | 'full' | undefined;
  const rest = ((values.options as string[] | undefined) ?? []).join(',').split(',').filter((kv) => {
    const m = /^preallocation=(off|metadata|falloc|full)$/.exec(kv);
    if (m) prealloc = m[1] as typeof prealloc;
    return !m;
  });
  const o = parseCreateOptions(rest.join(','));
  if ((positionals.length === 1) === (values.size !== undefined)) throw new UsageError(`give either FILE or --size SIZE\nusage: ${USAGE}`);
  let src: DiskImage | null = null;
  try {
    if (positionals.length) src = await openImage(imageArg(positionals[0]!, values), { format: parseFormat(str(values.format)), lock: values['force-share'] ? 'none' : 'auto' });
    const r = await measure({ signal }, {
      format: outFmt,
      clusterSize: o.clusterSize ?? 65536,
      refcountBits: o.refcountBits ?? 16,
      extendedL2: !!o.extendedL2,
      hasBacking: o.backingFile !== undefined,
      preallocation: prealloc,
      version: o.compat === '0.10' ? 2 : 3,
      ...(o.encryptFormat === 'luks' ? { luks: o.luks ?? {} } : {}),
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
