// Several images read one after another as one disk: qemu-img convert's several sources
// (convert A B C DST copies A, then B, then C into DST, which is as long as all of them).
import type { BlockFile } from '../io/block-file';
import type { DiskImage, LayerStatus } from '../engine/image';
import { chainBlockStatus } from './block-status';
import { closeChain } from './open';

export class ConcatImage implements DiskImage {
  readonly format = 'raw' as const;
  readonly backingFile = null;
  readonly backingFormat = null;
  backing: DiskImage | null = null;
  readonly virtualSize: number;
  private readonly starts: number[] = [];

  constructor(readonly parts: DiskImage[]) {
    let at = 0;
    for (const p of parts) { this.starts.push(at); at += p.virtualSize; }
    this.virtualSize = at;
  }

  get filename(): string { return this.parts[0]!.filename; }
  get file(): BlockFile { return this.parts[0]!.file; }

  private at(offset: number): number {
    let i = this.starts.length - 1;
    while (i > 0 && this.starts[i]! > offset) i--;
    // Skip empty parts.
    while (i < this.parts.length - 1 && offset >= this.starts[i]! + this.parts[i]!.virtualSize) i++;
    return i;
  }

  async read(buf: Uint8Array, offset: number): Promise<void> {
    let done = 0;
    while (done < buf.length) {
      const pos = offset + done;
      if (pos >= this.virtualSize) { buf.fill(0, done); return; }
      const i = this.at(pos);
      const p = this.parts[i]!;
      const n = Math.min(buf.length - done, this.starts[i]! + p.virtualSize - pos);
      await p.read(buf.subarray(done, done + n), pos - this.starts[i]!);
      done += n;
    }
  }

  async blockStatus(offset: number, bytes: number): Promise<LayerStatus> {
    const i = this.at(offset);
    const p = this.parts[i]!;
    const st = await chainBlockStatus(p, offset - this.starts[i]!, Math.min(bytes, this.starts[i]! + p.virtualSize - offset));
    return { length: st.length, allocated: true, data: st.data, zero: st.zero, offset: null, compressed: st.compressed };
  }

  async close(): Promise<void> {
    for (const p of this.parts) await closeChain(p).catch(() => {});
  }
}
