// QEMU's test drivers in image names, supported for compatibility with scripts written for
// qemu-img (QEMU's own iotests use them): blkdebug (an error-injecting filter on an image's
// file, core/io/blkdebug.ts), null-co (a device of a given size that reads zeros) and quorum
// (a file kept in several copies, read with a vote). The names:
//
//   blkdebug:CONFIG:IMAGE, blkdebug::IMAGE          (CONFIG in QEMU's ini syntax, may be empty)
//   json:{"driver":"qcow2","file":{"driver":"blkdebug","image":{"driver":"file","filename":F},
//         "inject-error":[{"event":"write_aio","errno":28,"once":true}],"set-state":[...]}}
//   json:{"driver":"blkdebug","image":{"driver":"qcow2","file":{...}},"align":"4k"}
//   json:{"driver":"null-co","size":N,"read-zeroes":true}
//   json:{"driver":"qcow2","file":{"driver":"quorum","vote-threshold":1,"children":[{...},...]}}
//
// and QEMU's JSON takes strings in single quotes as well as double.
import { FormatError, printable } from '../errors';
import type { ImageName } from './names';
import { parseImageName } from './names';

/** blkdebug's rules, as given: a config file (read when the image is opened) and/or options. */
export interface BlkdebugSpec {
  config?: string;
  injectError?: unknown[];
  setState?: unknown[];
}

/** What a test driver adds to an image that is a local file underneath. */
export interface TestDriverName {
  /**
   * The name QEMU shows for the image: blkdebug:CONFIG:IMAGE, or the json: name where it cannot
   * be said more simply (options beyond the config file, a quorum).
   */
  display: string;
  /** An error-injecting filter between the image and its file. */
  blkdebug?: BlkdebugSpec;
  /** A quorum: `path` is the first child; these are the others, and the votes a read needs. */
  quorum?: { others: string[]; threshold: number };
  /**
   * The image has no directory of its own (a quorum's children may be anywhere): a relative
   * backing name cannot be resolved, as QEMU's "cannot determine actual path".
   */
  noDirname?: boolean;
}

const FORMATS = new Set(['qcow2', 'raw']);
const FILE_DRIVERS = new Set(['file', 'host_device', 'host_cdrom']);

/**
 * QEMU's JSON (its lexer takes 'single-quoted' strings, where \' is a quote) as standard JSON:
 * single-quoted strings are re-quoted; everything else is left for JSON.parse to judge.
 */
export function qemuJsonToJson(text: string): string {
  let out = '';
  let i = 0;
  while (i < text.length) {
    const q = text[i]!;
    if (q !== '"' && q !== '\'') { out += q; i++; continue; }
    // A string: escapes are kept as they are (JSON's own), but \' is a plain quote in both
    // kinds and a bare " inside single quotes is escaped.
    out += '"';
    i++;
    while (i < text.length && text[i] !== q) {
      const d = text[i]!;
      if (d === '\\' && i + 1 < text.length) {
        out += text[i + 1] === '\'' ? '\'' : d + text[i + 1];
        i += 2;
      } else {
        out += d === '"' ? '\\"' : d;
        i++;
      }
    }
    // Unterminated: left open, for JSON.parse's error.
    if (i < text.length) { out += '"'; i++; }
  }
  return out;
}

function bad(name: string, what: string): FormatError {
  return new FormatError(`'${printable(name)}': ${what}`);
}

function obj(v: unknown): Record<string, unknown> | undefined {
  return v !== null && typeof v === 'object' && !Array.isArray(v) ? v as Record<string, unknown> : undefined;
}

/** A file node's path ({"driver": "file", "filename": F}); undefined for any other node. */
function fileNode(name: string, v: unknown, what: string): string | undefined {
  const o = obj(v);
  if (!o) {
    if (v === undefined) throw bad(name, `no '${what}' node`);
    throw bad(name, `'${what}' must be a node's options ({"driver": "file", "filename": ...})`);
  }
  const driver = o.driver ?? 'file';
  if (typeof driver !== 'string' || !FILE_DRIVERS.has(driver)) return undefined;
  if (typeof o.filename !== 'string') throw bad(name, `no '${what}.filename' for the ${driver} driver`);
  return o.filename;
}

function ruleList(name: string, v: unknown, key: string): unknown[] | undefined {
  if (v === undefined) return undefined;
  if (!Array.isArray(v)) throw bad(name, `'${key}' must be a list of rules`);
  return v;
}

/** blkdebug's options over a file node (the `file` of a format node, or a json: name's top). */
function blkdebugOverFile(name: string, o: Record<string, unknown>, path: string, format: string | undefined): ImageName {
  if (o.config !== undefined && typeof o.config !== 'string') throw bad(name, `blkdebug's 'config' must be a file name`);
  const injectError = ruleList(name, o['inject-error'], 'inject-error');
  const setState = ruleList(name, o['set-state'], 'set-state');
  const spec: BlkdebugSpec = { ...(o.config !== undefined ? { config: o.config as string } : {}), ...(injectError ? { injectError } : {}), ...(setState ? { setState } : {}) };
  // QEMU names it blkdebug:CONFIG:IMAGE when nothing but those two were given.
  const simple = !injectError && !setState;
  const display = simple ? `blkdebug:${spec.config ?? ''}:${path}` : name;
  return { kind: 'file', path, ...(format ? { format } : {}), test: { display, blkdebug: spec } };
}

/**
 * A json: name whose options use a test driver, as the image it opens; undefined when they use
 * none (the name is then read as any other json: name).
 */
export function testDriverName(name: string, raw: Record<string, unknown>): ImageName | undefined {
  const driver = raw.driver;
  if (driver === 'null-co' || driver === 'null-aio') {
    const size = raw.size === undefined ? 1 << 30 : typeof raw.size === 'string' ? Number(raw.size) : raw.size;
    if (typeof size !== 'number' || !Number.isSafeInteger(size) || size < 0) throw bad(name, `'size' of the ${driver} driver must be a number of bytes`);
    return { kind: 'null', size, display: name };
  }
  if (driver === 'blkdebug') {
    const image = obj(raw.image);
    // Over a format node: a filter above the image, which passes everything through (the
    // format driver sends its events to its own file, not here).
    if (image && typeof image.driver === 'string' && FORMATS.has(image.driver)) return parseImageName(`json:${JSON.stringify(image)}`);
    const path = fileNode(name, raw.image, 'image');
    if (path === undefined) return { kind: 'protocol', protocol: String(image?.driver) };
    return blkdebugOverFile(name, raw, path, undefined);
  }
  const file = obj(raw.file);
  if (!file || (file.driver !== 'blkdebug' && file.driver !== 'quorum')) return undefined;
  if (driver !== undefined && (typeof driver !== 'string' || !FORMATS.has(driver))) return undefined;
  const format = driver as string | undefined;
  if (file.driver === 'blkdebug') {
    const path = fileNode(name, file.image, 'file.image');
    if (path === undefined) return { kind: 'protocol', protocol: String(obj(file.image)?.driver) };
    return blkdebugOverFile(name, file, path, format);
  }
  const children = file.children;
  if (!Array.isArray(children) || children.length === 0) throw bad(name, `a quorum needs 'children' (a list of file nodes)`);
  const paths: string[] = [];
  for (const c of children) {
    const p = fileNode(name, c, 'file.children[]');
    if (p === undefined) return { kind: 'protocol', protocol: String(obj(c)?.driver) };
    paths.push(p);
  }
  const t = file['vote-threshold'];
  const threshold = typeof t === 'string' ? Number(t) : t;
  if (typeof threshold !== 'number' || !Number.isInteger(threshold) || threshold < 1 || threshold > paths.length) {
    throw bad(name, `the quorum's 'vote-threshold' must be a number from 1 to its number of children (${paths.length})`);
  }
  return { kind: 'file', path: paths[0]!, ...(format ? { format } : {}), test: { display: name, quorum: { others: paths.slice(1), threshold }, noDirname: true } };
}

/** blkdebug:CONFIG:IMAGE (CONFIG may be empty), as QEMU's blkdebug_parse_filename reads it. */
export function parseBlkdebugName(name: string): ImageName {
  const rest = name.slice('blkdebug:'.length);
  const c = rest.indexOf(':');
  if (c < 0) throw bad(name, 'blkdebug requires both config file and image path (blkdebug:CONFIG:IMAGE, CONFIG may be empty)');
  const config = rest.slice(0, c);
  const inner = parseImageName(rest.slice(c + 1));
  if (inner.kind !== 'file' || inner.test) return inner.kind === 'protocol' ? inner : { kind: 'protocol', protocol: 'blkdebug' };
  return { ...inner, test: { display: name, blkdebug: config ? { config } : {} } };
}
