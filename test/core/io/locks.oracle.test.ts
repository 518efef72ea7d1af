// Image locks through the engine's open path (core/chain/open.ts + core/io/locks.ts), checked
// against QEMU itself: the bytes Strata locks are the bytes qemu-io locks for the same use, a
// QEMU process holding an image makes Strata's opens fail with InUseError naming it, and an
// image Strata holds makes qemu-io/qemu-img fail with QEMU's own lock error.
// Needs the native addon (skips loudly without it, fails under CI=true) and qemu for the oracle.
import { spawnSync } from 'node:child_process';
import { mkdirSync, readFileSync } from 'node:fs';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { closeChain, openImage, openImageFile } from '../../../core/chain/open';
import { isWritable, type DiskImage } from '../../../core/engine/image';
import { InUseError } from '../../../core/errors';
import { lockImage, READ_LOCK, WRITE_LOCK } from '../../../core/io/locks';
import { native, nativeStatus } from '../../../core/io/native';
import { NodeFile } from '../../../core/io/node-file';
import { describeOracle, qemuImg, qemuImgRun, qemuIo, tempDir } from '../../oracle/qemu';
import { fdsOn, lockBytes, poll, startHolder, type Holder } from '../../oracle/holders';

const MiB = 1 << 20;
/** What qemu-io (read-write) holds on its image: uses read, write, resize; shares neither write nor resize. */
const QEMU_WRITER_BYTES = [100, 101, 103, 201, 203];

function describeNative(name: string, fn: () => void): void {
  if (native()) { describe(name, fn); return; }
  const why = nativeStatus().reason ?? 'unknown reason';
  if (process.env.CI === 'true') {
    describe(name, () => { it('needs the native addon', () => { throw new Error(`native addon unavailable under CI=true: ${why}`); }); });
    return;
  }
  process.stderr.write(`\n*** native addon NOT AVAILABLE (${why}): image lock tests are SKIPPED. Run npm run build. ***\n\n`);
  describe.skip(name, fn);
}


/** base.qcow2 (16 MiB of 0x11 in its first MiB) <- top.qcow2 (0x22 in its second MiB). */
function makeChain(path: (n: string) => string): { base: string; top: string } {
  const base = path('base.qcow2');
  const top = path('top.qcow2');
  qemuImg('create', '-q', '-f', 'qcow2', base, '16M');
  qemuIo(base, ['write -P 0x11 0 1M']);
  qemuImg('create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', top);
  qemuIo(top, ['write -P 0x22 1M 1M']);
  return { base, top };
}

async function expectInUse(p: Promise<unknown>, file: string, what: RegExp): Promise<InUseError> {
  const err = await p.then(() => null, (e: unknown) => e);
  expect(err, 'the open should have been refused').toBeInstanceOf(InUseError);
  const e = err as InUseError;
  expect(e.kind).toBe('in-use');
  expect(e.file).toBe(file);
  expect(e.message).toMatch(what);
  return e;
}

describeNative('image locks within one process', () => {
  const tmp = tempDir('strata-locks-');
  let n = 0;
  const open: DiskImage[] = [];
  let chain: { base: string; top: string };
  const fresh = () => {
    const dir = `c${n++}`;
    mkdirSync(tmp.path(dir));
    return makeChain((f) => tmp.path(`${dir}/${f}`));
  };
  const keep = <T extends DiskImage>(img: T): T => { open.push(img); return img; };
  afterEach(async () => { for (const img of open.splice(0)) await closeChain(img); });
  afterAll(() => tmp.cleanup());

  describeOracle('(images made by qemu-img)', () => {
    beforeAll(() => { chain = fresh(); });

    it('a second writable open of the same image throws InUseError; the first keeps working; after it closes the second succeeds', async () => {
      const first = keep(await openImage(chain.top, { writable: true }));
      await expectInUse(openImage(chain.top, { writable: true }), chain.top, /image is in use: Failed to get "write" lock/);
      // the refused open closed its file: only the first one's fd (and its locks) remain
      expect(fdsOn(process.pid, chain.top)).toHaveLength(1);
      expect(lockBytes(process.pid, chain.top)).toEqual(QEMU_WRITER_BYTES);
      if (!isWritable(first)) throw new Error('not writable');
      await first.write(Buffer.alloc(4096, 0x33), 0);
      const back = Buffer.alloc(4096);
      await first.read(back, 0);
      expect(back.every((b) => b === 0x33)).toBe(true);
      await closeChain(open.pop()!);
      expect(fdsOn(process.pid, chain.top)).toHaveLength(0);
      keep(await openImage(chain.top, { writable: true }));
    });

    // The holder is this very process, which findLockHolders leaves out, so no PID can be named
    // (the same happens when /proc hides the holder); the message must still read as a sentence.
    it('the refusal reads as a sentence when no holder can be named (not "...; held by another process holds it.")', async () => {
      keep(await openImage(chain.top, { writable: true }));
      const e = await expectInUse(openImage(chain.top, { writable: true }), chain.top, /image is in use: Failed to get "write" lock/);
      expect(e.message).not.toContain('held by another process holds it');
    });

    it('openImageFile (no chain) is refused the same way', async () => {
      keep(await openImageFile(chain.top, { writable: true }));
      await expectInUse(openImageFile(chain.top, { writable: true }), chain.top, /Failed to get "write" lock/);
    });

    it('a consistent-read open is refused while a writer holds the image, and a writer while a reader does', async () => {
      keep(await openImage(chain.top, { writable: true }));
      await expectInUse(openImage(chain.top), chain.top, /Failed to get shared "write" lock/);
      await closeChain(open.pop()!);
      keep(await openImage(chain.top));
      await expectInUse(openImage(chain.top, { writable: true }), chain.top, /Failed to get "write" lock/);
    });

    it('readers share; lock: none opens alongside a writer', async () => {
      keep(await openImage(chain.top));
      keep(await openImage(chain.top));
      await closeChain(open.pop()!);
      await closeChain(open.pop()!);
      keep(await openImage(chain.top, { writable: true }));
      const ro = keep(await openImage(chain.top, { lock: 'none' }));
      // (an earlier test wrote 0x33 over the first 4 KiB)
      const buf = Buffer.alloc(MiB - 64 * 1024);
      await ro.read(buf, 64 * 1024);
      expect(buf.every((b) => b === 0x11)).toBe(true);
    });

    it('a writable open locks the backing files for consistent reading: a second chain cannot write the base', async () => {
      keep(await openImage(chain.top, { writable: true }));
      await expectInUse(openImage(chain.base, { writable: true }), chain.base, /Failed to get "write" lock/);
      keep(await openImage(chain.base)); // reading it is fine
    });

    it('lockImage: held with the addon, and release() drops every byte', async () => {
      const f = await NodeFile.open(chain.base, { writable: true });
      try {
        const lock = await lockImage(f.fd, chain.base, WRITE_LOCK);
        expect(lock.held).toBe(true);
        expect(lockBytes(process.pid, chain.base)).toEqual(QEMU_WRITER_BYTES);
        lock.release();
        expect(lockBytes(process.pid, chain.base)).toEqual([]);
        const r = await lockImage(f.fd, chain.base, READ_LOCK);
        expect(lockBytes(process.pid, chain.base)).toEqual([100, 201, 203]);
        r.release();
        expect(lockBytes(process.pid, chain.base)).toEqual([]);
      } finally {
        await f.close();
      }
    });
  });
});

describeNative('image locks against QEMU', () => {
  describeOracle('qemu-io / qemu-nbd / qemu-img', () => {
    const tmp = tempDir('strata-locks-q-');
    let n = 0;
    const holders: Holder[] = [];
    const open: DiskImage[] = [];
    const fresh = () => {
      const dir = `q${n++}`;
      mkdirSync(tmp.path(dir));
      return { ...makeChain((f) => tmp.path(`${dir}/${f}`)), sock: tmp.path(`${dir}/nbd.sock`) };
    };
    const keep = <T extends DiskImage>(img: T): T => { open.push(img); return img; };
    afterEach(async () => {
      for (const img of open.splice(0)) await closeChain(img);
      for (const h of holders.splice(0)) await h.stop();
    });
    afterAll(() => tmp.cleanup());

    it('Strata locks the same bytes as qemu-io for a writable open, on the image and on its backing file', async () => {
      const c = fresh();
      const h = await startHolder('qemu-io', c.top, c.sock);
      // startHolder waits for the top's locks; QEMU may take the backing file's a moment later.
      const qBase = await poll(() => { const b = lockBytes(h.pid, c.base); return b.length > 0 && b; }, 15_000, 'qemu-io to lock the backing file');
      const qTop = lockBytes(h.pid, c.top);
      await h.stop();
      expect(qTop).toEqual(QEMU_WRITER_BYTES);
      keep(await openImage(c.top, { writable: true }));
      expect(lockBytes(process.pid, c.top)).toEqual(qTop);
      expect(lockBytes(process.pid, c.base)).toEqual(qBase);
    });

    // qemu-io -r (and every read-only qemu-img open: blk_new_open shares only consistent-read
    // and write-unchanged) refuses to share write AND resize: bytes 100, 201, 203.
    it('Strata locks the same bytes as qemu-io -r for a read-only open', async () => {
      const c = fresh();
      const h = await startHolder('qemu-io', c.top, c.sock, { readOnly: true });
      // startHolder waits for the top's locks; QEMU may take the backing file's a moment later.
      const qBase = await poll(() => { const b = lockBytes(h.pid, c.base); return b.length > 0 && b; }, 15_000, 'qemu-io to lock the backing file');
      const qTop = lockBytes(h.pid, c.top);
      await h.stop();
      keep(await openImage(c.top));
      expect({ top: lockBytes(process.pid, c.top), base: lockBytes(process.pid, c.base) }).toEqual({ top: qTop, base: qBase });
    });

    for (const kind of ['qemu-io', 'qemu-nbd'] as const) {
      it(`an image held by ${kind}: writable and consistent-read opens throw InUseError naming its PID; lock: none reads it`, async () => {
        const c = fresh();
        const h = await startHolder(kind, c.top, c.sock);
        holders.push(h);
        const w = await expectInUse(openImage(c.top, { writable: true }), c.top, /image is in use: Failed to get "write" lock/);
        expect(w.message).toContain(`PID ${h.pid} (${kind})`);
        expect(w.message).toContain('-U');
        const r = await expectInUse(openImage(c.top), c.top, /Failed to get shared "write" lock/);
        expect(r.message).toContain(`PID ${h.pid} (${kind})`);
        // its backing file is only read by QEMU: reading works, writing does not
        const b = await expectInUse(openImage(c.base, { writable: true }), c.base, /Failed to get "write" lock/);
        expect(b.message).toContain(`PID ${h.pid} (${kind})`);
        keep(await openImage(c.base));
        const img = keep(await openImage(c.top, { lock: 'none' }));
        const buf = Buffer.alloc(2 * MiB);
        await img.read(buf, 0);
        expect(buf.subarray(0, MiB).every((x) => x === 0x11)).toBe(true);
        expect(buf.subarray(MiB).every((x) => x === 0x22)).toBe(true);
        // nothing Strata did left a lock behind on the refused files
        expect(lockBytes(process.pid, c.top)).toEqual([]);
      });
    }

    it('an image Strata holds for writing: qemu-io and qemu-img fail with QEMU\'s lock errors, -U works, and all is free after close', async () => {
      const c = fresh();
      keep(await openImage(c.top, { writable: true }));
      const w = spawnSync('qemu-io', ['-c', 'write 0 4k', c.top], { encoding: 'utf8' });
      expect(w.status).not.toBe(0);
      expect(w.stderr).toContain('Failed to get "write" lock');
      expect(w.stderr).toContain('Is another process using the image');
      const r = spawnSync('qemu-io', ['-r', '-c', 'read 0 4k', c.top], { encoding: 'utf8' });
      expect(r.status).not.toBe(0);
      expect(r.stderr).toContain('Failed to get shared "write" lock');
      const wb = spawnSync('qemu-io', ['-c', 'write 0 4k', c.base], { encoding: 'utf8' });
      expect(wb.stderr).toContain('Failed to get "write" lock');
      expect(qemuImgRun('check', c.top).stderr).toContain('Failed to get shared "write" lock');
      // qemu-img 7.2 info without -U refuses an image with a writer too
      expect(qemuImgRun('info', c.top).stderr).toContain('Failed to get shared "write" lock');
      expect(qemuImgRun('info', '-U', c.top).status).toBe(0);
      expect(qemuImgRun('convert', '-U', '-O', 'raw', c.top, tmp.path('u.raw')).status).toBe(0);
      await closeChain(open.pop()!);
      const ok = spawnSync('qemu-io', ['-c', 'write 0 4k', c.top], { encoding: 'utf8' });
      expect(ok.stderr).toBe('');
      expect(ok.status).toBe(0);
    });

    it('an image Strata reads: qemu-io cannot write it but qemu-io -r and qemu-img convert can read it', async () => {
      const c = fresh();
      keep(await openImage(c.top));
      const w = spawnSync('qemu-io', ['-c', 'write 0 4k', c.top], { encoding: 'utf8' });
      expect(w.status).not.toBe(0);
      expect(w.stderr).toContain('Failed to get "write" lock');
      const r = spawnSync('qemu-io', ['-r', '-c', 'read -P 0x22 1M 4k', c.top], { encoding: 'utf8' });
      expect(r.stderr).toBe('');
      expect(r.stdout).not.toMatch(/fail/i);
      expect(qemuImgRun('convert', '-O', 'raw', c.top, tmp.path('r.raw')).status).toBe(0);
    });

    it('Strata\'s own lock check sees QEMU\'s locks even when QEMU holds the image only through a backing chain', async () => {
      const c = fresh();
      const mid = tmp.path('mid.qcow2');
      qemuImg('create', '-q', '-f', 'qcow2', '-b', c.top, '-F', 'qcow2', mid);
      const h = await startHolder('qemu-io', mid, c.sock);
      holders.push(h);
      // qemu-io on mid reads top as a backing file: Strata may read top, not write it
      keep(await openImage(c.top));
      const e = await expectInUse(openImage(c.top, { writable: true }), c.top, /Failed to get "write" lock/);
      expect(e.message).toContain(`PID ${h.pid} (qemu-io)`);
    });
  });
});
