// NodeFile's failure paths: a failed write reaches its caller whichever way it went (a direct
// small write, or the addon's writer thread), and a closed file never touches its old
// descriptor, which the kernel may have given to another file by then.
import { existsSync, openSync, closeSync, readFileSync, writeFileSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { NodeFile } from '../../../core/io/node-file';
import { IoError } from '../../../core/errors';
import { tempDir } from '../../oracle/qemu';

describe('NodeFile', () => {
  it('after close, writes, reads and flushes fail instead of reaching a reused descriptor', async () => {
    const t = tempDir('strata-nodefile-');
    try {
      writeFileSync(t.path('a'), Buffer.alloc(4096, 1));
      writeFileSync(t.path('b'), Buffer.alloc(4096, 2));
      const a = await NodeFile.open(t.path('a'), { writable: true });
      await a.close();
      // The next open gets the lowest free descriptor: very likely a's old one.
      const b = await NodeFile.open(t.path('b'), { writable: true });
      try {
        const err = await a.write(Buffer.alloc(16, 9), 0).catch((e: unknown) => e);
        expect(err).toBeInstanceOf(IoError);
        expect((err as IoError).code).toBe('EBADF');
        expect((err as IoError).message).toBe(`${t.path('a')}: write after the file was closed`);
        await expect(a.read(Buffer.alloc(16), 0)).rejects.toMatchObject({ code: 'EBADF' });
        await expect(a.flush()).rejects.toMatchObject({ code: 'EBADF' });
        await expect(a.truncate(0)).rejects.toMatchObject({ code: 'EBADF' });
        await a.close();
        expect(readFileSync(t.path('b'))).toEqual(Buffer.alloc(4096, 2));
      } finally {
        await b.close();
      }
    } finally {
      t.cleanup();
    }
  });

  // /dev/full fails every write with ENOSPC.
  const full = existsSync('/dev/full') ? it : it.skip;
  full('a failed write rejects, small (direct) or large (queued)', async () => {
    const f = await NodeFile.open('/dev/full', { writable: true, characterDevice: true });
    try {
      await expect(f.write(Buffer.alloc(4096, 1), 0)).rejects.toThrow('/dev/full: write of 4096 bytes at offset 0 failed: no space left on the file system');
      // Larger than the direct-write limit: the addon's writer thread (or libuv's pool).
      const big = f.write(Buffer.alloc(1 << 20, 1), 0);
      await expect(big).rejects.toMatchObject({ code: 'ENOSPC' });
      // Two queued at once: each reports its own failure.
      const both = await Promise.allSettled([f.write(Buffer.alloc(1 << 20), 0), f.write(Buffer.alloc(1 << 20), 1 << 20)]);
      expect(both.map((r) => r.status)).toEqual(['rejected', 'rejected']);
    } finally {
      await f.close();
    }
  });

  it('a descriptor that cannot be closed is reported with the file name', async () => {
    const t = tempDir('strata-nodefile-');
    try {
      writeFileSync(t.path('c'), 'x');
      const f = await NodeFile.open(t.path('c'));
      // Closing the descriptor behind its back makes close() fail with EBADF.
      closeSync(f.fd);
      await expect(f.close()).rejects.toThrow(`${t.path('c')}: close failed`);
      // An unrelated descriptor keeps working.
      const fd = openSync(t.path('c'), 'r');
      closeSync(fd);
    } finally {
      t.cleanup();
    }
  });
});
