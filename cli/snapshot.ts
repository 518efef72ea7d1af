import { openImageFile, closeChain, parseFormat } from '../core/chain/open';
import { formatSnapshotTable, snapshotInfo } from '../core/chain/info';
import { Qcow2Image } from '../core/engine/qcow2';
import { Qcow2Writable } from '../core/engine/qcow2-write';
import { applySnapshot, createSnapshot, deleteSnapshot } from '../core/engine/snapshots';
import { UsageError } from '../core/errors';
import { parse, needPositionals, str, type CommandIO } from './common';

const USAGE = 'strata snapshot -l | -c NAME | -a NAME | -d NAME [-U] [-f FMT] FILE';

export async function snapshotCommand(args: string[], io: CommandIO): Promise<number> {
  const { values, positionals } = parse(args, {
    list: { type: 'boolean', short: 'l' },
    create: { type: 'string', short: 'c' },
    apply: { type: 'string', short: 'a' },
    delete: { type: 'string', short: 'd' },
    format: { type: 'string', short: 'f' },
    'force-share': { type: 'boolean', short: 'U' },
  }, USAGE);
  needPositionals(positionals, 1, USAGE);
  const actions = ['list', 'create', 'apply', 'delete'].filter((k) => values[k] !== undefined);
  if (actions.length !== 1) throw new UsageError(`give exactly one of -l, -c, -a, -d\nusage: ${USAGE}`);
  const writing = !values.list;
  if (writing && values['force-share']) throw new UsageError('-U (force share) is only allowed with -l');
  const img = await openImageFile(positionals[0]!, { format: parseFormat(str(values.format)), writable: writing, lock: values['force-share'] ? 'none' : 'auto' });
  try {
    if (!(img instanceof Qcow2Image)) throw new UsageError(`${img.filename}: raw images have no internal snapshots`);
    if (values.list) {
      if (img.snapshots.length) io.out('Snapshot list:\n' + formatSnapshotTable(img.snapshots.map(snapshotInfo)));
    } else if (img instanceof Qcow2Writable) {
      if (values.create !== undefined) await createSnapshot(img, str(values.create)!);
      else if (values.apply !== undefined) await applySnapshot(img, str(values.apply)!);
      else await deleteSnapshot(img, str(values.delete)!);
    }
  } finally {
    await closeChain(img);
  }
  return 0;
}
