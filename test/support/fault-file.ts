// Fault injection in the engine's own terms: BlockFiles that fail chosen operations the way a
// file system does (an error from ioError, naming the file, with ENOSPC or EIO). One injector
// counts operations over every file it wraps, so "the 17th write" means the 17th write of the
// whole job, whichever file it went to.
import type { FileIdentity } from '../../core/io/identity';
import type { BlockFile, HostExtent } from '../../core/io/block-file';
import { ioError } from '../../core/errors';

export type FaultCode = 'EIO' | 'ENOSPC';

export interface FaultPlan {
  /** Fail the Nth write (1-based). */
  write?: number;
  /** Fail the Nth flush (1-based). */
  flush?: number;
  /**
   * Bytes that may be written in all: the write that would pass the budget lands only the
   * bytes up to it (a short write) and then fails, and so does every write after it.
   */
  budget?: number;
  code: FaultCode;
  /**
   * After the first failure, every later write, flush and truncate fails as well (a device
   * gone bad, a disk that stays full); without it only the chosen operation fails.
   */
  sticky?: boolean;
}

const SYSCALL_TEXT: Record<FaultCode, string> = { EIO: 'EIO: i/o error', ENOSPC: 'ENOSPC: no space left on device' };

export class FaultInjector {
  writes = 0;
  flushes = 0;
  bytes = 0;
  /** The failures injected, in order (op and where). */
  readonly injected: string[] = [];
  /** Every operation seen, in order (writes, flushes, truncates), to pick an N by what it does. */
  readonly trace: { op: 'write' | 'flush' | 'truncate'; path: string; offset: number; length: number }[] = [];
  private dead = false;

  /** Failures the wrapped files themselves reported (a real full disk, say), in order. */
  readonly real: string[] = [];
  /** Called before each write with its number (1-based): to fill the disk at a chosen point. */
  beforeEachWrite: ((n: number) => void) | null = null;

  /** The plan may be set or changed while files are in use (after a setup phase, say). */
  constructor(public plan: FaultPlan | null = null) {}

  /** 1-based index of the first traced write matching `pred` (to fail exactly that one). */
  writeIndex(pred: (path: string, offset: number, length: number) => boolean, from = 1): number {
    let n = 0;
    for (const t of this.trace) {
      if (t.op !== 'write') continue;
      n++;
      if (n >= from && pred(t.path, t.offset, t.length)) return n;
    }
    return -1;
  }

  wrap(file: BlockFile): BlockFile { return new FaultFile(file, this); }

  /** @internal The error the file system would give, as NodeFile words it. */
  fail(file: BlockFile, op: string, what: string): never {
    const code = this.plan!.code;
    this.injected.push(`${op} ${file.path}: ${what}`);
    if (this.plan!.sticky) this.dead = true;
    const sys = Object.assign(new Error(`${SYSCALL_TEXT[code]}, ${op}`), { code, syscall: op });
    throw ioError(sys, file.path, what);
  }

  /** @internal */
  beforeWrite(file: BlockFile, buf: Uint8Array, offset: number): number {
    const n = ++this.writes;
    this.beforeEachWrite?.(n);
    this.trace.push({ op: 'write', path: file.path, offset, length: buf.length });
    const what = `write of ${buf.length} bytes at offset ${offset} failed`;
    const p = this.plan;
    if (!p) return buf.length;
    if (this.dead) this.fail(file, 'write', what);
    if (p.write === n) this.fail(file, 'write', what);
    if (p.budget !== undefined && this.bytes + buf.length > p.budget) return Math.max(0, p.budget - this.bytes);
    return buf.length;
  }

  /** @internal */
  beforeFlush(file: BlockFile): void {
    const n = ++this.flushes;
    this.trace.push({ op: 'flush', path: file.path, offset: 0, length: 0 });
    if (!this.plan) return;
    if (this.dead || this.plan.flush === n) this.fail(file, 'fsync', 'flush failed');
  }

  /** @internal Discards and zero ranges: not counted (they are hints), but a dead disk refuses them. */
  beforeHint(file: BlockFile, op: string, offset: number, length: number): void {
    if (this.plan && this.dead) this.fail(file, op, `${op} of ${length} bytes at offset ${offset} failed`);
  }

  /** @internal */
  beforeTruncate(file: BlockFile, size: number): void {
    this.trace.push({ op: 'truncate', path: file.path, offset: size, length: 0 });
    if (this.plan && this.dead) this.fail(file, 'ftruncate', `cannot resize to ${size} bytes`);
  }
}

class FaultFile implements BlockFile {
  readonly extents?: (offset: number, length: number) => Promise<HostExtent[]>;
  readonly allocatedSize?: () => Promise<number>;
  readonly discard?: (offset: number, length: number) => Promise<void>;
  readonly zeroRange?: (offset: number, length: number) => Promise<boolean>;
  readonly identity?: () => Promise<FileIdentity>;

  constructor(private readonly inner: BlockFile, private readonly inj: FaultInjector) {
    if (inner.extents) this.extents = (o, l) => inner.extents!(o, l);
    if (inner.allocatedSize) this.allocatedSize = () => inner.allocatedSize!();
    if (inner.identity) this.identity = () => inner.identity!();
    if (inner.discard) this.discard = async (o, l) => { this.inj.beforeHint(this, 'fallocate', o, l); return this.real(inner.discard!(o, l)); };
    if (inner.zeroRange) this.zeroRange = async (o, l) => { this.inj.beforeHint(this, 'fallocate', o, l); return this.real(inner.zeroRange!(o, l)); };
  }

  get path(): string { return this.inner.path; }
  get writable(): boolean { return this.inner.writable; }
  size(): Promise<number> { return this.inner.size(); }
  read(buf: Uint8Array, offset: number): Promise<number> { return this.inner.read(buf, offset); }

  /** Runs an operation of the real file, noting its failures. */
  private async real<T>(op: Promise<T>): Promise<T> {
    try {
      return await op;
    } catch (err) {
      this.inj.real.push(String((err as Error)?.message ?? err));
      throw err;
    }
  }

  async write(buf: Uint8Array, offset: number): Promise<void> {
    const allowed = this.inj.beforeWrite(this, buf, offset);
    if (allowed === buf.length) {
      this.inj.bytes += buf.length;
      return this.real(this.inner.write(buf, offset));
    }
    // Over the budget: what fits lands, then the disk is full.
    if (allowed > 0) await this.inner.write(buf.subarray(0, allowed), offset);
    this.inj.bytes += allowed;
    this.inj.fail(this, 'write', `write of ${buf.length} bytes at offset ${offset} failed`);
  }

  async truncate(size: number): Promise<void> {
    this.inj.beforeTruncate(this, size);
    return this.real(this.inner.truncate(size));
  }

  async flush(): Promise<void> {
    this.inj.beforeFlush(this);
    return this.real(this.inner.flush());
  }

  close(): Promise<void> { return this.inner.close(); }
}
