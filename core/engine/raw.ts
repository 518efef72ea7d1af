import type { BlockFile } from '../io/block-file';
import { NodeFile } from '../io/node-file';
import { native, isUnsupported } from '../io/native';
import { IoError, UsageError } from '../errors';
import { PROBE_SECTOR, probeNonRaw } from '../format/probe';
import type { DiskImage, LayerStatus, ReadSegment, WritableImage } from './image';

/** A raw image: the file is the disk. Holes (SEEK_HOLE) read as zero and are reported as such. */
export class RawImage implements DiskImage, WritableImage {
  readonly format = 'raw' as const;
  readonly backingFile = null;
  readonly backingFormat = null;
  backing: DiskImage | null = null;
  displayName?: string;
  noDirname?: boolean;
  /**
   * The format was probed, not given: as QEMU's raw driver, writes that would make the first
   * sector probe as another format are refused.
   */
  probed = false;

  private constructor(readonly filename: string, readonly file: BlockFile, public virtualSize: number) {}

  static async open(filename: string, file: BlockFile): Promise<RawImage> {
    // QEMU sees a raw image in whole 512-byte sectors: the tail reads as zero.
    return new RawImage(filename, file, Math.ceil((await file.size()) / 512) * 512);
  }

  async read(buf: Uint8Array, offset: number): Promise<void> {
    await this.file.read(buf, offset);
  }

  async readPlan(offset: number, length: number): Promise<ReadSegment[]> {
    return [{ at: 0, length, file: this.file, offset }];
  }

  async blockStatus(offset: number, bytes: number): Promise<LayerStatus> {
    const len = Math.min(bytes, this.virtualSize - offset);
    const ext = this.file.extents ? (await this.file.extents(offset, len))[0] : undefined;
    const data = ext ? ext.data : true;
    return { length: ext ? ext.length : len, allocated: true, data, zero: !data, offset, compressed: false };
  }

  private check(offset: number, length: number): void {
    if (offset < 0 || length < 0 || offset + length > this.virtualSize) {
      throw new UsageError(`${this.filename}: request [${offset}, ${offset + length}) lies outside the image (${this.virtualSize} bytes)`);
    }
  }

  async write(buf: Uint8Array, offset: number): Promise<void> {
    this.check(offset, buf.length);
    if (this.probed && offset < PROBE_SECTOR && buf.length > 0) {
      const sector = Buffer.alloc(PROBE_SECTOR);
      await this.file.read(sector, 0);
      sector.set(buf.subarray(0, PROBE_SECTOR - offset), offset);
      const as = probeNonRaw(sector);
      if (as) {
        throw new IoError(`write to the first sector refused: it would make the image probe as ${as} (its format was probed as raw; give -f raw to write it)`, this.filename, 'EPERM');
      }
    }
    await this.file.write(buf, offset);
  }

  /** Zeros: a punched hole where the file system allows it, written zeros otherwise. */
  async writeZeroes(offset: number, length: number): Promise<void> {
    this.check(offset, length);
    const n = native();
    if (n && this.file instanceof NodeFile) {
      try { n.punchHole(this.file.fd, offset, length); return; } catch (err) { if (!isUnsupported(err)) throw err; }
    }
    const zero = Buffer.alloc(Math.min(length, 1 << 20));
    for (let p = 0; p < length; p += zero.length) await this.file.write(zero.subarray(0, Math.min(zero.length, length - p)), offset + p);
  }

  /** Raw discard punches a hole (reads as zero afterwards), as QEMU's file driver does. */
  async discard(offset: number, length: number): Promise<void> {
    this.check(offset, length);
    const n = native();
    if (n && this.file instanceof NodeFile) {
      try { n.punchHole(this.file.fd, offset, length); } catch (err) { if (!isUnsupported(err)) throw err; }
    }
  }

  async flush(): Promise<void> { await this.file.flush(); }

  async close(): Promise<void> { await this.file.close(); }
}
