import { openImageFile, closeChain, parseFormat } from '../core/chain/open';
import { formatSnapshotTable, snapshotInfo } from '../core/chain/info';
import { Qcow2Image } from '../core/engine/qcow2';
import { SnapshotL1Error, UsageError } from '../core/errors';
import { asQemu, parse, needPositionals, str, type CommandIO, imageArg, IMAGE_OPTS } from './common';
import { PLAN_OPTIONS, runOrPlan } from './plan-output';

const USAGE = 'strata snapshot -l | -c NAME | -a NAME | -d NAME [-U] [-f FMT] [--dry-run [--output=human|json]] [--force] FILE';

export async function snapshotCommand(args: string[], io: CommandIO, signal: AbortSignal): Promise<number> {
  const { values, positionals } = parse(args, {
    ...IMAGE_OPTS,
    list: { type: 'boolean', short: 'l' },
    create: { type: 'string', short: 'c' },
    apply: { type: 'string', short: 'a' },
    delete: { type: 'string', short: 'd' },
    format: { type: 'string', short: 'f' },
    'force-share': { type: 'boolean', short: 'U' },
    ...PLAN_OPTIONS,
  }, USAGE);
  needPositionals(positionals, 1, USAGE);
  const actions = ['list', 'create', 'apply', 'delete'].filter((k) => values[k] !== undefined);
  if (actions.length !== 1) throw new UsageError(`give exactly one of -l, -c, -a, -d\nusage: ${USAGE}`);
  const format = parseFormat(str(values.format));
  if (values.list) {
    if (values['dry-run']) throw new UsageError('-l writes nothing: --dry-run goes with -c, -a or -d');
    const img = await openImageFile(imageArg(positionals[0]!, values), { format, lock: values['force-share'] ? 'none' : 'auto' });
    try {
      if (!(img instanceof Qcow2Image)) throw new UsageError(`${img.filename}: raw images have no internal snapshots`);
      if (img.snapshots.length) io.out('Snapshot list:\n' + formatSnapshotTable(img.snapshots.map(snapshotInfo)));
    } finally {
      await closeChain(img);
    }
    return 0;
  }
  if (values['force-share']) throw new UsageError('-U (force share) is only allowed with -l');
  if (format === 'raw') throw new UsageError(`${positionals[0]}: raw images have no internal snapshots`);
  const action = actions[0] as 'create' | 'apply' | 'delete';
  const spec = { op: 'snapshot' as const, image: imageArg(positionals[0]!, values), action, name: str(values[action])!, ...(asQemu(io) ? { qemu: true } : {}) };
  try {
    return await runOrPlan(values, io, { signal }, spec, () => {});
  } catch (err) {
    // qemu-img fails only where it loads the snapshot's table (iotest 080).
    if (err instanceof SnapshotL1Error && action !== 'create' && err.names(spec.name)) {
      const { what, errno } = err.qemuWords;
      err.asQemu(action === 'apply' ? `${what}\nqemu-img: Could not apply snapshot '${spec.name}': Failed to load snapshot: ${errno}` : `Could not delete snapshot '${spec.name}': ${what}`);
    }
    throw err;
  }
}
