// The one interface the engine does I/O through. Implementations: node-file.ts (positional
// I/O on a file, many requests in flight) and memory-file.ts (tests, crash simulation).
import type { FileIdentity } from './identity';

/** A run of the underlying file as the host file system reports it (SEEK_DATA/SEEK_HOLE). */
export interface HostExtent {
  offset: number;
  length: number;
  /** false: a hole (reads as zero, occupies nothing). */
  data: boolean;
}

export interface BlockFile {
  readonly path: string;
  readonly writable: boolean;
  /** Current length in bytes. */
  size(): Promise<number>;
  /**
   * Reads up to buf.length bytes at `offset` into buf; bytes past the end of the file read
   * as zero. Returns how many bytes came from the file (the rest was zero-filled).
   */
  read(buf: Uint8Array, offset: number): Promise<number>;
  write(buf: Uint8Array, offset: number): Promise<void>;
  truncate(size: number): Promise<void>;
  /** Makes every write issued so far durable. */
  flush(): Promise<void>;
  close(): Promise<void>;
  /**
   * What the host file holds at [offset, offset+length): data or hole, as the file system
   * reports it. Without support (no SEEK_DATA) the whole range is data up to EOF.
   * Ranges past EOF are holes.
   */
  extents?(offset: number, length: number): Promise<HostExtent[]>;
  /** Allocated bytes on disk (st_blocks * 512), for `actual-size`. */
  allocatedSize?(): Promise<number>;
  /**
   * Gives [offset, offset+length) back to the file system (a punched hole: reads as zero
   * afterwards, size unchanged), as QEMU passes discards down. Best effort: where the file
   * system cannot, nothing happens.
   */
  discard?(offset: number, length: number): Promise<void>;
  /**
   * Makes [offset, offset+length) read as zeros through the file system without writing them
   * (fallocate ZERO_RANGE); false where it cannot, and the caller writes zeros instead.
   */
  zeroRange?(offset: number, length: number): Promise<boolean>;
  /** The file's device and inode (see identity.ts), where there is a file behind it. */
  identity?(): Promise<FileIdentity>;
  /**
   * The engine reached one of QEMU's BLKDBG_* points (write_aio, cluster_free, ...): for the
   * blkdebug test driver (blkdebug.ts), which may then fail the next operations. Files that
   * are not a blkdebug node have no such method.
   */
  debugEvent?(event: string): void;
}
