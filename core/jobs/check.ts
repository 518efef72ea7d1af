// check: consistency check and repair of one image, as qemu-img check. A repair that fixed
// something is followed by a second, read-only pass whose findings are the result (with the
// fixed counts of the first pass), exactly like qemu-img's "Double checking the fixed image".
import { StrataError, UsageError } from '../errors';
import { checkQcow2, type CheckCounts, type RepairMode } from '../engine/check';
import { decodeHeader, isQcow2Magic } from '../format/header';
import * as C from '../format/constants';
import type { BlockFile } from '../io/block-file';
import { imageCipher, openExternalDataFile } from '../chain/open';
import { lockImage, READ_LOCK, WRITE_LOCK } from '../io/locks';
import { NodeFile } from '../io/node-file';
import { interposeWritable } from '../io/interpose';
import { ProgressReporter, throwIfCancelled, type JobContext } from './job';
import { basename } from 'node:path';
import { abs, enforcePlan, newPlan, permissionProblems, probeAll, type JobPlan } from './plan-kit';

export type { RepairMode } from '../engine/check';

export interface CheckJobOptions {
  /** -r: null/undefined checks only and opens the file read-only. */
  repair?: RepairMode | null;
  /** -f: without it the format is probed. */
  format?: 'qcow2' | 'raw';
  /** -U: check without taking QEMU's locks (read-only checks only). */
  forceShare?: boolean;
  /** The external data file given with the image's options (data-file.filename), if any. */
  dataFile?: string;
  /** The secret id keying an AES-encrypted image (encrypt.key-secret): qemu-img opens it with its key. */
  keySecret?: string;
}

export interface CheckResult extends CheckCounts {
  /** The name as given (qemu-img prints it unchanged). */
  filename: string;
  format: 'qcow2';
  /** Set when a repair fixed something: what the first pass fixed; the counts are the second pass's. */
  repaired: { leaks: number; corruptions: number } | null;
}

/** qemu-img: "This image format does not support checks" (exit 63). */
export class CheckNotSupportedError extends StrataError {
  constructor() {
    super('unsupported', 'This image format does not support checks');
    this.name = 'CheckNotSupportedError';
  }
}

/** The check could not run to its end (qemu-img: "Check failed: REASON", exit 1). */
export class CheckFailedError extends StrataError {
  constructor(reason: string, file: string) {
    super('corrupt', `Check failed: ${reason}`, file);
    this.name = 'CheckFailedError';
    this.asQemu(`Check failed: ${reason}`);
  }
}

/**
 * The plan of a repair (-r): the image is written in place; what gets fixed is only known once
 * the check has run, so nothing is read here beyond the format.
 */
export async function planCheck(path: string, opts: { repair: RepairMode; format?: 'qcow2' | 'raw' }): Promise<JobPlan> {
  const file = await NodeFile.open(path);
  let format = opts.format;
  try {
    if (!format) {
      const head = Buffer.alloc(4);
      await file.read(head, 0);
      format = isQcow2Magic(head) ? 'qcow2' : 'raw';
    }
  } finally {
    await file.close();
  }
  if (format === 'raw') throw new CheckNotSupportedError();
  const command = ['strata', 'check', '-r', opts.repair];
  if (opts.format) command.push('-f', opts.format);
  command.push(abs(path));
  const plan = newPlan('check', `Check and repair ${opts.repair === 'all' ? 'leaks and corruptions' : 'leaks'} in ${basename(path)}`, command);
  plan.writes.push(abs(path));
  plan.chainsAfter.push([{ filename: abs(path), format: 'qcow2', virtualSize: await virtualSizeOf(path) }]);
  await probeAll(plan, [[path, 'write']]);
  await permissionProblems(plan, [path]);
  return plan;
}

/** The header's size field, or 0 when the header cannot be read (check is for damaged images too). */
async function virtualSizeOf(path: string): Promise<number> {
  try {
    const f = await NodeFile.open(path);
    try {
      const b = Buffer.alloc(32);
      await f.read(b, 0);
      return Number(b.readBigUInt64BE(24));
    } finally {
      await f.close();
    }
  } catch {
    return 0;
  }
}

export async function checkImage(ctx: JobContext, path: string, opts: CheckJobOptions = {}, planned?: JobPlan): Promise<CheckResult> {
  throwIfCancelled(ctx);
  if (opts.repair) enforcePlan(planned ?? await planCheck(path, { repair: opts.repair, format: opts.format }));
  const file = await NodeFile.open(path, { writable: !!opts.repair });
  let dataFile: BlockFile | null = null;
  try {
    // As qemu-img: checking needs consistent data, repairing needs the image to ourselves.
    if (!opts.forceShare || opts.repair) await lockImage(file.fd, path, opts.repair ? WRITE_LOCK : READ_LOCK);
    const f = await interposeWritable(file);
    let format = opts.format;
    if (!format) {
      const head = Buffer.alloc(4);
      await f.read(head, 0);
      format = isQcow2Magic(head) ? 'qcow2' : 'raw';
    }
    if (format === 'raw') throw new CheckNotSupportedError();
    // As qemu-img: an encrypted image is opened with its key, even to check its metadata.
    // (A LUKS image's key is tried on its key slots: a wrong one is refused.)
    const fixed = Buffer.alloc(C.HEADER_V2_LENGTH);
    if ((await f.read(fixed, 0)) === fixed.length && fixed.readUInt32BE(32) !== C.CRYPT_NONE) {
      const bits = fixed.readUInt32BE(20);
      let crypto: { offset: number; length: number } | null = null;
      if (bits >= C.MIN_CLUSTER_BITS && bits <= C.MAX_CLUSTER_BITS) {
        const cluster = Buffer.alloc(2 ** bits);
        await f.read(cluster, 0);
        try { crypto = decodeHeader(cluster, path).cryptoHeader; } catch { /* the check reports a bad header */ }
      }
      await imageCipher(path, fixed.readUInt32BE(32), opts.keySecret, undefined, false, crypto ? { area: crypto, file: f } : undefined);
    }
    // qemu-img opens the image, its external data file included, before checking it.
    dataFile = await openDataFileOf(f, path, { writable: !!opts.repair, lock: !opts.forceShare || opts.repair ? 'auto' : 'none', override: opts.dataFile });
    const progress = new ProgressReporter(ctx, 0);
    const hooks = {
      log: ctx.log,
      progress: (done: number, total: number) => {
        progress.bytesTotal = total;
        progress.add(done - progress.bytesDone);
      },
      checkCancelled: () => throwIfCancelled(ctx),
    };
    progress.setPhase(opts.repair ? 'checking and repairing' : 'checking', 1);
    const first = await checkQcow2(f, { ...hooks, repair: opts.repair ?? null });
    if (first.failure) throw new CheckFailedError(first.failure, path);
    let counts: CheckCounts = first;
    let repaired: CheckResult['repaired'] = null;
    if (first.corruptionsFixed || first.leaksFixed) {
      repaired = { leaks: first.leaksFixed, corruptions: first.corruptionsFixed };
      progress.setPhase('double checking the fixed image', 1);
      const second = await checkQcow2(f, { ...hooks, repair: null });
      if (second.failure) throw new CheckFailedError(second.failure, path);
      counts = { ...second, leaksFixed: first.leaksFixed, corruptionsFixed: first.corruptionsFixed };
    }
    progress.done();
    const { failure: _f, ...rest } = counts as CheckCounts & { failure?: unknown };
    return { filename: path, format: 'qcow2', ...rest, repaired };
  } finally {
    await file.close();
    await dataFile?.close();
  }
}

/** The external data file of the qcow2 image in `f`, opened and locked, or null when it has none. */
async function openDataFileOf(f: BlockFile, path: string, opts: { writable: boolean; lock: 'auto' | 'none'; override?: string }): Promise<BlockFile | null> {
  const head = Buffer.alloc(C.HEADER_V3_WITH_COMPRESSION_LENGTH);
  const got = await f.read(head, 0);
  if (got < head.length || head.readUInt32BE(4) < 3 || (head.readBigUInt64BE(72) & C.INCOMPAT_DATA_FILE) === 0n) {
    if (opts.override !== undefined) {
      throw new UsageError(`${path}: a data file ('${opts.override}') was given, but the image has no external data file`)
        .asQemu(`Could not open '${path}': 'data-file' can only be set for images with an external data file`);
    }
    return null;
  }
  const bits = head.readUInt32BE(20);
  let parsed;
  try {
    const buf = Buffer.alloc(bits >= C.MIN_CLUSTER_BITS && bits <= C.MAX_CLUSTER_BITS ? 2 ** bits : head.length);
    parsed = decodeHeader(buf.subarray(0, await f.read(buf, 0)), path);
  } catch {
    return null; // the check reports a header it cannot read
  }
  return openExternalDataFile(path, opts.override ?? parsed.dataFile, opts);
}
