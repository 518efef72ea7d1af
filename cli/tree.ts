// strata tree: every image under the folders and files given, as chains (bases at the root,
// overlays below), with holders, problems and the commands that fix them.
import { Library } from '../core/library/library';
import { treeJson, treeText } from '../core/library/tree-output';
import { UsageError } from '../core/errors';
import { outputFormat, parse, type CommandIO } from './common';

const USAGE = 'strata tree [--output=human|json] PATH...';

export async function treeCommand(args: string[], io: CommandIO): Promise<number> {
  const { values, positionals } = parse(args, { output: { type: 'string' } }, USAGE);
  if (!positionals.length) throw new UsageError(`missing argument: the folders or images to scan\nusage: ${USAGE}`);
  const fmt = outputFormat(values.output);
  const snap = await new Library(positionals).scan();
  io.out(fmt === 'json' ? JSON.stringify(treeJson(snap), null, 4) + '\n' : treeText(snap));
  return 0;
}
