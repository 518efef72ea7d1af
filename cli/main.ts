// The strata command: qemu-img's commands and spelling over our own engine.
import { availableParallelism } from 'node:os';
import { CancelledError, UsageError } from '../core/errors';
import { nativeStatus } from '../core/io/native';
import { allowUnlockedWrites } from '../core/io/locks';
import { addObject, clearSecrets } from '../core/chain/secrets';
import { asQemu, programOf, reportError, stdio, type CommandIO } from './common';
import { infoCommand } from './info';
import { mapCommand } from './map';
import { compareCommand } from './compare';
import { convertCommand } from './convert';
import { snapshotCommand } from './snapshot';
import { createCommand } from './create';
import { checkCommand } from './check';
import { ioCommand } from './io';
import { rebaseCommand } from './rebase';
import { commitCommand } from './commit';
import { resizeCommand } from './resize';
import { mirrorCommand } from './mirror';
import { measureCommand } from './measure';
import { treeCommand } from './tree';
import { compactCommand } from './compact';
import { emptyCommand } from './empty';
import { mergeCommand } from './merge';
import { ddCommand } from './dd';
import { amendCommand } from './amend';
import { bitmapCommand } from './bitmap';

const HELP = `usage: strata COMMAND [options] ...

Commands (options follow qemu-img):
  create [-q] -f qcow2|raw [-o OPTIONS] [-b BACKING -F FMT] [-u] FILE [SIZE]   (-o help lists OPTIONS)
  info [--output=human|json] [--backing-chain] [-U] [-f FMT] FILE
  map [--output=human|json] [--summary N] [-f FMT] FILE
  check [--output=human|json] [-r leaks|all] [-f FMT] [-q] FILE
  compare [-f FMT] [-F FMT] [-s] [-q] [-p] A B
  convert [-p] [-q] [-f FMT] -O qcow2|raw [-o OPTS] [-c] [-C] [--salvage] [--bitmaps [--skip-broken-bitmaps]] [-B BACKING [-F FMT]] [-n] [-S SIZE] [--target-is-zero] [-l snapshot.name=NAME] SRC... DST
  compact [-p] [-c] IMAGE        rewrite IMAGE with only its live data (same options, backing file, bitmaps)
  rebase [-p] [-u] -b BACKING [-F FMT] FILE   (-b '' flattens)
  commit [-p] [-b BASE] [-d] FILE
  empty [-p] IMAGE               empty an overlay whose data is already in its backing file (verified first)
  merge [-p] [--folder DIR ...] IMAGE   remove IMAGE from its chain: commit it into its backing file,
                                 point its children (in its folder and each DIR) there, delete it
  resize [-q] [--shrink] [--preallocation=off|metadata|falloc|full] FILE [+|-]SIZE
  mirror [-p] [-f FMT] [-O FMT] [--sync full|top] [-n] SRC DST
  measure [--output=human|json] -O FMT [-o OPTS] (FILE | --size SIZE)
  snapshot -l | -c NAME | -a NAME | -d NAME FILE
  amend [-p] [-q] [-f FMT] -o compat=0.10|1.1,lazy_refcounts=on|off,refcount_bits=N,size=SIZE FILE
  bitmap (--add [-g GRANULARITY] | --remove | --clear | --enable | --disable | --merge SRC [-b SRC_FILE [-F FMT]])... FILE BITMAP
  dd [-f FMT] [-O FMT] [bs=BLOCK_SIZE] [count=BLOCKS] [skip=BLOCKS] if=INPUT of=OUTPUT
  io [-f FMT] -c CMD [-c CMD ...] FILE   (write [-P PAT] [-z] [-c] OFF LEN | read [-P PAT] OFF LEN | discard OFF LEN)
  tree [--output=human|json] PATH...   (every image under the folders as chains, with problems and fixes)
  --image-opts  (info, map, check, compare, convert, snapshot, measure, resize, commit, rebase, amend,
                bitmap, dd) FILE is an option string: driver=qcow2,file.filename=x.qcow2
  --object secret,id=ID,data=SECRET   (also file=PATH, format=base64) a key for encrypted qcow2
                images (LUKS, AES): name it with encrypt.key-secret=ID (create -o, --image-opts, json:)
  serve [--port N] [--folder DIR]... [--demo]   (the app in a browser on 127.0.0.1)

Every writing command (create, convert, compact, rebase, commit, empty, merge, resize, mirror,
snapshot -c/-a/-d, check -r) also takes:
  --dry-run [--output=human|json]   print the plan (what is written, created, removed; the chains
                                    afterwards; bytes; space; affected and blocked images; warnings;
                                    the command) and write nothing; exit 0 if the job would run, 1 if not
  --force                           run even when other images would read different data (a commit
                                    into a base other overlays share, a merge, a snapshot apply...)

Sizes take qemu-img's suffixes (512, 64k, 1M, 4G). Set STRATA_DEBUG=1 for stack traces.

Without the native addon (npm rebuild builds it; node-gyp needs python3, make and g++) Strata
cannot hold QEMU's image locks, and commands that write refuse to run. With any command:
  --force-unlocked   write anyway, without locks. UNSAFE: a VM started on the image while
                     Strata writes it would write it too, and corrupt it.
`;

type Command = (args: string[], io: CommandIO, signal: AbortSignal) => Promise<number>;

// Loaded on first use: the app's server and the job process bring the protocol and ws, which
// the disk commands never need at start.
const serveCommand: Command = (args, io, signal) => import('./serve').then((m) => m.serveCommand(args, io, signal));
const jobProcess: Command = () => import('../main/job-process/runner').then((m) => m.forkedJobMain()).then(() => 0);

const COMMANDS: Record<string, Command> = {
  info: infoCommand,
  map: mapCommand,
  compare: compareCommand,
  convert: convertCommand,
  snapshot: snapshotCommand,
  create: createCommand,
  check: checkCommand,
  io: ioCommand,
  rebase: rebaseCommand,
  commit: commitCommand,
  resize: resizeCommand,
  mirror: mirrorCommand,
  measure: measureCommand,
  tree: treeCommand,
  compact: compactCommand,
  empty: emptyCommand,
  merge: mergeCommand,
  dd: ddCommand,
  amend: amendCommand,
  bitmap: bitmapCommand,
  serve: serveCommand,
  // Internal: a job process of the app (started by strata serve or the desktop app).
  '__job-process': jobProcess,
};

/** Exit codes a command uses for "failed to run" where qemu-img has its own (compare: 2). */
const ERROR_EXIT: Record<string, number> = { compare: 2 };
/** Commands whose bad usage exits 1, as qemu-img's. */
const USAGE_EXIT_1 = new Set(['amend', 'bitmap', 'dd']);

export async function run(argv: string[], io: CommandIO = stdio, signal: AbortSignal = new AbortController().signal): Promise<number> {
  // Before or after the command name, like a global option.
  const forced = argv.includes('--force-unlocked');
  const [cmd, ...rest] = argv.filter((a) => a !== '--force-unlocked');
  if (!cmd || cmd === '-h' || cmd === '--help' || cmd === 'help') { io.out(HELP); return cmd ? 0 : 2; }
  if (cmd === '--version' || cmd === '-V') {
    const n = nativeStatus();
    io.out(`strata 0.1.0\nnative addon: ${n.available ? 'loaded (image locks, hole detection, hole punching, native copy path)' : `not loaded: ${n.reason ?? 'unknown reason'}; image locks cannot be held, so commands that write refuse to run without --force-unlocked (reads still detect images in use from /proc/locks), holes are not detected or punched, copies take the slower plain Node path`}\n`);
    return 0;
  }
  const command = COMMANDS[cmd];
  if (!command) {
    if (asQemu(io)) { io.err(`qemu-img: Command not found: ${cmd}\nTry 'qemu-img --help' for more information\n`); return 1; }
    io.err(`strata: unknown command '${cmd}'\n${HELP}`);
    return 2;
  }
  allowUnlockedWrites(forced);
  try {
    return await command(NO_OBJECTS.has(cmd) ? rest : takeObjects(rest), io, signal);
  } catch (err) {
    if (signal.aborted && !(err instanceof CancelledError)) return reportError(new CancelledError(), io, 1);
    const code = reportError(err, io, ERROR_EXIT[cmd] ?? 1);
    // qemu-img exits 1 on bad usage too (error_exit); these commands follow it there.
    return code === 2 && USAGE_EXIT_1.has(cmd) ? 1 : code;
  } finally {
    allowUnlockedWrites(false);
    clearSecrets();
  }
}

/** Commands that take no --object (the app's). */
const NO_OBJECTS = new Set(['serve', 'tree', '__job-process']);

/**
 * qemu-img's `--object secret,id=ID,data=...` (any command, any number of times, before a
 * `--`): the secrets are registered for the command (an image names its key with
 * encrypt.key-secret=ID) and the options taken out of its arguments.
 */
function takeObjects(args: string[]): string[] {
  const out: string[] = [];
  for (let i = 0; i < args.length; i++) {
    const a = args[i]!;
    if (a === '--') { out.push(...args.slice(i)); break; }
    if (a === '--object') {
      if (i + 1 >= args.length) throw new UsageError("option '--object' argument missing").asQemu("option '--object' requires an argument");
      addObject(args[++i]!);
    } else if (a.startsWith('--object=')) {
      addObject(a.slice('--object='.length));
    } else {
      out.push(a);
    }
  }
  return out;
}

/**
 * SIGINT and SIGTERM: the first cancels the job through its signal and lets it get to a
 * consistent state (its own cleanup, its last flush, the dirty bit cleared); nothing cuts
 * that short but a second signal, which ends the process at once.
 */
export function signalHandler(ac: AbortController, exitNow: (code: number) => void): (signal: NodeJS.Signals) => void {
  let received = 0;
  return (signal) => {
    if (++received > 1) { exitNow(signal === 'SIGTERM' ? 143 : 130); return; }
    ac.abort(signal);
  };
}

/** The exit status after an interrupt: 128 + the signal's number, as a shell reports it. */
export function interruptStatus(signal: AbortSignal): number {
  return signal.reason === 'SIGTERM' ? 143 : 130;
}

// Started as strata (bin/strata.cjs, the bundle, main.ts under a TypeScript runner) or through a
// link named qemu-img: the drop-in, which then speaks qemu-img's messages (see programOf).
const isMain = process.argv[1] !== undefined && /(?:^|[\\/])(?:strata(?:\.cjs)?|main\.ts|qemu-img)$/.test(process.argv[1]);
if (isMain) {
  // libuv's thread pool reads the copy windows (readScan). Its default of 4 threads is more
  // than a 2-core machine can run beside the JS thread and the writer thread: with 2, a 2 GiB
  // convert took 0.313-0.326 s instead of 0.331-0.333 (perf stat -r 10). Set before the pool
  // starts, which is at the first asynchronous file call; a value the user set is kept.
  process.env.UV_THREADPOOL_SIZE ??= String(Math.min(4, Math.max(2, availableParallelism())));
  const ac = new AbortController();
  const onSignal = signalHandler(ac, (code) => process.exit(code));
  // A reader that went away (`strata map IMG | head`) is not an error worth a stack trace.
  // The handler goes on a stream before its first write, not here: touching process.stdout
  // creates it, which a command that prints nothing need not pay for (see stdio).
  const guarded = new Set<NodeJS.WriteStream>();
  const guard = (stream: NodeJS.WriteStream): NodeJS.WriteStream => {
    if (!guarded.has(stream)) {
      guarded.add(stream);
      stream.on('error', (err: NodeJS.ErrnoException) => { if (err.code === 'EPIPE') process.exit(process.exitCode ?? 0); throw err; });
    }
    return stream;
  };
  const io: CommandIO = {
    program: programOf(process.argv[1]!),
    out: (s) => { guard(process.stdout).write(s); },
    err: (s) => { guard(process.stderr).write(s); },
    get isTTY() { return stdio.isTTY; },
  };
  // Once the command has finished, the process ends at once instead of letting node tear its
  // environment down (heap, threads, handles): ~15 ms and ~50 ms of CPU after a 2 GiB convert.
  // Every file is closed by then; only output may still be queued, where a pipe is
  // asynchronous (macOS), so that is let drain first.
  const exit = (code: number) => {
    process.exitCode = code;
    const draining = [...guarded].filter((s) => s.writableLength > 0).map((s) => new Promise((resolve) => s.once('drain', resolve)));
    if (draining.length === 0) process.exit(code);
    else void Promise.all(draining).then(() => process.exit(code));
  };
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);
  // Interrupted: the job has stopped cleanly by now; say so in the exit status (128 + signal).
  const status = (code: number) => (ac.signal.aborted ? interruptStatus(ac.signal) : code);
  run(process.argv.slice(2), io, ac.signal).then((code) => exit(status(code)), (err) => exit(status(reportError(err, io))));
}
