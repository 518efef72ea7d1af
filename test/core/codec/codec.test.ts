import { createRequire } from 'node:module';
import * as zlib from 'node:zlib';
import fc from 'fast-check';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { CorruptImageError } from '../../../core/errors';
import {
  compressCluster, compressClusterAsync, decompressCluster, decompressClusterAsync,
  parseZstdFrame, terminateCodecWorkers, zstdBackend, type CompressionType,
} from '../../../core/codec/index';
import { availableZstdBackends, CompressPool, selectZstdBackend } from '../../../core/codec/zstd';

// zstd-napi directly, only to make frames our encoder never writes (no content size,
// checksums): QEMU or another tool could have written them.
const zstdNapi = createRequire(import.meta.url)('zstd-napi') as {
  compress(data: Uint8Array, params?: Record<string, unknown>): Buffer;
};

const KiB = 1024;
const MiB = 1024 * KiB;
const TYPES: CompressionType[] = [0, 1];
const NAMES = { 0: 'deflate', 1: 'zstd' } as const;

afterAll(() => terminateCodecWorkers());

/** xorshift32: deterministic bytes. */
function rng(seed: number): () => number {
  let s = seed >>> 0 || 1;
  return () => {
    s ^= s << 13; s >>>= 0;
    s ^= s >>> 17;
    s ^= s << 5; s >>>= 0;
    return s;
  };
}

function randomBytes(n: number, seed = 1): Uint8Array {
  const r = rng(seed);
  const b = new Uint8Array(n);
  for (let i = 0; i < n; i += 4) {
    const v = r();
    b[i] = v; b[i + 1] = v >>> 8; b[i + 2] = v >>> 16; b[i + 3] = v >>> 24;
  }
  return b;
}

const WORDS = ('the qcow2 image format stores guest data in clusters of host file compressed '
  + 'with deflate or zstd when converted, each cluster independently, and reads them back '
  + 'through the L2 table whose entries point at byte offsets not aligned to sectors').split(' ');

function textBytes(n: number, seed = 7): Uint8Array {
  const r = rng(seed);
  let s = '';
  while (s.length < n) s += WORDS[r() % WORDS.length] + (r() % 13 === 0 ? '.\n' : ' ');
  return new TextEncoder().encode(s.slice(0, n));
}

function concat(...parts: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((a, p) => a + p.length, 0));
  let o = 0;
  for (const p of parts) { out.set(p, o); o += p.length; }
  return out;
}

/** toEqual walks typed arrays element by element: far too slow for thousands of clusters. */
function expectSame(actual: Uint8Array, expected: Uint8Array): void {
  expect(actual.length).toBe(expected.length);
  const a = Buffer.from(actual.buffer, actual.byteOffset, actual.length);
  const b = Buffer.from(expected.buffer, expected.byteOffset, expected.length);
  if (!a.equals(b)) {
    let i = 0;
    while (a[i] === b[i]) i++;
    expect.fail(`bytes differ from offset ${i} on`);
  }
}

function mustCompress(type: CompressionType, input: Uint8Array): Uint8Array {
  const c = compressCluster(type, input);
  if (!c) throw new Error(`${NAMES[type]} did not compress ${input.length} bytes`);
  return c;
}

function decode(type: CompressionType, input: Uint8Array, size: number): Uint8Array {
  const out = new Uint8Array(size);
  decompressCluster(type, input, out, 'test cluster');
  return out;
}

function corrupt(type: CompressionType, input: Uint8Array, size: number, match?: RegExp): CorruptImageError {
  const t0 = performance.now();
  let caught: unknown;
  try {
    decode(type, input, size);
  } catch (e) {
    caught = e;
  }
  expect(performance.now() - t0).toBeLessThan(1000);
  expect(caught).toBeInstanceOf(CorruptImageError);
  const e = caught as CorruptImageError;
  expect(e.message).toMatch(/^test cluster: /);
  if (match) expect(e.message).toMatch(match);
  return e;
}

/** Little-endian 3-byte zstd block header. */
function blockHeader(last: boolean, type: number, size: number): number[] {
  const v = (last ? 1 : 0) | (type << 1) | (size << 3);
  return [v & 0xff, (v >> 8) & 0xff, (v >> 16) & 0xff];
}
const MAGIC = [0x28, 0xb5, 0x2f, 0xfd];

describe('zstd backend', () => {
  it('loads one, node:zlib first when it has zstd', () => {
    expect(zstdBackend()).toMatch(/^(node:zlib|zstd-napi) \(libzstd /);
    const ids = availableZstdBackends();
    expect(ids).toContain('zstd-napi'); // a dependency
    expect(zstdBackend().startsWith(ids[0]!)).toBe(true);
  });
});

describe('zstd compression worker pool', () => {
  it('runs jobs on the calling thread when its workers cannot start', async () => {
    let here = 0;
    const pool = new CompressPool('/nonexistent/zstd-binding.node', (input) => { here++; return input.subarray(0, 1); }, 2);
    const results = await Promise.all([1, 2, 3].map(() => pool.run(new Uint8Array(100))));
    expect(results.map((r) => r?.length)).toEqual([1, 1, 1]);
    expect(await pool.run(new Uint8Array(100))).toEqual(new Uint8Array(1));
    expect(here).toBe(4);
    await pool.terminate();
  });

  it('compresses in workers, and finishes jobs in flight here when terminated', async () => {
    const bindingPath = createRequire(import.meta.url).resolve('zstd-napi/binding');
    let here = 0;
    const pool = new CompressPool(bindingPath, (x) => { here++; return compressCluster(1, x); }, 2);
    const inputs = [1, 2, 3].map((seed) => textBytes(64 * KiB, seed));
    const done = await Promise.all(inputs.map((x) => pool.run(x)));
    done.forEach((c, i) => expectSame(decode(1, c!, 64 * KiB), inputs[i]!));
    expect(here).toBe(0);
    const big = textBytes(2 * MiB, 4);
    const inFlight = pool.run(big);
    await pool.terminate();
    expectSame(decode(1, (await inFlight)!, 2 * MiB), big);
    expect(here).toBe(1);
  });
});

// Every backend that loads here (node:zlib's only on Node >= 22.15) does the same work.
describe.each(availableZstdBackends())('zstd backend %s', (id) => {
  beforeAll(() => { expect(selectZstdBackend(id)).toBe(true); });
  afterAll(() => { selectZstdBackend(availableZstdBackends()[0]!); });

  it('round trips, several frames, garbage after, bad data', async () => {
    expect(zstdBackend().startsWith(id)).toBe(true);
    const a = textBytes(64 * KiB, 60);
    const c = mustCompress(1, a);
    expect(parseZstdFrame(c, 0, a.length).end).toBe(c.length);
    expectSame(decode(1, concat(c, randomBytes(511, 1)), a.length), a);
    const out = new Uint8Array(a.length);
    await decompressClusterAsync(1, c, out);
    expectSame(out, a);
    expectSame(decode(1, (await compressClusterAsync(1, a))!, a.length), a);
    expect(compressCluster(1, randomBytes(64 * KiB, 2))).toBeNull();
    expect(await compressClusterAsync(1, randomBytes(64 * KiB, 2))).toBeNull();
    const half = mustCompress(1, a.subarray(0, 32 * KiB));
    const rest = mustCompress(1, a.subarray(32 * KiB));
    expectSame(decode(1, concat(half, rest, half), a.length), a);
    corrupt(1, half, a.length, /zstd data ends at input byte/);
    corrupt(1, concat(half, mustCompress(1, a.subarray(0, 40 * KiB))), a.length, /frame holds 40960 bytes, more than the 32768 left/);
    const bad = c.slice();
    bad[c.length >> 1] ^= 0x55;
    bad[(c.length >> 1) + 1] ^= 0xaa;
    try { decode(1, bad, a.length); } catch (e) { expect(e).toBeInstanceOf(CorruptImageError); }
  });
});

describe.each(TYPES)('round trips, type %i', (type) => {
  const kinds: [string, (n: number) => Uint8Array][] = [
    ['text', (n) => textBytes(n)],
    ['zeros', (n) => new Uint8Array(n)],
    ['half text, half zeros', (n) => concat(textBytes(n / 2), new Uint8Array(n / 2))],
  ];
  for (const size of [512, 64 * KiB, 2 * MiB]) {
    for (const [kind, make] of kinds) {
      it(`${kind}, ${size} bytes`, async () => {
        const input = make(size);
        const c = mustCompress(type, input);
        expect(c.length).toBeLessThan(size);
        expectSame(decode(type, c, size), input);
        const out = new Uint8Array(size);
        await decompressClusterAsync(type, c, out, 'test cluster');
        expectSame(out, input);
        const ca = await compressClusterAsync(type, input);
        expect(ca).not.toBeNull();
        expectSame(decode(type, ca!, size), input);
      });
    }
    it(`random bytes, ${size} bytes: not compressed`, async () => {
      const input = randomBytes(size, size);
      expect(compressCluster(type, input)).toBeNull();
      expect(await compressClusterAsync(type, input)).toBeNull();
    });
  }

  it('tiny inputs', async () => {
    expect(compressCluster(type, new Uint8Array(0))).toBeNull();
    expect(compressCluster(type, new Uint8Array(1))).toBeNull();
    expect(await compressClusterAsync(type, new Uint8Array(1))).toBeNull();
  });

  it('compresses a view into a larger buffer, not the whole buffer, and leaves it usable', async () => {
    const big = concat(randomBytes(4096, 3), textBytes(64 * KiB), randomBytes(4096, 4));
    const view = big.subarray(4096, 4096 + 64 * KiB);
    expectSame(decode(type, mustCompress(type, view), 64 * KiB), view);
    expectSame(decode(type, (await compressClusterAsync(type, view))!, 64 * KiB), view);
    // A Buffer's slice() is a view, not a copy: handing its memory to a thread must not
    // detach the caller's buffer.
    const buf = Buffer.from(big);
    const bufView = buf.subarray(4096, 4096 + 64 * KiB);
    const c = await compressClusterAsync(type, bufView);
    expect(buf.buffer.byteLength).toBeGreaterThan(0);
    expect(bufView.length).toBe(64 * KiB);
    expectSame(decode(type, c!, 64 * KiB), view);
    expectSame(buf, big);
  });

  it('many clusters in parallel', async () => {
    const inputs = Array.from({ length: 24 }, (_, i) => textBytes(64 * KiB, i + 1));
    const outs = await Promise.all(inputs.map((x) => compressClusterAsync(type, x)));
    outs.forEach((c, i) => expectSame(decode(type, c!, 64 * KiB), inputs[i]));
  });

  it('tolerates 0..511 bytes of trailing garbage', () => {
    const input = textBytes(64 * KiB, 11);
    const c = mustCompress(type, input);
    const garbage = randomBytes(512, 99);
    const zeros = new Uint8Array(512);
    for (let k = 0; k < 512; k++) {
      expectSame(decode(type, concat(c, garbage.subarray(0, k)), input.length), input);
      expectSame(decode(type, concat(c, zeros.subarray(0, k)), input.length), input);
    }
  });

  it('tolerates the start of the next compressed cluster after the stream', () => {
    const a = textBytes(64 * KiB, 21);
    const b = textBytes(64 * KiB, 22);
    const ca = mustCompress(type, a);
    const cb = mustCompress(type, b);
    expectSame(decode(type, concat(ca, cb), a.length), a);
    expectSame(decode(type, concat(ca, cb.subarray(0, 100)), a.length), a);
    // The next cluster starting mid-sector, as QEMU packs them.
    const run = concat(ca, cb, new Uint8Array(512 - ((ca.length + cb.length) % 512)));
    expectSame(decode(type, run.subarray(ca.length), b.length), b);
  });

  it('rejects data that ends before the cluster is full', () => {
    const c = mustCompress(type, textBytes(32 * KiB, 5));
    corrupt(type, c, 64 * KiB, type === 0 ? /deflate data ends after 32768 of 65536 bytes/ : /zstd data ends at input byte \d+ with 32768 of 65536/);
  });

  it('rejects truncated data', () => {
    const c = mustCompress(type, textBytes(64 * KiB, 6));
    corrupt(type, c.subarray(0, c.length >> 1), 64 * KiB);
    corrupt(type, c.subarray(0, 3), 64 * KiB);
    corrupt(type, new Uint8Array(0), 64 * KiB);
  });

  it('rejects random bytes and zeros', () => {
    for (let seed = 1; seed <= 20; seed++) corrupt(type, randomBytes(4096, seed), 64 * KiB);
    if (type === 1) corrupt(type, new Uint8Array(4096), 64 * KiB, /no zstd frame at input byte 0/);
  });

  it('async decoding rejects with CorruptImageError too', async () => {
    await expect(decompressClusterAsync(type, randomBytes(4096, 5), new Uint8Array(64 * KiB), 'x'))
      .rejects.toBeInstanceOf(CorruptImageError);
    const c = mustCompress(type, textBytes(32 * KiB, 5));
    await expect(decompressClusterAsync(type, c, new Uint8Array(64 * KiB), 'x')).rejects.toBeInstanceOf(CorruptImageError);
  });

  it('refuses an output that is not a cluster', () => {
    expect(() => decompressCluster(type, new Uint8Array(10), new Uint8Array(0))).toThrow(RangeError);
    expect(() => decompressCluster(type, new Uint8Array(10), new Uint8Array(2 * MiB + 1))).toThrow(RangeError);
  });
});

describe('deflate specifics', () => {
  it('writes raw deflate with a 4 KiB window, as QEMU reads it', () => {
    const input = textBytes(64 * KiB, 8);
    const c = mustCompress(0, input);
    expectSame(zlib.inflateRawSync(c, { windowBits: 12 }), input);
    // Not a zlib stream: no 0x78 header.
    expect(() => zlib.inflateSync(c)).toThrow();
  });

  it('uses QEMU\'s parameters (level 6, memLevel 9)', () => {
    const input = textBytes(64 * KiB, 9);
    const qemuLike = zlib.deflateRawSync(input, { windowBits: 12, memLevel: 9, level: -1 });
    expectSame(mustCompress(0, input), qemuLike);
  });

  it('takes the first cluster of a stream that holds more, as QEMU does', () => {
    const input = textBytes(128 * KiB, 10);
    const c = zlib.deflateRawSync(input, { windowBits: 12 });
    expectSame(decode(0, c, 64 * KiB), input.subarray(0, 64 * KiB));
    // ...and of one that turns into garbage once the cluster is full.
    const head = zlib.deflateRawSync(input.subarray(0, 64 * KiB), { windowBits: 12, finishFlush: zlib.constants.Z_FULL_FLUSH });
    const rest = concat(head, new Uint8Array([0xff, 0xff, 0xff, 0xff]), randomBytes(600, 3));
    expectSame(decode(0, rest, 64 * KiB), input.subarray(0, 64 * KiB));
  });

  it('decodes a stream with distances past 4 KiB, as QEMU\'s one-call inflate does', () => {
    // zlib only needs its window for distances reaching before the current output buffer;
    // QEMU inflates a whole cluster in one call, and so do we.
    const block = randomBytes(8 * KiB, 12);
    const input = new Uint8Array(64 * KiB);
    for (let o = 0; o < input.length; o += block.length) input.set(block, o);
    const c = zlib.deflateRawSync(input, { windowBits: 15 });
    expect(c.length).toBeLessThan(16 * KiB);
    expectSame(decode(0, c, 64 * KiB), input);
  });
});

describe('zstd specifics', () => {
  it('writes one frame with the content size, no checksum', () => {
    for (const input of [textBytes(64 * KiB, 12), new Uint8Array(2 * MiB), textBytes(512, 1)]) {
      const c = mustCompress(1, input);
      const f = parseZstdFrame(c, 0, input.length);
      expect(f.skippable).toBe(false);
      expect(f.end).toBe(c.length);
      expect(f.contentSize).toBe(input.length);
      expect(f.checksum).toBe(false);
      expect(f.windowSize).toBeLessThanOrEqual(Math.max(input.length, 1024) * 2);
    }
  });

  it('decodes several frames filling one cluster, with skippable frames between them', () => {
    const a = textBytes(20 * KiB, 30);
    const b = textBytes(44 * KiB, 31);
    const fa = mustCompress(1, a);
    const fb = mustCompress(1, b);
    const whole = concat(a, b);
    expectSame(decode(1, concat(fa, fb), 64 * KiB), whole);
    expectSame(decode(1, concat(fa, fb, randomBytes(300, 2)), 64 * KiB), whole);
    const skip = new Uint8Array([0x5a, 0x2a, 0x4d, 0x18, 5, 0, 0, 0, 1, 2, 3, 4, 5]);
    expectSame(decode(1, concat(skip, fa, skip, fb, skip), 64 * KiB), whole);
    // An empty frame between them.
    const empty = mustCompressNapi(new Uint8Array(0), {});
    expectSame(decode(1, concat(fa, empty, fb), 64 * KiB), whole);
  });

  function mustCompressNapi(input: Uint8Array, params: Record<string, unknown>): Uint8Array {
    return new Uint8Array(zstdNapi.compress(input, params));
  }

  it('decodes frames without content size and with checksums', () => {
    const a = textBytes(64 * KiB, 40);
    const noSize = mustCompressNapi(a, { contentSizeFlag: false, checksumFlag: true });
    const f = parseZstdFrame(noSize, 0, a.length);
    expect(f.contentSize).toBeNull();
    expect(f.checksum).toBe(true);
    expect(f.end).toBe(noSize.length);
    expectSame(decode(1, concat(noSize, randomBytes(100, 1)), a.length), a);
    // A bad checksum is caught.
    const bad = noSize.slice();
    bad[bad.length - 1] ^= 0xff;
    corrupt(1, bad, a.length, /zstd frame at input byte 0: /);
    // Without a content size, too much data is caught by the decoder.
    const big = mustCompressNapi(textBytes(128 * KiB, 41), { contentSizeFlag: false });
    corrupt(1, big, 64 * KiB, /zstd frame at input byte 0: /);
  });

  it('decodes raw and RLE blocks', () => {
    // Single segment, 1-byte content size 8; raw block "abc", RLE block "x" * 5.
    const frame = [...MAGIC, 0x20, 8, ...blockHeader(false, 0, 3), 0x61, 0x62, 0x63, ...blockHeader(true, 1, 5), 0x78];
    const out = decode(1, new Uint8Array([...frame, 0, 0, 0]), 8);
    expect(new TextDecoder().decode(out)).toBe('abcxxxxx');
    // A 2-byte content size is stored minus 256.
    const fcs2 = [...MAGIC, 0x60, 0, 0, ...blockHeader(true, 1, 256), 0x41];
    expectSame(decode(1, new Uint8Array(fcs2), 256), new Uint8Array(256).fill(0x41));
  });

  it('rejects a frame that holds more than the cluster', () => {
    corrupt(1, mustCompress(1, textBytes(128 * KiB, 50)), 64 * KiB, /frame holds 131072 bytes, more than the 65536 left in the cluster/);
    const a = mustCompress(1, textBytes(40 * KiB, 51));
    corrupt(1, concat(a, a), 64 * KiB, /zstd frame at input byte \d+: frame holds 40960 bytes, more than the 24576 left/);
    // RLE blocks counted by the walker.
    const rle = [...MAGIC, 0x00, 0x58, ...blockHeader(false, 1, 100_000), 1, ...blockHeader(true, 1, 100_000), 1];
    corrupt(1, new Uint8Array(rle), 64 * KiB, /more than the 65536 bytes left/);
  });

  it('rejects a frame header claiming a huge window', () => {
    // No content size, window descriptor exponent 31: a 2 TiB window.
    const frame = [...MAGIC, 0x00, 0xf8, ...blockHeader(true, 0, 4), 1, 2, 3, 4];
    corrupt(1, new Uint8Array(frame), 64 * KiB, /window, more than zstd decoders accept/);
    // 256 MiB: valid in the format, refused by zstd's streaming decoder (so by QEMU).
    const frame2 = [...MAGIC, 0x00, (18 << 3), ...blockHeader(true, 0, 4), 1, 2, 3, 4];
    corrupt(1, new Uint8Array(frame2), 64 * KiB, /268435456-byte window/);
  });

  it('rejects malformed headers and blocks', () => {
    const cases: [number[], RegExp][] = [
      [[...MAGIC], /zstd frame at input byte 0 truncated \(frame header descriptor/],
      [[...MAGIC, 0x08, 0x58, ...blockHeader(true, 0, 0)], /reserved bit/],
      [[...MAGIC, 0x01, 0x58, 7, ...blockHeader(true, 0, 0)], /dictionary 7/],
      [[...MAGIC, 0x00, 0x58, ...blockHeader(true, 3, 0)], /reserved type 3/],
      [[...MAGIC, 0x00, 0x58, ...blockHeader(true, 2, 200_000)], /200000-byte compressed block larger than the frame's maximum of 131072/],
      [[...MAGIC, 0x00, 0x00, ...blockHeader(true, 0, 2000)], /2000-byte block larger than the frame's maximum of 1024/],
      [[...MAGIC, 0x00, 0x58, ...blockHeader(true, 0, 10), 1, 2], /zstd frame at input byte 0 truncated \(block ends at byte 19/],
      [[...MAGIC, 0x00, 0x58, ...blockHeader(false, 0, 1), 1], /zstd frame at input byte 0 truncated \(block header/],
      [[...MAGIC, 0x04, 0x58, ...blockHeader(true, 0, 1), 1, 0, 0], /zstd frame at input byte 0 truncated \(content checksum/],
      [[...MAGIC, 0xc0, 0x58, 1, 2, 3], /truncated \(frame content size/],
      [[0x5a, 0x2a, 0x4d, 0x18, 0xff, 0xff, 0xff, 0xff, 0], /truncated \(skippable frame ends/],
      [[0x50, 0x2a, 0x4d, 0x18, 1, 0], /truncated \(skippable frame header/],
      [[0x22, 0xb5, 0x2f, 0xfd, 0, 0], /no zstd frame at input byte 0 \(magic 0xfd2fb522/],
    ];
    for (const [bytes, re] of cases) corrupt(1, new Uint8Array(bytes), 64 * KiB, re);
  });

  it('rejects a compressed block full of garbage', () => {
    const frame = [...MAGIC, 0x00, 0x58, ...blockHeader(true, 2, 64), ...randomBytes(64, 8)];
    corrupt(1, new Uint8Array(frame), 64 * KiB, /zstd frame at input byte 0: /);
  });
});

describe('arbitrary input never throws anything but CorruptImageError', () => {
  const sizes = [512, 4096, 64 * KiB];
  function onlyCorrupt(type: CompressionType, input: Uint8Array, size: number): void {
    const out = new Uint8Array(size);
    try {
      decompressCluster(type, input, out);
    } catch (e) {
      if (!(e instanceof CorruptImageError)) throw e;
    }
  }

  for (const type of TYPES) {
    it(`${NAMES[type]}: random bytes`, () => {
      fc.assert(fc.property(fc.uint8Array({ maxLength: 4096 }), fc.constantFrom(...sizes), (input, size) => {
        onlyCorrupt(type, input, size);
      }), { numRuns: 500 });
    });

    it(`${NAMES[type]}: valid streams with bytes changed, cut or extended`, () => {
      const plain = textBytes(4096, 77);
      const valid = [
        mustCompress(type, plain),
        mustCompress(type, new Uint8Array(4096)),
        ...(type === 1 ? [mustCompressNapi(plain)] : []),
      ];
      fc.assert(fc.property(
        fc.constantFrom(...valid),
        fc.array(fc.tuple(fc.nat(), fc.integer({ min: 0, max: 255 })), { maxLength: 8 }),
        fc.nat(),
        fc.uint8Array({ maxLength: 64 }),
        fc.constantFrom(512, 4096, 8192),
        (stream, edits, cut, tail, size) => {
          const s = stream.slice();
          for (const [pos, v] of edits) s[pos % s.length] = v;
          const input = concat(s.subarray(0, s.length - (cut % Math.min(s.length, 40))), tail);
          onlyCorrupt(type, input, size);
        },
      ), { numRuns: 1000 });
    });
  }

  function mustCompressNapi(input: Uint8Array): Uint8Array {
    return new Uint8Array(zstdNapi.compress(input, { contentSizeFlag: false, checksumFlag: true }));
  }
});
