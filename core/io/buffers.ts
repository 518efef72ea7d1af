// Copy buffers for the block jobs' windows. A job's windows are many megabytes, touched first by
// the reads that fill them: on 4 KiB pages that is a page fault per 4 KiB (8192 for 32 MiB,
// tens of milliseconds, more under a hypervisor), on transparent huge pages one per 2 MiB.
// The buffers come from one allocation whose huge-page-aligned interior is advised for huge
// pages (native adviseHugePages); without the addon, or where the system has none, they are
// ordinary buffers.
import { native } from './native';

/** The most bytes skipped to reach a huge-page boundary (the PMD size on x86-64 and arm64). */
const ALIGN_SLACK = 2 << 20;

/** `count` buffers of `size` bytes each, uninitialised, on huge pages where possible. */
export function ioBuffers(count: number, size: number): Buffer[] {
  const n = native();
  if (!n || count * size < ALIGN_SLACK) return Array.from({ length: count }, () => Buffer.allocUnsafe(size));
  // Not from Node's pool; a region this large is normally a fresh mapping, so the advice
  // applies when the reads first fault it in.
  const region = Buffer.allocUnsafeSlow(count * size + ALIGN_SLACK);
  const at = n.adviseHugePages(region);
  const start = at >= 0 && at <= ALIGN_SLACK ? at : 0;
  return Array.from({ length: count }, (_, i) => region.subarray(start + i * size, start + (i + 1) * size));
}

/** `bytes` zero bytes, on huge pages where possible (large zeroed arrays: refcount tables). */
export function zeroedBuffer(bytes: number): Buffer {
  return ioBuffers(1, bytes)[0]!.fill(0);
}

/**
 * Buffers of up to a quarter chunk carved from huge-page chunks of `chunkSize` bytes, for
 * many small buffers kept together (a checker's L2 tables): a chunk is freed only when
 * every buffer taken from it is, so callers bound what they take.
 */
export class BufferArena {
  private chunk: Buffer | null = null;
  private used = 0;
  constructor(private readonly chunkSize = 8 << 20) {}

  /** `len` bytes, uninitialised. */
  take(len: number): Buffer {
    if (len > this.chunkSize / 4) return Buffer.allocUnsafe(len);
    if (!this.chunk || this.used + len > this.chunk.length) {
      this.chunk = ioBuffers(1, this.chunkSize)[0]!;
      this.used = 0;
    }
    const b = this.chunk.subarray(this.used, this.used + len);
    this.used += len;
    return b;
  }
}
