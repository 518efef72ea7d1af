// dd: qemu-img dd. Creates the output image (its format's defaults) as long as the part of
// the input that is copied, then writes every byte of it, zeros included, as qemu-img does
// (so a qcow2 output is fully allocated).
import { closeChain, openImage, openImageFile } from '../chain/open';
import type { DiskImage, ImageFormat } from '../engine/image';
import { isWritable } from '../engine/image';
import { createImage } from './create';
import { ProgressReporter, throwIfCancelled, type JobContext } from './job';

export interface DdOptions {
  input: string;
  output: string;
  inFormat?: ImageFormat;
  outFormat: ImageFormat;
  /** Block size (bs=, default 512). */
  bs: number;
  /** Blocks (count=); the input ends there, skipped blocks included (as qemu-img counts). */
  count?: number;
  /** Input blocks to skip (skip=). */
  skip?: number;
  forceShare?: boolean;
}

export interface DdResult {
  /** Set when skip= lies past the input's end: the output is empty (qemu-img's warning). */
  skippedPastEnd: boolean;
}

export async function dd(ctx: JobContext, o: DdOptions): Promise<DdResult> {
  let src: DiskImage | null = null;
  let dst: DiskImage | null = null;
  try {
    src = await openImage(o.input, { format: o.inFormat, lock: o.forceShare ? 'none' : 'auto' });
    let size = src.virtualSize;
    if (o.count !== undefined && o.count <= Number.MAX_SAFE_INTEGER / o.bs && o.count * o.bs < size) size = o.count * o.bs;
    const skipBytes = o.skip !== undefined ? o.skip * o.bs : 0;
    const pastEnd = o.skip !== undefined && (o.skip > Number.MAX_SAFE_INTEGER / o.bs || size < skipBytes);
    await createImage(o.output, { format: o.outFormat, size: pastEnd ? 0 : size - skipBytes });
    dst = await openImageFile(o.output, { format: o.outFormat, writable: true });
    if (!isWritable(dst)) throw new Error(`${o.output}: not opened for writing`);
    let inPos = pastEnd ? size : skipBytes;
    const progress = new ProgressReporter(ctx, size - inPos);
    // Larger pieces than bs: the bytes that land are the same.
    const step = Math.max(o.bs, Math.floor((4 << 20) / o.bs) * o.bs);
    const buf = Buffer.alloc(step);
    for (let outPos = 0; inPos < size;) {
      throwIfCancelled(ctx);
      const n = Math.min(step, size - inPos);
      const piece = buf.subarray(0, n);
      await src.read(piece, inPos);
      await dst.write(piece, outPos);
      inPos += n;
      outPos += n;
      progress.add(n);
    }
    await dst.flush();
    return { skippedPastEnd: pastEnd };
  } finally {
    const d = dst;
    dst = null;
    try { await closeChain(d); } finally { await closeChain(src); }
  }
}
