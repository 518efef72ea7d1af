// Disk full, read-only storage and huge sparse raw files: jobs refuse or stop cleanly, images
// stay consistent, messages name the file system and the numbers.
import { execFileSync, spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync, readFileSync, existsSync, truncateSync, openSync, writeSync, closeSync, readdirSync, readlinkSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { describeOracle, qemuImg, qemuIo, tempDir } from '../../oracle/qemu';
import { strata, fileHash, guestHash, expectClean, allocatedBytes, MiB } from './helpers';
import { MemoryFile } from '../../../core/io/memory-file';
import { IoError } from '../../../core/errors';
import { Qcow2Writable } from '../../../core/engine/qcow2-write';
import { Qcow2Image } from '../../../core/engine/qcow2';
import { convert } from '../../../core/jobs/convert';
import { openImage, closeChain } from '../../../core/chain/open';

/**
 * Under CI (root) a test that needs a mount must run: a machine that cannot mount fails it.
 * Elsewhere it is skipped with a loud message.
 */
function noMount(what: string): null {
  const msg = `cannot ${what} here`;
  if (process.env.CI === 'true') throw new Error(`${msg}: CI runs as root and must run these tests`);
  process.stderr.write(`\n*** ${msg}: these tests are skipped ***\n\n`);
  return null;
}

/** Unmounts (lazily if something still holds it) and removes the mount point. */
function unmount(dir: string): void {
  if (spawnSync('umount', [dir]).status !== 0) spawnSync('umount', ['-l', dir]);
  rmSync(dir, { recursive: true, force: true });
}

/** Mounts a small tmpfs (root only); null where the machine does not allow it. */
function mountTmpfs(sizeMiB: number): { dir: string; cleanup: () => void } | null {
  const dir = mkdtempSync(join(tmpdir(), 'strata-tmpfs-'));
  const r = spawnSync('mount', ['-t', 'tmpfs', '-o', `size=${sizeMiB}M`, 'tmpfs', dir]);
  if (r.status !== 0) { rmSync(dir, { recursive: true, force: true }); return noMount('mount a tmpfs'); }
  return { dir, cleanup: () => unmount(dir) };
}

/** Files of this process open under `dir`: a job must not leave any behind, even when it fails. */
function openFilesUnder(dir: string): string[] {
  const out: string[] = [];
  for (const fd of readdirSync('/proc/self/fd')) {
    try { const l = readlinkSync(`/proc/self/fd/${fd}`); if (l.startsWith(dir + '/')) out.push(l); } catch { /* closed meanwhile */ }
  }
  return out;
}

/** Fills the file system at `dir` until about `leaveMiB` is left. */
function fill(dir: string, leaveMiB: number): void {
  const df = execFileSync('df', ['-B1', '--output=avail', dir], { encoding: 'utf8' }).trim().split('\n').pop()!;
  const free = Number(df);
  const n = Math.max(0, free - leaveMiB * MiB);
  const fd = openSync(join(dir, 'filler'), 'w');
  const chunk = Buffer.alloc(MiB, 1);
  for (let done = 0; done < n; done += MiB) writeSync(fd, chunk, 0, Math.min(MiB, n - done));
  closeSync(fd);
}

/** A file that fails with ENOSPC once it would grow past `limit` bytes. */
class QuotaFile extends MemoryFile {
  constructor(initial: Buffer, private readonly limit: number) { super('quota.qcow2', initial, true); }
  override async write(buf: Uint8Array, offset: number): Promise<void> {
    if (offset + buf.length > this.limit && offset + buf.length > (await this.size())) {
      throw new IoError(`write of ${buf.length} bytes at offset ${offset} failed: no space left on the file system`, this.path, 'ENOSPC');
    }
    return super.write(buf, offset);
  }
}

describeOracle('disk full', () => {
  const t = tempDir();
  let fs: ReturnType<typeof mountTmpfs> = null;
  beforeAll(() => {
    fs = mountTmpfs(64);
    qemuImg('create', '-q', '-f', 'qcow2', t.path('src.qcow2'), '256M');
    qemuIo(t.path('src.qcow2'), ['write -P 0x31 0 40M']);
  });
  afterAll(() => { fs?.cleanup(); t.cleanup(); });

  it('convert refuses up front with the numbers when the target clearly does not fit', async (ctx) => {
    if (!fs) return ctx.skip();
    fill(fs.dir, 20);
    const before = fileHash(t.path('src.qcow2'));
    const r = await strata('convert', '-O', 'qcow2', t.path('src.qcow2'), join(fs.dir, 'out.qcow2'));
    expect(r.code).toBe(1);
    expect(r.err.trim().split('\n')).toHaveLength(1);
    expect(r.err).toMatch(new RegExp(`not enough space on ${fs.dir}.*MiB free, about 40\\.\\d+ MiB needed`));
    expect(existsSync(join(fs.dir, 'out.qcow2'))).toBe(false);
    expect(fileHash(t.path('src.qcow2'))).toBe(before);
    rmSync(join(fs.dir, 'filler'));
  });

  it('convert -n that runs out mid-way stops with a clear message; the source is untouched', async (ctx) => {
    if (!fs) return ctx.skip();
    const target = join(fs.dir, 'existing.raw');
    writeFileSync(target, Buffer.alloc(0));
    truncateSync(target, 256 * MiB);
    fill(fs.dir, 10);
    const before = fileHash(t.path('src.qcow2'));
    const r = await strata('convert', '-n', '-O', 'raw', t.path('src.qcow2'), target);
    expect(r.code).toBe(1);
    expect(r.err.trim().split('\n')).toHaveLength(1);
    expect(r.err).toContain(`no space left on ${fs.dir}`);
    expect(existsSync(target)).toBe(true);
    expect(fileHash(t.path('src.qcow2'))).toBe(before);
    rmSync(join(fs.dir, 'filler'));
    rmSync(target);
  });

  it('commit refuses up front when the base cannot take the data; the chain reads as before', async (ctx) => {
    if (!fs) return ctx.skip();
    const base = join(fs.dir, 'base.qcow2');
    const top = join(fs.dir, 'top.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', base, '128M');
    qemuImg('create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', top);
    qemuIo(top, ['write -P 0x44 0 24M']);
    const before = guestHash(top);
    fill(fs.dir, 8);
    const r = await strata('commit', top);
    expect(r.code).toBe(1);
    expect(r.err).toMatch(new RegExp(`not enough space on ${fs.dir} for committing`));
    rmSync(join(fs.dir, 'filler'));
    expectClean(base);
    expectClean(top);
    expect(guestHash(top)).toBe(before);
    rmSync(top);
    rmSync(base);
  });

  it('commit refuses before changing anything: a base that must grow (qcow2, raw) stays byte-identical, mtime too', async (ctx) => {
    if (!fs) return ctx.skip();
    const cases = [['gbase.qcow2', 'qcow2'], ['gbase.raw', 'raw']] as const;
    for (const [name, fmt] of cases) {
      const base = join(fs.dir, name);
      const top = join(fs.dir, 'gtop.qcow2');
      // The base is smaller than its overlay: the commit grows it (raw: truncates it larger).
      qemuImg('create', '-q', '-f', fmt, base, '16M');
      qemuImg('create', '-q', '-f', 'qcow2', '-b', name, '-F', fmt, top, '128M');
      qemuIo(top, ['write -P 0x46 0 24M']);
      fill(fs.dir, 8);
      const before = { hash: fileHash(base), size: statSync(base).size, mtimeMs: statSync(base).mtimeMs, top: fileHash(top) };
      const r = await strata('commit', top);
      expect(r.code, name).toBe(1);
      expect(r.err, name).toMatch(new RegExp(`not enough space on ${fs.dir} for committing`));
      expect({ hash: fileHash(base), size: statSync(base).size, mtimeMs: statSync(base).mtimeMs, top: fileHash(top) }, name).toEqual(before);
      rmSync(join(fs.dir, 'filler'));
      rmSync(top);
      rmSync(base);
    }
  });

  it('commit that runs out mid-way (base preallocated, sparse) stops cleanly; the chain reads as before', async (ctx) => {
    if (!fs) return ctx.skip();
    const base = join(fs.dir, 'pbase.qcow2');
    const top = join(fs.dir, 'ptop.qcow2');
    // Metadata preallocation: the base looks allocated (no preflight alarm) but its data
    // clusters are holes, so the copy needs space the file system does not have.
    qemuImg('create', '-q', '-f', 'qcow2', '-o', 'preallocation=metadata', base, '64M');
    qemuImg('create', '-q', '-f', 'qcow2', '-b', 'pbase.qcow2', '-F', 'qcow2', top);
    qemuIo(top, ['write -P 0x45 0 24M']);
    const before = guestHash(top);
    fill(fs.dir, 6);
    const r = await strata('commit', top);
    expect(r.code).toBe(1);
    expect(r.err.trim().split('\n')).toHaveLength(1);
    expect(r.err).toContain(`no space left on ${fs.dir}`);
    // The failed job has let go of every file there (its search for other overlays included):
    // a file still open would keep the space in use after the test removes it.
    expect(openFilesUnder(fs.dir)).toEqual([]);
    rmSync(join(fs.dir, 'filler'));
    for (const f of [base, top]) {
      const c = JSON.parse(qemuImg('check', '--output=json', f) || '{}');
      expect(c.corruptions ?? 0).toBe(0);
    }
    expect(guestHash(top)).toBe(before);
    rmSync(top);
    rmSync(base);
  });

  it('mirror refuses up front for a fresh target that does not fit', async (ctx) => {
    if (!fs) return ctx.skip();
    fill(fs.dir, 10);
    const r = await strata('mirror', '-O', 'raw', t.path('src.qcow2'), join(fs.dir, 'm.raw'));
    expect(r.code).toBe(1);
    expect(r.err).toContain(`not enough space on ${fs.dir}`);
    expect(existsSync(join(fs.dir, 'm.raw'))).toBe(false);
    rmSync(join(fs.dir, 'filler'));
  });

  it('the engine hitting ENOSPC leaves an image with at most leaks, and flushed data intact', async () => {
    const path = t.path('quota.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4k', path, '64M');
    const file = new QuotaFile(readFileSync(path), 2 * MiB);
    const img = await Qcow2Writable.openWritable('quota.qcow2', file);
    const flushed: Buffer[] = [];
    let failed: unknown = null;
    for (let i = 0; i < 64 && !failed; i++) {
      const data = Buffer.alloc(64 * 1024, 1 + i);
      try {
        await img.write(data, i * 256 * 1024);
        await img.flush();
        flushed.push(data);
      } catch (err) {
        failed = err;
      }
    }
    expect(failed).toBeInstanceOf(IoError);
    expect((failed as IoError).code).toBe('ENOSPC');
    await img.close().catch(() => {});
    const out = t.path('after-enospc.qcow2');
    writeFileSync(out, file.crashImage());
    const check = JSON.parse(execFileSync('qemu-img', ['check', '--output=json', out], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] }).toString() || '{}');
    expect(check.corruptions ?? 0).toBe(0);
    const view = await Qcow2Image.open('after', new MemoryFile('after', readFileSync(out)));
    for (const [i, data] of flushed.entries()) {
      const got = Buffer.alloc(data.length);
      await view.read(got, i * 256 * 1024);
      expect(got.equals(data), `flushed write ${i} reads back`).toBe(true);
    }
    expect(flushed.length).toBeGreaterThan(5);
  });
});

describeOracle('read-only storage', () => {
  const t = tempDir();
  let ro: string | null = null;
  beforeAll(() => {
    qemuImg('create', '-q', '-f', 'qcow2', t.path('base.qcow2'), '16M');
    qemuImg('create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', t.path('img.qcow2'));
    qemuIo(t.path('img.qcow2'), ['write -P 0x12 0 1M']);
    const dir = mkdtempSync(join(tmpdir(), 'strata-ro-'));
    const a = spawnSync('mount', ['--bind', t.dir, dir]);
    const b = a.status === 0 ? spawnSync('mount', ['-o', 'remount,bind,ro', dir]) : a;
    if (b.status === 0) ro = dir;
    else { unmount(dir); noMount('make a read-only bind mount'); }
  });
  afterAll(() => { if (ro) unmount(ro); t.cleanup(); });

  it('write commands say the file system is read-only; read commands work', async (ctx) => {
    if (!ro) return ctx.skip();
    const img = join(ro, 'img.qcow2');
    const before = fileHash(t.path('img.qcow2'));
    for (const argv of [['io', '-c', 'write 0 4k', img], ['commit', img], ['rebase', '-b', '', img], ['snapshot', '-c', 's', img], ['resize', img, '+1M'], ['check', '-r', 'all', img], ['create', '-f', 'qcow2', join(ro, 'new.qcow2'), '1M']]) {
      const r = await strata(...argv);
      expect(r.code, argv.join(' ')).not.toBe(0);
      expect(r.err.trim().split('\n'), argv.join(' ')).toHaveLength(1);
      expect(r.err, argv.join(' ')).toContain('read-only');
    }
    expect((await strata('info', img)).code).toBe(0);
    expect((await strata('map', '--output=json', img)).code).toBe(0);
    const out = t.path('copy.raw');
    expect((await strata('convert', '-O', 'raw', img, out)).code).toBe(0);
    expect(guestHash(out)).toBe(guestHash(t.path('img.qcow2')));
    expect(fileHash(t.path('img.qcow2'))).toBe(before);
  });
});

describeOracle('a 64 GiB raw file with 10 MiB of data', () => {
  const t = tempDir();
  beforeAll(() => {
    const path = t.path('big.raw');
    writeFileSync(path, Buffer.alloc(0));
    truncateSync(path, 64 * 1024 * MiB);
    const fd = openSync(path, 'r+');
    const chunk = Buffer.alloc(MiB, 0x77);
    for (const gib of [0, 7, 31, 63]) for (let k = 0; k < 2; k++) writeSync(fd, chunk, 0, MiB, gib * 1024 * MiB + k * MiB + 12345);
    writeSync(fd, Buffer.alloc(2 * MiB, 0x78), 0, 2 * MiB, 40 * 1024 * MiB);
    closeSync(fd);
  });
  afterAll(() => t.cleanup());

  it('map equals qemu-img map, and convert reads only the data (holes are skipped, not read)', async () => {
    const path = t.path('big.raw');
    const r = await strata('map', '-f', 'raw', '--output=json', path);
    expect(r.code).toBe(0);
    expect(r.out).toBe(qemuImg('map', '-f', 'raw', '--output=json', path));
    const src = await openImage(path, { format: 'raw' });
    try {
      const out = t.path('out.qcow2');
      const res = await convert({}, src, out, { format: 'qcow2' });
      // 10 MiB of data in (at most) 2 MiB windows: a few windows per run, never the 64 GiB.
      expect(res.bytesRead).toBeLessThan(40 * MiB);
      expect(allocatedBytes(out)).toBeLessThan(20 * MiB);
      expect(spawnSync('qemu-img', ['compare', '-f', 'raw', '-F', 'qcow2', path, out]).status).toBe(0);
    } finally {
      await closeChain(src);
    }
    const raw = t.path('out.raw');
    expect((await strata('convert', '-f', 'raw', '-O', 'raw', path, raw)).code).toBe(0);
    expect(allocatedBytes(raw)).toBeLessThan(20 * MiB);
  });
});

describe('quota file helper', () => {
  it('fails writes that grow past the quota with ENOSPC', async () => {
    const f = new QuotaFile(Buffer.alloc(100), 200);
    await f.write(Buffer.alloc(50), 100);
    await expect(f.write(Buffer.alloc(51), 150)).rejects.toMatchObject({ code: 'ENOSPC' });
  });
});
