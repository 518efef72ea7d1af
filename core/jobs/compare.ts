// compare: guest-visible content of two images (chains), as qemu-img compare.
import type { DiskImage } from '../engine/image';
import { chainBlockStatus } from '../chain/block-status';
import { isZero } from '../engine/zero';
import { ioBuffers } from '../io/buffers';
import { IoError, StrataError } from '../errors';
import { errorText } from '../io/blkdebug';
import { ProgressReporter, throwIfCancelled, type JobContext } from './job';

export type CompareResult =
  | { identical: true; sizeMismatch: boolean }
  | { identical: false; offset: number; reason: 'content' | 'size' | 'status'; sizeMismatch: boolean };

const SECTOR = 512;
const CHUNK = 2 * 1024 * 1024;

function firstDifference(a: Buffer, b: Buffer, base: number): number {
  for (let p = 0; p < a.length; p += SECTOR) {
    const n = Math.min(SECTOR, a.length - p);
    if (a.compare(b, p, p + n, p, p + n) !== 0) return base + p;
  }
  return -1;
}

function firstNonZero(a: Buffer, base: number): number {
  for (let p = 0; p < a.length; p += SECTOR) {
    if (!isZero(a, p, Math.min(a.length, p + SECTOR))) return base + p;
  }
  return -1;
}

/**
 * A read of one of the images failed: qemu-img compare's "Error while reading offset N of
 * IMAGE" (the start of the chunk being compared), with its exit status 4.
 */
export class CompareReadError extends IoError {
  constructor(err: unknown, readonly image: DiskImage, readonly offset: number) {
    const code = (err as { code?: string })?.code;
    super(`error while reading offset ${offset}: ${(err as Error)?.message ?? String(err)}`, image.displayName ?? image.filename, code, err);
    this.name = 'CompareReadError';
    this.asQemu(`Error while reading offset ${offset} of ${image.displayName ?? image.filename}: ${errorText(err)}`);
  }
}

async function readAt(img: DiskImage, buf: Buffer, offset: number): Promise<void> {
  try {
    await img.read(buf, offset);
  } catch (err) {
    if (err instanceof StrataError && !(err instanceof IoError)) throw err;
    throw new CompareReadError(err, img, offset);
  }
}

export async function compare(ctx: JobContext, a: DiskImage, b: DiskImage, opts: { strict?: boolean } = {}): Promise<CompareResult> {
  const sizeMismatch = a.virtualSize !== b.virtualSize;
  if (opts.strict && sizeMismatch) return { identical: false, offset: Math.min(a.virtualSize, b.virtualSize), reason: 'size', sizeMismatch };
  const common = Math.min(a.virtualSize, b.virtualSize);
  const progress = new ProgressReporter(ctx, Math.max(a.virtualSize, b.virtualSize));
  progress.setPhase('comparing');
  const [bufA, bufB] = ioBuffers(2, CHUNK) as [Buffer, Buffer];
  let pos = 0;
  while (pos < common) {
    throwIfCancelled(ctx);
    const want = Math.min(CHUNK, common - pos);
    const [sa, sb] = await Promise.all([chainBlockStatus(a, pos, want), chainBlockStatus(b, pos, want)]);
    const n = Math.min(sa.length, sb.length);
    if (opts.strict && (sa.present !== sb.present || sa.zero !== sb.zero || sa.data !== sb.data)) {
      return { identical: false, offset: pos, reason: 'status', sizeMismatch };
    }
    if (!(sa.zero && sb.zero)) {
      const ra = bufA.subarray(0, n);
      const rb = bufB.subarray(0, n);
      if (sa.zero) {
        await readAt(b, rb, pos);
        const d = firstNonZero(rb, pos);
        if (d >= 0) return { identical: false, offset: d, reason: 'content', sizeMismatch };
      } else if (sb.zero) {
        await readAt(a, ra, pos);
        const d = firstNonZero(ra, pos);
        if (d >= 0) return { identical: false, offset: d, reason: 'content', sizeMismatch };
      } else {
        await Promise.all([readAt(a, ra, pos), readAt(b, rb, pos)]);
        const d = firstDifference(ra, rb, pos);
        if (d >= 0) return { identical: false, offset: d, reason: 'content', sizeMismatch };
      }
    }
    pos += n;
    progress.add(n);
  }
  // The longer image must read as zeros past the shorter one's end.
  const longer = a.virtualSize > b.virtualSize ? a : b;
  while (pos < longer.virtualSize) {
    throwIfCancelled(ctx);
    const st = await chainBlockStatus(longer, pos, Math.min(CHUNK, longer.virtualSize - pos));
    if (!st.zero) {
      const r = bufA.subarray(0, st.length);
      await readAt(longer, r, pos);
      const d = firstNonZero(r, pos);
      if (d >= 0) return { identical: false, offset: d, reason: 'content', sizeMismatch };
    }
    pos += st.length;
    progress.add(st.length);
  }
  progress.done();
  return { identical: true, sizeMismatch };
}
