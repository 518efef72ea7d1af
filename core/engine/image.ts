// What every opened image (qcow2 or raw) offers the chain, the jobs and the CLI.
import type { BlockFile } from '../io/block-file';

export type ImageFormat = 'qcow2' | 'raw';

/**
 * Block status of one run of a single layer, with QEMU's meaning (bdrv_block_status):
 * `allocated` ("present"): this layer decides the content; `data`/`zero` as QEMU reports
 * them (a data run over a hole of the host file is data *and* zero); `offset`: where the
 * run lives in the host file, when that is meaningful (not for compressed clusters).
 */
export interface LayerStatus {
  length: number;
  allocated: boolean;
  data: boolean;
  zero: boolean;
  offset: number | null;
  compressed: boolean;
}

/**
 * One step of a guest read as plain I/O: `length` bytes at `at` in the caller's buffer come
 * from `file` at `offset`, or are zeros when file is null. Bytes past the file's end read as
 * zero, as BlockFile.read has them.
 */
export interface ReadSegment {
  at: number;
  length: number;
  file: BlockFile | null;
  offset: number;
}

export interface DiskImage {
  readonly format: ImageFormat;
  /** The name the image was opened by (as given, or as combined from the overlay's name). */
  readonly filename: string;
  readonly file: BlockFile;
  /**
   * The name QEMU shows for an image opened through one of its test drivers (blkdebug:C:F, a
   * json: name): see core/chain/test-drivers.ts. `filename` stays the file's path.
   */
  displayName?: string;
  /** The image has no directory of its own (a quorum): relative backing names cannot be resolved. */
  noDirname?: boolean;
  readonly virtualSize: number;
  /** Backing file name as recorded in the image, and its recorded format. */
  readonly backingFile: string | null;
  readonly backingFormat: string | null;
  /** The opened backing image, attached by the chain opener. */
  backing: DiskImage | null;
  /** Guest-visible read through the backing chain; bytes past the virtual size read as zero. */
  read(buf: Uint8Array, offset: number): Promise<void>;
  /**
   * What read(buf of `length`, offset) would do, as file reads and zero fills in buffer order,
   * through the backing chain; null when some of it needs more than that (compressed
   * clusters). Lets a copy loop hand a whole window's reads to the I/O threads at once.
   */
  readPlan?(offset: number, length: number): Promise<ReadSegment[] | null>;
  /** Status of the first run at `offset`, at most `bytes` long (bytes > 0, offset < virtualSize). */
  blockStatus(offset: number, bytes: number): Promise<LayerStatus>;
  close(): Promise<void>;
}

/** An image opened for writing. */
export interface WritableImage extends DiskImage {
  write(buf: Uint8Array, offset: number): Promise<void>;
  /**
   * Makes the range read as zeros (metadata-only where the format allows it); `unmap` lets
   * whole allocated clusters be freed too (qemu-io's write -z -u, BDRV_REQ_MAY_UNMAP).
   */
  writeZeroes(offset: number, length: number, opts?: { unmap?: boolean }): Promise<void>;
  /** Drops data the guest no longer needs (advisory, as QEMU's discard). */
  discard(offset: number, length: number): Promise<void>;
  /** Whole clusters stored compressed (qcow2 only). */
  writeCompressed?(buf: Uint8Array, offset: number): Promise<void>;
  flush(): Promise<void>;
}

export function isWritable(img: DiskImage): img is WritableImage {
  return typeof (img as Partial<WritableImage>).write === 'function' && img.file.writable;
}
