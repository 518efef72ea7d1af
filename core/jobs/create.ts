// create: a new qcow2 or raw image, laid out byte for byte as qemu-img create 7.2 lays it
// out (see core/format/layout.ts for how). Options use qemu-img's names and checks; all of
// them are validated, and the backing file opened, before the target file is touched.
import { basename, dirname } from 'node:path';
import { realpath, stat, unlink } from '../io/fs-async';
import { identityOf, sameFile } from '../io/identity';
import * as C from '../format/constants';
import { encodeCreateHeader, finishQcow2Layout, l1EntriesFor, startQcow2Layout, type QemuAllocator, type Qcow2CreateSpec } from '../format/layout';
import { FormatError, NotFoundError, StrataError, UsageError } from '../errors';
import { NodeFile } from '../io/node-file';
import type { BlockFile } from '../io/block-file';
import { interposeWritable } from '../io/interpose';
import { lockImage, PERM_CONSISTENT_READ, PERM_RESIZE, PERM_WRITE, PERM_WRITE_UNCHANGED, type LockMode } from '../io/locks';
import { closeChain, combineBackingPath, openImage, probeFormat } from '../chain/open';
import { strtosz } from '../chain/size-str';
import { localPath, localPathOrNull } from '../chain/names';
import { aesCipherForCreate, luksAreaForCreate } from '../chain/secrets';
import { createCipherSpec, LuksError, type LuksCreateOptions } from '../engine/luks';
import { ProgressReporter, throwIfCancelled, type JobContext } from './job';
import { qcow2PreallocSize } from './measure';
import { findOverlays } from './overlays';
import { abs, addAffected, addSpace, chainLinks, checkSpace, enforcePlan, newPlan, permissionProblems, probeAll, type JobPlan } from './plan-kit';

export type CreateFormat = 'qcow2' | 'raw';
export type Preallocation = 'off' | 'metadata' | 'falloc' | 'full';

/** What `-o key=value,...` (and -b/-F/-u, SIZE) can set. Everything is optional. */
export interface CreateOptions {
  /** Virtual size in bytes (rounded up to 512 as qemu-img does); default: the backing file's. */
  size?: number;
  clusterSize?: number;
  extendedL2?: boolean;
  compressionType?: 'zlib' | 'zstd';
  refcountBits?: number;
  lazyRefcounts?: boolean;
  /** '0.10' (v2) or '1.1' (v3). */
  compat?: '0.10' | '1.1';
  preallocation?: Preallocation;
  /** extent_size_hint (file protocol): recorded as qemu-img does (an XFS hint; ext4 has none). */
  extentSizeHint?: number;
  /** Recorded as given: a relative name stays relative (to the new image's directory). */
  backingFile?: string;
  backingFormat?: string;
  /** -u: do not open the backing file (it need not exist; SIZE is then required). */
  unsafe?: boolean;
  /**
   * data_file: the guest data goes to this file (created, or emptied, as a raw file), each
   * cluster at its guest offset; the name is recorded as given and, as in QEMU, a relative
   * name is relative to the working directory of whoever opens the image.
   */
  dataFile?: string;
  /** data_file_raw: the data file is kept a complete raw image of the disk. */
  dataFileRaw?: boolean;
  /** encryption=on|off (qemu-img's older spelling of encrypt.format=aes). */
  encryption?: boolean;
  /** encrypt.format: 'aes' (qcow2's legacy AES-CBC) or 'luks'. */
  encryptFormat?: string;
  /** encrypt.key-secret: the id of the --object secret that keys an encrypted image. */
  keySecret?: string;
  /** The first LUKS-only encrypt.* option given (refused for AES images). */
  luksOption?: string;
  /** The LUKS options given (encrypt.cipher-alg, ..., encrypt.iter-time). */
  luks?: LuksCreateOptions;
  /** Values qemu-img's format driver refuses after its "Formatting" line (compat=0.42, preallocation=1234). */
  invalid?: Partial<Record<'compat' | 'preallocation', string>>;
  /** The option names as the user spelled them, in order (for the "Formatting" line and raw checks). */
  given?: Partial<Record<CreateOptionName, string>>;
}

const LUKS_OPTIONS = ['encrypt.cipher-alg', 'encrypt.cipher-mode', 'encrypt.ivgen-alg', 'encrypt.ivgen-hash-alg', 'encrypt.hash-alg', 'encrypt.iter-time'] as const;

export const CREATE_OPTION_NAMES = [
  'size', 'cluster_size', 'extended_l2', 'compression_type', 'refcount_bits', 'lazy_refcounts',
  'compat', 'preallocation', 'backing_file', 'backing_fmt', 'extent_size_hint', 'data_file', 'data_file_raw',
  'encryption', 'encrypt.format', 'encrypt.key-secret',
  // LUKS's options: refused (after qemu-img's "Formatting" line, which lists them).
  ...LUKS_OPTIONS,
] as const;
export type CreateOptionName = typeof CREATE_OPTION_NAMES[number];

export const CREATE_OPTIONS_HELP = `Supported options (qcow2; raw takes only size and preallocation=off):
  size=SIZE                  virtual disk size (suffixes k, M, G, T, P, E)
  compat=0.10|1.1            qcow2 version (also v2, v3; default 1.1)
  backing_file=NAME          file name of a base image
  backing_fmt=qcow2|raw      format of the base image
  cluster_size=SIZE          512 to 2M, a power of two (default 64k)
  extended_l2=on|off         extended L2 entries, 32 subclusters (needs cluster_size >= 16k)
  compression_type=zlib|zstd compression method for compressed clusters (default zlib)
  lazy_refcounts=on|off      postpone refcount updates (needs compat=1.1)
  refcount_bits=N            1, 2, 4, 8, 16, 32 or 64 (default 16; compat=0.10 needs 16)
  preallocation=off|metadata|falloc|full  metadata: every L2 table and data cluster up front (qcow2);
                             falloc: and the file's blocks allocated; full: and zeros written
  extent_size_hint=SIZE      the file system's extent size hint (XFS; default 1M)
  data_file=PATH             keep the guest data in this raw file (compat=1.1; created or emptied;
                             a relative name is relative to the working directory)
  data_file_raw=on|off       keep the data file a complete raw image (preallocates metadata)
  encrypt.format=luks|aes    encrypt the guest data: LUKS (AES-256-XTS by default), or qcow2's
                             legacy AES-CBC
  encryption=on|off          the older spelling of encrypt.format=aes
  encrypt.key-secret=ID      the key: the secret given with --object secret,id=ID,data=...
  encrypt.cipher-alg=aes-256, encrypt.cipher-mode=xts|cbc|ecb, encrypt.ivgen-alg=plain64|plain|essiv,
  encrypt.ivgen-hash-alg=sha256, encrypt.hash-alg=sha256, encrypt.iter-time=MS   (LUKS only)
`;

// ---- parsing ----

/** qemu's size syntax for option values: a number with an optional k/M/G/T/P/E suffix. */
function parseSizeValue(key: string, v: string): number {
  // QEMU's parse_option_size (qemu_strtosz); Strata also takes an IEC unit (64KiB).
  const r = strtosz(v);
  if (r === 'range') throw new UsageError(`value '${v}' for ${key} is too large`).asQemu(`Value '${v}' is out of range for parameter '${key}'`);
  if (r === 'invalid') {
    const m = /^\s*(\d+(?:\.\d+)?)\s*([kmgtpe]?)i?b\s*$/i.exec(v);
    if (!m) {
      throw new UsageError(`invalid value '${v}' for ${key} (a size such as 512, 64k, 2M or 0x10000)`)
        .asQemu(`Parameter '${key}' expects a non-negative number below 2^64\nOptional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively.`);
    }
    const n = Number(m[1]) * { '': 1, k: 2 ** 10, m: 2 ** 20, g: 2 ** 30, t: 2 ** 40, p: 2 ** 50, e: 2 ** 60 }[m[2]!.toLowerCase()]!;
    if (!Number.isInteger(n)) throw new UsageError(`invalid value '${v}' for ${key}: not a whole number of bytes`);
    if (n > Number.MAX_SAFE_INTEGER) throw new UsageError(`value '${v}' for ${key} is too large`);
    return n;
  }
  const n = Number(r);
  if (BigInt(n) !== r) throw new UsageError(`value '${v}' for ${key} cannot be handled exactly (sizes past 2^53 must be multiples of a large power of two)`);
  return n;
}

function parseBool(key: string, v: string): boolean {
  switch (v.toLowerCase()) {
    case 'on': case 'yes': case 'true': case 'y': return true;
    case 'off': case 'no': case 'false': case 'n': return false;
    default: throw new UsageError(`option ${key} expects 'on' or 'off', not '${v}'`);
  }
}

/** Splits qemu's option syntax: comma-separated key=value, ",," for a literal comma. */
function splitOptions(o: string): Array<[string, string | undefined]> {
  const out: Array<[string, string | undefined]> = [];
  let cur = '';
  const flush = () => {
    if (cur === '') return;
    const eq = cur.indexOf('=');
    out.push(eq < 0 ? [cur, undefined] : [cur.slice(0, eq), cur.slice(eq + 1)]);
    cur = '';
  };
  for (let i = 0; i < o.length; i++) {
    const ch = o[i]!;
    if (ch === ',') {
      if (o[i + 1] === ',') { cur += ','; i++; continue; }
      flush();
    } else {
      cur += ch;
    }
  }
  flush();
  return out;
}

/** A -o string as key/value pairs (",," a literal comma), as JobSpec carries it. */
export function optionsToRecord(o: string): Record<string, string> {
  const out: Record<string, string> = {};
  for (const [k, v] of splitOptions(o)) out[k] = v ?? '';
  return out;
}

/** The -o string for key/value pairs (commas in values doubled). */
export function recordToOptions(r: Record<string, string> | undefined): string {
  return Object.entries(r ?? {}).map(([k, v]) => `${k}=${v.replace(/,/g, ',,')}`).join(',');
}

/** True when the -o string asks for the option list (`help` or `?`). */
export function isOptionsHelp(o: string): boolean {
  return splitOptions(o).some(([k, v]) => v === undefined && (k === 'help' || k === '?'));
}

/**
 * Parses a qemu-img `-o` string ("cluster_size=4k,compat=0.10,..."). Later keys override
 * earlier ones. Checks each value's syntax; combinations are checked by createImage.
 * `deferInvalid` (create): a compat or preallocation value qemu-img's driver refuses is kept
 * for resolveCreate to refuse after the "Formatting" line, as qemu-img create does.
 */
export function parseCreateOptions(o: string, how: { deferInvalid?: boolean } = {}): CreateOptions {
  const r: CreateOptions = { given: {} };
  for (const [key, value] of splitOptions(o)) {
    if (!(CREATE_OPTION_NAMES as readonly string[]).includes(key)) {
      throw new UsageError(`unknown option '${key}' (known: ${CREATE_OPTION_NAMES.join(', ')}; -o help lists them)`);
    }
    if (value === undefined) throw new UsageError(`option ${key} needs a value (${key}=...)`);
    const k = key as CreateOptionName;
    r.given![k] = value;
    switch (k) {
      case 'size': r.size = parseSizeValue(k, value); break;
      case 'cluster_size': r.clusterSize = parseSizeValue(k, value); break;
      case 'extended_l2': r.extendedL2 = parseBool(k, value); break;
      case 'lazy_refcounts': r.lazyRefcounts = parseBool(k, value); break;
      case 'compression_type':
        if (value !== 'zlib' && value !== 'zstd') throw new UsageError(`compression_type must be zlib or zstd, not '${value}'`);
        r.compressionType = value;
        break;
      case 'refcount_bits': {
        // A number as strtoull reads it (-1 too); the width is checked with the other options.
        if (!/^[-+]?\d+$/.test(value)) throw new UsageError(`refcount_bits must be a number (1, 2, 4, 8, 16, 32 or 64), not '${value}'`);
        r.refcountBits = Number(value);
        break;
      }
      case 'compat':
        if (value === '0.10' || value === 'v2') r.compat = '0.10';
        else if (value === '1.1' || value === 'v3') r.compat = '1.1';
        // qemu-img refuses it in the format driver, after its "Formatting" line.
        else if (how.deferInvalid) (r.invalid ??= {}).compat = value;
        else throw new UsageError(`compat must be 0.10 or 1.1 (or v2, v3), not '${value}'`);
        break;
      case 'preallocation':
        if (value === 'off' || value === 'metadata' || value === 'falloc' || value === 'full') r.preallocation = value;
        else if (how.deferInvalid) (r.invalid ??= {}).preallocation = value;
        else throw new UsageError(`Invalid parameter '${value}'`);
        break;
      case 'encryption':
        if (!/^(on|off)$/.test(value)) throw new UsageError(`option encryption expects 'on' or 'off', not '${value}'`).asQemu(`Parameter 'encryption' expects 'on' or 'off'`);
        r.encryption = value === 'on';
        break;
      case 'encrypt.format': r.encryptFormat = value; break;
      case 'encrypt.key-secret': r.keySecret = value; break;
      case 'encrypt.cipher-alg': case 'encrypt.cipher-mode': case 'encrypt.ivgen-alg': case 'encrypt.ivgen-hash-alg':
      case 'encrypt.hash-alg': case 'encrypt.iter-time': {
        r.luksOption ??= key;
        const l = (r.luks ??= {});
        if (key === 'encrypt.iter-time') {
          if (!/^\d+$/.test(value) || Number(value) < 1) throw new UsageError(`encrypt.iter-time must be a positive number of milliseconds, not '${value}'`).asQemu(`Parameter 'encrypt.iter-time' expects a number`);
          l.iterTime = Number(value);
        } else if (key === 'encrypt.cipher-alg') l.cipherAlg = value;
        else if (key === 'encrypt.cipher-mode') l.cipherMode = value;
        else if (key === 'encrypt.ivgen-alg') l.ivgenAlg = value;
        else if (key === 'encrypt.ivgen-hash-alg') l.ivgenHashAlg = value;
        else l.hashAlg = value;
        break;
      }
      case 'backing_file': r.backingFile = value; break;
      case 'data_file': r.dataFile = value; break;
      case 'data_file_raw': r.dataFileRaw = parseBool(k, value); break;
      case 'backing_fmt': r.backingFormat = value; break;
      case 'extent_size_hint': {
        const v = parseSizeValue(k, value);
        if (v > 0xffffffff) throw new UsageError('Extent size hint is too large');
        r.extentSizeHint = v;
        break;
      }
      default: { const never: never = k; throw new UsageError(`unknown option '${String(never)}'`); }
    }
  }
  return r;
}

// ---- validation ----

export interface ResolvedCreate {
  path: string;
  format: CreateFormat;
  /** Rounded up to a multiple of 512. */
  size: number;
  /** The size before rounding, as qemu-img prints it. */
  sizeGiven: number;
  preallocation: Preallocation;
  /** qcow2 only */
  qcow2: Qcow2CreateSpec | null;
  opts: CreateOptions;
}

function fail(path: string, msg: string): never { throw new UsageError(`${path}: ${msg}`); }

/** fail() with qemu-img's text (after the file name, as qemu-img create prints its errors). */
function qemuFail(path: string, msg: string, qemu: string): never { throw new UsageError(`${path}: ${msg}`).asQemu(`${path}: ${qemu}`); }

/**
 * Errors qemu-img reports from the format driver, after its "Formatting" line: the CLI speaking
 * as qemu-img prints that line first (see driverFail).
 */
export const REPORTED_AFTER_FORMATTING = new WeakSet<object>();

/** A refusal of the qcow2 driver: Strata's message, qemu-img's text, reported after "Formatting". */
function driverFail(path: string, msg: string, qemu: string): never {
  const err = new UsageError(`${path}: ${msg}`).asQemu(`${path}: ${qemu}`);
  REPORTED_AFTER_FORMATTING.add(err);
  throw err;
}

const USE_V3 = '1.1 and above (use version=v3 or greater)';

/** Everything qemu-img create checks, plus opening the backing file for its size. */
export async function resolveCreate(path: string, format: CreateFormat, opts: CreateOptions): Promise<ResolvedCreate> {
  localPath(path); // a protocol name (nbd:, http:, ...) is refused before anything else
  if ((format as string) !== 'qcow2' && (format as string) !== 'raw') fail(path, `unknown format '${format}' (supported: qcow2, raw)`);
  const backingFile = opts.backingFile ?? null;
  const backingFormat = opts.backingFormat ?? null;
  const preallocation = opts.preallocation ?? 'off';

  if (format === 'raw') {
    const qcow2Only: Array<[CreateOptionName, unknown]> = [
      ['cluster_size', opts.clusterSize], ['extended_l2', opts.extendedL2], ['compression_type', opts.compressionType],
      ['refcount_bits', opts.refcountBits], ['lazy_refcounts', opts.lazyRefcounts], ['compat', opts.compat],
      ['data_file', opts.dataFile], ['data_file_raw', opts.dataFileRaw],
    ];
    qcow2Only.push(['encryption', opts.encryption], ['encrypt.format', opts.encryptFormat], ['encrypt.key-secret', opts.keySecret], ...LUKS_OPTIONS.map((k): [CreateOptionName, unknown] => [k, undefined]));
    const set = qcow2Only.find(([k, v]) => v !== undefined || opts.given?.[k] !== undefined);
    if (set) qemuFail(path, `option ${set[0]} is for qcow2 images; raw images take only size and preallocation=off`, `Invalid parameter '${set[0]}'`);
    if (opts.invalid?.preallocation !== undefined) driverFail(path, `Invalid parameter '${opts.invalid.preallocation}'`, `invalid parameter value: ${opts.invalid.preallocation}`);
    if (backingFile !== null || backingFormat !== null) fail(path, 'raw images cannot have a backing file (use -f qcow2)');
    if (preallocation === 'metadata') fail(path, 'Unsupported preallocation mode: metadata');
  }

  let spec: Qcow2CreateSpec | null = null;
  let encrypted: false | 'aes' | 'luks' = false;
  if (format === 'qcow2') {
    // The option values the driver's QAPI visitor refuses first (in its order: version, then preallocation).
    if (opts.invalid?.compat !== undefined) driverFail(path, `compat must be 0.10 or 1.1 (or v2, v3), not '${opts.invalid.compat}'`, `Parameter 'version' does not accept value '${opts.invalid.compat}'`);
    if (opts.invalid?.preallocation !== undefined) driverFail(path, `Invalid parameter '${opts.invalid.preallocation}'`, `Parameter 'preallocation' does not accept value '${opts.invalid.preallocation}'`);
    encrypted = encryptionWanted(path, opts);
    const version = opts.compat === '0.10' ? 2 : 3;
    const cs = opts.clusterSize ?? 2 ** C.DEFAULT_CLUSTER_BITS;
    const clusterBits = Math.log2(cs);
    if (!Number.isInteger(clusterBits) || clusterBits < C.MIN_CLUSTER_BITS || clusterBits > C.MAX_CLUSTER_BITS) {
      driverFail(path, `invalid cluster size ${cs}: it must be a power of two between 512 and 2M`, 'Cluster size must be a power of two between 512 and 2048k');
    }
    const extendedL2 = opts.extendedL2 ?? false;
    const refcountBits = opts.refcountBits ?? 16;
    const refcountOrder = Math.log2(refcountBits);
    if (!Number.isInteger(refcountOrder) || refcountOrder < 0 || refcountOrder > C.MAX_REFCOUNT_ORDER) {
      driverFail(path, `invalid refcount_bits ${opts.given?.refcount_bits ?? refcountBits}: it must be a power of two no larger than 64 (1, 2, 4, 8, 16, 32, 64)`, 'Refcount width must be a power of two and may not exceed 64 bits');
    }
    const zstd = opts.compressionType === 'zstd';
    const lazy = opts.lazyRefcounts ?? false;
    if (version === 2) {
      const needV3 = (what: string, qemu: string) => driverFail(path, `${what} needs compat=1.1 (qcow2 v3); compat=0.10 images cannot have it`, qemu);
      if (extendedL2) needV3('extended_l2=on', `Extended L2 entries are only supported with compatibility level ${USE_V3}`);
      if (lazy) needV3('lazy_refcounts=on', `Lazy refcounts only supported with compatibility level ${USE_V3}`);
      if (refcountBits !== 16) needV3(`refcount_bits=${refcountBits} (compat=0.10 only has 16-bit refcounts)`, 'Different refcount widths than 16 bits require compatibility level 1.1 or above (use version=v3 or greater)');
      if (zstd) needV3('compression_type=zstd', `Non-zlib compression type is only supported with compatibility level ${USE_V3}`);
    }
    const dataFile = opts.dataFile ?? null;
    const dataFileRaw = opts.dataFileRaw ?? false;
    if (dataFileRaw && dataFile === null) driverFail(path, 'data_file_raw=on needs a data file (give data_file=PATH)', 'data-file-raw requires data-file');
    if (dataFileRaw && backingFile !== null) driverFail(path, 'data_file_raw=on cannot go with a backing file (the data file alone would not hold the disk)', 'Backing file and data-file-raw cannot be used at the same time');
    if (dataFile !== null && version === 2) driverFail(path, `an external data file (data_file) needs compat=1.1 (qcow2 v3)`, `External data files are only supported with compatibility level ${USE_V3}`);
    if (dataFile === '') fail(path, 'the data file name is empty');
    if (extendedL2 && clusterBits < C.MIN_CLUSTER_BITS_EXTENDED_L2) {
      driverFail(path, `extended_l2=on needs a cluster size of at least 16k (cluster_size is ${cs})`, 'Extended L2 entries are only supported with cluster sizes of at least 16384 bytes');
    }
    spec = {
      size: 0, clusterBits, version, refcountOrder, extendedL2,
      compressionType: zstd ? C.COMPRESSION_ZSTD : C.COMPRESSION_DEFLATE,
      // falloc and full: laid out by preallocateData (QEMU's truncate), not as metadata.
      lazyRefcounts: lazy, backingFile, backingFormat,
      // With a data file every mode lays the metadata out (QEMU's preallocate_co); falloc and
      // full then allocate the data file. data_file_raw needs at least metadata.
      preallocation: preallocation === 'metadata' || (dataFile !== null && (preallocation !== 'off' || dataFileRaw)) ? 'metadata' : 'off',
      dataFile, dataFileRaw, encrypted: encrypted === 'aes', luks: encrypted === 'luks' ? { area: Buffer.alloc(0) } : undefined,
    };
  }

  if (backingFormat !== null && backingFile === null) fail(path, 'a backing format (-F) needs a backing file (-b)');
  if (backingFile !== null && spec && preallocation !== 'off' && !spec.extendedL2) {
    fail(path, `preallocation=${preallocation} with a backing file needs extended_l2=on (otherwise the preallocated clusters would hide the backing file's data)`);
  }
  if (backingFile !== null) {
    if (backingFile === path) qemuFail(path, 'the backing file is the image being created (give a different -b)', 'Error: Trying to create an image with the same filename as the backing file');
    if (backingFile === '') qemuFail(path, 'the backing file name is empty', 'Expected backing file name, got empty string');
    if (Buffer.byteLength(backingFile) > C.MAX_BACKING_FILE_NAME) fail(path, `the backing file name is too long (${Buffer.byteLength(backingFile)} bytes, at most ${C.MAX_BACKING_FILE_NAME})`);
    if (backingFormat === null) {
      // qemu-img 7.2 never records a probed format; like it, name what the file looks like.
      let hint = '';
      let qemu = `${path}: Backing file specified without backing format`;
      if (!opts.unsafe) {
        const full = combineBackingPath(localPath(path), backingFile);
        try {
          const f = await NodeFile.open(localPath(full));
          try { hint = `\nDetected format of ${await probeFormat(f)}.`; } finally { await f.close(); }
          qemu += hint;
        } catch (err) {
          // qemu-img opens the backing file first: a missing one is what it reports.
          if (err instanceof NotFoundError || (err as NodeJS.ErrnoException)?.code === 'ENOENT') qemu = `${path}: Could not open '${full}': No such file or directory\nCould not open backing image.`;
        }
      }
      throw new UsageError(`${path}: Backing file specified without backing format (give it with -F qcow2 or -F raw)${hint}`).asQemu(qemu);
    }
    if (backingFormat !== 'qcow2' && backingFormat !== 'raw') fail(path, `unsupported backing format '${backingFormat}' (qcow2 or raw)`);
    const full = combineBackingPath(localPath(path), backingFile);
    if (sameFile(await identityOf(localPathOrNull(full) ?? full), await identityOf(localPathOrNull(path) ?? path))) fail(path, `the backing file '${backingFile}' is the image being created (give a different -b)`);
  }

  let size = opts.size;
  if (backingFile !== null && !opts.unsafe) {
    // Relative to the new image's folder (a file: target names its path).
    const full = combineBackingPath(localPath(path), backingFile);
    let top;
    try {
      // For its size alone: an encrypted backing file opens without its key (qemu-img's BDRV_O_NO_IO).
      top = await openImage(full, { format: backingFormat as 'qcow2' | 'raw', lock: 'none', noKey: true });
    } catch (err) {
      const where = full === backingFile ? `'${backingFile}'` : `'${backingFile}' (${full}, relative to the new image)`;
      if (err instanceof NotFoundError && err.file === full) {
        throw new NotFoundError(`backing file ${where} does not exist (create it first, or use -u with a SIZE to record the name anyway)`, path);
      }
      const msg = err instanceof StrataError ? err.message : (err as Error).message;
      throw new FormatError(`cannot open backing file ${where} as ${backingFormat}: ${msg}`, path);
    }
    try {
      // bdrv_getlength: whole sectors
      if (size === undefined) size = Math.ceil(top.virtualSize / 512) * 512;
    } finally {
      await closeChain(top);
    }
  }
  if (size === undefined) {
    fail(path, backingFile !== null
      ? 'a SIZE is needed with -u (the backing file is not opened to take its size)'
      : 'missing SIZE (give the virtual size, e.g. 10G, or a backing file with -b -F to take its size)');
  }
  const rounded = Math.ceil(size / 512) * 512;
  if (rounded > Number.MAX_SAFE_INTEGER && !spec) fail(path, `size ${size} is too large`);
  if (spec) {
    spec.size = rounded;
    // The header cluster must hold the extensions and the backing name: check it now.
    try {
      encodeCreateHeader(spec, { l1Size: 0, l1TableOffset: 0, refcountTableOffset: 0, refcountTableClusters: 0 });
    } catch (err) {
      fail(path, (err as Error).message);
    }
    const l1 = l1EntriesFor(rounded, spec.clusterBits, spec.extendedL2);
    if (l1 > C.MAX_L1_SIZE_BYTES / 8) {
      const err = new FormatError(`the image size is too large for qcow2 with ${2 ** spec.clusterBits}-byte clusters${spec.extendedL2 ? ' and extended L2 entries' : ''} (try a larger cluster_size)`, path)
        .asQemu(`${path}: The image size is too large for file format 'qcow2' (try using a larger cluster size)`);
      REPORTED_AFTER_FORMATTING.add(err);
      throw err;
    }
    if (rounded > Number.MAX_SAFE_INTEGER) fail(path, `size ${size} is too large`);
  }
  if (encrypted) {
    // The key last, as qemu-img sets encryption up once the image is laid out; but here before
    // anything is written.
    try {
      if (encrypted === 'aes') aesCipherForCreate(opts.keySecret, path);
      else spec!.luks = { area: luksAreaForCreate(opts.keySecret, path, opts.luks ?? {}) };
    } catch (err) {
      REPORTED_AFTER_FORMATTING.add(err as object);
      throw err;
    }
  }
  return { path, format, size: rounded, sizeGiven: size, preallocation, qcow2: spec, opts };
}

/**
 * Whether create's options ask for encryption (qemu-img's qcow2 rules): encryption=on is
 * encrypt.format=aes (the two together are refused), encrypt.key-secret needs a format, and
 * only AES is written (LUKS is refused).
 */
function encryptionWanted(path: string, opts: CreateOptions): false | 'aes' | 'luks' {
  if (opts.encryption === true && opts.encryptFormat !== undefined) {
    driverFail(path, 'give encrypt.format=aes or encryption=on, not both', "'encrypt.format' and its alias 'encryption' can't be used at the same time");
  }
  const fmt = opts.encryption ? 'aes' : opts.encryptFormat;
  if (fmt === undefined) {
    if (opts.keySecret !== undefined || opts.luksOption !== undefined) driverFail(path, `${opts.keySecret !== undefined ? 'encrypt.key-secret' : opts.luksOption} needs encrypt.format=luks or aes (or encryption=on)`, "Parameter 'encrypt.format' is missing");
    return false;
  }
  if (fmt === 'luks') {
    try {
      createCipherSpec(opts.luks ?? {});
    } catch (err) {
      if (err instanceof LuksError) driverFail(path, err.message, err.message);
      throw err;
    }
    return 'luks';
  }
  if (fmt !== 'aes' && fmt !== 'qcow') driverFail(path, `encrypt.format must be luks or aes, not '${fmt}'`, `Parameter 'format' does not accept value '${fmt}'`);
  if (opts.luksOption !== undefined) driverFail(path, `option ${opts.luksOption} is a LUKS option: AES images take only encrypt.key-secret`, `Parameter '${opts.luksOption}' is unexpected`);
  return 'aes';
}

/** qemu-img's "Formatting 'FILE', fmt=... " line (options in qemu's order, defaults included). */
export function formattingLine(r: ResolvedCreate): string {
  const o = r.opts;
  const g = o.given ?? {};
  const parts: string[] = [`fmt=${r.format}`];
  // qemu-img prints the encryption options first, as given (its option list has them first).
  for (const k of ['encryption', 'encrypt.format', 'encrypt.key-secret', ...LUKS_OPTIONS] as const) if (g[k] !== undefined) parts.push(`${k}=${g[k]!.replace(/,/g, ',,')}`);
  if (r.format === 'raw') {
    parts.push(`size=${BigInt(r.sizeGiven)}`);
    if (g.preallocation !== undefined) parts.push(`preallocation=${g.preallocation}`);
    if (o.extentSizeHint !== undefined) parts.push(`extent_size_hint=${o.extentSizeHint}`);
  } else {
    parts.push(`cluster_size=${o.clusterSize ?? 65536}`);
    parts.push(`extended_l2=${o.extendedL2 ? 'on' : 'off'}`);
    if (g.preallocation !== undefined) parts.push(`preallocation=${g.preallocation}`);
    parts.push(`compression_type=${o.compressionType ?? 'zlib'}`);
    parts.push(`size=${BigInt(r.sizeGiven)}`);
    if (g.compat !== undefined) parts.push(`compat=${g.compat}`);
    if (o.backingFile !== undefined) parts.push(`backing_file=${o.backingFile.replace(/,/g, ',,')}`);
    if (o.backingFormat !== undefined) parts.push(`backing_fmt=${o.backingFormat}`);
    if (o.dataFile !== undefined) parts.push(`data_file=${o.dataFile.replace(/,/g, ',,')}`);
    if (g.data_file_raw !== undefined) parts.push(`data_file_raw=${o.dataFileRaw ? 'on' : 'off'}`);
    parts.push(`lazy_refcounts=${o.lazyRefcounts ? 'on' : 'off'}`);
    parts.push(`refcount_bits=${o.refcountBits ?? 16}`);
    if (o.extentSizeHint !== undefined) parts.push(`extent_size_hint=${o.extentSizeHint}`);
  }
  return `Formatting '${r.path}', ${parts.join(' ')}`;
}

// ---- the plan ----

/**
 * The create's plan for resolved options: the file created (or replaced, with the overlays
 * that then read something else), the chain it starts, and the bytes its layout takes.
 */
export async function planCreate(r: ResolvedCreate): Promise<JobPlan> {
  const command = ['strata', 'create', '-f', r.format];
  const given = Object.entries(r.opts.given ?? {}).filter(([k]) => k !== 'backing_file' && k !== 'backing_fmt' && k !== 'size').map(([k, v]) => `${k}=${v}`);
  if (given.length) command.push('-o', given.join(','));
  if (r.opts.backingFile !== undefined) command.push('-b', r.opts.backingFile);
  if (r.opts.backingFormat !== undefined) command.push('-F', r.opts.backingFormat);
  if (r.opts.unsafe) command.push('-u');
  command.push(abs(r.path), String(r.size));
  const plan = newPlan('create', `Create ${r.format} ${basename(r.path)} of ${r.size} bytes`, command);
  let exists = false;
  try { exists = (await stat(r.path)).isFile(); } catch { /* a new file */ }
  plan.creates.push(abs(r.path));
  let below = null;
  if (r.opts.backingFile && !r.opts.unsafe) {
    try { below = await openImage(combineBackingPath(r.path, r.opts.backingFile), { format: r.opts.backingFormat as CreateFormat, lock: 'none' }); } catch { /* resolveCreate opened it already */ }
  }
  try {
    plan.chainsAfter.push([{ filename: abs(r.path), format: r.format, virtualSize: r.size }, ...chainLinks(below)]);
  } finally {
    await closeChain(below);
  }
  let bytes = 0;
  if (r.qcow2) {
    if (r.preallocation !== 'off') {
      // Metadata for every cluster; the data clusters stay holes.
      const cs = 2 ** r.qcow2.clusterBits;
      bytes = qcow2PreallocSize(r.size, cs, r.qcow2.refcountOrder, r.qcow2.extendedL2) - Math.ceil(r.size / cs) * cs;
    } else {
      // The layout, made in memory: header, refcount structures and L1 table.
      const spec = { ...r.qcow2 };
      const a = startQcow2Layout(spec);
      finishQcow2Layout(spec, a);
      bytes = a.fileLength;
    }
  }
  if (exists) {
    plan.warnings.push(`${abs(r.path)} exists and is replaced (its content is lost)`);
    addAffected(plan, r.path, (await findOverlays(r.path)).map((o) => o.path), 'would read the new, empty image');
    await probeAll(plan, [[r.path, 'write']]);
    await permissionProblems(plan, [r.path]);
    try { bytes = Math.max(0, bytes - (await stat(r.path)).blocks * 512); } catch { /* gone meanwhile */ }
  } else {
    await permissionProblems(plan, [], [dirname(abs(r.path))]);
  }
  addSpace(plan, r.path, bytes, `the new image ${abs(r.path)}`);
  const dataPath = r.qcow2?.dataFile;
  if (dataPath) {
    // The data file is created (or emptied) too; falloc and full allocate all of it.
    plan.creates.push(abs(dataPath));
    if (r.preallocation === 'falloc' || r.preallocation === 'full') addSpace(plan, dataPath, r.size, `the data file ${abs(dataPath)}`);
  }
  checkSpace(plan);
  return plan;
}

// ---- writing ----

/**
 * What qemu-img create locks before it empties the file: write and resize, not sharing
 * resize. A running VM (or another writer) on the file makes the create fail, untouched.
 */
const CREATE_LOCK: LockMode = { perms: [PERM_WRITE, PERM_RESIZE], shared: [PERM_CONSISTENT_READ, PERM_WRITE, PERM_WRITE_UNCHANGED] };

/** Opens the target without truncating it (the lock check comes first). */
async function openTarget(path: string): Promise<{ file: NodeFile; created: boolean }> {
  try {
    return { file: await NodeFile.open(path, { writable: true }), created: false };
  } catch (err) {
    if (!(err instanceof NotFoundError)) throw err;
    return { file: await NodeFile.open(path, { create: 'new' }), created: true };
  }
}

/**
 * Writes clusters (offset-sorted), merging runs of adjacent ones into requests of up to
 * 8 MiB, `parallel` requests at a time.
 */
async function writeAll(file: BlockFile, items: Array<{ offset: number; data: Buffer }>, parallel = 8): Promise<void> {
  const merged: Array<{ offset: number; data: Buffer }> = [];
  const MAX = 8 * 1024 * 1024;
  for (let i = 0; i < items.length;) {
    const run = [items[i]!];
    let end = items[i]!.offset + items[i]!.data.length;
    let bytes = items[i]!.data.length;
    for (i++; i < items.length && items[i]!.offset === end && bytes + items[i]!.data.length <= MAX; i++) {
      run.push(items[i]!);
      end += items[i]!.data.length;
      bytes += items[i]!.data.length;
    }
    merged.push({ offset: run[0]!.offset, data: run.length === 1 ? run[0]!.data : Buffer.concat(run.map((r) => r.data)) });
  }
  let next = 0;
  const worker = async () => {
    while (next < merged.length) {
      const it = merged[next++]!;
      await file.write(it.data, it.offset);
    }
  };
  await Promise.all(Array.from({ length: Math.min(parallel, merged.length) }, worker));
}

/**
 * Creates (or truncates and rewrites, as qemu-img does) `path` as a new image. Validates
 * everything first; on a failure after the file was emptied, the partial file is removed.
 */
export async function createImage(path: string, opts: CreateOptions & { format: CreateFormat }, ctx: JobContext = {}): Promise<void> {
  const r = await resolveCreate(path, opts.format, opts);
  await writeImage(r, ctx);
}

/** create as a planned job: resolved, planned, checked against the plan, written. */
export async function createPlanned(r: ResolvedCreate, ctx: JobContext = {}, opts: { force?: boolean } = {}, planned?: JobPlan): Promise<JobPlan> {
  const plan = planned ?? await planCreate(r);
  enforcePlan(plan, opts.force);
  await writeImage(r, ctx);
  return plan;
}

/** The writing half of createImage, for callers that resolved (and maybe printed) first. */
export async function writeImage(r: ResolvedCreate, ctx: JobContext = {}): Promise<void> {
  throwIfCancelled(ctx);
  // Lay the image out in memory before touching the file: size errors leave it alone.
  const spec = r.qcow2;
  let alloc: QemuAllocator | null = null;
  try {
    alloc = spec ? startQcow2Layout(spec) : null;
  } catch (err) {
    if (err instanceof FormatError && !err.file) throw new FormatError(err.message, r.path);
    throw err;
  }
  const target = localPath(r.path);
  const dataPath = spec?.dataFile ?? null;
  if (dataPath !== null && sameFile(await identityOf(dataPath), await identityOf(target))) {
    fail(r.path, `the data file '${dataPath}' is the image being created (give a different data_file)`);
  }
  const { file, created } = await openTarget(target);
  let releaseLock = () => {};
  let emptied = created;
  let out: BlockFile = file;
  // The external data file: created (or emptied) as a raw file, locked as the image is.
  let data: { file: NodeFile; out: BlockFile; emptied: boolean; release: () => void } | null = null;
  try {
    const lock = await lockImage(file.fd, r.path, CREATE_LOCK);
    releaseLock = lock.release;
    out = await interposeWritable(file);
    if (dataPath !== null) {
      const d = await openTarget(dataPath);
      data = { file: d.file, out: d.file, emptied: d.created, release: () => {} };
      data.release = (await lockImage(d.file.fd, dataPath, CREATE_LOCK)).release;
      data.out = await interposeWritable(d.file);
    }
    await out.truncate(0);
    emptied = true;
    if (data) { await data.out.truncate(0); data.emptied = true; }
    if (!spec || !alloc) {
      await out.truncate(r.size);
      // QEMU's file driver, growing an empty file, writes its first block (zeros) to speed up
      // its alignment probing later: the same blocks on disk (and what measure then counts).
      if (r.size > 0 && r.preallocation !== 'falloc' && r.preallocation !== 'full') await out.write(Buffer.alloc(Math.min(r.size, r.size < 4096 ? 512 : 4096)), 0);
      if (r.preallocation === 'falloc' || r.preallocation === 'full') await allocateHoles(out, r.size, r.preallocation);
    } else {
      const cs = alloc.cs;
      const progress = new ProgressReporter(ctx, spec.preallocation === 'metadata' ? spec.size : 0);
      progress.setPhase('create');
      if (spec.preallocation === 'metadata') {
        // L2 tables are written out as soon as preallocation is done with them.
        const done: number[] = [];
        alloc.onL2Done = (off) => { done.push(off); };
        let last = 0;
        for (const guestOffset of alloc.preallocate(spec.size, spec.extendedL2 ? cs / C.SUBCLUSTERS_PER_CLUSTER : cs)) {
          if (done.length * cs >= 8 * 1024 * 1024) {
            throwIfCancelled(ctx);
            const items = done.splice(0).sort((a, b) => a - b).map((off) => ({ offset: off, data: alloc.clusters.get(off / cs)! }));
            await writeAll(out, items);
            for (const it of items) alloc.clusters.delete(it.offset / cs);
          }
          progress.add(guestOffset - last);
          last = guestOffset;
        }
      }
      let dataRun: { start: number; end: number } | null = null;
      if ((r.preallocation === 'falloc' || r.preallocation === 'full') && !data) dataRun = alloc.preallocateData(spec.size);
      throwIfCancelled(ctx);
      finishQcow2Layout(spec, alloc);
      const end = alloc.fileLength;
      const items: Array<{ offset: number; data: Buffer }> = [];
      let header: Buffer | null = null;
      for (const idx of [...alloc.clusters.keys()].sort((a, b) => a - b)) {
        const off = idx * cs;
        if (off >= end) continue;
        let data = alloc.clusters.get(idx)!.subarray(0, Math.min(cs, end - off));
        // QEMU writes the L1 table's bytes, not its whole last cluster: the file system
        // allocates as much as it does (the same disk size with falloc and full).
        const l1End = alloc.l1TableOffset + alloc.l1Size * 8;
        if (dataRun && off < l1End && l1End < off + data.length && off >= alloc.l1TableOffset) data = data.subarray(0, l1End - off);
        if (idx === 0) header = data;
        else items.push({ offset: off, data });
      }
      await writeAll(out, items);
      // The header last, and only once the rest is durable: until it is there, the file is
      // not a qcow2 image, and a header that landed before its tables would be a broken one.
      await out.flush();
      if (header) await out.write(header, 0);
      if ((await out.size()) !== end) await out.truncate(end);
      // falloc, full: the file's blocks behind every cluster, as QEMU's file-level preallocation.
      if (dataRun && (r.preallocation === 'falloc' || r.preallocation === 'full')) await allocateHoles(out, dataRun.end, r.preallocation, dataRun.start);
      // The data file as long as the disk (QEMU's truncate of it); falloc and full allocate it.
      if (data) {
        await data.out.truncate(spec.size);
        // QEMU's file driver, growing an empty file, writes its first block (zeros) to speed up
        // its alignment probing later: the same blocks on disk.
        if (spec.size > 0) await data.out.write(Buffer.alloc(spec.size < 4096 ? 512 : 4096), 0);
        if (r.preallocation === 'falloc' || r.preallocation === 'full') await allocateHoles(data.out, spec.size, r.preallocation);
        await data.out.flush();
      }
      progress.done();
    }
    await out.flush();
  } catch (err) {
    releaseLock();
    await out.close();
    if (emptied) { try { await unlink(target); } catch { /* best effort */ } }
    if (data) {
      data.release();
      await data.out.close();
      if (data.emptied && dataPath !== null) { try { await unlink(dataPath); } catch { /* best effort */ } }
    }
    if (err instanceof FormatError && !err.file) throw new FormatError(err.message, r.path);
    throw err;
  }
  releaseLock();
  await out.close();
  if (data) {
    data.release();
    await data.out.close();
  }
}

/**
 * Allocates every hole of [0, end) of the file: with falloc as unwritten extents (they read as
 * zero, fallocate's ZERO_RANGE; zeros written where that is not available), with full by
 * writing zeros, as QEMU's file driver preallocates.
 */
export async function allocateHoles(file: BlockFile, end: number, mode: 'falloc' | 'full', start = 0): Promise<void> {
  const holes = file.extents ? (await file.extents(start, end - start)).filter((e) => !e.data) : [{ offset: start, length: end - start, data: false }];
  const chunk = Buffer.alloc(1 << 20);
  for (const h of holes) {
    if (mode === 'falloc' && file.zeroRange && (await file.zeroRange(h.offset, h.length))) continue;
    for (let p = h.offset; p < h.offset + h.length; p += chunk.length) {
      await file.write(chunk.subarray(0, Math.min(chunk.length, h.offset + h.length - p)), p);
    }
  }
  await file.flush();
}

/**
 * A raw LUKS volume (qemu-img create -f luks): the LUKS area keyed by the secret `key-secret`
 * names, then `size` bytes of disk (a hole: encrypted data is not read from it until written).
 * Options: key-secret, iter-time, cipher-alg, cipher-mode, ivgen-alg, ivgen-hash-alg, hash-alg.
 */
export async function createLuksImage(path: string, size: number, o: string): Promise<void> {
  let keySecret: string | undefined;
  const luks: LuksCreateOptions = {};
  for (const [k, v] of splitOptions(o)) {
    const value = v ?? '';
    switch (k) {
      case 'key-secret': keySecret = value; break;
      case 'iter-time':
        if (!/^\d+$/.test(value) || Number(value) < 1) throw new UsageError(`${path}: iter-time must be a positive number of milliseconds, not '${value}'`).asQemu(`${path}: Parameter 'iter-time' expects a number`);
        luks.iterTime = Number(value);
        break;
      case 'cipher-alg': luks.cipherAlg = value; break;
      case 'cipher-mode': luks.cipherMode = value; break;
      case 'ivgen-alg': luks.ivgenAlg = value; break;
      case 'ivgen-hash-alg': luks.ivgenHashAlg = value; break;
      case 'hash-alg': luks.hashAlg = value; break;
      case 'size': break;
      default: throw new UsageError(`${path}: unknown LUKS option '${k}' (key-secret, iter-time, cipher-alg, cipher-mode, ivgen-alg, ivgen-hash-alg, hash-alg)`).asQemu(`${path}: Invalid parameter '${k}'`);
    }
  }
  try {
    createCipherSpec(luks);
  } catch (err) {
    if (err instanceof LuksError) throw new UsageError(`${path}: ${err.message}`);
    throw err;
  }
  const area = luksAreaForCreate(keySecret, path, luks, '');
  const { file } = await openTarget(localPath(path));
  try {
    await file.truncate(0);
    await file.write(area, 0);
    await file.truncate(area.length + size);
    await file.flush();
  } finally {
    await file.close();
  }
}
