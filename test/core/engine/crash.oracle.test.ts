// Crash safety: run random guest I/O on an in-memory image that remembers what was durable at
// every flush; at each such cut point the image must open, check clean but for leaks, and hold
// every write that was flushed before the cut.
import { readFileSync, writeFileSync } from 'node:fs';
import { expect, it } from 'vitest';
import { rng } from '../jobs/helpers';
import { describeOracle, qemuImg, qemuImgRun, tempDir } from '../../oracle/qemu';
import { MemoryFile } from '../../../core/io/memory-file';
import { Qcow2Image } from '../../../core/engine/qcow2';
import { Qcow2Writable } from '../../../core/engine/qcow2-write';


interface Cut {
  durable: Buffer;
  /** Guest content as of the last completed image flush before this cut. */
  model: Buffer;
  /** Ranges written since that flush: their content is unspecified at the cut. */
  unsettled: [number, number][];
}

const CONFIGS = [
  { name: '4k clusters', opts: 'cluster_size=4k,refcount_bits=16', seed: 1 },
  { name: '512 B clusters, 64-bit refcounts (refcount table grows)', opts: 'cluster_size=512,refcount_bits=64', seed: 2 },
  { name: '16k extended L2, 2-bit refcounts', opts: 'cluster_size=16k,extended_l2=on,refcount_bits=2', seed: 3 },
  { name: '4k clusters, lazy refcounts', opts: 'cluster_size=4k,lazy_refcounts=on', seed: 4 },
];

describeOracle('crash safety of the write path', () => {
  for (const cfg of CONFIGS) {
    it(cfg.name, async () => {
      const t = tempDir();
      try {
        const size = 4 << 20;
        const path = t.path('img.qcow2');
        qemuImg('create', '-f', 'qcow2', '-o', cfg.opts, path, String(size));
        const mem = new MemoryFile('mem.qcow2', readFileSync(path), true);
        const cuts: Cut[] = [];
        let model = Buffer.alloc(size);
        let settled = Buffer.from(model);
        let unsettled: [number, number][] = [];
        mem.onFlush = (durable) => cuts.push({ durable: Buffer.from(durable), model: settled, unsettled: [...unsettled] });
        const img = await Qcow2Writable.openWritable('mem.qcow2', mem);
        const r = rng(cfg.seed);
        const cs = img.geometry.clusterSize;
        for (let i = 0; i < 120; i++) {
          const k = r();
          const len = 1 + Math.floor(r() * r() * 256 * 1024);
          const off = Math.floor(r() * (size - len));
          if (k < 0.5) {
            const data = Buffer.alloc(len, 1 + Math.floor(r() * 255));
            unsettled.push([off, off + len]);
            await img.write(data, off);
            data.copy(model, off);
          } else if (k < 0.65) {
            unsettled.push([off, off + len]);
            await img.writeZeroes(off, len);
            model.fill(0, off, off + len);
          } else if (k < 0.75) {
            const c0 = Math.floor(off / cs) * cs;
            const n = Math.max(1, Math.floor(len / cs)) * cs;
            if (c0 + n <= size) {
              const data = Buffer.alloc(n);
              for (let p = 0; p < n; p += 64) data[p] = 1 + (p % 200);
              unsettled.push([c0, c0 + n]);
              await img.writeCompressed(data, c0);
              data.copy(model, c0);
            }
          } else if (k < 0.85) {
            // Discard: whole clusters only; they read as zero afterwards (v3, no backing).
            const c0 = Math.ceil(off / cs) * cs;
            const c1 = Math.floor((off + len) / cs) * cs;
            unsettled.push([off, off + len]);
            await img.discard(off, len);
            if (c1 > c0) model.fill(0, c0, c1);
          } else {
            await img.flush();
            settled = Buffer.from(model);
            unsettled = [];
            mem.onFlush = (durable) => cuts.push({ durable: Buffer.from(durable), model: settled, unsettled: [...unsettled] });
          }
        }
        await img.close();
        expect(cuts.length).toBeGreaterThan(20);
        const step = Math.max(1, Math.floor(cuts.length / 60));
        const cutPath = t.path('cut.qcow2');
        for (let i = 0; i < cuts.length; i += step) {
          const cut = cuts[i]!;
          writeFileSync(cutPath, cut.durable);
          const check = qemuImgRun('check', '--output=json', cutPath);
          const json = check.stdout ? JSON.parse(check.stdout) : {};
          expect(json.corruptions ?? 0, `cut ${i}: ${check.stdout}${check.stderr}`).toBe(0);
          expect([0, 3]).toContain(check.status);
          const view = await Qcow2Image.open('cut', new MemoryFile('cut', cut.durable));
          const got = Buffer.alloc(size);
          await view.read(got, 0);
          const mask = Buffer.alloc(size, 1);
          for (const [a, b] of cut.unsettled) mask.fill(0, a, b);
          for (let p = 0; p < size; p++) {
            if (mask[p] && got[p] !== cut.model[p]) {
              throw new Error(`cut ${i}/${cuts.length}: byte ${p} reads ${got[p]} but ${cut.model[p]} was flushed`);
            }
          }
        }
      } finally {
        t.cleanup();
      }
    });
  }
});
