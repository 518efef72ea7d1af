// Zero detection on buffers: memcmp against a shared zero page.
const ZERO = Buffer.alloc(1 << 16);

export function isZero(buf: Uint8Array, start = 0, end = buf.length): boolean {
  // Most data is not zero at either end of a range: answer that without a native call.
  if (end > start && (buf[start] !== 0 || buf[end - 1] !== 0)) return false;
  const b = Buffer.isBuffer(buf) ? buf : Buffer.from(buf.buffer, buf.byteOffset, buf.byteLength);
  for (let p = start; p < end; p += ZERO.length) {
    const n = Math.min(ZERO.length, end - p);
    if (b.compare(ZERO, 0, n, p, p + n) !== 0) return false;
  }
  return true;
}

/**
 * Splits buf (holding guest bytes from `base`) into runs that are all-zero or not, judged per
 * granule of `granularity` bytes aligned to absolute offsets. Adjacent runs of a kind merge.
 */
export function zeroRuns(buf: Uint8Array, base: number, granularity: number): { offset: number; length: number; zero: boolean }[] {
  const out: { offset: number; length: number; zero: boolean }[] = [];
  let p = 0;
  while (p < buf.length) {
    const next = Math.min(buf.length, (Math.floor((base + p) / granularity) + 1) * granularity - base);
    const zero = isZero(buf, p, next);
    const last = out[out.length - 1];
    if (last && last.zero === zero) last.length += next - p;
    else out.push({ offset: p, length: next - p, zero });
    p = next;
  }
  return out;
}
