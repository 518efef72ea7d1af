// Block status through a backing chain, as QEMU's get_block_status/bdrv_block_status_above.
import type { DiskImage } from '../engine/image';

export interface ChainStatus {
  start: number;
  length: number;
  /** Index in the chain of the layer that decides the content (0 = top). */
  depth: number;
  present: boolean;
  zero: boolean;
  data: boolean;
  /** Host offset in that layer's file, when meaningful. */
  offset: number | null;
  compressed: boolean;
  /** The deciding layer (the bottom one when nothing is allocated). */
  image: DiskImage;
}

/** Status of the first run at `offset` (at most `bytes` long) through the chain below `top`. */
export async function chainBlockStatus(top: DiskImage, offset: number, bytes: number): Promise<ChainStatus> {
  let img = top;
  let depth = 0;
  for (;;) {
    const st = await img.blockStatus(offset, bytes);
    bytes = st.length;
    if (st.data || st.zero || !img.backing) {
      return {
        start: offset, length: st.length, depth, present: st.allocated, zero: st.zero, data: st.data,
        offset: st.offset, compressed: st.compressed, image: img,
      };
    }
    img = img.backing;
    depth++;
    bytes = Math.min(bytes, img.virtualSize - offset);
  }
}

/** Walks [start, end) of the chain as a sequence of statuses. */
export async function* walkChain(top: DiskImage, start = 0, end = top.virtualSize, step = 1 << 30): AsyncGenerator<ChainStatus> {
  let pos = start;
  while (pos < end) {
    const st = await chainBlockStatus(top, pos, Math.min(step, end - pos));
    yield st;
    pos += st.length;
  }
}
