// Convert against qemu-img: the same command by both tools on the same sources (random data from
// a seeded PRNG, compressible text, explicit zeros, zero-filled data, a few small writes) must
// give outputs that pass qemu-img check, read identically to the source (qemu-img compare), and
// occupy at most 1.02x what qemu-img's output occupies on disk (st_blocks * 512).
import { closeSync, existsSync, ftruncateSync, openSync, writeFileSync, writeSync, fsyncSync } from 'node:fs';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { describeOracle, qemuImg, qemuImgRun, qemuIo, tempDir } from '../../oracle/qemu';
import { ensureBuilt, strataBin } from '../../cli/run-cli';
import { allocatedBytes, expectClean, expectSameContent, fileHash, fileSize, MiB, KiB, qemuInfo, rng, strata, strataOk, randomBytes } from './helpers';

const GiB = 1024 * MiB;
const SIZE = 256 * MiB;
const RATIO = 1.02;


/** Text-like data (words from a small vocabulary, spaces, newlines): compresses to ~1/3. */
function textBytes(seed: number, len: number): Buffer {
  const words = ['qcow2', 'cluster', 'refcount', 'the', 'image', 'backing', 'of', 'a', 'snapshot', 'table', 'guest', 'write', 'zero', 'and', 'l2', 'entry', 'offset', 'header'];
  const r = rng(seed);
  const parts: string[] = [];
  let n = 0;
  while (n < len) {
    const w = words[Math.floor(r() * words.length)]! + (r() < 0.1 ? `${Math.floor(r() * 100000)}` : '');
    const sep = r() < 0.08 ? '\n' : ' ';
    parts.push(w, sep);
    n += w.length + 1;
  }
  return Buffer.from(parts.join('')).subarray(0, len);
}

/**
 * The source content, as qemu-io commands (identical for the qcow2 and the raw source):
 * twelve 2 MiB random pieces at unaligned offsets, 10 MiB of text, zero-filled data written as
 * data (`write -P 0`, also inside a random piece), explicit zeros (`write -z`) over data and over
 * nothing, 40 small pattern writes, and the last sector.
 */
function sourceCommands(file: (name: string) => string): string[] {
  const cmds: string[] = [];
  for (let i = 0; i < 12; i++) {
    const name = file(`rand-${i}.bin`);
    writeFileSync(name, randomBytes(100 + i, 2 * MiB));
    cmds.push(`write -s ${name} ${i * 20 * MiB + i * 4096 + 511 * (i % 3)} ${2 * MiB}`);
  }
  writeFileSync(file('text-0.bin'), textBytes(7, 6 * MiB));
  writeFileSync(file('text-1.bin'), textBytes(8, 4 * MiB));
  cmds.push(`write -s ${file('text-0.bin')} ${100 * MiB + 777} ${6 * MiB}`, `write -s ${file('text-1.bin')} ${240 * MiB} ${4 * MiB}`);
  cmds.push(`write -P 0 ${150 * MiB} ${4 * MiB}`, `write -P 0 ${MiB} ${64 * KiB}`, `write -P 0 ${40 * MiB + 8192 + 100 * KiB} ${3000}`);
  cmds.push(`write -z ${20 * MiB + MiB} ${512 * KiB}`, `write -z ${170 * MiB} ${3 * MiB}`, `write -z ${101 * MiB} ${MiB}`, `write -z ${60 * MiB + 12288} ${70000}`);
  const r = rng(99);
  for (let i = 0; i < 40; i++) {
    const len = 1 + Math.floor(r() * 8 * KiB);
    cmds.push(`write -P ${1 + Math.floor(r() * 254)} ${Math.floor(r() * (SIZE - len))} ${len}`);
  }
  cmds.push(`write -P 0x77 ${SIZE - 512} 512`);
  return cmds;
}

interface SizeRow { name: string; strata: number; qemu: number; strataFile: number; qemuFile: number }
const rows: SizeRow[] = [];

function record(name: string, ours: string, theirs: string): SizeRow {
  const row = { name, strata: allocatedBytes(ours), qemu: allocatedBytes(theirs), strataFile: fileSize(ours), qemuFile: fileSize(theirs) };
  rows.push(row);
  return row;
}

function expectWithinRatio(row: SizeRow): void {
  expect({ case: row.name, strataAllocated: row.strata, withinRatio: row.strata <= RATIO * row.qemu })
    .toEqual({ case: row.name, strataAllocated: row.strata, withinRatio: true });
}

describeOracle('convert against qemu-img', () => {
  const t = tempDir('strata-convert-');
  const qcowSrc = t.path('src.qcow2');
  const rawSrc = t.path('src.raw');
  let srcHashes: Record<string, string> = {};

  beforeAll(() => {
    ensureBuilt();
    const cmds = sourceCommands(t.path);
    qemuImg('create', '-q', '-f', 'qcow2', qcowSrc, String(SIZE));
    qemuIo(qcowSrc, cmds);
    qemuImg('create', '-q', '-f', 'raw', rawSrc, String(SIZE));
    qemuIo(rawSrc, cmds, { format: 'raw' });
    srcHashes = { [qcowSrc]: fileHash(qcowSrc), [rawSrc]: fileHash(rawSrc) };
    // Both sources hold the same guest content.
    expectSameContent(qcowSrc, rawSrc);
  });
  afterAll(() => {
    // The measured sizes, for the report.
    console.log('[convert sizes] case: strata allocated / qemu-img allocated (file sizes)\n' + rows.map((r) =>
      `  ${r.name}: ${r.strata} / ${r.qemu} = ${(r.strata / r.qemu).toFixed(4)} (file ${r.strataFile} / ${r.qemuFile})`).join('\n'));
    t.cleanup();
  });

  const variants: { name: string; args: string[]; raw?: boolean }[] = [
    { name: 'qcow2 default', args: ['-O', 'qcow2'] },
    { name: 'qcow2 -c (zlib)', args: ['-O', 'qcow2', '-c'] },
    { name: 'qcow2 -c -o compression_type=zstd', args: ['-O', 'qcow2', '-c', '-o', 'compression_type=zstd'] },
    { name: 'qcow2 -o cluster_size=128k,extended_l2=on', args: ['-O', 'qcow2', '-o', 'cluster_size=128k,extended_l2=on'] },
    { name: 'raw', args: ['-O', 'raw'], raw: true },
  ];
  for (const src of ['qcow2', 'raw'] as const) {
    for (const v of variants) {
      it(`${src} source -> ${v.name}: check clean, identical, allocation <= ${RATIO}x qemu-img`, async () => {
        const from = src === 'qcow2' ? qcowSrc : rawSrc;
        const ext = v.raw ? 'raw' : 'qcow2';
        const ours = t.path(`out-${src}-${variants.indexOf(v)}.${ext}`);
        const theirs = t.path(`qemu-${src}-${variants.indexOf(v)}.${ext}`);
        await strataOk('convert', ...v.args, from, ours);
        qemuImg('convert', ...v.args, from, theirs);
        if (!v.raw) expectClean(ours);
        expectSameContent(from, ours);
        if (v.raw) expect(fileHash(ours)).toBe(fileHash(theirs));
        if (!v.raw) {
          const info = qemuInfo(ours);
          const qinfo = qemuInfo(theirs);
          expect(info['cluster-size']).toBe(qinfo['cluster-size']);
          expect(info['format-specific']?.data).toEqual(qinfo['format-specific']?.data);
        }
        // The source is only read.
        expect(fileHash(from)).toBe(srcHashes[from]);
        expectWithinRatio(record(`${src} -> ${v.name}`, ours, theirs));
      });
    }
  }

  // The data path above runs through the native addon (readScan, writeQueued) where it is
  // built; the plain Node path must give the same files.
  for (const v of [variants[0]!, variants[4]!]) {
    it(`without the native addon (STRATA_NO_NATIVE=1, --force-unlocked): qcow2 source -> ${v.name} as with it`, () => {
      const ext = v.raw ? 'raw' : 'qcow2';
      const ours = t.path(`out-nonative-${variants.indexOf(v)}.${ext}`);
      const r = strataBin(['convert', '--force-unlocked', ...v.args, qcowSrc, ours], { env: { STRATA_NO_NATIVE: '1' } });
      expect(r.stderr).toBe('');
      expect(r.status).toBe(0);
      if (!v.raw) expectClean(ours);
      expectSameContent(qcowSrc, ours);
      if (v.raw) expect(fileHash(ours)).toBe(fileHash(t.path(`qemu-qcow2-${variants.indexOf(v)}.${ext}`)));
    });
  }

  it('compressed outputs really are compressed (text clusters), and no larger than the plain conversion', () => {
    const plain = rows.find((r) => r.name === 'qcow2 -> qcow2 default');
    const zlib = rows.find((r) => r.name === 'qcow2 -> qcow2 -c (zlib)');
    const zstd = rows.find((r) => r.name === 'qcow2 -> qcow2 -c -o compression_type=zstd');
    expect(plain && zlib && zstd).toBeTruthy();
    // 10 MiB of text compresses to well under half.
    expect(zlib!.strata).toBeLessThan(plain!.strata - 5 * MiB);
    expect(zstd!.strata).toBeLessThan(plain!.strata - 5 * MiB);
    const check = JSON.parse(qemuImg('check', '--output=json', t.path('out-qcow2-1.qcow2'))) as { 'compressed-clusters'?: number };
    expect(check['compressed-clusters'] ?? 0).toBeGreaterThan(100);
    expect(qemuInfo(t.path('out-qcow2-2.qcow2'))['format-specific']?.data['compression-type']).toBe('zstd');
  });

  it('-B onto the source\'s own base: only the overlay\'s differences are stored, reads identical', async () => {
    const d = tempDir('strata-convert-B-');
    try {
      const base = d.path('base.qcow2');
      const top = d.path('top.qcow2');
      qemuImg('create', '-q', '-f', 'qcow2', base, String(SIZE));
      qemuIo(base, [`write -s ${t.path('rand-0.bin')} 0 2M`, `write -s ${t.path('text-0.bin')} 10M 6M`, 'write -P 0x33 64M 16M', 'write -P 0x44 200M 1M']);
      qemuImg('create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', top);
      // Differences: new random data, a pattern over base data, zeros over base data (must be
      // stored as zeros), the same bytes the base already has (need not be stored), sub-cluster writes.
      qemuIo(top, [
        `write -s ${t.path('rand-1.bin')} ${30 * MiB + 100} 2M`, 'write -P 0x55 65M 1M', 'write -z 66M 1M', 'write -P 0 200M 512k',
        'write -P 0x33 70M 2M', 'write -P 0x66 11M 3000', 'write -P 0x67 250M 65536',
      ]);
      const ours = d.path('out.qcow2');
      const theirs = d.path('qemu.qcow2');
      await strataOk('convert', '-O', 'qcow2', '-B', 'base.qcow2', '-F', 'qcow2', top, ours);
      qemuImg('convert', '-O', 'qcow2', '-B', 'base.qcow2', '-F', 'qcow2', top, theirs);
      expectClean(ours);
      expectSameContent(top, ours);
      const info = qemuInfo(ours);
      expect(info['backing-filename']).toBe('base.qcow2');
      expect(info['backing-filename-format']).toBe('qcow2');
      const row = record('-B onto the own base', ours, theirs);
      expectWithinRatio(row);
      // About 6 MiB of differences: nowhere near the base's 25 MiB.
      expect(row.strata).toBeLessThan(8 * MiB);
      // -c with -B: the differences compressed cluster by cluster, the same content.
      const packed = d.path('out-c.qcow2');
      await strataOk('convert', '-c', '-O', 'qcow2', '-B', 'base.qcow2', '-F', 'qcow2', top, packed);
      expectClean(packed);
      expectSameContent(top, packed);
      const check = JSON.parse(qemuImg('check', '--output=json', packed)) as { 'compressed-clusters'?: number };
      expect(check['compressed-clusters'] ?? 0).toBeGreaterThan(10);
    } finally {
      d.cleanup();
    }
  });

  it('64 GiB overlay with a few MiB over a 256 MiB base, flattened: identical, < 100 MiB, <= 1.02x qemu-img', async () => {
    const d = tempDir('strata-convert-flat-');
    try {
      const top = d.path('big.qcow2');
      qemuImg('create', '-q', '-f', 'qcow2', '-b', qcowSrc, '-F', 'qcow2', top, String(64 * GiB));
      qemuIo(top, [
        `write -s ${t.path('rand-2.bin')} ${5 * MiB + 3} 2M`, 'write -z 1M 512k', `write -s ${t.path('rand-3.bin')} ${10 * GiB} 2M`,
        'write -P 0x5a 255M 2M', `write -s ${t.path('text-1.bin')} ${63 * GiB + 4096} 3M`, `write -P 0x11 ${64 * GiB - 4096} 4096`,
      ]);
      const ours = d.path('flat.qcow2');
      const theirs = d.path('qemu-flat.qcow2');
      const t0 = Date.now();
      await strataOk('convert', '-O', 'qcow2', top, ours);
      const ms = Date.now() - t0;
      qemuImg('convert', '-O', 'qcow2', top, theirs);
      expectClean(ours);
      expectSameContent(top, ours);
      expect(qemuInfo(ours)['backing-filename']).toBeUndefined();
      expect(qemuInfo(ours)['virtual-size']).toBe(64 * GiB);
      const row = record(`flatten 64 GiB overlay (${ms} ms)`, ours, theirs);
      expect(row.strata).toBeLessThan(100 * MiB);
      expectWithinRatio(row);
    } finally {
      d.cleanup();
    }
  });

  it('-n into an existing qcow2 target prefilled with garbage: zeros are written where the source reads zero', async () => {
    const target = t.path('existing.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', target, String(SIZE));
    qemuIo(target, [`write -P 0xa5 0 ${SIZE}`]);
    await strataOk('convert', '-n', '-O', 'qcow2', qcowSrc, target);
    expectClean(target);
    expectSameContent(qcowSrc, target);
  });

  it('-n into an existing raw target prefilled with garbage', async () => {
    const target = t.path('existing.raw');
    const fd = openSync(target, 'w');
    try {
      const junk = Buffer.alloc(4 * MiB, 0xa5);
      for (let off = 0; off < SIZE; off += junk.length) writeSync(fd, junk, 0, junk.length, off);
      fsyncSync(fd);
    } finally {
      closeSync(fd);
    }
    await strataOk('convert', '-n', '-O', 'raw', qcowSrc, target);
    expect(fileSize(target)).toBe(SIZE);
    expectSameContent(qcowSrc, target);
  });

  it('-n --target-is-zero into a fresh qcow2: identical and as sparse as qemu-img\'s', async () => {
    const ours = t.path('tiz.qcow2');
    const theirs = t.path('tiz-qemu.qcow2');
    for (const f of [ours, theirs]) qemuImg('create', '-q', '-f', 'qcow2', f, String(SIZE));
    await strataOk('convert', '-n', '--target-is-zero', '-O', 'qcow2', qcowSrc, ours);
    qemuImg('convert', '-n', '--target-is-zero', '-O', 'qcow2', qcowSrc, theirs);
    expectClean(ours);
    expectSameContent(qcowSrc, ours);
    expectWithinRatio(record('-n --target-is-zero qcow2', ours, theirs));
  });

  it('-l snapshot.name=S to qcow2: the snapshot\'s content, not the current one', async () => {
    const d = tempDir('strata-convert-snap-');
    try {
      const img = d.path('snap.qcow2');
      qemuImg('create', '-q', '-f', 'qcow2', img, String(64 * MiB));
      qemuIo(img, [`write -s ${t.path('rand-4.bin')} 1000 2M`, 'write -P 0x21 8M 3M', 'write -z 9M 64k']);
      qemuImg('snapshot', '-c', 'S', img);
      qemuIo(img, ['write -P 0x99 0 1M', 'write -z 8M 1M', 'write -P 0x98 40M 1M']);
      const ours = d.path('out.qcow2');
      const theirs = d.path('qemu.qcow2');
      await strataOk('convert', '-l', 'snapshot.name=S', '-O', 'qcow2', img, ours);
      qemuImg('convert', '-l', 'snapshot.name=S', '-O', 'qcow2', img, theirs);
      expectClean(ours);
      expectSameContent(theirs, ours);
      expect(qemuImgRun('compare', img, ours).status).toBe(1);
      expect(qemuInfo(ours).snapshots ?? []).toEqual([]);
      expectWithinRatio(record('-l snapshot.name=S', ours, theirs));
    } finally {
      d.cleanup();
    }
  });

  it('a raw source with holes (truncate + dd) converts sparse, to raw and to qcow2', async () => {
    const d = tempDir('strata-convert-holes-');
    try {
      const src = d.path('holes.raw');
      const fd = openSync(src, 'w');
      try {
        ftruncateSync(fd, GiB);
        let i = 0;
        for (const off of [0, 100 * MiB + 4096, 512 * MiB + 1, GiB - MiB]) {
          const b = randomBytes(500 + i++, MiB);
          writeSync(fd, b, 0, b.length, off);
        }
        fsyncSync(fd);
      } finally {
        closeSync(fd);
      }
      expect(allocatedBytes(src)).toBeLessThanOrEqual(5 * MiB);
      for (const fmt of ['raw', 'qcow2'] as const) {
        const ours = d.path(`out.${fmt}`);
        const theirs = d.path(`qemu.${fmt}`);
        await strataOk('convert', '-f', 'raw', '-O', fmt, src, ours);
        qemuImg('convert', '-f', 'raw', '-O', fmt, src, theirs);
        if (fmt === 'qcow2') expectClean(ours);
        else expect(fileSize(ours)).toBe(GiB);
        expectSameContent(src, ours);
        const row = record(`raw with holes -> ${fmt}`, ours, theirs);
        expect(row.strata).toBeLessThanOrEqual(6 * MiB);
        expectWithinRatio(row);
      }
    } finally {
      d.cleanup();
    }
  });

  it('a failed convert leaves no target behind (missing backing file of -B)', async () => {
    const out = t.path('never.qcow2');
    const r = await strata('convert', '-O', 'qcow2', '-B', 'does-not-exist.qcow2', '-F', 'qcow2', qcowSrc, out);
    expect(r.code).not.toBe(0);
    expect(r.err.trim().split('\n').length).toBeLessThanOrEqual(2);
    expect(existsSync(out)).toBe(false);
  });
});
