import { openImage, closeChain, parseFormat } from '../core/chain/open';
import { convert } from '../core/jobs/convert';
import { Qcow2Image } from '../core/engine/qcow2';
import type { DiskImage } from '../core/engine/image';
import { NotFoundError, UsageError } from '../core/errors';
import { parse, parseSize, needPositionals, str, type CommandIO } from './common';
import { progressPrinter } from './progress';

const USAGE = 'strata convert [-p] [-f FMT] -O raw [-n] [-S SIZE] [--target-is-zero] [-l snapshot.name=NAME] SRC DST';

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
  }, USAGE);
  needPositionals(positionals, 2, USAGE);
  const outFmt = str(values['output-format']) ?? 'raw';
  if (outFmt !== 'raw') throw new UsageError(`convert -O ${outFmt}: only raw output is available in this build`);
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
      targetFormat: 'raw', existing: !!values.n, targetIsZero: !!values['target-is-zero'], minSparse,
    });
    bar.end();
  } finally {
    await closeChain(src);
  }
  return 0;
}
