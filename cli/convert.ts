import { openImage, closeChain, parseFormat } from '../core/chain/open';
import { convert } from '../core/jobs/convert';
import { Qcow2Image } from '../core/engine/qcow2';
import type { DiskImage } from '../core/engine/image';
import { NotFoundError, UsageError } from '../core/errors';
import { parse, parseSize, needPositionals, str, type CommandIO } from './common';
import { parseCreateOptions } from '../core/jobs/create';
import { progressPrinter } from './progress';

const USAGE = 'strata convert [-p] [-t unsafe|writeback] [-f FMT] -O qcow2|raw [-o OPTS] [-c] [-B BACKING [-F FMT]] [-n] [-S SIZE] [--target-is-zero] [-l snapshot.name=NAME] [-U] SRC DST';

/** -l accepts "snapshot.name=N", "snapshot.id=I", both comma-separated, or a bare id-or-name. */
export function parseSnapshotParam(v: string): { id?: string; name?: string; any?: string } {
  if (!v.includes('=')) return { any: v };
  const out: { id?: string; name?: string } = {};
  for (const part of v.split(',')) {
    const [k, ...rest] = part.split('=');
    const val = rest.join('=');
    if (k === 'snapshot.name') out.name = val;
    else if (k === 'snapshot.id') out.id = val;
    else throw new UsageError(`unknown snapshot option '${k}' (use snapshot.name=NAME or snapshot.id=ID)`);
  }
  return out;
}

export async function convertCommand(args: string[], io: CommandIO, signal: AbortSignal): Promise<number> {
  const { values, positionals } = parse(args, {
    progress: { type: 'boolean', short: 'p' },
    format: { type: 'string', short: 'f' },
    'output-format': { type: 'string', short: 'O' },
    n: { type: 'boolean', short: 'n' },
    sparse: { type: 'string', short: 'S' },
    'target-is-zero': { type: 'boolean' },
    snapshot: { type: 'string', short: 'l' },
    'snapshot-id': { type: 'string', short: 's' },
    'force-share': { type: 'boolean', short: 'U' },
    options: { type: 'string', short: 'o', multiple: true },
    compress: { type: 'boolean', short: 'c' },
    'backing': { type: 'string', short: 'B' },
    'backing-format': { type: 'string', short: 'F' },
    cache: { type: 'string', short: 't' },
  }, USAGE);
  const cache = str(values.cache) ?? 'unsafe';
  if (cache !== 'unsafe' && cache !== 'writeback') throw new UsageError(`-t must be unsafe or writeback, not '${cache}'`);
  needPositionals(positionals, 2, USAGE);
  const outFmt = parseFormat(str(values['output-format']) ?? 'raw', 'output format')!;
  const create = parseCreateOptions(((values.options as string[] | undefined) ?? []).join(','));
  if (values.backing !== undefined) {
    if (outFmt !== 'qcow2') throw new UsageError('-B needs a qcow2 target (-O qcow2)');
    create.backingFile = str(values.backing);
    create.backingFormat = str(values['backing-format']) ?? create.backingFormat;
  }
  if (values.compress && outFmt !== 'qcow2') throw new UsageError('-c (compression) needs a qcow2 target (-O qcow2)');
  if (values.n && values.options) throw new UsageError('-o cannot be used with -n (the target exists already)');
  if (values['target-is-zero'] && !values.n) throw new UsageError('--target-is-zero requires -n (an existing target)');
  const minSparse = values.sparse !== undefined ? parseSize(str(values.sparse)!, '-S size') : 4096;
  const [srcName, dstName] = positionals as [string, string];
  let src: DiskImage | null = null;
  try {
    src = await openImage(srcName, { format: parseFormat(str(values.format)), lock: values['force-share'] ? 'none' : 'auto' });
    let from: DiskImage = src;
    const snap = str(values.snapshot) ?? str(values['snapshot-id']);
    if (snap !== undefined) {
      if (!(src instanceof Qcow2Image)) throw new UsageError(`${srcName}: raw images have no internal snapshots`);
      const q = parseSnapshotParam(snap);
      const entry = src.snapshots.find((s) => (q.any !== undefined ? s.id === q.any || s.name === q.any : (q.id === undefined || s.id === q.id) && (q.name === undefined || s.name === q.name)));
      if (!entry) throw new NotFoundError(`no snapshot matching '${snap}'`, srcName);
      from = await src.snapshotView(entry);
    }
    const bar = progressPrinter(!!values.progress && io.isTTY, io.err);
    await convert({ signal, progress: bar.onProgress }, from, dstName, {
      format: outFmt, create, existing: !!values.n, cache, targetIsZero: !!values['target-is-zero'], minSparse, compress: !!values.compress,
    });
    bar.end();
  } finally {
    await closeChain(src);
  }
  return 0;
}
