import { openImage, closeChain, parseFormat } from '../core/chain/open';
import { measure } from '../core/jobs/measure';
import { convertSource } from '../core/jobs/plan';
import { parseCreateOptions } from '../core/jobs/create';
import type { DiskImage } from '../core/engine/image';
import { UsageError } from '../core/errors';
import { outputFormat, parse, parseSize, str, type CommandIO, imageArg, IMAGE_OPTS } from './common';

const USAGE = 'strata measure [--output=human|json] -O FMT [-o OPTS] [-f FMT] [-l SNAPSHOT] [-U] (FILE | --size SIZE)';

export async function measureCommand(args: string[], io: CommandIO, signal: AbortSignal): Promise<number> {
  // `--size -1` is a (bad) size, not an option.
  args = args.map((a, i) => (args[i - 1] === '--size' && a.startsWith('-') ? `\0${a}` : a));
  const { values, positionals } = parse(args, {
    ...IMAGE_OPTS,
    output: { type: 'string' },
    'output-format': { type: 'string', short: 'O' },
    options: { type: 'string', short: 'o', multiple: true },
    format: { type: 'string', short: 'f' },
    size: { type: 'string' },
    'force-share': { type: 'boolean', short: 'U' },
    snapshot: { type: 'string', short: 'l' },
  }, USAGE);
  // qemu-img measure's checks, in its order: the option list, the snapshot, the output, the size.
  for (const ol of (values.options as string[] | undefined) ?? []) {
    if (ol === '' || /^,|(^|[^,])(,,)*,$/.test(ol)) throw new UsageError(`invalid option list '${ol}'`).asQemu(`Invalid option list: ${ol}`);
  }
  const snapshot = str(values.snapshot);
  if (snapshot !== undefined && snapshot.startsWith('snapshot.')) {
    for (const part of snapshot.split(',')) {
      const k = part.split('=')[0]!;
      if (k !== 'snapshot.name' && k !== 'snapshot.id') {
        throw new UsageError(`unknown snapshot option '${k}' (use snapshot.name=NAME or snapshot.id=ID)`)
          .asQemu(`Invalid parameter '${k}'\nqemu-img: Failed in parsing snapshot param '${snapshot}'`);
      }
    }
  }
  if (values.output !== undefined && values.output !== 'human' && values.output !== 'json') {
    throw new UsageError(`--output must be human or json, not '${str(values.output)}'`).asQemu('--output must be used with human or json as argument.');
  }
  const fmt = outputFormat(values.output);
  const sizeArg = str(values.size)?.replace(/^\0/, '');
  const sizeGiven = sizeArg !== undefined ? parseSize(sizeArg) : undefined;
  if (positionals.length > 1) throw new UsageError(`give one FILE\nusage: ${USAGE}`).asQemu('At most one filename argument is allowed.');
  if (!positionals.length && (values['image-opts'] || values.format !== undefined || snapshot !== undefined)) {
    throw new UsageError(`--image-opts, -f and -l need a FILE\nusage: ${USAGE}`).asQemu('--image-opts, -f, and -l require a filename argument.');
  }
  if (positionals.length && sizeGiven !== undefined) throw new UsageError(`give either FILE or --size SIZE\nusage: ${USAGE}`).asQemu('--size N cannot be used together with a filename.');
  if (!positionals.length && sizeGiven === undefined) throw new UsageError(`give either FILE or --size SIZE\nusage: ${USAGE}`).asQemu('Either --size N or one filename must be specified.');
  const outName = str(values['output-format']) ?? 'raw';
  if (outName !== 'qcow2' && outName !== 'raw' && !/^(qcow|qed|vmdk|vpc|vhdx|vdi|parallels|luks|cloop|bochs|dmg|file|host_device)$/.test(outName)) {
    throw new UsageError(`unknown output format '${outName}' (supported: qcow2, raw)`).asQemu(`Unknown file format '${outName}'`);
  }
  const outFmt = parseFormat(outName, 'output format')!;
  // measure also takes preallocation=falloc|full (it only changes the arithmetic).
  let prealloc: 'off' | 'metadata' | 'falloc' | 'full' | undefined;
  const rest = ((values.options as string[] | undefined) ?? []).join(',').split(',').filter((kv) => {
    const m = /^preallocation=(off|metadata|falloc|full)$/.exec(kv);
    if (m) prealloc = m[1] as typeof prealloc;
    return !m;
  });
  const o = parseCreateOptions(rest.join(','));
  let src: DiskImage | null = null;
  let measured: DiskImage | null = null;
  try {
    if (positionals.length) {
      const name = imageArg(positionals[0]!, values);
      src = await openImage(name, { format: parseFormat(str(values.format)), lock: values['force-share'] ? 'none' : 'auto' });
      // -l: the internal snapshot's content is measured (the image stays open for closeChain).
      if (snapshot !== undefined) measured = await convertSource(src, snapshot, positionals[0]!);
    }
    const r = await measure({ signal }, {
      format: outFmt,
      clusterSize: o.clusterSize ?? 65536,
      refcountBits: o.refcountBits ?? 16,
      extendedL2: !!o.extendedL2,
      hasBacking: o.backingFile !== undefined,
      preallocation: prealloc,
      version: o.compat === '0.10' ? 2 : 3,
      ...(o.encryptFormat === 'luks' ? { luks: o.luks ?? {} } : {}),
    }, measured ?? src, sizeGiven);
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
