// Helpers that build images for the chain scenarios (rebase, commit).
import { closeSync, ftruncateSync, openSync, readSync, rmSync, writeSync } from 'node:fs';
import { exec, KiB, MiB } from './util.mjs';

/**
 * Non-overlapping runs { offset, length } totalling dataBytes, lengths log-uniform in
 * [minRun, maxRun] (multiples of align), spread over [0, virtualSize) with random gaps.
 */
export function planRuns(r, { virtualSize, dataBytes, minRun, maxRun, align = 4 * KiB }) {
  const lengths = [];
  let total = 0;
  while (total < dataBytes) {
    const len = Math.min(dataBytes - total, r.logSize(minRun, maxRun, align));
    lengths.push(len);
    total += len;
  }
  const free = virtualSize - total;
  const weights = Array.from({ length: lengths.length + 1 }, () => r.next());
  const wsum = weights.reduce((a, b) => a + b, 0);
  let offset = 0;
  return lengths.map((length, i) => {
    offset += Math.floor((free * weights[i]) / wsum / align) * align;
    const run = { offset, length };
    offset += length;
    return run;
  });
}

/** A qcow2 (64 KiB clusters) holding /dev/urandom data in `runs`, unallocated elsewhere. */
export async function randomRunsQcow2(path, virtualSize, runs) {
  // Random data into a sparse raw file, then qemu-img convert: only the runs get clusters.
  const raw = `${path}.raw`;
  const fd = openSync(raw, 'w');
  const urandom = openSync('/dev/urandom', 'r');
  try {
    ftruncateSync(fd, virtualSize);
    const buf = Buffer.allocUnsafe(32 * MiB);
    for (const { offset, length } of runs) {
      for (let p = 0; p < length; ) {
        const n = readSync(urandom, buf, 0, Math.min(buf.length, length - p), null);
        writeSync(fd, buf, 0, n, offset + p);
        p += n;
      }
    }
  } finally {
    closeSync(urandom);
    closeSync(fd);
  }
  await exec('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', '-o', 'cluster_size=64k', raw, path]);
  rmSync(raw, { force: true });
}
