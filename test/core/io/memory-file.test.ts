// MemoryFile's crash model: after a power cut, what was flushed survives, and of the writes
// since any subset of sectors may have landed (not only "all or nothing at each flush").
import { describe, expect, it } from 'vitest';
import { MemoryFile } from '../../../core/io/memory-file';

const sector = (v: number) => Buffer.alloc(512, v);

/** A keep() that answers from a list, in order. */
const answers = (list: boolean[]) => { let i = 0; return () => list[i++] ?? false; };

describe('MemoryFile crash images', () => {
  it('keep nothing unflushed by default, everything when asked', async () => {
    const f = new MemoryFile('m', Buffer.alloc(0), true);
    await f.write(sector(1), 0);
    await f.flush();
    await f.write(sector(2), 512);
    await f.write(sector(3), 0);
    expect(f.crashImage()).toEqual(sector(1));
    expect(f.crashImage(() => true)).toEqual(Buffer.concat([sector(3), sector(2)]));
  });

  it('a later write may land while an earlier one to another sector does not', async () => {
    const f = new MemoryFile('m', Buffer.alloc(1024), true);
    await f.flush();
    await f.write(sector(7), 0); // say, an L2 table
    await f.write(sector(8), 512); // and the L1 entry that points to it
    expect(f.crashImage(answers([false, true]))).toEqual(Buffer.concat([Buffer.alloc(512), sector(8)]));
  });

  it('writes are torn at sector boundaries', async () => {
    const f = new MemoryFile('m', Buffer.alloc(1536), true);
    await f.flush();
    await f.write(Buffer.alloc(1536, 9), 0);
    expect(f.crashImage(answers([true, false, true]))).toEqual(Buffer.concat([sector(9), Buffer.alloc(512), sector(9)]));
  });

  it('one sector only goes through the versions it had: a later write lands with the earlier ones', async () => {
    const f = new MemoryFile('m', Buffer.alloc(512), true);
    await f.flush();
    const a = Buffer.alloc(512); a[0] = 1;
    const b = Buffer.from(a); b[8] = 2;
    await f.write(a, 0);
    await f.write(b, 0);
    // Dropping the first write to the sector drops the second too.
    expect(f.crashImage(answers([false, true]))).toEqual(Buffer.alloc(512));
    expect(f.crashImage(answers([true, false]))).toEqual(a);
    expect(f.crashImage(answers([true, true]))).toEqual(b);
  });

  it('a truncate since the last flush may or may not have happened', async () => {
    const f = new MemoryFile('m', Buffer.alloc(0), true);
    await f.write(sector(4), 0);
    await f.write(sector(5), 512);
    await f.flush();
    await f.truncate(512);
    expect(f.crashImage(answers([false])).length).toBe(1024);
    expect(f.crashImage(answers([true]))).toEqual(sector(4));
  });
});
