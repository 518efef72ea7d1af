// Opening an NBD export as an image: read-only, as a raw disk (or the qcow2 image it holds).
import { FormatError, StrataError, UnsupportedFeatureError, printable } from '../errors';
import { isQcow2Magic } from '../format/header';
import { NbdFile } from '../io/nbd';
import type { DiskImage, ImageFormat } from '../engine/image';
import { NbdImage } from '../engine/nbd';
import { Qcow2Image } from '../engine/qcow2';
import type { NbdName } from './nbd-name';

/** The one-line refusal of a write to an NBD export. */
export function nbdWriteRefusal(name: string): UnsupportedFeatureError {
  return new UnsupportedFeatureError(`'${printable(name)}' is an NBD export, and Strata's NBD client is read-only (info, map, compare, convert from it); nothing was written`);
}

export async function openNbdImage(name: string, nbd: NbdName, opts: { format?: ImageFormat; writable?: boolean; probeRaw?: boolean; wantedBy?: string }): Promise<DiskImage> {
  if (opts.writable) throw nbdWriteRefusal(name);
  // -f (or the overlay's backing format) wins over the name's format node, as in QEMU.
  let format: string | undefined = opts.format ?? nbd.driver;
  if (format !== undefined && format !== 'nbd' && format !== 'raw' && format !== 'qcow2') {
    throw new UnsupportedFeatureError(`'${printable(name)}': format '${printable(format)}' over NBD is not supported (raw and qcow2 are)`);
  }
  let file: NbdFile;
  try {
    file = await NbdFile.open(nbd.target);
  } catch (err) {
    if (err instanceof StrataError) {
      err.qemu = `Could not open '${name}': ${err.qemu ?? err.message}`;
      if (opts.wantedBy) err.message += ` (backing file of '${printable(opts.wantedBy)}')`;
    }
    throw err;
  }
  try {
    if (format === undefined) {
      const head = Buffer.alloc(4);
      await file.read(head, 0);
      format = isQcow2Magic(head) ? 'qcow2' : 'raw';
      if (format === 'raw' && opts.probeRaw === false) {
        throw new FormatError(`backing file '${printable(file.path)}' of '${printable(opts.wantedBy ?? '')}' is not qcow2 and its overlay records no format; if it is raw, record that with \`strata rebase -u -b ${printable(name)} -F raw ${printable(opts.wantedBy ?? '')}\``);
      }
    }
    if (format === 'qcow2') return await Qcow2Image.open(file.path, file);
    return new NbdImage(file, format === 'nbd' ? 'nbd' : 'raw');
  } catch (err) {
    await file.close().catch(() => {});
    throw err;
  }
}
