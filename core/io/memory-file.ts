import type { BlockFile } from './block-file';

/**
 * An in-memory BlockFile. With `crashable`, writes since the last flush are kept in a journal
 * so a test can see the file as a power cut would leave it: crashImage() keeps any subset of
 * them, sector by sector (the disk may write them in any order and tear any of them).
 */
export class MemoryFile implements BlockFile {
  readonly writable = true;
  private data: Buffer;
  private len: number;
  private durable: { data: Buffer; len: number } | null = null;
  /** Changes since the last flush, in order (crashable only). */
  private journal: ({ offset: number; data: Buffer } | { size: number })[] = [];
  /** Counters a test can inspect. */
  readonly stats = { reads: 0, readBytes: 0, writes: 0, writeBytes: 0, flushes: 0 };
  /** Called at each flush with what is durable then (tests take a crash state at every flush). */
  onFlush: ((durable: Buffer) => void) | null = null;

  constructor(readonly path = 'memory', initial?: Uint8Array, crashable = false) {
    this.data = Buffer.alloc(Math.max(initial?.length ?? 0, 4096));
    this.len = initial?.length ?? 0;
    if (initial) this.data.set(initial);
    if (crashable) this.durable = { data: Buffer.from(this.data.subarray(0, this.len)), len: this.len };
  }

  async size(): Promise<number> { return this.len; }

  async read(buf: Uint8Array, offset: number): Promise<number> {
    this.stats.reads++;
    this.stats.readBytes += buf.length;
    const n = Math.max(0, Math.min(buf.length, this.len - offset));
    if (n > 0) buf.set(this.data.subarray(offset, offset + n));
    if (n < buf.length) buf.fill(0, n);
    return n;
  }

  async write(buf: Uint8Array, offset: number): Promise<void> {
    this.stats.writes++;
    this.stats.writeBytes += buf.length;
    if (this.durable) this.journal.push({ offset, data: Buffer.from(buf) });
    this.ensure(offset + buf.length);
    this.data.set(buf, offset);
    if (offset + buf.length > this.len) this.len = offset + buf.length;
  }

  async discard(offset: number, length: number): Promise<void> {
    const end = Math.min(this.len, offset + length);
    if (end <= offset) return;
    // A punched range reads as zeros: for a power cut it is a write of zeros, in order.
    if (this.durable) this.journal.push({ offset, data: Buffer.alloc(end - offset) });
    this.data.fill(0, offset, end);
  }

  async truncate(size: number): Promise<void> {
    if (this.durable) this.journal.push({ size });
    this.ensure(size);
    if (size < this.len) this.data.fill(0, size, this.len);
    this.len = size;
  }

  async flush(): Promise<void> {
    this.stats.flushes++;
    if (this.durable) {
      this.durable = { data: Buffer.from(this.data.subarray(0, this.len)), len: this.len };
      this.journal = [];
    }
    this.onFlush?.(this.durable ? this.durable.data : this.contents());
  }

  async close(): Promise<void> {}

  /**
   * The file as a power cut now could leave it: what was flushed, plus each 512-byte sector of
   * each later write (and each later truncate) for which `keep` says yes, in issue order; a
   * sector keeps a write only with the earlier writes to it (it went through those versions).
   * By default none of them.
   */
  crashImage(keep: () => boolean = () => false): Buffer {
    if (!this.durable) throw new Error('MemoryFile was not created crashable');
    let out = Buffer.from(this.durable.data.subarray(0, this.durable.len));
    const fit = (n: number) => {
      if (n <= out.length) return;
      const b = Buffer.alloc(n);
      out.copy(b);
      out = b;
    };
    const stopped = new Set<number>();
    for (const j of this.journal) {
      if ('size' in j) {
        if (!keep()) continue;
        if (j.size < out.length) out = Buffer.from(out.subarray(0, j.size));
        else fit(j.size);
        continue;
      }
      for (let p = 0; p < j.data.length;) {
        const n = Math.min(j.data.length - p, 512 - ((j.offset + p) % 512));
        const sector = Math.floor((j.offset + p) / 512);
        if (!stopped.has(sector) && keep()) {
          fit(j.offset + p + n);
          j.data.copy(out, j.offset + p, p, p + n);
        } else {
          stopped.add(sector);
        }
        p += n;
      }
    }
    return out;
  }

  contents(): Buffer { return Buffer.from(this.data.subarray(0, this.len)); }

  private ensure(n: number) {
    if (n <= this.data.length) return;
    let cap = this.data.length;
    while (cap < n) cap *= 2;
    const next = Buffer.alloc(cap);
    next.set(this.data.subarray(0, this.len));
    this.data = next;
  }
}
