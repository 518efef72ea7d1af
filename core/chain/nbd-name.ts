// NBD image names, as QEMU 7.2's nbd driver reads them: URLs (nbd://HOST[:PORT]/EXPORT,
// nbd+tcp://..., nbd+unix:///EXPORT?socket=PATH), the older nbd:unix:PATH[:exportname=E] and
// nbd:HOST:PORT[:exportname=E], and json: / --image-opts options (driver=nbd with server.*,
// export and x-dirty-bitmap; or a format node over one: driver=raw,file.driver=nbd,...).
import { FormatError, UnsupportedFeatureError, printable } from '../errors';
import type { NbdServer, NbdTarget } from '../io/nbd';

export interface NbdName {
  target: NbdTarget;
  /**
   * The format node over the export, when the name gives one ('raw', 'qcow2'); 'nbd' when
   * the name is the protocol node itself (driver=nbd: no format probing, as in QEMU);
   * undefined for a URL (probed, unless -f says).
   */
  driver?: string;
}

const NBD_DEFAULT_PORT = '10809';
const URL_SCHEMES = new Set(['nbd', 'nbd+tcp', 'nbd+unix']);

/** The NBD name `name` stands for, or null when it is no NBD name. Malformed NBD names throw. */
export function parseNbdName(name: string): NbdName | null {
  const colon = name.indexOf(':');
  if (colon < 0) return null;
  const scheme = name.slice(0, colon);
  if (scheme === 'json') return parseJson(name);
  if (URL_SCHEMES.has(scheme) && name.includes('://')) return { target: parseUrl(name) };
  if (scheme === 'nbd') return { target: parseLegacy(name) };
  return null;
}

const invalid = (name: string, why: string) => new FormatError(`'${printable(name)}' is not a valid NBD name: ${why}`);

/** QEMU's nbd_parse_uri. */
function parseUrl(name: string): NbdTarget {
  const m = /^([a-z+]+):\/\/([^/?#]*)([^?#]*)(?:\?([^#]*))?$/.exec(name);
  if (!m) throw invalid(name, 'expected nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH');
  const [, scheme, authority, rawPath, query] = m as unknown as [string, string, string, string, string | undefined];
  let path: string;
  try { path = decodeURIComponent(rawPath); } catch { throw invalid(name, 'bad %-escape in the export name'); }
  if (path.startsWith('/')) path = path.slice(1);
  const exp = path === '' ? null : path;
  const params = query === undefined || query === '' ? [] : query.split(/[&;]/).filter((p) => p !== '');
  if (scheme === 'nbd+unix') {
    if (authority !== '') throw invalid(name, 'nbd+unix takes no host (nbd+unix:///EXPORT?socket=PATH)');
    if (params.length !== 1 || !params[0]!.startsWith('socket=')) throw invalid(name, 'nbd+unix needs exactly one parameter, socket=PATH');
    let socket: string;
    try { socket = decodeURIComponent(params[0]!.slice('socket='.length)); } catch { throw invalid(name, 'bad %-escape in the socket path'); }
    return { server: { type: 'unix', path: socket }, export: exp };
  }
  if (params.length) throw invalid(name, `${scheme} takes no parameters`);
  const hp = /^(\[[^\]]*\]|[^:]*)(?::(\d*))?$/.exec(authority);
  if (!hp || hp[1] === '') throw invalid(name, 'no host');
  const host = hp[1]!.startsWith('[') ? hp[1]!.slice(1, -1) : hp[1]!;
  const port = hp[2] ? String(Number(hp[2])) : NBD_DEFAULT_PORT;
  return { server: { type: 'inet', host, port }, export: exp };
}

/** QEMU's nbd_parse_filename: nbd:unix:PATH[:exportname=E], nbd:HOST:PORT[:exportname=E]. */
function parseLegacy(name: string): NbdTarget {
  let spec = name.slice('nbd:'.length);
  let exp: string | null = null;
  const en = spec.indexOf(':exportname=');
  if (en >= 0) {
    exp = spec.slice(en + ':exportname='.length);
    spec = spec.slice(0, en);
  }
  if (spec.startsWith('unix:')) return { server: { type: 'unix', path: spec.slice('unix:'.length) }, export: exp };
  const m = /^(\[[^\]]*\]|[^:]+):(\d+)$/.exec(spec);
  if (!m) throw invalid(name, 'expected nbd:unix:PATH or nbd:HOST:PORT (with :exportname=NAME)');
  return { server: { type: 'inet', host: m[1]!.startsWith('[') ? m[1]!.slice(1, -1) : m[1]!, port: String(Number(m[2])) }, export: exp };
}

function parseJson(name: string): NbdName | null {
  let raw: unknown;
  try { raw = JSON.parse(name.slice('json:'.length)); } catch { return null; }
  if (raw === null || typeof raw !== 'object' || Array.isArray(raw)) return null;
  const top = raw as Record<string, unknown>;
  if (top.driver === 'nbd') return { target: nbdOptions(name, top), driver: 'nbd' };
  const file = top.file;
  if (file !== null && typeof file === 'object' && !Array.isArray(file) && (file as Record<string, unknown>).driver === 'nbd') {
    const driver = typeof top.driver === 'string' ? top.driver : undefined;
    return { target: nbdOptions(name, file as Record<string, unknown>), ...(driver !== undefined ? { driver } : {}) };
  }
  return null;
}

/** The nbd driver's options (server.*, or the older host/port/path; or a filename URL). */
function nbdOptions(name: string, o: Record<string, unknown>): NbdTarget {
  const str = (k: string, v: unknown): string | undefined => {
    if (v === undefined) return undefined;
    if (typeof v === 'number') return String(v);
    if (typeof v !== 'string') throw invalid(name, `'${k}' must be a string`);
    return v;
  };
  if (o['tls-creds'] !== undefined) throw new UnsupportedFeatureError(`'${printable(name)}': NBD over TLS is not supported (Strata's NBD client speaks plain NBD)`);
  const xDirtyBitmap = str('x-dirty-bitmap', o['x-dirty-bitmap']);
  const withBitmap = (t: NbdTarget): NbdTarget => (xDirtyBitmap !== undefined ? { ...t, xDirtyBitmap } : t);
  const filename = str('filename', o.filename);
  if (filename !== undefined) {
    for (const k of ['host', 'port', 'path', 'export', 'server']) {
      if (o[k] !== undefined) throw new FormatError(`'${printable(name)}': Option '${k}' cannot be used with a file name`).asQemu(`Option '${k}' cannot be used with a file name`);
    }
    const parsed = parseNbdName(filename);
    if (!parsed || filename.startsWith('json:')) throw invalid(name, `'${printable(filename)}' is not an NBD URL`);
    return withBitmap(parsed.target);
  }
  const exp = str('export', o.export) ?? null;
  let server: NbdServer;
  const s = o.server;
  if (s !== undefined) {
    if (s === null || typeof s !== 'object' || Array.isArray(s)) throw invalid(name, "'server' must be an object");
    const so = s as Record<string, unknown>;
    const type = str('server.type', so.type);
    if (type === 'unix') {
      const path = str('server.path', so.path);
      if (path === undefined) throw invalid(name, "no 'server.path' for a unix socket");
      server = { type: 'unix', path };
    } else if (type === 'inet') {
      const host = str('server.host', so.host);
      if (host === undefined) throw invalid(name, "no 'server.host'");
      server = { type: 'inet', host, port: str('server.port', so.port) ?? NBD_DEFAULT_PORT };
    } else if (type === undefined) {
      throw invalid(name, "no 'server.type' (unix or inet)").asQemu("Parameter 'type' is missing");
    } else {
      throw new UnsupportedFeatureError(`'${printable(name)}': NBD server type '${printable(type)}' is not supported (unix and inet are)`);
    }
  } else {
    const path = str('path', o.path);
    const host = str('host', o.host);
    if (path !== undefined && host !== undefined) throw invalid(name, "'path' and 'host' are mutually exclusive");
    if (path !== undefined) server = { type: 'unix', path };
    else if (host !== undefined) server = { type: 'inet', host, port: str('port', o.port) ?? NBD_DEFAULT_PORT };
    else throw invalid(name, "no server (give server.type=unix with server.path, or server.type=inet with server.host)");
  }
  return withBitmap({ server, export: exp });
}
