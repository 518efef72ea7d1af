// readScanned (core/engine/read-scan.ts), the copy loops' window read: through the native
// addon it reads what readPlan says and scans on the I/O thread; it must give exactly the
// bytes img.read gives and the zero map isZero gives, on chains QEMU built (raw bases shorter
// than their overlays, extended L2 subclusters, preallocated metadata, compressed clusters,
// which take the plain path), for windows at any offset and length, also past the end.
import { describe, it, expect } from 'vitest';
import { describeOracle } from '../../oracle/qemu';
import { MATRIX, imageWorkspace, type ImageCase } from '../../oracle/images';
import { rng } from '../jobs/helpers';
import { openImage, closeChain } from '../../../core/chain/open';
import { readScanned } from '../../../core/engine/read-scan';
import { isZero } from '../../../core/engine/zero';
import { native, nativeStatus } from '../../../core/io/native';
import type { DiskImage } from '../../../core/engine/image';

const KiB = 1024;
const MiB = 1024 * KiB;

const byName = new Map([...MATRIX.single, ...MATRIX.chains].map((c) => [c.name, c]));
const CASES: ImageCase[] = [
  'c64k-extl2', 'odd-size-c2M-extl2', 'prealloc-metadata', 'c512', 'chain-short-backing',
  'chain-short-qcow2-mid', 'chain3-qcow2-mixed', 'chain-compressed-cow', 'chain-odd-raw-base',
].map((n) => {
  const c = byName.get(n);
  if (!c) throw new Error(`no image case ${n}`);
  return c;
});

/** What readScanned must give: img.read and isZero per unit. */
async function expected(img: DiskImage, offset: number, length: number, unit: number): Promise<{ buf: Buffer; map: number[] }> {
  const buf = Buffer.alloc(length);
  await img.read(buf, offset);
  const map: number[] = [];
  for (let p = 0; p < length; p += unit) map.push(isZero(buf, p, Math.min(length, p + unit)) ? 0 : 1);
  return { buf, map };
}

describeOracle('readScanned: a window read as img.read and isZero give it', () => {
  if (!native() && process.env.CI === 'true') {
    it('needs the native addon', () => { throw new Error(`native addon unavailable under CI=true: ${nativeStatus().reason}`); });
    return;
  }
  const workspace = imageWorkspace('strata-read-scan-');

  for (const c of CASES) {
    describe(c.name, () => {
      it('gives the same bytes and zero map for aligned, unaligned and past-the-end windows', async () => {
        const built = c.build(workspace.context(c.name));
        const img = await openImage(built.file, { lock: 'none' });
        try {
          const size = img.virtualSize;
          const windows: [number, number][] = [];
          for (let off = 0; off < size; off += 2 * MiB) windows.push([off, Math.min(2 * MiB, size - off)]);
          const r = rng(c.name.length * 7919);
          for (let i = 0; i < 24; i++) {
            const off = Math.floor(r() * size);
            windows.push([off, 1 + Math.floor(r() * 3 * MiB)]); // may run past the end
          }
          windows.push([size - 1000, 5000]);
          let planned = 0;
          for (const [off, len] of windows) {
            for (const unit of [512, 4 * KiB, 64 * KiB]) {
              const want = await expected(img, off, len, unit);
              const buf = Buffer.alloc(len, 0xee);
              const map = new Uint8Array(Math.ceil(len / unit)).fill(9);
              await readScanned(img, buf, off, unit, map);
              expect(buf.equals(want.buf), `bytes of [${off}, +${len})`).toBe(true);
              expect([...map], `zero map of [${off}, +${len}) per ${unit}`).toEqual(want.map);
            }
            if (await img.readPlan?.(off, len)) planned++;
          }
          // The native path must really be taken (compressed clusters aside).
          if (native()) expect(planned).toBeGreaterThan(c.compressed ? 0 : windows.length - 1);
        } finally {
          await closeChain(img);
        }
      });
    });
  }
});
