// Crash simulation with reordering: every write, truncate and flush the engine makes through
// the wrapped files is logged, so a test can rebuild, for any cut point, the files as a power
// cut there could leave them. A write is durable once a flush of its file that was started
// after the write had completed has itself completed. Of the writes that are not durable at
// the cut (issued since, or still in flight), any subset may have reached the disk, each
// 512-byte sector of each write on its own: the disk may have written later ones before
// earlier ones, and torn any of them.
import type { BlockFile, HostExtent } from '../../core/io/block-file';
import type { FileIdentity } from '../../core/io/identity';

export const SECTOR = 512;

type Op =
  | { kind: 'write'; file: string; offset: number; data: Buffer; issued: number; done: number }
  | { kind: 'truncate'; file: string; size: number; issued: number; done: number }
  | { kind: 'flush'; file: string; issued: number; done: number };

/** A cut point: after `events` log events; what is durable then and what may or may not be. */
export interface Cut {
  /** Index into cutPoints(). */
  index: number;
  /** Writes and truncates that may or may not have landed, per file. */
  pending: number;
}

export class CrashLog {
  private seq = 0;
  private readonly ops: Op[] = [];
  private readonly initial = new Map<string, Buffer>();
  /** Order in which files were first seen (the tests write cut images under these names). */
  readonly files: string[] = [];

  /** Wraps `file`; its content before the first logged change is read now. */
  async wrap(file: BlockFile): Promise<BlockFile> {
    if (!this.initial.has(file.path)) {
      const size = await file.size();
      const b = Buffer.alloc(size);
      if (size) await file.read(b, 0);
      this.initial.set(file.path, b);
      this.files.push(file.path);
    }
    return new LoggedFile(file, this);
  }

  /** @internal */
  begin(op: Op): Op {
    op.issued = ++this.seq;
    op.done = Infinity;
    this.ops.push(op);
    return op;
  }

  /** @internal */
  end(op: Op): void { op.done = ++this.seq; }

  /** The sequence number of the last event so far (a cut point "now"). */
  get now(): number { return this.seq; }

  /** Operations logged (writes, truncates, flushes). */
  get length(): number { return this.ops.length; }

  /** Counts by kind. */
  counts(): { writes: number; flushes: number; truncates: number } {
    let writes = 0; let flushes = 0; let truncates = 0;
    for (const o of this.ops) {
      if (o.kind === 'write') writes++;
      else if (o.kind === 'flush') flushes++;
      else truncates++;
    }
    return { writes, flushes, truncates };
  }

  /**
   * The instants worth cutting at: just after each write or truncate was issued and just after
   * each flush completed (in between nothing changes what may be on disk). As sequence numbers.
   */
  cutPoints(): number[] {
    const pts = new Set<number>([0]);
    for (const o of this.ops) pts.add(o.kind === 'flush' ? o.done : o.issued);
    return [...pts].filter((p) => Number.isFinite(p)).sort((a, b) => a - b);
  }

  /**
   * The files after a power cut at sequence number `at`: every durable change applied, and of
   * the others each sector (and each truncate) kept when `keep()` says so, all in the order
   * they were issued. Files first seen after `at` keep their initial content.
   */
  stateAt(at: number, keep: () => boolean): { files: Map<string, Buffer>; pending: number } {
    // Per file: the latest flush completed by `at` makes durable what completed before it began.
    const durableBefore = new Map<string, number>();
    const room = new Map<string, number>();
    for (const [f, b] of this.initial) room.set(f, b.length);
    for (const o of this.ops) {
      if (o.issued > at) continue;
      if (o.kind === 'flush') {
        if (o.done <= at) durableBefore.set(o.file, Math.max(durableBefore.get(o.file) ?? 0, o.issued));
        continue;
      }
      const end = o.kind === 'write' ? o.offset + o.data.length : o.size;
      room.set(o.file, Math.max(room.get(o.file)!, end));
    }
    // One buffer per file, as large as the file ever gets: no copying as it grows.
    const bufs = new Map<string, { b: Buffer; len: number }>();
    for (const [f, init] of this.initial) {
      const b = Buffer.alloc(room.get(f)!);
      init.copy(b);
      bufs.set(f, { b, len: init.length });
    }
    let pending = 0;
    /** Sectors where a pending write was dropped: later writes to them are dropped too. */
    const stopped = new Set<string>();
    for (const o of this.ops) {
      if (o.kind === 'flush' || o.issued > at) continue;
      const durable = o.done < (durableBefore.get(o.file) ?? 0);
      const f = bufs.get(o.file)!;
      if (o.kind === 'truncate') {
        if (!durable) { pending++; if (!keep()) continue; }
        if (o.size < f.len) f.b.fill(0, o.size, f.len);
        f.len = o.size;
        continue;
      }
      if (durable) {
        o.data.copy(f.b, o.offset);
        f.len = Math.max(f.len, o.offset + o.data.length);
        continue;
      }
      pending++;
      // Sector by sector (aligned to the file's sectors), each on its own.
      for (let p = 0; p < o.data.length;) {
        const abs = o.offset + p;
        const n = Math.min(o.data.length - p, SECTOR - (abs % SECTOR));
        const key = `${o.file}:${Math.floor(abs / SECTOR)}`;
        if (!stopped.has(key) && keep()) {
          o.data.copy(f.b, abs, p, p + n);
          f.len = Math.max(f.len, abs + n);
        } else {
          stopped.add(key);
        }
        p += n;
      }
    }
    const files = new Map<string, Buffer>();
    for (const [name, f] of bufs) files.set(name, f.b.subarray(0, f.len));
    return { files, pending };
  }

  /** The files as they are at the end (every change landed): what the run itself left. */
  finalState(): Map<string, Buffer> {
    return this.stateAt(Infinity, () => true).files;
  }
}

class LoggedFile implements BlockFile {
  readonly extents?: (offset: number, length: number) => Promise<HostExtent[]>;
  readonly allocatedSize?: () => Promise<number>;
  readonly discard?: (offset: number, length: number) => Promise<void>;
  readonly zeroRange?: (offset: number, length: number) => Promise<boolean>;
  readonly identity?: () => Promise<FileIdentity>;

  constructor(private readonly inner: BlockFile, private readonly log: CrashLog) {
    if (inner.extents) this.extents = (o, l) => inner.extents!(o, l);
    if (inner.allocatedSize) this.allocatedSize = () => inner.allocatedSize!();
    if (inner.identity) this.identity = () => inner.identity!();
    // A punched hole or a zeroed range reads as zeros: for a power cut, a write of zeros.
    if (inner.discard) this.discard = (o, l) => this.zeros(o, l, async () => { await inner.discard!(o, l); return true; }).then(() => {});
    if (inner.zeroRange) this.zeroRange = (o, l) => this.zeros(o, l, () => inner.zeroRange!(o, l));
  }

  private async zeros(offset: number, length: number, op: () => Promise<boolean>): Promise<boolean> {
    const end = Math.min(offset + length, await this.inner.size());
    if (end <= offset) return op();
    const entry = this.log.begin({ kind: 'write', file: this.path, offset, data: Buffer.alloc(end - offset), issued: 0, done: 0 });
    const done = await op();
    this.log.end(entry);
    return done;
  }

  get path(): string { return this.inner.path; }
  get writable(): boolean { return this.inner.writable; }
  size(): Promise<number> { return this.inner.size(); }
  read(buf: Uint8Array, offset: number): Promise<number> { return this.inner.read(buf, offset); }

  async write(buf: Uint8Array, offset: number): Promise<void> {
    const op = this.log.begin({ kind: 'write', file: this.path, offset, data: Buffer.from(buf), issued: 0, done: 0 });
    await this.inner.write(buf, offset);
    this.log.end(op);
  }

  async truncate(size: number): Promise<void> {
    const op = this.log.begin({ kind: 'truncate', file: this.path, size, issued: 0, done: 0 });
    await this.inner.truncate(size);
    this.log.end(op);
  }

  async flush(): Promise<void> {
    const op = this.log.begin({ kind: 'flush', file: this.path, issued: 0, done: 0 });
    await this.inner.flush();
    this.log.end(op);
  }

  close(): Promise<void> { return this.inner.close(); }
}
