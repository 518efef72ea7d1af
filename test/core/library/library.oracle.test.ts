// The library on folders built with qemu-img: the graph, the flags and problems of each image,
// repairs that work, odd entries that never hang the scan, and rescan equal to a full scan.
import { execFileSync, spawnSync } from 'node:child_process';
import { chmodSync, mkdirSync, renameSync, rmSync, symlinkSync, utimesSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { describeOracle, qemuImg, qemuIo, tempDir } from '../../oracle/qemu';
import { startHolder } from '../../oracle/holders';
import { Library } from '../../../core/library/library';
import { treeJson, treeText } from '../../../core/library/tree-output';
import type { LibraryImage, LibrarySnapshot } from '../../../core/library/types';
import { strata } from '../jobs/helpers';
import { ensureBuilt, repoRoot } from '../../cli/run-cli';

function byName(snap: LibrarySnapshot, dir: string): Map<string, LibraryImage> {
  return new Map(snap.images.map((i) => [i.path.startsWith(dir + '/') ? i.path.slice(dir.length + 1) : i.path, i]));
}

/** The graph in a form two scans can be compared by: names, edges, problems, flags. */
function shape(snap: LibrarySnapshot): unknown {
  const byReal = new Map(snap.images.map((i) => [i.realPath, i.path]));
  return {
    images: snap.images.map((i) => ({
      path: i.path, format: i.format, size: i.virtualSize, backing: i.backing && byReal.get(i.backing), children: i.children.map((c) => byReal.get(c)),
      problems: i.problems.map((p) => p.code), fixes: i.fixes.map((f) => f.command.join(' ')), external: i.external, snapshots: i.snapshots, bitmaps: i.bitmaps,
    })),
    roots: snap.treeRoots.map((r) => byReal.get(r)),
    summary: { ...snap.summary, totalActualSize: 0 },
  };
}

describeOracle('library scan', () => {
  const t = tempDir('strata-lib-');
  const d = (n: string) => join(t.dir, 'pool', n);
  const elsewhere = join(t.dir, 'elsewhere');
  beforeAll(() => {
    mkdirSync(join(t.dir, 'pool', 'nested'), { recursive: true });
    mkdirSync(elsewhere);
    // A base with two overlays; one of them goes on to a three-deep chain.
    qemuImg('create', '-q', '-f', 'qcow2', d('base.qcow2'), '64M');
    qemuIo(d('base.qcow2'), ['write -P 1 0 1M']);
    qemuImg('create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', d('vm1.qcow2'));
    qemuImg('create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', d('vm2.qcow2'));
    qemuImg('create', '-q', '-f', 'qcow2', '-b', '../vm2.qcow2', '-F', 'qcow2', d('nested/vm2-top.qcow2'));
    qemuImg('snapshot', '-c', 'first', d('vm1.qcow2'));
    qemuImg('bitmap', '--add', d('vm2.qcow2'), 'b0');
    // A backing file outside the folder (followed, marked external).
    qemuImg('create', '-q', '-f', 'raw', join(elsewhere, 'golden.raw'), '32M');
    qemuImg('create', '-q', '-f', 'qcow2', '-b', join(elsewhere, 'golden.raw'), '-F', 'raw', d('from-golden.qcow2'));
    // An overlay whose backing file was moved into another folder of the pool.
    qemuImg('create', '-q', '-f', 'qcow2', d('moved-base.qcow2'), '48M');
    qemuImg('create', '-q', '-f', 'qcow2', '-b', 'moved-base.qcow2', '-F', 'qcow2', d('orphan.qcow2'));
    mkdirSync(d('archive'));
    renameSync(d('moved-base.qcow2'), d('archive/moved-base.qcow2'));
    // A loop, an unspecified backing format, a damaged header.
    qemuImg('create', '-q', '-f', 'qcow2', '-u', '-b', 'loop-b.qcow2', '-F', 'qcow2', d('loop-a.qcow2'), '1M');
    qemuImg('create', '-q', '-f', 'qcow2', '-u', '-b', 'loop-a.qcow2', '-F', 'qcow2', d('loop-b.qcow2'), '1M');
    qemuImg('create', '-q', '-f', 'qcow2', d('plain-base.qcow2'), '16M');
    qemuImg('create', '-q', '-f', 'qcow2', '-b', 'plain-base.qcow2', '-F', 'qcow2', d('nofmt.qcow2'));
    // qemu-img 7.2 refuses to record no format; the old way (as older images have it) by hand:
    stripBackingFormat(d('nofmt.qcow2'));
    writeFileSync(d('broken.qcow2'), Buffer.from('QFI\xfbgarbage-but-short', 'latin1'));
    // Strangers: an ISO, a text file, a FIFO, a symlink loop, an unreadable image.
    writeFileSync(d('install.iso'), Buffer.alloc(64 * 1024, 7));
    writeFileSync(d('notes.txt'), 'not an image\n');
    execFileSync('mkfifo', [d('pipe.img')]);
    symlinkSync('..', d('nested/up'));
    qemuImg('create', '-q', '-f', 'raw', d('data.img'), '8M');
  });
  afterAll(() => t.cleanup());

  it('builds the graph: shared base, three-deep chain, external backing file, flags', async () => {
    const start = Date.now();
    const snap = await new Library([join(t.dir, 'pool')]).scan();
    expect(Date.now() - start, 'the FIFO is never opened').toBeLessThan(5000);
    const m = byName(snap, join(t.dir, 'pool'));
    const real = (n: string) => m.get(n)!.realPath;
    expect(m.get('base.qcow2')!.children).toEqual([real('vm1.qcow2'), real('vm2.qcow2')]);
    expect(m.get('vm2.qcow2')!.children).toEqual([real('nested/vm2-top.qcow2')]);
    expect(m.get('nested/vm2-top.qcow2')!.backing).toBe(real('vm2.qcow2'));
    expect(m.get('nested/vm2-top.qcow2')!.backingRelative).toBe(true);
    expect(m.get('vm1.qcow2')!.snapshots).toBe(1);
    expect(m.get('vm2.qcow2')!.bitmaps).toBe(1);
    const golden = m.get(join(elsewhere, 'golden.raw'))!;
    expect(golden).toMatchObject({ format: 'raw', external: true, virtualSize: 32 << 20 });
    expect(m.get('from-golden.qcow2')!.backingRelative).toBe(false);
    expect(m.get('data.img')).toMatchObject({ format: 'raw', backingName: null, children: [] });
    for (const n of ['install.iso', 'notes.txt', 'pipe.img', 'nested/up/base.qcow2']) expect(m.has(n), n).toBe(false);
    expect(m.get('base.qcow2')!.problems).toEqual([]);
    expect(m.get('vm1.qcow2')!.problems).toEqual([]);
    expect(m.get('broken.qcow2')!.problems.map((p) => p.code)).toEqual(['damaged']);
    expect(m.get('loop-a.qcow2')!.problems.map((p) => p.code)).toEqual(['backing-loop']);
    expect(m.get('loop-b.qcow2')!.problems.map((p) => p.code)).toEqual(['backing-loop']);
    expect(m.get('nofmt.qcow2')!.problems.map((p) => p.code)).toEqual(['backing-format-unspecified']);
    expect(m.get('nofmt.qcow2')!.fixes.map((f) => f.command)).toEqual([['strata', 'rebase', '-u', '-b', 'plain-base.qcow2', '-F', 'qcow2', d('nofmt.qcow2')]]);
    expect(m.get('orphan.qcow2')!.problems.map((p) => p.code)).toEqual(['backing-missing']);
    expect(snap.treeRoots.map((r) => snap.images.find((i) => i.realPath === r)!.path).sort()).toEqual(
      ['base.qcow2', 'broken.qcow2', 'archive/moved-base.qcow2', 'data.img', 'loop-a.qcow2', 'loop-b.qcow2', 'orphan.qcow2', 'plain-base.qcow2', join(elsewhere, 'golden.raw')]
        .map((n) => (n.startsWith('/') ? n : d(n))).sort());
    expect(snap.summary).toMatchObject({ images: 14, bases: 3, sharedBases: 1, overlays: 8, standalone: 3, withProblems: 5, inUse: 0 });
  });

  it('finds the moved backing file as a candidate; the suggested command repairs the overlay', async () => {
    const dir = join(t.dir, 'repair');
    mkdirSync(join(dir, 'archive'), { recursive: true });
    qemuImg('create', '-q', '-f', 'qcow2', join(dir, 'moved-base.qcow2'), '48M');
    qemuImg('create', '-q', '-f', 'qcow2', join(dir, 'same-size.qcow2'), '48M');
    qemuImg('create', '-q', '-f', 'qcow2', '-b', 'moved-base.qcow2', '-F', 'qcow2', join(dir, 'orphan.qcow2'));
    renameSync(join(dir, 'moved-base.qcow2'), join(dir, 'archive/moved-base.qcow2'));
    const snap = await new Library([dir]).scan();
    const orphan = byName(snap, dir).get('orphan.qcow2')!;
    expect(orphan.problems.map((p) => p.code)).toEqual(['backing-missing']);
    // Same name and size first, then same size and format.
    expect(orphan.candidates.map((c) => [c.path, c.reason])).toEqual([
      [join(dir, 'archive/moved-base.qcow2'), 'same name and size (48 MiB)'],
      [join(dir, 'same-size.qcow2'), 'same size (48 MiB) and format'],
    ]);
    const fix = orphan.fixes[0]!;
    expect(fix.command).toEqual(['strata', 'rebase', '-u', '-b', 'archive/moved-base.qcow2', '-F', 'qcow2', join(dir, 'orphan.qcow2')]);
    const r = await strata(...fix.command.slice(1));
    expect(r.code, r.err).toBe(0);
    const chain = JSON.parse(qemuImg('info', '--backing-chain', '--output=json', join(dir, 'orphan.qcow2'))) as { filename: string }[];
    expect(chain.map((c) => c.filename)).toEqual([join(dir, 'orphan.qcow2'), join(dir, 'archive/moved-base.qcow2')]);
    const after = byName(await new Library([dir]).scan(), dir);
    expect(after.get('orphan.qcow2')!.problems).toEqual([]);
    expect(after.get('orphan.qcow2')!.backing).toBe(after.get('archive/moved-base.qcow2')!.realPath);
  });

  it('names the process that holds an image (qemu-nbd) and flags it in use', async () => {
    const holder = await startHolder('qemu-nbd', d('vm1.qcow2'), join(t.dir, 'nbd.sock'));
    try {
      const snap = await new Library([join(t.dir, 'pool')]).scan();
      const m = byName(snap, join(t.dir, 'pool'));
      const vm1 = m.get('vm1.qcow2')!;
      expect(vm1.inUse).toEqual({ pid: holder.pid, program: 'qemu-nbd', vm: null });
      expect(vm1.problems.map((p) => p.code)).toEqual(['in-use']);
      expect(vm1.problems[0]!.message).toContain(`PID ${holder.pid} (qemu-nbd)`);
      // Its base is held too (QEMU opens backing files read-only, with locks).
      expect(m.get('base.qcow2')!.inUse?.pid).toBe(holder.pid);
      expect(m.get('vm2.qcow2')!.inUse).toBeNull();
      const json = treeJson(snap).find((j) => j.filename === d('vm1.qcow2'))!;
      expect(json['in-use']).toEqual({ pid: holder.pid, program: 'qemu-nbd', vm: null });
    } finally {
      await holder.stop();
    }
  });

  it('flags an overlay whose backing file changed after it was made, not an emptied one', async () => {
    const dir = join(t.dir, 'changed');
    mkdirSync(dir);
    qemuImg('create', '-q', '-f', 'qcow2', join(dir, 'b.qcow2'), '4M');
    qemuImg('create', '-q', '-f', 'qcow2', '-b', 'b.qcow2', '-F', 'qcow2', join(dir, 'with-data.qcow2'));
    qemuIo(join(dir, 'with-data.qcow2'), ['write -P 3 0 64k']);
    qemuImg('create', '-q', '-f', 'qcow2', '-b', 'b.qcow2', '-F', 'qcow2', join(dir, 'empty.qcow2'));
    let snap = await new Library([dir]).scan();
    expect(snap.images.flatMap((i) => i.problems)).toEqual([]);
    const later = new Date(Date.now() + 3600_000);
    utimesSync(join(dir, 'b.qcow2'), later, later);
    snap = await new Library([dir]).scan();
    const m = byName(snap, dir);
    expect(m.get('with-data.qcow2')!.problems.map((p) => p.code)).toEqual(['backing-changed']);
    expect(m.get('empty.qcow2')!.problems).toEqual([]);
  });

  it('reports an image it may not read and goes on', async () => {
    const dir = join(t.dir, 'perm');
    mkdirSync(dir);
    qemuImg('create', '-q', '-f', 'qcow2', join(dir, 'open.qcow2'), '1M');
    qemuImg('create', '-q', '-f', 'qcow2', join(dir, 'secret.qcow2'), '1M');
    chmodSync(join(dir, 'secret.qcow2'), 0);
    chmodSync(t.dir, 0o755);
    let json: { filename: string; problems: string[] }[];
    if (process.getuid?.() === 0) {
      // Root reads everything: the built command runs as nobody for this check.
      ensureBuilt();
      const r = spawnSync('setpriv', ['--reuid=65534', '--regid=65534', '--clear-groups', process.execPath, join(repoRoot, 'bin/strata.cjs'), 'tree', '--output=json', dir], { encoding: 'utf8' });
      expect(r.status, r.stderr).toBe(0);
      json = JSON.parse(r.stdout);
    } else {
      const r = await strata('tree', '--output=json', dir);
      expect(r.code, r.err).toBe(0);
      json = JSON.parse(r.out);
    }
    expect(json.map((j) => [j.filename, j.problems])).toEqual([[join(dir, 'open.qcow2'), []], [join(dir, 'secret.qcow2'), ['unreadable']]]);
  });

  it('rescan after adding, removing and rebasing images equals a full scan', async () => {
    const dir = join(t.dir, 'rescan');
    mkdirSync(dir);
    qemuImg('create', '-q', '-f', 'qcow2', join(dir, 'a.qcow2'), '8M');
    qemuImg('create', '-q', '-f', 'qcow2', '-b', 'a.qcow2', '-F', 'qcow2', join(dir, 'b.qcow2'));
    qemuImg('create', '-q', '-f', 'qcow2', '-b', 'b.qcow2', '-F', 'qcow2', join(dir, 'c.qcow2'));
    qemuImg('create', '-q', '-f', 'raw', join(dir, 'blob'), '8M');
    const lib = new Library([dir]);
    await lib.scan();
    // Add an overlay, remove the middle of the chain, rebase the top onto a raw file the walk
    // alone would not take (no raw extension).
    qemuImg('create', '-q', '-f', 'qcow2', '-b', 'a.qcow2', '-F', 'qcow2', join(dir, 'd.qcow2'));
    let inc = await lib.rescan([join(dir, 'd.qcow2')]);
    expect(shape(inc)).toEqual(shape(await new Library([dir]).scan()));
    rmSync(join(dir, 'b.qcow2'));
    inc = await lib.rescan([join(dir, 'b.qcow2')]);
    expect(shape(inc)).toEqual(shape(await new Library([dir]).scan()));
    expect(byName(inc, dir).get('c.qcow2')!.problems.map((p) => p.code)).toEqual(['backing-missing']);
    execFileSync('qemu-img', ['rebase', '-u', '-b', 'blob', '-F', 'raw', join(dir, 'c.qcow2')]);
    inc = await lib.rescan([join(dir, 'c.qcow2')]);
    const full = await new Library([dir]).scan();
    expect(shape(inc)).toEqual(shape(full));
    expect(byName(inc, dir).get('blob')).toMatchObject({ format: 'raw', external: false });
    expect(byName(inc, dir).get('c.qcow2')!.problems).toEqual([]);
    // And back: the raw file is no image once nothing names it.
    execFileSync('qemu-img', ['rebase', '-u', '-b', 'a.qcow2', '-F', 'qcow2', join(dir, 'c.qcow2')]);
    inc = await lib.rescan([join(dir, 'c.qcow2')]);
    expect(shape(inc)).toEqual(shape(await new Library([dir]).scan()));
    expect(byName(inc, dir).has('blob')).toBe(false);
    // A whole new folder.
    mkdirSync(join(dir, 'more'));
    qemuImg('create', '-q', '-f', 'qcow2', '-b', '../a.qcow2', '-F', 'qcow2', join(dir, 'more', 'e.qcow2'));
    inc = await lib.rescan([join(dir, 'more')]);
    expect(shape(inc)).toEqual(shape(await new Library([dir]).scan()));
    expect(byName(inc, dir).get('a.qcow2')!.children).toHaveLength(3);
  });

  it('strata tree prints the chains and exits 0 whatever it finds', async () => {
    const r = await strata('tree', join(t.dir, 'pool'));
    expect(r.code).toBe(0);
    const lines = r.out.split('\n');
    // The base, its two overlays and the chain below the second, in this order.
    const at = lines.findIndex((l) => l.startsWith('base.qcow2  '));
    expect(lines[at]).toMatch(/^base\.qcow2 {2}qcow2, 64 MiB, .*shared by 2 overlays$/);
    expect(lines[at + 1]).toMatch(/^├── vm1\.qcow2 {2}qcow2, 64 MiB, .*1 snapshot$/);
    expect(lines[at + 2]).toMatch(/^└── vm2\.qcow2 {2}qcow2, 64 MiB, .*1 bitmap$/);
    expect(lines[at + 3]).toMatch(/^ {4}└── nested\/vm2-top\.qcow2 {2}qcow2, 64 MiB/);
    expect(lines.find((l) => l.startsWith('loop-a.qcow2'))).toContain('[backing-loop]');
    const orphan = lines.findIndex((l) => l.startsWith('orphan.qcow2'));
    expect(lines[orphan]).toContain('[backing-missing]');
    expect(lines[orphan + 1]).toContain(`backing-missing: backing file ${d('moved-base.qcow2')} does not exist`);
    expect(lines[orphan + 2]).toBe(`    fix: strata rebase -u -b archive/moved-base.qcow2 -F qcow2 ${d('orphan.qcow2')}`);
    expect(r.out).toMatch(/\n14 images, 3 bases \(1 shared\), 8 overlays, 3 standalone, 5 with problems, 0 in use, .* on disk\n$/);
    const j = await strata('tree', '--output=json', join(t.dir, 'pool'));
    expect(j.code).toBe(0);
    const images = JSON.parse(j.out) as Record<string, unknown>[];
    const base = images.find((i) => i.filename === d('base.qcow2'))!;
    expect(base).toMatchObject({ format: 'qcow2', 'virtual-size': 64 << 20, children: [d('vm1.qcow2'), d('vm2.qcow2')], snapshots: 0, 'in-use': null, problems: [], fixes: [] });
    const top = images.find((i) => i.filename === d('nested/vm2-top.qcow2'))!;
    expect(top).toMatchObject({ 'backing-filename': '../vm2.qcow2', 'full-backing-filename': `${t.dir}/pool/nested/../vm2.qcow2`, 'backing-filename-format': 'qcow2' });
    expect(treeText(await new Library([join(t.dir, 'pool')]).scan())).toBe(r.out);
    const bad = await strata('tree');
    expect(bad.code).toBe(2);
  });
});

/** Drops the backing-format header extension, as images made by old tools lack it. */
function stripBackingFormat(path: string): void {
  // qemu-img amend cannot remove it; rewrite the extension's type to "end" by hand.
  const fd = execFileSync('python3', ['-c', `
import struct,sys
f=open(sys.argv[1],'r+b'); h=f.read(4096)
off=struct.unpack('>I',h[100:104])[0] if struct.unpack('>I',h[4:8])[0]==3 else 72
while off+8<=len(h):
    t,l=struct.unpack('>II',h[off:off+8])
    if t==0: break
    if t==0xe2792aca:
        f.seek(off); f.write(b'\\x00'*8); break
    off+=8+((l+7)&~7)
f.close()
`, path]);
  void fd;
}
