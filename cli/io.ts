// strata io: guest I/O for tests and scripts, with qemu-io's command spelling.
import { openImage, closeChain, parseFormat } from '../core/chain/open';
import { isWritable, type DiskImage } from '../core/engine/image';
import { RawImage } from '../core/engine/raw';
import { NodeFile } from '../core/io/node-file';
import { CancelledError, UsageError } from '../core/errors';
import { sizeToStr } from '../core/chain/size-str';
import { parse, parseSize, needPositionals, str, type CommandIO } from './common';

const USAGE = 'strata io [-f FMT] -c CMD [-c CMD ...] FILE   (CMD: write [-P PATTERN | -s FILE] [-z [-u]] [-c] OFF LEN | read [-P PATTERN] OFF LEN | discard OFF LEN | flush)';

interface IoCommand {
  op: 'write' | 'read' | 'discard' | 'flush';
  offset: number;
  length: number;
  pattern: number | null;
  /** write -s FILE: the data is the file's first LEN bytes. */
  source: string | null;
  zero: boolean;
  /** write -z -u: whole clusters may be freed. */
  unmap: boolean;
  compressed: boolean;
  text: string;
}

function parsePattern(s: string): number {
  const v = /^0x[0-9a-f]+$/i.test(s) ? parseInt(s, 16) : /^0[0-7]+$/.test(s) ? parseInt(s, 8) : /^\d+$/.test(s) ? parseInt(s, 10) : NaN;
  if (!Number.isFinite(v)) throw new UsageError(`invalid pattern '${s}'`);
  return v & 0xff;
}

export function parseIoCommand(text: string): IoCommand {
  const words = text.trim().split(/\s+/).filter(Boolean);
  const op = words.shift();
  const cmd: IoCommand = { op: 'flush', offset: 0, length: 0, pattern: null, source: null, zero: false, unmap: false, compressed: false, text };
  if (op === 'flush') return cmd;
  if (op !== 'write' && op !== 'read' && op !== 'discard') throw new UsageError(`unknown io command '${op ?? ''}' in '${text}' (write, read, discard, flush)`);
  cmd.op = op;
  const pos: string[] = [];
  while (words.length) {
    const w = words.shift()!;
    if (w === '-P' && op !== 'discard') cmd.pattern = parsePattern(words.shift() ?? '');
    else if (w === '-z' && op === 'write') cmd.zero = true;
    else if (w === '-c' && op === 'write') cmd.compressed = true;
    else if (w === '-u' && op === 'write') cmd.unmap = true;
    else if (w === '-s' && op === 'write') cmd.source = words.shift() ?? '';
    else if (w === '-q') continue;
    else if (w.startsWith('-') && !/^-?\d/.test(w)) throw new UsageError(`unknown option '${w}' in '${text}'`);
    else pos.push(w);
  }
  if (pos.length !== 2) throw new UsageError(`'${text}': expected OFFSET and LENGTH`);
  cmd.offset = parseSize(pos[0]!, 'offset');
  cmd.length = parseSize(pos[1]!, 'length');
  if (cmd.zero && cmd.pattern !== null) throw new UsageError(`'${text}': -z and -P cannot be combined`);
  if (cmd.source !== null && (cmd.zero || cmd.pattern !== null)) throw new UsageError(`'${text}': -s cannot be combined with -z or -P`);
  if (cmd.unmap && !cmd.zero) throw new UsageError(`'${text}': -u needs -z`);
  return cmd;
}

function statsLine(bytes: number, ms: number): string {
  const secs = ms / 1000;
  const mins = Math.floor(secs / 60);
  const rate = secs > 0 ? bytes / secs : 0;
  const ops = secs > 0 ? 1 / secs : 0;
  return `${sizeToStr(bytes)}, 1 ops; ${String(mins).padStart(2, '0')}:${(secs % 60).toFixed(2).padStart(5, '0')} sec (${sizeToStr(rate)}/sec and ${ops.toFixed(4)} ops/sec)\n`;
}

/** Pulls the (many) `-c CMD` pairs out before option parsing, which is slow for thousands. */
function takeCommands(args: string[]): { texts: string[]; rest: string[] } {
  const texts: string[] = [];
  const rest: string[] = [];
  for (let i = 0; i < args.length; i++) {
    const a = args[i]!;
    if (a === '-c' && i + 1 < args.length) texts.push(args[++i]!);
    else if (a.startsWith('-c') && a.length > 2 && !a.startsWith('--')) texts.push(a.slice(2));
    else rest.push(a);
  }
  return { texts, rest };
}

/** write -s: the first `length` bytes of the file (qemu-io refuses a shorter one). */
async function sourceData(path: string, length: number): Promise<Buffer> {
  const f = await NodeFile.open(path);
  try {
    const buf = Buffer.alloc(length);
    if ((await f.read(buf, 0)) < length) throw new UsageError(`${path}: shorter than the ${length} bytes to write`);
    return buf;
  } finally {
    await f.close();
  }
}

/** Up to this many non-overlapping writes are in flight at once (results print in order). */
const IN_FLIGHT = 8;

export async function ioCommand(args: string[], io: CommandIO, signal?: AbortSignal): Promise<number> {
  const { texts, rest } = takeCommands(args);
  const { values, positionals } = parse(rest, {
    format: { type: 'string', short: 'f' },
  }, USAGE);
  needPositionals(positionals, 1, USAGE);
  if (!texts.length) throw new UsageError(`give at least one -c command\nusage: ${USAGE}`);
  const cmds = texts.map(parseIoCommand);
  const needsWrite = cmds.some((c) => c.op === 'write' || c.op === 'discard');
  const img: DiskImage = await openImage(positionals[0]!, { format: parseFormat(str(values.format)), writable: needsWrite });
  if (needsWrite && img instanceof RawImage && img.probed) {
    io.err(`strata: warning: the format of '${img.filename}' was probed as raw: writes to its first sector that would make it probe as another format are refused (give -f raw to lift this)\n`);
  }
  let failed = false;
  let pending = '';
  const out = (s: string) => {
    pending += s;
    if (pending.length > 1 << 16) { io.out(pending); pending = ''; }
  };
  const patterns = new Map<string, Buffer>();
  const patternBuf = (len: number, pattern: number): Buffer => {
    const key = `${len}/${pattern}`;
    let b = patterns.get(key);
    if (!b) {
      if (patterns.size > 16) patterns.clear();
      b = Buffer.alloc(len, pattern);
      patterns.set(key, b);
    }
    return b;
  };
  // Guest writes to disjoint ranges may overlap in time (as a guest's queue would); anything
  // touching an in-flight range, and every read or flush, waits for what is in flight.
  const inflight: { start: number; end: number; done: Promise<string> }[] = [];
  const drain = async () => {
    while (inflight.length) out(await inflight.shift()!.done);
  };
  const runOne = async (c: IoCommand): Promise<string> => {
    const t0 = performance.now();
    let line = '';
    switch (c.op) {
      case 'flush':
        if (isWritable(img)) await img.flush();
        return '';
      case 'write': {
        if (!isWritable(img)) throw new UsageError('image is not writable');
        if (c.zero) {
          await img.writeZeroes(c.offset, c.length, { unmap: c.unmap });
        } else {
          const buf = c.source !== null ? await sourceData(c.source, c.length) : patternBuf(c.length, c.pattern ?? 0xcd);
          if (c.compressed) {
            if (!img.writeCompressed) throw new UsageError(`${img.filename}: compressed writes need a qcow2 image`);
            await img.writeCompressed(buf, c.offset);
          } else {
            await img.write(buf, c.offset);
          }
        }
        line = `wrote ${c.length}/${c.length} bytes at offset ${c.offset}\n`;
        break;
      }
      case 'discard':
        if (!isWritable(img)) throw new UsageError('image is not writable');
        await img.discard(c.offset, c.length);
        line = `discard ${c.length}/${c.length} bytes at offset ${c.offset}\n`;
        break;
      case 'read': {
        if (c.offset + c.length > img.virtualSize) throw new UsageError(`${img.filename}: read [${c.offset}, ${c.offset + c.length}) lies outside the image (${img.virtualSize} bytes)`);
        const buf = Buffer.allocUnsafe(c.length);
        await img.read(buf, c.offset);
        if (c.pattern !== null) {
          const bad = buf.findIndex((b) => b !== c.pattern);
          if (bad >= 0) {
            line += `Pattern verification failed at offset ${c.offset + bad}, ${c.length} bytes\n`;
            failed = true;
          }
        }
        line += `read ${c.length}/${c.length} bytes at offset ${c.offset}\n`;
        break;
      }
    }
    return line + statsLine(c.length, performance.now() - t0);
  };
  try {
    for (const c of cmds) {
      // Interrupted: no new command; what is in flight finishes and the image is closed cleanly.
      if (signal?.aborted) throw new CancelledError('io cancelled');
      const start = c.offset;
      const end = c.offset + c.length;
      // Zero writes and discards look at whole (sub)clusters around their range: they wait
      // for everything in flight, and nothing starts beside them.
      const concurrent = c.op === 'write' && !c.zero;
      if (!concurrent || inflight.some((f) => f.start < end && start < f.end)) await drain();
      const done = runOne(c);
      done.catch(() => {});
      if (!concurrent) { out(await done); continue; }
      inflight.push({ start, end, done });
      while (inflight.length >= IN_FLIGHT) out(await inflight.shift()!.done);
    }
    await drain();
  } finally {
    io.out(pending);
    pending = '';
    await Promise.allSettled(inflight.map((f) => f.done));
    await closeChain(img);
  }
  return failed ? 1 : 0;
}
