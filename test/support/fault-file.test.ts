// The fault-injecting files the failure suites drive every writing path through.
import { describe, expect, it } from 'vitest';
import { FaultInjector } from './fault-file';
import { MemoryFile } from '../../core/io/memory-file';
import { IoError } from '../../core/errors';

const buf = (n: number, v = 1) => Buffer.alloc(n, v);

describe('FaultInjector', () => {
  it('fails the Nth write over all the files it wraps, once', async () => {
    const inj = new FaultInjector({ write: 3, code: 'EIO' });
    const a = inj.wrap(new MemoryFile('a.qcow2', Buffer.alloc(0)));
    const b = inj.wrap(new MemoryFile('b.qcow2', Buffer.alloc(0)));
    await a.write(buf(10), 0);
    await b.write(buf(10), 0);
    const err = await b.write(buf(10), 100).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(IoError);
    expect((err as IoError).code).toBe('EIO');
    expect((err as IoError).message).toBe('b.qcow2: write of 10 bytes at offset 100 failed: EIO: i/o error, write');
    expect(await b.size()).toBe(10);
    await a.write(buf(10), 10);
    await a.flush();
    expect(inj.injected).toEqual(['write b.qcow2: write of 10 bytes at offset 100 failed']);
  });

  it('sticky: everything after the first failure fails too', async () => {
    const inj = new FaultInjector({ flush: 1, code: 'EIO', sticky: true });
    const a = inj.wrap(new MemoryFile('a', Buffer.alloc(0)));
    await a.write(buf(4), 0);
    await expect(a.flush()).rejects.toThrow('a: flush failed: EIO: i/o error, fsync');
    await expect(a.write(buf(4), 0)).rejects.toMatchObject({ code: 'EIO' });
    await expect(a.truncate(0)).rejects.toMatchObject({ code: 'EIO' });
    await expect(a.flush()).rejects.toMatchObject({ code: 'EIO' });
    expect(await a.read(Buffer.alloc(4), 0)).toBe(4);
  });

  it('a byte budget: the write that passes it lands short, then ENOSPC for it and every later one', async () => {
    const inj = new FaultInjector({ budget: 25, code: 'ENOSPC' });
    const mem = new MemoryFile('c', Buffer.alloc(0));
    const c = inj.wrap(mem);
    await c.write(buf(20, 1), 0);
    await expect(c.write(buf(10, 2), 20)).rejects.toThrow('c: write of 10 bytes at offset 20 failed: no space left on the file system');
    expect(mem.contents()).toEqual(Buffer.concat([buf(20, 1), buf(5, 2)]));
    await expect(c.write(buf(1, 3), 0)).rejects.toMatchObject({ code: 'ENOSPC' });
    expect(inj.bytes).toBe(25);
  });

  it('without a plan it only counts', async () => {
    const inj = new FaultInjector();
    const a = inj.wrap(new MemoryFile('a', Buffer.alloc(0)));
    await a.write(buf(3), 0);
    await a.flush();
    expect({ writes: inj.writes, flushes: inj.flushes, bytes: inj.bytes }).toEqual({ writes: 1, flushes: 1, bytes: 3 });
  });
});
