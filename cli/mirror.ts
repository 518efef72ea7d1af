import { dirname, isAbsolute, relative, resolve } from 'node:path';
import { openImage, closeChain, parseFormat, assertNotInChain, combineBackingPath } from '../core/chain/open';
import { hasProtocol, localPath } from '../core/chain/names';
import { mirror } from '../core/jobs/mirror';
import { openTarget, abandonTarget, type Target } from '../core/jobs/target';
import type { DiskImage } from '../core/engine/image';
import { CancelledError, UsageError } from '../core/errors';
import { parse, needPositionals, str, type CommandIO } from './common';
import { progressPrinter } from './progress';
import { parseCreateOptions } from '../core/jobs/create';
import { spaceNeeded } from '../core/jobs/convert';
import { explainNoSpace } from '../core/io/space';

/**
 * The source's backing name as the target must record it: a relative name resolves against
 * the folder of the image that records it, so from the target's folder it must lead to the
 * same file. Absolute and protocol names (json:, file:, ...) stay as they are.
 */
export function backingNameFor(target: string, source: string, backing: string): string {
  if (isAbsolute(backing) || hasProtocol(backing)) return backing;
  const full = combineBackingPath(source, backing);
  const from = dirname(resolve(localPath(target)));
  return dirname(resolve(localPath(source))) === from ? backing : relative(from, resolve(full));
}

const USAGE = 'strata mirror [-p] [-f FMT] [-O FMT] [-o OPTS] [--sync full|top] [-n] [-U] SRC DST';

export async function mirrorCommand(args: string[], io: CommandIO, signal: AbortSignal): Promise<number> {
  const { values, positionals } = parse(args, {
    progress: { type: 'boolean', short: 'p' },
    format: { type: 'string', short: 'f' },
    'output-format': { type: 'string', short: 'O' },
    options: { type: 'string', short: 'o', multiple: true },
    sync: { type: 'string' },
    n: { type: 'boolean', short: 'n' },
    'force-share': { type: 'boolean', short: 'U' },
  }, USAGE);
  needPositionals(positionals, 2, USAGE);
  const sync = str(values.sync) ?? 'full';
  if (sync !== 'full' && sync !== 'top') throw new UsageError(`--sync must be full or top, not '${sync}'`);
  const [srcName, dstName] = positionals as [string, string];
  let src: DiskImage | null = null;
  let target: Target | null = null;
  try {
    src = await openImage(srcName, { format: parseFormat(str(values.format)), lock: values['force-share'] ? 'none' : 'auto' });
    const outFmt = parseFormat(str(values['output-format']), 'output format') ?? src.format;
    const create = parseCreateOptions(((values.options as string[] | undefined) ?? []).join(','));
    if (sync === 'top') {
      if (!src.backingFile) throw new UsageError(`${srcName}: --sync top needs a source with a backing file`);
      if (outFmt !== 'qcow2') throw new UsageError('--sync top needs a qcow2 target (it keeps the backing file)');
      create.backingFile ??= backingNameFor(dstName, src.filename, src.backingFile);
      create.backingFormat ??= src.backingFormat ?? src.backing?.format;
    }
    await assertNotInChain(dstName, src, 'mirror');
    const spec = { format: outFmt, create, existing: !!values.n };
    const needed = values.n ? undefined : await spaceNeeded({ signal }, src, dstName, spec);
    target = await openTarget(dstName, src.virtualSize, spec);
    const bar = progressPrinter(!!values.progress && io.isTTY, io.err);
    const r = await mirror({ signal, progress: bar.onProgress }, src, target.image, { sync, targetIsFresh: target.created && target.zeroInitialized });
    bar.end();
    await closeChain(target.image);
    target = null;
    if (values.progress && io.isTTY) io.err(`mirrored: ${r.bytesWritten} bytes written, ${r.bytesZeroed} bytes zeroed, ${r.bytesRead} bytes read\n`);
    return 0;
  } catch (err) {
    if (target) await abandonTarget(target, dstName);
    if (signal.aborted) throw new CancelledError(target?.created ? 'mirror cancelled; the partial target was removed' : 'mirror cancelled');
    throw explainNoSpace(err, dstName);
  } finally {
    await closeChain(src);
  }
}
