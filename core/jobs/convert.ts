// convert: copy a chain's guest content to a new or existing target. Walks block status so
// ranges unallocated in every layer are never read, and never writes zeros to a fresh target.
import { unlink } from 'node:fs/promises';
import { CancelledError, UsageError } from '../errors';
import type { DiskImage } from '../engine/image';
import { zeroRuns } from '../engine/zero';
import { NodeFile } from '../io/node-file';
import { native, isUnsupported } from '../io/native';
import { walkChain } from '../chain/block-status';
import { ProgressReporter, type JobContext } from './job';
import { runPool } from './pool';

export interface ConvertOptions {
  targetFormat: 'raw';
  /** -n: write into an existing target instead of creating one. */
  existing?: boolean;
  /** --target-is-zero: the existing target already reads as zero everywhere. */
  targetIsZero?: boolean;
  /** -S: smallest run of zeros (bytes) left unwritten inside data; 0 writes data as read. Default 4096. */
  minSparse?: number;
  /** Bytes per request (default 2 MiB) and requests in flight (default 8). */
  chunkSize?: number;
  parallel?: number;
}

export interface ConvertResult {
  bytesRead: number;
  bytesWritten: number;
}

/** A target that accepts guest writes at guest offsets. */
interface Target {
  readonly zeroInitialized: boolean;
  write(buf: Uint8Array, offset: number): Promise<void>;
  writeZeroes(offset: number, length: number): Promise<void>;
  finish(): Promise<void>;
  abort(): Promise<void>;
}

class RawTarget implements Target {
  private constructor(private readonly file: NodeFile, private readonly created: boolean, readonly zeroInitialized: boolean) {}

  static async open(path: string, size: number, opts: ConvertOptions): Promise<RawTarget> {
    if (opts.existing) {
      const file = await NodeFile.open(path, { writable: true });
      const cur = await file.size();
      if (cur < size) {
        await file.close();
        throw new UsageError(`${path}: target is smaller (${cur} bytes) than the source (${size} bytes)`);
      }
      return new RawTarget(file, false, !!opts.targetIsZero);
    }
    const file = await NodeFile.open(path, { create: 'truncate' });
    await file.truncate(size);
    return new RawTarget(file, true, true);
  }

  write(buf: Uint8Array, offset: number): Promise<void> { return this.file.write(buf, offset); }

  async writeZeroes(offset: number, length: number): Promise<void> {
    const n = native();
    if (n) {
      try { n.punchHole(this.file.fd, offset, length); return; } catch (err) { if (!isUnsupported(err)) throw err; }
    }
    const zero = Buffer.alloc(Math.min(length, 1 << 20));
    for (let p = 0; p < length; p += zero.length) await this.file.write(zero.subarray(0, Math.min(zero.length, length - p)), offset + p);
  }

  async finish(): Promise<void> {
    await this.file.flush();
    await this.file.close();
  }

  async abort(): Promise<void> {
    await this.file.close().catch(() => {});
    if (this.created) await unlink(this.file.path).catch(() => {});
  }
}

export async function convert(ctx: JobContext, src: DiskImage, targetPath: string, opts: ConvertOptions): Promise<ConvertResult> {
  const size = src.virtualSize;
  const chunk = opts.chunkSize ?? 2 * 1024 * 1024;
  const width = opts.parallel ?? 8;
  const minSparse = opts.minSparse ?? 4096;
  const target: Target = await RawTarget.open(targetPath, size, opts);
  const progress = new ProgressReporter(ctx, size);
  progress.setPhase('copying');
  const result: ConvertResult = { bytesRead: 0, bytesWritten: 0 };
  const buffers = Array.from({ length: width }, () => Buffer.allocUnsafe(chunk));

  type Task = { offset: number; length: number; image: DiskImage; zero: boolean };
  async function* tasks(): AsyncGenerator<Task> {
    for await (const st of walkChain(src)) {
      if (st.zero) {
        yield { offset: st.start, length: st.length, image: st.image, zero: true };
        continue;
      }
      // Split data runs at chunk-aligned boundaries so requests stay aligned and bounded.
      let p = st.start;
      const end = st.start + st.length;
      while (p < end) {
        const n = Math.min(end, (Math.floor(p / chunk) + 1) * chunk) - p;
        yield { offset: p, length: n, image: st.image, zero: false };
        p += n;
      }
    }
  }

  try {
    await runPool(tasks(), width, async (t, slot) => {
      if (ctx.signal?.aborted) throw new CancelledError();
      if (t.zero) {
        if (!target.zeroInitialized) await target.writeZeroes(t.offset, t.length);
        progress.add(t.length);
        return;
      }
      const buf = buffers[slot]!.subarray(0, t.length);
      await t.image.read(buf, t.offset);
      result.bytesRead += t.length;
      const runs = minSparse > 0 ? zeroRuns(buf, t.offset, minSparse) : [{ offset: 0, length: t.length, zero: false }];
      for (const r of runs) {
        if (r.zero) {
          if (!target.zeroInitialized) await target.writeZeroes(t.offset + r.offset, r.length);
          continue;
        }
        await target.write(buf.subarray(r.offset, r.offset + r.length), t.offset + r.offset);
        result.bytesWritten += r.length;
      }
      progress.add(t.length);
    }, ctx.signal);
    if (ctx.signal?.aborted) throw new CancelledError();
    await target.finish();
  } catch (err) {
    await target.abort();
    if (ctx.signal?.aborted) throw new CancelledError('convert cancelled; the partial target was removed');
    throw err;
  }
  progress.done();
  return result;
}
