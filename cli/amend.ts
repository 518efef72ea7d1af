import { parseFormat } from '../core/chain/open';
import { SnapshotL1Error, UsageError } from '../core/errors';
import { amend, parseAmendOptions } from '../core/jobs/amend';
import { asQemu, parse, str, type CommandIO, imageArg, IMAGE_OPTS } from './common';
import { printfFixed2 } from './progress';

const USAGE = 'strata amend [--image-opts] [-p] [-q] [-f FMT] [-t CACHE] [--force] -o OPTIONS FILE';

export const AMEND_OPTIONS_HELP = `Amend options for qcow2:
  compat=0.10|1.1          the image's compatibility level (both ways)
  lazy_refcounts=on|off    postpone refcount updates (compat=1.1 only)
  refcount_bits=1..64      refcount width, a power of two (other than 16: compat=1.1 only)
  size=SIZE                a new virtual size
  data_file=NAME           another name for the external data file (empty: none recorded)
  data_file_raw=off        the data file need no longer be a raw image of the disk
  backing_file, backing_fmt  only their current values (use rebase)
`;

export async function amendCommand(args: string[], io: CommandIO, signal: AbortSignal): Promise<number> {
  const { values, positionals } = parse(args, {
    ...IMAGE_OPTS,
    options: { type: 'string', short: 'o', multiple: true },
    format: { type: 'string', short: 'f' },
    cache: { type: 'string', short: 't' },
    progress: { type: 'boolean', short: 'p' },
    quiet: { type: 'boolean', short: 'q' },
    force: { type: 'boolean' },
  }, USAGE);
  const optList = values.options as string[] | undefined;
  if (!optList) throw new UsageError('Must specify options (-o)').asQemu("Must specify options (-o)\nTry 'qemu-img --help' for more information");
  const o = optList.join(',');
  if (o.split(',').some((kv) => kv === 'help' || kv === '?')) { io.out(AMEND_OPTIONS_HELP); return 0; }
  if (positionals.length !== 1) throw new UsageError('Expecting one image file name').asQemu('Expecting one image file name');
  const cache = str(values.cache);
  if (cache !== undefined && !['none', 'writeback', 'unsafe', 'directsync', 'writethrough'].includes(cache)) throw new UsageError(`Invalid cache option: ${cache}`).asQemu(`Invalid cache option: ${cache}`);
  const opts = parseAmendOptions(o);
  // -p: qemu-img's progress lines on stdout, terminal or not ("    (12.50/100%)\r"), printed
  // when they move by more than 1%, at 0 and at 100.
  const show = !!values.progress && !values.quiet;
  let last = 0;
  const print = (p: number) => {
    const cur = Math.fround(Math.min(100, p));
    // The lines overwrite each other: each ends with a carriage return, as qemu-img's.
    if (cur > last + 1 || cur < last - 1 || cur === 100 || cur === 0) { last = cur; io.out(`    (${printfFixed2(cur)}/100%)\r`); }
  };
  if (show) print(0);
  try {
    try {
      await amend({ signal, log: (l) => io.err(`${l}\n`) }, imageArg(positionals[0]!, values), opts, { format: parseFormat(str(values.format)), percent: show ? print : undefined, qemu: asQemu(io), force: !!values.force });
    } catch (err) {
      // A downgrade expands the zero clusters of every snapshot, loading each one's table:
      // qemu-img fails there (iotest 080).
      if (err instanceof SnapshotL1Error && opts.version === 2) {
        const { what, errno } = err.qemuWords;
        err.asQemu(`${what}\nqemu-img: Failed to turn zero into data clusters: ${errno}`);
      }
      throw err;
    }
    if (show) print(100);
  } finally {
    if (show) io.out('\n');
  }
  return 0;
}
