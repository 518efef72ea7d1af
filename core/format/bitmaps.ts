// The bitmap directory (persistent dirty bitmaps): decoded for display and preserved otherwise.
import { CorruptImageError } from '../errors';
import { readU64 } from './u64';

export interface BitmapDirectoryEntry {
  bitmapTableOffset: number;
  bitmapTableSize: number;
  flags: number;
  type: number;
  granularityBits: number;
  name: string;
}

export const BME_FLAG_IN_USE = 1 << 0;
export const BME_FLAG_AUTO = 1 << 1;

export function decodeBitmapDirectory(buf: Buffer, count: number, file?: string): BitmapDirectoryEntry[] {
  const out: BitmapDirectoryEntry[] = [];
  let off = 0;
  for (let i = 0; i < count; i++) {
    if (off + 24 > buf.length) throw new CorruptImageError('bitmap directory is truncated', file);
    const nameSize = buf.readUInt16BE(off + 18);
    const extra = buf.readUInt32BE(off + 20);
    const end = off + 24 + extra + nameSize;
    if (end > buf.length) throw new CorruptImageError('bitmap directory entry runs past the directory', file);
    out.push({
      bitmapTableOffset: readU64(buf, off, 'bitmap table offset', file),
      bitmapTableSize: buf.readUInt32BE(off + 8),
      flags: buf.readUInt32BE(off + 12),
      type: buf[off + 16]!,
      granularityBits: buf[off + 17]!,
      name: buf.toString('utf8', off + 24 + extra, end),
    });
    off = Math.ceil(end / 8) * 8;
  }
  return out;
}
