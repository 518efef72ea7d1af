import { parseImageName, protocolRefusal } from '../core/chain/names';
import { parseNbdName } from '../core/chain/nbd-name';
// strata check: qemu-img check's options, output (human and JSON) and exit codes:
// 0 clean, 1 the check failed to run, 2 corruptions, 3 only leaks, 63 format without checks.
import { UsageError } from '../core/errors';
import { checkImage, CheckNotSupportedError, planCheck, type CheckResult } from '../core/jobs/check';
import { printPlan } from './plan-output';
import { parseFormat } from '../core/chain/open';
import { asQemu, outputFormat, parse, needPositionals, reportError, str, type CommandIO, imageArg, IMAGE_OPTS } from './common';

const USAGE = 'strata check [--output=human|json] [-r leaks|all [--dry-run]] [-f FMT] [-q] [-U] FILE';

/** C's printf("%0.2f"): the exact binary value rounded, ties to even. */
export function cFixed2(x: number): string {
  const exact = x.toFixed(100);
  const neg = exact.startsWith('-');
  const [int, frac] = (neg ? exact.slice(1) : exact).split('.') as [string, string];
  let n = BigInt(int + frac.slice(0, 2));
  const rest = frac.slice(2);
  const first = rest.charCodeAt(0) - 48;
  const tail = /[1-9]/.test(rest.slice(1));
  if (first > 5 || (first === 5 && (tail || n % 2n === 1n))) n += 1n;
  const s = n.toString().padStart(3, '0');
  return `${neg ? '-' : ''}${s.slice(0, -2)}.${s.slice(-2)}`;
}

/** qemu's JSON string encoding (qobject/qjson.c): ASCII only, \uXXXX for the rest. */
function qemuJsonString(s: string): string {
  let out = '"';
  for (const ch of s) {
    const cp = ch.codePointAt(0)!;
    switch (ch) {
      case '"': out += '\\"'; continue;
      case '\\': out += '\\\\'; continue;
      case '\b': out += '\\b'; continue;
      case '\f': out += '\\f'; continue;
      case '\n': out += '\\n'; continue;
      case '\r': out += '\\r'; continue;
      case '\t': out += '\\t'; continue;
    }
    if (cp > 0xffff) {
      const v = cp - 0x10000;
      out += `\\u${(0xd800 + (v >> 10)).toString(16).toUpperCase()}\\u${(0xdc00 + (v & 0x3ff)).toString(16).toUpperCase()}`;
    } else if (cp < 0x20 || cp >= 0x7f) {
      out += `\\u${cp.toString(16).toUpperCase().padStart(4, '0')}`;
    } else {
      out += ch;
    }
  }
  return out + '"';
}

/**
 * The JSON document qemu-img prints: the ImageCheck fields present in each situation
 * (optional ones only when non-zero), in the order qemu's QDict hash table yields them.
 */
export function checkJson(r: CheckResult): string {
  const fields: [string, string | number, boolean][] = [
    ['image-end-offset', r.imageEndOffset, r.imageEndOffset !== 0],
    ['compressed-clusters', r.compressedClusters, r.compressedClusters !== 0],
    ['total-clusters', r.totalClusters, r.totalClusters !== 0],
    ['corruptions', r.corruptions, r.corruptions !== 0],
    ['corruptions-fixed', r.corruptionsFixed, r.corruptionsFixed !== 0],
    ['check-errors', r.checkErrors, true],
    ['leaks', r.leaks, r.leaks !== 0],
    ['leaks-fixed', r.leaksFixed, r.leaksFixed !== 0],
    ['allocated-clusters', r.allocatedClusters, r.allocatedClusters !== 0],
    ['filename', r.filename, true],
    ['format', r.format, true],
    ['fragmented-clusters', r.fragmentedClusters, r.fragmentedClusters !== 0],
  ];
  const lines = fields.filter((f) => f[2]).map(([k, v]) => `    "${k}": ${typeof v === 'string' ? qemuJsonString(v) : String(v)}`);
  return `{\n${lines.join(',\n')}\n}\n`;
}

/** qemu-img's dump_human_image_check. */
export function checkHuman(r: CheckResult): string {
  let out = '';
  if (!(r.corruptions || r.leaks || r.checkErrors)) {
    out += 'No errors were found on the image.\n';
  } else {
    if (r.corruptions) {
      out += `\n${r.corruptions} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n`;
    }
    if (r.leaks) {
      out += `\n${r.leaks} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n`;
    }
    if (r.checkErrors) {
      out += `\n${r.checkErrors} internal errors have occurred during the check.\n`;
    }
  }
  if (r.totalClusters !== 0 && r.allocatedClusters !== 0) {
    out += `${r.allocatedClusters}/${r.totalClusters} = ${cFixed2((r.allocatedClusters * 100) / r.totalClusters)}% allocated, ` +
      `${cFixed2((r.fragmentedClusters * 100) / r.allocatedClusters)}% fragmented, ` +
      `${cFixed2((r.compressedClusters * 100) / r.allocatedClusters)}% compressed clusters\n`;
  }
  if (r.imageEndOffset) out += `Image end offset: ${r.imageEndOffset}\n`;
  return out;
}

export async function checkCommand(args: string[], io: CommandIO, signal: AbortSignal): Promise<number> {
  let values: Record<string, string | boolean | string[] | undefined>;
  let positionals: string[];
  let repair: 'leaks' | 'all' | null = null;
  let fmt: 'human' | 'json';
  let format: 'qcow2' | 'raw' | undefined;
  try {
    ({ values, positionals } = parse(args, {
    ...IMAGE_OPTS,
      output: { type: 'string' },
      repair: { type: 'string', short: 'r' },
      format: { type: 'string', short: 'f' },
      quiet: { type: 'boolean', short: 'q' },
      'force-share': { type: 'boolean', short: 'U' },
      'dry-run': { type: 'boolean' },
    }, USAGE));
    needPositionals(positionals, 1, USAGE);
    fmt = outputFormat(values.output);
    format = parseFormat(str(values.format));
    const r = str(values.repair);
    if (r !== undefined) {
      if (r !== 'leaks' && r !== 'all') throw new UsageError(`Unknown option value for -r (expecting 'leaks' or 'all'): ${r}`);
      repair = r;
    }
  } catch (err) {
    // qemu-img check exits 1 on bad usage; 2 would read as "corruptions found".
    reportError(err, io);
    return 1;
  }
  const quiet = !!values.quiet;
  if (values['dry-run']) {
    if (!repair) { reportError(new UsageError('a check without -r writes nothing: --dry-run goes with -r'), io); return 1; }
    return printPlan(await planCheck(imageArg(positionals[0]!, values), { repair, format }), values, io);
  }
  let result: CheckResult;
  try {
    if (values['force-share'] && repair) throw new UsageError('-U (force share) cannot be used with -r (repairs need the image to themselves)');
    // --image-opts: the file the option string names, checked as the format it names; the
    // report names the image as given, as qemu-img's does.
    let path = positionals[0]!;
    let dataFile: string | undefined;
    // An NBD export (raw): no metadata to check, as qemu-img says (exit 63).
    if (parseNbdName(imageArg(path, values))) throw new CheckNotSupportedError();
    let keySecret: string | undefined;
    if (values['image-opts']) {
      const n = parseImageName(imageArg(path, values));
      if (n.kind !== 'file') throw protocolRefusal(path, n.kind === 'protocol' ? n.protocol : 'null-co');
      path = n.path;
      format = parseFormat(n.format) ?? format;
      dataFile = n.dataFile;
      keySecret = n.keySecrets?.[0];
    }
    // Lines qemu-img prints through error_report carry its name: Strata's own under strata.
    const log = (line: string) => io.err(`${asQemu(io) ? line : line.replace(/^qemu-img: /gm, 'strata: ')}\n`);
    result = await checkImage({ signal, log }, path, { repair, format, forceShare: !!values['force-share'], dataFile, keySecret });
    if (values['image-opts']) result = { ...result, filename: positionals[0]! };
  } catch (err) {
    if (err instanceof CheckNotSupportedError) {
      io.err(`strata: ${err.message}\n`);
      return 63;
    }
    throw err;
  }
  if (result.repaired && fmt === 'human' && !quiet) {
    io.out('The following inconsistencies were found and repaired:\n\n' +
      `    ${result.repaired.leaks} leaked clusters\n` +
      `    ${result.repaired.corruptions} corruptions\n\n` +
      'Double checking the fixed image now...\n');
  }
  if (!quiet) io.out(fmt === 'json' ? checkJson(result) : checkHuman(result));
  if (result.checkErrors) {
    io.err('strata: Check failed\n');
    return 1;
  }
  if (result.corruptions) return 2;
  if (result.leaks) return 3;
  return 0;
}
