// Secrets given with qemu-img's `--object secret,id=ID,data=...` (or file=PATH, and
// format=raw|base64), looked up by id where an image names one (`encrypt.key-secret=ID` in
// --image-opts, a json: name or create's -o). They live for one command: the CLI registers
// them before the command runs and clears them after it.
import { readFileSync } from 'node:fs';
import { UsageError, printable } from '../errors';
import { AesCipher } from '../engine/aes';
import { createLuks, type LuksCreateOptions } from '../engine/luks';

const secrets = new Map<string, Buffer>();

function qemuUsage(msg: string, qemu: string = msg): UsageError {
  return new UsageError(msg).asQemu(qemu);
}

/** Splits QEMU's option syntax (key=value pairs, ",," a literal comma; a bare first part is the type). */
function splitObject(text: string): Array<[string, string | undefined]> {
  const out: Array<[string, string | undefined]> = [];
  let cur = '';
  const flush = () => {
    const eq = cur.indexOf('=');
    out.push(eq < 0 ? [cur, undefined] : [cur.slice(0, eq), cur.slice(eq + 1)]);
    cur = '';
  };
  for (let i = 0; i < text.length; i++) {
    const ch = text[i]!;
    if (ch === ',') {
      if (text[i + 1] === ',') { cur += ','; i++; continue; }
      flush();
    } else {
      cur += ch;
    }
  }
  flush();
  return out;
}

/** Registers one `--object` argument. Only secrets are known (qemu-img's other objects are for VMs). */
export function addObject(text: string): void {
  const parts = splitObject(text);
  const o: Record<string, string> = {};
  for (const [i, [k, v]] of parts.entries()) {
    if (v === undefined) {
      if (i === 0) { o['qom-type'] = k; continue; }
      throw qemuUsage(`--object ${printable(text)}: '${printable(k)}' needs a value`, `Invalid parameter '${k}'`);
    }
    o[k] = v;
  }
  const type = o['qom-type'];
  if (type === undefined) throw qemuUsage(`--object ${printable(text)}: no object type (give secret,id=ID,data=...)`, "Parameter 'qom-type' is missing");
  if (type !== 'secret') throw qemuUsage(`--object ${printable(text)}: Strata knows only 'secret' objects (secret,id=ID,data=...)`, `Parameter 'qom-type' does not accept value '${type}'`);
  const id = o.id;
  if (id === undefined) throw qemuUsage(`--object ${printable(text)}: the secret has no id (give id=ID)`, "Parameter 'id' is missing");
  for (const k of Object.keys(o)) {
    if (!['qom-type', 'id', 'data', 'file', 'format'].includes(k)) throw qemuUsage(`--object ${printable(text)}: unknown parameter '${printable(k)}' (a secret takes data= or file=, and format=raw|base64)`, `Parameter '${k}' is unexpected`);
  }
  if (o.data !== undefined && o.file !== undefined) throw qemuUsage(`--object ${printable(text)}: give data= or file=, not both`, "'file' and 'data' are mutually exclusive");
  if (o.data === undefined && o.file === undefined) throw qemuUsage(`--object ${printable(text)}: the secret needs data= or file=`, "Either 'file' or 'data' must be provided");
  const format = o.format ?? 'raw';
  if (format !== 'raw' && format !== 'base64') throw qemuUsage(`--object ${printable(text)}: format must be raw or base64, not '${printable(format)}'`, `Parameter 'format' does not accept value '${format}'`);
  let bytes: Buffer;
  if (o.file !== undefined) {
    try {
      bytes = readFileSync(o.file);
    } catch (err) {
      throw qemuUsage(`--object ${printable(text)}: cannot read the secret file '${printable(o.file)}': ${(err as Error).message}`, `Unable to read ${o.file}: Failed to open file “${o.file}”: No such file or directory`);
    }
  } else {
    bytes = Buffer.from(o.data!, 'utf8');
  }
  if (format === 'base64') {
    const t = bytes.toString('latin1');
    if (!/^[A-Za-z0-9+/]*={0,2}$/.test(t.replace(/\s/g, ''))) throw qemuUsage(`--object ${printable(text)}: the secret is not valid base64`, 'Base64 data contains invalid characters');
    bytes = Buffer.from(t, 'base64');
  }
  if (secrets.has(id)) throw qemuUsage(`--object ${printable(text)}: a secret with id '${printable(id)}' is already given`, `attempt to add duplicate property '${id}' to object (type 'container')`);
  secrets.set(id, bytes);
}

/** Forgets every secret (the end of a command). */
export function clearSecrets(): void {
  secrets.clear();
}

/** The bytes of the secret `id` keying `image`; qemu-img's error when there is none. */
export function secretFor(id: string, image: string): Buffer {
  const s = secrets.get(id);
  if (s === undefined) {
    throw new UsageError(`${printable(image)}: no secret with id '${printable(id)}' (give it with --object secret,id=${printable(id)},data=...)`)
      .asQemu(`Could not open '${image}': No secret with id '${id}'`);
  }
  return s;
}

/** The cipher for an AES image whose key is the secret `id`; qemu-img's error when there is none. */
export function aesCipherFor(id: string, image: string): AesCipher {
  return new AesCipher(secretFor(id, image));
}

/** The cipher for create's encrypt.key-secret (qemu-img create's error names the new file alone). */
export function aesCipherForCreate(id: string | undefined, path: string): AesCipher {
  if (id === undefined) {
    throw new UsageError(`${path}: an encrypted image needs its key: give encrypt.key-secret=ID and --object secret,id=ID,data=...`)
      .asQemu(`${path}: Parameter 'encrypt.key-secret' is required for cipher`);
  }
  const s = secrets.get(id);
  if (s === undefined) throw new UsageError(`${path}: no secret with id '${printable(id)}' (give it with --object secret,id=${printable(id)},data=...)`).asQemu(`${path}: No secret with id '${id}'`);
  return new AesCipher(s);
}

/**
 * A new LUKS area (header and key slot 0) keyed by create's encrypt.key-secret, with qemu-img
 * create's refusals.
 */
export function luksAreaForCreate(id: string | undefined, path: string, o: LuksCreateOptions, prefix = 'encrypt.'): Buffer {
  if (id === undefined) {
    throw new UsageError(`${path}: an encrypted image needs its key: give ${prefix}key-secret=ID and --object secret,id=ID,data=...`)
      .asQemu(`${path}: Parameter '${prefix}key-secret' is required for cipher`);
  }
  const s = secrets.get(id);
  if (s === undefined) throw new UsageError(`${path}: no secret with id '${printable(id)}' (give it with --object secret,id=${printable(id)},data=...)`).asQemu(`${path}: No secret with id '${id}'`);
  return createLuks(o, s).area;
}

/** The bytes of the secret `id`, or undefined when none was given. */
export function lookupSecret(id: string): Buffer | undefined {
  return secrets.get(id);
}
