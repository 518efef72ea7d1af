// resize: grow or (with shrink allowed) shrink the virtual size, as qemu-img resize.
import { UsageError } from '../errors';
import { openImage, closeChain } from '../chain/open';
import { Qcow2Writable } from '../engine/qcow2-write';
import { RawImage } from '../engine/raw';
import type { ImageFormat } from '../engine/image';

export interface ResizeOptions {
  format?: ImageFormat;
  /** The new size, or a delta when `relative` is set (may be negative). */
  size: number;
  relative?: boolean;
  shrink?: boolean;
}

export async function resize(path: string, opts: ResizeOptions): Promise<{ from: number; to: number }> {
  // With its backing chain: whether a longer backing file would show through the grown area
  // decides how it is zeroed (as qemu-img, which opens the chain too).
  const img = await openImage(path, { format: opts.format, writable: true });
  try {
    const from = img.virtualSize;
    const to = opts.relative ? from + opts.size : opts.size;
    if (to < 0) throw new UsageError(`${path}: new size would be negative`);
    if (to < from && !opts.shrink) {
      throw new UsageError(`${path}: shrinking from ${from} to ${to} bytes deletes everything past the new end; add --shrink if that is what you want`);
    }
    if (img instanceof Qcow2Writable) {
      if (to % 512 !== 0) throw new UsageError(`${path}: qcow2 sizes must be a multiple of 512 bytes`);
      if (to > from) await img.growZeroed(to);
      else if (to < from) await img.shrink(to);
    } else if (img instanceof RawImage) {
      await img.file.truncate(to);
      await img.file.flush();
    }
    return { from, to };
  } finally {
    await closeChain(img);
  }
}
