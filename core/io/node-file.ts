import { constants, read as fsRead, readSync, write as fsWrite, writeSync, type Stats } from 'node:fs';
import type { BlockFile, HostExtent } from './block-file';
import type { FileIdentity } from './identity';
import { IoError, ioError } from '../errors';
import { isUnsupported, native, type NativeApi } from './native';
import { close, fdatasync, fstat, ftruncate, open, stat } from './fs-async';

// The callback API costs the main thread less per request than FileHandle's promises.
function readAsync(fd: number, buf: Uint8Array, off: number, len: number, pos: number): Promise<number> {
  return new Promise((resolve, reject) => fsRead(fd, buf, off, len, pos, (err, n) => (err ? reject(err) : resolve(n))));
}
function writeAsync(fd: number, buf: Uint8Array, off: number, len: number, pos: number): Promise<number> {
  return new Promise((resolve, reject) => fsWrite(fd, buf, off, len, pos, (err, n) => (err ? reject(err) : resolve(n))));
}

/**
 * Requests up to this size use direct syscalls: on a page-cache hit they take microseconds
 * (a 256 KiB copy is ~20 us), less than handing them to libuv's thread pool and back, which
 * on a small machine costs tens of microseconds of main-thread time and futex traffic.
 * Larger requests (convert's 2 MiB windows) go to the pool, where they overlap.
 */
const SYNC_IO_MAX = 256 * 1024;

/**
 * Larger writes go to the kernel in pieces of at most this size. The page cache sizes the
 * folios of a buffered write by each call's length and alignment, and large aligned writes
 * get folios of 512 KiB and more, taken from large free blocks; under a hypervisor with free
 * page reporting those are the blocks handed back to the host, and each page of them then
 * costs a host fault. On a 2-vCPU VM, 1 GiB written in aligned 512 KiB-2 MiB calls took
 * 1.3-3.4 s once the host had the memory back, in 256 KiB calls 0.2-0.3 s (0.45-1.3 s when
 * nearly all free memory had gone back); smaller calls gained nothing more.
 * (See writeQueued in native/strata_native.c.)
 */
export const WRITE_STEP = 256 * 1024;
const WRITEBACK_STEP = 16 * 1024 * 1024;

export interface OpenOptions {
  writable?: boolean;
  /** Accept a character device (never an image: the tests write to /dev/full to see writes fail). */
  characterDevice?: boolean;
  /** Create the file: 'new' fails if it exists, 'truncate' empties an existing one. */
  create?: 'new' | 'truncate';
  /**
   * Never sync to disk (flush() only orders nothing): qemu-img's cache=unsafe, its default for
   * convert targets, which are worthless until the job has finished anyway.
   */
  unsafe?: boolean;
}

/** What a file is when it is neither a regular file, a block device nor a directory. */
function fileKind(st: Stats): string | null {
  if (st.isFIFO()) return 'a FIFO (named pipe)';
  if (st.isSocket()) return 'a socket';
  if (st.isCharacterDevice()) return 'a character device';
  if (st.isFile() || st.isBlockDevice() || st.isDirectory()) return null;
  return 'not a regular file';
}

function notAnImageFile(path: string, kind: string): IoError {
  return new IoError(`cannot open: it is ${kind}; images are regular files or block devices`, path, 'EINVAL');
}

export class NodeFile implements BlockFile {
  private closed = false;
  private unsafe = false;
  /** The last extent SEEK_DATA/SEEK_HOLE found (read-only files: nothing changes it). */
  private lastExtent: { start: number; end: number; data: boolean } | null = null;
  private knownSize = -1;
  private constructor(readonly path: string, readonly writable: boolean, readonly fd: number) {}

  static async open(path: string, opts: OpenOptions = {}): Promise<NodeFile> {
    const writable = !!opts.writable || !!opts.create;
    // O_NONBLOCK: opening a FIFO must not wait for a writer (it is refused just below); on
    // regular files and block devices it changes nothing.
    let flags = (writable ? constants.O_RDWR : constants.O_RDONLY) | constants.O_NONBLOCK;
    if (opts.create) flags |= constants.O_CREAT | (opts.create === 'new' ? constants.O_EXCL : constants.O_TRUNC);
    let fd: number;
    try {
      fd = await open(path, flags, 0o644);
    } catch (err) {
      const code = (err as NodeJS.ErrnoException)?.code;
      // A socket cannot be opened at all (ENXIO): say what it is.
      if (code === 'ENXIO') {
        const kind = await stat(path).then(fileKind, () => null);
        if (kind) throw notAnImageFile(path, kind);
      }
      if (writable && (code === 'EACCES' || code === 'EPERM' || code === 'EROFS')) {
        const why = code === 'EROFS' ? 'the file system is read-only' : 'no write permission';
        throw new IoError(`cannot ${opts.create ? 'create' : 'open for writing'}: ${why}; commands that only read (info, map, compare, convert from it) still work`, path, code, err);
      }
      throw ioError(err, path, opts.create ? 'cannot create' : 'cannot open');
    }
    try {
      const st = await fstat(fd);
      if (st.isDirectory()) throw ioError(Object.assign(new Error('is a directory'), { code: 'EISDIR' }), path, 'cannot open');
      const kind = fileKind(st);
      if (kind && !(opts.characterDevice && st.isCharacterDevice())) throw notAnImageFile(path, kind);
    } catch (err) {
      await close(fd).catch(() => {});
      throw ioError(err, path, 'cannot open');
    }
    const f = new NodeFile(path, writable, fd);
    f.unsafe = !!opts.unsafe;
    return f;
  }

  async identity(): Promise<FileIdentity> {
    try {
      const st = await fstat(this.fd);
      return { dev: st.dev, ino: st.ino };
    } catch (err) { throw ioError(err, this.path, 'stat failed'); }
  }

  async size(): Promise<number> {
    try { return (await fstat(this.fd)).size; } catch (err) { throw ioError(err, this.path, 'stat failed'); }
  }

  async allocatedSize(): Promise<number> {
    try { return (await stat(this.path)).blocks * 512; } catch (err) { throw ioError(err, this.path, 'stat failed'); }
  }

  async read(buf: Uint8Array, offset: number): Promise<number> {
    if (this.closed) throw this.closedError('read');
    let done = 0;
    try {
      const direct = buf.length <= SYNC_IO_MAX;
      while (done < buf.length) {
        const n = direct
          ? readSync(this.fd, buf, done, buf.length - done, offset + done)
          : await readAsync(this.fd, buf, done, buf.length - done, offset + done);
        if (n === 0) break;
        done += n;
      }
    } catch (err) {
      throw ioError(err, this.path, `read of ${buf.length} bytes at offset ${offset} failed`);
    }
    if (done < buf.length) buf.fill(0, done);
    return done;
  }

  /**
   * Writes go to the file one at a time, in order: concurrent buffered writers to one file only
   * take turns on its inode lock (spinning on it, on a small machine, costs more than the
   * write). A small write with nothing ahead of it is done at once; the others go to the
   * native addon's writer thread (writeQueued), which starts each as soon as the one before
   * it ends, or without the addon to a promise chain over libuv's pool.
   */
  private writeTail: Promise<void> = Promise.resolve();
  private writesQueued = 0;

  write(buf: Uint8Array, offset: number): Promise<void> {
    if (this.closed) return Promise.reject(this.closedError('write'));
    if (this.writesQueued === 0 && buf.length <= SYNC_IO_MAX) {
      try {
        this.writeNowSync(buf, offset);
        return Promise.resolve();
      } catch (err) {
        return Promise.reject(err);
      }
    }
    this.writesQueued++;
    const n = native();
    const p = n
      ? this.writeNative(n, buf, offset)
      : this.writeTail.then(() => (buf.length <= SYNC_IO_MAX ? this.writeNowSync(buf, offset) : this.writeNowAsync(buf, offset)));
    const dequeue = () => { this.writesQueued--; };
    this.writeTail = p.then(dequeue, dequeue);
    return p;
  }

  /** Bytes written since writeback was last started (files that will be flushed only). */
  private unstarted = 0;

  /**
   * Bulk writes to a file that will be flushed start their writeback every WRITEBACK_STEP
   * bytes, so the disk works while the job is still copying and the final flush (commit's,
   * mirror's) has little left to wait for. Only a hint: errors are left to the flush.
   */
  private noteWritten(n: number): void {
    if (this.unsafe) return;
    this.unstarted += n;
    if (this.unstarted < WRITEBACK_STEP || this.closed) return;
    this.unstarted = 0;
    try { native()?.startWriteback(this.fd, 0, 0); } catch { /* the flush reports real errors */ }
  }

  private writeNowSync(buf: Uint8Array, offset: number): void {
    let done = 0;
    try {
      while (done < buf.length) done += writeSync(this.fd, buf, done, buf.length - done, offset + done);
    } catch (err) {
      throw ioError(err, this.path, `write of ${buf.length} bytes at offset ${offset} failed`);
    }
    this.noteWritten(done);
  }

  private writeNative(n: NativeApi, buf: Uint8Array, offset: number): Promise<void> {
    return new Promise<void>((resolve, reject) => {
      const done = (err: unknown) => {
        if (err) {
          reject(ioError(err, this.path, `write of ${buf.length} bytes at offset ${offset} failed`));
          return;
        }
        this.noteWritten(buf.length);
        resolve();
      };
      try {
        n.writeQueued(this.fd, buf, offset, WRITE_STEP, done);
      } catch (err) {
        done(err);
      }
    });
  }

  /** Without the addon: pwrites of WRITE_STEP bytes on libuv's pool. */
  private async writeNowAsync(buf: Uint8Array, offset: number): Promise<void> {
    let done = 0;
    try {
      while (done < buf.length) done += await writeAsync(this.fd, buf, done, Math.min(WRITE_STEP, buf.length - done), offset + done);
    } catch (err) {
      throw ioError(err, this.path, `write of ${buf.length} bytes at offset ${offset} failed`);
    }
    this.noteWritten(done);
  }

  async truncate(size: number): Promise<void> {
    if (this.closed) throw this.closedError('truncate');
    try { await ftruncate(this.fd, size); } catch (err) { throw ioError(err, this.path, `cannot resize to ${size} bytes`); }
  }

  async discard(offset: number, length: number): Promise<void> {
    const n = native();
    if (!n || length <= 0) return;
    // Writes still queued may cover the range: they land first, then the hole.
    await this.writeTail;
    try { n.punchHole(this.fd, offset, length); } catch (err) {
      if (!isUnsupported(err)) throw ioError(err, this.path, `discard of ${length} bytes at offset ${offset} failed`);
    }
  }

  async zeroRange(offset: number, length: number): Promise<boolean> {
    const n = native();
    if (!n || length <= 0) return false;
    // Writes still queued may cover the range: they land first, then the zeroing.
    await this.writeTail;
    try {
      n.zeroRange(this.fd, offset, length);
      return true;
    } catch (err) {
      if (isUnsupported(err)) return false;
      throw ioError(err, this.path, `zeroing ${length} bytes at offset ${offset} failed`);
    }
  }

  async flush(): Promise<void> {
    if (this.closed) throw this.closedError('flush');
    if (this.unsafe) return;
    try { await fdatasync(this.fd); } catch (err) { throw ioError(err, this.path, 'flush failed'); }
  }

  /** Use after close: the descriptor may already belong to another file, so it is never touched. */
  private closedError(what: string): IoError {
    return new IoError(`${what} after the file was closed`, this.path, 'EBADF');
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    // Writes still queued (a job that failed or was cancelled need not wait for its own) are
    // let finish first: the descriptor must not be closed, or reused for another file, under them.
    await this.writeTail;
    try { await close(this.fd); } catch (err) { throw ioError(err, this.path, 'close failed'); }
  }

  async extents(offset: number, length: number): Promise<HostExtent[]> {
    const end = offset + length;
    // Read-only files do not change under us (we hold QEMU's read lock): remember the size.
    if (this.writable || this.knownSize < 0 || end > this.knownSize) this.knownSize = await this.size();
    const fileSize = this.knownSize;
    const out: HostExtent[] = [];
    const push = (o: number, l: number, data: boolean) => {
      if (l <= 0) return;
      const last = out[out.length - 1];
      if (last && last.data === data && last.offset + last.length === o) last.length += l;
      else out.push({ offset: o, length: l, data });
    };
    const dataEnd = Math.min(end, fileSize);
    if (offset < dataEnd) {
      const n = native();
      if (!n) {
        push(offset, dataEnd - offset, true);
      } else {
        let pos = offset;
        while (pos < dataEnd) {
          const c = this.writable ? null : this.lastExtent;
          if (c && pos >= c.start && pos < c.end) {
            // SEEK_HOLE walks the file's extents: asking again for every run is quadratic.
            const stop = Math.min(c.end, dataEnd);
            push(pos, stop - pos, c.data);
            pos = stop;
            continue;
          }
          const data = n.seekData(this.fd, pos);
          if (data < 0 || data >= dataEnd) {
            push(pos, dataEnd - pos, false);
            if (data > pos) this.lastExtent = { start: pos, end: data, data: false };
            break;
          }
          if (data > pos) push(pos, data - pos, false);
          let hole = n.seekHole(this.fd, data);
          if (hole < 0) hole = fileSize;
          this.lastExtent = { start: data, end: hole, data: true };
          hole = Math.min(hole, dataEnd);
          push(data, hole - data, true);
          pos = hole;
        }
      }
    }
    if (end > Math.max(offset, fileSize)) push(Math.max(offset, fileSize), end - Math.max(offset, fileSize), false);
    return out;
  }
}
