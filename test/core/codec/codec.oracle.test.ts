// QEMU as the oracle for the codecs: clusters that qemu-img compressed decode to the raw
// file's bytes, and clusters we compressed, patched into a QEMU-made image, read back
// through qemu-img. The image is parsed here just enough to find compressed clusters
// (the engine's own parser is tested elsewhere).
import { readFileSync, writeFileSync } from 'node:fs';
import * as zlib from 'node:zlib';
import { afterAll, beforeAll, expect, it } from 'vitest';
import {
  compressCluster, decompressCluster, decompressClusterAsync, parseZstdFrame, terminateCodecWorkers, type CompressionType,
} from '../../../core/codec/index';
import { describeOracle, qemuCheck, qemuImg, tempDir } from '../../oracle/qemu';

afterAll(() => terminateCodecWorkers());

/** xorshift32 bytes. */
function randomBytes(n: number, seed: number): Uint8Array {
  let s = seed >>> 0 || 1;
  const b = new Uint8Array(n);
  for (let i = 0; i < n; i++) {
    s ^= s << 13; s >>>= 0; s ^= s >>> 17; s ^= s << 5; s >>>= 0;
    b[i] = s & 0xff;
  }
  return b;
}

function textBytes(n: number, seed: number): Uint8Array {
  const words = 'block job backing chain overlay snapshot cluster refcount table entry sector image guest host'.split(' ');
  const r = randomBytes(n, seed);
  let s = '';
  for (let i = 0; s.length < n; i++) s += words[r[i % n]! % words.length] + (r[(i + 1) % n]! % 11 === 0 ? '\n' : ' ');
  return new TextEncoder().encode(s.slice(0, n));
}

/** Eight clusters: text, zeros (not stored), random (stored uncompressed), mixes. */
function rawContent(cs: number): Uint8Array {
  const raw = new Uint8Array(cs * 8);
  raw.set(textBytes(cs, 1), 0);
  raw.set(textBytes(cs, 2), cs);
  raw.set(randomBytes(cs, 3), 3 * cs);
  raw.set(textBytes(cs / 2, 4), 4 * cs);
  raw.set(textBytes(cs, 5).map((b, i) => (i % 4096 < 64 ? b : 0)), 5 * cs);
  raw.set(randomBytes(cs / 4, 6), 6 * cs);
  raw.set(textBytes(cs, 7), 7 * cs);
  return raw;
}

interface Compressed {
  guestCluster: number;
  l2EntryOffset: number;
  entry: bigint;
  offset: number;
  sectors: number; // total 512-byte sectors, first one included
  run: Uint8Array;
}

interface Parsed {
  clusterBits: number;
  compressionType: number;
  compressed: Compressed[];
}

function u32(b: Buffer, o: number): number { return b.readUInt32BE(o); }
function u64(b: Buffer, o: number): bigint { return b.readBigUInt64BE(o); }

function parseImage(file: Buffer): Parsed {
  expect(file.subarray(0, 4).toString('latin1')).toBe('QFI\xfb');
  const clusterBits = u32(file, 20);
  const cs = 2 ** clusterBits;
  const l1Size = u32(file, 36);
  const l1Offset = Number(u64(file, 40));
  const headerLength = u32(file, 4) >= 3 ? u32(file, 100) : 72;
  const compressionType = headerLength > 104 ? file[104]! : 0;
  const x = BigInt(62 - (clusterBits - 8));
  const l2Entries = cs / 8;
  const compressed: Compressed[] = [];
  for (let i = 0; i < l1Size; i++) {
    const l2Offset = Number(u64(file, l1Offset + i * 8) & 0x00fffffffffffe00n);
    if (l2Offset === 0) continue;
    for (let j = 0; j < l2Entries; j++) {
      const l2EntryOffset = l2Offset + j * 8;
      const entry = u64(file, l2EntryOffset);
      if (!((entry >> 62n) & 1n)) continue;
      const offset = Number(entry & ((1n << x) - 1n));
      const sectors = Number((entry >> x) & ((1n << (62n - x)) - 1n)) + 1;
      const end = (offset & ~511) + sectors * 512;
      compressed.push({ guestCluster: i * l2Entries + j, l2EntryOffset, entry, offset, sectors, run: file.subarray(offset, end) });
    }
  }
  return { clusterBits, compressionType, compressed };
}

const CASES: { type: CompressionType; qemuName: string }[] = [
  { type: 0, qemuName: 'zlib' },
  { type: 1, qemuName: 'zstd' },
];

describeOracle('codecs against qemu-img', () => {
  const tmp = tempDir('strata-codec-');
  beforeAll(() => undefined);
  afterAll(() => tmp.cleanup());

  for (const { type, qemuName } of CASES) {
    for (const cs of [512, 4096, 65536, 2 * 1024 * 1024]) {
      it(`${qemuName}, ${cs}-byte clusters: QEMU's compressed clusters decode to the raw data`, async () => {
        const raw = rawContent(cs);
        const rawPath = tmp.path(`raw-${cs}.bin`);
        writeFileSync(rawPath, raw);
        const img = tmp.path(`${qemuName}-${cs}.qcow2`);
        qemuImg('convert', '-c', '-f', 'raw', '-O', 'qcow2', '-o', `compression_type=${qemuName},cluster_size=${cs}`, rawPath, img);
        const file = readFileSync(img);
        const parsed = parseImage(file);
        expect(parsed.clusterBits).toBe(Math.log2(cs));
        expect(parsed.compressionType).toBe(type);
        // Text and mixed clusters compress; zeros are not stored, random data is stored plain.
        expect(parsed.compressed.map((c) => c.guestCluster).sort((a, b) => a - b)).toEqual(
          cs === 512 ? expect.arrayContaining([0, 1, 7]) : [0, 1, 4, 5, 6, 7]);
        for (const c of parsed.compressed) {
          const where = `compressed cluster at host offset ${c.offset}`;
          const expected = Buffer.from(raw.subarray(c.guestCluster * cs, (c.guestCluster + 1) * cs));
          const out = new Uint8Array(cs);
          decompressCluster(type, c.run, out, where);
          expect(Buffer.from(out).equals(expected), where).toBe(true);
          out.fill(0xaa);
          await decompressClusterAsync(type, c.run, out, where);
          expect(Buffer.from(out).equals(expected), where).toBe(true);
          if (type === 1) {
            // QEMU writes one frame per cluster, with its content size.
            const f = parseZstdFrame(c.run, 0, cs);
            expect(f.contentSize).toBe(cs);
            expect(f.end).toBeLessThanOrEqual(c.run.length);
            expect(f.end).toBeGreaterThan(c.run.length - 512);
          }
        }
      });

      it(`${qemuName}, ${cs}-byte clusters: qemu-img reads clusters we compressed`, () => {
        const raw = rawContent(cs);
        const img = tmp.path(`${qemuName}-${cs}.qcow2`);
        const file = readFileSync(img);
        const parsed = parseImage(file);
        // Write ours over QEMU's where ours fits before the next compressed cluster (QEMU
        // packs them back to back, mid-sector) and within the same sectors; keep the L2
        // entry, so what remains of QEMU's stream after ours is trailing garbage to QEMU.
        const starts = parsed.compressed.map((c) => c.offset).sort((a, b) => a - b);
        let patched = 0;
        for (const c of parsed.compressed) {
          const ours = compressCluster(type, raw.subarray(c.guestCluster * cs, (c.guestCluster + 1) * cs));
          expect(ours).not.toBeNull();
          const next = starts.find((o) => o > c.offset) ?? Infinity;
          if (ours!.length > Math.min(c.run.length, next - c.offset)) continue;
          if (type === 0) expect(zlib.inflateRawSync(ours!, { windowBits: 12 }).length).toBe(cs);
          else expect(parseZstdFrame(ours!, 0, cs).end).toBe(ours!.length);
          file.set(ours!, c.offset);
          patched++;
        }
        expect(patched).toBeGreaterThan(0);
        const patchedImg = tmp.path(`${qemuName}-${cs}-ours.qcow2`);
        writeFileSync(patchedImg, file);
        const back = tmp.path(`${qemuName}-${cs}-back.raw`);
        qemuImg('convert', '-f', 'qcow2', '-O', 'raw', patchedImg, back);
        expect(readFileSync(back).equals(Buffer.from(raw))).toBe(true);
        expect(qemuCheck(patchedImg).status).toBe(0);
      });
    }
  }
});
