// Crash safety of the write path: random guest I/O on an in-memory image whose every write and
// flush is logged (test/support/crash-log.ts). At cut points all through the run, the image as a
// power cut could leave it (what was flushed, plus any subset of the sectors written since, in
// any order) must open, check clean but for leaks, and hold every write flushed before the cut.
import { readFileSync, writeFileSync } from 'node:fs';
import { expect, it } from 'vitest';
import { rng } from '../jobs/helpers';
import { describeOracle, qemuImg, qemuImgRun, tempDir } from '../../oracle/qemu';
import { MemoryFile } from '../../../core/io/memory-file';
import { Qcow2Image } from '../../../core/engine/qcow2';
import { Qcow2Writable } from '../../../core/engine/qcow2-write';
import { CrashLog } from '../../support/crash-log';

const CONFIGS = [
  { name: '4k clusters', opts: 'cluster_size=4k,refcount_bits=16', seed: 1 },
  { name: '512 B clusters, 64-bit refcounts (refcount table grows)', opts: 'cluster_size=512,refcount_bits=64', seed: 2 },
  { name: '16k extended L2, 2-bit refcounts', opts: 'cluster_size=16k,extended_l2=on,refcount_bits=2', seed: 3 },
  { name: '4k clusters, lazy refcounts', opts: 'cluster_size=4k,lazy_refcounts=on', seed: 4 },
];

/** Cut points checked per configuration (random, over the whole run). */
const CUTS = 50;

describeOracle('crash safety of the write path (reordered, torn writes between flushes)', () => {
  for (const cfg of CONFIGS) {
    it(cfg.name, async () => {
      const t = tempDir();
      try {
        const size = 1 << 20;
        const path = t.path('img.qcow2');
        qemuImg('create', '-f', 'qcow2', '-o', cfg.opts, path, String(size));
        const log = new CrashLog();
        const file = await log.wrap(new MemoryFile('mem.qcow2', readFileSync(path)));
        // Guest content as of each completed image flush, and the guest ops since (their
        // ranges read as anything at a cut before the next flush).
        const settled: { at: number; model: Buffer }[] = [{ at: 0, model: Buffer.alloc(size) }];
        const ops: { at: number; range: [number, number] }[] = [];
        const model = Buffer.alloc(size);
        const img = await Qcow2Writable.openWritable('mem.qcow2', file);
        const r = rng(cfg.seed);
        const cs = img.geometry.clusterSize;
        const touch = (a: number, b: number) => ops.push({ at: log.now, range: [a, b] });
        for (let i = 0; i < 120; i++) {
          const k = r();
          const len = 1 + Math.floor(r() * r() * 64 * 1024);
          const off = Math.floor(r() * (size - len));
          if (k < 0.5) {
            const data = Buffer.alloc(len, 1 + Math.floor(r() * 255));
            touch(off, off + len);
            await img.write(data, off);
            data.copy(model, off);
          } else if (k < 0.65) {
            touch(off, off + len);
            await img.writeZeroes(off, len);
            model.fill(0, off, off + len);
          } else if (k < 0.75) {
            const c0 = Math.floor(off / cs) * cs;
            const n = Math.max(1, Math.floor(len / cs)) * cs;
            if (c0 + n <= size) {
              const data = Buffer.alloc(n);
              for (let p = 0; p < n; p += 64) data[p] = 1 + (p % 200);
              touch(c0, c0 + n);
              await img.writeCompressed(data, c0);
              data.copy(model, c0);
            }
          } else if (k < 0.85) {
            // Discard: whole clusters only; they read as zero afterwards (v3, no backing).
            const c0 = Math.ceil(off / cs) * cs;
            const c1 = Math.floor((off + len) / cs) * cs;
            touch(off, off + len);
            await img.discard(off, len);
            if (c1 > c0) model.fill(0, c0, c1);
          } else {
            await img.flush();
            settled.push({ at: log.now, model: Buffer.from(model) });
          }
        }
        await img.close();
        settled.push({ at: log.now, model: Buffer.from(model) });
        const points = log.cutPoints();
        expect(points.length).toBeGreaterThan(CUTS);
        const cutPath = t.path('cut.qcow2');
        let withPending = 0;
        for (let c = 0; c < CUTS; c++) {
          const at = points[Math.floor(r() * points.length)]!;
          const p = r();
          const { files, pending } = log.stateAt(at, () => r() < p);
          if (pending) withPending++;
          const bytes = files.get('mem.qcow2')!;
          writeFileSync(cutPath, bytes);
          const check = qemuImgRun('check', '--output=json', cutPath);
          const json = check.stdout ? JSON.parse(check.stdout) : {};
          expect({ at, corruptions: json.corruptions ?? 0, out: check.stderr }).toEqual({ at, corruptions: 0, out: check.stderr });
          expect([0, 3], `cut at ${at}: ${check.stdout}${check.stderr}`).toContain(check.status);
          const base = settled.filter((s) => s.at <= at).pop()!;
          const view = await Qcow2Image.open('cut', new MemoryFile('cut', bytes));
          const got = Buffer.alloc(size);
          await view.read(got, 0);
          const mask = Buffer.alloc(size, 1);
          for (const o of ops) if (o.at >= base.at && o.at <= at) mask.fill(0, o.range[0], o.range[1]);
          for (let q = 0; q < size; q++) {
            if (mask[q] && got[q] !== base.model[q]) {
              throw new Error(`cut at ${at}/${log.now}: byte ${q} reads ${got[q]} but ${base.model[q]} was flushed`);
            }
          }
        }
        // Most cuts fall between flushes, with writes that may or may not have landed.
        expect(withPending).toBeGreaterThan(CUTS / 4);
      } finally {
        t.cleanup();
      }
    });
  }
});
