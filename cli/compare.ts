import { openImage, closeChain, parseFormat } from '../core/chain/open';
import { compare, CompareReadError } from '../core/jobs/compare';
import type { DiskImage } from '../core/engine/image';
import { asQemu, parse, needPositionals, reportError, str, type CommandIO, imageArg, IMAGE_OPTS } from './common';
import { commandProgress } from './progress';

const USAGE = 'strata compare [-f FMT] [-F FMT] [-s] [-q] [-p] [-U] A B';

export async function compareCommand(args: string[], io: CommandIO, signal: AbortSignal): Promise<number> {
  const { values, positionals } = parse(args, {
    ...IMAGE_OPTS,
    format: { type: 'string', short: 'f' },
    'format-b': { type: 'string', short: 'F' },
    strict: { type: 'boolean', short: 's' },
    quiet: { type: 'boolean', short: 'q' },
    progress: { type: 'boolean', short: 'p' },
    'force-share': { type: 'boolean', short: 'U' },
  }, USAGE);
  needPositionals(positionals, 2, USAGE);
  const fa = parseFormat(str(values.format));
  const fb = parseFormat(str(values['format-b'])) ?? fa;
  let a: DiskImage | null = null;
  let b: DiskImage | null = null;
  try {
    const lock = values['force-share'] ? 'none' : 'auto';
    a = await openImage(imageArg(positionals[0]!, values), { format: fa, lock });
    b = await openImage(imageArg(positionals[1]!, values), { format: fb, lock });
    const bar = commandProgress(io, !!values.progress, 2, false);
    let r: Awaited<ReturnType<typeof compare>>;
    try {
      r = await compare({ signal, progress: bar.onProgress }, a, b, { strict: !!values.strict });
    } catch (err) {
      // qemu-img's status for a failed read (4), apart from failing to open (2).
      if (err instanceof CompareReadError && asQemu(io)) {
        bar.end();
        const code = reportError(err, io, 4);
        // qemu-img has printed the size warning before it reads past the shorter image (its
        // stdout, buffered, reaches a pipe after the error).
        if (!values.quiet && !values.strict && a.virtualSize !== b.virtualSize && err.offset >= Math.min(a.virtualSize, b.virtualSize)) io.out('Warning: Image size mismatch!\n');
        return code;
      }
      throw err;
    }
    bar.end();
    // -q: the exit status only. As qemu-img, the size warning comes once the common part
    // compared equal: a mismatch inside it is reported alone.
    const out = values.quiet ? () => {} : io.out;
    const common = Math.min(a.virtualSize, b.virtualSize);
    if (r.sizeMismatch && !values.strict && (r.identical || r.offset >= common)) out('Warning: Image size mismatch!\n');
    if (r.identical) { out('Images are identical.\n'); return 0; }
    switch (r.reason) {
      case 'size': out('Strict mode: Image size mismatch!\n'); break;
      case 'status': out(`Strict mode: Offset ${r.offset} block status mismatch!\n`); break;
      case 'content': out(`Content mismatch at offset ${r.offset}!\n`); break;
    }
    return 1;
  } finally {
    await closeChain(a);
    await closeChain(b);
  }
}
