// Persistent dirty bitmaps of an opened image: the directory, read and checked at open as
// QEMU does (an image whose directory is broken does not open), and kept valid by writes.
import { CorruptImageError } from '../errors';
import { activeBitmapsExtension, decodeBitmapDirectory, type BitmapDirectoryEntry } from '../format/bitmaps';
import type { ParsedHeader } from '../format/header';
import type { BlockFile } from '../io/block-file';

/**
 * The bitmap directory, or null when the image has no bitmaps in use (none, or the autoclear
 * bit is clear). The extension is checked before anything is read or allocated from it.
 */
export async function loadBitmapDirectory(file: BlockFile, p: ParsedHeader, fileSize: number, filename: string): Promise<BitmapDirectoryEntry[] | null> {
  const ext = activeBitmapsExtension(p, filename);
  if (!ext) return null;
  if (ext.bitmapDirectoryOffset + ext.bitmapDirectorySize > fileSize) {
    throw new CorruptImageError(`the bitmap directory at offset ${ext.bitmapDirectoryOffset} (${ext.bitmapDirectorySize} bytes) lies past the end of the file (${fileSize} bytes)`, filename);
  }
  const buf = Buffer.alloc(ext.bitmapDirectorySize);
  await file.read(buf, ext.bitmapDirectoryOffset);
  return decodeBitmapDirectory(buf, ext, 2 ** p.header.clusterBits, p.header.size, filename);
}
