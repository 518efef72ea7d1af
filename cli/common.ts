// Shared CLI plumbing: argument parsing in qemu-img's spelling, sizes, errors, output.
import { parseArgs, type ParseArgsConfig } from 'node:util';
import { StrataError, UsageError } from '../core/errors';
import { imageOptsName } from '../core/chain/names';
import { strtosz } from '../core/chain/size-str';

export interface CommandIO {
  out: (s: string) => void;
  err: (s: string) => void;
  isTTY: boolean;
  /**
   * The name the command was started under. 'qemu-img' (a link of that name to strata, the
   * drop-in) prints qemu-img's messages under qemu-img's name, as scripts and QEMU's iotests
   * expect them; 'strata' (the default) prints Strata's, which say what to do.
   */
  program?: Program;
}

export type Program = 'strata' | 'qemu-img';

/** The program a path was started as: qemu-img for a link of that name, else strata. */
export function programOf(argv1: string): Program {
  return /(?:^|[\\/])qemu-img$/.test(argv1) ? 'qemu-img' : 'strata';
}

/** True when the command speaks as qemu-img (see CommandIO.program). */
export function asQemu(io: CommandIO): boolean {
  return io.program === 'qemu-img';
}

// process.stdout and process.stderr are made on first use, and making one loads node's
// streams (and node:net for a pipe): a command that prints nothing, like convert without -p,
// does not pay for them. Hence the getter.
export const stdio: CommandIO = {
  out: (s) => { process.stdout.write(s); },
  err: (s) => { process.stderr.write(s); },
  get isTTY() { return !!process.stdout.isTTY; },
};

export type Options = NonNullable<ParseArgsConfig['options']>;

export function parse(args: string[], options: Options, usage: string): { values: Record<string, string | boolean | string[] | undefined>; positionals: string[] } {
  try {
    const r = parseArgs({ args, options, allowPositionals: true, strict: true });
    return { values: r.values as Record<string, string | boolean | string[] | undefined>, positionals: r.positionals };
  } catch (err) {
    throw new UsageError(`${(err as Error).message.split('\n')[0]}\nusage: ${usage}`);
  }
}

const SUFFIXES: Record<string, number> = { '': 1, b: 1, k: 2 ** 10, m: 2 ** 20, g: 2 ** 30, t: 2 ** 40, p: 2 ** 50, e: 2 ** 60 };

/**
 * qemu-img sizes (QEMU's qemu_strtosz): 512, 64k, 1M, 4G, 1T, 0x10000, 1.5G; Strata also takes
 * 64KiB. Values past 2^53 are taken where a double holds them exactly (1E, 2^60). Errors carry
 * qemu-img's cvtnum text, naming `qemuName`.
 */
export function parseSize(text: string, what = 'size', qemuName = 'image size'): number {
  const r = strtosz(text);
  const invalid = () => new UsageError(`invalid ${what} '${text}' (examples: 512, 64k, 1M, 4G, 0x10000)`)
    .asQemu(`Invalid ${qemuName} specified. You may use k, M, G, T, P or E suffixes for\nqemu-img: kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.`);
  const range = () => new UsageError(`${what} '${text}' is too large`)
    .asQemu(`Invalid ${qemuName} specified. Must be between 0 and 9223372036854775807.`);
  if (r === 'range') throw range();
  if (r === 'invalid') {
    // Strata's own spelling with an IEC unit (64KiB, 1 MiB).
    const m = /^\s*(\d+(?:\.\d+)?)\s*([kmgtpe]?)i?b\s*$/i.exec(text);
    if (!m) throw invalid();
    const v = Number(m[1]) * SUFFIXES[m[2]!.toLowerCase()]!;
    if (!Number.isInteger(v)) throw new UsageError(`${what} '${text}' is not a whole number of bytes`);
    if (v > Number.MAX_SAFE_INTEGER) throw range();
    return v;
  }
  if (r > (1n << 63n) - 1n) throw range();
  const v = Number(r);
  if (BigInt(v) !== r) throw new UsageError(`${what} '${text}' cannot be handled exactly (sizes past 2^53 must be multiples of a large power of two)`);
  return v;
}

export function str(v: unknown): string | undefined {
  return typeof v === 'string' ? v : undefined;
}

export function outputFormat(v: unknown): 'human' | 'json' {
  const s = str(v) ?? 'human';
  if (s !== 'human' && s !== 'json') throw new UsageError(`--output must be human or json, not '${s}'`);
  return s;
}

export function needPositionals(pos: string[], n: number, usage: string): void {
  if (pos.length < n) throw new UsageError(`missing argument\nusage: ${usage}`);
  if (pos.length > n) throw new UsageError(`unexpected argument '${pos[n]}'\nusage: ${usage}`);
}

/** Maps an error to the CLI's one-line message and exit code. */
export function reportError(err: unknown, io: CommandIO, exitCode = 1): number {
  if (process.env.STRATA_DEBUG === '1' && err instanceof Error) io.err(`${err.stack}\n`);
  const prog = io.program ?? 'strata';
  if (err instanceof StrataError) {
    if (asQemu(io)) {
      // qemu-img exits 1 for bad usage as for any other failure. A usage error without
      // qemu-img's own text (options and arguments) gets its pointer to --help.
      if (err.qemu !== undefined) io.err(`${prog}: ${err.qemu}\n`);
      else if (err.kind === 'usage') io.err(`${prog}: ${err.message.split('\n')[0]}\nTry 'qemu-img --help' for more information\n`);
      else io.err(`${prog}: ${err.message}\n`);
      return err.kind === 'usage' ? 1 : exitCode;
    }
    io.err(`${prog}: ${err.message}\n`);
    return err.kind === 'usage' ? 2 : exitCode;
  }
  const e = err as NodeJS.ErrnoException;
  io.err(`${prog}: ${e?.message ?? String(err)}\n`);
  return exitCode;
}

/** --image-opts: `name` is an option string; -f cannot go with it (qemu-img's refusal). */
export function imageArg(name: string, values: Record<string, unknown>, fmtKey = 'format'): string {
  if (!values['image-opts']) return name;
  if (values[fmtKey] !== undefined) throw new UsageError('--image-opts and --format are mutually exclusive').asQemu('--image-opts and --format are mutually exclusive');
  return imageOptsName(name);
}

/** The --image-opts option for parse(). */
export const IMAGE_OPTS: Options = { 'image-opts': { type: 'boolean' } };

/** QEMU's tdb_hash (qobject/qdict.c), which places a key in one of a QDict's 512 buckets. */
function qdictBucket(key: string): number {
  const b = Buffer.from(key, 'utf8');
  let v = Math.imul(0x238f13af, b.length) >>> 0;
  for (let i = 0; i < b.length; i++) v = (v + ((b[i]! << ((i * 5) % 24)) >>> 0)) >>> 0;
  return ((Math.imul(1103515243, v) + 12345) >>> 0) % 512;
}

/** A value with every object's keys in the order a QEMU QDict holding them iterates. */
function qdictOrdered(v: unknown): unknown {
  if (Array.isArray(v)) return v.map(qdictOrdered);
  if (v === null || typeof v !== 'object') return v;
  // Bucket by bucket; within a bucket the last inserted first (QEMU inserts at the head). The
  // object's own order is the order QEMU's QAPI visitor inserts the members.
  const keys = Object.keys(v).map((k, i) => ({ k, i, b: qdictBucket(k) }));
  keys.sort((x, y) => x.b - y.b || y.i - x.i);
  const out: Record<string, unknown> = {};
  for (const { k } of keys) out[k] = qdictOrdered((v as Record<string, unknown>)[k]);
  return out;
}

/**
 * JSON as qemu-img prints a QAPI object (info, check, measure): pretty, four spaces, and the
 * members in QDict order, which is the order of the keys' hash buckets, not the schema's.
 */
export function qapiJson(v: unknown): string {
  return JSON.stringify(qdictOrdered(v), null, 4);
}
