// Opening images and their backing chains: format probing, backing names resolved the way
// QEMU does, loops and depth bounded, missing files named together with who wants them.
import { CorruptImageError, FormatError, NotFoundError, SameFileError, UnsupportedFeatureError, UsageError, printable } from '../errors';
import { identityOf, sameFile, type FileIdentity } from '../io/identity';
import { isQcow2Magic } from '../format/header';
import type { BlockFile } from '../io/block-file';
import { NodeFile } from '../io/node-file';
import type { DiskImage, ImageFormat } from '../engine/image';
import { Qcow2Image } from '../engine/qcow2';
import { RawImage } from '../engine/raw';
import { Qcow2Writable } from '../engine/qcow2-write';
import { DATA_FILE_READ_LOCK, DATA_FILE_WRITE_LOCK, lockImage, READ_LOCK, WRITE_LOCK } from '../io/locks';
import { interposeWritable } from '../io/interpose';
import { hasProtocol, localPathOrNull, parseImageName, protocolRefusal } from './names';
import { parseNbdName } from './nbd-name';
import { openNbdImage } from './nbd-open';
import type { TestDriverName } from './test-drivers';
import { BlkdebugFile, NullFile, QuorumFile, blkdebugRules } from '../io/blkdebug';
import { aesCipherFor, secretFor } from './secrets';
import type { SectorCipher } from '../engine/qcow2';
import { decodeLuksHeader, headerCipherSpec, LUKS_HEADER_LEN, LuksCipher, LuksError, unlockLuks } from '../engine/luks';
import * as C from '../format/constants';

/** Deeper chains than this are refused: they are almost surely a loop through distinct names. */
export const MAX_CHAIN_DEPTH = 1000;

/**
 * Locking as qemu-img does it: 'auto' takes the write locks for writable opens and the
 * consistent-read locks otherwise; 'none' takes nothing (-U/--force-share, and info/map).
 */
export type LockPolicy = 'auto' | 'none';

export interface OpenImageOptions {
  format?: ImageFormat;
  writable?: boolean;
  /** Skip syncing the top image (qemu-img's cache=unsafe). */
  unsafe?: boolean;
  lock?: LockPolicy;
  /** Open the backing chain too (default true). */
  backing?: boolean;
  /** Images (by file) the chain must not reach: reaching one is a loop (rebase onto a chain holding the overlay). */
  avoid?: DiskImage[];
  /** 'skip': external data files are not opened (info; see openImageFile). */
  dataFile?: 'open' | 'skip';
  /** The secret id keying the top image when it is AES-encrypted (see openImageFile). */
  keySecret?: string;
  /**
   * Encrypted images of the chain may open without their key (QEMU's BDRV_O_NO_IO: create
   * opens the backing file only for its size); their data then cannot be read.
   */
  noKey?: boolean;
}

export function parseFormat(name: string | undefined | null, what = 'format'): ImageFormat | undefined {
  if (name === undefined || name === null || name === '') return undefined;
  if (name === 'qcow2' || name === 'raw') return name;
  throw new UsageError(`unknown ${what} '${name}' (supported: qcow2, raw)`);
}

/**
 * The format names qemu-img 7.2 knows (Debian's build: `qemu-img --help`, "Supported formats",
 * which counts its modules). An unsafe rebase records any of them as the backing format without
 * opening anything (qemu-img's bdrv_find_format check), though Strata opens only qcow2 and raw.
 */
export const QEMU_FORMAT_NAMES: ReadonlySet<string> = new Set([
  'blkdebug', 'blklogwrites', 'blkverify', 'bochs', 'cloop', 'compress', 'copy-before-write', 'copy-on-read', 'dmg', 'file',
  'ftp', 'ftps', 'gluster', 'host_cdrom', 'host_device', 'http', 'https', 'iscsi', 'iser', 'luks', 'nbd', 'nfs', 'null-aio',
  'null-co', 'nvme', 'parallels', 'preallocate', 'qcow', 'qcow2', 'qed', 'quorum', 'raw', 'rbd', 'replication',
  'snapshot-access', 'ssh', 'throttle', 'vdi', 'vhdx', 'vmdk', 'vpc', 'vvfat',
]);

/**
 * QEMU's bdrv_make_absolute_filename: a relative backing name is taken relative to the
 * overlay's directory; absolute names and names with a protocol (file:, json:, nbd:, ...)
 * are used as they are (json: and file: paths are then relative to the working directory,
 * as in QEMU).
 */
export function combineBackingPath(overlay: string, backing: string): string {
  if (backing.startsWith('/') || hasProtocol(backing)) return backing;
  const slash = overlay.lastIndexOf('/');
  return slash < 0 ? backing : overlay.slice(0, slash + 1) + backing;
}

export async function probeFormat(file: BlockFile): Promise<ImageFormat> {
  const head = Buffer.alloc(4);
  await file.read(head, 0);
  return isQcow2Magic(head) ? 'qcow2' : 'raw';
}

/**
 * Opens one image (no backing chain). `filename` may be in QEMU's other syntaxes (file:,
 * json:); the image is then known by the file's own path, as qemu-img shows it.
 */
export async function openImageFile(name: string, opts: {
  format?: ImageFormat; writable?: boolean; probeRaw?: boolean; wantedBy?: string; lock?: LockPolicy; unsafe?: boolean;
  /**
   * 'skip': do not open a qcow2 image's external data file (qemu-img info, which opens with
   * BDRV_O_NO_IO, so that an untrusted image can be inspected without opening what it names).
   */
  dataFile?: 'open' | 'skip';
  /**
   * The id of the secret that keys an AES-encrypted image (`encrypt.key-secret`; a json: or
   * --image-opts name may give it too). Without one such an image opens only with
   * dataFile 'skip' (info, QEMU's BDRV_O_NO_IO), which takes no key at all: its data cannot
   * be read or written then.
   */
  keySecret?: string;
  /** An encrypted image without its key opens all the same (see OpenImageOptions.noKey). */
  noKey?: boolean;
}): Promise<DiskImage> {
  const parsed = parseImageName(name);
  if (parsed.kind === 'protocol') {
    // NBD exports are read through Strata's own read-only client.
    const nbd = parseNbdName(name);
    if (nbd) return openNbdImage(name, nbd, opts);
    throw protocolRefusal(name, parsed.protocol, opts.wantedBy);
  }
  if (parsed.kind === 'null') return openNullImage(parsed.display, parsed.size, opts);
  const filename = parsed.path;
  // The format the overlay records (or -f) wins over a json: name's driver, as in QEMU.
  opts = { ...opts, format: opts.format ?? parseFormat(parsed.format, `format in '${printable(name)}'`) };
  let file: NodeFile;
  try {
    file = await NodeFile.open(filename, { writable: opts.writable, unsafe: opts.unsafe });
  } catch (err) {
    if (opts.wantedBy && err instanceof NotFoundError) {
      throw new NotFoundError(`backing file '${printable(filename)}' of '${printable(opts.wantedBy)}' does not exist (fix the name with \`strata rebase -u -b NEWNAME ${printable(opts.wantedBy)}\`)`);
    }
    throw err;
  }
  try {
    if (opts.lock !== 'none') await lockImage(file.fd, filename, opts.writable ? WRITE_LOCK : READ_LOCK);
    let format = opts.format;
    const probed = !format;
    if (!format) {
      format = await probeFormat(file);
      if (format === 'raw' && opts.probeRaw === false) {
        throw new FormatError(`backing file '${printable(filename)}' of '${printable(opts.wantedBy ?? '')}' is not qcow2 and its overlay records no format; if it is raw, record that with \`strata rebase -u -b ${printable(filename)} -F raw ${printable(opts.wantedBy ?? '')}\``);
      }
    }
    const f = await withTestDriver(await interposeWritable(file), parsed.test, filename, opts);
    if (format === 'raw') {
      const raw = await RawImage.open(filename, f);
      raw.probed = probed;
      return withTestName(raw, parsed.test);
    }
    const img = opts.writable ? await Qcow2Writable.openWritable(filename, f) : await Qcow2Image.open(filename, f);
    // A refusal here has written nothing; the image file is closed below.
    await setUpEncryption(img, parsed.keySecrets?.[0] ?? opts.keySecret, parsed.encryptFormat, opts.dataFile === 'skip' || !!opts.noKey);
    // On a failure it has closed what it opened; the image file is closed below.
    await openDataFile(img, parsed.kind === 'file' ? parsed.dataFile : undefined, opts);
    return withTestName(img, parsed.test);
  } catch (err) {
    await file.close();
    throw err;
  }
}

/** QEMU's null-co device (test-drivers.ts): a raw image of zeros, read-only. */
async function openNullImage(display: string, size: number, opts: { writable?: boolean }): Promise<DiskImage> {
  if (opts.writable) throw new UsageError(`'${printable(display)}': the null-co driver is opened read-only by Strata`);
  const img: DiskImage = await RawImage.open(display, new NullFile(display, size));
  img.displayName = display;
  return img;
}

/** The file as a test driver named with the image sees it (blkdebug's filter, a quorum's copies). */
async function withTestDriver(f: BlockFile, test: TestDriverName | undefined, filename: string, opts: { writable?: boolean; lock?: LockPolicy }): Promise<BlockFile> {
  if (test?.blkdebug) return new BlkdebugFile(f, blkdebugRules(test.blkdebug, filename));
  if (test?.quorum) {
    if (opts.writable) throw new UnsupportedFeatureError('Strata opens a quorum for reading only', filename);
    const children: BlockFile[] = [f];
    try {
      for (const p of test.quorum.others) {
        const c = await NodeFile.open(p);
        children.push(c);
        if (opts.lock !== 'none') await lockImage(c.fd, p, READ_LOCK);
      }
    } catch (err) {
      for (const c of children.slice(1)) await c.close();
      throw err;
    }
    return new QuorumFile(children, test.quorum.threshold);
  }
  return f;
}

function withTestName<T extends DiskImage>(img: T, test: TestDriverName | undefined): T {
  if (test) {
    img.displayName = test.display;
    if (test.noDirname) img.noDirname = true;
  }
  return img;
}

/**
 * QEMU's qcow2 encryption set-up at open: an encrypted image gets its cipher from the secret
 * named by `encrypt.key-secret` (a LUKS image's master key unlocked with it); without one it is
 * refused, unless it is opened without I/O (info). `encrypt.format`, when given, must match the
 * header.
 */
async function setUpEncryption(img: Qcow2Image, keySecret: string | undefined, format: string | undefined, noIo: boolean): Promise<void> {
  const c = await imageCipher(img.filename, img.header.cryptMethod, keySecret, format, noIo, img.parsed.cryptoHeader ? { area: img.parsed.cryptoHeader, file: img.file } : undefined);
  if (c) img.attachCipher(c);
}

/**
 * The cipher for an image whose header has crypt method `method` (see setUpEncryption); null
 * when it is not encrypted, or opened without I/O. `luks`: where a LUKS image's header lies
 * (the full disk encryption header extension) and the file to read it from. Throws
 * qemu-img's refusals.
 */
export async function imageCipher(image: string, method: number, keySecret: string | undefined, format: string | undefined, noIo = false,
  luks?: { area: { offset: number; length: number }; file: BlockFile }): Promise<SectorCipher | null> {
  if (method === C.CRYPT_NONE) {
    if (format !== undefined) {
      throw new UsageError(`${printable(image)}: encrypt.format=${printable(format)} was given, but the image is not encrypted`)
        .asQemu(`Could not open '${image}': No encryption in image header, but options specified format '${format}'`);
    }
    return null;
  }
  if (method !== C.CRYPT_AES && method !== C.CRYPT_LUKS) {
    throw new UnsupportedFeatureError(`encrypted images (method ${method}) are not supported`, image);
  }
  const name = method === C.CRYPT_AES ? 'aes' : 'luks';
  if (format !== undefined && format !== name) {
    throw new UsageError(`${printable(image)}: the image is encrypted with ${name === 'aes' ? 'AES' : 'LUKS'}, but encrypt.format=${printable(format)} was given`)
      .asQemu(`Could not open '${image}': Header reported '${name}' encryption format but options specify '${format}'`);
  }
  if (method === C.CRYPT_LUKS && !luks) {
    throw new CorruptImageError('the image says it is LUKS-encrypted, but has no encryption header extension', image)
      .asQemu(`Could not open '${image}': Missing CRYPTO header for crypt method 2`);
  }
  // Without I/O (info) the key is not looked up, as in QEMU: an unknown secret id does not matter.
  if (noIo) return null;
  if (keySecret === undefined) {
    throw new UsageError(`${printable(image)}: the image is encrypted (${name === 'aes' ? 'AES' : 'LUKS'}): give its key with --object secret,id=ID,data=... and name it with encrypt.key-secret=ID (--image-opts driver=qcow2,file.filename=${printable(image)},encrypt.key-secret=ID)`)
      .asQemu(`Could not open '${image}': Parameter 'encrypt.key-secret' is required for cipher`);
  }
  if (method === C.CRYPT_AES) return aesCipherFor(keySecret, image);
  return luksCipherFor(image, secretFor(keySecret, image), luks!.area, luks!.file);
}

/** Unlocks a LUKS image's master key with `password`: its data cipher, or qemu-img's refusal. */
async function luksCipherFor(image: string, password: Buffer, area: { offset: number; length: number }, file: BlockFile): Promise<LuksCipher> {
  const read = async (offset: number, length: number): Promise<Buffer> => {
    if (offset + length > area.length) {
      throw new CorruptImageError(`the LUKS header asks for ${length} bytes at ${offset}, outside its ${area.length}-byte area`, image)
        .asQemu(`Could not open '${image}': Request for data outside of extension header`);
    }
    const b = Buffer.alloc(length);
    const n = await file.read(b, area.offset + offset);
    if (n < length) throw new CorruptImageError(`the LUKS header area (${area.length} bytes at ${area.offset}) runs past the end of the file`, image).asQemu(`Could not open '${image}': Could not read encryption header`);
    return b;
  };
  try {
    const h = decodeLuksHeader(await read(0, LUKS_HEADER_LEN));
    const unlocked = await unlockLuks(h, password, read);
    if (!unlocked) {
      throw new UsageError(`${printable(image)}: the key (encrypt.key-secret) is wrong: it unlocks none of the image's LUKS key slots`)
        .asQemu(`Could not open '${image}': Invalid password, cannot unlock any keyslot`);
    }
    return new LuksCipher(headerCipherSpec(h), unlocked.key);
  } catch (err) {
    if (err instanceof LuksError) throw new CorruptImageError(`LUKS header: ${err.message}`, image).asQemu(`Could not open '${image}': ${err.message}`);
    throw err;
  }
}

/**
 * Opens and attaches a qcow2 image's external data file, as QEMU's qcow2_do_open: the name
 * given with the image's options (`data-file.filename`) wins over the one the image records;
 * the name is used as it is (a relative name is relative to the working directory, as in
 * QEMU, not to the image). It is opened and locked as the image is (read-only or writable,
 * the same permissions), since the guest's data is in it.
 */
async function openDataFile(img: Qcow2Image, override: string | undefined, opts: { writable?: boolean; lock?: LockPolicy; dataFile?: 'open' | 'skip' }): Promise<void> {
  if (opts.dataFile === 'skip') return;
  const image = img.filename;
  if (!img.geometry.externalData) {
    if (override !== undefined) {
      throw new UsageError(`${printable(image)}: a data file ('${printable(override)}') was given, but the image has no external data file`)
        .asQemu(`Could not open '${image}': 'data-file' can only be set for images with an external data file`);
    }
    return;
  }
  img.attachDataFile(await openExternalDataFile(image, override ?? img.parsed.dataFile, opts));
}

/**
 * Opens (and locks, unless lock is 'none') the external data file `name` of `image` as QEMU
 * does: one line naming both when the name is missing or the file does not exist.
 */
export async function openExternalDataFile(image: string, name: string | null, opts: { writable?: boolean; lock?: LockPolicy }): Promise<BlockFile> {
  if (name === null || name === '') {
    throw new FormatError(`its guest data is in an external data file, but the image records no name for it (give one with --image-opts data-file.filename=PATH,file.filename=${printable(image)}, or record one with \`strata amend -o data_file=PATH\`)`, image)
      .asQemu(`Could not open '${image}': 'data-file' is required for this image`);
  }
  let file: NodeFile;
  try {
    file = await NodeFile.open(name, { writable: opts.writable });
  } catch (err) {
    if (err instanceof NotFoundError) {
      throw new NotFoundError(`its external data file '${printable(name)}' does not exist (a relative name is taken from the working directory; fix the name with \`strata amend -o data_file=PATH\`)`, image)
        .asQemu(`Could not open '${image}': Could not open '${name}': No such file or directory`);
    }
    throw err;
  }
  try {
    if (opts.lock !== 'none') await lockImage(file.fd, name, opts.writable ? DATA_FILE_WRITE_LOCK : DATA_FILE_READ_LOCK);
    return await interposeWritable(file);
  } catch (err) {
    await file.close();
    throw err;
  }
}

/** Opens an image and (unless backing: false) its whole backing chain, top first. */
export async function openImage(filename: string, opts: OpenImageOptions = {}): Promise<DiskImage> {
  const top = await openImageFile(filename, { format: opts.format, writable: opts.writable, lock: opts.lock, unsafe: opts.unsafe, dataFile: opts.dataFile, keySecret: opts.keySecret, noKey: opts.noKey });
  // json:{..., "backing": null} opens the image alone.
  const name = parseImageName(filename);
  if (opts.backing === false || (name.kind === 'file' && name.noBacking)) return top;
  try {
    await openBackingChain(top, opts.lock, opts.avoid, opts.dataFile, name.kind === 'file' ? name.keySecrets?.slice(1) : undefined, opts.noKey);
  } catch (err) {
    await closeChain(top);
    throw err;
  }
  return top;
}

/** `keySecrets`: the secret ids of the images below `top`, nearest first (backing.encrypt.key-secret...). */
export async function openBackingChain(top: DiskImage, lock: LockPolicy = 'auto', avoid: DiskImage[] = [], dataFile?: 'open' | 'skip', keySecrets: Array<string | undefined> = [], noKey = false): Promise<void> {
  // Files are told apart by device and inode: a loop through a hard link has no common path.
  const seen = new Map<string, string>();
  const key = (id: FileIdentity | null, p: string) => (id ? `${id.dev}:${id.ino}` : `path:${p}`);
  for (const img of [top, ...avoid]) seen.set(key((await img.file.identity?.()) ?? null, img.filename), img.filename);
  let img = top;
  let depth = 0;
  while (img.backingFile) {
    if (++depth > MAX_CHAIN_DEPTH) throw new FormatError(`backing chain is deeper than ${MAX_CHAIN_DEPTH} images`, top.filename);
    if (img.noDirname && !img.backingFile.startsWith('/') && !hasProtocol(img.backingFile)) {
      throw new FormatError(`cannot resolve the relative backing file name '${printable(img.backingFile)}': the image is a quorum, which has no directory of its own (name the backing file by an absolute path)`, img.displayName ?? img.filename)
        .asQemu(`Cannot use relative backing file names for '${img.displayName ?? img.filename}'`);
    }
    const name = combineBackingPath(img.filename, img.backingFile);
    const fmt = parseBackingFormat(img);
    const k = key(await identityOf(localPathOrNull(name) ?? name), name);
    const prev = seen.get(k);
    if (prev !== undefined) {
      throw new FormatError(`backing chain loop: '${printable(img.filename)}' has backing file '${printable(name)}', which is already in the chain (as '${printable(prev)}')`, top.filename)
        .asQemu(`Backing file '${name}' creates an infinite loop.`);
    }
    seen.set(k, name);
    const next = await openImageFile(name, { format: fmt, probeRaw: false, wantedBy: img.filename, lock, dataFile, keySecret: keySecrets[depth - 1], noKey });
    img.backing = next;
    img = next;
  }
}

function parseBackingFormat(img: DiskImage): ImageFormat | undefined {
  const f = img.backingFormat;
  if (!f) return undefined;
  if (f === 'qcow2' || f === 'raw') return f;
  throw new FormatError(`backing file format '${printable(f)}' is not supported (qcow2 and raw are)`, img.filename);
}

/**
 * Closes every image of the chain. When an image opened for writing fails to close (its last
 * metadata could not be written, or the descriptor would not close), this throws that error
 * once all are closed: its last writes may be missing. Not for a qcow2 image that was already
 * in the failed state: its error reached the caller from the call that failed, which is the
 * one to report. Read-only images close on a best-effort basis.
 */
export async function closeChain(top: DiskImage | null): Promise<void> {
  let failed = false;
  let first: unknown;
  for (let img = top; img; img = img.backing) {
    const reported = img instanceof Qcow2Writable && img.failure !== null;
    try {
      await img.close();
    } catch (err) {
      if (img.file.writable && !reported && !failed) { failed = true; first = err; }
    }
  }
  if (failed) throw first;
}

/**
 * Refuses (SameFileError, nothing written) when `target` names a file that is an image of the
 * chain below `top`, by any name: a symlink, a hard link, another spelling of the path.
 */
export async function assertNotInChain(target: string, top: DiskImage | null, job: string): Promise<void> {
  const id = await identityOf(localPathOrNull(target) ?? target);
  if (!id) return;
  for (const img of top ? chainOf(top) : []) {
    if (sameFile(id, (await img.file.identity?.()) ?? null)) {
      const what = img === top ? 'the source image' : 'in the source\'s backing chain';
      throw new SameFileError(`${job}: the target '${printable(target)}' is ${what} ('${printable(img.filename)}', the same file); nothing was written`, target);
    }
  }
}

/** The chain as a list, top first. */
export function chainOf(top: DiskImage): DiskImage[] {
  const out: DiskImage[] = [];
  for (let img: DiskImage | null = top; img; img = img.backing) out.push(img);
  return out;
}

