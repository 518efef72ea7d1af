import { openImage, closeChain, parseFormat } from '../core/chain/open';
import { mapImage, mapEntryJson, formatMapHuman } from '../core/chain/map';
import { outputFormat, parse, needPositionals, str, type CommandIO } from './common';

const USAGE = 'strata map [--output=human|json] [-U] [-f FMT] FILE';

export async function mapCommand(args: string[], io: CommandIO): Promise<number> {
  const { values, positionals } = parse(args, {
    output: { type: 'string' },
    'force-share': { type: 'boolean', short: 'U' },
    format: { type: 'string', short: 'f' },
  }, USAGE);
  needPositionals(positionals, 1, USAGE);
  const fmt = outputFormat(values.output);
  // Like `qemu-img info`, map needs no consistent-read permission, so it works on images in use.
  const top = await openImage(positionals[0]!, { format: parseFormat(str(values.format)), lock: 'none' });
  try {
    if (fmt === 'json') {
      // Buffer lines so a huge map is written in large chunks.
      let chunk = '[';
      let first = true;
      for await (const e of mapImage(top)) {
        chunk += (first ? '' : ',\n') + mapEntryJson(e);
        first = false;
        if (chunk.length > 1 << 16) { io.out(chunk); chunk = ''; }
      }
      io.out(chunk + ']\n');
    } else {
      await formatMapHuman(top, mapImage(top), io.out);
    }
  } finally {
    await closeChain(top);
  }
  return 0;
}
