// compact: an image rewritten with only its live data, in place. On a fully allocated image with
// 30% live data, on an overlay, on a compressed image and on one with persistent bitmaps, the
// result passes qemu-img check, compares equal to the original, keeps its options, backing name
// and format and bitmaps (flags, granularity, and what they mark, read through qemu-nbd), and is
// as small as the plan said. Mode, owner and extended attributes stay. Images with internal
// snapshots are refused untouched. Raw images get their zero blocks punched out. SIGKILLed at
// random moments, the original is intact or fully compacted, and the next run leaves no
// temporary file behind.
import { execFileSync, spawn, spawnSync } from 'node:child_process';
import { chmodSync, chownSync, closeSync, cpSync, existsSync, lstatSync, mkdirSync, openSync, readdirSync, rmSync, statSync, symlinkSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { describeOracle, qemuImg, qemuIo, tempDir } from '../../oracle/qemu';
import { ensureBuilt, repoRoot, strata } from '../../cli/run-cli';
import { allocatedBytes, expectClean, expectSameContent, fileHash, guestHash, MiB, qemuInfo, rng } from './helpers';
import { native } from '../../../core/io/native';
import { planJob } from '../../../core/jobs/plan';
import { runJob } from '../../../core/jobs/operations';
import type { JobPlan } from '../../../core/jobs/plan-kit';

const CS = 64 * 1024;

/** qemu-img info's options that compaction must keep. */
function options(file: string): Record<string, unknown> {
  const i = qemuInfo(file);
  const d = { ...(i['format-specific']?.data ?? {}) };
  delete d.bitmaps;
  return { 'virtual-size': i['virtual-size'], 'cluster-size': i['cluster-size'], 'backing-filename': i['backing-filename'], 'backing-filename-format': i['backing-filename-format'], ...d };
}

function leftovers(dir: string): string[] {
  return readdirSync(dir).filter((n) => n.includes('.strata-compact-'));
}

/** Compacts `file` through runJob after checking the plan; returns the plan and what the run reported. */
async function compactChecked(file: string, compress = false): Promise<{ plan: JobPlan; before: string; after: number }> {
  const copy = `${file}.orig`;
  execFileSync('cp', ['--sparse=always', file, copy]);
  const opts = options(file);
  const plan = await planJob({ op: 'compact', image: file, compress });
  const r = await runJob({}, { op: 'compact', image: file, compress });
  expect(r.plan.expectedSize).toEqual(plan.expectedSize);
  expectClean(file);
  expectSameContent(copy, file);
  expect(options(file)).toEqual(opts);
  expect(leftovers(join(file, '..'))).toEqual([]);
  const before = fileHash(copy);
  rmSync(copy);
  return { plan, before, after: statSync(file).size };
}

describeOracle('compact', () => {
  const t = tempDir('strata-compact-');
  afterAll(() => t.cleanup());
  const report: string[] = [];
  afterAll(() => console.log(`[compact] sizes (allocated before -> after; the plan's expected after):\n  ${report.join('\n  ')}`));

  it('a fully allocated image with 30% live data: as small as the plan said, same content and options', async () => {
    const f = t.path('full.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', '-o', 'lazy_refcounts=on,refcount_bits=8,compression_type=zstd', f, '64M');
    // Every cluster written, then 70% zeroed in place (the clusters stay allocated).
    qemuIo(f, ['write -P 0x51 0 64M', 'write -z 0 20M', 'write -z 30M 24M']);
    const before = allocatedBytes(f);
    const { plan, after } = await compactChecked(f);
    report.push(`30% live: ${before} -> ${allocatedBytes(f)} (file ${after}); plan ${plan.expectedSize!.before} -> ${plan.expectedSize!.after}`);
    expect(plan.expectedSize!.before).toBe(before);
    expect(Math.abs(Math.ceil(after / CS) * CS - plan.expectedSize!.after)).toBeLessThanOrEqual(CS);
    expect(allocatedBytes(f)).toBeLessThan(0.35 * before);
  });

  it('zeros written as data are dropped as well (the plan\'s size is then an upper bound)', async () => {
    const f = t.path('zerodata.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=128k,extended_l2=on', f, '64M');
    qemuIo(f, ['write -P 0x52 0 64M', 'write -P 0 4M 40M', 'write -P 0 50M 17k']);
    const before = allocatedBytes(f);
    const { plan } = await compactChecked(f);
    report.push(`zeros as data (128k extended L2): ${before} -> ${allocatedBytes(f)}; plan after ${plan.expectedSize!.after}`);
    expect(allocatedBytes(f)).toBeLessThan(plan.expectedSize!.after - 30 * MiB);
  });

  it('an overlay: the backing name exactly as recorded and its format; only what differs from the backing file kept', async () => {
    const base = t.path('ob.qcow2');
    const top = t.path('ot.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', base, '64M');
    qemuIo(base, ['write -P 0x61 0 32M']);
    qemuImg('create', '-q', '-f', 'qcow2', '-b', './ob.qcow2', '-F', 'qcow2', top);
    // Data of its own, zeros over the base's data (must stay), zeros over nothing, and data
    // that is the base's own again (not needed).
    qemuIo(top, ['write -P 0x62 40M 8M', 'write -z 2M 2M', 'write -z 50M 1M', 'write -P 0x61 8M 4M', 'write -P 0x63 0 64M', 'write -P 0x61 0 20M', 'write -z 20M 12M']);
    const chainBefore = guestHash(top);
    const before = allocatedBytes(top);
    const { plan, after } = await compactChecked(top);
    report.push(`overlay: ${before} -> ${allocatedBytes(top)}; plan after ${plan.expectedSize!.after}`);
    expect(qemuInfo(top)['backing-filename']).toBe('./ob.qcow2');
    expect(qemuInfo(top)['backing-filename-format']).toBe('qcow2');
    expect(guestHash(top)).toBe(chainBefore);
    // What remains of the top: its data at 32-64M and its zeros over the base's data at 20-32M;
    // 0-20M was the base's own again.
    const map = JSON.parse(qemuImg('map', '--output=json', top)) as { start: number; length: number; depth: number; data: boolean; zero: boolean }[];
    expect(map.filter((e) => e.depth === 0).map((e) => [e.start, e.length, e.data, e.zero])).toEqual([[20 * MiB, 12 * MiB, false, true], [32 * MiB, 32 * MiB, true, false]]);
    expect(after).toBeLessThan(before);
  });

  it('a compressed image: compressed clusters stay compressed as stored; the freed space is gone', async () => {
    const src = t.path('csrc.qcow2');
    const f = t.path('comp.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', src, '64M');
    // Compressible data: runs of a few byte values.
    const pattern = t.path('pattern.bin');
    const buf = Buffer.alloc(8 * MiB);
    const r = rng(5);
    for (let i = 0; i < buf.length;) { const n = Math.min(buf.length - i, 1 + Math.floor(r() * 16)); buf.fill(0x41 + Math.floor(r() * 8), i, i + n); i += n; }
    const fd = openSync(pattern, 'w');
    writeSync(fd, buf);
    closeSync(fd);
    for (let k = 0; k < 6; k++) qemuIo(src, [`write -s ${pattern} ${k * 8}M 8M`]);
    qemuImg('convert', '-c', '-O', 'qcow2', src, f);
    // Rewrite a third of it: the compressed clusters there are freed (holes in the file).
    qemuIo(f, ['write -P 0x71 8M 8M', 'write -z 24M 8M']);
    const compressedBefore = Number(JSON.parse(qemuImg('check', '--output=json', f))['compressed-clusters']);
    const before = allocatedBytes(f);
    const sizeBefore = statSync(f).size;
    const { plan, after } = await compactChecked(f);
    const check = JSON.parse(qemuImg('check', '--output=json', f)) as Record<string, number>;
    report.push(`compressed: ${before} (file ${sizeBefore}) -> ${allocatedBytes(f)} (file ${after}); plan after ${plan.expectedSize!.after}; compressed clusters ${compressedBefore} -> ${check['compressed-clusters']}`);
    expect(check['compressed-clusters']).toBe(compressedBefore);
    expect(after).toBeLessThan(sizeBefore - 2 * MiB);
    expect(Math.abs(Math.ceil(after / CS) * CS - plan.expectedSize!.after)).toBeLessThanOrEqual(2 * CS);
    // Compacting again gains nothing, and loses at most the sector a last compressed cluster
    // may now be stored with (its stored bytes end at a sector's end); a third time is the same.
    await runJob({}, { op: 'compact', image: f });
    const second = statSync(f).size;
    expect(second).toBeLessThanOrEqual(after + 512);
    await runJob({}, { op: 'compact', image: f });
    expect(statSync(f).size).toBe(second);
    expectClean(f);
  });

  it('-c compresses the data clusters', async () => {
    const f = t.path('tocomp.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', f, '64M');
    qemuIo(f, ['write -P 0x72 0 16M']);
    const before = allocatedBytes(f);
    await compactChecked(f, true);
    expect(Number(JSON.parse(qemuImg('check', '--output=json', f))['compressed-clusters'])).toBe(256);
    expect(allocatedBytes(f)).toBeLessThan(before / 4);
  });

  it('persistent bitmaps: the same names, flags and granularity, marking the same ranges (read through qemu-nbd)', async () => {
    const f = t.path('bm.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', f, '64M');
    qemuImg('bitmap', '--add', f, 'b0');
    qemuImg('bitmap', '--add', '-g', '128k', f, 'b1');
    qemuIo(f, ['write -P 0x81 0 64M']);
    qemuImg('bitmap', '--clear', f, 'b0');
    qemuImg('bitmap', '--clear', f, 'b1');
    qemuIo(f, ['write -P 0x82 1M 3M', 'write -z 10M 30M', 'write -P 0x83 50M 100k']);
    qemuImg('bitmap', '--disable', f, 'b1');
    qemuIo(f, ['write -P 0x84 60M 1M']); // marked in b0 only
    const bitmapsOf = (file: string) => (qemuInfo(file)['format-specific']!.data as { bitmaps: unknown[] }).bitmaps;
    const bitmaps = bitmapsOf(f);
    expect(bitmaps).toHaveLength(2);
    const dirty = (file: string) => ['b0', 'b1'].map((b) => nbdBitmapMap(file, b));
    const marks = dirty(f);
    const before = allocatedBytes(f);
    const { plan } = await compactChecked(f);
    report.push(`bitmaps: ${before} -> ${allocatedBytes(f)}; plan after ${plan.expectedSize!.after}`);
    expect(bitmapsOf(f)).toEqual(bitmaps);
    expect(dirty(f)).toEqual(marks);
    expect(Math.abs(Math.ceil(statSync(f).size / CS) * CS - plan.expectedSize!.after)).toBeLessThanOrEqual(CS);
    // QEMU can go on using them.
    qemuIo(f, ['write -P 0x85 30M 64k']);
    expectClean(f);
  });

  it('keeps mode, owner and extended attributes', async (ctx) => {
    const n = native();
    if (!n?.setXattr || !n.getXattr || typeof process.getuid !== 'function' || process.getuid() !== 0) return ctx.skip();
    const f = t.path('meta.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', f, '16M');
    qemuIo(f, ['write -P 0x91 0 16M', 'write -z 0 8M']);
    chmodSync(f, 0o640);
    chownSync(f, 1234, 2345);
    const fd = openSync(f, 'r');
    try { n.setXattr(fd, 'user.strata.test', Buffer.from('kept')); } finally { closeSync(fd); }
    const ino = statSync(f).ino;
    await compactChecked(f);
    const st = statSync(f);
    expect(st.ino).not.toBe(ino);
    expect({ mode: st.mode & 0o7777, uid: st.uid, gid: st.gid }).toEqual({ mode: 0o640, uid: 1234, gid: 2345 });
    const fd2 = openSync(f, 'r');
    try { expect(n.getXattr(fd2, 'user.strata.test').toString()).toBe('kept'); } finally { closeSync(fd2); }
  });

  it('through a symbolic link: the file it names is compacted, the link stays a link', async () => {
    mkdirSync(t.path('linked'));
    const f = t.path('linked/real.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', f, '16M');
    qemuIo(f, ['write -P 0x93 0 16M', 'write -z 0 12M']);
    symlinkSync('linked/real.qcow2', t.path('link.qcow2'));
    const before = allocatedBytes(f);
    await compactChecked(t.path('link.qcow2'));
    expect(lstatSync(t.path('link.qcow2')).isSymbolicLink()).toBe(true);
    expect(allocatedBytes(f)).toBeLessThan(before / 2);
    expect(leftovers(t.path('linked'))).toEqual([]);
  });

  it('internal snapshots: refused with a clear message, the image untouched', async () => {
    const f = t.path('snap.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', f, '16M');
    qemuIo(f, ['write -P 0x92 0 4M']);
    qemuImg('snapshot', '-c', 's1', f);
    const h = fileHash(f);
    const r = await strata('compact', f);
    expect(r.code).toBe(2);
    expect(r.err).toMatch(/cannot compact: it has 1 internal snapshot.*snapshot -d/);
    expect(r.err.trim().split('\n')).toHaveLength(1);
    expect(fileHash(f)).toBe(h);
    expect(leftovers(t.dir)).toEqual([]);
  });

  it('raw: blocks of zeros are punched out in place; the content stays', async () => {
    const f = t.path('zeros.raw');
    const fd = openSync(f, 'w');
    try {
      writeSync(fd, Buffer.alloc(16 * MiB, 0), 0, 16 * MiB, 0);
      writeSync(fd, Buffer.alloc(1 * MiB, 0xa1), 0, MiB, 3 * MiB);
      writeSync(fd, Buffer.alloc(5000, 0xa2), 0, 5000, 9 * MiB + 100);
    } finally {
      closeSync(fd);
    }
    const ref = t.path('zeros.ref.raw');
    execFileSync('cp', [f, ref]);
    const before = allocatedBytes(f);
    const r = await strata('compact', f);
    expect({ code: r.code, err: r.err }).toEqual({ code: 0, err: '' });
    expect(spawnSync('cmp', [f, ref]).status).toBe(0);
    report.push(`raw: ${before} -> ${allocatedBytes(f)}`);
    expect(allocatedBytes(f)).toBeLessThanOrEqual(MiB + 4 * 4096);
  });

  describeKills();

  function describeKills(): void {
    const KILLS = 10;
    const proto = t.path('kill-proto');
    beforeAll(() => {
      ensureBuilt();
      mkdirSync(proto);
      const f = join(proto, 'k.qcow2');
      qemuImg('create', '-q', '-f', 'qcow2', f, '48M');
      qemuIo(f, ['write -P 0xb1 0 48M', 'write -z 10M 20M']);
      qemuImg('bitmap', '--add', f, 'kb');
    });

    function run(dir: string, killAfterMs?: number): Promise<{ signal: NodeJS.Signals | null; code: number | null; ms: number; stderr: string }> {
      return new Promise((resolve, reject) => {
        const t0 = Date.now();
        const child = spawn(process.execPath, [join(repoRoot, 'bin', 'strata.cjs'), 'compact', 'k.qcow2'], { cwd: dir, stdio: ['ignore', 'ignore', 'pipe'] });
        let stderr = '';
        child.stderr!.on('data', (d: Buffer) => { stderr += d.toString(); });
        const timer = killAfterMs === undefined ? null : setTimeout(() => child.kill('SIGKILL'), killAfterMs);
        child.on('error', reject);
        child.on('exit', (code, signal) => { if (timer) clearTimeout(timer); resolve({ code, signal, ms: Date.now() - t0, stderr }); });
      });
    }

    it(`SIGKILLed at ${KILLS} random moments: the original intact (or compacted), no temporary file after the next run`, async () => {
      const original = fileHash(join(proto, 'k.qcow2'));
      const content = guestHash(join(proto, 'k.qcow2'));
      const clean = t.path('kill-clean');
      cpSync(proto, clean, { recursive: true });
      const full = await run(clean);
      expect({ code: full.code, stderr: full.stderr }).toEqual({ code: 0, stderr: '' });
      const compacted = fileHash(join(clean, 'k.qcow2'));
      const r = rng(91);
      const log: string[] = [];
      for (let i = 0; i < KILLS; i++) {
        const dir = t.path(`kill-${i}`);
        cpSync(proto, dir, { recursive: true });
        const delay = Math.round(20 + r() * 1.1 * full.ms);
        const o = await run(dir, delay);
        const f = join(dir, 'k.qcow2');
        const h = fileHash(f);
        // Either the original, byte for byte, or the finished copy.
        expect([original, compacted], `kill #${i} after ${delay} ms`).toContain(h);
        const left = leftovers(dir);
        log.push(`${delay}ms:${o.signal ? (h === original ? 'original' : 'compacted') : 'finished'}${left.length ? '+temp' : ''}`);
        // The next run lists a killed run's temporary file, removes it, and compacts.
        if (left.length) {
          const dry = JSON.parse((await strata('compact', '--dry-run', '--output=json', f)).out) as { removes: string[] };
          expect(dry.removes).toEqual(left.map((n) => join(dir, n)));
        }
        const again = await run(dir);
        expect({ i, code: again.code, stderr: again.stderr }).toEqual({ i, code: 0, stderr: '' });
        expect(leftovers(dir)).toEqual([]);
        expect(guestHash(f)).toBe(content);
        rmSync(dir, { recursive: true, force: true });
      }
      console.log(`[compact kill] uncrashed run ${full.ms} ms; kills: ${log.join(', ')}`);
      expect(existsSync(clean)).toBe(true);
    });
  }
});

/** The ranges bitmap `name` of `file` marks, as qemu-img map reads them through qemu-nbd's x-dirty-bitmap. */
function nbdBitmapMap(file: string, name: string): string {
  const sock = `${file}.${name}.sock`;
  const nbd = spawn('qemu-nbd', ['-r', '-f', 'qcow2', '-k', sock, '-B', name, '-t', file], { stdio: 'ignore' });
  try {
    for (let i = 0; i < 200 && !existsSync(sock); i++) spawnSync('sleep', ['0.02']);
    return qemuImg('map', '--output=json', '--image-opts', `driver=nbd,server.type=unix,server.path=${sock},x-dirty-bitmap=qemu:dirty-bitmap:${name}`);
  } finally {
    nbd.kill('SIGTERM');
    spawnSync('sleep', ['0.05']);
    rmSync(sock, { force: true });
  }
}
