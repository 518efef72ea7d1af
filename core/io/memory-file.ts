import type { BlockFile } from './block-file';

/**
 * An in-memory BlockFile. With `crashable`, writes after the last flush are kept in a journal
 * so a test can `crash()` and see the file as a power cut would leave it (every unflushed
 * write dropped), or keep a prefix of them.
 */
export class MemoryFile implements BlockFile {
  readonly writable = true;
  private data: Buffer;
  private len: number;
  private durable: { data: Buffer; len: number } | null = null;
  /** Counters a test can inspect. */
  readonly stats = { reads: 0, readBytes: 0, writes: 0, writeBytes: 0, flushes: 0 };

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
    this.ensure(offset + buf.length);
    this.data.set(buf, offset);
    if (offset + buf.length > this.len) this.len = offset + buf.length;
  }

  async discard(offset: number, length: number): Promise<void> {
    const end = Math.min(this.len, offset + length);
    if (end > offset) this.data.fill(0, offset, end);
  }

  async truncate(size: number): Promise<void> {
    this.ensure(size);
    if (size < this.len) this.data.fill(0, size, this.len);
    this.len = size;
  }

  /** Called after every flush with the now-durable bytes (crash tests record cut points). */
  onFlush: ((durable: Buffer) => void) | null = null;

  async flush(): Promise<void> {
    this.stats.flushes++;
    if (this.durable) this.durable = { data: Buffer.from(this.data.subarray(0, this.len)), len: this.len };
    this.onFlush?.(this.durable ? this.durable.data : this.contents());
  }

  async close(): Promise<void> {}

  /** The file as it would be after a power cut now: only flushed state survives. */
  crashImage(): Buffer {
    if (!this.durable) throw new Error('MemoryFile was not created crashable');
    return Buffer.from(this.durable.data.subarray(0, this.durable.len));
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
