// Random guest I/O for the differential tests against qemu-io: writes of a pattern, zero writes
// and discards at random offsets and lengths, as qemu-io commands.
export function randomOps(r: () => number, size: number, n: number, maxLen: number): string[] {
  const ops: string[] = [];
  for (let i = 0; i < n; i++) {
    const kind = r();
    const len = 1 + Math.floor(r() * r() * maxLen);
    const off = Math.floor(r() * (size - len));
    if (kind < 0.6) ops.push(`write -P ${1 + Math.floor(r() * 254)} ${off} ${len}`);
    else if (kind < 0.8) ops.push(`write -z ${off} ${len}`);
    else ops.push(`discard ${off} ${len}`);
  }
  return ops;
}
