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
  // Not from Node's pool, and untouched: the advice applies when the reads first fault it in.
  const region = Buffer.allocUnsafeSlow(count * size + ALIGN_SLACK);
  const at = n.adviseHugePages(region);
  const start = at >= 0 && at <= ALIGN_SLACK ? at : 0;
  return Array.from({ length: count }, (_, i) => region.subarray(start + i * size, start + (i + 1) * size));
}
