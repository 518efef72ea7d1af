import { openImage, closeChain, parseFormat } from '../core/chain/open';
import { Qcow2Image } from '../core/engine/qcow2';
import type { DiskImage } from '../core/engine/image';
import { mapImage, mapEntryJson, formatMapHuman } from '../core/chain/map';
import { mapSummary, mapSummaryJson, mapSummaryText } from '../core/chain/map-summary';
import { sizeToStr } from '../core/chain/size-str';
import { UsageError } from '../core/errors';
import { outputFormat, parse, needPositionals, str, type CommandIO, imageArg, IMAGE_OPTS } from './common';

const USAGE = 'strata map [--output=human|json] [--summary N] [-U] [-f FMT] FILE';

export async function mapCommand(args: string[], io: CommandIO, signal?: AbortSignal): Promise<number> {
  const { values, positionals } = parse(args, {
    ...IMAGE_OPTS,
    output: { type: 'string' },
    summary: { type: 'string' },
    'force-share': { type: 'boolean', short: 'U' },
    format: { type: 'string', short: 'f' },
  }, USAGE);
  needPositionals(positionals, 1, USAGE);
  const fmt = outputFormat(values.output);
  let buckets: number | null = null;
  if (values.summary !== undefined) {
    buckets = Number(values.summary);
    if (!/^\d+$/.test(String(values.summary)) || buckets < 1 || buckets > 1 << 20) throw new UsageError(`--summary takes a bucket count from 1 to ${1 << 20}, not '${String(values.summary)}'`);
  }
  // Like `qemu-img info`, map needs no consistent-read permission, so it works on images in use.
  const top = await openImage(imageArg(positionals[0]!, values), { format: parseFormat(str(values.format)), lock: 'none' });
  // qemu-img map prints data clusters past the end of the file as any other (only reads fail).
  for (let img: DiskImage | null = top; img; img = img.backing) if (img instanceof Qcow2Image) img.mapPastEof = true;
  try {
    if (buckets !== null) {
      const m = await mapSummary(top, buckets, signal);
      io.out(fmt === 'json' ? JSON.stringify(mapSummaryJson(m)) + '\n' : mapSummaryText(m, sizeToStr));
    } else if (fmt === 'json') {
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
