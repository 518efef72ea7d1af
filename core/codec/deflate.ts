// qcow2 compression_type 0 ("zlib" in QEMU): raw deflate, no zlib header, 4 KiB window.
//
// QEMU compresses with deflateInit2(level 6, -12, memLevel 9) and decompresses with
// inflateInit2(-12) + inflate(Z_FINISH), accepting the result as soon as the output
// buffer (one cluster) is full, whatever follows. A compressed cluster's byte run is
// rounded up to 512-byte sectors, so the stream is followed by padding or by the start of
// the next compressed cluster; node:zlib's raw inflate stops at the end of the deflate
// stream and ignores what follows.
import type { ZlibOptions } from 'node:zlib';
import { zlib } from './builtins';
import { CorruptImageError } from '../errors';

/** QEMU uses a 4 KiB window both ways; a larger one would produce data QEMU cannot read. */
export const DEFLATE_WINDOW_BITS = 12;
const DEFLATE_MEM_LEVEL = 9;
const MIN_CHUNK = 64; // node:zlib's constants.Z_MIN_CHUNK

/**
 * Output bounded to one cluster: chunkSize = cluster + 1 makes node:zlib decode into a
 * single buffer (no 16 KiB chunks to concatenate) and stop with ERR_BUFFER_TOO_LARGE as
 * soon as the stream yields more than a cluster, instead of decoding it all.
 * Z_SYNC_FLUSH: a truncated stream returns what it decoded instead of throwing, so we can
 * say how much was missing.
 */
function inflateOptions(outLength: number, slack = 0): ZlibOptions {
  return {
    windowBits: DEFLATE_WINDOW_BITS,
    finishFlush: zlib().constants.Z_SYNC_FLUSH,
    chunkSize: Math.max(MIN_CHUNK, outLength + 1 + slack),
    maxOutputLength: outLength + slack,
  };
}

function deflateOptions(inputLength: number): ZlibOptions {
  const { constants } = zlib();
  return {
    windowBits: DEFLATE_WINDOW_BITS,
    memLevel: DEFLATE_MEM_LEVEL,
    level: constants.Z_DEFAULT_COMPRESSION,
    strategy: constants.Z_DEFAULT_STRATEGY,
    // One output buffer of the input's size; more than input - 1 bytes means "not
    // smaller", and node:zlib stops right there with ERR_BUFFER_TOO_LARGE.
    chunkSize: Math.max(MIN_CHUNK, inputLength),
    maxOutputLength: inputLength - 1,
  };
}

function label(where: string | undefined): string {
  return where ?? 'compressed cluster';
}

function isTooLarge(err: unknown): boolean {
  return (err as NodeJS.ErrnoException | undefined)?.code === 'ERR_BUFFER_TOO_LARGE';
}

function zlibMessage(err: unknown): string {
  const e = err as (Error & { code?: unknown }) | undefined;
  return e?.message ?? String(err);
}

function finish(decoded: Uint8Array, out: Uint8Array, where: string | undefined): void {
  if (decoded.length < out.length) {
    throw new CorruptImageError(
      `${label(where)}: deflate data ends after ${decoded.length} of ${out.length} bytes`);
  }
  out.set(decoded.length === out.length ? decoded : decoded.subarray(0, out.length));
}

/**
 * The rare path, for streams that decode to more than a cluster or hit invalid data after
 * the cluster is full. QEMU accepts both (it stops inflating when its output is full), so
 * we find the shortest input prefix that decodes to a full cluster: with Z_SYNC_FLUSH a
 * prefix decodes to a prefix of the output, so the output length grows with the prefix
 * length and a binary search finds it in log2(input length) inflates. One input byte
 * yields at most ~1 KiB of output, so `slack` keeps every probe within its output limit.
 */
function inflateOverlong(input: Uint8Array, out: Uint8Array, where: string | undefined, first: unknown): void {
  const slack = 64 * 1024;
  const opts = inflateOptions(out.length, slack);
  const probe = (len: number): Buffer | undefined => {
    try {
      return zlib().inflateRawSync(input.subarray(0, len), opts);
    } catch {
      return undefined;
    }
  };
  let lo = 1;
  let hi = input.length;
  // Smallest len whose decode fails or reaches a full cluster.
  while (lo < hi) {
    const mid = lo + Math.floor((hi - lo) / 2);
    const r = probe(mid);
    if (r === undefined || r.length >= out.length) hi = mid;
    else lo = mid + 1;
  }
  const r = input.length > 0 ? probe(lo) : undefined;
  if (r === undefined || r.length < out.length) {
    throw new CorruptImageError(`${label(where)}: invalid deflate data (${zlibMessage(first)})`);
  }
  out.set(r.subarray(0, out.length));
}

/** Inflates one compressed cluster into `out` (exactly one cluster), or throws CorruptImageError. */
export function inflateCluster(input: Uint8Array, out: Uint8Array, where?: string): void {
  let decoded: Buffer;
  try {
    decoded = zlib().inflateRawSync(input, inflateOptions(out.length));
  } catch (err) {
    inflateOverlong(input, out, where, err);
    return;
  }
  finish(decoded, out, where);
}

export function inflateClusterAsync(input: Uint8Array, out: Uint8Array, where?: string): Promise<void> {
  return new Promise((resolve, reject) => {
    zlib().inflateRaw(input, inflateOptions(out.length), (err, decoded) => {
      try {
        if (err) inflateOverlong(input, out, where, err);
        else finish(decoded, out, where);
        resolve();
      } catch (e) {
        reject(e);
      }
    });
  });
}

function compressed(result: Buffer, inputLength: number): Uint8Array | null {
  if (result.length >= inputLength) return null;
  // The result is a view into an input-sized buffer: copy it so a queue of compressed
  // clusters does not pin a cluster of memory each.
  return new Uint8Array(result);
}

/** Raw deflate as QEMU writes it; null when the result would not be smaller than the input. */
export function deflateCluster(input: Uint8Array): Uint8Array | null {
  if (input.length < 2) return null;
  try {
    return compressed(zlib().deflateRawSync(input, deflateOptions(input.length)), input.length);
  } catch (err) {
    if (isTooLarge(err)) return null;
    throw err;
  }
}

/** deflateCluster on libuv's thread pool. */
export function deflateClusterAsync(input: Uint8Array): Promise<Uint8Array | null> {
  if (input.length < 2) return Promise.resolve(null);
  return new Promise((resolve, reject) => {
    zlib().deflateRaw(input, deflateOptions(input.length), (err, result) => {
      if (err) {
        if (isTooLarge(err)) resolve(null);
        else reject(err);
        return;
      }
      resolve(compressed(result, input.length));
    });
  });
}
