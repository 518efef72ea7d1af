// Image names in QEMU's syntaxes, as qemu-img 7.2 reads them (and libvirt records them as
// backing names): a plain path; `file:PATH` (a path, even with a colon in it); `json:{...}`
// (block-layer options: a format driver over a file, e.g.
// json:{"driver":"qcow2","file":{"driver":"file","filename":"/x/base.qcow2"}}); and protocol
// names (`nbd://...`, `http:...`, `blkdebug:...`): anything with a colon before the first
// slash. Strata opens local files and block devices; protocols are refused in one line.
import { FormatError, UnsupportedFeatureError, printable } from '../errors';
import { parseBlkdebugName, qemuJsonToJson, testDriverName, type TestDriverName } from './test-drivers';

export type ImageName =
  /** A local file or block device: `path` is what QEMU would open, relative to the cwd. */
  | {
    kind: 'file'; path: string; format?: string; noBacking?: boolean; dataFile?: string; test?: TestDriverName;
    /**
     * Secret ids of the image (index 0: `encrypt.key-secret`) and of the images below it
     * (index 1: `backing.encrypt.key-secret`, ...), for AES-encrypted qcow2 images.
     */
    keySecrets?: Array<string | undefined>;
    /** `encrypt.format` as given (checked against the image's header when it is opened). */
    encryptFormat?: string;
  }
  | { kind: 'protocol'; protocol: string }
  /** QEMU's null-co test device (see test-drivers.ts): `size` bytes reading as zeros. */
  | { kind: 'null'; size: number; display: string };

/** QEMU's path_has_protocol: a ':' before any '/' (or '\'). */
export function hasProtocol(name: string): boolean {
  const i = name.search(/[:/\\]/);
  return i >= 0 && name[i] === ':';
}

/** The protocols that name a local file. */
const LOCAL_PROTOCOLS = new Set(['file', 'host_device', 'host_cdrom']);
/** Format drivers Strata reads. */
const FORMATS = new Set(['qcow2', 'raw']);

/** json: options flattened to dotted keys ({"file":{"filename":X}} → file.filename = X). */
function flatten(o: Record<string, unknown>, prefix = '', out: Record<string, unknown> = {}): Record<string, unknown> {
  for (const [k, v] of Object.entries(o)) {
    if (v !== null && typeof v === 'object' && !Array.isArray(v)) flatten(v as Record<string, unknown>, `${prefix}${k}.`, out);
    else out[`${prefix}${k}`] = v;
  }
  return out;
}

export function parseImageName(name: string): ImageName {
  if (!hasProtocol(name)) return { kind: 'file', path: name };
  const colon = name.indexOf(':');
  const protocol = name.slice(0, colon);
  if (LOCAL_PROTOCOLS.has(protocol)) {
    // A path that would itself read as a protocol is named ./PATH, as QEMU names it (and
    // backing names are then taken relative to '.').
    const path = name.slice(colon + 1);
    return { kind: 'file', path: hasProtocol(path) ? `./${path}` : path };
  }
  if (protocol === 'blkdebug') return parseBlkdebugName(name);
  if (protocol !== 'json') return { kind: 'protocol', protocol };
  let raw: unknown;
  try {
    // QEMU's JSON parser takes strings in single quotes too.
    raw = JSON.parse(qemuJsonToJson(name.slice(colon + 1)));
  } catch (err) {
    throw new FormatError(`'${printable(name)}': Could not parse the JSON options: ${(err as Error).message}`);
  }
  if (raw === null || typeof raw !== 'object' || Array.isArray(raw)) throw new FormatError(`'${printable(name)}': the JSON options must be an object`);
  // QEMU's test drivers (blkdebug, null-co, quorum): test-drivers.ts.
  const test = testDriverName(name, raw as Record<string, unknown>);
  if (test) return test;
  const o = flatten(raw as Record<string, unknown>);
  const noBacking = (raw as Record<string, unknown>).backing === null;
  const driver = o.driver;
  if (driver !== undefined && typeof driver !== 'string') throw new FormatError(`'${printable(name)}': 'driver' must be a string`);
  if (driver !== undefined && LOCAL_PROTOCOLS.has(driver)) {
    // The protocol node alone: QEMU reads its bytes as they are.
    if (typeof o.filename !== 'string') throw new FormatError(`'${printable(name)}': no 'filename' for the ${driver} driver`);
    return { kind: 'file', path: o.filename, format: 'raw', noBacking };
  }
  if (driver !== undefined && !FORMATS.has(driver)) return { kind: 'protocol', protocol: driver };
  if (typeof (raw as Record<string, unknown>).file === 'string') {
    const ref = (raw as Record<string, unknown>).file as string;
    throw new FormatError(`'${printable(name)}': Cannot find device='${printable(ref)}' nor node-name='${printable(ref)}' (give "file": {"driver": "file", "filename": ...})`);
  }
  const fileDriver = o['file.driver'] ?? 'file';
  if (typeof fileDriver !== 'string') throw new FormatError(`'${printable(name)}': 'file.driver' must be a string`);
  if (!LOCAL_PROTOCOLS.has(fileDriver)) return { kind: 'protocol', protocol: fileDriver };
  const filename = o['file.filename'];
  if (typeof filename !== 'string') throw new FormatError(`'${printable(name)}': the JSON options name no file (no file.filename)`);
  const dataFile = dataFileOption(name, o);
  if (dataFile !== undefined && typeof dataFile !== 'string') return dataFile;
  const crypt = encryptOptions(name, o);
  return { kind: 'file', path: filename, format: driver, noBacking, ...(dataFile !== undefined ? { dataFile } : {}), ...crypt };
}

/** The qcow2 encryption options of a json: name: `encrypt.key-secret` per layer, `encrypt.format`. */
function encryptOptions(name: string, o: Record<string, unknown>): { keySecrets?: Array<string | undefined>; encryptFormat?: string } {
  const out: { keySecrets?: Array<string | undefined>; encryptFormat?: string } = {};
  const keys: Array<string | undefined> = [];
  for (let depth = 0, prefix = ''; depth <= 1000; depth++, prefix += 'backing.') {
    if (!Object.keys(o).some((k) => k.startsWith(prefix))) break;
    const v = o[`${prefix}encrypt.key-secret`];
    if (v !== undefined && typeof v !== 'string') throw new FormatError(`'${printable(name)}': '${prefix}encrypt.key-secret' must be a string`);
    keys.push(v);
  }
  if (keys.some((k) => k !== undefined)) out.keySecrets = keys;
  const f = o['encrypt.format'];
  if (f !== undefined) {
    if (typeof f !== 'string') throw new FormatError(`'${printable(name)}': 'encrypt.format' must be a string`);
    out.encryptFormat = f;
  }
  return out;
}

/**
 * The qcow2 `data-file` option of a json: name: a file node (`data-file.filename`, or a raw
 * node over one, `data-file.file.filename`), whose path then replaces the name the image
 * records. Any other driver is a protocol Strata does not open.
 */
function dataFileOption(name: string, o: Record<string, unknown>): string | { kind: 'protocol'; protocol: string } | undefined {
  const keys = Object.keys(o).filter((k) => k === 'data-file' || k.startsWith('data-file.'));
  if (keys.length === 0) return undefined;
  if (typeof o['data-file'] === 'string') {
    throw new FormatError(`'${printable(name)}': Cannot find device='${printable(o['data-file'] as string)}' nor node-name='${printable(o['data-file'] as string)}' (give "data-file": {"driver": "file", "filename": ...})`);
  }
  let driver = o['data-file.driver'] ?? 'file';
  let prefix = 'data-file.';
  if (driver === 'raw') {
    driver = o['data-file.file.driver'] ?? 'file';
    prefix = 'data-file.file.';
  }
  if (typeof driver !== 'string') throw new FormatError(`'${printable(name)}': 'data-file.driver' must be a string`);
  if (!LOCAL_PROTOCOLS.has(driver)) return { kind: 'protocol', protocol: driver };
  const filename = o[`${prefix}filename`];
  if (typeof filename !== 'string') throw new FormatError(`'${printable(name)}': the data-file option names no file (no data-file.filename)`);
  return filename;
}

/** QEMU's block drivers that are protocols or filters (not a typo for a file name). */
const KNOWN_PROTOCOLS = new Set([
  'nbd', 'nbd+tcp', 'nbd+unix', 'http', 'https', 'ftp', 'ftps', 'ssh', 'iscsi', 'iser', 'gluster', 'gluster+tcp',
  'gluster+unix', 'gluster+rdma', 'rbd', 'nfs', 'blkdebug', 'blkverify', 'blkreplay', 'null-co', 'null-aio', 'vvfat',
  'fat', 'quorum', 'throttle', 'copy-on-read', 'compress', 'preallocate', 'nvme', 'vxhs', 'sheepdog', 'luks', 'qcow',
  'qed', 'vmdk', 'vdi', 'vpc', 'vhdx', 'parallels', 'bochs', 'cloop', 'dmg', 'blklogwrites', 'io_uring', 'host_device',
]);

/** The one-line refusal for a name Strata cannot open. */
export function protocolRefusal(name: string, protocol: string, wantedBy?: string): UnsupportedFeatureError {
  const who = wantedBy ? `backing file '${printable(name)}' of '${printable(wantedBy)}'` : `'${printable(name)}'`;
  // NBD exports are opened for reading (core/chain/nbd-open.ts); here only writing reaches.
  if (protocol === 'nbd' || protocol === 'nbd+tcp' || protocol === 'nbd+unix') {
    return new UnsupportedFeatureError(`${who} is an NBD export, and Strata's NBD client is read-only (info, map, compare, convert from it); nothing was written`);
  }
  const hint = KNOWN_PROTOCOLS.has(protocol) || name.startsWith('json:')
    ? 'it opens local files and block devices, as qcow2 or raw'
    : `unknown to qemu-img too; for a file whose name has a colon, write ./${printable(name)} or file:${printable(name)}`;
  return new UnsupportedFeatureError(`${who} is opened through the '${printable(protocol)}' driver, which Strata does not open (${hint})`);
}

/** The local path a name stands for; protocols are refused (for targets: create, convert, mirror). */
export function localPath(name: string): string {
  const p = parseImageName(name);
  if (p.kind !== 'file') throw protocolRefusal(name, p.kind === 'protocol' ? p.protocol : 'null-co');
  return p.path;
}

/** The local path a name stands for, or null when it is not one (a protocol, bad json). */
export function localPathOrNull(name: string): string | null {
  try {
    const p = parseImageName(name);
    return p.kind === 'file' ? p.path : null;
  } catch {
    return null;
  }
}

/**
 * qemu-img's --image-opts: the name is an option string (`driver=qcow2,file.filename=x.qcow2`,
 * `,,` for a comma inside a value; a bare first part is the `file` option, as QEMU's "source"
 * options have it). Returned as the equivalent json: name, which the openers read as they
 * read any json: name.
 */
export function imageOptsName(opts: string): string {
  const o: Record<string, string> = {};
  let i = 0;
  while (i < opts.length) {
    let key = '';
    while (i < opts.length && opts[i] !== '=' && opts[i] !== ',') key += opts[i++];
    let value = '';
    if (opts[i] !== '=') {
      // Only the first part may leave its key out (QEMU's implied "file").
      if (i - key.length !== 0) throw new FormatError(`Invalid parameter '${printable(key)}'`);
      i -= key.length;
      key = 'file';
    } else {
      i++;
    }
    while (i < opts.length) {
      if (opts[i] === ',') {
        if (opts[i + 1] === ',') { value += ','; i += 2; continue; }
        break;
      }
      value += opts[i++];
    }
    i++;
    if (key === '') throw new FormatError(`Invalid parameter ''`);
    o[key] = value;
  }
  // Nest dotted keys as QEMU's qdict_crumple does.
  const nested: Record<string, unknown> = {};
  for (const [k, v] of Object.entries(o)) {
    const parts = k.split('.');
    let at = nested;
    for (const p of parts.slice(0, -1)) {
      if (typeof at[p] !== 'object' || at[p] === null) at[p] = {};
      at = at[p] as Record<string, unknown>;
    }
    at[parts[parts.length - 1]!] = v;
  }
  return `json:${JSON.stringify(nested)}`;
}
