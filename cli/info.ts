import { formatInfoHuman, imageInfo, type ImageInfo } from '../core/chain/info';
import { openImage, openImageFile, closeChain, chainOf, parseFormat } from '../core/chain/open';
import { parseImageName } from '../core/chain/names';
import { outputFormat, parse, needPositionals, qapiJson, str, type CommandIO, imageArg, IMAGE_OPTS } from './common';

const USAGE = 'strata info [--output=human|json] [--backing-chain] [-U] [-f FMT] FILE';

export async function infoCommand(args: string[], io: CommandIO): Promise<number> {
  const { values, positionals } = parse(args, {
    ...IMAGE_OPTS,
    output: { type: 'string' },
    'backing-chain': { type: 'boolean' },
    'force-share': { type: 'boolean', short: 'U' },
    format: { type: 'string', short: 'f' },
  }, USAGE);
  needPositionals(positionals, 1, USAGE);
  const fmt = outputFormat(values.output);
  const format = parseFormat(str(values.format));
  const chain = !!values['backing-chain'];
  const top = chain
    ? await openImage(imageArg(positionals[0]!, values), { format, lock: 'none', dataFile: 'skip' })
    : await openImageFile(imageArg(positionals[0]!, values), { format, lock: 'none', dataFile: 'skip' });
  try {
    const infos: ImageInfo[] = [];
    for (const img of chain ? chainOf(top) : [top]) infos.push(await imageInfo(img));
    // As qemu-img: a key secret given with the image's options is one its plain file name
    // cannot carry, so the image is named by a json: name.
    const name = parseImageName(imageArg(positionals[0]!, values));
    const key = name.kind === 'file' ? name.keySecrets?.[0] : undefined;
    if (key !== undefined && name.kind === 'file') {
      infos[0]!.filename = `json:${JSON.stringify({ 'encrypt.key-secret': key, driver: top.format, file: { driver: 'file', filename: name.path } })}`;
    }
    if (fmt === 'json') {
      io.out(qapiJson(chain ? infos : infos[0]) + '\n');
    } else {
      io.out(infos.map(formatInfoHuman).join('\n'));
    }
  } finally {
    await closeChain(top);
  }
  return 0;
}
