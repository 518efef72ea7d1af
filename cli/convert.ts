import { closeChain, openImage, parseFormat } from '../core/chain/open';
import { SnapshotL1Error, UsageError } from '../core/errors';
import { parse, parseSize, needPositionals, str, type CommandIO, imageArg, IMAGE_OPTS } from './common';
import { convertDirect } from '../core/jobs/convert-direct';
import { parseCreateOptions } from '../core/jobs/create';
import { commandProgress, qemuConvertSteps, qemuStepsPrinter } from './progress';
import { PLAN_OPTIONS, optionsRecord, runOrPlan } from './plan-output';

export { parseSnapshotParam } from '../core/jobs/plan';

const USAGE = 'strata convert [-p] [-t unsafe|writeback] [-f FMT] -O qcow2|raw [-o OPTS] [-c] [-B BACKING [-F FMT]] [-n] [-S SIZE] [--target-is-zero] [-l snapshot.name=NAME] [-U] [--dry-run [--output=human|json]] [--force] SRC DST';

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
    'copy-range': { type: 'boolean', short: 'C' },
    salvage: { type: 'boolean' },
    bitmaps: { type: 'boolean' },
    'skip-broken-bitmaps': { type: 'boolean' },
    quiet: { type: 'boolean', short: 'q' },
    ...IMAGE_OPTS,
    ...PLAN_OPTIONS,
  }, USAGE);
  if (values.compress && values['copy-range']) throw new UsageError('Cannot enable copy offloading when -c is used').asQemu('Cannot enable copy offloading when -c is used');
  if (values.sparse !== undefined && values['copy-range']) throw new UsageError('Cannot enable copy offloading when -S is used').asQemu('Cannot enable copy offloading when -S is used');
  if (values['copy-range'] && values.salvage) throw new UsageError('Cannot use copy offloading in salvaging mode').asQemu('Cannot use copy offloading in salvaging mode');
  const cache = str(values.cache) ?? 'unsafe';
  if (cache !== 'unsafe' && cache !== 'writeback') throw new UsageError(`-t must be unsafe or writeback, not '${cache}'`);
  if (positionals.length < 2) needPositionals(positionals, 2, USAGE);
  if (values['skip-broken-bitmaps'] && !values.bitmaps) throw new UsageError('Use of --skip-broken-bitmaps requires --bitmaps').asQemu('Use of --skip-broken-bitmaps requires --bitmaps');
  if (positionals.length > 2 || values['copy-range'] || values.salvage || values['image-opts'] || values.bitmaps) {
    // Several sources, copy offloading, salvaging, option strings: run here, not as a job spec.
    if (values['dry-run']) throw new UsageError('--dry-run is not available with several sources, -C, --salvage or --image-opts');
    const sources = positionals.slice(0, -1).map((n) => imageArg(n, values));
    if (sources.length > 1 && (values.snapshot !== undefined || values['snapshot-id'] !== undefined)) throw new UsageError('No support for concatenating multiple snapshot').asQemu('No support for concatenating multiple snapshot');
    const outFmt = parseFormat(str(values['output-format']) ?? 'raw', 'output format')!;
    const o = ((values.options as string[] | undefined) ?? []).join(',');
    const bar = commandProgress(io, !!values.progress, 1, true);
    await convertDirect({ signal, progress: bar.onProgress, log: values.quiet ? undefined : (l) => io.err(`${io.program ?? 'strata'}: ${l}\n`) }, sources, positionals[positionals.length - 1]!, {
      op: 'convert', source: sources[0]!, target: positionals[positionals.length - 1]!, sourceFormat: parseFormat(str(values.format)), targetFormat: outFmt,
      compress: !!values.compress, options: optionsRecord(o), backing: str(values.backing),
      backingFormat: parseFormat(str(values['backing-format']), 'backing format'), existing: !!values.n,
      targetIsZero: !!values['target-is-zero'], minSparse: values.sparse !== undefined ? parseSize(str(values.sparse)!, '-S size') : 4096,
      snapshot: str(values.snapshot) ?? str(values['snapshot-id']), cache: (str(values.cache) ?? 'unsafe') as 'unsafe', forceShare: !!values['force-share'],
    }, { copyOffload: !!values['copy-range'], salvage: !!values.salvage, force: !!values.force, bitmaps: !!values.bitmaps, skipBroken: !!values['skip-broken-bitmaps'] });
    bar.end();
    return 0;
  }
  const outFmt = parseFormat(str(values['output-format']) ?? 'raw', 'output format')!;
  const o = ((values.options as string[] | undefined) ?? []).join(',');
  parseCreateOptions(o); // checked before anything is opened
  if (values.n && values.options) throw new UsageError('-o cannot be used with -n (the target exists already)').asQemu('-o has no effect when skipping image creation');
  // qemu-img asks for the backing format only when it creates the target (not with -n).
  if (values.backing !== undefined && !values.n && values['backing-format'] === undefined && !/(?:^|,)backing_fmt=/.test(o)) {
    throw new UsageError('a backing file (-B) needs its format: add -F qcow2 or -F raw').asQemu('Use of backing file requires explicit backing format');
  }
  const minSparse = values.sparse !== undefined ? parseSize(str(values.sparse)!, '-S size') : 4096;
  const [srcName, dstName] = positionals as [string, string];
  let bar = commandProgress(io, !!values.progress, 1, true);
  // qemu-img's own steps where they can be told in advance (a plain conversion).
  if (values.progress && (!io.isTTY || io.program === 'qemu-img') && !values['dry-run'] && !values.n && !values.compress && values.backing === undefined && values.snapshot === undefined && values['snapshot-id'] === undefined) {
    const src = await openImage(srcName, { format: parseFormat(str(values.format)), lock: 'none' });
    try {
      bar = qemuStepsPrinter(io.out, await qemuConvertSteps(src, minSparse));
    } finally {
      await closeChain(src);
    }
  }
  const snapshot = str(values.snapshot) ?? str(values['snapshot-id']);
  try {
    return await runOrPlan(values, io, { signal, progress: bar.onProgress }, {
      op: 'convert', source: srcName, target: dstName, sourceFormat: parseFormat(str(values.format)), targetFormat: outFmt,
      compress: !!values.compress, options: optionsRecord(o), backing: str(values.backing),
      backingFormat: parseFormat(str(values['backing-format']), 'backing format'), existing: !!values.n,
      targetIsZero: !!values['target-is-zero'], minSparse, snapshot,
      cache, forceShare: !!values['force-share'],
    }, () => bar.end());
  } catch (err) {
    // qemu-img fails only where it loads the snapshot's table (iotest 080).
    if (err instanceof SnapshotL1Error && snapshot !== undefined && err.names(snapshot)) err.asQemu(`Failed to load snapshot: ${err.qemuWords.what}`);
    throw err;
  }
}
