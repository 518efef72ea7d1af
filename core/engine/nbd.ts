// An NBD export opened read-only as an image: the export's bytes are the disk (QEMU's nbd
// protocol node, or a raw format node over it), its block status is what the server reports.
import { NbdFile } from '../io/nbd';
import type { DiskImage, LayerStatus, ReadSegment } from './image';

export class NbdImage implements DiskImage {
  readonly format = 'raw' as const;
  readonly backingFile = null;
  readonly backingFormat = null;
  backing: DiskImage | null = null;
  readonly virtualSize: number;

  /**
   * `driver`: the top node as QEMU names its driver, what info's "file format" shows: 'nbd'
   * for the protocol node itself (driver=nbd), 'raw' for a raw node over it (a probed or -f
   * raw URL).
   */
  constructor(readonly file: NbdFile, readonly driver: 'nbd' | 'raw') {
    this.virtualSize = file.exportSize;
  }

  get filename(): string { return this.file.path; }

  async read(buf: Uint8Array, offset: number): Promise<void> {
    await this.file.read(buf, offset);
  }

  async readPlan(offset: number, length: number): Promise<ReadSegment[]> {
    return [{ at: 0, length, file: this.file, offset }];
  }

  /**
   * As QEMU's nbd driver and block layer: data and zero from the metadata context; a run with
   * neither is not allocated (no offset, "present": false); without a context all is data.
   */
  async blockStatus(offset: number, bytes: number): Promise<LayerStatus> {
    const len = Math.min(bytes, this.virtualSize - offset);
    const st = await this.file.blockStatus(offset, len);
    if (!st) return { length: len, allocated: true, data: true, zero: false, offset, compressed: false };
    const allocated = st.data || st.zero;
    return { length: st.length, allocated, data: st.data, zero: st.zero, offset: allocated ? offset : null, compressed: false };
  }

  async close(): Promise<void> { await this.file.close(); }
}
