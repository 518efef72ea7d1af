// 64-bit on-disk values are read once as bigint and converted with a guard, so an absurd
// value becomes a typed error instead of a silently rounded number.
import { CorruptImageError } from '../errors';

const MAX_SAFE = BigInt(Number.MAX_SAFE_INTEGER);

export function toSafeNumber(v: bigint, what: string, file?: string): number {
  if (v < 0n || v > MAX_SAFE) throw new CorruptImageError(`${what} (${v}) is out of range`, file);
  return Number(v);
}

/** Reads a big-endian u64 at `off` and converts it, rejecting values past 2^53. */
export function readU64(buf: Buffer, off: number, what: string, file?: string): number {
  return toSafeNumber(buf.readBigUInt64BE(off), what, file);
}

export function writeU64(buf: Buffer, off: number, v: number | bigint): void {
  buf.writeBigUInt64BE(typeof v === 'bigint' ? v : BigInt(v), off);
}
