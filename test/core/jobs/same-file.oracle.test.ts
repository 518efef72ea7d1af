// No job writes into an image it reads: a target that is the source or any image of its
// backing chain, under any name (the same path, a symlink, a hard link, another spelling), is
// refused before anything is written. qemu-img convert -U SRC SRC empties SRC; strata does not.
import { linkSync, mkdirSync, symlinkSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeEach, expect, it } from 'vitest';
import { describeOracle, qemuImg, qemuIo, tempDir } from '../../oracle/qemu';
import { fileHash, strata } from './helpers';

describeOracle('a job target that is one of its source images is refused', () => {
  const t = tempDir('strata-same-file-');
  afterAll(() => t.cleanup());
  let n = 0;
  let dir = '';
  let base = '';
  let top = '';
  const hashes = () => [fileHash(base), fileHash(top)];

  beforeEach(() => {
    dir = t.path(`case${n++}`);
    mkdirSync(dir);
    base = join(dir, 'base.qcow2');
    top = join(dir, 'top.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', base, '4M');
    qemuIo(base, ['write -P 0x11 0 2M']);
    qemuImg('create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', top);
    qemuIo(top, ['write -P 0x22 1M 64k']);
  });

  const names: [string, () => string][] = [
    ['the same name', () => top],
    ['another spelling of the path', () => join(dir, '.', '..', dir.split('/').pop()!, 'top.qcow2')],
    ['a symlink', () => { const l = join(dir, 'link.qcow2'); symlinkSync('top.qcow2', l); return l; }],
    ['a hard link', () => { const l = join(dir, 'hard.qcow2'); linkSync(top, l); return l; }],
  ];
  for (const [what, name] of names) {
    it(`convert -U -O qcow2 SRC SRC (${what}): exit 1, one line, SRC byte for byte unchanged`, async () => {
      const target = name();
      const before = hashes();
      const r = await strata('convert', '-U', '-O', 'qcow2', top, target);
      expect(r.code).toBe(1);
      expect(r.err).toMatch(/is the source image/);
      expect(r.err.trim().split('\n')).toHaveLength(1);
      expect(hashes()).toEqual(before);
    });
  }

  it('convert into an image of the source\'s backing chain (a hard link to the base), also with -n', async () => {
    const target = join(dir, 'base-link.qcow2');
    linkSync(base, target);
    const before = hashes();
    for (const args of [['-U', '-O', 'raw'], ['-U', '-n', '-O', 'qcow2']]) {
      const r = await strata('convert', ...args, top, target);
      expect(r.code).toBe(1);
      expect(r.err).toMatch(/in the source's backing chain/);
    }
    expect(hashes()).toEqual(before);
  });

  it('mirror SRC onto SRC (a symlink) or onto its base: refused, unchanged', async () => {
    const link = join(dir, 'link.qcow2');
    symlinkSync('top.qcow2', link);
    const before = hashes();
    for (const target of [link, base]) {
      const r = await strata('mirror', '-U', top, target);
      expect(r.code).toBe(1);
      expect(r.err).toMatch(/mirror: the target/);
    }
    expect(hashes()).toEqual(before);
  });

  it('rebase onto a hard link of the overlay, or onto an image whose chain holds the overlay: refused, unchanged', async () => {
    const hard = join(dir, 'hard.qcow2');
    linkSync(top, hard);
    const above = join(dir, 'above.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', '-b', 'top.qcow2', '-F', 'qcow2', above);
    const before = hashes();
    const own = await strata('rebase', '-b', 'hard.qcow2', '-F', 'qcow2', top);
    expect(own.code).not.toBe(0);
    expect(own.err).toMatch(/its own backing file/);
    const loop = await strata('rebase', '-b', 'above.qcow2', '-F', 'qcow2', top);
    expect(loop.code).toBe(1);
    expect(loop.err).toMatch(/loop/);
    expect(hashes()).toEqual(before);
  });

  it('a backing chain that loops through a hard link is refused at once (not opened 1000 times)', async () => {
    const a = join(dir, 'a.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', a, '4M');
    linkSync(a, join(dir, 'b.qcow2'));
    // a's backing file is b, the same file under another name.
    qemuImg('rebase', '-u', '-b', 'b.qcow2', '-F', 'qcow2', a);
    const t0 = performance.now();
    const r = await strata('info', '--backing-chain', a);
    expect(r.code).toBe(1);
    expect(r.err).toMatch(/backing chain loop/);
    expect(performance.now() - t0).toBeLessThan(2000);
  });

  it('create -b naming (a hard link of) the image being created is refused, the file unchanged', async () => {
    const hard = join(dir, 'hard.qcow2');
    linkSync(top, hard);
    const before = hashes();
    const r = await strata('create', '-f', 'qcow2', '-b', 'hard.qcow2', '-F', 'qcow2', top, '4M');
    expect(r.code).not.toBe(0);
    expect(r.err).toMatch(/is the image being created/);
    expect(hashes()).toEqual(before);
  });
});
