import type { BlockFile } from '../io/block-file';
import type { DiskImage, LayerStatus } from './image';

/** A raw image: the file is the disk. Holes (SEEK_HOLE) read as zero and are reported as such. */
export class RawImage implements DiskImage {
  readonly format = 'raw' as const;
  readonly backingFile = null;
  readonly backingFormat = null;
  backing: DiskImage | null = null;

  private constructor(readonly filename: string, readonly file: BlockFile, public virtualSize: number) {}

  static async open(filename: string, file: BlockFile): Promise<RawImage> {
    return new RawImage(filename, file, await file.size());
  }

  async read(buf: Uint8Array, offset: number): Promise<void> {
    await this.file.read(buf, offset);
  }

  async blockStatus(offset: number, bytes: number): Promise<LayerStatus> {
    const len = Math.min(bytes, this.virtualSize - offset);
    const ext = this.file.extents ? (await this.file.extents(offset, len))[0] : undefined;
    const data = ext ? ext.data : true;
    return { length: ext ? ext.length : len, allocated: true, data, zero: !data, offset, compressed: false };
  }

  async close(): Promise<void> { await this.file.close(); }
}
