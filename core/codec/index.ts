// Compression codecs for qcow2 compressed clusters (header field compression_type).
//
// Decoding: `input` is the compressed cluster's byte run as the L2 entry describes it
// (rounded up to 512-byte sectors), so it may end with padding or the start of the next
// compressed cluster; decoding stops as soon as `out` is full, as QEMU's does. Malformed
// data throws CorruptImageError (message prefixed with `where`, e.g. "compressed cluster
// at host offset 0x50200"); a missing zstd implementation throws UnsupportedFeatureError.
// Output never goes past `out`; a call allocates about one cluster of scratch at most
// (except zstd frames without a content size through node:zlib, which need a window
// buffer up to zstd's 128 MiB limit; QEMU always writes the content size).
//
// Encoding follows QEMU: deflate raw with a 4 KiB window (level 6, memLevel 9), zstd one
// frame at the default level with its content size; null when the result is not smaller
// than the input, and the caller then stores the cluster uncompressed.
import { UnsupportedFeatureError } from '../errors';
import { deflateCluster, deflateClusterAsync, inflateCluster, inflateClusterAsync } from './deflate';
import {
  terminateZstdWorkers, zstdBackendName, zstdCompressCluster, zstdCompressClusterAsync,
  zstdDecompressCluster, zstdDecompressClusterAsync,
} from './zstd';

export { DEFLATE_WINDOW_BITS } from './deflate';
export { parseZstdFrame, ZSTD_MAGIC, type ZstdFrame } from './zstd';

/** 0 deflate ("zlib" in QEMU), 1 zstd. */
export type CompressionType = 0 | 1;

export const COMPRESSION_DEFLATE = 0;
export const COMPRESSION_ZSTD = 1;

/** qcow2 clusters are 512 B to 2 MiB. */
const MAX_CLUSTER = 2 * 1024 * 1024;

function checkOut(out: Uint8Array): void {
  if (out.length === 0 || out.length > MAX_CLUSTER) {
    throw new RangeError(`decompressCluster: output must be one cluster (1 B to 2 MiB), got ${out.length} bytes`);
  }
}

function unknownType(type: never): never {
  throw new UnsupportedFeatureError(`compression type ${String(type)} (known: 0 deflate, 1 zstd)`);
}

/** Decompress one cluster: fills `out` (exactly cluster size) completely or throws CorruptImageError. */
export function decompressCluster(type: CompressionType, input: Uint8Array, out: Uint8Array, where?: string): void {
  checkOut(out);
  switch (type) {
    case 0: return inflateCluster(input, out, where);
    case 1: return zstdDecompressCluster(input, out, where);
    default: return unknownType(type);
  }
}

/** decompressCluster off the main thread where that pays (deflate on libuv's thread pool). */
export async function decompressClusterAsync(type: CompressionType, input: Uint8Array, out: Uint8Array, where?: string): Promise<void> {
  checkOut(out);
  switch (type) {
    case 0: return inflateClusterAsync(input, out, where);
    case 1: return zstdDecompressClusterAsync(input, out, where);
    default: return unknownType(type);
  }
}

/** Compress one cluster; returns null when the result is not smaller than the input (caller stores it uncompressed), as QEMU does. */
export function compressCluster(type: CompressionType, input: Uint8Array): Uint8Array | null {
  switch (type) {
    case 0: return deflateCluster(input);
    case 1: return zstdCompressCluster(input);
    default: return unknownType(type);
  }
}

/**
 * compressCluster off the main thread: deflate on libuv's thread pool, zstd on node:zlib's
 * thread pool or a pool of worker threads (one per core), so several clusters compress at
 * once. Do not change `input` until the promise settles: node:zlib reads it from another
 * thread.
 */
export async function compressClusterAsync(type: CompressionType, input: Uint8Array): Promise<Uint8Array | null> {
  switch (type) {
    case 0: return deflateClusterAsync(input);
    case 1: return zstdCompressClusterAsync(input);
    default: return unknownType(type);
  }
}

/** Which zstd implementation loaded: "node:zlib (libzstd x)", "zstd-napi (libzstd x)" or "none". */
export function zstdBackend(): string {
  return zstdBackendName();
}

/** Stops codec worker threads (they are unref'd and never keep a process alive anyway). */
export function terminateCodecWorkers(): Promise<void> {
  return terminateZstdWorkers();
}
